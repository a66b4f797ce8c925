//! Token secrets: the layout the double mints and decodes (`docs/design.md` "Fauna over HTTP ›
//! Token secrets").

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;

/// Decodes a token secret: base64url without padding of `0x7E 0x71 | token id (i64 BE)
/// | database id (i64 BE) | 20 random bytes`, 51 characters starting `fnE`. A scope suffix
/// after `:` is ignored, as for real tokens. Returns (token id, database id, the unscoped
/// secret).
pub(super) fn decode_token_secret(secret: &str) -> Option<(i64, i64, &str)> {
    let secret = secret.split(':').next()?;
    if secret.len() != 51 {
        return None;
    }
    let raw = URL_SAFE_NO_PAD.decode(secret).ok()?;
    if raw.len() != 38 || raw[0] != 0x7E || raw[1] != 0x71 {
        return None;
    }
    let id = i64::from_be_bytes(raw[2..10].try_into().ok()?);
    let database = i64::from_be_bytes(raw[10..18].try_into().ok()?);
    Some((id, database, secret))
}

/// Mints a token secret in that layout.
pub(super) fn mint_secret(token_id: i64, database_id: i64) -> String {
    let mut raw = [0u8; 38];
    raw[0] = 0x7E;
    raw[1] = 0x71;
    raw[2..10].copy_from_slice(&token_id.to_be_bytes());
    raw[10..18].copy_from_slice(&database_id.to_be_bytes());
    rand::rng().fill_bytes(&mut raw[18..]);
    URL_SAFE_NO_PAD.encode(raw)
}
