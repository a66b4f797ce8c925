//! The trigger's settings, read once per cold start from the function's environment.
//!
//! Every key is a named constant. The environment is read through [`Env`], so tests pass a map
//! and never touch the process environment. Claim names are checked here, at start-up, against
//! the claims Cognito forbids overriding: a misconfigured function fails its init instead of
//! failing (or silently changing) every sign-in.

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use secrecy::SecretString;

/// The broker's gRPC endpoint, `http://…` or `https://…` (required).
pub const ENDPOINT: &str = "TOKENBROKER_TRIGGER__ENDPOINT";
/// The API key (role `trigger`) sent to the broker. This or [`API_KEY_FILE`] is required.
pub const API_KEY: &str = "TOKENBROKER_TRIGGER__API_KEY";
/// A file holding the API key (for example a mounted secret); surrounding whitespace is
/// ignored.
pub const API_KEY_FILE: &str = "TOKENBROKER_TRIGGER__API_KEY_FILE";
/// The broker call's deadline in milliseconds (default 2000, at most 5000). The Lambda's own
/// deadline, less [`DEADLINE_MARGIN_MS`], caps it further.
pub const TIMEOUT_MS: &str = "TOKENBROKER_TRIGGER__TIMEOUT_MS";
/// Time kept back from the Lambda deadline to answer Cognito, in milliseconds (default 200).
pub const DEADLINE_MARGIN_MS: &str = "TOKENBROKER_TRIGGER__DEADLINE_MARGIN_MS";
/// `fail_closed` (default) or `fail_open`: what a sign-in gets when the broker cannot answer.
pub const FAILURE_POLICY: &str = "TOKENBROKER_TRIGGER__FAILURE_POLICY";
/// The claim that carries the access secret (default `fauna_access_token`).
pub const ACCESS_CLAIM: &str = "TOKENBROKER_TRIGGER__ACCESS_CLAIM";
/// The claim that carries the refresh secret (default `fauna_refresh_token`), when
/// [`INCLUDE_REFRESH`] is on.
pub const REFRESH_CLAIM: &str = "TOKENBROKER_TRIGGER__REFRESH_CLAIM";
/// Whether the refresh secret is written too (default `false`, or `true` when [`REFRESH_CLAIM`]
/// is set). ID-token claims are readable by anyone holding the token, and every Cognito refresh
/// runs the trigger again, minting a new pair; only an app that refreshes through the broker
/// itself needs the refresh secret.
pub const INCLUDE_REFRESH: &str = "TOKENBROKER_TRIGGER__INCLUDE_REFRESH";
/// Which tokens of a V2/V3 event get the claims: `id`, `access` or `id,access` (default `id`).
/// V1 events can only change the ID token, so they always use it.
pub const CLAIM_TOKENS: &str = "TOKENBROKER_TRIGGER__CLAIM_TOKENS";
/// Whether `email` is removed from the ID token (default `true`, as the original trigger did).
pub const SUPPRESS_EMAIL: &str = "TOKENBROKER_TRIGGER__SUPPRESS_EMAIL";
/// Whether only users whose `email_verified` is `true` get Fauna claims (default `true`).
/// The broker keys accounts by email, so an unverified address must not reach it.
pub const REQUIRE_VERIFIED_EMAIL: &str = "TOKENBROKER_TRIGGER__REQUIRE_VERIFIED_EMAIL";

/// The default broker deadline: well inside Cognito's 5 s, leaving room for a retry.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
/// The claim of the refresh secret when [`INCLUDE_REFRESH`] is on and [`REFRESH_CLAIM`] unset.
pub const DEFAULT_REFRESH_CLAIM: &str = "fauna_refresh_token";
/// The default time kept back from the Lambda deadline.
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_millis(200);
/// Cognito waits 5 s for the trigger; a longer broker deadline could never be used.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(5000);

