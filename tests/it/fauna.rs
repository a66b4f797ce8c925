//! The Fauna store against the Fauna test double: the conformance suite, the full gRPC flow,
//! one Fauna request per RPC, and every failure class.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use secrecy::SecretString;
use tokenbroker::{
    app::settings::Settings,
    model::clock::{Clock, ManualClock, SystemClock},
    store::StoreBackend,
    store::{
        FaunaSettings, FaunaStore, TokenStore,
        testsuite::{StoreHarness, store_test_suite},
    },
};
use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{
    TestBroker, claims_request, expose,
    fauna::{Fault, FaunaDouble},
};

/// Opens a Fauna store on a fresh double per case; the double keeps the case's clock.
#[derive(Default)]
struct FaunaHarness {
    doubles: Mutex<Vec<FaunaDouble>>,
}

#[async_trait::async_trait]
impl StoreHarness for FaunaHarness {
    async fn open(&self, clock: Arc<ManualClock>) -> Arc<dyn TokenStore> {
        let double = FaunaDouble::start(clock).await;
        let store = FaunaStore::new(&store_config(&double, 3)).expect("valid config");
        self.doubles.lock().unwrap().push(double);
        Arc::new(store)
    }

    fn lists_inactive_tokens(&self) -> bool {
        false
    }
}

