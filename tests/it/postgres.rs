//! The broker on the PostgreSQL store: started with `store.backend = "postgres"` on the
//! throwaway cluster of `tokenbroker::store::postgres::testing`, a database of its own per
//! test, driven over gRPC; and TLS to the server (`verify-full`, `require`, a wrong CA).

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    sync::Arc,
    time::Duration,
};

use secrecy::SecretString;
use tokenbroker::{
    model::{Email, Metadata, NewSession, clock::SystemClock},
    store::{
        PostgresSettings, PostgresStore, SslMode, StoreBackend, StoreErrorKind, TokenStore,
        postgres::testing::cluster,
    },
};
use tokenbroker_client::pb;
use tokenbroker_tests::{TestBroker, expose};

use crate::tls::Ca;

/// Starts a broker on a fresh database of the test cluster.
async fn postgres_broker() -> TestBroker {
    let postgres = cluster().create_database().await;
    TestBroker::spawn_with(move |s| {
        s.store.backend = StoreBackend::Postgres;
        s.store.postgres = postgres;
    })
    .await
}

/// Starts a broker on `postgres` with `tokens.replay_key` = `key`: a replica of the others
/// started with the same two.
async fn replica(postgres: PostgresSettings, key: &SecretString) -> TestBroker {
    let key = key.clone();
    TestBroker::spawn_with(move |s| {
        s.store.backend = StoreBackend::Postgres;
        s.store.postgres = postgres;
        s.tokens.replay_key = Some(key);
        // Fifty anonymous refreshes from one address at once: not what this test is about.
        s.limits.anonymous = None;
        s.limits.anonymous_total = None;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_refreshes_through_two_brokers_with_one_replay_key_get_one_successor() {
    let mut postgres = cluster().create_database().await;
    // A guard for rounds of serialization failures on a loaded machine, not a speed limit.
    postgres.statement_timeout_ms = 30_000;
    let key = SecretString::from(hex::encode(rand::random::<[u8; 32]>()));
    let replicas = [
        Arc::new(replica(postgres.clone(), &key).await),
        Arc::new(replica(postgres, &key).await),
    ];
    let first = replicas[0].issue("ray@example.com").await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..50 {
        let replica = Arc::clone(&replicas[i % 2]);
        let secret = first.refresh.secret.clone();
        calls.spawn(async move { replica.refresh(&secret).await });
    }
    let answers = calls.join_all().await;
    let answers: Vec<_> = answers
        .into_iter()
        .map(|answer| answer.expect("every refresh gets the successor"))
        .collect();
    let one = &answers[0];
    for answer in &answers {
        assert_eq!(answer.refresh.token_id, one.refresh.token_id);
        assert_eq!(answer.access.token_id, one.access.token_id);
        assert_eq!(expose(&answer.refresh.secret), expose(&one.refresh.secret));
        assert_eq!(expose(&answer.access.secret), expose(&one.access.secret));
        assert_eq!(answer.family_id, first.family_id);
    }
    // The first pair and one successor: nothing was superseded.
    assert_eq!(replicas[1].all_tokens("ray@example.com").await.len(), 4);
    for replica in &replicas {
        assert!(replica.is_active(&one.refresh.secret).await);
        assert!(replica.is_active(&one.access.secret).await);
    }
    // The successor rotates as usual, and then the first token is reuse.
    let next = replicas[1].refresh(&one.refresh.secret).await.unwrap();
    assert_ne!(next.refresh.token_id, one.refresh.token_id);
    assert!(replicas[0].refresh(&first.refresh.secret).await.is_err());
    assert!(
        !replicas[0].is_active(&next.refresh.secret).await,
        "the family ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_serves_issue_refresh_introspect_and_revoke_from_postgres() {
    let broker = postgres_broker().await;

    let pair = broker.issue_for_client("pat@example.com", "web").await;
    assert!(expose(&pair.access.secret).starts_with("tba_"));
    let info = broker
        .service
        .introspect_secret(&pair.access.secret)
        .await
        .unwrap();
    assert!(info.active);
    assert_eq!(info.email, "pat@example.com");
    assert_eq!(info.client_id, "web");
    assert_eq!(info.family_id, pair.family_id);

    let next = broker
        .refresh_as(&pair.refresh.secret, "web")
        .await
        .unwrap();
    assert_eq!(next.family_id, pair.family_id);
    assert!(!broker.is_active(&pair.refresh.secret).await, "consumed");
    assert!(broker.is_active(&next.access.secret).await);
    assert_eq!(broker.all_tokens("pat@example.com").await.len(), 4);

    // The holder logs out: the refresh token takes its family with it (RFC 7009 §2.1).
    broker
        .anonymous
        .revoke(pb::RevokeRequest {
            target: Some(pb::revoke_request::Target::Token(expose(
                &next.refresh.secret,
            ))),
            client_id: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for secret in [
        &pair.access.secret,
        &next.access.secret,
        &next.refresh.secret,
    ] {
        assert!(!broker.is_active(secret).await);
    }

    // A second sign-in of the same email is the same account; revoking the account ends it.
    let again = broker.issue_for_client("pat@example.com", "web").await;
    assert!(broker.is_active(&again.access.secret).await);
    assert_eq!(broker.revoke_email("pat@example.com").await, 2);
    assert!(!broker.is_active(&again.refresh.secret).await);
}

#[tokio::test]
async fn tls_verifies_the_servers_certificate() {
    let cluster = cluster();
    let ca = Ca::new("postgres test ca");
    let server = ca.server();
    // The server's files go into the cluster's directory, owned by the server's user (it
    // refuses a key that others can read).
    let cert_file = cluster.dir().join("server.crt");
    let key_file = cluster.dir().join("server.key");
    std::fs::write(&cert_file, &server.cert).unwrap();
    std::fs::write(&key_file, &server.key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let owner = std::fs::metadata(cluster.dir()).unwrap();
    for file in [&cert_file, &key_file] {
        std::os::unix::fs::chown(file, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    let admin = cluster.admin("postgres").await;
    for setting in [
        format!("ssl_cert_file = '{}'", cert_file.display()),
        format!("ssl_key_file = '{}'", key_file.display()),
        "ssl = on".to_owned(),
    ] {
        admin
            .batch_execute(&format!("ALTER SYSTEM SET {setting}"))
            .await
            .unwrap();
    }
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let ca_file = cluster.dir().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let mut settings = cluster.create_database().await;
    settings.sslmode = SslMode::VerifyFull;
    settings.ca_file = Some(ca_file);
    // The reload reaches the server asynchronously: connect until it speaks TLS.
    let mut store = None;
    for _ in 0..50 {
        match PostgresStore::connect(&settings, Arc::new(SystemClock)).await {
            Ok(opened) => {
                store = Some(opened);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let store = store.expect("verify-full connects once the server has TLS on");
    let pair = store.issue(session("tls@example.com")).await.unwrap();
    assert!(
        store
            .introspect(&pair.access.secret)
            .await
            .unwrap()
            .is_some()
    );
    let encrypted: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.datname = $1 AND a.application_name = 'tokenbroker'",
            &[&settings.dbname],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted > 0, "the store's connections are encrypted");

    // `require` encrypts without checking the certificate.
    let mut require = settings.clone();
    require.sslmode = SslMode::Require;
    require.ca_file = None;
    PostgresStore::connect(&require, Arc::new(SystemClock))
        .await
        .expect("require connects without a CA");

    // A server whose certificate another CA signed is refused, as unavailable, with the
    // reason in the error's chain.
    let other = Ca::new("another ca");
    let other_file = cluster.dir().join("other-ca.pem");
    std::fs::write(&other_file, other.pem()).unwrap();
    let mut wrong = settings.clone();
    wrong.ca_file = Some(other_file);
    let err = PostgresStore::connect(&wrong, Arc::new(SystemClock))
        .await
        .expect_err("a certificate from another CA is refused");
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    let chain = format!("{:?}", anyhow::Error::from(err));
    assert!(chain.contains("certificate"), "{chain}");
}

fn session(email: &str) -> NewSession {
    NewSession {
        email: Email::parse(email).unwrap(),
        known_account: None,
        cognito_sub: None,
        client_id: None,
        access_ttl: Duration::from_secs(600),
        refresh_ttl: Duration::from_secs(3600),
        session_ttl: Duration::from_secs(3600),
        metadata: Metadata::new(),
    }
}
