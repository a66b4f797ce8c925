//! A closed store refuses work as unavailable.

use super::*;

/// The cases of this file, in order.
pub(super) fn cases() -> Vec<(&'static str, Case)> {
    cases![operations_after_close_fail_as_unavailable]
}

pub(super) async fn operations_after_close_fail_as_unavailable(ctx: Ctx) {
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
        store
            .revoke_secret(&pair.access.secret, &ClientCheck::Any)
            .await,
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
