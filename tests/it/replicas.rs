//! Three brokers on one shared store: `tokenbroker` processes
//! ([`tokenbroker_tests::broker_binary`]: the release build under `scripts/test`, the running
//! profile's under plain `cargo test`), each with the same config file. Calls are spread over the replicas round-robin.
//!
//! Every scenario is written once and runs on both shared stores ([`Backend`]):
//! - **postgres**: a fresh database of the test cluster of
//!   `tokenbroker::store::postgres::testing`; rows are counted with SQL;
//! - **fauna**: a Fauna test double (`tokenbroker_tests::fauna`) of the test's own, on the wall
//!   clock, counted through the double's inspection methods. Its transactions take a few
//!   milliseconds between snapshot and commit, and a full second in the contention scenarios
//!   (`Replicas::contend`), so that concurrent requests overlap and conflict as on a loaded
//!   cluster even on a loaded test machine. Where it deviates: the double is one node, so every
//!   read sees the latest commit; on a real cluster only linearized reads (the broker's
//!   Introspect) are sure to.
//!
//! What crosses replicas here: accounts (one per email however many replicas sign it in at
//! once), idempotent replays (a retry on another replica gets the same pair), rotations (parallel
//! refreshes of one token on all replicas make one successor), revocations (visible on every
//! other replica from the next call on), and acknowledged writes (a replica killed with SIGKILL
//! loses none, and the others keep serving).
//!
//! And, on postgres only, a restart of the database server under load
//! (`pg_ctl restart -m fast`, on a private cluster with `synchronous_commit = on`): calls in
//! flight succeed or fail with `UNAVAILABLE`, nothing else; the replicas serve again by
//! themselves once the server is back; and no acknowledged write is lost.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use secrecy::SecretString;
use tempfile::TempDir;
use tokenbroker::{
    app::dev::{api_key_digest, generate_api_key},
    model::clock::{Clock, SystemClock},
    store::{
        PostgresSettings,
        postgres::testing::{PrivateCluster, TestCluster, cluster},
    },
};
use tokenbroker_client::{Client, ClientError, ClientErrorKind, TokenPair, pb};
use tokenbroker_tests::{BrokerProcess, claims_request, expose, fauna::FaunaDouble};
use tokio::{sync::Barrier, task::JoinSet};

/// The app client every token of these tests is issued for.
const CLIENT: &str = "web";
/// Every client call's timeout: generous, for a loaded CI machine.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The Fauna double's transaction time outside the contention scenarios: concurrent requests
/// overlap a little, as on a real cluster, without slowing the load tests down.
const FAUNA_TRANSACTION_TIME: Duration = Duration::from_millis(5);
/// The Fauna double's transaction time in the contention scenarios: long enough that requests
/// sent together overlap on a loaded machine (100 ms saw no conflict once in CI).
const FAUNA_CONTENDED_TRANSACTION_TIME: Duration = Duration::from_secs(1);

/// The shared store the replicas run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Postgres,
    Fauna,
}

/// The store of one test, with what the test needs to look into it.
enum Store<'c> {
    Postgres {
        cluster: &'c TestCluster,
        database: PostgresSettings,
    },
    Fauna(FaunaDouble),
}

impl Store<'static> {
    /// A fresh store of `backend`: a new database on the shared test cluster, or a new double.
    async fn fresh(backend: Backend) -> Self {
        match backend {
            Backend::Postgres => Store::on(cluster()).await,
            Backend::Fauna => {
                let clock: Arc<dyn Clock> = Arc::new(SystemClock);
                let double = FaunaDouble::start(clock).await;
                double.set_transaction_time(FAUNA_TRANSACTION_TIME);
                Store::Fauna(double)
            }
        }
    }
}

impl<'c> Store<'c> {
    /// A fresh database on `cluster`.
    async fn on(cluster: &'c TestCluster) -> Self {
        Store::Postgres {
            cluster,
            database: cluster.create_database().await,
        }
    }

