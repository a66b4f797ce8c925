//! The HTTP adapter: the OAuth HTTP standards over [`Broker`], beside the gRPC one.
//!
//! - `POST /oauth2/introspect`: RFC 7662 token introspection;
//! - `POST /oauth2/revoke`: RFC 7009 token revocation;
//! - `/oauth2/authz`: forward auth for gateways (nginx `auth_request`, Traefik `forwardAuth`),
//!   any method.
//!
//! Each call is admitted like a gRPC call (the same [`Limiter`]: in-flight slot, failed
//! authentications per client network, the caller's rate), authenticated by the same
//! [`Authenticator`], and runs the same service method under the configured request timeout,
//! in its own span (see [`observe`]). [`error::ApiError`] is the one place a [`BrokerError`]
//! becomes an HTTP answer. No secret reaches a log line, a span or an error body.

pub mod error;
pub mod observe;
pub mod serve;
pub mod settings;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header, request::Parts},
    response::Response,
    routing::{any, post},
};
use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use secrecy::{ExposeSecret as _, SecretString};
use tracing::{Instrument as _, Span};

use self::{
    error::{ApiError, json_response, no_store},
    observe::{Endpoint, HttpMetrics, Observation},
    settings::HttpSettings,
};
use crate::{
    domain::{
        admission::{InFlight, Limiter},
        error::BrokerError,
        service::{Broker, RevokeBy},
    },
    identity::{Authenticator, Caller, Role, require},
    model::{TokenInfo, TokenKind, UnixMicros, parse_name},
    obs::context::{self, TRACEPARENT, TRACESTATE},
};

pub use self::serve::{ServeOptions, serve};

/// Longest a refused call's body is read before the refusal is answered (see
/// `HttpAdapter::or_drain`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The connection a request came in on, which the listener puts in each request's extensions.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The client's address.
    pub addr: Option<SocketAddr>,
    /// The verified client certificate (mTLS), if one was presented.
    pub certificate: Option<CertificateDer<'static>>,
}

/// The HTTP endpoints, over the same service, authenticator and limiter as gRPC.
#[derive(Debug, Clone)]
pub struct HttpAdapter(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    broker: Arc<Broker>,
    auth: Arc<Authenticator>,
    limits: Arc<Limiter>,
    metrics: Arc<HttpMetrics>,
    request_timeout: Duration,
    max_body_bytes: usize,
    authz_key_header: HeaderName,
}

impl HttpAdapter {
    /// Builds the adapter; `request_timeout` bounds every call.
    ///
    /// # Panics
    ///
    /// If `settings.authz_key_header` is not a header name ([`HttpSettings::validate`] refuses
    /// that at load).
    pub fn new(
        broker: Arc<Broker>,
        auth: Arc<Authenticator>,
        limits: Arc<Limiter>,
        metrics: Arc<HttpMetrics>,
        request_timeout: Duration,
        settings: &HttpSettings,
    ) -> Self {
        Self(Arc::new(Inner {
            broker,
            auth,
            limits,
            metrics,
            request_timeout,
            max_body_bytes: settings.max_body_bytes,
            authz_key_header: HeaderName::from_bytes(settings.authz_key_header.as_bytes())
                .expect("http.authz_key_header is checked at load"),
        }))
    }

    /// The routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/oauth2/introspect", post(introspect))
            .route("/oauth2/revoke", post(revoke))
            .route("/oauth2/authz", any(authz))
            .fallback(not_found)
            .with_state(self)
    }
}

/// `POST /oauth2/introspect`: RFC 7662.
async fn introspect(State(adapter): State<HttpAdapter>, request: Request) -> Response {
    adapter
        .observed(Endpoint::Introspect, request, async |a, parts, body| {
            let ((_in_flight, caller), body) =
                a.or_drain(a.admit_client(&parts).await, body).await?;
            let form = a.form(parts, body).await?;
            let secret = form.token()?;
            let client_id = form.client_id()?;
            let info = a
                .within(
                    &form.headers,
                    a.0.broker
                        .introspect(caller.as_deref(), &secret, client_id.as_deref(), false),
                )
                .await?;
            Ok(json_response(StatusCode::OK, &introspection(info.as_ref())))
        })
        .await
}

