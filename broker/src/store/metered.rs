//! A decorator that times every store operation and counts its failures by kind
//! (`tokenbroker_store_*`), for any backend.
//!
//! It wraps the backend inside the account cache, so a cached account lookup is not a store
//! operation and the histograms show what the backend costs.

use std::{fmt, future::Future, sync::Arc, time::Instant};

use async_trait::async_trait;
use secrecy::SecretString;

use super::{StoreResult, TokenStore};
use crate::{
    metrics::Metrics,
    model::{
        AccountId, Email, MintedPair, NewSession, PageRequest, RefreshOutcome, RevokeTarget,
        Rotation, SecretRevocation, TokenInfo, TokenPage,
    },
};

/// Indices into [`crate::metrics::STORE_OPERATIONS`].
#[derive(Debug, Clone, Copy)]
enum Operation {
    Issue,
    Refresh,
    Introspect,
    RevokeSecret,
    Revoke,
    AccountByEmail,
    ListTokens,
}

/// A [`TokenStore`] that records each operation's latency and errors.
pub struct MeteredStore<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S: TokenStore> MeteredStore<S> {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        operation: Operation,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let started = Instant::now();
        let result = work.await;
        self.metrics.store_operation(
            operation as usize,
            started.elapsed(),
            result.as_ref().err().map(|err| err.kind()),
        );
        result
    }
}

impl<S: fmt::Debug> fmt::Debug for MeteredStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for MeteredStore<S> {
    async fn issue(&self, session: NewSession) -> StoreResult<MintedPair> {
        self.timed(Operation::Issue, self.inner.issue(session))
            .await
    }

    async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> StoreResult<RefreshOutcome> {
        self.timed(Operation::Refresh, self.inner.refresh(secret, rotation))
            .await
    }

    async fn introspect(&self, secret: &SecretString) -> StoreResult<Option<TokenInfo>> {
        self.timed(Operation::Introspect, self.inner.introspect(secret))
            .await
    }

    async fn revoke_secret(
        &self,
        secret: &SecretString,
        client_id: Option<&str>,
    ) -> StoreResult<SecretRevocation> {
        self.timed(
            Operation::RevokeSecret,
            self.inner.revoke_secret(secret, client_id),
        )
        .await
    }

    async fn revoke(&self, target: RevokeTarget) -> StoreResult<u64> {
        self.timed(Operation::Revoke, self.inner.revoke(target))
            .await
    }

    async fn account_by_email(&self, email: &Email) -> StoreResult<Option<AccountId>> {
        self.timed(
            Operation::AccountByEmail,
            self.inner.account_by_email(email),
        )
        .await
    }

    async fn list_tokens(&self, account: &AccountId, page: PageRequest) -> StoreResult<TokenPage> {
        self.timed(Operation::ListTokens, self.inner.list_tokens(account, page))
            .await
    }

    async fn close(&self) -> StoreResult<()> {
        self.inner.close().await
    }
}
