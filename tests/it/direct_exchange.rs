//! Direct exchange: a user's own Cognito ID token, from a pool with `direct_exchange = true`,
//! is the caller credential for IssueTokens with that same token, and for nothing else; rate
//! limited per `sub`. Against a broker that trusts a test pool whose JWKS is served on loopback.

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use tokenbroker::domain::admission::RateLimit;
use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{
    TestBroker, claims_request,
    cognito::{CLIENT_ID, SUB, TestPool, id_claims, now, patched},
    http::curl,
};

use crate::{
    audit::{audited_broker, read_events},
    cognito::{bearer, exchange},
    http::{url, with_http},
    kind_of,
    metrics::Scrape,
};

/// An ID token of `pool` for `email` with `sub`.
fn id_token_of(pool: &TestPool, email: &str, sub: &str) -> SecretString {
    SecretString::from(
        pool.id_key
            .sign(&patched(id_claims(email), &json!({ "sub": sub }))),
    )
}

/// A broker that trusts `pool` with direct exchange, with its HTTP listener on too.
async fn direct_broker(pool: &TestPool) -> TestBroker {
    let mut cognito = pool.settings();
    cognito.pools[0].direct_exchange = true;
    TestBroker::spawn_with(move |s| {
        s.cognito = cognito;
        with_http(s);
    })
    .await
}

