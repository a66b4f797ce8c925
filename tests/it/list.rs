//! ListTokens: an account's tokens without secrets, newest first, paginated.

use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::TestBroker;

use crate::kind_of;

fn by_email(
    email: &str,
    page_size: u32,
    page_token: String,
    include_inactive: bool,
) -> pb::ListTokensRequest {
    pb::ListTokensRequest {
        account: Some(pb::list_tokens_request::Account::Email(email.into())),
        page_size,
        page_token,
        include_inactive,
    }
}

#[tokio::test]
async fn pages_visit_every_token_once_newest_first() {
    let broker = TestBroker::spawn().await;
    let mut request = tokenbroker_tests::claims_request("xena@example.com", "app");
    request.metadata = [("device".to_owned(), "phone".to_owned())].into();
    let mut issued = Vec::new();
    for _ in 0..7 {
        let pair = broker.trigger.issue_tokens(request.clone()).await.unwrap();
        issued.push(pair.refresh.token_id.clone());
        issued.push(pair.access.token_id.clone());
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = broker
            .admin
            .list_tokens(by_email("xena@example.com", 3, page_token, false))
            .await
            .unwrap();
        pages += 1;
        assert!(page.tokens.len() <= 3);
        for token in &page.tokens {
            assert_eq!(token.state, pb::TokenState::Active as i32);
            assert_eq!(token.client_id, "app");
            assert_eq!(
                token.metadata.get("device").map(String::as_str),
                Some("phone")
            );
        }
        seen.extend(
            page.tokens
                .into_iter()
                .map(|t| (t.issued_at.unwrap(), t.token_id)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(pages, 5);
    let ids: Vec<_> = seen.iter().map(|(_, id)| id.clone()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 14, "every token exactly once");
    let mut expected = issued.clone();
    expected.sort();
    assert_eq!(sorted, expected);
    let times: Vec<_> = seen.iter().map(|(t, _)| (t.seconds, t.nanos)).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
}

#[tokio::test]
async fn inactive_tokens_are_listed_only_on_request() {
    let broker = TestBroker::spawn().await;
    let pair = broker.issue("yan@example.com").await;
    broker
        .admin
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::FamilyId(pair.family_id.clone())),
            ..Default::default()
        })
        .await
        .unwrap();
    let active = broker
        .admin
        .list_tokens(by_email("yan@example.com", 0, String::new(), false))
        .await
        .unwrap();
    assert!(active.tokens.is_empty());
    assert_eq!(active.account_id, pair.account_id);
    let all = broker
        .admin
        .list_tokens(by_email("yan@example.com", 0, String::new(), true))
        .await
        .unwrap();
    assert_eq!(all.tokens.len(), 2);
    assert!(
        all.tokens
            .iter()
            .all(|t| t.state == pb::TokenState::Revoked as i32 && t.revoked_at.is_some())
    );
    let by_id = broker
        .admin
        .list_tokens(pb::ListTokensRequest {
            account: Some(pb::list_tokens_request::Account::AccountId(
                pair.account_id.clone(),
            )),
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_id.tokens, all.tokens);
}

#[tokio::test]
async fn unknown_account_has_an_empty_page() {
    let broker = TestBroker::spawn().await;
    let page = broker
        .admin
        .list_tokens(by_email("nobody@example.com", 0, String::new(), true))
        .await
        .unwrap();
    assert!(page.tokens.is_empty());
    assert!(page.account_id.is_empty());
}

#[tokio::test]
async fn listing_rejects_bad_pages_and_non_admins() {
    let broker = TestBroker::spawn().await;
    broker.issue("zed@example.com").await;
    for bad in [
        by_email("zed@example.com", 501, String::new(), false),
        by_email("zed@example.com", 0, "not-a-page-token".into(), false),
        by_email("zed", 0, String::new(), false),
        pb::ListTokensRequest::default(),
    ] {
        assert_eq!(
            kind_of(broker.admin.list_tokens(bad).await),
            ClientErrorKind::InvalidArgument
        );
    }
    let request = || by_email("zed@example.com", 0, String::new(), false);
    assert_eq!(
        kind_of(broker.anonymous.list_tokens(request()).await),
        ClientErrorKind::Unauthenticated
    );
    assert_eq!(
        kind_of(broker.service.list_tokens(request()).await),
        ClientErrorKind::PermissionDenied
    );
}
