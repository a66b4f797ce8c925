//! The Fauna store: real Fauna tokens minted, rotated and revoked over FQL v10
//! (`POST /query/1`; the protocol is in `docs/design.md` "Fauna over HTTP"), one HTTP request
//! per operation, except an idempotent issue and a rotation with a replay key.
//!
//! An idempotent issue ([`TokenStore::issue_once`]) is shared by the brokers of one database:
//! the first request claims the key's `Replay` document and mints the pair in one query; the
//! second stores the pair sealed under the replay key in the claim (Fauna mints the secrets
//! inside the first query, and a query cannot encrypt). A call that finds another call's claim
//! answers its sealed pair, or waits for it (reading the claim every 50 ms, up to 2 s), and
//! mints a pair of its own when the claim stays unsealed (its broker died between the two
//! requests). A rotation with a replay key (and a grace window) likewise seals its successor in
//! a second request, and a repeated presentation within the grace window, which
//! `rotateRefreshToken` answers with `coalesce` instead of superseding, answers that sealed
//! successor once it is there, or supersedes it after the same wait. `docs/stores.md` "Fauna"
//! has the details and the round trips.
//!
//! The secrets this store hands out are Fauna's own (`fnE…`): clients use access secrets against
//! Fauna directly, with the privileges of the `access` role in `deploy/fauna/schema.fsl`. The
//! broker never stores a secret. Operations that present a secret send it as the bearer, so
//! Fauna itself authenticates it; the rest use the server key. Query texts are fixed
//! ([`queries`]); every client-supplied value is an argument.
//!
//! Failures are handled per error class: 401 on the server key is a misconfiguration
//! (`Internal`, logged); 409 and 429 and time-outs and 5xx are retried with jittered back-off,
//! bounded by `max_attempts` and by the caller's deadline, then `Unavailable`; an empty or
//! malformed answer is `Unavailable`. A failure is never reported as an inactive token.
//!
//! What Fauna does not keep, this store cannot list: revoked tokens are deleted and expired
//! ones disappear from reads, so `list_tokens` shows active and rotated tokens only.

pub mod queries;
mod wire;

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use rand::Rng as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{Instrument as _, debug, debug_span, error, field::Empty, warn};

use self::wire::Class;
use super::{
    StoreError, StoreErrorKind, StoreResult, TokenStore,
    metrics::{RetryClass, StoreMetrics},
    settings::FaunaSettings,
};
use crate::{
    model::deadline,
    model::{
        AccountId, ClientCheck, Email, FamilyId, MAX_SECRET_LEN, Metadata, MintedPair, MintedToken,
        NewSession, PageRequest, RefreshOutcome, ReplayClaim, RevokeTarget, Rotation,
        SecretRevocation, TokenId, TokenInfo, TokenKind, TokenPage, TokenRecord, TokenState,
        UnixMicros, random_hex,
        replay::{OpenError, ReplayKey, SealedPair, StoredSuccessor, successor_row},
    },
    obs::context::{self, TRACEPARENT, TRACESTATE},
};

// The store's operations, each sending exactly one query text, are the metrics' `query` label.
use super::metrics::FaunaQuery as Op;

impl Op {
    /// Returns (name, text); the name travels in `X-Query-Tags` and names the counter.
    fn query(self) -> (&'static str, &'static str) {
        queries::ALL[self as usize]
    }
}

/// The broker's limits on what a refresh secret may get from Fauna, written into Fauna by
/// [`FaunaStore::publish_policy`] (`docs/design.md` "Fauna over HTTP › The broker's policy").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
    /// The longest access token lifetime a rotation may mint.
    pub access_ttl: Duration,
    /// The longest refresh token lifetime a rotation may mint.
    pub refresh_ttl: Duration,
    /// The longest grace after a rotation in which the consumed token may be presented again.
    pub grace: Duration,
    /// The longest session of a family stored without its end, counted from a rotation.
    pub session_ttl: Duration,
    /// Whether a caller may skip the client check by naming no client.
    pub any_client: bool,
}

/// Who a query runs as.
#[derive(Clone, Copy)]
enum Bearer<'a> {
    /// The configured server key.
    Server,
    /// A token secret the client presented.
    Token(&'a SecretString),
}

/// What came back from a query that did not fail outright.
#[derive(Debug)]
enum Answer {
    /// The result.
    Data(Value),
    /// The token bearer was refused (unknown, expired or revoked).
    Unauthorized,
    /// A query error, by code.
    QueryError(String),
}

/// The Fauna store. See the module documentation.
pub struct FaunaStore {
    client: reqwest::Client,
    url: String,
    /// The endpoint's host and port, for the HTTP spans' `server.address` and `server.port`.
    server: (String, u16),
    server_auth: HeaderValue,
    config: FaunaSettings,
    /// The highest `txn_ts` seen, sent as `X-Last-Txn-Ts` so reads never go back in time.
    last_txn_ts: AtomicI64,
    /// HTTP requests sent, per operation (retries included).
    requests: [AtomicU64; queries::ALL.len()],
    metrics: Arc<StoreMetrics>,
    closed: AtomicBool,
}

