//! Why a caller could not be identified or may not make a call.

use super::cognito::{CognitoError, Stage};

/// An authentication or authorization failure. Every message is written for the client and
/// never repeats the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential, a malformed one, or one that does not verify.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A valid credential without the role the call needs.
    #[error("{0}")]
    PermissionDenied(String),
    /// The credential could not be judged now (a Cognito pool's keys cannot be fetched).
    #[error("{0}")]
    Unavailable(&'static str),
}

/// Result of an identity operation.
pub type AuthResult<T> = Result<T, AuthError>;

impl From<CognitoError> for AuthError {
    fn from(err: CognitoError) -> Self {
        match err.stage() {
            Stage::Unavailable => Self::Unavailable(err.reason()),
            Stage::Structure | Stage::Signature | Stage::Claims => {
                Self::Unauthenticated(err.reason())
            }
        }
    }
}
