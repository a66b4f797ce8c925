//! The HTTP side of the double: the accept loop, and each request checked in the real
//! endpoint's order (request-info headers, tags, format, body, bearer, arguments, query text)
//! before it runs as one transaction.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{Map, Value as Json, json};
use tokenbroker::model::clock::Clock;
use tokio::{net::TcpListener, task::JoinSet};

use super::{
    Bearer, Fault, Recorded,
    database::{Db, Key},
    lock,
    query::{Query, recognise},
    reply::{Failure, Reply, fault_reply, protocol_error, stats_json},
    secret::decode_token_secret,
    txn::{Args, Txn},
    value::{Format, Value, decode_simple, decode_tagged, encode},
};

pub(super) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
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
) -> Result<Response<Full<Bytes>>, AnswerLost> {
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
    let fault = query
        .and_then(|(name, _)| {
            let mut aimed = lock(&shared.query_faults);
            let at = aimed.iter().position(|(aimed, _)| *aimed == name)?;
            aimed.remove(at).map(|(_, fault)| fault)
        })
        .or_else(|| lock(&shared.faults).pop_front());
    let template = parsed.as_ref().is_ok_and(|b| b.template);
    let index = shared.record(&parts.headers, query, template, fault);
    let latency = *lock(&shared.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let reply = match fault {
        None => {
            shared
                .process(parts.uri.path(), &parts.headers, &parsed)
                .await
        }
        Some(Fault::Slow(delay)) => {
            let reply = shared
                .process(parts.uri.path(), &parts.headers, &parsed)
                .await;
            tokio::time::sleep(delay).await;
            reply
        }
        Some(Fault::CommittedUnavailable) => {
            drop(
                shared
                    .process(parts.uri.path(), &parts.headers, &parsed)
                    .await,
            );
            fault_reply(Fault::CommittedUnavailable, &parts.headers)
        }
        Some(Fault::CommittedLost) => {
            drop(
                shared
                    .process(parts.uri.path(), &parts.headers, &parsed)
                    .await,
            );
            // An error from the service makes hyper close the connection unanswered.
            return Err(AnswerLost);
        }
        Some(Fault::CommittedTimeout) => {
            let reply = shared
                .process(parts.uri.path(), &parts.headers, &parsed)
                .await;
            let within = header(&parts.headers, "x-query-timeout-ms")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(120_000);
            tokio::time::sleep(Duration::from_millis(within + 1000)).await;
            reply
        }
        Some(Fault::EmailTaken) => {
            // A concurrent sign-in of the same email commits first; this request read the
            // snapshot before it, so its `Account.create` meets the unique constraint.
            let email = parsed.as_ref().ok().and_then(|b| {
                b.arguments
                    .as_ref()?
                    .get("email")?
                    .as_str()
                    .map(str::to_owned)
            });
            if let Some(email) = &email {
                let mut db = lock(&shared.db);
                let now = db.tick(shared.clock.now().0);
                if let Ok(id) = db.create_account(email, None, i128::from(now) * 1000) {
                    db.stamp(now, &[Key::Email(email.clone()), Key::Account(id)]);
                }
            }
            shared
                .process_with(parts.uri.path(), &parts.headers, &parsed, email, false)
                .await
        }
        Some(Fault::StaleKeyCache) => {
            shared
                .process_with(parts.uri.path(), &parts.headers, &parsed, None, true)
                .await
        }
        Some(fault) => fault_reply(fault, &parts.headers),
    };
    if let Some(recorded) = lock(&shared.requests).get_mut(index) {
        recorded.status = Some(reply.status);
    }
    tracing::debug!(query = ?query.map(|q| q.0), status = reply.status, "fauna double answered");
    Ok(reply.into_response())
}

/// The service's error for [`Fault::CommittedLost`]: the connection closes with no answer.
#[derive(Debug)]
pub(super) struct AnswerLost;

impl std::fmt::Display for AnswerLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the answer was lost after the commit (injected)")
    }
}

impl std::error::Error for AnswerLost {}

/// What a request brought that every attempt of its transaction uses.
#[derive(Clone, Copy)]
struct Run<'a> {
    headers: &'a HeaderMap,
    body: &'a RequestBody,
    format: Format,
    tags: Option<&'a str>,
    stale_email: Option<&'a str>,
    stale_key_cache: bool,
    started: Instant,
}

/// State shared by the handle and the server task.
pub(super) struct Shared {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) keys: Vec<String>,
    pub(super) database_id: i64,
    pub(super) schema_version: i64,
    pub(super) latency: Mutex<Duration>,
    /// How long each transaction takes between its snapshot and its commit.
    pub(super) transaction_time: Mutex<Duration>,
    /// Transaction attempts that conflicted and were taken back.
    pub(super) conflicts: AtomicU64,
    pub(super) faults: Mutex<VecDeque<Fault>>,
    /// Faults for the next requests of one query, by its name, before those of `faults`.
    pub(super) query_faults: Mutex<VecDeque<(&'static str, Fault)>>,
    pub(super) requests: Mutex<Vec<Recorded>>,
    pub(super) db: Mutex<Db>,
}

