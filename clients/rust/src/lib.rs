//! A typed client for the tokenbroker gRPC API.
//!
//! [`Client`] wraps the generated stub with what every caller needs: the API key sent as
//! `authorization: Bearer …` (marked sensitive, never printed), a deadline on every call, and
//! [`ClientError`], which maps gRPC status codes back to the broker's error classes. Minted
//! secrets come back wrapped in [`SecretString`].

use std::{fmt, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

pub use tokenbroker_proto::v1 as pb;
use tokenbroker_proto::v1::token_broker_client::TokenBrokerClient;

/// Deadline of every call unless [`Client::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The class of a failed call, mirroring the broker's error table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrorKind {
    /// The request was malformed (`INVALID_ARGUMENT`).
    InvalidArgument,
    /// No, or a bad, credential; or an inactive refresh token (`UNAUTHENTICATED`).
    Unauthenticated,
    /// The credential lacks the role, or the token is another client's (`PERMISSION_DENIED`).
    PermissionDenied,
    /// The broker is not configured for this call (`FAILED_PRECONDITION`).
    FailedPrecondition,
    /// The caller is over its budget (`RESOURCE_EXHAUSTED`).
    ResourceExhausted,
    /// The broker or its store cannot answer now, or cannot be reached (`UNAVAILABLE`).
    Unavailable,
    /// The deadline passed (`DEADLINE_EXCEEDED`, or tonic's `CANCELLED` on timeout).
    DeadlineExceeded,
    /// Anything else: a bug or misconfiguration on either side.
    Internal,
}

/// A failed call: its class, the gRPC code and the broker's (secret-free) message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ClientError {
    kind: ClientErrorKind,
    code: Code,
    message: String,
}

impl ClientError {
    /// Returns the error's class.
    pub fn kind(&self) -> ClientErrorKind {
        self.kind
    }

