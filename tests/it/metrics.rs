//! The Prometheus endpoint: a scripted flow over gRPC, then a real HTTP scrape, parsed and
//! checked series by series, on the embedded store and on Fauna (its double injecting faults).

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use tokenbroker::{
    app::settings::Settings,
    model::clock::{Clock, SystemClock},
    store::StoreBackend,
};
use tokenbroker_client::ClientErrorKind;
use tokenbroker_tests::{
    TestBroker, claims_request,
    fauna::{Fault, FaunaDouble},
};

use crate::kind_of;

/// A parsed exposition: every sample by its series (`name{labels}` as rendered).
#[derive(Debug)]
pub(crate) struct Scrape {
    samples: HashMap<String, f64>,
    text: String,
}

impl Scrape {
    /// Parses the text format, checking that every sample belongs to a family declared with
    /// `# HELP` and `# TYPE` before it, and that no series appears twice.
    pub(crate) fn parse(text: String) -> Self {
        let mut declared: HashMap<String, String> = HashMap::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "type {kind}"
                );
                declared.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with("# HELP ") || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let name = series.split('{').next().expect("a name");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|f| declared.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(
                declared.contains_key(family),
                "sample before its # TYPE: {line}"
            );
            let value: f64 = value.parse().expect("a numeric value");
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "duplicate series {series}"
            );
        }
        Self { samples, text }
    }

    /// Returns a sample's value, 0 when the series is absent.
    pub(crate) fn value(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// Returns the whole text.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }
}

fn rpc(method: &str, code: &str) -> String {
    format!("tokenbroker_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}}")
}

