//! Three brokers on one PostgreSQL database: `tokenbroker` processes (the debug binary that
//! `workspace_binary` builds, not a release build: the tests check behaviour, not speed), each
//! with the same config file, on a fresh database of the test cluster of
//! `tokenbroker::store::postgres::testing`. Calls are spread over the replicas round-robin.
//!
//! What crosses replicas here: accounts (one per email however many replicas sign it in at
//! once), revocations (visible on every other replica from the next call on), and acknowledged
//! writes (a replica killed with SIGKILL loses none, and the others keep serving).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use secrecy::SecretString;
use tempfile::TempDir;
use tokenbroker::{
    app::dev::{api_key_digest, generate_api_key},
    store::{PostgresSettings, postgres::testing::cluster},
};
use tokenbroker_client::{Client, ClientErrorKind, TokenPair, pb};
use tokenbroker_tests::{BrokerProcess, claims_request, expose};
use tokio::task::JoinSet;

/// The app client every token of these tests is issued for.
const CLIENT: &str = "web";
/// Every client call's timeout: generous, for a loaded CI machine.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Three broker processes on one database, with a client for each of them per role.
struct Replicas {
    _dir: TempDir,
    database: PostgresSettings,
    processes: Vec<BrokerProcess>,
    trigger: Vec<Client>,
    service: Vec<Client>,
    admin: Vec<Client>,
    anonymous: Vec<Client>,
}

impl Replicas {
    async fn start() -> Self {
        let database = cluster().create_database().await;
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

[store]
backend = "postgres"

[store.postgres]
host = "{host}"
port = {port}
dbname = "{dbname}"
user = "{user}"
sslmode = "disable"
pool_size = 4

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
"#,
            host = database.host,
            port = database.port,
            dbname = database.dbname,
            user = database.user,
            trigger = api_key_digest(&trigger_key),
            service = api_key_digest(&service_key),
            admin = api_key_digest(&admin_key),
            replay_key = generate_replay_key(),
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
            database,
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

    /// Counts the rows `query` (one `count(*)`) finds in the replicas' database.
    async fn count(&self, query: &str) -> i64 {
        cluster()
            .admin(&self.database.dbname)
            .await
            .query_one(query, &[])
            .await
            .expect("the count query runs")
            .get(0)
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
async fn concurrent_first_sign_ins_of_one_email_over_three_replicas_make_one_account() {
    let replicas = Replicas::start().await;
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
    assert_eq!(
        replicas
            .count("SELECT count(*) FROM accounts WHERE email = 'first@example.com'")
            .await,
        1
    );
    assert_eq!(replicas.count("SELECT count(*) FROM tokens").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_idempotency_key_on_other_replicas_gets_the_same_pair() {
    let replicas = Replicas::start().await;
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
        assert!(retry.replayed);
        assert_eq!(retry.refresh.token_id, first.refresh.token_id);
        assert_eq!(expose(&retry.access.secret), expose(&first.access.secret));
        assert_eq!(expose(&retry.refresh.secret), expose(&first.refresh.secret));
    }
    assert_eq!(replicas.count("SELECT count(*) FROM tokens").await, 2);
    assert_eq!(replicas.count("SELECT count(*) FROM replays").await, 1);

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
async fn a_revocation_on_one_replica_is_seen_by_the_others_at_once() {
    let replicas = Replicas::start().await;
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
async fn a_replica_killed_under_load_loses_nothing_acknowledged_and_the_others_serve() {
    let mut replicas = Replicas::start().await;
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
