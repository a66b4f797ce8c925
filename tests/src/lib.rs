//! Test support for tokenbroker: a broker on a loopback port with a client per role, log
//! capture, bounded polling, an OTLP trace collector, and the load tool's echo server.

pub mod cognito;
pub mod echo;
pub mod fauna;
pub mod http;
pub mod otlp;

use std::{
    future::Future,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex, OnceLock},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use tempfile::TempDir;
use tokenbroker::{
    Application,
    app::dev::generate_dev_keys,
    app::settings::Settings,
    model::clock::{Clock, ManualClock, SystemClock},
};
use tokenbroker_client::{Client, ClientResult, TlsOptions, TokenPair, pb};
use tokio::{sync::oneshot, task::JoinHandle};
use tracing_subscriber::fmt::MakeWriter;

/// Everything every test process logs, at TRACE, for the secret-leak checks.
static LOGS: LazyLock<LogBuffer> = LazyLock::new(|| {
    let buffer = LogBuffer::default();
    let echo = std::env::var_os("TEST_LOG").is_some();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(TeeWriter {
            buffer: buffer.clone(),
            echo,
        })
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
    buffer
});

/// A shared in-memory log sink.
#[derive(Debug, Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// Returns everything logged so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer lock")).into_owned()
    }
}

#[derive(Debug, Clone)]
struct TeeWriter {
    buffer: LogBuffer,
    echo: bool,
}

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer
            .0
            .lock()
            .expect("log buffer lock")
            .extend_from_slice(buf);
        if self.echo {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for TeeWriter {
    type Writer = TeeWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Returns the process-wide log capture, installing it on first use.
pub fn logs() -> &'static LogBuffer {
    &LOGS
}

/// Polls `check` until it returns true, for at most ~10 s; panics with `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition never held: {what}");
}

/// The API keys of a test broker, one per role.
#[derive(Debug)]
pub struct Keys {
    /// Role admin.
    pub admin: SecretString,
    /// Role trigger.
    pub trigger: SecretString,
    /// Role service.
    pub service: SecretString,
}

/// A broker serving on a loopback port in this process, with one client per role.
#[derive(Debug)]
pub struct TestBroker {
    /// The bound address.
    pub addr: SocketAddr,
    /// `http://addr` (`https://addr` when spawned with TLS).
    pub endpoint: String,
    /// The metrics listener's address, when `metrics.listen` was set.
    pub metrics_addr: Option<SocketAddr>,
    /// The HTTP listener's address, when `http.listen` was set.
    pub http_addr: Option<SocketAddr>,
    /// The keys it accepts.
    pub keys: Keys,
    /// A client with the admin key.
    pub admin: Client,
    /// A client with the trigger key.
    pub trigger: Client,
    /// A client with the service key.
    pub service: Client,
    /// A client without credentials.
    pub anonymous: Client,
    /// The clock the broker runs on (a manual one when spawned with it).
    pub clock: Arc<dyn Clock>,
    manual_clock: Option<Arc<ManualClock>>,
    data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<TempDir>,
}

