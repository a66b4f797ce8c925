//! `[store]`: which backend keeps the tokens, and each backend's settings.

use std::{fmt, fs, path::PathBuf, time::Duration};

use secrecy::SecretString;
use serde::Deserialize;

use super::Durability;
use crate::model::ConfigError;

/// Which store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The embedded SQLite file.
    Embedded,
    /// A self-hosted FaunaDB (FQL v10 over HTTP).
    Fauna,
}

/// `[store]`: the token store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// The backend.
    pub backend: StoreBackend,
    /// Most email → account mappings cached in memory.
    pub account_cache_capacity: u64,
    /// `[store.embedded]`.
    pub embedded: EmbeddedSettings,
    /// `[store.fauna]`.
    pub fauna: FaunaSettings,
}

/// `[store.fauna]`: the Fauna store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaunaSettings {
    /// Base URL of the Fauna HTTP API.
    pub endpoint: String,
    /// The server key. Prefer `secret_file` or `TOKENBROKER_STORE__FAUNA__SECRET` to a key
    /// in a config file.
    pub secret: Option<SecretString>,
    /// A file holding the server key (surrounding whitespace is ignored).
    pub secret_file: Option<PathBuf>,
    /// Longest a query may take, shortened to the caller's deadline.
    pub query_timeout_ms: u64,
    /// Fauna's own retries on contention (`X-Max-Contention-Retries`, 0 to 7).
    pub max_contention_retries: u8,
    /// Most attempts per operation for retryable failures (409, 429, time-outs, 5xx).
    pub max_attempts: u32,
}

impl Default for FaunaSettings {
    fn default() -> Self {
        Self {
            endpoint: "http://localhost:8443".into(),
            secret: None,
            secret_file: None,
            query_timeout_ms: 5000,
            max_contention_retries: 4,
            max_attempts: 3,
        }
    }
}

impl StoreSettings {
    /// Checks the settings of the chosen backend (the Fauna key is read, not used).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the setting that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.backend {
            StoreBackend::Embedded if self.embedded.cleanup_interval_seconds == 0 => Err(
                ConfigError("store.embedded.cleanup_interval_seconds must be at least 1".into()),
            ),
            StoreBackend::Embedded if self.embedded.max_queued_writes == 0 => Err(ConfigError(
                "store.embedded.max_queued_writes must be at least 1".into(),
            )),
            StoreBackend::Embedded => Ok(()),
            StoreBackend::Fauna => self.fauna.validate().map(drop),
        }
    }
}

impl FaunaSettings {
    /// Checks the endpoint, the limits and the server key; returns the key.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the setting that is wrong.
    pub fn validate(&self) -> Result<SecretString, ConfigError> {
        let endpoint = self.endpoint.trim_end_matches('/');
        let url = reqwest::Url::parse(endpoint).ok();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            || url.as_ref().is_none_or(|url| url.host_str().is_none())
        {
            return Err(ConfigError(
                "store.fauna.endpoint must be an http:// or https:// URL".into(),
            ));
        }
        if self.max_contention_retries > 7 {
            return Err(ConfigError(
                "store.fauna.max_contention_retries must be 0 to 7".into(),
            ));
        }
        if self.max_attempts == 0 || self.query_timeout_ms == 0 {
            return Err(ConfigError(
                "store.fauna.max_attempts and query_timeout_ms must be at least 1".into(),
            ));
        }
        self.server_key()
    }

    /// Returns the longest a single query may take.
    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }

    /// Returns the server key from `secret` or `secret_file`.
    ///
    /// # Errors
    ///
    /// When neither or both are set, or the file cannot be read or is empty.
    pub fn server_key(&self) -> Result<SecretString, ConfigError> {
        match (&self.secret, &self.secret_file) {
            (Some(secret), None) => Ok(secret.clone()),
            (None, Some(path)) => {
                let text = fs::read_to_string(path).map_err(|err| {
                    ConfigError(format!(
                        "cannot read store.fauna.secret_file {}: {err}",
                        path.display()
                    ))
                })?;
                let key = text.trim();
                if key.is_empty() {
                    return Err(ConfigError(format!(
                        "store.fauna.secret_file {} is empty",
                        path.display()
                    )));
                }
                Ok(SecretString::from(key.to_owned()))
            }
            (None, None) => Err(ConfigError(
                "store.backend = \"fauna\" needs store.fauna.secret or store.fauna.secret_file"
                    .into(),
            )),
            (Some(_), Some(_)) => Err(ConfigError(
                "set store.fauna.secret or store.fauna.secret_file, not both".into(),
            )),
        }
    }
}

/// `[store.embedded]`: the SQLite store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSettings {
    /// Data directory; the database is `tokenbroker.db` inside it.
    pub dir: PathBuf,
    /// `normal` (survives a process crash) or `full` (fsync per commit; survives power loss).
    pub durability: Durability,
    /// How often a pass that deletes expired tokens starts.
    pub cleanup_interval_seconds: u64,
    /// Most writes waiting for the writer thread; a write that finds the queue full is
    /// refused as unavailable instead of waiting.
    pub max_queued_writes: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Embedded,
            account_cache_capacity: 100_000,
            embedded: EmbeddedSettings::default(),
            fauna: FaunaSettings::default(),
        }
    }
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./data"),
            durability: Durability::Normal,
            cleanup_interval_seconds: 60,
            max_queued_writes: 4096,
        }
    }
}

impl fmt::Display for StoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Embedded => "embedded",
            Self::Fauna => "fauna",
        })
    }
}
