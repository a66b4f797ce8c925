//! A test double of FaunaDB's FQL v10 endpoint (`POST /query/1`) that answers the broker's fixed
//! queries (`broker/src/store/fauna/queries.rs` and the two UDFs of `deploy/fauna/schema.fsl`)
//! with Fauna's behaviour as written down in `reference/fauna-wire.md`.
//!
//! It is a real HTTP server (HTTP/1.1, and h2c with prior knowledge) on `127.0.0.1:0`. It checks
//! what the real endpoint checks, in the real endpoint's order (§1.2–§1.3, from `CoreApplication`
//! and `FQL2Endpoint`): the request-info headers, `X-Query-Tags`, `X-Format` and the boolean
//! headers, the body, the bearer (server keys, and `fnE…` token secrets in the §2.3 layout that
//! it mints itself), the `arguments` in the request's format, the query text, the caller's
//! privileges; then it runs the query as one serialised transaction and answers with the exact
//! response and error JSON of §1.4–§1.6. Time comes from an injected [`Clock`]; tokens expire at
//! their `ttl`. [`FaunaDouble::inject`] makes the next requests fail with one of Fauna's fault
//! classes instead.
//!
//! A query is recognised by the SHA-256 of its exact text ([`KNOWN_QUERIES`]); any other text is
//! answered with `invalid_query`, so the broker cannot drift from what this double implements.
//!
//! Not modelled:
//! - FQL itself: only the known texts run, each implemented by hand from its source;
//! - type checking: the database behaves as one created with `typechecked: false`, so bad
//!   arguments give runtime errors and no response carries `static_type`; `X-Typecheck`,
//!   `X-Linearized`, `X-Performance-Hints`, `X-Last-Txn-Ts` and `X-Max-Contention-Retries` are
//!   validated and recorded, nothing more;
//! - contention: requests are serialised, so there is none (and `contention_retries` is 0) unless
//!   injected; the query timeout is never reached unless injected;
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

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    convert::Infallible,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::Incoming,
    header::{CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rand::RngCore;
use secrecy::SecretString;
use serde_json::{Map, Value as Json, json};
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokenbroker::model::clock::Clock;
use tokio::{
    net::TcpListener,
    task::{JoinHandle, JoinSet},
};

/// The server key the double accepts (a root-key form of §5: `secret` scoped to the `server`
/// role).
pub const SERVER_KEY: &str = "secret:server";

/// The broker's query texts the double implements: the SHA-256 (hex) of each exact text, with
/// the name `queries::ALL` gives it. Computed from `broker/src/store/fauna/queries.rs`; when a
/// text changes there, the double answers it with `invalid_query` until this table and the
/// implementation below are updated.
pub const KNOWN_QUERIES: &[(&str, &str)] = &[
    (
        "original_lookup",
        "548a713760683bbce896b03cab308cac647e81a1d6e3fee65cdf3ab994e6ce96",
    ),
    (
        "original_register",
        "768bf8c922b1ae66a199ae642eb073762874ee028be37355188bdc9a907c1ab0",
    ),
    (
        "original_create_refresh",
        "f68f0923c857eeb5dc53cce6706b09b204337fc461a2b5d2be8abd1ba5793184",
    ),
    (
        "original_create_access",
        "dccc9e2e3ab1c803ebdaa95a11b187d6106e8cdb7e6ce32ff8e31cc6ed1788a0",
    ),
    (
        "issue_by_email",
        "21155c698affe0b48ab52174f150833acfdf62506d5729aba85a4c6079db1e94",
    ),
    (
        "issue_for_account",
        "50920a39155223d1163b245b6619a0d1c8eb97ec90df81bd66a0ddcbd0757728",
    ),
    (
        "rotate",
        "06999130187701c5ee493d938172a40ff7faae423a672c96b2e3dbd32d7e05dc",
    ),
    (
        "introspect",
        "6e30b3a04a69703f3d3f709b4c3e57122237eba70c7788dfff42221650454672",
    ),
    (
        "revoke_secret",
        "e82506d60b113101d4e328370bfa20fa0c0245bfc1c4ee85c3ce820fae41d0ca",
    ),
    (
        "revoke_token",
        "5a23596ad197050b5ac2a6b1d92db0157d7f7e6f076dd9086dee1fbb80237e15",
    ),
    (
        "revoke_family",
        "e315f29dfb89c1e6ecc1f128c9cd7868bdca31498a535611c1962767e0e6c22f",
    ),
    (
        "revoke_account",
        "d71a355897dbc1ebd77f3b0a82d1dde0f5ee6e18e5c15ccf1fdbec048c1b1887",
    ),
    (
        "account_by_email",
        "b952a4113bb6dc756efb6b84b64269984b4103db349053a7c798cef7228718ad",
    ),
    (
        "list_tokens",
        "28fe91e6b05fcd4704af9e74384d47eda415551f3a28979809716ad8261eb503",
    ),
];

/// A failure the double answers with instead of running the request (§1.5's table).
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
    /// Something in the token secret layout of §2.3, valid or not.
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
    /// What the bearer was.
    pub bearer: Bearer,
    /// The answer's HTTP status; `None` while the request is still being answered.
    pub status: Option<u16>,
    /// The injected fault the request got, if any.
    pub fault: Option<Fault>,
    /// `X-Query-Tags`.
    pub query_tags: Option<String>,
    /// `X-Format`.
    pub format: Option<String>,
    /// `X-Query-Timeout-Ms`.
    pub query_timeout_ms: Option<String>,
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
    /// If no loopback port can be bound.
    pub async fn start(clock: Arc<dyn Clock>) -> Self {
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
            faults: Mutex::new(VecDeque::new()),
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

    /// Makes the next `times` requests get `fault` instead of running (after any earlier
    /// injections are used up).
    pub fn inject(&self, fault: Fault, times: u32) {
        let mut faults = lock(&self.shared.faults);
        faults.extend(std::iter::repeat_n(fault, times as usize));
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

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |req| serve(Arc::clone(&shared), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Answers one HTTP request.
async fn serve(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let parsed = parse_body(&body);
    let query = match &parsed {
        Ok(RequestBody {
            text: Some(text), ..
        }) => recognise(text).ok(),
        _ => None,
    };
    let fault = lock(&shared.faults).pop_front();
    let index = shared.record(&parts.headers, query, fault);
    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let reply = match fault {
        None => shared.process(parts.uri.path(), &parts.headers, &parsed),
        Some(Fault::Slow(delay)) => {
            let reply = shared.process(parts.uri.path(), &parts.headers, &parsed);
            tokio::time::sleep(delay).await;
            reply
        }
        Some(fault) => fault_reply(fault, &parts.headers),
    };
    if let Some(recorded) = lock(&shared.requests).get_mut(index) {
        recorded.status = Some(reply.status);
    }
    tracing::debug!(query = ?query.map(|q| q.0), status = reply.status, "fauna double answered");
    Ok(reply.into_response())
}

/// State shared by the handle and the server task.
struct Shared {
    clock: Arc<dyn Clock>,
    keys: Vec<String>,
    database_id: i64,
    schema_version: i64,
    latency: Mutex<Duration>,
    faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<Vec<Recorded>>,
    db: Mutex<Db>,
}

/// An HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    unauthorized: bool,
}

impl Reply {
    fn json(status: u16, body: &Json) -> Self {
        Self {
            status,
            body: serde_json::to_vec(body).expect("JSON values serialise"),
            unauthorized: false,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=utf-8"),
        );
        if self.unauthorized {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A protocol error (§1.5): only `error`, plus `query_tags` when the server had parsed them.
fn protocol_error(status: u16, code: &str, message: &str, tags: Option<&str>) -> Reply {
    let mut body = json!({ "error": { "code": code, "message": message } });
    if let Some(tags) = tags {
        body["query_tags"] = json!(tags);
    }
    Reply::json(status, &body)
}

/// The answer to an injected fault. Faults are raised as exceptions, which the server renders
/// without the request's tags (`CoreApplication.recover` with `errResInfo()`).
fn fault_reply(fault: Fault, headers: &HeaderMap) -> Reply {
    match fault {
        Fault::Contended => protocol_error(
            409,
            "contended_transaction",
            "Transaction was aborted due to detection of concurrent modification.",
            None,
        ),
        Fault::RateLimited => {
            let body = json!({
                "error": { "code": "limit_exceeded", "message": "Rate limit exceeded" },
                "stats": stats_json(&Stats::default(), 0, &["read"]),
            });
            Reply::json(429, &body)
        }
        Fault::ClientTimeout => {
            // `AggressiveTimeoutException`: the deadline passed in under 1 s, or in under twice
            // the expected query time.
            let within = header(headers, "x-query-timeout-ms")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(120_000);
            let needs = if within < 1000 { 1000 } else { within * 2 };
            let message = format!(
                "Client set aggressive deadline: query needs {needs}, timed out within {within}"
            );
            protocol_error(440, "time_out", &message, None)
        }
        Fault::Internal => protocol_error(
            500,
            "internal_error",
            "java.lang.IllegalStateException: fault injected by the test double \
             Please create a ticket at https://support.fauna.com",
            None,
        ),
        Fault::Unavailable => protocol_error(503, "time_out", "Read timed out", None),
        Fault::EmptyBody => Reply {
            status: 200,
            body: Vec::new(),
            unauthorized: false,
        },
        Fault::MalformedBody => Reply {
            status: 200,
            body: br#"{"data":{"account":"41265432198765"#.to_vec(),
            unauthorized: false,
        },
        Fault::Slow(_) => unreachable!("a slow answer runs the query"),
    }
}

/// Returns a header's value as text (lossily, as Netty would hand it over).
fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn invalid_header(name: &str, error: &str) -> Reply {
    protocol_error(
        400,
        "invalid_request",
        &format!("Invalid header '{name}': {error}"),
        None,
    )
}

/// The value formats of §1.2 / §1.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Simple,
    Tagged,
    Decorated,
}

/// A request body that parsed (§1.3).
#[derive(Debug)]
struct RequestBody {
    /// The query text; `None` for a template with values, which the double cannot run.
    text: Option<String>,
    arguments: Option<Map<String, Json>>,
}

/// Parses the body, or returns the `invalid_request` message (`FQL2Endpoint.getRequestBody`).
fn parse_body(body: &[u8]) -> Result<RequestBody, String> {
    if body.is_empty() {
        return Err("No request body provided".into());
    }
    let json: Json = match serde_json::from_slice(body) {
        Ok(json) => json,
        Err(e) if e.to_string().contains("recursion limit") => {
            return Err("Invalid request body: JSON exceeds nesting limit".into());
        }
        Err(e) if e.is_syntax() || e.is_eof() => {
            return Err(format!("Invalid request body: {e}"));
        }
        Err(_) => return Err("Invalid request body".into()),
    };
    let invalid = || "Invalid request body".to_owned();
    let Json::Object(mut fields) = json else {
        return Err(invalid());
    };
    let text = match fields.remove("query") {
        Some(Json::String(text)) => Some(text),
        Some(Json::Object(template)) => template_text(&template).ok_or_else(invalid)?,
        _ => return Err(invalid()),
    };
    let arguments = match fields.remove("arguments") {
        None | Some(Json::Null) => None,
        Some(Json::Object(arguments)) => Some(arguments),
        Some(_) => return Err(invalid()),
    };
    Ok(RequestBody { text, arguments })
}

/// Flattens a template query `{"fql": [...]}` made only of text (nested queries are wrapped in
/// parentheses, as the server does). `Some(None)` for a template holding values; `None` for one
/// that is not a template.
fn template_text(template: &Map<String, Json>) -> Option<Option<String>> {
    let Some(Json::Array(parts)) = template.get("fql") else {
        return None;
    };
    if template.len() != 1 {
        return None;
    }
    let mut text = String::new();
    for part in parts {
        match part {
            Json::String(s) => text.push_str(s),
            Json::Object(nested) if nested.contains_key("fql") => match template_text(nested)? {
                Some(inner) => {
                    text.push('(');
                    text.push_str(&inner);
                    text.push(')');
                }
                None => return Some(None),
            },
            Json::Object(o) if o.contains_key("value") || o.contains_key("array") => {
                return Some(None);
            }
            Json::Object(o) if o.contains_key("object") => return Some(None),
            _ => return None,
        }
    }
    Some(Some(text))
}

/// The query pattern of the Cognito trigger Lambda that tokenbroker replaces: four sequential
/// requests per sign-in (look the account up, register it if missing, create a refresh token,
/// create an access token). The double runs them so the benchmark can time that pattern next to
/// the broker's one request, against the same server with the same added latency. They are not
/// the broker's queries; `KNOWN_QUERIES` lists them under `original_*`.
pub mod original_lambda {
    /// `original_lookup`.
    pub const LOOKUP: &str = r#"Account.byEmail(email).first()"#;
    /// `original_register`.
    pub const REGISTER: &str = r#"Account.create({ email: email })"#;
    /// `original_create_refresh`.
    pub const CREATE_REFRESH: &str = r#"Token.create({ document: Account.byId(account_id), ttl: Time.now().add(ttl, "seconds"), data: { kind: "refresh" } })"#;
    /// `original_create_access`.
    pub const CREATE_ACCESS: &str = r#"Token.create({ document: Account.byId(account_id), ttl: Time.now().add(ttl, "seconds"), data: { kind: "access", parent: parent } })"#;
}

/// The broker's queries, and the original Lambda's, one per [`KNOWN_QUERIES`] row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    IssueByEmail,
    IssueForAccount,
    Rotate,
    Introspect,
    RevokeSecret,
    RevokeToken,
    RevokeFamily,
    RevokeAccount,
    AccountByEmail,
    ListTokens,
    OriginalLookup,
    OriginalRegister,
    OriginalCreateRefresh,
    OriginalCreateAccess,
}

impl Query {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "issue_by_email" => Self::IssueByEmail,
            "issue_for_account" => Self::IssueForAccount,
            "rotate" => Self::Rotate,
            "introspect" => Self::Introspect,
            "revoke_secret" => Self::RevokeSecret,
            "revoke_token" => Self::RevokeToken,
            "revoke_family" => Self::RevokeFamily,
            "revoke_account" => Self::RevokeAccount,
            "account_by_email" => Self::AccountByEmail,
            "list_tokens" => Self::ListTokens,
            "original_lookup" => Self::OriginalLookup,
            "original_register" => Self::OriginalRegister,
            "original_create_refresh" => Self::OriginalCreateRefresh,
            "original_create_access" => Self::OriginalCreateAccess,
            _ => return None,
        })
    }

    /// The text a token is refused at, for the `permission_denied` summary.
    fn guarded_call(self) -> &'static str {
        match self {
            Self::IssueByEmail | Self::AccountByEmail => "Account.byEmail(email)",
            Self::IssueForAccount | Self::RevokeFamily | Self::RevokeAccount | Self::ListTokens => {
                "Account.byId(account_id)"
            }
            Self::Rotate => "rotateRefreshToken(access_ttl, refresh_ttl, grace, client_id)",
            Self::RevokeSecret => "revokeCurrentToken(client_id)",
            Self::Introspect => "Query.token()",
            Self::RevokeToken => "Token.byId(token_id)",
            Self::OriginalLookup => "Account.byEmail(email)",
            Self::OriginalRegister => "Account.create(",
            Self::OriginalCreateRefresh | Self::OriginalCreateAccess => "Token.create(",
        }
    }
}