impl TestBroker {
    /// Spawns a broker with default settings on a fresh data directory.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns a broker whose settings `configure` may change.
    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        Self::start(configure, None, None, None).await
    }

    /// Spawns a broker on a manual clock that the test moves with [`TestBroker::advance`].
    pub async fn spawn_with_manual_clock(configure: impl FnOnce(&mut Settings)) -> Self {
        Self::start(configure, Some(Arc::new(ManualClock::new())), None, None).await
    }

    /// Spawns a broker on an existing data directory (which the caller keeps).
    pub async fn spawn_on(dir: &Path) -> Self {
        Self::start(|_| {}, None, Some(dir.to_owned()), None).await
    }

    /// Spawns a broker whose settings `configure` sets up with `[server.tls]`; its endpoint is
    /// `https://127.0.0.1:PORT` and its clients connect with `tls` (the CA to trust, and a
    /// client certificate if mTLS requires one).
    pub async fn spawn_tls(configure: impl FnOnce(&mut Settings), tls: TlsOptions) -> Self {
        Self::start(configure, None, None, Some(tls)).await
    }

    async fn start(
        configure: impl FnOnce(&mut Settings),
        manual_clock: Option<Arc<ManualClock>>,
        data_dir: Option<PathBuf>,
        tls: Option<TlsOptions>,
    ) -> Self {
        logs();
        let (dir, data_dir) = match data_dir {
            Some(path) => (None, path),
            None => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().to_owned();
                (Some(dir), path)
            }
        };
        let generated = generate_dev_keys();
        let mut settings = Settings::default();
        settings.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.server.shutdown_grace_seconds = 5;
        settings.store.embedded.dir = data_dir.clone();
        settings.api_keys = generated.iter().map(|k| k.config.clone()).collect();
        configure(&mut settings);
        let clock: Arc<dyn Clock> = match &manual_clock {
            Some(manual) => manual.clone(),
            None => Arc::new(SystemClock),
        };
        let app = Application::build_with_clock(settings, Arc::clone(&clock))
            .await
            .expect("broker builds");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let http_addr = app.http_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let endpoint = match tls {
            Some(_) => format!("https://{addr}"),
            None => format!("http://{addr}"),
        };
        let mut keys = generated.into_iter().map(|k| k.key);
        let keys = Keys {
            admin: keys.next().expect("admin key"),
            trigger: keys.next().expect("trigger key"),
            service: keys.next().expect("service key"),
        };
        let anonymous = match &tls {
            Some(tls) => connect_tls(&endpoint, tls).await,
            None => connect(&endpoint).await,
        };
        let with = |key: &SecretString| anonymous.clone().with_api_key(key).expect("ascii key");
        Self {
            addr,
            metrics_addr,
            http_addr,
            admin: with(&keys.admin),
            trigger: with(&keys.trigger),
            service: with(&keys.service),
            anonymous: anonymous.clone(),
            endpoint,
            keys,
            clock,
            manual_clock,
            data_dir,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Returns the data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Moves the manual clock forward.
    ///
    /// # Panics
    ///
    /// If the broker was not spawned with a manual clock.
    pub fn advance(&self, by: Duration) {
        self.manual_clock
            .as_ref()
            .expect("spawned with spawn_with_manual_clock")
            .advance(by);
    }

    /// Issues a pair for `email` with the trigger key.
    ///
    /// # Panics
    ///
    /// If the call fails.
    pub async fn issue(&self, email: &str) -> TokenPair {
        self.issue_for_client(email, "").await
    }

    /// Issues a pair for `email` and app client `client_id` with the trigger key.
    ///
    /// # Panics
    ///
    /// If the call fails.
    pub async fn issue_for_client(&self, email: &str, client_id: &str) -> TokenPair {
        self.trigger
            .issue_tokens(claims_request(email, client_id))
            .await
            .expect("IssueTokens succeeds")
    }

    /// Whether `secret` introspects active (with the service key).
    ///
    /// # Panics
    ///
    /// If the call fails.
    pub async fn is_active(&self, secret: &SecretString) -> bool {
        self.service
            .introspect_secret(secret)
            .await
            .expect("Introspect succeeds")
            .active
    }

    /// Rotates `refresh` as its holder does: RefreshTokens without a credential.
    ///
    /// # Errors
    ///
    /// The call's error.
    pub async fn refresh(&self, refresh: &SecretString) -> ClientResult<TokenPair> {
        self.refresh_as(refresh, "").await
    }

    /// Rotates a refresh token issued for app client `client_id` ("" for none), without a
    /// credential.
    ///
    /// # Errors
    ///
    /// The broker's refusal.
    pub async fn refresh_as(
        &self,
        refresh: &SecretString,
        client_id: &str,
    ) -> ClientResult<TokenPair> {
        self.anonymous
            .refresh_tokens(pb::RefreshTokensRequest {
                refresh_token: expose(refresh),
                client_id: client_id.to_owned(),
                ..Default::default()
            })
            .await
    }

    /// Revokes every token of the account with `email` (admin); returns how many were active.
    ///
    /// # Panics
    ///
    /// If the call fails.
    pub async fn revoke_email(&self, email: &str) -> u64 {
        self.admin
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::Email(email.into())),
                ..Default::default()
            })
            .await
            .expect("Revoke succeeds")
            .revoked_count
    }

    /// Lists every token of the account with `email`, inactive ones included (admin).
    ///
    /// # Panics
    ///
    /// If a call fails.
    pub async fn all_tokens(&self, email: &str) -> Vec<pb::TokenSummary> {
        all_tokens(&self.admin, email).await
    }

    /// Scrapes `GET /metrics` over HTTP and returns the body.
    ///
    /// # Panics
    ///
    /// If the broker serves no metrics or the scrape fails.
    pub async fn scrape(&self) -> String {
        let addr = self.metrics_addr.expect("spawned with metrics.listen set");
        let response = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("the metrics endpoint answers");
        assert_eq!(response.status(), 200);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        response.text().await.expect("a text body")
    }

    /// Stops the broker gracefully and waits for it.
    ///
    /// # Errors
    ///
    /// When the broker's run loop failed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Connects a client without credentials to `endpoint`.
