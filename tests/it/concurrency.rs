//! Concurrency: first sign-ins race to create one account; parallel refreshes never fork.

use tokenbroker_client::pb;
use tokenbroker_tests::{TestBroker, expose};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_first_sign_ins_create_one_account() {
    let broker = TestBroker::spawn().await;
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let trigger = broker.trigger.clone();
            tokio::spawn(async move {
                trigger
                    .issue_tokens(tokenbroker_tests::claims_request("race@example.com", ""))
                    .await
                    .expect("IssueTokens succeeds")
            })
        })
        .collect();
    let mut accounts = Vec::new();
    let mut families = Vec::new();
    for call in calls {
        let pair = call.await.unwrap();
        accounts.push(pair.account_id);
        families.push(pair.family_id);
    }
    accounts.sort();
    accounts.dedup();
    assert_eq!(accounts.len(), 1, "exactly one account");
    families.sort();
    families.dedup();
    assert_eq!(families.len(), 100, "one family per sign-in");
    assert_eq!(broker.all_tokens("race@example.com").await.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_refreshes_do_not_fork_the_family() {
    let broker = TestBroker::spawn().await;
    let pair = broker.issue("fork@example.com").await;
    let secret = expose(&pair.refresh.secret);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let client = broker.anonymous.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                client
                    .refresh_tokens(pb::RefreshTokensRequest {
                        refresh_token: secret,
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    // Every call is answered with the successor: concurrent twins of one rotation share it.
    let mut successors = Vec::new();
    for (i, call) in calls.into_iter().enumerate() {
        let next = call
            .await
            .unwrap()
            .unwrap_or_else(|err| panic!("refresh {i} of 50 failed: {err}"));
        assert_eq!(next.family_id, pair.family_id, "refresh {i}");
        successors.push(next.refresh.token_id);
    }
    assert_eq!(successors.len(), 50);
    successors.sort();
    successors.dedup();
    assert_eq!(successors.len(), 1, "every refresh got the same successor");
    let live_refresh: Vec<_> = broker
        .all_tokens("fork@example.com")
        .await
        .into_iter()
        .filter(|t| {
            t.kind == pb::TokenKind::Refresh as i32 && t.state == pb::TokenState::Active as i32
        })
        .collect();
    assert_eq!(
        live_refresh.len(),
        1,
        "one live refresh token in the family"
    );
    assert_eq!(live_refresh[0].token_id, successors[0]);
}