/// Returns the known query with this exact text (and its name), or the text's SHA-256 in hex.
fn recognise(text: &str) -> Result<(&'static str, Query), String> {
    let digest = hex_digest(text.as_bytes());
    KNOWN_QUERIES
        .iter()
        .find(|(_, hash)| *hash == digest)
        .and_then(|(name, _)| Query::from_name(name).map(|q| (*name, q)))
        .ok_or(digest)
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Shared {
    /// Records a request at receipt and returns its index.
    fn record(
        &self,
        headers: &HeaderMap,
        query: Option<(&'static str, Query)>,
        fault: Option<Fault>,
    ) -> usize {
        let bearer = match credential(headers) {
            None => Bearer::Missing,
            Some(secret) if self.keys.contains(&secret) => Bearer::Key,
            Some(secret) if decode_token_secret(&secret).is_some() => Bearer::Token,
            Some(_) => Bearer::Other,
        };
        let mut requests = lock(&self.requests);
        requests.push(Recorded {
            query: query.map(|(name, _)| name),
            bearer,
            status: None,
            fault,
            query_tags: header(headers, "x-query-tags"),
            format: header(headers, "x-format"),
            query_timeout_ms: header(headers, "x-query-timeout-ms"),
            last_txn_ts: header(headers, "x-last-txn-ts"),
            max_contention_retries: header(headers, "x-max-contention-retries"),
            traceparent: header(headers, "traceparent"),
            tracestate: header(headers, "tracestate"),
        });
        requests.len() - 1
    }

    /// Answers a request that got no fault.
    fn process(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: &Result<RequestBody, String>,
    ) -> Reply {
        if path != "/query/1" {
            // The real server hands every other path to the v4 router, which is not modelled.
            return protocol_error(404, "not_found", "Not found", None);
        }
        match self.try_process(headers, body) {
            Ok(reply) | Err(reply) => reply,
        }
    }

    fn try_process(
        &self,
        headers: &HeaderMap,
        body: &Result<RequestBody, String>,
    ) -> Result<Reply, Reply> {
        let started = Instant::now();
        // `FQL2Endpoint.getRequestInfo` (RequestParams), in its order.
        if let Some(v) = header(headers, "x-last-txn-ts") {
            v.parse::<i64>().map_err(|_| {
                invalid_header("x-last-txn-ts", &format!("Invalid timestamp '{v}'."))
            })?;
        }
        if let Some(v) = header(headers, "x-query-timeout-ms") {
            let error = match v.parse::<i64>() {
                Err(_) => Some(format!("Invalid number '{v}'.")),
                Ok(ms) if ms <= 0 => Some("Must be greater than 0.".to_owned()),
                Ok(ms) if ms > 600_000 => Some("Must be less than or equal to 600000.".to_owned()),
                Ok(_) => None,
            };
            if let Some(error) = error {
                return Err(invalid_header("x-query-timeout-ms", &error));
            }
        }
        if let Some(v) = header(headers, "x-max-contention-retries") {
            let error = match v.parse::<i32>() {
                Err(_) => Some(format!("Invalid number '{v}'.")),
                Ok(n) if !(0..=7).contains(&n) => Some("Must be between 0 and 7.".to_owned()),
                Ok(_) => None,
            };
            if let Some(error) = error {
                return Err(invalid_header("x-max-contention-retries", &error));
            }
        }
        // `QueryLogTags.fromHTTPHeader`.
        let tags = match header(headers, "x-query-tags") {
            None => None,
            Some(v) => parse_tags(&v).map_err(|e| invalid_header("x-query-tags", e))?,
        };
        // `FQL2Endpoint.getRequest`: format, then the boolean headers, then the body.
        let format = match header(headers, "x-format").as_deref() {
            None | Some("simple") => Format::Simple,
            Some("tagged") => Format::Tagged,
            Some("decorated") => Format::Decorated,
            Some(other) => {
                return Err(invalid_header(
                    "x-format",
                    &format!("Invalid format {other}"),
                ));
            }
        };
        for name in ["x-typecheck", "x-linearized", "x-performance-hints"] {
            if let Some(v) = header(headers, name)
                && !v.eq_ignore_ascii_case("true")
                && !v.eq_ignore_ascii_case("false")
            {
                return Err(invalid_header(name, "Must be a boolean value."));
            }
        }
        let body = body
            .as_ref()
            .map_err(|message| protocol_error(400, "invalid_request", message, None))?;

        let mut db = lock(&self.db);
        let now_micros = db.tick(self.clock.now().0);
        let mut txn = Txn {
            db: &mut db,
            now: i128::from(now_micros) * 1000,
            database_id: self.database_id,
            stats: Stats::default(),
        };
        let tags = tags.as_deref();

        // Authentication (§2.4): a 401 is rendered with the request's tags.
        let caller = credential(headers)
            .and_then(|secret| txn.authenticate(&self.keys, &secret))
            .ok_or_else(|| {
                let mut reply = protocol_error(401, "unauthorized", "Access token required", tags);
                reply.unauthorized = true;
                reply
            })?;

        // Arguments, decoded in the request's format (FQL2Endpoint.exec).
        let mut arguments = BTreeMap::new();
        for (key, raw) in body.arguments.iter().flatten() {
            let value = match format {
                Format::Simple => Ok(decode_simple(raw)),
                Format::Tagged | Format::Decorated => decode_tagged(raw),
            }
            .map_err(|error| {
                protocol_error(
                    400,
                    "invalid_request",
                    &format!("Invalid argument '{key}': {error}"),
                    tags,
                )
            })?;
            arguments.insert(key.clone(), value);
        }

        let respond = |txn: &Txn<'_>, result: Result<Value, Failure>, text: &str| {
            let query_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let mut body = match result {
                Ok(value) => json!({ "data": encode(&value, format), "summary": "" }),
                Err(failure) => {
                    let mut error = json!({ "code": failure.code, "message": failure.message });
                    let constraint_failures = failure
                        .extra
                        .as_ref()
                        .and_then(|e| e.constraint_failures.as_ref());
                    if let Some(constraint_failures) = constraint_failures {
                        error["constraint_failures"] = constraint_failures.clone();
                    }
                    json!({ "error": error, "summary": failure.summary(text) })
                }
            };
            body["txn_ts"] = json!(now_micros);
            body["stats"] = stats_json(&txn.stats, query_ms, &[]);
            body["schema_version"] = json!(self.schema_version);
            if let Some(tags) = tags {
                body["query_tags"] = json!(tags);
            }
            let status = if body.get("error").is_some() {
                400
            } else {
                200
            };
            Reply::json(status, &body)
        };

        let Some(text) = body.text.as_deref() else {
            let failure = Failure::new(
                "invalid_query",
                "The query failed 1 validation check".into(),
            )
            .with_summary(
                "error: the Fauna test double runs only the broker's fixed query texts, \
                 not templates with values",
            );
            return Ok(respond(&txn, Err(failure), ""));
        };
        let query = match recognise(text) {
            Ok((_, query)) => query,
            Err(digest) => {
                let failure = Failure::new(
                    "invalid_query",
                    "The query failed 1 validation check".into(),
                )
                .with_summary(&format!(
                    "error: the Fauna test double does not know this query text \
                     (sha256 {digest}); it runs only the texts in KNOWN_QUERIES \
                     (tests/src/fauna.rs)"
                ));
                return Ok(respond(&txn, Err(failure), text));
            }
        };
        let result = txn.run(query, &caller, &Args(&arguments));
        Ok(respond(&txn, result, text))
    }
}

/// Parses `X-Query-Tags` into the echo the server sends back, or the error message.
///
/// Mirrors `QueryLogTags.fromHTTPHeader`: it folds the pairs from the right, so the first
/// error found from the right is the one reported, a duplicate is reported at its left
/// occurrence, and the echoed tags come back in reverse order.
fn parse_tags(header: &str) -> Result<Option<String>, &'static str> {
    if header.len() > 3000 {
        return Err("header is too long");
    }
    if header.is_empty() {
        return Ok(None);
    }
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let mut pairs = Vec::new();
    for pair in header.split(',') {
        match pair.split_once('=') {
            Some((k, v)) if word(k) && word(v) => pairs.push((k, v)),
            _ => return Err("invalid tags"),
        }
    }
    if pairs.len() > 25 {
        return Err("too many tags");
    }
    let mut echo: Vec<(&str, &str)> = Vec::new();
    for (k, v) in pairs.into_iter().rev() {
        if k.len() > 40 {
            return Err("invalid key");
        }
        if v.len() > 80 {
            return Err("invalid value");
        }
        if echo.iter().any(|(seen, _)| *seen == k) {
            return Err("duplicate key");
        }
        echo.push((k, v));
    }
    Ok(Some(
        echo.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    ))
}

/// Returns the secret an `Authorization` header carries (§1.2): `Bearer <secret>`, or
/// `Basic base64("<secret>:")` with one trailing `:` dropped.
fn credential(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    if let Some(secret) = value.strip_prefix("Bearer ") {
        return Some(secret.trim().to_owned());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    Some(decoded.strip_suffix(':').unwrap_or(&decoded).to_owned())
}

/// Decodes a token secret (§2.3): base64url without padding of `0x7E 0x71 | token id (i64 BE)
/// | database id (i64 BE) | 20 random bytes`, 51 characters starting `fnE`. A scope suffix
/// after `:` is ignored, as for real tokens. Returns (token id, database id, the unscoped
/// secret).
fn decode_token_secret(secret: &str) -> Option<(i64, i64, &str)> {
    let secret = secret.split(':').next()?;
    if secret.len() != 51 {
        return None;
    }
    let raw = URL_SAFE_NO_PAD.decode(secret).ok()?;
    if raw.len() != 38 || raw[0] != 0x7E || raw[1] != 0x71 {
        return None;
    }
    let id = i64::from_be_bytes(raw[2..10].try_into().ok()?);
    let database = i64::from_be_bytes(raw[10..18].try_into().ok()?);
    Some((id, database, secret))
}

/// Mints a token secret in the §2.3 layout.
fn mint_secret(token_id: i64, database_id: i64) -> String {
    let mut raw = [0u8; 38];
    raw[0] = 0x7E;
    raw[1] = 0x71;
    raw[2..10].copy_from_slice(&token_id.to_be_bytes());
    raw[10..18].copy_from_slice(&database_id.to_be_bytes());
    rand::rng().fill_bytes(&mut raw[18..]);
    URL_SAFE_NO_PAD.encode(raw)
}

// ---------------------------------------------------------------------------------------------
// Values (§1.6)

/// An FQL value, as far as the broker's queries need them.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    Double(f64),
    Str(String),
    /// Nanoseconds since the Unix epoch.
    Time(i128),
    Date(String),
    Bytes(Vec<u8>),
    Module(String),
    /// A reference to a document of a collection.
    Ref {
        coll: String,
        id: String,
    },
    /// A reference to a named schema document.
    Named {
        coll: String,
        name: String,
    },
    /// A readable document, rendered in full.
    Doc(Box<Doc>),
    Array(Vec<Value>),
    Object(BTreeMap<String, Value>),
}

