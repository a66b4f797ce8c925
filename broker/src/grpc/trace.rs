//! The span of every `TokenBroker` call: a service wrapper that opens it before the call
//! starts (so the caller's `traceparent` can be its remote parent), runs the call inside it and
//! records the outcome's gRPC code.
//!
//! Fields (OpenTelemetry's RPC conventions where they have a name): `rpc.method`, `caller`
//! (recorded by the adapter once authenticated), `rpc.grpc.status_code`, `trace_id`, and the
//! ids the call touched (`account_id`, `family_id`, `token_id`, `access_token_id`,
//! `refresh_token_id`), never a secret. When spans are exported the span is named
//! `tokenbroker.v1.TokenBroker/<Method>`, of kind server, with `rpc.system = grpc` and
//! `rpc.service`; a server-side failure code marks it as an error.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{
    codegen::{Service, http},
    server::NamedService,
};
use tracing::{Instrument as _, Span, debug_span, field::Empty, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{
    grpc::metered::{GrpcCode, grpc_code},
    obs::context::{self, TRACEPARENT, TRACESTATE},
};

/// Wraps a gRPC service so that each call runs in its own RPC span.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S> Traced<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for Traced<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<http::Request<B>> for Traced<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = rpc_span(request.uri().path(), request.headers());
        let call = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let result = call.await;
            if let Ok(response) = &result {
                record_outcome(&span, grpc_code(response));
            }
            result
        })
    }
}

/// Opens the span of the call to `path` (`/package.Service/Method`), with the remote parent
/// its headers name, before anything runs in it.
fn rpc_span(path: &str, headers: &http::HeaderMap) -> Span {
    let method = path.rsplit('/').next().unwrap_or_default();
    macro_rules! rpc_span {
        ($span:ident) => {
            $span!(
                "rpc",
                otel.name = Empty,
                otel.kind = Empty,
                otel.status_code = Empty,
                rpc.method = method,
                caller = Empty,
                rpc.grpc.status_code = Empty,
                trace_id = Empty,
                account_id = Empty,
                family_id = Empty,
                token_id = Empty,
                access_token_id = Empty,
                refresh_token_id = Empty,
            )
        };
    }
    // At info when spans are exported. Otherwise at debug: the log's formatter renders an
    // enabled span's fields on every call, which cost Introspect a tenth of its throughput, and
    // the call's few info lines (revocations, errors) name what they need themselves.
    let span = if context::exporting() {
        rpc_span!(info_span)
    } else {
        rpc_span!(debug_span)
    };
    if context::exporting() {
        // Only the exported span carries these; log lines stay short.
        span.record("otel.name", path.trim_start_matches('/'));
        span.record("otel.kind", "server");
        span.set_attribute("rpc.system", "grpc");
        if let Some((service, _)) = path.trim_start_matches('/').rsplit_once('/') {
            span.set_attribute("rpc.service", service.to_owned());
        }
    }
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    context::link_parent(&span, header(TRACEPARENT), header(TRACESTATE));
    span
}

/// Records the call's gRPC code (see [`grpc_code`]).
fn record_outcome(span: &Span, code: GrpcCode) {
    let code = code.number();
    span.record("rpc.grpc.status_code", u64::from(code));
    // The server-side failures of OpenTelemetry's gRPC conventions: UNKNOWN,
    // DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. A client's mistake
    // (INVALID_ARGUMENT, PERMISSION_DENIED...) is not the server's error.
    if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
        span.record("otel.status_code", "ERROR");
    }
}
