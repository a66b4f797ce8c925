//! The grace window and reuse detection.

use super::*;

/// The cases of this file, in order.
pub(super) fn cases() -> Vec<(&'static str, Case)> {
    cases![
        retrying_the_predecessor_within_grace_supersedes_its_successor,
        grace_window_counts_from_the_first_rotation,
        reusing_an_older_generation_within_grace_revokes_the_family,
        reusing_a_refresh_token_after_grace_revokes_only_its_family,
        a_superseded_successor_presented_again_is_reuse_and_ends_the_family,
    ]
}

pub(super) async fn retrying_the_predecessor_within_grace_supersedes_its_successor(ctx: Ctx) {
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

    let fourth = ctx.rotate(&third.refresh.secret).await;
    assert_eq!(fourth.family_id, first.family_id);
}

pub(super) async fn a_superseded_successor_presented_again_is_reuse_and_ends_the_family(ctx: Ctx) {
    // The holder rotates `first` into `second`; within the grace window a thief with a copy
    // of `first` presents it and gets `third`, which supersedes the holder's `second`.
    let first = ctx.issue("rita@example.com").await;
    let second = ctx.rotate(&first.refresh.secret).await;
    ctx.clock.advance(GRACE / 2);
    let third = rotated(ctx.refresh(&first.refresh.secret, rotation(GRACE)).await);
    assert!(!ctx.is_active(&second.refresh.secret).await);

    // The holder comes back with `second`: one of the two is not the user, so the session
    // ends, the thief's pair with it.
    let outcome = ctx.refresh(&second.refresh.secret, rotation(GRACE)).await;
    match outcome {
        RefreshOutcome::ReuseDetected { family_id, revoked } => {
            assert_eq!(family_id, first.family_id);
            assert_eq!(revoked, 3, "first.access and third's pair were active");
        }
        other => panic!("a superseded successor presented again is reuse, got {other:?}"),
    }
    for secret in [
        &third.refresh.secret,
        &third.access.secret,
        &first.access.secret,
    ] {
        assert!(!ctx.is_active(secret).await);
    }
    assert!(matches!(
        ctx.refresh(&third.refresh.secret, rotation(GRACE)).await,
        RefreshOutcome::Inactive
    ));
}

pub(super) async fn grace_window_counts_from_the_first_rotation(ctx: Ctx) {
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

pub(super) async fn reusing_an_older_generation_within_grace_revokes_the_family(ctx: Ctx) {
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

pub(super) async fn reusing_a_refresh_token_after_grace_revokes_only_its_family(ctx: Ctx) {
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