fn store_config(double: &FaunaDouble, max_attempts: u32) -> FaunaSettings {
    FaunaSettings {
        endpoint: double.endpoint(),
        secret: Some(double.server_key()),
        query_timeout_ms: 5000,
        max_attempts,
        ..FaunaSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fauna_store_passes_the_conformance_suite() {
    store_test_suite(&FaunaHarness::default()).await;
}

/// A broker on the Fauna store backed by a double running on the wall clock.
async fn fauna_broker(double: &FaunaDouble, configure: impl FnOnce(&mut Settings)) -> TestBroker {
    let endpoint = double.endpoint();
    let key = double.server_key();
    TestBroker::spawn_with(move |s| {
        s.store.backend = StoreBackend::Fauna;
        s.store.fauna.endpoint = endpoint;
        s.store.fauna.secret = Some(key);
        configure(s);
    })
    .await
}

async fn wall_clock_double() -> FaunaDouble {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    FaunaDouble::start(clock).await
}

/// How many requests the double received for each query name since the last clear.
fn sent(double: &FaunaDouble) -> Vec<String> {
    let names = double
        .requests()
        .into_iter()
        .map(|r| r.query.unwrap_or("unknown").to_owned())
        .collect();
    double.clear_requests();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_over_grpc_mints_real_fauna_tokens() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |_| {}).await;

    let pair = broker.issue_for_client("flow@example.com", "web").await;
    assert!(
        expose(&pair.access.secret).starts_with("fnE"),
        "a Fauna secret"
    );
    assert!(
        expose(&pair.refresh.secret).starts_with("fnE"),
        "a Fauna secret"
    );
    let info = broker
        .service
        .introspect_secret(&pair.access.secret)
        .await
        .unwrap();
    assert!(info.active);
    assert_eq!(info.kind, pb::TokenKind::Access as i32);
    assert_eq!(info.email, "flow@example.com");
    assert_eq!(info.client_id, "web");
    assert_eq!(info.family_id, pair.family_id);

    let next = broker
        .refresh_as(&pair.refresh.secret, "web")
        .await
        .unwrap();
    assert_eq!(next.family_id, pair.family_id);
    assert!(!broker.is_active(&pair.refresh.secret).await, "consumed");
    assert!(broker.is_active(&next.access.secret).await);

    // The access token's parent is its refresh token's id, never a secret.
    let tokens = broker.all_tokens("flow@example.com").await;
    assert_eq!(
        tokens.len(),
        4,
        "both pairs, the first refresh token rotated: {tokens:?}"
    );
    let secrets = [&pair.access, &pair.refresh, &next.access, &next.refresh]
        .map(|token| expose(&token.secret));
    for (access, refresh) in [(&pair.access, &pair.refresh), (&next.access, &next.refresh)] {
        let listed = tokens
            .iter()
            .find(|t| t.token_id == access.token_id)
            .unwrap_or_else(|| panic!("access token {} is listed: {tokens:?}", access.token_id));
        assert_eq!(listed.kind, pb::TokenKind::Access as i32);
        assert_eq!(
            listed.parent_id, refresh.token_id,
            "the parent is its refresh token"
        );
        assert!(
            !listed.parent_id.starts_with("fnE") && !secrets.contains(&listed.parent_id),
            "a parent is an id, never a secret"
        );
    }
    for refresh in [&pair.refresh, &next.refresh] {
        let listed = tokens
            .iter()
            .find(|t| t.token_id == refresh.token_id)
            .unwrap_or_else(|| panic!("refresh token {} is listed: {tokens:?}", refresh.token_id));
        assert_eq!(listed.kind, pb::TokenKind::Refresh as i32);
        assert_eq!(listed.parent_id, "", "a refresh token has no parent");
    }

    let revoked = broker.revoke_email("flow@example.com").await;
    assert_eq!(revoked, 3, "first access, and the new pair");
    for secret in [
        &pair.access.secret,
        &next.access.secret,
        &next.refresh.secret,
    ] {
        assert!(!broker.is_active(secret).await);
    }
    let tokens = broker.all_tokens("flow@example.com").await;
    assert!(
        tokens.is_empty(),
        "revoked tokens are deleted in Fauna: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_costs_one_fauna_request() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |_| {}).await;
    double.clear_requests();

    let first = broker.issue("count@example.com").await;
    assert_eq!(sent(&double), ["issue_by_email"], "cold account cache");
    let second = broker.issue("count@example.com").await;
    assert_eq!(sent(&double), ["issue_for_account"], "warm account cache");

    broker
        .service
        .introspect_secret(&first.access.secret)
        .await
        .unwrap();
    assert_eq!(sent(&double), ["introspect"]);

    let next = broker.refresh(&first.refresh.secret).await.unwrap();
    assert_eq!(sent(&double), ["rotate"]);

    let list = broker
        .admin
        .list_tokens(pb::ListTokensRequest {
            account: Some(pb::list_tokens_request::Account::Email(
                "count@example.com".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.tokens.len(), 5);
    assert_eq!(sent(&double), ["list_tokens"], "the account id is cached");

    broker
        .anonymous
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::Token(expose(
                &next.access.secret,
            ))),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(sent(&double), ["revoke_secret"]);

    use pb::revoke_request::Target;
    for (target, query) in [
        (
            Target::TokenId(second.access.token_id.clone()),
            "revoke_token",
        ),
        (Target::FamilyId(second.family_id.clone()), "revoke_family"),
        (
            Target::AccountId(first.account_id.clone()),
            "revoke_account",
        ),
        (Target::Email("count@example.com".into()), "revoke_account"),
    ] {
        broker
            .admin
            .revoke(pb::RevokeRequest {
                target: Some(target),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(sent(&double), [query]);
    }
}

/// Issues with the trigger key and returns the outcome, the number of requests the double saw
/// and the time it took.
async fn issue_under(
    broker: &TestBroker,
    double: &FaunaDouble,
    timeout: Duration,
) -> (Result<(), ClientErrorKind>, usize, Duration) {
    double.clear_requests();
    let started = Instant::now();
    let result = broker
        .trigger
        .clone()
        .with_timeout(timeout)
        .issue_tokens(claims_request("fault@example.com", ""))
        .await
        .map(|_| ())
        .map_err(|err| err.kind());
    (result, double.requests().len(), started.elapsed())
}

/// The failure classes the store retries.
const RETRYABLE: [Fault; 5] = [
    Fault::Contended,
    Fault::RateLimited,
    Fault::ClientTimeout,
    Fault::Internal,
    Fault::Unavailable,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_faults_are_retried_then_reported_unavailable() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |s| s.store.fauna.max_attempts = 3).await;
    let patience = Duration::from_secs(10);

    for fault in RETRYABLE {
        let name = format!("{fault:?}");
        double.inject(fault, 1);
        let (result, requests, _) = issue_under(&broker, &double, patience).await;
        assert_eq!(result, Ok(()), "{name} once: the retry succeeds");
        assert_eq!(requests, 2, "{name} once: one retry");
    }
    for fault in RETRYABLE {
        let name = format!("{fault:?}");
        double.inject(fault, 3);
        let (result, requests, _) = issue_under(&broker, &double, patience).await;
        assert_eq!(result, Err(ClientErrorKind::Unavailable), "{name} thrice");
        assert_eq!(requests, 3, "{name}: max_attempts requests, no more");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_answers_are_unavailable_without_retry() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |_| {}).await;
    for fault in [Fault::EmptyBody, Fault::MalformedBody] {
        let name = format!("{fault:?}");
        double.inject(fault, 1);
        let (result, requests, _) = issue_under(&broker, &double, Duration::from_secs(10)).await;
        assert_eq!(result, Err(ClientErrorKind::Unavailable), "{name}");
        assert_eq!(
            requests, 1,
            "{name}: a broken answer may have committed; no retry"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failure_is_never_reported_as_inactive() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |_| {}).await;
    let pair = broker.issue("down@example.com").await;
    double.inject(Fault::Unavailable, 3);
    let err = broker
        .service
        .introspect_secret(&pair.access.secret)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unavailable);
    assert!(
        broker.is_active(&pair.access.secret).await,
        "still active once Fauna answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_fauna_answers_within_the_callers_deadline() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |_| {}).await;
    double.inject(Fault::Slow(Duration::from_secs(5)), 3);
    let (result, requests, elapsed) =
        issue_under(&broker, &double, Duration::from_millis(500)).await;
    assert_eq!(result, Err(ClientErrorKind::DeadlineExceeded));
    assert_eq!(requests, 1, "no retry past the deadline");
    assert!(
        elapsed < Duration::from_secs(3),
        "the caller got its answer at its deadline, not Fauna's ({elapsed:?})"
    );
    let header = double.requests()[0]
        .query_timeout_ms
        .clone()
        .unwrap_or_default();
    let millis: u64 = header.parse().expect("x-query-timeout-ms is sent");
    assert!(
        millis <= 500,
        "the query timeout is the time left ({millis} ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_key_is_internal_not_inactive() {
    let double = wall_clock_double().await;
    let broker = TestBroker::spawn_with({
        let endpoint = double.endpoint();
        move |s| {
            s.store.backend = StoreBackend::Fauna;
            s.store.fauna.endpoint = endpoint;
            s.store.fauna.secret = Some(SecretString::from("not-the-server-key"));
        }
    })
    .await;
    let err = broker
        .trigger
        .issue_tokens(claims_request("key@example.com", ""))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Internal);
    assert_eq!(err.message(), "internal error");
    assert_eq!(
        double.requests().len(),
        1,
        "a 401 on the server key is not retried"
    );
}
