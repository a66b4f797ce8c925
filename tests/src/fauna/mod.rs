//! A test double of FaunaDB's FQL v10 endpoint (`POST /query/1`) that answers the broker's fixed
//! queries (`broker/src/store/fauna/queries.rs` and the two UDFs of `deploy/fauna/schema.fsl`)
//! with Fauna's behaviour as `docs/design.md` "Fauna over HTTP" describes it.
//!
//! It is a real HTTP server (HTTP/1.1, and h2c with prior knowledge) on `127.0.0.1:0`. It checks
//! what the real endpoint checks, in the real endpoint's order (`docs/design.md` "Fauna over HTTP
//! › Requests"; the order is `CoreApplication`'s and `FQL2Endpoint`'s): the request-info headers,
//! `X-Query-Tags`, `X-Format` and the boolean headers, the body, the bearer (server keys, and
//! `fnE…` token secrets that it mints itself in the layout of `docs/design.md` "Fauna over HTTP ›
//! Token secrets"), the `arguments` in the request's format, the query text, the caller's
//! privileges; then it runs the query as one optimistic transaction (a snapshot, checked at
//! its commit against what later commits wrote, run again on a conflict up to
//! `X-Max-Contention-Retries` + 1 times, 5 by default, then 409) and answers with the exact
//! response and error JSON of `docs/design.md` "Fauna over HTTP › Responses and errors", with
//! values encoded as `docs/design.md` "Fauna over HTTP › Values" says. Time comes from an
//! injected [`Clock`]; tokens expire at their `ttl`. [`FaunaDouble::inject`] makes the next
//! requests fail with one of Fauna's fault classes instead.
//!
//! A query is recognised by the SHA-256 of its exact text ([`KNOWN_QUERIES`]); any other text is
//! answered with `invalid_query`, so the broker cannot drift from what this double implements.
//! The schema's collections, roles and functions are recognised the same way
//! ([`KNOWN_SCHEMA`]): the double does not start while `deploy/fauna/schema.fsl` holds an item
//! it does not implement.
//!
//! The parts: `server` takes the HTTP requests and checks them in that order; `query` knows the
//! texts; `txn` runs one as a transaction over `database` (accounts with their unique email,
//! tokens, the transaction clock); `value` holds the FQL values and the formats' codecs;
//! `reply` the answers and error bodies; `secret` the token secret layout.
//!
//! Where it deviates from real Fauna (not modelled):
//! - FQL itself: only the known texts run, each implemented by hand from its source;
//! - type checking: the database is typechecked, as one made from the typed schema, but the
//!   double cannot check types. Without `X-Typecheck: false` it runs only the texts known to
//!   pass the checker (the calls of the schema's functions) and answers the others
//!   `invalid_query`, where the real checker might accept some; with it, bad arguments give
//!   runtime errors. No response carries `static_type`;
//! - `X-Linearized`, `X-Performance-Hints` and `X-Last-Txn-Ts` are validated and recorded,
//!   nothing more: there is one node, so every read is already of the latest commit;
//! - contention: a transaction's read set is the documents it read and the index terms it
//!   looked up (an email, an account's tokens), at the granularity of a whole term; writes
//!   that no one read never conflict. A transaction runs on the latest state, under one lock,
//!   and takes its snapshot [`FaunaDouble::set_transaction_time`] before it; with no
//!   transaction time (the default) snapshot and commit coincide and nothing conflicts, unless
//!   a conflict is injected. The query timeout is never reached unless injected;
//! - `Replay` (idempotency claims) and `Rotation` (sealed successors) are modelled as the texts that use it read and write it, by
//!   its unique `row`; a document past its ttl is gone from reads and from the unique
//!   constraint at once (real Fauna hides it from reads at its ttl and removes it later; the
//!   broker's texts never depend on the difference, since they delete a claim past its window
//!   before they create the next);
//! - `BrokerPolicy` and `RotationAttempt` are modelled as the schema's functions use them (one
//!   policy document, one attempt per rotated token, gone at that token's ttl), not as
//!   collections any query could read;
//! - roles beyond what the broker needs: a token may run `Query.token()`,
//!   `revokeCurrentToken` (access and refresh tokens) and `rotateRefreshToken` (refresh tokens);
//!   everything else is `permission_denied` (the real baseline would also let a token read and
//!   delete its own document's tokens);
//! - BCrypt: secrets are verified against a SHA-256 of the secret, not a cost-5 BCrypt hash;
//! - the decorated format's output is an approximation of FQL source text; the `summary` spans
//!   of errors point at the right text but are not guaranteed to match the real server's column
//!   for column; `stats` are plausible counts, not Fauna's metering;
//! - request limits: no 413, and JSON nested deeper than 128 levels (serde_json's limit, below
//!   Jackson's) is already `JSON exceeds nesting limit`;
//! - other endpoints (v4 `/`, `/stream/1`, `/schema/1`, CORS preflight): 404.

