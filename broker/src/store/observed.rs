//! A decorator that makes every backend operation observable, for any backend:
//!
//! - a span `store.<operation>` at `DEBUG`, with `db.system.name` (the backend),
//!   `db.operation.name`, and `error.type` (the [`StoreErrorKind`](super::StoreErrorKind)) when
//!   it fails; never an argument (secrets, emails and metadata stay out). At `DEBUG` the spans
//!   cost nothing unless a subscriber wants them: the default log filter does not, the OTLP
//!   exporter, when configured, does;
//! - its latency and failures by kind in `tokenbroker_store_*`.
//!
//! It wraps the backend inside the account cache, so a cached account lookup is not a store
//! operation: spans and histograms show what the backend costs.

use std::{fmt, future::Future, sync::Arc, time::Instant};

use async_trait::async_trait;
use secrecy::SecretString;
use tracing::{Instrument as _, debug_span, field::Empty};

use super::{
    StoreResult, TokenStore,
    metrics::{Operation, StoreMetrics},
};
use crate::model::{
    AccountId, ClientCheck, Email, MintedPair, NewSession, PageRequest, RefreshOutcome,
    ReplayClaim, RevokeTarget, Rotation, SecretRevocation, TokenInfo, TokenPage,
};

/// A [`TokenStore`] whose every operation runs in its own span and is timed.
pub struct ObservedStore<S> {
    inner: S,
    metrics: Arc<StoreMetrics>,
    system: &'static str,
}

impl<S: TokenStore> ObservedStore<S> {
    /// Wraps `inner`, recording into `metrics`; `system` names the backend in
    /// `db.system.name` (`sqlite`, `fauna`).
    pub fn new(inner: S, metrics: Arc<StoreMetrics>, system: &'static str) -> Self {
        Self {
            inner,
            metrics,
            system,
        }
    }

    async fn observed<T>(
        &self,
        operation: Operation,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let span = debug_span!(
            "store",
            otel.name = operation.span_name(),
            db.system.name = self.system,
            db.operation.name = operation.name(),
            error.type = Empty,
            otel.status_code = Empty,
        );
        let started = Instant::now();
        let result = work.instrument(span.clone()).await;
        let error = result.as_ref().err().map(|err| err.kind());
        self.metrics.operation(operation, started.elapsed(), error);
        if let Some(kind) = error {
            span.record("error.type", tracing::field::debug(kind));
            span.record("otel.status_code", "ERROR");
        }
        result
    }
}

impl<S: fmt::Debug> fmt::Debug for ObservedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedStore")
            .field("inner", &self.inner)
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for ObservedStore<S> {
    async fn issue(&self, session: NewSession) -> StoreResult<MintedPair> {
        self.observed(Operation::Issue, self.inner.issue(session))
            .await
    }

    async fn issue_once(
        &self,
        session: NewSession,
        claim: &ReplayClaim,
    ) -> StoreResult<Option<(MintedPair, bool)>> {
        self.observed(Operation::Issue, self.inner.issue_once(session, claim))
            .await
    }

    async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> StoreResult<RefreshOutcome> {
        self.observed(Operation::Refresh, self.inner.refresh(secret, rotation))
            .await
    }

    async fn introspect(&self, secret: &SecretString) -> StoreResult<Option<TokenInfo>> {
        self.observed(Operation::Introspect, self.inner.introspect(secret))
            .await
    }

    async fn may_hold(&self, secret: &SecretString) -> StoreResult<bool> {
        self.inner.may_hold(secret).await
    }

    async fn revoke_secret(
        &self,
        secret: &SecretString,
        client: &ClientCheck,
    ) -> StoreResult<SecretRevocation> {
        self.observed(
            Operation::RevokeSecret,
            self.inner.revoke_secret(secret, client),
        )
        .await
    }

    async fn revoke(&self, target: RevokeTarget) -> StoreResult<u64> {
        self.observed(Operation::Revoke, self.inner.revoke(target))
            .await
    }

    async fn revoke_email(&self, email: &Email) -> StoreResult<Option<(AccountId, u64)>> {
        self.observed(Operation::Revoke, self.inner.revoke_email(email))
            .await
    }

    async fn account_by_email(&self, email: &Email) -> StoreResult<Option<AccountId>> {
        self.observed(
            Operation::AccountByEmail,
            self.inner.account_by_email(email),
        )
        .await
    }

    async fn list_tokens(&self, account: &AccountId, page: PageRequest) -> StoreResult<TokenPage> {
        self.observed(Operation::ListTokens, self.inner.list_tokens(account, page))
            .await
    }

    async fn close(&self) -> StoreResult<()> {
        self.inner.close().await
    }
}
