//! `tokenbroker-cognito-bench`: measures Cognito JWT verification and the token exchange, in one
//! run on this machine, and prints a markdown table.
//!
//! - verifications/s of fresh tokens (every token new to the verifier: an RSA-2048 signature
//!   check each) and of one repeated token (answered from the verified-token cache), calling
//!   the verifier directly from `--concurrency` tasks;
//! - IssueTokens/s through gRPC on loopback against an in-process broker (embedded store,
//!   normal durability), with asserted claims (trigger key) next to `cognito_token` (service
//!   key): a new email per call (a first sign-in; for the exchange a fresh ID token, so an RSA
//!   check each) and one email over and over (for the exchange one repeated token, a cache hit).
//!
//! The JWKS is served over HTTP on loopback by the test double; keys and tokens are generated
//! before timing starts. The load generator shares the machine with the broker, so compare the
//! rows with each other rather than reading them as capacity.
//!
//! ```sh
//! cargo run --release -p tokenbroker-tests --bin tokenbroker-cognito-bench
//! ```

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use secrecy::{ExposeSecret as _, SecretString};
use tokenbroker::{
    Application,
    app::dev::generate_dev_keys,
    app::settings::Settings,
    identity::cognito::{CognitoVerifier, TokenUse},
    model::clock::SystemClock,
};
use tokenbroker_client::{Client, pb};
use tokenbroker_tests::{
    claims_request,
    cognito::{TestPool, id_claims},
};
use tokio::task::JoinSet;