/// Claims Cognito does not let a trigger add, override or suppress ("Pre token generation
/// Lambda trigger"), and standard claims that Cognito, the broker's JWT verification or apps
/// read with a fixed meaning. Any `cognito:` claim is refused too.
pub const RESERVED_CLAIMS: &[&str] = &[
    // Cognito refuses these.
    "acr",
    "amr",
    "aud",
    "at_hash",
    "auth_time",
    "azp",
    "cognito:username",
    "exp",
    "iat",
    "identities",
    "iss",
    "jti",
    "nbf",
    "nonce",
    "origin_jti",
    "sub",
    "token_use",
    // Read with a fixed meaning by Cognito, the broker or apps.
    "client_id",
    "scope",
    "username",
    "email",
    "email_verified",
    "phone_number",
    "phone_number_verified",
    "address",
    "updated_at",
    "event_id",
    "device_key",
    "version",
];

/// Reads environment variables.
pub trait Env {
    /// Returns the variable's value, if it is set.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

impl Env for BTreeMap<&str, &str> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).map(|value| (*value).to_owned())
    }
}

/// A setting that cannot be used. The message names the variable, never a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// A variable's value is not valid.
    #[error("{key}: {reason}")]
    Invalid {
        /// The variable.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key file cannot be read.
    #[error("cannot read the file named by {API_KEY_FILE} ({path})")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            reason: reason.into(),
        }
    }
}

/// What a sign-in gets when the broker cannot answer (or the event cannot be used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// The trigger fails with a user-safe message: Cognito retries, then refuses the sign-in.
    #[default]
    FailClosed,
    /// The user signs in without Fauna claims; the trigger logs a warning.
    FailOpen,
}

impl FailurePolicy {
    /// Returns the configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailClosed => "fail_closed",
            Self::FailOpen => "fail_open",
        }
    }
}

/// A claim name the trigger may add: not reserved, not `cognito:…`, 1 to 128 characters of
/// `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimName(String);

