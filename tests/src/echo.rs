//! A `TokenBroker` server that does no work at all: the ceiling the load benchmark compares the
//! broker against.
//!
//! It uses the same generated service, codec, messages and tonic/hyper/h2 stack as the broker
//! (a plain `Server::builder()` over a `TcpIncoming` with `TCP_NODELAY` and the broker's
//! `CoalescedWrites`, like `Application::run_until_stopped`), but answers every call with a
//! constant. Whatever the broker is slower than this, it spends on authentication, validation,
//! the store and logging.

use prost_types::Timestamp;
use tokenbroker::app::coalesce::CoalescedWrites;
use tokenbroker_proto::v1::{
    IntrospectRequest, IntrospectResponse, IssueTokensRequest, IssueTokensResponse, IssuedToken,
    ListTokensRequest, ListTokensResponse, RefreshTokensRequest, RefreshTokensResponse,
    RevokeRequest, RevokeResponse,
    token_broker_server::{TokenBroker, TokenBrokerServer},
};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

/// A `TokenBroker` with no logic: every RPC returns a constant response.
///
/// `IssueTokens` returns a pair shaped like a real one (ids, secrets and timestamps of the same
/// lengths), so the response costs what a real response costs to encode and send; every other
/// RPC returns its response type's default.
#[derive(Debug, Clone)]
pub struct EchoBroker {
    issued: IssueTokensResponse,
}

impl EchoBroker {
    /// Returns an echo server with its fixed `IssueTokens` response built once.
    pub fn new() -> Self {
        Self {
            issued: realistic_issue_response(),
        }
    }
}

impl Default for EchoBroker {
    fn default() -> Self {
        Self::new()
    }
}

/// Returns an `IssueTokensResponse` with fields of the lengths the broker produces: `acc_`,
/// `fam_` and `tok_` ids with 32 hex digits, and `tbr_`/`tba_` secrets with the id's hex, `_` and
/// 43 base64url characters.
fn realistic_issue_response() -> IssueTokensResponse {
    let hex = "0123456789abcdef0123456789abcdef";
    let random = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_AbCd";
    let issued_at = 1_767_225_600;
    IssueTokensResponse {
        account_id: format!("acc_{hex}"),
        family_id: format!("fam_{hex}"),
        refresh: Some(IssuedToken {
            token_id: format!("tok_{hex}"),
            secret: format!("tbr_{hex}_{random}x"),
            expires_at: Some(Timestamp {
                seconds: issued_at + 3600,
                nanos: 123_456_000,
            }),
        }),
        access: Some(IssuedToken {
            token_id: format!("tok_{hex}"),
            secret: format!("tba_{hex}_{random}x"),
            expires_at: Some(Timestamp {
                seconds: issued_at + 600,
                nanos: 123_456_000,
            }),
        }),
        replayed: false,
    }
}

#[tonic::async_trait]
impl TokenBroker for EchoBroker {
    async fn issue_tokens(
        &self,
        _request: Request<IssueTokensRequest>,
    ) -> Result<Response<IssueTokensResponse>, Status> {
        Ok(Response::new(self.issued.clone()))
    }

    async fn refresh_tokens(
        &self,
        _request: Request<RefreshTokensRequest>,
    ) -> Result<Response<RefreshTokensResponse>, Status> {
        Ok(Response::new(RefreshTokensResponse::default()))
    }

    async fn revoke(
        &self,
        _request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        Ok(Response::new(RevokeResponse::default()))
    }

    async fn introspect(
        &self,
        _request: Request<IntrospectRequest>,
    ) -> Result<Response<IntrospectResponse>, Status> {
        Ok(Response::new(IntrospectResponse::default()))
    }

    async fn list_tokens(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        Ok(Response::new(ListTokensResponse::default()))
    }
}

/// Serves [`EchoBroker`] on `listener` until the process ends.
///
/// # Errors
///
/// When the server fails (accepting or serving connections).
pub async fn serve_echo(listener: TcpListener) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|accepted| accepted.map(CoalescedWrites::new));
    Server::builder()
        .add_service(TokenBrokerServer::new(EchoBroker::new()))
        .serve_with_incoming(incoming)
        .await
}
