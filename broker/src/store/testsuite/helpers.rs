//! What the cases share: the per-case context and small constructors and checks.

use super::*;

/// One case's store and the clock it reads.
pub(super) struct Ctx {
    pub(super) store: Arc<dyn TokenStore>,
    pub(super) clock: Arc<ManualClock>,
    /// See [`StoreHarness::lists_inactive_tokens`].
    pub(super) lists_inactive: bool,
}

impl Ctx {
    /// Asserts that a revoked (or expired, `state`) token is listed in that state, or, for a
    /// store that deletes such tokens, not listed at all.
    #[track_caller]
    pub(super) fn assert_inactive_listed(
        &self,
        records: &BTreeMap<TokenId, TokenRecord>,
        id: &TokenId,
        state: TokenState,
    ) {
        if self.lists_inactive {
            assert_eq!(records.get(id).map(|r| r.state), Some(state), "{id}");
        } else {
            assert!(!records.contains_key(id), "{id} must be gone from listings");
        }
    }

    pub(super) async fn issue(&self, email: &str) -> MintedPair {
        self.issue_session(session(email)).await
    }

    pub(super) async fn issue_session(&self, session: NewSession) -> MintedPair {
        self.store.issue(session).await.expect("issue succeeds")
    }

    pub(super) async fn introspect(&self, secret: &SecretString) -> Option<TokenInfo> {
        self.store
            .introspect(secret)
            .await
            .expect("introspect succeeds")
    }

    pub(super) async fn is_active(&self, secret: &SecretString) -> bool {
        self.introspect(secret).await.is_some()
    }

    pub(super) async fn refresh(
        &self,
        secret: &SecretString,
        rotation: Rotation,
    ) -> RefreshOutcome {
        self.store
            .refresh(secret, rotation)
            .await
            .expect("refresh succeeds")
    }

    /// Rotates a refresh token that must be active, with the default grace window.
    pub(super) async fn rotate(&self, secret: &SecretString) -> MintedPair {
        rotated(self.refresh(secret, rotation(GRACE)).await)
    }

    pub(super) async fn revoke_secret(
        &self,
        secret: &SecretString,
        client: Option<&str>,
    ) -> SecretRevocation {
        let client = client.map_or(ClientCheck::Any, |c| {
            ClientCheck::Exactly(Some(c.to_owned()))
        });
        self.store
            .revoke_secret(secret, &client)
            .await
            .expect("revoke_secret succeeds")
    }

    pub(super) async fn revoke(&self, target: RevokeTarget) -> u64 {
        self.store.revoke(target).await.expect("revoke succeeds")
    }

    pub(super) async fn account_by_email(&self, address: &str) -> Option<AccountId> {
        self.store
            .account_by_email(&email(address))
            .await
            .expect("account_by_email succeeds")
    }

    /// Returns every page of the account's tokens, following the cursor.
    pub(super) async fn pages(
        &self,
        account: &AccountId,
        size: u32,
        include_inactive: bool,
    ) -> Vec<Vec<TokenRecord>> {
        // A bound on the pages, so a cursor that never ends fails instead of hanging.
        const MAX_PAGES: usize = 1000;
        let mut request = page_request(size, include_inactive);
        let mut pages = Vec::new();
        for _ in 0..MAX_PAGES {
            let page = self
                .store
                .list_tokens(account, request.clone())
                .await
                .expect("list_tokens succeeds");
            pages.push(page.tokens);
            match page.next {
                Some(cursor) => request.after = Some(cursor),
                None => return pages,
            }
        }
        panic!("listing did not end after {MAX_PAGES} pages");
    }

    pub(super) async fn all_tokens(&self, account: &AccountId) -> Vec<TokenRecord> {
        self.pages(account, 500, true)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    pub(super) async fn active_tokens(&self, account: &AccountId) -> Vec<TokenRecord> {
        self.pages(account, 500, false)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    pub(super) async fn family(&self, account: &AccountId, family: &FamilyId) -> Vec<TokenRecord> {
        self.all_tokens(account)
            .await
            .into_iter()
            .filter(|t| &t.family_id == family)
            .collect()
    }

    /// Moves the clock forward to `to`.
    pub(super) fn advance_to(&self, to: UnixMicros) {
        let now = self.clock.now();
        let micros = u64::try_from(to.0 - now.0).expect("the clock only moves forward");
        self.clock.advance(Duration::from_micros(micros));
    }
}

/// Starts `n` refreshes of one secret at once and returns every outcome.
pub(super) async fn concurrent_refreshes(
    ctx: &Ctx,
    secret: &SecretString,
    n: usize,
    grace: Duration,
) -> Vec<RefreshOutcome> {
    let secret = Arc::new(SecretString::from(secret.expose_secret().to_owned()));
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let store = Arc::clone(&ctx.store);
        let secret = Arc::clone(&secret);
        tasks.spawn(async move { store.refresh(&secret, rotation(grace)).await });
    }
    join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("a concurrent refresh must not fail"))
        .collect()
}

