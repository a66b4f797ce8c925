//! Durability: every acknowledged issuance survives `kill -9` of the broker process.

use std::{path::Path, process::Stdio, time::Duration};

use secrecy::SecretString;
use tokenbroker_client::Client;
use tokenbroker_tests::{claims_request, workspace_binary};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A broker running as a child process in dev mode on `data_dir`.
struct BrokerProcess {
    child: Child,
    endpoint: String,
}

impl BrokerProcess {
    async fn start(data_dir: &Path) -> Self {
        let mut child = Command::new(workspace_binary("tokenbroker"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("TOKENBROKER_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("broker starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let address = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(address) = line.strip_prefix("tokenbroker listening on ") {
                    return address.to_owned();
                }
            }
            panic!("the broker exited before listening");
        })
        .await
        .expect("the broker listens within 30 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            endpoint: format!("http://{address}"),
        }
    }

    /// Connects with the key dev mode wrote for `variable` (TB_TRIGGER_KEY, …).
    async fn client(&self, data_dir: &Path, variable: &str) -> Client {
        let keys = std::fs::read_to_string(data_dir.join("dev-keys.env")).unwrap();
        let key = keys
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {variable}=")))
            .expect("dev mode wrote the key");
        tokenbroker_tests::connect(&self.endpoint)
            .await
            .with_api_key(&SecretString::from(key.to_owned()))
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_tokens_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path()).await;
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
    broker.child.start_kill().unwrap(); // SIGKILL: no shutdown, no flush
    broker.child.wait().await.unwrap();

    let restarted = BrokerProcess::start(dir.path()).await;
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
