//! Rotation: a new pair in the same family, and the secrets that cannot rotate.

use super::*;

/// The cases of this file, in order.
pub(super) fn cases() -> Vec<(&'static str, Case)> {
    cases![
        refresh_rotates_into_a_new_pair_in_the_same_family,
        access_secret_cannot_refresh,
        expired_refresh_token_cannot_refresh,
        consumed_refresh_token_after_its_expiry_is_inactive_not_reuse,
        revoked_refresh_token_cannot_refresh,
        refresh_for_another_client_is_refused_and_changes_nothing,
        a_token_bound_to_a_client_needs_its_id_when_the_check_is_exact,
        no_rotation_outlives_the_session,
    ]
}

pub(super) async fn refresh_rotates_into_a_new_pair_in_the_same_family(ctx: Ctx) {
    let mut request = session("ivan@example.com");
    request.metadata = metadata(&[("device", "phone"), ("app", "ios")]);
    let first = ctx.issue_session(request.clone()).await;

    let mut rotation = rotation(GRACE);
    rotation.client = ClientCheck::Exactly(Some(CLIENT.to_owned()));
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

pub(super) async fn access_secret_cannot_refresh(ctx: Ctx) {
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

pub(super) async fn expired_refresh_token_cannot_refresh(ctx: Ctx) {
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

pub(super) async fn consumed_refresh_token_after_its_expiry_is_inactive_not_reuse(ctx: Ctx) {
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

pub(super) async fn revoked_refresh_token_cannot_refresh(ctx: Ctx) {
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

pub(super) async fn refresh_for_another_client_is_refused_and_changes_nothing(ctx: Ctx) {
    let pair = ctx.issue("mike@example.com").await;
    let before = ctx.all_tokens(&pair.account_id).await;

    let mut wrong = rotation(GRACE);
    wrong.client = ClientCheck::Exactly(Some(OTHER_CLIENT.to_owned()));
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
    right.client = ClientCheck::Exactly(Some(CLIENT.to_owned()));
    let next = rotated(ctx.refresh(&pair.refresh.secret, right).await);
    assert_eq!(next.family_id, pair.family_id);
}

pub(super) async fn a_token_bound_to_a_client_needs_its_id_when_the_check_is_exact(ctx: Ctx) {
    let bound = ctx.issue("nora@example.com").await;
    let mut unnamed = rotation(GRACE);
    unnamed.client = ClientCheck::Exactly(None);
    let outcome = ctx.refresh(&bound.refresh.secret, unnamed.clone()).await;
    assert!(
        matches!(outcome, RefreshOutcome::WrongClient),
        "a client's token must not rotate without its client id, got {outcome:?}"
    );
    let revocation = ctx
        .store
        .revoke_secret(&bound.access.secret, &ClientCheck::Exactly(None))
        .await
        .expect("revoke_secret succeeds");
    assert!(
        matches!(revocation, SecretRevocation::WrongClient),
        "a client's token must not be revoked without its client id, got {revocation:?}"
    );
    assert!(ctx.is_active(&bound.refresh.secret).await);
    assert!(ctx.is_active(&bound.access.secret).await);

    // A token issued for no client passes the exact check with none.
    let mut request = session("nora@example.com");
    request.client_id = None;
    let unbound = ctx.issue_session(request).await;
    rotated(ctx.refresh(&unbound.refresh.secret, unnamed).await);
}

pub(super) async fn no_rotation_outlives_the_session(ctx: Ctx) {
    let start = ctx.clock.now();
    let session_end = start.plus(SESSION_TTL);
    let mut pair = ctx.issue("olga@example.com").await;
    // Rotate every 50 minutes, each time asking for the full refresh lifetime: the session
    // (three refresh lifetimes) still ends on time.
    let step = Duration::from_secs(50 * 60);
    loop {
        ctx.clock.advance(step);
        let now = ctx.clock.now();
        if now >= session_end {
            break;
        }
        let next = rotated(ctx.refresh(&pair.refresh.secret, rotation(GRACE)).await);
        let slack = STAMP_SLACK;
        assert!(
            next.refresh.expires_at <= session_end.plus(slack),
            "a refresh token must end with its session: {:?} > {session_end:?}",
            next.refresh.expires_at
        );
        assert!(next.access.expires_at <= session_end.plus(slack));
        assert!(
            next.refresh.expires_at >= now.plus(REFRESH_TTL).min(session_end),
            "the lifetime is cut only at the session's end"
        );
        pair = next;
    }
    // 200 minutes: the session (180) is over, and the last refresh token with it.
    let outcome = ctx.refresh(&pair.refresh.secret, rotation(GRACE)).await;
    assert!(
        matches!(outcome, RefreshOutcome::Inactive),
        "a refresh past the session's end must be inactive, got {outcome:?}"
    );
    assert!(!ctx.is_active(&pair.access.secret).await);
}
