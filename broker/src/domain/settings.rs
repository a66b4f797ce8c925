//! `[tokens]`: the lifetimes and windows the service applies.

use std::time::Duration;

use serde::Deserialize;

use crate::model::ConfigError;

/// `[tokens]`: lifetimes and windows, all in seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// Access token lifetime when a request asks for none.
    pub access_ttl_seconds: u64,
    /// Refresh token lifetime when a request asks for none.
    pub refresh_ttl_seconds: u64,
    /// Longest access token lifetime a request may ask for.
    pub max_access_ttl_seconds: u64,
    /// Longest refresh token lifetime a request may ask for.
    pub max_refresh_ttl_seconds: u64,
    /// How long after a rotation the consumed refresh token may be presented again.
    pub refresh_grace_seconds: u64,
    /// How long an IssueTokens idempotency key keeps returning the same pair.
    pub idempotency_window_seconds: u64,
    /// Longest a session lives, counted from its sign-in: no rotation extends a token of the
    /// family past it.
    pub max_session_seconds: u64,
    /// Whether a token issued for an app client needs that client's id on RefreshTokens and
    /// Revoke by secret.
    pub require_client_id: bool,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            access_ttl_seconds: 600,
            refresh_ttl_seconds: 3600,
            max_access_ttl_seconds: 3600,
            max_refresh_ttl_seconds: 30 * 24 * 3600,
            refresh_grace_seconds: 10,
            idempotency_window_seconds: 30,
            max_session_seconds: 30 * 24 * 3600,
            require_client_id: true,
        }
    }
}

impl TokenSettings {
    /// The default access token lifetime.
    pub fn access_ttl(&self) -> Duration {
        Duration::from_secs(self.access_ttl_seconds)
    }
    /// The default refresh token lifetime.
    pub fn refresh_ttl(&self) -> Duration {
        Duration::from_secs(self.refresh_ttl_seconds)
    }
    /// The session lifetime.
    pub fn max_session(&self) -> Duration {
        Duration::from_secs(self.max_session_seconds)
    }

    /// Checks that the defaults are within the maxima and everything fits the stores.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the setting that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            (
                self.access_ttl_seconds == 0,
                "tokens.access_ttl_seconds must be at least 1",
            ),
            (
                self.refresh_ttl_seconds == 0,
                "tokens.refresh_ttl_seconds must be at least 1",
            ),
            (
                self.access_ttl_seconds > self.max_access_ttl_seconds,
                "tokens.access_ttl_seconds is over tokens.max_access_ttl_seconds",
            ),
            (
                self.refresh_ttl_seconds > self.max_refresh_ttl_seconds,
                "tokens.refresh_ttl_seconds is over tokens.max_refresh_ttl_seconds",
            ),
            (
                self.max_refresh_ttl_seconds > self.max_session_seconds,
                "tokens.max_refresh_ttl_seconds is over tokens.max_session_seconds",
            ),
            (
                self.max_session_seconds > 100 * 365 * 24 * 3600,
                "tokens.max_session_seconds must be at most 100 years",
            ),
            (
                self.max_access_ttl_seconds > u64::from(u32::MAX)
                    || self.max_refresh_ttl_seconds > u64::from(u32::MAX),
                "token ttl maxima must fit in 32 bits",
            ),
        ];
        match checks.iter().find(|(bad, _)| *bad) {
            Some((_, message)) => Err(ConfigError((*message).to_owned())),
            None => Ok(()),
        }
    }
}
