//! The store conformance suite: the behaviours every [`TokenStore`] backend must show.
//!
//! A backend's tests implement [`StoreHarness`] (open a fresh, empty store on a given clock) and
//! call [`store_test_suite`]. Each case opens its own store and moves time only through the
//! [`ManualClock`], so expiry and grace windows are tested without sleeping. The suite talks to
//! the store through the trait alone, so the Fauna store runs it against its test double just as
//! the embedded store runs it against SQLite files.
//!
//! The cases follow `docs/design.md` "Cognito › Introspection and revocation (RFC 7662, RFC 7009)": anything but an active token introspects as
//! inactive (RFC 7662), revocation is idempotent and a refresh token takes its family with it
//! (RFC 7009), rotation allows one retry of the immediate predecessor within a grace window and
//! treats any other reuse as theft, concurrent requests never fork a family, and revoking an
//! account is a not-before watermark.

use std::{
    any::Any,
    collections::{BTreeMap, HashSet},
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::{JoinError, JoinSet};

use super::{StoreErrorKind, StoreResult, TokenStore};
use crate::{
    model::clock::{Clock, ManualClock},
    model::{
        AccountId, Email, FamilyId, Metadata, MintedPair, NewSession, PageRequest, RefreshOutcome,
        RevokeTarget, Rotation, SecretRevocation, TokenId, TokenInfo, TokenKind, TokenPage,
        TokenRecord, TokenState, UnixMicros, random_hex,
    },
};

/// Opens a fresh, empty store whose notion of "now" is the given clock.
#[async_trait]
pub trait StoreHarness: Send + Sync {
    /// Returns a new store with no accounts and no tokens, reading the time from `clock`.
    async fn open(&self, clock: Arc<ManualClock>) -> Arc<dyn TokenStore>;

    /// Whether revoked and expired tokens stay listable (as `Revoked` and `Expired`). A store
    /// that deletes them — Fauna deletes revoked token documents and hides expired ones — says
    /// no, and the suite then expects them to be absent from listings instead. Every other
    /// behaviour is the same.
    fn lists_inactive_tokens(&self) -> bool {
        true
    }
}

/// Runs every conformance case against fresh stores from `harness`.
///
/// Every case runs to the end, even after another one failed, so one run reports every broken
/// behaviour.
///
/// # Panics
///
/// Panics after the last case if any case failed (an assertion, an unexpected store error, or no
/// answer within a minute), naming each failed case with its message.
pub async fn store_test_suite(harness: &dyn StoreHarness) {
    let cases = cases();
    let total = cases.len();
    let mut failures = Vec::new();
    for (name, case) in cases {
        let clock = Arc::new(ManualClock::new());
        let store = harness.open(Arc::clone(&clock)).await;
        let lists_inactive = harness.lists_inactive_tokens();
        // A task of its own turns a failed assertion into a JoinError we can name, instead of
        // unwinding through the whole suite.
        let task = tokio::spawn(case(Ctx {
            store,
            clock,
            lists_inactive,
        }));
        let abort = task.abort_handle();
        match tokio::time::timeout(CASE_TIMEOUT, task).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                // Indent the message's own lines (assertion left/right) under the case name.
                let message = describe(err).replace('\n', "\n      ");
                failures.push(format!("{name}: {message}"));
            }
            Err(_) => {
                abort.abort();
                failures.push(format!("{name}: no result within {CASE_TIMEOUT:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "store conformance suite: {} of {total} cases failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// A deadlock guard, not a speed assertion: every case takes milliseconds.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// The app client every session is issued for unless a case says otherwise.
const CLIENT: &str = "app-1";
/// Another app client.
const OTHER_CLIENT: &str = "app-2";
/// Default lifetimes, as the broker's defaults.
const ACCESS_TTL: Duration = Duration::from_secs(600);
const REFRESH_TTL: Duration = Duration::from_secs(3600);
/// The grace window most rotation cases use.
const GRACE: Duration = Duration::from_secs(10);
/// How far a store's write time may run ahead of its clock (the embedded store stamps writes
/// with strictly increasing microseconds, so a stopped clock is passed by a few of them).
const STAMP_SLACK: Duration = Duration::from_secs(1);

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type Case = fn(Ctx) -> CaseFuture;

/// Lists the cases as (name, function); the name is the function's name.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        vec![$((stringify!($case), (|ctx: Ctx| -> CaseFuture { Box::pin($case(ctx)) }) as Case)),*]
    };
}

fn cases() -> Vec<(&'static str, Case)> {
    cases![
        // issue
        issuing_twice_for_one_email_reuses_the_account_in_new_families,
        issued_pair_introspects_with_its_facts,
        known_account_is_used_without_a_lookup,
        // introspection of anything but an active token
        malformed_and_unknown_secrets_are_inactive_everywhere,
        altered_secrets_are_inactive,
        token_is_inactive_from_its_expiry_time,
        // refresh
        refresh_rotates_into_a_new_pair_in_the_same_family,
        access_secret_cannot_refresh,
        expired_refresh_token_cannot_refresh,
        consumed_refresh_token_after_its_expiry_is_inactive_not_reuse,
        revoked_refresh_token_cannot_refresh,
        refresh_for_another_client_is_refused_and_changes_nothing,
        // grace window and reuse detection
        retrying_the_predecessor_within_grace_supersedes_its_successor,
        grace_window_counts_from_the_first_rotation,
        reusing_an_older_generation_within_grace_revokes_the_family,
        reusing_a_refresh_token_after_grace_revokes_only_its_family,
        // concurrency
        concurrent_first_sign_ins_create_one_account,
        concurrent_refreshes_within_grace_leave_one_live_refresh_token,
        concurrent_refreshes_without_grace_rotate_once_and_revoke_the_family,
        // revocation
        revoking_an_access_secret_revokes_only_it,
        revoking_a_refresh_secret_ends_its_family,
        revoking_another_clients_secret_leaves_it_active,
        revoking_by_token_id_cascades_only_from_refresh_tokens,
        revoking_a_family_revokes_every_token_in_it,
        revoking_an_account_is_a_watermark,
        revoking_unknown_targets_revokes_nothing,
        // accounts and listing
        account_by_email_finds_only_issued_accounts,
        listing_pages_newest_first_and_visits_every_token_once,
        listing_reports_states_links_and_metadata,
        listing_an_unknown_account_is_empty,
        // shutdown
        operations_after_close_fail_as_unavailable,
    ]
}

// ---------------------------------------------------------------------------------------------
// issue
// ---------------------------------------------------------------------------------------------

async fn issuing_twice_for_one_email_reuses_the_account_in_new_families(ctx: Ctx) {
    // Email::parse normalises, so both sessions carry "alice@example.com".
    let first = ctx.issue(" Alice@Example.COM ").await;
    let second = ctx.issue("alice@example.com").await;
    assert_eq!(
        first.account_id, second.account_id,
        "one email must map to one account"
    );
    assert_ne!(
        first.family_id, second.family_id,
        "every issue must start a new family"
    );
    let ids: HashSet<&TokenId> = [
        &first.refresh.id,
        &first.access.id,
        &second.refresh.id,
        &second.access.id,
    ]
    .into_iter()
    .collect();
    assert_eq!(ids.len(), 4, "token ids must be unique");
    let secrets: HashSet<&str> = [
        &first.refresh.secret,
        &first.access.secret,
        &second.refresh.secret,
        &second.access.secret,
    ]
    .into_iter()
    .map(ExposeSecret::expose_secret)
    .collect();
    assert_eq!(secrets.len(), 4, "secrets must be unique");

    let bob = ctx.issue("bob@example.com").await;
    assert_ne!(
        bob.account_id, first.account_id,
        "another email must get another account"
    );
}

async fn issued_pair_introspects_with_its_facts(ctx: Ctx) {
    let before = ctx.clock.now();
    let mut request = session("carol@example.com");
    request.cognito_sub = Some("sub-carol".to_owned());
    let pair = ctx.issue_session(request).await;

    for (token, kind, ttl) in [
        (&pair.access, TokenKind::Access, ACCESS_TTL),
        (&pair.refresh, TokenKind::Refresh, REFRESH_TTL),
    ] {
        let info = ctx
            .introspect(&token.secret)
            .await
            .unwrap_or_else(|| panic!("a fresh {kind:?} token must be active"));
        assert_eq!(info.id, token.id, "{kind:?}: id");
        assert_eq!(info.kind, kind, "{kind:?}: kind");
        assert_eq!(info.account_id, pair.account_id, "{kind:?}: account");
        assert_eq!(info.email.as_str(), "carol@example.com", "{kind:?}: email");
        assert_eq!(
            info.cognito_sub.as_deref(),
            Some("sub-carol"),
            "{kind:?}: cognito_sub"
        );
        assert_eq!(info.family_id, pair.family_id, "{kind:?}: family");
        assert_eq!(
            info.client_id.as_deref(),
            Some(CLIENT),
            "{kind:?}: client_id"
        );
        assert_eq!(
            info.expires_at, token.expires_at,
            "{kind:?}: introspected expiry must be the minted one"
        );
        assert_within(
            info.issued_at,
            before,
            STAMP_SLACK,
            &format!("{kind:?}: issued_at"),
        );
        assert_within(
            info.expires_at,
            before.plus(ttl),
            STAMP_SLACK,
            &format!("{kind:?}: expires_at"),
        );
    }
    assert_eq!(
        ctx.account_by_email("carol@example.com").await,
        Some(pair.account_id),
        "issue must create the account"
    );
}

async fn known_account_is_used_without_a_lookup(ctx: Ctx) {
    let first = ctx.issue("dave@example.com").await;

    let mut request = session("dave@example.com");
    request.known_account = Some(first.account_id.clone());
    let second = ctx.issue_session(request).await;
    assert_eq!(second.account_id, first.account_id);
    assert_ne!(second.family_id, first.family_id);
    let info = ctx
        .introspect(&second.access.secret)
        .await
        .expect("a token issued for a known account must be active");
    assert_eq!(info.account_id, first.account_id);
    assert_eq!(info.family_id, second.family_id);

    // The known account wins over the email: no get-or-create runs for it.
    let mut request = session("erin@example.com");
    request.known_account = Some(first.account_id.clone());
    let third = ctx.issue_session(request).await;
    assert_eq!(
        third.account_id, first.account_id,
        "the known account must be used"
    );
    assert_eq!(
        ctx.account_by_email("erin@example.com").await,
        None,
        "a known account must skip the account lookup and creation"
    );
}

// ---------------------------------------------------------------------------------------------
// introspection of anything but an active token
// ---------------------------------------------------------------------------------------------

async fn malformed_and_unknown_secrets_are_inactive_everywhere(ctx: Ctx) {
    // A live pair, so "inactive" cannot come from an empty store.
    let pair = ctx.issue("frank@example.com").await;
    let long = format!("tba_{}_{}", "0".repeat(32), "a".repeat(600));
    let candidates = [
        String::new(),
        "garbage".to_owned(),
        "Bearer tba_".to_owned(),
        // JWT-shaped: header.payload.signature
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl".to_owned(),
        // Fauna-shaped
        "fnEAbCdEfGhIjKlMnOpQrStUvWxYz0123456789".to_owned(),
        "tba_".to_owned(),
        "tbr_xyz_abc".to_owned(),
        format!("tbx_{}_{}", random_hex(), "A".repeat(43)),
        long,
        // Well-formed, but no such token.
        unknown_secret("tba_"),
        unknown_secret("tbr_"),
        // A live token's id with made-up randomness.
        format!(
            "tba_{}_{}",
            pair.access.id.as_str().trim_start_matches("tok_"),
            "A".repeat(43)
        ),
    ];
    for candidate in candidates {
        let secret = SecretString::from(candidate.clone());
        let shown = shorten(&candidate);
        assert_eq!(
            ctx.introspect(&secret).await,
            None,
            "{shown:?} must introspect inactive"
        );
        let outcome = ctx.refresh(&secret, rotation(GRACE)).await;
        assert!(
            matches!(outcome, RefreshOutcome::Inactive),
            "{shown:?} must not refresh, got {outcome:?}"
        );
        for client in [None, Some(CLIENT)] {
            assert_eq!(
                ctx.revoke_secret(&secret, client).await,
                SecretRevocation::NotActive,
                "{shown:?} revoked with client {client:?}"
            );
        }
    }
    assert!(ctx.is_active(&pair.access.secret).await);
    assert!(ctx.is_active(&pair.refresh.secret).await);
}

async fn altered_secrets_are_inactive(ctx: Ctx) {
    let pair = ctx.issue("grace@example.com").await;
    for (name, secret) in [
        ("access", &pair.access.secret),
        ("refresh", &pair.refresh.secret),
    ] {
        let value = secret.expose_secret();
        let swapped_prefix = if let Some(rest) = value.strip_prefix("tba_") {
            format!("tbr_{rest}")
        } else {
            format!("tba_{}", &value[4..])
        };
        let mut id_changed = value.to_owned();
        // The first hex digit of the embedded id.
        let digit = if value.as_bytes()[4] == b'0' {
            "1"
        } else {
            "0"
        };
        id_changed.replace_range(4..5, digit);
        let altered = [
            ("last character changed", change_last_char(value)),
            ("embedded id changed", id_changed),
            ("kind prefix swapped", swapped_prefix),
            ("truncated", value[..value.len() - 1].to_owned()),
            ("extended", format!("{value}A")),
            ("upper-cased", value.to_uppercase()),
        ];
        for (how, candidate) in altered {
            let candidate = SecretString::from(candidate);
            assert_eq!(
                ctx.introspect(&candidate).await,
                None,
                "{name} secret with {how} must be inactive"
            );
            let outcome = ctx.refresh(&candidate, rotation(GRACE)).await;
            assert!(
                matches!(outcome, RefreshOutcome::Inactive),
                "{name} secret with {how} must not refresh, got {outcome:?}"
            );
            assert_eq!(
                ctx.revoke_secret(&candidate, None).await,
                SecretRevocation::NotActive,
                "{name} secret with {how} must not revoke anything"
            );
        }
    }
    assert!(ctx.is_active(&pair.access.secret).await);
    assert!(ctx.is_active(&pair.refresh.secret).await);
}

async fn token_is_inactive_from_its_expiry_time(ctx: Ctx) {
    let mut request = session("heidi@example.com");
    request.access_ttl = Duration::from_secs(60);
    request.refresh_ttl = Duration::from_secs(120);
    let pair = ctx.issue_session(request).await;

    ctx.advance_to(pair.access.expires_at.minus(Duration::from_secs(1)));
    assert!(
        ctx.is_active(&pair.access.secret).await,
        "an access token must be active one second before it expires"
    );
    ctx.advance_to(pair.access.expires_at);
    assert!(
        !ctx.is_active(&pair.access.secret).await,
        "an access token must be inactive at its expiry time"
    );
    assert!(ctx.is_active(&pair.refresh.secret).await);
    assert_eq!(
        ctx.revoke_secret(&pair.access.secret, None).await,
        SecretRevocation::NotActive,
        "an expired token has nothing left to revoke"
    );

    ctx.advance_to(pair.refresh.expires_at);
    assert!(
        !ctx.is_active(&pair.refresh.secret).await,
        "a refresh token must be inactive at its expiry time"
    );
    assert!(
        ctx.active_tokens(&pair.account_id).await.is_empty(),
        "expired tokens must not be listed as active"
    );
    let all = ctx.all_tokens(&pair.account_id).await;
    // A store may already have collected expired tokens; those it still lists are expired.
    for record in &all {
        assert_eq!(record.state, TokenState::Expired, "{}", record.id);
    }
    assert_eq!(
        ctx.revoke(RevokeTarget::Account(pair.account_id)).await,
        0,
        "expired tokens must not count as revoked"
    );
}

// ---------------------------------------------------------------------------------------------
// refresh
// ---------------------------------------------------------------------------------------------

async fn refresh_rotates_into_a_new_pair_in_the_same_family(ctx: Ctx) {
    let mut request = session("ivan@example.com");
    request.metadata = metadata(&[("device", "phone"), ("app", "ios")]);
    let first = ctx.issue_session(request.clone()).await;

    let mut rotation = rotation(GRACE);
    rotation.client_id = Some(CLIENT.to_owned());
    rotation.access_ttl = Duration::from_secs(30);
    let before = ctx.clock.now();
    let second = rotated(ctx.refresh(&first.refresh.secret, rotation).await);
    assert_eq!(second.account_id, first.account_id);
    assert_eq!(
        second.family_id, first.family_id,
        "rotation must stay in the family"
    );
    assert_ne!(second.refresh.id, first.refresh.id);
    assert_ne!(second.access.id, first.access.id);
    assert_within(
        second.access.expires_at,
        before.plus(Duration::from_secs(30)),
        STAMP_SLACK,
        "the new access token's lifetime comes from the rotation",
    );

    let new_refresh = ctx
        .introspect(&second.refresh.secret)
        .await
        .expect("the new refresh token must be active");
    assert_eq!(new_refresh.kind, TokenKind::Refresh);
    assert_eq!(new_refresh.family_id, first.family_id);
    let new_access = ctx
        .introspect(&second.access.secret)
        .await
        .expect("the new access token must be active");
    assert_eq!(new_access.kind, TokenKind::Access);
    assert_eq!(new_access.client_id.as_deref(), Some(CLIENT));
    assert_eq!(new_access.expires_at, second.access.expires_at);

    assert!(
        !ctx.is_active(&first.refresh.secret).await,
        "a rotated refresh token is consumed"
    );
    assert!(
        ctx.is_active(&first.access.secret).await,
        "rotation leaves earlier access tokens to expire on their own"
    );

    let records = by_id(ctx.all_tokens(&first.account_id).await);
    assert_eq!(records.len(), 4);
    let old_refresh = &records[&first.refresh.id];
    assert_eq!(old_refresh.state, TokenState::Rotated);
    assert_eq!(old_refresh.replaced_by.as_ref(), Some(&second.refresh.id));
    assert!(
        old_refresh.revoked_at.is_some(),
        "a rotated token reports when it was rotated"
    );
    assert_eq!(records[&first.access.id].state, TokenState::Active);
    assert_eq!(
        records[&first.access.id].parent_id.as_ref(),
        Some(&first.refresh.id)
    );
    assert_eq!(records[&second.refresh.id].state, TokenState::Active);
    assert_eq!(records[&second.refresh.id].parent_id, None);
    assert_eq!(records[&second.refresh.id].replaced_by, None);
    assert_eq!(records[&second.access.id].state, TokenState::Active);
    assert_eq!(
        records[&second.access.id].parent_id.as_ref(),
        Some(&second.refresh.id)
    );
    for record in records.values() {
        assert_eq!(record.family_id, first.family_id, "{}", record.id);
        assert_eq!(record.client_id.as_deref(), Some(CLIENT), "{}", record.id);
        assert_eq!(
            record.metadata, request.metadata,
            "{}: metadata carries over rotation",
            record.id
        );
    }
}

async fn access_secret_cannot_refresh(ctx: Ctx) {
    let pair = ctx.issue("judy@example.com").await;
    let outcome = ctx.refresh(&pair.access.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "an access secret must not refresh, got {outcome:?}"
    );
    assert!(ctx.is_active(&pair.access.secret).await);
    assert!(ctx.is_active(&pair.refresh.secret).await);
    assert_eq!(
        ctx.all_tokens(&pair.account_id).await.len(),
        2,
        "nothing minted"
    );
    ctx.rotate(&pair.refresh.secret).await;
}

async fn expired_refresh_token_cannot_refresh(ctx: Ctx) {
    let mut request = session("karl@example.com");
    request.refresh_ttl = Duration::from_secs(120);
    let pair = ctx.issue_session(request).await;
    ctx.advance_to(pair.refresh.expires_at.plus(Duration::from_secs(1)));
    let outcome = ctx.refresh(&pair.refresh.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "an expired refresh token must not refresh, got {outcome:?}"
    );
    assert!(
        ctx.all_tokens(&pair.account_id).await.len() <= 2,
        "nothing minted"
    );
}

async fn consumed_refresh_token_after_its_expiry_is_inactive_not_reuse(ctx: Ctx) {
    let mut request = session("kurt@example.com");
    request.refresh_ttl = Duration::from_secs(120);
    let pair = ctx.issue_session(request).await;
    let next = ctx.rotate(&pair.refresh.secret).await;
    ctx.advance_to(pair.refresh.expires_at.plus(Duration::from_secs(1)));
    let outcome = ctx.refresh(&pair.refresh.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "an expired, consumed refresh token is just inactive, got {outcome:?}"
    );
    assert!(
        ctx.is_active(&next.refresh.secret).await,
        "the session it belonged to goes on"
    );
}

async fn revoked_refresh_token_cannot_refresh(ctx: Ctx) {
    let pair = ctx.issue("lena@example.com").await;
    assert_eq!(ctx.revoke(RevokeTarget::Family(pair.family_id)).await, 2);
    let outcome = ctx.refresh(&pair.refresh.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "a revoked refresh token must not refresh, got {outcome:?}"
    );
    assert_eq!(
        ctx.all_tokens(&pair.account_id).await.len(),
        if ctx.lists_inactive { 2 } else { 0 },
        "nothing minted"
    );
}

async fn refresh_for_another_client_is_refused_and_changes_nothing(ctx: Ctx) {
    let pair = ctx.issue("mike@example.com").await;
    let before = ctx.all_tokens(&pair.account_id).await;

    let mut wrong = rotation(GRACE);
    wrong.client_id = Some(OTHER_CLIENT.to_owned());
    let outcome = ctx.refresh(&pair.refresh.secret, wrong).await;
    assert!(
        matches!(outcome, RefreshOutcome::WrongClient),
        "another client's refresh token must be refused, got {outcome:?}"
    );
    assert_eq!(
        ctx.all_tokens(&pair.account_id).await,
        before,
        "a refused refresh must change nothing"
    );
    assert!(ctx.is_active(&pair.refresh.secret).await);
    assert!(ctx.is_active(&pair.access.secret).await);

    let mut right = rotation(GRACE);
    right.client_id = Some(CLIENT.to_owned());
    let next = rotated(ctx.refresh(&pair.refresh.secret, right).await);
    assert_eq!(next.family_id, pair.family_id);
}

// ---------------------------------------------------------------------------------------------
// grace window and reuse detection
// ---------------------------------------------------------------------------------------------

async fn retrying_the_predecessor_within_grace_supersedes_its_successor(ctx: Ctx) {
    let first = ctx.issue("nina@example.com").await;
    let second = ctx.rotate(&first.refresh.secret).await;
    ctx.clock.advance(GRACE / 2);

    // The client never saw `second` (a lost answer) and retries with `first`.
    let third = rotated(ctx.refresh(&first.refresh.secret, rotation(GRACE)).await);
    assert_eq!(
        third.family_id, first.family_id,
        "a retry stays in the family"
    );
    assert_ne!(third.refresh.id, second.refresh.id);
    assert!(
        !ctx.is_active(&second.refresh.secret).await,
        "the superseded successor must be inactive"
    );
    assert!(
        !ctx.is_active(&second.access.secret).await,
        "the superseded successor's access token must be inactive"
    );
    assert!(ctx.is_active(&third.refresh.secret).await);
    assert!(ctx.is_active(&third.access.secret).await);
    assert!(!ctx.is_active(&first.refresh.secret).await);
    assert!(
        ctx.is_active(&first.access.secret).await,
        "the predecessor's own access token is not part of the superseded rotation"
    );

    let family = ctx.family(&first.account_id, &first.family_id).await;
    let live = active_refresh_ids(&family);
    assert_eq!(
        live,
        vec![third.refresh.id.clone()],
        "exactly one live refresh token"
    );
    let records = by_id(family);
    ctx.assert_inactive_listed(&records, &second.refresh.id, TokenState::Revoked);
    ctx.assert_inactive_listed(&records, &second.access.id, TokenState::Revoked);
    assert_eq!(records[&first.refresh.id].state, TokenState::Rotated);
    assert_eq!(
        records[&first.refresh.id].replaced_by.as_ref(),
        Some(&third.refresh.id),
        "the predecessor now points at the successor that replaced the superseded one"
    );

    // The superseded token was revoked, not consumed: presenting it is simply inactive.
    let outcome = ctx.refresh(&second.refresh.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "a superseded successor must be inactive, got {outcome:?}"
    );
    assert!(ctx.is_active(&third.refresh.secret).await);
    let fourth = ctx.rotate(&third.refresh.secret).await;
    assert_eq!(fourth.family_id, first.family_id);
}

async fn grace_window_counts_from_the_first_rotation(ctx: Ctx) {
    let first = ctx.issue("oscar@example.com").await;
    ctx.rotate(&first.refresh.secret).await;
    let step = GRACE * 3 / 5;
    ctx.clock.advance(step);
    let retry = rotated(ctx.refresh(&first.refresh.secret, rotation(GRACE)).await);

    // 1.2 × grace after the rotation, though only 0.6 × grace after the retry: retries must not
    // stretch the window forever.
    ctx.clock.advance(step);
    let outcome = ctx.refresh(&first.refresh.secret, rotation(GRACE)).await;
    match outcome {
        RefreshOutcome::ReuseDetected { family_id, revoked } => {
            assert_eq!(family_id, first.family_id);
            assert_eq!(
                revoked, 3,
                "the retry's pair and the first access token were active"
            );
        }
        other => panic!("reuse after the window must be detected, got {other:?}"),
    }
    assert!(!ctx.is_active(&retry.refresh.secret).await);
    assert!(!ctx.is_active(&retry.access.secret).await);
    assert!(!ctx.is_active(&first.access.secret).await);
}

async fn reusing_an_older_generation_within_grace_revokes_the_family(ctx: Ctx) {
    let first = ctx.issue("peggy@example.com").await;
    let second = ctx.rotate(&first.refresh.secret).await;
    let third = ctx.rotate(&second.refresh.secret).await;

    // `first` is two generations old: not a retry of a lost answer, but a leaked token.
    let outcome = ctx.refresh(&first.refresh.secret, rotation(GRACE)).await;
    match outcome {
        RefreshOutcome::ReuseDetected { family_id, revoked } => {
            assert_eq!(family_id, first.family_id);
            assert_eq!(
                revoked, 4,
                "first.access, second.access and third's pair were active"
            );
        }
        other => panic!("reuse of an older generation must be detected, got {other:?}"),
    }
    for (name, secret) in [
        ("first.access", &first.access.secret),
        ("second.access", &second.access.secret),
        ("third.refresh", &third.refresh.secret),
        ("third.access", &third.access.secret),
    ] {
        assert!(
            !ctx.is_active(secret).await,
            "{name} must be revoked with its family"
        );
    }
    let family = ctx.family(&first.account_id, &first.family_id).await;
    assert!(
        family.iter().all(|t| t.state != TokenState::Active),
        "no token of the family may stay active: {family:#?}"
    );
    let outcome = ctx.refresh(&third.refresh.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "the newest refresh token of a revoked family must be inactive, got {outcome:?}"
    );
}

async fn reusing_a_refresh_token_after_grace_revokes_only_its_family(ctx: Ctx) {
    let other = ctx.issue("quinn@example.com").await;
    let first = ctx.issue("quinn@example.com").await;
    let second = ctx.rotate(&first.refresh.secret).await;
    ctx.clock.advance(GRACE + Duration::from_secs(1));

    let outcome = ctx.refresh(&first.refresh.secret, rotation(GRACE)).await;
    match outcome {
        RefreshOutcome::ReuseDetected { family_id, revoked } => {
            assert_eq!(family_id, first.family_id);
            assert_eq!(revoked, 3, "first.access and second's pair were active");
        }
        other => panic!("reuse after the grace window must be detected, got {other:?}"),
    }
    assert!(!ctx.is_active(&second.refresh.secret).await);
    assert!(!ctx.is_active(&second.access.secret).await);
    assert!(!ctx.is_active(&first.access.secret).await);

    assert_eq!(other.account_id, first.account_id);
    assert!(
        ctx.is_active(&other.refresh.secret).await,
        "another family of the account must stay active"
    );
    assert!(ctx.is_active(&other.access.secret).await);
    ctx.rotate(&other.refresh.secret).await;
}

// ---------------------------------------------------------------------------------------------
// concurrency
// ---------------------------------------------------------------------------------------------

async fn concurrent_first_sign_ins_create_one_account(ctx: Ctx) {
    const SIGN_INS: usize = 100;
    let mut tasks = JoinSet::new();
    for _ in 0..SIGN_INS {
        let store = Arc::clone(&ctx.store);
        tasks.spawn(async move { store.issue(session("rita@example.com")).await });
    }
    let pairs: Vec<MintedPair> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("a concurrent issue must succeed"))
        .collect();
    let accounts: HashSet<&AccountId> = pairs.iter().map(|p| &p.account_id).collect();
    assert_eq!(
        accounts.len(),
        1,
        "{SIGN_INS} concurrent first sign-ins must create one account, got {accounts:?}"
    );
    let families: HashSet<&FamilyId> = pairs.iter().map(|p| &p.family_id).collect();
    assert_eq!(
        families.len(),
        SIGN_INS,
        "every sign-in gets its own family"
    );
    let account = pairs[0].account_id.clone();
    assert_eq!(
        ctx.account_by_email("rita@example.com").await,
        Some(account.clone())
    );
    assert_eq!(ctx.all_tokens(&account).await.len(), 2 * SIGN_INS);
}

async fn concurrent_refreshes_within_grace_leave_one_live_refresh_token(ctx: Ctx) {
    const REFRESHES: usize = 50;
    let first = ctx.issue("sam@example.com").await;
    let outcomes = concurrent_refreshes(&ctx, &first.refresh.secret, REFRESHES, GRACE).await;

    // Serialised, every refresh after the first is a retry of the immediate predecessor within
    // the window: each one rotates and supersedes the one before.
    let pairs: Vec<MintedPair> = outcomes
        .into_iter()
        .map(|outcome| match outcome {
            RefreshOutcome::Rotated(pair) => pair,
            other => panic!("every retry within grace must rotate, got {other:?}"),
        })
        .collect();
    for pair in &pairs {
        assert_eq!(
            pair.family_id, first.family_id,
            "no rotation may fork the family"
        );
    }
    let family = ctx.family(&first.account_id, &first.family_id).await;
    // Every rotation is recorded; a store that deletes revoked tokens keeps the first pair and
    // the last successor only (each retry deleted the successor it superseded).
    let recorded = if ctx.lists_inactive {
        2 + 2 * REFRESHES
    } else {
        4
    };
    assert_eq!(family.len(), recorded, "every rotation is recorded");
    let live = active_refresh_ids(&family);
    assert_eq!(
        live.len(),
        1,
        "exactly one live refresh token must remain, got {live:?}"
    );

    let mut live_pairs = Vec::new();
    for pair in &pairs {
        let refresh = ctx.is_active(&pair.refresh.secret).await;
        let access = ctx.is_active(&pair.access.secret).await;
        assert_eq!(
            refresh, access,
            "a superseded pair loses both tokens, the live pair keeps both"
        );
        if refresh {
            live_pairs.push(&pair.refresh.id);
        }
    }
    assert_eq!(
        live_pairs,
        vec![&live[0]],
        "the live refresh token is one that was handed out"
    );
    assert!(!ctx.is_active(&first.refresh.secret).await);
    assert!(ctx.is_active(&first.access.secret).await);
}

async fn concurrent_refreshes_without_grace_rotate_once_and_revoke_the_family(ctx: Ctx) {
    const REFRESHES: usize = 50;
    let first = ctx.issue("tina@example.com").await;
    let outcomes =
        concurrent_refreshes(&ctx, &first.refresh.secret, REFRESHES, Duration::ZERO).await;

    // Serialised, the first rotates; the second is reuse outside a zero window and revokes the
    // family (first.access and the new pair); the rest find a consumed or revoked token.
    let mut rotated = 0;
    let mut reuses = 0;
    let mut revoked = 0;
    for outcome in &outcomes {
        match outcome {
            RefreshOutcome::Rotated(pair) => {
                rotated += 1;
                assert_eq!(pair.family_id, first.family_id);
            }
            RefreshOutcome::ReuseDetected {
                family_id,
                revoked: n,
            } => {
                reuses += 1;
                revoked += n;
                assert_eq!(*family_id, first.family_id);
            }
            RefreshOutcome::Inactive => {}
            RefreshOutcome::WrongClient => panic!("no client was given, got WrongClient"),
        }
    }
    assert_eq!(rotated, 1, "exactly one refresh may rotate without grace");
    assert!(reuses >= 1, "the reuse must be detected");
    assert_eq!(
        revoked, 3,
        "the reuse revokes first.access and the new pair, once"
    );
    let family = ctx.family(&first.account_id, &first.family_id).await;
    assert_eq!(
        family.len(),
        if ctx.lists_inactive { 4 } else { 0 },
        "one rotation minted one pair, and the reuse revoked the family"
    );
    assert!(
        family.iter().all(|t| t.state != TokenState::Active),
        "no token of the family may stay active: {family:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// revocation
// ---------------------------------------------------------------------------------------------

async fn revoking_an_access_secret_revokes_only_it(ctx: Ctx) {
    let pair = ctx.issue("uma@example.com").await;
    assert_eq!(
        ctx.revoke_secret(&pair.access.secret, Some(CLIENT)).await,
        SecretRevocation::Revoked(1)
    );
    assert!(!ctx.is_active(&pair.access.secret).await);
    assert!(
        ctx.is_active(&pair.refresh.secret).await,
        "revoking an access token leaves its refresh token"
    );
    assert_eq!(
        ctx.revoke_secret(&pair.access.secret, Some(CLIENT)).await,
        SecretRevocation::NotActive,
        "revocation is idempotent"
    );
    let records = by_id(ctx.all_tokens(&pair.account_id).await);
    ctx.assert_inactive_listed(&records, &pair.access.id, TokenState::Revoked);
    if ctx.lists_inactive {
        assert!(records[&pair.access.id].revoked_at.is_some());
    }
    assert_eq!(records[&pair.refresh.id].state, TokenState::Active);
    ctx.rotate(&pair.refresh.secret).await;
}

async fn revoking_a_refresh_secret_ends_its_family(ctx: Ctx) {
    let other = ctx.issue("victor@example.com").await;
    let first = ctx.issue("victor@example.com").await;
    let second = ctx.rotate(&first.refresh.secret).await;

    assert_eq!(
        ctx.revoke_secret(&second.refresh.secret, None).await,
        SecretRevocation::Revoked(3),
        "first.access and second's pair were active"
    );
    for (name, secret) in [
        ("first.access", &first.access.secret),
        ("second.refresh", &second.refresh.secret),
        ("second.access", &second.access.secret),
    ] {
        assert!(
            !ctx.is_active(secret).await,
            "{name} must be revoked with its family"
        );
    }
    assert!(
        ctx.is_active(&other.refresh.secret).await,
        "another family stays active"
    );
    assert!(ctx.is_active(&other.access.secret).await);
    assert_eq!(
        ctx.revoke_secret(&second.refresh.secret, None).await,
        SecretRevocation::NotActive,
        "revocation is idempotent"
    );
    assert_eq!(
        ctx.revoke_secret(&first.refresh.secret, None).await,
        SecretRevocation::NotActive,
        "a consumed refresh token is not active"
    );
    let outcome = ctx.refresh(&second.refresh.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "a revoked refresh token must not refresh, got {outcome:?}"
    );
    assert!(ctx.is_active(&other.refresh.secret).await);
}

async fn revoking_another_clients_secret_leaves_it_active(ctx: Ctx) {
    let pair = ctx.issue("wendy@example.com").await;
    for (name, secret) in [
        ("access", &pair.access.secret),
        ("refresh", &pair.refresh.secret),
    ] {
        assert_eq!(
            ctx.revoke_secret(secret, Some(OTHER_CLIENT)).await,
            SecretRevocation::WrongClient,
            "{name} token of another client"
        );
        assert!(
            ctx.is_active(secret).await,
            "{name} token must survive another client's revocation"
        );
    }
    assert!(ctx.is_active(&pair.access.secret).await);
    assert_eq!(
        ctx.revoke_secret(&pair.refresh.secret, Some(CLIENT)).await,
        SecretRevocation::Revoked(2)
    );
    assert!(!ctx.is_active(&pair.access.secret).await);
}

async fn revoking_by_token_id_cascades_only_from_refresh_tokens(ctx: Ctx) {
    let a = ctx.issue("xavier@example.com").await;
    assert_eq!(
        ctx.revoke(RevokeTarget::Token(a.access.id.clone())).await,
        1
    );
    assert!(!ctx.is_active(&a.access.secret).await);
    assert!(
        ctx.is_active(&a.refresh.secret).await,
        "an access token's revocation does not cascade"
    );
    assert_eq!(
        ctx.revoke(RevokeTarget::Token(a.access.id.clone())).await,
        0,
        "idempotent"
    );

    let b = ctx.issue("xavier@example.com").await;
    assert_eq!(
        ctx.revoke(RevokeTarget::Token(b.refresh.id.clone())).await,
        2
    );
    assert!(!ctx.is_active(&b.refresh.secret).await);
    assert!(
        !ctx.is_active(&b.access.secret).await,
        "a refresh token takes its access token with it"
    );
    assert_eq!(
        ctx.revoke(RevokeTarget::Token(b.refresh.id.clone())).await,
        0
    );
    assert_eq!(
        ctx.revoke(RevokeTarget::Token(b.access.id.clone())).await,
        0
    );

    let c = ctx.issue("xavier@example.com").await;
    let c2 = ctx.rotate(&c.refresh.secret).await;
    assert_eq!(
        ctx.revoke(RevokeTarget::Token(c2.refresh.id.clone())).await,
        3,
        "a refresh token ends its family: c.access and c2's pair"
    );
    assert!(!ctx.is_active(&c.access.secret).await);
    assert!(!ctx.is_active(&c2.access.secret).await);
    assert!(
        ctx.is_active(&a.refresh.secret).await,
        "other families are untouched"
    );
}

async fn revoking_a_family_revokes_every_token_in_it(ctx: Ctx) {
    let other = ctx.issue("yara@example.com").await;
    let first = ctx.issue("yara@example.com").await;
    let second = ctx.rotate(&first.refresh.secret).await;
    assert_eq!(
        ctx.revoke(RevokeTarget::Family(first.family_id.clone()))
            .await,
        3,
        "first.access and second's pair were active"
    );
    for secret in [
        &first.access.secret,
        &second.refresh.secret,
        &second.access.secret,
    ] {
        assert!(!ctx.is_active(secret).await);
    }
    assert!(ctx.is_active(&other.refresh.secret).await);
    assert!(ctx.is_active(&other.access.secret).await);
    assert_eq!(
        ctx.revoke(RevokeTarget::Family(first.family_id.clone()))
            .await,
        0,
        "idempotent"
    );
}

async fn revoking_an_account_is_a_watermark(ctx: Ctx) {
    let a1 = ctx.issue("zed@example.com").await;
    let a2 = ctx.issue("zed@example.com").await;
    let a3 = ctx.rotate(&a2.refresh.secret).await;
    let bob = ctx.issue("bob@example.com").await;
    let account = a1.account_id.clone();

    assert_eq!(
        ctx.revoke(RevokeTarget::Account(account.clone())).await,
        5,
        "a1's pair, a2.access and a3's pair were active"
    );
    for secret in [
        &a1.refresh.secret,
        &a1.access.secret,
        &a2.access.secret,
        &a3.refresh.secret,
        &a3.access.secret,
    ] {
        assert!(
            !ctx.is_active(secret).await,
            "tokens issued before the watermark are inactive"
        );
    }
    let outcome = ctx.refresh(&a3.refresh.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "a refresh token under the watermark must not refresh, got {outcome:?}"
    );
    assert!(
        ctx.is_active(&bob.access.secret).await,
        "other accounts are untouched"
    );

    // No clock movement: the store must still order the watermark before the next issue.
    let after = ctx.issue("zed@example.com").await;
    assert_eq!(
        after.account_id, account,
        "the account survives its revocation"
    );
    assert!(
        ctx.is_active(&after.access.secret).await,
        "tokens issued after the watermark are active"
    );
    assert!(ctx.is_active(&after.refresh.secret).await);
    let active: HashSet<TokenId> = ctx
        .active_tokens(&account)
        .await
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(
        active,
        HashSet::from([after.refresh.id.clone(), after.access.id.clone()])
    );
    for record in ctx.all_tokens(&account).await {
        if record.family_id != after.family_id {
            assert_ne!(record.state, TokenState::Active, "{}", record.id);
        }
    }

    assert_eq!(
        ctx.revoke(RevokeTarget::Account(account.clone())).await,
        2,
        "a second watermark revokes what was issued since"
    );
    assert!(!ctx.is_active(&after.access.secret).await);
    assert_eq!(
        ctx.revoke(RevokeTarget::Account(account)).await,
        0,
        "idempotent"
    );
}

async fn revoking_unknown_targets_revokes_nothing(ctx: Ctx) {
    let pair = ctx.issue("adam@example.com").await;
    for target in [
        RevokeTarget::Token(TokenId::random()),
        RevokeTarget::Family(FamilyId::random()),
        RevokeTarget::Account(AccountId::random()),
    ] {
        assert_eq!(ctx.revoke(target.clone()).await, 0, "{target:?}");
    }
    assert!(ctx.is_active(&pair.access.secret).await);
    assert!(ctx.is_active(&pair.refresh.secret).await);
}

// ---------------------------------------------------------------------------------------------
// accounts and listing
// ---------------------------------------------------------------------------------------------

async fn account_by_email_finds_only_issued_accounts(ctx: Ctx) {
    assert_eq!(ctx.account_by_email("beth@example.com").await, None);
    let pair = ctx.issue("beth@example.com").await;
    assert_eq!(
        ctx.account_by_email("  BETH@Example.com").await,
        Some(pair.account_id),
        "the account is found by its normalised email"
    );
    assert_eq!(ctx.account_by_email("beth@example.org").await, None);
}

async fn listing_pages_newest_first_and_visits_every_token_once(ctx: Ctx) {
    let first = ctx.issue("cleo@example.com").await;
    ctx.clock.advance(Duration::from_secs(1));
    let second = ctx.issue("cleo@example.com").await;
    let _third = ctx.issue("cleo@example.com").await;
    ctx.clock.advance(Duration::from_secs(1));
    ctx.rotate(&second.refresh.secret).await;
    let _fourth = ctx.issue("cleo@example.com").await;
    let account = first.account_id.clone();

    let everything = ctx.pages(&account, 100, true).await;
    assert_eq!(everything.len(), 1, "100 tokens fit in one page");
    let everything: Vec<TokenRecord> = everything.into_iter().flatten().collect();
    assert_eq!(everything.len(), 10, "four issues and one rotation");

    for (size, include_inactive, expected) in [(3, true, 10), (4, false, 9), (1, true, 10)] {
        let pages = ctx.pages(&account, size, include_inactive).await;
        for page in &pages {
            assert!(
                page.len() <= size as usize,
                "a page holds at most `size` tokens"
            );
        }
        let tokens: Vec<TokenRecord> = pages.into_iter().flatten().collect();
        let ids: HashSet<&TokenId> = tokens.iter().map(|t| &t.id).collect();
        assert_eq!(
            ids.len(),
            tokens.len(),
            "size {size}: no token may be listed twice"
        );
        assert_eq!(
            tokens.len(),
            expected,
            "size {size}: every token listed once"
        );
        assert_newest_first(&tokens);
        if !include_inactive {
            assert!(tokens.iter().all(|t| t.state == TokenState::Active));
        }
    }
    assert_newest_first(&everything);
    assert!(
        everything[0].issued_at > everything[9].issued_at,
        "tokens issued seconds apart are ordered by time"
    );
}

async fn listing_reports_states_links_and_metadata(ctx: Ctx) {
    let mut request = session("dora@example.com");
    request.access_ttl = Duration::from_secs(60);
    request.metadata = metadata(&[("device", "phone"), ("app", "ios")]);
    let live = ctx.issue_session(request.clone()).await;
    let live2 = ctx.rotate(&live.refresh.secret).await;
    let revoked = ctx.issue_session(request.clone()).await;
    assert_eq!(
        ctx.revoke(RevokeTarget::Family(revoked.family_id.clone()))
            .await,
        2
    );
    ctx.advance_to(live.access.expires_at.plus(Duration::from_secs(1)));

    let records = by_id(ctx.all_tokens(&live.account_id).await);
    assert_eq!(records.len(), if ctx.lists_inactive { 6 } else { 3 });
    let expect = |id: &TokenId,
                  kind: TokenKind,
                  family: &FamilyId,
                  state: TokenState,
                  parent: Option<&TokenId>,
                  replaced_by: Option<&TokenId>| {
        let record = &records[id];
        assert_eq!(record.kind, kind, "{id}: kind");
        assert_eq!(&record.family_id, family, "{id}: family");
        assert_eq!(record.state, state, "{id}: state");
        assert_eq!(record.parent_id.as_ref(), parent, "{id}: parent");
        assert_eq!(
            record.replaced_by.as_ref(),
            replaced_by,
            "{id}: replaced_by"
        );
        assert_eq!(
            record.revoked_at.is_some(),
            matches!(state, TokenState::Revoked | TokenState::Rotated),
            "{id}: revoked_at is set exactly for revoked and rotated tokens"
        );
        assert_eq!(record.client_id.as_deref(), Some(CLIENT), "{id}: client_id");
        assert_eq!(record.metadata, request.metadata, "{id}: metadata");
    };
    use TokenKind::{Access, Refresh};
    use TokenState::{Active, Expired, Revoked, Rotated};
    let (lf, rf) = (&live.family_id, &revoked.family_id);
    let (live_refresh, live2_refresh) = (&live.refresh.id, &live2.refresh.id);
    expect(
        live_refresh,
        Refresh,
        lf,
        Rotated,
        None,
        Some(live2_refresh),
    );
    ctx.assert_inactive_listed(&records, &live.access.id, Expired);
    if ctx.lists_inactive {
        expect(
            &live.access.id,
            Access,
            lf,
            Expired,
            Some(live_refresh),
            None,
        );
    }
    expect(live2_refresh, Refresh, lf, Active, None, None);
    expect(
        &live2.access.id,
        Access,
        lf,
        Active,
        Some(live2_refresh),
        None,
    );
    ctx.assert_inactive_listed(&records, &revoked.refresh.id, Revoked);
    ctx.assert_inactive_listed(&records, &revoked.access.id, Revoked);
    if ctx.lists_inactive {
        expect(&revoked.refresh.id, Refresh, rf, Revoked, None, None);
        expect(
            &revoked.access.id,
            Access,
            rf,
            Revoked,
            Some(&revoked.refresh.id),
            None,
        );
    }
    for (id, expires_at) in [
        (&live.access.id, live.access.expires_at),
        (&live2.refresh.id, live2.refresh.expires_at),
        (&revoked.access.id, revoked.access.expires_at),
    ] {
        if let Some(record) = records.get(id) {
            assert_eq!(record.expires_at, expires_at, "{id}: expires_at");
        }
    }
    assert!(records.contains_key(&live2.refresh.id));
    let introspected = ctx
        .introspect(&live2.access.secret)
        .await
        .expect("live2.access is active");
    assert_eq!(records[&live2.access.id].issued_at, introspected.issued_at);
    assert!(
        records[&live2.refresh.id].issued_at > records[&live.refresh.id].issued_at,
        "a rotation is issued after the token it replaces"
    );

    let active: HashSet<TokenId> = ctx
        .active_tokens(&live.account_id)
        .await
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(
        active,
        HashSet::from([live2.refresh.id.clone(), live2.access.id.clone()]),
        "only active tokens are listed without include_inactive"
    );
}

async fn listing_an_unknown_account_is_empty(ctx: Ctx) {
    ctx.issue("emma@example.com").await;
    let page = ctx
        .store
        .list_tokens(&AccountId::random(), page_request(10, true))
        .await
        .expect("listing an unknown account succeeds");
    assert_eq!(
        page,
        TokenPage {
            tokens: Vec::new(),
            next: None
        }
    );
}

// ---------------------------------------------------------------------------------------------
// shutdown
// ---------------------------------------------------------------------------------------------

async fn operations_after_close_fail_as_unavailable(ctx: Ctx) {
    let pair = ctx.issue("fred@example.com").await;
    ctx.store
        .close()
        .await
        .expect("closing an open store succeeds");
    let store = &ctx.store;
    expect_unavailable("issue", store.issue(session("fred@example.com")).await);
    expect_unavailable(
        "refresh",
        store.refresh(&pair.refresh.secret, rotation(GRACE)).await,
    );
    expect_unavailable("introspect", store.introspect(&pair.access.secret).await);
    expect_unavailable(
        "revoke_secret",
        store.revoke_secret(&pair.access.secret, None).await,
    );
    expect_unavailable(
        "revoke",
        store
            .revoke(RevokeTarget::Family(pair.family_id.clone()))
            .await,
    );
    expect_unavailable(
        "account_by_email",
        store.account_by_email(&email("fred@example.com")).await,
    );
    expect_unavailable(
        "list_tokens",
        store
            .list_tokens(&pair.account_id, page_request(10, true))
            .await,
    );
    // A second close is a no-op or a refusal, never a panic.
    if let Err(err) = store.close().await {
        assert_eq!(err.kind(), StoreErrorKind::Unavailable, "close: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// One case's store and the clock it reads.
struct Ctx {
    store: Arc<dyn TokenStore>,
    clock: Arc<ManualClock>,
    /// See [`StoreHarness::lists_inactive_tokens`].
    lists_inactive: bool,
}

impl Ctx {
    /// Asserts that a revoked (or expired, `state`) token is listed in that state, or, for a
    /// store that deletes such tokens, not listed at all.
    #[track_caller]
    fn assert_inactive_listed(
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

    async fn issue(&self, email: &str) -> MintedPair {
        self.issue_session(session(email)).await
    }

    async fn issue_session(&self, session: NewSession) -> MintedPair {
        self.store.issue(session).await.expect("issue succeeds")
    }

    async fn introspect(&self, secret: &SecretString) -> Option<TokenInfo> {
        self.store
            .introspect(secret)
            .await
            .expect("introspect succeeds")
    }

    async fn is_active(&self, secret: &SecretString) -> bool {
        self.introspect(secret).await.is_some()
    }

    async fn refresh(&self, secret: &SecretString, rotation: Rotation) -> RefreshOutcome {
        self.store
            .refresh(secret, rotation)
            .await
            .expect("refresh succeeds")
    }

    /// Rotates a refresh token that must be active, with the default grace window.
    async fn rotate(&self, secret: &SecretString) -> MintedPair {
        rotated(self.refresh(secret, rotation(GRACE)).await)
    }

    async fn revoke_secret(&self, secret: &SecretString, client: Option<&str>) -> SecretRevocation {
        self.store
            .revoke_secret(secret, client)
            .await
            .expect("revoke_secret succeeds")
    }

    async fn revoke(&self, target: RevokeTarget) -> u64 {
        self.store.revoke(target).await.expect("revoke succeeds")
    }

    async fn account_by_email(&self, address: &str) -> Option<AccountId> {
        self.store
            .account_by_email(&email(address))
            .await
            .expect("account_by_email succeeds")
    }

    /// Returns every page of the account's tokens, following the cursor.
    async fn pages(
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

    async fn all_tokens(&self, account: &AccountId) -> Vec<TokenRecord> {
        self.pages(account, 500, true)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn active_tokens(&self, account: &AccountId) -> Vec<TokenRecord> {
        self.pages(account, 500, false)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn family(&self, account: &AccountId, family: &FamilyId) -> Vec<TokenRecord> {
        self.all_tokens(account)
            .await
            .into_iter()
            .filter(|t| &t.family_id == family)
            .collect()
    }

    /// Moves the clock forward to `to`.
    fn advance_to(&self, to: UnixMicros) {
        let now = self.clock.now();
        let micros = u64::try_from(to.0 - now.0).expect("the clock only moves forward");
        self.clock.advance(Duration::from_micros(micros));
    }
}

/// Starts `n` refreshes of one secret at once and returns every outcome.
async fn concurrent_refreshes(
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

async fn join_all<T: 'static>(mut tasks: JoinSet<T>) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.unwrap_or_else(|err| panic!("task failed: {}", describe(err))));
    }
    results
}

fn email(address: &str) -> Email {
    Email::parse(address).expect("test emails are valid")
}

fn session(address: &str) -> NewSession {
    NewSession {
        email: email(address),
        known_account: None,
        cognito_sub: None,
        client_id: Some(CLIENT.to_owned()),
        access_ttl: ACCESS_TTL,
        refresh_ttl: REFRESH_TTL,
        metadata: Metadata::new(),
    }
}

fn rotation(grace: Duration) -> Rotation {
    Rotation {
        client_id: None,
        access_ttl: ACCESS_TTL,
        refresh_ttl: REFRESH_TTL,
        grace,
    }
}

fn page_request(size: u32, include_inactive: bool) -> PageRequest {
    PageRequest {
        size,
        after: None,
        include_inactive,
    }
}

fn metadata(entries: &[(&str, &str)]) -> Metadata {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn rotated(outcome: RefreshOutcome) -> MintedPair {
    match outcome {
        RefreshOutcome::Rotated(pair) => pair,
        other => panic!("expected a rotation, got {other:?}"),
    }
}

/// A secret shaped like ours whose token does not exist.
fn unknown_secret(prefix: &str) -> String {
    format!("{prefix}{}_{}", random_hex(), "Q".repeat(43))
}

/// Returns `value` with its last character replaced by another one of the same alphabet.
fn change_last_char(value: &str) -> String {
    let mut changed = value.to_owned();
    let last = changed.pop().expect("secrets are not empty");
    changed.push(if last == 'A' { 'B' } else { 'A' });
    changed
}

/// Returns a prefix of `value` short enough for an assertion message.
fn shorten(value: &str) -> String {
    value.chars().take(40).collect()
}

fn by_id(records: Vec<TokenRecord>) -> BTreeMap<TokenId, TokenRecord> {
    let count = records.len();
    let map: BTreeMap<TokenId, TokenRecord> =
        records.into_iter().map(|r| (r.id.clone(), r)).collect();
    assert_eq!(map.len(), count, "a token was listed twice");
    map
}

fn active_refresh_ids(records: &[TokenRecord]) -> Vec<TokenId> {
    records
        .iter()
        .filter(|t| t.kind == TokenKind::Refresh && t.state == TokenState::Active)
        .map(|t| t.id.clone())
        .collect()
}

/// Asserts the tokens are strictly newest first by (issued_at, id), the cursor's order.
fn assert_newest_first(tokens: &[TokenRecord]) {
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
fn assert_within(actual: UnixMicros, expected: UnixMicros, slack: Duration, what: &str) {
    assert!(
        actual >= expected && actual <= expected.plus(slack),
        "{what}: {actual:?} is not within {slack:?} after {expected:?}"
    );
}

fn expect_unavailable<T: fmt::Debug>(operation: &str, result: StoreResult<T>) {
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
fn describe(err: JoinError) -> String {
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
