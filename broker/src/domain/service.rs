//! The broker's domain service: who may do what, token lifetimes, idempotent issuing and
//! coalesced rotation, on top of a [`TokenStore`]. Knows nothing of gRPC.

use std::{fmt, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use moka::future::Cache;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::{
    domain::DomainMetrics,
    domain::audit::{AuditLog, Event, Line, Record},
    domain::error::{BrokerError, BrokerErrorKind, BrokerResult},
    domain::{RevokeCause, TokenSettings},
    identity::cognito::CognitoVerifier,
    identity::{Caller, DirectExchange, Role, require},
    model::clock::Clock,
    model::secret::{SecretDigest, sha256},
    model::{
        AccountId, ClientCheck, Email, FamilyId, MAX_GROUPS, MAX_SECRET_LEN, Metadata, MintedPair,
        NewSession, PageCursor, PageRequest, RefreshOutcome, ReplayClaim, RevokeTarget, Rotation,
        SecretRevocation, TokenId, TokenInfo, TokenKind, TokenPage, UnixMicros, parse_name,
        replay::ReplayKey,
    },
    store::TokenStore,
};

/// Tokens per ListTokens page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Most tokens per ListTokens page.
pub const MAX_PAGE_SIZE: u32 = 500;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Most idempotency keys (and rotations) remembered at once.
const REPLAY_CACHE_CAPACITY: u64 = 100_000;

/// Claims about a user asserted by a trusted caller.
#[derive(Debug, Clone)]
pub struct AssertedClaims {
    /// The normalised email.
    pub email: Email,
    /// The Cognito `sub`.
    pub cognito_sub: Option<String>,
    /// The user pool id.
    pub user_pool_id: Option<String>,
    /// The app client id.
    pub client_id: Option<String>,
    /// The Cognito groups.
    pub groups: Vec<String>,
}

/// Who tokens are issued for.
pub enum Subject {
    /// Claims asserted by the caller.
    Claims(AssertedClaims),
    /// A Cognito JWT for the broker to verify.
    CognitoToken(SecretString),
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Claims(claims) => f.debug_tuple("Claims").field(claims).finish(),
            Self::CognitoToken(_) => f.write_str("CognitoToken(..)"),
        }
    }
}

/// An IssueTokens request, parsed.
#[derive(Debug)]
pub struct IssueRequest {
    /// Who for.
    pub subject: Subject,
    /// Makes retries return the same pair.
    pub idempotency_key: Option<String>,
    /// Requested access lifetime in seconds; 0 for the default.
    pub access_ttl_seconds: u32,
    /// Requested refresh lifetime in seconds; 0 for the default.
    pub refresh_ttl_seconds: u32,
    /// Labels for both tokens.
    pub metadata: Metadata,
}

/// The answer to IssueTokens.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The pair (shared with the idempotency cache).
    pub pair: Arc<MintedPair>,
    /// Whether an earlier call minted it.
    pub replayed: bool,
}

/// A RefreshTokens request, parsed.
#[derive(Debug)]
pub struct RefreshRequest {
    /// The refresh secret.
    pub refresh_token: SecretString,
    /// Requested access lifetime in seconds; 0 for the default.
    pub access_ttl_seconds: u32,
    /// Requested refresh lifetime in seconds; 0 for the default.
    pub refresh_ttl_seconds: u32,
    /// The app client the token must belong to, if any.
    pub client_id: Option<String>,
}

/// What a Revoke call names.
pub enum RevokeBy {
    /// A secret, with an optional app client it must belong to.
    Secret {
        /// The secret.
        secret: SecretString,
        /// The app client.
        client_id: Option<String>,
    },
    /// A token id.
    TokenId(TokenId),
    /// A family id.
    FamilyId(FamilyId),
    /// An account id.
    AccountId(AccountId),
    /// An account's email.
    Email(Email),
}

