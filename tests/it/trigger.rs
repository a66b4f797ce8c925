//! The trigger Lambda in the real Lambda runtime emulator, invoked with `cargo lambda invoke`,
//! against a real broker on loopback: claims that introspect active, idempotent retries, both
//! failure policies with the broker stopped or hung, and no secret in the function's log output.
//!
//! The emulator is `cargo lambda watch --only-lambda-apis` (the Runtime API and the invoke
//! endpoint, without building the function); the function is the workspace's own `bootstrap`
//! binary, built with the workspace's features by `workspace_binary`, started with the
//! environment the emulator names. `cargo lambda watch` without that flag would `cargo run` the
//! trigger alone, whose features differ from the workspace build's: a second build of half the
//! tree.
//!
//! Each test starts its own emulator and function (the function's settings come from its
//! environment) in one process group, and stops the whole group when it ends. Every wait is
//! bounded.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use secrecy::SecretString;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokenbroker_client::pb;
use tokenbroker_tests::{TestBroker, expose, workspace_binary};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    process::{Child, Command},
};

/// How long the emulator may take to listen, and an invocation to answer.
const START_LIMIT: Duration = Duration::from_secs(60);
const INVOKE_LIMIT: Duration = Duration::from_secs(120);
/// Room for the `cargo lambda invoke` process itself around the function's own deadline.
const INVOKE_SLACK: Duration = Duration::from_secs(3);
/// The function name the emulator gives a function it does not start itself.
const FUNCTION: &str = "_";

fn trigger_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../trigger")
}

fn require_cargo_lambda() {
    tokenbroker_tests::require_tool("cargo-lambda");
}

/// A port that was free a moment ago (the emulator takes no port 0).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The Lambda runtime emulator and the trigger's `bootstrap` polling it, in one process group.
struct Emulator {
    emulator: Child,
    function: Child,
    port: u16,
    output: Arc<Mutex<Vec<u8>>>,
    dir: TempDir,
}

impl Emulator {
    async fn start(env: &[(&str, &str)]) -> Self {
        require_cargo_lambda();
        // Before the emulator starts: the first call may have to build it.
        let bootstrap = workspace_binary("bootstrap");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut emulator = Command::new("cargo")
            .args(["lambda", "watch", "--only-lambda-apis"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port"])
            .arg(port.to_string())
            .current_dir(trigger_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("cargo lambda watch starts");
        collect(emulator.stdout.take().expect("piped"), output.clone());
        collect(emulator.stderr.take().expect("piped"), output.clone());
        let group = emulator.id().expect("running") as i32;

        let started = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                started.elapsed() < START_LIMIT,
                "the emulator listens within {START_LIMIT:?}: {}",
                String::from_utf8_lossy(&output.lock().expect("output lock"))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // What the emulator prints for a function it does not start, and what Lambda sets.
        let runtime_api = format!("http://127.0.0.1:{port}/.rt");
        let mut function = Command::new(bootstrap)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", runtime_api)
            .env("AWS_LAMBDA_FUNCTION_NAME", FUNCTION)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(group)
            .kill_on_drop(true)
            .spawn()
            .expect("the bootstrap binary starts");
        collect(function.stdout.take().expect("piped"), output.clone());
        collect(function.stderr.take().expect("piped"), output.clone());

        let emulator = Self {
            emulator,
            function,
            port,
            output,
            dir,
        };
        // A first event that never reaches the broker: the function is polling the emulator.
        let (reply, _) = emulator.invoke(&client_credentials()).await;
        assert_eq!(
            reply.as_ref().ok(),
            Some(&client_credentials()),
            "a client-credentials grant passes through: {}",
            emulator.output()
        );
        emulator
    }

    /// Everything the emulator and the function printed so far.
    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("output lock")).into_owned()
    }

    /// Invokes the function with `event`: the reply, or the error text, and how long it took.
    async fn invoke(&self, event: &Value) -> (Result<Value, String>, Duration) {
        let file = self.dir.path().join("event.json");
        std::fs::write(&file, event.to_string()).expect("event file");
        let started = Instant::now();
        let invoke = Command::new("cargo")
            .args(["lambda", "invoke", FUNCTION, "--output-format", "json"])
            .args(["--invoke-address", "127.0.0.1", "--invoke-port"])
            .arg(self.port.to_string())
            .arg("--data-file")
            .arg(&file)
            .current_dir(trigger_dir())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(INVOKE_LIMIT, invoke)
            .await
            .unwrap_or_else(|_| panic!("the invocation answers: {}", self.output()))
            .expect("cargo lambda invoke runs");
        let elapsed = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if output.status.success() {
            let reply = serde_json::from_str(&stdout)
                .unwrap_or_else(|err| panic!("the reply is JSON ({err}): {stdout}"));
            (Ok(reply), elapsed)
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            (Err(format!("{stdout}{stderr}")), elapsed)
        }
    }

    /// Stops the emulator and the function (SIGINT to the group, then SIGKILL) and returns
    /// their output.
    async fn stop(mut self) -> String {
        let group = self.group();
        let _ = Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .await;
        let both = async {
            let _ = self.function.wait().await;
            let _ = self.emulator.wait().await;
        };
        if tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .is_err()
        {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &group])
                .status()
                .await;
            let _ = self.function.wait().await;
            let _ = self.emulator.wait().await;
        }
        // The readers drain what is left once the pipes close.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.output()
    }

    /// The process group, as `kill` takes it.
    fn group(&self) -> String {
        format!("-{}", self.emulator.id().unwrap_or_default())
    }
}

