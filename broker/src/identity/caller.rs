//! An authenticated caller and the roles it may hold.

use serde::Deserialize;

use super::{AuthError, AuthResult};

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
}

impl Caller {
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
