//! The gRPC adapter: implements the generated `TokenBroker` trait over [`Broker`].
//!
//! Each method authenticates the caller, converts the request into domain types, calls the
//! service under the call's deadline and converts the answer. This is the only module that
//! builds a `tonic::Status`, and [`From<BrokerError> for Status`] is the only place domain errors
//! become one. Each call runs in the RPC span that [`Traced`] opens around the service.

pub mod metered;
mod trace;
pub mod web;

use std::{future::Future, sync::Arc, time::Duration};

use secrecy::SecretString;
use tokenbroker_proto::v1::{
    self as pb,
    token_broker_server::{TokenBroker, TokenBrokerServer},
};
use tonic::{
    Code, Request, Response, Status,
    codegen::{BoxFuture, Context, Poll, Service, http},
    metadata::MetadataMap,
    server::NamedService,
};
use tracing::{Span, error, warn};

use crate::{
    domain::admission::{InFlight, Limiter},
    domain::error::{BrokerError, BrokerErrorKind},
    domain::service::{
        AccountRef, AssertedClaims, Broker, IssueRequest, ListRequest, RefreshRequest, RevokeBy,
        Subject,
    },
    identity::{Authenticator, Caller},
    model::{
        AccountId, Email, FamilyId, InvalidArgument, MAX_GROUPS, MintedPair, MintedToken, TokenId,
        TokenKind, TokenState, UnixMicros, parse_name, validate_metadata,
    },
    obs::context::{self, TRACEPARENT, TRACESTATE},
};

pub use self::trace::Traced;

/// The `TokenBroker` gRPC service.
#[derive(Debug, Clone)]
pub struct GrpcAdapter {
    broker: Arc<Broker>,
    auth: Arc<Authenticator>,
    limits: Arc<Limiter>,
    request_timeout: Duration,
}

impl GrpcAdapter {
    /// Builds the adapter; `request_timeout` caps every call's deadline.
    pub fn new(
        broker: Arc<Broker>,
        auth: Arc<Authenticator>,
        limits: Arc<Limiter>,
        request_timeout: Duration,
    ) -> Self {
        Self {
            broker,
            auth,
            limits,
            request_timeout,
        }
    }

    /// Admits a call: takes an in-flight slot, authenticates the caller and charges its rate
    /// limit (the client network's, for a call without a credential). A failed authentication
    /// is charged to the client network, which is refused before authenticating once it has
    /// failed too often. The slot is held until the returned [`InFlight`] is dropped, at the
    /// end of the call.
    ///
    /// A direct-exchange caller (a Cognito ID token as the credential) is refused here with
    /// `PERMISSION_DENIED`: its token is a credential for `IssueTokens` alone, which admits
    /// with [`GrpcAdapter::admit_issue`].
    async fn admit<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(InFlight, Option<Arc<Caller>>), Status> {
        self.admit_as(request, false).await
    }

    /// Admits an `IssueTokens` call: as [`GrpcAdapter::admit`], direct-exchange callers
    /// included (the domain checks that they exchange their own token).
    async fn admit_issue<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(InFlight, Option<Arc<Caller>>), Status> {
        self.admit_as(request, true).await
    }

    async fn admit_as<T>(
        &self,
        request: &Request<T>,
        direct_exchange: bool,
    ) -> Result<(InFlight, Option<Arc<Caller>>), Status> {
        let in_flight = self.limits.enter()?;
        let client = self.limits.client(
            request.remote_addr().map(|addr| addr.ip()),
            request
                .metadata()
                .get("x-forwarded-for")
                .and_then(|value| value.to_str().ok()),
        );
        self.limits.check_failures(client)?;
        let caller = match self.caller(request).await {
            Ok(caller) => caller,
            Err(status) => {
                if status.code() == Code::Unauthenticated {
                    self.limits.charge_failure(client);
                }
                return Err(status);
            }
        };
        if !direct_exchange && let Some(caller) = caller.as_deref() {
            // Before the user's own bucket, which is for exchanges: a page that misuses its
            // ID token is charged like a failed authentication, to its network.
            if let Err(err) = caller.refuse_direct_exchange() {
                self.limits.charge_failure(client);
                return Err(BrokerError::from(err).into());
            }
        }
        self.limits.charge(caller.as_deref(), client)?;
        Ok((in_flight, caller))
    }

