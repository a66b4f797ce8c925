//! `[http]`: the HTTP listener (RFC 7662 introspection, RFC 7009 revocation, forward auth).

use std::net::SocketAddr;

use serde::Deserialize;

use crate::model::ConfigError;

/// The largest `http.max_body_bytes` accepted: a form with one token needs a few hundred bytes.
pub const MAX_BODY_BYTES_LIMIT: usize = 1 << 20;

/// `[http]`: the HTTP listener, off unless `listen` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on (port 0 picks a free port); unset, there is no HTTP listener.
    pub listen: Option<SocketAddr>,
    /// The largest request body accepted, in bytes; a larger one gets 413.
    pub max_body_bytes: usize,
    /// The header in which a gateway calling `/oauth2/authz` sends its own API key (the
    /// request's `authorization` header is the end user's token).
    pub authz_key_header: String,
    /// How long an HTTP/1.1 client may take to send a request's headers.
    pub header_read_timeout_seconds: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: None,
            max_body_bytes: 4096,
            authz_key_header: "x-tokenbroker-key".into(),
            header_read_timeout_seconds: 10,
        }
    }
}

impl HttpSettings {
    /// Checks the section on its own (its address against the gRPC one is checked by the
    /// settings load).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_BYTES_LIMIT {
            return Err(ConfigError(format!(
                "http.max_body_bytes must be between 1 and {MAX_BODY_BYTES_LIMIT}"
            )));
        }
        if self.header_read_timeout_seconds == 0 {
            return Err(ConfigError(
                "http.header_read_timeout_seconds must be at least 1".into(),
            ));
        }
        let header = &self.authz_key_header;
        let valid = axum::http::HeaderName::from_bytes(header.as_bytes())
            .is_ok_and(|name| name.as_str() == header.as_str());
        if !valid {
            return Err(ConfigError(format!(
                "http.authz_key_header {header:?} is not a lowercase HTTP header name"
            )));
        }
        if header == "authorization" {
            return Err(ConfigError(
                "http.authz_key_header cannot be authorization: that header carries the end \
                 user's token"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_off_and_valid() {
        let s = HttpSettings::default();
        assert_eq!(s.listen, None);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn bad_values_are_named() {
        type Change = fn(&mut HttpSettings);
        let cases: [(Change, &str); 5] = [
            (|s| s.max_body_bytes = 0, "max_body_bytes"),
            (
                |s| s.max_body_bytes = MAX_BODY_BYTES_LIMIT + 1,
                "max_body_bytes",
            ),
            (|s| s.header_read_timeout_seconds = 0, "header_read_timeout"),
            (|s| s.authz_key_header = "X-Key".into(), "lowercase"),
            (|s| s.authz_key_header = "authorization".into(), "end user"),
        ];
        for (change, expected) in cases {
            let mut s = HttpSettings::default();
            change(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