impl Drop for Emulator {
    /// A failed test does not get to `stop`: still end the function and the emulator.
    fn drop(&mut self) {
        if let Ok(None) = self.emulator.try_wait() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &self.group()])
                .status();
        }
    }
}

fn collect(mut pipe: impl AsyncRead + Unpin + Send + 'static, sink: Arc<Mutex<Vec<u8>>>) {
    tokio::spawn(async move {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .expect("output lock")
                .extend_from_slice(&buf[..n]);
        }
    });
}

/// The function's environment for a broker at `endpoint`.
fn function_env<'a>(endpoint: &'a str, key: &'a str, policy: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("TOKENBROKER_TRIGGER__ENDPOINT", endpoint),
        ("TOKENBROKER_TRIGGER__API_KEY", key),
        ("TOKENBROKER_TRIGGER__FAILURE_POLICY", policy),
        ("TOKENBROKER_TRIGGER__TIMEOUT_MS", "800"),
        ("TOKENBROKER_TRIGGER__CLAIM_TOKENS", "id,access"),
        // Every line the runtime, tonic, hyper and h2 write at debug goes through the leak check.
        ("RUST_LOG", "debug"),
    ]
}

/// A user sign-in event of `version` for `email`.
fn sign_in(version: &str, email: &str, sub: &str) -> Value {
    let response = if version == "1" {
        json!({"claimsOverrideDetails": null})
    } else {
        json!({"claimsAndScopeOverrideDetails": null})
    };
    json!({
        "version": version,
        "triggerSource": "TokenGeneration_HostedAuth",
        "region": "us-east-1",
        "userPoolId": "us-east-1_TriggerIt",
        "userName": email.split('@').next().unwrap_or_default(),
        "callerContext": {"awsSdkVersion": "aws-sdk-unknown-unknown", "clientId": "it-client"},
        "request": {
            "userAttributes": {"sub": sub, "email": email, "email_verified": "true"},
            "groupConfiguration": {
                "groupsToOverride": ["readers"],
                "iamRolesToOverride": [],
                "preferredRole": null
            },
            "scopes": ["openid", "email"]
        },
        "response": response
    })
}

/// A V3 machine-to-machine grant: no user, so the trigger passes it through untouched.
fn client_credentials() -> Value {
    json!({
        "version": "3",
        "triggerSource": "TokenGeneration_ClientCredentials",
        "region": "us-east-1",
        "userPoolId": "us-east-1_TriggerIt",
        "callerContext": {"awsSdkVersion": "aws-sdk-unknown-unknown", "clientId": "it-m2m"},
        "request": {"userAttributes": {}, "groupConfiguration": null, "scopes": ["it/read"]},
        "response": {"claimsAndScopeOverrideDetails": null}
    })
}

