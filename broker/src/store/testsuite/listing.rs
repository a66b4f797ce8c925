//! Account lookups and token listings.

use super::*;

/// The cases of this file, in order.
pub(super) fn cases() -> Vec<(&'static str, Case)> {
    cases![
        account_by_email_finds_only_issued_accounts,
        listing_pages_newest_first_and_visits_every_token_once,
        listing_reports_states_links_and_metadata,
        listing_an_unknown_account_is_empty,
    ]
}

pub(super) async fn account_by_email_finds_only_issued_accounts(ctx: Ctx) {
    assert_eq!(ctx.account_by_email("beth@example.com").await, None);
    let pair = ctx.issue("beth@example.com").await;
    assert_eq!(
        ctx.account_by_email("  BETH@Example.com").await,
        Some(pair.account_id),
        "the account is found by its normalised email"
    );
    assert_eq!(ctx.account_by_email("beth@example.org").await, None);
}

pub(super) async fn listing_pages_newest_first_and_visits_every_token_once(ctx: Ctx) {
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

pub(super) async fn listing_reports_states_links_and_metadata(ctx: Ctx) {
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

pub(super) async fn listing_an_unknown_account_is_empty(ctx: Ctx) {
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
