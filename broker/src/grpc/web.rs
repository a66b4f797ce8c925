//! grpc-web on the gRPC listener, for browsers: the grpc-web translation and the CORS answer in
//! front of it, both off unless `server.grpc_web = true`.
//!
//! The two layers wrap the whole router, outside every per-service layer, so a grpc-web call is
//! translated into a native gRPC call before it reaches [`super::Traced`],
//! [`super::metered::MeteredService`], [`super::SizeLimited`], the in-flight limits and the
//! adapter: the same spans, metrics, limits and audit events as a call over HTTP/2, by
//! construction rather than by a second copy of that code. CORS is the outermost layer, so it
//! answers a browser's preflight (`OPTIONS`) itself, before grpc-web would refuse the method.
//!
//! Rejected alternatives: a separate listener for grpc-web (a second port, a second set of
//! connection caps and TLS files for the same service), and a CORS answer of `*` (it would let
//! any page spend a user's pasted or stored key; the allow-list names the apps' origins).

use std::time::Duration;

use serde::Deserialize;
use tonic::codegen::http::{HeaderName, HeaderValue, Method, uri::Authority};
use tonic_web::GrpcWebLayer;
use tower::util::{Either, option_layer};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::model::ConfigError;

/// The request headers a grpc-web page may send: the content type and grpc-web's own, the
/// deadline, and the API key (`authorization`). Anything else is refused at the preflight.
pub const ALLOWED_HEADERS: [&str; 5] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "authorization",
];

/// The response headers a page's script may read: a call's outcome, and its details (the
/// `google.rpc.RetryInfo` of a throttled call). Browsers hide every other header from scripts.
pub const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// `[server.cors]`: which web pages may call the broker over grpc-web.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsSettings {
    /// The origins (`https://app.example.com`, `http://localhost:5173`) whose pages may call;
    /// empty answers no preflight (same-origin pages, behind a proxy, and non-browser clients
    /// need none).
    pub allowed_origins: Vec<String>,
}

impl CorsSettings {
    /// Checks every origin: a lowercase `http` or `https` origin with a host (and maybe a port),
    /// no path, no wildcard; `grpc_web` must be on for origins to mean anything.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the origin and what is wrong with it.
    pub fn validate(&self, grpc_web: bool) -> Result<(), ConfigError> {
        if !self.allowed_origins.is_empty() && !grpc_web {
            return Err(ConfigError(
                "server.cors.allowed_origins is set but server.grpc_web is false: CORS only \
                 applies to grpc-web; set server.grpc_web = true"
                    .into(),
            ));
        }
        for origin in &self.allowed_origins {
            check_origin(origin).map_err(|why| {
                ConfigError(format!(
                    "server.cors.allowed_origins: {origin:?} is not an origin: {why} (write it \
                     as a browser sends it, such as \"https://app.example.com\" or \
                     \"http://localhost:5173\")"
                ))
            })?;
        }
        Ok(())
    }
}

/// Why `origin` is not a serialized web origin (scheme, `://`, host, optional port).
fn check_origin(origin: &str) -> Result<(), &'static str> {
    if origin.contains('*') {
        return Err("wildcards are not allowed; list each origin");
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Err("it lacks a scheme (http:// or https://)");
    };
    if scheme != "http" && scheme != "https" {
        return Err("the scheme must be http or https");
    }
    if authority.is_empty() {
        return Err("it has no host");
    }
    if authority.contains(['/', '?', '#']) {
        return Err("an origin has no path, query or fragment (no trailing slash either)");
    }
    if authority.contains('@') {
        return Err("an origin has no user name or password");
    }
    if origin.bytes().any(|b| b.is_ascii_uppercase()) {
        // Browsers send the scheme and host in lowercase, and origins are compared exactly.
        return Err("it must be lowercase, as browsers send it");
    }
    let authority: Authority = authority
        .parse()
        .map_err(|_| "the host or port is invalid")?;
    if authority.host().is_empty() {
        return Err("it has no host");
    }
    // `Authority` takes any text after the host's colon; an origin's port is a number.
    let port = &authority.as_str()[authority.host().len()..];
    if !port.is_empty()
        && port
            .strip_prefix(':')
            .is_none_or(|port| port.parse::<u16>().is_err())
    {
        return Err("the port must be a number up to 65535");
    }
    Ok(())
}

/// The CORS layer of `allowed_origins`, or none when the list is empty.
///
/// It allows `POST` (the only grpc-web method) with [`ALLOWED_HEADERS`], exposes
/// [`EXPOSED_HEADERS`], and does not allow credentialed requests: the broker reads no cookie,
/// and the API key travels in `authorization`, which a page sends without `credentials:
/// "include"`. An origin not on the list gets an answer with no `access-control-allow-origin`,
/// which the browser treats as a refusal.
fn cors_layer(settings: &CorsSettings) -> Option<CorsLayer> {
    if settings.allowed_origins.is_empty() {
        return None;
    }
    let origins = settings
        .allowed_origins
        .iter()
        .map(|origin| HeaderValue::from_str(origin).expect("validated origins are header values"));
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::POST])
            .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
            .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

/// The CORS layer, outermost; present when grpc-web is on and origins are listed.
pub type CorsOuter = Either<CorsLayer, tower::layer::util::Identity>;
/// The grpc-web translation; present when grpc-web is on.
pub type GrpcWebInner = Either<GrpcWebLayer, tower::layer::util::Identity>;

/// The layers the listener's router gets: `(cors, grpc_web)`, to be applied in that order
/// (the first outermost). `cors` is `Some` when grpc-web is on; with `None` both are no-ops.
pub fn layers(cors: Option<&CorsSettings>) -> (CorsOuter, GrpcWebInner) {
    let Some(cors) = cors else {
        return (option_layer(None), option_layer(None));
    };
    (
        option_layer(cors_layer(cors)),
        option_layer(Some(GrpcWebLayer::new())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(origins: &[&str]) -> CorsSettings {
        CorsSettings {
            allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
        }
    }

    #[test]
    fn full_origins_are_accepted() {
        let ok = settings(&[
            "https://app.example.com",
            "http://localhost:5173",
            "http://127.0.0.1:8080",
            "https://[::1]:8443",
        ]);
        ok.validate(true).unwrap();
    }

    #[test]
    fn wildcards_paths_and_bare_hosts_are_refused() {
        for bad in [
            "*",
            "https://*.example.com",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "ftp://app.example.com",
            "https://",
            "https://user@app.example.com",
            "https://App.Example.com",
            "https://app.example.com:notaport",
            "null",
        ] {
            match settings(&[bad]).validate(true) {
                Err(err) => assert!(
                    err.0.contains("server.cors.allowed_origins"),
                    "{bad}: {err}"
                ),
                Ok(()) => panic!("{bad} was accepted"),
            }
        }
    }

    #[test]
    fn origins_without_grpc_web_are_refused() {
        let err = settings(&["https://app.example.com"])
            .validate(false)
            .unwrap_err();
        assert!(err.0.contains("server.grpc_web"), "{err}");
        settings(&[]).validate(false).unwrap();
    }
}