///
/// # Panics
///
/// If the broker cannot be reached.
pub async fn connect(endpoint: &str) -> Client {
    Client::connect(endpoint)
        .await
        .expect("broker is reachable")
        .with_timeout(Duration::from_secs(10))
}

/// Connects a client without an API key to the `https://` `endpoint` with `tls`.
///
/// # Panics
///
/// If the broker cannot be reached or the handshake fails.
pub async fn connect_tls(endpoint: &str, tls: &TlsOptions) -> Client {
    Client::connect_tls(endpoint, tls)
        .await
        .expect("broker is reachable over TLS")
        .with_timeout(Duration::from_secs(10))
}

/// An IssueTokens request for asserted claims of `email` and app client `client_id`.
pub fn claims_request(email: &str, client_id: &str) -> pb::IssueTokensRequest {
    pb::IssueTokensRequest {
        subject: Some(pb::issue_tokens_request::Subject::Claims(
            pb::AssertedClaims {
                email: email.into(),
                cognito_sub: "5f0c1a3e-0000-4000-8000-000000000001".into(),
                user_pool_id: "us-east-1_TestPool1".into(),
                client_id: client_id.into(),
                groups: vec!["users".into()],
            },
        )),
        ..Default::default()
    }
}

/// Returns the secret's text, for requests that carry it.
pub fn expose(secret: &SecretString) -> String {
    secret.expose_secret().to_owned()
}

/// The `tokenbroker` binary that [`BrokerProcess`] runs: `$TB_BROKER_BIN` when set (`scripts/test`
/// sets it to the release build, so the process-level tests run what is deployed), else the
/// workspace's build of the running profile ([`workspace_binary`]), so plain `cargo test` needs
/// nothing else.
///
/// # Panics
///
/// If `$TB_BROKER_BIN` names no file, or the build fails.
pub fn broker_binary() -> PathBuf {
    match std::env::var_os("TB_BROKER_BIN") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "TB_BROKER_BIN={} is not a file",
                path.display()
            );
            path
        }
        None => workspace_binary("tokenbroker"),
    }
}

/// The `tokenbroker` binary ([`broker_binary`]) running as a child process (killed on drop).
#[derive(Debug)]
pub struct BrokerProcess {
    /// The child process.
    pub child: tokio::process::Child,
    /// `http://address`, as it printed it.
    pub endpoint: String,
    /// The address it listens on.
    pub address: String,
}

impl BrokerProcess {
    /// Starts `tokenbroker --listen 127.0.0.1:0` with `extra_args`, in `cwd`, and waits (at most
    /// 30 s) for its `tokenbroker listening on …` line.
    ///
    /// # Panics
    ///
    /// If it cannot start or exits before listening.
    pub async fn start(cwd: &Path, extra_args: &[&std::ffi::OsStr]) -> Self {
        Self::start_with_env(cwd, extra_args, &[]).await
    }

