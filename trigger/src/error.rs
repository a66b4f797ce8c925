//! `TriggerError`: what can go wrong in one invocation, and what Cognito (and so the user) is
//! told about it.
//!
//! Cognito puts a failed trigger's message into the Hosted UI callback URL, where the user sees
//! it. So the [`Diagnostic`] carries a short, fixed, user-safe sentence per kind and a
//! machine-readable `error_type`; the detail (the broker's code and message, never a secret)
//! stays in the error's `Display`, which only our logs see.

use lambda_runtime::Diagnostic;
use tokenbroker_client::{ClientError, ClientErrorKind};

/// The class of a failed invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerErrorKind {
    /// The event cannot be used: not an object, or a user sign-in without an email.
    InvalidEvent,
    /// The broker cannot be reached, or cannot answer now (its store is down, it throttles).
    Unavailable,
    /// No answer within the deadline.
    Timeout,
    /// The broker refused the call: a misconfigured key or role, or claims it does not accept.
    Rejected,
    /// Anything else.
    Internal,
}

impl TriggerErrorKind {
    /// Returns the `errorType` reported to Lambda.
    pub fn error_type(self) -> &'static str {
        match self {
            Self::InvalidEvent => "TokenBroker.InvalidEvent",
            Self::Unavailable => "TokenBroker.Unavailable",
            Self::Timeout => "TokenBroker.Timeout",
            Self::Rejected => "TokenBroker.Rejected",
            Self::Internal => "TokenBroker.Internal",
        }
    }

    /// Returns the message Cognito may show the user: fixed text, nothing from the request.
    pub fn user_message(self) -> &'static str {
        match self {
            Self::Unavailable | Self::Timeout => {
                "Sign-in is temporarily unavailable. Please try again in a moment."
            }
            Self::InvalidEvent | Self::Rejected | Self::Internal => {
                "Sign-in could not be completed. Please contact support if this persists."
            }
        }
    }

    /// Whether trying again may succeed (Cognito retries a failed trigger up to 3 times).
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Unavailable | Self::Timeout)
    }
}

/// A failed invocation. `Display` is the detail for our logs; the Lambda error is
/// [`TriggerErrorKind::user_message`].
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct TriggerError {
    kind: TriggerErrorKind,
    detail: String,
    #[source]
    source: Option<ClientError>,
}

impl TriggerError {
    /// Returns an error of `kind` with a (secret-free) detail for the logs.
    pub fn new(kind: TriggerErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            source: None,
        }
    }

    /// Returns the error's class.
    pub fn kind(&self) -> TriggerErrorKind {
        self.kind
    }
}

impl From<ClientError> for TriggerError {
    fn from(err: ClientError) -> Self {
        let kind = match err.kind() {
            ClientErrorKind::Unavailable | ClientErrorKind::ResourceExhausted => {
                TriggerErrorKind::Unavailable
            }
            ClientErrorKind::DeadlineExceeded => TriggerErrorKind::Timeout,
            ClientErrorKind::InvalidArgument
            | ClientErrorKind::Unauthenticated
            | ClientErrorKind::PermissionDenied
            | ClientErrorKind::FailedPrecondition => TriggerErrorKind::Rejected,
            ClientErrorKind::Internal => TriggerErrorKind::Internal,
        };
        Self {
            kind,
            detail: format!("IssueTokens failed ({:?}): {}", err.code(), err.message()),
            source: Some(err),
        }
    }
}

impl From<TriggerError> for Diagnostic {
    fn from(err: TriggerError) -> Self {
        Self {
            error_type: err.kind.error_type().to_owned(),
            error_message: err.kind.user_message().to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnostic_carries_only_the_user_safe_message() {
        let err = TriggerError::new(TriggerErrorKind::Rejected, "detail for logs: tbk_secret");
        let diagnostic = Diagnostic::from(err);
        assert_eq!(diagnostic.error_type, "TokenBroker.Rejected");
        assert!(!diagnostic.error_message.contains("detail"));
        assert!(!diagnostic.error_message.contains("tbk_"));
    }

    #[test]
    fn every_kind_has_a_distinct_type_and_a_plain_message() {
        let kinds = [
            TriggerErrorKind::InvalidEvent,
            TriggerErrorKind::Unavailable,
            TriggerErrorKind::Timeout,
            TriggerErrorKind::Rejected,
            TriggerErrorKind::Internal,
        ];
        let mut types: Vec<_> = kinds.iter().map(|k| k.error_type()).collect();
        types.dedup();
        assert_eq!(types.len(), kinds.len());
        for kind in kinds {
            // Plain sentences: safe in a URL query string and in a sign-in page.
            assert!(
                kind.user_message()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || " .-".contains(c)),
                "{kind:?}"
            );
        }
        assert!(TriggerErrorKind::Timeout.is_retryable());
        assert!(!TriggerErrorKind::Rejected.is_retryable());
    }
}
