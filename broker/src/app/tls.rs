//! TLS and mTLS on the gRPC listener, with certificate files reloaded on change.
//!
//! tonic's own `ServerTlsConfig` is fixed at start, so the broker accepts TCP itself and runs
//! each handshake with a [`TlsAcceptor`] made from the current [`ServerConfig`]. A watcher polls
//! the files' contents every `reload_interval_seconds` and swaps in a new config when they
//! change; a change that does not load (a half-written file, a key that does not match the
//! certificate) keeps the previous config and logs a warning. New connections get the new
//! certificate; established connections keep theirs.
//!
//! Handshakes run in their own tasks with a timeout, so a failing or slow client never holds
//! up the accept loop; at most `server.max_tls_handshakes` run at once, so a flood of clients
//! that connect and stall cannot hold unbounded memory and tasks. tonic's `Connected` impl for
//! the TLS stream carries the verified client certificates into each request
//! (`Request::peer_certs`), where [`crate::grpc`] maps them to callers
//! ([`crate::identity::auth::CertCallerConfig`]).

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use secrecy::{ExposeSecret as _, SecretSlice};
use serde::Deserialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::listener::{ConnectionLimits, Incoming, Limited};
use crate::model::secret::{SecretDigest, sha256};

/// The gRPC listener's application protocol: HTTP/2 only.
pub const GRPC_ALPN: &[&[u8]] = &[b"h2"];
/// The HTTP listener's: HTTP/2, or HTTP/1.1 for a client that offers only that.
pub const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// How long one client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[server.tls]`: serve gRPC over TLS (off when the section is absent).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file with the server certificate, then its intermediates.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1). Never logged.
    pub key_file: PathBuf,
    /// PEM file with the CA certificates that sign client certificates; enables mTLS.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client must present a certificate: `required` (the default with a
    /// `client_ca_file`) or `optional`.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// How often the files are checked for a change.
    #[serde(default = "default_reload_interval_seconds")]
    pub reload_interval_seconds: u64,
}

fn default_reload_interval_seconds() -> u64 {
    10
}

/// Whether clients must present a certificate signed by the client CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client without a (valid) certificate fails the handshake.
    Required,
    /// A client may connect without a certificate (and authenticate with an API key); one
    /// that presents a certificate must present a valid one.
    Optional,
}

impl TlsSettings {
    /// Checks what can be checked without reading the files.
    ///
    /// # Errors
    ///
    /// A message naming the setting that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.client_auth.is_some() && self.client_ca_file.is_none() {
            return Err(
                "server.tls.client_auth needs server.tls.client_ca_file (the CA that signs \
                 client certificates)"
                    .into(),
            );
        }
        if self.reload_interval_seconds == 0 {
            return Err("server.tls.reload_interval_seconds must be at least 1".into());
        }
        Ok(())
    }

    /// The effective client authentication, if mTLS is on.
    pub fn client_auth(&self) -> Option<ClientAuth> {
        self.client_ca_file
            .as_ref()
            .map(|_| self.client_auth.unwrap_or(ClientAuth::Required))
    }
}

/// The files' contents, as read at one moment.
struct Files {
    cert: Vec<u8>,
    key: SecretSlice<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    fn read(settings: &TlsSettings) -> anyhow::Result<Self> {
        let read = |name: &str, path: &Path| {
            fs::read(path)
                .with_context(|| format!("cannot read server.tls.{name} {}", path.display()))
        };
        Ok(Self {
            cert: read("cert_file", &settings.cert_file)?,
            key: SecretSlice::from(read("key_file", &settings.key_file)?),
            client_ca: settings
                .client_ca_file
                .as_deref()
                .map(|path| read("client_ca_file", path))
                .transpose()?,
        })
    }

    /// A digest of all three, to notice a change.
    fn fingerprint(&self) -> SecretDigest {
        let mut all = Vec::new();
        for part in [
            &self.cert[..],
            self.key.expose_secret(),
            self.client_ca.as_deref().unwrap_or_default(),
        ] {
            all.extend_from_slice(&sha256(part));
        }
        sha256(&all)
    }

