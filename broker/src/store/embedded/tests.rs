//! The embedded store's own tests: the conformance suite on a real file, and what only a
//! SQLite file has (durability across reopen, migrations, cleanup passes, query plans).

use std::time::Duration;

use tempfile::TempDir;

use super::{schema::MIGRATIONS, sql::SUPERSEDE, writer::CLEANUP_WINDOW, *};
use crate::{
    model::clock::ManualClock,
    model::{ClientCheck, Metadata, NewSession},
    store::testsuite::{StoreHarness, store_test_suite},
};

/// Long enough that background cleanup never runs during a conformance case.
const NO_CLEANUP: Duration = Duration::from_secs(3600);

fn config(dir: &Path, cleanup_interval: Duration) -> EmbeddedStoreConfig {
    EmbeddedStoreConfig {
        dir: dir.to_owned(),
        durability: Durability::Normal,
        cleanup_interval,
        max_queued_writes: 4096,
    }
}

fn session(email: &str, access_ttl: Duration, refresh_ttl: Duration) -> NewSession {
    NewSession {
        email: Email::parse(email).expect("test emails are valid"),
        known_account: None,
        cognito_sub: None,
        client_id: Some("app-1".to_owned()),
        access_ttl,
        refresh_ttl,
        session_ttl: refresh_ttl,
        metadata: Metadata::new(),
    }
}

/// Opens every store in a temporary directory of its own, deleted when the harness drops.
#[derive(Default)]
struct TempDirHarness {
    dirs: Mutex<Vec<TempDir>>,
}