impl ClaimName {
    /// Checks `name`.
    ///
    /// # Errors
    ///
    /// A reason, when the name is reserved or malformed.
    pub fn parse(name: &str) -> Result<Self, String> {
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
        if name.is_empty() || name.len() > 128 || !name.chars().all(valid) {
            return Err(format!(
                "claim name {name:?} must be 1 to 128 characters of [A-Za-z0-9_.:-]"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if RESERVED_CLAIMS.contains(&lower.as_str()) || lower.starts_with("cognito:") {
            return Err(format!(
                "claim {name:?} is reserved: Cognito refuses it or gives it a fixed meaning"
            ));
        }
        Ok(Self(name.to_owned()))
    }

    /// Returns the name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClaimName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which tokens of a V2/V3 event get the Fauna claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimTokens {
    /// The ID token.
    pub id: bool,
    /// The access token.
    pub access: bool,
}

impl Default for ClaimTokens {
    fn default() -> Self {
        Self {
            id: true,
            access: false,
        }
    }
}

impl ClaimTokens {
    fn parse(value: &str) -> Result<Self, String> {
        let mut tokens = Self {
            id: false,
            access: false,
        };
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.to_ascii_lowercase().as_str() {
                "id" => tokens.id = true,
                "access" => tokens.access = true,
                other => return Err(format!("unknown token {other:?}; use id, access or both")),
            }
        }
        if !tokens.id && !tokens.access {
            return Err("name at least one of id, access".into());
        }
        Ok(tokens)
    }
}

/// The trigger's settings.
#[derive(Clone)]
pub struct Config {
    /// The broker endpoint.
    pub endpoint: String,
    /// The API key sent to the broker.
    pub api_key: SecretString,
    /// The broker call's deadline, before the Lambda deadline caps it.
    pub timeout: Duration,
    /// Time kept back from the Lambda deadline.
    pub deadline_margin: Duration,
    /// What a sign-in gets when the broker cannot answer.
    pub failure_policy: FailurePolicy,
    /// The claim for the access secret.
    pub access_claim: ClaimName,
    /// The claim for the refresh secret; `None` (the default) leaves the refresh secret out.
    pub refresh_claim: Option<ClaimName>,
    /// Which tokens of a V2/V3 event get the claims.
    pub claim_tokens: ClaimTokens,
    /// Whether `email` is removed from the ID token.
    pub suppress_email: bool,
    /// Whether only verified emails get Fauna claims.
    pub require_verified_email: bool,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("deadline_margin", &self.deadline_margin)
            .field("failure_policy", &self.failure_policy)
            .field("access_claim", &self.access_claim)
            .field("refresh_claim", &self.refresh_claim)
            .field("claim_tokens", &self.claim_tokens)
            .field("suppress_email", &self.suppress_email)
            .field("require_verified_email", &self.require_verified_email)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Returns the defaults for `endpoint` and `api_key`.
    pub fn new(endpoint: impl Into<String>, api_key: SecretString) -> Self {
        Self {
            endpoint: endpoint.into(),
            api_key,
            timeout: DEFAULT_TIMEOUT,
            deadline_margin: DEFAULT_DEADLINE_MARGIN,
            failure_policy: FailurePolicy::FailClosed,
            access_claim: ClaimName("fauna_access_token".into()),
            refresh_claim: None,
            claim_tokens: ClaimTokens::default(),
            suppress_email: true,
            require_verified_email: true,
        }
    }

    /// Reads the settings from `env`.
    ///
    /// # Errors
    ///
    /// A missing endpoint or API key, an unreadable key file, or a malformed or reserved value.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let endpoint = env
            .var(ENDPOINT)
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .ok_or(ConfigError::Missing(ENDPOINT))?;
        let api_key = match (env.var(API_KEY), env.var(API_KEY_FILE)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    API_KEY,
                    format!("set either {API_KEY} or {API_KEY_FILE}, not both"),
                ));
            }
            (Some(key), None) => key,
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::KeyFile { path, source })?
            }
            (None, None) => return Err(ConfigError::Missing(API_KEY)),
        };
        let api_key = api_key.trim();
        if api_key.is_empty() {
            return Err(ConfigError::invalid(API_KEY, "the API key is empty"));
        }
        let mut config = Self::new(endpoint, SecretString::from(api_key));

        if let Some(ms) = env.var(TIMEOUT_MS) {
            config.timeout = millis(TIMEOUT_MS, &ms)?;
            if config.timeout.is_zero() || config.timeout > MAX_TIMEOUT {
                return Err(ConfigError::invalid(
                    TIMEOUT_MS,
                    "must be 1 to 5000 (Cognito waits 5 s)",
                ));
            }
        }
        if let Some(ms) = env.var(DEADLINE_MARGIN_MS) {
            config.deadline_margin = millis(DEADLINE_MARGIN_MS, &ms)?;
            if config.deadline_margin > MAX_TIMEOUT {
                return Err(ConfigError::invalid(
                    DEADLINE_MARGIN_MS,
                    "must be 0 to 5000",
                ));
            }
        }
        if let Some(policy) = env.var(FAILURE_POLICY) {
            config.failure_policy = match policy.trim().to_ascii_lowercase().replace('-', "_") {
                p if p == "fail_closed" => FailurePolicy::FailClosed,
                p if p == "fail_open" => FailurePolicy::FailOpen,
                _ => {
                    return Err(ConfigError::invalid(
                        FAILURE_POLICY,
                        "must be fail_closed or fail_open",
                    ));
                }
            };
        }
        if let Some(name) = env.var(ACCESS_CLAIM) {
            config.access_claim =
                ClaimName::parse(name.trim()).map_err(|r| ConfigError::invalid(ACCESS_CLAIM, r))?;
        }
        let refresh_claim = env
            .var(REFRESH_CLAIM)
            .map(|name| {
                ClaimName::parse(name.trim()).map_err(|r| ConfigError::invalid(REFRESH_CLAIM, r))
            })
            .transpose()?;
        // Naming the refresh claim asks for the refresh secret: a deployment made when it was on
        // by default keeps its claim. Only both switches set against each other is an error.
        let named = refresh_claim.is_some();
        if flag(env, INCLUDE_REFRESH, named)? {
            config.refresh_claim =
                Some(refresh_claim.unwrap_or_else(|| ClaimName(DEFAULT_REFRESH_CLAIM.into())));
        } else if named {
            return Err(ConfigError::invalid(
                REFRESH_CLAIM,
                format!("is set but {INCLUDE_REFRESH}=false leaves the refresh secret out"),
            ));
        }
        if config.refresh_claim.as_ref() == Some(&config.access_claim) {
            return Err(ConfigError::invalid(
                REFRESH_CLAIM,
                format!("must differ from {ACCESS_CLAIM}"),
            ));
        }
        if let Some(tokens) = env.var(CLAIM_TOKENS) {
            config.claim_tokens =
                ClaimTokens::parse(&tokens).map_err(|r| ConfigError::invalid(CLAIM_TOKENS, r))?;
        }
        config.suppress_email = flag(env, SUPPRESS_EMAIL, true)?;
        config.require_verified_email = flag(env, REQUIRE_VERIFIED_EMAIL, true)?;
        Ok(config)
    }
}

