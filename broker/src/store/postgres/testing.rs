//! A throwaway PostgreSQL cluster for tests, one per test process, and a fresh database per
//! test on it.
//!
//! [`cluster`] starts the cluster on first use: `initdb` into a temporary directory (as the
//! `postgres` user when the tests run as root: `initdb` and `pg_ctl` refuse root), trust
//! authentication, no fsync, listening on 127.0.0.1 on a free port with its socket in the same
//! directory. A process cannot run code at its own exit for a `static`, so the cluster is
//! stopped by a watchdog: a small shell loop, in a session of its own, that waits for the test
//! process to end (however it ends) and then stops the server and deletes the directory.
//! Clusters a killed watchdog left behind are found by the owner pid they record and removed
//! when the next test process starts one.
//!
//! [`PrivateCluster`] is a cluster of one test's own, for tests that stop or restart the server
//! ([`PrivateCluster::restart`]): the same set-up, but with `synchronous_commit = on`
//! (PostgreSQL's default, as on a production server: a commit is in the WAL before it is
//! acknowledged); it is stopped and deleted when dropped.
//!
//! The server binaries come from `/usr/lib/postgresql/<version>/bin` (Debian's layout); when
//! there are none, `scripts/install-tools` installs the `postgresql` package.

use std::{
    fs,
    ops::Deref,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use tokio_postgres::{Client, NoTls};

use super::super::settings::{PostgresSettings, SslMode};

/// Prefix of every test cluster's directory under the temporary directory.
const DIR_PREFIX: &str = "tokenbroker-pg-";
/// The superuser that `initdb -U` creates.
const SUPERUSER: &str = "postgres";

/// A running throwaway cluster. See the module documentation.
#[derive(Debug)]
pub struct TestCluster {
    dir: PathBuf,
    port: u16,
    /// The server binaries' directory.
    bin: PathBuf,
    /// The server's command-line options (`pg_ctl -o`), for a restart.
    options: String,
}

/// Whether the server waits for its WAL flush before it acknowledges a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SynchronousCommit {
    /// `synchronous_commit = off`: faster; a crash of the server may lose the last acknowledged
    /// commits (a clean shutdown writes them).
    Off,
    /// `synchronous_commit = on` (PostgreSQL's default): a commit is in the WAL before it is
    /// acknowledged.
    On,
}

/// Returns this process's cluster, starting it on first use.
///
/// # Panics
///
/// When the server cannot be installed or started; the message says why (with the server's
/// log).
pub fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(|| TestCluster::start(SynchronousCommit::Off)) {
        Ok(cluster) => cluster,
        Err(error) => panic!("cannot start a test PostgreSQL cluster: {error}"),
    }
}

impl TestCluster {
    fn start(synchronous_commit: SynchronousCommit) -> Result<Self, String> {
        let bin = server_bin()?;
        remove_stale_clusters();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|err| format!("cannot create a temporary directory: {err}"))?
            .keep();
        fs::write(dir.join("owner"), std::process::id().to_string())
            .map_err(|err| format!("cannot write the owner file: {err}"))?;
        if running_as_root() {
            run(Command::new("chown").arg(format!("{SUPERUSER}:")).arg(&dir))?;
        }
        let data = dir.join("data");
        run(as_postgres(&bin.join("initdb")).arg("-D").arg(&data).args([
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]))?;
        watch(&dir)?;
        // A free port can be taken between the probe and the server's bind: try a few.
        let synchronous_commit = match synchronous_commit {
            SynchronousCommit::Off => "off",
            SynchronousCommit::On => "on",
        };
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            // fsync stays off even with synchronous_commit on: the tests restart the server,
            // never the machine, and a written page survives a server restart in the page cache.
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit={synchronous_commit} -c full_page_writes=off \
                 -c max_connections=400",
                dir.display()
            );
            let started = run(as_postgres(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .args(["-w", "-t", "60", "-o", &options, "start"]));
            match started {
                Ok(()) => {
                    return Ok(Self {
                        dir,
                        port,
                        bin,
                        options,
                    });
                }
                Err(error) => {
                    let log = fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                    last_error = format!("{error}\nserver log:\n{log}");
                }
            }
        }
        Err(last_error)
    }

    /// Returns the server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the cluster's directory (its data directory is `data/` inside).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns store settings for database `dbname` as the superuser, without TLS.
    pub fn settings(&self, dbname: &str) -> PostgresSettings {
        PostgresSettings {
            host: "127.0.0.1".into(),
            port: self.port,
            dbname: dbname.into(),
            user: SUPERUSER.into(),
            sslmode: SslMode::Disable,
            pool_size: 8,
            ..PostgresSettings::default()
        }
    }

    /// Creates a fresh, empty database and returns settings for it.
    ///
    /// # Panics
    ///
    /// When the database cannot be created.
    pub async fn create_database(&self) -> PostgresSettings {
        let name = format!("tb_{}", crate::model::random_hex());
        self.admin("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|err| panic!("cannot create database {name}: {err}"));
        self.settings(&name)
    }

    /// Returns a superuser connection to `dbname`, driven by a task on the current runtime.
    ///
    /// # Panics
    ///
    /// When the server refuses the connection.
    pub async fn admin(&self, dbname: &str) -> Client {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .dbname(dbname)
            .connect(NoTls)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to the test cluster: {err}"));
        tokio::spawn(connection);
        client
    }
}

