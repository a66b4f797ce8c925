//! The Prometheus endpoint: a scripted flow over gRPC, then a real HTTP scrape, parsed and
//! checked series by series, on the embedded store and on Fauna (its double injecting faults).

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokenbroker::{
    app::settings::Settings,
    model::clock::{Clock, SystemClock},
    store::StoreBackend,
};
use tokenbroker_client::ClientErrorKind;
use tokenbroker_tests::{
    TestBroker, claims_request, eventually,
    fauna::{Fault, FaunaDouble},
};

use crate::kind_of;

/// The families that render only the series that recorded something (`Zeros::Hide` in the
/// broker's metrics registry: large label products). For these, and only these, an absent series
/// means zero.
const HIDES_ZEROS: [&str; 4] = [
    "tokenbroker_rpc_requests_total",
    "tokenbroker_rpc_duration_seconds",
    "tokenbroker_store_errors_total",
    "tokenbroker_fauna_requests_total",
];

/// A parsed exposition: every sample by its series (`name{labels}` as rendered), and every
/// declared family with its type.
#[derive(Debug)]
pub(crate) struct Scrape {
    declared: HashMap<String, String>,
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
            assert!(
                declared.contains_key(family_of(&declared, series)),
                "sample before its # TYPE: {line}"
            );
            let value: f64 = value.parse().expect("a numeric value");
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "duplicate series {series}"
            );
        }
        Self {
            declared,
            samples,
            text,
        }
    }

    /// Returns a sample's value.
    ///
    /// # Panics
    ///
    /// If the series is absent: a misspelled name must not read as zero. For a family that
    /// hides its zero series, use [`Scrape::value_or_hidden_zero`].
    #[track_caller]
    pub(crate) fn value(&self, series: &str) -> f64 {
        // A `match`, not a closure, so the panic names the caller's line.
        match self.samples.get(series) {
            Some(value) => *value,
            None => panic!("no series {series} in the scrape:\n{}", self.text),
        }
    }

    /// Returns a sample's value, or 0 when the series is absent, for a family that renders only
    /// the series that recorded something ([`HIDES_ZEROS`]).
    ///
    /// # Panics
    ///
    /// If the series' family is not declared (`# TYPE`) in the scrape, or is one that renders
    /// its zero series (there, absent is not zero but a wrong name).
    #[track_caller]
    pub(crate) fn value_or_hidden_zero(&self, series: &str) -> f64 {
        let family = self.declared_family(series);
        assert!(
            HIDES_ZEROS.contains(&family),
            "{family} renders its zero series; read {series} with Scrape::value"
        );
        self.samples.get(series).copied().unwrap_or(0.0)
    }

    /// Returns how many series of `family` the scrape holds.
    ///
    /// # Panics
    ///
    /// If the family is not declared (`# TYPE`) in the scrape.
    #[track_caller]
    pub(crate) fn series_in(&self, family: &str) -> usize {
        assert_eq!(self.declared_family(family), family, "{family} is a family");
        self.samples
            .keys()
            .filter(|series| family_of(&self.declared, series) == family)
            .count()
    }

    /// Returns the family `series` belongs to, which the scrape must declare.
    #[track_caller]
    fn declared_family<'s>(&self, series: &'s str) -> &'s str {
        let family = family_of(&self.declared, series);
        assert!(
            self.declared.contains_key(family),
            "no family {family} (# TYPE) in the scrape:\n{}",
            self.text
        );
        family
    }

    /// Returns the whole text.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }
}

/// Returns the family of a series: its name, less a histogram's `_bucket`, `_sum` or `_count`.
fn family_of<'s>(declared: &HashMap<String, String>, series: &'s str) -> &'s str {
    let name = series.split('{').next().expect("a name");
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| {
            name.strip_suffix(suffix)
                .filter(|f| declared.get(*f).is_some_and(|k| k == "histogram"))
        })
        .unwrap_or(name)
}

fn rpc(method: &str, code: &str) -> String {
    format!("tokenbroker_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}}")
}

