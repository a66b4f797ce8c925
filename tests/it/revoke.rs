//! Revoke (RFC 7009): by secret for anyone, by id, family, account or email for admins.

use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{TestBroker, expose};

use crate::kind_of;

fn by_secret(secret: &str, hint: i32, client_id: &str) -> pb::RevokeRequest {
    pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::Token(secret.into())),
        token_type_hint: hint,
        client_id: client_id.into(),
    }
}

fn target(target: pb::revoke_request::Target) -> pb::RevokeRequest {
    pb::RevokeRequest {
        target: Some(target),
        ..Default::default()
    }
}

/// Hints: none, right, wrong, and a value the proto does not define.
const HINTS: [i32; 4] = [0, 1, 2, 7];

#[tokio::test]
async fn revoking_by_secret_is_idempotent_whatever_the_hint() {
    let broker = TestBroker::spawn().await;
    for hint in HINTS {
        let pair = broker.issue("pia@example.com").await;
        let secret = expose(&pair.access.secret);
        for attempt in 0..2 {
            let answer = broker.anonymous.revoke(by_secret(&secret, hint, "")).await;
            assert_eq!(
                answer.unwrap().revoked_count,
                0,
                "hint {hint}, attempt {attempt}"
            );
        }
        assert!(!broker.is_active(&pair.access.secret).await);
        assert!(
            broker.is_active(&pair.refresh.secret).await,
            "access revocation does not cascade up"
        );
        for garbage in [
            "garbage",
            "tba_00000000000000000000000000000000_x",
            "eyJ.eyJ.sig",
        ] {
            assert!(
                broker
                    .anonymous
                    .revoke(by_secret(garbage, hint, ""))
                    .await
                    .is_ok()
            );
        }
        assert_eq!(
            kind_of(broker.anonymous.revoke(by_secret("", hint, "")).await),
            ClientErrorKind::InvalidArgument
        );
    }
}

#[tokio::test]
async fn another_clients_token_cannot_be_revoked_by_secret() {
    let broker = TestBroker::spawn().await;
    for hint in HINTS {
        let pair = broker.issue_for_client("quinn@example.com", "app-a").await;
        let secret = expose(&pair.refresh.secret);
        assert_eq!(
            kind_of(
                broker
                    .anonymous
                    .revoke(by_secret(&secret, hint, "app-b"))
                    .await
            ),
            ClientErrorKind::PermissionDenied
        );
        assert!(broker.is_active(&pair.refresh.secret).await);
        assert!(
            broker
                .anonymous
                .revoke(by_secret(&secret, hint, "app-a"))
                .await
                .is_ok()
        );
        assert!(!broker.is_active(&pair.refresh.secret).await);
    }
}

#[tokio::test]
async fn revoking_a_refresh_token_cascades_to_its_family_only() {
    let broker = TestBroker::spawn().await;
    let session = broker.issue("rae@example.com").await;
    let rotated = broker.refresh(&session.refresh.secret).await.unwrap();
    let other = broker.issue("rae@example.com").await;
    broker
        .anonymous
        .revoke(by_secret(&expose(&rotated.refresh.secret), 2, ""))
        .await
        .unwrap();
    for secret in [
        &session.access.secret,
        &rotated.access.secret,
        &rotated.refresh.secret,
    ] {
        assert!(!broker.is_active(secret).await, "same family is revoked");
    }
    assert!(
        broker.is_active(&other.access.secret).await,
        "other family stays active"
    );
    assert!(
        broker.is_active(&other.refresh.secret).await,
        "other family stays active"
    );
}