/// Spawns a broker with metrics on a free loopback port.
async fn metered_broker(configure: impl FnOnce(&mut Settings)) -> TestBroker {
    TestBroker::spawn_with(|s| {
        s.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        configure(s);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_flow_shows_in_the_counters() {
    let broker = metered_broker(|_| {}).await;
    assert_ne!(broker.metrics_addr.expect("bound").port(), 0);
    let before = Scrape::parse(broker.scrape().await);
    assert_eq!(before.value(&rpc("IssueTokens", "OK")), 0.0);
    assert!(before.value("process_start_time_seconds") > 1.0e9);

    let pair = broker.issue("metrics@example.com").await;
    assert!(broker.is_active(&pair.access.secret).await);
    let next = broker.refresh(&pair.refresh.secret).await.unwrap();
    // Bad requests: an anonymous introspection and a malformed email.
    assert_eq!(
        kind_of(
            broker
                .anonymous
                .introspect_secret(&next.access.secret)
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
    assert_eq!(
        kind_of(
            broker
                .trigger
                .issue_tokens(claims_request("not an email", ""))
                .await
        ),
        ClientErrorKind::InvalidArgument
    );
    let revoked = broker.revoke_email("metrics@example.com").await;
    assert_eq!(revoked, 3);
    assert!(!broker.is_active(&next.access.secret).await);

    let after = Scrape::parse(broker.scrape().await);
    for (series, expected) in [
        (rpc("IssueTokens", "OK"), 1.0),
        (rpc("IssueTokens", "INVALID_ARGUMENT"), 1.0),
        (rpc("RefreshTokens", "OK"), 1.0),
        (rpc("Introspect", "OK"), 2.0),
        (rpc("Introspect", "UNAUTHENTICATED"), 1.0),
        (rpc("Revoke", "OK"), 1.0),
        (rpc("ListTokens", "OK"), 0.0),
        (
            "tokenbroker_rpc_duration_seconds_count{method=\"Introspect\",code=\"OK\"}".into(),
            2.0,
        ),
        (
            "tokenbroker_rpc_duration_seconds_bucket{method=\"Revoke\",code=\"OK\",le=\"+Inf\"}"
                .into(),
            1.0,
        ),
        (
            "tokenbroker_tokens_issued_total{kind=\"access\"}".into(),
            2.0,
        ),
        (
            "tokenbroker_tokens_issued_total{kind=\"refresh\"}".into(),
            2.0,
        ),
        (
            "tokenbroker_tokens_revoked_total{cause=\"request\"}".into(),
            3.0,
        ),
        (
            "tokenbroker_tokens_revoked_total{cause=\"reuse\"}".into(),
            0.0,
        ),
        // The issue missed the account cache; the revoke by email found it there.
        (
            "tokenbroker_account_cache_lookups_total{result=\"miss\"}".into(),
            1.0,
        ),
        (
            "tokenbroker_account_cache_lookups_total{result=\"hit\"}".into(),
            1.0,
        ),
        (
            "tokenbroker_store_operation_duration_seconds_count{operation=\"issue\"}".into(),
            1.0,
        ),
        (
            "tokenbroker_store_operation_duration_seconds_count{operation=\"introspect\"}".into(),
            2.0,
        ),
        (
            "tokenbroker_store_operation_duration_seconds_count{operation=\"refresh\"}".into(),
            1.0,
        ),
        (
            "tokenbroker_store_operation_duration_seconds_count{operation=\"revoke\"}".into(),
            1.0,
        ),
        (
            "tokenbroker_store_operation_duration_seconds_count{operation=\"account_by_email\"}"
                .into(),
            0.0,
        ),
        ("tokenbroker_audit_write_errors_total".into(), 0.0),
    ] {
        assert_eq!(after.value(&series), expected, "{series}\n{}", after.text());
    }
    assert!(
        !after.text().contains("tokenbroker_store_errors_total{"),
        "no store error"
    );
    assert!(
        !after.text().contains("tokenbroker_fauna_requests_total{"),
        "no Fauna on the embedded store"
    );
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_is_off_by_default_and_answers_only_metrics() {
    let broker = TestBroker::spawn().await;
    assert_eq!(broker.metrics_addr, None);
    drop(broker);

    let broker = metered_broker(|_| {}).await;
    let addr = broker.metrics_addr.unwrap();
    let client = reqwest::Client::new();
    let other = client.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(other.status(), 404);
    let post = client
        .post(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    broker.stop().await.unwrap();
    // It stops with the broker.
    let refused = client.get(format!("http://{addr}/metrics")).send().await;
    assert!(refused.is_err(), "the listener closed with the broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fauna_requests_and_retries_are_counted_by_class() {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let double = FaunaDouble::start(clock).await;
    let endpoint = double.endpoint();
    let key = double.server_key();
    let broker = metered_broker(move |s| {
        s.store.backend = StoreBackend::Fauna;
        s.store.fauna.endpoint = endpoint;
        s.store.fauna.secret = Some(key);
        s.store.fauna.max_attempts = 3;
    })
    .await;

    // One contended and one throttled answer, then success: three requests, two retries.
    double.inject(Fault::Contended, 1);
    let pair = broker.issue("fauna-metrics@example.com").await;
    double.inject(Fault::RateLimited, 1);
    assert!(broker.is_active(&pair.access.secret).await);
    // Three 500s: the attempts run out and the call is UNAVAILABLE.
    double.inject(Fault::Internal, 3);
    assert_eq!(
        kind_of(broker.service.introspect_secret(&pair.access.secret).await),
        ClientErrorKind::Unavailable
    );

    let scrape = Scrape::parse(broker.scrape().await);
    let fauna = |query: &str, class: &str| {
        scrape.value(&format!(
            "tokenbroker_fauna_requests_total{{query=\"{query}\",class=\"{class}\"}}"
        ))
    };
    assert_eq!(
        fauna("issue_by_email", "contended"),
        1.0,
        "{}",
        scrape.text()
    );
    assert_eq!(fauna("issue_by_email", "ok"), 1.0);
    assert_eq!(fauna("introspect", "throttled"), 1.0);
    assert_eq!(fauna("introspect", "ok"), 1.0);
    assert_eq!(fauna("introspect", "transient"), 3.0);
    for (class, expected) in [("contended", 1.0), ("throttled", 1.0), ("transient", 2.0)] {
        assert_eq!(
            scrape.value(&format!(
                "tokenbroker_fauna_retries_total{{class=\"{class}\"}}"
            )),
            expected,
            "{class}"
        );
    }
    assert_eq!(
        scrape
            .value("tokenbroker_store_errors_total{operation=\"introspect\",kind=\"unavailable\"}"),
        1.0
    );
    assert_eq!(scrape.value(&rpc("Introspect", "UNAVAILABLE")), 1.0);
    assert_eq!(scrape.value(&rpc("Introspect", "OK")), 1.0);
    assert_eq!(
        scrape.value("tokenbroker_store_operation_duration_seconds_count{operation=\"issue\"}"),
        1.0
    );
    broker.stop().await.unwrap();
}
