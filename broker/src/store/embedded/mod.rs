//! The embedded store: one SQLite file in WAL mode, the default backend.
//!
//! Writes go through a single writer thread that drains its queue into one transaction per
//! batch (group commit): one failing operation does not undo its neighbours (the batch runs
//! again with a savepoint per operation), and every reply waits for the batch's COMMIT, so an
//! acknowledged write is durable (across a process kill with `normal` durability, across power
//! loss with `full`). A single writer also makes every operation trivially atomic: two first
//! sign-ins of one email, or fifty refreshes of one token, are simply serialised.
//!
//! Reads (introspection, listing) use a small pool of read-only connections and run inline on
//! the calling task: a primary-key lookup in SQLite takes microseconds, less than a hop to a
//! blocking thread would.
//!
//! Secrets never reach this module's SQL: only their SHA-256 digests are stored and compared
//! (in constant time). Expired tokens are deleted by the writer in small batches, on schedule
//! even while writes keep it busy.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use secrecy::SecretString;
use serde::Deserialize;
use tokio::sync::oneshot;
use tracing::info;

use super::{StoreError, StoreErrorKind, StoreResult, TokenStore, metrics::WriterQueueMetrics};
use crate::{
    model::clock::{Clock, MonotonicClock},
    model::deadline,
    model::secret::{self},
    model::{
        AccountId, ClientCheck, Email, FamilyId, MintedPair, NewSession, PageRequest,
        RefreshOutcome, RevokeTarget, Rotation, SecretRevocation, TokenId, TokenInfo, TokenKind,
        TokenPage, TokenState, UnixMicros,
    },
};

mod schema;
mod sql;
#[cfg(test)]
mod tests;
mod writer;

use schema::migrate;
pub(in crate::store) use sql::TokenRow;
use sql::{
    FreshPair, PairRow, RotationResult, TOKEN_COLUMN_COUNT, TOKEN_COLUMNS, active, insert_pair,
    load_token, revoke_family, revoke_token, rotate, upsert_account,
};
use writer::{Checkpointer, Job, Op, Writer, open_writer};

/// The database file inside the data directory.
const DB_FILE: &str = "tokenbroker.db";
/// Most idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;

/// How hard SQLite works to keep a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous = NORMAL`: a commit survives a process crash; the last commits before a
    /// power loss may be lost.
    #[default]
    Normal,
    /// `synchronous = FULL`: every commit is fsynced before it is acknowledged.
    Full,
}

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedStoreConfig {
    /// The data directory; created if missing.
    pub dir: PathBuf,
    /// Commit durability.
    pub durability: Durability,
    /// How often a cleanup pass (see `Writer::collect_expired`) starts.
    pub cleanup_interval: Duration,
    /// Most writes waiting for the writer; a write past it is refused as unavailable.
    pub max_queued_writes: usize,
}

/// The embedded SQLite store. See the module documentation.
pub struct EmbeddedStore {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::SyncSender<Job>>>,
    queue: Arc<WriterQueueMetrics>,
    readers: Mutex<Vec<Connection>>,
    /// Set by `close`: reads refuse to open new connections to a store that was shut down.
    closed: AtomicBool,
    /// Shared with the writer: reads never see time go back (see [`MonotonicClock`]).
    clock: Arc<MonotonicClock>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (creating and migrating if needed) the store in `config.dir` and starts its writer.
    ///
    /// # Errors
    ///
    /// `Internal` if the directory or database cannot be created, the schema is newer than this
    /// binary knows, or a migration fails.
    pub fn open(config: &EmbeddedStoreConfig, clock: Arc<dyn Clock>) -> StoreResult<Self> {
        fs::create_dir_all(&config.dir).map_err(|err| {
            StoreError::new(
                StoreErrorKind::Internal,
                format!("cannot create data directory {}", config.dir.display()),
                Some(Box::new(err)),
            )
        })?;
        let path = config.dir.join(DB_FILE);
        let conn = open_writer(&path, config.durability)?;
        migrate(&conn)?;
        let clock = Arc::new(MonotonicClock::new(clock, latest_stored_time(&conn)?));
        let (stop_checkpoints, stop) = mpsc::channel();
        let checkpointer = Checkpointer {
            conn: Connection::open(&path).map_err(sql_error)?,
            stop,
        };
        checkpointer
            .conn
            .execute_batch("PRAGMA busy_timeout = 5000;")
            .map_err(sql_error)?;
        thread::Builder::new()
            .name("tokenbroker-sqlite-checkpoint".into())
            .spawn(move || checkpointer.run())
            .map_err(|err| internal("cannot start the checkpoint thread", err))?;
        let (tx, rx) = mpsc::sync_channel(config.max_queued_writes);
        let queue = Arc::new(WriterQueueMetrics::default());
        let writer = Writer {
            conn,
            jobs: rx,
            queue: Arc::clone(&queue),
            clock: Arc::clone(&clock),
            cleanup_interval: config.cleanup_interval,
            cleanup_after: None,
            _stop_checkpoints: stop_checkpoints,
        };
        thread::Builder::new()
            .name("tokenbroker-sqlite-writer".into())
            .spawn(move || writer.run())
            .map_err(|err| internal("cannot start the writer thread", err))?;
        info!(path = %path.display(), durability = ?config.durability, "embedded store open");
        Ok(Self {
            path,
            jobs: Mutex::new(Some(tx)),
            queue,
            readers: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            clock,
        })
    }