    /// The config's `[store]` section.
    fn config(&self) -> String {
        match self {
            Store::Postgres { database, .. } => format!(
                r#"
[store]
backend = "postgres"

[store.postgres]
host = "{host}"
port = {port}
dbname = "{dbname}"
user = "{user}"
sslmode = "disable"
pool_size = 4
"#,
                host = database.host,
                port = database.port,
                dbname = database.dbname,
                user = database.user,
            ),
            Store::Fauna(double) => format!(
                r#"
[store]
backend = "fauna"

[store.fauna]
endpoint = "{endpoint}"
secret = "{secret}"
"#,
                endpoint = double.endpoint(),
                secret = expose(&double.server_key()),
            ),
        }
    }
}

/// Three broker processes on one store, with a client for each of them per role.
struct Replicas<'c> {
    _dir: TempDir,
    store: Store<'c>,
    processes: Vec<BrokerProcess>,
    trigger: Vec<Client>,
    service: Vec<Client>,
    admin: Vec<Client>,
    anonymous: Vec<Client>,
}

impl Replicas<'static> {
    /// Three replicas on a fresh store of `backend`.
    async fn start(backend: Backend) -> Self {
        Self::start_on(Store::fresh(backend).await).await
    }
}

impl<'c> Replicas<'c> {
    /// Three replicas on `store`.
    async fn start_on(store: Store<'c>) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let trigger_key = generate_api_key();
        let service_key = generate_api_key();
        let admin_key = generate_api_key();
        // Limits well above the tests' load: they spread calls, they do not measure limits.
        let config = format!(
            r#"
replicas = 3

[server]
request_timeout_seconds = 30

[tokens]
replay_key = "{replay_key}"

[limits.anonymous]
per_second = 0

[limits.anonymous_total]
per_second = 0

[[api_keys]]
name = "cognito-trigger"
roles = ["trigger"]
sha256 = "{trigger}"

[[api_keys]]
name = "resource-server"
roles = ["service"]
sha256 = "{service}"

[[api_keys]]
name = "ops"
roles = ["admin"]
sha256 = "{admin}"
{store}"#,
            trigger = api_key_digest(&trigger_key),
            service = api_key_digest(&service_key),
            admin = api_key_digest(&admin_key),
            replay_key = generate_replay_key(),
            store = store.config(),
        );
        let path = dir.path().join("tokenbroker.toml");
        std::fs::write(&path, config).expect("config written");
        let mut processes = Vec::new();
        for _ in 0..3 {
            processes.push(
                BrokerProcess::start(dir.path(), &["--config".as_ref(), path.as_os_str()]).await,
            );
        }
        let mut replicas = Self {
            _dir: dir,
            store,
            processes,
            trigger: Vec::new(),
            service: Vec::new(),
            admin: Vec::new(),
            anonymous: Vec::new(),
        };
        for process in &replicas.processes {
            let client = Client::connect(&process.endpoint)
                .await
                .expect("the replica is reachable")
                .with_timeout(CALL_TIMEOUT);
            replicas.trigger.push(with_key(&client, &trigger_key));
            replicas.service.push(with_key(&client, &service_key));
            replicas.admin.push(with_key(&client, &admin_key));
            replicas.anonymous.push(client);
        }
        replicas
    }

    /// Makes concurrent requests contend: on the Fauna double, every transaction now takes
    /// [`FAUNA_CONTENDED_TRANSACTION_TIME`] between its snapshot and its commit. PostgreSQL
    /// needs nothing: its statements conflict on the rows they share however short they are.
    fn contend(&self) {
        if let Store::Fauna(double) = &self.store {
            double.set_transaction_time(FAUNA_CONTENDED_TRANSACTION_TIME);
        }
    }

    /// Returns how many accounts exist.
    async fn account_count(&self) -> i64 {
        match &self.store {
            Store::Postgres { .. } => self.count("SELECT count(*) FROM accounts").await,
            Store::Fauna(double) => i64::try_from(double.account_count()).expect("a small count"),
        }
    }

    /// Returns how many tokens exist: rows on postgres, live documents on Fauna (where a
    /// revoked token's document is deleted; the scenarios that count revoke nothing).
    async fn token_count(&self) -> i64 {
        match &self.store {
            Store::Postgres { .. } => self.count("SELECT count(*) FROM tokens").await,
            Store::Fauna(double) => {
                i64::try_from(double.live_token_count()).expect("a small count")
            }
        }
    }

