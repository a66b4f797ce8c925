//! Issuing: accounts are found or created, pairs carry their facts.

use super::*;

/// The cases of this file, in order.
pub(super) fn cases() -> Vec<(&'static str, Case)> {
    cases![
        issuing_twice_for_one_email_reuses_the_account_in_new_families,
        issued_pair_introspects_with_its_facts,
        known_account_is_used_without_a_lookup,
    ]
}

pub(super) async fn issuing_twice_for_one_email_reuses_the_account_in_new_families(ctx: Ctx) {
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

pub(super) async fn issued_pair_introspects_with_its_facts(ctx: Ctx) {
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

pub(super) async fn known_account_is_used_without_a_lookup(ctx: Ctx) {
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
