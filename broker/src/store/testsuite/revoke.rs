//! Revocation by secret, token, family and account.

use super::*;

/// The cases of this file, in order.
pub(super) fn cases() -> Vec<(&'static str, Case)> {
    cases![
        revoking_an_access_secret_revokes_only_it,
        revoking_a_refresh_secret_ends_its_family,
        revoking_another_clients_secret_leaves_it_active,
        revoking_by_token_id_cascades_only_from_refresh_tokens,
        revoking_a_family_revokes_every_token_in_it,
        revoking_an_account_is_a_watermark,
        revoking_by_email_finds_the_account,
        revoking_unknown_targets_revokes_nothing,
    ]
}

pub(super) async fn revoking_an_access_secret_revokes_only_it(ctx: Ctx) {
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

pub(super) async fn revoking_a_refresh_secret_ends_its_family(ctx: Ctx) {
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

pub(super) async fn revoking_another_clients_secret_leaves_it_active(ctx: Ctx) {
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

pub(super) async fn revoking_by_token_id_cascades_only_from_refresh_tokens(ctx: Ctx) {
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

pub(super) async fn revoking_a_family_revokes_every_token_in_it(ctx: Ctx) {
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

pub(super) async fn revoking_by_email_finds_the_account(ctx: Ctx) {
    let first = ctx.issue("yara@example.com").await;
    let second = ctx.issue("yara@example.com").await;
    let other = ctx.issue("yuri@example.com").await;

    let found = ctx
        .store
        .revoke_email(&email("yara@example.com"))
        .await
        .expect("revoke_email succeeds");
    assert_eq!(found, Some((first.account_id.clone(), 4)), "both pairs");
    for secret in [&first.access.secret, &second.refresh.secret] {
        assert!(!ctx.is_active(secret).await);
    }
    assert!(
        ctx.is_active(&other.access.secret).await,
        "other accounts are untouched"
    );
    let after = ctx.issue("yara@example.com").await;
    assert!(
        ctx.is_active(&after.access.secret).await,
        "the account survives as a watermark"
    );

    assert_eq!(
        ctx.store
            .revoke_email(&email("nobody@example.com"))
            .await
            .expect("revoke_email succeeds"),
        None
    );
}

pub(super) async fn revoking_an_account_is_a_watermark(ctx: Ctx) {
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

pub(super) async fn revoking_unknown_targets_revokes_nothing(ctx: Ctx) {
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
