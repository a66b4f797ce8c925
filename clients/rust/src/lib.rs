//! A typed client for the tokenbroker gRPC API.
//!
//! [`Client`] wraps the generated stub with what every caller needs: the API key sent as
//! `authorization: Bearer …` (marked sensitive, never printed), a deadline on every call (sent
//! as `grpc-timeout` and enforced on this side too, so a broker that accepts a connection and
//! then hangs cannot hold the caller), and [`ClientError`], which maps gRPC status codes back to
//! the broker's error classes. Minted secrets come back wrapped in [`SecretString`].
//!
//! Every channel to a broker is built by [`BrokerEndpoint`] (the `endpoint` module): with the
//! `tls` feature, `https://` endpoints use TLS (rustls with ring) and the platform's root
//! certificates; `SSL_CERT_FILE` can name a bundle with a private CA. [`TlsOptions`] and
//! [`Client::connect_tls`] trust a given CA instead and present a client certificate (mTLS).
//! With the `health` feature, [`Client::check_health`] calls grpc.health.v1 `Check`.

mod endpoint;
#[cfg(feature = "health")]
mod health;

use std::{fmt, future::Future, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use tonic::{
    Request, Response, Status,
    metadata::{Ascii, MetadataKey, MetadataValue},
    transport::Channel,
};

#[cfg(feature = "tls")]
pub use crate::endpoint::TlsOptions;
pub use crate::endpoint::{BrokerEndpoint, DEFAULT_CONNECT_TIMEOUT, EndpointError};
#[cfg(feature = "health")]
pub use crate::health::ServingStatus;
pub use tokenbroker_proto::v1 as pb;
use tokenbroker_proto::v1::token_broker_client::TokenBrokerClient;
/// The gRPC status code a [`ClientError`] carries, re-exported so callers need not name tonic.
pub use tonic::Code;

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
    retry_after: Option<Duration>,
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

    /// For a throttled call (`RESOURCE_EXHAUSTED`), how long to wait before a retry can
    /// succeed, from the status's `google.rpc.RetryInfo`.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    fn config(message: impl Into<String>) -> Self {
        Self {
            kind: ClientErrorKind::InvalidArgument,
            code: Code::InvalidArgument,
            message: message.into(),
            retry_after: None,
        }
    }

    fn deadline(timeout: Duration) -> Self {
        Self {
            kind: ClientErrorKind::DeadlineExceeded,
            code: Code::DeadlineExceeded,
            message: format!(
                "no answer from the broker within {} ms",
                timeout.as_millis()
            ),
            retry_after: None,
        }
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        // A status that carries a source error was made on this side, from a connection that
        // broke under the call (a TLS handshake the broker rejected after the client thought it
        // done, a reset): tonic reports those as UNKNOWN "transport error" or CANCELLED
        // "operation was canceled". The broker could not be reached. (Statuses the broker sends
        // have no source; tonic's own timeout is handled below.)
        let timed_out = status.message().contains("Timeout expired");
        if matches!(status.code(), Code::Unknown | Code::Cancelled)
            && !timed_out
            && let Some(cause) = std::error::Error::source(&status)
        {
            let mut message = format!("cannot reach the broker: {cause}");
            let mut next = cause.source();
            while let Some(inner) = next {
                message.push_str(&format!(": {inner}"));
                next = inner.source();
            }
            return Self {
                kind: ClientErrorKind::Unavailable,
                code: Code::Unavailable,
                message,
                retry_after: None,
            };
        }
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
            retry_after: tokenbroker_proto::rpc::retry_delay(status.details()),
        }
    }
}

impl From<tonic::transport::Error> for ClientError {
    fn from(err: tonic::transport::Error) -> Self {
        Self {
            kind: ClientErrorKind::Unavailable,
            code: Code::Unavailable,
            message: format!("cannot reach the broker: {err}"),
            retry_after: None,
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
        retry_after: None,
    })?;
    Ok(IssuedToken {
        token_id: token.token_id,
        secret: SecretString::from(token.secret),
        expires_at: token.expires_at,
    })
}

/// Settings for one call that add to, or override, the client's: a deadline and extra metadata
/// (such as a W3C `traceparent`).
#[derive(Clone, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    metadata: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
}

