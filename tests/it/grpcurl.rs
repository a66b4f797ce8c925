//! The admin path with real grpcurl: reflection, health, exit codes, and the README's
//! walkthrough run exactly as written (only the address line is pointed at this broker).

use std::path::Path;

use tokenbroker_tests::BrokerProcess;
use tokio::process::Command;

const WALKTHROUGH_BEGIN: &str = "<!-- walkthrough:begin -->";
const WALKTHROUGH_END: &str = "<!-- walkthrough:end -->";
/// The line of the walkthrough that names the broker's address.
const ADDRESS_LINE: &str = "B=127.0.0.1:50051";

/// Starts the broker binary in dev mode with `cwd` as its working directory (so its data, and
/// `data/dev-keys.env`, live under `cwd`); returns it and its address.
async fn start_dev_broker(cwd: &Path) -> (BrokerProcess, String) {
    let broker = BrokerProcess::start(cwd, &[]).await;
    let address = broker.address.clone();
    (broker, address)
}

fn grpcurl() -> Command {
    tokenbroker_tests::require_tool("grpcurl");
    Command::new("grpcurl")
}

async fn run(command: &mut Command) -> (i32, String) {
    let output = command.output().await.expect("command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

fn readme_walkthrough() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md is readable");
    let start = readme
        .find(WALKTHROUGH_BEGIN)
        .expect("README has the walkthrough markers");
    let end = readme
        .find(WALKTHROUGH_END)
        .expect("README has the walkthrough end marker");
    let section = &readme[start..end];
    // Every ```sh block of the section, in order.
    section
        .split("```sh\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_works_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, address) = start_dev_broker(dir.path()).await;
    let script = readme_walkthrough();
    assert!(
        script.contains(ADDRESS_LINE),
        "the walkthrough sets {ADDRESS_LINE}"
    );
    let script = script.replace(ADDRESS_LINE, &format!("B={address}"));
    // The walkthrough runs grpcurl and jq.
    tokenbroker_tests::require_tool("grpcurl");
    tokenbroker_tests::require_tool("jq");
    let (code, transcript) = run(Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path()))
    .await;
    assert_eq!(code, 0, "the walkthrough failed:\n{transcript}");
    assert!(
        transcript.contains("tokenbroker.v1.TokenBroker"),
        "{transcript}"
    );
    assert!(transcript.contains("\"active\": true"), "{transcript}");
    let after_revoke = transcript
        .split("\"revokedCount\": \"3\"")
        .nth(1)
        .unwrap_or_else(|| panic!("the admin revoked three tokens:\n{transcript}"));
    // The revoke answer closes, then the last introspection prints an empty message.
    assert_eq!(
        after_revoke.split_whitespace().collect::<String>(),
        "}{}",
        "the last introspection shows an inactive token:\n{transcript}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_sees_reflection_health_and_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, address) = start_dev_broker(dir.path()).await;

    let (code, out) = run(grpcurl().args(["-plaintext", &address, "list"])).await;
    assert_eq!(code, 0, "{out}");
    for service in ["tokenbroker.v1.TokenBroker", "grpc.health.v1.Health"] {
        assert!(out.contains(service), "{out}");
    }

    let (code, out) = run(grpcurl().args([
        "-plaintext",
        &address,
        "describe",
        "tokenbroker.v1.IntrospectRequest",
    ]))
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("token_type_hint"), "{out}");
    assert!(out.contains("access_only"), "{out}");

    let (code, out) = run(grpcurl().args([
        "-plaintext",
        "-d",
        r#"{"service": "tokenbroker.v1.TokenBroker"}"#,
        &address,
        "grpc.health.v1.Health/Check",
    ]))
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("SERVING"), "{out}");

    // Exit code = 64 + gRPC code: UNAUTHENTICATED (16) without a key.
    let (code, out) = run(grpcurl().args([
        "-plaintext",
        "-format-error",
        "-d",
        r#"{"token": "x"}"#,
        &address,
        "tokenbroker.v1.TokenBroker/Introspect",
    ]))
    .await;
    assert_eq!(code, 64 + 16, "{out}");
    assert!(out.contains("\"code\": 16"), "{out}");

    // An unknown JSON field is refused by grpcurl itself; INVALID_ARGUMENT (3) for bad input.
    let (code, out) = run(grpcurl().args([
        "-plaintext",
        "-d",
        r#"{"email": "not-an-email"}"#,
        &address,
        "tokenbroker.v1.TokenBroker/Revoke",
    ]))
    .await;
    assert_eq!(code, 64 + 3, "{out}");
}
