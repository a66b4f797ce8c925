//! An in-process OTLP/gRPC trace collector: a real tonic server on `127.0.0.1:0` that
//! implements OpenTelemetry's `TraceService` (the `opentelemetry-proto` types) and keeps every
//! span it is sent, so a test can point a broker's `[telemetry] otlp_endpoint` at it and read
//! back the span tree. Traces only; it answers every export with success.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::Span,
};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// One received span, with the `service.name` of the resource that sent it.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    /// `service.name` of its resource.
    pub service: String,
    /// The span as exported.
    pub span: Span,
}

impl CollectedSpan {
    /// The trace id, as lowercase hex.
    pub fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }

    /// The span id, as lowercase hex.
    pub fn span_id(&self) -> String {
        hex::encode(&self.span.span_id)
    }

    /// The parent span id, as lowercase hex (empty for a root span).
    pub fn parent_span_id(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }

    /// Returns an attribute's value rendered as text (strings as they are, numbers and
    /// booleans in decimal).
    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }

    /// Every string in the span: name, attribute keys and values, event names and their
    /// attributes, status message, link attributes. For secret-leak checks.
    pub fn all_text(&self) -> Vec<String> {
        let span = &self.span;
        let mut text = vec![span.name.clone()];
        let mut add = |attributes: &[KeyValue]| {
            for kv in attributes {
                text.push(kv.key.clone());
                if let Some(value) = kv.value.as_ref().and_then(render) {
                    text.push(value);
                }
            }
        };
        add(&span.attributes);
        for event in &span.events {
            add(&event.attributes);
        }
        for link in &span.links {
            add(&link.attributes);
        }
        text.extend(span.events.iter().map(|e| e.name.clone()));
        if let Some(status) = &span.status {
            text.push(status.message.clone());
        }
        text.push(span.trace_state.clone());
        text
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(render)
}

fn render(value: &AnyValue) -> Option<String> {
    Some(match value.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

#[derive(Debug, Default, Clone)]
struct Received(Arc<Mutex<Vec<CollectedSpan>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                spans.extend(scope_spans.spans.into_iter().map(|span| CollectedSpan {
                    service: service.clone(),
                    span,
                }));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running collector; it stops when dropped.
#[derive(Debug)]
pub struct OtlpCollector {
    addr: SocketAddr,
    received: Received,
    task: JoinHandle<()>,
}

impl OtlpCollector {
    /// Starts a collector on a free loopback port.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn start() -> Self {
        let (listener, addr) = crate::loopback_listener().await;
        let received = Received::default();
        let service = TraceServiceServer::new(received.clone());
        let task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            addr,
            received,
            task,
        }
    }

    /// Returns `http://127.0.0.1:PORT`, for `telemetry.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.received.0.lock().expect("collector lock").clone()
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
