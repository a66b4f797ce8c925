//! TLS and mTLS on the gRPC listener: who gets through the handshake, client certificates as
//! callers, and certificate files replaced under a running broker. Certificates are made here,
//! at test time, with rcgen.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use secrecy::SecretSlice;
use tempfile::TempDir;
use tokenbroker::{
    Application,
    app::settings::Settings,
    app::tls::{ClientAuth, TlsSettings},
    identity::{Role, auth::CertCallerConfig},
};
use tokenbroker_client::{Client, ClientError, ClientErrorKind, TlsOptions, pb};
use tokenbroker_tests::{TestBroker, claims_request, eventually, logs};
use tonic::Code;

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub(crate) struct Pair {
    pub(crate) cert: String,
    pub(crate) key: String,
}

/// A CA that signs server and client certificates.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The broker's certificate, for 127.0.0.1 and localhost.
    pub(crate) fn server(&self) -> Pair {
        self.leaf(
            &["127.0.0.1", "localhost"],
            &[(DnType::CommonName, "tokenbroker")],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate with subject `CN=cn,O=Example` (DER order: O, then CN).
    pub(crate) fn client(&self, cn: &str) -> Pair {
        self.leaf(
            &[],
            &[
                (DnType::OrganizationName, "Example"),
                (DnType::CommonName, cn),
            ],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(
        &self,
        names: &[&str],
        subject: &[(DnType, &str)],
        usage: ExtendedKeyUsagePurpose,
    ) -> Pair {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = DistinguishedName::new();
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The broker's TLS files in a temporary directory.
pub(crate) struct Files {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Files {
    pub(crate) fn new(server: &Pair, client_ca: &Ca) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = Self {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: dir.path().join("client-ca.crt"),
            dir,
        };
        files.install(server);
        replace(&files.client_ca, &client_ca.pem());
        files
    }

    /// Replaces the server certificate and key (key first, as a rotation tool might).
    fn install(&self, server: &Pair) {
        replace(&self.key, &server.key);
        replace(&self.cert, &server.cert);
    }

    pub(crate) fn settings(&self, client_auth: Option<ClientAuth>) -> TlsSettings {
        TlsSettings {
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            client_ca_file: client_auth.map(|_| self.client_ca.clone()),
            client_auth,
            reload_interval_seconds: 1,
        }
    }
}

/// Writes `contents` to `path` atomically (a rename), as Kubernetes secret updates do.
fn replace(path: &Path, contents: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

pub(crate) fn trusting(ca: &Ca) -> TlsOptions {
    TlsOptions::new().with_ca_pem(ca.pem())
}

pub(crate) fn presenting(ca: &Ca, client: &Pair) -> TlsOptions {
    trusting(ca).with_identity_pem(
        client.cert.clone(),
        SecretSlice::from(client.key.clone().into_bytes()),
    )
}

fn list_request(email: &str) -> pb::ListTokensRequest {
    pb::ListTokensRequest {
        account: Some(pb::list_tokens_request::Account::Email(email.into())),
        page_size: 10,
        ..Default::default()
    }
}

/// A call anyone may make: an unknown refresh secret is UNAUTHENTICATED once connected.
async fn probe(client: &Client) -> Result<(), ClientError> {
    let err = client
        .refresh_tokens(pb::RefreshTokensRequest {
            refresh_token: "tbr_unknown".into(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown refresh token never refreshes");
    match err.kind() {
        ClientErrorKind::Unauthenticated => Ok(()),
        _ => Err(err),
    }
}

/// Connects with `tls` and makes one call: `Ok` when served, the failure otherwise.
async fn try_tls(endpoint: &str, tls: &TlsOptions) -> Result<(), ClientError> {
    let client = Client::connect_tls(endpoint, tls)
        .await?
        .with_timeout(Duration::from_secs(5));
    probe(&client).await
}

/// Asserts that a client could not use the broker because the connection failed: at connect,
/// or at the first call when the client considered the handshake done before the broker
/// rejected it (TLS 1.3 client certificates; plaintext HTTP/2 sent without waiting).
#[track_caller]
fn assert_refused(result: Result<(), ClientError>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(err.kind(), ClientErrorKind::Unavailable, "{what}: {err}");
    assert_eq!(err.code(), Code::Unavailable, "{what}: {err}");
}

#[tokio::test]
async fn a_client_trusting_the_ca_is_served_and_plaintext_is_refused() {
    let ca = Ca::new("Test CA");
    let files = Files::new(&ca.server(), &ca);
    let broker =
        TestBroker::spawn_tls(|s| s.server.tls = Some(files.settings(None)), trusting(&ca)).await;
    assert!(broker.endpoint.starts_with("https://"));

    // A client that never finishes its handshake holds up nobody.
    let _stalled = tokio::net::TcpStream::connect(broker.addr).await.unwrap();

    let pair = broker.issue("tls@example.com").await;
    assert!(broker.is_active(&pair.access.secret).await);
    try_tls(&broker.endpoint, &trusting(&ca)).await.unwrap();

    // Plaintext HTTP/2 to the TLS port fails the handshake.
    let plaintext = match Client::connect(&format!("http://{}", broker.addr)).await {
        Ok(client) => probe(&client.with_timeout(Duration::from_secs(5))).await,
        Err(err) => Err(err),
    };
    assert_refused(plaintext, "plaintext");
    // A client that does not trust the broker's CA refuses it.
    let other = Ca::new("Other CA");
    assert_refused(
        try_tls(&broker.endpoint, &trusting(&other)).await,
        "untrusted server",
    );
}

#[tokio::test]
async fn handshakes_over_the_cap_are_refused_and_a_freed_slot_serves_again() {
    let ca = Ca::new("Test CA");
    let files = Files::new(&ca.server(), &ca);
    let broker = TestBroker::spawn_tls(
        |s| {
            s.server.tls = Some(files.settings(None));
            s.server.max_tls_handshakes = 2;
            s.metrics.listen = Some(([127, 0, 0, 1], 0).into());
        },
        trusting(&ca),
    )
    .await;
    // The broker's own client has finished its handshake and holds no handshake slot.
    probe(&broker.anonymous).await.unwrap();

    // Two clients that connect and never start their handshake take both slots (the broker
    // accepts in order, so they are taken before the next client arrives).
    let stalled = [
        tokio::net::TcpStream::connect(broker.addr).await.unwrap(),
        tokio::net::TcpStream::connect(broker.addr).await.unwrap(),
    ];
    assert_refused(
        try_tls(&broker.endpoint, &trusting(&ca)).await,
        "a handshake over the cap",
    );
    let scrape = crate::metrics::Scrape::parse(broker.scrape().await);
    assert!(
        scrape.value(r#"tokenbroker_connections_refused_total{cap="handshakes"}"#) >= 1.0,
        "the refused handshake is counted"
    );
    // An established connection is not affected.
    probe(&broker.anonymous).await.unwrap();

    // Once the stalled clients leave, their slots serve new clients again.
    drop(stalled);
    eventually("a freed handshake slot serves a new client", || async {
        try_tls(&broker.endpoint, &trusting(&ca)).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn required_mtls_refuses_clients_without_a_certificate_from_the_ca() {
    let ca = Ca::new("Test CA");
    let files = Files::new(&ca.server(), &ca);
    let client = ca.client("test-client");
    let broker = TestBroker::spawn_tls(
        |s| s.server.tls = Some(files.settings(Some(ClientAuth::Required))),
        presenting(&ca, &client),
    )
    .await;
    // With a certificate from the client CA: served, and the API keys work as before.
    broker.issue("mtls@example.com").await;
    try_tls(&broker.endpoint, &presenting(&ca, &client))
        .await
        .unwrap();

    assert_refused(
        try_tls(&broker.endpoint, &trusting(&ca)).await,
        "no client certificate",
    );
    let other = Ca::new("Other CA");
    assert_refused(
        try_tls(
            &broker.endpoint,
            &presenting(&ca, &other.client("test-client")),
        )
        .await,
        "client certificate from another CA",
    );
}

#[tokio::test]
async fn client_certificates_authenticate_as_their_callers() {
    let ca = Ca::new("Test CA");
    let files = Files::new(&ca.server(), &ca);
    let broker = TestBroker::spawn_tls(
        |s| {
            s.server.tls = Some(files.settings(Some(ClientAuth::Optional)));
            s.cert_callers = vec![
                CertCallerConfig {
                    name: "ops".into(),
                    subject: "CN=ops,O=Example".into(),
                    roles: vec![Role::Admin],
                },
                CertCallerConfig {
                    name: "billing".into(),
                    subject: "cn=billing, o=Example".into(),
                    roles: vec![Role::Service],
                },
            ];
        },
        // Optional client auth: the broker's own clients present no certificate and use keys.
        trusting(&ca),
    )
    .await;
    let pair = broker.issue("certs@example.com").await;

    let with_cert = |cn: &str| {
        Client::connect_tls_lazy(&broker.endpoint, &presenting(&ca, &ca.client(cn)))
            .unwrap()
            .with_timeout(Duration::from_secs(10))
    };
    let ops = with_cert("ops");
    let listed = ops
        .list_tokens(list_request("certs@example.com"))
        .await
        .unwrap();
    assert_eq!(listed.tokens.len(), 2);

    let billing = with_cert("billing");
    let denied = billing
        .list_tokens(list_request("certs@example.com"))
        .await
        .unwrap_err();
    assert_eq!(denied.kind(), ClientErrorKind::PermissionDenied, "{denied}");
    assert!(denied.message().contains("billing"), "{denied}");
    assert!(
        billing
            .introspect_secret(&pair.access.secret)
            .await
            .unwrap()
            .active
    );

    // A certificate from the CA whose subject is not configured: anonymous.
    let stranger = with_cert("stranger");
    let err = stranger
        .list_tokens(list_request("certs@example.com"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unauthenticated, "{err}");
    probe(&stranger).await.unwrap();

    // An authorization header decides alone: the ops certificate adds nothing to a service key,
    // and does not rescue a bad key.
    let service_key = ops.clone().with_api_key(&broker.keys.service).unwrap();
    let err = service_key
        .list_tokens(list_request("certs@example.com"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::PermissionDenied, "{err}");
    let bad_key = ops
        .clone()
        .with_api_key(&"tbk_not_a_key".to_owned().into())
        .unwrap();
    let err = bad_key
        .list_tokens(list_request("certs@example.com"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ClientErrorKind::Unauthenticated, "{err}");
}

#[tokio::test]
async fn replaced_certificate_files_are_served_after_reload_without_a_restart() {
    let first = Ca::new("First CA");
    let first_server = first.server();
    let files = Files::new(&first_server, &first);
    let broker = TestBroker::spawn_tls(
        |s| s.server.tls = Some(files.settings(None)),
        trusting(&first),
    )
    .await;
    let established = broker.trigger.clone();
    broker.issue("reload@example.com").await;

    // A change that does not load (a key that does not fit the certificate) keeps the old one.
    let second = Ca::new("Second CA");
    let second_server = second.server();
    replace(&files.key, &second_server.key);
    eventually("the failed reload is reported", || async {
        logs()
            .contents()
            .contains("keeping the previous certificate")
    })
    .await;
    try_tls(&broker.endpoint, &trusting(&first)).await.unwrap();

    // The whole pair from a new CA: new connections get the new certificate.
    files.install(&second_server);
    let endpoint = broker.endpoint.clone();
    eventually("a client trusting the new CA is served", || {
        let endpoint = endpoint.clone();
        let tls = trusting(&second);
        async move { try_tls(&endpoint, &tls).await.is_ok() }
    })
    .await;
    assert_refused(
        try_tls(&broker.endpoint, &trusting(&first)).await,
        "the old CA",
    );
    // A connection made before the rotation goes on.
    established
        .issue_tokens(claims_request("reload@example.com", ""))
        .await
        .unwrap();

    // The key files never reach the log.
    let log = logs().contents();
    for key in [&first_server.key, &second_server.key] {
        let body = key.lines().nth(1).unwrap();
        assert!(!log.contains(body), "a private key is in the log");
    }
}

#[tokio::test]
async fn bad_tls_files_fail_the_check_and_the_start_with_the_file_named() {
    let ca = Ca::new("Test CA");
    let server = ca.server();
    let files = Files::new(&server, &ca);
    let settings = files.settings(Some(ClientAuth::Required));
    tokenbroker::app::tls::TlsServer::load(&settings)
        .map(drop)
        .unwrap();

    let other = ca.server();
    replace(&files.key, &other.key);
    let err = format!(
        "{:#}",
        tokenbroker::app::tls::TlsServer::load(&settings).unwrap_err()
    );
    assert!(
        err.contains("does not fit") && err.contains("tls.key"),
        "{err}"
    );
    assert!(!err.contains(other.key.lines().nth(1).unwrap()), "{err}");

    let mut broker_settings = Settings::default();
    broker_settings.server.listen = ([127, 0, 0, 1], 0).into();
    let data = tempfile::tempdir().unwrap();
    broker_settings.store.embedded.dir = data.path().to_owned();
    broker_settings.server.tls = Some(settings.clone());
    let err = Application::build(broker_settings).await.unwrap_err();
    assert!(format!("{err:#}").contains("server.tls"), "{err:#}");

    replace(&files.key, &server.cert);
    let err = format!(
        "{:#}",
        tokenbroker::app::tls::TlsServer::load(&settings).unwrap_err()
    );
    assert!(err.contains("holds no PEM private key"), "{err}");
    replace(&files.key, &server.key);
    replace(&files.cert, "not a certificate");
    let err = format!(
        "{:#}",
        tokenbroker::app::tls::TlsServer::load(&settings).unwrap_err()
    );
    assert!(
        err.contains("tls.crt") && err.contains("CERTIFICATE"),
        "{err}"
    );
    replace(&files.cert, &server.cert);
    replace(&files.client_ca, "");
    let err = format!(
        "{:#}",
        tokenbroker::app::tls::TlsServer::load(&settings).unwrap_err()
    );
    assert!(err.contains("client_ca_file"), "{err}");
}

#[tokio::test]
async fn the_admin_cli_presents_a_client_certificate() {
    use std::process::Stdio;
    let ca = Ca::new("Test CA");
    let files = Files::new(&ca.server(), &ca);
    let broker = TestBroker::spawn_tls(
        |s| {
            s.server.tls = Some(files.settings(Some(ClientAuth::Required)));
            s.cert_callers = vec![CertCallerConfig {
                name: "ops".into(),
                subject: "CN=ops,O=Example".into(),
                roles: vec![Role::Admin],
            }];
        },
        presenting(&ca, &ca.client("test-client")),
    )
    .await;
    broker.issue("cli-tls@example.com").await;
    let ops = ca.client("ops");
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.crt"),
        dir.path().join("ops.crt"),
        dir.path().join("ops.key"),
    );
    replace(&ca_file, &ca.pem());
    replace(&cert_file, &ops.cert);
    replace(&key_file, &ops.key);
    let run = |with_identity: bool| {
        let mut command =
            tokio::process::Command::new(tokenbroker_tests::workspace_binary("tokenbroker-admin"));
        command
            .args(["--endpoint", &broker.endpoint, "--json"])
            .arg("--ca-file")
            .arg(&ca_file);
        if with_identity {
            command.arg("--cert-file").arg(&cert_file);
            command.env("TB_KEY_FILE", &key_file);
        }
        command
            .args(["list", "--email", "cli-tls@example.com"])
            .env_remove("TB_API_KEY")
            .env_remove("TB_API_KEY_FILE")
            .env_remove("TB_COGNITO_TOKEN")
            .env_remove("TB_CERT_FILE")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        async move {
            tokio::time::timeout(Duration::from_secs(30), command.output())
                .await
                .expect("tokenbroker-admin finishes within 30 s")
                .unwrap()
        }
    };
    // The ops certificate is the admin credential: no API key.
    let output = run(true).await;
    assert!(output.status.success(), "{output:?}");
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        listed["tokens"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    // Without a certificate the handshake fails: unavailable (exit 6).
    let output = run(false).await;
    assert_eq!(output.status.code(), Some(6), "{output:?}");
}

#[tokio::test]
async fn check_config_reads_the_tls_files() {
    let ca = Ca::new("Test CA");
    let server = ca.server();
    let files = Files::new(&server, &ca);
    let config = files.dir.path().join("tokenbroker.toml");
    std::fs::write(
        &config,
        format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n\n\
             [[cert_callers]]\nname = \"ops\"\nsubject = \"CN=ops,O=Example\"\nroles = [\"admin\"]\n",
            files.cert, files.key, files.client_ca
        ),
    )
    .unwrap();
    let check = || {
        let mut command =
            std::process::Command::new(tokenbroker_tests::workspace_binary("tokenbroker"));
        for (name, _) in std::env::vars() {
            if name.starts_with("TOKENBROKER_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--config")
            .arg(&config)
            .arg("check-config")
            .output()
            .unwrap()
    };
    let output = check();
    assert!(output.status.success(), "{output:?}");
    // A key that does not fit the certificate fails the check, naming the files, not the key.
    let other = ca.server();
    replace(&files.key, &other.key);
    let output = check();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr.contains("server.tls.key_file") && stderr.contains("does not fit"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(other.key.lines().nth(1).unwrap()),
        "{stderr}"
    );
}

#[tokio::test]
async fn tokenbroker_health_speaks_tls_and_presents_a_client_certificate() {
    let ca = Ca::new("Test CA");
    let files = Files::new(&ca.server(), &ca);
    let broker = TestBroker::spawn_tls(
        |s| s.server.tls = Some(files.settings(Some(ClientAuth::Required))),
        presenting(&ca, &ca.client("test-client")),
    )
    .await;
    let client = ca.client("probe");
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.crt"),
        dir.path().join("probe.crt"),
        dir.path().join("probe.key"),
    );
    replace(&ca_file, &ca.pem());
    replace(&cert_file, &client.cert);
    replace(&key_file, &client.key);
    // The broker runs on this test's runtime: the command is awaited, never blocked on.
    let health = async |extra: &[&std::ffi::OsStr]| {
        let output =
            tokio::process::Command::new(tokenbroker_tests::workspace_binary("tokenbroker"))
                .args([
                    "health",
                    "--timeout-ms",
                    "10000",
                    "--addr",
                    &broker.addr.to_string(),
                ])
                .args(extra)
                .output()
                .await
                .expect("tokenbroker runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = health(&[
        "--ca-file".as_ref(),
        ca_file.as_os_str(),
        "--cert-file".as_ref(),
        cert_file.as_os_str(),
        "--key-file".as_ref(),
        key_file.as_os_str(),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "SERVING");
    // Without the client certificate the handshake fails; in plaintext nothing answers.
    let (code, _, stderr) = health(&["--ca-file".as_ref(), ca_file.as_os_str()]).await;
    assert_eq!(code, Some(1), "{stderr}");
    let (code, _, stderr) = health(&[]).await;
    assert_eq!(code, Some(1), "{stderr}");
}
