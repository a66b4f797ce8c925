//! Concurrent sign-ins and refreshes never fork an account or a family.

use super::*;

/// The cases of this file, in order.
pub(super) fn cases() -> Vec<(&'static str, Case)> {
    cases![
        concurrent_first_sign_ins_create_one_account,
        concurrent_refreshes_within_grace_leave_one_live_refresh_token,
        concurrent_refreshes_without_grace_rotate_once_and_revoke_the_family,
    ]
}

pub(super) async fn concurrent_first_sign_ins_create_one_account(ctx: Ctx) {
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

pub(super) async fn concurrent_refreshes_within_grace_leave_one_live_refresh_token(ctx: Ctx) {
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

pub(super) async fn concurrent_refreshes_without_grace_rotate_once_and_revoke_the_family(ctx: Ctx) {
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
            RefreshOutcome::Replayed { .. } => panic!("no replay key was given, got a replay"),
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
