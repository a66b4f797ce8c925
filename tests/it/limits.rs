//! Limits: per-caller and per-peer rate limits, the in-flight limit and the request size
//! limit, each answered with RESOURCE_EXHAUSTED while other callers keep being served.

use std::time::{Duration, Instant};

use tokenbroker::{
    domain::admission::{LimitSettings, RateLimit},
    store::StoreBackend,
};
use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{TestBroker, claims_request, fauna::FaunaDouble};

use crate::metrics::Scrape;

/// A broker with the metrics endpoint on a free port.
fn with_metrics(s: &mut tokenbroker::app::settings::Settings) {
    s.metrics.listen = Some(([127, 0, 0, 1], 0).into());
}

fn limited(per_second: f64, burst: u32) -> RateLimit {
    RateLimit { per_second, burst }
}

fn introspect(secret: &str) -> pb::IntrospectRequest {
    pb::IntrospectRequest {
        token: secret.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_caller_over_its_budget_is_throttled_while_another_is_served() {
    let broker = TestBroker::spawn_with(|s| {
        with_metrics(s);
        s.limits
            .callers
            .insert("dev-trigger".into(), limited(2.0, 3));
    })
    .await;
    for i in 0..3 {
        broker.issue(&format!("user{i}@example.com")).await;
    }
    // The advised wait counts from when the broker refused, which is after this.
    let first_sent = Instant::now();
    let err = broker
        .trigger
        .issue_tokens(claims_request("user3@example.com", ""))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::ResourceExhausted, "{err}");
    assert!(err.message().contains("dev-trigger"), "{err}");
    let retry_after = err.retry_after().expect("a RetryInfo detail");
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_millis(500),
        "{retry_after:?}"
    );

    // Meanwhile the service and admin callers are not slowed down at all.
    for _ in 0..50 {
        let info = broker
            .service
            .introspect(introspect("tba_not-a-real-token"))
            .await
            .unwrap();
        assert!(!info.active);
    }
    broker.revoke_email("user0@example.com").await;
    // Every refusal is counted, to match against the metric.
    let mut refused = 1;
    // The trigger is still over budget unless the refill time has passed…
    let mut wait = retry_after;
    // Whether `wait` is what the latest call was advised.
    let mut advised = false;
    match broker
        .trigger
        .issue_tokens(claims_request("user4@example.com", ""))
        .await
    {
        Ok(_) => assert!(
            first_sent.elapsed() >= retry_after,
            "served before the advertised wait"
        ),
        Err(err) => {
            assert_eq!(err.kind(), ClientErrorKind::ResourceExhausted, "{err}");
            wait = err.retry_after().expect("a RetryInfo detail");
            advised = true;
            refused += 1;
        }
    }
    // …and is served again once it has. A call made after the wait the latest refusal advised
    // is served. Only when the call above was served (it took the token that had refilled, on a
    // slow machine) is the first wait too short; that attempt's refusal then advises the wait
    // that must do. So this takes at most two attempts.
    loop {
        // A little over the advice, for the rounding of a wait to whole durations.
        tokio::time::sleep(wait + Duration::from_millis(20)).await;
        match broker
            .trigger
            .issue_tokens(claims_request("user5@example.com", ""))
            .await
        {
            Ok(_) => break,
            Err(err) => {
                assert_eq!(err.kind(), ClientErrorKind::ResourceExhausted, "{err}");
                assert!(
                    !advised,
                    "refused after waiting the advertised {wait:?}: {err}"
                );
                wait = err.retry_after().expect("a RetryInfo detail");
                advised = true;
                refused += 1;
            }
        }
    }
    let scrape = Scrape::parse(broker.scrape().await);
    let throttled = scrape.value(r#"tokenbroker_throttled_total{reason="caller_rate"}"#);
    assert_eq!(throttled, f64::from(refused), "every refusal is counted");
    assert_eq!(
        scrape.value(
            r#"tokenbroker_rpc_requests_total{method="IssueTokens",code="RESOURCE_EXHAUSTED"}"#
        ),
        throttled
    );
    assert_eq!(
        scrape.value(r#"tokenbroker_throttled_total{reason="concurrency"}"#),
        0.0
    );
}

#[tokio::test]
async fn role_limits_apply_to_every_caller_with_the_role() {
    let broker = TestBroker::spawn_with(|s| {
        s.limits
            .roles
            .insert(tokenbroker::identity::Role::Service, limited(0.1, 2));
    })
    .await;
    for _ in 0..2 {
        broker
            .service
            .introspect(introspect("tba_x"))
            .await
            .unwrap();
    }
    let err = broker
        .service
        .introspect(introspect("tba_x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::ResourceExhausted, "{err}");
    // The admin role has no limit.
    for _ in 0..10 {
        broker.admin.introspect(introspect("tba_x")).await.unwrap();
    }
}

#[tokio::test]
async fn calls_without_a_credential_are_limited_per_peer_address() {
    let broker = TestBroker::spawn_with(|s| {
        s.limits.anonymous = Some(limited(0.1, 2));
    })
    .await;
    let refresh = || pb::RefreshTokensRequest {
        refresh_token: "tbr_not-a-real-token".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let err = broker
            .anonymous
            .refresh_tokens(refresh())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::Unauthenticated, "{err}");
    }
    let err = broker
        .anonymous
        .refresh_tokens(refresh())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::ResourceExhausted, "{err}");
    assert!(err.message().contains("without a credential"), "{err}");
    // A caller with a key, from the same address, is charged to its own bucket.
    broker.issue("still-served@example.com").await;
}

#[tokio::test]
async fn the_in_flight_limit_sheds_calls_over_it() {
    let double =
        FaunaDouble::start(std::sync::Arc::new(tokenbroker::model::clock::SystemClock)).await;
    double.set_latency(Duration::from_millis(400));
    let (endpoint, key) = (double.endpoint(), double.server_key());
    let broker = TestBroker::spawn_with(move |s| {
        s.store.backend = StoreBackend::Fauna;
        s.store.fauna.endpoint = endpoint;
        s.store.fauna.secret = Some(key);
        s.limits = LimitSettings {
            max_concurrent_requests: 2,
            ..LimitSettings::default()
        };
        with_metrics(s);
    })
    .await;
    let calls = (0..6).map(|i| {
        let trigger = broker.trigger.clone();
        tokio::spawn(async move {
            trigger
                .issue_tokens(claims_request(&format!("p{i}@example.com"), ""))
                .await
        })
    });
    let mut served = 0;
    let mut shed = 0;
    for call in calls.collect::<Vec<_>>() {
        match call.await.unwrap() {
            Ok(_) => served += 1,
            Err(err) => {
                assert_eq!(err.kind(), ClientErrorKind::ResourceExhausted, "{err}");
                assert!(err.message().contains("concurrent"), "{err}");
                assert!(err.retry_after().is_some());
                shed += 1;
            }
        }
    }
    assert_eq!((served, shed), (2, 4));
    let scrape = Scrape::parse(broker.scrape().await);
    assert_eq!(
        scrape.value(r#"tokenbroker_throttled_total{reason="concurrency"}"#),
        4.0
    );
    // The slots are free again once the calls are done.
    double.set_latency(Duration::ZERO);
    broker.issue("after@example.com").await;
}

#[tokio::test]
async fn an_oversized_request_is_refused_with_resource_exhausted() {
    let broker = TestBroker::spawn_with(|s| s.limits.max_request_bytes = 2048).await;
    let request = pb::IssueTokensRequest {
        subject: Some(pb::issue_tokens_request::Subject::CognitoToken(
            "x".repeat(4096),
        )),
        ..Default::default()
    };
    let err = broker.trigger.issue_tokens(request).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::ResourceExhausted, "{err}");
    assert!(err.message().contains("too large"), "{err}");
    // A request under the limit is served.
    broker.issue("small@example.com").await;
}