    /// Counts the rows `query` (one `count(*)`) finds in the replicas' PostgreSQL database.
    ///
    /// # Panics
    ///
    /// On the Fauna store.
    async fn count(&self, query: &str) -> i64 {
        let Store::Postgres { cluster, database } = &self.store else {
            panic!("an SQL count on the Fauna store");
        };
        cluster
            .admin(&database.dbname)
            .await
            .query_one(query, &[])
            .await
            .expect("the count query runs")
            .get(0)
    }

    /// Returns every token of `email`'s account, inactive ones included, through ListTokens on
    /// replica `replica`.
    async fn all_tokens(&self, replica: usize, email: &str) -> Vec<pb::TokenSummary> {
        tokenbroker_tests::all_tokens(&self.admin[replica], email).await
    }
}

/// A fresh `tokens.replay_key`: 32 random bytes in hex.
fn generate_replay_key() -> String {
    tokenbroker::model::random_hex() + &tokenbroker::model::random_hex()
}

fn with_key(client: &Client, key: &SecretString) -> Client {
    client.clone().with_api_key(key).expect("a valid key")
}

fn refresh_request(pair: &TokenPair) -> pb::RefreshTokensRequest {
    pb::RefreshTokensRequest {
        refresh_token: expose(&pair.refresh.secret),
        client_id: CLIENT.into(),
        ..Default::default()
    }
}