    /// Authenticates the caller from the `authorization` metadata and records it on the span.
    /// Without that header, a verified client certificate (mTLS) mapped in `cert_callers` is
    /// the caller; an unmapped one is anonymous.
    ///
    /// Async because a Cognito access token may need its pool's keys fetched; bounded by the
    /// call's deadline like the work itself.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Option<Arc<Caller>>, Status> {
        let metadata = request.metadata();
        let header = match metadata.get("authorization") {
            Some(value) => Some(value.to_str().map_err(|_| {
                Status::from(BrokerError::Unauthenticated(
                    "the authorization header is not valid ASCII",
                ))
            })?),
            None => None,
        };
        let mut caller = self
            .within(metadata, async {
                Ok(self.auth.authenticate(header).await?)
            })
            .await?;
        if header.is_none() {
            caller = request
                .peer_certs()
                .and_then(|certs| self.auth.certificate_caller(certs.first()?.as_ref()));
        }
        Span::current().record(
            "caller",
            caller.as_deref().map_or("anonymous", |c| c.name.as_str()),
        );
        Ok(caller)
    }

    /// Runs `work` under the call's deadline: the client's `grpc-timeout`, capped by the
    /// configured request timeout.
    async fn within<T>(
        &self,
        metadata: &MetadataMap,
        work: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, Status> {
        let deadline = client_timeout(metadata)
            // tonic's own timeout layer answers CANCELLED at the client's deadline; firing a
            // little earlier lets this adapter answer DEADLINE_EXCEEDED, as the proto promises.
            .map(|t| t.saturating_sub((t / 10).min(Duration::from_millis(10))))
            .map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let at = tokio::time::Instant::now() + deadline;
        let header = |name| metadata.get(name).and_then(|v| v.to_str().ok());
        // Boxed once here: the service's futures are large, and each wrapper below would
        // otherwise copy the whole state machine again on every call.
        let work = context::scope(
            context::incoming(header(TRACEPARENT), header(TRACESTATE)),
            crate::model::deadline::scope(at, Box::pin(work)),
        );
        match tokio::time::timeout_at(at, work).await {
            Ok(result) => result.map_err(Status::from),
            Err(_) => Err(BrokerError::DeadlineExceeded.into()),
        }
    }
}

#[tonic::async_trait]
impl TokenBroker for GrpcAdapter {
    async fn issue_tokens(
        &self,
        request: Request<pb::IssueTokensRequest>,
    ) -> Result<Response<pb::IssueTokensResponse>, Status> {
        let (_in_flight, caller) = self.admit_issue(&request).await?;
        let (metadata, _, message) = request.into_parts();
        let parsed = issue_request(message)?;
        let issued = self
            .within(&metadata, self.broker.issue(caller.as_deref(), parsed))
            .await?;
        let pair = &issued.pair;
        record_pair(pair);
        Ok(Response::new(pb::IssueTokensResponse {
            account_id: pair.account_id.to_string(),
            family_id: pair.family_id.to_string(),
            refresh: Some(issued_token(&pair.refresh)),
            access: Some(issued_token(&pair.access)),
            replayed: issued.replayed,
        }))
    }

