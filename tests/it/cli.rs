//! `tokenbroker-admin`, the built binary, end to end against a broker on loopback: every
//! subcommand, its JSON output, and its exit code for success, a missing or bad credential
//! (4) and a credential without the role (5).

use std::{path::Path, process::Stdio, time::Duration};

use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;
use tokenbroker_tests::{
    TestBroker,
    cognito::{ADMIN_GROUP, TestPool},
    expose, workspace_binary,
};
use tokio::{io::AsyncWriteExt as _, process::Command};

/// Exit codes documented in `tokenbroker-admin --help`.
const OK: i32 = 0;
const USAGE: i32 = 2;
const INVALID_ARGUMENT: i32 = 3;
const UNAUTHENTICATED: i32 = 4;
const PERMISSION_DENIED: i32 = 5;
const UNAVAILABLE: i32 = 6;

/// The credential a run authenticates with.
#[derive(Clone, Copy)]
enum Cred<'a> {
    None,
    ApiKey(&'a SecretString),
    CognitoToken(&'a SecretString),
}

/// One finished run of the binary.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Parses stdout as one JSON document.
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| panic!("{err}: {self:?}"))
    }

    /// Parses stderr as the JSON failure document and returns its `error` object.
    #[track_caller]
    fn error(&self) -> Value {
        let doc: Value = serde_json::from_str(self.stderr.trim())
            .unwrap_or_else(|err| panic!("{err}: {self:?}"));
        doc["error"].clone()
    }

    #[track_caller]
    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "{self:?}");
        self
    }

    /// Asserts a JSON failure with `exit` and gRPC code name `name`.
    #[track_caller]
    fn assert_failure(&self, exit: i32, name: &str) {
        self.assert_code(exit);
        let error = self.error();
        assert_eq!(error["code"], name, "{self:?}");
        assert_eq!(error["exit_code"], exit, "{self:?}");
        assert!(self.stdout.is_empty(), "nothing on stdout: {self:?}");
    }
}

