//! Token stores: one async trait, every operation atomic, one conformance suite
//! (`testsuite`, behind the feature of that name) that every backend passes (embedded SQLite,
//! Fauna, PostgreSQL), and decorators:
//! the account cache and [`ObservedStore`] (spans and metrics).

mod cached;
mod embedded;
pub mod fauna;
pub mod metrics;
mod observed;
pub mod postgres;
pub mod settings;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;

use std::{error::Error as StdError, fmt};

use async_trait::async_trait;
use secrecy::SecretString;

pub use cached::CachedStore;
pub use embedded::{Durability, EmbeddedStore, EmbeddedStoreConfig};
pub use fauna::{FaunaStore, RotationPolicy};
pub use metrics::StoreMetrics;
pub use observed::ObservedStore;
pub use postgres::PostgresStore;
pub use settings::{
    EmbeddedSettings, FaunaSettings, PostgresSettings, SslMode, StoreBackend, StoreSettings,
};

use crate::model::{
    AccountId, ClientCheck, Email, MintedPair, NewSession, PageRequest, RefreshOutcome,
    ReplayClaim, RevokeTarget, Rotation, SecretRevocation, TokenInfo, TokenPage,
};

/// A backend that keeps accounts and tokens.
///
/// Every method is atomic: it either happens completely or not at all, whatever runs beside it.
/// Methods that take a secret treat a malformed one exactly like an unknown one.
#[async_trait]
pub trait TokenStore: fmt::Debug + Send + Sync + 'static {
    /// Gets or creates the account for `session.email` and mints a refresh token and an access
    /// token (its child) in a new family.
    async fn issue(&self, session: NewSession) -> StoreResult<MintedPair>;

    /// Issues like [`TokenStore::issue`], once per idempotency claim for every broker that
    /// shares this store: within `claim.window` of a first call, a call with the same
    /// `claim.row` gets that call's pair back (`true`: replayed) and changes nothing. The pair is
    /// kept sealed by `claim.key` only, and forgotten when the window closes.
    ///
    /// `None` from a store that keeps no replays (the default); the broker then replays from
    /// its own memory.
    async fn issue_once(
        &self,
        _session: NewSession,
        _claim: &ReplayClaim,
    ) -> StoreResult<Option<(MintedPair, bool)>> {
        Ok(None)
    }

    /// Rotates the refresh token `secret`, with reuse detection; see [`RefreshOutcome`].
    ///
    /// A consumed refresh token presented again succeeds only if it is the immediate
    /// predecessor of the family's current refresh token and the rotation is at most
    /// `rotation.grace` old; the successor is then superseded (revoked with its access tokens)
    /// so the family keeps exactly one live refresh token. Anything else revokes the family,
    /// and so does a superseded successor presented again: its holder was displaced, so one of
    /// the two presenters is not the user.
    ///
    /// The new tokens' lifetimes end at the session's end at the latest (the family's first
    /// issue plus its `session_ttl`); a family whose session has ended is inactive.
    async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> StoreResult<RefreshOutcome>;

    /// Whether `secret` may be one of this store's tokens, in any state. `false` means it
    /// certainly is not (malformed, or forged: no token has that id and digest); the broker
    /// then answers it as inactive without acting, and without an audit line, so forged
    /// secrets cannot fill the audit log. A backend that cannot tell without acting answers
    /// `true` (the default).
    async fn may_hold(&self, _secret: &SecretString) -> StoreResult<bool> {
        Ok(true)
    }

    /// Returns the token's facts if `secret` is an active token, `None` otherwise.
    async fn introspect(&self, secret: &SecretString) -> StoreResult<Option<TokenInfo>>;

    /// Revokes the token `secret` (a refresh token with its access tokens), unless `client`
    /// refuses its app client.
    async fn revoke_secret(
        &self,
        secret: &SecretString,
        client: &ClientCheck,
    ) -> StoreResult<SecretRevocation>;

    /// Revokes a token (with cascade), a family, or an account (as a watermark). Returns how many
    /// active tokens became inactive. Unknown targets revoke nothing.
    async fn revoke(&self, target: RevokeTarget) -> StoreResult<u64>;

    /// Revokes every token of the account with this email, as [`RevokeTarget::Account`]
    /// does, and returns the account's id with how many active tokens became inactive; `None`
    /// when no account has the email. A backend that can find and revoke in one round trip
    /// does; this default looks the account up, then revokes.
    async fn revoke_email(&self, email: &Email) -> StoreResult<Option<(AccountId, u64)>> {
        let Some(account) = self.account_by_email(email).await? else {
            return Ok(None);
        };
        let revoked = self.revoke(RevokeTarget::Account(account.clone())).await?;
        Ok(Some((account, revoked)))
    }

    /// Returns the id of the account with this email, if there is one.
    async fn account_by_email(&self, email: &Email) -> StoreResult<Option<AccountId>>;

    /// Lists an account's tokens, newest first.
    async fn list_tokens(&self, account: &AccountId, page: PageRequest) -> StoreResult<TokenPage>;

    /// Makes everything acknowledged so far durable and stops background work. Called once at
    /// shutdown; later calls may fail with `Unavailable`.
    async fn close(&self) -> StoreResult<()>;
}

/// The class of a store failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The backend cannot answer now; a retry later may work.
    Unavailable,
    /// The backend did not answer in time.
    Timeout,
    /// A bug, corrupt data or a misconfiguration.
    Internal,
}

/// A store failure with its cause chain. Never carries a secret.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} store error: {message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl StoreError {
    /// Returns an error of this kind, with a message and an optional cause.
    pub fn new(
        kind: StoreErrorKind,
        message: impl Into<String>,
        source: Option<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            source,
        }
    }

    /// Returns the error's class.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;
