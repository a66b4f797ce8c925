//! The PostgreSQL store: the shared store for several broker replicas, on a database that
//! operators already run.
//!
//! tokio-postgres with a deadpool pool. Every operation is one prepared statement (`sql.rs`):
//! issue, refresh, introspect, revoke by secret and revoke by email cost one round trip each,
//! with the statement's timeout set in the same flush (see `Database::attempt`); concurrent
//! Introspect calls share their statements (`lookup.rs`). Prepared
//! statements come from the pool's per-connection cache, so a connection parses each statement
//! once.
//!
//! Isolation: every connection runs at `SERIALIZABLE` (the startup `options` parameter, so it
//! costs no statement). The statements are written as if each ran alone, which only
//! serializable execution guarantees: a rotation reads the presented token and its successor
//! and writes both, and under READ COMMITTED a concurrent rotation's commit could be seen by
//! one of those reads and not the other. Serializable is also what CockroachDB runs, so one
//! retry path serves both engines. Its price is serialization failures (SQLSTATE 40001) under
//! contention, which `Database::query` retries within the caller's deadline.
//!
//! Retries are safe against commit ambiguity (a connection lost after the statement was sent,
//! when nobody knows whether it committed): every attempt of one call sends the same token ids,
//! times and attempt nonce, and the statements recognise their own committed attempt (see
//! `sql.rs`). The same idea as the Fauna store's attempt ids.
//!
//! Secrets never reach the database in plaintext: only their SHA-256 digests (`model::secret`),
//! as in the embedded store, and, with a replay key, the pairs sealed for idempotent replay
//! (`replays`) and the successors sealed for rotation across brokers (`rotations`, see
//! `sql::REFRESH`), AES-256-GCM ciphertext that only the key opens. Introspection compares the
//! digest in constant time in the broker; refresh and revocation compare it in SQL, where the
//! timing would reveal at most a prefix of the stored digest, which gives no way to a secret
//! that hashes to it.
//!
//! `may_hold` keeps the trait's default (yes): answering it would cost refresh and revocation
//! a second round trip. A forged secret therefore reaches the statement, which changes nothing
//! and answers "inactive", and the broker writes its audit line as for any presented secret
//! (anonymous calls are rate-limited per client network).
//!
//! Time comes from the broker's clock (a [`MonotonicClock`] per process), not the database's:
//! the same times the embedded store uses, and the tests move them by hand. Replicas whose
//! clocks disagree by a few milliseconds disagree by as much on expiry, as any JWT verifier
//! does.

mod lookup;
mod sql;
#[cfg(any(test, feature = "testsuite"))]
pub mod testing;
#[cfg(test)]
mod tests;
mod tls;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, StatementCache,
};
use rand::Rng as _;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::time::Instant;
use tokio_postgres::{NoTls, Row, types::ToSql};
use tracing::{debug, info, warn};

use super::{
    StoreError, StoreErrorKind, StoreResult, TokenStore,
    embedded::TokenRow,
    settings::{PostgresSettings, SslMode},
};
use crate::model::{
    AccountId, ClientCheck, Email, FamilyId, MintedPair, MintedToken, NewSession, PageRequest,
    RefreshOutcome, ReplayClaim, RevokeTarget, Rotation, SecretRevocation, TokenId, TokenInfo,
    TokenKind, TokenPage, UnixMicros,
    clock::{Clock, MonotonicClock},
    deadline, random_hex,
    replay::{OpenError, SealedPair, StoredSuccessor},
    secret,
};

/// The SQL of the statement behind IssueTokens (`issue`, a sign-in without an idempotency key),
/// exactly as the store prepares it. `tokenbroker-load pgbench-script` runs it under pgbench,
/// as the database's own ceiling in `scripts/bench`.
pub const ISSUE_SQL: &str = sql::ISSUE;

/// The SQL of the statement behind Introspect (`introspect`), exactly as the store prepares it
/// (`$1` the token ids of one or more concurrent calls);
/// see [`ISSUE_SQL`].
pub const INTROSPECT_SQL: &str = sql::LOAD_TOKENS;

/// The PostgreSQL store. See the module documentation.
pub struct PostgresStore {
    db: Arc<Database>,
    lookups: Arc<lookup::Lookups>,
}

