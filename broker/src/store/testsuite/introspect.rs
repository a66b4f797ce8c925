//! Introspection of anything but an active token: inactive, never an error.

use super::*;

/// The cases of this file, in order.
pub(super) fn cases() -> Vec<(&'static str, Case)> {
    cases![
        malformed_and_unknown_secrets_are_inactive_everywhere,
        altered_secrets_are_inactive,
        token_is_inactive_from_its_expiry_time,
    ]
}

pub(super) async fn malformed_and_unknown_secrets_are_inactive_everywhere(ctx: Ctx) {
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

pub(super) async fn altered_secrets_are_inactive(ctx: Ctx) {
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

pub(super) async fn token_is_inactive_from_its_expiry_time(ctx: Ctx) {
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