/// Returns a header's value as text (lossily, as Netty would hand it over).
pub(super) fn header(headers: &HeaderMap, name: &str) -> Option<String> {
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

/// A request body that parsed (`docs/design.md` "Fauna over HTTP › Requests").
#[derive(Debug)]
struct RequestBody {
    /// The query text; `None` for a template with values, which the double cannot run.
    text: Option<String>,
    /// Whether `query` came in the template form `{"fql": [...]}`.
    template: bool,
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
    let (text, template) = match fields.remove("query") {
        Some(Json::String(text)) => (Some(text), false),
        Some(Json::Object(template)) => (template_text(&template).ok_or_else(invalid)?, true),
        _ => return Err(invalid()),
    };
    let arguments = match fields.remove("arguments") {
        None | Some(Json::Null) => None,
        Some(Json::Object(arguments)) => Some(arguments),
        Some(_) => return Err(invalid()),
    };
    Ok(RequestBody {
        text,
        template,
        arguments,
    })
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

impl Shared {
    /// Records a request at receipt and returns its index.
    fn record(
        &self,
        headers: &HeaderMap,
        query: Option<(&'static str, Query)>,
        template: bool,
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
            template,
            bearer,
            status: None,
            fault,
            query_tags: header(headers, "x-query-tags"),
            format: header(headers, "x-format"),
            query_timeout_ms: header(headers, "x-query-timeout-ms"),
            typecheck: header(headers, "x-typecheck"),
            linearized: header(headers, "x-linearized"),
            last_txn_ts: header(headers, "x-last-txn-ts"),
            max_contention_retries: header(headers, "x-max-contention-retries"),
            traceparent: header(headers, "traceparent"),
            tracestate: header(headers, "tracestate"),
        });
        requests.len() - 1
    }

    /// Answers a request that got no fault.
    async fn process(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: &Result<RequestBody, String>,
    ) -> Reply {
        self.process_with(path, headers, body, None, false).await
    }

    /// Answers a request whose snapshot predates the account of `stale_email`, if any, on a
    /// node with a stale key cache if `stale_key_cache`.
    async fn process_with(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: &Result<RequestBody, String>,
        stale_email: Option<String>,
        stale_key_cache: bool,
    ) -> Reply {
        if path != "/query/1" {
            // The real server hands every other path to the v4 router, which is not modelled.
            return protocol_error(404, "not_found", "Not found", None);
        }
        match self
            .try_process(headers, body, stale_email.as_deref(), stale_key_cache)
            .await
        {
            Ok(reply) | Err(reply) => reply,
        }
    }

    async fn try_process(
        &self,
        headers: &HeaderMap,
        body: &Result<RequestBody, String>,
        stale_email: Option<&str>,
        stale_key_cache: bool,
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
        // Attempts in all: the retries the header allows plus one, else Fauna's default 5.
        let mut attempts = 5;
        if let Some(v) = header(headers, "x-max-contention-retries") {
            let error = match v.parse::<i32>() {
                Err(_) => Some(format!("Invalid number '{v}'.")),
                Ok(n) if !(0..=7).contains(&n) => Some("Must be between 0 and 7.".to_owned()),
                Ok(n) => {
                    attempts = n + 1;
                    None
                }
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

        let run = Run {
            headers,
            body,
            format,
            tags: tags.as_deref(),
            stale_email,
            stale_key_cache,
            started,
        };
        // Optimistic transactions, as Fauna's: each attempt reads a snapshot and is checked at
        // its commit; one that read what a later commit wrote runs again, up to `attempts`
        // times, then the client gets 409. With no transaction time set, the snapshot is
        // taken at the commit, and nothing can conflict.
        let hold = *lock(&self.transaction_time);
        for retries in 0..attempts {
            let snapshot = if hold.is_zero() {
                None
            } else {
                let snapshot = lock(&self.db).last_txn();
                tokio::time::sleep(hold).await;
                Some(snapshot)
            };
            if let Some(reply) = self.attempt(&run, snapshot, retries)? {
                return Ok(reply);
            }
        }
        Err(fault_reply(Fault::Contended, headers))
    }

    /// Runs one attempt of a transaction: its answer, or `None` when it conflicted with a
    /// commit after `snapshot` and was taken back.
    fn attempt(
        &self,
        run: &Run<'_>,
        snapshot: Option<i64>,
        retries: i32,
    ) -> Result<Option<Reply>, Reply> {
        let Run {
            headers,
            body,
            format,
            tags,
            stale_email,
            stale_key_cache,
            started,
        } = *run;
        let mut db = lock(&self.db);
        let now_micros = db.tick(self.clock.now().0);
        let mut txn = Txn::new(&mut db, i128::from(now_micros) * 1000, self.database_id);
        txn.stats.contention_retries = u64::try_from(retries).unwrap_or(0);
        txn.stale_email = stale_email.map(str::to_owned);
        txn.stale_key_cache = stale_key_cache;

        // Authentication (`docs/design.md` "Fauna over HTTP › Authentication, expiry and
        // revocation"): a 401 is rendered with the request's tags.
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
            return Ok(Some(respond(&txn, Err(failure), "")));
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
                     (tests/src/fauna/query.rs)"
                ));
                return Ok(Some(respond(&txn, Err(failure), text)));
            }
        };
        // A database made from the typed schema checks types unless the request says not to.
        let typecheck =
            header(headers, "x-typecheck").is_none_or(|v| v.eq_ignore_ascii_case("true"));
        if typecheck && !query.passes_typecheck() {
            let failure = Failure::new(
                "invalid_query",
                "The query failed 1 validation check".into(),
            )
            .with_summary(
                "error: the Fauna test double cannot type check, and this text is not written \
                 for the checker; send `X-Typecheck: false` (broker/src/store/fauna/queries.rs)",
            );
            return Ok(Some(respond(&txn, Err(failure), text)));
        }
        let result = txn.run(query, &caller, &Args(&arguments));
        if snapshot.is_some_and(|snapshot| txn.conflicts(snapshot)) {
            txn.rollback();
            self.conflicts.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let failed = result.is_err();
        let reply = respond(&txn, result, text);
        if failed {
            txn.rollback();
        } else {
            txn.commit(now_micros);
        }
        Ok(Some(reply))
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

/// Returns the secret an `Authorization` header carries (`docs/design.md` "Fauna over HTTP ›
/// Requests"): `Bearer <secret>`, or
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
