//! The Fauna store against the Fauna test double: the conformance suite, the full gRPC flow,
//! one Fauna request per RPC, and every failure class.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use secrecy::{ExposeSecret as _, SecretString};
use tokenbroker::{
    app::{
        Application,
        settings::{Replicas, Settings},
    },
    model::{
        ClientCheck, Email, Metadata, MintedPair, NewSession, PageRequest, RefreshOutcome,
        ReplayClaim, Rotation, TokenId, TokenKind, TokenState,
        clock::{Clock, ManualClock, SystemClock},
        replay::ReplayKey,
    },
    store::StoreBackend,
    store::fauna::queries,
    store::{
        FaunaSettings, FaunaStore, RotationPolicy, StoreErrorKind, TokenStore,
        testsuite::{StoreHarness, store_test_suite},
    },
};
use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{
    TestBroker, claims_request, expose,
    fauna::{Fault, FaunaDouble},
    logs,
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
        // Limits wider than any the suite asks for: the suite's cases pass their own.
        let day = Duration::from_secs(86_400);
        store
            .publish_policy(&RotationPolicy {
                access_ttl: day,
                refresh_ttl: 30 * day,
                grace: day,
                session_ttl: 365 * day,
                any_client: true,
            })
            .await
            .expect("the policy is written");
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

/// How many requests the double received for each query name since the last clear. Each
/// came in the drivers' template form, with the type checker off; only introspection is
/// linearized (the other reads do not decide whether a token is active, and the writes are
/// strictly serialized anyway).
fn sent(double: &FaunaDouble) -> Vec<String> {
    let names = double
        .requests()
        .into_iter()
        .map(|r| {
            assert!(r.template, "the template form {{\"fql\": [...]}}: {r:?}");
            assert_eq!(r.typecheck.as_deref(), Some("false"), "{r:?}");
            assert_eq!(
                r.linearized.as_deref(),
                (r.query == Some("introspect")).then_some("true"),
                "{r:?}"
            );
            r.query.unwrap_or("unknown").to_owned()
        })
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
    // With the account not cached, the lookup and the revocation are one request too.
    let cold = fauna_broker(&double, |_| {}).await;
    double.clear_requests();
    let revoked = cold
        .admin
        .revoke(pb::RevokeRequest {
            target: Some(Target::Email("count@example.com".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(revoked.revoked_count, 0, "revoked above");
    assert_eq!(sent(&double), ["revoke_email"]);
    let again = cold.issue("count@example.com").await;
    assert_eq!(cold.revoke_email("count@example.com").await, 2);
    assert!(!cold.is_active(&again.access.secret).await);
    double.clear_requests();
    assert_eq!(cold.revoke_email("nobody@example.com").await, 0);
    assert_eq!(sent(&double), ["revoke_email"]);
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
async fn a_wrong_server_key_stops_the_start() {
    let double = wall_clock_double().await;
    let mut settings = Settings::default();
    settings.server.listen = ([127, 0, 0, 1], 0).into();
    settings.store.backend = StoreBackend::Fauna;
    settings.store.fauna.endpoint = double.endpoint();
    settings.store.fauna.secret = Some(SecretString::from("not-the-server-key"));
    let err = match Application::build_with_clock(settings, Arc::new(SystemClock)).await {
        Ok(_) => panic!("a broker whose key Fauna refuses must not start"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("failed to write the broker policy to fauna")
            && err.contains("fauna rejected the server key"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-server-key"),
        "no secret in the error: {err}"
    );
    let requests = double.requests();
    assert_eq!(requests.len(), 1, "a 401 on the server key is not retried");
    assert_eq!(requests[0].query, Some("publish_policy"));
}

/// Posts a query straight to the double with `bearer`, as a user holding a Fauna secret could,
/// and returns the status and the body.
async fn direct(
    double: &FaunaDouble,
    bearer: &str,
    text: &str,
    arguments: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/query/1", double.endpoint()))
        .header("authorization", format!("Bearer {bearer}"))
        .header("x-format", "tagged")
        .body(serde_json::json!({ "query": text, "arguments": arguments }).to_string())
        .send()
        .await
        .expect("the double answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

/// Ten years, in seconds, tagged.
fn ten_years() -> serde_json::Value {
    serde_json::json!({ "@long": "315360000" })
}

/// Seconds from `now` to a tagged `@time`.
fn seconds_after(now: &serde_json::Value, time: &serde_json::Value) -> i64 {
    let parse = |v: &serde_json::Value| {
        time::OffsetDateTime::parse(
            v["@time"].as_str().expect("a @time"),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("RFC 3339")
    };
    (parse(time) - parse(now)).whole_seconds()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_secret_calling_fauna_directly_gets_no_more_than_the_broker_allows() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |s| {
        s.tokens.access_ttl_seconds = 600;
        s.tokens.refresh_ttl_seconds = 3600;
        s.tokens.refresh_grace_seconds = 0;
        s.tokens.require_client_id = true;
    })
    .await;
    let pair = broker.issue_for_client("direct@example.com", "web").await;
    let refresh = &expose(&pair.refresh.secret);
    let call = |client_id: serde_json::Value, attempt: &str| {
        serde_json::json!({
            "access_ttl": ten_years(),
            "refresh_ttl": ten_years(),
            "grace": ten_years(),
            "client_id": client_id,
            "any_client": true,
            "session_ttl": ten_years(),
            "attempt": attempt,
            "coalesce": false,
        })
    };

    // Naming no client does not skip the client check the broker requires.
    let (status, body) = direct(
        &double,
        refresh,
        queries::ROTATE,
        call(serde_json::Value::Null, "a"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["outcome"], "wrong_client", "{body}");

    // Ten-year lifetimes are cut to the broker's.
    let (status, body) = direct(&double, refresh, queries::ROTATE, call("web".into(), "b")).await;
    assert_eq!(status, 200, "{body}");
    let rotated = &body["data"];
    assert_eq!(rotated["outcome"], "rotated", "{body}");
    let access = seconds_after(&rotated["now"], &rotated["access"]["ttl"]);
    let refreshed = seconds_after(&rotated["now"], &rotated["refresh"]["ttl"]);
    assert_eq!(access, 600, "the access lifetime is the broker's: {body}");
    assert_eq!(
        refreshed, 3600,
        "the refresh lifetime is the broker's: {body}"
    );
    let live = SecretString::from(rotated["refresh"]["secret"].as_str().unwrap().to_owned());
    assert!(broker.is_active(&live).await);

    // A ten-year grace does not let the consumed token displace the live one: it is reuse
    // (the broker's grace is 0), and the family goes.
    let (status, body) = direct(&double, refresh, queries::ROTATE, call("web".into(), "c")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["outcome"], "reuse", "{body}");
    assert!(!broker.is_active(&live).await, "the family was revoked");
    assert!(!broker.is_active(&pair.access.secret).await);
}

/// The faults that strike after the transaction committed.
const COMMITTED: [Fault; 3] = [
    Fault::CommittedUnavailable,
    Fault::CommittedLost,
    Fault::CommittedTimeout,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_issue_whose_first_attempt_committed_leaves_one_pair() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |s| {
        s.store.fauna.max_attempts = 3;
        s.store.fauna.query_timeout_ms = 500;
    })
    .await;
    for fault in COMMITTED {
        let name = format!("{fault:?}");
        let before = double.live_token_count();
        double.inject(fault, 1);
        let (result, requests, _) = issue_under(&broker, &double, Duration::from_secs(10)).await;
        assert_eq!(result, Ok(()), "{name}: the retry succeeds");
        assert_eq!(requests, 2, "{name}: one retry");
        assert_eq!(
            double.live_token_count(),
            before + 2,
            "{name}: the first attempt's pair, which nobody received, is gone"
        );
    }
    let tokens = broker.all_tokens("fault@example.com").await;
    assert_eq!(tokens.len(), 2 * COMMITTED.len(), "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_rotation_whose_first_attempt_committed_is_not_reuse() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |s| {
        s.store.fauna.max_attempts = 3;
        s.store.fauna.query_timeout_ms = 500;
        s.tokens.refresh_grace_seconds = 0;
    })
    .await;
    for fault in COMMITTED {
        let name = format!("{fault:?}");
        let pair = broker.issue(&format!("{name}@example.com")).await;
        let before = double.live_token_count();
        double.clear_requests();
        double.inject(fault, 1);
        let next = broker
            .refresh(&pair.refresh.secret)
            .await
            .unwrap_or_else(|err| panic!("{name}: the retried rotation succeeds: {err:?}"));
        assert_eq!(sent(&double), ["rotate", "rotate"], "{name}: one retry");
        assert_eq!(
            double.live_token_count(),
            before + 2,
            "{name}: one new pair; the first attempt's is gone"
        );
        assert!(broker.is_active(&next.refresh.secret).await, "{name}");
        assert!(broker.is_active(&next.access.secret).await, "{name}");
        assert!(
            broker.is_active(&pair.access.secret).await,
            "{name}: no reuse"
        );
        let again = broker.refresh(&next.refresh.secret).await;
        assert!(again.is_ok(), "{name}: the session goes on: {again:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_first_sign_in_is_retried_not_internal() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |s| s.store.fauna.max_attempts = 3).await;

    // Fauna's own retries ran out: 409, retried by the store, then UNAVAILABLE.
    double.inject(Fault::Contended, 3);
    let (result, requests, _) = issue_under(&broker, &double, Duration::from_secs(10)).await;
    assert_eq!(result, Err(ClientErrorKind::Unavailable));
    assert_eq!(requests, 3);

    // Another sign-in of the same email created the account first: the unique email fails
    // this one, and issuing again finds the winner's account.
    double.inject(Fault::EmailTaken, 1);
    let (result, requests, _) = issue_under(&broker, &double, Duration::from_secs(10)).await;
    assert_eq!(result, Ok(()));
    assert_eq!(requests, 2, "one more issue");
    assert_eq!(double.account_count(), 1, "the winner's account");
    assert_eq!(broker.all_tokens("fault@example.com").await.len(), 2);

    // Conflicting every time: UNAVAILABLE, never INTERNAL.
    let broker = fauna_broker(&double, |_| {}).await;
    double.inject(Fault::EmailTaken, 2);
    let result = broker
        .trigger
        .issue_tokens(claims_request("again@example.com", ""))
        .await
        .map(drop)
        .map_err(|err| err.kind());
    assert_eq!(result, Err(ClientErrorKind::Unavailable));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sign_ins_on_a_contended_cluster_make_one_account() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |_| {}).await;
    // Transactions that overlap, as on a cluster under load: long enough that the 20 calls
    // arrive within the first one's even on a loaded machine.
    double.set_transaction_time(Duration::from_secs(1));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = broker.trigger.clone();
        calls.spawn(async move {
            client
                .issue_tokens(claims_request("crowd@example.com", ""))
                .await
                .map(|r| r.account_id)
                .map_err(|err| err.kind())
        });
    }
    let accounts: std::collections::BTreeSet<String> = calls
        .join_all()
        .await
        .into_iter()
        .map(|r| r.expect("every sign-in is served"))
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(double.account_count(), 1);
    assert!(double.conflicts() > 0, "the sign-ins contended");
    assert_eq!(broker.all_tokens("crowd@example.com").await.len(), 40);
}

/// The RPCs that reach Fauna, for the fault table.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    Issue,
    Refresh,
    Introspect,
    RevokeSecret,
    RevokeTokenId,
    RevokeFamily,
    RevokeEmail,
    ListTokens,
}

/// Runs `rpc` through `broker` on a fresh pair of `email` that `setup` issues (so that
/// `broker` has not cached the account) and returns its outcome and the Fauna requests it
/// sent (the set-up's are not counted).
async fn run_rpc(
    setup: &TestBroker,
    broker: &TestBroker,
    double: &FaunaDouble,
    rpc: Rpc,
    email: &str,
    fault: Fault,
    times: u32,
) -> (Result<(), ClientErrorKind>, usize) {
    use pb::revoke_request::Target;
    let pair = setup.issue(email).await;
    double.clear_requests();
    double.inject(fault, times);
    let revoke = |target| pb::RevokeRequest {
        target: Some(target),
        ..Default::default()
    };
    let result = match rpc {
        Rpc::Issue => broker
            .trigger
            .issue_tokens(claims_request(email, ""))
            .await
            .map(drop),
        Rpc::Refresh => broker.refresh(&pair.refresh.secret).await.map(drop),
        Rpc::Introspect => broker
            .service
            .introspect_secret(&pair.access.secret)
            .await
            .map(drop),
        Rpc::RevokeSecret => broker
            .anonymous
            .revoke(revoke(Target::Token(
                expose(&pair.refresh.secret).to_owned(),
            )))
            .await
            .map(drop),
        Rpc::RevokeTokenId => broker
            .admin
            .revoke(revoke(Target::TokenId(pair.access.token_id.clone())))
            .await
            .map(drop),
        Rpc::RevokeFamily => broker
            .admin
            .revoke(revoke(Target::FamilyId(pair.family_id.clone())))
            .await
            .map(drop),
        Rpc::RevokeEmail => broker
            .admin
            .revoke(revoke(Target::Email(email.to_owned())))
            .await
            .map(drop),
        Rpc::ListTokens => broker
            .admin
            .list_tokens(pb::ListTokensRequest {
                account: Some(pb::list_tokens_request::Account::Email(email.to_owned())),
                ..Default::default()
            })
            .await
            .map(drop),
    };
    (result.map_err(|err| err.kind()), double.requests().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_class_on_every_rpc() {
    let double = wall_clock_double().await;
    let configure = |s: &mut Settings| {
        s.store.fauna.max_attempts = 3;
        s.store.fauna.query_timeout_ms = 500;
        s.tokens.refresh_grace_seconds = 0;
    };
    let broker = fauna_broker(&double, configure).await;
    // Issues the pairs that a revocation by email finds, so the account is not cached.
    let other = fauna_broker(&double, configure).await;
    let rpcs = [
        Rpc::Issue,
        Rpc::Refresh,
        Rpc::Introspect,
        Rpc::RevokeSecret,
        Rpc::RevokeTokenId,
        Rpc::RevokeFamily,
        Rpc::RevokeEmail,
        Rpc::ListTokens,
    ];
    for rpc in rpcs {
        let setup = if matches!(rpc, Rpc::RevokeEmail) {
            &other
        } else {
            &broker
        };
        let mut run = 0;
        let mut run_rpc = async |fault, times| {
            // A new account each time, which `broker` has not cached.
            run += 1;
            let email = format!("{rpc:?}-{run}@example.com").to_lowercase();
            run_rpc(setup, &broker, &double, rpc, &email, fault, times).await
        };
        for fault in RETRYABLE.into_iter().chain(COMMITTED) {
            let (result, requests) = run_rpc(fault, 1).await;
            assert_eq!(
                result,
                Ok(()),
                "{rpc:?} after {fault:?}: the retry succeeds"
            );
            assert_eq!(requests, 2, "{rpc:?} after {fault:?}: one retry");
        }
        for fault in RETRYABLE {
            let (result, requests) = run_rpc(fault, 3).await;
            assert_eq!(
                result,
                Err(ClientErrorKind::Unavailable),
                "{rpc:?} after {fault:?} thrice"
            );
            assert_eq!(requests, 3, "{rpc:?} after {fault:?} thrice");
        }
        for fault in [Fault::EmptyBody, Fault::MalformedBody] {
            let (result, requests) = run_rpc(fault, 1).await;
            assert_eq!(
                result,
                Err(ClientErrorKind::Unavailable),
                "{rpc:?} after {fault:?}"
            );
            assert_eq!(requests, 1, "{rpc:?} after {fault:?}: no retry");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_secret_is_inactive_on_a_node_that_still_caches_it() {
    let double = wall_clock_double().await;
    let broker = fauna_broker(&double, |_| {}).await;
    let pair = broker.issue("cached@example.com").await;
    let revoke = |secret: &SecretString| pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::Token(expose(secret).to_owned())),
        ..Default::default()
    };
    broker
        .anonymous
        .revoke(revoke(&pair.refresh.secret))
        .await
        .expect("revoked");

    // The node still authenticates the deleted secrets, but what it reads is the database.
    for secret in [&pair.access.secret, &pair.refresh.secret] {
        double.inject(Fault::StaleKeyCache, 1);
        let info = broker.service.introspect_secret(secret).await.unwrap();
        assert!(!info.active, "revoked before the call began");
        assert_eq!(double.requests().last().and_then(|r| r.status), Some(200));
    }
    double.inject(Fault::StaleKeyCache, 1);
    let refreshed = broker.refresh(&pair.refresh.secret).await;
    assert_eq!(
        refreshed.map(drop).map_err(|e| e.kind()),
        Err(ClientErrorKind::Unauthenticated),
        "a revoked refresh secret does not rotate there either"
    );
}

#[tokio::test]
async fn fauna_replicas_are_told_what_the_replay_key_shares() {
    let double = wall_clock_double().await;
    let _plain = fauna_broker(&double, |s| s.replicas = Replicas(3)).await;
    assert!(
        logs().contents().contains(
            "no tokens.replay_key: each replica replays idempotent IssueTokens calls and \
             coalesces parallel refreshes"
        ),
        "replicas without a replay key are warned"
    );
    let _keyed = fauna_broker(&double, |s| {
        s.replicas = Replicas(3);
        s.tokens.replay_key = Some(SecretString::from("ab".repeat(32)));
    })
    .await;
    let logged = logs().contents();
    assert!(
        logged.lines().any(|line| line
            .contains("idempotent replays and rotation successors are kept in the store, sealed")
            && line.contains("Fauna")),
        "a replay key is used"
    );
    assert!(
        !logged.contains(&"ab".repeat(32)),
        "the key is never logged"
    );
}

/// A Fauna store on `double` with the policy published, as one broker replica opens it.
async fn replica(double: &FaunaDouble) -> Arc<FaunaStore> {
    let store = FaunaStore::new(&store_config(double, 3)).expect("valid config");
    let hour = Duration::from_secs(3600);
    store
        .publish_policy(&RotationPolicy {
            access_ttl: hour,
            refresh_ttl: hour,
            grace: hour,
            session_ttl: 24 * hour,
            any_client: true,
        })
        .await
        .expect("the policy is written");
    Arc::new(store)
}

fn new_session(address: &str) -> NewSession {
    NewSession {
        email: Email::parse(address).expect("a valid email"),
        known_account: None,
        cognito_sub: None,
        client_id: Some("app".to_owned()),
        access_ttl: Duration::from_secs(600),
        refresh_ttl: Duration::from_secs(3600),
        session_ttl: Duration::from_secs(86_400),
        metadata: Metadata::new(),
    }
}

/// An idempotency claim of row `[row; 32]`, sealed with the key `[key; 32]`.
fn claim(row: u8, key: u8) -> ReplayClaim {
    ReplayClaim {
        row: [row; 32],
        window: Duration::from_secs(60),
        key: Arc::new(
            ReplayKey::from_hex(&SecretString::from(hex::encode([key; 32]))).expect("a key"),
        ),
    }
}

fn same_pair(a: &MintedPair, b: &MintedPair) -> bool {
    a.refresh.id == b.refresh.id
        && a.access.id == b.access.id
        && a.account_id == b.account_id
        && a.family_id == b.family_id
        && a.refresh.expires_at == b.refresh.expires_at
        && a.access.expires_at == b.access.expires_at
        && a.refresh.secret.expose_secret() == b.refresh.secret.expose_secret()
        && a.access.secret.expose_secret() == b.access.secret.expose_secret()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_issue_on_two_fauna_replicas_mints_one_pair() {
    let double = wall_clock_double().await;
    let replicas = [replica(&double).await, replica(&double).await];
    // Concurrent claims overlap: each transaction's snapshot is 20 ms older than its commit.
    double.set_transaction_time(Duration::from_millis(20));
    double.clear_requests();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..10 {
        let store = Arc::clone(&replicas[i % 2]);
        calls.spawn(async move {
            store
                .issue_once(new_session("ivy@example.com"), &claim(1, 9))
                .await
                .expect("issued")
                .expect("fauna keeps replays")
        });
    }
    let answers = calls.join_all().await;
    assert_eq!(
        answers.iter().filter(|(_, replayed)| !replayed).count(),
        1,
        "one call minted, the others replayed its pair"
    );
    for (pair, _) in &answers {
        assert!(same_pair(pair, &answers[0].0), "every answer is one pair");
    }
    assert!(double.conflicts() > 0, "the claims overlapped");
    assert_eq!(double.live_token_count(), 2, "one pair");
    assert_eq!(double.account_count(), 1);
    assert_eq!(double.replay_count(), (1, 1), "one claim, sealed");
    let stored = double.replay_texts().join(" ");
    for secret in [&answers[0].0.refresh.secret, &answers[0].0.access.secret] {
        assert!(
            !stored.contains(&secret.expose_secret()[4..]),
            "a secret is stored in plaintext"
        );
    }
    // The winner sent two requests (claim and mint, then seal); the others one claim each,
    // plus a read of the claim while its pair was not yet sealed.
    let names = sent(&double);
    let count = |name: &str| names.iter().filter(|s| *s == name).count();
    assert_eq!(count("issue_once_by_email"), 10, "{names:?}");
    assert_eq!(count("seal_replay"), 1, "{names:?}");
    assert_eq!(count("issue_by_email"), 0, "no fallback: {names:?}");

    // A retry later, on either replica, is the same pair in one request.
    double.set_transaction_time(Duration::ZERO);
    for store in &replicas {
        let (pair, replayed) = store
            .issue_once(new_session("ivy@example.com"), &claim(1, 9))
            .await
            .unwrap()
            .unwrap();
        assert!(replayed);
        assert!(same_pair(&pair, &answers[0].0));
        assert_eq!(sent(&double), ["issue_once_by_email"]);
    }
    // The replayed secrets are Fauna's and live.
    assert!(
        replicas[1]
            .introspect(&answers[0].0.access.secret)
            .await
            .unwrap()
            .is_some()
    );

    // Another key opens nothing and says so, without the key; another row is another call.
    let err = replicas[1]
        .issue_once(new_session("ivy@example.com"), &claim(1, 8))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Internal);
    assert!(
        err.to_string().contains("another tokens.replay_key"),
        "{err}"
    );
    assert!(!err.to_string().contains(&hex::encode([8u8; 32])));
    let (other, replayed) = replicas[0]
        .issue_once(new_session("ivy@example.com"), &claim(2, 9))
        .await
        .unwrap()
        .unwrap();
    assert!(!replayed);
    assert_ne!(other.refresh.id, answers[0].0.refresh.id);
    assert_eq!(double.replay_count(), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_unsealed_is_waited_for_then_a_second_pair_is_minted() {
    let double = wall_clock_double().await;
    let replicas = [replica(&double).await, replica(&double).await];
    // The first broker claims and mints, then its sealing request fails for good: as if it
    // died between its two requests. Its caller still gets the pair.
    double.inject_for("seal_replay", Fault::Internal, 3);
    double.clear_requests();
    let (first, replayed) = replicas[0]
        .issue_once(new_session("kim@example.com"), &claim(3, 9))
        .await
        .unwrap()
        .unwrap();
    assert!(!replayed);
    assert_eq!(
        sent(&double),
        [
            "issue_once_by_email",
            "seal_replay",
            "seal_replay",
            "seal_replay"
        ]
    );
    assert_eq!(double.replay_count(), (1, 0), "claimed, never sealed");

    // The retry reaches the other broker: it waits for the pair (bounded), then mints its
    // own outside the claim, a second session rather than a failed sign-in.
    let (second, replayed) = replicas[1]
        .issue_once(new_session("kim@example.com"), &claim(3, 9))
        .await
        .unwrap()
        .unwrap();
    assert!(!replayed);
    assert_ne!(second.refresh.id, first.refresh.id);
    assert_eq!(second.account_id, first.account_id);
    let names = sent(&double);
    assert_eq!(
        names.first().map(String::as_str),
        Some("issue_once_by_email")
    );
    assert_eq!(names.last().map(String::as_str), Some("issue_by_email"));
    let polls = names.iter().filter(|s| *s == "replay_state").count();
    assert!(
        polls >= 2,
        "it read the claim again while waiting: {names:?}"
    );
    assert!(
        names.iter().all(
            |s| ["issue_once_by_email", "replay_state", "issue_by_email"].contains(&s.as_str())
        ),
        "{names:?}"
    );
    assert_eq!(double.live_token_count(), 4, "two pairs");
    assert!(
        logs()
            .contents()
            .contains("has no sealed pair; issuing a second pair")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_finds_a_claim_being_sealed_gets_its_pair() {
    let double = wall_clock_double().await;
    let replicas = [replica(&double).await, replica(&double).await];
    // The sealing request of the first call is answered late (it commits at once): a call
    // on the other broker finds the claim unsealed, reads it again, and opens the pair once
    // it is sealed.
    double.inject_for("seal_replay", Fault::Slow(Duration::from_millis(300)), 1);
    let first = {
        let store = Arc::clone(&replicas[0]);
        tokio::spawn(async move {
            store
                .issue_once(new_session("lou@example.com"), &claim(4, 9))
                .await
        })
    };
    // Wait until the claim exists, then ask on the other broker.
    while double.replay_count().0 == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (second, replayed) = replicas[1]
        .issue_once(new_session("lou@example.com"), &claim(4, 9))
        .await
        .unwrap()
        .unwrap();
    let (first, _) = first.await.unwrap().unwrap().unwrap();
    assert!(replayed);
    assert!(same_pair(&first, &second));
    assert_eq!(double.live_token_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_claim_whose_first_attempt_committed_is_its_own() {
    let double = wall_clock_double().await;
    let store = replica(&double).await;
    for (row, fault) in COMMITTED.into_iter().enumerate() {
        let name = format!("{fault:?}");
        double.inject_for("issue_once_by_email", fault, 1);
        let before = double.live_token_count();
        let store = FaunaStore::new(&FaunaSettings {
            query_timeout_ms: 500,
            ..store_config(&double, 3)
        })
        .unwrap();
        let (pair, replayed) = store
            .issue_once(new_session("max@example.com"), &claim(10 + row as u8, 9))
            .await
            .unwrap()
            .unwrap();
        assert!(!replayed, "{name}: the retry recognised its own claim");
        assert_eq!(double.live_token_count(), before + 2, "{name}: one pair");
        let again = store
            .issue_once(new_session("max@example.com"), &claim(10 + row as u8, 9))
            .await
            .unwrap()
            .unwrap();
        assert!(again.1 && same_pair(&again.0, &pair), "{name}");
    }
    drop(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_replay_key_a_fauna_issue_is_one_request() {
    let double = wall_clock_double().await;
    let store = replica(&double).await;
    double.clear_requests();
    store.issue(new_session("ned@example.com")).await.unwrap();
    assert_eq!(sent(&double), ["issue_by_email"]);
    assert_eq!(double.replay_count(), (0, 0));
}

/// A rotation as RefreshTokens asks for it, with a 60 s grace window and the replay key
/// `[key; 32]`, if any.
fn sealing_rotation(key: Option<u8>) -> Rotation {
    Rotation {
        client: ClientCheck::Any,
        access_ttl: Duration::from_secs(600),
        refresh_ttl: Duration::from_secs(3600),
        session_ttl: Duration::from_secs(86_400),
        grace: Duration::from_secs(60),
        replay: key.map(|key| {
            Arc::new(
                ReplayKey::from_hex(&SecretString::from(hex::encode([key; 32]))).expect("a key"),
            )
        }),
    }
}

/// The active refresh tokens of `pair`'s account.
async fn live_refresh_tokens(store: &FaunaStore, pair: &MintedPair) -> Vec<TokenId> {
    let page = store
        .list_tokens(
            &pair.account_id,
            PageRequest {
                size: 100,
                after: None,
                include_inactive: false,
            },
        )
        .await
        .unwrap();
    page.tokens
        .into_iter()
        .filter(|t| t.kind == TokenKind::Refresh && t.state == TokenState::Active)
        .map(|t| t.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_refreshes_on_two_fauna_replicas_get_one_successor() {
    let double = wall_clock_double().await;
    let replicas = [replica(&double).await, replica(&double).await];
    let first = replicas[0]
        .issue(new_session("pat@example.com"))
        .await
        .unwrap();
    double.set_transaction_time(Duration::from_millis(20));
    double.clear_requests();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let store = Arc::clone(&replicas[i % 2]);
        let secret = first.refresh.secret.clone();
        calls.spawn(async move { store.refresh(&secret, sealing_rotation(Some(9))).await });
    }
    let outcomes = calls.join_all().await;
    let mut pairs = Vec::new();
    let mut rotated = 0;
    for outcome in outcomes {
        match outcome.expect("every refresh is answered") {
            RefreshOutcome::Rotated(pair) => {
                rotated += 1;
                pairs.push(pair);
            }
            RefreshOutcome::Replayed { pair, .. } => pairs.push(pair),
            other => panic!("a rotation or its replay, got {other:?}"),
        }
    }
    assert_eq!(rotated, 1, "one presentation rotated");
    for pair in &pairs {
        assert!(same_pair(pair, &pairs[0]), "every answer is one successor");
    }
    assert!(double.conflicts() > 0, "the rotations overlapped");
    let names = sent(&double);
    let count = |name: &str| names.iter().filter(|s| *s == name).count();
    assert_eq!(count("rotate"), 50, "nobody fell back: {names:?}");
    assert_eq!(count("seal_successor"), 1, "{names:?}");
    assert_eq!(
        live_refresh_tokens(&replicas[1], &first).await,
        [pairs[0].refresh.id.clone()],
        "one live refresh token, the successor"
    );
    let stored = double.rotation_texts().join(" ");
    assert!(!stored.is_empty());
    for secret in [&pairs[0].refresh.secret, &pairs[0].access.secret] {
        assert!(!stored.contains(&secret.expose_secret()[4..]));
    }
    // The successor is Fauna's and live; it rotates on as usual, and then its predecessor is
    // reuse outside the grace rule.
    double.set_transaction_time(Duration::ZERO);
    assert!(
        replicas[1]
            .introspect(&pairs[0].access.secret)
            .await
            .unwrap()
            .is_some()
    );
    let next = replicas[1]
        .refresh(&pairs[0].refresh.secret, sealing_rotation(Some(9)))
        .await
        .unwrap();
    assert!(matches!(next, RefreshOutcome::Rotated(_)), "{next:?}");
    let reuse = replicas[0]
        .refresh(&first.refresh.secret, sealing_rotation(Some(9)))
        .await
        .unwrap();
    assert!(
        matches!(reuse, RefreshOutcome::ReuseDetected { .. }),
        "{reuse:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsealed_successor_is_waited_for_then_superseded() {
    let double = wall_clock_double().await;
    let replicas = [replica(&double).await, replica(&double).await];
    let first = replicas[0]
        .issue(new_session("quin@example.com"))
        .await
        .unwrap();
    // The rotating broker's sealing request fails for good, as if it died after rotating.
    double.inject_for("seal_successor", Fault::Internal, 3);
    let RefreshOutcome::Rotated(lost) = replicas[0]
        .refresh(&first.refresh.secret, sealing_rotation(Some(9)))
        .await
        .unwrap()
    else {
        panic!("the first presentation rotates");
    };
    double.clear_requests();
    let outcome = replicas[1]
        .refresh(&first.refresh.secret, sealing_rotation(Some(9)))
        .await
        .unwrap();
    let RefreshOutcome::Rotated(second) = outcome else {
        panic!("superseded after the wait, got {outcome:?}");
    };
    assert_ne!(second.refresh.id, lost.refresh.id);
    let names = sent(&double);
    assert_eq!(names.first().map(String::as_str), Some("rotate"));
    assert!(
        names.iter().filter(|s| *s == "successor_state").count() >= 2,
        "it waited: {names:?}"
    );
    assert_eq!(
        &names[names.len() - 2..],
        ["rotate", "seal_successor"],
        "then rotated as without a key, and sealed that successor: {names:?}"
    );
    assert!(
        logs()
            .contents()
            .contains("the rotation's successor was never sealed")
    );
    assert_eq!(
        live_refresh_tokens(&replicas[0], &first).await,
        std::slice::from_ref(&second.refresh.id)
    );
    // The new successor is sealed: another presentation within the window replays it.
    let again = replicas[0]
        .refresh(&first.refresh.secret, sealing_rotation(Some(9)))
        .await
        .unwrap();
    let RefreshOutcome::Replayed { pair, .. } = again else {
        panic!("a replay, got {again:?}");
    };
    assert!(same_pair(&pair, &second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_sealed_under_another_key_or_none_is_superseded() {
    let double = wall_clock_double().await;
    let store = replica(&double).await;
    for (first_key, second_key, email) in [
        (Some(9), Some(8), "rex@example.com"),
        (None, None, "sue@example.com"),
    ] {
        let first = store.issue(new_session(email)).await.unwrap();
        let RefreshOutcome::Rotated(one) = store
            .refresh(&first.refresh.secret, sealing_rotation(first_key))
            .await
            .unwrap()
        else {
            panic!("rotates");
        };
        double.clear_requests();
        let RefreshOutcome::Rotated(two) = store
            .refresh(&first.refresh.secret, sealing_rotation(second_key))
            .await
            .unwrap()
        else {
            panic!("{first_key:?}/{second_key:?}: supersedes, as without a key");
        };
        assert_ne!(one.refresh.id, two.refresh.id);
        let names = sent(&double);
        if second_key.is_none() {
            assert_eq!(names, ["rotate"], "no key: one request, as before");
            assert_eq!(
                double.rotation_texts().len(),
                1,
                "only the keyed case sealed"
            );
        } else {
            assert_eq!(
                names,
                ["rotate", "successor_state", "rotate", "seal_successor"],
                "no wait for a pair another key sealed"
            );
        }
        assert_eq!(
            live_refresh_tokens(&store, &first).await,
            std::slice::from_ref(&two.refresh.id)
        );
    }
}
