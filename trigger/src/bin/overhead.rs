//! Measures the handler's own cost: everything an invocation does apart from the broker call
//! (parsing the event, deriving the key, building the request and the reply, writing the log
//! line through the Lambda runtime's own subscriber into a sink), as the median and p99 over
//! many in-process invocations against a broker that answers at once.
//!
//! `cargo run --release -p tokenbroker-trigger --bin tokenbroker-trigger-overhead [N]`. Not
//! part of the Lambda package (`cargo lambda build --bin bootstrap`).

use std::time::{Duration, Instant};

use lambda_runtime::{Context, LambdaEvent};
use secrecy::SecretString;
use serde_json::Value;
use tokenbroker_client::{ClientResult, IssuedToken, TokenPair, pb};
use tokenbroker_trigger::{CallContext, Config, Deps, handle};

/// A broker that answers at once with a fixed pair.
#[derive(Debug)]
struct InstantBroker;

impl Deps for InstantBroker {
    async fn issue_tokens(
        &self,
        _request: pb::IssueTokensRequest,
        _call: CallContext,
    ) -> ClientResult<TokenPair> {
        let token = |id: &str, secret: &str| IssuedToken {
            token_id: id.to_owned(),
            secret: SecretString::from(secret),
            expires_at: None,
        };
        Ok(TokenPair {
            account_id: "acct_0123456789".into(),
            family_id: "fam_0123456789".into(),
            refresh: token(
                "tok_r",
                "tbr_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP",
            ),
            access: token(
                "tok_a",
                "tba_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOP",
            ),
            replayed: false,
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    // The subscriber `bootstrap` installs, writing nowhere: the log line's cost counts.
    lambda_runtime::tracing::init_default_subscriber_with_writer(std::io::sink);
    let config = Config::new("http://127.0.0.1:1", SecretString::from("unused"));
    let mut report = Vec::new();
    for (name, text) in [
        ("v1", include_str!("../../tests/fixtures/v1-bare.json")),
        (
            "v3",
            include_str!("../../tests/fixtures/v3-hosted-auth.json"),
        ),
    ] {
        let event: Value = serde_json::from_str(text).expect("fixture is JSON");
        let mut times = Vec::with_capacity(runs);
        for i in 0..runs + 100 {
            let mut context = Context::default();
            context.deadline = deadline_in(Duration::from_secs(5));
            let invocation = LambdaEvent::new(event.clone(), context);
            let started = Instant::now();
            let reply = handle(invocation, &config, &InstantBroker).await;
            let elapsed = started.elapsed();
            let reply = reply.expect("the handler answers");
            assert!(
                reply["response"].to_string().contains("fauna_access_token"),
                "the reply carries the claims"
            );
            if i >= 100 {
                times.push(elapsed);
            }
        }
        times.sort_unstable();
        let median = times[times.len() / 2];
        let p99 = times[times.len() * 99 / 100];
        report.push(format!(
            "{name}: {runs} invocations, median {} us, p99 {} us, max {} us",
            median.as_micros(),
            p99.as_micros(),
            times[times.len() - 1].as_micros()
        ));
    }
    for line in report {
        println!("{line}");
    }
}

fn deadline_in(left: Duration) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    (now + left).as_millis() as u64
}