/// `POST /oauth2/revoke`: RFC 7009.
async fn revoke(State(adapter): State<HttpAdapter>, request: Request) -> Response {
    adapter
        .observed(Endpoint::Revoke, request, async |a, parts, body| {
            let admitted = a
                .admit_client(&parts)
                .await
                .and_then(|(in_flight, caller)| {
                    require(caller.as_deref(), &[Role::Service, Role::Admin])
                        .map_err(BrokerError::from)?;
                    Ok((in_flight, caller))
                });
            let ((_in_flight, caller), body) = a.or_drain(admitted, body).await?;
            let form = a.form(parts, body).await?;
            if let Some(hint) = form.one("token_type_hint")?
                && !matches!(hint.as_str(), "access_token" | "refresh_token")
            {
                return Err(ApiError::unsupported_token_type());
            }
            let target = RevokeBy::Secret {
                secret: form.token()?,
                client_id: form.client_id()?,
            };
            a.within(&form.headers, a.0.broker.revoke(caller.as_deref(), target))
                .await?;
            let mut response = Response::new(Body::empty());
            no_store(response.headers_mut());
            Ok(response)
        })
        .await
}

/// `/oauth2/authz`: 200 with the identity headers for an active access token, 401 for
/// anything else. The gateway authenticates in its own header.
async fn authz(State(adapter): State<HttpAdapter>, request: Request) -> Response {
    adapter
        .observed(Endpoint::Authz, request, async |a, parts, _| {
            let (_in_flight, gateway) = a.admit_gateway(&parts)?;
            require(Some(&gateway), &[Role::Service]).map_err(BrokerError::from)?;
            let headers = &parts.headers;
            let Some(value) = headers.get(header::AUTHORIZATION) else {
                return Err(ApiError::inactive_token(false));
            };
            let secret = value
                .to_str()
                .ok()
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .filter(|token| !token.is_empty())
                .map(|token| SecretString::from(token.to_owned()))
                .ok_or_else(|| ApiError::inactive_token(true))?;
            let info = a
                .within(
                    headers,
                    a.0.broker.introspect(Some(&gateway), &secret, None, true),
                )
                .await?;
            let info = info.ok_or_else(|| ApiError::inactive_token(true))?;
            record_info(&info);
            let mut response = Response::new(Body::empty());
            let out = response.headers_mut();
            no_store(out);
            let mut set = |name: &'static str, value: &str| {
                if let Ok(value) = HeaderValue::from_str(value) {
                    out.insert(name, value);
                }
            };
            set("x-tokenbroker-account-id", &info.account_id.to_string());
            set("x-tokenbroker-email", info.email.as_str());
            set("x-tokenbroker-token-id", &info.id.to_string());
            if let Some(client) = &info.client_id {
                set("x-tokenbroker-client-id", client);
            }
            Ok(response)
        })
        .await
}

async fn not_found() -> Response {
    Response::from(ApiError::not_found())
}

impl HttpAdapter {
    /// Runs one call in its span, counts it, and answers its error in the RFC shape.
    async fn observed(
        &self,
        endpoint: Endpoint,
        request: Request,
        work: impl AsyncFnOnce(&Self, Parts, Body) -> Result<Response, ApiError>,
    ) -> Response {
        let observation = Observation::start(
            &self.0.metrics,
            endpoint,
            request.method(),
            request.headers(),
        );
        let span = observation.span().clone();
        let (parts, body) = request.into_parts();
        let response = async {
            match work(self, parts, body).await {
                Ok(response) => response,
                Err(err) => Response::from(err),
            }
        }
        .instrument(span)
        .await;
        observation.finish(response.status());
        response
    }

