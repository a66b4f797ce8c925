//! A Cognito JWT taken apart: structure (three base64url segments, a JSON header and payload),
//! the RS256 signature check, and the claims a Cognito ID or access token carries.
//!
//! The structure is parsed here rather than by `jsonwebtoken::decode` so that the issuer can be
//! read before a key is looked up (each pool has its own JWKS) and so that the time claims are
//! judged by the broker's injected clock; `jsonwebtoken` does the signature check.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::{CognitoError, Stage};

/// Longest token accepted; longer ones are refused before any parsing. Cognito's tokens are
/// 1–2 KiB, more with many groups or pre-token-generation claims.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Whether `credential` is shaped like a JWT (`ey…` and exactly two dots), which is how a
/// bearer credential is told apart from an API key (`tbk_…`).
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("ey") && credential.bytes().filter(|b| *b == b'.').count() == 2
}

/// A JWT whose structure is sound, not yet verified.
pub(crate) struct Parsed<'a> {
    /// The header's `kid`.
    pub(crate) kid: String,
    /// The payload's claims.
    pub(crate) claims: CognitoClaims,
    /// `header.payload`, what the signature covers.
    signing_input: &'a str,
    /// The base64url signature.
    signature: &'a str,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

/// An `aud` claim: one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// A single audience, as Cognito writes it.
    One(String),
    /// Several audiences.
    Many(Vec<String>),
}

impl Audience {
    /// Whether `id` is one of the audiences.
    pub fn contains(&self, id: &str) -> bool {
        match self {
            Self::One(aud) => aud == id,
            Self::Many(auds) => auds.iter().any(|aud| aud == id),
        }
    }

    /// Returns the first audience.
    pub fn first(&self) -> Option<&str> {
        match self {
            Self::One(aud) => Some(aud),
            Self::Many(auds) => auds.first().map(String::as_str),
        }
    }
}

/// `email_verified`: a boolean in Cognito's own tokens, a `"true"`/`"false"` string in some
/// federated ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum Flag {
    Bool(bool),
    Text(FlagText),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FlagText {
    True,
    False,
}

/// The claims of a Cognito ID or access token that the broker reads (section 4 of the Cognito
/// reference); others are ignored.
#[derive(Clone, Deserialize)]
pub struct CognitoClaims {
    /// The issuer: `https://cognito-idp.{region}.amazonaws.com/{userPoolId}`.
    pub iss: String,
    /// The user's id (a UUID).
    pub sub: String,
    /// `id` or `access`.
    pub token_use: String,
    /// The app client id (ID tokens).
    #[serde(default)]
    pub aud: Option<Audience>,
    /// The app client id (access tokens).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Expiry, in seconds since the epoch.
    pub exp: i64,
    /// Issue time, in seconds since the epoch.
    #[serde(default)]
    pub iat: Option<i64>,
    /// Not-before time, in seconds since the epoch (Cognito does not set it; others may).
    #[serde(default)]
    pub nbf: Option<i64>,
    /// The user's email (ID tokens, or access tokens a trigger added it to).
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    email_verified: Option<Flag>,
    /// The user's groups.
    #[serde(rename = "cognito:groups", default)]
    pub groups: Vec<String>,
    /// Space-separated scopes (access tokens).
    #[serde(default)]
    pub scope: Option<String>,
}

impl fmt::Debug for CognitoClaims {
    // No email: logs name users by `sub`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CognitoClaims")
            .field("iss", &self.iss)
            .field("sub", &self.sub)
            .field("token_use", &self.token_use)
            .field("client", &self.client())
            .field("exp", &self.exp)
            .field("groups", &self.groups)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl CognitoClaims {
    /// Returns the app client the token was issued to: `aud` for ID tokens, `client_id` for
    /// access tokens.
    pub fn client(&self) -> Option<&str> {
        match self.token_use.as_str() {
            "id" => self.aud.as_ref().and_then(Audience::first),
            _ => self.client_id.as_deref(),
        }
    }

    /// Whether `email_verified` is true (as a boolean or the string `"true"`).
    pub fn email_verified(&self) -> bool {
        matches!(
            self.email_verified,
            Some(Flag::Bool(true) | Flag::Text(FlagText::True))
        )
    }

    /// Returns the scopes.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.as_deref().unwrap_or("").split_ascii_whitespace()
    }
}

