//! The PostgreSQL store's tests, on the real server of [`testing::cluster`]: the conformance
//! suite, round trips per RPC counted on the wire, retries after an ambiguous commit, deadlines,
//! lost connections, migrations, settings and a Unix socket.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use secrecy::ExposeSecret as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use super::{testing::cluster, *};
use crate::{
    model::{Metadata, TokenState, clock::ManualClock},
    store::testsuite::{StoreHarness, store_test_suite},
};

/// Opens every store on a database of its own, and keeps them to read their retry counts.
#[derive(Default)]
struct FreshDatabases {
    stores: Mutex<Vec<Arc<PostgresStore>>>,
}

#[async_trait]
impl StoreHarness for FreshDatabases {
    async fn open(&self, clock: Arc<ManualClock>) -> Arc<dyn TokenStore> {
        let mut settings = cluster().create_database().await;
        // The budget of a call, retries included: generous, because a loaded CI machine slows
        // the concurrency cases' rounds of serialization failures (a guard, not a speed limit).
        settings.statement_timeout_ms = 30_000;
        let store = Arc::new(
            PostgresStore::connect(&settings, clock)
                .await
                .expect("the store opens on an empty database"),
        );
        self.stores
            .lock()
            .expect("the store list lock is never poisoned")
            .push(Arc::clone(&store));
        store
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_passes_conformance_suite() {
    let harness = FreshDatabases::default();
    store_test_suite(&harness).await;
    // The concurrency cases (100 first sign-ins of one email, 50 refreshes of one token) run
    // into serialization failures: the suite passing means each was retried to the right
    // answer, and this makes sure the retry path was taken at all.
    let retries: u64 = harness
        .stores
        .lock()
        .expect("the store list lock is never poisoned")
        .iter()
        .map(|store| store.retries())
        .sum();
    assert!(retries > 0, "no serialization failure was retried");
}

async fn open_store(settings: &PostgresSettings) -> PostgresStore {
    PostgresStore::connect(settings, Arc::new(ManualClock::new()))
        .await
        .expect("the store opens")
}

fn email(address: &str) -> Email {
    Email::parse(address).expect("test emails are valid")
}

fn session(address: &str) -> NewSession {
    NewSession {
        email: email(address),
        known_account: None,
        cognito_sub: None,
        client_id: Some("app-1".into()),
        access_ttl: Duration::from_secs(600),
        refresh_ttl: Duration::from_secs(3600),
        session_ttl: Duration::from_secs(3600),
        metadata: Metadata::new(),
    }
}

fn rotation() -> Rotation {
    Rotation {
        client: ClientCheck::Any,
        access_ttl: Duration::from_secs(600),
        refresh_ttl: Duration::from_secs(3600),
        session_ttl: Duration::from_secs(3600),
        grace: Duration::from_secs(10),
        replay: None,
    }
}

/// What the counting proxy saw from the broker's side of the connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Wire {
    /// Client flights: bytes from the client after the server last spoke. A request that waits
    /// for an answer before its next message costs one more.
    round_trips: u64,
    /// Extended-protocol executions (`E`): one per prepared statement run.
    executes: u64,
    /// Parses (`P`): statements prepared.
    parses: u64,
    /// Simple queries (`Q`): here, only `SET statement_timeout`.
    simple_queries: u64,
    last_from_client: bool,
}

/// A TCP proxy in front of the cluster that counts protocol messages and round trips.
struct CountingProxy {
    port: u16,
    wire: Arc<Mutex<Wire>>,
    tasks: JoinSet<()>,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    /// The connections numbered below this forward nothing more (`freeze`).
    frozen_below: Arc<AtomicU64>,
}

impl CountingProxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("bound").port();
        let wire = Arc::new(Mutex::new(Wire::default()));
        let accepted = Arc::new(AtomicU64::new(0));
        let frozen_below = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let (shared, count, frozen) = (
            Arc::clone(&wire),
            Arc::clone(&accepted),
            Arc::clone(&frozen_below),
        );
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .expect("the cluster accepts");
                let number = count.fetch_add(1, Ordering::SeqCst);
                let frozen = Arc::clone(&frozen);
                let is_frozen = move || number < frozen.load(Ordering::SeqCst);
                connections.spawn(relay(client, server, Arc::clone(&shared), is_frozen));
            }
        });
        Self {
            port,
            wire,
            tasks,
            accepted,
            frozen_below,
        }
    }

    /// From now on, the connections accepted so far forward nothing in either direction, as if
    /// the network between broker and server had gone silent; new connections work.
    fn freeze(&self) {
        self.frozen_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn take(&self) -> Wire {
        let mut wire = self.wire.lock().expect("the wire lock is never poisoned");
        let seen = *wire;
        *wire = Wire {
            last_from_client: false,
            ..Wire::default()
        };
        seen
    }

    /// Drops every connection and stops accepting new ones.
    fn cut(&mut self) {
        self.tasks.abort_all();
    }
}

