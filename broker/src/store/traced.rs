//! A decorator that opens a span per store operation, so a trace shows where a call's time
//! went: `store.<operation>` at `DEBUG`, with `db.system.name` (the backend),
//! `db.operation.name`, and `error.type` (the [`StoreErrorKind`](super::StoreErrorKind)) when
//! it fails. Never an argument: secrets, emails and metadata stay out.
//!
//! At `DEBUG` the spans cost nothing unless a subscriber wants them: the default log filter
//! does not, and the OTLP exporter, when configured, does.

use std::future::Future;

use async_trait::async_trait;
use secrecy::SecretString;
use tracing::{Instrument as _, Span, debug_span, field::Empty};

use super::{StoreResult, TokenStore};
use crate::model::{
    AccountId, Email, MintedPair, NewSession, PageRequest, RefreshOutcome, RevokeTarget, Rotation,
    SecretRevocation, TokenInfo, TokenPage,
};

/// A [`TokenStore`] whose every operation runs in its own span.
#[derive(Debug)]
pub struct TracedStore<S> {
    inner: S,
    system: &'static str,
}

impl<S: TokenStore> TracedStore<S> {
    /// Wraps `inner`; `system` names the backend in `db.system.name` (`sqlite`, `fauna`).
    pub fn new(inner: S, system: &'static str) -> Self {
        Self { inner, system }
    }

    /// Returns the wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn run<T>(
        &self,
        name: &'static str,
        operation: &'static str,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let span = debug_span!(
            "store",
            otel.name = name,
            db.system.name = self.system,
            db.operation.name = operation,
            error.type = Empty,
            otel.status_code = Empty,
        );
        let result = work.instrument(span.clone()).await;
        if let Err(err) = &result {
            record_error(&span, err);
        }
        result
    }
}

fn record_error(span: &Span, err: &super::StoreError) {
    span.record("error.type", tracing::field::debug(err.kind()));
    span.record("otel.status_code", "ERROR");
}

#[async_trait]
impl<S: TokenStore> TokenStore for TracedStore<S> {
    async fn issue(&self, session: NewSession) -> StoreResult<MintedPair> {
        self.run("store.issue", "issue", self.inner.issue(session))
            .await
    }

    async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> StoreResult<RefreshOutcome> {
        self.run(
            "store.refresh",
            "refresh",
            self.inner.refresh(secret, rotation),
        )
        .await
    }

    async fn introspect(&self, secret: &SecretString) -> StoreResult<Option<TokenInfo>> {
        self.run(
            "store.introspect",
            "introspect",
            self.inner.introspect(secret),
        )
        .await
    }

    async fn revoke_secret(
        &self,
        secret: &SecretString,
        client_id: Option<&str>,
    ) -> StoreResult<SecretRevocation> {
        self.run(
            "store.revoke_secret",
            "revoke_secret",
            self.inner.revoke_secret(secret, client_id),
        )
        .await
    }

    async fn revoke(&self, target: RevokeTarget) -> StoreResult<u64> {
        self.run("store.revoke", "revoke", self.inner.revoke(target))
            .await
    }

    async fn account_by_email(&self, email: &Email) -> StoreResult<Option<AccountId>> {
        self.run(
            "store.account_by_email",
            "account_by_email",
            self.inner.account_by_email(email),
        )
        .await
    }

    async fn list_tokens(&self, account: &AccountId, page: PageRequest) -> StoreResult<TokenPage> {
        self.run(
            "store.list_tokens",
            "list_tokens",
            self.inner.list_tokens(account, page),
        )
        .await
    }

    async fn close(&self) -> StoreResult<()> {
        self.run("store.close", "close", self.inner.close()).await
    }
}