/// Cognito verification and exchange benchmark.
#[derive(Debug, Parser)]
#[command(name = "tokenbroker-cognito-bench")]
struct Args {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Tasks (verifier) or calls in flight (gRPC) at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Distinct tokens minted for the fresh-token measurements (verification stops early
    /// when they run out; the exchange rounds share them).
    #[arg(long, default_value_t = 60_000)]
    tokens: usize,
    /// Rounds of the four IssueTokens cases, alternating.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tokenbroker-cognito-bench: failed to start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tokenbroker-cognito-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(args.duration);
    let pool = TestPool::start().await;
    eprintln!("minting {} tokens …", args.tokens);
    let tokens = Arc::new(mint(&pool, "c", args.tokens).await?);
    let mut rows: Vec<(String, Measured)> = Vec::new();

    eprintln!("verifying …");
    let fresh = verify_fresh(&pool, &tokens, args.concurrency, duration).await?;
    rows.push(("verify, fresh token (RSA-2048 check)".into(), fresh));
    let cached = verify_cached(&pool, &tokens[0], args.concurrency, duration).await?;
    rows.push(("verify, repeated token (cache hit)".into(), cached));

    // The broker has its own verifier, so every token is fresh to it again. Rounds alternate
    // the cases so that a store growing over the run, or other work on the machine, weighs on
    // each case alike.
    let (broker, stop, _dir) = start_broker(&pool).await?;
    let cursor = Arc::new(AtomicU64::new(0));
    for round in 1..=args.rounds {
        eprintln!("round {round} of IssueTokens …");
        let asserted = issue_rate(&broker, args.concurrency, duration, move |i| {
            Request::Claims(claims_request(
                &format!("a{round}-{i}@bench.example"),
                "bench",
            ))
        })
        .await?;
        rows.push((
            format!("IssueTokens, asserted claims, new email each call (round {round})"),
            asserted,
        ));
        let (shared, next) = (Arc::clone(&tokens), Arc::clone(&cursor));
        let exchanged = issue_rate(&broker, args.concurrency, duration, move |_| {
            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
            Request::Token(Arc::clone(&shared), i)
        })
        .await?;
        rows.push((
            format!(
                "IssueTokens, cognito_token, fresh ID token (new email) each call (round {round})"
            ),
            exchanged,
        ));
        let same = issue_rate(&broker, args.concurrency, duration, |_| {
            Request::Claims(claims_request("c0@bench.example", "bench"))
        })
        .await?;
        rows.push((
            format!("IssueTokens, asserted claims, one email (round {round})"),
            same,
        ));
        let shared = Arc::clone(&tokens);
        let repeated = issue_rate(&broker, args.concurrency, duration, move |_| {
            Request::Token(Arc::clone(&shared), 0)
        })
        .await?;
        rows.push((
            format!("IssueTokens, cognito_token, one repeated ID token (round {round})"),
            repeated,
        ));
    }
    let _ = stop.send(());

    println!("| measurement | rate | calls | errors |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, m) in rows {
        println!(
            "| {name} | {:.0}/s | {} | {} |",
            m.rate(),
            m.calls,
            m.errors
        );
    }
    Ok(())
}

/// Mints `n` ID tokens for distinct emails, on every core.
async fn mint(pool: &TestPool, prefix: &str, n: usize) -> anyhow::Result<Vec<SecretString>> {
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let key = pool.id_key.clone();
        let prefix = prefix.to_owned();
        tasks.spawn_blocking(move || {
            (w..n)
                .step_by(workers)
                .map(|i| {
                    let claims = id_claims(&format!("{prefix}{i}@bench.example"));
                    (i, SecretString::from(key.sign(&claims)))
                })
                .collect::<Vec<_>>()
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(part) = tasks.join_next().await {
        all.extend(part.context("minting task failed")?);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, token)| token).collect())
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    calls: u64,
    errors: u64,
    elapsed: Duration,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
}

async fn verifier(pool: &TestPool) -> anyhow::Result<Arc<CognitoVerifier>> {
    let verifier = CognitoVerifier::new(&pool.settings(), Arc::new(SystemClock))?;
    anyhow::ensure!(verifier.hydrate().await, "the jwks did not load");
    Ok(Arc::new(verifier))
}

/// Every task takes the next token not verified yet; each token is new to the verifier, so
/// every call pays for the RSA check. Stops at `duration` or when the tokens run out.
async fn verify_fresh(
    pool: &TestPool,
    tokens: &Arc<Vec<SecretString>>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let verifier = verifier(pool).await?;
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (verifier, tokens, next, errors) = (
            Arc::clone(&verifier),
            Arc::clone(tokens),
            Arc::clone(&next),
            Arc::clone(&errors),
        );
        tasks.spawn(async move {
            while started.elapsed() < duration {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(token) = tokens.get(i) else { break };
                if verifier.verify(token, &[TokenUse::Id]).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let calls = next.load(Ordering::Relaxed).min(tokens.len() as u64);
    anyhow::ensure!(
        verifier.signature_checks() == calls,
        "every fresh token must be checked once"
    );
    Ok(Measured {
        calls,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
    })
}

async fn verify_cached(
    pool: &TestPool,
    token: &SecretString,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let verifier = verifier(pool).await?;
    let calls = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (verifier, calls, errors, token) = (
            Arc::clone(&verifier),
            Arc::clone(&calls),
            Arc::clone(&errors),
            token.clone(),
        );
        tasks.spawn(async move {
            while started.elapsed() < duration {
                if verifier.verify(&token, &[TokenUse::Id]).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    anyhow::ensure!(
        verifier.signature_checks() == 1,
        "one check, then cache hits"
    );
    Ok(Measured {
        calls: calls.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

struct Broker {
    trigger: Client,
    service: Client,
}

async fn start_broker(
    pool: &TestPool,
) -> anyhow::Result<(Broker, tokio::sync::oneshot::Sender<()>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let keys = generate_dev_keys();
    let mut settings = Settings::default();
    settings.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    settings.store.embedded.dir = dir.path().to_owned();
    settings.api_keys = keys.iter().map(|k| k.config.clone()).collect();
    settings.cognito = pool.settings();
    let app = Application::build(settings).await?;
    let endpoint = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = Client::connect(&endpoint)
        .await?
        .with_timeout(Duration::from_secs(10));
    let key = |variable: &str| {
        keys.iter()
            .find(|k| k.variable == variable)
            .map(|k| k.key.clone())
            .context("dev key")
    };
    Ok((
        Broker {
            trigger: client.clone().with_api_key(&key("TB_TRIGGER_KEY")?)?,
            service: client.with_api_key(&key("TB_SERVICE_KEY")?)?,
        },
        stop,
        dir,
    ))
}

enum Request {
    Claims(pb::IssueTokensRequest),
    Token(Arc<Vec<SecretString>>, usize),
}

/// Drives IssueTokens from `concurrency` tasks for `duration`; call `i` sends `request(i)`.
async fn issue_rate(
    broker: &Broker,
    concurrency: usize,
    duration: Duration,
    request: impl Fn(usize) -> Request + Send + Sync + 'static,
) -> anyhow::Result<Measured> {
    let request = Arc::new(request);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (request, next, errors, done) = (
            Arc::clone(&request),
            Arc::clone(&next),
            Arc::clone(&errors),
            Arc::clone(&done),
        );
        let (trigger, service) = (broker.trigger.clone(), broker.service.clone());
        tasks.spawn(async move {
            while started.elapsed() < duration {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let result = match request(i) {
                    Request::Claims(claims) => trigger.issue_tokens(claims).await,
                    Request::Token(tokens, i) => {
                        let Some(token) = tokens.get(i) else { break };
                        service
                            .issue_tokens(pb::IssueTokensRequest {
                                subject: Some(pb::issue_tokens_request::Subject::CognitoToken(
                                    token.expose_secret().to_owned(),
                                )),
                                ..Default::default()
                            })
                            .await
                    }
                };
                if result.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(Measured {
        calls: done.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}