/// A document as a query returns it.
#[derive(Debug, Clone, PartialEq)]
struct Doc {
    coll: &'static str,
    id: String,
    ts: i128,
    fields: Vec<(&'static str, Value)>,
}

static NULL: Value = Value::Null;

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Self::Null => "Null",
            Self::Bool(_) => "Boolean",
            Self::Int(_) => "Int",
            Self::Long(_) => "Long",
            Self::Double(_) => "Double",
            Self::Str(_) => "String",
            Self::Time(_) => "Time",
            Self::Date(_) => "Date",
            Self::Bytes(_) => "Bytes",
            Self::Module(_) => "Module",
            Self::Ref { .. } | Self::Named { .. } | Self::Doc(_) => "Ref",
            Self::Array(_) => "Array",
            Self::Object(_) => "Object",
        }
    }

    fn field(&self, key: &str) -> &Value {
        match self {
            Self::Object(fields) => fields.get(key).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    fn number(&self) -> Option<f64> {
        match self {
            Self::Int(n) => Some(f64::from(*n)),
            #[allow(clippy::cast_precision_loss)]
            Self::Long(n) => Some(*n as f64),
            Self::Double(n) => Some(*n),
            _ => None,
        }
    }
}

/// FQL `==`: numbers compare by value across Int/Long/Double, everything else structurally.
fn fql_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(x), Value::Long(y)) | (Value::Long(y), Value::Int(x)) => i64::from(*x) == *y,
        _ => match (a.number(), b.number()) {
            (Some(x), Some(y)) => x == y,
            _ => match (a, b) {
                (Value::Array(x), Value::Array(y)) => {
                    x.len() == y.len() && x.iter().zip(y).all(|(x, y)| fql_eq(x, y))
                }
                (Value::Object(x), Value::Object(y)) => {
                    x.len() == y.len()
                        && x.iter()
                            .zip(y)
                            .all(|((kx, vx), (ky, vy))| kx == ky && fql_eq(vx, vy))
                }
                _ => a == b,
            },
        },
    }
}

/// Compares two strings as Fauna (the JVM) does: by UTF-16 code units.
fn cmp_strings(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// FQL `<` and friends: values of one kind compare, others are incomparable.
fn fql_cmp(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => Some(cmp_strings(x, y)),
        (Value::Time(x), Value::Time(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Date(x), Value::Date(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => a.number()?.partial_cmp(&b.number()?),
    }
}

/// Removes null fields from objects, as Fauna does when it stores a document.
fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

/// Formats a time as Java's `Instant.toString` does: UTC, `Z`, 0, 3, 6 or 9 fraction digits.
fn format_time(nanos: i128) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .expect("times are kept within years -9999..=9999");
    let fraction = t.nanosecond();
    let fraction = if fraction == 0 {
        String::new()
    } else if fraction.is_multiple_of(1_000_000) {
        format!(".{:03}", fraction / 1_000_000)
    } else if fraction.is_multiple_of(1_000) {
        format!(".{:06}", fraction / 1_000)
    } else {
        format!(".{fraction:09}")
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn parse_time(s: &str) -> Option<i128> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(OffsetDateTime::unix_timestamp_nanos)
}

fn valid_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let (Ok(y), Ok(m), Ok(d)) = (s[..4].parse(), s[5..7].parse::<u8>(), s[8..].parse()) else {
        return false;
    };
    time::Month::try_from(m)
        .ok()
        .and_then(|m| time::Date::from_calendar_date(y, m, d).ok())
        .is_some()
}

/// Decodes an argument sent in the simple format: plain JSON, numbers as numbers, objects as
/// objects whatever their keys.
fn decode_simple(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => i32::try_from(i).map_or(Value::Long(i), Value::Int),
            None => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(decode_simple).collect()),
        Json::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), decode_simple(v)))
                .collect(),
        ),
    }
}

/// Modules an `@mod` may name in this database: its collections, its functions, and the
/// standard library's modules.
const MODULES: &[&str] = &[
    "Account",
    "Movie",
    "Token",
    "Key",
    "Credential",
    "Collection",
    "Function",
    "Role",
    "Database",
    "AccessProvider",
    "Time",
    "Date",
    "Math",
    "Query",
    "Object",
    "Array",
    "String",
    "rotateRefreshToken",
    "revokeCurrentToken",
];
/// Modules that are collections of documents with ids.
const ID_COLLECTIONS: &[&str] = &["Account", "Movie", "Token", "Key", "Credential"];
/// Schema collections (documents with names) and their documents in this database.
const SCHEMA: &[(&str, &[&str])] = &[
    ("Collection", &["Account", "Movie"]),
    ("Function", &["rotateRefreshToken", "revokeCurrentToken"]),
    ("Role", &["access", "refresher"]),
];

/// Decodes an argument sent in the tagged format (`UndecidedValue.parseTagged`), with the
/// server's error messages.
fn decode_tagged(json: &Json) -> Result<Value, String> {
    match json {
        Json::Number(_) => Err("numbers must be tagged".into()),
        Json::Null => Ok(Value::Null),
        Json::Bool(b) => Ok(Value::Bool(*b)),
        Json::String(s) => Ok(Value::Str(s.clone())),
        Json::Array(items) => items
            .iter()
            .map(decode_tagged)
            .collect::<Result<_, _>>()
            .map(Value::Array),
        Json::Object(fields) => {
            if !fields.keys().any(|k| k.starts_with('@')) {
                return decode_tagged_object(fields);
            }
            if fields.len() > 1 {
                return Err("too many keys in tagged value".into());
            }
            let (tag, inner) = fields.iter().next().expect("one field");
            decode_tag(tag, inner)
        }
    }
}

fn decode_tagged_object(fields: &Map<String, Json>) -> Result<Value, String> {
    fields
        .iter()
        .map(|(k, v)| decode_tagged(v).map(|v| (k.clone(), v)))
        .collect::<Result<_, _>>()
        .map(Value::Object)
}

fn decode_tag(tag: &str, inner: &Json) -> Result<Value, String> {
    let string = || match inner {
        Json::String(s) => Ok(s.as_str()),
        _ => Err(format!("{tag} requires a string value")),
    };
    match tag {
        "@int" => string()?
            .parse()
            .map(Value::Int)
            .map_err(|_| "invalid integer".into()),
        "@long" => string()?
            .parse()
            .map(Value::Long)
            .map_err(|_| "invalid long".into()),
        "@double" => string()?
            .trim()
            .parse()
            .map(Value::Double)
            .map_err(|_| "invalid double".into()),
        "@object" => match inner {
            Json::Object(fields) => decode_tagged_object(fields),
            _ => Err(format!("{tag} requires an object value")),
        },
        "@time" => parse_time(string()?)
            .map(Value::Time)
            .ok_or_else(|| "invalid time".into()),
        "@date" => {
            let s = string()?;
            if valid_date(s) {
                Ok(Value::Date(s.to_owned()))
            } else {
                Err("invalid date".into())
            }
        }
        "@bytes" => STANDARD
            .decode(string()?)
            .map(Value::Bytes)
            .map_err(|_| "invalid bytes".into()),
        "@mod" => {
            let name = string()?;
            if MODULES.contains(&name) {
                Ok(Value::Module(name.to_owned()))
            } else {
                Err(format!("no such module '{name}'"))
            }
        }
        "@doc" | "@ref" => decode_reference(tag, inner),
        _ => Err(format!("invalid tag '{tag}'")),
    }
}

fn decode_reference(tag: &str, inner: &Json) -> Result<Value, String> {
    match decode_tagged(inner)? {
        Value::Object(fields) => match fields.get("coll") {
            Some(Value::Module(coll)) => {
                if let Some((_, names)) = SCHEMA.iter().find(|(c, _)| c == coll) {
                    match fields.get("name") {
                        Some(Value::Str(name)) if names.contains(&name.as_str()) => {
                            Ok(Value::Named {
                                coll: coll.clone(),
                                name: name.clone(),
                            })
                        }
                        Some(Value::Str(name)) => Err(format!("no such schema object '{name}'")),
                        Some(_) => Err(format!("{tag} field 'name' requires a string value")),
                        None => Err(format!("{tag} field 'name' is required")),
                    }
                } else if ID_COLLECTIONS.contains(&coll.as_str()) {
                    match fields.get("id") {
                        Some(Value::Str(id)) => match id.parse::<i64>() {
                            Ok(id) => Ok(Value::Ref {
                                coll: coll.clone(),
                                id: id.to_string(),
                            }),
                            Err(_) => Err(format!("{tag} field 'id' must be an integer")),
                        },
                        Some(_) => Err(format!("{tag} field 'id' requires a string value")),
                        None => Err(format!("{tag} field 'id' is required")),
                    }
                } else {
                    Err(format!("{tag} field 'coll' requires a module value"))
                }
            }
            Some(_) => Err(format!("{tag} field 'coll' requires a module value")),
            None => Err(format!("{tag} field 'coll' is required")),
        },
        Value::Str(doc) => match doc.split(':').collect::<Vec<_>>().as_slice() {
            [coll, id] if ID_COLLECTIONS.contains(coll) => match id.parse::<i64>() {
                Ok(id) => Ok(Value::Ref {
                    coll: (*coll).to_owned(),
                    id: id.to_string(),
                }),
                Err(_) => Err(format!("invalid document id '{id}'")),
            },
            [coll, name] => match SCHEMA.iter().find(|(c, _)| c == coll) {
                Some((_, names)) if names.contains(name) => Ok(Value::Named {
                    coll: (*coll).to_owned(),
                    name: (*name).to_owned(),
                }),
                Some(_) => Err(format!("no such schema definition document '{name}'")),
                None => Err(format!("no such collection '{coll}'")),
            },
            _ => Err("doc id must be in the format <coll>:<id>".into()),
        },
        _ => Err(format!("{tag} requires an object value")),
    }
}

/// Encodes a result value in the request's format (§1.6).
fn encode(value: &Value, format: Format) -> Json {
    match format {
        Format::Simple => encode_simple(value),
        Format::Tagged => encode_tagged(value),
        Format::Decorated => Json::String(fql_text(value)),
    }
}

fn encode_simple(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(n) => json!(n),
        Value::Long(n) => json!(n),
        Value::Double(n) => json!(n),
        Value::Str(s) | Value::Date(s) | Value::Module(s) => json!(s),
        Value::Time(t) => json!(format_time(*t)),
        Value::Bytes(b) => json!(STANDARD.encode(b)),
        Value::Ref { coll, id } => json!({ "id": id, "coll": coll }),
        Value::Named { coll, name } => json!({ "name": name, "coll": coll }),
        Value::Doc(doc) => {
            let mut fields = Map::new();
            fields.insert("id".into(), json!(doc.id));
            fields.insert("coll".into(), json!(doc.coll));
            fields.insert("ts".into(), json!(format_time(doc.ts)));
            for (k, v) in &doc.fields {
                fields.insert((*k).into(), encode_simple(v));
            }
            Json::Object(fields)
        }
        Value::Array(items) => Json::Array(items.iter().map(encode_simple).collect()),
        Value::Object(fields) => Json::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), encode_simple(v)))
                .collect(),
        ),
    }
}

fn encode_tagged(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(n) => json!({ "@int": n.to_string() }),
        Value::Long(n) => json!({ "@long": n.to_string() }),
        Value::Double(n) => json!({ "@double": format!("{n:?}") }),
        Value::Str(s) => json!(s),
        Value::Date(s) => json!({ "@date": s }),
        Value::Module(s) => json!({ "@mod": s }),
        Value::Time(t) => json!({ "@time": format_time(*t) }),
        Value::Bytes(b) => json!({ "@bytes": STANDARD.encode(b) }),
        Value::Ref { coll, id } => json!({ "@ref": { "id": id, "coll": { "@mod": coll } } }),
        Value::Named { coll, name } => {
            json!({ "@ref": { "name": name, "coll": { "@mod": coll } } })
        }
        Value::Doc(doc) => {
            let mut fields = Map::new();
            fields.insert("id".into(), json!(doc.id));
            fields.insert("coll".into(), json!({ "@mod": doc.coll }));
            fields.insert("ts".into(), json!({ "@time": format_time(doc.ts) }));
            for (k, v) in &doc.fields {
                fields.insert((*k).into(), encode_tagged(v));
            }
            json!({ "@doc": fields })
        }
        Value::Array(items) => Json::Array(items.iter().map(encode_tagged).collect()),
        Value::Object(fields) => {
            let object: Map<String, Json> = fields
                .iter()
                .map(|(k, v)| (k.clone(), encode_tagged(v)))
                .collect();
            if fields.keys().any(|k| k.starts_with('@')) {
                json!({ "@object": object })
            } else {
                Json::Object(object)
            }
        }
    }
}

