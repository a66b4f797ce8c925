//! RefreshTokens: rotation, the grace window, reuse detection.

use std::time::Duration;

use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{TestBroker, expose};

use crate::kind_of;

fn refresh_request(secret: &secrecy::SecretString) -> pb::RefreshTokensRequest {
    pb::RefreshTokensRequest {
        refresh_token: expose(secret),
        ..Default::default()
    }
}

#[tokio::test]
async fn refresh_rotates_within_the_family() {
    let broker = TestBroker::spawn().await;
    let pair = broker.issue("ida@example.com").await;
    let next = broker
        .anonymous
        .refresh_tokens(refresh_request(&pair.refresh.secret))
        .await
        .unwrap();
    assert_eq!(next.family_id, pair.family_id);
    assert_eq!(next.account_id, pair.account_id);
    assert_ne!(next.refresh.token_id, pair.refresh.token_id);
    assert!(broker.is_active(&next.access.secret).await);
    assert!(broker.is_active(&next.refresh.secret).await);
    assert!(!broker.is_active(&pair.refresh.secret).await, "consumed");

    let tokens = broker.all_tokens("ida@example.com").await;
    let old = tokens
        .iter()
        .find(|t| t.token_id == pair.refresh.token_id)
        .unwrap();
    assert_eq!(old.state, pb::TokenState::Rotated as i32);
    assert_eq!(old.replaced_by, next.refresh.token_id);
}

#[tokio::test]
async fn only_live_refresh_secrets_refresh() {
    let broker = TestBroker::spawn().await;
    let pair = broker.issue("jo@example.com").await;
    for bad in [
        expose(&pair.access.secret),
        "garbage".into(),
        "tbr_00000000000000000000000000000000_AAAA".into(),
        "x".repeat(600),
    ] {
        let request = pb::RefreshTokensRequest {
            refresh_token: bad,
            ..Default::default()
        };
        let err = broker.anonymous.refresh_tokens(request).await.unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::Unauthenticated);
        assert_eq!(
            err.message(),
            "the refresh token is invalid, expired or revoked"
        );
    }
    assert_eq!(
        kind_of(
            broker
                .anonymous
                .refresh_tokens(pb::RefreshTokensRequest::default())
                .await
        ),
        ClientErrorKind::InvalidArgument
    );
    assert!(
        broker.is_active(&pair.refresh.secret).await,
        "nothing changed"
    );
}

