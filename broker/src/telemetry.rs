//! Log output: one subscriber for the process, text or JSON, filtered by `RUST_LOG` or the
//! configured default.

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::{LogFormat, LogSettings};

/// Installs the process-wide subscriber. Logs go to stderr; stdout is kept for what the
/// operator must read (dev-mode keys).
///
/// # Errors
///
/// When a subscriber is already installed or the filter is invalid.
pub fn init(settings: &LogSettings) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(value)?,
        _ => EnvFilter::try_new(&settings.filter)?,
    };
    // Colours only for a terminal: escape codes in a log file or collector are noise, and
    // writing them costs time on every line.
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|err| anyhow::anyhow!("failed to install the log subscriber: {err}"))
}