    /// Admits an introspect or revoke call: an in-flight slot, the client network's failure
    /// budget, the caller (`Bearer` API key or Cognito token, `Basic` key name and key, or a
    /// mapped client certificate when no `authorization` is sent), then its rate. A failed
    /// authentication is charged to the client network.
    async fn admit_client(
        &self,
        request: &Parts,
    ) -> Result<(InFlight, Option<Arc<Caller>>), ApiError> {
        let limits = &self.0.limits;
        let in_flight = limits.enter()?;
        let client = self.client_network(request);
        limits.check_failures(client)?;
        let caller = match self.caller(request).await {
            Ok(caller) => caller,
            Err(err) => {
                limits.charge_failure(client);
                return Err(err.into());
            }
        };
        let caller = match caller {
            Some(caller) => caller,
            None => {
                // RFC 7662 §2.1 and RFC 7009 §2.1: the caller must authenticate.
                limits.charge_failure(client);
                return Err(BrokerError::Unauthenticated(
                    "this endpoint needs a credential: `authorization: Basic` (key name and \
                     key) or `Bearer <api key>`",
                )
                .into());
            }
        };
        Span::current().record("caller", caller.name.as_str());
        if let Err(err) = caller.refuse_direct_exchange() {
            // A Cognito ID token is a credential for gRPC IssueTokens alone (direct exchange);
            // misusing it here counts like a failed authentication, as over gRPC.
            limits.charge_failure(client);
            return Err(BrokerError::from(err).into());
        }
        limits.charge(Some(&caller), client)?;
        Ok((in_flight, Some(caller)))
    }

    /// Admits a forward-auth call: as [`HttpAdapter::admit_client`], with the gateway's key in
    /// `http.authz_key_header`.
    fn admit_gateway(&self, request: &Parts) -> Result<(InFlight, Arc<Caller>), ApiError> {
        let limits = &self.0.limits;
        let in_flight = limits.enter()?;
        let client = self.client_network(request);
        limits.check_failures(client)?;
        let key = request
            .headers
            .get(&self.0.authz_key_header)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|key| !key.is_empty());
        let gateway = match key.map(|key| self.0.auth.api_key(key)) {
            Some(Ok(gateway)) => gateway,
            failed => {
                limits.charge_failure(client);
                let err = match failed {
                    Some(Err(err)) => BrokerError::from(err),
                    _ => BrokerError::Unauthenticated(
                        "the gateway's api key is missing from http.authz_key_header",
                    ),
                };
                return Err(err.into());
            }
        };
        Span::current().record("caller", gateway.name.as_str());
        limits.charge(Some(&gateway), client)?;
        Ok((in_flight, gateway))
    }

    fn client_network(&self, request: &Parts) -> Option<std::net::IpAddr> {
        let peer = request.extensions.get::<Peer>();
        self.0.limits.client(
            peer.and_then(|p| p.addr).map(|addr| addr.ip()),
            request
                .headers
                .get("x-forwarded-for")
                .and_then(|value| value.to_str().ok()),
        )
    }

    /// The caller a request authenticates as; `None` when it sends no credential.
    async fn caller(&self, request: &Parts) -> Result<Option<Arc<Caller>>, BrokerError> {
        let auth = &self.0.auth;
        let Some(value) = request.headers.get(header::AUTHORIZATION) else {
            return Ok(request
                .extensions
                .get::<Peer>()
                .and_then(|peer| peer.certificate.as_ref())
                .and_then(|cert| auth.certificate_caller(cert.as_ref())));
        };
        let value = value.to_str().map_err(|_| {
            BrokerError::Unauthenticated("the authorization header is not valid ASCII")
        })?;
        match value.split_once(' ') {
            Some((scheme, credentials)) if scheme.eq_ignore_ascii_case("basic") => {
                basic(auth, credentials.trim()).map(Some)
            }
            _ => {
                let work = auth.authenticate(Some(value));
                Ok(self
                    .within(&request.headers, async { Ok(work.await?) })
                    .await?)
            }
        }
    }

    /// Passes `body` on when the call was admitted; when it was refused, first reads what is left
    /// of the body (at most `http.max_body_bytes`, for at most `DRAIN_TIMEOUT`) and drops it.
    /// A refusal answered while an HTTP/2 client is still sending its body resets the stream
    /// (`RST_STREAM` with `NO_ERROR`, as RFC 9113 allows), and some clients (curl 7.88) then
    /// report a transport error instead of the answer.
    async fn or_drain<T>(
        &self,
        admitted: Result<T, ApiError>,
        body: Body,
    ) -> Result<(T, Body), ApiError> {
        match admitted {
            Ok(admitted) => Ok((admitted, body)),
            Err(err) => {
                let read = axum::body::to_bytes(body, self.0.max_body_bytes);
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, read).await;
                Err(err)
            }
        }
    }

    /// Reads a form body of at most `http.max_body_bytes`.
    async fn form(&self, parts: Parts, body: Body) -> Result<Form, ApiError> {
        let form_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !form_type {
            return Err(ApiError::invalid_request(
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let limit = self.0.max_body_bytes;
        let bytes = axum::body::to_bytes(body, limit).await.map_err(|err| {
            if has_source::<http_body_util::LengthLimitError>(&err) {
                ApiError::too_large(limit)
            } else {
                ApiError::invalid_request("the request body could not be read")
            }
        })?;
        let mut fields = Vec::new();
        for (name, value) in form_urlencoded::parse(&bytes) {
            fields.push((name.into_owned(), SecretString::from(value.into_owned())));
        }
        Ok(Form {
            fields,
            headers: parts.headers,
        })
    }

    /// Runs `work` under the request timeout, in the caller's trace context.
    async fn within<T>(
        &self,
        headers: &HeaderMap,
        work: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let at = tokio::time::Instant::now() + self.0.request_timeout;
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let work = context::scope(
            context::incoming(header(TRACEPARENT), header(TRACESTATE)),
            crate::model::deadline::scope(at, Box::pin(work)),
        );
        match tokio::time::timeout_at(at, work).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::DeadlineExceeded),
        }
    }
}