/// The claims a reply added to `token` (`id` or `access`).
fn added_claims<'a>(reply: &'a Value, token: &str) -> &'a Value {
    let response = &reply["response"];
    match (response.get("claimsOverrideDetails"), token) {
        (Some(v1), "id") => &v1["claimsToAddOrOverride"],
        (Some(_), _) => &Value::Null,
        (None, "id") => {
            &response["claimsAndScopeOverrideDetails"]["idTokenGeneration"]["claimsToAddOrOverride"]
        }
        (None, _) => {
            &response["claimsAndScopeOverrideDetails"]["accessTokenGeneration"]["claimsToAddOrOverride"]
        }
    }
}

fn secret(claims: &Value, name: &str) -> String {
    claims[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {claims}"))
        .to_owned()
}

fn assert_no_secret(output: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !output.contains(secret.as_str()),
            "a secret appears in the function's output"
        );
    }
    for prefix in ["tba_", "tbr_"] {
        assert!(
            !output.contains(prefix),
            "a secret prefix {prefix} appears in the function's output"
        );
    }
}

#[tokio::test]
async fn emulated_trigger_issues_replays_and_fails_closed_when_the_broker_stops() {
    let broker = TestBroker::spawn().await;
    let key = expose(&broker.keys.trigger);
    let emulator = Emulator::start(&function_env(&broker.endpoint, &key, "fail_closed")).await;
    let mut secrets = vec![key.clone()];

    // V1: the claims go into the ID token and the access secret is live on the broker.
    let v1 = sign_in(
        "1",
        "v1.user@example.com",
        "5f0c1a3e-0000-4000-8000-00000000a001",
    );
    let (reply, _) = emulator.invoke(&v1).await;
    let reply = reply.unwrap_or_else(|err| panic!("V1 sign-in: {err}\n{}", emulator.output()));
    let details = &reply["response"]["claimsOverrideDetails"];
    assert_eq!(details["claimsToSuppress"], json!(["email"]));
    assert_eq!(
        details["groupOverrideDetails"],
        v1["request"]["groupConfiguration"]
    );
    let claims = added_claims(&reply, "id");
    let access = secret(claims, "fauna_access_token");
    assert_eq!(
        claims.as_object().map(|c| c.len()),
        Some(1),
        "the access secret only: the refresh secret stays out by default ({claims})"
    );
    secrets.push(access.clone());
    let info = broker
        .service
        .introspect_secret(&SecretString::from(access.clone()))
        .await
        .expect("Introspect succeeds");
    assert!(info.active, "the V1 access secret is active");
    assert_eq!(info.kind, pb::TokenKind::Access as i32);
    assert_eq!(info.email, "v1.user@example.com");
    assert_eq!(info.client_id, "it-client");
    assert_eq!(info.cognito_sub, "5f0c1a3e-0000-4000-8000-00000000a001");

    // Cognito's retry of the same sign-in: the same pair, nothing new minted.
    let (again, _) = emulator.invoke(&v1).await;
    let again = again.expect("the retry succeeds");
    assert_eq!(
        added_claims(&again, "id"),
        claims,
        "a retry replays the pair"
    );
    assert_eq!(broker.all_tokens("v1.user@example.com").await.len(), 2);

    // V2: both tokens, as configured; the email goes from the ID token only.
    let v2 = sign_in(
        "2",
        "v2.user@example.com",
        "5f0c1a3e-0000-4000-8000-00000000a002",
    );
    let (reply, _) = emulator.invoke(&v2).await;
    let reply = reply.unwrap_or_else(|err| panic!("V2 sign-in: {err}\n{}", emulator.output()));
    let details = &reply["response"]["claimsAndScopeOverrideDetails"];
    assert_eq!(
        details["idTokenGeneration"]["claimsToSuppress"],
        json!(["email"])
    );
    assert_eq!(
        details["groupOverrideDetails"],
        v2["request"]["groupConfiguration"]
    );
    let id_claims = added_claims(&reply, "id");
    assert_eq!(added_claims(&reply, "access"), id_claims);
    let access = secret(id_claims, "fauna_access_token");
    assert!(
        id_claims.get("fauna_refresh_token").is_none(),
        "{id_claims}"
    );
    secrets.push(access.clone());
    assert!(broker.is_active(&SecretString::from(access.clone())).await);
    let (again, _) = emulator.invoke(&v2).await;
    assert_eq!(added_claims(&again.expect("retry"), "id"), id_claims);

    // The broker stops: fail_closed answers with the user-safe error, well within the deadline.
    broker.stop().await.expect("the broker stops cleanly");
    let v2_other = sign_in(
        "2",
        "v2.other@example.com",
        "5f0c1a3e-0000-4000-8000-00000000a003",
    );
    let (reply, elapsed) = emulator.invoke(&v2_other).await;
    let error = reply.expect_err("fail_closed refuses the sign-in");
    assert!(error.contains("TokenBroker.Unavailable"), "{error}");
    assert!(
        error.contains("Sign-in is temporarily unavailable. Please try again in a moment."),
        "{error}"
    );
    assert!(
        elapsed < Duration::from_millis(800) + INVOKE_SLACK,
        "answered in {elapsed:?}"
    );

    let output = emulator.stop().await;
    assert!(output.contains("fauna claims added"), "{output}");
    assert!(
        output.contains("sign-in refused without fauna claims"),
        "{output}"
    );
    assert_no_secret(&output, &secrets);
    assert_no_secret(&error, &secrets);
}

