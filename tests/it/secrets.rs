//! Secrets never leak: a full flow with every log line captured at TRACE, then a search for
//! every secret the flow handled in the logs, the error messages, `Debug` output, the audit log
//! and a metrics scrape (the last two must not hold the raw email either).

use secrecy::SecretString;
use tokenbroker_client::pb;
use tokenbroker_tests::{expose, logs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_errors_or_debug_output() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_path = audit_dir.path().join("audit.log");
    let broker = crate::audit::audited_broker(&audit_path, |s| {
        s.tokens.refresh_grace_seconds = 0;
        s.metrics.listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    let mut secrets: Vec<String> = vec![
        expose(&broker.keys.admin),
        expose(&broker.keys.trigger),
        expose(&broker.keys.service),
        crate::audit::HMAC_KEY.to_owned(),
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
        .refresh_as(&pair.refresh.secret, "app")
        .await
        .unwrap();
    debug.push(format!("{next:?}"));
    secrets.extend([expose(&next.access.secret), expose(&next.refresh.secret)]);

    // Reuse (grace 0): the family is revoked; the error must not echo the secret.
    let reuse = broker
        .refresh_as(&pair.refresh.secret, "app")
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
    broker.revoke_email("leak@example.com").await;
    // An admin's introspection and listing are audited too.
    broker
        .admin
        .introspect_secret(&other.access.secret)
        .await
        .unwrap();
    broker
        .admin
        .list_tokens(pb::ListTokensRequest {
            account: Some(pb::list_tokens_request::Account::Email(
                "leak@example.com".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    let scraped = broker.scrape().await;
    broker.stop().await.unwrap();

    // The audit log and the metrics saw the flow, and hold no secret and no email.
    let audited = std::fs::read_to_string(&audit_path).unwrap();
    for event in [
        "issue",
        "refresh",
        "reuse_detected",
        "revoke",
        "introspect",
        "list",
    ] {
        assert!(
            audited.contains(&format!("\"event\":\"{event}\"")),
            "the audit log saw {event}"
        );
    }
    assert!(scraped.contains("tokenbroker_tokens_issued_total"));
    for text in [&audited, &scraped] {
        assert!(
            !text.contains("leak@example.com"),
            "an email in audit or metrics"
        );
        for secret in &secrets {
            let tail = &secret[secret.len() - 24..];
            assert!(!text.contains(tail), "a secret in audit or metrics");
        }
    }

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
