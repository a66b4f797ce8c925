//! Typed settings: defaults, then an optional TOML file, then `TOKENBROKER_<SECTION>__<FIELD>`
//! environment overrides.
//!
//! The environment is read through [`Env`], so tests pass a map instead of touching the
//! process environment. An override's value is read as a TOML value when it parses as one
//! (`600`, `true`, `["admin"]`) and as a plain string otherwise (`127.0.0.1:50051`, `./data`).

use std::{collections::HashMap, fs, net::SocketAddr, path::Path};

use serde::Deserialize;

use super::tls::TlsSettings;
use crate::store::StoreBackend;
use crate::{
    domain::admission::LimitSettings,
    domain::{TokenSettings, audit::AuditSettings},
    grpc::web::CorsSettings,
    http::settings::HttpSettings,
    identity::{
        Authenticator,
        auth::{ApiKeyConfig, CertCallerConfig},
        cognito::CognitoSettings,
    },
    obs::{
        metrics::MetricsSettings,
        telemetry::{LogSettings, TelemetrySettings},
    },
    store::StoreSettings,
};

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "TOKENBROKER_";
/// Separator between nested keys in an override (`TOKENBROKER_SERVER__LISTEN`).
pub const ENV_SEPARATOR: &str = "__";
/// Environment variable naming the config file (same as `--config`); not a setting itself.
pub const ENV_CONFIG_FILE: &str = "TOKENBROKER_CONFIG";

/// A source of environment variables.
pub trait Env {
    /// Returns every variable whose name starts with `prefix`.
    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(prefix))
            .collect()
    }
}

impl Env for HashMap<String, String> {
    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Every setting of the broker.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The gRPC listener.
    pub server: ServerSettings,
    /// Where tokens are kept.
    pub store: StoreSettings,
    /// Token lifetimes and windows.
    pub tokens: TokenSettings,
    /// Log output.
    pub log: LogSettings,
    /// `[telemetry]`: trace export over OTLP (off by default).
    pub telemetry: TelemetrySettings,
    /// The API keys callers authenticate with. Empty with no config file: dev mode.
    pub api_keys: Vec<ApiKeyConfig>,
    /// `[[cert_callers]]`: client certificate subjects that authenticate as callers (mTLS).
    pub cert_callers: Vec<CertCallerConfig>,
    /// `[cognito]`: trusted user pools, their keys and role mappings.
    pub cognito: CognitoSettings,
    /// `[limits]`: in-flight, request size and per-caller rate limits.
    pub limits: LimitSettings,
    /// `replicas` (env `TOKENBROKER_REPLICAS`): the most broker processes that may serve from
    /// this store at once (a Deployment's `replicas`, an autoscaler's maximum). Only a shared
    /// store allows more than one.
    pub replicas: Replicas,
    /// `[metrics]`: the Prometheus endpoint (off unless `listen` is set).
    pub metrics: MetricsSettings,
    /// `[audit]`: where audit events go, and the key that hashes emails in them.
    pub audit: AuditSettings,
    /// `[http]`: the HTTP listener (RFC 7662, RFC 7009, forward auth); off unless `listen` is
    /// set.
    pub http: HttpSettings,
}

/// How many broker processes may share the store at once; at least 1, and 1 by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Replicas(pub u32);

impl Default for Replicas {
    fn default() -> Self {
        Self(1)
    }
}

