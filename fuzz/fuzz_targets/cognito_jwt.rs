//! The Cognito JWT structure and claims parser, on arbitrary tokens.
//!
//! An input that starts with `{` is a header and a payload (JSON, split at the first newline)
//! that the target base64url-encodes into a token, so that the fuzzer reaches the claims
//! without having to find base64 of JSON itself; any other input is the token as presented.
//! Besides "never panics": a token that parses is within `MAX_TOKEN_BYTES`, names a `kid`, and
//! its claims' accessors answer.

#![no_main]

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use libfuzzer_sys::fuzz_target;
use tokenbroker::identity::cognito::{MAX_TOKEN_BYTES, looks_like_jwt, parse_unverified};

fuzz_target!(|data: &[u8]| {
    let token = if data.first() == Some(&b'{') {
        let (header, payload) = data
            .iter()
            .position(|&b| b == b'\n')
            .map_or((data, &[][..]), |at| (&data[..at], &data[at + 1..]));
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        )
    } else {
        match std::str::from_utf8(data) {
            Ok(token) => token.to_owned(),
            Err(_) => return,
        }
    };
    std::hint::black_box(looks_like_jwt(&token));
    let Ok((kid, claims)) = parse_unverified(&token) else {
        return;
    };
    assert!(token.len() <= MAX_TOKEN_BYTES);
    assert!(!kid.is_empty());
    std::hint::black_box((
        claims.client(),
        claims.email_verified(),
        claims.scopes().count(),
        format!("{claims:?}"),
    ));
});
