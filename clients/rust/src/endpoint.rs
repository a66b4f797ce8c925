//! Where a broker is and how to reach it: the one place a channel to a broker is built.
//!
//! [`BrokerEndpoint`] parses the address (`http://` is plaintext, `https://` is TLS), sets the
//! connect timeout, and sets up TLS: rustls with ring and, unless [`TlsOptions`] names a CA, the
//! platform's root certificates (`SSL_CERT_FILE` names a bundle with a private CA), plus a
//! client certificate for mTLS. Every caller (the trigger, the admin CLI, tests) connects
//! through it, so they agree on what an endpoint means and on how a bad one is reported.

use std::{fmt, time::Duration};

use tonic::transport::{Channel, Endpoint};

use crate::{ClientError, ClientResult};

/// How long opening the TCP connection may take unless
/// [`BrokerEndpoint::with_connect_timeout`] says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an endpoint cannot be used. Every variant maps to an `InvalidArgument`
/// [`ClientError`] with the same message; callers with their own wording (the CLI names its
/// flags) match on the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The address does not parse as a URI.
    #[error("the broker endpoint is not a valid URI")]
    InvalidUri,
    /// The scheme is neither `http` nor `https`.
    #[error("the broker endpoint must start with http:// or https://")]
    UnsupportedScheme,
    /// An `https://` endpoint, in a build without the `tls` feature.
    #[error("an https:// endpoint needs tokenbroker-client's `tls` feature")]
    TlsUnavailable,
    /// TLS options were given for an `http://` endpoint.
    #[error("a TLS endpoint must start with https://")]
    TlsNeedsHttps,
    /// rustls refused the TLS settings: a malformed PEM, no usable root certificate, no host
    /// name to verify. The text is rustls's or tonic's; it never holds key material.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

impl From<EndpointError> for ClientError {
    fn from(err: EndpointError) -> Self {
        Self::config(err.to_string())
    }
}

/// A parsed broker address with its connection settings, ready to connect.
#[derive(Clone)]
pub struct BrokerEndpoint {
    endpoint: Endpoint,
    https: bool,
    /// Whether [`BrokerEndpoint::with_tls`] has set up TLS; an `https://` endpoint without it
    /// gets the defaults when it connects.
    tls_ready: bool,
}

impl fmt::Debug for BrokerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerEndpoint")
            .field("uri", self.endpoint.uri())
            .field("https", &self.https)
            .finish_non_exhaustive()
    }
}

impl BrokerEndpoint {
    /// Parses `uri`: `http://HOST:PORT` (plaintext) or `https://HOST[:PORT]` (TLS, with the
    /// platform's roots unless [`BrokerEndpoint::with_tls`] says otherwise).
    ///
    /// # Errors
    ///
    /// [`EndpointError::InvalidUri`], [`EndpointError::UnsupportedScheme`], or
    /// [`EndpointError::TlsUnavailable`] for `https://` without the `tls` feature.
    pub fn parse(uri: &str) -> Result<Self, EndpointError> {
        let endpoint = Endpoint::from_shared(uri.to_owned())
            .map_err(|_| EndpointError::InvalidUri)?
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let https = match endpoint.uri().scheme_str() {
            Some("http") => false,
            Some("https") if cfg!(feature = "tls") => true,
            Some("https") => return Err(EndpointError::TlsUnavailable),
            _ => return Err(EndpointError::UnsupportedScheme),
        };
        Ok(Self {
            endpoint,
            https,
            tls_ready: false,
        })
    }

