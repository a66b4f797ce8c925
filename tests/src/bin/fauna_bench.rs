//! `tokenbroker-fauna-bench`: IssueTokens on the Fauna store next to the original trigger
//! Lambda's pattern (look up, register if missing, create refresh, create access: four
//! sequential requests), against the same Fauna test double adding the same latency per request,
//! in one process and one run. Prints a markdown table.
//!
//! ```sh
//! cargo run --release -p tokenbroker-tests --bin tokenbroker-fauna-bench -- --latency-ms 50
//! ```

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use tokenbroker::{
    model::clock::{Clock, SystemClock},
    store::StoreBackend,
};
use tokenbroker_tests::{
    TestBroker, claims_request,
    fauna::{FaunaDouble, original_lambda},
};

/// Compares the broker's IssueTokens on Fauna with the original four-request pattern.
#[derive(Debug, Parser)]
struct Args {
    /// Latency the double adds to every request, in milliseconds.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Sequential sign-ins timed for each pattern.
    #[arg(long, default_value_t = 100)]
    sign_ins: usize,
    /// Concurrent callers for the throughput run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Length of the throughput run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Warnings only, to stderr: installed before TestBroker so its TRACE capture (meant for
    // tests) stays off and costs nothing here.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let double = FaunaDouble::start(clock).await;
    let endpoint = double.endpoint();
    let key = double.server_key();
    let broker = TestBroker::spawn_with({
        let (endpoint, key) = (endpoint.clone(), key.clone());
        move |s| {
            s.store.backend = StoreBackend::Fauna;
            s.store.fauna.endpoint = endpoint;
            s.store.fauna.secret = Some(key);
        }
    })
    .await;
    double.set_latency(Duration::from_millis(args.latency_ms));

    let http = reqwest::Client::new();
    let original = Original {
        http: &http,
        url: format!("{endpoint}/query/1"),
        key: key.expose_secret().to_owned(),
    };

    let mut rows = Vec::new();
    for label in ["first sign-in", "returning user"] {
        let mut original_times = Vec::new();
        let mut broker_times = Vec::new();
        for i in 0..args.sign_ins {
            // The returning-user round signs in the emails of the first round again.
            let email = format!("user{i}@example.com");
            let started = Instant::now();
            let requests = original.sign_in(&email).await?;
            original_times.push(started.elapsed());
            if label == "first sign-in" && requests != 4 {
                bail!("the original pattern made {requests} requests for a first sign-in");
            }
            // The broker signs in a distinct address space so both start from the same state.
            let email = format!("broker-{email}");
            let started = Instant::now();
            broker
                .trigger
                .issue_tokens(claims_request(&email, ""))
                .await
                .context("IssueTokens failed")?;
            broker_times.push(started.elapsed());
        }
        rows.push((
            label,
            median(&mut original_times),
            median(&mut broker_times),
        ));
    }

    let throughput = throughput(&broker, args.concurrency, args.seconds).await?;

    println!(
        "## IssueTokens on Fauna vs the original Lambda pattern\n\n\
         - double latency: {} ms per request; {} sequential sign-ins per row; one process, one run\n",
        args.latency_ms, args.sign_ins
    );
    println!("| sign-in | original (4 or 3 requests) p50 | broker (1 request) p50 | ratio |");
    println!("|---|---:|---:|---:|");
    for (label, original, broker) in rows {
        println!(
            "| {label} | {:.1} ms | {:.1} ms | {:.2} |",
            ms(original),
            ms(broker),
            ms(broker) / ms(original)
        );
    }
    println!(
        "\nIssueTokens/s with {} concurrent callers for {} s: {:.0} ({} calls, {} errors, p50 {:.1} ms, p99 {:.1} ms)",
        args.concurrency,
        args.seconds,
        throughput.rate,
        throughput.calls,
        throughput.errors,
        ms(throughput.p50),
        ms(throughput.p99)
    );
    Ok(())
}

/// The original trigger's requests, sent as its v10 driver would (tagged format, server key).
struct Original<'a> {
    http: &'a reqwest::Client,
    url: String,
    key: String,
}

impl Original<'_> {
    /// Signs `email` in the original way; returns how many requests it took.
    async fn sign_in(&self, email: &str) -> anyhow::Result<usize> {
        let mut requests = 1;
        let found = self
            .query(original_lambda::LOOKUP, json!({ "email": email }))
            .await?;
        let account = if found.is_null() {
            requests += 1;
            self.query(original_lambda::REGISTER, json!({ "email": email }))
                .await?
        } else {
            found
        };
        let account_id = doc_id(&account)?;
        let refresh = self
            .query(
                original_lambda::CREATE_REFRESH,
                json!({ "account_id": account_id, "ttl": { "@int": "3600" } }),
            )
            .await?;
        let refresh_id = doc_id(&refresh)?;
        self.query(
            original_lambda::CREATE_ACCESS,
            json!({ "account_id": account_id, "ttl": { "@int": "600" }, "parent": refresh_id }),
        )
        .await?;
        Ok(requests + 2)
    }

    async fn query(&self, text: &str, arguments: Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(&self.key)
            .header("x-format", "tagged")
            .header("x-typecheck", "false")
            .json(&json!({ "query": text, "arguments": arguments }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("the double answered {status}: {}", body["error"]);
        }
        Ok(body["data"].clone())
    }
}

fn doc_id(value: &Value) -> anyhow::Result<String> {
    value
        .pointer("/@doc/id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .context("expected a document")
}

struct Throughput {
    rate: f64,
    calls: usize,
    errors: usize,
    p50: Duration,
    p99: Duration,
}

/// Runs `concurrency` callers issuing for new emails for `seconds`.
async fn throughput(
    broker: &TestBroker,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<Throughput> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let client = broker.trigger.clone();
            tokio::spawn(async move {
                let (mut times, mut errors, mut n) = (Vec::new(), 0usize, 0usize);
                while Instant::now() < until {
                    let email = format!("load{task}-{n}@example.com");
                    n += 1;
                    let call = Instant::now();
                    match client.issue_tokens(claims_request(&email, "")).await {
                        Ok(_) => times.push(call.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (times, errors)
            })
        })
        .collect();
    let (mut times, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (t, e) = task.await?;
        times.extend(t);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let calls = times.len();
    times.sort();
    let p99 = times
        .get(calls.saturating_mul(99) / 100)
        .copied()
        .unwrap_or_default();
    Ok(Throughput {
        rate: calls as f64 / elapsed,
        calls,
        errors,
        p50: median(&mut times),
        p99,
    })
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
