//! What the double answers: HTTP replies, protocol errors, the answers to injected faults,
//! `stats`, and query failures with their rendered summaries.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    HeaderMap, Response, StatusCode,
    header::{CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
};
use serde_json::{Value as Json, json};

use super::{Fault, server::header};

/// An HTTP answer.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: u16,
    body: Vec<u8>,
    pub(super) unauthorized: bool,
}

impl Reply {
    pub(super) fn json(status: u16, body: &Json) -> Self {
        Self {
            status,
            body: serde_json::to_vec(body).expect("JSON values serialise"),
            unauthorized: false,
        }
    }

    pub(super) fn into_response(self) -> Response<Full<Bytes>> {
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

/// A protocol error (`docs/design.md` "Fauna over HTTP › Responses and errors"): only `error`,
/// plus `query_tags` when the server had parsed them.
pub(super) fn protocol_error(status: u16, code: &str, message: &str, tags: Option<&str>) -> Reply {
    let mut body = json!({ "error": { "code": code, "message": message } });
    if let Some(tags) = tags {
        body["query_tags"] = json!(tags);
    }
    Reply::json(status, &body)
}

/// The answer to an injected fault. Faults are raised as exceptions, which the server renders
/// without the request's tags (`CoreApplication.recover` with `errResInfo()`).
pub(super) fn fault_reply(fault: Fault, headers: &HeaderMap) -> Reply {
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
        Fault::CommittedUnavailable => protocol_error(503, "time_out", "Read timed out", None),
        Fault::Slow(_)
        | Fault::CommittedLost
        | Fault::CommittedTimeout
        | Fault::EmailTaken
        | Fault::StaleKeyCache => {
            unreachable!("the query runs first")
        }
    }
}

/// What a transaction did, for `stats`.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) reads: u64,
    pub(super) writes: u64,
    pub(super) bytes_read: u64,
    pub(super) bytes_written: u64,
    /// How many times the transaction ran again after a conflict.
    pub(super) contention_retries: u64,
}

/// The eight `stats` keys of a response (`docs/design.md` "Fauna over HTTP › Responses and
/// errors").
pub(super) fn stats_json(stats: &Stats, query_ms: u64, rate_limits_hit: &[&str]) -> Json {
    json!({
        "compute_ops": 1,
        "read_ops": stats.reads,
        "write_ops": stats.writes,
        "query_time_ms": query_ms,
        "contention_retries": stats.contention_retries,
        "storage_bytes_read": stats.bytes_read,
        "storage_bytes_write": stats.bytes_written,
        "rate_limits_hit": rate_limits_hit,
    })
}

/// A query failure, as opposed to a protocol error (`docs/design.md` "Fauna over HTTP ›
/// Responses and errors"): HTTP 400 with `summary`, `txn_ts`, `stats`.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) code: &'static str,
    pub(super) message: String,
    /// The query text the error points at, for the summary.
    at: Option<&'static str>,
    /// What few failures carry (boxed, to keep `Result<_, Failure>` small).
    pub(super) extra: Option<Box<FailureExtra>>,
}

/// The rarer parts of a [`Failure`].
#[derive(Debug, Default)]
pub(super) struct FailureExtra {
    /// Lines after the `error:` line.
    pub(super) notes: Option<String>,
    /// Replaces the rendered summary.
    pub(super) summary: Option<String>,
    pub(super) constraint_failures: Option<Json>,
}

impl Failure {
    pub(super) fn new(code: &'static str, message: String) -> Self {
        Self {
            code,
            message,
            at: None,
            extra: None,
        }
    }

    pub(super) fn at(mut self, at: &'static str) -> Self {
        self.at = Some(at);
        self
    }

    pub(super) fn with_summary(mut self, summary: &str) -> Self {
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
    pub(super) fn summary(&self, text: &str) -> String {
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
