//! The `tokenbroker` command line: flags, dev mode, and the small key-management helpers.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::warn;

use crate::{
    app::dev,
    app::settings::{ENV_CONFIG_FILE, ProcessEnv, Settings},
    app::startup::{Application, shutdown_signal},
    app::tls::TlsServer,
    obs::telemetry,
};

/// tokenbroker: mints, rotates, revokes and introspects refresh and access tokens over gRPC.
///
/// With no config file and no API keys configured, it runs in dev mode: an embedded store
/// under ./data, a listener on 127.0.0.1:50051, and three generated API keys (admin, trigger,
/// service), printed once and written to ./data/dev-keys.env. Dev mode listens on loopback
/// addresses only, unless started with --dev-on-any-address.
///
/// Every setting can also come from the environment as TOKENBROKER_SECTION__FIELD, for
/// example TOKENBROKER_SERVER__LISTEN=0.0.0.0:50051; see docs/configuration.md.
#[derive(Debug, Parser)]
#[command(name = "tokenbroker", version)]
pub struct Args {
    /// TOML config file. Without one (and without TOKENBROKER_API_KEYS) the broker runs in
    /// dev mode.
    #[arg(long, short, env = ENV_CONFIG_FILE, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on; overrides server.listen.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Data directory of the embedded store; overrides store.embedded.dir.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Lets dev mode listen on an address that is not loopback (0.0.0.0, a LAN address),
    /// where anyone who can reach it gets a broker whose keys are printed on its console.
    /// Without it, dev mode refuses such a listener. No effect outside dev mode.
    #[arg(long)]
    pub dev_on_any_address: bool,

    /// Something other than serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands other than serving.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generates a new API key and prints it with the config entry that admits it.
    GenKey {
        /// The caller name to put in the entry.
        #[arg(long, default_value = "my-service")]
        name: String,
        /// The role to grant: trigger, service or admin.
        #[arg(long, default_value = "service")]
        role: String,
    },
    /// Reads an API key from stdin and prints its SHA-256, for `api_keys[].sha256`.
    HashKey,
    /// Checks the configuration and exits.
    CheckConfig,
    /// Asks a running broker's grpc.health.v1 service whether it is serving: exits 0 if it
    /// is, 1 if not or if it cannot be reached. For container health checks (no config read).
    Health {
        /// The broker's gRPC address.
        #[arg(long, default_value = "127.0.0.1:50051", value_name = "ADDR")]
        addr: SocketAddr,
        /// Speak TLS, trusting the CA certificates (PEM) in this file; without it, plaintext.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// The name the broker's certificate is checked against (default: the address's IP).
        #[arg(long, value_name = "NAME", requires = "ca_file")]
        tls_name: Option<String>,
        /// For a listener that requires client certificates: this certificate (PEM)...
        #[arg(long, value_name = "FILE", requires_all = ["ca_file", "key_file"])]
        cert_file: Option<PathBuf>,
        /// ...and its private key (PEM).
        #[arg(long, value_name = "FILE", requires = "cert_file")]
        key_file: Option<PathBuf>,
        /// The health service name to check: "" (the server), tokenbroker.v1.TokenBroker, or
        /// tokenbroker.v1.TokenBroker/cognito.
        #[arg(long, default_value = "", value_name = "NAME")]
        service: String,
        /// How long to wait for the answer, connection included.
        #[arg(long, default_value_t = 2000, value_name = "MS")]
        timeout_ms: u64,
    },
}

/// Runs the command line.
///
/// # Errors
///
/// Any failure to configure, start or run the broker, with context.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match &args.command {
        Some(Command::GenKey { name, role }) => return gen_key(name, role),
        Some(Command::HashKey) => return hash_key(),
        Some(Command::Health {
            addr,
            ca_file,
            tls_name,
            cert_file,
            key_file,
            service,
            timeout_ms,
        }) => {
            let identity = cert_file.as_deref().zip(key_file.as_deref());
            let tls = ca_file
                .as_deref()
                .map(|ca| health_tls(*addr, ca, tls_name.as_deref(), identity))
                .transpose()?;
            return health(*addr, tls, service, Duration::from_millis(*timeout_ms)).await;
        }
        _ => {}
    }
    let mut settings = Settings::load_with(args.config.as_deref(), &ProcessEnv, |settings| {
        if let Some(listen) = args.listen {
            settings.server.listen = listen;
        }
        if let Some(dir) = args.data_dir.clone() {
            settings.store.embedded.dir = dir;
        }
    })?;
    let dev_mode = args.config.is_none() && settings.api_keys.is_empty();
    if dev_mode && !args.dev_on_any_address {
        refuse_public_dev_listener(settings.server.listen)?;
    }
    if matches!(args.command, Some(Command::CheckConfig)) {
        // `load` checked every setting; what is left is reading the files they name.
        if let Some(tls) = &settings.server.tls {
            TlsServer::load(tls).context("invalid server.tls")?;
        }
        println!("configuration is valid");
        return Ok(());
    }
    let telemetry = telemetry::init(&settings.log, &settings.telemetry)?;

    if dev_mode {
        let keys = dev::generate_dev_keys();
        let dir = settings.store.embedded.dir.clone();
        dev::write_keys_file(&dir, &keys).with_context(|| {
            format!("failed to write {}", dir.join(dev::DEV_KEYS_FILE).display())
        })?;
        settings.api_keys = keys.iter().map(|k| k.config.clone()).collect();
        println!(
            "tokenbroker is running in dev mode: embedded store in {dir}, no config file.\n\
             These API keys are valid until the process exits (also in {dir}/{file}):\n\n{exports}",
            dir = dir.display(),
            file = dev::DEV_KEYS_FILE,
            exports = dev::render_exports(&keys),
        );
        warn!("dev mode: generated api keys; do not use in production");
        if !is_loopback(settings.server.listen) {
            warn!(
                listen = %settings.server.listen,
                "dev mode on a non-loopback address (--dev-on-any-address): whoever reaches it \
                 can use the keys above"
            );
        }
    } else if settings.api_keys.is_empty() {
        warn!("no api keys configured: only RefreshTokens and Revoke by secret can succeed");
    }

    let served = async {
        let app = Application::build(settings).await?;
        // On stdout, for people and scripts: with `--listen 127.0.0.1:0` this is how they
        // learn the port.
        println!("tokenbroker listening on {}", app.local_addr());
        app.run_until_stopped(shutdown_signal()).await
    }
    .await;
    // Whether the broker stopped or failed, the spans of its last calls are exported.
    telemetry.shutdown().await;
    served
}

