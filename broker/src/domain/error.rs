//! The broker's error type: what went wrong, in a form the gRPC adapter maps to one status code.

use std::fmt;

use crate::{
    identity::{AuthError, cognito::CognitoError},
    model::InvalidArgument,
    store::{StoreError, StoreErrorKind},
};

/// The class of a broker error; each maps to exactly one gRPC code in the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerErrorKind {
    /// The request is malformed.
    InvalidArgument,
    /// No credential, an unknown one, or an inactive refresh secret.
    Unauthenticated,
    /// A valid credential without the needed role, or another client's token.
    PermissionDenied,
    /// The call needs a feature the broker is not configured for.
    FailedPrecondition,
    /// The caller is over its rate limit, the broker over its concurrency limit, or the
    /// request over its size limit.
    ResourceExhausted,
    /// The store, or another dependency such as a Cognito JWKS endpoint, cannot answer now.
    Unavailable,
    /// The deadline passed.
    DeadlineExceeded,
    /// A bug or misconfiguration.
    Internal,
}

/// An error from the broker's domain layer.
///
/// Client-fault messages are written for the client and never contain a secret; `Store` and
/// `Internal` errors keep their cause chain for the log and show the client a generic text.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// See [`BrokerErrorKind::InvalidArgument`].
    #[error("{0}")]
    InvalidArgument(String),
    /// See [`BrokerErrorKind::Unauthenticated`].
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// See [`BrokerErrorKind::PermissionDenied`].
    #[error("{0}")]
    PermissionDenied(String),
    /// See [`BrokerErrorKind::FailedPrecondition`].
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// See [`BrokerErrorKind::ResourceExhausted`]; a retry after `retry_after` can succeed.
    #[error("{message}")]
    ResourceExhausted {
        /// For the client: which limit.
        message: String,
        /// How long to wait before retrying.
        retry_after: std::time::Duration,
    },
    /// A dependency other than the store (such as a Cognito JWKS endpoint) cannot answer now;
    /// the message is for the client.
    #[error("{0}")]
    Unavailable(&'static str),
    /// The audit log could not be written; see [`AuditError`].
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The call's deadline passed before the work finished.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The token store failed.
    #[error("token store failed")]
    Store(#[from] StoreError),
    /// Anything else: a bug or misconfiguration.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
    /// An error shared by several callers that waited on one piece of work (a coalesced
    /// rotation or idempotent issue).
    #[error(transparent)]
    Shared(std::sync::Arc<BrokerError>),
}

/// Result of a broker operation.
pub type BrokerResult<T> = Result<T, BrokerError>;

impl BrokerError {
    /// How long a throttled caller should wait (`ResourceExhausted`), for every adapter's answer.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            BrokerError::ResourceExhausted { retry_after, .. } => Some(*retry_after),
            BrokerError::Shared(inner) => inner.retry_after(),
            _ => None,
        }
    }

    /// The client-facing message of an unavailable dependency other than the store.
    pub fn dependency_unavailable(&self) -> Option<&'static str> {
        match self {
            BrokerError::Unavailable(message) => Some(message),
            BrokerError::Audit(err) => Some(err.message()),
            BrokerError::Shared(inner) => inner.dependency_unavailable(),
            _ => None,
        }
    }

    /// Returns an `InvalidArgument` error with this message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// Returns the error's class.
    pub fn kind(&self) -> BrokerErrorKind {
        match self {
            Self::InvalidArgument(_) => BrokerErrorKind::InvalidArgument,
            Self::Unauthenticated(_) => BrokerErrorKind::Unauthenticated,
            Self::PermissionDenied(_) => BrokerErrorKind::PermissionDenied,
            Self::FailedPrecondition(_) => BrokerErrorKind::FailedPrecondition,
            Self::ResourceExhausted { .. } => BrokerErrorKind::ResourceExhausted,
            Self::Unavailable(_) => BrokerErrorKind::Unavailable,
            Self::Audit(_) => BrokerErrorKind::Unavailable,
            Self::DeadlineExceeded => BrokerErrorKind::DeadlineExceeded,
            Self::Store(err) => match err.kind() {
                StoreErrorKind::Unavailable => BrokerErrorKind::Unavailable,
                StoreErrorKind::Timeout => BrokerErrorKind::DeadlineExceeded,
                StoreErrorKind::Internal => BrokerErrorKind::Internal,
            },
            Self::Internal(_) => BrokerErrorKind::Internal,
            Self::Shared(inner) => inner.kind(),
        }
    }
}

impl From<AuthError> for BrokerError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Unauthenticated(message) => Self::Unauthenticated(message),
            AuthError::PermissionDenied(message) => Self::PermissionDenied(message),
            AuthError::Unavailable(message) => Self::Unavailable(message),
        }
    }
}

impl From<CognitoError> for BrokerError {
    fn from(err: CognitoError) -> Self {
        AuthError::from(err).into()
    }
}

impl From<InvalidArgument> for BrokerError {
    fn from(err: InvalidArgument) -> Self {
        Self::InvalidArgument(err.0)
    }
}

impl fmt::Display for BrokerErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An audit line that could not be written. The client sees `UNAVAILABLE` with this message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditError {
    /// The `request` line of a state change: the operation was refused, not performed.
    NotWrittenBefore,
    /// The `response` line: the operation happened, but its outcome is not on record.
    NotWrittenAfter,
}

impl AuditError {
    /// Returns the message the client gets.
    pub fn message(self) -> &'static str {
        match self {
            Self::NotWrittenBefore => {
                "the audit log cannot be written; the operation was not performed"
            }
            Self::NotWrittenAfter => "the audit log cannot be written",
        }
    }
}

impl fmt::Display for AuditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for AuditError {}
