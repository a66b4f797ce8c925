//! `[store]`: which backend keeps the tokens, and each backend's settings.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

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
    /// PostgreSQL (or an engine that speaks its protocol and SQL: CockroachDB, YugabyteDB).
    Postgres,
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
    /// `[store.postgres]`.
    pub postgres: PostgresSettings,
}

/// How the PostgreSQL connections use TLS (libpq's `sslmode` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SslMode {
    /// Plain TCP (or a Unix socket): for a server on the same host or a private network.
    #[serde(rename = "disable")]
    Disable,
    /// Encrypted, the server's certificate not checked: safe against a passive listener only.
    #[serde(rename = "require")]
    Require,
    /// Encrypted, the certificate checked against `ca_file` and the host name.
    #[serde(rename = "verify-full")]
    VerifyFull,
}

/// `[store.postgres]`: the PostgreSQL store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSettings {
    /// Host name or IP address; a path that starts with `/` is a Unix socket directory.
    pub host: String,
    /// TCP port (also the socket file's suffix).
    pub port: u16,
    /// Database name.
    pub dbname: String,
    /// Role to connect as.
    pub user: String,
    /// The role's password. Prefer `password_file` or `TOKENBROKER_STORE__POSTGRES__PASSWORD`
    /// to a password in a config file. None for trust or peer authentication.
    pub password: Option<SecretString>,
    /// A file holding the password (surrounding whitespace is ignored).
    pub password_file: Option<PathBuf>,
    /// `disable`, `require` or `verify-full` (the default).
    pub sslmode: SslMode,
    /// PEM file with the CA certificates that sign the server's certificate (`verify-full`).
    pub ca_file: Option<PathBuf>,
    /// Most connections this broker keeps open.
    pub pool_size: usize,
    /// Most token ids one Introspect statement carries: concurrent Introspect calls share
    /// statements of up to this many lookups; 1 sends one statement per call.
    pub introspect_batch: usize,
    /// Longest a connection attempt may take.
    pub connect_timeout_ms: u64,
    /// Longest an operation may take (with its retries) when the caller set no deadline.
    pub statement_timeout_ms: u64,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 5432,
            dbname: "tokenbroker".into(),
            user: "tokenbroker".into(),
            password: None,
            password_file: None,
            sslmode: SslMode::VerifyFull,
            ca_file: None,
            pool_size: 16,
            introspect_batch: 64,
            connect_timeout_ms: 5000,
            statement_timeout_ms: 5000,
        }
    }
}

impl PostgresSettings {
    /// Checks the connection settings and reads the password, if any.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the setting that is wrong.
    pub fn validate(&self) -> Result<Option<SecretString>, ConfigError> {
        for (name, value) in [
            ("host", &self.host),
            ("dbname", &self.dbname),
            ("user", &self.user),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError(format!(
                    "store.postgres.{name} must not be empty"
                )));
            }
        }
        if self.port == 0 {
            return Err(ConfigError("store.postgres.port must not be 0".into()));
        }
        if self.pool_size == 0
            || self.introspect_batch == 0
            || self.connect_timeout_ms == 0
            || self.statement_timeout_ms == 0
        {
            return Err(ConfigError(
                "store.postgres.pool_size, introspect_batch, connect_timeout_ms and \
                 statement_timeout_ms must be at least 1"
                    .into(),
            ));
        }
        match (self.sslmode, &self.ca_file) {
            (SslMode::VerifyFull, None) => {
                return Err(ConfigError(
                    "store.postgres.sslmode = \"verify-full\" needs store.postgres.ca_file (or set \
                     sslmode = \"require\" or \"disable\")"
                        .into(),
                ));
            }
            (SslMode::Disable | SslMode::Require, Some(_)) => {
                return Err(ConfigError(
                    "store.postgres.ca_file is used only with sslmode = \"verify-full\"".into(),
                ));
            }
            _ => {}
        }
        self.password()
    }

    /// Returns the password from `password` or `password_file`, or none.
    ///
    /// # Errors
    ///
    /// When both are set, or the file cannot be read or is empty.
    pub fn password(&self) -> Result<Option<SecretString>, ConfigError> {
        match (&self.password, &self.password_file) {
            (Some(password), None) => Ok(Some(password.clone())),
            (None, Some(path)) => read_secret_file("store.postgres.password_file", path).map(Some),
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(ConfigError(
                "set store.postgres.password or store.postgres.password_file, not both".into(),
            )),
        }
    }

    /// Returns the longest an operation may take when the caller set no deadline.
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms)
    }
}

/// Reads a secret from a file, trimmed; `setting` names the file's setting in errors.
fn read_secret_file(setting: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = fs::read_to_string(path)
        .map_err(|err| ConfigError(format!("cannot read {setting} {}: {err}", path.display())))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(ConfigError(format!(
            "{setting} {} is empty",
            path.display()
        )));
    }
    Ok(SecretString::from(secret.to_owned()))
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
            StoreBackend::Postgres => self.postgres.validate().map(drop),
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
            (None, Some(path)) => read_secret_file("store.fauna.secret_file", path),
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
            postgres: PostgresSettings::default(),
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
            Self::Postgres => "postgres",
        })
    }
}