/// Dev mode's listener check: generated keys for every role, printed on the console and
/// written to a file, are a local convenience; on an address other hosts can reach they are an
/// open admin door. Refused unless asked for with `--dev-on-any-address`.
fn refuse_public_dev_listener(listen: SocketAddr) -> anyhow::Result<()> {
    if is_loopback(listen) {
        return Ok(());
    }
    anyhow::bail!(
        "dev mode (no config file, no API keys) refuses to listen on {listen}, which is not a \
         loopback address: its generated admin key would open the broker to every network that \
         reaches this host. Listen on loopback (--listen 127.0.0.1:{port}), or give a config \
         file with API keys (docs/configuration.md), or pass --dev-on-any-address if this is \
         really what you want",
        port = listen.port(),
    )
}

/// Whether `listen` is reachable from this host only: 127.0.0.0/8 or ::1, and
/// [::ffff:127.0.0.1] too (`to_canonical`).
fn is_loopback(listen: SocketAddr) -> bool {
    listen.ip().to_canonical().is_loopback()
}

fn gen_key(name: &str, role: &str) -> anyhow::Result<()> {
    if !matches!(role, "trigger" | "service" | "admin") {
        anyhow::bail!("role must be trigger, service or admin, not {role:?}");
    }
    let key = dev::generate_api_key();
    println!(
        "API key (give it to the caller; it is not stored anywhere):\n  {}\n\n\
         Config entry:\n  [[api_keys]]\n  name = {name:?}\n  roles = [{role:?}]\n  sha256 = \"{}\"",
        key.expose_secret(),
        dev::api_key_digest(&key),
    );
    Ok(())
}

/// The TLS settings of `tokenbroker health --ca-file`, on the broker's own rustls provider
/// (aws-lc), so the binary carries one TLS stack.
fn health_tls(
    addr: SocketAddr,
    ca: &Path,
    name: Option<&str>,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<ClientTlsConfig> {
    let read = |path: &Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .domain_name(name.map_or_else(|| addr.ip().to_string(), str::to_owned));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// Calls grpc.health.v1 `Check` once. Built in so that the runtime image needs no
/// grpc_health_probe (and no shell): `HEALTHCHECK CMD ["tokenbroker", "health"]`. With `tls`,
/// over TLS (and mTLS when it carries an identity).
async fn health(
    addr: SocketAddr,
    tls: Option<ClientTlsConfig>,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use tokenbroker_client::{Client, ServingStatus};
    let check = async {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).context("invalid TLS settings")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach {addr}"))?;
        Client::from_channel(channel)
            .with_timeout(timeout)
            .check_health(service)
            .await
            .with_context(|| format!("health check of {service:?} failed"))
    };
    // The connection is bounded too: the client's deadline covers the call only.
    let status = tokio::time::timeout(timeout, check)
        .await
        .with_context(|| format!("no health answer from {addr} within {timeout:?}"))??;
    if status != ServingStatus::Serving {
        anyhow::bail!("{addr} reports {service:?} as {}", status.as_str_name());
    }
    println!("{}", status.as_str_name());
    Ok(())
}

fn hash_key() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("failed to read the key from stdin")?;
    let key = SecretString::from(line.trim().to_owned());
    if key.expose_secret().is_empty() {
        anyhow::bail!("no key on stdin");
    }
    println!("{}", dev::api_key_digest(&key));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_mode_listens_on_loopback_only() {
        for listen in [
            "127.0.0.1:50051",
            "127.9.8.7:0",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:0",
        ] {
            let listen: SocketAddr = listen.parse().unwrap();
            assert!(refuse_public_dev_listener(listen).is_ok(), "{listen}");
        }
        for listen in [
            "0.0.0.0:50051",
            "[::]:50051",
            "192.168.1.10:50051",
            "[::ffff:10.0.0.1]:0",
        ] {
            let listen: SocketAddr = listen.parse().unwrap();
            let err = refuse_public_dev_listener(listen).unwrap_err().to_string();
            assert!(
                err.contains(&format!("refuses to listen on {listen}")),
                "{err}"
            );
            assert!(err.contains("--dev-on-any-address"), "{err}");
        }
    }
}