/// Relays one connection, parsing the client's messages (the first one, the startup message,
/// has no type byte).
async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    wire: Arc<Mutex<Wire>>,
    is_frozen: impl Fn() -> bool,
) {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let upstream = async {
        let mut pending = Vec::new();
        let mut started = false;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = client_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            if is_frozen() {
                std::future::pending::<()>().await;
            }
            pending.extend_from_slice(&buf[..n]);
            {
                let mut wire = wire.lock().expect("the wire lock is never poisoned");
                if !wire.last_from_client {
                    wire.round_trips += 1;
                    wire.last_from_client = true;
                }
                loop {
                    let header = if started { 5 } else { 4 };
                    if pending.len() < header {
                        break;
                    }
                    let at = header - 4;
                    let len = u32::from_be_bytes(pending[at..at + 4].try_into().expect("4 bytes"))
                        as usize;
                    if pending.len() < at + len {
                        break;
                    }
                    if started {
                        match pending[0] {
                            b'E' => wire.executes += 1,
                            b'P' => wire.parses += 1,
                            b'Q' => wire.simple_queries += 1,
                            _ => {}
                        }
                    }
                    started = true;
                    pending.drain(..at + len);
                }
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            if is_frozen() {
                std::future::pending::<()>().await;
            }
            wire.lock()
                .expect("the wire lock is never poisoned")
                .last_from_client = false;
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

#[tokio::test]
async fn issue_refresh_introspect_and_revocations_take_one_round_trip_each() {
    let mut settings = cluster().create_database().await;
    let proxy = CountingProxy::start(settings.port).await;
    settings.port = proxy.port;
    // One connection, so the warm-up below prepares every statement on the connection the
    // measured calls use.
    settings.pool_size = 1;
    let store = open_store(&settings).await;
    let warm = store.issue(session("warm@example.com")).await.unwrap();
    let RefreshOutcome::Rotated(warm) = store
        .refresh(&warm.refresh.secret, rotation())
        .await
        .unwrap()
    else {
        panic!("the warm-up refresh rotates");
    };
    store.introspect(&warm.access.secret).await.unwrap();
    store
        .revoke_secret(&warm.access.secret, &ClientCheck::Any)
        .await
        .unwrap();
    store
        .revoke_email(&email("warm@example.com"))
        .await
        .unwrap();
    let window = Duration::from_secs(30);
    store
        .issue_once(session("warm@example.com"), &claim(1, 9, window))
        .await
        .unwrap();
    // A rotation with a replay key, which also runs the deletion of closed sealed successors
    // (once per grace window).
    let warm = store.issue(session("warm@example.com")).await.unwrap();
    store
        .refresh(&warm.refresh.secret, sealing_rotation(9))
        .await
        .unwrap();
    proxy.take();

    // Every call here has the same budget (the statement timeout), so the connection keeps the
    // `statement_timeout` the warm-up set, and no call sends a `SET` (see below for one that
    // must).
    let one = Wire {
        round_trips: 1,
        executes: 1,
        parses: 0,
        simple_queries: 0,
        // The server spoke last: the answer.
        last_from_client: false,
    };
    let pair = store.issue(session("ann@example.com")).await.unwrap();
    assert_eq!(proxy.take(), one, "issue");
    let outcome = store
        .refresh(&pair.refresh.secret, rotation())
        .await
        .unwrap();
    assert_eq!(proxy.take(), one, "refresh");
    let RefreshOutcome::Rotated(pair) = outcome else {
        panic!("refresh rotates, got {outcome:?}");
    };
    assert!(
        store
            .introspect(&pair.access.secret)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(proxy.take(), one, "introspect");
    let revoked = store
        .revoke_secret(&pair.refresh.secret, &ClientCheck::Any)
        .await
        .unwrap();
    assert_eq!(proxy.take(), one, "revoke by secret");
    // The family: the first access token (a rotation leaves it active) and the new pair.
    assert_eq!(revoked, SecretRevocation::Revoked(3));

    // Finding the account and revoking it is one statement too.
    let again = store.issue(session("ann@example.com")).await.unwrap();
    proxy.take();
    let (account, revoked) = store
        .revoke_email(&email("ann@example.com"))
        .await
        .unwrap()
        .expect("the account exists");
    assert_eq!(proxy.take(), one, "revoke by email");
    assert_eq!(account, again.account_id);
    assert_eq!(revoked, 2, "the new pair");
    assert!(
        store
            .introspect(&again.access.secret)
            .await
            .unwrap()
            .is_none()
    );
    proxy.take();
    assert_eq!(
        store
            .revoke_email(&email("nobody@example.com"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(proxy.take(), one, "revoke by an unknown email");

    // A rotation that seals its successor, and a second presentation that gets it back.
    let pair = store.issue(session("ann@example.com")).await.unwrap();
    proxy.take();
    for what in ["sealed rotation", "replayed rotation"] {
        store
            .refresh(&pair.refresh.secret, sealing_rotation(9))
            .await
            .unwrap();
        assert_eq!(proxy.take(), one, "{what}");
    }

    // An idempotent issue, first and replayed (the deletion of closed replays is a second
    // statement, once per window, which the warm-up ran).
    for what in ["idempotent issue", "idempotent replay"] {
        store
            .issue_once(session("ann@example.com"), &claim(2, 9, window))
            .await
            .unwrap();
        assert_eq!(proxy.take(), one, "{what}");
    }

    // A much shorter deadline needs a shorter timeout: the `SET` goes with the statement, in
    // the same round trip (and the next call with the usual budget sets it back).
    let soon = tokio::time::Instant::now() + Duration::from_secs(1);
    deadline::scope(soon, store.introspect(&again.access.secret))
        .await
        .unwrap();
    let with_set = Wire {
        simple_queries: 1,
        ..one
    };
    assert_eq!(proxy.take(), with_set, "introspect with a shorter deadline");
}

#[tokio::test]
async fn a_retried_statement_recognises_its_own_committed_attempt() {
    // An attempt whose answer was lost after its commit is sent again with the same
    // parameters: the statements must answer as the first attempt did and change nothing more.
    let store = open_store(&cluster().create_database().await).await;
    let first = store.issue(session("bea@example.com")).await.unwrap();
    let now = store.db.clock.stamp();
    let (refresh_id, _, refresh_digest) = secret::mint(TokenKind::Refresh);
    let (access_id, _, access_digest) = secret::mint(TokenKind::Access);
    let presented = secret::parse(&first.refresh.secret).unwrap();
    let nonce = random_hex();
    let grace = micros(Duration::from_secs(10));
    let ttl = micros(Duration::from_secs(600));
    let client: Option<&str> = None;
    let no_seal: Option<&[u8]> = None;
    let params: [&(dyn ToSql + Sync); 16] = [
        &presented.id.as_str(),
        &presented.digest.as_slice(),
        &now.0,
        &grace,
        &true,
        &client,
        &ttl,
        &ttl,
        &refresh_id.as_str(),
        &refresh_digest.as_slice(),
        &access_id.as_str(),
        &access_digest.as_slice(),
        &nonce,
        &client,
        &no_seal,
        &no_seal,
    ];
    let answer = |rows: Vec<Row>| -> (String, String, i64, i64) {
        let row = rows.first().expect("one row");
        (
            get(row, 0).unwrap(),
            get(row, 2).unwrap(),
            get(row, 3).unwrap(),
            get(row, 4).unwrap(),
        )
    };
    let once = answer(store.db.query(sql::REFRESH, &params).await.unwrap());
    let again = answer(store.db.query(sql::REFRESH, &params).await.unwrap());
    assert_eq!(once.0, "rotate");
    assert_eq!(again, once, "the retry answers the committed rotation");
    let family = store
        .list_tokens(
            &first.account_id,
            PageRequest {
                size: 50,
                after: None,
                include_inactive: true,
            },
        )
        .await
        .unwrap()
        .tokens;
    assert_eq!(family.len(), 4, "one rotation, not two: {family:#?}");
    let live: Vec<_> = family
        .iter()
        .filter(|t| t.state == TokenState::Active && t.kind == TokenKind::Refresh)
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(
        live,
        vec![refresh_id.clone()],
        "the retry did not supersede its own successor"
    );

    // Revocation by secret: the retry counts what the committed attempt revoked.
    let presented = secret::parse(&first.access.secret).unwrap();
    let nonce = random_hex();
    let now = store.db.clock.stamp();
    let params: [&(dyn ToSql + Sync); 6] = [
        &presented.id.as_str(),
        &now.0,
        &nonce,
        &presented.digest.as_slice(),
        &true,
        &client,
    ];
    let revoked = |rows: Vec<Row>| -> i64 { get(&rows[0], 2).unwrap() };
    assert_eq!(
        revoked(store.db.query(sql::REVOKE_SECRET, &params).await.unwrap()),
        1
    );
    assert_eq!(
        revoked(store.db.query(sql::REVOKE_SECRET, &params).await.unwrap()),
        1,
        "the retry reports the committed revocation, not 'nothing to revoke'"
    );
}

#[tokio::test]
async fn the_callers_deadline_becomes_the_statements_timeout() {
    let settings = cluster().create_database().await;
    let store = open_store(&settings).await;
    let pair = store.issue(session("cid@example.com")).await.unwrap();
    // Another session holds the token's row, so the revocation waits for its lock: only the
    // server-side statement timeout can end the wait before the deadline.
    let mut admin = cluster().admin(&settings.dbname).await;
    let holder = admin.transaction().await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM tokens WHERE id = $1 FOR UPDATE",
            &[&pair.access.id.as_str()],
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let result = deadline::scope(
        tokio::time::Instant::now() + Duration::from_millis(300),
        async {
            store
                .revoke_secret(&pair.access.secret, &ClientCheck::Any)
                .await
        },
    )
    .await;
    let elapsed = started.elapsed();
    let err = result.expect_err("the revocation cannot finish while the row is held");
    // The server's cancellation usually arrives first ("cancelled"); on a loaded machine the
    // broker's own timer may win the race. Either way the caller gets a timeout in time.
    assert_eq!(err.kind(), StoreErrorKind::Timeout, "{err}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    // What only the statement timeout does: the server stops waiting for the lock although
    // the holder still holds it. Without it the statement would wait for as long as the lock.
    // From another session: one transaction would keep its first view of the activity.
    let watcher = cluster().admin(&settings.dbname).await;
    let mut waiting = -1;
    for _ in 0..40 {
        waiting = lock_waits(&watcher, &settings.dbname).await;
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        waiting, 0,
        "the broker's statement still waits on the server"
    );
    holder.rollback().await.unwrap();
    // The token was not revoked, and the store keeps working.
    assert!(
        store
            .introspect(&pair.access.secret)
            .await
            .unwrap()
            .is_some()
    );
}

/// Statements of the broker (`application_name`) on `dbname` that wait for a lock.
async fn lock_waits(client: &tokio_postgres::Client, dbname: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'tokenbroker' AND wait_event_type = 'Lock'",
            &[&dbname],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_lost_connection_is_unavailable_not_inactive() {
    let mut settings = cluster().create_database().await;
    let mut proxy = CountingProxy::start(settings.port).await;
    settings.port = proxy.port;
    settings.connect_timeout_ms = 200;
    let store = open_store(&settings).await;
    let pair = store.issue(session("dee@example.com")).await.unwrap();
    proxy.cut();
    let result = deadline::scope(
        tokio::time::Instant::now() + Duration::from_secs(2),
        async { store.introspect(&pair.access.secret).await },
    )
    .await;
    let err = result.expect_err("no server, no answer");
    assert!(
        matches!(
            err.kind(),
            StoreErrorKind::Unavailable | StoreErrorKind::Timeout
        ),
        "{err}"
    );
    assert!(store.retries() > 0, "the lost connection was retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_introspects_share_statements_and_each_gets_its_own_answer() {
    let settings = cluster().create_database().await;
    let store = Arc::new(open_store(&settings).await);
    let mut secrets = Vec::new();
    for n in 0..20 {
        let pair = store
            .issue(session(&format!("batch{n}@example.com")))
            .await
            .unwrap();
        secrets.push(pair.access.secret.clone());
        secrets.push(pair.refresh.secret.clone());
        if n % 5 == 0 {
            store
                .revoke_secret(&pair.access.secret, &ClientCheck::Any)
                .await
                .unwrap();
        }
    }
    // A secret of a stored token with the wrong random part, one of no stored token, and one
    // that does not parse.
    let stored = secrets[1].expose_secret();
    let (prefix, last) = stored.split_at(stored.len() - 1);
    let other = if last == "A" { "B" } else { "A" };
    secrets.push(SecretString::from(format!("{prefix}{other}")));
    secrets.push(SecretString::from(format!(
        "tba_{}_{}",
        "0".repeat(32),
        "a".repeat(43)
    )));
    secrets.push(SecretString::from("not a token"));
    // Every secret twice, so that one statement carries the same id for two calls.
    let calls: Vec<SecretString> = secrets.iter().chain(&secrets).cloned().collect();
    // One at a time: each call its own statement.
    let mut expected = Vec::new();
    for secret in &calls {
        expected.push(store.introspect(secret).await.unwrap());
    }
    let active = expected.iter().filter(|info| info.is_some()).count();
    assert!(active > 0 && active < calls.len(), "{active} active");
    assert!(
        expected[40..43].iter().all(Option::is_none),
        "the forged secrets are inactive"
    );
    // The same calls at once, on this store and on one with `introspect_batch = 1`. The
    // unparsable secret never reaches the database.
    let reaching = calls.len() as u64 - 2;
    let (shared, _) = concurrent_introspects(&store, &calls, &expected).await;
    assert!(
        shared < reaching,
        "{shared} statements for {reaching} concurrent lookups"
    );
    let single = Arc::new(
        open_store(&PostgresSettings {
            introspect_batch: 1,
            ..settings
        })
        .await,
    );
    let (statements, ids) = concurrent_introspects(&single, &calls, &expected).await;
    assert_eq!(
        (statements, ids),
        (reaching, reaching),
        "one statement per call"
    );
}

/// Runs Introspect of every one of `calls` at once and checks the answers against `expected`;
/// returns how many statements the store sent for them, and how many ids those carried.
async fn concurrent_introspects(
    store: &Arc<PostgresStore>,
    calls: &[SecretString],
    expected: &[Option<TokenInfo>],
) -> (u64, u64) {
    let (statements_before, ids_before) = store.lookups();
    let mut tasks = JoinSet::new();
    for (n, secret) in calls.iter().cloned().enumerate() {
        let store = Arc::clone(store);
        tasks.spawn(async move { (n, store.introspect(&secret).await.unwrap()) });
    }
    let mut answers: Vec<Option<TokenInfo>> = (0..calls.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (n, answer) = joined.unwrap();
        answers[n] = answer;
    }
    for (n, (answer, expected)) in answers.iter().zip(expected).enumerate() {
        assert_eq!(
            answer.as_ref().map(|info| (&info.id, &info.email)),
            expected.as_ref().map(|info| (&info.id, &info.email)),
            "call {n}"
        );
    }
    let (statements, ids) = store.lookups();
    (statements - statements_before, ids - ids_before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_introspect_statement_lets_the_next_one_go() {
    let mut settings = cluster().create_database().await;
    let proxy = CountingProxy::start(settings.port).await;
    settings.port = proxy.port;
    settings.connect_timeout_ms = 1000;
    let store = Arc::new(open_store(&settings).await);
    let pair = store.issue(session("stall@example.com")).await.unwrap();
    assert_eq!(
        proxy.accepted.load(Ordering::SeqCst),
        1,
        "one pooled connection"
    );
    // The pool's one connection goes silent: the next statement sent on it never answers.
    proxy.freeze();
    let stalled = {
        let store = Arc::clone(&store);
        let secret = pair.access.secret.clone();
        tokio::spawn(deadline::scope(
            tokio::time::Instant::now() + Duration::from_secs(3),
            async move { store.introspect(&secret).await },
        ))
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let started = std::time::Instant::now();
    let answer = deadline::scope(
        tokio::time::Instant::now() + Duration::from_secs(3),
        store.introspect(&pair.access.secret),
    )
    .await
    .expect("the second statement goes on a new connection");
    let waited = started.elapsed();
    assert_eq!(answer.map(|info| info.id), Some(pair.access.id.clone()));
    assert!(
        waited < Duration::from_secs(2),
        "the second lookup waited {waited:?} for the stalled statement"
    );
    let err = stalled
        .await
        .unwrap()
        .expect_err("the silent connection never answers");
    assert_eq!(err.kind(), StoreErrorKind::Timeout, "{err}");
}

#[tokio::test]
async fn migrations_are_recorded_once_and_a_newer_schema_is_refused() {
    let settings = cluster().create_database().await;
    open_store(&settings).await;
    // A second broker on the same database finds the schema current.
    open_store(&settings).await;
    let admin = cluster().admin(&settings.dbname).await;
    let versions: Vec<i32> = admin
        .query(
            "SELECT version FROM tokenbroker_schema ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let expected: Vec<i32> = (1..=i32::try_from(sql::MIGRATIONS.len()).unwrap()).collect();
    assert_eq!(versions, expected);

    admin
        .execute("INSERT INTO tokenbroker_schema VALUES (999, 0)", &[])
        .await
        .unwrap();
    let err = PostgresStore::connect(&settings, Arc::new(ManualClock::new()))
        .await
        .expect_err("a newer schema is refused");
    assert_eq!(err.kind(), StoreErrorKind::Internal);
    assert!(
        err.to_string()
            .contains("version 999, newer than this broker knows"),
        "{err}"
    );
}

#[tokio::test]
async fn concurrent_brokers_migrate_one_database_once() {
    let settings = cluster().create_database().await;
    let mut starts = JoinSet::new();
    for _ in 0..4 {
        let settings = settings.clone();
        starts.spawn(async move { open_store(&settings).await });
    }
    while let Some(started) = starts.join_next().await {
        started.expect("every broker starts");
    }
}

#[tokio::test]
async fn settings_are_checked_and_never_show_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = PostgresSettings {
        sslmode: SslMode::Disable,
        password: Some(SecretString::from("hunter2-pg")),
        ..PostgresSettings::default()
    };
    assert!(!format!("{settings:?}").contains("hunter2"));
    assert_eq!(
        settings.validate().unwrap().unwrap().expose_secret(),
        "hunter2-pg"
    );
    let file = dir.path().join("password");
    std::fs::write(&file, "from-file\n").unwrap();
    settings.password_file = Some(file.clone());
    let err = settings.validate().unwrap_err();
    assert!(err.0.contains("not both"), "{err}");
    settings.password = None;
    assert_eq!(
        settings.validate().unwrap().unwrap().expose_secret(),
        "from-file"
    );
    settings.sslmode = SslMode::VerifyFull;
    let err = settings.validate().unwrap_err();
    assert!(err.0.contains("ca_file"), "{err}");
    settings.sslmode = SslMode::Disable;
    settings.pool_size = 0;
    assert!(settings.validate().unwrap_err().0.contains("pool_size"));

    // A wrong password fails the start with the server's reason, and never shows the password.
    let store = open_store(&cluster().create_database().await).await;
    drop(store);
    let err = PostgresStore::connect(
        &PostgresSettings {
            user: "nobody".into(),
            password: Some(SecretString::from("hunter2-pg")),
            ..cluster().settings("postgres")
        },
        Arc::new(ManualClock::new()),
    )
    .await
    .expect_err("an unknown role is refused");
    let shown = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("nobody"),
        "the server's reason is kept: {shown}"
    );
}

#[tokio::test]
async fn a_unix_socket_directory_is_a_host() {
    let mut settings = cluster().create_database().await;
    settings.host = cluster().dir().display().to_string();
    let store = open_store(&settings).await;
    let pair = store.issue(session("eve@example.com")).await.unwrap();
    assert!(
        store
            .introspect(&pair.access.secret)
            .await
            .unwrap()
            .is_some()
    );
}

fn replay_key(key: u8) -> Arc<crate::model::replay::ReplayKey> {
    let text = SecretString::from(hex::encode([key; 32]));
    Arc::new(crate::model::replay::ReplayKey::from_hex(&text).unwrap())
}

fn claim(row: u8, key: u8, window: Duration) -> ReplayClaim {
    ReplayClaim {
        row: [row; 32],
        window,
        key: replay_key(key),
    }
}

/// [`rotation`] that seals its successor under the replay key made of `key` bytes.
fn sealing_rotation(key: u8) -> Rotation {
    Rotation {
        replay: Some(replay_key(key)),
        ..rotation()
    }
}

#[tokio::test]
async fn an_idempotency_claim_replays_one_sealed_pair_across_stores_until_its_window_closes() {
    let settings = cluster().create_database().await;
    let clock = Arc::new(ManualClock::new());
    // Two stores on one database: two replicas.
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(Arc::new(
            PostgresStore::connect(&settings, clock.clone())
                .await
                .unwrap(),
        ));
    }
    let window = Duration::from_secs(30);
    let mut calls = JoinSet::new();
    for i in 0..10 {
        let store = replicas[i % 2].clone();
        calls.spawn(async move {
            store
                .issue_once(session("ivy@example.com"), &claim(1, 9, window))
                .await
                .unwrap()
                .expect("postgres keeps replays")
        });
    }
    let answers = calls.join_all().await;
    assert_eq!(answers.iter().filter(|(_, replayed)| !replayed).count(), 1);
    let (first, _) = &answers[0];
    for (pair, _) in &answers {
        assert_eq!(pair.refresh.id, first.refresh.id);
        assert_eq!(pair.account_id, first.account_id);
        assert_eq!(pair.access.expires_at, first.access.expires_at);
        assert_eq!(
            pair.access.secret.expose_secret(),
            first.access.secret.expose_secret()
        );
    }
    let admin = cluster().admin(&settings.dbname).await;
    let tokens: i64 = admin
        .query_one("SELECT count(*) FROM tokens", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tokens, 2, "one pair");
    // Nothing in the database holds a secret in plaintext.
    let dump: String = admin
        .query_one(
            "SELECT string_agg(encode(sealed, 'escape') || key_id || encode(nonce, 'hex'), ' ') \
             FROM replays",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for secret in [&first.access.secret, &first.refresh.secret] {
        let text = secret.expose_secret();
        assert!(
            !dump.contains(&text[4..]),
            "a secret is stored in plaintext"
        );
    }

    // Another key opens nothing; another row is another call.
    let err = replicas[1]
        .issue_once(session("ivy@example.com"), &claim(1, 8, window))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Internal);
    assert!(!err.to_string().contains(&hex::encode([8u8; 32])));
    let (other, replayed) = replicas[0]
        .issue_once(session("ivy@example.com"), &claim(2, 9, window))
        .await
        .unwrap()
        .unwrap();
    assert!(!replayed);
    assert_ne!(other.refresh.id, first.refresh.id);

    // When the window closes the claim mints a new pair, and the closed rows are deleted.
    clock.advance(window + Duration::from_secs(1));
    let (later, replayed) = replicas[1]
        .issue_once(session("ivy@example.com"), &claim(1, 9, window))
        .await
        .unwrap()
        .unwrap();
    assert!(!replayed);
    assert_ne!(later.refresh.id, first.refresh.id);
    clock.advance(window + Duration::from_secs(1));
    replicas[0]
        .issue_once(session("ivy@example.com"), &claim(3, 9, window))
        .await
        .unwrap();
    let left: i64 = admin
        .query_one("SELECT count(*) FROM replays", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1, "only the open claim is left");
}

/// Two stores on one database: two replicas sharing a clock.
async fn two_replicas() -> (PostgresSettings, Arc<ManualClock>, [Arc<PostgresStore>; 2]) {
    let mut settings = cluster().create_database().await;
    // A guard for the rounds of serialization failures on a loaded machine, not a speed limit.
    settings.statement_timeout_ms = 30_000;
    let clock = Arc::new(ManualClock::new());
    let open = async || {
        Arc::new(
            PostgresStore::connect(&settings, clock.clone())
                .await
                .unwrap(),
        )
    };
    let replicas = [open().await, open().await];
    (settings, clock, replicas)
}

/// How many tokens of `family` are live refresh tokens (neither consumed nor revoked).
async fn live_refresh_tokens(admin: &tokio_postgres::Client, family: &FamilyId) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM tokens WHERE family_id = $1 AND kind = 'refresh' \
             AND revoked_at IS NULL AND replaced_by IS NULL",
            &[&family.as_str()],
        )
        .await
        .unwrap()
        .get(0)
}

/// The successor pair of an answer that has one.
fn successor(outcome: &RefreshOutcome) -> Option<&MintedPair> {
    match outcome {
        RefreshOutcome::Rotated(pair) | RefreshOutcome::Replayed { pair, .. } => Some(pair),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_refreshes_on_two_stores_get_one_sealed_successor() {
    const REFRESHES: usize = 50;
    let (settings, _clock, replicas) = two_replicas().await;
    let first = replicas[0].issue(session("rae@example.com")).await.unwrap();
    let mut calls = JoinSet::new();
    for i in 0..REFRESHES {
        let store = Arc::clone(&replicas[i % 2]);
        let secret = first.refresh.secret.clone();
        calls.spawn(async move { store.refresh(&secret, sealing_rotation(9)).await });
    }
    let outcomes = calls.join_all().await;
    let answered: Vec<&MintedPair> = outcomes
        .iter()
        .map(|outcome| successor(outcome.as_ref().expect("no refresh fails")))
        .map(|pair| pair.expect("every refresh gets a successor"))
        .collect();
    let rotated = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(RefreshOutcome::Rotated(_))))
        .count();
    assert_eq!(
        rotated, 1,
        "one refresh rotates, the others get its successor"
    );
    let one = answered[0];
    for pair in &answered {
        assert_eq!(pair.refresh.id, one.refresh.id);
        assert_eq!(pair.access.id, one.access.id);
        assert_eq!(
            pair.refresh.secret.expose_secret(),
            one.refresh.secret.expose_secret()
        );
        assert_eq!(
            pair.access.secret.expose_secret(),
            one.access.secret.expose_secret()
        );
        assert_eq!(pair.family_id, first.family_id);
        assert_eq!(pair.account_id, first.account_id);
        assert_eq!(pair.refresh.expires_at, one.refresh.expires_at);
        assert_eq!(pair.access.expires_at, one.access.expires_at);
    }
    let admin = cluster().admin(&settings.dbname).await;
    assert_eq!(live_refresh_tokens(&admin, &first.family_id).await, 1);
    let tokens: i64 = admin
        .query_one("SELECT count(*) FROM tokens", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tokens, 4, "the first pair and one successor pair");
    for store in &replicas {
        for secret in [&one.refresh.secret, &one.access.secret] {
            assert!(store.introspect(secret).await.unwrap().is_some());
        }
    }
    // The sealed successor holds no secret in plaintext.
    let dump: String = admin
        .query_one(
            "SELECT string_agg(encode(sealed, 'escape') || key_id || encode(nonce, 'hex'), ' ') \
             FROM rotations",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for secret in [&one.access.secret, &one.refresh.secret] {
        let text = secret.expose_secret();
        assert!(
            !dump.contains(&text[4..]),
            "a secret is stored in plaintext"
        );
    }
}

#[tokio::test]
async fn a_sealed_successor_is_replayed_only_while_it_is_current_and_the_grace_window_is_open() {
    let (settings, clock, [a, b]) = two_replicas().await;
    let admin = cluster().admin(&settings.dbname).await;
    let rotate = async |store: &PostgresStore, secret: &SecretString, rotation: Rotation| {
        store.refresh(secret, rotation).await.unwrap()
    };

    // Within the grace window, on the other replica: the same successor.
    let first = a.issue(session("uma@example.com")).await.unwrap();
    let next = rotate(&a, &first.refresh.secret, sealing_rotation(9)).await;
    let RefreshOutcome::Rotated(next) = next else {
        panic!("the first refresh rotates, got {next:?}");
    };
    let again = rotate(&b, &first.refresh.secret, sealing_rotation(9)).await;
    let RefreshOutcome::Replayed { pair, .. } = &again else {
        panic!("a second presentation replays, got {again:?}");
    };
    assert_eq!(pair.refresh.id, next.refresh.id);

    // Once the successor was rotated itself, the predecessor is reuse.
    let after = rotate(&b, &next.refresh.secret, sealing_rotation(9)).await;
    assert!(matches!(after, RefreshOutcome::Rotated(_)), "{after:?}");
    let reuse = rotate(&a, &first.refresh.secret, sealing_rotation(9)).await;
    assert!(
        matches!(&reuse, RefreshOutcome::ReuseDetected { family_id, .. } if *family_id == first.family_id),
        "{reuse:?}"
    );
    assert_eq!(live_refresh_tokens(&admin, &first.family_id).await, 0);

    // Once the successor was revoked: reuse.
    let first = a.issue(session("uma@example.com")).await.unwrap();
    let RefreshOutcome::Rotated(next) =
        rotate(&a, &first.refresh.secret, sealing_rotation(9)).await
    else {
        panic!("the refresh rotates");
    };
    b.revoke_secret(&next.refresh.secret, &ClientCheck::Any)
        .await
        .unwrap();
    let reuse = rotate(&b, &first.refresh.secret, sealing_rotation(9)).await;
    assert!(
        matches!(reuse, RefreshOutcome::ReuseDetected { .. }),
        "{reuse:?}"
    );

    // After the grace window: reuse, and the closed sealed successors are deleted.
    let first = a.issue(session("uma@example.com")).await.unwrap();
    assert!(matches!(
        rotate(&a, &first.refresh.secret, sealing_rotation(9)).await,
        RefreshOutcome::Rotated(_)
    ));
    clock.advance(rotation().grace + Duration::from_secs(1));
    let reuse = rotate(&b, &first.refresh.secret, sealing_rotation(9)).await;
    assert!(
        matches!(reuse, RefreshOutcome::ReuseDetected { .. }),
        "{reuse:?}"
    );
    let second = b.issue(session("uma@example.com")).await.unwrap();
    assert!(matches!(
        rotate(&b, &second.refresh.secret, sealing_rotation(9)).await,
        RefreshOutcome::Rotated(_)
    ));
    let left: i64 = admin
        .query_one("SELECT count(*) FROM rotations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1, "only the open sealed successor is left");

    // A successor sealed under another key is not opened: the presentation supersedes it, as
    // without a key, and seals the new one under its own key.
    let first = a.issue(session("uma@example.com")).await.unwrap();
    let RefreshOutcome::Rotated(old) = rotate(&a, &first.refresh.secret, sealing_rotation(9)).await
    else {
        panic!("the refresh rotates");
    };
    let RefreshOutcome::Rotated(new) = rotate(&b, &first.refresh.secret, sealing_rotation(8)).await
    else {
        panic!("another key supersedes");
    };
    assert_ne!(new.refresh.id, old.refresh.id);
    assert!(a.introspect(&old.refresh.secret).await.unwrap().is_none());
    let again = rotate(&a, &first.refresh.secret, sealing_rotation(8)).await;
    assert!(
        matches!(&again, RefreshOutcome::Replayed { pair, .. } if pair.refresh.id == new.refresh.id),
        "{again:?}"
    );
    assert_eq!(live_refresh_tokens(&admin, &first.family_id).await, 1);

    // Without a replay key: today's grace rule, the successor superseded.
    let first = a.issue(session("uma@example.com")).await.unwrap();
    let RefreshOutcome::Rotated(old) = rotate(&a, &first.refresh.secret, rotation()).await else {
        panic!("the refresh rotates");
    };
    let RefreshOutcome::Rotated(new) = rotate(&b, &first.refresh.secret, rotation()).await else {
        panic!("a retry within grace supersedes");
    };
    assert_ne!(new.refresh.id, old.refresh.id);
    assert_eq!(live_refresh_tokens(&admin, &first.family_id).await, 1);
}

#[tokio::test]
async fn a_retried_sealed_rotation_answers_its_own_pair_and_leaves_one_sealed_successor() {
    // As `a_retried_statement_recognises_its_own_committed_attempt`, with a replay key: the
    // retry of a committed sealed rotation is that rotation, not a replay of it, and the row it
    // sealed serves the next presentation.
    let settings = cluster().create_database().await;
    let store = open_store(&settings).await;
    let first = store.issue(session("cai@example.com")).await.unwrap();
    let key = replay_key(9);
    let (refresh_id, refresh_secret, refresh_digest) = secret::mint(TokenKind::Refresh);
    let (access_id, access_secret, access_digest) = secret::mint(TokenKind::Access);
    let token = |id: &TokenId, secret: &SecretString| MintedToken {
        id: id.clone(),
        secret: secret.clone(),
        expires_at: UnixMicros(0),
    };
    let sealed = key.seal_successor(
        &first.refresh.secret,
        &token(&refresh_id, &refresh_secret),
        &token(&access_id, &access_secret),
    );
    let presented = secret::parse(&first.refresh.secret).unwrap();
    let now = store.db.clock.stamp();
    let nonce = random_hex();
    let grace = micros(Duration::from_secs(10));
    let ttl = micros(Duration::from_secs(600));
    let client: Option<&str> = None;
    let key_id = Some(sealed.key_id.as_str());
    let params: [&(dyn ToSql + Sync); 16] = [
        &presented.id.as_str(),
        &presented.digest.as_slice(),
        &now.0,
        &grace,
        &true,
        &client,
        &ttl,
        &ttl,
        &refresh_id.as_str(),
        &refresh_digest.as_slice(),
        &access_id.as_str(),
        &access_digest.as_slice(),
        &nonce,
        &key_id,
        &Some(sealed.nonce.as_slice()),
        &Some(sealed.ciphertext.as_slice()),
    ];
    let action = |rows: Vec<Row>| -> (String, i64) {
        let row = rows.first().expect("one row");
        (get(row, 0).unwrap(), get(row, 3).unwrap())
    };
    let once = action(store.db.query(sql::REFRESH, &params).await.unwrap());
    let again = action(store.db.query(sql::REFRESH, &params).await.unwrap());
    assert_eq!(once.0, "rotate");
    assert_eq!(again, once, "the retry answers the committed rotation");

    let rotation = Rotation {
        replay: Some(key),
        ..rotation()
    };
    let outcome = store
        .refresh(&first.refresh.secret, rotation)
        .await
        .unwrap();
    let RefreshOutcome::Replayed { pair, .. } = outcome else {
        panic!("the next presentation replays, got {outcome:?}");
    };
    assert_eq!(pair.refresh.id, refresh_id);
    assert_eq!(
        pair.refresh.secret.expose_secret(),
        refresh_secret.expose_secret()
    );
    assert_eq!(pair.refresh.expires_at, UnixMicros(once.1));
    let admin = cluster().admin(&settings.dbname).await;
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM rotations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}