mod database;
mod query;
mod reply;
mod schema;
mod secret;
mod server;
#[cfg(test)]
mod tests;
mod txn;
mod value;

use std::{
    collections::VecDeque,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use secrecy::SecretString;
use tokenbroker::model::clock::Clock;
use tokio::task::JoinHandle;

pub use query::{KNOWN_QUERIES, original_lambda};
pub use schema::KNOWN_SCHEMA;

use database::Db;
use server::{Shared, accept_loop};

/// The server key the double accepts: the root key `secret` scoped to the `server` role, a form
/// `docs/design.md` "Fauna over HTTP › Keys and roles" describes.
pub const SERVER_KEY: &str = "secret:server";

/// A failure the double answers with: the retryable classes of `docs/design.md` "Fauna over
/// HTTP › Responses and errors" and broken answers, instead of running the request; and the
/// commit-then-fail faults (`Slow`, `Committed*`), after running and committing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 409 `contended_transaction`: Fauna's own contention retries ran out.
    Contended,
    /// 429 `limit_exceeded` `Rate limit exceeded`, with `stats.rate_limits_hit`.
    RateLimited,
    /// 440 `time_out`: the client's deadline was too short.
    ClientTimeout,
    /// 500 `internal_error`.
    Internal,
    /// 503 `time_out` `Read timed out`.
    Unavailable,
    /// The query runs (and commits) at once, but the answer leaves only after the delay.
    Slow(Duration),
    /// The query runs and commits, then the client gets 503 `time_out` (a coordinator that
    /// timed out waiting for the commit's acknowledgement).
    CommittedUnavailable,
    /// The query runs and commits, then the connection closes with no answer.
    CommittedLost,
    /// The query runs and commits, and the answer is held one second past the request's
    /// `X-Query-Timeout-Ms`: the client times out after the commit.
    CommittedTimeout,
    /// A concurrent first sign-in of the request's `email` commits its account just before the
    /// request runs on the older snapshot: `Account.create` fails with 400
    /// `constraint_failure` on the unique email, as when Fauna's optimistic check catches it.
    EmailTaken,
    /// The request reaches a node whose key cache still holds every token deleted in the last
    /// 60 s: such a secret authenticates, and `Query.token()` is the cached copy; reads of the
    /// database see it gone.
    StaleKeyCache,
    /// 200 with an empty body.
    EmptyBody,
    /// 200 with a body cut off in the middle of the JSON.
    MalformedBody,
}

/// What a request's `Authorization` header carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bearer {
    /// One of the configured keys.
    Key,
    /// Something in the layout of `docs/design.md` "Fauna over HTTP › Token secrets", valid or
    /// not.
    Token,
    /// Anything else.
    Other,
    /// No `Authorization` header.
    Missing,
}

/// One request the double received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The query's name in [`KNOWN_QUERIES`], or `None` for any other text or no query.
    pub query: Option<&'static str>,
    /// Whether the query came in the template form `{"fql": [...]}` the drivers send.
    pub template: bool,
    /// What the bearer was.
    pub bearer: Bearer,
    /// The answer's HTTP status; `None` while the request is still being answered, or when
    /// its answer was lost ([`Fault::CommittedLost`]).
    pub status: Option<u16>,
    /// The injected fault the request got, if any.
    pub fault: Option<Fault>,
    /// `X-Query-Tags`.
    pub query_tags: Option<String>,
    /// `X-Format`.
    pub format: Option<String>,
    /// `X-Query-Timeout-Ms`.
    pub query_timeout_ms: Option<String>,
    /// `X-Typecheck`.
    pub typecheck: Option<String>,
    /// `X-Linearized`.
    pub linearized: Option<String>,
    /// `X-Last-Txn-Ts`.
    pub last_txn_ts: Option<String>,
    /// `X-Max-Contention-Retries`.
    pub max_contention_retries: Option<String>,
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// `tracestate`.
    pub tracestate: Option<String>,
}

