//! Observability: the log and trace subscriber ([`telemetry`]), W3C trace context
//! ([`context`]) and the Prometheus registry ([`metrics`]).

pub mod context;
pub mod metrics;
pub mod telemetry;