/// The scrape helpers: a misspelled series fails instead of reading as zero, and only the
/// families that hide their zeros read an absent series as zero.
#[test]
fn a_missing_series_is_a_failure_not_a_zero() {
    let scrape = Scrape::parse(
        concat!(
            "# HELP tokenbroker_tokens_issued_total Tokens minted.\n",
            "# TYPE tokenbroker_tokens_issued_total counter\n",
            "tokenbroker_tokens_issued_total{kind=\"access\"} 0\n",
            "# HELP tokenbroker_rpc_requests_total RPCs handled.\n",
            "# TYPE tokenbroker_rpc_requests_total counter\n",
            "tokenbroker_rpc_requests_total{method=\"Revoke\",code=\"OK\"} 2\n",
            "# HELP tokenbroker_rpc_duration_seconds Time to handle an RPC.\n",
            "# TYPE tokenbroker_rpc_duration_seconds histogram\n",
        )
        .to_owned(),
    );
    let panics = |read: &dyn Fn(&Scrape)| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&scrape))).is_err()
    };
    let issued = "tokenbroker_tokens_issued_total{kind=\"access\"}";
    let revoke = &rpc("Revoke", "OK");
    let list = &rpc("ListTokens", "OK");
    let duration = "tokenbroker_rpc_duration_seconds_count{method=\"Revoke\",code=\"OK\"}";

    assert_eq!(scrape.value(issued), 0.0);
    assert_eq!(scrape.value(revoke), 2.0);
    assert!(panics(&|s| {
        s.value("tokenbroker_tokens_issued_total{kind=\"acess\"}");
    }));
    assert!(
        panics(&|s| {
            s.value(list);
        }),
        "a hidden zero is read explicitly"
    );

    assert_eq!(scrape.value_or_hidden_zero(revoke), 2.0);
    assert_eq!(scrape.value_or_hidden_zero(list), 0.0);
    assert_eq!(scrape.value_or_hidden_zero(duration), 0.0);
    assert!(panics(&|s| {
        s.value_or_hidden_zero("tokenbroker_rpc_request_total{method=\"Revoke\",code=\"OK\"}");
    }));
    assert!(
        panics(&|s| {
            s.value_or_hidden_zero(issued);
        }),
        "this family shows its zeros"
    );

    assert_eq!(scrape.series_in("tokenbroker_rpc_requests_total"), 1);
    assert_eq!(scrape.series_in("tokenbroker_rpc_duration_seconds"), 0);
    assert!(panics(&|s| {
        s.series_in("tokenbroker_store_errors_total");
    }));
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
    assert_eq!(before.value_or_hidden_zero(&rpc("IssueTokens", "OK")), 0.0);
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
    assert_eq!(
        after.value_or_hidden_zero(&rpc("ListTokens", "OK")),
        0.0,
        "{}",
        after.text()
    );
    assert_eq!(
        after.series_in("tokenbroker_store_errors_total"),
        0,
        "no store error"
    );
    assert_eq!(
        after.series_in("tokenbroker_fauna_requests_total"),
        0,
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

/// A call the client gives up on mid-flight (it drops the call, and its HTTP/2 stream is reset
/// with RST_STREAM) is counted as CANCELLED, not as an error of the broker's, and not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_client_resets_is_counted_as_cancelled() {
    let double = FaunaDouble::start(Arc::new(SystemClock)).await;
    let endpoint = double.endpoint();
    let key = double.server_key();
    let broker = metered_broker(move |s| {
        s.store.backend = StoreBackend::Fauna;
        s.store.fauna.endpoint = endpoint;
        s.store.fauna.secret = Some(key);
    })
    .await;
    // The store answers only after 30 s: the call is in flight until the client drops it.
    double.inject(Fault::Slow(Duration::from_secs(30)), 1);
    let client = broker.trigger.clone();
    let call = tokio::spawn(async move {
        client
            .issue_tokens(claims_request("reset@example.com", ""))
            .await
    });
    eventually("the call reaches the store", || async {
        double.requests().iter().any(|r| r.fault.is_some())
    })
    .await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());

    let cancelled = rpc("IssueTokens", "CANCELLED");
    eventually("the reset call is counted", || async {
        Scrape::parse(broker.scrape().await).value_or_hidden_zero(&cancelled) == 1.0
    })
    .await;
    let scrape = Scrape::parse(broker.scrape().await);
    assert_eq!(
        scrape.value(
            "tokenbroker_rpc_duration_seconds_count{method=\"IssueTokens\",code=\"CANCELLED\"}"
        ),
        1.0
    );
    for code in ["UNKNOWN", "OK", "DEADLINE_EXCEEDED"] {
        assert_eq!(
            scrape.value_or_hidden_zero(&rpc("IssueTokens", code)),
            0.0,
            "{code}\n{}",
            scrape.text()
        );
    }
    // The broker goes on serving: the next call is counted as it ends.
    broker.issue("after-reset@example.com").await;
    let scrape = Scrape::parse(broker.scrape().await);
    assert_eq!(scrape.value(&rpc("IssueTokens", "OK")), 1.0);
    assert_eq!(scrape.value(&cancelled), 1.0);
    broker.stop().await.unwrap();
}
