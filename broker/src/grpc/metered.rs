//! A tower service around the generated `TokenBrokerServer` that counts and times every call
//! by method and gRPC status code, errors included.
//!
//! It sits outside the adapter, so every outcome is seen: authentication failures, malformed
//! requests and deadlines as much as the answers. The code comes from the response head: tonic
//! answers an error as a trailers-only response with `grpc-status` in the headers, and a unary
//! answer whose head has no `grpc-status` is `OK` (its status travels in the trailers). The
//! time runs until the response head, which for a unary call is when the handler finished.
//!
//! A call can also end without a response head: when the client resets its stream
//! (RST_STREAM, as a client does that drops a call it no longer waits for) or closes the
//! connection, hyper drops the call's future, and when the client's `grpc-timeout` runs out
//! before the adapter answers, tonic's timeout layer drops it and answers CANCELLED itself (so
//! does a stop whose grace period runs out, for the calls still running). Such a call never
//! completes, so it is counted when its future is dropped, as `CANCELLED`: the code the client
//! sees (or would have), and not a failure of the broker's.

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
        Some(Self::ALL[at])
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
    /// `CANCELLED`: also what a call dropped before its answer (a client's reset) counts as.
    pub const CANCELLED: Self = Self(1);
    /// `UNKNOWN`: also what a service error (no response) or an unparsable `grpc-status`
    /// counts as.
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

/// The future of a [`MeteredService`] call. It records the call once: when it completes, or,
/// if it is dropped before that, as `CANCELLED`.
#[derive(Debug)]
pub struct Metered<F> {
    inner: F,
    /// The method, until the call is recorded; `None` for an unknown method (never recorded).
    method: Option<Method>,
    started: Instant,
    metrics: Arc<RpcMetrics>,
}

impl<F> Metered<F> {
    /// Counts and times the call as `code`, unless it already was (or its method is unknown).
    fn record(&mut self, code: GrpcCode) {
        if let Some(method) = self.method.take() {
            self.metrics.requests.get((method, code)).inc();
            self.metrics
                .duration
                .get((method, code))
                .observe(self.started.elapsed());
        }
    }
}

impl<F> Drop for Metered<F> {
    /// Dropped unanswered: the client reset the stream or went away, or its deadline passed
    /// first (see the module's documentation).
    fn drop(&mut self) {
        self.record(GrpcCode::CANCELLED);
    }
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
        // A service error (no response) is counted as UNKNOWN; the generated server has none
        // (its error type is `Infallible`), but a wrapped service might.
        let code = output.as_ref().map_or(GrpcCode::UNKNOWN, grpc_code);
        self.record(code);
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

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, future};

    use super::*;

    fn call<F>(inner: F, metrics: &Arc<RpcMetrics>) -> Metered<F> {
        Metered {
            inner,
            method: Some(Method::Introspect),
            started: Instant::now(),
            metrics: Arc::clone(metrics),
        }
    }

    fn count(metrics: &RpcMetrics, code: GrpcCode) -> u64 {
        metrics.requests.get((Method::Introspect, code)).get()
    }

    #[tokio::test]
    async fn a_call_is_counted_once_by_its_code_or_as_cancelled_when_dropped_unanswered() {
        let metrics = Arc::new(RpcMetrics::default());
        let answered = future::ready(Ok::<_, Infallible>(http::Response::new(())));
        call(answered, &metrics).await.unwrap();
        assert_eq!(count(&metrics, GrpcCode::OK), 1);
        assert_eq!(count(&metrics, GrpcCode::CANCELLED), 0, "not again on drop");

        let mut unanswered = call(
            future::pending::<Result<http::Response<()>, Infallible>>(),
            &metrics,
        );
        let waker = std::task::Waker::noop();
        let polled = Pin::new(&mut unanswered).poll(&mut Context::from_waker(waker));
        assert!(polled.is_pending());
        assert_eq!(count(&metrics, GrpcCode::CANCELLED), 0, "still in flight");
        drop(unanswered);
        assert_eq!(count(&metrics, GrpcCode::CANCELLED), 1);
        let timed = metrics
            .duration
            .get((Method::Introspect, GrpcCode::CANCELLED));
        assert_eq!(timed.count(), 1);
        assert_eq!(count(&metrics, GrpcCode::UNKNOWN), 0);

        let failed = future::ready(Err::<http::Response<()>, _>("no response"));
        call(failed, &metrics).await.unwrap_err();
        assert_eq!(count(&metrics, GrpcCode::UNKNOWN), 1);
        let mut garbled = http::Response::new(());
        garbled
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("99"));
        call(future::ready(Ok::<_, Infallible>(garbled)), &metrics)
            .await
            .unwrap();
        assert_eq!(count(&metrics, GrpcCode::UNKNOWN), 2);
        assert_eq!(count(&metrics, GrpcCode::CANCELLED), 1);
    }
}
