//! The broker's secret parser (`model::secret::parse`) on arbitrary text.
//!
//! Besides "never panics": a secret that parses is at most `MAX_SECRET_LEN` bytes, its kind is
//! the one its prefix names, its token id is `tok_` and the 32 hex digits it embeds, and its
//! digest is the SHA-256 of the whole secret.

#![no_main]

use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;
use tokenbroker::model::{
    MAX_SECRET_LEN, TokenKind,
    secret::{parse, sha256},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(parsed) = parse(&SecretString::from(text)) else {
        return;
    };
    assert!(text.len() <= MAX_SECRET_LEN);
    let prefix = match parsed.kind {
        TokenKind::Access => "tba_",
        TokenKind::Refresh => "tbr_",
    };
    assert!(
        text.starts_with(prefix),
        "kind {:?} from {text:?}",
        parsed.kind
    );
    assert_eq!(parsed.id.as_str(), format!("tok_{}", &text[4..36]));
    assert_eq!(parsed.digest, sha256(text.as_bytes()));
});
