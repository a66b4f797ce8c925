//! The audit log: one JSON line per privileged operation, to stdout or an append-only file,
//! naming who did what to which tokens, and never a secret or an email (emails appear as an
//! HMAC-SHA-256 under a configured key, so one person's events can be correlated by whoever
//! holds the key, and by no one else).
//!
//! It follows Vault's rule: **an operation that cannot be audited does not happen.** A state
//! change (issue, refresh, revoke) writes a `request` line before it acts; if that write fails,
//! the call fails with `UNAVAILABLE` and nothing was done. After acting it writes a `response`
//! line with the outcome and the ids; if that write fails, the call fails too (the change was
//! made; the client retries, and issue, refresh within the grace window and revoke are all
//! safe to retry). Reads an admin makes (Introspect, ListTokens) write a `response` line only,
//! and return nothing unless it was written. The two lines of one call share an `id`.
//!
//! Each line is one `write_all` of the whole line, with no buffering across events, on a file
//! opened in append mode (`O_APPEND`), so concurrent events never interleave within a line and
//! nothing acknowledged is lost if the process dies. A failed write reopens the file once and
//! tries again, which also follows a rotation that moved the file away; `copytruncate`
//! rotation works without that.
//!
//! The write is a blocking system call on the calling task: a page-cache write costs a few
//! microseconds, and a sink that blocks (a full disk, a stalled stdout pipe) should hold the
//! privileged operations back rather than let them run unaudited.

use std::{
    fmt,
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tracing::error;

pub use super::error::AuditError;
use crate::{
    domain::DomainMetrics,
    domain::error::{BrokerError, BrokerErrorKind, BrokerResult},
    identity::Caller,
    model::ConfigError,
    model::clock::Clock,
    model::{Email, UnixMicros},
};

/// The shortest accepted email HMAC key, in bytes.
pub const MIN_HMAC_KEY_LEN: usize = 32;

/// Where audit events go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditSinkKind {
    /// No audit log (the default).
    #[default]
    Off,
    /// One line per event on standard output (logs go to stderr).
    Stdout,
    /// One line per event appended to `path`.
    File,
}

/// `[audit]`: the audit sink and the key that hashes emails.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// `off`, `stdout` or `file`.
    pub sink: AuditSinkKind,
    /// The file of the `file` sink (created if missing, appended to).
    pub path: Option<PathBuf>,
    /// The HMAC key for emails, at least 32 bytes. Prefer `email_hmac_key_file` or
    /// `TOKENBROKER_AUDIT__EMAIL_HMAC_KEY` to a key in a config file.
    pub email_hmac_key: Option<SecretString>,
    /// A file holding the HMAC key (surrounding whitespace is ignored).
    pub email_hmac_key_file: Option<PathBuf>,
}

impl AuditSettings {
    /// Checks that an enabled sink has what it needs: a key, and a path for `file`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the missing or bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sink == AuditSinkKind::Off {
            return Ok(());
        }
        if self.sink == AuditSinkKind::File && self.path.is_none() {
            return Err(ConfigError("audit.sink = \"file\" needs audit.path".into()));
        }
        self.email_hmac_key().map(drop)
    }

    /// Returns the HMAC key from `email_hmac_key` or `email_hmac_key_file`.
    ///
    /// # Errors
    ///
    /// When neither or both are set, the file cannot be read, or the key is shorter than
    /// [`MIN_HMAC_KEY_LEN`] bytes.
    pub fn email_hmac_key(&self) -> Result<SecretString, ConfigError> {
        let key = match (&self.email_hmac_key, &self.email_hmac_key_file) {
            (Some(key), None) => key.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    ConfigError(format!(
                        "cannot read audit.email_hmac_key_file {}: {err}",
                        path.display()
                    ))
                })?;
                SecretString::from(text.trim().to_owned())
            }
            (None, None) => {
                return Err(ConfigError(
                    "an audit sink needs audit.email_hmac_key or audit.email_hmac_key_file \
                     (emails are written as their HMAC)"
                        .into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError(
                    "set audit.email_hmac_key or audit.email_hmac_key_file, not both".into(),
                ));
            }
        };
        if key.expose_secret().len() < MIN_HMAC_KEY_LEN {
            return Err(ConfigError(format!(
                "audit.email_hmac_key must be at least {MIN_HMAC_KEY_LEN} bytes \
                 (openssl rand -hex 32)"
            )));
        }
        Ok(key)
    }
}

enum Sink {
    Off,
    Stdout,
    File {
        path: PathBuf,
        /// The open file; replaced when a failed write reopens it.
        file: RwLock<Arc<File>>,
    },
}

