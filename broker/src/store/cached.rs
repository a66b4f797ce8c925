//! A decorator that caches email → account id in memory (moka), so issuing tokens for a known
//! account skips the account lookup.
//!
//! Accounts are never deleted and an email never moves to another account, so a cached
//! mapping cannot go stale; the cache is bounded by capacity only.

use std::{fmt, sync::Arc};

use async_trait::async_trait;
use moka::future::Cache;
use secrecy::SecretString;

use super::{StoreMetrics, StoreResult, TokenStore};
use crate::{
    model::{
        AccountId, ClientCheck, Email, MintedPair, NewSession, PageRequest, RefreshOutcome,
        ReplayClaim, RevokeTarget, Rotation, SecretRevocation, TokenInfo, TokenPage,
    },
    obs::metrics::CacheResult,
};

/// A [`TokenStore`] that remembers which account each email belongs to.
pub struct CachedStore<S> {
    inner: S,
    accounts: Cache<String, AccountId, foldhash::fast::RandomState>,
    metrics: Arc<StoreMetrics>,
}

impl<S: TokenStore> CachedStore<S> {
    /// Wraps `inner` with a cache of at most `capacity` accounts.
    pub fn new(inner: S, capacity: u64) -> Self {
        Self {
            inner,
            accounts: Cache::builder()
                .max_capacity(capacity)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            metrics: Arc::default(),
        }
    }

    /// Records cache hits and misses into `metrics`
    /// (`tokenbroker_account_cache_lookups_total`).
    pub fn with_metrics(mut self, metrics: Arc<StoreMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Looks `email` up in the cache, counting the hit or miss.
    async fn cached(&self, email: &Email) -> Option<AccountId> {
        let found = self.accounts.get(email.as_str()).await;
        let result = if found.is_some() {
            CacheResult::Hit
        } else {
            CacheResult::Miss
        };
        self.metrics.account_cache.get(result).inc();
        found
    }

    /// Returns the wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStore")
            .field("inner", &self.inner)
            .field("cached_accounts", &self.accounts.entry_count())
            .finish()
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for CachedStore<S> {
    async fn issue(&self, mut session: NewSession) -> StoreResult<MintedPair> {
        if session.known_account.is_none() {
            session.known_account = self.cached(&session.email).await;
        }
        // Only a sign-in the cache could not help is worth remembering: an insert costs more
        // than a lookup, and a returning user's entry is already there.
        let remember = session
            .known_account
            .is_none()
            .then(|| session.email.as_str().to_owned());
        let pair = self.inner.issue(session).await?;
        if let Some(email) = remember {
            self.accounts.insert(email, pair.account_id.clone()).await;
        }
        Ok(pair)
    }

    async fn issue_once(
        &self,
        mut session: NewSession,
        claim: &ReplayClaim,
    ) -> StoreResult<Option<(MintedPair, bool)>> {
        if session.known_account.is_none() {
            session.known_account = self.cached(&session.email).await;
        }
        self.inner.issue_once(session, claim).await
    }

    async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> StoreResult<RefreshOutcome> {
        self.inner.refresh(secret, rotation).await
    }

    async fn introspect(&self, secret: &SecretString) -> StoreResult<Option<TokenInfo>> {
        self.inner.introspect(secret).await
    }

    async fn may_hold(&self, secret: &SecretString) -> StoreResult<bool> {
        self.inner.may_hold(secret).await
    }

    async fn revoke_secret(
        &self,
        secret: &SecretString,
        client: &ClientCheck,
    ) -> StoreResult<SecretRevocation> {
        self.inner.revoke_secret(secret, client).await
    }

    async fn revoke(&self, target: RevokeTarget) -> StoreResult<u64> {
        self.inner.revoke(target).await
    }

    async fn revoke_email(&self, email: &Email) -> StoreResult<Option<(AccountId, u64)>> {
        if let Some(account) = self.cached(email).await {
            let revoked = self
                .inner
                .revoke(RevokeTarget::Account(account.clone()))
                .await?;
            return Ok(Some((account, revoked)));
        }
        let found = self.inner.revoke_email(email).await?;
        if let Some((account, _)) = &found {
            self.accounts
                .insert(email.as_str().to_owned(), account.clone())
                .await;
        }
        Ok(found)
    }

    async fn account_by_email(&self, email: &Email) -> StoreResult<Option<AccountId>> {
        if let Some(id) = self.cached(email).await {
            return Ok(Some(id));
        }
        let found = self.inner.account_by_email(email).await?;
        if let Some(id) = &found {
            self.accounts
                .insert(email.as_str().to_owned(), id.clone())
                .await;
        }
        Ok(found)
    }

    async fn list_tokens(&self, account: &AccountId, page: PageRequest) -> StoreResult<TokenPage> {
        self.inner.list_tokens(account, page).await
    }

    async fn close(&self) -> StoreResult<()> {
        self.inner.close().await
    }
}