/// Renders a value as FQL source text, for the decorated format (an approximation).
fn fql_text(value: &Value) -> String {
    let key = |k: &str| {
        let identifier = k
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_alphanumeric() || c == '_');
        if identifier {
            k.to_owned()
        } else {
            Json::String(k.to_owned()).to_string()
        }
    };
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Long(n) => n.to_string(),
        Value::Double(n) => format!("{n:?}"),
        Value::Str(s) => Json::String(s.clone()).to_string(),
        Value::Time(t) => format!("Time(\"{}\")", format_time(*t)),
        Value::Date(d) => format!("Date(\"{d}\")"),
        Value::Bytes(b) => format!("Bytes(\"{}\")", STANDARD.encode(b)),
        Value::Module(m) => m.clone(),
        Value::Ref { coll, id } => format!("{coll}(\"{id}\")"),
        Value::Named { coll, name } => format!("{coll}.byName(\"{name}\")"),
        Value::Doc(doc) => {
            let mut parts = vec![
                format!("id: \"{}\"", doc.id),
                format!("coll: {}", doc.coll),
                format!("ts: Time(\"{}\")", format_time(doc.ts)),
            ];
            parts.extend(
                doc.fields
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", fql_text(v))),
            );
            format!("{{ {} }}", parts.join(", "))
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(fql_text).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) if fields.is_empty() => "{}".into(),
        Value::Object(fields) => format!(
            "{{ {} }}",
            fields
                .iter()
                .map(|(k, v)| format!("{}: {}", key(k), fql_text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

/// What a transaction did, for `stats`.
#[derive(Debug, Default)]
struct Stats {
    reads: u64,
    writes: u64,
    bytes_read: u64,
    bytes_written: u64,
}

/// The eight `stats` keys of §1.4.
fn stats_json(stats: &Stats, query_ms: u64, rate_limits_hit: &[&str]) -> Json {
    json!({
        "compute_ops": 1,
        "read_ops": stats.reads,
        "write_ops": stats.writes,
        "query_time_ms": query_ms,
        "contention_retries": 0,
        "storage_bytes_read": stats.bytes_read,
        "storage_bytes_write": stats.bytes_written,
        "rate_limits_hit": rate_limits_hit,
    })
}

/// A query failure (§1.5 "query errors"): HTTP 400 with `summary`, `txn_ts`, `stats`.
#[derive(Debug)]
struct Failure {
    code: &'static str,
    message: String,
    /// The query text the error points at, for the summary.
    at: Option<&'static str>,
    /// What few failures carry (boxed, to keep `Result<_, Failure>` small).
    extra: Option<Box<FailureExtra>>,
}

/// The rarer parts of a [`Failure`].
#[derive(Debug, Default)]
struct FailureExtra {
    /// Lines after the `error:` line.
    notes: Option<String>,
    /// Replaces the rendered summary.
    summary: Option<String>,
    constraint_failures: Option<Json>,
}

impl Failure {
    fn new(code: &'static str, message: String) -> Self {
        Self {
            code,
            message,
            at: None,
            extra: None,
        }
    }

    fn at(mut self, at: &'static str) -> Self {
        self.at = Some(at);
        self
    }

    fn with_summary(mut self, summary: &str) -> Self {
        self.extra.get_or_insert_default().summary = Some(summary.to_owned());
        self
    }

    /// Renders the summary as the server's diagnostics do:
    ///
    /// ```text
    /// error: <message>
    /// at *query*:<line>:<column>
    ///   |
    /// 1 | <source line>
    ///   |     ^^^^
    ///   |
    /// ```
    fn summary(&self, text: &str) -> String {
        let extra = self.extra.as_deref();
        if let Some(summary) = extra.and_then(|e| e.summary.as_ref()) {
            return summary.clone();
        }
        let mut out = format!("error: {}", self.message);
        if let Some(notes) = extra.and_then(|e| e.notes.as_ref()) {
            out.push('\n');
            out.push_str(notes);
        }
        let Some(at) = self.at else { return out };
        let Some(offset) = text.find(at) else {
            return out;
        };
        let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_no = text[..offset].matches('\n').count() + 1;
        let line = text[line_start..].lines().next().unwrap_or("");
        let column = text[line_start..offset].chars().count() + 1;
        let width = at.lines().next().unwrap_or(at).chars().count().max(1);
        let gutter = " ".repeat(line_no.to_string().len());
        out.push_str(&format!(
            "\nat *query*:{line_no}:{column}\n{gutter} |\n{line_no} | {line}\n{gutter} | {}{}\n{gutter} |",
            " ".repeat(column - 1),
            "^".repeat(width)
        ));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// State and transactions

/// An `Account` document. No query reads its fields back; they are what `Account.create` writes.
#[derive(Debug, Clone)]
#[allow(dead_code)]
struct Account {
    email: String,
    cognito_sub: Option<String>,
    ts: i128,
}

#[derive(Debug, Clone)]
struct TokenDoc {
    id: String,
    /// The account's id.
    document: String,
    /// Expiry, in nanoseconds since the epoch.
    ttl: Option<i128>,
    data: Value,
    ts: i128,
    secret_hash: [u8; 32],
}

impl TokenDoc {
    /// Whether the token is visible at `now` (§2.5: gone at and after its ttl).
    fn live_at(&self, now: i128) -> bool {
        self.ttl.is_none_or(|ttl| ttl > now)
    }

    fn data(&self, key: &str) -> &Value {
        self.data.field(key)
    }

    /// The document as a read returns it: no secret (§2.2).
    fn to_value(&self) -> Value {
        let mut fields = vec![(
            "document",
            Value::Ref {
                coll: "Account".into(),
                id: self.document.clone(),
            },
        )];
        if let Some(ttl) = self.ttl {
            fields.push(("ttl", Value::Time(ttl)));
        }
        if matches!(&self.data, Value::Object(d) if !d.is_empty()) {
            fields.push(("data", self.data.clone()));
        }
        Value::Doc(Box::new(Doc {
            coll: "Token",
            id: self.id.clone(),
            ts: self.ts,
            fields,
        }))
    }

    fn size(&self) -> u64 {
        serde_json::to_vec(&encode_simple(&self.to_value())).map_or(0, |b| b.len() as u64)
    }
}

/// The database: one `Account` collection with a unique email, and the `Token` collection.
#[derive(Debug, Default)]
struct Db {
    last_txn_micros: i64,
    last_id: i64,
    accounts: BTreeMap<String, Account>,
    by_email: HashMap<String, String>,
    tokens: BTreeMap<String, TokenDoc>,
    /// `Token.byDocument`: token ids per account id.
    by_document: HashMap<String, BTreeSet<String>>,
}

/// 2020-01-01T00:00:00Z in microseconds; ids count from here.
const ID_EPOCH_MICROS: i64 = 1_577_836_800_000_000;

impl Db {
    /// Starts a transaction: its time is the clock's, but always after the previous one.
    fn tick(&mut self, clock_micros: i64) -> i64 {
        let now = clock_micros.max(self.last_txn_micros + 1);
        self.last_txn_micros = now;
        now
    }

    /// A new snowflake-like id: microseconds since 2020 in the high bits, so ids grow with time
    /// and have 18 digits (well below 2^62, so secrets start `fnE`).
    fn next_id(&mut self) -> i64 {
        let base = (self.last_txn_micros - ID_EPOCH_MICROS).max(0) << 10;
        self.last_id = base.max(self.last_id + 1);
        self.last_id
    }

    /// `Account.create({ email, cognito_sub })`, with the unique constraint on email (§3.2).
    fn create_account(
        &mut self,
        email: &str,
        cognito_sub: Option<String>,
        now: i128,
    ) -> Result<String, Failure> {
        if self.by_email.contains_key(email) {
            let mut failure =
                Failure::new("constraint_failure", "Failed unique constraint.".into())
                    .at("Account.create(");
            failure.extra = Some(Box::new(FailureExtra {
                notes: Some("constraint failures:\n  email: Failed unique constraint".into()),
                summary: None,
                constraint_failures: Some(json!([
                    { "paths": [["email"]], "message": "Failed unique constraint" }
                ])),
            }));
            return Err(failure);
        }
        let id = self.next_id().to_string();
        self.accounts.insert(
            id.clone(),
            Account {
                email: email.to_owned(),
                cognito_sub,
                ts: now,
            },
        );
        self.by_email.insert(email.to_owned(), id.clone());
        Ok(id)
    }
}

/// Who a query runs as.
#[derive(Debug, Clone)]
enum Caller {
    Key,
    /// A token, by id.
    Token(String),
}

/// A query's arguments, by name.
struct Args<'a>(&'a BTreeMap<String, Value>);

impl Args<'_> {
    /// The variable `name`; unbound is a runtime error where the query first uses it.
    fn get(&self, name: &'static str) -> Result<&Value, Failure> {
        self.0.get(name).ok_or_else(|| {
            Failure::new("unbound_variable", format!("Unbound variable `{name}`")).at(name)
        })
    }
}

fn invalid_argument(param: &str, expected: &str, got: &Value, at: &'static str) -> Failure {
    Failure::new(
        "invalid_argument",
        format!(
            "expected value for `{param}` of type {expected}, received {}",
            got.type_name()
        ),
    )
    .at(at)
}

fn expect_str<'v>(v: &'v Value, param: &str, at: &'static str) -> Result<&'v str, Failure> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(invalid_argument(param, "String", other, at)),
    }
}

/// A whole number of seconds for `Time.add(amount, "seconds")`.
fn expect_seconds(v: &Value, at: &'static str) -> Result<i64, Failure> {
    match v {
        Value::Int(n) => Ok(i64::from(*n)),
        Value::Long(n) => Ok(*n),
        #[allow(clippy::cast_possible_truncation)]
        Value::Double(n) if n.fract() == 0.0 && n.abs() < 9.2e18 => Ok(*n as i64),
        other => Err(invalid_argument("amount", "Number", other, at)),
    }
}

fn expect_bool(v: &Value, at: &'static str) -> Result<bool, Failure> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => Err(Failure::new(
            "type_mismatch",
            format!("expected type: Boolean, received {}", other.type_name()),
        )
        .at(at)),
    }
}

/// An ID for `byId`: a string of digits or a number.
fn expect_id(v: &Value, at: &'static str) -> Result<String, Failure> {
    let invalid = || {
        Failure::new(
            "invalid_argument",
            format!("invalid argument `id`: `{}` is not a valid ID", fql_text(v)),
        )
        .at(at)
    };
    match v {
        Value::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<i64>()
            .map(|id| id.to_string())
            .map_err(|_| invalid()),
        Value::Str(_) => Err(invalid()),
        Value::Int(n) if *n >= 0 => Ok(n.to_string()),
        Value::Long(n) if *n >= 0 => Ok(n.to_string()),
        Value::Int(_) | Value::Long(_) => Err(invalid()),
        other => Err(invalid_argument("id", "ID", other, at)),
    }
}

/// `time.add(seconds, "seconds")`, within the years Fauna's `Time` covers.
fn add_seconds(time: i128, seconds: i64, at: &'static str) -> Result<i128, Failure> {
    let sum = time + i128::from(seconds) * 1_000_000_000;
    if OffsetDateTime::from_unix_timestamp_nanos(sum).is_ok() {
        Ok(sum)
    } else {
        Err(Failure::new("invalid_argument", "Time out of bounds.".into()).at(at))
    }
}

/// The values a new pair of tokens is minted from.
struct Mint<'a> {
    account: &'a str,
    family: &'a Value,
    email: &'a Value,
    client_id: &'a Value,
    cognito_sub: &'a Value,
    metadata: &'a Value,
    refresh_ttl: i128,
    access_ttl: i128,
}

/// One transaction: the database, the transaction time and what it did.
struct Txn<'a> {
    db: &'a mut Db,
    /// `Time.now()`, in nanoseconds.
    now: i128,
    database_id: i64,
    stats: Stats,
}