/// A running Fauna double; it stops when dropped.
pub struct FaunaDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl fmt::Debug for FaunaDouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaunaDouble")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FaunaDouble {
    /// Starts a double on `127.0.0.1:0` that accepts [`SERVER_KEY`] and takes `Time.now()` from
    /// `clock`.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound, or if `deploy/fauna/schema.fsl` is not the schema the
    /// double implements ([`KNOWN_SCHEMA`]).
    pub async fn start(clock: Arc<dyn Clock>) -> Self {
        schema::verify().unwrap_or_else(|problem| panic!("{problem}"));
        let (listener, addr) = crate::loopback_listener().await;
        let schema_version = clock.now().0;
        let shared = Arc::new(Shared {
            clock,
            keys: vec![SERVER_KEY.to_owned()],
            // A database's global id; the double is one database, distinct per instance so a
            // secret from another double never authenticates here.
            database_id: i64::try_from(rand::random::<u64>() >> 2).unwrap_or(1) + 1,
            schema_version,
            latency: Mutex::new(Duration::ZERO),
            transaction_time: Mutex::new(Duration::ZERO),
            conflicts: AtomicU64::new(0),
            faults: Mutex::new(VecDeque::new()),
            query_faults: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            db: Mutex::new(Db::default()),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Self { addr, shared, task }
    }

    /// Returns the base URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns the server key the double accepts.
    pub fn server_key(&self) -> SecretString {
        SecretString::from(SERVER_KEY)
    }

    /// Adds `d` to every request, before it runs (a network round trip).
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.shared.latency) = d;
    }

    /// Makes every transaction take `d` between its snapshot and its commit, so that concurrent
    /// requests overlap and conflict as they would on a real cluster (zero, the default: each
    /// transaction's snapshot is taken at its commit, and none conflicts).
    pub fn set_transaction_time(&self, d: Duration) {
        *lock(&self.shared.transaction_time) = d;
    }

    /// Makes the next `times` requests get `fault` instead of running (after any earlier
    /// injections are used up).
    pub fn inject(&self, fault: Fault, times: u32) {
        let mut faults = lock(&self.shared.faults);
        faults.extend(std::iter::repeat_n(fault, times as usize));
    }

    /// Makes the next `times` requests of the query named `query` ([`KNOWN_QUERIES`]) get
    /// `fault`, whatever [`FaunaDouble::inject`] queued for other requests.
    pub fn inject_for(&self, query: &str, fault: Fault, times: u32) {
        let name = KNOWN_QUERIES
            .iter()
            .find(|(name, _)| *name == query)
            .map(|(name, _)| *name)
            .unwrap_or_else(|| panic!("no known query is named {query}"));
        let mut faults = lock(&self.shared.query_faults);
        faults.extend(std::iter::repeat_n((name, fault), times as usize));
    }

    /// Returns how many transaction attempts conflicted and ran again (or ended in 409).
    pub fn conflicts(&self) -> u64 {
        self.shared.conflicts.load(Ordering::Relaxed)
    }

    /// Returns every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Returns how many accounts exist.
    pub fn account_count(&self) -> usize {
        lock(&self.shared.db).accounts.len()
    }

    /// Returns how many `Replay` documents exist and have not expired, and how many of those
    /// hold a sealed pair.
    pub fn replay_count(&self) -> (usize, usize) {
        let now = i128::from(self.shared.clock.now().0) * 1000;
        let db = lock(&self.shared.db);
        let live: Vec<_> = db.replays.values().filter(|r| r.ttl > now).collect();
        let sealed = live.iter().filter(|r| !r.sealed.is_null()).count();
        (live.len(), sealed)
    }

    /// Returns the `sealed` field of every live `Replay` document, as JSON text: what the
    /// store keeps of a replayed pair.
    pub fn replay_texts(&self) -> Vec<String> {
        let db = lock(&self.shared.db);
        db.replays
            .values()
            .map(|r| value::encode_simple(&r.sealed).to_string())
            .collect()
    }

    /// Returns the `sealed` field of every live `Rotation` document, as JSON text.
    pub fn rotation_texts(&self) -> Vec<String> {
        let now = i128::from(self.shared.clock.now().0) * 1000;
        let db = lock(&self.shared.db);
        db.rotations
            .values()
            .filter(|r| r.ttl > now)
            .map(|r| value::encode_simple(&r.sealed).to_string())
            .collect()
    }

    /// Returns how many token documents exist and have not expired.
    pub fn live_token_count(&self) -> usize {
        let now = i128::from(self.shared.clock.now().0) * 1000;
        lock(&self.shared.db)
            .tokens
            .values()
            .filter(|t| t.live_at(now))
            .count()
    }
}

impl Drop for FaunaDouble {
    fn drop(&mut self) {
        // Aborting the accept task drops its `JoinSet`, which aborts every connection.
        self.task.abort();
    }
}

/// Locks `m`, ignoring poisoning (a panicking test thread must not hide the real failure).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