impl fmt::Debug for RevokeBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret { client_id, .. } => f
                .debug_struct("Secret")
                .field("client_id", client_id)
                .finish_non_exhaustive(),
            Self::TokenId(id) => f.debug_tuple("TokenId").field(id).finish(),
            Self::FamilyId(id) => f.debug_tuple("FamilyId").field(id).finish(),
            Self::AccountId(id) => f.debug_tuple("AccountId").field(id).finish(),
            Self::Email(_) => f.write_str("Email(..)"),
        }
    }
}

/// Whose tokens ListTokens lists.
#[derive(Debug, Clone)]
pub enum AccountRef {
    /// By id.
    Id(AccountId),
    /// By email.
    Email(Email),
}

/// A ListTokens request, parsed.
#[derive(Debug, Clone)]
pub struct ListRequest {
    /// Whose tokens.
    pub account: AccountRef,
    /// Page size; 0 for the default.
    pub page_size: u32,
    /// The previous page's `next_page_token`, or empty.
    pub page_token: String,
    /// Whether to list inactive tokens too.
    pub include_inactive: bool,
}

/// The answer to ListTokens.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The account, if one matched.
    pub account_id: Option<AccountId>,
    /// The page.
    pub page: TokenPage,
    /// The token for the next page, empty on the last.
    pub next_page_token: String,
}

/// The broker's domain service.
pub struct Broker {
    store: Arc<dyn TokenStore>,
    tokens: TokenSettings,
    /// Pairs minted under an idempotency key, by digest of (caller, key, subject).
    issued: Cache<SecretDigest, Arc<MintedPair>>,
    /// Pairs minted by a rotation (or replayed by a shared store that another broker's rotation
    /// sealed them in), with the (injected) time of the rotation, by digest of the presented
    /// refresh secret, for the grace window: concurrent or repeated refreshes of one token on
    /// this broker get one successor with one store call. Across brokers, a shared store with
    /// the replay key does the same ([`RefreshOutcome::Replayed`]). The cache's own expiry is
    /// wall-clock; entries older than the grace window by `clock` are ignored too, so tests can
    /// move time by hand.
    rotated: Option<Cache<SecretDigest, (Arc<MintedPair>, UnixMicros)>>,
    /// Seals the pairs a shared store keeps for idempotent replay; `None`: replay from `issued`.
    replay_key: Option<Arc<ReplayKey>>,
    clock: Arc<dyn Clock>,
    /// Verifies `cognito_token` subjects; `None` while no user pool is configured.
    cognito: Option<Arc<CognitoVerifier>>,
    /// Where privileged operations are recorded (off by default).
    audit: Arc<AuditLog>,
    /// Tokens issued and revoked.
    metrics: Arc<DomainMetrics>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("store", &self.store)
            .field("tokens", &self.tokens)
            .field("cognito", &self.cognito.is_some())
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Builds the service over `store`.
    pub fn new(store: Arc<dyn TokenStore>, tokens: TokenSettings, clock: Arc<dyn Clock>) -> Self {
        let issued = Cache::builder()
            .max_capacity(REPLAY_CACHE_CAPACITY)
            .time_to_live(Duration::from_secs(
                tokens.idempotency_window_seconds.max(1),
            ))
            .build();
        let rotated = (tokens.refresh_grace_seconds > 0).then(|| {
            Cache::builder()
                .max_capacity(REPLAY_CACHE_CAPACITY)
                .time_to_live(Duration::from_secs(tokens.refresh_grace_seconds))
                .build()
        });
        Self {
            store,
            tokens,
            issued,
            rotated,
            replay_key: None,
            clock,
            cognito: None,
            audit: Arc::new(AuditLog::off()),
            metrics: Arc::default(),
        }
    }

    /// Records privileged operations in `audit`.
    pub fn with_audit(mut self, audit: Arc<AuditLog>) -> Self {
        self.audit = audit;
        self
    }