/// `[server]`: the gRPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight calls before it stops anyway.
    pub shutdown_grace_seconds: u64,
    /// Deadline applied to every call, shortened by the client's own `grpc-timeout`.
    pub request_timeout_seconds: u64,
    /// `[server.tls]`: TLS (and mTLS) on the listener; plaintext when absent.
    pub tls: Option<TlsSettings>,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: the most calls one connection may have open;
    /// a stream over it is refused (REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// The most streams a client may open and reset before the broker accepts them (the
    /// "rapid reset" attack, CVE-2023-44487); one more and the connection is closed with
    /// GOAWAY.
    pub max_pending_reset_streams: usize,
    /// The most streams the broker may reset because the client broke the protocol on them
    /// (CVE-2025-8671, "MadeYouReset"); one more and the connection is closed with GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// How often an idle connection is pinged (HTTP/2 PING), so a dead peer is noticed.
    pub keepalive_interval_seconds: u64,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout_seconds: u64,
    /// The most connections open at once; one accepted over it is closed at once.
    pub max_connections: usize,
    /// The most TLS handshakes in progress at once; a connection arriving over it is closed
    /// at once. Ignored without `[server.tls]`.
    pub max_tls_handshakes: usize,
    /// Idle time before the kernel probes a connection's peer (TCP keepalive), and the interval
    /// between probes.
    pub tcp_keepalive_seconds: u64,
    /// Longest a connection lives; then it is drained (GOAWAY) and the client reconnects.
    pub max_connection_age_seconds: u64,
    /// The most health and reflection calls in flight at once (TokenBroker calls have
    /// `limits.max_concurrent_requests`); one over it is refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_health_and_reflection: usize,
    /// Serve grpc-web and grpc-web-text (browsers) beside native gRPC on this listener, which
    /// then accepts HTTP/1.1 too (and offers it in TLS ALPN). Off by default.
    pub grpc_web: bool,
    /// `[server.cors]`: the web origins whose pages may call over grpc-web.
    pub cors: CorsSettings,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            shutdown_grace_seconds: 10,
            request_timeout_seconds: 10,
            tls: None,
            max_concurrent_streams: 128,
            // h2's own default; a client that cancels calls resets them after the broker has
            // accepted them, which this does not count.
            max_pending_reset_streams: 20,
            // hyper's default, which tonic turns off unless it is set.
            max_local_error_reset_streams: 1024,
            keepalive_interval_seconds: 60,
            keepalive_timeout_seconds: 20,
            max_connections: 1024,
            max_tls_handshakes: 64,
            tcp_keepalive_seconds: 60,
            max_connection_age_seconds: 3600,
            max_concurrent_health_and_reflection: 64,
            grpc_web: false,
            cors: CorsSettings::default(),
        }
    }
}

impl ServerSettings {
    /// Checks the listener's own settings (`[server.tls]` is checked with `cert_callers`).
    fn validate(&self) -> Result<(), ConfigError> {
        let at_least_one = [
            ("request_timeout_seconds", self.request_timeout_seconds),
            (
                "max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            (
                "max_pending_reset_streams",
                self.max_pending_reset_streams as u64,
            ),
            (
                "max_local_error_reset_streams",
                self.max_local_error_reset_streams as u64,
            ),
            (
                "keepalive_interval_seconds",
                self.keepalive_interval_seconds,
            ),
            ("keepalive_timeout_seconds", self.keepalive_timeout_seconds),
            ("max_connections", self.max_connections as u64),
            ("max_tls_handshakes", self.max_tls_handshakes as u64),
            ("tcp_keepalive_seconds", self.tcp_keepalive_seconds),
            (
                "max_connection_age_seconds",
                self.max_connection_age_seconds,
            ),
            (
                "max_concurrent_health_and_reflection",
                self.max_concurrent_health_and_reflection as u64,
            ),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError(format!("server.{name} must be at least 1")));
        }
        // A tokio semaphore holds at most this many permits; beyond it start-up would panic.
        for (name, value) in [
            ("max_connections", self.max_connections),
            ("max_tls_handshakes", self.max_tls_handshakes),
            (
                "max_concurrent_health_and_reflection",
                self.max_concurrent_health_and_reflection,
            ),
        ] {
            if value > tokio::sync::Semaphore::MAX_PERMITS {
                return Err(ConfigError(format!(
                    "server.{name} must be at most {}",
                    tokio::sync::Semaphore::MAX_PERMITS
                )));
            }
        }
        self.cors.validate(self.grpc_web)
    }
}

pub use crate::model::ConfigError;

/// Where the settings came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    /// Built-in defaults and environment overrides only.
    Defaults,
    /// A config file (plus overrides).
    File,
}

impl Settings {
    /// Loads the settings: defaults, then `file` if given, then overrides from `env`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the file, variable or field that is wrong.
    pub fn load(file: Option<&Path>, env: &impl Env) -> Result<Self, ConfigError> {
        Self::load_with(file, env, |_| {})
    }