/// Runs `tokenbroker-admin --endpoint <endpoint> ARGS` with `cred` in its environment and
/// `stdin` on its standard input.
async fn admin(endpoint: &str, cred: Cred<'_>, args: &[&str], stdin: Option<&str>) -> Run {
    let mut command = Command::new(workspace_binary("tokenbroker-admin"));
    command
        .args(["--endpoint", endpoint])
        .args(args)
        .env_remove("TB_ENDPOINT")
        .env_remove("TB_API_KEY")
        .env_remove("TB_API_KEY_FILE")
        .env_remove("TB_COGNITO_TOKEN")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match cred {
        Cred::None => {}
        Cred::ApiKey(key) => {
            command.env("TB_API_KEY", key.expose_secret());
        }
        Cred::CognitoToken(token) => {
            command.env("TB_COGNITO_TOKEN", token.expose_secret());
        }
    }
    let mut child = command.spawn().expect("tokenbroker-admin starts");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("tokenbroker-admin finishes within 30 s")
        .unwrap();
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// A key the broker does not know.
fn unknown_key() -> SecretString {
    SecretString::from("tbk_0123456789abcdef0123456789abcdef".to_owned())
}

#[tokio::test]
async fn issue_prints_ids_and_prints_secrets_only_when_asked() {
    let broker = TestBroker::spawn().await;
    let e = &broker.endpoint;
    let admin_key = Cred::ApiKey(&broker.keys.admin);

    let run = admin(
        e,
        admin_key,
        &["issue", "--email", "Ivy@Example.com", "--json"],
        None,
    )
    .await;
    let issued = run.assert_code(OK).json();
    assert!(issued["account_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(issued["replayed"], false);
    for kind in ["access", "refresh"] {
        assert!(issued[kind]["token_id"].is_string(), "{issued}");
        assert!(issued[kind]["expires_at"].as_str().unwrap().ends_with('Z'));
        assert!(issued[kind].get("secret").is_none(), "no secret by default");
    }
    assert!(!run.stdout.contains("tba_") && !run.stdout.contains("tbr_"));

    let run = admin(
        e,
        Cred::ApiKey(&broker.keys.trigger),
        &[
            "issue",
            "--email",
            "ivy@example.com",
            "--client-id",
            "web",
            "--access-ttl",
            "60",
            "--metadata",
            "device=laptop",
            "--print-secrets",
            "--json",
        ],
        None,
    )
    .await;
    let issued = run.assert_code(OK).json();
    let access = SecretString::from(issued["access"]["secret"].as_str().unwrap().to_owned());
    assert!(access.expose_secret().starts_with("tba_"));
    assert!(
        issued["refresh"]["secret"]
            .as_str()
            .unwrap()
            .starts_with("tbr_")
    );
    assert!(broker.is_active(&access).await, "the printed secret works");

    let table = admin(e, admin_key, &["issue", "--email", "ivy@example.com"], None).await;
    table.assert_code(OK);
    assert!(table.stdout.contains("KIND") && table.stdout.contains("refresh"));
    assert!(table.stderr.contains("--print-secrets"), "{table:?}");

    let bad = admin(
        e,
        admin_key,
        &["issue", "--email", "not-an-email", "--json"],
        None,
    )
    .await;
    bad.assert_failure(INVALID_ARGUMENT, "INVALID_ARGUMENT");
    let args = ["issue", "--email", "ivy@example.com", "--json"];
    admin(e, Cred::None, &args, None)
        .await
        .assert_failure(UNAUTHENTICATED, "UNAUTHENTICATED");
    admin(e, Cred::ApiKey(&unknown_key()), &args, None)
        .await
        .assert_failure(UNAUTHENTICATED, "UNAUTHENTICATED");
    admin(e, Cred::ApiKey(&broker.keys.service), &args, None)
        .await
        .assert_failure(PERMISSION_DENIED, "PERMISSION_DENIED");
}

#[tokio::test]
async fn introspect_reads_the_secret_from_stdin() {
    let broker = TestBroker::spawn().await;
    let e = &broker.endpoint;
    let pair = broker.issue_for_client("ian@example.com", "web").await;
    let secret = format!("{}\n", expose(&pair.access.secret));
    let service = Cred::ApiKey(&broker.keys.service);

    let run = admin(e, service, &["introspect", "--json"], Some(&secret)).await;
    let info = run.assert_code(OK).json();
    assert_eq!(info["active"], true);
    assert_eq!(info["token_id"], pair.access.token_id);
    assert_eq!(info["kind"], "access");
    assert_eq!(info["email"], "ian@example.com");
    assert_eq!(info["family_id"], pair.family_id);
    assert_eq!(info["account_id"], pair.account_id);
    assert_eq!(info["client_id"], "web");
    assert!(!run.stdout.contains("tba_"), "the secret is not echoed");

    let table = admin(e, service, &["introspect"], Some(&secret)).await;
    table.assert_code(OK);
    assert!(table.stdout.contains(&pair.access.token_id), "{table:?}");

    // Another client's token, and garbage, are inactive: still a successful call.
    let other = admin(
        e,
        service,
        &["introspect", "--client-id", "mobile", "--json"],
        Some(&secret),
    )
    .await;
    assert_eq!(
        other.assert_code(OK).json(),
        serde_json::json!({ "active": false })
    );
    // A refresh secret is active with its kind, unless only access tokens are asked for.
    let refresh = format!("{}\n", expose(&pair.refresh.secret));
    let run = admin(e, service, &["introspect", "--json"], Some(&refresh)).await;
    assert_eq!(run.assert_code(OK).json()["kind"], "refresh");
    let run = admin(
        e,
        service,
        &["introspect", "--access-only", "--json"],
        Some(&refresh),
    )
    .await;
    assert_eq!(
        run.assert_code(OK).json(),
        serde_json::json!({ "active": false })
    );
    let run = admin(
        e,
        service,
        &["introspect", "--access-only", "--json"],
        Some(&secret),
    )
    .await;
    assert_eq!(run.assert_code(OK).json()["active"], true);
    let garbage = admin(e, service, &["introspect", "--json"], Some("tba_nope\n")).await;
    assert_eq!(garbage.assert_code(OK).json()["active"], false);

    admin(e, service, &["introspect", "--json"], Some("\n"))
        .await
        .assert_failure(USAGE, "USAGE");
    admin(e, Cred::None, &["introspect", "--json"], Some(&secret))
        .await
        .assert_failure(UNAUTHENTICATED, "UNAUTHENTICATED");
    admin(
        e,
        Cred::ApiKey(&broker.keys.trigger),
        &["introspect", "--json"],
        Some(&secret),
    )
    .await
    .assert_failure(PERMISSION_DENIED, "PERMISSION_DENIED");
}

#[tokio::test]
async fn revoke_by_secret_id_family_account_and_email() {
    let broker = TestBroker::spawn().await;
    let e = &broker.endpoint;
    let admin_key = Cred::ApiKey(&broker.keys.admin);

    // By secret: no credential needed; another client's token is refused.
    let pair = broker.issue_for_client("rae@example.com", "web").await;
    let secret = expose(&pair.access.secret);
    admin(
        e,
        Cred::None,
        &["revoke", "--token-stdin", "--client-id", "mobile", "--json"],
        Some(&secret),
    )
    .await
    .assert_failure(PERMISSION_DENIED, "PERMISSION_DENIED");
    admin(
        e,
        Cred::ApiKey(&unknown_key()),
        &["revoke", "--token-stdin", "--json"],
        Some(&secret),
    )
    .await
    .assert_failure(UNAUTHENTICATED, "UNAUTHENTICATED");
    let run = admin(
        e,
        Cred::None,
        &[
            "revoke",
            "--token-stdin",
            "--hint",
            "access",
            "--client-id",
            "web",
            "--json",
        ],
        Some(&secret),
    )
    .await;
    assert_eq!(run.assert_code(OK).json()["revoked_count"], 0);
    assert!(!broker.is_active(&pair.access.secret).await);
    assert!(broker.is_active(&pair.refresh.secret).await);

    // By token id: a refresh token takes its access token with it.
    let pair = broker.issue("rae@example.com").await;
    let id = pair.refresh.token_id.clone();
    let run = admin(e, admin_key, &["revoke", "--token-id", &id, "--json"], None).await;
    assert_eq!(run.assert_code(OK).json()["revoked_count"], 2);
    assert!(!broker.is_active(&pair.access.secret).await);

    // By family.
    let pair = broker.issue("rae@example.com").await;
    let run = admin(e, admin_key, &["revoke", "--family", &pair.family_id], None).await;
    assert!(
        run.assert_code(OK).stdout.contains("revoked 2 tokens"),
        "{run:?}"
    );
    assert!(!broker.is_active(&pair.refresh.secret).await);

    // By account id and by email: everything issued so far (the first pair's refresh token
    // is still active).
    let one = broker.issue("rae@example.com").await;
    let two = broker.issue("rae@example.com").await;
    let account = one.account_id.clone();
    let run = admin(
        e,
        admin_key,
        &["revoke", "--account", &account, "--json"],
        None,
    )
    .await;
    assert_eq!(run.assert_code(OK).json()["revoked_count"], 5);
    assert!(!broker.is_active(&two.access.secret).await);
    let three = broker.issue("rae@example.com").await;
    let run = admin(
        e,
        admin_key,
        &["revoke", "--email", "rae@example.com", "--json"],
        None,
    )
    .await;
    assert_eq!(run.assert_code(OK).json()["revoked_count"], 2);
    assert!(!broker.is_active(&three.refresh.secret).await);

    let admin_only: [&[&str]; 2] = [
        &["revoke", "--email", "rae@example.com", "--json"],
        &["revoke", "--family", &pair.family_id, "--json"],
    ];
    for args in admin_only {
        admin(e, Cred::None, args, None)
            .await
            .assert_failure(UNAUTHENTICATED, "UNAUTHENTICATED");
        admin(e, Cred::ApiKey(&broker.keys.service), args, None)
            .await
            .assert_failure(PERMISSION_DENIED, "PERMISSION_DENIED");
    }
    let bad = admin(
        e,
        admin_key,
        &["revoke", "--token-id", "not an id", "--json"],
        None,
    )
    .await;
    bad.assert_failure(INVALID_ARGUMENT, "INVALID_ARGUMENT");
}

#[tokio::test]
async fn list_shows_an_accounts_tokens_page_by_page() {
    let broker = TestBroker::spawn().await;
    let e = &broker.endpoint;
    let admin_key = Cred::ApiKey(&broker.keys.admin);
    let first = broker.issue_for_client("lee@example.com", "web").await;
    let second = broker.issue("lee@example.com").await;
    broker
        .admin
        .revoke(tokenbroker_client::pb::RevokeRequest {
            target: Some(tokenbroker_client::pb::revoke_request::Target::FamilyId(
                first.family_id.clone(),
            )),
            ..Default::default()
        })
        .await
        .unwrap();

    let run = admin(
        e,
        admin_key,
        &["list", "--email", "lee@example.com", "--json"],
        None,
    )
    .await;
    let listing = run.assert_code(OK).json();
    assert_eq!(listing["account_id"], second.account_id);
    let tokens = listing["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "active only by default: {listing}");
    assert!(
        tokens
            .iter()
            .all(|t| t["state"] == "active" && t["family_id"] == second.family_id.as_str())
    );
    assert_eq!(listing["next_page_token"], Value::Null);
    assert!(!run.stdout.contains("tba_") && !run.stdout.contains("tbr_"));

    let account = second.account_id.clone();
    let args = [
        "list",
        "--account",
        &account,
        "--include-inactive",
        "--page-size",
        "1",
        "--all-pages",
        "--json",
    ];
    let listing = admin(e, admin_key, &args, None)
        .await
        .assert_code(OK)
        .json();
    let tokens = listing["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 4, "{listing}");
    let revoked: Vec<_> = tokens.iter().filter(|t| t["state"] == "revoked").collect();
    assert_eq!(revoked.len(), 2);
    assert!(
        revoked
            .iter()
            .all(|t| t["family_id"] == first.family_id.as_str())
    );
    assert!(
        tokens
            .iter()
            .any(|t| t["client_id"] == "web" && t["kind"] == "refresh")
    );

    let page = admin(
        e,
        admin_key,
        &["list", "--account", &account, "--page-size", "1"],
        None,
    )
    .await;
    page.assert_code(OK);
    assert!(
        page.stdout.contains("TOKEN ID") && page.stdout.contains("--page-token"),
        "{page:?}"
    );
    let nobody = admin(
        e,
        admin_key,
        &["list", "--email", "nobody@example.com", "--json"],
        None,
    )
    .await;
    let nobody = nobody.assert_code(OK).json();
    assert_eq!(nobody["account_id"], Value::Null);
    assert_eq!(nobody["tokens"], serde_json::json!([]));

    let args = ["list", "--email", "lee@example.com", "--json"];
    admin(e, Cred::None, &args, None)
        .await
        .assert_failure(UNAUTHENTICATED, "UNAUTHENTICATED");
    admin(e, Cred::ApiKey(&broker.keys.trigger), &args, None)
        .await
        .assert_failure(PERMISSION_DENIED, "PERMISSION_DENIED");
    admin(
        e,
        admin_key,
        &[
            "list",
            "--email",
            "lee@example.com",
            "--page-size",
            "501",
            "--json",
        ],
        None,
    )
    .await
    .assert_failure(INVALID_ARGUMENT, "INVALID_ARGUMENT");
}

#[tokio::test]
async fn health_needs_no_credential_and_reports_unreachable_brokers() {
    let broker = TestBroker::spawn().await;
    let e = &broker.endpoint;
    let run = admin(e, Cred::None, &["health", "--json"], None).await;
    assert_eq!(
        run.assert_code(OK).json(),
        serde_json::json!({ "service": "", "status": "SERVING" })
    );
    let run = admin(
        e,
        Cred::ApiKey(&unknown_key()),
        &["health", "--service", "tokenbroker.v1.TokenBroker"],
        None,
    )
    .await;
    assert_eq!(run.assert_code(OK).stdout.trim(), "SERVING");
    admin(
        e,
        Cred::None,
        &["health", "--service", "no.such.Service", "--json"],
        None,
    )
    .await
    .assert_failure(INVALID_ARGUMENT, "NOT_FOUND");

    let stopped = TestBroker::spawn().await;
    let endpoint = stopped.endpoint.clone();
    stopped.stop().await.unwrap();
    admin(&endpoint, Cred::None, &["health", "--json"], None)
        .await
        .assert_failure(UNAVAILABLE, "UNAVAILABLE");
    admin(
        &endpoint,
        Cred::ApiKey(&broker.keys.admin),
        &["list", "--email", "a@example.com"],
        None,
    )
    .await
    .assert_code(UNAVAILABLE);
}

#[tokio::test]
async fn a_cognito_access_token_from_the_environment_is_the_credential() {
    let pool = TestPool::start().await;
    let settings = pool.settings();
    let broker = TestBroker::spawn_with(|s| s.cognito = settings).await;
    let e = &broker.endpoint;
    broker.issue("cat@example.com").await;
    let operator = pool.access_token(&[ADMIN_GROUP], "openid");
    let args = ["list", "--email", "cat@example.com", "--json"];
    let listing = admin(e, Cred::CognitoToken(&operator), &args, None).await;
    assert_eq!(
        listing.assert_code(OK).json()["tokens"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let plain_user = pool.access_token(&["users"], "openid");
    admin(e, Cred::CognitoToken(&plain_user), &args, None)
        .await
        .assert_failure(PERMISSION_DENIED, "PERMISSION_DENIED");
    let forged = SecretString::from(format!("{}x", operator.expose_secret()));
    admin(e, Cred::CognitoToken(&forged), &args, None)
        .await
        .assert_failure(UNAUTHENTICATED, "UNAUTHENTICATED");
}

#[tokio::test]
async fn the_key_can_come_from_a_file_and_usage_errors_exit_2() {
    let broker = TestBroker::spawn().await;
    let e = &broker.endpoint;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("admin.key");
    std::fs::write(&key_file, format!("{}\n", expose(&broker.keys.admin))).unwrap();
    let file = key_file.to_str().unwrap();
    let run = admin(
        e,
        Cred::None,
        &[
            "--api-key-file",
            file,
            "list",
            "--email",
            "fay@example.com",
            "--json",
        ],
        None,
    )
    .await;
    run.assert_code(OK);

    let missing = Path::new(file).with_extension("missing");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["revoke"],                                              // no target
        vec!["revoke", "--email", "a@example.com", "--family", "f"], // two targets
        vec!["revoke", "--token", "tba_x"],                          // secrets never on argv
        vec!["revoke", "--family", "f", "--client-id", "web"], // --client-id needs --token-stdin
        vec!["list"],                                          // no account
        vec!["issue"],                                         // no email
        vec![
            "--api-key-file",
            missing,
            "list",
            "--email",
            "a@example.com",
        ],
    ] {
        let run = admin(e, Cred::None, &args, None).await;
        assert_eq!(run.code, USAGE, "{args:?}: {run:?}");
    }
    let run = admin("ftp://127.0.0.1:1", Cred::None, &["health"], None).await;
    assert_eq!(run.code, USAGE, "not http or https: {run:?}");
    let run = admin(e, Cred::None, &["revoke", "--token-stdin"], None).await;
    assert_eq!(run.code, USAGE, "nothing on stdin: {run:?}");

    let help = admin(e, Cred::None, &["--help"], None).await;
    help.assert_code(OK);
    for section in ["EXIT CODES", "EXAMPLES", "CREDENTIALS", "TB_API_KEY"] {
        assert!(help.stdout.contains(section), "--help lacks {section}");
    }
    let help = admin(e, Cred::None, &["revoke", "--help"], None).await;
    assert!(help.assert_code(OK).stdout.contains("EXAMPLES"));
}