    /// Returns the database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The write queue's metrics, for the broker's metrics endpoint.
    pub fn queue_metrics(&self) -> Arc<WriterQueueMetrics> {
        Arc::clone(&self.queue)
    }

    /// Runs `op` in the writer's next batch and waits for the batch's commit.
    ///
    /// The queue is bounded: a write that finds it full is refused at once (`Unavailable`,
    /// which callers may retry) rather than waiting behind a backlog it would only lengthen.
    async fn write<T, F>(&self, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnMut(&Connection, UnixMicros) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job::Write(Box::new(Op {
            op,
            result: None,
            reply,
            deadline: deadline::remaining().map(|left| std::time::Instant::now() + left),
        }));
        let jobs = self
            .jobs
            .lock()
            .expect("the job sender lock is never poisoned")
            .clone()
            .ok_or_else(closed)?;
        self.queue.length.get(()).inc();
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(err) => {
                self.queue.length.get(()).dec();
                return Err(match err {
                    mpsc::TrySendError::Full(_) => {
                        self.queue.refused.get(()).inc();
                        StoreError::new(
                            StoreErrorKind::Unavailable,
                            "the embedded store's write queue is full",
                            None,
                        )
                    }
                    mpsc::TrySendError::Disconnected(_) => closed(),
                });
            }
        }
        answer.await.map_err(|_| closed())?
    }

    /// Whether `parsed` names a token of this store whose secret it is: a secret that does
    /// not is answered as inactive without queueing a write, so forged secrets cost one
    /// indexed read and never reach the writer.
    fn is_ours(&self, parsed: &secret::ParsedSecret) -> StoreResult<bool> {
        self.read(|conn, _| {
            Ok(load_token(conn, &parsed.id)?.is_some_and(|row| row.matches(&parsed.digest)))
        })
    }

    /// Runs `op` on a pooled read-only connection.
    fn read<T>(
        &self,
        op: impl FnOnce(&Connection, UnixMicros) -> rusqlite::Result<T>,
    ) -> StoreResult<T> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let pooled = self
            .readers
            .lock()
            .expect("the reader pool lock is never poisoned")
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.path)?,
        };
        let result = op(&conn, self.clock.now()).map_err(sql_error);
        let mut readers = self
            .readers
            .lock()
            .expect("the reader pool lock is never poisoned");
        if readers.len() < MAX_IDLE_READERS {
            readers.push(conn);
        }
        result
    }
}

#[async_trait]
impl TokenStore for EmbeddedStore {
    async fn issue(&self, session: NewSession) -> StoreResult<MintedPair> {
        let fresh = FreshPair::mint();
        let digests = fresh.digests();
        let ids = fresh.ids();
        let ttls = (session.access_ttl, session.refresh_ttl);
        let session_ttl = session.session_ttl.max(session.refresh_ttl);
        let (account_id, family_id, now) = self
            .write(move |conn, now| {
                let account_id = match &session.known_account {
                    Some(id) => id.clone(),
                    None => upsert_account(conn, &session, now)?,
                };
                let family_id = FamilyId::random();
                let metadata = serde_json::to_string(&session.metadata)
                    .expect("a string map always serialises");
                insert_pair(
                    conn,
                    &PairRow {
                        ids: &ids,
                        digests: &digests,
                        account_id: &account_id,
                        family_id: &family_id,
                        client_id: session.client_id.as_deref(),
                        metadata: &metadata,
                        now,
                        access_ttl: session.access_ttl,
                        refresh_ttl: session.refresh_ttl,
                        session_ends_at: now.plus(session_ttl),
                    },
                )?;
                Ok((account_id, family_id, now))
            })
            .await?;
        Ok(fresh.into_pair(account_id, family_id, now, ttls))
    }