/// The pool and what the statements share; behind an `Arc`, so that the tasks of shared
/// lookups (`lookup.rs`) can run statements.
struct Database {
    pool: Pool,
    clock: MonotonicClock,
    /// The budget of an operation whose caller set no deadline.
    default_timeout: Duration,
    /// `host:port/dbname`, for logs.
    target: String,
    closed: AtomicBool,
    /// Attempts that failed in a retryable way and were retried, since the store opened.
    retries: AtomicU64,
    /// When replays whose window closed were last deleted (µs), so that one sweep runs per
    /// window.
    swept_at: AtomicI64,
    /// When sealed successors whose grace window closed were last deleted (µs), likewise.
    rotations_swept_at: AtomicI64,
    /// The `statement_timeout` (ms) each pooled connection was last given, keyed by the address
    /// of its statement cache, which lives exactly as long as the connection (the `Weak` tells
    /// a live entry from one whose connection is gone). See `Database::attempt`.
    timeouts: Mutex<HashMap<usize, (Weak<StatementCache>, u128)>>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.db.target)
            .finish_non_exhaustive()
    }
}

/// How much earlier than the caller's deadline the server gives up on a statement, so that its
/// cancellation (a Timeout the caller can tell from a lost server) arrives before the deadline;
/// at most half the time left, so a call near its deadline still gets a chance to run.
const SERVER_MARGIN: Duration = Duration::from_millis(20);

/// Why one attempt failed.
enum Failure {
    /// No connection from the pool.
    Pool(PoolError),
    /// The statement or its connection failed.
    Db(tokio_postgres::Error),
    /// The database's schema is this version, newer than the broker knows.
    Newer(usize),
    /// The connection runs at this isolation level instead of serializable.
    Isolation(String),
}

impl PostgresStore {
    /// Connects (checking that the database answers), migrates the schema and returns the store.
    ///
    /// # Errors
    ///
    /// `Internal` for unusable settings, a failed migration or a schema newer than this broker
    /// knows; `Unavailable` when the database cannot be reached within the statement timeout.
    pub async fn connect(settings: &PostgresSettings, clock: Arc<dyn Clock>) -> StoreResult<Self> {
        let config_error =
            |err: crate::model::ConfigError| StoreError::new(StoreErrorKind::Internal, err.0, None);
        let password = settings.validate().map_err(config_error)?;
        let mut config = tokio_postgres::Config::new();
        config
            .host(&settings.host)
            .port(settings.port)
            .dbname(&settings.dbname)
            .user(&settings.user)
            .application_name("tokenbroker")
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .keepalives(true)
            .options("-c default_transaction_isolation=serializable");
        if let Some(password) = &password {
            config.password(password.expose_secret());
        }
        let manager_config = ManagerConfig {
            // No query on checkout: a connection that broke is noticed by its next statement,
            // which is retried on a fresh one.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match settings.sslmode {
            SslMode::Disable => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                Manager::from_config(config, NoTls, manager_config)
            }
            SslMode::Require | SslMode::VerifyFull => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let tls = match &settings.ca_file {
                    Some(ca_file) => tls::MakeRustls::verify_full(ca_file),
                    None => tls::MakeRustls::require(),
                }
                .map_err(config_error)?;
                Manager::from_config(config, tls, manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|err| internal("cannot build the postgres pool", err))?;
        let db = Database {
            pool,
            clock: MonotonicClock::new(clock, UnixMicros(0)),
            default_timeout: settings.statement_timeout(),
            target: format!("{}:{}/{}", settings.host, settings.port, settings.dbname),
            closed: AtomicBool::new(false),
            retries: AtomicU64::new(0),
            swept_at: AtomicI64::new(0),
            rotations_swept_at: AtomicI64::new(0),
            timeouts: Mutex::new(HashMap::new()),
        };
        db.migrate().await?;
        let store = Self {
            db: Arc::new(db),
            lookups: Arc::new(lookup::Lookups::new(settings.introspect_batch)),
        };
        info!(target = %store.db.target, sslmode = ?settings.sslmode, "postgres store open");
        Ok(store)
    }

    /// Returns how many attempts were retried (serialization failures, lost connections)
    /// since the store opened.
    pub fn retries(&self) -> u64 {
        self.db.retries.load(Ordering::Relaxed)
    }

    /// Returns how many Introspect statements were sent and how many token ids they carried,
    /// since the store opened (`lookup.rs`).
    pub fn lookups(&self) -> (u64, u64) {
        self.lookups.counts()
    }
}

impl Database {
    /// Applies the migrations this database has not seen, in one transaction, and records
    /// them in `tokenbroker_schema`. Brokers that start together race on that table: the loser
    /// fails to serialize, to insert the same version, or to create the same table or its row
    /// type (PostgreSQL's `IF NOT EXISTS` is not atomic), and tries again, finding the schema
    /// current. No advisory lock, which CockroachDB lacks.
    async fn migrate(&self) -> StoreResult<()> {
        const ATTEMPTS: u32 = 5;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.migrate_once().await {
                Ok(()) => return Ok(()),
                Err(Failure::Db(err))
                    if attempt < ATTEMPTS
                        && err.code().is_some_and(|code| {
                            matches!(code.code(), "40001" | "40P01" | "23505" | "42P07" | "42710")
                        }) =>
                {
                    debug!(attempt, error = %err, "schema migration raced another broker");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(failure @ Failure::Pool(_)) => {
                    return Err(failure.into_error("cannot connect to postgres"));
                }
                Err(failure) => {
                    return Err(failure.into_error("the postgres schema migration failed"));
                }
            }
        }
    }

