//! How a run ends: the exit code per error class, and the failure (code name and message)
//! printed on stderr. Scripts branch on these, so they are part of the interface (`--help`
//! documents them).

use std::process::ExitCode;

use tokenbroker_client::{ClientError, ClientErrorKind, Code};

/// The exit codes, one per error class (documented in `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Success = 0,
    /// 1: anything not listed below.
    Other = 1,
    /// 2: the command line or its input is wrong.
    Usage = 2,
    /// 3: the broker refused the request's content.
    InvalidArgument = 3,
    /// 4: no, or a bad, credential.
    Unauthenticated = 4,
    /// 5: the credential lacks the role.
    PermissionDenied = 5,
    /// 6: the broker cannot answer now.
    Unavailable = 6,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

impl From<ClientErrorKind> for Exit {
    fn from(kind: ClientErrorKind) -> Self {
        match kind {
            ClientErrorKind::InvalidArgument => Exit::InvalidArgument,
            ClientErrorKind::Unauthenticated => Exit::Unauthenticated,
            ClientErrorKind::PermissionDenied => Exit::PermissionDenied,
            ClientErrorKind::Unavailable
            | ClientErrorKind::DeadlineExceeded
            | ClientErrorKind::ResourceExhausted => Exit::Unavailable,
            ClientErrorKind::FailedPrecondition | ClientErrorKind::Internal => Exit::Other,
        }
    }
}

/// A failed command: its exit code, a code name and a (secret-free) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    exit: Exit,
    code: &'static str,
    message: String,
}

impl Failure {
    /// A failure with `exit`, the code name `code` and `message`.
    pub(crate) fn new(exit: Exit, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            exit,
            code,
            message: message.into(),
        }
    }

    /// A usage failure (exit 2): the command line or its input is wrong.
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, "USAGE", message)
    }

    /// Returns the exit code.
    pub fn exit(&self) -> Exit {
        self.exit
    }

    /// Returns the code name: a gRPC code such as `PERMISSION_DENIED`, or `USAGE`,
    /// `NOT_SERVING`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Returns the message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        Self {
            exit: err.kind().into(),
            code: code_name(err.code()),
            message: err.message().to_owned(),
        }
    }
}

/// Returns the canonical name of a gRPC code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_map_to_documented_exit_codes() {
        let cases = [
            (ClientErrorKind::InvalidArgument, 3),
            (ClientErrorKind::Unauthenticated, 4),
            (ClientErrorKind::PermissionDenied, 5),
            (ClientErrorKind::Unavailable, 6),
            (ClientErrorKind::DeadlineExceeded, 6),
            (ClientErrorKind::ResourceExhausted, 6),
            (ClientErrorKind::FailedPrecondition, 1),
            (ClientErrorKind::Internal, 1),
        ];
        for (kind, code) in cases {
            assert_eq!(Exit::from(kind) as u8, code, "{kind:?}");
        }
        let failure = Failure::from(ClientError::from(tonic::Status::permission_denied("no")));
        assert_eq!(failure.code(), "PERMISSION_DENIED");
        assert_eq!(failure.exit(), Exit::PermissionDenied);
    }
}