#[async_trait]
impl StoreHarness for TempDirHarness {
    async fn open(&self, clock: Arc<ManualClock>) -> Arc<dyn TokenStore> {
        let dir = TempDir::new().expect("a temporary directory can be created");
        let store = EmbeddedStore::open(&config(dir.path(), NO_CLEANUP), clock)
            .expect("a store opens in an empty directory");
        self.dirs
            .lock()
            .expect("the directory list lock is never poisoned")
            .push(dir);
        Arc::new(store)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_conformance_suite() {
    store_test_suite(&TempDirHarness::default()).await;
}

/// Holds the writer thread inside a write until released, so that writes queued meanwhile wait.
struct HeldWriter {
    release: std::sync::mpsc::Sender<()>,
    gate: tokio::task::JoinHandle<StoreResult<()>>,
}

impl HeldWriter {
    async fn hold(store: &Arc<EmbeddedStore>) -> Self {
        let (held, writer_held) = oneshot::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let mut hold = Some((held, released));
        let gate = tokio::spawn({
            let store = Arc::clone(store);
            async move {
                store
                    .write(move |conn, _| {
                        conn.execute_batch("CREATE TABLE IF NOT EXISTS probe (k INTEGER)")?;
                        if let Some((held, released)) = hold.take() {
                            let _ = held.send(());
                            let _ = released.recv();
                        }
                        Ok(())
                    })
                    .await
            }
        });
        writer_held.await.expect("the gate write runs");
        Self { release, gate }
    }

    async fn release(self) {
        self.release.send(()).expect("the gate write waits");
        self.gate.await.unwrap().expect("the gate write succeeds");
    }
}

/// Polls a future once: a write is queued by the first poll of its future.
async fn poll_once<F: Future + Unpin>(future: &mut F) {
    std::future::poll_fn(|cx| {
        let _ = std::pin::Pin::new(&mut *future).poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
}

fn probe_write(
    store: &Arc<EmbeddedStore>,
    k: i64,
) -> std::pin::Pin<Box<dyn Future<Output = StoreResult<i64>> + Send>> {
    let store = Arc::clone(store);
    Box::pin(async move {
        store
            .write(move |conn, _| {
                conn.execute("INSERT INTO probe (k) VALUES (?1)", [k])?;
                Ok(k)
            })
            .await
    })
}

fn probes(store: &EmbeddedStore) -> Vec<i64> {
    store
        .read(|conn, _| {
            conn.prepare("SELECT k FROM probe ORDER BY k")?
                .query_map([], |r| r.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .expect("the probe table reads")
}

fn open_with(dir: &Path, clock: Arc<ManualClock>, max_queued_writes: usize) -> Arc<EmbeddedStore> {
    let config = EmbeddedStoreConfig {
        max_queued_writes,
        ..config(dir, NO_CLEANUP)
    };
    Arc::new(EmbeddedStore::open(&config, clock).expect("the store opens"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_refuses_at_once_and_the_queued_writes_still_commit() {
    let dir = TempDir::new().expect("a temporary directory can be created");
    let store = open_with(dir.path(), Arc::new(ManualClock::new()), 3);
    let held = HeldWriter::hold(&store).await;
    let mut queued: Vec<_> = (0..3).map(|k| probe_write(&store, k)).collect();
    for write in &mut queued {
        poll_once(write).await;
    }
    assert_eq!(store.queue.length.get(()).get(), 3);
    let refused = probe_write(&store, 99)
        .await
        .expect_err("the queue is full");
    assert_eq!(refused.kind(), StoreErrorKind::Unavailable);
    assert_eq!(store.queue.refused.get(()).get(), 1);
    // Forged secrets are answered from a read, not queued: they get their answer while the
    // queue is full.
    let forged = SecretString::from(format!("tbr_{}_{}", "0".repeat(32), "x".repeat(43)));
    let answer = store
        .refresh(
            &forged,
            Rotation {
                client: ClientCheck::Any,
                access_ttl: Duration::from_secs(60),
                refresh_ttl: Duration::from_secs(600),
                grace: Duration::from_secs(10),
                session_ttl: Duration::from_secs(3600),
                replay: None,
            },
        )
        .await
        .expect("a forged secret is no error");
    assert!(matches!(answer, RefreshOutcome::Inactive));
    assert!(matches!(
        store
            .revoke_secret(&forged, &ClientCheck::Any)
            .await
            .expect("no error"),
        SecretRevocation::NotActive
    ));
    held.release().await;
    for (k, write) in (0..3).zip(queued) {
        assert_eq!(write.await.expect("a queued write commits"), k);
    }
    assert_eq!(probes(&store), vec![0, 1, 2]);
    assert_eq!(store.queue.length.get(()).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_callers_gave_up_are_dropped_unrun() {
    let dir = TempDir::new().expect("a temporary directory can be created");
    let store = open_with(dir.path(), Arc::new(ManualClock::new()), 16);
    let held = HeldWriter::hold(&store).await;
    // One caller goes away; another's deadline passes while its write waits.
    let mut gone = probe_write(&store, 1);
    poll_once(&mut gone).await;
    drop(gone);
    let late = tokio::spawn(deadline::scope(
        tokio::time::Instant::now() + Duration::from_millis(50),
        probe_write(&store, 2),
    ));
    let mut kept = probe_write(&store, 3);
    poll_once(&mut kept).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    held.release().await;
    assert_eq!(kept.await.expect("a live caller's write commits"), 3);
    let late = late
        .await
        .unwrap()
        .expect_err("a write past its deadline is not run");
    assert_eq!(late.kind(), StoreErrorKind::Timeout);
    assert_eq!(probes(&store), vec![3], "neither abandoned write ran");
    assert_eq!(store.queue.abandoned.get(()).get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_back_across_a_restart_revives_nothing_and_stamps_after_the_watermark() {
    let dir = TempDir::new().expect("a temporary directory can be created");
    let clock = Arc::new(ManualClock::new());
    let store = open_with(dir.path(), Arc::clone(&clock), 16);
    let short = store
        .issue(session(
            "clock@example.com",
            Duration::from_secs(60),
            Duration::from_secs(600),
        ))
        .await
        .expect("issue");
    clock.advance(Duration::from_secs(120));
    assert!(
        store
            .introspect(&short.access.secret)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
    let revoked = store
        .issue(session(
            "clock@example.com",
            Duration::from_secs(3600),
            Duration::from_secs(7200),
        ))
        .await
        .expect("issue");
    store
        .revoke(RevokeTarget::Account(revoked.account_id.clone()))
        .await
        .expect("revoke all");
    store.close().await.expect("close");
    drop(store);

    clock.rewind(Duration::from_secs(3600));
    let store = open_with(dir.path(), Arc::clone(&clock), 16);
    assert!(
        store
            .introspect(&short.access.secret)
            .await
            .unwrap()
            .is_none(),
        "an expired token stays expired when the clock goes back"
    );
    assert!(
        store
            .introspect(&revoked.access.secret)
            .await
            .unwrap()
            .is_none()
    );
    // A revoke-all under the stepped-back clock must not move the watermark back...
    store
        .revoke(RevokeTarget::Account(revoked.account_id.clone()))
        .await
        .expect("revoke all again");
    assert!(
        store
            .introspect(&revoked.refresh.secret)
            .await
            .unwrap()
            .is_none()
    );
    // ...and a new sign-in is stamped after it, so it is active.
    let fresh = store
        .issue(session(
            "clock@example.com",
            Duration::from_secs(60),
            Duration::from_secs(600),
        ))
        .await
        .expect("issue after the step back");
    assert!(
        store
            .introspect(&fresh.access.secret)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_fails_alone_and_undoes_only_its_own_changes() {
    let dir = TempDir::new().expect("a temporary directory can be created");
    let store = Arc::new(
        EmbeddedStore::open(
            &config(dir.path(), NO_CLEANUP),
            Arc::new(ManualClock::new()),
        )
        .expect("the store opens"),
    );
    // The first write holds the writer until every other write is queued, so they commit as
    // one batch with the failing ones among them.
    let held = HeldWriter::hold(&store).await;
    let mut writes: Vec<_> = (0..20_i64)
        .map(|k| {
            let store = Arc::clone(&store);
            Box::pin(async move {
                store
                    .write(move |conn, _| {
                        conn.execute("INSERT INTO probe (k) VALUES (?1)", [k])?;
                        if k % 5 == 3 {
                            // Fails after a change of its own, which must not survive.
                            conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                        }
                        Ok(k)
                    })
                    .await
            })
        })
        .collect();
    for write in &mut writes {
        poll_once(write).await;
    }
    held.release().await;
    let mut expected = Vec::new();
    for (k, write) in (0..20_i64).zip(writes) {
        let result = write.await;
        if k % 5 == 3 {
            assert!(result.is_err(), "write {k} must fail");
        } else {
            assert_eq!(result.expect("the other writes succeed"), k);
            expected.push(k);
        }
    }
    assert_eq!(probes(&store), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_close_and_reopen() {
    let dir = TempDir::new().expect("a temporary directory can be created");
    let clock = Arc::new(ManualClock::new());
    let config = config(dir.path(), NO_CLEANUP);
    let store = EmbeddedStore::open(&config, Arc::clone(&clock) as Arc<dyn Clock>)
        .expect("the store opens");
    let hour = Duration::from_secs(3600);
    let pair = store
        .issue(session("alice@example.com", hour, hour))
        .await
        .expect("issue succeeds");
    store.close().await.expect("close succeeds");
    drop(store);

    let reopened =
        EmbeddedStore::open(&config, clock).expect("the store reopens in the same directory");
    let info = reopened
        .introspect(&pair.access.secret)
        .await
        .expect("introspect succeeds")
        .expect("a token issued before the restart is still active");
    assert_eq!(info.id, pair.access.id);
    assert_eq!(info.account_id, pair.account_id);
    assert_eq!(info.family_id, pair.family_id);
    assert_eq!(info.expires_at, pair.access.expires_at);
    assert_eq!(
        reopened
            .account_by_email(&Email::parse("alice@example.com").expect("valid"))
            .await
            .expect("account_by_email succeeds"),
        Some(pair.account_id.clone())
    );
    let rotation = Rotation {
        client: ClientCheck::Any,
        access_ttl: hour,
        refresh_ttl: hour,
        grace: Duration::ZERO,
        session_ttl: hour * 24,
        replay: None,
    };
    let outcome = reopened
        .refresh(&pair.refresh.secret, rotation)
        .await
        .expect("refresh succeeds");
    assert!(
        matches!(outcome, RefreshOutcome::Rotated(ref next) if next.family_id == pair.family_id),
        "a refresh token issued before the restart still rotates, got {outcome:?}"
    );
    reopened.close().await.expect("close succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_deleted_in_the_background() {
    let dir = TempDir::new().expect("a temporary directory can be created");
    let clock = Arc::new(ManualClock::new());
    let store = cleaning_store(dir.path(), &clock);
    let short = store
        .issue(session(
            "bob@example.com",
            Duration::from_secs(60),
            Duration::from_secs(120),
        ))
        .await
        .expect("issue succeeds");
    let long = store
        .issue(session(
            "bob@example.com",
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        ))
        .await
        .expect("issue succeeds");
    let account = short.account_id.clone();
    assert_eq!(listed(&store, &account).await.len(), 4);

    clock.advance(Duration::from_secs(61));
    eventually("the expired access token is deleted", || async {
        !listed(&store, &account).await.contains(&short.access.id)
    })
    .await;
    let ids = listed(&store, &account).await;
    assert!(
        ids.contains(&short.refresh.id),
        "an unexpired token is kept"
    );
    assert!(ids.contains(&long.access.id) && ids.contains(&long.refresh.id));

    clock.advance(Duration::from_secs(60));
    eventually("the expired refresh token is deleted", || async {
        !listed(&store, &account).await.contains(&short.refresh.id)
    })
    .await;
    let ids = listed(&store, &account).await;
    assert_eq!(
        ids.len(),
        2,
        "only the long-lived pair remains, got {ids:?}"
    );
    store.close().await.expect("close succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_runs_while_writes_keep_the_writer_busy() {
    const WRITES: usize = 2000;
    let dir = TempDir::new().expect("a temporary directory can be created");
    let clock = Arc::new(ManualClock::new());
    let store = Arc::new(cleaning_store(dir.path(), &clock));
    let short = store
        .issue(session(
            "carol@example.com",
            Duration::from_secs(60),
            Duration::from_secs(3600),
        ))
        .await
        .expect("issue succeeds");
    let account = short.account_id.clone();
    clock.advance(Duration::from_secs(61));

    // About two seconds of writes queued at once: the writer's queue is never empty
    // until they have all run. Each counts itself on the writer thread as it runs.
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writes: Vec<_> = (0..WRITES)
        .map(|_| {
            let (store, ran) = (Arc::clone(&store), Arc::clone(&ran));
            tokio::spawn(async move {
                store
                    .write(move |_, _| {
                        thread::sleep(Duration::from_millis(1));
                        ran.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
                    .expect("the write succeeds");
            })
        })
        .collect();
    eventually("the expired access token is deleted", || async {
        !listed(&store, &account).await.contains(&short.access.id)
    })
    .await;
    let ran = ran.load(Ordering::SeqCst);
    assert!(
        ran < WRITES,
        "cleanup waited until the queue was empty ({ran} of {WRITES} writes had run)"
    );
    for write in writes {
        write.await.expect("the write task ends");
    }
    store.close().await.expect("close succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_pass_covers_every_window_of_the_table() {
    // More than one cleanup window of tokens, so a pass takes several steps; the expired
    // half (the access tokens) is spread over every window.
    const PAIRS: usize = CLEANUP_WINDOW as usize * 3 / 2;
    let dir = TempDir::new().expect("a temporary directory can be created");
    let clock = Arc::new(ManualClock::new());
    let store = Arc::new(cleaning_store(dir.path(), &clock));
    let issues: Vec<_> = (0..PAIRS)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .issue(session(
                        &format!("user{}@example.com", i % 10),
                        Duration::from_secs(60),
                        Duration::from_secs(3600),
                    ))
                    .await
                    .expect("issue succeeds")
            })
        })
        .collect();
    for issue in issues {
        issue.await.expect("the issue task ends");
    }
    let count = |kind: &'static str| {
        store
            .read(move |conn, _| {
                conn.query_row("SELECT COUNT(*) FROM tokens WHERE kind = ?1", [kind], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .expect("the count reads")
    };
    assert_eq!(count("access"), PAIRS as i64);

    clock.advance(Duration::from_secs(61));
    // A step waits at least 99 times its own duration before the next (a few seconds in
    // all on a slow machine): allow 30 s.
    let mut left = count("access");
    for _ in 0..1200 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        left = count("access");
    }
    assert_eq!(left, 0, "expired access tokens left after the passes");
    assert_eq!(count("refresh"), PAIRS as i64, "unexpired tokens are kept");
    store.close().await.expect("close succeeds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_migrates_with_its_tokens() {
    let dir = TempDir::new().expect("a temporary directory can be created");
    let (id, secret, digest) = secret::mint(TokenKind::Access);
    let conn = Connection::open(dir.path().join(DB_FILE)).expect("the file opens");
    conn.execute_batch(&format!(
        "{} PRAGMA user_version = 1; \
         INSERT INTO accounts (id, email, created_at) VALUES ('acc_1', 'dave@example.com', 1); \
         INSERT INTO tokens (id, kind, account_id, family_id, secret_sha256, issued_at, expires_at) \
         VALUES ('{}', 'access', 'acc_1', 'fam_1', x'{}', 1, 9223372036854775807);",
        MIGRATIONS[0],
        id.as_str(),
        hex::encode(digest)
    ))
    .expect("the version 1 schema and a token are written");
    drop(conn);

    let store = EmbeddedStore::open(
        &config(dir.path(), NO_CLEANUP),
        Arc::new(ManualClock::new()),
    )
    .expect("the store opens and migrates");
    let (version, expiry_index) = store
        .read(|conn, _| {
            Ok((
                conn.query_row("PRAGMA user_version", [], |r| r.get::<_, usize>(0))?,
                conn.query_row(
                    "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'tokens_by_expiry'",
                    [],
                    |r| r.get::<_, i64>(0),
                )?,
            ))
        })
        .expect("the schema reads");
    assert_eq!((version, expiry_index), (MIGRATIONS.len(), 0));
    let info = store
        .introspect(&secret)
        .await
        .expect("introspect succeeds")
        .expect("the token stored before the migration is active");
    assert_eq!(info.id, id);
    store.close().await.expect("close succeeds");
    drop(store);

    let conn = Connection::open(dir.path().join(DB_FILE)).expect("the file opens");
    conn.execute_batch(&format!("PRAGMA user_version = {}", MIGRATIONS.len() + 1))
        .expect("the version is set");
    drop(conn);
    let err = EmbeddedStore::open(
        &config(dir.path(), NO_CLEANUP),
        Arc::new(ManualClock::new()),
    )
    .expect_err("a newer schema is refused");
    assert!(
        err.to_string().contains("newer than this binary knows"),
        "{err}"
    );
}

#[test]
fn superseding_a_successor_searches_the_family_index() {
    let conn = Connection::open_in_memory().expect("an in-memory database opens");
    migrate(&conn).expect("the schema migrates");
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {SUPERSEDE}"))
        .expect("the statement prepares")
        .query_map(params!["tok_a", 1, "fam_a"], |r| r.get(3))
        .expect("the plan runs")
        .collect::<rusqlite::Result<_>>()
        .expect("the plan reads");
    assert!(
        plan.iter().all(|step| step.contains("tokens_by_family")),
        "{plan:?}"
    );
}

/// Opens a store in `dir` whose cleanup passes start every 50 ms.
fn cleaning_store(dir: &Path, clock: &Arc<ManualClock>) -> EmbeddedStore {
    EmbeddedStore::open(
        &config(dir, Duration::from_millis(50)),
        Arc::clone(clock) as Arc<dyn Clock>,
    )
    .expect("the store opens")
}

/// Returns the ids of every token of `account` still stored, whatever its state.
async fn listed(store: &EmbeddedStore, account: &AccountId) -> Vec<TokenId> {
    let page = PageRequest {
        size: 100,
        after: None,
        include_inactive: true,
    };
    store
        .list_tokens(account, page)
        .await
        .expect("list_tokens succeeds")
        .tokens
        .into_iter()
        .map(|t| t.id)
        .collect()
}

/// Polls `condition` until it holds, failing after a few seconds.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    const ATTEMPTS: u32 = 200;
    const PAUSE: Duration = Duration::from_millis(25);
    for _ in 0..ATTEMPTS {
        if condition().await {
            return;
        }
        tokio::time::sleep(PAUSE).await;
    }
    panic!("{what}: not true after {:?}", PAUSE * ATTEMPTS);
}
