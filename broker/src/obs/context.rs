//! W3C trace context (`traceparent`, `tracestate`) in and out.
//!
//! A call's incoming `traceparent` is read by the gRPC layer: [`link_parent`] makes it the
//! parent of the call's span, [`incoming`] and [`scope`] keep it for the call's duration; the
//! outbound HTTP clients (Fauna queries, JWKS fetches) ask [`outgoing`] what to send.
//!
//! - With OTLP export on, the incoming context becomes the remote parent of the call's span, and
//!   an outbound request carries the context of the span it runs in (its own HTTP client span),
//!   so the downstream service's spans hang under ours.
//! - With export off there are no span ids of our own to send, so the incoming `traceparent`
//!   (and `tracestate`) is forwarded unchanged: the caller's trace still reaches Fauna's logs,
//!   at the cost of a task-local and a string clone per call.
//!
//! Either way a malformed `traceparent` is ignored, as the W3C spec says, and the trace id of
//! a call that has one is recorded on its span (`trace_id`), so text and JSON log lines inside
//! the call show it.

use std::{
    collections::HashMap,
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    propagation::TextMapPropagator as _,
    trace::{TraceContextExt as _, TraceId},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header that carries the trace id, parent span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header that carries vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` forwarded (the spec's 32 members of at most 256 characters each,
/// with separators).
const MAX_TRACESTATE: usize = 8192;

static EXPORTING: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    static INCOMING: Incoming;
}

/// Marks the process as exporting spans (an OpenTelemetry layer is installed).
pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Release);
}

/// Whether spans are exported (an OpenTelemetry layer is installed).
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Acquire)
}

/// Trace context headers to send on an outbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// `traceparent`.
    pub traceparent: String,
    /// `tracestate`, when there is one.
    pub tracestate: Option<String>,
}

/// The incoming trace context of a call, kept for forwarding when export is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming(Option<Outgoing>);

/// Makes the caller's context (its `traceparent` and `tracestate`, as sent, if sent) the
/// remote parent of `span` when exporting, and records the call's trace id on `span`'s
/// `trace_id` field.
///
/// Call it before `span` is first entered: a span's parent is fixed when it starts.
pub fn link_parent(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if !exporting() {
        if span.is_disabled() {
            return;
        }
        if let Some(parsed) = traceparent.and_then(TraceParent::parse) {
            span.record("trace_id", parsed.trace_id);
        }
        return;
    }
    let mut carrier = HashMap::new();
    if let Some(value) = traceparent {
        carrier.insert(TRACEPARENT.to_owned(), value.to_owned());
    }
    if let Some(value) = tracestate {
        carrier.insert(TRACESTATE.to_owned(), value.to_owned());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only for a span nobody exports (filtered out), which has no parent to set.
        let _ = span.set_parent(parent);
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Returns what [`scope`] keeps of a call's incoming `traceparent` and `tracestate` for
/// forwarding: nothing when exporting (outbound requests carry our own spans' context) or when
/// the `traceparent` is absent or malformed.
pub fn incoming(traceparent: Option<&str>, tracestate: Option<&str>) -> Incoming {
    if exporting() {
        return Incoming(None);
    }
    let Some(traceparent) = traceparent.filter(|t| TraceParent::parse(t).is_some()) else {
        return Incoming(None);
    };
    Incoming(Some(Outgoing {
        traceparent: traceparent.to_owned(),
        tracestate: tracestate
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .map(str::to_owned),
    }))
}

/// Runs `work` with `incoming` as the current call's trace context.
pub fn scope<F: Future>(incoming: Incoming, work: F) -> impl Future<Output = F::Output> {
    INCOMING.scope(incoming, work)
}

/// Returns the trace context an outbound request made now should carry: the current span's
/// when exporting, else the current call's incoming one; `None` outside any trace.
pub fn outgoing() -> Option<Outgoing> {
    if exporting() {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&Span::current().context(), &mut carrier);
        let traceparent = carrier.remove(TRACEPARENT)?;
        return Some(Outgoing {
            traceparent,
            tracestate: carrier.remove(TRACESTATE).filter(|s| !s.is_empty()),
        });
    }
    INCOMING
        .try_with(|incoming| incoming.0.clone())
        .ok()
        .flatten()
}

/// A parsed W3C `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TraceParent<'a> {
    trace_id: &'a str,
}

impl<'a> TraceParent<'a> {
    /// Parses `version-traceid-parentid-flags` as the W3C spec says a version-00 parser must:
    /// lowercase hex fields of 2, 32, 16 and 2 digits, a version other than `ff`, ids not all
    /// zero; a later version may append `-…` fields.
    fn parse(value: &'a str) -> Option<Self> {
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let zero = |s: &str| s.bytes().all(|b| b == b'0');
        let mut fields = value.split('-');
        let (Some(version), Some(trace_id), Some(parent_id), Some(flags)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        let rest = fields.next();
        let well_formed = hex(version, 2)
            && version != "ff"
            && (version != "00" || rest.is_none())
            && hex(trace_id, 32)
            && !zero(trace_id)
            && hex(parent_id, 16)
            && !zero(parent_id)
            && hex(flags, 2);
        well_formed.then_some(Self { trace_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_per_w3c() {
        assert_eq!(
            TraceParent::parse(VALID).map(|t| t.trace_id),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn without_export_the_incoming_context_is_forwarded_unchanged() {
        assert_eq!(outgoing(), None);
        let inside = scope(incoming(Some(VALID), Some("vendor=abc")), async {
            outgoing()
        })
        .await;
        assert_eq!(
            inside,
            Some(Outgoing {
                traceparent: VALID.into(),
                tracestate: Some("vendor=abc".into()),
            })
        );
        let malformed = incoming(Some("00-xyz"), Some("vendor=abc"));
        assert_eq!(scope(malformed, async { outgoing() }).await, None);
        assert_eq!(
            scope(incoming(None, None), async { outgoing() }).await,
            None
        );
    }
}
