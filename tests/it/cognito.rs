//! Cognito JWTs end to end: a broker that trusts a test user pool whose JWKS is served over
//! HTTP on loopback, tokens with Cognito's claim sets, the exchange in IssueTokens, Cognito
//! access tokens as callers, the JWKS cache's fetch discipline and outages, and the JWKS
//! fetcher's failure modes.

use std::{process::Stdio, sync::Arc, time::Duration};

use rand::Rng as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use tokenbroker::{
    identity::cognito::{
        COGNITO_HEALTH_SERVICE, CachedJwks, HttpJwksSource, JwksError, JwksSource, http_client,
    },
    model::clock::{Clock as _, ManualClock, SystemClock},
};
use tokenbroker_client::{Client, ClientErrorKind, pb};
use tokenbroker_tests::{
    TestBroker,
    cognito::{
        ADMIN_GROUP, Answer, CLIENT_ID, ISSUER, JwksServer, SERVICE_SCOPE, SUB, SigningKey,
        TestPool, access_claims, b64, id_claims, now, patched, pool_keys, settings_for, sign_hs256,
        unsigned,
    },
    eventually, logs,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::kind_of;

/// An IssueTokens request that exchanges `token`.
pub(crate) fn exchange(token: &str) -> pb::IssueTokensRequest {
    pb::IssueTokensRequest {
        subject: Some(pb::issue_tokens_request::Subject::CognitoToken(
            token.into(),
        )),
        ..Default::default()
    }
}

async fn spawn(pool: &TestPool) -> TestBroker {
    let settings = pool.settings();
    TestBroker::spawn_with(|s| s.cognito = settings).await
}

/// A client of `broker` that presents `token` as its bearer credential.
pub(crate) fn bearer(broker: &TestBroker, token: &SecretString) -> Client {
    broker
        .anonymous
        .clone()
        .with_api_key(token)
        .expect("a jwt is ascii")
}

async fn health(broker: &TestBroker, service: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(broker.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn id_token_exchanges_for_a_pair_like_asserted_claims() {
    let pool = TestPool::start().await;
    let broker = spawn(&pool).await;
    let token = pool.id_token("Alice@Example.com");
    let pair = broker
        .service
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
    assert_eq!(info.account_id, pair.account_id);
    // The same user through the trigger's asserted claims lands on the same account.
    let asserted = broker.issue("alice@example.com").await;
    assert_eq!(asserted.account_id, pair.account_id);
    // Trigger and admin may exchange too; anonymous callers may not.
    for client in [&broker.trigger, &broker.admin] {
        client
            .issue_tokens(exchange(token.expose_secret()))
            .await
            .unwrap();
    }
    assert_eq!(
        kind_of(
            broker
                .anonymous
                .issue_tokens(exchange(token.expose_secret()))
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
}

#[tokio::test]
async fn access_token_without_aud_is_accepted() {
    let pool = TestPool::start().await;
    let broker = spawn(&pool).await;
    // As a caller: a valid credential, roles from its scope.
    let token = pool.access_token(&["users"], &format!("openid {SERVICE_SCOPE}"));
    let pair = broker.issue("bob@example.com").await;
    assert!(
        bearer(&broker, &token)
            .introspect_secret(&pair.access.secret)
            .await
            .unwrap()
            .active
    );
    // As a subject: an access token a pre-token-generation trigger added the email to.
    let claims = patched(
        access_claims(&["users"], "openid"),
        &json!({"email": "bob@example.com", "email_verified": true}),
    );
    let exchanged = broker
        .service
        .issue_tokens(exchange(&pool.access_key.sign(&claims)))
        .await
        .unwrap();
    assert_eq!(exchanged.account_id, pair.account_id);
    // Without an email, an access token cannot be exchanged.
    let err = broker
        .service
        .issue_tokens(exchange(token.expose_secret()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unauthenticated);
    assert!(err.message().contains("no email"), "{}", err.message());
}

#[tokio::test]
async fn token_within_the_leeway_is_accepted() {
    let pool = TestPool::start().await;
    let mut settings = pool.settings();
    settings.leeway_seconds = 60;
    let broker = TestBroker::spawn_with(|s| s.cognito = settings).await;
    let claims = patched(
        id_claims("late@example.com"),
        &json!({"exp": now() - 30, "iat": now() - 3630}),
    );
    broker
        .service
        .issue_tokens(exchange(&pool.id_key.sign(&claims)))
        .await
        .unwrap();
    let beyond = patched(claims, &json!({"exp": now() - 90}));
    assert_eq!(
        kind_of(
            broker
                .service
                .issue_tokens(exchange(&pool.id_key.sign(&beyond)))
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
}

#[tokio::test]
async fn rejected_tokens_are_unauthenticated_and_never_echoed() {
    let pool = TestPool::start().await;
    let broker = spawn(&pool).await;
    let id = || id_claims("carol@example.com");
    let stranger = SigningKey::nth(2, &pool.id_key.kid);
    let genuine = pool.id_key.sign(&id());
    let (header, rest) = genuine.split_once('.').unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("alg none", unsigned(&pool.id_key.kid, &id())),
        (
            "alg none with a signature",
            format!("{}c2ln", unsigned(&pool.id_key.kid, &id())),
        ),
        (
            "hs256 keyed with the rsa public key",
            sign_hs256(&pool.id_key.kid, &pool.id_key.public_der(), &id()),
        ),
        (
            "unknown kid",
            SigningKey::nth(0, "kid-nobody-published").sign(&id()),
        ),
        ("bad signature", stranger.sign(&id())),
        (
            "expired",
            pool.id_key
                .sign(&patched(id(), &json!({"exp": now() - 1, "iat": now() - 3601}))),
        ),
        (
            "nbf in the future",
            pool.id_key.sign(&patched(id(), &json!({"nbf": now() + 120}))),
        ),
        (
            "iat in the future",
            pool.id_key.sign(&patched(id(), &json!({"iat": now() + 120}))),
        ),
        (
            "wrong iss",
            pool.id_key.sign(&patched(
                id(),
                &json!({"iss": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Other"}),
            )),
        ),
        (
            "issuer with a trailing slash",
            pool.id_key
                .sign(&patched(id(), &json!({"iss": format!("{ISSUER}/")}))),
        ),
        (
            "wrong token_use",
            pool.id_key
                .sign(&patched(id(), &json!({"token_use": "refresh"}))),
        ),
        (
            "id token with a foreign aud",
            pool.id_key
                .sign(&patched(id(), &json!({"aud": "someone-elses-client"}))),
        ),
        (
            "id token without aud",
            pool.id_key.sign(&patched(id(), &json!({"aud": null}))),
        ),
        (
            "access token with a foreign client_id",
            pool.access_key.sign(&patched(
                access_claims(&[], "openid"),
                &json!({"client_id": "someone-elses-client", "email": "carol@example.com", "email_verified": true}),
            )),
        ),
        ("malformed base64", format!("{header}.*{rest}")),
        ("two segments", format!("{header}.{}", rest.split_once('.').unwrap().0)),
        (
            // Over the verifier's 16 KiB limit, under the request size limit (which answers
            // RESOURCE_EXHAUSTED for anything larger, see limits.rs).
            "a 20 KB token",
            format!("{genuine}{}", "A".repeat(20 * 1024)),
        ),
        (
            "email_verified false",
            pool.id_key
                .sign(&patched(id(), &json!({"email_verified": false}))),
        ),
        (
            "no email",
            pool.id_key.sign(&patched(id(), &json!({"email": null}))),
        ),
    ];
    let mut errors = Vec::new();
    for (what, token) in &cases {
        let err = broker
            .service
            .issue_tokens(exchange(token))
            .await
            .expect_err(what);
        assert_eq!(
            err.kind(),
            ClientErrorKind::Unauthenticated,
            "{what}: {err}"
        );
        errors.push(err.to_string());
    }
    // The genuine token is fine: the cases fail for what was done to them.
    broker
        .service
        .issue_tokens(exchange(&genuine))
        .await
        .unwrap();

    // The same tokens as bearer credentials (the last one is a valid ID token, which is not a
    // caller credential).
    for (what, token) in cases
        .iter()
        .chain([&("id token as a caller", genuine.clone())])
    {
        if token.len() > 16 * 1024 {
            continue; // larger than a gRPC header may be; the exchange case covers it
        }
        let client = bearer(&broker, &SecretString::from(token.clone()));
        let err = client
            .list_tokens(pb::ListTokensRequest {
                account: Some(pb::list_tokens_request::Account::Email(
                    "carol@example.com".into(),
                )),
                ..Default::default()
            })
            .await
            .expect_err(what);
        assert_eq!(
            err.kind(),
            ClientErrorKind::Unauthenticated,
            "{what}: {err}"
        );
        errors.push(err.to_string());
    }
    let logged = logs().contents();
    for (what, token) in &cases {
        for part in token.split('.').filter(|p| p.len() > 16) {
            assert!(
                !logged.contains(part),
                "{what}: a token part reached the logs"
            );
            for message in &errors {
                assert!(!message.contains(part), "{what}: echoed in {message}");
            }
        }
    }
}

#[tokio::test]
async fn group_admin_can_revoke_and_a_plain_user_cannot() {
    let pool = TestPool::start().await;
    let broker = spawn(&pool).await;
    let victim = broker.issue("dave@example.com").await;
    let revoke = || pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::Email("dave@example.com".into())),
        ..Default::default()
    };

    let plain = bearer(&broker, &pool.access_token(&["users"], "openid"));
    let err = plain.revoke(revoke()).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::PermissionDenied, "{err}");
    assert!(broker.is_active(&victim.access.secret).await);
    // No role at all: introspection (service) is denied too, but the caller is authenticated.
    assert_eq!(
        kind_of(plain.introspect_secret(&victim.access.secret).await),
        ClientErrorKind::PermissionDenied
    );

    let admin = bearer(
        &broker,
        &pool.access_token(&["users", ADMIN_GROUP], "openid"),
    );
    let revoked = admin.revoke(revoke()).await.unwrap();
    assert_eq!(revoked.revoked_count, 2);
    assert!(!broker.is_active(&victim.access.secret).await);
    // A group of the same name in a token from another issuer grants nothing.
    let foreign = pool.access_key.sign(&patched(
        access_claims(&[ADMIN_GROUP], "openid"),
        &json!({"iss": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_Else"}),
    ));
    assert_eq!(
        kind_of(
            bearer(&broker, &SecretString::from(foreign))
                .revoke(revoke())
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
}

#[tokio::test]
async fn jwt_bearer_without_a_pool_is_unauthenticated() {
    let pool = TestPool::start().await;
    let broker = TestBroker::spawn().await;
    let admin = bearer(&broker, &pool.access_token(&[ADMIN_GROUP], "openid"));
    let err = admin
        .introspect_secret(&SecretString::from("tba_x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unauthenticated);
    assert!(err.message().contains("no user pool"), "{}", err.message());
    assert_eq!(pool.jwks.requests(), 0);
}

/// Sends `n` exchanges in parallel, each with a made-up kid and a made-up signature, as an
/// attacker would: every one must be refused.
async fn flood_with_random_kids(broker: &TestBroker, n: usize) {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let kid = format!("kid-{:016x}", rand::rng().random::<u64>());
        let header = b64(&json!({"kid": kid, "alg": "RS256"}));
        let token = format!(
            "{header}.{}.c2lnbmF0dXJl",
            b64(&id_claims("flood@example.com"))
        );
        let client = broker.service.clone();
        calls.spawn(async move { client.issue_tokens(exchange(&token)).await });
    }
    while let Some(result) = calls.join_next().await {
        assert_eq!(
            result.unwrap().unwrap_err().kind(),
            ClientErrorKind::Unauthenticated
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_random_kids_cause_at_most_one_fetch_per_cooldown() {
    let pool = TestPool::start().await;
    let settings = pool.settings();
    let cooldown = settings.jwks_cooldown();
    // The cooldown runs on the broker's (manual) clock, so the windows below are exact
    // however long the floods take.
    let broker = TestBroker::spawn_with_manual_clock(|s| s.cognito = settings).await;
    assert_eq!(pool.jwks.requests(), 1, "hydrated at start-up");
    // Inside the start-up fetch's cooldown: no fetch at all.
    flood_with_random_kids(&broker, 1000).await;
    assert_eq!(pool.jwks.requests(), 1);
    // Each later window: the first miss fetches once, the other 999 (and a second flood)
    // are refused without fetching.
    for window in 1..=2 {
        broker.advance(cooldown + Duration::from_secs(1));
        flood_with_random_kids(&broker, 1000).await;
        flood_with_random_kids(&broker, 100).await;
        assert_eq!(pool.jwks.requests(), 1 + window, "window {window}");
    }
    // Known keys are unaffected. The floods took real time that the manual clock did not
    // count: catch it up, so the fresh token's `iat` is not in the broker's future.
    let behind = SystemClock.now().0 - broker.clock.now().0;
    if behind > 0 {
        broker.advance(Duration::from_micros(behind.unsigned_abs()));
    }
    broker
        .service
        .issue_tokens(exchange(pool.id_token("flood@example.com").expose_secret()))
        .await
        .unwrap();
}

#[tokio::test]
async fn rotated_key_is_picked_up_after_the_cooldown() {
    let pool = TestPool::start().await;
    let settings = pool.settings();
    let broker = TestBroker::spawn_with_manual_clock(|s| s.cognito = settings).await;
    let rotated = SigningKey::nth(2, "id-key-2025");
    pool.jwks
        .publish(&[rotated.clone(), pool.access_key.clone()]);
    let token = rotated.sign(&id_claims("erin@example.com"));
    // Within the cooldown of the start-up fetch, the new kid is not fetched.
    assert_eq!(
        kind_of(broker.service.issue_tokens(exchange(&token)).await),
        ClientErrorKind::Unauthenticated
    );
    assert_eq!(pool.jwks.requests(), 1);
    broker.advance(Duration::from_secs(11));
    broker.service.issue_tokens(exchange(&token)).await.unwrap();
    assert_eq!(pool.jwks.requests(), 2);
    // The retired key is gone with the set that replaced it.
    let retired = pool.id_token("erin@example.com");
    assert_eq!(
        kind_of(
            broker
                .service
                .issue_tokens(exchange(retired.expose_secret()))
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
}

#[tokio::test]
async fn cached_keys_keep_verifying_when_the_jwks_server_goes_down() {
    let pool = TestPool::start().await;
    let settings = pool.settings();
    let broker = TestBroker::spawn_with_manual_clock(|s| s.cognito = settings).await;
    pool.jwks.stop();
    broker.advance(Duration::from_secs(11));
    // An unknown kid now needs the endpoint: UNAVAILABLE, not a verdict on the token.
    let unknown = SigningKey::nth(2, "kid-after-outage").sign(&id_claims("fay@example.com"));
    let err = broker
        .service
        .issue_tokens(exchange(&unknown))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unavailable, "{err}");
    // Known kids keep verifying, fresh tokens included.
    for email in ["fay@example.com", "gil@example.com"] {
        broker
            .service
            .issue_tokens(exchange(pool.id_token(email).expose_secret()))
            .await
            .unwrap();
    }
    let admin = bearer(&broker, &pool.access_token(&[ADMIN_GROUP], "openid"));
    assert!(
        admin
            .list_tokens(pb::ListTokensRequest {
                account: Some(pb::list_tokens_request::Account::Email(
                    "fay@example.com".into()
                )),
                ..Default::default()
            })
            .await
            .is_ok()
    );
    assert_eq!(
        health(&broker, COGNITO_HEALTH_SERVICE).await,
        ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn broker_starts_with_the_jwks_server_down_and_serves_once_keys_arrive() {
    let addr = JwksServer::reserve_address().await;
    let mut settings = settings_for(&format!("http://{addr}/.well-known/jwks.json"));
    settings.jwks_cooldown_seconds = 1;
    let broker = TestBroker::spawn_with(|s| s.cognito = settings).await;
    assert_eq!(health(&broker, "").await, ServingStatus::Serving as i32);
    assert_eq!(
        health(&broker, COGNITO_HEALTH_SERVICE).await,
        ServingStatus::NotServing as i32
    );
    let (id_key, access_key) = pool_keys();
    let token = id_key.sign(&id_claims("hal@example.com"));
    assert_eq!(
        kind_of(broker.service.issue_tokens(exchange(&token)).await),
        ClientErrorKind::Unavailable
    );
    // API-key callers are served meanwhile.
    broker.issue("hal@example.com").await;

    let jwks = JwksServer::start_on(addr, &[id_key, access_key]).await;
    eventually("the cognito health service turns SERVING", || async {
        health(&broker, COGNITO_HEALTH_SERVICE).await == ServingStatus::Serving as i32
    })
    .await;
    broker.service.issue_tokens(exchange(&token)).await.unwrap();
    assert!(jwks.requests() >= 1);
}

#[tokio::test]
async fn grpcurl_admin_revokes_with_a_cognito_access_token() {
    let pool = TestPool::start().await;
    let broker = spawn(&pool).await;
    let victim = broker.issue("ivy@example.com").await;
    let token = pool.access_token(&[ADMIN_GROUP], "openid");
    tokenbroker_tests::require_tool("grpcurl");
    // As in the README: the token travels in an environment variable, not the command line.
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(
            r#"grpcurl -plaintext -H "authorization: Bearer $ACCESS_TOKEN" \
                 -d '{"email": "ivy@example.com"}' "$B" tokenbroker.v1.TokenBroker/Revoke"#,
        )
        .env("ACCESS_TOKEN", token.expose_secret())
        .env("B", broker.addr.to_string())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("\"revokedCount\": \"2\""), "{stdout}");
    assert!(!broker.is_active(&victim.refresh.secret).await);
}

/// Fetches once from `server` with the broker's HTTP source and a 1 s timeout.
async fn fetch_from(url: &str) -> Result<usize, JwksError> {
    let source = HttpJwksSource::new(http_client(Duration::from_secs(1)).unwrap(), url);
    source.fetch().await.map(|keys| keys.len())
}

#[tokio::test]
async fn jwks_fetcher_classifies_every_failure() {
    let pool = TestPool::start().await;
    let url = pool.jwks.url();
    assert_eq!(fetch_from(&url).await.unwrap(), 2);
    for code in [404, 403, 429, 500, 503] {
        pool.jwks.answer(Answer::Status(code));
        assert!(
            matches!(fetch_from(&url).await, Err(JwksError::Status(c)) if c == code),
            "{code}"
        );
    }
    pool.jwks.answer(Answer::Garbage);
    assert!(matches!(
        fetch_from(&url).await,
        Err(JwksError::Malformed(_))
    ));
    pool.jwks.answer(Answer::Truncated);
    let truncated = fetch_from(&url).await;
    assert!(
        matches!(truncated, Err(JwksError::Request(_))),
        "{truncated:?}"
    );
    pool.jwks.answer(Answer::Huge);
    assert!(matches!(fetch_from(&url).await, Err(JwksError::TooLarge)));
    pool.jwks.answer(Answer::Slow(Duration::from_secs(3)));
    assert!(matches!(fetch_from(&url).await, Err(JwksError::Timeout(_))));
    pool.jwks.stop();
    let before = pool.jwks.requests();
    assert!(matches!(fetch_from(&url).await, Err(JwksError::Connect(_))));
    assert_eq!(pool.jwks.requests(), before);
}

#[tokio::test]
async fn jwks_cache_over_http_keeps_keys_through_failures() {
    let pool = TestPool::start().await;
    let clock = Arc::new(ManualClock::new());
    let source = HttpJwksSource::new(
        http_client(Duration::from_secs(1)).unwrap(),
        pool.jwks.url(),
    );
    let cache = CachedJwks::new(Arc::new(source), clock.clone(), Duration::from_secs(10));
    assert!(cache.hydrate().await);
    for answer in [Answer::Status(500), Answer::Garbage, Answer::Truncated] {
        pool.jwks.answer(answer);
        clock.advance(Duration::from_secs(10));
        assert!(cache.key("kid-unknown").await.is_err());
        assert!(cache.key(&pool.id_key.kid).await.is_ok());
    }
    assert_eq!(pool.jwks.requests(), 4);
    assert_eq!(cache.fetches(), 4);
}
