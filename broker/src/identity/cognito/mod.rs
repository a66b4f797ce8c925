//! Cognito JWT verification: the user pools the broker trusts, their key sets, a cache of
//! verified tokens, and what a verified token means (an identity to exchange, or a caller with
//! roles).
//!
//! The checks follow AWS's "Verifying a JSON Web Token" and aws-jwt-verify: three base64url
//! segments; RS256 only, with the key found by `kid` in the issuing pool's JWKS; `iss` equal to
//! a configured pool's issuer; `token_use` as the call allows; the app client in `aud` (ID
//! tokens) or `client_id` (access tokens) one of the pool's; `exp`, `nbf` and `iat` with a
//! configurable leeway. Failures come in three stages (structure, signature, claims) that stay
//! distinct in logs and tests and all reach the caller as `UNAUTHENTICATED`, with a message
//! that never contains the token.

mod jwks;
mod jwt;
mod settings;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use moka::{Expiry, future::Cache};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tracing::debug;

pub use jwks::{
    CachedJwks, HttpJwksSource, Jwks, JwksError, JwksSource, KeyLookupError, MAX_JWKS_BYTES,
    http_client,
};
pub use jwt::{Audience, CognitoClaims, MAX_TOKEN_BYTES, looks_like_jwt};
pub use settings::{CognitoSettings, MAX_LEEWAY_SECONDS, PoolSettings};

use crate::{
    identity::{Caller, DirectExchange, Role},
    model::clock::Clock,
    model::secret::{SecretDigest, sha256},
    obs::metrics::{CacheResult, Counter, Family, MetricSet, Outcome, Zeros},
};

/// The Cognito verifier's metrics.
#[derive(Debug)]
pub struct CognitoMetrics {
    /// `tokenbroker_cognito_verified_cache_lookups_total{result}`.
    pub verified_cache: Family<Counter, CacheResult>,
    /// `tokenbroker_cognito_jwks_fetches_total{outcome}`.
    pub jwks_fetches: Family<Counter, Outcome>,
}

impl Default for CognitoMetrics {
    fn default() -> Self {
        Self {
            verified_cache: Family::new(
                "tokenbroker_cognito_verified_cache_lookups_total",
                "Cognito tokens looked up in the verified-token cache, by result.",
                Zeros::Show,
            ),
            jwks_fetches: Family::new(
                "tokenbroker_cognito_jwks_fetches_total",
                "Fetches of a Cognito user pool's JWKS, by outcome.",
                Zeros::Show,
            ),
        }
    }
}

impl MetricSet for CognitoMetrics {
    fn render(&self, out: &mut String) {
        self.verified_cache.render(out);
        self.jwks_fetches.render(out);
    }
}

/// The gRPC health service name that reports whether Cognito keys are loaded: `NOT_SERVING`
/// until every configured pool's JWKS has been fetched once, `SERVING` from then on.
pub const COGNITO_HEALTH_SERVICE: &str = "tokenbroker.v1.TokenBroker/cognito";

/// Where verification failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not a well-formed, size-limited JWT.
    Structure,
    /// Wrong algorithm, unknown `kid`, or a signature that does not verify.
    Signature,
    /// A verified token whose claims this broker or this call does not accept.
    Claims,
    /// The signing key could not be fetched, so the token could not be judged.
    Unavailable,
}

/// A rejected Cognito token: the stage and a fixed, secret-free reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct CognitoError {
    stage: Stage,
    reason: &'static str,
}

impl CognitoError {
    fn new(stage: Stage, reason: &'static str) -> Self {
        Self { stage, reason }
    }

    fn structure(reason: &'static str) -> Self {
        Self::new(Stage::Structure, reason)
    }

    fn claims(reason: &'static str) -> Self {
        Self::new(Stage::Claims, reason)
    }

    /// Returns the stage that failed.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Returns the reason, a fixed sentence that never contains the token.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// Which kind of Cognito token a call accepts (the `token_use` claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// An ID token: `aud` is the app client; carries `email`.
    Id,
    /// An access token: `client_id` is the app client; carries `scope`.
    Access,
}

impl TokenUse {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "id" => Some(Self::Id),
            "access" => Some(Self::Access),
            _ => None,
        }
    }
}

/// A token whose signature verified, from a trusted pool.
#[derive(Debug)]
pub struct VerifiedToken {
    /// Index of the issuing pool in the configuration.
    pool: usize,
    /// Its claims.
    pub claims: CognitoClaims,
}

