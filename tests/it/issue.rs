//! IssueTokens: get-or-create, the pair, idempotency, roles, lifetimes.

use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{TestBroker, claims_request, expose};

use crate::kind_of;

#[tokio::test]
async fn issued_pair_is_linked_and_introspects_active() {
    let broker = TestBroker::spawn().await;
    let pair = broker.issue_for_client("Alice@Example.com ", "app-1").await;
    assert!(expose(&pair.access.secret).starts_with("tba_"));
    assert!(expose(&pair.refresh.secret).starts_with("tbr_"));
    assert!(!pair.replayed);

    let access = broker
        .service
        .introspect_secret(&pair.access.secret)
        .await
        .unwrap();
    assert!(access.active);
    assert_eq!(access.kind, pb::TokenKind::Access as i32);
    assert_eq!(access.token_id, pair.access.token_id);
    assert_eq!(access.account_id, pair.account_id);
    assert_eq!(access.family_id, pair.family_id);
    assert_eq!(access.email, "alice@example.com");
    assert_eq!(access.client_id, "app-1");
    assert_eq!(access.cognito_sub, "5f0c1a3e-0000-4000-8000-000000000001");
    let lifetime = access.expires_at.unwrap().seconds - access.issued_at.unwrap().seconds;
    assert_eq!(lifetime, 600, "default access lifetime");

    let refresh = broker
        .service
        .introspect_secret(&pair.refresh.secret)
        .await
        .unwrap();
    assert!(refresh.active);
    assert_eq!(refresh.kind, pb::TokenKind::Refresh as i32);
    let lifetime = refresh.expires_at.unwrap().seconds - refresh.issued_at.unwrap().seconds;
    assert_eq!(lifetime, 3600, "default refresh lifetime");

    let tokens = broker.all_tokens("alice@example.com").await;
    let access_row = tokens
        .iter()
        .find(|t| t.token_id == pair.access.token_id)
        .unwrap();
    assert_eq!(
        access_row.parent_id, pair.refresh.token_id,
        "access is the refresh's child"
    );
}

#[tokio::test]
async fn same_email_gets_same_account_and_a_new_family() {
    let broker = TestBroker::spawn().await;
    let first = broker.issue("bob@example.com").await;
    let second = broker.issue("BOB@example.com").await;
    assert_eq!(first.account_id, second.account_id);
    assert_ne!(first.family_id, second.family_id);
    let other = broker.issue("carol@example.com").await;
    assert_ne!(first.account_id, other.account_id);
}

#[tokio::test]
async fn visually_identical_emails_in_other_unicode_forms_are_one_account() {
    let broker = TestBroker::spawn().await;
    // Composed "é" and a Unicode domain, then "e" + U+0301 and the domain's punycode.
    let composed = broker.issue("Ren\u{e9}e@\u{dc}ber.example").await;
    let decomposed = broker.issue("rene\u{301}e@xn--ber-goa.example").await;
    assert_eq!(composed.account_id, decomposed.account_id);
    assert_ne!(composed.family_id, decomposed.family_id);
    let info = broker
        .service
        .introspect_secret(&decomposed.access.secret)
        .await
        .unwrap();
    assert_eq!(info.email, "ren\u{e9}e@xn--ber-goa.example");

    let err = broker
        .trigger
        .issue_tokens(claims_request("ren\u{e9}e\u{200B}@xn--ber-goa.example", ""))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ClientErrorKind::InvalidArgument,
        "{}",
        err.message()
    );
    assert!(err.message().contains("invisible"), "{}", err.message());
    assert!(!err.message().contains("ber"), "echoed: {}", err.message());
}