#[tokio::test]
async fn emulated_trigger_fails_open_with_the_event_unchanged_when_the_broker_is_stopped() {
    let broker = TestBroker::spawn().await;
    let (endpoint, key) = (broker.endpoint.clone(), expose(&broker.keys.trigger));
    broker.stop().await.expect("the broker stops cleanly");
    let emulator = Emulator::start(&function_env(&endpoint, &key, "fail_open")).await;

    for event in [
        sign_in(
            "1",
            "open.v1@example.com",
            "5f0c1a3e-0000-4000-8000-00000000b001",
        ),
        sign_in(
            "2",
            "open.v2@example.com",
            "5f0c1a3e-0000-4000-8000-00000000b002",
        ),
    ] {
        let (reply, elapsed) = emulator.invoke(&event).await;
        let reply = reply.unwrap_or_else(|err| panic!("fail_open answers: {err}"));
        assert_eq!(reply, event, "no claims, no change");
        assert!(
            elapsed < Duration::from_millis(800) + INVOKE_SLACK,
            "{elapsed:?}"
        );
    }
    let output = emulator.stop().await;
    assert!(
        output.contains("sign-in continues without fauna claims"),
        "{output}"
    );
    assert_no_secret(&output, &[key]);
}

#[tokio::test]
async fn emulated_trigger_gives_up_on_a_hung_broker_at_its_deadline() {
    // Accepts connections and never answers, not even the HTTP/2 handshake.
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let emulator = Emulator::start(&function_env(&endpoint, "tbk_hung", "fail_closed")).await;
    let (reply, elapsed) = emulator
        .invoke(&sign_in(
            "3",
            "hung@example.com",
            "5f0c1a3e-0000-4000-8000-00000000c001",
        ))
        .await;
    let error = reply.expect_err("no answer, no sign-in");
    assert!(error.contains("TokenBroker.Timeout"), "{error}");
    assert!(
        elapsed >= Duration::from_millis(800)
            && elapsed < Duration::from_millis(800) + INVOKE_SLACK,
        "the 800 ms deadline held: {elapsed:?}"
    );
    let output = emulator.stop().await;
    assert!(
        !output.contains("tbk_hung"),
        "the API key stays out of the log"
    );
    holder.abort();
}