    /// Counts tokens issued and revoked in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<DomainMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Keeps idempotent replays in the store, when it can share them with other replicas,
    /// sealed by `key`.
    pub fn with_replay_key(mut self, key: ReplayKey) -> Self {
        self.replay_key = Some(Arc::new(key));
        self
    }

    /// Accepts `cognito_token` subjects, verified by `verifier`.
    pub fn with_cognito(mut self, verifier: Arc<CognitoVerifier>) -> Self {
        self.cognito = Some(verifier);
        self
    }

    /// Returns the store.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
    }

    /// Issues a new pair (or replays one for a repeated idempotency key).
    ///
    /// # Errors
    ///
    /// See the proto: role errors, `InvalidArgument` for TTLs and keys, `FailedPrecondition`
    /// for a Cognito token while no pool is configured, `Unauthenticated` for one that does not
    /// verify or lacks a (verified) email, `Unavailable` when its pool's keys cannot be fetched,
    /// store failures.
    pub async fn issue(
        &self,
        caller: Option<&Caller>,
        request: IssueRequest,
    ) -> BrokerResult<Issued> {
        let record = self.audit.record(Event::Issue, caller, &*self.clock);
        let work = async |record: &mut Record| {
            let claims = match request.subject {
                Subject::Claims(claims) => {
                    require(caller, &[Role::Trigger, Role::Admin])?;
                    claims
                }
                Subject::CognitoToken(token) => {
                    match caller.and_then(|c| c.direct_exchange) {
                        // Direct exchange: the caller's credential is an ID token, and the
                        // only token it may exchange is that one, so the tokens minted are
                        // for its own subject.
                        Some(DirectExchange(presented)) => {
                            if sha256(token.expose_secret().as_bytes()) != presented {
                                return Err(BrokerError::PermissionDenied(
                                    "an ID token caller may exchange only its own token: \
                                     cognito_token must be the bearer credential"
                                        .into(),
                                ));
                            }
                        }
                        None => {
                            require(caller, &[Role::Service, Role::Trigger, Role::Admin])?;
                        }
                    }
                    let Some(cognito) = &self.cognito else {
                        return Err(BrokerError::FailedPrecondition(
                            "no Cognito user pool is configured",
                        ));
                    };
                    exchanged_claims(cognito.exchange(&token).await?)?
                }
            };
            let caller = caller.expect("require returned a caller");
            record.set(|line| {
                line.email_hmac = self.audit.email_hmac(&claims.email);
                line.client_id.clone_from(&claims.client_id);
            });
            let access_ttl = self.ttl(
                "access_ttl_seconds",
                request.access_ttl_seconds,
                self.tokens.access_ttl_seconds,
                self.tokens.max_access_ttl_seconds,
            )?;
            let refresh_ttl = self.ttl(
                "refresh_ttl_seconds",
                request.refresh_ttl_seconds,
                self.tokens.refresh_ttl_seconds,
                self.tokens.max_refresh_ttl_seconds,
            )?;
            let key = request
                .idempotency_key
                .as_deref()
                .map(|key| {
                    validate_idempotency_key(key)?;
                    Ok::<_, BrokerError>(digest_of(&[
                        caller.name.as_bytes(),
                        key.as_bytes(),
                        claims.email.as_str().as_bytes(),
                        claims.client_id.as_deref().unwrap_or("").as_bytes(),
                    ]))
                })
                .transpose()?;
            let session = NewSession {
                email: claims.email,
                known_account: None,
                cognito_sub: claims.cognito_sub,
                client_id: claims.client_id,
                access_ttl,
                refresh_ttl,
                session_ttl: self.tokens.max_session(),
                metadata: request.metadata,
            };
            self.audit.request(record)?;
            if let (Some(row), Some(key)) = (key, &self.replay_key) {
                let claim = ReplayClaim {
                    row,
                    window: Duration::from_secs(self.tokens.idempotency_window_seconds.max(1)),
                    key: Arc::clone(key),
                };
                if let Some((pair, replayed)) =
                    self.store.issue_once(session.clone(), &claim).await?
                {
                    if replayed {
                        info!(caller = %caller.name, family_id = %pair.family_id, "idempotent replay of issued tokens");
                    } else {
                        self.count_minted();
                    }
                    return Ok(Issued {
                        pair: Arc::new(pair),
                        replayed,
                    });
                }
            }
            let mint = async {
                let pair = self.store.issue(session).await?;
                self.count_minted();
                // At debug: one line per sign-in is the audit log's and the metrics' job; at
                // thousands of sign-ins a second a log line each costs a tenth of the throughput.
                debug!(
                    caller = %caller.name,
                    account_id = %pair.account_id,
                    family_id = %pair.family_id,
                    refresh_token_id = %pair.refresh.id,
                    access_token_id = %pair.access.id,
                    "tokens issued"
                );
                Ok::<_, BrokerError>(Arc::new(pair))
            };
            let Some(key) = key else {
                return Ok(Issued {
                    pair: mint.await?,
                    replayed: false,
                });
            };
            let entry = self
                .issued
                .entry(key)
                .or_try_insert_with(mint)
                .await
                .map_err(BrokerError::Shared)?;
            let replayed = !entry.is_fresh();
            if replayed {
                info!(caller = %caller.name, family_id = %entry.value().family_id, "idempotent replay of issued tokens");
            }
            Ok(Issued {
                pair: entry.into_value(),
                replayed,
            })
        };
        self.recorded(record, work, |result, line| {
            if let Ok(issued) = result {
                record_pair(line, &issued.pair);
                line.replayed = Some(issued.replayed);
            }
        })
        .await
    }

    /// Rotates a refresh token.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for an empty secret or a TTL over the maximum; `Unauthenticated` for an
    /// inactive or reused secret; `PermissionDenied` for another client's token; store failures.
    pub async fn refresh(&self, request: RefreshRequest) -> BrokerResult<Arc<MintedPair>> {
        // No credential is needed: the caller is the holder of the refresh secret, named by
        // the token it presents.
        let presented = presented_id(&request.refresh_token);
        let mut record =
            self.audit
                .record_holder(Event::Refresh, presented.as_deref(), &*self.clock);
        record.set(|line| {
            line.token_id = presented;
            line.client_id.clone_from(&request.client_id);
        });
        let work = async |record: &mut Record| {
            let secret = request.refresh_token.expose_secret();
            if secret.is_empty() {
                return Err(BrokerError::invalid("refresh_token is required"));
            }
            // The presenter of a refresh secret may only shorten lifetimes: the defaults are
            // its maxima (the issuer, an authenticated caller, may ask for up to the maxima).
            let rotation = Rotation {
                client: self.client_check(request.client_id.clone()),
                access_ttl: self.ttl(
                    "access_ttl_seconds",
                    request.access_ttl_seconds,
                    self.tokens.access_ttl_seconds,
                    self.tokens.access_ttl_seconds,
                )?,
                refresh_ttl: self.ttl(
                    "refresh_ttl_seconds",
                    request.refresh_ttl_seconds,
                    self.tokens.refresh_ttl_seconds,
                    self.tokens.refresh_ttl_seconds,
                )?,
                grace: Duration::from_secs(self.tokens.refresh_grace_seconds),
                session_ttl: self.tokens.max_session(),
                replay: self.replay_key.clone(),
            };
            if secret.len() > MAX_SECRET_LEN || !self.holds(&request.refresh_token, record).await? {
                return Err(inactive_refresh());
            }
            self.audit.request(record)?;
            let record = &*record;
            let rotate = || async {
                match self
                    .store
                    .refresh(&request.refresh_token, rotation.clone())
                    .await?
                {
                    RefreshOutcome::Rotated(pair) => {
                        self.count_minted();
                        debug!(
                            family_id = %pair.family_id,
                            refresh_token_id = %pair.refresh.id,
                            access_token_id = %pair.access.id,
                            "refresh token rotated"
                        );
                        Ok((Arc::new(pair), self.clock.now()))
                    }
                    // Another presentation (on this broker or another one sharing the store)
                    // rotated the token within the grace window: its successor, minted then.
                    RefreshOutcome::Replayed { pair, rotated_at } => {
                        debug!(
                            family_id = %pair.family_id,
                            refresh_token_id = %pair.refresh.id,
                            "refresh answered with the rotation's successor"
                        );
                        Ok((Arc::new(pair), rotated_at))
                    }
                    RefreshOutcome::Inactive => Err(inactive_refresh()),
                    RefreshOutcome::WrongClient => Err(wrong_client(&rotation.client)),
                    RefreshOutcome::ReuseDetected { family_id, revoked } => {
                        warn!(%family_id, revoked, "refresh token reuse; session revoked");
                        self.metrics
                            .tokens_revoked
                            .get(RevokeCause::Reuse)
                            .add(revoked);
                        self.audit.event(
                            record,
                            Event::ReuseDetected,
                            BrokerErrorKind::Unauthenticated,
                            |line| {
                                line.family_id = Some(family_id.to_string());
                                line.revoked = Some(revoked);
                            },
                        )?;
                        Err(inactive_refresh())
                    }
                }
            };
            let Some(rotated) = &self.rotated else {
                return Ok(rotate().await?.0);
            };
            let key = digest_of(&[
                secret.as_bytes(),
                request.client_id.as_deref().unwrap_or("").as_bytes(),
            ]);
            let entry = rotated
                .entry(key)
                .or_try_insert_with(rotate())
                .await
                .map_err(BrokerError::Shared)?;
            if entry.is_fresh() {
                return Ok(entry.into_value().0);
            }
            // A retry (or a concurrent twin) of a rotation: hand back the same successor only while
            // it is the family's current refresh token and the grace window (by the injected clock)
            // is open. Otherwise the store judges the reuse, which revokes the family.
            let (pair, minted_at) = entry.into_value();
            if self.clock.now() <= minted_at.plus(rotation.grace)
                && self.store.introspect(&pair.refresh.secret).await?.is_some()
            {
                return Ok(pair);
            }
            rotated.invalidate(&key).await;
            Ok(rotate().await?.0)
        };
        self.recorded(record, work, |result, line| {
            if let Ok(pair) = result {
                record_pair(line, pair);
            }
        })
        .await
    }

    /// Revokes what `target` names; returns how many tokens became inactive (0 for a
    /// revocation by secret, whose caller may not be an admin).
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for an empty secret; `PermissionDenied` for another client's token or a
    /// non-admin naming anything but a secret; store failures.
    pub async fn revoke(&self, caller: Option<&Caller>, target: RevokeBy) -> BrokerResult<u64> {
        let mut record = self.audit.record(Event::Revoke, caller, &*self.clock);
        record.set(|line| match &target {
            RevokeBy::Secret { secret, client_id } => {
                line.target = Some("secret");
                line.token_id = presented_id(secret);
                line.client_id.clone_from(client_id);
            }
            RevokeBy::TokenId(id) => {
                line.target = Some("token_id");
                line.token_id = Some(id.to_string());
            }
            RevokeBy::FamilyId(id) => {
                line.target = Some("family_id");
                line.family_id = Some(id.to_string());
            }
            RevokeBy::AccountId(id) => {
                line.target = Some("account_id");
                line.account_id = Some(id.to_string());
            }
            RevokeBy::Email(email) => {
                line.target = Some("email");
                line.email_hmac = self.audit.email_hmac(email);
            }
        });
        let work = async |record: &mut Record| {
            let target = match target {
                RevokeBy::Secret { secret, client_id } => {
                    if secret.expose_secret().is_empty() {
                        return Err(BrokerError::invalid("token is required"));
                    }
                    if !self.holds(&secret, record).await? {
                        return Ok(0);
                    }
                    let client = self.client_check(client_id);
                    self.audit.request(record)?;
                    let outcome = self.store.revoke_secret(&secret, &client).await?;
                    return match outcome {
                        SecretRevocation::Revoked(count) => {
                            self.metrics
                                .tokens_revoked
                                .get(RevokeCause::Request)
                                .add(count);
                            record.set(|line| line.revoked = Some(count));
                            info!(
                                caller = caller.map(|c| c.name.as_str()),
                                revoked = count,
                                "token revoked by its holder"
                            );
                            Ok(0)
                        }
                        SecretRevocation::NotActive => {
                            record.set(|line| line.revoked = Some(0));
                            Ok(0)
                        }
                        SecretRevocation::WrongClient => Err(wrong_client(&client)),
                    };
                }
                RevokeBy::TokenId(id) => Ok(RevokeTarget::Token(id)),
                RevokeBy::FamilyId(id) => Ok(RevokeTarget::Family(id)),
                RevokeBy::AccountId(id) => Ok(RevokeTarget::Account(id)),
                RevokeBy::Email(email) => Err(email),
            };
            let admin = require(caller, &[Role::Admin])?;
            self.audit.request(record)?;
            let revoked = match target {
                Ok(target) => {
                    let revoked = self.store.revoke(target.clone()).await?;
                    info!(caller = %admin.name, ?target, revoked, "tokens revoked");
                    revoked
                }
                // The account is found and revoked in one store call.
                Err(email) => match self.store.revoke_email(&email).await? {
                    Some((account, revoked)) => {
                        info!(caller = %admin.name, %account, revoked, "tokens revoked by email");
                        record.set(|line| line.account_id = Some(account.to_string()));
                        revoked
                    }
                    None => 0,
                },
            };
            self.metrics
                .tokens_revoked
                .get(RevokeCause::Request)
                .add(revoked);
            record.set(|line| line.revoked = Some(revoked));
            Ok(revoked)
        };
        self.recorded(record, work, |_, _| {}).await
    }

    /// Introspects a secret: its facts if active, `None` otherwise. `client_id` hides other
    /// clients' tokens; `access_only` hides refresh tokens (an active refresh token answers
    /// `Some` with its `kind`, which a resource server must otherwise check itself).
    ///
    /// # Errors
    ///
    /// Role errors, `InvalidArgument` for an empty secret, store failures (never `None`).
    pub async fn introspect(
        &self,
        caller: Option<&Caller>,
        secret: &SecretString,
        client_id: Option<&str>,
        access_only: bool,
    ) -> BrokerResult<Option<TokenInfo>> {
        // Services introspect on every request they serve; an admin looking a token up is
        // the privileged read the audit log is for.
        let by_admin = caller.is_some_and(|c| c.has_any(&[Role::Admin]));
        let record = if by_admin {
            self.audit.record(Event::Introspect, caller, &*self.clock)
        } else {
            Record::default()
        };
        let work = async |_: &mut Record| {
            require(caller, &[Role::Service, Role::Admin])?;
            if secret.expose_secret().is_empty() {
                return Err(BrokerError::invalid("token is required"));
            }
            let info = self.store.introspect(secret).await?;
            Ok(info.filter(|info| {
                (client_id.is_none() || info.client_id.as_deref() == client_id)
                    && (!access_only || info.kind == TokenKind::Access)
            }))
        };
        self.recorded(record, work, |result, line| {
            line.token_id = presented_id(secret);
            if let Ok(info) = result {
                line.active = Some(info.is_some());
                if let Some(info) = info {
                    line.token_id = Some(info.id.to_string());
                    line.family_id = Some(info.family_id.to_string());
                    line.account_id = Some(info.account_id.to_string());
                    line.email_hmac = self.audit.email_hmac(&info.email);
                }
            }
        })
        .await
    }

    /// Lists an account's tokens.
    ///
    /// # Errors
    ///
    /// Role errors, `InvalidArgument` for a bad page size or token, store failures.
    pub async fn list(
        &self,
        caller: Option<&Caller>,
        request: ListRequest,
    ) -> BrokerResult<Listed> {
        let mut record = self.audit.record(Event::List, caller, &*self.clock);
        record.set(|line| match &request.account {
            AccountRef::Id(id) => line.account_id = Some(id.to_string()),
            AccountRef::Email(email) => line.email_hmac = self.audit.email_hmac(email),
        });
        let work = async |_: &mut Record| {
            require(caller, &[Role::Admin])?;
            let size = match request.page_size {
                0 => DEFAULT_PAGE_SIZE,
                n if n <= MAX_PAGE_SIZE => n,
                _ => {
                    return Err(BrokerError::invalid(format!(
                        "page_size must be at most {MAX_PAGE_SIZE}"
                    )));
                }
            };
            let after = decode_page_token(&request.page_token)?;
            let account_id = match request.account {
                AccountRef::Id(id) => Some(id),
                AccountRef::Email(email) => self.store.account_by_email(&email).await?,
            };
            let Some(account_id) = account_id else {
                return Ok(Listed {
                    account_id: None,
                    page: TokenPage {
                        tokens: Vec::new(),
                        next: None,
                    },
                    next_page_token: String::new(),
                });
            };
            let page = self
                .store
                .list_tokens(
                    &account_id,
                    PageRequest {
                        size,
                        after,
                        include_inactive: request.include_inactive,
                    },
                )
                .await?;
            let next_page_token = page
                .next
                .as_ref()
                .map(encode_page_token)
                .unwrap_or_default();
            Ok(Listed {
                account_id: Some(account_id),
                page,
                next_page_token,
            })
        };
        self.recorded(record, work, |result, line| {
            if let Ok(listed) = result {
                line.account_id = listed.account_id.as_ref().map(ToString::to_string);
                line.listed = Some(listed.page.tokens.len());
            }
        })
        .await
    }

    /// Runs one operation under its audit record: `work` fills the record in as it learns ids
    /// (and writes the `request` line before a state change), `outcome` adds what the result
    /// says, and the `response` line is written last. With the log off, or a record made
    /// inert, only `work` runs.
    async fn recorded<T>(
        &self,
        mut record: Record,
        work: impl AsyncFnOnce(&mut Record) -> BrokerResult<T>,
        outcome: impl FnOnce(&BrokerResult<T>, &mut Line),
    ) -> BrokerResult<T> {
        let result = work(&mut record).await;
        if !record.is_on() {
            return result;
        }
        record.set(|line| outcome(&result, line));
        self.audit.response(record, result)
    }

    /// What a presented token's client must be, given the client id the call named.
    fn client_check(&self, client_id: Option<String>) -> ClientCheck {
        match client_id {
            None if !self.tokens.require_client_id => ClientCheck::Any,
            client_id => ClientCheck::Exactly(client_id),
        }
    }

    /// Whether the store may hold `secret`; when it certainly does not, the call's audit
    /// record is dropped and the call is counted in `tokenbroker_unknown_secrets_total`.
    async fn holds(&self, secret: &SecretString, record: &mut Record) -> BrokerResult<bool> {
        if self.store.may_hold(secret).await? {
            return Ok(true);
        }
        record.discard();
        self.metrics.unknown_secrets.get(()).inc();
        Ok(false)
    }

    /// Counts a freshly minted pair.
    fn count_minted(&self) {
        self.metrics.tokens_issued.get(TokenKind::Access).inc();
        self.metrics.tokens_issued.get(TokenKind::Refresh).inc();
    }

    /// Returns a requested lifetime, the default for 0, or an error over the maximum.
    fn ttl(&self, field: &str, requested: u32, default: u64, max: u64) -> BrokerResult<Duration> {
        match u64::from(requested) {
            0 => Ok(Duration::from_secs(default)),
            n if n <= max => Ok(Duration::from_secs(n)),
            _ => Err(BrokerError::invalid(format!(
                "{field} must be at most {max}"
            ))),
        }
    }
}