    /// Like [`Settings::load`], with `adjust` applied before the settings are checked (the
    /// command line's `--listen` and `--data-dir`, which win over file and environment).
    ///
    /// # Errors
    ///
    /// As [`Settings::load`].
    pub fn load_with(
        file: Option<&Path>,
        env: &impl Env,
        adjust: impl FnOnce(&mut Self),
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = fs::read_to_string(path).map_err(|err| {
                    ConfigError(format!("cannot read config file {}: {err}", path.display()))
                })?;
                text.parse::<toml::Table>().map_err(|err| {
                    ConfigError(format!(
                        "config file {} is not valid TOML: {err}",
                        path.display()
                    ))
                })?
            }
            None => toml::Table::new(),
        };
        let mut overrides = env.vars_with_prefix(ENV_PREFIX);
        overrides.sort();
        for (name, value) in overrides {
            if name == ENV_CONFIG_FILE {
                continue;
            }
            apply_override(&mut table, &name, &value)?;
        }
        let mut settings: Settings = toml::Value::Table(table)
            .try_into()
            .map_err(|err: toml::de::Error| ConfigError(format!("invalid settings: {err}")))?;
        adjust(&mut settings);
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every section with its owner's rules, then what spans sections (replicas
    /// against the backend, cert callers against mTLS). Files named by the settings (TLS
    /// certificates) are read at start-up and by `check-config`, not here.
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.tokens.validate()?;
        self.store.validate()?;
        self.validate_replicas()?;
        self.limits.validate().map_err(ConfigError)?;
        self.audit.validate()?;
        self.validate_tls()?;
        self.validate_http()?;
        self.telemetry.validate()?;
        self.cognito.validate().map_err(ConfigError)
    }

    /// Checks `[server.tls]` and `[[cert_callers]]` without reading the certificate files
    /// (start-up and `check-config` read them).
    fn validate_tls(&self) -> Result<(), ConfigError> {
        if let Some(tls) = &self.server.tls {
            tls.validate().map_err(ConfigError)?;
        }
        let mtls = self
            .server
            .tls
            .as_ref()
            .is_some_and(|tls| tls.client_ca_file.is_some());
        if !self.cert_callers.is_empty() && !mtls {
            return Err(ConfigError(
                "cert_callers need mTLS: set server.tls.client_ca_file (the CA that signs the \
                 client certificates)"
                    .into(),
            ));
        }
        Authenticator::new(&self.api_keys)
            .map_err(|err| ConfigError(format!("invalid api_keys: {err}")))?
            .with_cert_callers(&self.cert_callers)
            .map(drop)
            .map_err(|err| ConfigError(format!("invalid cert_callers: {err}")))
    }

    /// Checks `[http]`, and that it does not ask for the gRPC listener's address.
    fn validate_http(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        if let Some(listen) = self.http.listen
            && listen.port() != 0
            && (listen == self.server.listen
                || self.metrics.listen.is_some_and(|metrics| metrics == listen))
        {
            return Err(ConfigError(format!(
                "http.listen {listen} is already the address of server.listen or metrics.listen"
            )));
        }
        Ok(())
    }

    /// Refuses several replicas on the embedded store. Its SQLite file belongs to one process:
    /// replicas would each keep a store of their own, so a token minted by one would be unknown
    /// to the others, and a revocation would reach one replica only. Refusing to start beats
    /// serving that split state behind a load balancer.
    fn validate_replicas(&self) -> Result<(), ConfigError> {
        let replicas = self.replicas.0;
        if replicas == 0 {
            return Err(ConfigError("replicas must be at least 1".into()));
        }
        if self.store.backend == StoreBackend::Embedded && replicas > 1 {
            return Err(ConfigError(format!(
                "store.backend = embedded cannot run with replicas > 1: replicas = {replicas}, but \
                 the embedded store is one SQLite file owned by one process, so each replica \
                 would mint, revoke and introspect against its own copy; use a shared store \
                 (store.backend = \"postgres\" or \"fauna\") for several replicas, or set \
                 replicas = 1 ({ENV_PREFIX}REPLICAS)"
            )));
        }
        Ok(())
    }
}

/// Sets the key path named by `TOKENBROKER_A__B__C` to `value` in `table`.
fn apply_override(table: &mut toml::Table, name: &str, value: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split(ENV_SEPARATOR)
        .map(str::to_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(ConfigError(format!(
            "environment variable {name}: empty key (use {ENV_PREFIX}SECTION{ENV_SEPARATOR}FIELD)"
        )));
    }
    let (last, sections) = path.split_last().expect("split yields at least one key");
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| {
            ConfigError(format!(
                "environment variable {name}: {section} is not a section"
            ))
        })?;
    }
    current.insert(last.clone(), parse_env_value(value));
    Ok(())
}