pub(super) async fn join_all<T: 'static>(mut tasks: JoinSet<T>) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.unwrap_or_else(|err| panic!("task failed: {}", describe(err))));
    }
    results
}

pub(super) fn email(address: &str) -> Email {
    Email::parse(address).expect("test emails are valid")
}

pub(super) fn session(address: &str) -> NewSession {
    NewSession {
        email: email(address),
        known_account: None,
        cognito_sub: None,
        client_id: Some(CLIENT.to_owned()),
        access_ttl: ACCESS_TTL,
        refresh_ttl: REFRESH_TTL,
        session_ttl: SESSION_TTL,
        metadata: Metadata::new(),
    }
}

pub(super) fn rotation(grace: Duration) -> Rotation {
    Rotation {
        client: ClientCheck::Any,
        access_ttl: ACCESS_TTL,
        refresh_ttl: REFRESH_TTL,
        grace,
        session_ttl: SESSION_TTL,
        replay: None,
    }
}

pub(super) fn page_request(size: u32, include_inactive: bool) -> PageRequest {
    PageRequest {
        size,
        after: None,
        include_inactive,
    }
}

pub(super) fn metadata(entries: &[(&str, &str)]) -> Metadata {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub(super) fn rotated(outcome: RefreshOutcome) -> MintedPair {
    match outcome {
        RefreshOutcome::Rotated(pair) => pair,
        other => panic!("expected a rotation, got {other:?}"),
    }
}

/// A secret shaped like ours whose token does not exist.
pub(super) fn unknown_secret(prefix: &str) -> String {
    format!("{prefix}{}_{}", random_hex(), "Q".repeat(43))
}

/// Returns `value` with its last character replaced by another one of the same alphabet.
pub(super) fn change_last_char(value: &str) -> String {
    let mut changed = value.to_owned();
    let last = changed.pop().expect("secrets are not empty");
    changed.push(if last == 'A' { 'B' } else { 'A' });
    changed
}

/// Returns a prefix of `value` short enough for an assertion message.
pub(super) fn shorten(value: &str) -> String {
    value.chars().take(40).collect()
}

pub(super) fn by_id(records: Vec<TokenRecord>) -> BTreeMap<TokenId, TokenRecord> {
    let count = records.len();
    let map: BTreeMap<TokenId, TokenRecord> =
        records.into_iter().map(|r| (r.id.clone(), r)).collect();
    assert_eq!(map.len(), count, "a token was listed twice");
    map
}

pub(super) fn active_refresh_ids(records: &[TokenRecord]) -> Vec<TokenId> {
    records
        .iter()
        .filter(|t| t.kind == TokenKind::Refresh && t.state == TokenState::Active)
        .map(|t| t.id.clone())
        .collect()
}

/// Asserts the tokens are strictly newest first by (issued_at, id), the cursor's order.
pub(super) fn assert_newest_first(tokens: &[TokenRecord]) {
    for pair in tokens.windows(2) {
        assert!(
            (&pair[0].issued_at, &pair[0].id) > (&pair[1].issued_at, &pair[1].id),
            "tokens must be listed newest first by (issued_at, id): {} then {}",
            pair[0].id,
            pair[1].id
        );
    }
}

/// Asserts `actual` is `expected` or at most `slack` after it.
pub(super) fn assert_within(actual: UnixMicros, expected: UnixMicros, slack: Duration, what: &str) {
    assert!(
        actual >= expected && actual <= expected.plus(slack),
        "{what}: {actual:?} is not within {slack:?} after {expected:?}"
    );
}

pub(super) fn expect_unavailable<T: fmt::Debug>(operation: &str, result: StoreResult<T>) {
    match result {
        Err(err) => assert_eq!(
            err.kind(),
            StoreErrorKind::Unavailable,
            "{operation} after close: {err}"
        ),
        Ok(value) => panic!("{operation} after close must fail as unavailable, got {value:?}"),
    }
}

/// Returns a failed task's panic message, or why it did not finish.
pub(super) fn describe(err: JoinError) -> String {
    if !err.is_panic() {
        return err.to_string();
    }
    let payload: Box<dyn Any + Send> = err.into_panic();
    if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else {
        "panicked with a non-string payload".to_owned()
    }
}