impl fmt::Debug for FaunaStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaunaStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl FaunaStore {
    /// Builds the store and its HTTP client (rustls, HTTP/2 where the server offers it,
    /// pooled keep-alive connections).
    ///
    /// # Errors
    ///
    /// `Internal` for a malformed endpoint or key, or settings out of range.
    pub fn new(config: &FaunaSettings) -> StoreResult<Self> {
        let secret = config.validate().map_err(|err| misconfigured(&err.0))?;
        let endpoint = config.endpoint.trim_end_matches('/');
        let mut server_auth = HeaderValue::from_str(&format!("Bearer {}", secret.expose_secret()))
            .map_err(|_| misconfigured("store.fauna.secret is not a valid header value"))?;
        server_auth.set_sensitive(true);
        let client = reqwest::Client::builder()
            .user_agent(concat!("tokenbroker/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|err| {
                StoreError::new(
                    StoreErrorKind::Internal,
                    "cannot build the Fauna HTTP client",
                    Some(Box::new(err)),
                )
            })?;
        let url = format!("{endpoint}/query/1");
        let parsed = reqwest::Url::parse(&url)
            .map_err(|_| misconfigured("store.fauna.endpoint is not a valid URL"))?;
        let server = (
            parsed.host_str().unwrap_or_default().to_owned(),
            parsed.port_or_known_default().unwrap_or_default(),
        );
        Ok(Self {
            client,
            url,
            server,
            server_auth,
            config: config.clone(),
            last_txn_ts: AtomicI64::new(0),
            requests: Default::default(),
            metrics: Arc::default(),
            closed: AtomicBool::new(false),
        })
    }