#[tokio::test]
async fn expired_refresh_token_cannot_refresh() {
    let broker = TestBroker::spawn_with_manual_clock(|_| {}).await;
    let pair = broker.issue("kim@example.com").await;
    broker.advance(Duration::from_secs(3601));
    assert_eq!(
        kind_of(
            broker
                .anonymous
                .refresh_tokens(refresh_request(&pair.refresh.secret))
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
}

#[tokio::test]
async fn refresh_checks_the_app_client() {
    let broker = TestBroker::spawn().await;
    let pair = broker.issue_for_client("lea@example.com", "app-a").await;
    let mut request = refresh_request(&pair.refresh.secret);
    request.client_id = "app-b".into();
    assert_eq!(
        kind_of(broker.anonymous.refresh_tokens(request.clone()).await),
        ClientErrorKind::PermissionDenied
    );
    // Naming no client is refused too: the token is bound to one.
    request.client_id = String::new();
    assert_eq!(
        kind_of(broker.anonymous.refresh_tokens(request.clone()).await),
        ClientErrorKind::PermissionDenied
    );
    request.client_id = "app-a".into();
    assert!(broker.anonymous.refresh_tokens(request).await.is_ok());

    // tokens.require_client_id = false lets a call that names no client through.
    let relaxed = TestBroker::spawn_with(|s| s.tokens.require_client_id = false).await;
    let pair = relaxed.issue_for_client("lea@example.com", "app-a").await;
    relaxed.refresh(&pair.refresh.secret).await.unwrap();
}

#[tokio::test]
async fn retry_within_grace_returns_the_same_successor() {
    let broker = TestBroker::spawn_with_manual_clock(|_| {}).await;
    let pair = broker.issue("max@example.com").await;
    let first = broker
        .anonymous
        .refresh_tokens(refresh_request(&pair.refresh.secret))
        .await
        .unwrap();
    broker.advance(Duration::from_secs(5));
    let retry = broker
        .anonymous
        .refresh_tokens(refresh_request(&pair.refresh.secret))
        .await
        .unwrap();
    assert_eq!(retry.refresh.token_id, first.refresh.token_id);
    assert_eq!(retry.family_id, pair.family_id);
    assert!(broker.is_active(&first.refresh.secret).await);
}

#[tokio::test]
async fn reuse_after_grace_revokes_that_family_only() {
    let broker = TestBroker::spawn_with_manual_clock(|_| {}).await;
    let stolen = broker.issue("ned@example.com").await;
    let other_session = broker.issue("ned@example.com").await;
    let rotated = broker
        .anonymous
        .refresh_tokens(refresh_request(&stolen.refresh.secret))
        .await
        .unwrap();
    broker.advance(Duration::from_secs(11));
    assert_eq!(
        kind_of(
            broker
                .anonymous
                .refresh_tokens(refresh_request(&stolen.refresh.secret))
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
    assert!(
        !broker.is_active(&rotated.refresh.secret).await,
        "family revoked"
    );
    assert!(
        !broker.is_active(&rotated.access.secret).await,
        "family revoked"
    );
    assert!(
        broker.is_active(&other_session.refresh.secret).await,
        "other family untouched"
    );
    assert!(
        broker.is_active(&other_session.access.secret).await,
        "other family untouched"
    );
}

#[tokio::test]
async fn older_generation_within_grace_is_reuse() {
    let broker = TestBroker::spawn_with_manual_clock(|_| {}).await;
    let gen0 = broker.issue("olga@example.com").await;
    let gen1 = broker
        .anonymous
        .refresh_tokens(refresh_request(&gen0.refresh.secret))
        .await
        .unwrap();
    broker.advance(Duration::from_secs(1));
    let gen2 = broker
        .anonymous
        .refresh_tokens(refresh_request(&gen1.refresh.secret))
        .await
        .unwrap();
    broker.advance(Duration::from_secs(1));
    // gen0 is now two generations old: presenting it, even within the grace window, is reuse.
    assert_eq!(
        kind_of(
            broker
                .anonymous
                .refresh_tokens(refresh_request(&gen0.refresh.secret))
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
    assert!(
        !broker.is_active(&gen2.refresh.secret).await,
        "family revoked"
    );
    assert!(
        !broker.is_active(&gen2.access.secret).await,
        "family revoked"
    );
}

#[tokio::test]
async fn a_thief_who_wins_the_grace_window_loses_the_session_when_the_holder_returns() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = TestBroker::spawn_on(dir.path()).await;
    let first = broker.issue_for_client("una@example.com", "web").await;
    // The holder rotates, and gets its answer.
    let holders = broker
        .refresh_as(&first.refresh.secret, "web")
        .await
        .unwrap();
    // A thief's copy of the old token, for another client, is refused outright.
    assert_eq!(
        kind_of(broker.refresh_as(&first.refresh.secret, "mobile").await),
        ClientErrorKind::PermissionDenied
    );
    // On another replica (here: the broker restarted, so nothing is remembered in memory)
    // the thief replays the old token within the grace window and wins a successor, which
    // supersedes the holder's.
    broker.stop().await.unwrap();
    let broker = TestBroker::spawn_on(dir.path()).await;
    let thiefs = broker
        .refresh_as(&first.refresh.secret, "web")
        .await
        .unwrap();
    assert!(!broker.is_active(&holders.refresh.secret).await);
    // The holder comes back with its superseded token: reuse, and the session ends, the
    // thief's pair with it.
    assert_eq!(
        kind_of(broker.refresh_as(&holders.refresh.secret, "web").await),
        ClientErrorKind::Unauthenticated
    );
    for secret in [&thiefs.refresh.secret, &thiefs.access.secret] {
        assert!(
            !broker.is_active(secret).await,
            "the thief's pair is revoked"
        );
    }
    assert_eq!(
        kind_of(broker.refresh_as(&thiefs.refresh.secret, "web").await),
        ClientErrorKind::Unauthenticated
    );
}

#[tokio::test]
async fn the_session_ends_on_time_however_often_it_rotates() {
    const HOUR: u64 = 3600;
    let broker = TestBroker::spawn_with_manual_clock(|s| {
        s.tokens.refresh_ttl_seconds = HOUR;
        s.tokens.max_refresh_ttl_seconds = HOUR;
        s.tokens.max_session_seconds = 2 * HOUR;
    })
    .await;
    let start = broker.clock.now();
    let mut pair = broker.issue_for_client("vera@example.com", "web").await;
    // A presenter may not lengthen what the issuer's settings give it.
    assert_eq!(
        kind_of(
            broker
                .anonymous
                .refresh_tokens(pb::RefreshTokensRequest {
                    refresh_token: expose(&pair.refresh.secret),
                    client_id: "web".into(),
                    refresh_ttl_seconds: u32::try_from(2 * HOUR).unwrap(),
                    ..Default::default()
                })
                .await
        ),
        ClientErrorKind::InvalidArgument
    );
    let session_end = start.0 + i64::try_from(2 * HOUR * 1_000_000).unwrap();
    // Rotate every 50 minutes: at 50 and 100 minutes it works, each new token ending with
    // the session at the latest; at 150 minutes the session is over.
    for _ in 0..2 {
        broker.advance(Duration::from_secs(50 * 60));
        pair = broker
            .refresh_as(&pair.refresh.secret, "web")
            .await
            .unwrap();
        let expires = pair.refresh.expires_at.as_ref().expect("an expiry");
        assert!(
            expires.seconds * 1_000_000 <= session_end + 1_000_000,
            "a refresh token outlives its session: {expires:?}"
        );
    }
    broker.advance(Duration::from_secs(50 * 60));
    assert_eq!(
        kind_of(broker.refresh_as(&pair.refresh.secret, "web").await),
        ClientErrorKind::Unauthenticated
    );
    assert!(!broker.is_active(&pair.access.secret).await);
}
