//! Real clients and servers for the broker's HTTP endpoints: curl, Python authlib, nginx, and an
//! upstream that records what reaches it. Every process runs under `tokio::process`, so the
//! broker in the same test process keeps its runtime.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, header::HeaderMap, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::{net::TcpListener, process::Command, task::JoinHandle};

/// An answer as curl saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The protocol (`HTTP/1.1`, `HTTP/2`).
    pub version: String,
    /// Response headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as JSON.
    ///
    /// # Panics
    ///
    /// If it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {:?}", self.body))
    }
}

/// Runs `curl -sS -D - <args>` and parses what it printed.
///
/// # Panics
///
/// If curl cannot run or fails (a refused connection, a TLS error).
pub async fn curl(args: &[&str]) -> Answer {
    crate::require_tool("curl");
    let output = Command::new("curl")
        // No `Expect: 100-continue`: the answer is the final one.
        .args(["-sS", "-D", "-", "-H", "Expect:", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    assert!(
        output.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_answer(&String::from_utf8_lossy(&output.stdout))
}

/// Parses what `curl -D -` printed: the status line, the headers, and the rest as the body
/// (empty when `text` is only a header block).
pub fn parse_answer(text: &str) -> Answer {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default().to_owned();
    let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        version,
        headers,
        body: body.to_owned(),
    }
}

/// Runs a Python script (with authlib and requests available) with `args`, and returns its
/// standard output.
///
/// # Panics
///
/// If python fails.
pub async fn python(script: &str, args: &[&str]) -> String {
    crate::require_tool("python3-authlib");
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// An HTTP server that answers `200 upstream` to everything and records the request headers.
#[derive(Debug)]
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts it on a loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        record
                            .lock()
                            .expect("not poisoned")
                            .push(request.headers().clone());
                        async {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"upstream"),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    /// The headers of every request that reached it, in order.
    pub fn seen(&self) -> Vec<HeaderMap> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A private nginx (Debian's) on a loopback port, with a generated config, in one process
/// (`master_process off`) so that killing it leaves nothing behind.
#[derive(Debug)]
pub struct Nginx {
    /// Its port.
    pub port: u16,
    dir: TempDir,
    child: tokio::process::Child,
}

impl Nginx {
    /// Starts nginx with `server` (the body of its `server { }` block, without `listen`).
    ///
    /// # Panics
    ///
    /// If nginx is missing, its config is refused, or it does not start listening.
    pub async fn start(server: &str) -> Self {
        crate::require_tool("nginx");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = {
            let (listener, addr) = crate::loopback_listener().await;
            drop(listener);
            addr.port()
        };
        let d = dir.path().display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\nhttp {{\n\
             access_log {d}/access.log;\nclient_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             server {{\nlisten 127.0.0.1:{port};\n{server}\n}}\n}}\n"
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).expect("write nginx.conf");
        let mut child = Command::new(nginx_binary())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-p")
            .arg(format!("{d}/"))
            .arg("-c")
            .arg(&conf)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nginx starts");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Self { port, dir, child };
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                panic!("nginx exited with {status}: {log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nginx did not listen on {port}");
    }

    /// Its error log.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn nginx_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("nginx"))
}