fn millis(key: &'static str, value: &str) -> Result<Duration, ConfigError> {
    value
        .trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| ConfigError::invalid(key, "must be a whole number of milliseconds"))
}

fn flag(env: &impl Env, key: &'static str, default: bool) -> Result<bool, ConfigError> {
    let Some(value) = env.var(key) else {
        return Ok(default);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::invalid(key, "must be true or false")),
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
        let mut env = BTreeMap::from([(ENDPOINT, "http://127.0.0.1:50051"), (API_KEY, "tbk_x")]);
        env.extend(pairs.iter().copied());
        env
    }

    /// The original trigger's defaults, except that the refresh secret stays out of the tokens.
    #[test]
    fn defaults_follow_the_original_trigger_but_leave_the_refresh_secret_out() {
        let config = Config::from_env(&env(&[])).unwrap();
        assert_eq!(config.timeout, Duration::from_secs(2));
        assert_eq!(config.failure_policy, FailurePolicy::FailClosed);
        assert_eq!(config.access_claim.as_str(), "fauna_access_token");
        assert_eq!(config.refresh_claim, None);
        assert_eq!(
            config.claim_tokens,
            ClaimTokens {
                id: true,
                access: false
            }
        );
        assert!(config.suppress_email);
        assert!(config.require_verified_email);
    }

    #[test]
    fn every_setting_is_read() {
        let config = Config::from_env(&env(&[
            (TIMEOUT_MS, "750"),
            (DEADLINE_MARGIN_MS, "50"),
            (FAILURE_POLICY, "fail-open"),
            (ACCESS_CLAIM, "db_access"),
            (INCLUDE_REFRESH, "true"),
            (REFRESH_CLAIM, "db_refresh"),
            (CLAIM_TOKENS, "access, id"),
            (SUPPRESS_EMAIL, "false"),
            (REQUIRE_VERIFIED_EMAIL, "0"),
        ]))
        .unwrap();
        assert_eq!(config.timeout, Duration::from_millis(750));
        assert_eq!(config.deadline_margin, Duration::from_millis(50));
        assert_eq!(config.failure_policy, FailurePolicy::FailOpen);
        assert_eq!(config.access_claim.as_str(), "db_access");
        assert_eq!(config.refresh_claim.unwrap().as_str(), "db_refresh");
        assert_eq!(
            config.claim_tokens,
            ClaimTokens {
                id: true,
                access: true
            }
        );
        assert!(!config.suppress_email && !config.require_verified_email);

        let config = Config::from_env(&env(&[(INCLUDE_REFRESH, "on")])).unwrap();
        assert_eq!(
            config.refresh_claim.as_ref().map(ClaimName::as_str),
            Some(DEFAULT_REFRESH_CLAIM)
        );
        let config = Config::from_env(&env(&[(INCLUDE_REFRESH, "false")])).unwrap();
        assert_eq!(config.refresh_claim, None);
    }

    #[test]
    fn naming_the_refresh_claim_turns_the_refresh_secret_on() {
        let config = Config::from_env(&env(&[(REFRESH_CLAIM, "db_refresh")])).unwrap();
        assert_eq!(
            config.refresh_claim.as_ref().map(ClaimName::as_str),
            Some("db_refresh")
        );
        let err = Config::from_env(&env(&[
            (REFRESH_CLAIM, "db_refresh"),
            (INCLUDE_REFRESH, "false"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with(REFRESH_CLAIM), "{err}");
        assert!(err.contains(&format!("{INCLUDE_REFRESH}=false")), "{err}");
    }

    #[test]
    fn reserved_claim_names_are_refused_at_startup() {
        for name in [
            "sub",
            "token_use",
            "cognito:groups",
            "Cognito:Anything",
            "EXP",
            "email",
            "",
            "has space",
        ] {
            let err = Config::from_env(&env(&[(ACCESS_CLAIM, name)])).unwrap_err();
            assert!(err.to_string().starts_with(ACCESS_CLAIM), "{err}");
        }
        let err = Config::from_env(&env(&[
            (INCLUDE_REFRESH, "true"),
            (REFRESH_CLAIM, "fauna_access_token"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("must differ"), "{err}");
        // Off, the refresh claim's default name is free for the access secret.
        let config = Config::from_env(&env(&[(ACCESS_CLAIM, DEFAULT_REFRESH_CLAIM)])).unwrap();
        assert_eq!(config.access_claim.as_str(), DEFAULT_REFRESH_CLAIM);
        let err = Config::from_env(&env(&[
            (INCLUDE_REFRESH, "true"),
            (ACCESS_CLAIM, DEFAULT_REFRESH_CLAIM),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("must differ"), "{err}");
    }

    #[test]
    fn malformed_values_name_the_variable() {
        for (key, value) in [
            (TIMEOUT_MS, "0"),
            (TIMEOUT_MS, "6000"),
            (TIMEOUT_MS, "2s"),
            (FAILURE_POLICY, "maybe"),
            (CLAIM_TOKENS, "refresh"),
            (CLAIM_TOKENS, ""),
            (SUPPRESS_EMAIL, "sometimes"),
        ] {
            let err = Config::from_env(&env(&[(key, value)])).unwrap_err();
            assert!(err.to_string().starts_with(key), "{key}={value}: {err}");
        }
        let mut missing = env(&[]);
        missing.remove(API_KEY);
        assert!(matches!(
            Config::from_env(&missing),
            Err(ConfigError::Missing(API_KEY))
        ));
        missing.remove(ENDPOINT);
        assert!(matches!(
            Config::from_env(&missing),
            Err(ConfigError::Missing(ENDPOINT))
        ));
    }

    #[test]
    fn api_key_comes_from_a_file_and_never_shows_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "tbk_from_file_secret\n").unwrap();
        let path_text = path.to_str().unwrap().to_owned();
        let mut env = BTreeMap::from([
            (
                ENDPOINT.to_owned(),
                "https://broker.internal:50051".to_owned(),
            ),
            (API_KEY_FILE.to_owned(), path_text),
        ]);
        let config = Config::from_env(&env).unwrap();
        assert_eq!(config.api_key.expose_secret(), "tbk_from_file_secret");
        assert!(!format!("{config:?}").contains("tbk_from_file_secret"));

        env.insert(API_KEY.to_owned(), "tbk_both".to_owned());
        let err = Config::from_env(&env).unwrap_err();
        assert!(!err.to_string().contains("tbk_both"), "{err}");
        env.remove(API_KEY);
        env.insert(API_KEY_FILE.to_owned(), "/nonexistent/key".to_owned());
        assert!(matches!(
            Config::from_env(&env),
            Err(ConfigError::KeyFile { .. })
        ));
    }
}
