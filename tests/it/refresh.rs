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
    request.client_id = "app-a".into();
    assert!(broker.anonymous.refresh_tokens(request).await.is_ok());
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
