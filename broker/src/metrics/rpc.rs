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

use super::Metrics;

/// The TokenBroker methods, as the `method` label.
pub const RPC_METHODS: [&str; 5] = [
    "IssueTokens",
    "RefreshTokens",
    "Revoke",
    "Introspect",
    "ListTokens",
];

/// Wraps a gRPC service (the TokenBroker server) and records `tokenbroker_rpc_*` for it.
#[derive(Debug, Clone)]
pub struct MeteredService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> MeteredService<S> {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
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
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .and_then(|name| RPC_METHODS.iter().position(|m| *m == name));
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
    /// The method's index in [`RPC_METHODS`]; `None` for an unknown method (not recorded).
    method: Option<usize>,
    started: Instant,
    metrics: Arc<Metrics>,
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
            let code = output.as_ref().map_or(2, grpc_code);
            self.metrics.rpc_requests.get([method, code]).inc();
            self.metrics
                .rpc_duration
                .get([method, code])
                .observe(self.started.elapsed());
        }
        Poll::Ready(output)
    }
}

/// The gRPC status code of a response head: its `grpc-status` header, or `OK` without one;
/// `UNKNOWN` for a header that is not a known code.
pub(crate) fn grpc_code<R>(response: &http::Response<R>) -> usize {
    match response.headers().get("grpc-status") {
        None => 0,
        Some(value) => std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|code| *code < super::GRPC_CODES.len())
            .unwrap_or(2),
    }
}
