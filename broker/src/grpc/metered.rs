//! A tower service around the generated `TokenBrokerServer` that counts and times every call
//! by method and gRPC status code, errors included.
//!
//! It sits outside the adapter, so every outcome is seen: authentication failures, malformed
//! requests and deadlines as much as the answers. The code comes from the response head: tonic
//! answers an error as a trailers-only response with `grpc-status` in the headers, and a unary
//! answer whose head has no `grpc-status` is `OK` (its status travels in the trailers). The
//! time runs until the response head, which for a unary call is when the handler finished.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use tonic::{
    codegen::{Service, http},
    server::NamedService,
};

use crate::obs::metrics::{Counter, Family, Histogram, Label, MetricSet, Zeros};

crate::label! {
    /// A TokenBroker method, as the `method` label.
    pub enum Method: "method" {
        IssueTokens = "IssueTokens",
        RefreshTokens = "RefreshTokens",
        Revoke = "Revoke",
        Introspect = "Introspect",
        ListTokens = "ListTokens",
    }
}

impl Method {
    /// Returns the method a request path (`/tokenbroker.v1.TokenBroker/Introspect`) names.
    fn from_path(path: &str) -> Option<Self> {
        let name = path.rsplit('/').next()?;
        let at = Self::VALUES.iter().position(|m| *m == name)?;
        Some(
            [
                Self::IssueTokens,
                Self::RefreshTokens,
                Self::Revoke,
                Self::Introspect,
                Self::ListTokens,
            ][at],
        )
    }
}

/// gRPC status code names, indexed by code number.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status code (0 to 16), as the `code` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcCode(u8);

impl GrpcCode {
    /// `OK`.
    pub const OK: Self = Self(0);
    /// `UNKNOWN`: also what a transport error or an unparsable `grpc-status` counts as.
    pub const UNKNOWN: Self = Self(2);

    /// Returns the code with this number, if it is one.
    pub fn new(code: usize) -> Option<Self> {
        u8::try_from(code)
            .ok()
            .filter(|&code| usize::from(code) < GRPC_CODES.len())
            .map(Self)
    }

    /// Returns the code's number.
    pub fn number(self) -> u8 {
        self.0
    }
}

impl Label for GrpcCode {
    const NAME: &'static str = "code";
    const VALUES: &'static [&'static str] = &GRPC_CODES;
    fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// `tokenbroker_rpc_*`: every TokenBroker call, by method and code.
#[derive(Debug)]
pub struct RpcMetrics {
    /// `tokenbroker_rpc_requests_total{method,code}`.
    pub requests: Family<Counter, (Method, GrpcCode)>,
    /// `tokenbroker_rpc_duration_seconds{method,code}`.
    pub duration: Family<Histogram, (Method, GrpcCode)>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            requests: Family::new(
                "tokenbroker_rpc_requests_total",
                "TokenBroker RPCs handled, by method and gRPC status code.",
                Zeros::Hide,
            ),
            duration: Family::new(
                "tokenbroker_rpc_duration_seconds",
                "Time to handle a TokenBroker RPC, by method and gRPC status code.",
                Zeros::Hide,
            ),
        }
    }
}

impl MetricSet for RpcMetrics {
    fn render(&self, out: &mut String) {
        self.requests.render(out);
        self.duration.render(out);
    }
}

/// Wraps a gRPC service (the TokenBroker server) and records `tokenbroker_rpc_*` for it.
#[derive(Debug, Clone)]
pub struct MeteredService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S> MeteredService<S> {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: S, metrics: Arc<RpcMetrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<S: NamedService> NamedService for MeteredService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for MeteredService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Metered<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = Method::from_path(request.uri().path());
        Metered {
            inner: self.inner.call(request),
            method,
            started: Instant::now(),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The future of a [`MeteredService`] call.
#[derive(Debug)]
pub struct Metered<F> {
    inner: F,
    /// The method; `None` for an unknown method (not recorded).
    method: Option<Method>,
    started: Instant,
    metrics: Arc<RpcMetrics>,
}

impl<F, R, E> Future for Metered<F>
where
    F: Future<Output = Result<http::Response<R>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let output = match Pin::new(&mut self.inner).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(output) => output,
        };
        if let Some(method) = self.method {
            // A transport error (no response) is counted as UNKNOWN.
            let code = output.as_ref().map_or(GrpcCode::UNKNOWN, grpc_code);
            self.metrics.requests.get((method, code)).inc();
            self.metrics
                .duration
                .get((method, code))
                .observe(self.started.elapsed());
        }
        Poll::Ready(output)
    }
}

/// The gRPC status code of a response head: its `grpc-status` header, or `OK` without one;
/// `UNKNOWN` for a header that is not a known code.
pub(crate) fn grpc_code<R>(response: &http::Response<R>) -> GrpcCode {
    match response.headers().get("grpc-status") {
        None => GrpcCode::OK,
        Some(value) => std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .and_then(GrpcCode::new)
            .unwrap_or(GrpcCode::UNKNOWN),
    }
}