/// The audit log. See the module documentation.
pub struct AuditLog {
    sink: Sink,
    /// HMAC-SHA-256 keyed with the configured key; cloned per email.
    hmac: Option<Hmac<Sha256>>,
    metrics: Arc<DomainMetrics>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sink = match &self.sink {
            Sink::Off => "off".to_owned(),
            Sink::Stdout => "stdout".to_owned(),
            Sink::File { path, .. } => format!("file {}", path.display()),
        };
        f.debug_struct("AuditLog")
            .field("sink", &sink)
            .finish_non_exhaustive()
    }
}

impl Default for AuditLog {
    fn default() -> Self {
        Self::off()
    }
}

impl AuditLog {
    /// An audit log that records nothing.
    pub fn off() -> Self {
        Self {
            sink: Sink::Off,
            hmac: None,
            metrics: Arc::default(),
        }
    }

    /// Opens the configured sink (the file in append mode, created if missing).
    ///
    /// # Errors
    ///
    /// When the settings are invalid or the file cannot be opened.
    pub fn open(settings: &AuditSettings, metrics: Arc<DomainMetrics>) -> anyhow::Result<Self> {
        settings.validate()?;
        let sink = match settings.sink {
            AuditSinkKind::Off => return Ok(Self::off()),
            AuditSinkKind::Stdout => Sink::Stdout,
            AuditSinkKind::File => {
                let path = settings
                    .path
                    .clone()
                    .expect("validate requires a path for the file sink");
                let file = open_append(&path).map_err(|err| {
                    anyhow::anyhow!(
                        "cannot open audit.path {} for appending: {err}",
                        path.display()
                    )
                })?;
                Sink::File {
                    path,
                    file: RwLock::new(Arc::new(file)),
                }
            }
        };
        let key = settings.email_hmac_key()?;
        let hmac = Hmac::<Sha256>::new_from_slice(key.expose_secret().as_bytes())
            .map_err(|_| anyhow::anyhow!("audit.email_hmac_key is not a usable HMAC key"))?;
        Ok(Self {
            sink,
            hmac: Some(hmac),
            metrics,
        })
    }

    /// Whether events are recorded.
    pub fn is_on(&self) -> bool {
        !matches!(self.sink, Sink::Off)
    }

    /// Starts the record of one operation by `caller` (`None`: anonymous), timed by `clock`
    /// (read only when the log is on). `Record::default()` is an inert one, for an operation
    /// that is audited only for some callers.
    pub fn record(&self, event: Event, caller: Option<&Caller>, clock: &dyn Clock) -> Record {
        self.start(event, clock, || {
            caller.map_or_else(|| "anonymous".to_owned(), |c| c.name.clone())
        })
    }

    /// Starts the record of an operation whose caller is whoever holds a presented secret
    /// (RefreshTokens needs no credential: the refresh secret is the credential). The caller
    /// is named `token:<id>` by the id the secret embeds (`anonymous` when it embeds none),
    /// never by the secret. The secret is checked by the operation itself, so on a line whose
    /// outcome is not `ok` the name is only what the presenter claimed.
    pub fn record_holder(&self, event: Event, token_id: Option<&str>, clock: &dyn Clock) -> Record {
        self.start(event, clock, || {
            token_id.map_or_else(|| "anonymous".to_owned(), |id| format!("token:{id}"))
        })
    }

    fn start(&self, event: Event, clock: &dyn Clock, caller: impl FnOnce() -> String) -> Record {
        if !self.is_on() {
            return Record::default();
        }
        Record {
            on: true,
            line: Line {
                event: event.as_str(),
                id: crate::model::random_hex(),
                caller: caller(),
                ..Line::default()
            },
            time: clock.now(),
        }
    }

    /// Writes the `request` line of a state change, before it acts.
    ///
    /// # Errors
    ///
    /// `Unavailable` when the line cannot be written: the caller must not act.
    pub fn request(&self, record: &mut Record) -> BrokerResult<()> {
        if !record.on {
            return Ok(());
        }
        record.line.phase = "request";
        record.line.time = rfc3339(record.time);
        self.write(&record.line)
            .map_err(|()| AuditError::NotWrittenBefore.into())
    }

    /// Writes the `response` line with the outcome of `result`, and returns `result`, or
    /// `Unavailable` when the line cannot be written. A record whose request line failed is
    /// not written again.
    ///
    /// # Errors
    ///
    /// `result`'s error, or `Unavailable` as above.
    pub fn response<T>(&self, mut record: Record, result: BrokerResult<T>) -> BrokerResult<T> {
        if !record.on {
            return result;
        }
        if let Err(BrokerError::Audit(AuditError::NotWrittenBefore)) = &result {
            return result;
        }
        record.line.phase = "response";
        record.line.time = rfc3339(record.time);
        record.line.outcome = Some(match &result {
            Ok(_) => "ok",
            Err(err) => outcome(err.kind()),
        });
        match self.write(&record.line) {
            Ok(()) => result,
            Err(()) => Err(AuditError::NotWrittenAfter.into()),
        }
    }