/// Turns a verified Cognito identity into the claims a trigger would have asserted, held to
/// the same limits.
fn exchanged_claims(
    identity: crate::identity::cognito::ExchangedIdentity,
) -> BrokerResult<AssertedClaims> {
    let unusable = |_| {
        BrokerError::Unauthenticated(
            "the cognito token's claims are not usable (email, sub or client)",
        )
    };
    Ok(AssertedClaims {
        email: Email::parse(&identity.email).map_err(unusable)?,
        cognito_sub: parse_name("sub", &identity.sub).map_err(unusable)?,
        user_pool_id: parse_name("user_pool_id", &identity.user_pool_id).map_err(unusable)?,
        client_id: identity
            .client_id
            .as_deref()
            .map(|id| parse_name("client_id", id))
            .transpose()
            .map_err(unusable)?
            .flatten(),
        groups: identity
            .groups
            .into_iter()
            .filter(|g| !g.is_empty() && parse_name("group", g).is_ok())
            .take(MAX_GROUPS)
            .collect(),
    })
}

/// Returns the token id a presented secret embeds, if it is one of the broker's own.
/// Records the ids of a minted pair.
fn record_pair(line: &mut Line, pair: &MintedPair) {
    line.account_id = Some(pair.account_id.to_string());
    line.family_id = Some(pair.family_id.to_string());
    line.refresh_token_id = Some(pair.refresh.id.to_string());
    line.access_token_id = Some(pair.access.id.to_string());
}

