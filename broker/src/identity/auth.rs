//! Caller authentication: API keys or Cognito access tokens presented as
//! `authorization: Bearer <credential>`.
//!
//! Keys are configured by name, roles and the SHA-256 of the key, so the configuration holds
//! no usable secret. A presented key is hashed and looked up; because keys carry at least 256
//! bits of entropy, a hash-table lookup on the digest leaks nothing useful through timing.
//!
//! Over mTLS, a verified client certificate whose subject is configured in `[[cert_callers]]`
//! is a caller too, when the call carries no `authorization` header (see [`Authenticator::certificate_caller`]).
//!
//! A credential shaped like a JWT (`ey…` with two dots) is verified as a Cognito access token
//! instead; its roles come from the pool's group and scope mappings. Where a pool allows direct
//! exchange, one of its ID tokens is a caller too, without roles, that may only exchange
//! itself (see [`crate::identity::Caller::direct_exchange`]). Verifying may fetch the
//! pool's keys, so authentication is async and runs at the top of each gRPC method, never in
//! a (synchronous) tonic interceptor.

use std::{collections::HashMap, fmt, sync::Arc};

use secrecy::SecretString;
use serde::Deserialize;

use super::{AuthError, AuthResult, Caller, Role};
use crate::{
    identity::cognito::{CognitoVerifier, looks_like_jwt},
    identity::subject::DistinguishedName,
    model::secret::{SecretDigest, sha256},
};

/// An API key as configured: name, roles, and the hex SHA-256 of the key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The caller's name.
    pub name: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// Lowercase or uppercase hex of the key's SHA-256 (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
}

/// A client certificate subject that authenticates as a caller (mTLS), like an API key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertCallerConfig {
    /// The caller's name.
    pub name: String,
    /// The certificate subject, RFC 4514 style, most specific first: `CN=billing,O=Example`
    /// (see [`crate::identity::subject`] for the matching rules).
    pub subject: String,
    /// Its roles.
    pub roles: Vec<Role>,
}

/// Maps presented credentials to callers.
pub struct Authenticator {
    /// Looked up on every call: hashed with foldhash (randomly seeded), not SipHash.
    keys: HashMap<SecretDigest, Arc<Caller>, foldhash::fast::RandomState>,
    cognito: Option<Arc<CognitoVerifier>>,
    certificates: HashMap<DistinguishedName, Arc<Caller>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_keys", &self.keys.len())
            .field("cognito", &self.cognito.is_some())
            .field("cert_callers", &self.certificates.len())
            .finish()
    }
}

impl Authenticator {
    /// Builds the key table.
    ///
    /// # Errors
    ///
    /// A message naming the key whose digest is not 64 hex digits, whose name is empty, or
    /// whose digest is configured twice.
    pub fn new(keys: &[ApiKeyConfig]) -> Result<Self, String> {
        let mut table = HashMap::default();
        for key in keys {
            if key.name.trim().is_empty() {
                return Err("an api key has an empty name".into());
            }
            let digest: SecretDigest = hex::decode(key.sha256.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| {
                    format!(
                        "api key {:?}: sha256 must be 64 hex digits (the SHA-256 of the key)",
                        key.name
                    )
                })?;
            let caller = Arc::new(Caller::with_roles(key.name.clone(), key.roles.clone()));
            if table.insert(digest, caller).is_some() {
                return Err(format!(
                    "api key {:?}: the same key is configured twice",
                    key.name
                ));
            }
        }
        Ok(Self {
            keys: table,
            cognito: None,
            certificates: HashMap::new(),
        })
    }

    /// Also accepts verified client certificates whose subject is one of `entries`.
    ///
    /// # Errors
    ///
    /// A message naming the entry whose name is empty, whose subject does not parse, or whose
    /// subject is configured twice.
    pub fn with_cert_callers(mut self, entries: &[CertCallerConfig]) -> Result<Self, String> {
        for entry in entries {
            if entry.name.trim().is_empty() {
                return Err("a cert_callers entry has an empty name".into());
            }
            let subject = DistinguishedName::parse(&entry.subject)
                .map_err(|err| format!("cert_callers {:?}: subject: {err}", entry.name))?;
            let caller = Arc::new(Caller::with_roles(entry.name.clone(), entry.roles.clone()));
            if self.certificates.insert(subject, caller).is_some() {
                return Err(format!(
                    "cert_callers {:?}: the same subject is configured twice",
                    entry.name
                ));
            }
        }
        Ok(self)
    }