/// The identity a verified token carries into `IssueTokens`.
#[derive(Debug, Clone)]
pub struct ExchangedIdentity {
    /// The email (not yet normalised).
    pub email: String,
    /// The Cognito `sub`.
    pub sub: String,
    /// The user pool id (the last segment of the issuer).
    pub user_pool_id: String,
    /// The app client the token was issued to.
    pub client_id: Option<String>,
    /// `cognito:groups`.
    pub groups: Vec<String>,
}

struct Pool {
    issuer: String,
    user_pool_id: String,
    client_ids: BTreeSet<String>,
    group_roles: HashMap<String, Vec<Role>>,
    scope_roles: HashMap<String, Vec<Role>>,
    direct_exchange: bool,
    jwks: Arc<CachedJwks>,
}

/// Keeps a verified token until its own `exp` (by the wall clock; the claims are judged again,
/// by the injected clock, on every use).
struct UntilExp;

impl Expiry<SecretDigest, Arc<VerifiedToken>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &SecretDigest,
        value: &Arc<VerifiedToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let exp = Duration::from_secs(u64::try_from(value.claims.exp).unwrap_or(0));
        Some(exp.saturating_sub(now))
    }
}

/// Verifies Cognito JWTs against the configured pools.
pub struct CognitoVerifier {
    pools: Vec<Pool>,
    by_issuer: HashMap<String, usize>,
    leeway: Duration,
    require_email_verified: bool,
    clock: Arc<dyn Clock>,
    verified: Cache<SecretDigest, Arc<VerifiedToken>>,
    signature_checks: AtomicU64,
    metrics: Arc<CognitoMetrics>,
}

