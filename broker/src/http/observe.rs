//! What every HTTP call leaves behind: a span (its caller's `traceparent` as remote parent) and
//! `tokenbroker_http_*` metrics by endpoint and status.
//!
//! A call whose client goes away before the answer (a closed connection, an HTTP/2 reset) is
//! dropped by hyper; it is counted when dropped, with status `cancelled`.
//!
//! Span fields (OpenTelemetry's HTTP conventions where they have a name): `http.request.method`,
//! `http.route`, `caller`, `http.response.status_code`, `trace_id`, and the ids the call
//! touched (`account_id`, `family_id`, `token_id`), never a secret.

use std::time::Instant;

use axum::http::{HeaderMap, Method, StatusCode};
use tracing::{Span, debug_span, field::Empty, info_span};

use crate::obs::{
    context::{self, TRACEPARENT, TRACESTATE},
    metrics::{Counter, Family, Histogram, MetricSet, Zeros},
};

crate::label! {
    /// An HTTP endpoint, as the `endpoint` label.
    pub enum Endpoint: "endpoint" {
        /// `POST /oauth2/introspect` (RFC 7662).
        Introspect = "introspect",
        /// `POST /oauth2/revoke` (RFC 7009).
        Revoke = "revoke",
        /// `/oauth2/authz`, forward auth.
        Authz = "authz",
    }
}

impl Endpoint {
    /// The route, as the span's `http.route`.
    pub fn route(self) -> &'static str {
        match self {
            Self::Introspect => "/oauth2/introspect",
            Self::Revoke => "/oauth2/revoke",
            Self::Authz => "/oauth2/authz",
        }
    }
}

crate::label! {
    /// The answer's status, as the `status` label.
    pub enum Status: "status" {
        Ok = "200",
        BadRequest = "400",
        Unauthorized = "401",
        Forbidden = "403",
        PayloadTooLarge = "413",
        TooManyRequests = "429",
        InternalServerError = "500",
        ServiceUnavailable = "503",
        GatewayTimeout = "504",
        /// Any status the adapter does not answer itself.
        Other = "other",
        /// The client went away before the answer.
        Cancelled = "cancelled",
    }
}

impl Status {
    fn of(status: StatusCode) -> Self {
        match status.as_u16() {
            200 => Self::Ok,
            400 => Self::BadRequest,
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            413 => Self::PayloadTooLarge,
            429 => Self::TooManyRequests,
            500 => Self::InternalServerError,
            503 => Self::ServiceUnavailable,
            504 => Self::GatewayTimeout,
            _ => Self::Other,
        }
    }
}

/// `tokenbroker_http_*`: every call to an HTTP endpoint, by endpoint and status.
#[derive(Debug)]
pub struct HttpMetrics {
    /// `tokenbroker_http_requests_total{endpoint,status}`.
    pub requests: Family<Counter, (Endpoint, Status)>,
    /// `tokenbroker_http_duration_seconds{endpoint,status}`.
    pub duration: Family<Histogram, (Endpoint, Status)>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::new(
                "tokenbroker_http_requests_total",
                "Calls to the HTTP endpoints, by endpoint and HTTP status.",
                Zeros::Hide,
            ),
            duration: Family::new(
                "tokenbroker_http_duration_seconds",
                "Time to answer a call to an HTTP endpoint, by endpoint and HTTP status.",
                Zeros::Hide,
            ),
        }
    }
}

impl MetricSet for HttpMetrics {
    fn render(&self, out: &mut String) {
        self.requests.render(out);
        self.duration.render(out);
    }
}

/// One call being observed: counted when [`Observation::finish`]ed, or as cancelled when
/// dropped before.
#[derive(Debug)]
pub struct Observation<'a> {
    metrics: &'a HttpMetrics,
    endpoint: Endpoint,
    started: Instant,
    span: Span,
    done: bool,
}

impl<'a> Observation<'a> {
    /// Starts observing a call to `endpoint`; its span is [`Observation::span`].
    pub fn start(
        metrics: &'a HttpMetrics,
        endpoint: Endpoint,
        method: &Method,
        headers: &HeaderMap,
    ) -> Self {
        Self {
            metrics,
            endpoint,
            started: Instant::now(),
            span: span(endpoint, method, headers),
            done: false,
        }
    }

    /// The call's span.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Counts the answer.
    pub fn finish(mut self, status: StatusCode) {
        self.span
            .record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            self.span.record("otel.status_code", "ERROR");
        }
        self.record(Status::of(status));
    }

    fn record(&mut self, status: Status) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let labels = (self.endpoint, status);
        self.metrics.requests.get(labels).inc();
        self.metrics
            .duration
            .get(labels)
            .observe(self.started.elapsed());
    }
}

impl Drop for Observation<'_> {
    fn drop(&mut self) {
        self.record(Status::Cancelled);
    }
}

/// Opens the call's span, with the remote parent its headers name.
fn span(endpoint: Endpoint, method: &Method, headers: &HeaderMap) -> Span {
    macro_rules! http_span {
        ($span:ident) => {
            $span!(
                "http",
                otel.name = Empty,
                otel.kind = Empty,
                otel.status_code = Empty,
                http.request.method = method.as_str(),
                http.route = endpoint.route(),
                caller = Empty,
                http.response.status_code = Empty,
                trace_id = Empty,
                account_id = Empty,
                family_id = Empty,
                token_id = Empty,
            )
        };
    }
    // As for gRPC calls: at info when spans are exported, else at debug, so the log formatter
    // does not render the span's fields on every call.
    let span = if context::exporting() {
        http_span!(info_span)
    } else {
        http_span!(debug_span)
    };
    if context::exporting() {
        span.record("otel.name", format!("{method} {}", endpoint.route()));
        span.record("otel.kind", "server");
    }
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    context::link_parent(&span, header(TRACEPARENT), header(TRACESTATE));
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_counted_once_by_status_or_as_cancelled() {
        let metrics = HttpMetrics::default();
        let headers = HeaderMap::new();
        Observation::start(&metrics, Endpoint::Introspect, &Method::POST, &headers)
            .finish(StatusCode::OK);
        drop(Observation::start(
            &metrics,
            Endpoint::Introspect,
            &Method::POST,
            &headers,
        ));
        Observation::start(&metrics, Endpoint::Authz, &Method::GET, &headers)
            .finish(StatusCode::IM_A_TEAPOT);
        let count = |e, s| metrics.requests.get((e, s)).get();
        assert_eq!(count(Endpoint::Introspect, Status::Ok), 1);
        assert_eq!(count(Endpoint::Introspect, Status::Cancelled), 1);
        assert_eq!(count(Endpoint::Authz, Status::Other), 1);
        assert_eq!(count(Endpoint::Revoke, Status::Ok), 0);
    }
}