async fn is_active(client: &Client, secret: &SecretString) -> bool {
    client
        .introspect_secret(secret)
        .await
        .expect("Introspect answers")
        .active
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sign_ins_of_one_email_over_three_replicas_make_one_account_on_postgres() {
    concurrent_first_sign_ins_of_one_email_over_three_replicas_make_one_account(Backend::Postgres)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sign_ins_of_one_email_over_three_replicas_make_one_account_on_fauna() {
    concurrent_first_sign_ins_of_one_email_over_three_replicas_make_one_account(Backend::Fauna)
        .await;
}

async fn concurrent_first_sign_ins_of_one_email_over_three_replicas_make_one_account(
    backend: Backend,
) {
    let replicas = Replicas::start(backend).await;
    replicas.contend();
    let mut calls = JoinSet::new();
    for i in 0..100 {
        let trigger = replicas.trigger[i % 3].clone();
        calls.spawn(async move {
            trigger
                .issue_tokens(claims_request("first@example.com", CLIENT))
                .await
                .expect("IssueTokens succeeds")
        });
    }
    let pairs = calls.join_all().await;
    let account = &pairs[0].account_id;
    assert!(pairs.iter().all(|pair| &pair.account_id == account));
    assert_eq!(replicas.account_count().await, 1);
    assert_eq!(replicas.token_count().await, 200);
    if let Store::Fauna(double) = &replicas.store {
        assert!(double.conflicts() > 0, "the sign-ins contended");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_idempotency_key_on_other_replicas_gets_the_same_pair_on_postgres() {
    a_retry_with_the_same_idempotency_key_on_other_replicas_gets_the_same_pair(Backend::Postgres)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_idempotency_key_on_other_replicas_gets_the_same_pair_on_fauna() {
    a_retry_with_the_same_idempotency_key_on_other_replicas_gets_the_same_pair(Backend::Fauna)
        .await;
}

async fn a_retry_with_the_same_idempotency_key_on_other_replicas_gets_the_same_pair(
    backend: Backend,
) {
    let replicas = Replicas::start(backend).await;
    let request = pb::IssueTokensRequest {
        idempotency_key: "cognito-request-7".into(),
        ..claims_request("retry@example.com", CLIENT)
    };
    let first = replicas.trigger[0]
        .issue_tokens(request.clone())
        .await
        .expect("IssueTokens succeeds");
    assert!(!first.replayed);
    // Cognito retries: concurrently, on the other replicas.
    let mut retries = JoinSet::new();
    for i in 0..6 {
        let (trigger, request) = (replicas.trigger[1 + i % 2].clone(), request.clone());
        retries.spawn(async move { trigger.issue_tokens(request).await.expect("a replay") });
    }
    for retry in retries.join_all().await {
        assert_eq!(
            (retry.replayed, retry.refresh.token_id.as_str()),
            (true, first.refresh.token_id.as_str()),
            "a retry on another replica replays the first pair (replayed, refresh token id)"
        );
        assert_eq!(expose(&retry.access.secret), expose(&first.access.secret));
        assert_eq!(expose(&retry.refresh.secret), expose(&first.refresh.secret));
    }
    assert_eq!(replicas.token_count().await, 2);
    if backend == Backend::Postgres {
        assert_eq!(replicas.count("SELECT count(*) FROM replays").await, 1);
    }

    // A new key is a new sign-in, wherever it lands.
    let other = replicas.trigger[2]
        .issue_tokens(pb::IssueTokensRequest {
            idempotency_key: "cognito-request-8".into(),
            ..claims_request("retry@example.com", CLIENT)
        })
        .await
        .unwrap();
    assert!(!other.replayed);
    assert_ne!(other.refresh.token_id, first.refresh.token_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_refreshes_of_one_token_over_three_replicas_make_one_successor_on_postgres() {
    parallel_refreshes_of_one_token_over_three_replicas_make_one_successor(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_refreshes_of_one_token_over_three_replicas_make_one_successor_on_fauna() {
    parallel_refreshes_of_one_token_over_three_replicas_make_one_successor(Backend::Fauna).await;
}

async fn parallel_refreshes_of_one_token_over_three_replicas_make_one_successor(backend: Backend) {
    const EMAIL: &str = "rotate@example.com";
    let replicas = Replicas::start(backend).await;
    let pair = replicas.trigger[0]
        .issue_tokens(claims_request(EMAIL, CLIENT))
        .await
        .expect("IssueTokens succeeds");
    replicas.contend();
    // 50 holders of one refresh secret (a browser's tabs, a client's retries) refresh at once,
    // behind a balancer that spreads them over the replicas.
    let start = Arc::new(Barrier::new(50));
    let mut calls = JoinSet::new();
    for i in 0..50 {
        let (anonymous, request, start) = (
            replicas.anonymous[i % 3].clone(),
            refresh_request(&pair),
            start.clone(),
        );
        calls.spawn(async move {
            start.wait().await;
            anonymous.refresh_tokens(request).await
        });
    }
    let answers = calls.join_all().await;
    let mut successors = BTreeSet::new();
    let mut failures = Vec::new();
    for answer in &answers {
        match answer {
            Ok(next) => {
                assert_eq!(next.family_id, pair.family_id);
                successors.insert((next.refresh.token_id.clone(), next.access.token_id.clone()));
            }
            Err(err) => failures.push(err.kind()),
        }
    }
    assert_eq!(
        successors.len(),
        1,
        "every caller that got an answer got the same successor (refresh, access): \
         {successors:?}; failed calls: {failures:?}"
    );
    // A call may give up on contention it could not win within its attempts (UNAVAILABLE): it
    // got no pair, so it holds none that could differ. Any other failure is a wrong answer.
    assert!(
        failures
            .iter()
            .all(|&kind| kind == ClientErrorKind::Unavailable),
        "only contention may fail a parallel refresh: {failures:?}"
    );
    let (refresh_id, access_id) = successors.pop_first().expect("one successor");
    let next = answers
        .iter()
        .flatten()
        .next()
        .expect("an answer with the successor");
    assert!(!is_active(&replicas.service[1], &pair.refresh.secret).await);
    assert!(is_active(&replicas.service[2], &next.refresh.secret).await);
    assert!(is_active(&replicas.service[0], &next.access.secret).await);

    // The session holds exactly one usable refresh token: the successor.
    let tokens = replicas.all_tokens(1, EMAIL).await;
    let active = |kind: pb::TokenKind| -> Vec<&str> {
        tokens
            .iter()
            .filter(|t| {
                t.family_id == pair.family_id
                    && t.kind == kind as i32
                    && t.state == pb::TokenState::Active as i32
            })
            .map(|t| t.token_id.as_str())
            .collect()
    };
    assert_eq!(active(pb::TokenKind::Refresh), [refresh_id.as_str()]);
    assert!(active(pb::TokenKind::Access).contains(&access_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_is_seen_by_the_others_at_once_on_postgres() {
    a_revocation_on_one_replica_is_seen_by_the_others_at_once(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_is_seen_by_the_others_at_once_on_fauna() {
    a_revocation_on_one_replica_is_seen_by_the_others_at_once(Backend::Fauna).await;
}

async fn a_revocation_on_one_replica_is_seen_by_the_others_at_once(backend: Backend) {
    let replicas = Replicas::start(backend).await;
    let [a, b, c] = [0, 1, 2];
    let pair = replicas.trigger[a]
        .issue_tokens(claims_request("rev@example.com", CLIENT))
        .await
        .unwrap();
    // Every replica has seen the token active (and the account), so a cache would hold it now.
    for replica in [a, b, c] {
        assert!(is_active(&replicas.service[replica], &pair.access.secret).await);
    }
    replicas.anonymous[a]
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::Token(expose(
                &pair.refresh.secret,
            ))),
            client_id: CLIENT.into(),
            ..Default::default()
        })
        .await
        .expect("Revoke acknowledged");
    for replica in [b, c] {
        assert!(!is_active(&replicas.service[replica], &pair.access.secret).await);
        assert!(!is_active(&replicas.service[replica], &pair.refresh.secret).await);
    }

    // An account revoked by email on B, where every replica has the email's account cached.
    let again = replicas.trigger[c]
        .issue_tokens(claims_request("rev@example.com", CLIENT))
        .await
        .unwrap();
    for replica in [a, b, c] {
        replicas.trigger[replica]
            .issue_tokens(claims_request("rev@example.com", CLIENT))
            .await
            .unwrap();
    }
    replicas.admin[b]
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::Email("rev@example.com".into())),
            ..Default::default()
        })
        .await
        .expect("Revoke acknowledged");
    for replica in [a, c] {
        assert!(!is_active(&replicas.service[replica], &again.access.secret).await);
        let refreshed = replicas.anonymous[replica]
            .refresh_tokens(refresh_request(&again))
            .await;
        assert_eq!(
            refreshed.map(|_| ()).expect_err("a revoked token").kind(),
            ClientErrorKind::Unauthenticated
        );
    }
    // A rotation remembered by replica A for its grace window is not handed out again once
    // replica B revoked the session: A checks the successor with the store first.
    let pair = replicas.trigger[a]
        .issue_tokens(claims_request("grace@example.com", CLIENT))
        .await
        .unwrap();
    let next = replicas.anonymous[a]
        .refresh_tokens(refresh_request(&pair))
        .await
        .expect("RefreshTokens rotates");
    replicas.admin[b]
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::FamilyId(next.family_id.clone())),
            ..Default::default()
        })
        .await
        .expect("Revoke acknowledged");
    let replayed = replicas.anonymous[a]
        .refresh_tokens(refresh_request(&pair))
        .await;
    assert_eq!(
        replayed.map(|_| ()).expect_err("a revoked session").kind(),
        ClientErrorKind::Unauthenticated
    );
    assert!(!is_active(&replicas.service[a], &next.access.secret).await);

    // The account survives: a sign-in after the revocation is active everywhere.
    let after = replicas.trigger[a]
        .issue_tokens(claims_request("rev@example.com", CLIENT))
        .await
        .unwrap();
    assert_eq!(after.account_id, again.account_id);
    assert!(is_active(&replicas.service[c], &after.access.secret).await);
}

/// What the load of the kill test saw acknowledged.
#[derive(Default)]
struct Acknowledged {
    /// Access tokens of acknowledged issues and refreshes: a rotation leaves them active.
    access: Vec<SecretString>,
    /// Refresh tokens of acknowledged refreshes, never presented again.
    refresh: Vec<SecretString>,
    /// Calls the surviving replicas acknowledged after the kill.
    after_kill: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_nothing_acknowledged_and_the_others_serve_on_postgres() {
    a_replica_killed_under_load_loses_nothing_acknowledged_and_the_others_serve(Backend::Postgres)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_nothing_acknowledged_and_the_others_serve_on_fauna() {
    a_replica_killed_under_load_loses_nothing_acknowledged_and_the_others_serve(Backend::Fauna)
        .await;
}

async fn a_replica_killed_under_load_loses_nothing_acknowledged_and_the_others_serve(
    backend: Backend,
) {
    let mut replicas = Replicas::start(backend).await;
    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop = Instant::now() + Duration::from_secs(4);
    let mut workers = JoinSet::new();
    for worker in 0..6 {
        let (trigger, service, anonymous) = (
            replicas.trigger.clone(),
            replicas.service.clone(),
            replicas.anonymous.clone(),
        );
        let (acknowledged, killed_at) = (acknowledged.clone(), killed_at.clone());
        workers.spawn(async move {
            let mut n = worker;
            while Instant::now() < stop {
                n += 1;
                let email = format!("load{worker}-{n}@example.com");
                // Each step on the next replica: issue, refresh, introspect.
                let Ok(pair) = trigger[n % 3]
                    .issue_tokens(claims_request(&email, CLIENT))
                    .await
                else {
                    continue;
                };
                let served_after_kill = |replica: usize| {
                    replica != 0
                        && killed_at
                            .lock()
                            .unwrap()
                            .is_some_and(|t| t < Instant::now())
                };
                let mut seen = vec![(n % 3, pair.access.secret.clone())];
                let refreshed = anonymous[(n + 1) % 3]
                    .refresh_tokens(refresh_request(&pair))
                    .await;
                let mut acks = usize::from(served_after_kill(n % 3));
                let mut refresh = None;
                if let Ok(next) = refreshed {
                    acks += usize::from(served_after_kill((n + 1) % 3));
                    seen.push(((n + 1) % 3, next.access.secret.clone()));
                    refresh = Some(next.refresh.secret);
                    if let Ok(info) = service[(n + 2) % 3]
                        .introspect_secret(&next.access.secret)
                        .await
                    {
                        assert!(info.active, "a refreshed access token is active at once");
                    }
                }
                let mut acknowledged = acknowledged.lock().unwrap();
                acknowledged
                    .access
                    .extend(seen.into_iter().map(|(_, secret)| secret));
                acknowledged.refresh.extend(refresh);
                acknowledged.after_kill += acks;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL: no shutdown, no draining; its in-flight calls fail.
    replicas.processes[0].child.start_kill().unwrap();
    replicas.processes[0].child.wait().await.unwrap();
    *killed_at.lock().unwrap() = Some(Instant::now());
    workers.join_all().await;

    let acknowledged = Arc::into_inner(acknowledged).unwrap().into_inner().unwrap();
    assert!(
        acknowledged.after_kill > 0,
        "the surviving replicas kept serving"
    );
    assert!(!acknowledged.refresh.is_empty());
    for (i, secret) in acknowledged
        .access
        .iter()
        .chain(&acknowledged.refresh)
        .enumerate()
    {
        let survivor = &replicas.service[1 + i % 2];
        assert!(
            is_active(survivor, secret).await,
            "an acknowledged token was lost"
        );
    }
}

/// What the load of the restart test saw: the tokens whose state an acknowledged call decided,
/// and every failure.
#[derive(Default)]
struct Seen {
    /// Tokens an acknowledged call left active: issued or refreshed, and never revoked,
    /// rotated or sent to a call whose outcome is unknown.
    active: Vec<SecretString>,
    /// Tokens an acknowledged call ended: rotated by an acknowledged refresh, or in a family
    /// whose revocation was acknowledged.
    inactive: Vec<SecretString>,
    /// Calls answered with UNAVAILABLE.
    unavailable: usize,
    /// Calls that failed with anything else: "rpc: error".
    other_failures: Vec<String>,
    /// Introspections with a short deadline that failed: (`UNAVAILABLE`, `DEADLINE_EXCEEDED`).
    short_deadline_failures: (usize, usize),
    /// Calls in flight across the restart: begun before the server was back, ended after.
    across_restart: usize,
    /// Calls begun after the restart and acknowledged, per replica.
    after_restart: [usize; 3],
}

impl Seen {
    /// Counts a failed call; only UNAVAILABLE is expected while the database restarts.
    fn failed(&mut self, rpc: &str, err: &ClientError) {
        if err.kind() == ClientErrorKind::Unavailable {
            self.unavailable += 1;
        } else {
            self.other_failures.push(format!("{rpc}: {err}"));
        }
    }
}

/// Runs one call of the restart test's load on replica `replica` and records it in `seen`: in
/// flight across the restart when it began before the server was back and ended after;
/// acknowledged after the restart when it began after and succeeded; a failure under `rpc`.
async fn tracked<T>(
    seen: &Mutex<Seen>,
    restarted: &AtomicBool,
    rpc: &str,
    replica: usize,
    call: impl Future<Output = Result<T, ClientError>>,
) -> Option<T> {
    let before = !restarted.load(Ordering::Acquire);
    let result = call.await;
    let after = restarted.load(Ordering::Acquire);
    let mut seen = seen.lock().unwrap();
    seen.across_restart += usize::from(before && after);
    match result {
        Ok(value) => {
            seen.after_restart[replica] += usize::from(!before);
            Some(value)
        }
        Err(err) => {
            seen.failed(rpc, &err);
            None
        }
    }
}

/// Runs one worker's share of the restart test's load until `stop`: sign in on one replica,
/// introspect on the next, refresh on the third, and revoke every fourth session, recording
/// what each call acknowledged in `seen`.
async fn restart_load(
    worker: usize,
    replicas: [Vec<Client>; 4],
    seen: Arc<Mutex<Seen>>,
    restarted: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let [trigger, service, anonymous, admin] = replicas;
    let mut n = worker;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let [first, second, third] = [n % 3, (n + 1) % 3, (n + 2) % 3];
        let email = format!("load{worker}-{n}@example.com");
        let issued = trigger[first].issue_tokens(claims_request(&email, CLIENT));
        let Some(pair) = tracked(&seen, &restarted, "IssueTokens", first, issued).await else {
            continue;
        };
        let introspected = async {
            let info = service[second].introspect_secret(&pair.access.secret).await;
            info.map(|info| info.active)
        };
        if let Some(active) = tracked(&seen, &restarted, "Introspect", second, introspected).await {
            assert!(active, "an acknowledged sign-in is active at once");
        }
        // A rotation leaves the presented refresh token's access token active, whether or not
        // it committed; the presented refresh token is decided only by an acknowledged one.
        let mut active = vec![pair.access.secret.clone()];
        let mut inactive = Vec::new();
        let refreshed = anonymous[third].refresh_tokens(refresh_request(&pair));
        if let Some(next) = tracked(&seen, &restarted, "RefreshTokens", third, refreshed).await {
            inactive.push(pair.refresh.secret.clone());
            active.extend([next.access.secret, next.refresh.secret]);
        }
        if n.is_multiple_of(4) {
            let revoked = admin[first].revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::FamilyId(pair.family_id.clone())),
                ..Default::default()
            });
            if tracked(&seen, &restarted, "Revoke", first, revoked)
                .await
                .is_none()
            {
                // The session may or may not be revoked: nothing of it is decided.
                continue;
            }
            inactive.append(&mut active);
        }
        let mut seen = seen.lock().unwrap();
        seen.active.append(&mut active);
        seen.inactive.append(&mut inactive);
    }
}

/// Introspects `active` tokens, with a deadline shorter than the restart, until `stop`: each
/// answer says active, or fails with `UNAVAILABLE` or `DEADLINE_EXCEEDED`; never inactive.
async fn short_deadline_introspection(
    active: Vec<SecretString>,
    service: Vec<Client>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let answer = service[n % 3]
            .introspect_secret(&active[n % active.len()])
            .await;
        let mut seen = seen.lock().unwrap();
        match answer {
            Ok(info) => assert!(info.active, "a store outage never makes a token inactive"),
            Err(err) if err.kind() == ClientErrorKind::Unavailable => {
                seen.short_deadline_failures.0 += 1;
            }
            Err(err) if err.kind() == ClientErrorKind::DeadlineExceeded => {
                seen.short_deadline_failures.1 += 1;
            }
            Err(err) => seen
                .other_failures
                .push(format!("Introspect (short deadline): {err}")),
        }
    }
}

/// An operator restarts PostgreSQL (`pg_ctl restart -m fast`) while twelve clients keep the
/// three replicas busy. The server ends every session; the calls in flight must then succeed
/// (the store retries on a new connection within the call's deadline) or fail with
/// `UNAVAILABLE`, the replicas must serve again without help, and nothing an acknowledged call
/// decided may be undone. Introspections with a deadline shorter than the restart may fail
/// too, as `UNAVAILABLE` or `DEADLINE_EXCEEDED`, but never answer `active = false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_answers_ok_or_unavailable_recovers_and_loses_nothing() {
    let server = tokio::task::block_in_place(PrivateCluster::start);
    let replicas = Replicas::start_on(Store::on(&server).await).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (restarted, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut workers = JoinSet::new();
    for worker in 0..12 {
        let clients = [
            replicas.trigger.clone(),
            replicas.service.clone(),
            replicas.anonymous.clone(),
            replicas.admin.clone(),
        ];
        workers.spawn(restart_load(
            worker,
            clients,
            seen.clone(),
            restarted.clone(),
            stop.clone(),
        ));
    }
    // The load runs for a while first, so the restart meets calls in flight on every replica.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let active: Vec<SecretString> = seen.lock().unwrap().active.clone();
    assert!(!active.is_empty(), "the load was served before the restart");
    // Callers with a deadline shorter than the restart (a Cognito trigger's): they may fail,
    // but only as the store being unavailable or their deadline passing.
    let short: Vec<Client> = replicas
        .service
        .iter()
        .map(|client| client.clone().with_timeout(Duration::from_millis(250)))
        .collect();
    workers.spawn(short_deadline_introspection(
        active,
        short,
        seen.clone(),
        stop.clone(),
    ));
    let restart = Instant::now();
    tokio::task::block_in_place(|| server.restart());
    let restart_took = restart.elapsed();
    restarted.store(true, Ordering::Release);

    // Back with no manual step: every replica serves a sign-in again, within a bound
    // generous for a loaded machine (each call may itself wait up to CALL_TIMEOUT).
    for (replica, trigger) in replicas.trigger.iter().enumerate() {
        let back = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match trigger
                    .issue_tokens(claims_request("back@example.com", CLIENT))
                    .await
                {
                    Ok(_) => return,
                    Err(err) => {
                        seen.lock().unwrap().failed("IssueTokens (probe)", &err);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .await;
        assert!(
            back.is_ok(),
            "replica {replica} serves again within 30 s of the restart"
        );
    }
    let back_after = restart.elapsed();
    // And the load keeps running on the new connections for a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    workers.join_all().await;

    let seen = Arc::into_inner(seen).unwrap().into_inner().unwrap();
    eprintln!(
        "restart: pg_ctl restart took {restart_took:?}, every replica served again {back_after:?} \
         after it began; {} calls in flight across the restart, {} UNAVAILABLE answers, (UNAVAILABLE, \
         DEADLINE_EXCEEDED) of introspections with a 250 ms deadline {:?}, {} tokens active and {} ended by acknowledged \
         calls, acknowledged after the restart per replica {:?}",
        seen.across_restart,
        seen.unavailable,
        seen.short_deadline_failures,
        seen.active.len(),
        seen.inactive.len(),
        seen.after_restart
    );
    assert!(seen.across_restart > 0, "the restart met calls in flight");
    assert!(
        seen.other_failures.is_empty(),
        "only UNAVAILABLE while the database restarts: {:?}",
        seen.other_failures
    );
    assert!(
        seen.after_restart.iter().all(|&acks| acks > 0),
        "every replica served the load after the restart: {:?}",
        seen.after_restart
    );
    for (i, secret) in seen.active.iter().enumerate() {
        assert!(
            is_active(&replicas.service[i % 3], secret).await,
            "an acknowledged token was lost"
        );
    }
    for (i, secret) in seen.inactive.iter().enumerate() {
        assert!(
            !is_active(&replicas.service[i % 3], secret).await,
            "an acknowledged rotation or revocation was lost"
        );
    }
}
