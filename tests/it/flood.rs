//! A flood of garbage anonymous calls from many loopback addresses (all of 127.0.0.0/8 routes
//! to this host): forged refresh and revoke secrets are answered from one read, never queued
//! for the writer and never audited; the per-address and the shared anonymous limits hold the
//! flood; and the trigger's sign-ins go on.

use std::net::IpAddr;

use tokenbroker::domain::admission::RateLimit;
use tokenbroker_proto::v1::{
    RefreshTokensRequest, RevokeRequest, revoke_request::Target,
    token_broker_client::TokenBrokerClient,
};
use tokenbroker_tests::claims_request;
use tonic::{Code, transport::Endpoint};

use crate::audit::{audited_broker, read_events};

/// Client addresses of the flood, and calls each sends.
const ADDRESSES: u8 = 64;
const CALLS_PER_ADDRESS: usize = 40;

fn forged(prefix: &str, n: usize) -> String {
    format!("{prefix}{n:032x}_{}", "A".repeat(43))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_garbage_flood_from_many_addresses_queues_nothing_audits_nothing_and_stops_no_sign_in() {
    let dir = tempfile::tempdir().expect("temp dir");
    let audit = dir.path().join("audit.log");
    let broker = audited_broker(&audit, |s| {
        s.metrics.listen = Some(([127, 0, 0, 1], 0).into());
        // Each address stays under its own limit; together they are far over the shared one.
        s.limits.anonymous = Some(RateLimit {
            per_second: 50.0,
            burst: CALLS_PER_ADDRESS as u32,
        });
        s.limits.anonymous_total = Some(RateLimit {
            per_second: 10.0,
            burst: 200,
        });
    })
    .await;

    let mut flood = tokio::task::JoinSet::new();
    for a in 0..ADDRESSES {
        let local: IpAddr = [127, 0, 1, a + 1].into();
        let endpoint = Endpoint::from_shared(broker.endpoint.clone())
            .expect("endpoint")
            .local_address(Some(local));
        flood.spawn(async move {
            let channel = endpoint
                .connect()
                .await
                .expect("the broker accepts the address");
            let mut client = TokenBrokerClient::new(channel);
            let mut codes = Vec::new();
            for i in 0..CALLS_PER_ADDRESS {
                let n = usize::from(a) * CALLS_PER_ADDRESS + i;
                let code = match i % 3 {
                    0 => client
                        .refresh_tokens(RefreshTokensRequest {
                            refresh_token: forged("tbr_", n),
                            ..Default::default()
                        })
                        .await
                        .err()
                        .map(|s| s.code()),
                    1 => client
                        .revoke(RevokeRequest {
                            target: Some(Target::Token(forged("tba_", n))),
                            ..Default::default()
                        })
                        .await
                        .err()
                        .map(|s| s.code()),
                    _ => client
                        .refresh_tokens(RefreshTokensRequest {
                            refresh_token: format!("garbage-{n}"),
                            ..Default::default()
                        })
                        .await
                        .err()
                        .map(|s| s.code()),
                };
                codes.push(code.unwrap_or(Code::Ok));
            }
            codes
        });
    }

    // Meanwhile the trigger signs users in, and the writer's queue is watched.
    let mut longest_queue = 0.0_f64;
    let mut slowest_sign_in = std::time::Duration::ZERO;
    for n in 0..50 {
        let started = std::time::Instant::now();
        broker
            .trigger
            .issue_tokens(claims_request(&format!("user{n}@example.com"), "web"))
            .await
            .expect("a sign-in succeeds during the flood");
        slowest_sign_in = slowest_sign_in.max(started.elapsed());
        longest_queue = longest_queue.max(metric(
            &broker.scrape().await,
            "tokenbroker_store_writer_queue_length",
        ));
    }
    let mut codes = Vec::new();
    while let Some(result) = flood.join_next().await {
        codes.extend(result.expect("a flood task"));
    }

    let count = |code: Code| codes.iter().filter(|c| **c == code).count();
    let throttled = count(Code::ResourceExhausted);
    let answered = count(Code::Unauthenticated) + count(Code::Ok);
    eprintln!(
        "flood: {} garbage calls from {ADDRESSES} addresses: {throttled} throttled, {answered} \
         answered; 50 sign-ins served, slowest {slowest_sign_in:?}; longest writer queue \
         {longest_queue}",
        codes.len()
    );
    assert_eq!(
        throttled + answered,
        codes.len(),
        "garbage gets UNAUTHENTICATED (refresh), OK (revoke of an unknown token) or \
         RESOURCE_EXHAUSTED, nothing else: {codes:?}"
    );
    assert!(
        throttled > codes.len() / 2,
        "the shared anonymous limit holds the flood back: {throttled} of {} throttled",
        codes.len()
    );
    // The trigger's writes are the only ones, one at a time.
    assert!(
        longest_queue <= 1.0,
        "the writer queue grew to {longest_queue}"
    );
    let scraped = broker.scrape().await;
    assert!(
        metric(
            &scraped,
            "tokenbroker_throttled_total{reason=\"anonymous_total\"}"
        ) > 0.0
    );
    assert_eq!(
        metric(&scraped, "tokenbroker_unknown_secrets_total") as usize,
        answered,
        "every garbage call that was not throttled is counted as an unknown secret"
    );
    // The audit log holds the sign-ins and nothing of the flood.
    let events = read_events(&audit);
    assert_eq!(
        events.len(),
        2 * 50,
        "a request and a response line per sign-in"
    );
    assert!(events.iter().all(|e| e["event"] == "issue"), "{events:?}");
    assert_eq!(
        metric(&scraped, "tokenbroker_store_writes_refused_total"),
        0.0
    );
}

/// The value of the sample `series` (a name, with its labels if it has any) in a scrape.
fn metric(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in the scrape"))
}