impl Txn<'_> {
    /// Resolves a secret to a caller (§2.3–§2.5): a configured key, or a live token whose
    /// secret matches its stored hash.
    fn authenticate(&mut self, keys: &[String], secret: &str) -> Option<Caller> {
        if keys.iter().any(|k| k == secret) {
            return Some(Caller::Key);
        }
        if secret.starts_with("ey") && secret.contains('.') {
            return None; // a JWT; no access providers are configured
        }
        let (id, database, secret) = decode_token_secret(secret)?;
        if database != self.database_id {
            return None;
        }
        let token = self.read_token(&id.to_string())?;
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        (hash == token.secret_hash).then_some(Caller::Token(token.id))
    }

    /// `Token.byId(id)`: the token if it exists and has not expired.
    fn read_token(&mut self, id: &str) -> Option<TokenDoc> {
        let token = self
            .db
            .tokens
            .get(id)
            .filter(|t| t.live_at(self.now))?
            .clone();
        self.stats.reads += 1;
        self.stats.bytes_read += token.size();
        Some(token)
    }

    /// `Token.byDocument(Account.byId(account))`: its live tokens, by id.
    fn tokens_of(&mut self, account: &str) -> Vec<TokenDoc> {
        let ids: Vec<String> = self
            .db
            .by_document
            .get(account)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        ids.iter().filter_map(|id| self.read_token(id)).collect()
    }

    /// `Token.byDocument(account).where(.data.family == family)`.
    fn family_of(&mut self, account: &str, family: &Value) -> Vec<TokenDoc> {
        self.tokens_of(account)
            .into_iter()
            .filter(|t| fql_eq(t.data("family"), family))
            .collect()
    }

    /// `Account.byId(id)`: whether it exists.
    fn account_exists(&mut self, id: &str) -> bool {
        self.stats.reads += 1;
        self.db.accounts.contains_key(id)
    }

    /// `Account.byEmail(email).first()`.
    fn account_by_email(&mut self, email: &Value) -> Option<String> {
        self.stats.reads += 1;
        match email {
            Value::Str(email) => self.db.by_email.get(email).cloned(),
            _ => None,
        }
    }

    /// `Token.create({ document, ttl, data })`: returns the id and the secret, which is shown
    /// only here.
    fn create_token(&mut self, document: &str, ttl: i128, data: Value) -> (String, String) {
        let id = self.db.next_id();
        let secret = mint_secret(id, self.database_id);
        let token = TokenDoc {
            id: id.to_string(),
            document: document.to_owned(),
            ttl: Some(ttl),
            data: strip_nulls(data),
            ts: self.now,
            secret_hash: Sha256::digest(secret.as_bytes()).into(),
        };
        self.stats.writes += 1;
        self.stats.bytes_written += token.size();
        self.db
            .by_document
            .entry(document.to_owned())
            .or_default()
            .insert(token.id.clone());
        self.db.tokens.insert(token.id.clone(), token);
        (id.to_string(), secret)
    }

    fn delete_token(&mut self, id: &str) {
        if let Some(token) = self.db.tokens.remove(id) {
            self.stats.writes += 1;
            if let Some(ids) = self.db.by_document.get_mut(&token.document) {
                ids.remove(id);
            }
        }
    }

    /// Deletes `tokens` and returns how many of them were not consumed.
    fn delete_counting_unconsumed(&mut self, tokens: &[TokenDoc]) -> Value {
        let revoked = tokens
            .iter()
            .filter(|t| t.data("replaced_by").is_null())
            .count();
        for token in tokens {
            self.delete_token(&token.id);
        }
        Value::Int(i32::try_from(revoked).unwrap_or(i32::MAX))
    }

    /// The minting half of the issue texts and of `rotateRefreshToken`: a refresh token and
    /// its access token, and the result's `refresh` and `access` objects.
    fn mint_pair(&mut self, mint: &Mint<'_>) -> (Value, Value) {
        let now = self.now;
        let data = |kind: &str, parent: Option<&str>| {
            let mut data = BTreeMap::from([
                ("kind".to_owned(), Value::Str(kind.to_owned())),
                ("family".to_owned(), mint.family.clone()),
                ("email".to_owned(), mint.email.clone()),
                ("client_id".to_owned(), mint.client_id.clone()),
                ("issued_at".to_owned(), Value::Time(now)),
                ("metadata".to_owned(), mint.metadata.clone()),
            ]);
            // `cognito_sub: account.cognito_sub`: a null field is not stored (FQL drops it).
            if !mint.cognito_sub.is_null() {
                data.insert("cognito_sub".to_owned(), mint.cognito_sub.clone());
            }
            if let Some(parent) = parent {
                data.insert("parent".to_owned(), Value::Str(parent.to_owned()));
            }
            Value::Object(data)
        };
        let minted = |id: String, secret: String, ttl: i128| {
            Value::Object(BTreeMap::from([
                ("id".to_owned(), Value::Str(id)),
                ("secret".to_owned(), Value::Str(secret)),
                ("ttl".to_owned(), Value::Time(ttl)),
            ]))
        };
        let refresh_data = data("refresh", None);
        let (refresh_id, refresh_secret) =
            self.create_token(mint.account, mint.refresh_ttl, refresh_data);
        let access_data = data("access", Some(&refresh_id));
        let (access_id, access_secret) =
            self.create_token(mint.account, mint.access_ttl, access_data);
        (
            minted(refresh_id, refresh_secret, mint.refresh_ttl),
            minted(access_id, access_secret, mint.access_ttl),
        )
    }

    /// Runs a known query as `caller`. Every check comes before the first write, so a failure
    /// leaves the database as it was (Fauna aborts the whole transaction).
    fn run(&mut self, query: Query, caller: &Caller, args: &Args<'_>) -> Result<Value, Failure> {
        let token = match caller {
            Caller::Key => None,
            Caller::Token(id) => self.read_token(id),
        };
        if let Some(token) = &token {
            let kind = token.data("kind");
            let allowed = match query {
                Query::Introspect => true,
                Query::RevokeSecret => {
                    fql_eq(kind, &Value::Str("access".into()))
                        || fql_eq(kind, &Value::Str("refresh".into()))
                }
                Query::Rotate => fql_eq(kind, &Value::Str("refresh".into())),
                _ => false,
            };
            if !allowed {
                return Err(Failure::new(
                    "permission_denied",
                    "Insufficient privileges to perform the action.".into(),
                )
                .at(query.guarded_call()));
            }
        }
        match query {
            Query::IssueByEmail | Query::IssueForAccount => self.issue(query, args),
            Query::Rotate => self.rotate(token, args),
            Query::Introspect => Ok(token.map_or(Value::Null, |t| t.to_value())),
            Query::RevokeSecret => self.revoke_secret(token, args),
            Query::RevokeToken => self.revoke_token(args),
            Query::RevokeFamily | Query::RevokeAccount => self.revoke_account(query, args),
            Query::AccountByEmail => {
                let email = args.get("email")?;
                Ok(self.account_by_email(email).map_or(Value::Null, Value::Str))
            }
            Query::ListTokens => self.list_tokens(args),
            Query::OriginalLookup => {
                let email = args.get("email")?;
                Ok(self
                    .account_by_email(email)
                    .map_or(Value::Null, |id| self.account_value(&id)))
            }
            Query::OriginalRegister => {
                let email = expect_str(args.get("email")?, "email", "Account.create(")?;
                self.stats.writes += 1;
                let id = self.db.create_account(email, None, self.now)?;
                Ok(self.account_value(&id))
            }
            Query::OriginalCreateRefresh | Query::OriginalCreateAccess => {
                const ADD: &str = "Time.now().add(ttl, \"seconds\")";
                let account = expect_id(args.get("account_id")?, "Account.byId(account_id)")?;
                if !self.account_exists(&account) {
                    return Err(Failure::new(
                        "document_not_found",
                        format!(
                            "Collection `Account` does not contain document with id {account}."
                        ),
                    )
                    .at("Account.byId(account_id)"));
                }
                let ttl = add_seconds(self.now, expect_seconds(args.get("ttl")?, ADD)?, ADD)?;
                let mut data = BTreeMap::new();
                if query == Query::OriginalCreateRefresh {
                    data.insert("kind".to_owned(), Value::Str("refresh".into()));
                } else {
                    data.insert("kind".to_owned(), Value::Str("access".into()));
                    data.insert("parent".to_owned(), args.get("parent")?.clone());
                }
                let (id, secret) = self.create_token(&account, ttl, Value::Object(data));
                let mut doc = self.db.tokens[&id].to_value();
                if let Value::Doc(doc) = &mut doc {
                    doc.fields.push(("secret", Value::Str(secret)));
                }
                Ok(doc)
            }
        }
    }

    /// An account document as a read returns it.
    fn account_value(&self, id: &str) -> Value {
        let account = &self.db.accounts[id];
        let mut fields = vec![("email", Value::Str(account.email.clone()))];
        if let Some(sub) = &account.cognito_sub {
            fields.push(("cognito_sub", Value::Str(sub.clone())));
        }
        Value::Doc(Box::new(Doc {
            coll: "Account",
            id: id.to_owned(),
            ts: account.ts,
            fields,
        }))
    }

    /// `ISSUE_BY_EMAIL` / `ISSUE_FOR_ACCOUNT`.
    fn issue(&mut self, query: Query, args: &Args<'_>) -> Result<Value, Failure> {
        const ADD: &str = "now.add(refresh_ttl, \"seconds\")";
        const ADD_ACCESS: &str = "now.add(access_ttl, \"seconds\")";
        // `let account = …`: found, to be created, or missing.
        let (existing, email, create) = if query == Query::IssueByEmail {
            let email = args.get("email")?;
            match self.account_by_email(email) {
                Some(id) => (Some(id), Some(email), None),
                None => {
                    let address = expect_str(email, "email", "Account.create(")?;
                    let sub = match args.get("cognito_sub")? {
                        Value::Null => None,
                        other => Some(expect_str(other, "cognito_sub", "Account.create(")?),
                    };
                    (None, Some(email), Some((address, sub)))
                }
            }
        } else {
            let id = expect_id(args.get("account_id")?, "Account.byId(account_id)")?;
            if !self.account_exists(&id) {
                return Err(Failure::new(
                    "document_not_found",
                    format!("Collection `Account` does not contain document with id {id}."),
                )
                .at("(account_id)!"));
            }
            (Some(id), None, None)
        };
        let nonce = expect_str(args.get("nonce")?, "other", "+ nonce")?;
        let refresh_secs = expect_seconds(args.get("refresh_ttl")?, ADD)?;
        let refresh_ttl = add_seconds(self.now, refresh_secs, ADD)?;
        let email = match email {
            Some(email) => email,
            None => args.get("email")?,
        };
        let client_id = args.get("client_id")?;
        let metadata = args.get("metadata")?;
        let access_secs = expect_seconds(args.get("access_ttl")?, ADD_ACCESS)?;
        let access_ttl = add_seconds(self.now, access_secs, ADD_ACCESS)?;

        // Checks are done: write.
        let account = match (existing, create) {
            (Some(id), _) => id,
            (None, Some((address, sub))) => {
                self.stats.writes += 1;
                self.db
                    .create_account(address, sub.map(str::to_owned), self.now)?
            }
            (None, None) => unreachable!("an account is found or created"),
        };
        let family = Value::Str(format!("fam_{account}_{nonce}"));
        let cognito_sub = self
            .db
            .accounts
            .get(&account)
            .and_then(|a| a.cognito_sub.clone())
            .map_or(Value::Null, Value::Str);
        let (refresh, access) = self.mint_pair(&Mint {
            account: &account,
            family: &family,
            email,
            client_id,
            cognito_sub: &cognito_sub,
            metadata,
            refresh_ttl,
            access_ttl,
        });
        Ok(Value::Object(BTreeMap::from([
            ("account".to_owned(), Value::Str(account)),
            ("family".to_owned(), family),
            ("now".to_owned(), Value::Time(self.now)),
            ("refresh".to_owned(), refresh),
            ("access".to_owned(), access),
        ])))
    }

    /// The UDF `rotateRefreshToken(access_ttl, refresh_ttl, grace, client_id)`.
    fn rotate(&mut self, token: Option<TokenDoc>, args: &Args<'_>) -> Result<Value, Failure> {
        const CALL: &str = "rotateRefreshToken(access_ttl, refresh_ttl, grace, client_id)";
        let outcome = |o: &str| {
            Value::Object(BTreeMap::from([(
                "outcome".to_owned(),
                Value::Str(o.to_owned()),
            )]))
        };
        // The call evaluates its arguments first.
        let access_ttl = args.get("access_ttl")?;
        let refresh_ttl = args.get("refresh_ttl")?;
        let grace = args.get("grace")?;
        let client_id = args.get("client_id")?;
        let Some(token) = token else {
            return Ok(outcome("inactive"));
        };
        if !fql_eq(token.data("kind"), &Value::Str("refresh".into())) {
            return Ok(outcome("inactive"));
        }
        if !client_id.is_null() && !fql_eq(token.data("client_id"), client_id) {
            return Ok(outcome("wrong_client"));
        }
        let family_name = token.data("family").clone();
        let family = self.family_of(&token.document, &family_name);
        let replaced_by = token.data("replaced_by").clone();
        let successor = match &replaced_by {
            Value::Null => None,
            Value::Str(id) => self.read_token(id),
            other => self.read_token(&fql_text(other)),
        };
        let retry = if replaced_by.is_null() {
            false
        } else {
            let rotated_at = match token.data("rotated_at") {
                Value::Time(t) => *t,
                _ => {
                    return Err(Failure::new(
                        "invalid_null_access",
                        "Cannot access `add` on null.".into(),
                    )
                    .at(CALL));
                }
            };
            let grace = expect_seconds(grace, CALL)?;
            self.now <= add_seconds(rotated_at, grace, CALL)?
                && successor
                    .as_ref()
                    .is_some_and(|s| s.data("replaced_by").is_null())
        };
        if !replaced_by.is_null() && !retry {
            let revoked = self.delete_counting_unconsumed(&family);
            return Ok(Value::Object(BTreeMap::from([
                ("outcome".to_owned(), Value::Str("reuse".into())),
                ("family".to_owned(), family_name),
                ("revoked".to_owned(), revoked),
            ])));
        }
        let refresh_ttl = add_seconds(self.now, expect_seconds(refresh_ttl, CALL)?, CALL)?;
        let access_ttl = add_seconds(self.now, expect_seconds(access_ttl, CALL)?, CALL)?;

        // Checks are done: write.
        if let Some(successor) = successor.filter(|_| retry) {
            let successor_id = Value::Str(successor.id.clone());
            for t in &family {
                if t.id == successor.id || fql_eq(t.data("parent"), &successor_id) {
                    self.delete_token(&t.id);
                }
            }
        }
        let (refresh, access) = self.mint_pair(&Mint {
            account: &token.document,
            family: &family_name,
            email: token.data("email"),
            client_id: token.data("client_id"),
            cognito_sub: token.data("cognito_sub"),
            metadata: token.data("metadata"),
            refresh_ttl,
            access_ttl,
        });
        // `token.update({ data: { replaced_by: refresh.id, rotated_at: data.rotated_at ?? now } })`
        let rotated_at = match token.data("rotated_at") {
            Value::Null => Value::Time(self.now),
            t => t.clone(),
        };
        if let Some(stored) = self.db.tokens.get_mut(&token.id) {
            if let Value::Object(data) = &mut stored.data {
                data.insert("replaced_by".into(), refresh.field("id").clone());
                data.insert("rotated_at".into(), rotated_at);
            }
            stored.ts = self.now;
            self.stats.writes += 1;
        }
        Ok(Value::Object(BTreeMap::from([
            ("outcome".to_owned(), Value::Str("rotated".into())),
            ("account".to_owned(), Value::Str(token.document.clone())),
            ("family".to_owned(), family_name),
            ("now".to_owned(), Value::Time(self.now)),
            ("refresh".to_owned(), refresh),
            ("access".to_owned(), access),
        ])))
    }

    /// The UDF `revokeCurrentToken(client_id)`.
    fn revoke_secret(
        &mut self,
        token: Option<TokenDoc>,
        args: &Args<'_>,
    ) -> Result<Value, Failure> {
        let client_id = args.get("client_id")?;
        let outcome = |o: &str, revoked: Option<Value>| {
            let mut fields = BTreeMap::from([("outcome".to_owned(), Value::Str(o.to_owned()))]);
            if let Some(revoked) = revoked {
                fields.insert("revoked".to_owned(), revoked);
            }
            Value::Object(fields)
        };
        let Some(token) = token else {
            return Ok(outcome("inactive", None));
        };
        if token.data("kind").is_null() || !token.data("replaced_by").is_null() {
            return Ok(outcome("inactive", None));
        }
        if !client_id.is_null() && !fql_eq(token.data("client_id"), client_id) {
            return Ok(outcome("wrong_client", None));
        }
        if fql_eq(token.data("kind"), &Value::Str("refresh".into())) {
            let family = self.family_of(&token.document, token.data("family"));
            let revoked = self.delete_counting_unconsumed(&family);
            Ok(outcome("revoked", Some(revoked)))
        } else {
            self.delete_token(&token.id);
            Ok(outcome("revoked", Some(Value::Int(1))))
        }
    }

    /// `REVOKE_TOKEN`.
    fn revoke_token(&mut self, args: &Args<'_>) -> Result<Value, Failure> {
        let id = expect_id(args.get("token_id")?, "Token.byId(token_id)")?;
        let Some(token) = self.read_token(&id) else {
            return Ok(Value::Int(0));
        };
        if fql_eq(token.data("kind"), &Value::Str("refresh".into())) {
            let family = self.family_of(&token.document, token.data("family"));
            Ok(self.delete_counting_unconsumed(&family))
        } else {
            self.delete_token(&token.id);
            Ok(Value::Int(1))
        }
    }

    /// `REVOKE_FAMILY` and `REVOKE_ACCOUNT`.
    fn revoke_account(&mut self, query: Query, args: &Args<'_>) -> Result<Value, Failure> {
        let id = expect_id(args.get("account_id")?, "Account.byId(account_id)")?;
        if !self.account_exists(&id) {
            return Ok(Value::Int(0));
        }
        let tokens = if query == Query::RevokeFamily {
            let family = args.get("family")?;
            self.family_of(&id, family)
        } else {
            self.tokens_of(&id)
        };
        Ok(self.delete_counting_unconsumed(&tokens))
    }

    /// `LIST_TOKENS`.
    fn list_tokens(&mut self, args: &Args<'_>) -> Result<Value, Failure> {
        const INCLUDE: &str = "include_consumed ||";
        let id = expect_id(args.get("account_id")?, "Account.byId(account_id)")?;
        if !self.account_exists(&id) {
            return Ok(Value::Array(Vec::new()));
        }
        let tokens = self.tokens_of(&id);
        let mut page = Vec::new();
        for token in tokens {
            // `.where(t => t.data.issued_at < after_issued_at || (… == … && t.id < after_id))`
            let after_issued_at = args.get("after_issued_at")?;
            let issued_at = token.data("issued_at");
            let before = fql_cmp(issued_at, after_issued_at) == Some(Ordering::Less)
                || (fql_eq(issued_at, after_issued_at) && {
                    let after_id = args.get("after_id")?;
                    fql_cmp(&Value::Str(token.id.clone()), after_id) == Some(Ordering::Less)
                });
            if !before {
                continue;
            }
            // `.where(t => include_consumed || t.data.replaced_by == null)`
            if expect_bool(args.get("include_consumed")?, INCLUDE)?
                || token.data("replaced_by").is_null()
            {
                page.push(token);
            }
        }
        // `.order(desc(.data.issued_at), desc(.id))`
        page.sort_by(|a, b| {
            fql_cmp(b.data("issued_at"), a.data("issued_at"))
                .unwrap_or(Ordering::Equal)
                .then_with(|| cmp_strings(&b.id, &a.id))
        });
        let limit = match args.get("limit")? {
            Value::Int(n) if *n >= 0 => usize::try_from(*n).unwrap_or(0),
            Value::Long(n) if *n >= 0 => usize::try_from(*n).unwrap_or(usize::MAX),
            other => return Err(invalid_argument("limit", "Int", other, ".take(limit)")),
        };
        Ok(Value::Array(
            page.iter().take(limit).map(TokenDoc::to_value).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value as Json, json};
    use tokenbroker::{model::clock::ManualClock, store::fauna::queries};

    use super::*;

    /// A started double on a manual clock, and an HTTP client.
    struct Harness {
        double: FaunaDouble,
        clock: Arc<ManualClock>,
        http: reqwest::Client,
    }

    /// One HTTP answer.
    #[derive(Debug)]
    struct Answer {
        status: u16,
        www_authenticate: Option<String>,
        raw: String,
        body: Json,
    }

    async fn harness() -> Harness {
        let clock = Arc::new(ManualClock::new());
        let double = FaunaDouble::start(clock.clone()).await;
        Harness {
            double,
            clock,
            http: reqwest::Client::new(),
        }
    }

    fn int(n: i64) -> Json {
        json!({ "@int": n.to_string() })
    }

    /// Arguments for the issue texts.
    fn issue_args(email: &str) -> Json {
        json!({
            "email": email,
            "cognito_sub": "5f0c1a3e-0000-4000-8000-000000000001",
            "client_id": "app",
            "nonce": "n1",
            "access_ttl": int(900),
            "refresh_ttl": int(86_400),
            "metadata": { "groups": ["users"] },
        })
    }

    fn rotate_args(grace: i64, client_id: Option<&str>) -> Json {
        json!({
            "access_ttl": int(900),
            "refresh_ttl": int(86_400),
            "grace": int(grace),
            "client_id": client_id,
        })
    }

    fn s(v: &Json) -> &str {
        v.as_str().expect("a string")
    }

    impl Harness {
        /// Posts `body` to `path` with `Authorization: Bearer <bearer>` and `headers`.
        async fn post(
            &self,
            path: &str,
            bearer: Option<&str>,
            headers: &[(&str, &str)],
            body: String,
        ) -> Answer {
            let mut request = self
                .http
                .post(format!("{}{path}", self.double.endpoint()))
                .body(body);
            if let Some(bearer) = bearer {
                request = request.header("authorization", format!("Bearer {bearer}"));
            }
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let response = request.send().await.expect("the double answers");
            let status = response.status().as_u16();
            let www_authenticate = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().expect("ascii").to_owned());
            let raw = response.text().await.expect("a body");
            let body = serde_json::from_str(&raw).unwrap_or(Json::Null);
            Answer {
                status,
                www_authenticate,
                raw,
                body,
            }
        }

        /// Runs `text` in the tagged format, as the broker does.
        async fn query(&self, bearer: &str, text: &str, arguments: Json) -> Answer {
            let body = json!({ "query": text, "arguments": arguments }).to_string();
            self.post(
                "/query/1",
                Some(bearer),
                &[("x-format", "tagged"), ("x-query-tags", "rpc=test")],
                body,
            )
            .await
        }

        /// Issues a pair for `email` with the server key and returns `data`.
        async fn issue(&self, email: &str) -> Json {
            let answer = self
                .query(SERVER_KEY, queries::ISSUE_BY_EMAIL, issue_args(email))
                .await;
            assert_eq!(answer.status, 200, "{}", answer.raw);
            answer.body["data"].clone()
        }

        /// Whether `secret` authenticates `Query.token()`.
        async fn active(&self, secret: &str) -> bool {
            let answer = self.query(secret, queries::INTROSPECT, json!({})).await;
            match answer.status {
                200 => true,
                401 => false,
                _ => panic!("unexpected answer {answer:?}"),
            }
        }
    }

    /// The body of a 400 `invalid_request`.
    fn invalid_request(message: &str) -> Json {
        json!({ "error": { "code": "invalid_request", "message": message } })
    }

    fn assert_query_error(answer: &Answer, code: &str, message: &str) {
        assert_eq!(answer.status, 400, "{}", answer.raw);
        assert_eq!(answer.body["error"]["code"], code, "{}", answer.raw);
        assert_eq!(answer.body["error"]["message"], message, "{}", answer.raw);
        assert!(answer.body["summary"].is_string(), "{}", answer.raw);
        assert!(answer.body["txn_ts"].is_i64(), "{}", answer.raw);
        assert!(answer.body["schema_version"].is_i64(), "{}", answer.raw);
        assert_eq!(
            answer.body["stats"].as_object().map(Map::len),
            Some(8),
            "{}",
            answer.raw
        );
        assert!(answer.body.get("data").is_none());
    }

    #[test]
    fn every_broker_query_text_is_known() {
        let broker_rows = KNOWN_QUERIES
            .iter()
            .filter(|(name, _)| !name.starts_with("original_"))
            .count();
        assert_eq!(broker_rows, queries::ALL.len());
        for (name, text) in queries::ALL.iter().chain(&[
            ("original_lookup", original_lambda::LOOKUP),
            ("original_register", original_lambda::REGISTER),
            ("original_create_refresh", original_lambda::CREATE_REFRESH),
            ("original_create_access", original_lambda::CREATE_ACCESS),
        ]) {
            let recognised = recognise(text).map(|(name, _)| name);
            assert_eq!(
                recognised,
                Ok(*name),
                "queries::{name} changed: update KNOWN_QUERIES and the double"
            );
        }
    }

    #[tokio::test]
    async fn wrong_key_is_unauthorized_with_the_exact_body() {
        let h = harness().await;
        let unauthorized =
            json!({ "error": { "code": "unauthorized", "message": "Access token required" } });
        let body = json!({ "query": queries::INTROSPECT }).to_string();
        let forged = mint_secret(412_000_000_000_000_001, 7);
        for bearer in [
            Some("secret:wrong"),
            Some("secret"),
            Some(forged.as_str()),
            None,
        ] {
            let answer = h.post("/query/1", bearer, &[], body.clone()).await;
            assert_eq!(answer.status, 401, "{bearer:?}");
            assert_eq!(answer.body, unauthorized, "{bearer:?}");
            assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"));
        }
        // A 401 is rendered with the request's tags (FQL2Endpoint.exec → renderThunk).
        let answer = h
            .post(
                "/query/1",
                Some("nope"),
                &[("x-query-tags", "rpc=introspect")],
                body.clone(),
            )
            .await;
        assert_eq!(answer.status, 401);
        assert_eq!(
            answer.body,
            json!({ "error": unauthorized["error"], "query_tags": "rpc=introspect" })
        );
        // Basic carries `base64("<secret>:")`.
        let basic = |secret: &str| format!("Basic {}", STANDARD.encode(format!("{secret}:")));
        for (auth, status) in [(basic(SERVER_KEY), 200), (basic("secret:wrong"), 401)] {
            let response = h
                .http
                .post(format!("{}/query/1", h.double.endpoint()))
                .header("authorization", auth)
                .body(body.clone())
                .send()
                .await
                .expect("answer");
            assert_eq!(response.status().as_u16(), status);
        }
        let bearers: Vec<Bearer> = h.double.requests().iter().map(|r| r.bearer).collect();
        assert_eq!(
            bearers[..5],
            [
                Bearer::Other,
                Bearer::Other,
                Bearer::Token,
                Bearer::Missing,
                Bearer::Other
            ]
        );
        assert_eq!(bearers[5], Bearer::Key);
    }

    #[tokio::test]
    async fn tagged_arguments_must_tag_their_numbers() {
        let h = harness().await;
        let cases = [
            (
                json!({ "email": 5 }),
                "Invalid argument 'email': numbers must be tagged",
            ),
            (
                json!({ "email": { "@int": "1", "@long": "1" } }),
                "Invalid argument 'email': too many keys in tagged value",
            ),
            (
                json!({ "email": { "@int": "x" } }),
                "Invalid argument 'email': invalid integer",
            ),
            (
                json!({ "email": { "@int": 1 } }),
                "Invalid argument 'email': @int requires a string value",
            ),
            (
                json!({ "email": { "@time": "yesterday" } }),
                "Invalid argument 'email': invalid time",
            ),
            (
                json!({ "email": { "@foo": "1" } }),
                "Invalid argument 'email': invalid tag '@foo'",
            ),
            (
                json!({ "email": { "@mod": "Nope" } }),
                "Invalid argument 'email': no such module 'Nope'",
            ),
            (
                json!({ "email": [{ "a": 1.5 }] }),
                "Invalid argument 'email': numbers must be tagged",
            ),
        ];
        for (arguments, message) in cases {
            let answer = h
                .query(SERVER_KEY, queries::ACCOUNT_BY_EMAIL, arguments)
                .await;
            assert_eq!(answer.status, 400, "{message}");
            // An argument error is rendered with the request's tags.
            let mut expected = invalid_request(message);
            expected["query_tags"] = json!("rpc=test");
            assert_eq!(answer.body, expected);
        }
        // Well-formed tags decode, `@object` shields `@` keys.
        let metadata = json!({ "@object": { "@weird": { "@int": "1" } } });
        let mut args = issue_args("tags@example.com");
        args["metadata"] = metadata.clone();
        let issued = h.query(SERVER_KEY, queries::ISSUE_BY_EMAIL, args).await;
        assert_eq!(issued.status, 200, "{}", issued.raw);
        let access = s(&issued.body["data"]["access"]["secret"]).to_owned();
        let token = h.query(&access, queries::INTROSPECT, json!({})).await;
        assert_eq!(token.body["data"]["@doc"]["data"]["metadata"], metadata);
        // The simple format takes numbers as they are.
        let body = json!({ "query": queries::ACCOUNT_BY_EMAIL, "arguments": { "email": 5 } });
        let answer = h
            .post("/query/1", Some(SERVER_KEY), &[], body.to_string())
            .await;
        assert_eq!(answer.status, 200, "{}", answer.raw);
        assert_eq!(answer.body["data"], Json::Null);
    }

    #[tokio::test]
    async fn unknown_query_text_is_invalid_query() {
        let h = harness().await;
        let answer = h
            .query(SERVER_KEY, "Account.all().toArray()", json!({}))
            .await;
        assert_query_error(
            &answer,
            "invalid_query",
            "The query failed 1 validation check",
        );
        assert!(s(&answer.body["summary"]).contains(&hex_digest(b"Account.all().toArray()")));
        assert_eq!(answer.body["query_tags"], "rpc=test");
        assert_eq!(h.double.requests()[0].query, None);
        // One changed byte is another query.
        let answer = h
            .query(SERVER_KEY, &format!("{} ", queries::INTROSPECT), json!({}))
            .await;
        assert_query_error(
            &answer,
            "invalid_query",
            "The query failed 1 validation check",
        );
        // A template made of text is its text; one with values cannot run here.
        let text = json!({ "query": { "fql": [queries::INTROSPECT] } }).to_string();
        let answer = h.post("/query/1", Some(SERVER_KEY), &[], text).await;
        assert_eq!(answer.status, 200, "{}", answer.raw);
        let template = json!({ "query": { "fql": ["1 + ", { "value": { "@int": "1" } }] } });
        let answer = h
            .post("/query/1", Some(SERVER_KEY), &[], template.to_string())
            .await;
        assert_query_error(
            &answer,
            "invalid_query",
            "The query failed 1 validation check",
        );
    }

    #[tokio::test]
    async fn bad_headers_are_invalid_request() {
        let h = harness().await;
        let long_key = format!("{}=v", "k".repeat(41));
        let many: Vec<String> = (0..26).map(|i| format!("k{i}=v")).collect();
        let many = many.join(",");
        let cases: [(&str, &str, &str); 14] = [
            (
                "x-format",
                "json",
                "Invalid header 'x-format': Invalid format json",
            ),
            (
                "x-format",
                "Tagged",
                "Invalid header 'x-format': Invalid format Tagged",
            ),
            (
                "x-query-timeout-ms",
                "0",
                "Invalid header 'x-query-timeout-ms': Must be greater than 0.",
            ),
            (
                "x-query-timeout-ms",
                "600001",
                "Invalid header 'x-query-timeout-ms': Must be less than or equal to 600000.",
            ),
            (
                "x-query-timeout-ms",
                "5s",
                "Invalid header 'x-query-timeout-ms': Invalid number '5s'.",
            ),
            (
                "x-max-contention-retries",
                "8",
                "Invalid header 'x-max-contention-retries': Must be between 0 and 7.",
            ),
            (
                "x-linearized",
                "yes",
                "Invalid header 'x-linearized': Must be a boolean value.",
            ),
            (
                "x-typecheck",
                "1",
                "Invalid header 'x-typecheck': Must be a boolean value.",
            ),
            (
                "x-last-txn-ts",
                "later",
                "Invalid header 'x-last-txn-ts': Invalid timestamp 'later'.",
            ),
            (
                "x-query-tags",
                "foo,,",
                "Invalid header 'x-query-tags': invalid tags",
            ),
            (
                "x-query-tags",
                "a=b c",
                "Invalid header 'x-query-tags': invalid tags",
            ),
            (
                "x-query-tags",
                &long_key,
                "Invalid header 'x-query-tags': invalid key",
            ),
            (
                "x-query-tags",
                &many,
                "Invalid header 'x-query-tags': too many tags",
            ),
            (
                "x-query-tags",
                "a=1,b=2,a=3",
                "Invalid header 'x-query-tags': duplicate key",
            ),
        ];
        let body = json!({ "query": queries::INTROSPECT }).to_string();
        for (name, value, message) in cases {
            // Header errors come before authentication.
            let answer = h
                .post("/query/1", None, &[(name, value)], body.clone())
                .await;
            assert_eq!(answer.status, 400, "{name}: {value}");
            assert_eq!(answer.body, invalid_request(message), "{name}: {value}");
        }
        // Good values pass; tags come back in the server's (reversed) order.
        let good = [
            ("x-format", "simple"),
            ("x-query-timeout-ms", "600000"),
            ("x-max-contention-retries", "0"),
            ("x-linearized", "TRUE"),
            ("x-typecheck", "false"),
            ("x-last-txn-ts", "123"),
            ("x-query-tags", "a=1,b_2=x"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ];
        let answer = h.post("/query/1", Some(SERVER_KEY), &good, body).await;
        assert_eq!(answer.status, 200, "{}", answer.raw);
        assert_eq!(answer.body["query_tags"], "b_2=x,a=1");
        let recorded = h.double.requests().pop().expect("recorded");
        assert_eq!(recorded.query, Some("introspect"));
        assert_eq!(recorded.query_tags.as_deref(), Some("a=1,b_2=x"));
        assert_eq!(recorded.query_timeout_ms.as_deref(), Some("600000"));
        assert_eq!(recorded.last_txn_ts.as_deref(), Some("123"));
        assert_eq!(recorded.max_contention_retries.as_deref(), Some("0"));
        assert_eq!(recorded.format.as_deref(), Some("simple"));
        assert!(recorded.traceparent.is_some());
        assert_eq!(recorded.status, Some(200));
    }

    #[tokio::test]
    async fn bad_bodies_are_invalid_request() {
        let h = harness().await;
        let cases = [
            ("", "No request body provided"),
            (r#"{"foo":"bar"}"#, "Invalid request body"),
            (r#"{"query":1}"#, "Invalid request body"),
            (
                r#"{"query":"Query.token()","arguments":[]}"#,
                "Invalid request body",
            ),
            ("[]", "Invalid request body"),
        ];
        for (body, message) in cases {
            let answer = h.post("/query/1", Some(SERVER_KEY), &[], body.into()).await;
            assert_eq!(answer.status, 400, "{body}");
            assert_eq!(answer.body, invalid_request(message), "{body}");
        }
        let answer = h
            .post("/query/1", Some(SERVER_KEY), &[], "{not json".into())
            .await;
        assert_eq!(answer.status, 400);
        assert!(s(&answer.body["error"]["message"]).starts_with("Invalid request body: "));
        let nested = format!("{{\"query\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        let answer = h.post("/query/1", Some(SERVER_KEY), &[], nested).await;
        assert_eq!(
            answer.body,
            invalid_request("Invalid request body: JSON exceeds nesting limit")
        );
        let body = json!({ "query": queries::INTROSPECT }).to_string();
        let answer = h.post("/query/2", Some(SERVER_KEY), &[], body).await;
        assert_eq!(answer.status, 404);
    }

    #[tokio::test]
    async fn issued_tokens_authenticate_until_their_ttl() {
        let h = harness().await;
        let data = h.issue("ttl@example.com").await;
        let account = s(&data["account"]);
        assert!(account.len() == 18 && account.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(data["family"], format!("fam_{account}_n1"));
        assert!(data["now"]["@time"].is_string());
        let refresh = s(&data["refresh"]["secret"]).to_owned();
        let access = s(&data["access"]["secret"]).to_owned();
        for (minted, secret) in [(&data["refresh"], &refresh), (&data["access"], &access)] {
            assert_eq!(secret.len(), 51);
            assert!(secret.starts_with("fnE"));
            let (id, _, _) = decode_token_secret(secret).expect("§2.3 layout");
            assert_eq!(id.to_string(), s(&minted["id"]));
        }

        let answer = h.query(&access, queries::INTROSPECT, json!({})).await;
        assert_eq!(answer.status, 200, "{}", answer.raw);
        let doc = &answer.body["data"]["@doc"];
        assert_eq!(doc["id"], data["access"]["id"]);
        assert_eq!(doc["coll"], json!({ "@mod": "Token" }));
        assert_eq!(
            doc["document"],
            json!({ "@ref": { "id": account, "coll": { "@mod": "Account" } } })
        );
        assert_eq!(doc["ttl"], data["access"]["ttl"]);
        assert_eq!(doc["data"]["kind"], "access");
        assert_eq!(doc["data"]["parent"], data["refresh"]["id"]);
        assert_eq!(doc["data"]["issued_at"], data["now"]);
        assert_eq!(doc["data"]["client_id"], "app");
        assert!(doc.get("secret").is_none() && !answer.raw.contains(&access));
        assert_eq!(answer.body["summary"], "");
        assert!(answer.body["txn_ts"].as_i64() > Some(0));

        // A server key has no token.
        let answer = h.query(SERVER_KEY, queries::INTROSPECT, json!({})).await;
        assert_eq!(answer.body["data"], Json::Null);

        // Expiry is exact: at the ttl the secret is dead (§2.5).
        h.clock.advance(Duration::from_secs(899));
        assert!(h.active(&access).await);
        h.clock.advance(Duration::from_secs(1));
        assert!(!h.active(&access).await);
        assert!(h.active(&refresh).await);
        assert_eq!(h.double.live_token_count(), 1);
        h.clock.advance(Duration::from_secs(86_400));
        assert!(!h.active(&refresh).await);
        // A scope suffix on a token is ignored; a tampered secret is not a token.
        let data = h.issue("ttl@example.com").await;
        let refresh = s(&data["refresh"]["secret"]).to_owned();
        assert!(h.active(&format!("{refresh}:@role/admin")).await);
        let mut tampered = refresh.clone().into_bytes();
        tampered[50] = if tampered[50] == b'A' { b'Q' } else { b'A' };
        assert!(!h.active(&String::from_utf8(tampered).expect("ascii")).await);
    }

    #[tokio::test]
    async fn revoked_tokens_are_refused() {
        let h = harness().await;
        let data = h.issue("revoke@example.com").await;
        let refresh = s(&data["refresh"]["secret"]).to_owned();
        let access = s(&data["access"]["secret"]).to_owned();

        let answer = h
            .query(
                &access,
                queries::REVOKE_SECRET,
                json!({ "client_id": "other" }),
            )
            .await;
        assert_eq!(answer.body["data"], json!({ "outcome": "wrong_client" }));
        let answer = h
            .query(
                &access,
                queries::REVOKE_SECRET,
                json!({ "client_id": null }),
            )
            .await;
        assert_eq!(
            answer.body["data"],
            json!({ "outcome": "revoked", "revoked": int(1) })
        );
        assert!(!h.active(&access).await);
        assert!(h.active(&refresh).await);
        let answer = h
            .query(
                &refresh,
                queries::REVOKE_SECRET,
                json!({ "client_id": "app" }),
            )
            .await;
        assert_eq!(
            answer.body["data"],
            json!({ "outcome": "revoked", "revoked": int(1) })
        );
        assert!(!h.active(&refresh).await);
        let answer = h
            .query(
                SERVER_KEY,
                queries::REVOKE_SECRET,
                json!({ "client_id": null }),
            )
            .await;
        assert_eq!(answer.body["data"], json!({ "outcome": "inactive" }));

        // By id (a refresh id takes its family), by family, by account.
        let data = h.issue("revoke@example.com").await;
        let account = data["account"].clone();
        let answer = h
            .query(
                SERVER_KEY,
                queries::REVOKE_TOKEN,
                json!({ "token_id": data["refresh"]["id"] }),
            )
            .await;
        assert_eq!(answer.body["data"], int(2), "{}", answer.raw);
        let answer = h
            .query(
                SERVER_KEY,
                queries::REVOKE_TOKEN,
                json!({ "token_id": data["refresh"]["id"] }),
            )
            .await;
        assert_eq!(answer.body["data"], int(0));
        let data = h.issue("revoke@example.com").await;
        let family_args = json!({ "account_id": account, "family": data["family"] });
        let answer = h
            .query(SERVER_KEY, queries::REVOKE_FAMILY, family_args)
            .await;
        assert_eq!(answer.body["data"], int(2), "{}", answer.raw);
        h.issue("revoke@example.com").await;
        h.issue("revoke@example.com").await;
        let answer = h
            .query(
                SERVER_KEY,
                queries::REVOKE_ACCOUNT,
                json!({ "account_id": account }),
            )
            .await;
        assert_eq!(answer.body["data"], int(4), "{}", answer.raw);
        assert_eq!(h.double.live_token_count(), 0);
        let answer = h
            .query(
                SERVER_KEY,
                queries::REVOKE_ACCOUNT,
                json!({ "account_id": "1" }),
            )
            .await;
        assert_eq!(answer.body["data"], int(0));
    }

    #[tokio::test]
    async fn concurrent_first_issues_converge_on_one_account() {
        let h = Arc::new(harness().await);
        let mut tasks = JoinSet::new();
        for _ in 0..16 {
            let h = Arc::clone(&h);
            tasks.spawn(async move { h.issue("Same@Example.com").await["account"].clone() });
        }
        let accounts: BTreeSet<String> = tasks
            .join_all()
            .await
            .iter()
            .map(|a| s(a).to_owned())
            .collect();
        assert_eq!(accounts.len(), 1);
        assert_eq!(h.double.account_count(), 1);
        assert_eq!(h.double.live_token_count(), 32);
        let answer = h
            .query(
                SERVER_KEY,
                queries::ACCOUNT_BY_EMAIL,
                json!({ "email": "Same@Example.com" }),
            )
            .await;
        assert_eq!(answer.body["data"], accounts.first().expect("one").as_str());
        // Uniqueness is an exact match (§3.2): another spelling is another account.
        h.issue("same@example.com").await;
        assert_eq!(h.double.account_count(), 2);
    }

    #[test]
    fn duplicate_email_create_is_a_constraint_failure() {
        let mut db = Db::default();
        db.create_account("dup@example.com", None, 0)
            .expect("first create");
        let failure = db
            .create_account("dup@example.com", None, 0)
            .expect_err("unique email");
        assert_eq!(failure.code, "constraint_failure");
        assert_eq!(failure.message, "Failed unique constraint.");
        assert_eq!(
            failure
                .extra
                .as_ref()
                .and_then(|e| e.constraint_failures.clone()),
            Some(json!([{ "paths": [["email"]], "message": "Failed unique constraint" }]))
        );
        let summary = failure.summary(queries::ISSUE_BY_EMAIL);
        assert!(summary.starts_with(
            "error: Failed unique constraint.\nconstraint failures:\n  email: Failed unique constraint\nat *query*:1:"
        ));
        assert_eq!(db.accounts.len(), 1);
    }

    #[tokio::test]
    async fn issue_for_a_missing_account_is_document_not_found() {
        let h = harness().await;
        let mut args = issue_args("x@example.com");
        args["account_id"] = json!("412000000000000001");
        let answer = h
            .query(SERVER_KEY, queries::ISSUE_FOR_ACCOUNT, args.clone())
            .await;
        assert_query_error(
            &answer,
            "document_not_found",
            "Collection `Account` does not contain document with id 412000000000000001.",
        );
        assert!(
            s(&answer.body["summary"]).contains("at *query*:1:27"),
            "{}",
            answer.raw
        );
        assert_eq!(h.double.live_token_count(), 0);
        // With a known account it mints without a lookup by email.
        let data = h.issue("x@example.com").await;
        args["account_id"] = data["account"].clone();
        let answer = h
            .query(SERVER_KEY, queries::ISSUE_FOR_ACCOUNT, args.clone())
            .await;
        assert_eq!(
            answer.body["data"]["account"], data["account"],
            "{}",
            answer.raw
        );
        // A missing argument is a runtime error, and nothing is written.
        let before = h.double.live_token_count();
        let mut partial = args;
        partial.as_object_mut().expect("object").remove("nonce");
        let answer = h
            .query(SERVER_KEY, queries::ISSUE_FOR_ACCOUNT, partial)
            .await;
        assert_query_error(&answer, "unbound_variable", "Unbound variable `nonce`");
        assert_eq!(h.double.live_token_count(), before);
    }

    #[tokio::test]
    async fn rotation_follows_the_udf() {
        let h = harness().await;
        let data = h.issue("rotate@example.com").await;
        let first = s(&data["refresh"]["secret"]).to_owned();
        let access = s(&data["access"]["secret"]).to_owned();

        // Access tokens have no call privilege; a key has no token.
        let answer = h
            .query(&access, queries::ROTATE, rotate_args(10, None))
            .await;
        assert_query_error(
            &answer,
            "permission_denied",
            "Insufficient privileges to perform the action.",
        );
        let answer = h
            .query(SERVER_KEY, queries::ROTATE, rotate_args(10, None))
            .await;
        assert_eq!(answer.body["data"], json!({ "outcome": "inactive" }));
        let answer = h
            .query(&first, queries::ROTATE, rotate_args(10, Some("web")))
            .await;
        assert_eq!(answer.body["data"], json!({ "outcome": "wrong_client" }));

        let answer = h
            .query(&first, queries::ROTATE, rotate_args(10, Some("app")))
            .await;
        let rotated = &answer.body["data"];
        assert_eq!(rotated["outcome"], "rotated", "{}", answer.raw);
        assert_eq!(rotated["family"], data["family"]);
        assert_eq!(rotated["account"], data["account"]);
        let second = s(&rotated["refresh"]["secret"]).to_owned();
        let second_access = s(&rotated["access"]["secret"]).to_owned();
        let introspected = h.query(&first, queries::INTROSPECT, json!({})).await;
        let consumed = &introspected.body["data"]["@doc"]["data"];
        assert_eq!(consumed["replaced_by"], rotated["refresh"]["id"]);
        assert!(consumed["rotated_at"]["@time"].is_string());
        // A consumed refresh token can still be revoked only as inactive.
        let answer = h
            .query(&first, queries::REVOKE_SECRET, json!({ "client_id": null }))
            .await;
        assert_eq!(answer.body["data"], json!({ "outcome": "inactive" }));

        // Within grace, the predecessor supersedes its successor (a lost answer retried).
        h.clock.advance(Duration::from_secs(5));
        let answer = h
            .query(&first, queries::ROTATE, rotate_args(10, None))
            .await;
        assert_eq!(answer.body["data"]["outcome"], "rotated", "{}", answer.raw);
        let third = s(&answer.body["data"]["refresh"]["secret"]).to_owned();
        assert!(!h.active(&second).await);
        assert!(!h.active(&second_access).await);
        assert!(h.active(&third).await);
        assert!(h.active(&access).await);

        // After grace it is reuse: the family goes, and `revoked` counts the unconsumed.
        h.clock.advance(Duration::from_secs(6));
        let answer = h
            .query(&first, queries::ROTATE, rotate_args(10, None))
            .await;
        assert_eq!(
            answer.body["data"],
            json!({ "outcome": "reuse", "family": data["family"], "revoked": int(3) }),
            "{}",
            answer.raw
        );
        for secret in [&first, &third, &access] {
            assert!(!h.active(secret).await);
        }
        assert_eq!(h.double.live_token_count(), 0);
    }

    #[tokio::test]
    async fn tokens_may_run_only_their_own_queries() {
        let h = harness().await;
        let data = h.issue("perm@example.com").await;
        for bearer in [&data["access"]["secret"], &data["refresh"]["secret"]] {
            let answer = h
                .query(
                    s(bearer),
                    queries::ACCOUNT_BY_EMAIL,
                    json!({ "email": "perm@example.com" }),
                )
                .await;
            assert_query_error(
                &answer,
                "permission_denied",
                "Insufficient privileges to perform the action.",
            );
            assert!(
                s(&answer.body["summary"]).starts_with(
                    "error: Insufficient privileges to perform the action.\nat *query*:1:1\n  |\n1 | Account.byEmail(email).first()?.id\n  | ^^^^^^^^^^^^^^^^^^^^^^\n  |"
                ),
                "{}",
                answer.raw
            );
        }
    }

    #[tokio::test]
    async fn list_tokens_pages_newest_first() {
        let h = harness().await;
        let first = h.issue("list@example.com").await;
        h.clock.advance(Duration::from_secs(1));
        let second = h.issue("list@example.com").await;
        let account = first["account"].clone();
        let rotated = h
            .query(
                s(&second["refresh"]["secret"]),
                queries::ROTATE,
                rotate_args(0, None),
            )
            .await;
        assert_eq!(rotated.body["data"]["outcome"], "rotated");
        let list = |after_issued_at: Json, after_id: &str, consumed: bool, limit: i64| {
            json!({
                "account_id": account,
                "after_issued_at": after_issued_at,
                "after_id": after_id,
                "include_consumed": consumed,
                "limit": int(limit),
            })
        };
        let end = json!({ "@time": "9999-12-31T23:59:59Z" });
        let answer = h
            .query(
                SERVER_KEY,
                queries::LIST_TOKENS,
                list(end.clone(), "", true, 10),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.raw);
        let ids: Vec<&str> = answer.body["data"]
            .as_array()
            .expect("array")
            .iter()
            .map(|d| s(&d["@doc"]["id"]))
            .collect();
        // Newest issued_at first; within one instant, the larger id first.
        let expected = [
            &rotated.body["data"]["access"]["id"],
            &rotated.body["data"]["refresh"]["id"],
            &second["access"]["id"],
            &second["refresh"]["id"],
            &first["access"]["id"],
            &first["refresh"]["id"],
        ]
        .map(s);
        assert_eq!(ids, expected);
        // The cursor resumes after (issued_at, id); consumed tokens can be left out.
        let page = h
            .query(
                SERVER_KEY,
                queries::LIST_TOKENS,
                list(end.clone(), "", false, 2),
            )
            .await;
        let page = page.body["data"].as_array().expect("array").clone();
        assert_eq!(page.len(), 2);
        let last = &page[1]["@doc"];
        let next = h
            .query(
                SERVER_KEY,
                queries::LIST_TOKENS,
                list(last["data"]["issued_at"].clone(), s(&last["id"]), false, 10),
            )
            .await;
        let next: Vec<&str> = next.body["data"]
            .as_array()
            .expect("array")
            .iter()
            .map(|d| s(&d["@doc"]["id"]))
            .collect();
        assert_eq!(next, [expected[2], expected[4], expected[5]]);
        let answer = h
            .query(
                SERVER_KEY,
                queries::LIST_TOKENS,
                json!({ "account_id": "1" }),
            )
            .await;
        assert_eq!(answer.body["data"], json!([]));
    }

    #[tokio::test]
    async fn injected_faults_answer_with_their_status_and_body() {
        let h = harness().await;
        let error =
            |code: &str, message: &str| json!({ "error": { "code": code, "message": message } });
        let cases = [
            (
                Fault::Contended,
                409,
                error(
                    "contended_transaction",
                    "Transaction was aborted due to detection of concurrent modification.",
                ),
            ),
            (
                Fault::ClientTimeout,
                440,
                error(
                    "time_out",
                    "Client set aggressive deadline: query needs 1000, timed out within 500",
                ),
            ),
            (
                Fault::Internal,
                500,
                error(
                    "internal_error",
                    "java.lang.IllegalStateException: fault injected by the test double Please create a ticket at https://support.fauna.com",
                ),
            ),
            (Fault::Unavailable, 503, error("time_out", "Read timed out")),
        ];
        let body = json!({ "query": queries::INTROSPECT }).to_string();
        let headers = [("x-query-timeout-ms", "500"), ("x-query-tags", "rpc=fault")];
        for (fault, status, expected) in cases {
            h.double.inject(fault, 1);
            let answer = h
                .post("/query/1", Some(SERVER_KEY), &headers, body.clone())
                .await;
            assert_eq!(
                (answer.status, &answer.body),
                (status, &expected),
                "{fault:?}"
            );
        }
        h.double.inject(Fault::RateLimited, 1);
        let answer = h
            .post("/query/1", Some(SERVER_KEY), &headers, body.clone())
            .await;
        assert_eq!(answer.status, 429);
        assert_eq!(
            answer.body["error"],
            error("limit_exceeded", "Rate limit exceeded")["error"]
        );
        assert_eq!(answer.body["stats"]["rate_limits_hit"], json!(["read"]));
        assert_eq!(answer.body.as_object().map(Map::len), Some(2));

        h.double.inject(Fault::EmptyBody, 1);
        h.double.inject(Fault::MalformedBody, 1);
        let empty = h
            .post("/query/1", Some(SERVER_KEY), &[], body.clone())
            .await;
        assert_eq!((empty.status, empty.raw.as_str()), (200, ""));
        let malformed = h
            .post("/query/1", Some(SERVER_KEY), &[], body.clone())
            .await;
        assert_eq!(malformed.status, 200);
        assert!(serde_json::from_str::<Json>(&malformed.raw).is_err());

        // `times` counts requests; then the double answers normally again.
        h.double.inject(Fault::Contended, 2);
        for status in [409, 409, 200] {
            let answer = h
                .post("/query/1", Some(SERVER_KEY), &[], body.clone())
                .await;
            assert_eq!(answer.status, status);
        }
        // A slow answer runs the query at once and answers late.
        h.double.inject(Fault::Slow(Duration::from_millis(300)), 1);
        let started = Instant::now();
        let data = h.issue("slow@example.com").await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(data["refresh"]["secret"].is_string());
        // Latency applies to every request.
        h.double.set_latency(Duration::from_millis(50));
        let started = Instant::now();
        h.post("/query/1", Some(SERVER_KEY), &[], body).await;
        assert!(started.elapsed() >= Duration::from_millis(50));

        let requests = h.double.requests();
        let faults: Vec<Option<Fault>> = requests.iter().map(|r| r.fault).collect();
        assert_eq!(faults[0], Some(Fault::Contended));
        assert_eq!(requests.len(), 12);
        assert!(requests.iter().all(|r| r.status.is_some()));
        h.double.clear_requests();
        assert!(h.double.requests().is_empty());
    }

    #[tokio::test]
    async fn serves_h2c_with_prior_knowledge() {
        let h = harness().await;
        let http = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        let response = http
            .post(format!("{}/query/1", h.double.endpoint()))
            .bearer_auth(SERVER_KEY)
            .body(json!({ "query": queries::INTROSPECT }).to_string())
            .send()
            .await
            .expect("answer");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status().as_u16(), 200);
    }

    #[tokio::test]
    async fn debug_output_shows_no_secret() {
        let h = harness().await;
        let shown = format!("{:?}", h.double);
        assert!(!shown.contains(SERVER_KEY), "{shown}");
        assert!(shown.starts_with("FaunaDouble"));
    }

    #[test]
    fn times_render_like_java_instants() {
        let base = 1_777_777_777_000_000_000_i128;
        assert_eq!(format_time(base), "2026-05-03T03:09:37Z");
        assert_eq!(format_time(base + 120_000_000), "2026-05-03T03:09:37.120Z");
        assert_eq!(
            format_time(base + 123_456_000),
            "2026-05-03T03:09:37.123456Z"
        );
        assert_eq!(
            format_time(base + 123_456_789),
            "2026-05-03T03:09:37.123456789Z"
        );
        assert_eq!(
            parse_time("2026-05-03T03:09:37.123456Z"),
            Some(base + 123_456_000)
        );
        assert_eq!(parse_time("2026-05-03T05:09:37+02:00"), Some(base));
    }

    #[test]
    fn transaction_times_strictly_increase() {
        let mut db = Db::default();
        assert_eq!(db.tick(1_000), 1_000);
        assert_eq!(db.tick(1_000), 1_001);
        assert_eq!(db.tick(500), 1_002);
        assert_eq!(db.tick(5_000), 5_000);
        let (a, b) = (db.next_id(), db.next_id());
        assert!(b > a && a > 0);
    }
}
