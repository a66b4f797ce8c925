//! The connection: the one channel every call of a run uses, built by tokenbroker-client's
//! [`BrokerEndpoint`] from `--endpoint`, `--timeout` and the TLS flags. What is the CLI's own is
//! the flags: reading the PEM files they name, and wording each error after the flag at fault.

use std::{path::Path, time::Duration};

use secrecy::SecretSlice;
use tokenbroker_client::{BrokerEndpoint, Client, EndpointError, TlsOptions};

use crate::{Args, Exit, Failure};

/// Connects to the broker within `timeout` and returns a client whose calls have that deadline
/// (and no credential yet).
pub(crate) async fn connect(args: &Args, timeout: Duration) -> Result<Client, Failure> {
    let endpoint = args.endpoint.as_str();
    let mut broker = BrokerEndpoint::parse(endpoint)
        .map_err(|err| match err {
            EndpointError::InvalidUri => {
                Failure::usage(format!("--endpoint {endpoint:?} is not a valid URL"))
            }
            EndpointError::UnsupportedScheme => Failure::usage(format!(
                "--endpoint {endpoint:?} must start with http:// or https://"
            )),
            other => Failure::usage(other.to_string()),
        })?
        .with_connect_timeout(timeout);
    if broker.is_https() {
        // The files are read only for an https:// endpoint, as the flags apply only there.
        broker = broker
            .with_tls(&tls_options(args)?)
            .map_err(|err| Failure::usage(err.to_string()))?;
    } else if args.ca_file.is_some() || args.cert_file.is_some() {
        return Err(Failure::usage(
            "--ca-file, --cert-file and --key-file need an https:// endpoint",
        ));
    }
    // The connect timeout bounds opening the TCP connection; this bounds all of it, the
    // handshakes included.
    match tokio::time::timeout(timeout, broker.connect()).await {
        Ok(Ok(channel)) => Ok(Client::from_channel(channel).with_timeout(timeout)),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(Failure::new(
            Exit::Unavailable,
            "DEADLINE_EXCEEDED",
            format!("no connection to {endpoint} within {}s", timeout.as_secs()),
        )),
    }
}

/// TLS for an https:// endpoint: the CA to trust (the platform's roots by default) and the
/// client certificate to present, if any.
fn tls_options(args: &Args) -> Result<TlsOptions, Failure> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|err| Failure::usage(format!("cannot read {flag} {}: {err}", path.display())))
    };
    // Checked here: clap's `requires` misjudges global flags given before the subcommand.
    if args.cert_file.is_some() != args.key_file.is_some() {
        return Err(Failure::usage(
            "--cert-file and --key-file go together (the client certificate and its key)",
        ));
    }
    let mut tls = TlsOptions::new();
    if let Some(path) = &args.ca_file {
        tls = tls.with_ca_pem(read("--ca-file", path)?);
    }
    if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
        // Zeroized when the options are dropped, once the TLS settings are built.
        let key = SecretSlice::from(read("--key-file", key)?);
        tls = tls.with_identity_pem(read("--cert-file", cert)?, key);
    }
    Ok(tls)
}
