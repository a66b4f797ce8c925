//! Forward auth with a real gateway: Debian's nginx, `auth_request` pointed at the broker's
//! `/oauth2/authz`, in front of an upstream that records what reaches it.

use std::time::Duration;

use tokenbroker_client::pb;
use tokenbroker_tests::{
    TestBroker, expose,
    http::{Nginx, Upstream, curl},
};

use crate::http::{url, with_http};

/// The `server { }` body docs/api.md shows: `/api/` needs an active access token; its identity
/// goes upstream in headers that replace any the client sent.
fn config(broker: &TestBroker, upstream: &Upstream, gateway_key: &str) -> String {
    let authz = url(broker, "/oauth2/authz");
    let upstream = upstream.addr;
    format!(
        r#"
location = /_tokenbroker {{
    internal;
    proxy_pass {authz};
    proxy_pass_request_body off;
    proxy_set_header Content-Length "";
    proxy_set_header X-Original-URI $request_uri;
    proxy_set_header X-Tokenbroker-Key "{gateway_key}";
}}
location /api/ {{
    auth_request /_tokenbroker;
    auth_request_set $tb_account $upstream_http_x_tokenbroker_account_id;
    auth_request_set $tb_email $upstream_http_x_tokenbroker_email;
    auth_request_set $tb_client $upstream_http_x_tokenbroker_client_id;
    proxy_set_header X-Tokenbroker-Account-Id $tb_account;
    proxy_set_header X-Tokenbroker-Email $tb_email;
    proxy_set_header X-Tokenbroker-Client-Id $tb_client;
    proxy_pass http://{upstream};
}}
"#
    )
}

async fn get(nginx: &Nginx, headers: &[&str]) -> tokenbroker_tests::http::Answer {
    let mut args: Vec<&str> = Vec::new();
    for header in headers {
        args.extend(["-H", header]);
    }
    let target = format!("http://127.0.0.1:{}/api/orders?id=7", nginx.port);
    args.push(&target);
    curl(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_lets_active_access_tokens_through_with_their_identity_and_nothing_else() {
    let broker = TestBroker::spawn_with_manual_clock(with_http).await;
    let upstream = Upstream::start().await;
    let nginx = Nginx::start(&config(&broker, &upstream, &expose(&broker.keys.service))).await;
    let pair = broker.issue_for_client("nginx@example.com", "app").await;
    let bearer = |secret| format!("Authorization: Bearer {}", expose(secret));

    // Active access token: through, with the identity, not the client's forged one.
    let answer = get(
        &nginx,
        &[
            &bearer(&pair.access.secret),
            "X-Tokenbroker-Account-Id: acc_forged",
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}\n{}", nginx.error_log());
    assert_eq!(answer.body, "upstream");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let header = |name| seen[0].get(name).and_then(|v| v.to_str().ok());
    assert_eq!(
        header("x-tokenbroker-account-id"),
        Some(pair.account_id.as_str())
    );
    assert_eq!(header("x-tokenbroker-email"), Some("nginx@example.com"));
    assert_eq!(header("x-tokenbroker-client-id"), Some("app"));
    assert!(
        header("x-tokenbroker-key").is_none(),
        "the gateway key stays in nginx"
    );

    // Refused: no token, garbage, the refresh secret, a revoked token, an expired one.
    let other = broker.issue("nginx-expired@example.com").await;
    let answer = get(&nginx, &[]).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
    for token in [
        "Authorization: Bearer garbage".to_owned(),
        "Authorization: Basic Zm9vOmJhcg==".to_owned(),
        bearer(&pair.refresh.secret),
    ] {
        let answer = get(&nginx, &[&token]).await;
        assert_eq!(answer.status, 401, "{token}");
        assert_eq!(
            answer.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\""),
            "{token}"
        );
    }
    broker
        .admin
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::TokenId(
                pair.access.token_id.clone(),
            )),
            ..Default::default()
        })
        .await
        .expect("revoke");
    assert_eq!(
        get(&nginx, &[&bearer(&pair.access.secret)]).await.status,
        401
    );

    assert_eq!(
        get(&nginx, &[&bearer(&other.access.secret)]).await.status,
        200
    );
    broker.advance(Duration::from_secs(601));
    assert_eq!(
        get(&nginx, &[&bearer(&other.access.secret)]).await.status,
        401,
        "expired after the 600 s access lifetime"
    );
    assert_eq!(
        upstream.seen().len(),
        2,
        "only the two active calls got through"
    );
    nginx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_a_service_key_lets_nobody_through() {
    let broker = TestBroker::spawn_with(with_http).await;
    let upstream = Upstream::start().await;
    let pair = broker.issue("nginx-gw@example.com").await;
    let bearer = format!("Authorization: Bearer {}", expose(&pair.access.secret));
    for key in [expose(&broker.keys.trigger), "tbk_not_a_key".to_owned()] {
        let nginx = Nginx::start(&config(&broker, &upstream, &key)).await;
        let answer = get(&nginx, &[&bearer]).await;
        assert!(matches!(answer.status, 401 | 403), "{answer:?}");
        nginx.stop().await;
    }
    assert!(upstream.seen().is_empty());
}
