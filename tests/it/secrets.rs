//! Secrets never leak: a full flow with every log line captured at TRACE, then a search for
//! every secret the flow handled in the logs, the error messages and `Debug` output.

use secrecy::SecretString;
use tokenbroker_client::pb;
use tokenbroker_tests::{TestBroker, expose, logs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_errors_or_debug_output() {
    let broker = TestBroker::spawn_with(|s| s.tokens.refresh_grace_seconds = 0).await;
    let mut secrets: Vec<String> = vec![
        expose(&broker.keys.admin),
        expose(&broker.keys.trigger),
        expose(&broker.keys.service),
    ];
    let mut errors = Vec::new();
    let mut debug = Vec::new();

    let mut request = tokenbroker_tests::claims_request("leak@example.com", "app");
    request.idempotency_key = "leak-check".into();
    let pair = broker.trigger.issue_tokens(request.clone()).await.unwrap();
    let replay = broker.trigger.issue_tokens(request).await.unwrap();
    debug.push(format!("{pair:?} {replay:?}"));
    secrets.extend([expose(&pair.access.secret), expose(&pair.refresh.secret)]);

    broker
        .service
        .introspect_secret(&pair.access.secret)
        .await
        .unwrap();
    let next = broker
        .anonymous
        .refresh_tokens(pb::RefreshTokensRequest {
            refresh_token: expose(&pair.refresh.secret),
            ..Default::default()
        })
        .await
        .unwrap();
    debug.push(format!("{next:?}"));
    secrets.extend([expose(&next.access.secret), expose(&next.refresh.secret)]);

    // Reuse (grace 0): the family is revoked; the error must not echo the secret.
    let reuse = broker
        .anonymous
        .refresh_tokens(pb::RefreshTokensRequest {
            refresh_token: expose(&pair.refresh.secret),
            ..Default::default()
        })
        .await
        .unwrap_err();
    errors.push(reuse.to_string());

    // A wrong API key, a wrong client, garbage secrets: errors must not echo them.
    let wrong_key = "tbk_wrong_key_that_must_not_be_echoed_0123456789";
    secrets.push(wrong_key.into());
    let forged = broker
        .anonymous
        .clone()
        .with_api_key(&SecretString::from(wrong_key))
        .unwrap();
    errors.push(
        forged
            .introspect_secret(&next.access.secret)
            .await
            .unwrap_err()
            .to_string(),
    );
    debug.push(format!("{forged:?}"));
    let other = broker.issue_for_client("leak@example.com", "app").await;
    secrets.extend([expose(&other.access.secret), expose(&other.refresh.secret)]);
    errors.push(
        broker
            .anonymous
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::Token(expose(
                    &other.refresh.secret,
                ))),
                client_id: "another-app".into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .to_string(),
    );
    let garbage = "tbr_ffffffffffffffffffffffffffffffff_garbage_secret_value";
    secrets.push(garbage.into());
    errors.push(
        broker
            .anonymous
            .refresh_tokens(pb::RefreshTokensRequest {
                refresh_token: garbage.into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .to_string(),
    );
    broker
        .admin
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::Email("leak@example.com".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    broker.stop().await.unwrap();

    let logged = logs().contents();
    assert!(logged.contains("tokens issued"), "the capture saw the flow");
    assert!(
        logged.contains("reuse"),
        "the capture saw the reuse detection"
    );
    for secret in &secrets {
        // The random tail alone must not appear either (a log that cut off the prefix).
        let tail = &secret[secret.len() - 24..];
        assert!(!logged.contains(tail), "a secret reached the logs");
        for text in errors.iter().chain(&debug) {
            assert!(
                !text.contains(tail),
                "a secret reached an error or Debug: {text}"
            );
        }
    }
}