    /// Returns the gRPC status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// Returns the broker's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn config(message: impl Into<String>) -> Self {
        Self {
            kind: ClientErrorKind::InvalidArgument,
            code: Code::InvalidArgument,
            message: message.into(),
        }
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        let kind = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ClientErrorKind::InvalidArgument,
            Code::Unauthenticated => ClientErrorKind::Unauthenticated,
            Code::PermissionDenied => ClientErrorKind::PermissionDenied,
            Code::FailedPrecondition => ClientErrorKind::FailedPrecondition,
            Code::ResourceExhausted => ClientErrorKind::ResourceExhausted,
            Code::Unavailable => ClientErrorKind::Unavailable,
            Code::DeadlineExceeded => ClientErrorKind::DeadlineExceeded,
            // tonic reports its own timeout layer firing as CANCELLED "Timeout expired".
            Code::Cancelled if status.message().contains("Timeout expired") => {
                ClientErrorKind::DeadlineExceeded
            }
            _ => ClientErrorKind::Internal,
        };
        Self {
            kind,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

impl From<tonic::transport::Error> for ClientError {
    fn from(err: tonic::transport::Error) -> Self {
        Self {
            kind: ClientErrorKind::Unavailable,
            code: Code::Unavailable,
            message: format!("cannot reach the broker: {err}"),
        }
    }
}

/// Result of a client call.
pub type ClientResult<T> = Result<T, ClientError>;

/// A token just minted, with its secret.
pub struct IssuedToken {
    /// The public id.
    pub token_id: String,
    /// The secret.
    pub secret: SecretString,
    /// When it stops being active.
    pub expires_at: Option<prost_types::Timestamp>,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token_id", &self.token_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A refresh and access token pair, as IssueTokens and RefreshTokens return it.
#[derive(Debug)]
pub struct TokenPair {
    /// The account.
    pub account_id: String,
    /// The session.
    pub family_id: String,
    /// The refresh token.
    pub refresh: IssuedToken,
    /// The access token.
    pub access: IssuedToken,
    /// Whether an earlier call with the same idempotency key minted it (IssueTokens only).
    pub replayed: bool,
}

fn issued(token: Option<pb::IssuedToken>) -> ClientResult<IssuedToken> {
    let token = token.ok_or_else(|| ClientError {
        kind: ClientErrorKind::Internal,
        code: Code::Internal,
        message: "the broker's answer lacks a token".into(),
    })?;
    Ok(IssuedToken {
        token_id: token.token_id,
        secret: SecretString::from(token.secret),
        expires_at: token.expires_at,
    })
}

/// A connection to a broker, with a credential and a deadline. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: TokenBrokerClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
    timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("has_api_key", &self.authorization.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `endpoint` (such as `http://127.0.0.1:50051`) and waits for the connection.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a malformed endpoint, `Unavailable` if it cannot be reached.
    pub async fn connect(endpoint: &str) -> ClientResult<Self> {
        let channel = Self::endpoint(endpoint)?.connect().await?;
        Ok(Self::from_channel(channel))
    }

    /// Returns a client that connects on first use (for cold starts that should not wait).
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a malformed endpoint.
    pub fn connect_lazy(endpoint: &str) -> ClientResult<Self> {
        Ok(Self::from_channel(Self::endpoint(endpoint)?.connect_lazy()))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: TokenBrokerClient::new(channel),
            authorization: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    fn endpoint(endpoint: &str) -> ClientResult<Endpoint> {
        Endpoint::from_shared(endpoint.to_owned())
            .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
            .map_err(|_| ClientError::config("the broker endpoint is not a valid URI"))
    }

    /// Sends `key` as `authorization: Bearer <key>` on every call.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` if the key is not printable ASCII.
    pub fn with_api_key(mut self, key: &SecretString) -> ClientResult<Self> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", key.expose_secret())
            .parse()
            .map_err(|_| ClientError::config("the api key is not printable ASCII"))?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// Sets the deadline of every call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// Calls IssueTokens.
    ///
    /// # Errors
    ///
    /// The broker's error, mapped; see the proto.
    pub async fn issue_tokens(&self, request: pb::IssueTokensRequest) -> ClientResult<TokenPair> {
        let response = self
            .inner
            .clone()
            .issue_tokens(self.request(request))
            .await?
            .into_inner();
        Ok(TokenPair {
            account_id: response.account_id,
            family_id: response.family_id,
            refresh: issued(response.refresh)?,
            access: issued(response.access)?,
            replayed: response.replayed,
        })
    }

    /// Calls RefreshTokens.
    ///
    /// # Errors
    ///
    /// The broker's error, mapped; see the proto.
    pub async fn refresh_tokens(
        &self,
        request: pb::RefreshTokensRequest,
    ) -> ClientResult<TokenPair> {
        let response = self
            .inner
            .clone()
            .refresh_tokens(self.request(request))
            .await?
            .into_inner();
        Ok(TokenPair {
            account_id: response.account_id,
            family_id: response.family_id,
            refresh: issued(response.refresh)?,
            access: issued(response.access)?,
            replayed: false,
        })
    }

    /// Calls Revoke.
    ///
    /// # Errors
    ///
    /// The broker's error, mapped; see the proto.
    pub async fn revoke(&self, request: pb::RevokeRequest) -> ClientResult<pb::RevokeResponse> {
        Ok(self
            .inner
            .clone()
            .revoke(self.request(request))
            .await?
            .into_inner())
    }

    /// Calls Introspect.
    ///
    /// # Errors
    ///
    /// The broker's error, mapped; see the proto. An inactive token is not an error.
    pub async fn introspect(
        &self,
        request: pb::IntrospectRequest,
    ) -> ClientResult<pb::IntrospectResponse> {
        Ok(self
            .inner
            .clone()
            .introspect(self.request(request))
            .await?
            .into_inner())
    }

    /// Calls ListTokens.
    ///
    /// # Errors
    ///
    /// The broker's error, mapped; see the proto.
    pub async fn list_tokens(
        &self,
        request: pb::ListTokensRequest,
    ) -> ClientResult<pb::ListTokensResponse> {
        Ok(self
            .inner
            .clone()
            .list_tokens(self.request(request))
            .await?
            .into_inner())
    }

    /// Introspects a secret; a convenience over [`Client::introspect`].
    ///
    /// # Errors
    ///
    /// As [`Client::introspect`].
    pub async fn introspect_secret(
        &self,
        secret: &SecretString,
    ) -> ClientResult<pb::IntrospectResponse> {
        self.introspect(pb::IntrospectRequest {
            token: secret.expose_secret().to_owned(),
            ..Default::default()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_kinds() {
        let cases = [
            (
                Status::invalid_argument("x"),
                ClientErrorKind::InvalidArgument,
            ),
            (
                Status::unauthenticated("x"),
                ClientErrorKind::Unauthenticated,
            ),
            (
                Status::permission_denied("x"),
                ClientErrorKind::PermissionDenied,
            ),
            (
                Status::failed_precondition("x"),
                ClientErrorKind::FailedPrecondition,
            ),
            (
                Status::resource_exhausted("x"),
                ClientErrorKind::ResourceExhausted,
            ),
            (Status::unavailable("x"), ClientErrorKind::Unavailable),
            (
                Status::deadline_exceeded("x"),
                ClientErrorKind::DeadlineExceeded,
            ),
            (
                Status::cancelled("Timeout expired"),
                ClientErrorKind::DeadlineExceeded,
            ),
            (Status::internal("x"), ClientErrorKind::Internal),
            (Status::unknown("x"), ClientErrorKind::Internal),
        ];
        for (status, kind) in cases {
            assert_eq!(ClientError::from(status).kind(), kind);
        }
    }

    #[tokio::test]
    async fn debug_never_shows_the_api_key() {
        let client = Client::connect_lazy("http://127.0.0.1:1")
            .unwrap()
            .with_api_key(&SecretString::from("tbk_supersecret"))
            .unwrap();
        assert!(!format!("{client:?}").contains("supersecret"));
    }
}