/// A parsed form body. Values are kept as secrets: `token` is one, and a form may carry
/// others by mistake (`client_secret`).
struct Form {
    fields: Vec<(String, SecretString)>,
    headers: HeaderMap,
}

impl Form {
    /// The field `name`, if sent; sent twice is an error (RFC 6749 §3.2).
    fn one_secret(&self, name: &str) -> Result<Option<&SecretString>, ApiError> {
        let mut found = self
            .fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v);
        let first = found.next();
        if found.next().is_some() {
            return Err(ApiError::invalid_request(format!(
                "{name} is sent more than once"
            )));
        }
        Ok(first)
    }

    /// A field that is not a secret.
    fn one(&self, name: &str) -> Result<Option<String>, ApiError> {
        Ok(self
            .one_secret(name)?
            .map(|value| value.expose_secret().to_owned()))
    }

    /// The required `token`.
    fn token(&self) -> Result<SecretString, ApiError> {
        self.one_secret("token")?
            .cloned()
            .ok_or_else(|| ApiError::invalid_request("token is required"))
    }

    /// The optional `client_id` the token must belong to (gRPC's `client_id`).
    fn client_id(&self) -> Result<Option<String>, ApiError> {
        match self.one("client_id")? {
            Some(id) => Ok(parse_name("client_id", &id)?),
            None => Ok(None),
        }
    }
}