    async fn migrate_once(&self) -> Result<(), Failure> {
        let mut client = self.pool.get().await.map_err(Failure::Pool)?;
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} \
                 (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
                sql::SCHEMA_TABLE
            ))
            .await
            .map_err(Failure::Db)?;
        // A pooler in front of the server may drop the startup options that ask for
        // serializable; the statements are not safe without it, so the broker refuses to start.
        let isolation: String = client
            .query_one("SHOW transaction_isolation", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(Failure::Db)?;
        if isolation != "serializable" {
            return Err(Failure::Isolation(isolation));
        }
        let tx = client.transaction().await.map_err(Failure::Db)?;
        let version: Option<i32> = tx
            .query_one(
                &format!("SELECT max(version) FROM {}", sql::SCHEMA_TABLE),
                &[],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(Failure::Db)?;
        let version = usize::try_from(version.unwrap_or(0)).unwrap_or(0);
        if version > sql::MIGRATIONS.len() {
            return Err(Failure::Newer(version));
        }
        for (index, migration) in sql::MIGRATIONS.iter().enumerate().skip(version) {
            let next = i32::try_from(index + 1).expect("fewer than 2^31 migrations");
            tx.batch_execute(migration).await.map_err(Failure::Db)?;
            tx.execute(
                &format!(
                    "INSERT INTO {} (version, applied_at) VALUES ($1::integer, $2::bigint)",
                    sql::SCHEMA_TABLE
                ),
                &[&next, &self.clock.now().0],
            )
            .await
            .map_err(Failure::Db)?;
            info!(version = next, "postgres schema migrated");
        }
        tx.commit().await.map_err(Failure::Db)
    }

    /// Runs one statement, retrying serialization failures and lost connections until the
    /// caller's deadline (or the statement timeout when there is none) has passed. Every
    /// attempt sends the same parameters, which is what makes a retry after an ambiguous commit
    /// safe (see the module documentation).
    async fn query(
        &self,
        statement: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StoreResult<Vec<Row>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let budget = deadline::remaining().unwrap_or(self.default_timeout);
        let until = Instant::now() + budget;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = until.saturating_duration_since(Instant::now());
            let failure =
                match tokio::time::timeout(left, self.attempt(statement, params, left)).await {
                    Ok(Ok(rows)) => return Ok(rows),
                    Ok(Err(failure)) => failure,
                    Err(_) => return Err(deadline_passed(attempt)),
                };
            if self.closed.load(Ordering::Acquire) {
                return Err(closed());
            }
            let (kind, retryable) = failure.class();
            let wait = backoff(attempt);
            if !retryable || Instant::now() + wait >= until {
                let message = match (kind, retryable) {
                    (StoreErrorKind::Timeout, _) => {
                        "postgres cancelled the statement at its deadline"
                    }
                    (_, true) => "postgres stayed unavailable until the deadline",
                    _ => "postgres statement failed",
                };
                return Err(failure.into_error_of(kind, &format!("{message} (attempt {attempt})")));
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            debug!(attempt, error = %failure, "postgres attempt failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// One attempt: a pooled connection, its cached prepared statement, and the statement sent
    /// together with `SET statement_timeout` to the time left. tokio-postgres writes both
    /// requests before it reads an answer, so the deadline costs no round trip of its own (the
    /// store's tests count the round trips). A `SET LOCAL` would need a transaction block
    /// around the statement, two more statements; a client-side timeout alone would leave the
    /// server working for a caller that gave up.
    ///
    /// The `SET` is skipped when the connection's timeout already fits the time left: at most
    /// an eighth of it shorter, or at most `SERVER_MARGIN / 2` longer (the server still cancels
    /// before the caller's deadline). Calls with similar deadlines, the usual case, then send
    /// the statement alone: the `SET` is a transaction of its own on the server, a second one
    /// for every call (`docs/performance.md`, "The PostgreSQL store").
    async fn attempt(
        &self,
        statement: &'static str,
        params: &[&(dyn ToSql + Sync)],
        left: Duration,
    ) -> Result<Vec<Row>, Failure> {
        let client = self.pool.get().await.map_err(Failure::Pool)?;
        let prepared = client
            .prepare_cached(statement)
            .await
            .map_err(Failure::Db)?;
        let timeout_ms = left
            .saturating_sub(SERVER_MARGIN)
            .max(left / 2)
            .as_millis()
            .clamp(1, i32::MAX as u128);
        let cache = &client.statement_cache;
        let key = Arc::as_ptr(cache) as usize;
        let current = self
            .lock_timeouts()
            .get(&key)
            .and_then(|(connection, current)| {
                // Alive, so the same allocation as `cache`: this connection's entry.
                (connection.strong_count() > 0).then_some(*current)
            });
        let fits = current.is_some_and(|current| {
            current >= timeout_ms - timeout_ms / 8
                && current <= timeout_ms + SERVER_MARGIN.as_millis() / 2
        });
        if fits {
            return client.query(&prepared, params).await.map_err(Failure::Db);
        }
        let set_timeout = format!("SET statement_timeout = {timeout_ms}");
        let (set, rows) = tokio::join!(
            client.batch_execute(&set_timeout),
            client.query(&prepared, params)
        );
        set.map_err(Failure::Db)?;
        let mut timeouts = self.lock_timeouts();
        if timeouts.len() > 2 * self.pool.status().max_size {
            timeouts.retain(|_, (connection, _)| connection.strong_count() > 0);
        }
        timeouts.insert(key, (Arc::downgrade(cache), timeout_ms));
        drop(timeouts);
        rows.map_err(Failure::Db)
    }

    fn lock_timeouts(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<usize, (Weak<StatementCache>, u128)>> {
        self.timeouts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the replays whose window closed, at most once per `window` per broker: one
    /// caller in a window pays a second round trip. Replays past their window are never
    /// answered anyway; the deletion only frees their rows, and a failed one is left to the
    /// next window.
    async fn forget_replays(&self, now: UnixMicros, window: Duration) {
        self.forget(sql::FORGET_REPLAYS, &self.swept_at, now, window)
            .await;
    }

    /// Deletes the sealed successors whose grace window closed, as [`Self::forget_replays`]
    /// does the replays: they are never answered after it.
    async fn forget_rotations(&self, now: UnixMicros, grace: Duration) {
        self.forget(sql::FORGET_ROTATIONS, &self.rotations_swept_at, now, grace)
            .await;
    }

    /// Runs the deletion `statement` (`$1` now) unless `swept_at` says it ran less than
    /// `window` ago.
    async fn forget(
        &self,
        statement: &'static str,
        swept_at: &AtomicI64,
        now: UnixMicros,
        window: Duration,
    ) {
        let last = swept_at.load(Ordering::Relaxed);
        if now.0 < last.saturating_add(micros(window).max(1))
            || swept_at
                .compare_exchange(last, now.0, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(err) = self.query(statement, &[&now.0]).await {
            debug!(error = %err, "postgres: deleting closed rows failed; the next window retries");
        }
    }

    /// Runs a statement that answers exactly one row.
    async fn query_one(
        &self,
        statement: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> StoreResult<Row> {
        self.query(statement, params)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Internal,
                    "a postgres statement answered no row",
                    None,
                )
            })
    }
}

#[async_trait]
impl TokenStore for PostgresStore {
    async fn issue(&self, session: NewSession) -> StoreResult<MintedPair> {
        let issue = Issue::new(&session, self.db.clock.stamp());
        let row = self
            .db
            .query_one(sql::ISSUE, &issue.params(&session))
            .await?;
        Ok(issue.into_pair(AccountId::from_stored(get(&row, 0)?)))
    }

    async fn issue_once(
        &self,
        session: NewSession,
        claim: &ReplayClaim,
    ) -> StoreResult<Option<(MintedPair, bool)>> {
        let issue = Issue::new(&session, self.db.clock.stamp());
        // The sealed pair does not name its account, which the statement decides; the row
        // keeps the account beside it.
        let sealed = claim.key.seal(
            &claim.row,
            &issue.pair_of(AccountId::from_stored(String::new())),
        );
        let closes = issue.now.plus(claim.window);
        let mut params = issue.params(&session);
        let row = claim.row.to_vec();
        params.extend_from_slice(&[
            &row,
            &closes.0,
            &sealed.key_id,
            &sealed.nonce,
            &sealed.ciphertext,
        ]);
        let answer = self.db.query_one(sql::ISSUE_ONCE, &params).await?;
        self.db.forget_replays(issue.now, claim.window).await;
        if let Some(account) = get::<Option<String>>(&answer, 0)? {
            return Ok(Some((
                issue.into_pair(AccountId::from_stored(account)),
                false,
            )));
        }
        let stored = SealedPair {
            key_id: get(&answer, 2)?,
            nonce: get(&answer, 3)?,
            ciphertext: get(&answer, 4)?,
        };
        let account = AccountId::from_stored(get(&answer, 1)?);
        match claim.key.open(&claim.row, account, &stored) {
            Ok(pair) => Ok(Some((pair, true))),
            Err(OpenError::OtherKey) => Err(StoreError::new(
                StoreErrorKind::Internal,
                "the idempotency key's pair was sealed under another tokens.replay_key",
                None,
            )),
            Err(OpenError::Corrupt) => Err(StoreError::new(
                StoreErrorKind::Internal,
                "the idempotency key's sealed pair does not open: corrupt or forged",
                None,
            )),
        }
    }

    async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> StoreResult<RefreshOutcome> {
        let Some(parsed) = secret::parse(secret) else {
            return Ok(RefreshOutcome::Inactive);
        };
        if parsed.kind != TokenKind::Refresh {
            return Ok(RefreshOutcome::Inactive);
        }
        let (refresh_id, refresh_secret, refresh_digest) = secret::mint(TokenKind::Refresh);
        let (access_id, access_secret, access_digest) = secret::mint(TokenKind::Access);
        let refresh = MintedToken {
            id: refresh_id,
            secret: refresh_secret,
            expires_at: UnixMicros(0),
        };
        let access = MintedToken {
            id: access_id,
            secret: access_secret,
            expires_at: UnixMicros(0),
        };
        let now = self.db.clock.stamp();
        let nonce = random_hex();
        let (any_client, client) = client_params(&rotation.client);
        // Sealed once, before the first attempt: every attempt sends the same pair. Without a
        // grace window nothing could replay it.
        let sealed = rotation
            .replay
            .as_ref()
            .filter(|_| !rotation.grace.is_zero())
            .map(|key| key.seal_successor(secret, &refresh, &access));
        let (key_id, seal_nonce, ciphertext) = match &sealed {
            Some(sealed) => (
                Some(sealed.key_id.as_str()),
                Some(sealed.nonce.as_slice()),
                Some(sealed.ciphertext.as_slice()),
            ),
            None => (None, None, None),
        };
        let rows = self
            .db
            .query(
                sql::REFRESH,
                &[
                    &parsed.id.as_str(),
                    &parsed.digest.as_slice(),
                    &now.0,
                    &micros(rotation.grace),
                    &any_client,
                    &client,
                    &micros(rotation.access_ttl),
                    &micros(rotation.refresh_ttl),
                    &refresh.id.as_str(),
                    &refresh_digest.as_slice(),
                    &access.id.as_str(),
                    &access_digest.as_slice(),
                    &nonce,
                    &key_id,
                    &seal_nonce,
                    &ciphertext,
                ],
            )
            .await?;
        if sealed.is_some() {
            self.db.forget_rotations(now, rotation.grace).await;
        }
        let Some(row) = rows.first() else {
            return Ok(RefreshOutcome::Inactive);
        };
        let action: String = get(row, 0)?;
        let family_id = FamilyId::from_stored(get(row, 2)?);
        Ok(match action.as_str() {
            "rotate" | "retry" => RefreshOutcome::Rotated(MintedPair {
                account_id: AccountId::from_stored(get(row, 1)?),
                family_id,
                refresh: MintedToken {
                    expires_at: UnixMicros(get(row, 3)?),
                    ..refresh
                },
                access: MintedToken {
                    expires_at: UnixMicros(get(row, 4)?),
                    ..access
                },
            }),
            "replay" => {
                let key = rotation.replay.as_ref().ok_or_else(|| {
                    StoreError::new(
                        StoreErrorKind::Internal,
                        "the refresh statement replayed a successor without a replay key",
                        None,
                    )
                })?;
                let stored = SealedPair {
                    key_id: get(row, 6)?,
                    nonce: get(row, 7)?,
                    ciphertext: get(row, 8)?,
                };
                let successor = StoredSuccessor {
                    account_id: AccountId::from_stored(get(row, 1)?),
                    family_id,
                    refresh_expires: UnixMicros(get(row, 3)?),
                    access_expires: UnixMicros(get(row, 4)?),
                };
                let pair = key
                    .open_successor(secret, successor, &stored)
                    .map_err(|err| {
                        StoreError::new(
                            StoreErrorKind::Internal,
                            match err {
                                OpenError::OtherKey => {
                                    "the rotation's successor was sealed under another \
                                     tokens.replay_key"
                                }
                                OpenError::Corrupt => {
                                    "the rotation's sealed successor does not open: corrupt or \
                                     forged"
                                }
                            },
                            None,
                        )
                    })?;
                debug!(family_id = %pair.family_id, refresh_token_id = %pair.refresh.id, "postgres: replayed a rotation's sealed successor");
                RefreshOutcome::Replayed {
                    pair,
                    rotated_at: UnixMicros(get(row, 9)?),
                }
            }
            "reuse" => {
                let revoked = count(get(row, 5)?);
                warn!(family_id = %family_id, token_id = %parsed.id, revoked, "refresh token reuse detected; family revoked");
                RefreshOutcome::ReuseDetected { family_id, revoked }
            }
            "wrong_client" => RefreshOutcome::WrongClient,
            "inactive" => RefreshOutcome::Inactive,
            other => {
                return Err(StoreError::new(
                    StoreErrorKind::Internal,
                    format!("the refresh statement answered an unknown action {other:?}"),
                    None,
                ));
            }
        })
    }

    async fn introspect(&self, secret: &SecretString) -> StoreResult<Option<TokenInfo>> {
        let Some(parsed) = secret::parse(secret) else {
            return Ok(None);
        };
        let now = self.db.clock.now();
        let Some((id, row)) = lookup::load(&self.db, &self.lookups, parsed.id.as_str()).await?
        else {
            return Ok(None);
        };
        Ok(row.active_info(id, &parsed.digest, now))
    }

    async fn revoke_secret(
        &self,
        secret: &SecretString,
        client: &ClientCheck,
    ) -> StoreResult<SecretRevocation> {
        let Some(parsed) = secret::parse(secret) else {
            return Ok(SecretRevocation::NotActive);
        };
        let now = self.db.clock.stamp();
        let nonce = random_hex();
        let (any_client, client) = client_params(client);
        let row = self
            .db
            .query_one(
                sql::REVOKE_SECRET,
                &[
                    &parsed.id.as_str(),
                    &now.0,
                    &nonce,
                    &parsed.digest.as_slice(),
                    &any_client,
                    &client,
                ],
            )
            .await?;
        let (found, allowed, revoked): (i64, i64, i64) =
            (get(&row, 0)?, get(&row, 1)?, get(&row, 2)?);
        Ok(if revoked > 0 {
            SecretRevocation::Revoked(count(revoked))
        } else if found == 0 {
            SecretRevocation::NotActive
        } else if allowed == 0 {
            SecretRevocation::WrongClient
        } else {
            SecretRevocation::Revoked(0)
        })
    }

    async fn revoke(&self, target: RevokeTarget) -> StoreResult<u64> {
        let now = self.db.clock.stamp();
        let nonce = random_hex();
        let row = match &target {
            RevokeTarget::Token(id) => {
                self.db
                    .query_one(sql::REVOKE_TOKEN, &[&id.as_str(), &now.0, &nonce])
                    .await?
            }
            RevokeTarget::Family(family) => {
                self.db
                    .query_one(sql::REVOKE_FAMILY, &[&family.as_str(), &now.0, &nonce])
                    .await?
            }
            RevokeTarget::Account(account) => {
                self.db
                    .query_one(sql::REVOKE_ACCOUNT, &[&account.as_str(), &now.0])
                    .await?
            }
        };
        Ok(count(get(&row, 0)?))
    }

    async fn revoke_email(&self, email: &Email) -> StoreResult<Option<(AccountId, u64)>> {
        let now = self.db.clock.stamp();
        let row = self
            .db
            .query_one(sql::REVOKE_EMAIL, &[&email.as_str(), &now.0])
            .await?;
        let account: Option<String> = get(&row, 1)?;
        let revoked = count(get(&row, 0)?);
        Ok(account.map(|id| (AccountId::from_stored(id), revoked)))
    }

    async fn account_by_email(&self, email: &Email) -> StoreResult<Option<AccountId>> {
        let rows = self
            .db
            .query(sql::ACCOUNT_BY_EMAIL, &[&email.as_str()])
            .await?;
        rows.first()
            .map(|row| get(row, 0).map(AccountId::from_stored))
            .transpose()
    }

    async fn list_tokens(&self, account: &AccountId, page: PageRequest) -> StoreResult<TokenPage> {
        let now = self.db.clock.now();
        // Newest first; the cursor is the last (issued_at, id) of the previous page.
        let (after_at, after_id) = match &page.after {
            Some(cursor) => (cursor.issued_at.0, cursor.id.as_str().to_owned()),
            None => (i64::MAX, String::new()),
        };
        let limit = i64::from(page.size) + 1;
        let rows = self
            .db
            .query(
                sql::LIST_TOKENS,
                &[
                    &account.as_str(),
                    &after_at,
                    &after_id,
                    &limit,
                    &page.include_inactive,
                    &now.0,
                ],
            )
            .await?;
        let tokens = rows
            .iter()
            .map(|row| token_row(row).map(|(id, row)| row.into_record(id, now)))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(TokenPage::from_overfetch(tokens, page.size))
    }

    async fn close(&self) -> StoreResult<()> {
        // Every acknowledged write is already committed: closing only ends the connections.
        self.db.closed.store(true, Ordering::Release);
        self.db.pool.close();
        let (statements, ids) = self.lookups.counts();
        info!(
            target = %self.db.target,
            retries = self.retries(),
            introspect_statements = statements,
            introspect_ids = ids,
            "postgres store closed"
        );
        Ok(())
    }
}

/// A pair about to be issued: its ids, secrets and times, minted before the first attempt so
/// that every attempt sends the same ones, and the statement's parameters.
struct Issue {
    now: UnixMicros,
    family_id: FamilyId,
    refresh: (TokenId, SecretString),
    access: (TokenId, SecretString),
    refresh_expires: UnixMicros,
    access_expires: UnixMicros,
    /// `$1` to `$15` of [`sql::ISSUE`] that are text or bytes.
    text: [String; 6],
    digests: [Vec<u8>; 2],
    known_account: Option<String>,
    session_ends: UnixMicros,
}

impl Issue {
    fn new(session: &NewSession, now: UnixMicros) -> Self {
        let family_id = FamilyId::random();
        let (refresh_id, refresh_secret, refresh_digest) = secret::mint(TokenKind::Refresh);
        let (access_id, access_secret, access_digest) = secret::mint(TokenKind::Access);
        Self {
            now,
            text: [
                AccountId::random().as_str().to_owned(),
                session.email.as_str().to_owned(),
                family_id.as_str().to_owned(),
                refresh_id.as_str().to_owned(),
                access_id.as_str().to_owned(),
                serde_json::to_string(&session.metadata).expect("a string map always serialises"),
            ],
            digests: [refresh_digest.to_vec(), access_digest.to_vec()],
            known_account: session
                .known_account
                .as_ref()
                .map(|a| a.as_str().to_owned()),
            family_id,
            refresh: (refresh_id, refresh_secret),
            access: (access_id, access_secret),
            refresh_expires: now.plus(session.refresh_ttl),
            access_expires: now.plus(session.access_ttl),
            session_ends: now.plus(session.session_ttl.max(session.refresh_ttl)),
        }
    }

    /// `$1` to `$15` of [`sql::ISSUE`].
    fn params<'a>(&'a self, session: &'a NewSession) -> Vec<&'a (dyn ToSql + Sync)> {
        let [account, email, family, refresh, access, metadata] = &self.text;
        vec![
            account,
            email,
            &session.cognito_sub,
            &self.now.0,
            &self.known_account,
            family,
            &session.client_id,
            refresh,
            &self.digests[0],
            &self.refresh_expires.0,
            access,
            &self.digests[1],
            &self.access_expires.0,
            &self.session_ends.0,
            metadata,
        ]
    }

    fn pair_of(&self, account_id: AccountId) -> MintedPair {
        MintedPair {
            account_id,
            family_id: self.family_id.clone(),
            refresh: MintedToken {
                id: self.refresh.0.clone(),
                secret: self.refresh.1.clone(),
                expires_at: self.refresh_expires,
            },
            access: MintedToken {
                id: self.access.0.clone(),
                secret: self.access.1.clone(),
                expires_at: self.access_expires,
            },
        }
    }

    fn into_pair(self, account_id: AccountId) -> MintedPair {
        self.pair_of(account_id)
    }
}

/// The token id's column in `sql::token_columns!()`.
const ID_COLUMN: usize = 17;

/// Reads a row of `sql::token_columns!()`.
fn token_row(row: &Row) -> StoreResult<(TokenId, TokenRow)> {
    let kind: String = get(row, 0)?;
    let kind = TokenKind::from_stored(&kind).ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::Internal,
            format!("unknown token kind {kind:?} in postgres"),
            None,
        )
    })?;
    let micros = |index| -> StoreResult<Option<UnixMicros>> {
        Ok(get::<Option<i64>>(row, index)?.map(UnixMicros))
    };
    let token = TokenRow {
        kind,
        account_id: AccountId::from_stored(get(row, 1)?),
        family_id: FamilyId::from_stored(get(row, 2)?),
        parent_id: get::<Option<String>>(row, 3)?.map(TokenId::from_stored),
        client_id: get(row, 4)?,
        digest: get(row, 5)?,
        issued_at: UnixMicros(get(row, 6)?),
        expires_at: UnixMicros(get(row, 7)?),
        revoked_at: micros(8)?,
        rotated_at: micros(9)?,
        replaced_by: get::<Option<String>>(row, 10)?.map(TokenId::from_stored),
        metadata: get(row, 11)?,
        not_before: UnixMicros(get(row, 12)?),
        email: get(row, 13)?,
        cognito_sub: get(row, 14)?,
        session_ends_at: micros(15)?,
        superseded_at: micros(16)?,
    };
    Ok((TokenId::from_stored(get(row, ID_COLUMN)?), token))
}

/// Reads column `index` of `row`; a type mismatch is a bug or a foreign schema.
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, index: usize) -> StoreResult<T> {
    row.try_get(index)
        .map_err(|err| internal("cannot read a postgres column", err))
}