    async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> StoreResult<RefreshOutcome> {
        let Some(parsed) = secret::parse(secret) else {
            return Ok(RefreshOutcome::Inactive);
        };
        if parsed.kind != TokenKind::Refresh || !self.is_ours(&parsed)? {
            return Ok(RefreshOutcome::Inactive);
        }
        let fresh = FreshPair::mint();
        let digests = fresh.digests();
        let ids = fresh.ids();
        let outcome = self
            .write(move |conn, now| {
                rotate(
                    conn,
                    now,
                    &parsed.id,
                    &parsed.digest,
                    &rotation,
                    &ids,
                    &digests,
                )
            })
            .await?;
        Ok(match outcome {
            RotationResult::Rotated {
                account_id,
                family_id,
                now,
                ttls,
            } => RefreshOutcome::Rotated(fresh.into_pair(account_id, family_id, now, ttls)),
            RotationResult::Inactive => RefreshOutcome::Inactive,
            RotationResult::WrongClient => RefreshOutcome::WrongClient,
            RotationResult::Reuse { family_id, revoked } => {
                RefreshOutcome::ReuseDetected { family_id, revoked }
            }
        })
    }

    async fn may_hold(&self, secret: &SecretString) -> StoreResult<bool> {
        match secret::parse(secret) {
            Some(parsed) => self.is_ours(&parsed),
            None => Ok(false),
        }
    }

    async fn introspect(&self, secret: &SecretString) -> StoreResult<Option<TokenInfo>> {
        let Some(parsed) = secret::parse(secret) else {
            return Ok(None);
        };
        self.read(|conn, now| {
            Ok(load_token(conn, &parsed.id)?
                .and_then(|row| row.active_info(parsed.id.clone(), &parsed.digest, now)))
        })
    }

    async fn revoke_secret(
        &self,
        secret: &SecretString,
        client: &ClientCheck,
    ) -> StoreResult<SecretRevocation> {
        let Some(parsed) = secret::parse(secret) else {
            return Ok(SecretRevocation::NotActive);
        };
        if !self.is_ours(&parsed)? {
            return Ok(SecretRevocation::NotActive);
        }
        let client = client.clone();
        self.write(move |conn, now| {
            let Some(row) = load_token(conn, &parsed.id)? else {
                return Ok(SecretRevocation::NotActive);
            };
            if !row.matches(&parsed.digest) || row.state(now) != TokenState::Active {
                return Ok(SecretRevocation::NotActive);
            }
            if !client.allows(row.client_id.as_deref()) {
                return Ok(SecretRevocation::WrongClient);
            }
            Ok(SecretRevocation::Revoked(revoke_token(
                conn, now, &parsed.id, &row,
            )?))
        })
        .await
    }

    async fn revoke(&self, target: RevokeTarget) -> StoreResult<u64> {
        self.write(move |conn, now| match &target {
            RevokeTarget::Token(id) => match load_token(conn, id)? {
                Some(row) => revoke_token(conn, now, id, &row),
                None => Ok(0),
            },
            RevokeTarget::Family(family) => revoke_family(conn, now, family),
            RevokeTarget::Account(account) => {
                let active: i64 = conn
                    .prepare_cached(&format!(
                        "SELECT COUNT(*) FROM tokens t JOIN accounts a ON a.id = t.account_id \
                         WHERE t.account_id = ?1 AND {}",
                        active("?2")
                    ))?
                    .query_row(params![account.as_str(), now.0], |r| r.get(0))?;
                // max(): the watermark never moves back, whatever the clock did.
                conn.prepare_cached(
                    "UPDATE accounts SET not_before = max(not_before, ?2) WHERE id = ?1",
                )?
                .execute(params![account.as_str(), now.0])?;
                Ok(u64::try_from(active).unwrap_or(0))
            }
        })
        .await
    }