    async fn refresh_tokens(
        &self,
        request: Request<pb::RefreshTokensRequest>,
    ) -> Result<Response<pb::RefreshTokensResponse>, Status> {
        let (_in_flight, _) = self.admit(&request).await?;
        let (metadata, _, message) = request.into_parts();
        let parsed = RefreshRequest {
            refresh_token: SecretString::from(message.refresh_token),
            access_ttl_seconds: message.access_ttl_seconds,
            refresh_ttl_seconds: message.refresh_ttl_seconds,
            client_id: parse_name("client_id", &message.client_id)?,
        };
        let pair = self.within(&metadata, self.broker.refresh(parsed)).await?;
        record_pair(&pair);
        Ok(Response::new(refresh_response(&pair)))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        use pb::revoke_request::Target;
        let (_in_flight, caller) = self.admit(&request).await?;
        let (metadata, _, message) = request.into_parts();
        let target = match message.target {
            Some(Target::Token(secret)) => RevokeBy::Secret {
                secret: SecretString::from(secret),
                client_id: parse_name("client_id", &message.client_id)?,
            },
            Some(Target::TokenId(id)) => {
                RevokeBy::TokenId(record("token_id", TokenId::parse(&id)?))
            }
            Some(Target::FamilyId(id)) => {
                RevokeBy::FamilyId(record("family_id", FamilyId::parse(&id)?))
            }
            Some(Target::AccountId(id)) => {
                RevokeBy::AccountId(record("account_id", AccountId::parse(&id)?))
            }
            Some(Target::Email(email)) => RevokeBy::Email(Email::parse(&email)?),
            None => {
                return Err(BrokerError::invalid(
                    "a target is required: token, token_id, family_id, account_id or email",
                )
                .into());
            }
        };
        let revoked_count = self
            .within(&metadata, self.broker.revoke(caller.as_deref(), target))
            .await?;
        Ok(Response::new(pb::RevokeResponse { revoked_count }))
    }

    async fn introspect(
        &self,
        request: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let (_in_flight, caller) = self.admit(&request).await?;
        let (metadata, _, message) = request.into_parts();
        let client_id = parse_name("client_id", &message.client_id)?;
        let secret = SecretString::from(message.token);
        let info = self
            .within(
                &metadata,
                self.broker.introspect(
                    caller.as_deref(),
                    &secret,
                    client_id.as_deref(),
                    message.access_only,
                ),
            )
            .await?;
        let Some(info) = info else {
            return Ok(Response::new(pb::IntrospectResponse::default()));
        };
        record("token_id", &info.id);
        record("account_id", &info.account_id);
        Ok(Response::new(pb::IntrospectResponse {
            active: true,
            token_id: info.id.to_string(),
            kind: token_kind(info.kind) as i32,
            account_id: info.account_id.to_string(),
            email: info.email.as_str().to_owned(),
            family_id: info.family_id.to_string(),
            issued_at: Some(timestamp(info.issued_at)),
            expires_at: Some(timestamp(info.expires_at)),
            client_id: info.client_id.unwrap_or_default(),
            cognito_sub: info.cognito_sub.unwrap_or_default(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        use pb::list_tokens_request::Account;
        let (_in_flight, caller) = self.admit(&request).await?;
        let (metadata, _, message) = request.into_parts();
        let account = match message.account {
            Some(Account::AccountId(id)) => AccountRef::Id(AccountId::parse(&id)?),
            Some(Account::Email(email)) => AccountRef::Email(Email::parse(&email)?),
            None => {
                return Err(
                    BrokerError::invalid("an account is required: account_id or email").into(),
                );
            }
        };
        let listed = self
            .within(
                &metadata,
                self.broker.list(
                    caller.as_deref(),
                    ListRequest {
                        account,
                        page_size: message.page_size,
                        page_token: message.page_token,
                        include_inactive: message.include_inactive,
                    },
                ),
            )
            .await?;
        if let Some(id) = &listed.account_id {
            record("account_id", id);
        }
        Ok(Response::new(pb::ListTokensResponse {
            account_id: listed
                .account_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            tokens: listed
                .page
                .tokens
                .into_iter()
                .map(|t| pb::TokenSummary {
                    token_id: t.id.to_string(),
                    kind: token_kind(t.kind) as i32,
                    family_id: t.family_id.to_string(),
                    parent_id: t.parent_id.map(|id| id.to_string()).unwrap_or_default(),
                    state: token_state(t.state) as i32,
                    issued_at: Some(timestamp(t.issued_at)),
                    expires_at: Some(timestamp(t.expires_at)),
                    revoked_at: t.revoked_at.map(timestamp),
                    replaced_by: t.replaced_by.map(|id| id.to_string()).unwrap_or_default(),
                    client_id: t.client_id.unwrap_or_default(),
                    metadata: t.metadata.into_iter().collect(),
                })
                .collect(),
            next_page_token: listed.next_page_token,
        }))
    }
}

/// The generated `TokenBroker` server with its request size limit. tonic answers a request
/// over `max_decoding_message_size` with `OUT_OF_RANGE`; this wrapper turns that answer into
/// `RESOURCE_EXHAUSTED`, the code the gRPC spec gives a message larger than the server accepts.
/// The broker itself never answers `OUT_OF_RANGE`.
#[derive(Debug, Clone)]
pub struct SizeLimited<S>(S);

impl SizeLimited<TokenBrokerServer<GrpcAdapter>> {
    /// Serves `adapter`, refusing request messages over `max_request_bytes`.
    pub fn new(adapter: GrpcAdapter, max_request_bytes: usize) -> Self {
        Self(TokenBrokerServer::new(adapter).max_decoding_message_size(max_request_bytes))
    }
}

impl<S: NamedService> NamedService for SizeLimited<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for SizeLimited<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let status = response.headers_mut().get_mut("grpc-status");
            if let Some(status) = status.filter(|s| s.as_bytes() == b"11") {
                *status = http::HeaderValue::from_static("8");
            }
            Ok(response)
        })
    }
}

