//! `[tokens]`: the lifetimes and windows the service applies.

use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;
use serde::Deserialize;

use crate::model::{ConfigError, replay::ReplayKey};

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
    /// The key (64 hex digits, 32 bytes) that seals the pairs a shared store keeps for
    /// idempotent replay and the successors it keeps for rotation within the grace window
    /// (AES-256-GCM); without one each replica replays and coalesces rotations from its own
    /// memory.
    pub replay_key: Option<SecretString>,
    /// A file holding `replay_key`.
    pub replay_key_file: Option<PathBuf>,
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
            replay_key: None,
            replay_key_file: None,
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
        if let Some((_, message)) = checks.iter().find(|(bad, _)| *bad) {
            return Err(ConfigError((*message).to_owned()));
        }
        if self.replay_key.is_some() && self.replay_key_file.is_some() {
            return Err(ConfigError(
                "set tokens.replay_key or tokens.replay_key_file, not both".into(),
            ));
        }
        if let Some(key) = &self.replay_key {
            ReplayKey::from_hex(key)?;
        }
        Ok(())
    }

    /// Reads the replay key from `replay_key` or `replay_key_file`; `None` when neither is set.
    ///
    /// # Errors
    ///
    /// When the file cannot be read or the key is not 64 hex digits; the message never holds
    /// the key.
    pub fn replay_key(&self) -> Result<Option<ReplayKey>, ConfigError> {
        if let Some(path) = &self.replay_key_file {
            let text = std::fs::read_to_string(path).map_err(|err| {
                ConfigError(format!(
                    "cannot read tokens.replay_key_file {}: {err}",
                    path.display()
                ))
            })?;
            return ReplayKey::from_hex(&SecretString::from(text)).map(Some);
        }
        self.replay_key
            .as_ref()
            .map(ReplayKey::from_hex)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_key_is_checked_read_from_a_file_and_never_shown() {
        let key = "0f".repeat(32);
        let with = |replay_key: Option<&str>, replay_key_file: Option<PathBuf>| TokenSettings {
            replay_key: replay_key.map(|k| SecretString::from(k.to_owned())),
            replay_key_file,
            ..TokenSettings::default()
        };
        assert!(with(None, None).replay_key().unwrap().is_none());
        let settings = with(Some(&key), None);
        settings.validate().unwrap();
        assert!(!format!("{settings:?}").contains(&key));
        let err = with(Some(&key[2..]), None).validate().unwrap_err();
        assert!(
            err.0.contains("64 hex digits") && !err.0.contains(&key[2..]),
            "{err:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay.key");
        std::fs::write(&path, format!("{key}\n")).unwrap();
        let from_file = with(None, Some(path.clone()))
            .replay_key()
            .unwrap()
            .unwrap();
        let inline = settings.replay_key().unwrap().unwrap();
        assert_eq!(from_file.id(), inline.id());
        let err = with(Some(&key), Some(path)).validate().unwrap_err();
        assert!(err.0.contains("not both"), "{err:?}");
    }
}
