//! Introspect (RFC 7662): facts for active tokens, a bare `active = false` for anything else.

use std::time::Duration;

use secrecy::SecretString;
use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{TestBroker, expose};

use crate::kind_of;

/// Asserts the response is exactly `active = false` with every other field unset.
#[track_caller]
fn assert_bare_inactive(response: &pb::IntrospectResponse, what: &str) {
    assert_eq!(response, &pb::IntrospectResponse::default(), "{what}");
}

async fn introspect(broker: &TestBroker, token: &str, client_id: &str) -> pb::IntrospectResponse {
    ask(
        broker,
        pb::IntrospectRequest {
            token: token.into(),
            token_type_hint: 0,
            client_id: client_id.into(),
            access_only: false,
        },
    )
    .await
}

async fn ask(broker: &TestBroker, request: pb::IntrospectRequest) -> pb::IntrospectResponse {
    broker
        .service
        .introspect(request)
        .await
        .expect("Introspect succeeds")
}

#[tokio::test]
async fn anything_but_an_active_token_is_bare_inactive() {
    let broker = TestBroker::spawn_with_manual_clock(|_| {}).await;

    for garbage in [
        "garbage",
        "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
        "tba_00000000000000000000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &"x".repeat(600),
    ] {
        assert_bare_inactive(&introspect(&broker, garbage, "").await, garbage);
    }

    let pair = broker.issue_for_client("vic@example.com", "app-a").await;
    let mut tampered = expose(&pair.access.secret);
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_bare_inactive(&introspect(&broker, &tampered, "").await, "tampered secret");
    assert_bare_inactive(
        &introspect(&broker, &expose(&pair.access.secret), "app-b").await,
        "another client's token",
    );
    assert!(
        introspect(&broker, &expose(&pair.access.secret), "app-a")
            .await
            .active
    );

    let revoked = broker.issue("vic@example.com").await;
    broker
        .admin
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::TokenId(
                revoked.access.token_id.clone(),
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_bare_inactive(
        &introspect(&broker, &expose(&revoked.access.secret), "").await,
        "revoked",
    );

    let rotated = broker.issue("vic@example.com").await;
    broker.refresh(&rotated.refresh.secret).await.unwrap();
    assert_bare_inactive(
        &introspect(&broker, &expose(&rotated.refresh.secret), "").await,
        "rotated",
    );

    broker.advance(Duration::from_secs(601));
    assert_bare_inactive(
        &introspect(&broker, &expose(&pair.access.secret), "app-a").await,
        "expired",
    );
    assert!(
        introspect(&broker, &expose(&pair.refresh.secret), "")
            .await
            .active,
        "refresh lives longer"
    );
}

#[tokio::test]
async fn introspection_needs_service_or_admin() {
    let broker = TestBroker::spawn().await;
    let pair = broker.issue("wes@example.com").await;
    assert_eq!(
        kind_of(
            broker
                .anonymous
                .introspect_secret(&pair.access.secret)
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
    assert_eq!(
        kind_of(broker.trigger.introspect_secret(&pair.access.secret).await),
        ClientErrorKind::PermissionDenied
    );
    assert!(
        broker
            .admin
            .introspect_secret(&pair.access.secret)
            .await
            .unwrap()
            .active
    );
    assert_eq!(
        kind_of(
            broker
                .service
                .introspect_secret(&SecretString::from(String::new()))
                .await
        ),
        ClientErrorKind::InvalidArgument
    );
}

#[tokio::test]
async fn access_only_reports_a_refresh_token_as_inactive() {
    let broker = TestBroker::spawn().await;
    let pair = broker.issue_for_client("kit@example.com", "app-a").await;
    let request = |secret: &SecretString, access_only| pb::IntrospectRequest {
        token: expose(secret),
        access_only,
        ..Default::default()
    };

    // Without the option an active refresh token is active: only `kind` tells it apart.
    let refresh = ask(&broker, request(&pair.refresh.secret, false)).await;
    assert!(refresh.active, "{refresh:?}");
    assert_eq!(refresh.kind, pb::TokenKind::Refresh as i32);
    assert_eq!(refresh.token_id, pair.refresh.token_id);
    assert_bare_inactive(
        &ask(&broker, request(&pair.refresh.secret, true)).await,
        "a refresh token with access_only",
    );
    for access_only in [false, true] {
        let access = ask(&broker, request(&pair.access.secret, access_only)).await;
        assert!(access.active, "access_only = {access_only}: {access:?}");
        assert_eq!(access.kind, pb::TokenKind::Access as i32);
        assert_eq!(access.token_id, pair.access.token_id);
        assert_eq!(access.account_id, pair.account_id);
    }

    // Both filters apply together.
    let mut other_client = request(&pair.access.secret, true);
    other_client.client_id = "app-b".into();
    assert_bare_inactive(
        &ask(&broker, other_client).await,
        "another client's access token with access_only",
    );

    // The client's resource-server helper sets the option, for a service and an admin alike;
    // the refresh token itself is untouched and still rotates.
    for client in [&broker.service, &broker.admin] {
        let access = client
            .introspect_access_secret(&pair.access.secret)
            .await
            .unwrap();
        assert!(access.active);
        assert_bare_inactive(
            &client
                .introspect_access_secret(&pair.refresh.secret)
                .await
                .unwrap(),
            "introspect_access_secret of a refresh token",
        );
    }
    broker
        .refresh_as(&pair.refresh.secret, "app-a")
        .await
        .unwrap();
}