    /// Records requests and retries by class into `metrics` (`tokenbroker_fauna_*`).
    pub fn with_metrics(mut self, metrics: Arc<StoreMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Returns how many HTTP requests each operation has sent, retries included, by query
    /// name (see [`queries::ALL`]).
    pub fn requests(&self) -> Vec<(&'static str, u64)> {
        Op::ALL
            .iter()
            .map(|op| {
                (
                    op.query().0,
                    self.requests[*op as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Sends `op` and retries per error class until it succeeds, fails for good, runs out of
    /// attempts or of the caller's deadline.
    async fn query(&self, op: Op, bearer: Bearer<'_>, arguments: Value) -> StoreResult<Answer> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "the store is closed",
                None,
            ));
        }
        let (name, text) = op.query();
        // The template form the official drivers send: the text as the template's one part.
        let body = |arguments: &Value| {
            json!({ "query": { "fql": [text] }, "arguments": arguments }).to_string()
        };
        let mut sending = body(&arguments);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt == 2 && arguments.get("retried") == Some(&Value::Bool(false)) {
                // The first attempt may have committed: the queries that take `retried` look
                // for what it left.
                let mut retried = arguments.clone();
                retried["retried"] = Value::Bool(true);
                sending = body(&retried);
            }
            let timeout = match deadline::remaining() {
                Some(left) if left < Duration::from_millis(1) => {
                    return Err(timed_out(name));
                }
                Some(left) => left.min(self.config.query_timeout()),
                None => self.config.query_timeout(),
            };
            self.requests[op as usize].fetch_add(1, Ordering::Relaxed);
            let sent = self
                .send(name, attempt, bearer, sending.clone(), timeout)
                .await;
            let class = match sent {
                Ok((status, bytes)) => wire::classify(status, &bytes),
                Err(err) if err.is_timeout() => Class::Transient("no answer in time".into()),
                Err(err) => Class::Transient(format!("request failed: {err}")),
            };
            self.metrics.fauna_requests.get((op, class.label())).inc();
            let wait = match class {
                Class::Ok { data, txn_ts } => {
                    if let Some(ts) = txn_ts {
                        self.last_txn_ts.fetch_max(ts, Ordering::Relaxed);
                    }
                    return Ok(Answer::Data(data));
                }
                Class::Unauthorized => {
                    return match bearer {
                        Bearer::Token(_) => Ok(Answer::Unauthorized),
                        Bearer::Server => {
                            error!(
                                query = name,
                                "fauna rejected the server key; check store.fauna.secret"
                            );
                            Err(misconfigured("fauna rejected the server key"))
                        }
                    };
                }
                Class::QueryError(code) => return Ok(Answer::QueryError(code)),
                Class::Malformed(what) => {
                    warn!(query = name, what, "fauna answered outside its protocol");
                    return Err(StoreError::new(
                        StoreErrorKind::Unavailable,
                        format!("fauna answered {what}"),
                        None,
                    ));
                }
                Class::Refused(what) => {
                    error!(query = name, what, "fauna refused the request");
                    return Err(misconfigured(&format!("fauna refused the request: {what}")));
                }
                Class::Contended => backoff(attempt, Duration::from_millis(10)),
                Class::Throttled => backoff(attempt, Duration::from_millis(100)),
                Class::Transient(ref what) => {
                    debug!(query = name, attempt, what, "fauna transient failure");
                    backoff(attempt, Duration::from_millis(50))
                }
            };
            let (class_name, retry_class) = match class {
                Class::Contended => ("contended", RetryClass::Contended),
                Class::Throttled => ("throttled", RetryClass::Throttled),
                _ => ("transient", RetryClass::Transient),
            };
            let left = deadline::remaining();
            if attempt >= self.config.max_attempts || left.is_some_and(|left| left <= wait) {
                warn!(
                    query = name,
                    attempt,
                    class = class_name,
                    "fauna retries exhausted"
                );
                return Err(if left.is_some_and(|left| left <= wait) {
                    timed_out(name)
                } else {
                    StoreError::new(
                        StoreErrorKind::Unavailable,
                        format!("fauna {class_name} after {attempt} attempts"),
                        None,
                    )
                });
            }
            warn!(
                query = name,
                attempt,
                class = class_name,
                wait_ms = wait.as_millis() as u64,
                "retrying fauna query"
            );
            self.metrics.fauna_retries.get(retry_class).inc();
            tokio::time::sleep(wait).await;
        }
    }

    /// Sends one request and reads the whole answer, in an HTTP client span (`DEBUG`) whose
    /// context the request carries as `traceparent`.
    async fn send(
        &self,
        name: &str,
        attempt: u32,
        bearer: Bearer<'_>,
        body: String,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), reqwest::Error> {
        let span = debug_span!(
            "fauna.query",
            otel.name = "POST",
            otel.kind = "client",
            otel.status_code = Empty,
            http.request.method = "POST",
            url.full = %self.url,
            server.address = %self.server.0,
            server.port = self.server.1,
            db.system.name = "fauna",
            db.operation.name = name,
            http.request.resend_count = attempt.saturating_sub(1),
            http.response.status_code = Empty,
            error.type = Empty,
        );
        let trace = span.in_scope(context::outgoing);
        let sent = self
            .send_in_span(name, trace, bearer, body, timeout)
            .instrument(span.clone())
            .await;
        match &sent {
            Ok((status, _)) => {
                span.record("http.response.status_code", status);
                if *status >= 500 {
                    span.record("error.type", status);
                    span.record("otel.status_code", "ERROR");
                }
            }
            Err(err) => {
                let kind = if err.is_timeout() {
                    "timeout"
                } else {
                    "request"
                };
                span.record("error.type", kind);
                span.record("otel.status_code", "ERROR");
            }
        }
        sent
    }

    async fn send_in_span(
        &self,
        name: &str,
        trace: Option<context::Outgoing>,
        bearer: Bearer<'_>,
        body: String,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), reqwest::Error> {
        let mut headers = HeaderMap::new();
        if let Some(trace) = trace {
            // Checked W3C syntax (or our own ids): always a valid header value.
            if let Ok(value) = HeaderValue::from_str(&trace.traceparent) {
                headers.insert(TRACEPARENT, value);
            }
            if let Some(Ok(value)) = trace.tracestate.as_deref().map(HeaderValue::from_str) {
                headers.insert(TRACESTATE, value);
            }
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("x-format", HeaderValue::from_static("tagged"));
        let millis = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        headers.insert("x-query-timeout-ms", HeaderValue::from(millis));
        headers.insert(
            "x-max-contention-retries",
            HeaderValue::from(u16::from(self.config.max_contention_retries)),
        );
        let last = self.last_txn_ts.load(Ordering::Relaxed);
        if last > 0 {
            headers.insert("x-last-txn-ts", HeaderValue::from(last));
        }
        // The texts are not type checked (`queries` says why): a database created from the
        // typed schema checks every query by default, and a text the checker refused would
        // fail every call of its RPC, a failure no test here can show before production.
        headers.insert("x-typecheck", HeaderValue::from_static("false"));
        if name == Op::Introspect.query().0 {
            // A read that must see every revocation committed before it (`queries::INTROSPECT`).
            headers.insert("x-linearized", HeaderValue::from_static("true"));
        }
        headers.insert(
            "x-query-tags",
            HeaderValue::from_str(&format!("rpc={name}")).expect("query names are ascii"),
        );
        headers.insert(
            "x-driver-env",
            HeaderValue::from_static(concat!("driver=tokenbroker-", env!("CARGO_PKG_VERSION"))),
        );
        let auth = match bearer {
            Bearer::Server => self.server_auth.clone(),
            Bearer::Token(secret) => {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {}", secret.expose_secret()))
                        .expect("plausible_secret admits header-safe characters only");
                value.set_sensitive(true);
                value
            }
        };
        headers.insert(AUTHORIZATION, auth);
        let response = self
            .client
            .post(&self.url)
            .headers(headers)
            .body(body)
            .timeout(timeout)
            .send()
            .await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        Ok((status, bytes.to_vec()))
    }

    /// Writes the broker's limits into Fauna's `BrokerPolicy` document (`deploy/fauna/schema.fsl`),
    /// which the functions that token secrets may call clamp their arguments to. Called once at
    /// start, before the store serves; until a policy is written, no refresh token rotates.
    ///
    /// # Errors
    ///
    /// As any query: `Unavailable` when Fauna cannot answer, `Internal` for a refused key or an
    /// unexpected answer (such as a schema without `BrokerPolicy`).
    pub async fn publish_policy(&self, policy: &RotationPolicy) -> StoreResult<()> {
        let arguments = json!({
            "access_ttl": wire::int(policy.access_ttl.as_secs()),
            "refresh_ttl": wire::int(policy.refresh_ttl.as_secs()),
            "grace": wire::int(policy.grace.as_secs()),
            "session_ttl": wire::int(policy.session_ttl.as_secs()),
            "any_client": policy.any_client,
        });
        match self
            .query(Op::PublishPolicy, Bearer::Server, arguments)
            .await?
        {
            Answer::Data(Value::Bool(true)) => Ok(()),
            other => Err(unexpected_answer(Op::PublishPolicy, &other)),
        }
    }

    /// Runs an issue query, under an idempotency claim of (`row`, `window`) when given, with
    /// the fallbacks of a stale cached account and a concurrently created one. Returns the
    /// answer and the call's nonce.
    async fn issue_query(
        &self,
        session: &NewSession,
        once: Option<(&str, Duration)>,
    ) -> StoreResult<(Value, String)> {
        let nonce = random_hex()[..16].to_owned();
        let mut arguments = json!({
            "email": session.email.as_str(),
            "cognito_sub": wire::opt_str(session.cognito_sub.as_deref()),
            "client_id": wire::opt_str(session.client_id.as_deref()),
            "nonce": &nonce,
            "retried": false,
            "access_ttl": wire::int(session.access_ttl.as_secs()),
            "refresh_ttl": wire::int(session.refresh_ttl.as_secs()),
            "session_ttl": wire::int(session.session_ttl.max(session.refresh_ttl).as_secs()),
            "metadata": wire::object(&session.metadata),
        });
        let (by_email, for_account) = match once {
            Some((row, window)) => {
                arguments["row"] = Value::String(row.to_owned());
                arguments["window"] = wire::int(window.as_secs().max(1));
                (Op::IssueOnceByEmail, Op::IssueOnceForAccount)
            }
            None => (Op::IssueByEmail, Op::IssueForAccount),
        };
        // Each query after the first is sent as a retry, in case an earlier one committed.
        let mut retry = arguments.clone();
        retry["retried"] = Value::Bool(true);
        let answer = match &session.known_account {
            Some(account) => {
                arguments["account_id"] = Value::String(account.to_string());
                match self.mint(for_account, arguments).await? {
                    // The cached account is gone (deleted by an operator): look it up again.
                    Answer::QueryError(code) if code == "document_not_found" => {
                        warn!(account_id = %account, "cached account not found in fauna");
                        self.mint(by_email, retry.clone()).await?
                    }
                    other => other,
                }
            }
            None => self.mint(by_email, arguments).await?,
        };
        let answer = match answer {
            // A concurrent first sign-in of this email (or claim of this idempotency row)
            // committed after this transaction's snapshot; issuing again finds it.
            Answer::QueryError(code) if code == "constraint_failure" => {
                debug!("the account or claim was created concurrently; issuing again");
                self.mint(by_email, retry).await?
            }
            other => other,
        };
        match answer {
            Answer::Data(value) => Ok((value, nonce)),
            Answer::QueryError(code) if code == "constraint_failure" => {
                warn!("fauna's unique email kept conflicting");
                Err(StoreError::new(
                    StoreErrorKind::Unavailable,
                    "fauna: the account's email kept conflicting",
                    None,
                ))
            }
            other => Err(unexpected_answer(by_email, &other)),
        }
    }

    /// Seals `pair` into the claim of `row` that this call (`nonce`) made. A failure is only
    /// logged: the caller gets its pair anyway, and a retry that finds the claim unsealed waits,
    /// then mints a pair of its own ([`TokenStore::issue_once`]).
    async fn seal_replay(&self, row: &str, nonce: &str, claim: &ReplayClaim, pair: &MintedPair) {
        let sealed = claim.key.seal_with_ids(&claim.row, pair);
        let arguments = json!({
            "row": row,
            "nonce": nonce,
            "sealed": sealed_json(&sealed, pair),
        });
        match self.query(Op::SealReplay, Bearer::Server, arguments).await {
            Ok(Answer::Data(Value::Bool(true))) => {}
            Ok(Answer::Data(Value::Bool(false))) => {
                warn!("fauna: the idempotency claim closed before its pair was sealed");
            }
            Ok(other) => drop(unexpected_answer(Op::SealReplay, &other)),
            Err(err) => warn!(
                error = %err,
                "fauna: sealing the idempotent pair failed; a retry of this call will mint its own"
            ),
        }
    }

    /// Calls `rotateRefreshToken` with `secret` as the bearer; `coalesce` asks it to answer a
    /// retry within the grace window with the current successor's id instead of superseding.
    /// `Err` holds an outcome decided by the bearer alone (Fauna refused it).
    async fn rotate(
        &self,
        secret: &SecretString,
        rotation: &Rotation,
        coalesce: bool,
    ) -> StoreResult<Result<Value, RefreshOutcome>> {
        let arguments = json!({
            "access_ttl": wire::int(rotation.access_ttl.as_secs()),
            "refresh_ttl": wire::int(rotation.refresh_ttl.as_secs()),
            "grace": wire::int(rotation.grace.as_secs()),
            "client_id": wire::opt_str(rotation.client.client_id()),
            "any_client": rotation.client == ClientCheck::Any,
            "session_ttl": wire::int(rotation.session_ttl.as_secs()),
            // The same on every retry of this request, so a retry recognises its own commit.
            "attempt": random_hex(),
            "coalesce": coalesce,
        });
        match self
            .query(Op::Rotate, Bearer::Token(secret), arguments)
            .await?
        {
            Answer::Data(value) => Ok(Ok(value)),
            // Unknown, expired or revoked: Fauna refused the bearer. An access token (or a
            // Fauna token the broker did not mint) lacks the role that may call the function.
            Answer::Unauthorized => Ok(Err(RefreshOutcome::Inactive)),
            Answer::QueryError(code) if code == "permission_denied" => {
                Ok(Err(RefreshOutcome::Inactive))
            }
            other => Err(unexpected_answer(Op::Rotate, &other)),
        }
    }

    /// Stores the sealed successor `pair` of the presented refresh token `presented` for the
    /// grace window, which `closes` (the second request of a rotation with a replay key). A
    /// failure is only
    /// logged: the caller has its pair, and a later presentation that finds no sealed
    /// successor waits, then supersedes it.
    async fn seal_successor(
        &self,
        presented: &SecretString,
        key: &ReplayKey,
        pair: &MintedPair,
        closes: UnixMicros,
    ) {
        let sealed = key.seal_successor_with_ids(presented, &pair.refresh, &pair.access);
        let arguments = json!({
            "row": hex::encode(successor_row(presented)),
            "successor": pair.refresh.id.as_str(),
            "sealed": sealed_json(&sealed, pair),
            "refresh_expires": wire::time(pair.refresh.expires_at),
            "access_expires": wire::time(pair.access.expires_at),
            "closes": wire::time(closes),
        });
        match self
            .query(Op::SealSuccessor, Bearer::Server, arguments)
            .await
        {
            Ok(Answer::Data(Value::Bool(true))) => {}
            Ok(other) => drop(unexpected_answer(Op::SealSuccessor, &other)),
            Err(err) => warn!(
                error = %err,
                "fauna: sealing the rotation's successor failed; a repeated presentation will \
                 supersede it"
            ),
        }
    }

    /// Waits for the sealed successor that a `coalesce` answer names, reading it every
    /// [`REPLAY_POLL`] for up to [`REPLAY_WAIT`] (and the query timeout, and the caller's
    /// deadline); `None` when it was not sealed in time, is no longer current, or was sealed
    /// under another key.
    async fn await_successor(
        &self,
        presented: &SecretString,
        key: &ReplayKey,
        coalesce: &Value,
    ) -> StoreResult<Option<RefreshOutcome>> {
        let (Some(account), Some(family), Some(successor), Some(rotated_at)) = (
            coalesce["account"].as_str(),
            coalesce["family"].as_str(),
            coalesce["successor"].as_str(),
            coalesce["rotated_at"].as_str().and_then(wire::parse_time),
        ) else {
            return Err(unexpected(Op::Rotate, "a successor to coalesce on"));
        };
        let arguments = json!({
            "row": hex::encode(successor_row(presented)),
            "successor": successor,
        });
        let waited = std::time::Instant::now();
        let bound = self.config.query_timeout().min(REPLAY_WAIT);
        loop {
            let state = match self
                .query(Op::SuccessorState, Bearer::Server, arguments.clone())
                .await?
            {
                Answer::Data(state) => state,
                other => return Err(unexpected_answer(Op::SuccessorState, &other)),
            };
            if !state.is_null() {
                let stored = StoredSuccessor {
                    account_id: AccountId::from_stored(account.to_owned()),
                    family_id: FamilyId::from_stored(family.to_owned()),
                    refresh_expires: state["refresh_expires"]
                        .as_str()
                        .and_then(wire::parse_time)
                        .ok_or_else(|| unexpected(Op::SuccessorState, "expiries"))?,
                    access_expires: state["access_expires"]
                        .as_str()
                        .and_then(wire::parse_time)
                        .ok_or_else(|| unexpected(Op::SuccessorState, "expiries"))?,
                };
                let (sealed, ids) = sealed_from(&state["sealed"])
                    .ok_or_else(|| unexpected(Op::SuccessorState, "a sealed pair"))?;
                let pair = match key.open_successor_with_ids(presented, stored, ids, &sealed) {
                    Ok(pair) => pair,
                    // Sealed before the key changed: supersede it, as the postgres store does.
                    Err(OpenError::OtherKey) => return Ok(None),
                    Err(err) => {
                        return Err(open_error(
                            err,
                            "the rotation's successor was sealed under another tokens.replay_key",
                            "the rotation's sealed successor does not open: corrupt or forged",
                        ));
                    }
                };
                debug!(family_id = %pair.family_id, refresh_token_id = %pair.refresh.id, "fauna: replayed a rotation's sealed successor");
                return Ok(Some(RefreshOutcome::Replayed { pair, rotated_at }));
            }
            let left = deadline::remaining().unwrap_or(bound);
            if waited.elapsed() + REPLAY_POLL >= bound || left <= REPLAY_POLL * 2 {
                return Ok(None);
            }
            tokio::time::sleep(REPLAY_POLL).await;
        }
    }

    /// Runs an issue query and reads its answer.
    async fn mint(&self, op: Op, arguments: Value) -> StoreResult<Answer> {
        self.query(op, Bearer::Server, arguments).await
    }

    /// Runs a server-key query whose answer is a count of revoked tokens.
    async fn revoke_count(&self, op: Op, arguments: Value) -> StoreResult<u64> {
        match self.query(op, Bearer::Server, arguments).await? {
            Answer::Data(value) => value
                .as_u64()
                .ok_or_else(|| unexpected(op, "a revocation count")),
            other => Err(unexpected_answer(op, &other)),
        }
    }
}

#[async_trait]
impl TokenStore for FaunaStore {
    async fn issue(&self, session: NewSession) -> StoreResult<MintedPair> {
        let value = self.issue_query(&session, None).await?.0;
        minted(Op::IssueByEmail, value)
    }

    async fn issue_once(
        &self,
        session: NewSession,
        claim: &ReplayClaim,
    ) -> StoreResult<Option<(MintedPair, bool)>> {
        let row = hex::encode(claim.row);
        let (mut value, nonce) = self
            .issue_query(&session, Some((&row, claim.window)))
            .await?;
        if value.get("claim").is_none() {
            // This call claimed the row: seal its pair into the claim (the second request).
            let pair = minted(Op::IssueOnceByEmail, value)?;
            self.seal_replay(&row, &nonce, claim, &pair).await;
            return Ok(Some((pair, false)));
        }
        // Another call (on any broker) claimed the row within its window: its pair, once it
        // is sealed.
        let mut state = value["claim"].take();
        let waited = std::time::Instant::now();
        let bound = self.config.query_timeout().min(REPLAY_WAIT);
        loop {
            if !state["sealed"].is_null() {
                return open_replay(claim, &state).map(|pair| Some((pair, true)));
            }
            let left = deadline::remaining().unwrap_or(bound);
            if waited.elapsed() + REPLAY_POLL >= bound || left <= REPLAY_POLL * 2 {
                break;
            }
            tokio::time::sleep(REPLAY_POLL).await;
            state = match self
                .query(Op::ReplayState, Bearer::Server, json!({ "row": &row }))
                .await?
            {
                // The claim's window closed while waiting.
                Answer::Data(Value::Null) => break,
                Answer::Data(state) => state,
                other => return Err(unexpected_answer(Op::ReplayState, &other)),
            };
        }
        // The claiming call never sealed its pair (its broker died between its two requests,
        // or its second request failed): mint a pair of this call's own, outside the claim. A
        // second session for one sign-in is a wasted session, not a weaker one.
        warn!(
            family_id = state["family"].as_str().unwrap_or_default(),
            "fauna: the idempotency key's claim has no sealed pair; issuing a second pair"
        );
        self.issue(session).await.map(|pair| Some((pair, false)))
    }

    async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> StoreResult<RefreshOutcome> {
        if !plausible_secret(secret) {
            return Ok(RefreshOutcome::Inactive);
        }
        // Without a grace window nothing could answer a sealed successor.
        let key = rotation
            .replay
            .clone()
            .filter(|_| !rotation.grace.is_zero());
        let mut value = match self.rotate(secret, &rotation, key.is_some()).await? {
            Ok(value) => value,
            Err(done) => return Ok(done),
        };
        if outcome(&value) == "coalesce" {
            // Another presentation rotated the token within the grace window: its successor,
            // once its broker has sealed it.
            let key = key
                .as_ref()
                .ok_or_else(|| unexpected(Op::Rotate, "an outcome"))?;
            if let Some(replayed) = self.await_successor(secret, key, &value).await? {
                return Ok(replayed);
            }
            // Never sealed (that broker died between its two requests, or its seal failed):
            // rotate as without a replay key, superseding that successor.
            warn!(
                family_id = value["family"].as_str().unwrap_or_default(),
                "fauna: the rotation's successor was never sealed; superseding it"
            );
            value = match self.rotate(secret, &rotation, false).await? {
                Ok(value) => value,
                Err(done) => return Ok(done),
            };
        }
        Ok(match outcome(&value) {
            "rotated" => {
                // Fauna's transaction time: the grace window counts from here at the latest.
                let now = value["now"].as_str().and_then(wire::parse_time);
                let pair = minted(Op::Rotate, value)?;
                if let Some(key) = &key {
                    let closes = now.unwrap_or(pair.refresh.expires_at).plus(rotation.grace);
                    self.seal_successor(secret, key, &pair, closes).await;
                }
                RefreshOutcome::Rotated(pair)
            }
            "inactive" => RefreshOutcome::Inactive,
            "wrong_client" => RefreshOutcome::WrongClient,
            "no_policy" => {
                error!("fauna has no BrokerPolicy; no refresh token can rotate");
                return Err(misconfigured("fauna has no broker policy"));
            }
            "reuse" => RefreshOutcome::ReuseDetected {
                family_id: FamilyId::from_stored(
                    value["family"].as_str().unwrap_or_default().to_owned(),
                ),
                revoked: value["revoked"].as_u64().unwrap_or(0),
            },
            _ => return Err(unexpected(Op::Rotate, "an outcome")),
        })
    }

    async fn introspect(&self, secret: &SecretString) -> StoreResult<Option<TokenInfo>> {
        if !plausible_secret(secret) {
            return Ok(None);
        }
        let value = match self
            .query(Op::Introspect, Bearer::Token(secret), json!({}))
            .await?
        {
            Answer::Data(Value::Null) | Answer::Unauthorized => return Ok(None),
            Answer::Data(value) => value,
            other => return Err(unexpected_answer(Op::Introspect, &other)),
        };
        let doc: TokenDoc =
            serde_json::from_value(value).map_err(|_| unexpected(Op::Introspect, "a token"))?;
        Ok(doc.into_info())
    }

    async fn revoke_secret(
        &self,
        secret: &SecretString,
        client: &ClientCheck,
    ) -> StoreResult<SecretRevocation> {
        if !plausible_secret(secret) {
            return Ok(SecretRevocation::NotActive);
        }
        let arguments = json!({
            "client_id": wire::opt_str(client.client_id()),
            "any_client": *client == ClientCheck::Any,
        });
        let value = match self
            .query(Op::RevokeSecret, Bearer::Token(secret), arguments)
            .await?
        {
            Answer::Data(value) => value,
            Answer::Unauthorized => return Ok(SecretRevocation::NotActive),
            Answer::QueryError(code) if code == "permission_denied" => {
                return Ok(SecretRevocation::NotActive);
            }
            other => return Err(unexpected_answer(Op::RevokeSecret, &other)),
        };
        Ok(match outcome(&value) {
            "revoked" => SecretRevocation::Revoked(value["revoked"].as_u64().unwrap_or(0)),
            "inactive" => SecretRevocation::NotActive,
            "wrong_client" => SecretRevocation::WrongClient,
            _ => return Err(unexpected(Op::RevokeSecret, "an outcome")),
        })
    }

    async fn revoke(&self, target: RevokeTarget) -> StoreResult<u64> {
        match target {
            RevokeTarget::Token(id) if is_fauna_id(id.as_str()) => {
                self.revoke_count(Op::RevokeToken, json!({ "token_id": id.as_str() }))
                    .await
            }
            RevokeTarget::Family(family) => match family_account(&family) {
                Some(account) => {
                    self.revoke_count(
                        Op::RevokeFamily,
                        json!({ "account_id": account, "family": family.as_str() }),
                    )
                    .await
                }
                None => Ok(0),
            },
            RevokeTarget::Account(account) if is_fauna_id(account.as_str()) => {
                self.revoke_count(Op::RevokeAccount, json!({ "account_id": account.as_str() }))
                    .await
            }
            // Not an id Fauna could have minted: nothing to revoke.
            RevokeTarget::Token(_) | RevokeTarget::Account(_) => Ok(0),
        }
    }

    async fn revoke_email(&self, email: &Email) -> StoreResult<Option<(AccountId, u64)>> {
        let arguments = json!({ "email": email.as_str() });
        match self
            .query(Op::RevokeEmail, Bearer::Server, arguments)
            .await?
        {
            Answer::Data(Value::Null) => Ok(None),
            Answer::Data(value) => match (value["account"].as_str(), value["revoked"].as_u64()) {
                (Some(account), Some(revoked)) => {
                    Ok(Some((AccountId::from_stored(account.to_owned()), revoked)))
                }
                _ => Err(unexpected(Op::RevokeEmail, "an account and a count")),
            },
            other => Err(unexpected_answer(Op::RevokeEmail, &other)),
        }
    }

    async fn account_by_email(&self, email: &Email) -> StoreResult<Option<AccountId>> {
        match self
            .query(
                Op::AccountByEmail,
                Bearer::Server,
                json!({ "email": email.as_str() }),
            )
            .await?
        {
            Answer::Data(Value::Null) => Ok(None),
            Answer::Data(Value::String(id)) => Ok(Some(AccountId::from_stored(id))),
            other => Err(unexpected_answer(Op::AccountByEmail, &other)),
        }
    }

    async fn list_tokens(&self, account: &AccountId, page: PageRequest) -> StoreResult<TokenPage> {
        if !is_fauna_id(account.as_str()) {
            return Ok(TokenPage {
                tokens: Vec::new(),
                next: None,
            });
        }
        let (after_issued_at, after_id) = match &page.after {
            Some(cursor) => (cursor.issued_at, cursor.id.to_string()),
            None => (UnixMicros(253_402_300_799_999_999), String::new()),
        };
        let arguments = json!({
            "account_id": account.as_str(),
            "after_issued_at": wire::time(after_issued_at),
            "after_id": after_id,
            "include_consumed": page.include_inactive,
            "limit": wire::int(u64::from(page.size) + 1),
        });
        let docs = match self
            .query(Op::ListTokens, Bearer::Server, arguments)
            .await?
        {
            Answer::Data(Value::Array(docs)) => docs,
            other => return Err(unexpected_answer(Op::ListTokens, &other)),
        };
        let tokens = docs
            .into_iter()
            .map(|doc| {
                serde_json::from_value::<TokenDoc>(doc)
                    .ok()
                    .and_then(TokenDoc::into_record)
                    .ok_or_else(|| unexpected(Op::ListTokens, "token documents"))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(TokenPage::from_overfetch(tokens, page.size))
    }

    async fn close(&self) -> StoreResult<()> {
        // Nothing is buffered here: every acknowledged write was committed by Fauna.
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// A token document as Fauna returns it (untagged). `secret` appears only in create results.
#[derive(Debug, Deserialize)]
struct TokenDoc {
    id: String,
    document: Option<DocRef>,
    ttl: Option<String>,
    #[serde(default)]
    data: TokenData,
}

#[derive(Debug, Deserialize)]
struct DocRef {
    id: String,
}

/// The broker's bookkeeping in a token's `data`; see [`queries`].
#[derive(Debug, Default, Deserialize)]
struct TokenData {
    kind: Option<String>,
    family: Option<String>,
    parent: Option<String>,
    email: Option<String>,
    cognito_sub: Option<String>,
    client_id: Option<String>,
    issued_at: Option<String>,
    replaced_by: Option<String>,
    rotated_at: Option<String>,
    #[serde(default)]
    superseded: bool,
    #[serde(default)]
    metadata: Metadata,
}

impl TokenDoc {
    /// The token's facts if it is one of the broker's and neither consumed nor superseded.
    fn into_info(self) -> Option<TokenInfo> {
        if self.data.replaced_by.is_some() || self.data.superseded {
            return None;
        }
        Some(TokenInfo {
            id: TokenId::from_stored(self.id),
            kind: TokenKind::from_stored(self.data.kind.as_deref()?)?,
            account_id: AccountId::from_stored(self.document?.id),
            email: Email::from_stored(self.data.email?),
            cognito_sub: self.data.cognito_sub,
            family_id: FamilyId::from_stored(self.data.family?),
            client_id: self.data.client_id,
            issued_at: wire::parse_time(self.data.issued_at.as_deref()?)?,
            expires_at: wire::parse_time(self.ttl.as_deref()?)?,
        })
    }

    fn into_record(self) -> Option<TokenRecord> {
        let rotated_at = self.data.rotated_at.as_deref().and_then(wire::parse_time);
        let state = if self.data.superseded {
            TokenState::Revoked
        } else if self.data.replaced_by.is_some() {
            TokenState::Rotated
        } else {
            TokenState::Active
        };
        Some(TokenRecord {
            id: TokenId::from_stored(self.id),
            kind: TokenKind::from_stored(self.data.kind.as_deref()?)?,
            family_id: FamilyId::from_stored(self.data.family?),
            parent_id: self.data.parent.map(TokenId::from_stored),
            state,
            issued_at: wire::parse_time(self.data.issued_at.as_deref()?)?,
            expires_at: wire::parse_time(self.ttl.as_deref()?)?,
            revoked_at: rotated_at,
            replaced_by: self.data.replaced_by.map(TokenId::from_stored),
            client_id: self.data.client_id,
            metadata: self.data.metadata,
        })
    }
}

/// A minted pair as the issue and rotate queries answer it.
#[derive(Deserialize)]
struct Minted {
    account: String,
    family: String,
    refresh: MintedDoc,
    access: MintedDoc,
}

#[derive(Deserialize)]
struct MintedDoc {
    id: String,
    secret: SecretString,
    ttl: String,
}

fn minted(op: Op, value: Value) -> StoreResult<MintedPair> {
    let minted: Minted =
        serde_json::from_value(value).map_err(|_| unexpected(op, "a minted pair"))?;
    let token = |doc: MintedDoc| -> StoreResult<MintedToken> {
        Ok(MintedToken {
            id: TokenId::from_stored(doc.id),
            secret: doc.secret,
            expires_at: wire::parse_time(&doc.ttl).ok_or_else(|| unexpected(op, "a ttl"))?,
        })
    };
    Ok(MintedPair {
        account_id: AccountId::from_stored(minted.account),
        family_id: FamilyId::from_stored(minted.family),
        refresh: token(minted.refresh)?,
        access: token(minted.access)?,
    })
}

/// How long a call that found another call's claim without its pair waits for it, at most (and
/// at most the query timeout).
const REPLAY_WAIT: Duration = Duration::from_secs(2);

/// How often that call reads the claim again while it waits.
const REPLAY_POLL: Duration = Duration::from_millis(50);

/// A sealed pair as the queries store it: hex strings, and the ids it is bound to.
fn sealed_json(sealed: &SealedPair, pair: &MintedPair) -> Value {
    json!({
        "key_id": sealed.key_id,
        "nonce": hex::encode(&sealed.nonce),
        "ciphertext": hex::encode(&sealed.ciphertext),
        "refresh_id": pair.refresh.id.as_str(),
        "access_id": pair.access.id.as_str(),
    })
}

/// Reads a sealed pair stored by [`sealed_json`].
fn sealed_from(sealed: &Value) -> Option<(SealedPair, (TokenId, TokenId))> {
    let text = |field: &str| sealed[field].as_str().map(str::to_owned);
    let bytes = |field: &str| hex::decode(sealed[field].as_str()?).ok();
    Some((
        SealedPair {
            key_id: text("key_id")?,
            nonce: bytes("nonce")?,
            ciphertext: bytes("ciphertext")?,
        },
        (
            TokenId::from_stored(text("refresh_id")?),
            TokenId::from_stored(text("access_id")?),
        ),
    ))
}

fn open_error(err: OpenError, other_key: &str, corrupt: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Internal,
        match err {
            OpenError::OtherKey => other_key,
            OpenError::Corrupt => corrupt,
        },
        None,
    )
}

/// Opens the sealed pair of a claim's state (`{ account, family, sealed }`).
fn open_replay(claim: &ReplayClaim, state: &Value) -> StoreResult<MintedPair> {
    let (Some(account), Some((sealed, ids))) =
        (state["account"].as_str(), sealed_from(&state["sealed"]))
    else {
        return Err(unexpected(Op::ReplayState, "a sealed pair"));
    };
    claim
        .key
        .open_with_ids(
            &claim.row,
            AccountId::from_stored(account.to_owned()),
            ids,
            &sealed,
        )
        .map_err(|err| {
            open_error(
                err,
                "the idempotency key's pair was sealed under another tokens.replay_key",
                "the idempotency key's sealed pair does not open: corrupt or forged",
            )
        })
}

fn outcome(value: &Value) -> &str {
    value["outcome"].as_str().unwrap_or_default()
}

/// Whether a presented secret could be a Fauna secret: `fn` and base64url, nothing that could
/// change the bearer's meaning (Fauna reads `:` as a scope suffix) or break the header.
fn plausible_secret(secret: &SecretString) -> bool {
    let value = secret.expose_secret();
    value.len() <= MAX_SECRET_LEN
        && value.len() > 10
        && value.starts_with("fn")
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Fauna document ids are decimal strings.
fn is_fauna_id(value: &str) -> bool {
    !value.is_empty() && value.len() <= 20 && value.bytes().all(|b| b.is_ascii_digit())
}

/// The account a family id names (`fam_<account id>_<nonce>`, as the issue queries build it).
fn family_account(family: &FamilyId) -> Option<&str> {
    let (account, nonce) = family.as_str().strip_prefix("fam_")?.split_once('_')?;
    (is_fauna_id(account) && !nonce.is_empty()).then_some(account)
}

/// Returns a back-off of `base · 2^(attempt-1)`, capped at 2 s, with full jitter.
fn backoff(attempt: u32, base: Duration) -> Duration {
    let cap = base
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(Duration::from_secs(2));
    let millis = u64::try_from(cap.as_millis()).unwrap_or(2000).max(1);
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}

fn misconfigured(message: &str) -> StoreError {
    StoreError::new(StoreErrorKind::Internal, message, None)
}

fn timed_out(query: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Timeout,
        format!("deadline reached before fauna answered {query}"),
        None,
    )
}

fn unexpected(op: Op, wanted: &str) -> StoreError {
    error!(
        query = op.query().0,
        wanted, "fauna answered with an unexpected shape"
    );
    StoreError::new(
        StoreErrorKind::Internal,
        format!("fauna's answer to {} is not {wanted}", op.query().0),
        None,
    )
}

fn unexpected_answer(op: Op, answer: &Answer) -> StoreError {
    let what = match answer {
        Answer::Data(_) => "an unexpected result".to_owned(),
        Answer::Unauthorized => "401 unauthorized".to_owned(),
        Answer::QueryError(code) => format!("query error {code}"),
    };
    error!(query = op.query().0, answer = %what, "fauna query failed");
    StoreError::new(
        StoreErrorKind::Internal,
        format!("fauna answered {} with {what}", op.query().0),
        None,
    )
}

/// Reads one Fauna answer the way the store does: classifies it by status and body, and when
/// it is a result, decodes it as each operation would (a minted pair, an outcome, a token, a
/// page of tokens). Returns the class. Only for the fuzz targets (`fuzz/`, feature `fuzzing`).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn decode_answer(status: u16, body: &[u8]) -> super::metrics::FaunaClass {
    let class = wire::classify(status, body);
    let label = class.label();
    if let Class::Ok { data, .. } = class {
        drop(minted(Op::IssueByEmail, data.clone()));
        std::hint::black_box(outcome(&data));
        if let Ok(doc) = serde_json::from_value::<TokenDoc>(data.clone()) {
            std::hint::black_box(doc.into_info());
        }
        if let Value::Array(docs) = data {
            for doc in docs {
                if let Ok(doc) = serde_json::from_value::<TokenDoc>(doc) {
                    std::hint::black_box(doc.into_record());
                }
            }
        }
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_name_their_queries_in_order() {
        assert_eq!(Op::ALL.len(), queries::ALL.len());
        assert_eq!(Op::Rotate.query().1, queries::ROTATE);
        assert_eq!(Op::ListTokens.query().1, queries::LIST_TOKENS);
    }

    #[test]
    fn only_plausible_fauna_secrets_are_sent() {
        let ok = SecretString::from("fnEFuPI105NLhwWIsww5nUU_jq6lwq4P2ka4nGhRt6gaJemtCyI");
        assert!(plausible_secret(&ok));
        for bad in [
            "secret",
            "fnEabc:@doc/Account/1",
            "fnE abc defghijkl",
            "tba_0123",
            "fnE\nX-Injected: 1",
        ] {
            assert!(!plausible_secret(&SecretString::from(bad)), "{bad:?}");
        }
    }

    #[test]
    fn family_ids_name_their_account() {
        let family = FamilyId::from_stored("fam_412650000000000001_a1b2".into());
        assert_eq!(family_account(&family), Some("412650000000000001"));
        for bad in ["fam_x_1", "fam_1", "fam_1_", "other"] {
            assert_eq!(family_account(&FamilyId::from_stored(bad.into())), None);
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..20 {
            let wait = backoff(attempt, Duration::from_millis(100));
            assert!(wait <= Duration::from_secs(2));
            assert!(wait >= Duration::from_millis(50));
        }
    }
}