    /// The caller a verified client certificate (DER, the end-entity one) maps to, if its
    /// subject is configured; otherwise the client is anonymous.
    ///
    /// Only consulted when the call has no `authorization` header: a bearer credential, when
    /// present, decides alone.
    pub fn certificate_caller(&self, der: &[u8]) -> Option<Arc<Caller>> {
        if self.certificates.is_empty() {
            return None;
        }
        match DistinguishedName::from_certificate(der) {
            Ok(subject) => {
                let caller = self.certificates.get(&subject).cloned();
                if caller.is_none() {
                    tracing::debug!(%subject, "client certificate subject is not in cert_callers");
                }
                caller
            }
            Err(err) => {
                tracing::debug!(error = %err, "cannot read the client certificate's subject");
                None
            }
        }
    }

    /// Also accepts Cognito tokens (access tokens; ID tokens where direct exchange is on),
    /// verified by `verifier`.
    pub fn with_cognito(mut self, verifier: Arc<CognitoVerifier>) -> Self {
        self.cognito = Some(verifier);
        self
    }

    /// Authenticates the value of the `authorization` header, if any.
    ///
    /// No header means an anonymous caller (`Ok(None)`): some calls need none. A header that
    /// is present but not a known bearer key is an error even where none is needed, so a
    /// misconfigured client learns of it at once.
    ///
    /// A credential shaped like a JWT is verified as a Cognito access token (or, for a pool with
    /// direct exchange, an ID token); one that verifies is a caller even when none of its
    /// groups or scopes maps to a role.
    ///
    /// # Errors
    ///
    /// `Unauthenticated` for a malformed header, an unknown key, or a Cognito token that does
    /// not verify (or while no pool is configured); `Unavailable` when the token's pool keys
    /// cannot be fetched. The message never repeats the credential.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> AuthResult<Option<Arc<Caller>>> {
        let Some(header) = authorization else {
            return Ok(None);
        };
        let credential = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, credential)| credential.trim())
            .filter(|credential| !credential.is_empty())
            .ok_or(AuthError::Unauthenticated(
                "the authorization header must be `Bearer <api key>`",
            ))?;
        if looks_like_jwt(credential) {
            let verifier = self.cognito.as_ref().ok_or(AuthError::Unauthenticated(
                "cognito tokens are not accepted: no user pool is configured",
            ))?;
            let token = SecretString::from(credential.to_owned());
            return Ok(Some(Arc::new(verifier.caller(&token).await?)));
        }
        self.api_key(credential).map(Some)
    }

    /// Authenticates a bare API key (no scheme, never a Cognito token): the HTTP adapter's
    /// Basic credentials and its gateway header.
    ///
    /// # Errors
    ///
    /// [`AuthError::Unauthenticated`] for a key that is not configured; the message never
    /// repeats the key.
    pub fn api_key(&self, key: &str) -> AuthResult<Arc<Caller>> {
        self.keys
            .get(&sha256(key.as_bytes()))
            .cloned()
            .ok_or(AuthError::Unauthenticated("unknown api key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::require;

    fn authenticator() -> Authenticator {
        Authenticator::new(&[ApiKeyConfig {
            name: "ops".into(),
            roles: vec![Role::Admin],
            sha256: hex::encode(sha256(b"tbk_secret")),
        }])
        .unwrap()
    }

    #[tokio::test]
    async fn known_key_authenticates_as_its_caller() {
        let caller = authenticator()
            .authenticate(Some("Bearer tbk_secret"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(caller.name, "ops");
        assert!(caller.has_any(&[Role::Admin]));
    }

    #[tokio::test]
    async fn missing_header_is_anonymous_and_bad_header_is_rejected() {
        let auth = authenticator();
        assert!(auth.authenticate(None).await.unwrap().is_none());
        for bad in [
            "tbk_secret",
            "Basic tbk_secret",
            "Bearer ",
            "Bearer tbk_other",
            "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
        ] {
            let err = auth.authenticate(Some(bad)).await.unwrap_err();
            assert!(matches!(err, AuthError::Unauthenticated(_)), "{bad}");
            assert!(!err.to_string().contains("tbk_"), "error echoes the key");
        }
    }

    #[test]
    fn role_checks_distinguish_anonymous_from_forbidden() {
        let trigger = Caller::with_roles("t", vec![Role::Trigger]);
        assert!(matches!(
            require(None, &[Role::Admin]),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            require(Some(&trigger), &[Role::Admin]),
            Err(AuthError::PermissionDenied(_))
        ));
        assert!(require(Some(&trigger), &[Role::Trigger, Role::Admin]).is_ok());
    }

    #[test]
    fn malformed_digest_is_a_config_error() {
        let err = Authenticator::new(&[ApiKeyConfig {
            name: "x".into(),
            roles: vec![],
            sha256: "abc".into(),
        }])
        .unwrap_err();
        assert!(err.contains("64 hex digits"));
    }
}