    /// Writes a standalone response line (such as `reuse_detected`) that belongs to
    /// `record`'s operation and ended in `outcome` (the error class the client gets).
    ///
    /// # Errors
    ///
    /// `Unavailable` when the line cannot be written.
    pub fn event(
        &self,
        record: &Record,
        event: Event,
        outcome: BrokerErrorKind,
        fill: impl FnOnce(&mut Line),
    ) -> BrokerResult<()> {
        if !record.on {
            return Ok(());
        }
        let mut line = Line {
            event: event.as_str(),
            phase: "response",
            id: record.line.id.clone(),
            caller: record.line.caller.clone(),
            time: rfc3339(record.time),
            outcome: Some(self::outcome(outcome)),
            ..Line::default()
        };
        fill(&mut line);
        self.write(&line)
            .map_err(|()| AuditError::NotWrittenAfter.into())
    }

    /// Returns the hex HMAC of a (normalised) email, if the log is on.
    pub fn email_hmac(&self, email: &Email) -> Option<String> {
        let mut mac = self.hmac.clone()?;
        mac.update(email.as_str().as_bytes());
        Some(hex::encode(mac.finalize().into_bytes()))
    }

    fn write(&self, line: &Line) -> Result<(), ()> {
        let mut bytes = match serde_json::to_vec(line) {
            Ok(bytes) => bytes,
            Err(err) => {
                error!(error = %err, "cannot encode an audit event");
                return Err(());
            }
        };
        bytes.push(b'\n');
        let result = match &self.sink {
            Sink::Off => Ok(()),
            Sink::Stdout => std::io::stdout().lock().write_all(&bytes),
            Sink::File { path, file } => {
                let current = Arc::clone(&file.read().expect("audit file lock poisoned"));
                (&*current).write_all(&bytes).or_else(|first| {
                    // Reopen once: the file may have been moved away or its disk repaired.
                    let reopened = Arc::new(open_append(path).map_err(|_| first)?);
                    *file.write().expect("audit file lock poisoned") = Arc::clone(&reopened);
                    (&*reopened).write_all(&bytes)
                })
            }
        };
        result.map_err(|err| {
            self.metrics.audit_write_errors.get(()).inc();
            error!(error = %err, event = line.event, "cannot write the audit log; the operation fails");
        })
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// What an audit line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// IssueTokens.
    Issue,
    /// RefreshTokens (a rotation).
    Refresh,
    /// A consumed refresh token was presented again and its family revoked.
    ReuseDetected,
    /// Revoke, any target.
    Revoke,
    /// Introspect by an admin.
    Introspect,
    /// ListTokens.
    List,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Refresh => "refresh",
            Self::ReuseDetected => "reuse_detected",
            Self::Revoke => "revoke",
            Self::Introspect => "introspect",
            Self::List => "list",
        }
    }
}

/// The error class of a failed operation, as written in `outcome`.
fn outcome(kind: BrokerErrorKind) -> &'static str {
    match kind {
        BrokerErrorKind::InvalidArgument => "invalid_argument",
        BrokerErrorKind::Unauthenticated => "unauthenticated",
        BrokerErrorKind::PermissionDenied => "permission_denied",
        BrokerErrorKind::FailedPrecondition => "failed_precondition",
        BrokerErrorKind::ResourceExhausted => "resource_exhausted",
        BrokerErrorKind::Unavailable => "unavailable",
        BrokerErrorKind::DeadlineExceeded => "deadline_exceeded",
        BrokerErrorKind::Internal => "internal",
    }
}

fn rfc3339(time: UnixMicros) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(time.0) * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// One audit line. Only ids, counts, names and HMACs: nothing here may hold a secret.
#[derive(Debug, Default, Serialize)]
pub struct Line {
    /// RFC 3339, by the broker's clock.
    time: String,
    /// See [`Event`].
    event: &'static str,
    /// `request` (before acting) or `response` (after).
    phase: &'static str,
    /// Pairs the lines of one operation.
    id: String,
    /// The caller's configured name, `cognito:<sub>`, `token:<id>` for the holder of a
    /// presented refresh secret, or `anonymous`.
    caller: String,
    /// `ok` or the error class; response lines only.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
    /// What a Revoke names: `secret`, `token_id`, `family_id`, `account_id` or `email`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<&'static str>,
    /// The token the call names or presents (a presented secret's id, when it embeds one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The token family.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family_id: Option<String>,
    /// The account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// HMAC-SHA-256 (hex) of the normalised email under `audit.email_hmac_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_hmac: Option<String>,
    /// The app client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The refresh token minted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token_id: Option<String>,
    /// The access token minted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token_id: Option<String>,
    /// Whether an idempotent IssueTokens or a rotation retry returned an earlier pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed: Option<bool>,
    /// Tokens a revocation made inactive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<u64>,
    /// Whether an introspected token is active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Tokens a ListTokens page returned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed: Option<usize>,
}