#[tokio::test]
async fn requested_lifetimes_are_honoured_up_to_the_maximum() {
    let broker = TestBroker::spawn().await;
    let mut request = claims_request("dan@example.com", "");
    request.access_ttl_seconds = 60;
    request.refresh_ttl_seconds = 120;
    let pair = broker.trigger.issue_tokens(request).await.unwrap();
    let info = broker
        .service
        .introspect_secret(&pair.access.secret)
        .await
        .unwrap();
    assert_eq!(
        info.expires_at.unwrap().seconds - info.issued_at.unwrap().seconds,
        60
    );

    let mut request = claims_request("dan@example.com", "");
    request.access_ttl_seconds = 3601;
    let err = broker.trigger.issue_tokens(request).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::InvalidArgument);
    assert!(
        err.message().contains("access_ttl_seconds"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn idempotency_key_replays_the_same_pair() {
    let broker = TestBroker::spawn().await;
    let mut request = claims_request("erin@example.com", "app");
    request.idempotency_key = "us-east-1_Pool:sub-1:app:TokenGeneration_HostedAuth".into();
    let first = broker.trigger.issue_tokens(request.clone()).await.unwrap();
    let again = broker.trigger.issue_tokens(request.clone()).await.unwrap();
    assert!(!first.replayed);
    assert!(again.replayed);
    assert_eq!(first.access.token_id, again.access.token_id);
    assert_eq!(first.refresh.token_id, again.refresh.token_id);
    assert_eq!(expose(&first.access.secret), expose(&again.access.secret));
    assert_eq!(
        broker.all_tokens("erin@example.com").await.len(),
        2,
        "one pair stored"
    );

    // Another key, or another caller with the same key, mints anew.
    request.idempotency_key = "another-key".into();
    let other = broker.trigger.issue_tokens(request.clone()).await.unwrap();
    assert_ne!(other.access.token_id, first.access.token_id);
    request.idempotency_key = "us-east-1_Pool:sub-1:app:TokenGeneration_HostedAuth".into();
    let by_admin = broker.admin.issue_tokens(request).await.unwrap();
    assert_ne!(by_admin.access.token_id, first.access.token_id);
}

#[tokio::test]
async fn idempotency_window_ends() {
    let broker = TestBroker::spawn_with(|s| s.tokens.idempotency_window_seconds = 1).await;
    let mut request = claims_request("fay@example.com", "");
    request.idempotency_key = "k".into();
    let first = broker.trigger.issue_tokens(request.clone()).await.unwrap();
    tokenbroker_tests::eventually("a new pair after the window", || {
        let request = request.clone();
        let trigger = broker.trigger.clone();
        let first_id = first.access.token_id.clone();
        async move { trigger.issue_tokens(request).await.unwrap().access.token_id != first_id }
    })
    .await;
}

#[tokio::test]
async fn concurrent_retries_with_one_key_mint_one_pair() {
    let broker = TestBroker::spawn().await;
    let mut request = claims_request("gus@example.com", "");
    request.idempotency_key = "retry".into();
    let calls = (0..20).map(|_| {
        let trigger = broker.trigger.clone();
        let request = request.clone();
        tokio::spawn(async move { trigger.issue_tokens(request).await.unwrap() })
    });
    let mut ids = Vec::new();
    for call in calls {
        ids.push(call.await.unwrap().access.token_id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every retry got the same pair");
    assert_eq!(broker.all_tokens("gus@example.com").await.len(), 2);
}

#[tokio::test]
async fn cognito_token_needs_a_configured_pool() {
    let broker = TestBroker::spawn().await;
    let request = pb::IssueTokensRequest {
        subject: Some(pb::issue_tokens_request::Subject::CognitoToken(
            "eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into(),
        )),
        ..Default::default()
    };
    let err = broker.service.issue_tokens(request).await.unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::FailedPrecondition);
    assert!(err.message().contains("no Cognito user pool is configured"));
}

#[tokio::test]
async fn issuing_needs_the_trigger_or_admin_role() {
    let broker = TestBroker::spawn().await;
    let request = || claims_request("hal@example.com", "");
    assert_eq!(
        kind_of(broker.anonymous.issue_tokens(request()).await),
        ClientErrorKind::Unauthenticated
    );
    assert_eq!(
        kind_of(broker.service.issue_tokens(request()).await),
        ClientErrorKind::PermissionDenied
    );
    let forged = broker
        .anonymous
        .clone()
        .with_api_key(&"tbk_not_a_real_key".to_owned().into())
        .unwrap();
    assert_eq!(
        kind_of(forged.issue_tokens(request()).await),
        ClientErrorKind::Unauthenticated
    );
    assert!(broker.admin.issue_tokens(request()).await.is_ok());
}