fn parse_env_value(value: &str) -> toml::Value {
    format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::store::Durability;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_original_lambda() {
        let s = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(s.tokens.access_ttl_seconds, 600);
        assert_eq!(s.tokens.refresh_ttl_seconds, 3600);
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(s.store.embedded.dir, PathBuf::from("./data"));
    }

    #[test]
    fn listener_limits_default_on_and_refuse_zero() {
        let s = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(s.server.max_concurrent_streams, 128);
        assert_eq!(s.server.max_pending_reset_streams, 20);
        assert_eq!(s.server.max_connections, 1024);
        for field in [
            "REQUEST_TIMEOUT_SECONDS",
            "MAX_CONCURRENT_STREAMS",
            "MAX_PENDING_RESET_STREAMS",
            "MAX_LOCAL_ERROR_RESET_STREAMS",
            "KEEPALIVE_INTERVAL_SECONDS",
            "KEEPALIVE_TIMEOUT_SECONDS",
            "MAX_CONNECTIONS",
            "MAX_TLS_HANDSHAKES",
        ] {
            let var = format!("TOKENBROKER_SERVER__{field}");
            let err = Settings::load(None, &env(&[(&var, "0")])).unwrap_err();
            let name = format!("server.{} must be at least 1", field.to_lowercase());
            assert_eq!(err.0, name, "{var}");
        }
        let err = Settings::load(
            None,
            &env(&[("TOKENBROKER_SERVER__MAX_CONNECTIONS", "4000000000000000000")]),
        )
        .unwrap_err();
        assert!(
            err.0.contains("server.max_connections must be at most"),
            "{err:?}"
        );
    }

    #[test]
    fn env_overrides_file_and_parses_types() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tb.toml");
        fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1\"\n[tokens]\naccess_ttl_seconds = 60\n",
        )
        .unwrap();
        let s = Settings::load(
            Some(&file),
            &env(&[
                ("TOKENBROKER_SERVER__LISTEN", "0.0.0.0:7000"),
                ("TOKENBROKER_STORE__EMBEDDED__DURABILITY", "full"),
                ("TOKENBROKER_TOKENS__REFRESH_TTL_SECONDS", "120"),
                ("TOKENBROKER_CONFIG", "ignored"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(s.store.embedded.durability, Durability::Full);
        assert_eq!(s.tokens.access_ttl_seconds, 60);
        assert_eq!(s.tokens.refresh_ttl_seconds, 120);
    }

    #[test]
    fn api_keys_can_come_from_env_and_are_checked_at_load() {
        let err = Settings::load(
            None,
            &env(&[(
                "TOKENBROKER_API_KEYS",
                r#"[{ name = "ops", roles = ["admin"], sha256 = "00" }]"#,
            )]),
        )
        .unwrap_err();
        assert!(err.0.contains("invalid api_keys"), "{err}");
        let digest = "ab".repeat(32);
        let s = Settings::load(
            None,
            &env(&[(
                "TOKENBROKER_API_KEYS",
                &format!(r#"[{{ name = "ops", roles = ["admin"], sha256 = "{digest}" }}]"#),
            )]),
        )
        .unwrap();
        assert_eq!(s.api_keys.len(), 1);
        assert_eq!(s.api_keys[0].name, "ops");
    }

    #[test]
    fn limits_are_set_per_role_and_per_caller() {
        let s = Settings::load(
            None,
            &env(&[
                (
                    "TOKENBROKER_LIMITS__ROLES__TRIGGER",
                    "{ per_second = 500, burst = 1000 }",
                ),
                ("TOKENBROKER_LIMITS__CALLERS__BATCH__PER_SECOND", "0"),
                ("TOKENBROKER_LIMITS__MAX_CONCURRENT_REQUESTS", "64"),
            ]),
        )
        .unwrap();
        let trigger = s.limits.roles[&crate::identity::Role::Trigger];
        assert_eq!((trigger.per_second, trigger.burst), (500.0, 1000));
        assert!(s.limits.callers["batch"].is_unlimited());
        assert_eq!(s.limits.max_concurrent_requests, 64);
        let err = Settings::load(
            None,
            &env(&[("TOKENBROKER_LIMITS__ROLES__ROOT__PER_SECOND", "1")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("root"), "{err}");
    }

    #[test]
    fn replicas_default_to_one() {
        let s = Settings::load(None, &env(&[])).unwrap();
        assert_eq!(s.replicas, Replicas(1));
        assert_eq!(Settings::default().replicas, Replicas(1));
    }

    #[test]
    fn embedded_store_refuses_several_replicas() {
        let err = Settings::load(None, &env(&[("TOKENBROKER_REPLICAS", "3")])).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("store.backend = embedded cannot run with replicas > 1:"),
            "{message}"
        );
        assert!(message.contains("replicas = 3"), "{message}");
        assert!(message.contains("fauna"), "{message}");
        let err = Settings::load(None, &env(&[("TOKENBROKER_REPLICAS", "0")])).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    #[test]
    fn fauna_store_accepts_several_replicas() {
        let s = Settings::load(
            None,
            &env(&[
                ("TOKENBROKER_REPLICAS", "6"),
                ("TOKENBROKER_STORE__BACKEND", "fauna"),
                ("TOKENBROKER_STORE__FAUNA__SECRET", "fnAserverkey"),
            ]),
        )
        .unwrap();
        assert_eq!(s.replicas, Replicas(6));
    }

    #[test]
    fn tls_settings_come_from_env_and_are_checked() {
        let s = Settings::load(
            None,
            &env(&[
                ("TOKENBROKER_SERVER__TLS__CERT_FILE", "/etc/tb/tls.crt"),
                ("TOKENBROKER_SERVER__TLS__KEY_FILE", "/etc/tb/tls.key"),
                ("TOKENBROKER_SERVER__TLS__CLIENT_CA_FILE", "/etc/tb/ca.crt"),
                (
                    "TOKENBROKER_CERT_CALLERS",
                    r#"[{ name = "billing", subject = "CN=billing,O=Example", roles = ["service"] }]"#,
                ),
            ]),
        )
        .unwrap();
        let tls = s.server.tls.unwrap();
        assert_eq!(tls.key_file, PathBuf::from("/etc/tb/tls.key"));
        assert_eq!(tls.reload_interval_seconds, 10);
        assert_eq!(
            tls.client_auth(),
            Some(crate::app::tls::ClientAuth::Required)
        );
        assert_eq!(s.cert_callers[0].name, "billing");
        assert!(
            Settings::load(None, &env(&[]))
                .unwrap()
                .server
                .tls
                .is_none()
        );

        let err = Settings::load(
            None,
            &env(&[(
                "TOKENBROKER_CERT_CALLERS",
                r#"[{ name = "x", subject = "CN=x", roles = [] }]"#,
            )]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("client_ca_file"), "{err}");
        let err = Settings::load(
            None,
            &env(&[("TOKENBROKER_SERVER__TLS__CERT_FILE", "/etc/tb/tls.crt")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("key_file"), "{err}");
        let err = Settings::load(
            None,
            &env(&[
                ("TOKENBROKER_SERVER__TLS__CERT_FILE", "c"),
                ("TOKENBROKER_SERVER__TLS__KEY_FILE", "k"),
                ("TOKENBROKER_SERVER__TLS__CLIENT_CA_FILE", "ca"),
                (
                    "TOKENBROKER_CERT_CALLERS",
                    r#"[{ name = "x", subject = "billing", roles = [] }]"#,
                ),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cert_callers \"x\""), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let err = Settings::load(None, &env(&[("TOKENBROKER_SERVER__LISTN", "x")])).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
        let err = Settings::load(
            None,
            &env(&[("TOKENBROKER_TOKENS__ACCESS_TTL_SECONDS", "0")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("access_ttl_seconds"), "{err}");
        let err =
            Settings::load(None, &env(&[("TOKENBROKER_SERVER__LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("invalid"), "{err}");
    }
}

/// `docs/configuration.md` against the settings the code reads, both ways.
#[cfg(test)]
mod docs {
    use std::collections::BTreeSet;

    use super::Settings;

    const PROBE: &str = "zz_probe";

    /// A step into the settings tree, as the docs write it.
    #[derive(Clone)]
    enum Step {
        /// `a.b`: a table.
        Table(String),
        /// `a[].b`: an array of tables.
        Array(String),
        /// `a.<x>.b`: a map whose keys the user picks (`key` is one that parses).
        Map(String, String),
    }

    /// Deserializes a document holding `leaf` at `path`, and returns the error text.
    fn probe(path: &[Step], leaf: toml::Value) -> String {
        let mut value = leaf;
        for step in path.iter().rev() {
            value = match step {
                Step::Table(name) => {
                    toml::Value::Table([(name.clone(), value)].into_iter().collect())
                }
                Step::Array(name) => toml::Value::Table(
                    [(name.clone(), toml::Value::Array(vec![value]))]
                        .into_iter()
                        .collect(),
                ),
                Step::Map(name, key) => toml::Value::Table(
                    [(
                        name.clone(),
                        toml::Value::Table([(key.clone(), value)].into_iter().collect()),
                    )]
                    .into_iter()
                    .collect(),
                ),
            };
        }
        match value.try_into::<Settings>() {
            Ok(_) => String::new(),
            Err(err) => err.to_string(),
        }
    }

    fn table(pairs: &[(&str, toml::Value)]) -> toml::Value {
        toml::Value::Table(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        )
    }

    /// Returns the fields a struct at `path` accepts, when it is a struct.
    fn fields(path: &[Step]) -> Option<Vec<String>> {
        let err = probe(path, table(&[(PROBE, toml::Value::Integer(0))]));
        let rest = err
            .split(&format!("unknown field `{PROBE}`, expected "))
            .nth(1)?;
        let listed = rest.lines().next().unwrap_or_default();
        Some(
            listed
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Returns the documented form of `path`.
    fn name(path: &[Step]) -> String {
        let mut out = String::new();
        for step in path {
            if !out.is_empty() && !out.ends_with('.') {
                out.push('.');
            }
            match step {
                Step::Table(name) => out.push_str(name),
                Step::Array(name) => {
                    out.push_str(name);
                    out.push_str("[]");
                }
                Step::Map(name, _) => {
                    out.push_str(name);
                    out.push_str(".<");
                    out.push_str(placeholder(name));
                    out.push('>');
                }
            }
        }
        out
    }

    /// The docs' placeholder for the keys of a map.
    fn placeholder(map: &str) -> &'static str {
        match map {
            "roles" => "role",
            "callers" => "name",
            "group_roles" => "group",
            "scope_roles" => "scope",
            other => panic!("no placeholder chosen for the keys of `{other}`"),
        }
    }

    /// Returns how the docs step into `field` of the struct at `path`.
    fn step_into(path: &[Step], field: &str) -> Step {
        let mut inner = path.to_vec();
        inner.push(Step::Table(field.to_owned()));
        if fields(&inner).is_some() {
            return inner.pop().expect("pushed above");
        }
        // A map answers a table under an unknown key either by naming the keys it takes (enum
        // keys: "unknown variant") or by judging the value under it (string keys); a plain
        // value refuses any table ("invalid type: map").
        let err = probe(path, table(&[(field, table(&[(PROBE, table(&[]))]))]));
        if let Some(rest) = err
            .split(&format!("unknown variant `{PROBE}`, expected "))
            .nth(1)
        {
            // An enum value answers the same way; only a map takes a struct under that key.
            let key = rest.split('`').nth(1).expect("the error names a key");
            let map = Step::Map(field.to_owned(), key.to_owned());
            inner[path.len()] = map.clone();
            return if fields(&inner).is_some() {
                map
            } else {
                Step::Table(field.to_owned())
            };
        }
        let values = [
            table(&[]),
            toml::Value::Array(Vec::new()),
            toml::Value::String("x".into()),
            toml::Value::Integer(0),
            toml::Value::Boolean(true),
        ];
        let string_keys = values.into_iter().any(|value| {
            !probe(path, table(&[(field, table(&[(PROBE, value)]))])).contains("invalid type: map")
        });
        if string_keys {
            Step::Map(field.to_owned(), PROBE.to_owned())
        } else {
            Step::Array(field.to_owned())
        }
    }

    /// Collects every leaf setting under the struct at `path`.
    fn walk(path: &mut Vec<Step>, keys: &mut BTreeSet<String>) {
        for field in fields(path).expect("a struct") {
            let step = step_into(path, &field);
            path.push(step);
            if fields(path).is_some() {
                walk(path, keys);
            } else {
                // A leaf; an array step that holds no struct is a plain value (an array of
                // strings, say), named without `[]`.
                if matches!(path.last(), Some(Step::Array(_))) {
                    *path.last_mut().expect("pushed above") = Step::Table(field.clone());
                }
                keys.insert(name(path));
            }
            path.pop();
        }
    }

    fn documented() -> BTreeSet<String> {
        let text = include_str!("../../../docs/configuration.md");
        text.lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split_once("` |").map(|(key, _)| key.to_owned()))
            .collect()
    }

    #[test]
    fn the_configuration_table_lists_every_setting_and_nothing_else() {
        let mut read = BTreeSet::new();
        walk(&mut Vec::new(), &mut read);
        let documented = documented();
        let undocumented: Vec<_> = read.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&read).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "settings the code reads that docs/configuration.md lacks: {undocumented:?}; \
             rows the code does not read: {unknown:?}"
        );
    }
}