/// One operation's audit record, filled in as the operation learns ids, and written by
/// [`AuditLog::request`] and [`AuditLog::response`]. Inert when the log is off.
#[derive(Debug)]
pub struct Record {
    on: bool,
    line: Line,
    time: UnixMicros,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            on: false,
            line: Line::default(),
            time: UnixMicros(0),
        }
    }
}

impl Record {
    /// Whether the log is on (callers skip work, such as an HMAC, when it is not).
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Drops the record unwritten: for a call that turned out to concern no token of ours
    /// (a forged or malformed secret), which would tell a reader of the log nothing.
    pub fn discard(&mut self) {
        self.on = false;
    }

    /// Fills in fields of the line (a no-op when the log is off).
    pub fn set(&mut self, fill: impl FnOnce(&mut Line)) {
        if self.on {
            fill(&mut self.line);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::app::settings::Settings;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::load(None, &env)
    }

    #[test]
    fn audit_is_off_by_default_and_an_enabled_sink_needs_its_settings() {
        let s = load(&[]).unwrap();
        assert_eq!(s.audit.sink, AuditSinkKind::Off);
        assert_eq!(s.metrics.listen, None);

        let key = ("TOKENBROKER_AUDIT__EMAIL_HMAC_KEY", "k".repeat(32));
        let err = load(&[("TOKENBROKER_AUDIT__SINK", "stdout")]).unwrap_err();
        assert!(err.to_string().contains("audit.email_hmac_key"), "{err}");
        let err = load(&[("TOKENBROKER_AUDIT__SINK", "file"), (key.0, &key.1)]).unwrap_err();
        assert!(err.to_string().contains("audit.path"), "{err}");
        let err = load(&[
            ("TOKENBROKER_AUDIT__SINK", "stdout"),
            ("TOKENBROKER_AUDIT__EMAIL_HMAC_KEY", "short"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
        assert!(!err.to_string().contains("short"), "the key is not echoed");
        let err = load(&[("TOKENBROKER_AUDIT__SINK", "syslog")]).unwrap_err();
        assert!(err.to_string().contains("syslog"), "{err}");
        let s = load(&[
            ("TOKENBROKER_AUDIT__SINK", "file"),
            ("TOKENBROKER_AUDIT__PATH", "/var/log/tokenbroker/audit.log"),
            (key.0, &key.1),
            ("TOKENBROKER_METRICS__LISTEN", "0.0.0.0:9464"),
        ])
        .unwrap();
        assert_eq!(s.audit.sink, AuditSinkKind::File);
        assert_eq!(s.metrics.listen, Some(([0, 0, 0, 0], 9464).into()));
    }

    #[test]
    fn the_key_can_come_from_a_file_and_hashes_emails_as_hmac_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, format!("{}\n", "k".repeat(32))).unwrap();
        let settings = AuditSettings {
            sink: AuditSinkKind::Stdout,
            email_hmac_key_file: Some(file),
            ..AuditSettings::default()
        };
        let log = AuditLog::open(&settings, Arc::default()).unwrap();
        let email = Email::parse("Alice@Example.com").unwrap();
        // Python: hmac.new(b"k" * 32, b"alice@example.com", hashlib.sha256).hexdigest()
        assert_eq!(
            log.email_hmac(&email).unwrap(),
            "0d8b3da1ccc85d32dd2c1a1863a4bd48217a82e7eeab7033dd57fe32f560c133"
        );
        assert!(!format!("{log:?}").contains("kkkk"));
        assert_eq!(AuditLog::off().email_hmac(&email), None);
    }

    #[test]
    fn lines_are_whole_json_objects_appended_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "earlier line\n").unwrap();
        let settings = AuditSettings {
            sink: AuditSinkKind::File,
            path: Some(path.clone()),
            email_hmac_key: Some(SecretString::from("k".repeat(32))),
            ..AuditSettings::default()
        };
        let log = AuditLog::open(&settings, Arc::default()).unwrap();
        #[derive(Debug)]
        struct Fixed;
        impl Clock for Fixed {
            fn now(&self) -> UnixMicros {
                UnixMicros(1_700_000_000_123_456)
            }
        }
        let mut record = log.record(Event::Revoke, None, &Fixed);
        record.set(|line| line.target = Some("secret"));
        log.request(&mut record).unwrap();
        log.response(record, Ok::<_, BrokerError>(())).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "earlier line", "appended, not truncated");
        let request: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(request["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(request["phase"], "request");
        assert_eq!(request["caller"], "anonymous");
        assert!(request.get("outcome").is_none());
        let response: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(response["outcome"], "ok");
        assert_eq!(response["id"], request["id"]);
    }
}