impl fmt::Debug for CognitoVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CognitoVerifier")
            .field(
                "issuers",
                &self.pools.iter().map(|p| &p.issuer).collect::<Vec<_>>(),
            )
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl CognitoVerifier {
    /// Builds a verifier whose pools fetch their keys over HTTP with one shared client. Keys
    /// are not fetched yet: call [`CognitoVerifier::hydrate`].
    ///
    /// # Errors
    ///
    /// When the settings are invalid or the HTTP client cannot be built.
    pub fn new(settings: &CognitoSettings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let client = http_client(settings.jwks_timeout())?;
        Self::with_sources(settings, clock, |url| {
            Arc::new(HttpJwksSource::new(client.clone(), url))
        })
    }

    /// Builds a verifier whose key sets come from `source_for(jwks_url)`; pools that share a
    /// URL share one cache (and so one cooldown).
    ///
    /// # Errors
    ///
    /// When the settings are invalid.
    pub fn with_sources(
        settings: &CognitoSettings,
        clock: Arc<dyn Clock>,
        mut source_for: impl FnMut(&str) -> Arc<dyn JwksSource>,
    ) -> anyhow::Result<Self> {
        settings.validate().map_err(anyhow::Error::msg)?;
        let mut caches: HashMap<String, Arc<CachedJwks>> = HashMap::new();
        let mut pools = Vec::new();
        let mut by_issuer = HashMap::new();
        for (index, pool) in settings.pools.iter().enumerate() {
            let url = pool.jwks_url();
            let jwks = caches
                .entry(url.clone())
                .or_insert_with(|| {
                    Arc::new(CachedJwks::new(
                        source_for(&url),
                        Arc::clone(&clock),
                        settings.jwks_cooldown(),
                    ))
                })
                .clone();
            let roles = |map: &BTreeMap<String, Vec<Role>>| {
                map.iter()
                    .map(|(name, roles)| (name.clone(), roles.clone()))
                    .collect()
            };
            by_issuer.insert(pool.issuer.clone(), index);
            pools.push(Pool {
                issuer: pool.issuer.clone(),
                user_pool_id: pool.user_pool_id().to_owned(),
                client_ids: pool.client_ids.iter().cloned().collect(),
                group_roles: roles(&pool.group_roles),
                scope_roles: roles(&pool.scope_roles),
                direct_exchange: pool.direct_exchange,
                jwks,
            });
        }
        Ok(Self {
            pools,
            by_issuer,
            leeway: settings.leeway(),
            require_email_verified: settings.require_email_verified,
            clock,
            verified: Cache::builder()
                .max_capacity(settings.verified_cache_capacity)
                .expire_after(UntilExp)
                .build(),
            signature_checks: AtomicU64::new(0),
            metrics: Arc::default(),
        })
    }

    /// Records verified-token cache lookups and JWKS fetches into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<CognitoMetrics>) -> Self {
        for jwks in self.key_sets() {
            jwks.attach_metrics(Arc::clone(&metrics));
        }
        self.metrics = metrics;
        self
    }

    /// Fetches every pool's keys that are not loaded yet (where the cooldown allows), all at
    /// once; returns whether every pool has keys afterwards. Failures are logged; the last
    /// good keys, if any, keep serving.
    pub async fn hydrate(&self) -> bool {
        let mut tasks = tokio::task::JoinSet::new();
        for jwks in self.key_sets().into_iter().filter(|j| !j.is_loaded()) {
            tasks.spawn(async move { jwks.hydrate().await });
        }
        while tasks.join_next().await.is_some() {}
        self.is_ready()
    }

    /// Whether every pool's keys have been loaded at least once.
    pub fn is_ready(&self) -> bool {
        self.pools.iter().all(|p| p.jwks.is_loaded())
    }

    /// Returns the key caches (one per distinct JWKS URL).
    pub fn key_sets(&self) -> Vec<Arc<CachedJwks>> {
        let mut seen: Vec<Arc<CachedJwks>> = Vec::new();
        for pool in &self.pools {
            if !seen.iter().any(|s| Arc::ptr_eq(s, &pool.jwks)) {
                seen.push(Arc::clone(&pool.jwks));
            }
        }
        seen
    }

    /// Returns a receiver per pool that turns `true` when its keys are loaded.
    pub fn subscribe_loaded(&self) -> Vec<watch::Receiver<bool>> {
        self.key_sets()
            .iter()
            .map(|jwks| jwks.subscribe_loaded())
            .collect()
    }

    /// Returns how many RSA signature checks have run (cache hits run none).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// Verifies `token` and returns its claims if its `token_use` is one of `allowed`.
    ///
    /// A token seen before (by SHA-256) skips the signature check until its `exp`; its claims
    /// are checked again on every call.
    ///
    /// # Errors
    ///
    /// A [`CognitoError`] whose stage says what failed.
    pub async fn verify(
        &self,
        token: &SecretString,
        allowed: &[TokenUse],
    ) -> Result<Arc<VerifiedToken>, CognitoError> {
        let raw = token.expose_secret();
        // Before hashing, caching or parsing: a huge token costs nothing but this comparison.
        if raw.len() > MAX_TOKEN_BYTES {
            return Err(rejected(CognitoError::structure(
                "the token is larger than 16 KiB",
            )));
        }
        let mut missed = false;
        let verified = self
            .verified
            .try_get_with(sha256(raw.as_bytes()), async {
                missed = true;
                self.verify_signature(raw).await
            })
            .await;
        self.metrics
            .verified_cache
            .get(if missed {
                CacheResult::Miss
            } else {
                CacheResult::Hit
            })
            .inc();
        let verified = verified.map_err(|err| rejected(*err))?;
        self.check_claims(&verified, allowed).map_err(rejected)?;
        Ok(verified)
    }

    /// Verifies a token presented to `IssueTokens` and returns the identity to issue for: an ID
    /// or access token with an `email` (and `email_verified`, unless that is switched off).
    ///
    /// # Errors
    ///
    /// As [`CognitoVerifier::verify`], plus a claims error without the email.
    pub async fn exchange(&self, token: &SecretString) -> Result<ExchangedIdentity, CognitoError> {
        let verified = self
            .verify(token, &[TokenUse::Id, TokenUse::Access])
            .await?;
        let claims = &verified.claims;
        let email = claims
            .email
            .clone()
            .filter(|email| !email.is_empty())
            .ok_or_else(|| rejected(CognitoError::claims("the token has no email claim")))?;
        if self.require_email_verified && !claims.email_verified() {
            return Err(rejected(CognitoError::claims(
                "the token's email is not verified",
            )));
        }
        Ok(ExchangedIdentity {
            email,
            sub: claims.sub.clone(),
            user_pool_id: self.pools[verified.pool].user_pool_id.clone(),
            client_id: claims.client().map(str::to_owned),
            groups: claims.groups.clone(),
        })
    }

    /// Authenticates a caller by a Cognito token.
    ///
    /// An access token is a caller whose roles are those its pool maps its groups and scopes
    /// to (none is a valid caller without roles). An ID token is a caller only where its pool
    /// allows direct exchange: a caller without roles, named `cognito-id:<sub>`, that may
    /// exchange that very token and do nothing else.
    ///
    /// # Errors
    ///
    /// As [`CognitoVerifier::verify`]; a claims error for an ID token of a pool without direct
    /// exchange.
    pub async fn caller(&self, token: &SecretString) -> Result<Caller, CognitoError> {
        let verified = self
            .verify(token, &[TokenUse::Access, TokenUse::Id])
            .await?;
        let pool = &self.pools[verified.pool];
        let claims = &verified.claims;
        if claims.token_use == "id" {
            if !pool.direct_exchange {
                return Err(rejected(CognitoError::claims(
                    "an ID token is not a caller credential: its pool does not allow direct \
                     exchange (send an access token or an api key)",
                )));
            }
            return Ok(Caller {
                name: format!("cognito-id:{}", claims.sub),
                roles: Vec::new(),
                direct_exchange: Some(DirectExchange(sha256(token.expose_secret().as_bytes()))),
            });
        }
        let mut roles: Vec<Role> = claims
            .groups
            .iter()
            .filter_map(|group| pool.group_roles.get(group))
            .chain(claims.scopes().filter_map(|s| pool.scope_roles.get(s)))
            .flatten()
            .copied()
            .collect();
        roles.sort_by_key(|r| r.as_str());
        roles.dedup();
        Ok(Caller::with_roles(format!("cognito:{}", claims.sub), roles))
    }

    /// Structure, issuer and signature: what the verified-token cache remembers.
    async fn verify_signature(&self, raw: &str) -> Result<Arc<VerifiedToken>, CognitoError> {
        let parsed = jwt::parse(raw)?;
        // The issuer picks the pool, and so the key set, before any key is fetched: a token
        // from an unknown issuer never causes a fetch.
        let pool = *self
            .by_issuer
            .get(&parsed.claims.iss)
            .ok_or_else(|| CognitoError::claims("the token's issuer is not a configured pool"))?;
        let key = self.pools[pool]
            .jwks
            .key(&parsed.kid)
            .await
            .map_err(|err| match err {
                KeyLookupError::UnknownKid => CognitoError::new(
                    Stage::Signature,
                    "the token's kid is not in the pool's key set",
                ),
                KeyLookupError::Unavailable => CognitoError::new(
                    Stage::Unavailable,
                    "the pool's signing keys cannot be fetched now; retry with back-off",
                ),
            })?;
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        parsed.verify_signature(&key)?;
        Ok(Arc::new(VerifiedToken {
            pool,
            claims: parsed.claims,
        }))
    }

    /// `token_use`, app client and time claims, by the injected clock.
    fn check_claims(
        &self,
        verified: &VerifiedToken,
        allowed: &[TokenUse],
    ) -> Result<(), CognitoError> {
        let pool = &self.pools[verified.pool];
        let claims = &verified.claims;
        let token_use = TokenUse::parse(&claims.token_use)
            .filter(|u| allowed.contains(u))
            .ok_or_else(|| CognitoError::claims("the token's token_use is not accepted here"))?;
        let client_ok = match token_use {
            TokenUse::Id => claims
                .aud
                .as_ref()
                .is_some_and(|aud| pool.client_ids.iter().any(|id| aud.contains(id))),
            TokenUse::Access => claims
                .client_id
                .as_ref()
                .is_some_and(|id| pool.client_ids.contains(id)),
        };
        if !client_ok {
            return Err(CognitoError::claims(
                "the token was issued to an app client this broker does not accept",
            ));
        }
        let now = self.clock.now().0;
        let leeway = i64::try_from(self.leeway.as_micros()).unwrap_or(i64::MAX);
        let micros = |seconds: i64| seconds.saturating_mul(1_000_000);
        if now >= micros(claims.exp).saturating_add(leeway) {
            return Err(CognitoError::claims("the token has expired"));
        }
        if claims
            .nbf
            .is_some_and(|nbf| micros(nbf) > now.saturating_add(leeway))
        {
            return Err(CognitoError::claims("the token is not valid yet (nbf)"));
        }
        if claims
            .iat
            .is_some_and(|iat| micros(iat) > now.saturating_add(leeway))
        {
            return Err(CognitoError::claims(
                "the token was issued in the future (iat)",
            ));
        }
        Ok(())
    }
}

/// Logs a rejection (stage and reason, never the token) and passes it on.
fn rejected(err: CognitoError) -> CognitoError {
    debug!(stage = ?err.stage, reason = err.reason, "cognito token rejected");
    err
}

/// Takes a token apart without verifying it, as the verifier's first step does: returns its
/// `kid` and claims. Only for the fuzz targets (`fuzz/`, feature `fuzzing`); the verifier is the
/// API.
///
/// # Errors
///
/// As the verifier's structure check: a [`Stage::Structure`] or [`Stage::Signature`] error.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn parse_unverified(token: &str) -> Result<(String, CognitoClaims), CognitoError> {
    jwt::parse(token).map(|parsed| (parsed.kid, parsed.claims))
}

#[cfg(test)]
mod tests;
