//! Log output and traces: one subscriber for the process, text or JSON logs filtered by
//! `RUST_LOG` or the configured default, and, when `[telemetry] otlp_endpoint` is set, an
//! OpenTelemetry layer that exports spans over OTLP/gRPC.
//!
//! With no endpoint no OpenTelemetry layer is installed: the store and outbound-HTTP spans are
//! at `DEBUG`, which the default filter leaves disabled at their call sites, and trace context
//! is still passed on (see [`super::context`]).

use std::{io::IsTerminal as _, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracerProvider},
};
use serde::Deserialize;
use tracing::{Level, Metadata};
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::{LevelFilter, filter_fn},
    fmt,
    layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

use crate::model::ConfigError;

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`: log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG`, when set, wins.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// `[telemetry]`: trace export. Off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/gRPC collector to export spans to, such as `http://127.0.0.1:4317`; unset or empty:
    /// no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of new traces (those without a sampled parent) that are recorded, 0.0 to 1.0. A
    /// call that arrives with a `traceparent` follows its parent's sampled flag.
    pub sampling_ratio: f64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "tokenbroker".into(),
            sampling_ratio: 1.0,
        }
    }
}

impl TelemetrySettings {
    /// Returns the collector endpoint when export is on.
    pub fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint
            .as_deref()
            .filter(|e| !e.trim().is_empty())
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(ConfigError(format!(
                "telemetry.sampling_ratio must be between 0.0 and 1.0, not {}",
                self.sampling_ratio
            )));
        }
        if self.service_name.trim().is_empty() {
            return Err(ConfigError(
                "telemetry.service_name must not be empty".into(),
            ));
        }
        if let Some(endpoint) = self.endpoint() {
            let Some(rest) = endpoint.strip_prefix("http://") else {
                return Err(ConfigError(format!(
                    "telemetry.otlp_endpoint must be a plaintext http://host:port OTLP/gRPC \
                     address (a local collector or agent; this build has no TLS for export), \
                     not {endpoint:?}"
                )));
            };
            if rest.is_empty() || rest.starts_with('/') {
                return Err(ConfigError(format!(
                    "telemetry.otlp_endpoint {endpoint:?} has no host"
                )));
            }
        }
        Ok(())
    }
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes the spans not yet exported.
#[derive(Debug)]
#[must_use = "call shutdown() at exit so the last spans are exported"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (waiting at most a few seconds for the collector) and
    /// stops the exporter. Does nothing when export is off.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK blocks until its batch thread has exported; keep that off the async workers.
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("tokenbroker: trace export did not flush: {err}"),
            Err(err) => eprintln!("tokenbroker: trace export did not flush: {err}"),
        }
    }
}

/// Installs the process-wide subscriber. Logs go to stderr; stdout is kept for what the
/// operator must read (dev-mode keys). With an OTLP endpoint, spans are also exported: the
/// exporter's connection runs on the current tokio runtime, so call this from inside it.
///
/// # Errors
///
/// When a subscriber is already installed, the filter is invalid or the exporter cannot be
/// built.
pub fn init(log: &LogSettings, telemetry: &TelemetrySettings) -> anyhow::Result<Telemetry> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(value)?,
        _ => EnvFilter::try_new(&log.filter)?,
    };
    let fmt_layer = match log.format {
        // Colours only for a terminal: escape codes in a log file or collector are noise, and
        // writing them costs time on every line.
        LogFormat::Text => fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    }
    .with_filter(filter);
    let provider = telemetry
        .endpoint()
        .map(|e| provider(e, telemetry))
        .transpose()?;
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tokenbroker"))
            // Source location and target stay; thread ids and busy/idle timings say little
            // about an async call and cost a clock read per poll.
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(filter_fn(exported).with_max_level_hint(LevelFilter::DEBUG))
    });
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|err| anyhow::anyhow!("failed to install the log subscriber: {err}"))?;
    if provider.is_some() {
        super::context::set_exporting();
    }
    Ok(Telemetry { provider })
}

/// What the OpenTelemetry layer sees: the broker's own spans down to `DEBUG` (RPCs, store
/// operations, outbound HTTP) and its events down to `INFO` (they become span events).
fn exported(meta: &Metadata<'_>) -> bool {
    let ours = meta.target() == "tokenbroker" || meta.target().starts_with("tokenbroker::");
    let deepest = if meta.is_span() {
        Level::DEBUG
    } else {
        Level::INFO
    };
    ours && *meta.level() <= deepest
}

fn provider(endpoint: &str, settings: &TelemetrySettings) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|err| anyhow::anyhow!("cannot set up OTLP export to {endpoint}: {err}"))?;
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sampling_ratio,
        ))))
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(endpoint: &str, ratio: f64) -> TelemetrySettings {
        TelemetrySettings {
            otlp_endpoint: Some(endpoint.into()),
            sampling_ratio: ratio,
            ..TelemetrySettings::default()
        }
    }

    #[test]
    fn settings_load_from_the_environment_and_are_checked() {
        use std::collections::HashMap;

        use crate::app::settings::Settings;
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let s = Settings::load(
            None,
            &env(&[
                (
                    "TOKENBROKER_TELEMETRY__OTLP_ENDPOINT",
                    "http://otel-collector:4317",
                ),
                ("TOKENBROKER_TELEMETRY__SERVICE_NAME", "broker-eu"),
                ("TOKENBROKER_TELEMETRY__SAMPLING_RATIO", "0.1"),
            ]),
        )
        .unwrap();
        assert_eq!(s.telemetry.endpoint(), Some("http://otel-collector:4317"));
        assert_eq!(s.telemetry.service_name, "broker-eu");
        assert!((s.telemetry.sampling_ratio - 0.1).abs() < f64::EPSILON);
        let err = Settings::load(
            None,
            &env(&[("TOKENBROKER_TELEMETRY__SAMPLING_RATIO", "2")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("telemetry.sampling_ratio"),
            "{err}"
        );
        let err =
            Settings::load(None, &env(&[("TOKENBROKER_TELEMETRY__ENDPOINT", "x")])).unwrap_err();
        assert!(err.to_string().contains("endpoint"), "{err}");
    }

    #[test]
    fn export_is_off_by_default() {
        let settings = TelemetrySettings::default();
        assert_eq!(settings.endpoint(), None);
        assert_eq!(with("  ", 1.0).endpoint(), None);
        settings.validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        with("http://127.0.0.1:4317", 0.25).validate().unwrap();
        for (settings, field) in [
            (with("http://127.0.0.1:4317", 1.5), "sampling_ratio"),
            (with("http://127.0.0.1:4317", f64::NAN), "sampling_ratio"),
            (with("https://collector:4317", 1.0), "plaintext"),
            (with("collector:4317", 1.0), "otlp_endpoint"),
            (with("http://", 1.0), "no host"),
            (
                TelemetrySettings {
                    service_name: " ".into(),
                    ..TelemetrySettings::default()
                },
                "service_name",
            ),
        ] {
            let err = settings.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
