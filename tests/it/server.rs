//! The server around the service: health, deadlines, shutdown.

use std::time::Duration;

use tokenbroker_client::ClientErrorKind;
use tokenbroker_tests::{TestBroker, claims_request};

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let broker = TestBroker::spawn().await;
    let channel = tonic::transport::Endpoint::from_shared(broker.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "tokenbroker.v1.TokenBroker"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn health_and_reflection_calls_have_an_in_flight_limit_of_their_own() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let broker =
        TestBroker::spawn_with(|s| s.server.max_concurrent_health_and_reflection = 1).await;
    let channel = tonic::transport::Endpoint::from_shared(broker.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let check = || HealthCheckRequest {
        service: String::new(),
    };
    // An open Watch stream holds the one slot...
    let mut watch = health.clone().watch(check()).await.unwrap().into_inner();
    watch.message().await.unwrap().expect("the first status");
    let refused = health.check(check()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // ...TokenBroker calls are not affected...
    broker.issue("meta@example.com").await;
    // ...and closing the stream frees it.
    drop(watch);
    tokenbroker_tests::eventually("the slot is free again", || {
        let mut health = health.clone();
        async move { health.check(check()).await.is_ok() }
    })
    .await;
}

#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded() {
    let broker = TestBroker::spawn().await;
    let hurried = broker
        .trigger
        .clone()
        .with_timeout(Duration::from_micros(1));
    let err = hurried
        .issue_tokens(claims_request("late@example.com", ""))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::DeadlineExceeded, "{err}");
}

#[tokio::test]
async fn stopped_broker_refuses_connections_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::spawn_on(dir.path()).await;
    let endpoint = broker.endpoint.clone();
    let pair = broker.issue("stop@example.com").await;
    broker.stop().await.unwrap();
    let err = tokenbroker_client::Client::connect(&endpoint)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unavailable);
    let again = TestBroker::spawn_on(dir.path()).await;
    assert!(again.is_active(&pair.refresh.secret).await);
}