/// An in-flight limit for the services beside TokenBroker (health, reflection), which
/// admission control does not see: a call over it is refused at once with
/// `RESOURCE_EXHAUSTED` rather than queued, so a flood of them cannot pile up work.
#[derive(Debug, Clone)]
pub struct InFlightLimit(Arc<tokio::sync::Semaphore>);

impl InFlightLimit {
    /// At most `max` calls at once, over every service it limits.
    pub fn new(max: usize) -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(max)))
    }

    /// Puts `service` under the limit.
    pub fn limit<S>(&self, service: S) -> InFlightLimited<S> {
        InFlightLimited {
            inner: service,
            slots: Arc::clone(&self.0),
        }
    }
}

/// A service under an [`InFlightLimit`]; each call holds a slot until its response ends.
#[derive(Debug, Clone)]
pub struct InFlightLimited<S> {
    inner: S,
    slots: Arc<tokio::sync::Semaphore>,
}

impl<S: NamedService> NamedService for InFlightLimited<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for InFlightLimited<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    // The slot is held until the response body ends, so a stream (health
                    // Watch, reflection) holds it for as long as it is open.
                    Ok(response.await?.map(|body| {
                        tonic::body::Body::new(http_body_util::BodyExt::map_frame(
                            body,
                            move |frame| {
                                let _held = &slot;
                                frame
                            },
                        ))
                    }))
                })
            }
            Err(_) => Box::pin(std::future::ready(Ok(Status::resource_exhausted(
                "too many health and reflection calls in flight",
            )
            .into_http()))),
        }
    }
}

impl From<InvalidArgument> for Status {
    fn from(err: InvalidArgument) -> Self {
        BrokerError::from(err).into()
    }
}

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        let code = match err.kind() {
            BrokerErrorKind::InvalidArgument => Code::InvalidArgument,
            BrokerErrorKind::Unauthenticated => Code::Unauthenticated,
            BrokerErrorKind::PermissionDenied => Code::PermissionDenied,
            BrokerErrorKind::FailedPrecondition => Code::FailedPrecondition,
            BrokerErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            BrokerErrorKind::ResourceExhausted => {
                let retry_after = err.retry_after().unwrap_or_default();
                let message = format!("{err}; retry after {} ms", retry_after.as_millis().max(1));
                let details = tokenbroker_proto::rpc::retry_details(
                    Code::ResourceExhausted as i32,
                    &message,
                    retry_after,
                );
                return Status::with_details(Code::ResourceExhausted, message, details.into());
            }
            BrokerErrorKind::Unavailable => {
                if let Some(message) = err.dependency_unavailable() {
                    warn!(reason = message, "dependency unavailable");
                    return Status::unavailable(message);
                }
                error!(error = ?err, "token store unavailable");
                return Status::unavailable("token store unavailable; retry with back-off");
            }
            BrokerErrorKind::Internal => {
                error!(error = ?err, "request failed");
                return Status::internal("internal error");
            }
        };
        Status::new(code, err.to_string())
    }
}

