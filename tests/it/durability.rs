//! Durability: every acknowledged issuance survives `kill -9` of the broker process.

use std::path::Path;

use secrecy::SecretString;
use tokenbroker_client::Client;
use tokenbroker_tests::{BrokerProcess, claims_request};

/// A dev-mode broker process on `data_dir`.
struct DevBroker(BrokerProcess);

impl DevBroker {
    async fn start(data_dir: &Path) -> Self {
        Self(BrokerProcess::start(data_dir, &["--data-dir".as_ref(), data_dir.as_os_str()]).await)
    }

    /// Connects with the key dev mode wrote for `variable` (TB_TRIGGER_KEY, …).
    async fn client(&self, data_dir: &Path, variable: &str) -> Client {
        let keys = std::fs::read_to_string(data_dir.join("dev-keys.env")).unwrap();
        let key = keys
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {variable}=")))
            .expect("dev mode wrote the key");
        tokenbroker_tests::connect(&self.0.endpoint)
            .await
            .with_api_key(&SecretString::from(key.to_owned()))
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_tokens_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = DevBroker::start(dir.path()).await;
    let trigger = broker.client(dir.path(), "TB_TRIGGER_KEY").await;
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let trigger = trigger.clone();
            tokio::spawn(async move {
                trigger
                    .issue_tokens(claims_request(&format!("user{}@example.com", i % 20), ""))
                    .await
                    .expect("IssueTokens acknowledged")
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for call in calls {
        acknowledged.push(call.await.unwrap());
    }
    broker.0.child.start_kill().unwrap(); // SIGKILL: no shutdown, no flush
    broker.0.child.wait().await.unwrap();

    let restarted = DevBroker::start(dir.path()).await;
    let service = restarted.client(dir.path(), "TB_SERVICE_KEY").await;
    for pair in &acknowledged {
        for token in [&pair.access, &pair.refresh] {
            let info = service.introspect_secret(&token.secret).await.unwrap();
            assert!(info.active, "token {} was lost", token.token_id);
        }
    }
}

#[tokio::test]
async fn graceful_stop_flushes_and_restarts_clean() {
    let dir = tempfile::tempdir().unwrap();
    let broker = tokenbroker_tests::TestBroker::spawn_on(dir.path()).await;
    let pair = broker.issue("persist@example.com").await;
    broker.stop().await.expect("graceful stop");
    let wal = dir.path().join("tokenbroker.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "the WAL was checkpointed at shutdown"
    );
    let broker = tokenbroker_tests::TestBroker::spawn_on(dir.path()).await;
    assert!(broker.is_active(&pair.access.secret).await);
}