impl fmt::Debug for CallOptions {
    // Values are left out: metadata is free-form and may be sensitive.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&str> = self.metadata.iter().map(|(key, _)| key.as_str()).collect();
        f.debug_struct("CallOptions")
            .field("timeout", &self.timeout)
            .field("metadata_keys", &keys)
            .finish()
    }
}

impl CallOptions {
    /// Returns options that change nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets this call's deadline instead of the client's.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends `key: value` with this call, replacing a value the client would send under the
    /// same key.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` if the key is not a valid lowercase ASCII metadata key, is reserved
    /// (`grpc-…`), or the value is not printable ASCII.
    pub fn with_metadata(mut self, key: &str, value: &str) -> ClientResult<Self> {
        let name: MetadataKey<Ascii> = key
            .parse()
            .map_err(|_| ClientError::config("invalid metadata key"))?;
        if name.as_str().starts_with("grpc-") || name.as_str() != key {
            return Err(ClientError::config(
                "metadata keys must be lowercase and not start with grpc-",
            ));
        }
        let value: MetadataValue<Ascii> = value
            .parse()
            .map_err(|_| ClientError::config("metadata values must be printable ASCII"))?;
        self.metadata.push((name, value));
        Ok(self)
    }
}

/// A connection to a broker, with a credential and a deadline. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: TokenBrokerClient<Channel>,
    /// The same channel, for the services beside the broker's own (grpc.health.v1).
    #[cfg(feature = "health")]
    channel: Channel,
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
        let channel = BrokerEndpoint::parse(endpoint)?.connect().await?;
        Ok(Self::from_channel(channel))
    }

    /// Returns a client that connects on first use (for cold starts that should not wait).
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a malformed endpoint.
    pub fn connect_lazy(endpoint: &str) -> ClientResult<Self> {
        let channel = BrokerEndpoint::parse(endpoint)?.connect_lazy()?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel (see [`BrokerEndpoint`] for one with other settings).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: TokenBrokerClient::new(channel.clone()),
            #[cfg(feature = "health")]
            channel,
            authorization: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Connects to an `https://` endpoint with `tls` (a private CA, a client certificate).
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a malformed or non-`https` endpoint, `Unavailable` if it cannot
    /// be reached or the handshake fails.
    #[cfg(feature = "tls")]
    pub async fn connect_tls(endpoint: &str, tls: &TlsOptions) -> ClientResult<Self> {
        let channel = BrokerEndpoint::parse(endpoint)?
            .with_tls(tls)?
            .connect()
            .await?;
        Ok(Self::from_channel(channel))
    }

    /// Like [`Client::connect_tls`], connecting on first use.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for a malformed or non-`https` endpoint.
    #[cfg(feature = "tls")]
    pub fn connect_tls_lazy(endpoint: &str, tls: &TlsOptions) -> ClientResult<Self> {
        let channel = BrokerEndpoint::parse(endpoint)?
            .with_tls(tls)?
            .connect_lazy()?;
        Ok(Self::from_channel(channel))
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
        self.request_with(message, &CallOptions::default())
    }

    fn request_with<T>(&self, message: T, options: &CallOptions) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(options.timeout.unwrap_or(self.timeout));
        let metadata = request.metadata_mut();
        if let Some(value) = &self.authorization {
            metadata.insert("authorization", value.clone());
        }
        for (key, value) in &options.metadata {
            metadata.insert(key.clone(), value.clone());
        }
        request
    }

    /// Awaits `call` for at most the request's deadline. `grpc-timeout` only asks the server to
    /// give up; this makes the client give up too when the server (or the connection) hangs.
    async fn bounded<T>(
        timeout: Duration,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> ClientResult<T> {
        match tokio::time::timeout(timeout, call).await {
            Ok(response) => Ok(response?.into_inner()),
            Err(_) => Err(ClientError::deadline(timeout)),
        }
    }

    /// Calls IssueTokens.
    ///
    /// # Errors
    ///
    /// The broker's error, mapped; see the proto.
    pub async fn issue_tokens(&self, request: pb::IssueTokensRequest) -> ClientResult<TokenPair> {
        self.issue_tokens_with(request, &CallOptions::default())
            .await
    }

    /// Calls IssueTokens with per-call `options` (deadline, extra metadata).
    ///
    /// # Errors
    ///
    /// The broker's error, mapped; see the proto. `DeadlineExceeded` when no answer arrives in
    /// time.
    pub async fn issue_tokens_with(
        &self,
        request: pb::IssueTokensRequest,
        options: &CallOptions,
    ) -> ClientResult<TokenPair> {
        let timeout = options.timeout.unwrap_or(self.timeout);
        let mut inner = self.inner.clone();
        let response = Self::bounded(
            timeout,
            inner.issue_tokens(self.request_with(request, options)),
        )
        .await?;
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
        let mut inner = self.inner.clone();
        let response =
            Self::bounded(self.timeout, inner.refresh_tokens(self.request(request))).await?;
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
        let mut inner = self.inner.clone();
        Self::bounded(self.timeout, inner.revoke(self.request(request))).await
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
        let mut inner = self.inner.clone();
        Self::bounded(self.timeout, inner.introspect(self.request(request))).await
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
        let mut inner = self.inner.clone();
        Self::bounded(self.timeout, inner.list_tokens(self.request(request))).await
    }

    /// Introspects a secret; a convenience over [`Client::introspect`]. An active refresh
    /// token is `active` too (read `kind`); a resource server wants
    /// [`Client::introspect_access_secret`].
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

    /// Introspects a secret as a resource server does (`access_only`): only an active access
    /// token is `active`; a refresh token gets the bare `active = false` of an unknown one.
    ///
    /// # Errors
    ///
    /// As [`Client::introspect`].
    pub async fn introspect_access_secret(
        &self,
        secret: &SecretString,
    ) -> ClientResult<pb::IntrospectResponse> {
        self.introspect(pb::IntrospectRequest {
            token: secret.expose_secret().to_owned(),
            token_type_hint: pb::TokenTypeHint::AccessToken as i32,
            access_only: true,
            ..Default::default()
        })
        .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Returns the address of a listener that accepts connections and never answers, not even
    /// the HTTP/2 handshake, and the task that holds them (abort it to close them).
    pub(crate) async fn hung_broker() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        (addr, holder)
    }

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
    async fn hung_broker_hits_the_client_side_deadline() {
        let (addr, holder) = crate::tests::hung_broker().await;
        let client = Client::connect_lazy(&format!("http://{addr}"))
            .unwrap()
            .with_timeout(Duration::from_secs(30));
        let started = std::time::Instant::now();
        let options = CallOptions::new().with_timeout(Duration::from_millis(200));
        let err = client
            .issue_tokens_with(pb::IssueTokensRequest::default(), &options)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::DeadlineExceeded);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "per-call deadline wins"
        );
        let err = client
            .with_timeout(Duration::from_millis(100))
            .introspect(pb::IntrospectRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::DeadlineExceeded);
        holder.abort();
    }

    #[tokio::test]
    async fn call_options_add_metadata_next_to_the_api_key() {
        let client = Client::connect_lazy("http://127.0.0.1:1")
            .unwrap()
            .with_api_key(&SecretString::from("tbk_key"))
            .unwrap();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let options = CallOptions::new()
            .with_timeout(Duration::from_millis(1500))
            .with_metadata("traceparent", traceparent)
            .unwrap();
        let request = client.request_with((), &options);
        let metadata = request.metadata();
        assert_eq!(metadata.get("traceparent").unwrap(), traceparent);
        assert_eq!(metadata.get("authorization").unwrap(), "Bearer tbk_key");
        assert_eq!(metadata.get("grpc-timeout").unwrap(), "1500000u");
        assert!(!format!("{options:?}").contains("4bf92f35"), "{options:?}");
    }

    #[test]
    fn reserved_or_malformed_metadata_is_refused() {
        for (key, value) in [
            ("grpc-timeout", "1S"),
            ("Traceparent", "x"),
            ("bad key", "x"),
            ("traceparent", "line\nbreak"),
        ] {
            let err = CallOptions::new().with_metadata(key, value).unwrap_err();
            assert_eq!(err.kind(), ClientErrorKind::InvalidArgument, "{key}");
        }
    }

    #[tokio::test]
    async fn endpoint_scheme_must_be_http_or_https() {
        let err = Client::connect_lazy("ftp://127.0.0.1:1").unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::InvalidArgument);
        let https = Client::connect_lazy("https://127.0.0.1:1");
        if cfg!(feature = "tls") {
            https.expect("tls feature: https endpoints are accepted");
        } else {
            let err = https.unwrap_err();
            assert!(err.message().contains("tls"), "{}", err.message());
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