    /// Whether the endpoint is `https://`.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// Bounds opening the TCP connection (not the calls: those have the client's deadline).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.endpoint = self.endpoint.connect_timeout(timeout);
        self
    }

    /// Sets up TLS with `tls` (a CA to trust, a client certificate) instead of the defaults.
    /// The settings are checked here, so a malformed PEM fails before anything connects.
    ///
    /// # Errors
    ///
    /// [`EndpointError::TlsNeedsHttps`] for an `http://` endpoint, [`EndpointError::Tls`] when
    /// rustls refuses the settings.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: &TlsOptions) -> Result<Self, EndpointError> {
        if !self.https {
            return Err(EndpointError::TlsNeedsHttps);
        }
        self.endpoint = self
            .endpoint
            .tls_config(tls.config())
            .map_err(|err| EndpointError::Tls(err.to_string()))?;
        self.tls_ready = true;
        Ok(self)
    }

    /// The tonic endpoint, with TLS set up for `https://` (the defaults unless
    /// [`BrokerEndpoint::with_tls`] ran).
    fn finish(self) -> Result<Endpoint, EndpointError> {
        if !self.https || self.tls_ready {
            return Ok(self.endpoint);
        }
        self.with_default_tls()
    }

    #[cfg(feature = "tls")]
    fn with_default_tls(self) -> Result<Endpoint, EndpointError> {
        Ok(self.with_tls(&TlsOptions::new())?.endpoint)
    }

    #[cfg(not(feature = "tls"))]
    fn with_default_tls(self) -> Result<Endpoint, EndpointError> {
        // `parse` refuses https:// without the feature, so this is not reached.
        Err(EndpointError::TlsUnavailable)
    }

    /// Opens the connection and waits for it.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` when the default TLS settings cannot be set up (no usable root
    /// certificate), `Unavailable` when the broker cannot be reached or the handshake fails.
    pub async fn connect(self) -> ClientResult<Channel> {
        Ok(self.finish()?.connect().await?)
    }

    /// Returns a channel that connects on first use (for cold starts that should not wait).
    ///
    /// # Errors
    ///
    /// [`EndpointError::Tls`] when the default TLS settings cannot be set up.
    pub fn connect_lazy(self) -> Result<Channel, EndpointError> {
        Ok(self.finish()?.connect_lazy())
    }
}

/// How to reach an `https://` broker beyond the defaults: which CA to trust, which client
/// certificate to present (mTLS), which name to expect. The key never appears in `Debug`.
#[cfg(feature = "tls")]
#[derive(Clone, Default)]
pub struct TlsOptions {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, secrecy::SecretSlice<u8>)>,
    domain_name: Option<String>,
}

#[cfg(feature = "tls")]
impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("custom_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

#[cfg(feature = "tls")]
impl TlsOptions {
    /// Trusts the platform's root certificates and presents no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificates in `pem` (and not the platform's roots).
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents the client certificate chain `cert_pem` with its private key `key_pem`.
    pub fn with_identity_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: secrecy::SecretSlice<u8>,
    ) -> Self {
        self.identity = Some((cert_pem.into(), key_pem));
        self
    }

    /// Expects the server certificate to name `name` instead of the endpoint's host.
    pub fn with_domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    fn config(&self) -> tonic::transport::ClientTlsConfig {
        use secrecy::ExposeSecret as _;
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key.expose_secret()));
        }
        if let Some(name) = &self.domain_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_by_scheme() {
        assert!(
            !BrokerEndpoint::parse("http://127.0.0.1:1")
                .unwrap()
                .is_https()
        );
        assert_eq!(
            BrokerEndpoint::parse("ftp://127.0.0.1:1").unwrap_err(),
            EndpointError::UnsupportedScheme
        );
        assert_eq!(
            BrokerEndpoint::parse("not a uri").unwrap_err(),
            EndpointError::InvalidUri
        );
        let https = BrokerEndpoint::parse("https://broker.internal");
        if cfg!(feature = "tls") {
            assert!(https.unwrap().is_https());
        } else {
            assert_eq!(https.unwrap_err(), EndpointError::TlsUnavailable);
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_options_need_https_and_are_checked_before_connecting() {
        let plaintext = BrokerEndpoint::parse("http://127.0.0.1:1").unwrap();
        assert_eq!(
            plaintext.with_tls(&TlsOptions::new()).unwrap_err(),
            EndpointError::TlsNeedsHttps
        );
        let https = BrokerEndpoint::parse("https://127.0.0.1:1").unwrap();
        let bad_key = TlsOptions::new().with_identity_pem(
            "",
            secrecy::SecretSlice::from(b"not a private key".to_vec()),
        );
        let err = https.with_tls(&bad_key).unwrap_err();
        assert!(matches!(err, EndpointError::Tls(_)), "{err:?}");
        assert!(err.to_string().starts_with("cannot set up TLS: "), "{err}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_options_never_show_the_key_in_debug() {
        let tls = TlsOptions::new().with_identity_pem(
            "cert",
            secrecy::SecretSlice::from(b"PRIVATE-KEY-BYTES".to_vec()),
        );
        let shown = format!("{tls:?}");
        assert!(shown.contains("client_certificate: true"), "{shown}");
        assert!(
            !shown.contains("PRIVATE") && !shown.contains("80, 82"),
            "{shown}"
        );
    }
}