/// Takes a token apart without trusting it.
///
/// # Errors
///
/// A [`Stage::Structure`] error for anything that is not a size-limited, three-segment JWT with
/// a JSON header (with a `kid`) and a JSON payload shaped like a Cognito token's; a
/// [`Stage::Signature`] error when the header names an algorithm other than RS256.
pub(crate) fn parse(token: &str) -> Result<Parsed<'_>, CognitoError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(CognitoError::structure("the token is larger than 16 KiB"));
    }
    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(CognitoError::structure(
            "the token is not three base64url segments",
        ));
    };
    if [header, payload, signature]
        .iter()
        .any(|s| !is_base64url(s))
    {
        return Err(CognitoError::structure(
            "the token is not three base64url segments",
        ));
    }
    let header: Header = decode_json(header)
        .ok_or_else(|| CognitoError::structure("the token's header is not base64url json"))?;
    if header.crit.is_some() {
        return Err(CognitoError::structure(
            "the token's header has critical extensions",
        ));
    }
    // The allow-list is RS256 alone: `none` and HS256 (signed with the public key as an HMAC
    // secret) are refused before any key is looked up.
    if header.alg != "RS256" {
        return Err(CognitoError::new(
            Stage::Signature,
            "the token's algorithm is not RS256",
        ));
    }
    let kid = header
        .kid
        .filter(|kid| !kid.is_empty())
        .ok_or_else(|| CognitoError::structure("the token's header has no kid"))?;
    let claims: CognitoClaims = decode_json(payload).ok_or_else(|| {
        CognitoError::structure("the token's payload is not the json of a cognito token")
    })?;
    let signing_input = &token[..token.len() - signature.len() - 1];
    Ok(Parsed {
        kid,
        claims,
        signing_input,
        signature,
    })
}

impl Parsed<'_> {
    /// Checks the RS256 signature with `key`.
    ///
    /// # Errors
    ///
    /// A [`Stage::Signature`] error when it does not verify.
    pub(crate) fn verify_signature(&self, key: &DecodingKey) -> Result<(), CognitoError> {
        match jsonwebtoken::crypto::verify(
            self.signature,
            self.signing_input.as_bytes(),
            key,
            Algorithm::RS256,
        ) {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(CognitoError::new(
                Stage::Signature,
                "the token's signature does not verify",
            )),
        }
    }
}

fn is_base64url(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn decode_json<T: serde::de::DeserializeOwned>(segment: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(json.to_string())
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({
            "sub": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "iss": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Pool",
            "token_use": "access",
            "client_id": "client-1",
            "exp": 2_000_000_000,
            "iat": 1_700_000_000,
            "scope": "aws.cognito.signin.user.admin tokenbroker/introspect",
        })
    }

    #[test]
    fn jwt_shape_is_told_apart_from_api_keys() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(!looks_like_jwt("tbk_abc"));
        assert!(!looks_like_jwt("eyJh.eyJz"));
        assert!(!looks_like_jwt("eyJh.eyJz.c2ln.x"));
    }

    #[test]
    fn well_formed_token_parses() {
        let header = b64(&serde_json::json!({"alg": "RS256", "kid": "k1"}));
        let token = format!("{header}.{}.c2ln", b64(&claims()));
        let parsed = parse(&token).unwrap();
        assert_eq!(parsed.kid, "k1");
        assert_eq!(parsed.claims.client(), Some("client-1"));
        assert_eq!(
            parsed.claims.scopes().collect::<Vec<_>>(),
            ["aws.cognito.signin.user.admin", "tokenbroker/introspect"]
        );
        assert_eq!(parsed.signing_input, &token[..token.len() - 5]);
    }

    #[test]
    fn structural_faults_are_structure_errors() {
        let header = b64(&serde_json::json!({"alg": "RS256", "kid": "k1"}));
        let payload = b64(&claims());
        let no_kid = b64(&serde_json::json!({"alg": "RS256"}));
        let crit = b64(&serde_json::json!({"alg": "RS256", "kid": "k", "crit": ["b64"]}));
        let not_cognito = b64(&serde_json::json!({"sub": "x"}));
        for bad in [
            String::new(),
            "abc".to_owned(),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.c2ln.c2ln"),
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln=="),
            format!("{header}.%%%.c2ln"),
            format!("{header}.bm90IGpzb24.c2ln"),
            format!("{no_kid}.{payload}.c2ln"),
            format!("{crit}.{payload}.c2ln"),
            format!("{header}.{not_cognito}.c2ln"),
            format!("{header}.{payload}.{}", "A".repeat(MAX_TOKEN_BYTES)),
        ] {
            let err = parse(&bad).err().unwrap_or_else(|| panic!("{bad} parsed"));
            assert_eq!(err.stage(), Stage::Structure, "{bad}");
        }
    }

    #[test]
    fn other_algorithms_are_refused_before_the_key_lookup() {
        let payload = b64(&claims());
        for alg in ["none", "HS256", "RS512", "PS256", "ES256", "rs256"] {
            let header = b64(&serde_json::json!({"alg": alg, "kid": "k1"}));
            let err = parse(&format!("{header}.{payload}.c2ln")).err().unwrap();
            assert_eq!(err.stage(), Stage::Signature, "{alg}");
        }
    }

    #[test]
    fn email_verified_accepts_bools_and_strings() {
        let with = |v: serde_json::Value| {
            let mut c = claims();
            c["email_verified"] = v;
            serde_json::from_value::<CognitoClaims>(c)
                .unwrap()
                .email_verified()
        };
        assert!(with(true.into()));
        assert!(with("true".into()));
        assert!(!with(false.into()));
        assert!(!with("false".into()));
        assert!(!with(serde_json::Value::Null));
    }
}
