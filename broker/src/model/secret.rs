//! The broker's own token secrets: minting, parsing and hashing.
//!
//! A secret looks like `tba_<32 hex>_<43 base64url>` (access) or `tbr_…` (refresh). The prefix
//! lets secret scanners recognise a leaked secret; the hex part is the token id's suffix, so a
//! presented secret costs one indexed lookup plus a constant-time comparison of SHA-256 digests;
//! the last part is 256 bits from the operating system's CSPRNG. Stores keep only the digest.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::model::{MAX_SECRET_LEN, TokenId, TokenKind};

const ACCESS_PREFIX: &str = "tba_";
const REFRESH_PREFIX: &str = "tbr_";
const TOKEN_ID_PREFIX: &str = "tok_";

/// A SHA-256 digest of a secret.
pub type SecretDigest = [u8; 32];

/// Returns the SHA-256 digest of `value`.
pub fn sha256(value: &[u8]) -> SecretDigest {
    Sha256::digest(value).into()
}

/// Mints a new token: its id, its secret and the secret's digest.
pub fn mint(kind: TokenKind) -> (TokenId, SecretString, SecretDigest) {
    let id_hex = crate::model::ordered_hex();
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    let prefix = match kind {
        TokenKind::Access => ACCESS_PREFIX,
        TokenKind::Refresh => REFRESH_PREFIX,
    };
    let secret = format!("{prefix}{id_hex}_{}", URL_SAFE_NO_PAD.encode(random));
    let digest = sha256(secret.as_bytes());
    (
        TokenId::from_stored(format!("{TOKEN_ID_PREFIX}{id_hex}")),
        SecretString::from(secret),
        digest,
    )
}

/// A presented secret, split into what it claims to be and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSecret {
    /// The kind its prefix claims.
    pub kind: TokenKind,
    /// The token id it embeds.
    pub id: TokenId,
    /// Its SHA-256 digest, to compare with the stored one.
    pub digest: SecretDigest,
}

/// Parses a presented secret. Returns `None` for anything that is not shaped like one of ours,
/// which callers treat exactly like an unknown token.
pub fn parse(secret: &SecretString) -> Option<ParsedSecret> {
    let value = secret.expose_secret();
    if value.len() > MAX_SECRET_LEN {
        return None;
    }
    let (kind, rest) = if let Some(rest) = value.strip_prefix(ACCESS_PREFIX) {
        (TokenKind::Access, rest)
    } else if let Some(rest) = value.strip_prefix(REFRESH_PREFIX) {
        (TokenKind::Refresh, rest)
    } else {
        return None;
    };
    let (id_hex, random) = rest.split_once('_')?;
    if id_hex.len() != 32 || !id_hex.bytes().all(|b| b.is_ascii_hexdigit()) || random.is_empty() {
        return None;
    }
    Some(ParsedSecret {
        kind,
        id: TokenId::from_stored(format!("{TOKEN_ID_PREFIX}{id_hex}")),
        digest: sha256(value.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_secret_parses_back_to_its_id_and_digest() {
        let (id, secret, digest) = mint(TokenKind::Refresh);
        let parsed = parse(&secret).expect("a minted secret parses");
        assert_eq!(parsed.kind, TokenKind::Refresh);
        assert_eq!(parsed.id, id);
        assert_eq!(parsed.digest, digest);
        assert!(secret.expose_secret().starts_with("tbr_"));
        // 256 bits of randomness: 43 base64url characters after the id.
        let random = &secret.expose_secret()["tbr_".len() + 32 + 1..];
        assert_eq!(random.len(), 43);
    }

    #[test]
    fn garbage_does_not_parse() {
        for bad in [
            "",
            "tba_",
            "tba_xyz_abc",
            "fnEabc",
            "eyJhbGciOi.x.y",
            "tbx_0_1",
        ] {
            assert!(parse(&SecretString::from(bad)).is_none(), "{bad:?} parsed");
        }
        let long = format!("tba_{}_{}", "0".repeat(32), "a".repeat(600));
        assert!(parse(&SecretString::from(long)).is_none());
    }
}