    /// Like [`BrokerProcess::start`], with extra environment variables.
    ///
    /// # Panics
    ///
    /// If it cannot start or exits before listening.
    pub async fn start_with_env(
        cwd: &Path,
        extra_args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_on("127.0.0.1:0", cwd, extra_args, env).await
    }

    /// Like [`BrokerProcess::start_with_env`], listening on `listen` instead of
    /// `127.0.0.1:0`.
    ///
    /// # Panics
    ///
    /// If it cannot start or exits before listening.
    pub async fn start_on(
        listen: &str,
        cwd: &Path,
        extra_args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
    ) -> Self {
        use tokio::io::{AsyncBufReadExt as _, BufReader};
        let mut child = tokio::process::Command::new(broker_binary())
            .args(["--listen", listen])
            .args(extra_args)
            .current_dir(cwd)
            .env_remove("TOKENBROKER_CONFIG")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("broker starts");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let address = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("stdout is readable") {
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
            address,
        }
    }

    /// Sends SIGTERM (a graceful stop) and waits, at most 30 s, for the process to exit.
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent or the process does not exit in time.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("the broker is still running");
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the broker exits within 30 s of SIGTERM")
            .expect("the broker's exit status")
    }
}

/// Binds a listener on a free loopback port, for the test servers and doubles.
///
/// # Panics
///
/// If no loopback port can be bound.
pub async fn loopback_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("a loopback port is free");
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    (listener, addr)
}

/// The workspace binaries the tests start: the broker (dev mode, `health`, `check-config`), the
/// admin CLI, and the trigger Lambda's `bootstrap`.
pub const BINARIES: [&str; 3] = ["tokenbroker", "tokenbroker-admin", "bootstrap"];

/// Returns the path of one of the workspace [`BINARIES`], building them first, once per test
/// process, so that `cargo test` works on its own.
///
/// The build is `cargo build --workspace --bin …` for all of them, with the running test
/// binary's profile, target and target directory: the artifacts `cargo build --workspace --bins`
/// makes, so a tree built that way, or by an earlier test run, compiles nothing and only checks.
/// `--workspace` gives the workspace's feature set (the tests crate's `cargo test -p` shares its
/// libraries); a build of each binary's package alone would resolve other features and compile
/// half the tree a second time. Cargo's own lock serialises concurrent builds (nextest runs each
/// test in its own process, so each one checks).
///
/// # Panics
///
/// If `name` is not one of [`BINARIES`], or if the build fails (with cargo's output).
#[track_caller]
pub fn workspace_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<Vec<(String, PathBuf)>, String>> = OnceLock::new();
    let built = match BUILT.get_or_init(build_binaries) {
        Ok(built) => built,
        Err(error) => panic!("{error}"),
    };
    match built.iter().find(|(built, _)| built == name) {
        Some((_, path)) => path.clone(),
        None => panic!("{name} is not among the binaries the tests build: add it to BINARIES"),
    }
}

/// Makes sure the command-line tool `name` (grpcurl, jq, cargo-lambda, …) is on `PATH`, running
/// `scripts/install-tools` once per test process when it is not, so that plain `cargo test`
/// needs nothing installed by hand, as `scripts/test` does not. `python3-yaml` stands for the
/// PyYAML module, which the deployment tests read manifests with, and `python3-authlib` for
/// the authlib and requests modules of the HTTP tests.
///
/// # Panics
///
/// If the installer fails, or leaves the tool missing.
#[track_caller]
pub fn require_tool(name: &str) {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    if tool_present(name) {
        return;
    }
    if let Err(error) = INSTALLED.get_or_init(install_tools) {
        panic!("{name} is missing and {error}");
    }
    assert!(
        tool_present(name),
        "{name} is still missing after scripts/install-tools"
    );
}