#[tokio::test]
async fn own_id_token_exchanges_for_its_own_pair_and_is_audited_by_sub() {
    let pool = TestPool::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut cognito = pool.settings();
    cognito.pools[0].direct_exchange = true;
    let broker = audited_broker(&path, move |s| s.cognito = cognito).await;
    let token = pool.id_token("Alice@Example.com");

    let pair = bearer(&broker, &token)
        .issue_tokens(exchange(token.expose_secret()))
        .await
        .unwrap();
    let info = broker
        .service
        .introspect_secret(&pair.access.secret)
        .await
        .unwrap();
    assert!(info.active);
    assert_eq!(info.email, "alice@example.com");
    assert_eq!(info.cognito_sub, SUB);
    assert_eq!(info.client_id, CLIENT_ID);
    // The same user through the trigger lands on the same account.
    assert_eq!(
        broker.issue("alice@example.com").await.account_id,
        pair.account_id
    );
    // The pair is an ordinary one: its holder rotates it without any credential.
    broker
        .anonymous
        .refresh_tokens(pb::RefreshTokensRequest {
            refresh_token: pair.refresh.secret.expose_secret().into(),
            client_id: CLIENT_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let audit = std::fs::read_to_string(&path).unwrap();
    assert!(
        !audit.contains(token.expose_secret()),
        "the audit log holds the ID token"
    );
    let issued: Vec<_> = read_events(&path)
        .into_iter()
        .filter(|e| e["event"] == "issue" && e["phase"] == "response")
        .collect();
    assert!(
        issued
            .iter()
            .any(|e| e["caller"] == format!("cognito-id:{SUB}") && e["outcome"] == "ok"),
        "no issue line names the caller by sub: {issued:?}"
    );
}

#[tokio::test]
async fn id_token_is_refused_everywhere_but_its_own_exchange() {
    let pool = TestPool::start().await;
    let broker = direct_broker(&pool).await;
    let token = id_token_of(&pool, "bob@example.com", "sub-bob");
    let user = bearer(&broker, &token);
    let other = id_token_of(&pool, "carol@example.com", "sub-carol");
    let victim = broker.issue("carol@example.com").await;

    let denied = [
        // Another user's ID token: the minted tokens would not be the caller's own.
        (
            "another user's token",
            kind_of(user.issue_tokens(exchange(other.expose_secret())).await),
        ),
        // An access token, even the caller's own user's: only the credential itself.
        (
            "an access token",
            kind_of(
                user.issue_tokens(exchange(
                    pool.access_token(&["users"], "openid").expose_secret(),
                ))
                .await,
            ),
        ),
        // Asserted claims need trigger or admin.
        (
            "asserted claims",
            kind_of(
                user.issue_tokens(claims_request("bob@example.com", CLIENT_ID))
                    .await,
            ),
        ),
        (
            "Introspect",
            kind_of(user.introspect_secret(&victim.access.secret).await),
        ),
        (
            "Revoke by email",
            kind_of(
                user.revoke(pb::RevokeRequest {
                    target: Some(pb::revoke_request::Target::Email(
                        "carol@example.com".into(),
                    )),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "Revoke by secret",
            kind_of(
                user.revoke(pb::RevokeRequest {
                    target: Some(pb::revoke_request::Target::Token(
                        victim.refresh.secret.expose_secret().into(),
                    )),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "ListTokens",
            kind_of(
                user.list_tokens(pb::ListTokensRequest {
                    account: Some(pb::list_tokens_request::Account::Email(
                        "carol@example.com".into(),
                    )),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "RefreshTokens",
            kind_of(
                user.refresh_tokens(pb::RefreshTokensRequest {
                    refresh_token: victim.refresh.secret.expose_secret().into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
    ];
    for (what, kind) in denied {
        assert_eq!(kind, ClientErrorKind::PermissionDenied, "{what}");
    }
    // Nor is it a credential on the HTTP listener.
    let answer = curl(&[
        "-H",
        &format!("authorization: Bearer {}", token.expose_secret()),
        "--data-raw",
        "token=tba_x",
        &url(&broker, "/oauth2/introspect"),
    ])
    .await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(!answer.body.contains(token.expose_secret()));
    assert!(broker.is_active(&victim.access.secret).await);
    assert!(broker.is_active(&victim.refresh.secret).await);

    // An access token without roles is a caller, but not one that may exchange.
    let access = pool.access_token(&["users"], "openid");
    assert_eq!(
        kind_of(
            bearer(&broker, &access)
                .issue_tokens(exchange(token.expose_secret()))
                .await
        ),
        ClientErrorKind::PermissionDenied
    );
    // No subject at all is bad input.
    assert_eq!(
        kind_of(user.issue_tokens(pb::IssueTokensRequest::default()).await),
        ClientErrorKind::InvalidArgument
    );
    // An expired ID token is no credential.
    let expired = SecretString::from(pool.id_key.sign(&patched(
        id_claims("bob@example.com"),
        &json!({ "sub": "sub-bob", "iat": now() - 7200, "exp": now() - 3600 }),
    )));
    let err = bearer(&broker, &expired)
        .issue_tokens(exchange(expired.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unauthenticated);
    assert!(!err.to_string().contains(expired.expose_secret()));
    // An access token exchanging itself is no direct exchange: a caller without roles.
    assert_eq!(
        kind_of(
            bearer(&broker, &access)
                .issue_tokens(exchange(access.expose_secret()))
                .await
        ),
        ClientErrorKind::PermissionDenied
    );
    // The one allowed call still works after all of that.
    bearer(&broker, &token)
        .issue_tokens(exchange(token.expose_secret()))
        .await
        .unwrap();
}

#[tokio::test]
async fn id_token_of_a_pool_without_direct_exchange_is_unauthenticated() {
    let pool = TestPool::start().await;
    let settings = pool.settings();
    assert!(!settings.pools[0].direct_exchange, "off by default");
    let broker = TestBroker::spawn_with(move |s| s.cognito = settings).await;
    let token = pool.id_token("dora@example.com");
    let err = bearer(&broker, &token)
        .issue_tokens(exchange(token.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unauthenticated, "{err}");
    assert!(
        err.message().contains("direct exchange"),
        "{}",
        err.message()
    );
    assert!(!err.to_string().contains(token.expose_secret()));
    // The same token exchanged by a service caller still works.
    broker
        .service
        .issue_tokens(exchange(token.expose_secret()))
        .await
        .unwrap();
}

#[tokio::test]
async fn direct_exchange_is_limited_per_sub() {
    let pool = TestPool::start().await;
    let mut cognito = pool.settings();
    cognito.pools[0].direct_exchange = true;
    let broker = TestBroker::spawn_with(move |s| {
        s.cognito = cognito;
        s.metrics.listen = Some(([127, 0, 0, 1], 0).into());
        // Slow enough that no token comes back during the test, however loaded the machine.
        s.limits.direct_exchange = Some(RateLimit {
            per_second: 0.01,
            burst: 3,
        });
    })
    .await;
    let erin = id_token_of(&pool, "erin@example.com", "sub-erin");
    let user = bearer(&broker, &erin);
    for _ in 0..3 {
        user.issue_tokens(exchange(erin.expose_secret()))
            .await
            .unwrap();
    }
    let err = user
        .issue_tokens(exchange(erin.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::ResourceExhausted, "{err}");
    let retry_after = err.retry_after().expect("a RetryInfo detail");
    assert!(
        retry_after > Duration::from_secs(10) && retry_after <= Duration::from_secs(100),
        "{retry_after:?}"
    );
    // Another ID token of the same user shares the bucket: it is the user's, not the token's.
    let again = SecretString::from(pool.id_key.sign(&patched(
        id_claims("erin@example.com"),
        &json!({ "sub": "sub-erin", "jti": "another-sign-in" }),
    )));
    assert_eq!(
        kind_of(
            bearer(&broker, &again)
                .issue_tokens(exchange(again.expose_secret()))
                .await
        ),
        ClientErrorKind::ResourceExhausted
    );
    // Another user is not affected.
    let frank = id_token_of(&pool, "frank@example.com", "sub-frank");
    bearer(&broker, &frank)
        .issue_tokens(exchange(frank.expose_secret()))
        .await
        .unwrap();
    let scrape = Scrape::parse(broker.scrape().await);
    assert_eq!(
        scrape.value(r#"tokenbroker_throttled_total{reason="direct_exchange"}"#),
        2.0
    );
}
