//! The HTTP adapter's errors: the one place a [`BrokerError`] becomes an HTTP status and an
//! RFC 6749 §5.2 JSON error body (`{"error": …, "error_description": …}`), which RFC 7662 and
//! RFC 7009 both use.

use std::time::Duration;

use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use tracing::{error, warn};

use crate::domain::error::{BrokerError, BrokerErrorKind};

/// How a 401 challenges the client (`WWW-Authenticate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// The caller's own credential (introspect, revoke): `Basic` and `Bearer`, as it may use
    /// either.
    Client,
    /// The end user's token at `/oauth2/authz` (RFC 6750 §3).
    Token,
}

/// An HTTP error answer: status, RFC error code and a description for the client (never a
/// secret, never a store's cause).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    description: String,
    retry_after: Option<Duration>,
    challenge: Option<Challenge>,
}

impl ApiError {
    /// `400 invalid_request`.
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// `413 invalid_request`: the body is over `http.max_body_bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            format!("the request body is over {limit} bytes"),
        )
    }

    /// `404`: no such endpoint.
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request",
            "no such endpoint: the broker serves /oauth2/introspect, /oauth2/revoke and \
             /oauth2/authz",
        )
    }

    /// `400 unsupported_token_type` (RFC 7009 §2.2.1).
    pub fn unsupported_token_type() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unsupported_token_type",
            "token_type_hint must be access_token or refresh_token: the broker issues and \
             revokes no other kind",
        )
    }

    /// `401` with the end user's token challenge, for `/oauth2/authz`: `invalid` says the
    /// request carried a token that is not active (`error="invalid_token"`).
    pub fn inactive_token(invalid: bool) -> Self {
        let mut err = Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the access token is invalid, expired or revoked",
        );
        if !invalid {
            err.code = "invalid_request";
            err.description = "send the access token as `authorization: Bearer <token>`".into();
        }
        err.challenge = Some(Challenge::Token);
        err
    }

    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            code,
            description: description.into(),
            retry_after: None,
            challenge: None,
        }
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<BrokerError> for ApiError {
    fn from(err: BrokerError) -> Self {
        let (status, code) = match err.kind() {
            BrokerErrorKind::InvalidArgument | BrokerErrorKind::FailedPrecondition => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            BrokerErrorKind::Unauthenticated => {
                let mut api =
                    Self::new(StatusCode::UNAUTHORIZED, "invalid_client", err.to_string());
                api.challenge = Some(Challenge::Client);
                return api;
            }
            // A missing role, or another app client's token (RFC 7009 §2.1).
            BrokerErrorKind::PermissionDenied => (StatusCode::FORBIDDEN, "unauthorized_client"),
            BrokerErrorKind::ResourceExhausted => {
                let mut api =
                    Self::new(StatusCode::TOO_MANY_REQUESTS, "slow_down", err.to_string());
                api.retry_after = Some(err.retry_after().unwrap_or(Duration::from_secs(1)));
                return api;
            }
            BrokerErrorKind::DeadlineExceeded => {
                (StatusCode::GATEWAY_TIMEOUT, "temporarily_unavailable")
            }
            // Never `active: false`: an outage must not read as a dead token.
            BrokerErrorKind::Unavailable => {
                let description = match err.dependency_unavailable() {
                    Some(message) => {
                        warn!(reason = message, "dependency unavailable");
                        message
                    }
                    None => {
                        error!(error = ?err, "token store unavailable");
                        "token store unavailable; retry with back-off"
                    }
                };
                let mut api = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    description,
                );
                api.retry_after = Some(Duration::from_secs(1));
                return api;
            }
            BrokerErrorKind::Internal => {
                error!(error = ?err, "request failed");
                return Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal error",
                );
            }
        };
        Self::new(status, code, err.to_string())
    }
}

impl From<crate::model::InvalidArgument> for ApiError {
    fn from(err: crate::model::InvalidArgument) -> Self {
        BrokerError::from(err).into()
    }
}

impl From<ApiError> for Response {
    fn from(err: ApiError) -> Self {
        let body = serde_json::json!({
            "error": err.code,
            "error_description": err.description,
        });
        let mut response = json_response(err.status, &body);
        let headers = response.headers_mut();
        if let Some(wait) = err.retry_after {
            // Whole seconds, rounded up: `Retry-After: 0` would invite an immediate retry.
            let seconds = wait.as_millis().div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds as u64));
        }
        match err.challenge {
            Some(Challenge::Client) => {
                for challenge in [
                    "Basic realm=\"tokenbroker\"",
                    "Bearer realm=\"tokenbroker\"",
                ] {
                    headers.append(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(challenge),
                    );
                }
            }
            Some(Challenge::Token) => {
                let challenge = if err.code == "invalid_token" {
                    "Bearer error=\"invalid_token\""
                } else {
                    "Bearer"
                };
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            None => {}
        }
        response
    }
}

/// A JSON answer that no cache keeps (RFC 7662 §4, RFC 6749 §5.1).
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    no_store(headers);
    response
}

/// Marks an answer uncacheable.
pub fn no_store(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn each_kind_has_one_status_and_an_rfc_body() {
        let cases = [
            (
                BrokerError::invalid("token is required"),
                400,
                "invalid_request",
            ),
            (
                BrokerError::Unauthenticated("unknown api key"),
                401,
                "invalid_client",
            ),
            (
                BrokerError::PermissionDenied("no".into()),
                403,
                "unauthorized_client",
            ),
            (
                BrokerError::ResourceExhausted {
                    message: "slow".into(),
                    retry_after: Duration::from_millis(1500),
                },
                429,
                "slow_down",
            ),
            (
                BrokerError::DeadlineExceeded,
                504,
                "temporarily_unavailable",
            ),
            (
                BrokerError::Unavailable("jwks down"),
                503,
                "temporarily_unavailable",
            ),
            (
                BrokerError::Internal(anyhow::anyhow!("db at /secret/path")),
                500,
                "server_error",
            ),
        ];
        for (err, status, code) in cases {
            let response = Response::from(ApiError::from(err));
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
            if status == 401 {
                assert_eq!(
                    response
                        .headers()
                        .get_all(header::WWW_AUTHENTICATE)
                        .iter()
                        .count(),
                    2
                );
            }
            if status == 429 {
                assert_eq!(response.headers()[header::RETRY_AFTER], "2");
            }
            let body = body(response).await;
            assert_eq!(body["error"], code);
            assert!(!body.to_string().contains("/secret/path"), "{body}");
        }
    }

    #[tokio::test]
    async fn an_inactive_token_is_challenged_as_rfc_6750_says() {
        let response = Response::from(ApiError::inactive_token(true));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"invalid_token\""
        );
        let response = Response::from(ApiError::inactive_token(false));
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