    /// Parses the files into a server config (ALPN `alpn`, TLS 1.2 and 1.3, aws-lc-rs).
    fn server_config(
        &self,
        settings: &TlsSettings,
        alpn: &[&[u8]],
    ) -> anyhow::Result<ServerConfig> {
        let cert_path = settings.cert_file.display();
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("server.tls.cert_file {cert_path} is not valid PEM"))?;
        if certs.is_empty() {
            return Err(anyhow!(
                "server.tls.cert_file {cert_path} holds no CERTIFICATE"
            ));
        }
        // The parser's error is left out: it could quote the key file.
        let key = PrivateKeyDer::from_pem_slice(self.key.expose_secret()).map_err(|_| {
            anyhow!(
                "server.tls.key_file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                settings.key_file.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .context("the TLS provider supports no protocol version")?;
        let builder = match (&self.client_ca, settings.client_auth()) {
            (Some(pem), Some(auth)) => {
                builder.with_client_cert_verifier(client_verifier(settings, pem, auth, provider)?)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "server.tls.key_file {} does not fit server.tls.cert_file {cert_path}",
                settings.key_file.display()
            )
        })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}

fn client_verifier(
    settings: &TlsSettings,
    pem: &[u8],
    auth: ClientAuth,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let path = settings
        .client_ca_file
        .as_deref()
        .map(Path::display)
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.with_context(|| format!("server.tls.client_ca_file {path} is not valid PEM"))?;
        roots.add(cert).with_context(|| {
            format!("server.tls.client_ca_file {path}: a certificate does not parse")
        })?;
    }
    if roots.is_empty() {
        return Err(anyhow!(
            "server.tls.client_ca_file {path} holds no CERTIFICATE"
        ));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = match auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    builder
        .build()
        .with_context(|| format!("server.tls.client_ca_file {path} cannot verify clients"))
}

/// The listener's TLS: the current server config and the settings to reload it from.
pub struct TlsServer {
    settings: TlsSettings,
    alpn: &'static [&'static [u8]],
    current: Arc<RwLock<Arc<ServerConfig>>>,
    fingerprint: SecretDigest,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("cert_file", &self.settings.cert_file)
            .field("client_auth", &self.settings.client_auth())
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Reads and checks the files (start-up and `tokenbroker check-config`): readable, valid
    /// PEM, the key matching the certificate, the client CA usable.
    ///
    /// # Errors
    ///
    /// A message naming the file and what is wrong with it; never the key's content.
    pub fn load(settings: &TlsSettings) -> anyhow::Result<Self> {
        Self::load_with_alpn(settings, GRPC_ALPN)
    }

    /// Like [`TlsServer::load`], offering the application protocols `alpn` (the HTTP listener:
    /// [`HTTP_ALPN`]).
    ///
    /// # Errors
    ///
    /// As [`TlsServer::load`].
    pub fn load_with_alpn(
        settings: &TlsSettings,
        alpn: &'static [&'static [u8]],
    ) -> anyhow::Result<Self> {
        settings.validate().map_err(anyhow::Error::msg)?;
        let files = Files::read(settings)?;
        let config = files.server_config(settings, alpn)?;
        Ok(Self {
            settings: settings.clone(),
            alpn,
            current: Arc::new(RwLock::new(Arc::new(config))),
            fingerprint: files.fingerprint(),
        })
    }

    /// Whether client certificates are asked for.
    pub fn client_auth(&self) -> Option<ClientAuth> {
        self.settings.client_auth()
    }