#[tokio::test]
async fn admins_revoke_by_id_family_account_and_email() {
    use pb::revoke_request::Target;
    let broker = TestBroker::spawn().await;

    let pair = broker.issue("sam@example.com").await;
    let answer = broker
        .admin
        .revoke(target(Target::TokenId(pair.access.token_id.clone())))
        .await;
    assert_eq!(answer.unwrap().revoked_count, 1);
    assert!(!broker.is_active(&pair.access.secret).await);
    assert!(broker.is_active(&pair.refresh.secret).await);
    let again = broker
        .admin
        .revoke(target(Target::TokenId(pair.access.token_id.clone())))
        .await;
    assert_eq!(again.unwrap().revoked_count, 0, "idempotent");

    let answer = broker
        .admin
        .revoke(target(Target::TokenId(pair.refresh.token_id.clone())))
        .await;
    assert_eq!(
        answer.unwrap().revoked_count,
        1,
        "refresh, its access already revoked"
    );

    let pair = broker.issue("sam@example.com").await;
    let answer = broker
        .admin
        .revoke(target(Target::FamilyId(pair.family_id.clone())))
        .await;
    assert_eq!(answer.unwrap().revoked_count, 2);
    assert!(!broker.is_active(&pair.refresh.secret).await);

    let a = broker.issue("sam@example.com").await;
    let b = broker.issue("sam@example.com").await;
    let answer = broker
        .admin
        .revoke(target(Target::AccountId(a.account_id.clone())))
        .await;
    assert_eq!(answer.unwrap().revoked_count, 4);
    assert!(!broker.is_active(&a.access.secret).await);
    assert!(!broker.is_active(&b.refresh.secret).await);

    let c = broker.issue("sam@example.com").await;
    assert!(
        broker.is_active(&c.access.secret).await,
        "issued after the watermark"
    );
    let answer = broker
        .admin
        .revoke(target(Target::Email(" SAM@example.com".into())))
        .await;
    assert_eq!(answer.unwrap().revoked_count, 2);
    assert!(!broker.is_active(&c.access.secret).await);

    for unknown in [
        Target::TokenId("tok_unknown".into()),
        Target::FamilyId("fam_unknown".into()),
        Target::AccountId("acc_unknown".into()),
        Target::Email("nobody@example.com".into()),
    ] {
        assert_eq!(
            broker
                .admin
                .revoke(target(unknown))
                .await
                .unwrap()
                .revoked_count,
            0
        );
    }
}

#[tokio::test]
async fn account_watermark_splits_before_and_after() {
    let broker = TestBroker::spawn().await;
    let before = issue_many(&broker, "tia@example.com", 5).await;
    let account = before[0].account_id.clone();
    broker
        .admin
        .revoke(target(pb::revoke_request::Target::AccountId(account)))
        .await
        .unwrap();
    let after = broker.issue("tia@example.com").await;
    for pair in &before {
        assert!(!broker.is_active(&pair.access.secret).await);
        assert!(!broker.is_active(&pair.refresh.secret).await);
    }
    assert!(broker.is_active(&after.access.secret).await);
    assert!(broker.is_active(&after.refresh.secret).await);
}

async fn issue_many(
    broker: &TestBroker,
    email: &str,
    n: usize,
) -> Vec<tokenbroker_client::TokenPair> {
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        pairs.push(broker.issue(email).await);
    }
    pairs
}

#[tokio::test]
async fn admin_targets_need_the_admin_role() {
    use pb::revoke_request::Target;
    let broker = TestBroker::spawn().await;
    let pair = broker.issue("uma@example.com").await;
    let targets = || {
        [
            Target::TokenId(pair.access.token_id.clone()),
            Target::FamilyId(pair.family_id.clone()),
            Target::AccountId(pair.account_id.clone()),
            Target::Email("uma@example.com".into()),
        ]
    };
    for t in targets() {
        assert_eq!(
            kind_of(broker.anonymous.revoke(target(t)).await),
            ClientErrorKind::Unauthenticated
        );
    }
    for client in [&broker.service, &broker.trigger] {
        for t in targets() {
            assert_eq!(
                kind_of(client.revoke(target(t)).await),
                ClientErrorKind::PermissionDenied
            );
        }
    }
    assert!(
        broker.is_active(&pair.access.secret).await,
        "nothing was revoked"
    );
}

#[tokio::test]
async fn malformed_targets_are_invalid() {
    use pb::revoke_request::Target;
    let broker = TestBroker::spawn().await;
    for t in [
        Target::TokenId(String::new()),
        Target::TokenId("tok with spaces".into()),
        Target::FamilyId("fam/1".into()),
        Target::AccountId("x".repeat(200)),
        Target::Email("not-an-email".into()),
    ] {
        assert_eq!(
            kind_of(broker.admin.revoke(target(t)).await),
            ClientErrorKind::InvalidArgument
        );
    }
    assert_eq!(
        kind_of(broker.admin.revoke(pb::RevokeRequest::default()).await),
        ClientErrorKind::InvalidArgument
    );
}