    async fn account_by_email(&self, email: &Email) -> StoreResult<Option<AccountId>> {
        self.read(|conn, _| {
            conn.prepare_cached("SELECT id FROM accounts WHERE email = ?1")?
                .query_row([email.as_str()], |r| r.get(0))
                .optional()
                .map(|id| id.map(AccountId::from_stored))
        })
    }

    async fn list_tokens(&self, account: &AccountId, page: PageRequest) -> StoreResult<TokenPage> {
        self.read(|conn, now| {
            // Newest first; the cursor is the last (issued_at, id) of the previous page.
            let (after_at, after_id) = match &page.after {
                Some(cursor) => (cursor.issued_at.0, cursor.id.as_str().to_owned()),
                None => (i64::MAX, String::new()),
            };
            // One statement for both listings: `?5` (include_inactive) switches the filter
            // off. Leaving the filter out of the SQL instead would leave `now` with no
            // placeholder, and rusqlite refuses to bind more parameters than a statement has.
            let sql = format!(
                "SELECT {TOKEN_COLUMNS}, t.id FROM tokens t JOIN accounts a ON a.id = t.account_id \
                 WHERE t.account_id = ?1 AND (t.issued_at, t.id) < (?2, ?3) AND (?5 OR {}) \
                 ORDER BY t.issued_at DESC, t.id DESC LIMIT ?4",
                active("?6")
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let limit = i64::from(page.size) + 1;
            let tokens = stmt
                .query_map(
                    params![
                        account.as_str(),
                        after_at,
                        after_id,
                        limit,
                        page.include_inactive,
                        now.0
                    ],
                    |r| {
                        let row = TokenRow::from_row(r)?;
                        let id = TokenId::from_stored(r.get(TOKEN_COLUMN_COUNT)?);
                        Ok(row.into_record(id, now))
                    },
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(TokenPage::from_overfetch(tokens, page.size))
        })
    }

    async fn close(&self) -> StoreResult<()> {
        let (reply, answer) = oneshot::channel();
        let jobs = self
            .jobs
            .lock()
            .expect("the job sender lock is never poisoned")
            .clone()
            .ok_or_else(closed)?;
        self.queue.length.get(()).inc();
        // A close waits for room in a full queue: it must reach the writer.
        let sent = tokio::task::spawn_blocking(move || jobs.send(Job::Close(reply)))
            .await
            .map_err(|err| internal("the close was not sent", err))?;
        if sent.is_err() {
            self.queue.length.get(()).dec();
            return Err(closed());
        }
        let result = answer.await.map_err(|_| closed())?;
        self.closed.store(true, Ordering::Release);
        self.jobs
            .lock()
            .expect("the job sender lock is never poisoned")
            .take();
        self.readers
            .lock()
            .expect("the reader pool lock is never poisoned")
            .clear();
        result
    }
}

/// The latest time the database holds: the floor of the store's clock, so that no stamp after a
/// restart comes before one already written, even if the wall clock went back meanwhile. One
/// scan of the tokens at open: no index covers these columns.
fn latest_stored_time(conn: &Connection) -> StoreResult<UnixMicros> {
    conn.query_row(
        "SELECT max(\
           (SELECT coalesce(max(max(issued_at, coalesce(revoked_at, 0), coalesce(rotated_at, 0))), 0) \
            FROM tokens), \
           (SELECT coalesce(max(not_before), 0) FROM accounts))",
        [],
        |r| r.get(0),
    )
    .map(UnixMicros)
    .map_err(sql_error)
}

fn open_reader(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_error)?;
    // Memory-mapped reads avoid a pread per page; the mapping is virtual address space, not
    // memory, and the OS page cache backs it.
    conn.execute_batch(
        "PRAGMA busy_timeout = 5000; PRAGMA mmap_size = 4294967296; PRAGMA cache_size = -8192;",
    )
    .map_err(sql_error)?;
    Ok(conn)
}

pub(super) fn classify(err: &rusqlite::Error) -> StoreErrorKind {
    use rusqlite::ErrorCode;
    match err.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen,
        ) => StoreErrorKind::Unavailable,
        _ => StoreErrorKind::Internal,
    }
}

pub(super) fn sql_error(err: rusqlite::Error) -> StoreError {
    StoreError::new(classify(&err), "sqlite error", Some(Box::new(err)))
}

pub(super) fn internal(
    message: &str,
    err: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::new(StoreErrorKind::Internal, message, Some(Box::new(err)))
}

pub(super) fn closed() -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, "the store is closed", None)
}