/// A cluster of one test's own, with `synchronous_commit = on`, that the test may restart. See
/// the module documentation. Dropping it stops the server (`pg_ctl stop -m immediate`) and
/// deletes its directory.
#[derive(Debug)]
pub struct PrivateCluster {
    cluster: TestCluster,
}

impl PrivateCluster {
    /// Starts a new cluster (`initdb` and `pg_ctl start`: a second or two, more on a loaded
    /// machine).
    ///
    /// # Panics
    ///
    /// When the server cannot be installed or started; the message says why (with the server's
    /// log).
    pub fn start() -> Self {
        match TestCluster::start(SynchronousCommit::On) {
            Ok(cluster) => Self { cluster },
            Err(error) => panic!("cannot start a private PostgreSQL cluster: {error}"),
        }
    }

    /// Restarts the server as an operator's `pg_ctl restart -m fast` does: the server ends
    /// every session (their clients get `57P01 terminating connection due to administrator
    /// command`, or a closed connection), shuts down cleanly, starts again on the same port
    /// and data, and accepts connections when this returns. Blocks the calling thread (use
    /// `tokio::task::block_in_place` on a runtime).
    ///
    /// # Panics
    ///
    /// When the server does not restart within a minute; the message has the server's log.
    pub fn restart(&self) {
        let cluster = &self.cluster;
        let restarted = run(as_postgres(&cluster.bin.join("pg_ctl"))
            .arg("-D")
            .arg(cluster.dir.join("data"))
            .arg("-l")
            .arg(cluster.dir.join("server.log"))
            .args([
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "-o",
                &cluster.options,
                "restart",
            ]));
        if let Err(error) = restarted {
            let log = fs::read_to_string(cluster.dir.join("server.log")).unwrap_or_default();
            panic!("cannot restart the private PostgreSQL cluster: {error}\nserver log:\n{log}");
        }
    }
}

impl Deref for PrivateCluster {
    type Target = TestCluster;

    fn deref(&self) -> &TestCluster {
        &self.cluster
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Immediate: nothing of a finished test's data matters. The watchdog would do the same
        // when the test process ends; this frees the server's memory and port now.
        let _ = run(as_postgres(&self.cluster.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.cluster.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"]));
        let _ = fs::remove_dir_all(&self.cluster.dir);
    }
}

/// Finds the newest server's `bin` directory, installing the server when there is none.
fn server_bin() -> Result<PathBuf, String> {
    if let Some(bin) = find_server_bin() {
        return Ok(bin);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-tools");
    run(&mut Command::new(&script))?;
    find_server_bin().ok_or_else(|| {
        "no initdb under /usr/lib/postgresql/*/bin after scripts/install-tools".to_owned()
    })
}

fn find_server_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Stops and deletes clusters whose test process is gone (their watchdog was killed with it).
fn remove_stale_clusters() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        let is_cluster = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(DIR_PREFIX));
        let Some(owner) = fs::read_to_string(dir.join("owner")).ok() else {
            continue;
        };
        if !is_cluster || Path::new("/proc").join(owner.trim()).exists() {
            continue;
        }
        if let Some(pid) = fs::read_to_string(dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned))
        {
            // SIGQUIT: immediate shutdown. The pid may be reused by now, but only by a process
            // that a test run may signal anyway.
            let _ = Command::new("kill").args(["-QUIT", pid.trim()]).status();
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Starts the watchdog that stops the server and deletes `dir` once this process has ended.
fn watch(dir: &Path) -> Result<(), String> {
    const SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null; do sleep 1; done
if [ -f "$2/data/postmaster.pid" ]; then kill -QUIT "$(head -n 1 "$2/data/postmaster.pid")"; fi
sleep 1
rm -rf "$2"
"#;
    Command::new("setsid")
        .args(["sh", "-c", SCRIPT, "watchdog"])
        .arg(std::process::id().to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|err| format!("cannot start the cluster's watchdog: {err}"))
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// A command for `program`, run as the `postgres` user when this process is root.
fn as_postgres(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", SUPERUSER, "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|err| format!("cannot find a free port: {err}"))
}

/// Runs a command to completion; an error carries its output.
fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run {command:?}: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
