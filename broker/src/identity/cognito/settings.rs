//! `[cognito]`: the user pools the broker trusts, how strictly it checks their tokens, and which
//! groups and scopes become roles.

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use crate::identity::Role;

/// Longest clock-skew leeway the settings accept: RFC 7519 §4.1.4 speaks of "a few minutes".
pub const MAX_LEEWAY_SECONDS: u64 = 300;

/// `[cognito]`: Cognito user pools whose JWTs the broker accepts.
///
/// With no `[[cognito.pools]]` entry, Cognito tokens are not accepted at all: `IssueTokens` with
/// a `cognito_token` answers `FAILED_PRECONDITION` and a JWT bearer is `UNAUTHENTICATED`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CognitoSettings {
    /// The trusted user pools.
    pub pools: Vec<PoolSettings>,
    /// Clock-skew allowance for `exp`, `nbf` and `iat`, in seconds (aws-jwt-verify's default
    /// `graceSeconds` is 0).
    pub leeway_seconds: u64,
    /// Least time between two fetches of one JWKS URL: an unknown `kid` refetches at most this
    /// often, and a failed fetch is retried no sooner.
    pub jwks_cooldown_seconds: u64,
    /// Timeout of one JWKS request (connect, send and read).
    pub jwks_timeout_seconds: u64,
    /// Whether a token exchanged by `IssueTokens` must carry `email_verified = true`.
    pub require_email_verified: bool,
    /// Most verified tokens remembered (by SHA-256), each until its own `exp`.
    pub verified_cache_capacity: u64,
}

/// `[[cognito.pools]]`: one user pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// The expected `iss`, exactly as in the tokens:
    /// `https://cognito-idp.{region}.amazonaws.com/{userPoolId}`.
    pub issuer: String,
    /// Where the pool's keys are fetched; defaults to `{issuer}/.well-known/jwks.json`. Set it
    /// for private endpoints, proxies and tests.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// App client ids whose tokens are accepted: an ID token's `aud` or an access token's
    /// `client_id` must be one of them. Required, as in aws-jwt-verify.
    pub client_ids: Vec<String>,
    /// Roles granted to a caller whose access token lists the group in `cognito:groups`.
    #[serde(default)]
    pub group_roles: BTreeMap<String, Vec<Role>>,
    /// Roles granted to a caller whose access token lists the scope in `scope`.
    #[serde(default)]
    pub scope_roles: BTreeMap<String, Vec<Role>>,
    /// Direct exchange: whether a user's own ID token from this pool is a caller credential
    /// for `IssueTokens` with that same token as `cognito_token` (and for nothing else), so a
    /// browser app can get its user's tokens without an API key. Off by default; see
    /// `docs/cognito.md` for what it trusts. Rate limited per `sub` by
    /// `limits.direct_exchange`.
    #[serde(default)]
    pub direct_exchange: bool,
}

impl Default for CognitoSettings {
    fn default() -> Self {
        Self {
            pools: Vec::new(),
            leeway_seconds: 0,
            jwks_cooldown_seconds: 10,
            jwks_timeout_seconds: 5,
            require_email_verified: true,
            verified_cache_capacity: 10_000,
        }
    }
}

impl CognitoSettings {
    /// Whether any pool is configured.
    pub fn is_enabled(&self) -> bool {
        !self.pools.is_empty()
    }

    /// The clock-skew leeway.
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.leeway_seconds)
    }

    /// The per-URL JWKS fetch cooldown.
    pub fn jwks_cooldown(&self) -> Duration {
        Duration::from_secs(self.jwks_cooldown_seconds)
    }

    /// The JWKS request timeout.
    pub fn jwks_timeout(&self) -> Duration {
        Duration::from_secs(self.jwks_timeout_seconds)
    }

    /// Checks what serde cannot.
    ///
    /// # Errors
    ///
    /// A message naming the `cognito.…` key that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.leeway_seconds > MAX_LEEWAY_SECONDS {
            return Err(format!(
                "cognito.leeway_seconds must be at most {MAX_LEEWAY_SECONDS}"
            ));
        }
        if self.jwks_cooldown_seconds == 0 {
            return Err("cognito.jwks_cooldown_seconds must be at least 1".into());
        }
        if self.jwks_timeout_seconds == 0 {
            return Err("cognito.jwks_timeout_seconds must be at least 1".into());
        }
        if self.verified_cache_capacity == 0 {
            return Err("cognito.verified_cache_capacity must be at least 1".into());
        }
        for (i, pool) in self.pools.iter().enumerate() {
            pool.validate()
                .map_err(|why| format!("cognito.pools[{i}]: {why}"))?;
            if self.pools[..i].iter().any(|p| p.issuer == pool.issuer) {
                return Err(format!(
                    "cognito.pools[{i}]: issuer {:?} is configured twice",
                    pool.issuer
                ));
            }
        }
        Ok(())
    }
}

impl PoolSettings {
    /// Returns the JWKS URL: the configured one, or the issuer's well-known path.
    pub fn jwks_url(&self) -> String {
        self.jwks_url
            .clone()
            .unwrap_or_else(|| format!("{}/.well-known/jwks.json", self.issuer))
    }

    /// Returns the user pool id: the last path segment of the issuer.
    pub fn user_pool_id(&self) -> &str {
        self.issuer.rsplit('/').next().unwrap_or_default()
    }