/// Authenticates `client_secret_basic` credentials: the API key's name as user, the key as
/// password. Both may be sent raw or form-urlencoded (RFC 6749 §2.3.1 asks for the latter;
/// many clients send the former).
fn basic(auth: &Authenticator, credentials: &str) -> Result<Arc<Caller>, BrokerError> {
    const MALFORMED: BrokerError =
        BrokerError::Unauthenticated("the Basic credentials are not base64 of `name:key`");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .map_err(|_| MALFORMED)?;
    let decoded = SecretString::from(String::from_utf8(decoded).map_err(|_| MALFORMED)?);
    let (user, password) = decoded.expose_secret().split_once(':').ok_or(MALFORMED)?;
    let caller = match auth.api_key(password) {
        Ok(caller) => caller,
        Err(err) => {
            let unescaped = SecretString::from(form_decode(password));
            if unescaped.expose_secret() == password {
                return Err(err.into());
            }
            auth.api_key(unescaped.expose_secret())?
        }
    };
    if caller.name != user && caller.name != form_decode(user) {
        return Err(BrokerError::Unauthenticated(
            "the Basic user is not the name of the api key",
        ));
    }
    Ok(caller)
}

/// Undoes `application/x-www-form-urlencoded` on one value (`+` and `%XX`).
fn form_decode(value: &str) -> String {
    form_urlencoded::parse(format!("v={}", value.replace('&', "%26")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The RFC 7662 answer: the token's facts when active, exactly `{"active": false}` otherwise.
fn introspection(info: Option<&TokenInfo>) -> serde_json::Value {
    let Some(info) = info else {
        return serde_json::json!({ "active": false });
    };
    record_info(info);
    let mut answer = serde_json::json!({
        "active": true,
        "token_type": "Bearer",
        "token_use": match info.kind {
            TokenKind::Access => "access_token",
            TokenKind::Refresh => "refresh_token",
        },
        "sub": info.account_id.to_string(),
        "email": info.email.as_str(),
        "exp": seconds(info.expires_at),
        "iat": seconds(info.issued_at),
        "jti": info.id.to_string(),
    });
    if let Some(client) = &info.client_id {
        answer["client_id"] = client.as_str().into();
    }
    answer
}

/// Records an active token's ids on the call's span.
fn record_info(info: &TokenInfo) {
    let span = Span::current();
    span.record("token_id", tracing::field::display(&info.id));
    span.record("account_id", tracing::field::display(&info.account_id));
    span.record("family_id", tracing::field::display(&info.family_id));
}

/// Whole seconds since the epoch (RFC 7662's `NumericDate`).
fn seconds(t: UnixMicros) -> i64 {
    t.0.div_euclid(1_000_000)
}

fn has_source<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if err.is::<E>() {
            return true;
        }
        current = err.source();
    }
    false
}

impl From<crate::identity::AuthError> for ApiError {
    fn from(err: crate::identity::AuthError) -> Self {
        BrokerError::from(err).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::auth::ApiKeyConfig;
    use crate::model::secret::sha256;

    fn authenticator() -> Authenticator {
        Authenticator::new(&[ApiKeyConfig {
            name: "gateway one".into(),
            roles: vec![Role::Service],
            sha256: hex::encode(sha256(b"tbk_a+b/c=")),
        }])
        .unwrap()
    }

    fn encode(credentials: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(credentials)
    }

    #[test]
    fn basic_takes_the_key_name_and_key_raw_or_form_encoded() {
        let auth = authenticator();
        for good in ["gateway one:tbk_a+b/c=", "gateway+one:tbk_a%2Bb%2Fc%3D"] {
            let caller = basic(&auth, &encode(good)).unwrap();
            assert_eq!(caller.name, "gateway one", "{good}");
        }
        for bad in [
            "other:tbk_a+b/c=",
            "gateway one:tbk_wrong",
            "gateway one",
            "",
        ] {
            let err = basic(&auth, &encode(bad)).unwrap_err();
            assert_eq!(
                err.kind(),
                crate::domain::error::BrokerErrorKind::Unauthenticated,
                "{bad}"
            );
            assert!(!err.to_string().contains("tbk_"), "{err}");
        }
        assert!(basic(&auth, "not base64!").is_err());
    }

    #[test]
    fn an_inactive_token_is_exactly_active_false() {
        assert_eq!(introspection(None).to_string(), r#"{"active":false}"#);
    }

    #[test]
    fn form_decoding_undoes_plus_and_percent() {
        assert_eq!(form_decode("a+b%2Bc%26d&e"), "a b+c&d&e");
    }
}
