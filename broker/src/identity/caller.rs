//! An authenticated caller and the roles it may hold.

use std::fmt;

use serde::Deserialize;

use super::{AuthError, AuthResult};
use crate::model::secret::SecretDigest;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The Cognito trigger: issues tokens for asserted claims.
    Trigger,
    /// An internal service: introspects tokens and exchanges Cognito tokens.
    Service,
    /// An operator: everything, including revoking and listing any account's tokens.
    Admin,
}

impl Role {
    /// Returns the role's configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trigger => "trigger",
            Self::Service => "service",
            Self::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The configured name, used in logs (never the key).
    pub name: String,
    /// The roles it holds.
    pub roles: Vec<Role>,
    /// Set when the caller presented a Cognito ID token of a pool with direct exchange: the
    /// only token it may exchange is that one. Such a caller holds no role.
    pub direct_exchange: Option<DirectExchange>,
}

/// The ID token a direct-exchange caller authenticated with, by SHA-256 (it is a bearer
/// secret until its `exp`, so not kept in clear).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DirectExchange(pub SecretDigest);

impl fmt::Debug for DirectExchange {
    // Not even the digest: it would let a log reader tell which token was used where.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DirectExchange(..)")
    }
}

impl Caller {
    /// A caller with `roles`, authenticated by a key or certificate.
    pub fn with_roles(name: impl Into<String>, roles: Vec<Role>) -> Self {
        Self {
            name: name.into(),
            roles,
            direct_exchange: None,
        }
    }

    /// Refuses a direct-exchange caller: its ID token is a credential for IssueTokens alone.
    ///
    /// # Errors
    ///
    /// `PermissionDenied` for a caller that authenticated with a Cognito ID token.
    pub fn refuse_direct_exchange(&self) -> AuthResult<()> {
        match self.direct_exchange {
            Some(_) => Err(AuthError::PermissionDenied(
                "a Cognito ID token is a credential only for IssueTokens (direct exchange)".into(),
            )),
            None => Ok(()),
        }
    }

    /// Whether the caller holds any of `roles`.
    pub fn has_any(&self, roles: &[Role]) -> bool {
        self.roles.iter().any(|r| roles.contains(r))
    }
}

/// Returns the caller if it holds one of `roles`.
///
/// # Errors
///
/// `Unauthenticated` without a caller, `PermissionDenied` when it lacks every role.
pub fn require<'a>(caller: Option<&'a Caller>, roles: &[Role]) -> AuthResult<&'a Caller> {
    let caller = caller.ok_or(AuthError::Unauthenticated(
        "this call needs a credential: send `authorization: Bearer <api key>`",
    ))?;
    if caller.has_any(roles) {
        Ok(caller)
    } else {
        let needed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(AuthError::PermissionDenied(format!(
            "caller {:?} lacks the role this call needs (one of: {})",
            caller.name,
            needed.join(", ")
        )))
    }
}