    /// Starts the watcher that reloads the files when their content changes.
    pub fn spawn_reloader(&self) -> JoinHandle<()> {
        let settings = self.settings.clone();
        let alpn = self.alpn;
        let current = Arc::clone(&self.current);
        let mut fingerprint = self.fingerprint;
        let interval = Duration::from_secs(settings.reload_interval_seconds);
        tokio::spawn(async move {
            // The last failure reported, so a file that stays broken is reported once.
            let mut reported: Option<String> = None;
            loop {
                tokio::time::sleep(interval).await;
                let settings = settings.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    let files = Files::read(&settings)?;
                    let seen = files.fingerprint();
                    if seen == fingerprint {
                        return Ok((seen, None));
                    }
                    files
                        .server_config(&settings, alpn)
                        .map(|config| (seen, Some(config)))
                })
                .await;
                match loaded {
                    Ok(Ok((_, None))) => {}
                    Ok(Ok((seen, Some(config)))) => {
                        fingerprint = seen;
                        reported = None;
                        *current.write().unwrap_or_else(|poison| poison.into_inner()) =
                            Arc::new(config);
                        info!(
                            "tls certificate files changed; new connections use the new certificate"
                        );
                    }
                    Ok(Err(err)) => {
                        let message = format!("{err:#}");
                        if reported.as_ref() != Some(&message) {
                            warn!(error = %message, "tls certificate files changed but do not load; keeping the previous certificate");
                            reported = Some(message);
                        }
                    }
                    Err(err) => warn!(error = %err, "tls reload task failed"),
                }
            }
        })
    }

    /// Accepts TCP connections on `listener` and hands out the completed TLS streams, under
    /// `limits`: a connection over the connection cap, or arriving while the handshake cap is
    /// reached, is closed at once (see [`super::listener`]).
    ///
    /// Each handshake runs in its own task, bounded by [`HANDSHAKE_TIMEOUT`]; a failed one is
    /// logged at debug level and dropped. The returned task ends when the stream is dropped
    /// (abort it to free the listener sooner).
    pub fn incoming(
        &self,
        listener: TcpListener,
        limits: ConnectionLimits,
    ) -> (Incoming<TlsStream<TcpStream>>, JoinHandle<()>) {
        let (ready, incoming) = mpsc::channel(64);
        let current = Arc::clone(&self.current);
        let accept_loop = tokio::spawn(async move {
            while !ready.is_closed() {
                let (tcp, peer) = limits.accept(&listener).await;
                // Dropping `tcp` closes it; the connection permit is taken first so a closed
                // connection never holds a handshake permit.
                let Some(connection) = limits.admit_connection(peer) else {
                    continue;
                };
                let Some(handshaking) = limits.admit_handshake(peer) else {
                    continue;
                };
                let config =
                    Arc::clone(&current.read().unwrap_or_else(|poison| poison.into_inner()));
                let ready = ready.clone();
                tokio::spawn(async move {
                    let stream = handshake(TlsAcceptor::from(config), tcp, peer).await;
                    drop(handshaking);
                    if let Some(stream) = stream {
                        let _ = ready.send(Ok(Limited::new(stream, connection))).await;
                    }
                });
            }
        });
        (ReceiverStream::new(incoming), accept_loop)
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            debug!(%peer, error = %err, "tls handshake failed");
            None
        }
        Err(_) => {
            debug!(%peer, "tls handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TlsSettings {
        TlsSettings {
            cert_file: "cert.pem".into(),
            key_file: "key.pem".into(),
            client_ca_file: None,
            client_auth: None,
            reload_interval_seconds: 10,
        }
    }

    #[test]
    fn client_auth_defaults_to_required_with_a_ca() {
        let mut s = settings();
        assert_eq!(s.client_auth(), None);
        s.client_ca_file = Some("ca.pem".into());
        assert_eq!(s.client_auth(), Some(ClientAuth::Required));
        s.client_auth = Some(ClientAuth::Optional);
        assert_eq!(s.client_auth(), Some(ClientAuth::Optional));
        assert!(s.validate().is_ok());
    }

    #[test]
    fn inconsistent_settings_are_named() {
        let mut s = settings();
        s.client_auth = Some(ClientAuth::Required);
        assert!(s.validate().unwrap_err().contains("client_ca_file"));
        let mut s = settings();
        s.reload_interval_seconds = 0;
        assert!(
            s.validate()
                .unwrap_err()
                .contains("reload_interval_seconds")
        );
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings();
        s.cert_file = dir.path().join("nope.pem");
        let err = TlsServer::load(&s).unwrap_err().to_string();
        assert!(
            err.contains("server.tls.cert_file") && err.contains("nope.pem"),
            "{err}"
        );
    }
}