/// The `any client` flag and client id parameters of a client check.
fn client_params(check: &ClientCheck) -> (bool, Option<&str>) {
    match check {
        ClientCheck::Any => (true, None),
        ClientCheck::Exactly(client) => (false, client.as_deref()),
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Returns a back-off of `1 ms · 2^(attempt-1)`, capped at 100 ms, with full jitter: many
/// refreshes of one token collide on its row, and spreading their retries lets one through.
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(1)
        .saturating_mul(1 << attempt.saturating_sub(1).min(7))
        .min(Duration::from_millis(100));
    cap.mul_f64(rand::rng().random::<f64>())
}

impl Failure {
    /// The error kind, and whether another attempt may succeed (and is safe: see the module
    /// documentation).
    fn class(&self) -> (StoreErrorKind, bool) {
        match self {
            Self::Pool(PoolError::Timeout(_)) => (StoreErrorKind::Unavailable, true),
            Self::Pool(PoolError::Backend(err)) | Self::Db(err) => classify(err),
            Self::Pool(PoolError::Closed) => (StoreErrorKind::Unavailable, false),
            Self::Pool(_) | Self::Newer(_) | Self::Isolation(_) => {
                (StoreErrorKind::Internal, false)
            }
        }
    }

    fn into_error(self, message: &str) -> StoreError {
        let (kind, _) = self.class();
        self.into_error_of(kind, message)
    }

    fn into_error_of(self, kind: StoreErrorKind, message: &str) -> StoreError {
        match self {
            Self::Pool(PoolError::Closed) => closed(),
            Self::Pool(err) => StoreError::new(kind, message, Some(Box::new(err))),
            Self::Db(err) => StoreError::new(kind, message, Some(Box::new(err))),
            Self::Newer(version) => StoreError::new(
                StoreErrorKind::Internal,
                format!(
                    "the postgres schema is version {version}, newer than this broker knows \
                     ({}); run a newer tokenbroker",
                    sql::MIGRATIONS.len()
                ),
                None,
            ),
            Self::Isolation(level) => StoreError::new(
                StoreErrorKind::Internal,
                format!(
                    "postgres runs the broker's connections at {level}, not serializable (a \
                     connection pooler may have dropped the startup option that asks for it); \
                     connect to the server directly or set default_transaction_isolation = \
                     serializable for the broker's role"
                ),
                None,
            ),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pool(err) => write!(f, "{err}"),
            Self::Db(err) => write!(f, "{err}"),
            Self::Newer(version) => write!(f, "schema version {version} is newer"),
            Self::Isolation(level) => write!(f, "isolation {level}"),
        }
    }
}

/// Classifies a database error: SQLSTATE when the server sent one, the connection otherwise.
fn classify(err: &tokio_postgres::Error) -> (StoreErrorKind, bool) {
    if let Some(code) = err.code() {
        let code = code.code();
        return match code {
            // Serialization failure and deadlock: the transaction was rolled back.
            "40001" | "40P01" => (StoreErrorKind::Unavailable, true),
            // Cancelled: statement_timeout, the caller's deadline.
            "57014" => (StoreErrorKind::Timeout, false),
            // Too many connections, the server shutting down or starting, connection failures.
            "53300" => (StoreErrorKind::Unavailable, true),
            _ if code.starts_with("57P") || code.starts_with("08") => {
                (StoreErrorKind::Unavailable, true)
            }
            // Out of disk or memory: the operator's problem, not worth hammering.
            _ if code.starts_with("53") => (StoreErrorKind::Unavailable, false),
            _ => (StoreErrorKind::Internal, false),
        };
    }
    // No SQLSTATE: tokio-postgres's own errors. Those of the connection are transient (and,
    // after the statement was sent, ambiguous, which the statements are written to survive);
    // the rest (encoding, decoding, protocol) are bugs.
    let text = err.to_string();
    let connection = err.is_closed()
        || [
            "error connecting",
            "error performing TLS",
            "error communicating",
            "timeout waiting",
            "connection closed",
        ]
        .iter()
        .any(|prefix| text.starts_with(prefix));
    if connection {
        (StoreErrorKind::Unavailable, true)
    } else {
        (StoreErrorKind::Internal, false)
    }
}

fn deadline_passed(attempt: u32) -> StoreError {
    StoreError::new(
        StoreErrorKind::Timeout,
        format!("postgres did not answer before the deadline (attempt {attempt})"),
        None,
    )
}

fn internal(message: &str, err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::new(StoreErrorKind::Internal, message, Some(Box::new(err)))
}

fn closed() -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, "the store is closed", None)
}
