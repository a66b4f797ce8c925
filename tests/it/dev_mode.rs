//! Dev mode (the `tokenbroker` binary with no config file and no API keys) listens on loopback
//! only: a listener other hosts can reach is refused, however it is asked for, before any key is
//! generated, unless `--dev-on-any-address` says so.

use std::{path::Path, process::Output, time::Duration};

use secrecy::SecretString;
use tokenbroker_tests::{BrokerProcess, claims_request, workspace_binary};
use tokio::process::Command;

/// Runs `tokenbroker ARGS` in dev mode (no config file) in `dir`, with `env`, and returns its
/// output once it exits: within 30 s, or the test fails (a broker that serves never exits).
async fn dev_run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(workspace_binary("tokenbroker"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKENBROKER_") {
            command.env_remove(name);
        }
    }
    command
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the broker refused to start, rather than serving")
        .expect("the broker runs")
}

/// The arguments, the environment, and the address the error names.
type Case = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[tokio::test]
async fn dev_mode_refuses_a_listener_that_is_not_loopback() {
    let cases: [Case; 4] = [
        (&["--listen", "0.0.0.0:0"], &[], "0.0.0.0:0"),
        (
            &[],
            &[("TOKENBROKER_SERVER__LISTEN", "0.0.0.0:50051")],
            "0.0.0.0:50051",
        ),
        (&[], &[("TOKENBROKER_SERVER__LISTEN", "[::]:0")], "[::]:0"),
        (&["--listen", "0.0.0.0:0", "check-config"], &[], "0.0.0.0:0"),
    ];
    for (args, env, address) in cases {
        let dir = tempfile::tempdir().unwrap();
        let output = dev_run(dir.path(), args, env).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let case = format!("{args:?} {env:?}: {output:?}");
        assert_eq!(output.status.code(), Some(1), "{case}");
        assert!(
            stderr.contains(&format!("refuses to listen on {address}")),
            "{case}"
        );
        for fix in ["--listen 127.0.0.1:", "config file", "--dev-on-any-address"] {
            assert!(
                stderr.contains(fix),
                "the error names the fix {fix:?}: {case}"
            );
        }
        assert!(
            !stdout.contains("tbk_") && !stderr.contains("tbk_"),
            "{case}"
        );
        assert!(
            !dir.path().join("dev-keys.env").exists(),
            "no key was generated: {case}"
        );
    }

    // Loopback is fine, whatever the address in 127.0.0.0/8.
    let dir = tempfile::tempdir().unwrap();
    let output = dev_run(
        dir.path(),
        &["--listen", "127.0.0.2:0", "check-config"],
        &[],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test]
async fn dev_on_any_address_lets_dev_mode_listen_on_every_interface() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().as_os_str();
    let broker = BrokerProcess::start_on(
        "0.0.0.0:0",
        dir.path(),
        &["--dev-on-any-address".as_ref(), "--data-dir".as_ref(), data],
        &[],
    )
    .await;
    let port = broker
        .address
        .strip_prefix("0.0.0.0:")
        .unwrap_or_else(|| panic!("listening on every interface: {}", broker.address));
    let keys = std::fs::read_to_string(dir.path().join("dev-keys.env")).unwrap();
    let key = keys
        .lines()
        .find_map(|l| l.strip_prefix("export TB_TRIGGER_KEY="))
        .expect("dev mode wrote its keys");
    let trigger = tokenbroker_tests::connect(&format!("http://127.0.0.1:{port}"))
        .await
        .with_api_key(&SecretString::from(key.to_owned()))
        .unwrap();
    trigger
        .issue_tokens(claims_request("anywhere@example.com", ""))
        .await
        .expect("dev mode serves with its generated keys");
}