    fn validate(&self) -> Result<(), String> {
        let issuer = reqwest::Url::parse(&self.issuer)
            .map_err(|_| format!("issuer {:?} is not an absolute URL", self.issuer))?;
        if !matches!(issuer.scheme(), "https" | "http") || self.issuer.ends_with('/') {
            return Err(format!(
                "issuer {:?} must be an http(s) URL without a trailing '/', exactly as the tokens' iss",
                self.issuer
            ));
        }
        let jwks_url = self.jwks_url();
        let url = reqwest::Url::parse(&jwks_url)
            .map_err(|_| format!("jwks_url {jwks_url:?} is not an absolute URL"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(format!("jwks_url {jwks_url:?} must be an http(s) URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("jwks_url must not carry credentials".into());
        }
        if self.client_ids.is_empty() {
            return Err("client_ids must list at least one app client id".into());
        }
        if self.client_ids.iter().any(|id| id.trim().is_empty()) {
            return Err("client_ids must not contain an empty id".into());
        }
        let empty_name = self
            .group_roles
            .keys()
            .chain(self.scope_roles.keys())
            .any(|name| name.is_empty());
        if empty_name {
            return Err("group_roles and scope_roles must not map an empty name".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PoolSettings {
        PoolSettings {
            issuer: "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC123xyZ".into(),
            jwks_url: None,
            client_ids: vec!["client-1".into()],
            group_roles: BTreeMap::new(),
            scope_roles: BTreeMap::new(),
            direct_exchange: false,
        }
    }

    #[test]
    fn cognito_settings_load_from_toml_and_env_overrides() {
        use std::collections::HashMap;

        use crate::app::settings::Settings;

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tb.toml");
        std::fs::write(
            &file,
            r#"
[cognito]
leeway_seconds = 5

[[cognito.pools]]
issuer = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC123xyZ"
client_ids = ["client-1"]

[cognito.pools.group_roles]
admins = ["admin"]

[cognito.pools.scope_roles]
"tokenbroker/introspect" = ["service"]
"#,
        )
        .unwrap();
        let env: HashMap<String, String> = [
            ("TOKENBROKER_COGNITO__JWKS_COOLDOWN_SECONDS", "30"),
            ("TOKENBROKER_COGNITO__REQUIRE_EMAIL_VERIFIED", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let s = Settings::load(Some(&file), &env).unwrap();
        assert_eq!(s.cognito.leeway_seconds, 5);
        assert_eq!(s.cognito.jwks_cooldown_seconds, 30);
        assert!(!s.cognito.require_email_verified);
        let pool = &s.cognito.pools[0];
        assert_eq!(pool.group_roles["admins"], [Role::Admin]);
        assert_eq!(pool.scope_roles["tokenbroker/introspect"], [Role::Service]);

        let env: HashMap<String, String> = [(
            "TOKENBROKER_COGNITO__POOLS".to_owned(),
            r#"[{ issuer = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Pool", client_ids = ["c"], jwks_url = "http://127.0.0.1:9/jwks.json" }]"#.to_owned(),
        )]
        .into_iter()
        .collect();
        let s = Settings::load(None, &env).unwrap();
        assert_eq!(
            s.cognito.pools[0].jwks_url(),
            "http://127.0.0.1:9/jwks.json"
        );
        assert_eq!(s.cognito.pools[0].user_pool_id(), "eu-west-1_Pool");

        for (name, value, named) in [
            (
                "TOKENBROKER_COGNITO__LEEWAY_SECONDS",
                "301",
                "leeway_seconds",
            ),
            (
                "TOKENBROKER_COGNITO__POOLS",
                r#"[{ issuer = "https://x", client_ids = ["c"], groups = {} }]"#,
                "groups",
            ),
            (
                "TOKENBROKER_COGNITO__POOLS",
                r#"[{ issuer = "https://x", client_ids = [] }]"#,
                "client_ids",
            ),
            (
                "TOKENBROKER_COGNITO__POOLS",
                r#"[{ issuer = "https://x", client_ids = ["c"], group_roles = { a = ["root"] } }]"#,
                "root",
            ),
            ("TOKENBROKER_COGNITO__JWKS_COOLDOWN", "1", "jwks_cooldown"),
        ] {
            let env = HashMap::from([(name.to_owned(), value.to_owned())]);
            let err = Settings::load(None, &env).unwrap_err().to_string();
            assert!(err.contains(named), "{name}={value}: {err}");
        }
    }

    #[test]
    fn jwks_url_defaults_to_the_issuers_well_known_path() {
        let p = pool();
        assert_eq!(
            p.jwks_url(),
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC123xyZ/.well-known/jwks.json"
        );
        assert_eq!(p.user_pool_id(), "us-east-1_AbC123xyZ");
    }

    #[test]
    fn bad_pools_are_named() {
        let with = |f: fn(&mut PoolSettings)| {
            let mut p = pool();
            f(&mut p);
            CognitoSettings {
                pools: vec![p],
                ..CognitoSettings::default()
            }
            .validate()
            .unwrap_err()
        };
        assert!(with(|p| p.issuer = "cognito".into()).contains("issuer"));
        assert!(with(|p| p.issuer.push('/')).contains("trailing"));
        assert!(with(|p| p.client_ids.clear()).contains("client_ids"));
        assert!(with(|p| p.jwks_url = Some("ftp://x/jwks".into())).contains("jwks_url"));
        assert!(with(|p| p.jwks_url = Some("https://u:p@x/jwks".into())).contains("credentials"));
        let twice = CognitoSettings {
            pools: vec![pool(), pool()],
            ..CognitoSettings::default()
        };
        assert!(twice.validate().unwrap_err().contains("twice"));
        let cooldown = CognitoSettings {
            jwks_cooldown_seconds: 0,
            ..CognitoSettings::default()
        };
        assert!(cooldown.validate().unwrap_err().contains("cooldown"));
    }
}