fn tool_present(name: &str) -> bool {
    if name == "python3-authlib" {
        return std::process::Command::new("python3")
            .args(["-c", "import authlib, requests"])
            .output()
            .is_ok_and(|output| output.status.success());
    }
    if name == "python3-yaml" {
        return std::process::Command::new("python3")
            .args(["-c", "import yaml"])
            .output()
            .is_ok_and(|output| output.status.success());
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// Runs `scripts/install-tools`, or says why it failed.
fn install_tools() -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-tools");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("scripts/install-tools could not run: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scripts/install-tools failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The variables cargo sets for a crate it runs (besides `CARGO_PKG_*` and `CARGO_BIN_EXE_*`);
/// `CARGO` itself names the cargo to use, and the user's `CARGO_*` settings pass through.
const SET_FOR_CRATES: [&str; 9] = [
    "CARGO_CRATE_NAME",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_BIN_NAME",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

/// Builds [`BINARIES`] and returns each one's path, or what went wrong.
fn build_binaries() -> Result<Vec<(String, PathBuf)>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test binary's path: {e}"))?;
    let (target_dir, profile, triple) = build_layout(&exe)?;
    // The cargo running the tests, when there is one; else the one that built this crate.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let mut command = std::process::Command::new(&cargo);
    // Not the variables cargo set for this test crate: build scripts that rerun when one changes
    // (ring's, on `CARGO_MANIFEST_DIR`) would otherwise rebuild rustls, tonic and the broker
    // each time the tree is built from a shell and from a test in turn.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || SET_FOR_CRATES.contains(&name)
        {
            command.env_remove(name);
        }
    }
    command
        .current_dir(workspace)
        .args(["build", "--workspace", "--locked"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--target-dir")
        .arg(&target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    if let Some(triple) = &triple {
        command.args(["--target", triple]);
    }
    for name in BINARIES {
        command.args(["--bin", name]);
    }
    let shown = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the binaries the tests start failed ({}): {shown}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // One JSON message per line; each binary's `compiler-artifact` names its executable.
    let mut built = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        if BINARIES.contains(&name) {
            built.push((name.to_owned(), PathBuf::from(executable)));
        }
    }
    match BINARIES
        .iter()
        .find(|name| !built.iter().any(|(built, _)| built == *name))
    {
        Some(missing) => Err(format!(
            "{shown} succeeded but reported no executable for {missing}"
        )),
        None => Ok(built),
    }
}

/// Reads the target directory, profile directory and target triple (when cross-building) from
/// the test binary's path: `<target>/<profile>/deps/<test>`, or
/// `<target>/<triple>/<profile>/deps/<test>`. The target directory is the one holding
/// `CACHEDIR.TAG`, which cargo writes there.
fn build_layout(exe: &Path) -> Result<(PathBuf, String, Option<String>), String> {
    let unexpected = || {
        format!(
            "{} is not in <target>/<profile>/deps/: cannot tell which build to extend",
            exe.display()
        )
    };
    let profile_dir = exe.parent().and_then(Path::parent).ok_or_else(unexpected)?;
    let name = |dir: &Path| dir.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    let profile = name(profile_dir).ok_or_else(unexpected)?;
    let above = profile_dir.parent().ok_or_else(unexpected)?;
    let is_target_dir = |dir: &Path| dir.join("CACHEDIR.TAG").is_file();
    if !is_target_dir(above)
        && let Some(target_dir) = above.parent().filter(|dir| is_target_dir(dir))
    {
        let triple = name(above).ok_or_else(unexpected)?;
        return Ok((target_dir.to_owned(), profile, Some(triple)));
    }
    Ok((above.to_owned(), profile, None))
}

/// Lists every token of the account with `email`, inactive ones included, page by page,
/// through `admin` (a client with an admin key).
///
/// # Panics
///
/// If a call fails.
pub async fn all_tokens(admin: &Client, email: &str) -> Vec<pb::TokenSummary> {
    let mut tokens = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_tokens(pb::ListTokensRequest {
                account: Some(pb::list_tokens_request::Account::Email(email.into())),
                page_size: 100,
                page_token,
                include_inactive: true,
            })
            .await
            .expect("ListTokens succeeds");
        tokens.extend(page.tokens);
        if page.next_page_token.is_empty() {
            return tokens;
        }
        page_token = page.next_page_token;
    }
}