fn presented_id(secret: &SecretString) -> Option<String> {
    crate::model::secret::parse(secret).map(|parsed| parsed.id.to_string())
}

fn wrong_client(client: &ClientCheck) -> BrokerError {
    BrokerError::PermissionDenied(match client {
        ClientCheck::Exactly(None) => {
            "the token was issued for an app client; name it in client_id".into()
        }
        _ => "the token was issued for another client".into(),
    })
}

fn inactive_refresh() -> BrokerError {
    BrokerError::Unauthenticated("the refresh token is invalid, expired or revoked")
}

fn validate_idempotency_key(key: &str) -> BrokerResult<()> {
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(BrokerError::invalid(format!(
            "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
        )));
    }
    Ok(())
}

/// Returns a SHA-256 over the parts, each length-prefixed so that no two part lists collide.
fn digest_of(parts: &[&[u8]]) -> SecretDigest {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn encode_page_token(cursor: &PageCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", cursor.issued_at.0, cursor.id))
}

fn decode_page_token(token: &str) -> BrokerResult<Option<PageCursor>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || BrokerError::invalid("page_token is not one this broker returned");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    Ok(Some(PageCursor {
        issued_at: UnixMicros(at.parse().map_err(|_| bad())?),
        id: TokenId::parse(id).map_err(|_| bad())?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_rejected() {
        let cursor = PageCursor {
            issued_at: UnixMicros(1_700_000_000_000_000),
            id: TokenId::parse("tok_abc").unwrap(),
        };
        let token = encode_page_token(&cursor);
        assert_eq!(decode_page_token(&token).unwrap(), Some(cursor));
        assert_eq!(decode_page_token("").unwrap(), None);
        for bad in ["%%%", "bm9jb2xvbg", "MTp0b2sgeA"] {
            assert!(decode_page_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digest_parts_do_not_collide_by_concatenation() {
        assert_ne!(digest_of(&[b"ab", b"c"]), digest_of(&[b"a", b"bc"]));
    }
}