fn issue_request(message: pb::IssueTokensRequest) -> Result<IssueRequest, BrokerError> {
    use pb::issue_tokens_request::Subject as PbSubject;
    let subject = match message.subject {
        Some(PbSubject::Claims(claims)) => {
            if claims.groups.len() > MAX_GROUPS {
                return Err(BrokerError::invalid(format!(
                    "claims.groups has more than {MAX_GROUPS} groups"
                )));
            }
            let groups = claims
                .groups
                .iter()
                .map(|g| parse_name("claims.groups", g))
                .filter_map(Result::transpose)
                .collect::<Result<_, _>>()?;
            Subject::Claims(AssertedClaims {
                email: Email::parse(&claims.email)?,
                cognito_sub: parse_name("claims.cognito_sub", &claims.cognito_sub)?,
                user_pool_id: parse_name("claims.user_pool_id", &claims.user_pool_id)?,
                client_id: parse_name("claims.client_id", &claims.client_id)?,
                groups,
            })
        }
        Some(PbSubject::CognitoToken(token)) => {
            if token.is_empty() {
                return Err(BrokerError::invalid("cognito_token is empty"));
            }
            Subject::CognitoToken(SecretString::from(token))
        }
        None => {
            return Err(BrokerError::invalid(
                "a subject is required: claims or cognito_token",
            ));
        }
    };
    let metadata = message.metadata.into_iter().collect();
    validate_metadata(&metadata)?;
    Ok(IssueRequest {
        subject,
        idempotency_key: Some(message.idempotency_key).filter(|k| !k.is_empty()),
        access_ttl_seconds: message.access_ttl_seconds,
        refresh_ttl_seconds: message.refresh_ttl_seconds,
        metadata,
    })
}

/// Records an id on the call's span (see [`Traced`]) and returns it.
fn record<T: std::fmt::Display>(field: &'static str, id: T) -> T {
    Span::current().record(field, tracing::field::display(&id));
    id
}

/// Records a minted pair's ids (never its secrets) on the call's span.
fn record_pair(pair: &MintedPair) {
    record("account_id", &pair.account_id);
    record("family_id", &pair.family_id);
    record("refresh_token_id", &pair.refresh.id);
    record("access_token_id", &pair.access.id);
}

fn refresh_response(pair: &MintedPair) -> pb::RefreshTokensResponse {
    pb::RefreshTokensResponse {
        account_id: pair.account_id.to_string(),
        family_id: pair.family_id.to_string(),
        refresh: Some(issued_token(&pair.refresh)),
        access: Some(issued_token(&pair.access)),
    }
}

fn issued_token(token: &MintedToken) -> pb::IssuedToken {
    use secrecy::ExposeSecret;
    pb::IssuedToken {
        token_id: token.id.to_string(),
        // The one place a secret leaves the broker: the response that mints it.
        secret: token.secret.expose_secret().to_owned(),
        expires_at: Some(timestamp(token.expires_at)),
    }
}

fn token_kind(kind: TokenKind) -> pb::TokenKind {
    match kind {
        TokenKind::Access => pb::TokenKind::Access,
        TokenKind::Refresh => pb::TokenKind::Refresh,
    }
}

fn token_state(state: TokenState) -> pb::TokenState {
    match state {
        TokenState::Active => pb::TokenState::Active,
        TokenState::Expired => pb::TokenState::Expired,
        TokenState::Revoked => pb::TokenState::Revoked,
        TokenState::Rotated => pb::TokenState::Rotated,
    }
}

fn timestamp(t: UnixMicros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1_000_000),
        nanos: i32::try_from(t.0.rem_euclid(1_000_000) * 1000).expect("under one second"),
    }
}

/// Parses the `grpc-timeout` header (`<at most 8 digits><H|M|S|m|u|n>`); `None` if absent or
/// malformed, as the gRPC spec says to treat it.
fn client_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses() {
        let mut m = MetadataMap::new();
        assert_eq!(client_timeout(&m), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(client_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "2S".parse().unwrap());
        assert_eq!(client_timeout(&m), Some(Duration::from_secs(2)));
        m.insert("grpc-timeout", "123456789S".parse().unwrap());
        assert_eq!(client_timeout(&m), None);
        m.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(client_timeout(&m), None);
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let status = Status::from(BrokerError::Internal(anyhow::anyhow!("db at /secret/path")));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn timestamps_split_micros() {
        let ts = timestamp(UnixMicros(1_500_000));
        assert_eq!((ts.seconds, ts.nanos), (1, 500_000_000));
    }
}
