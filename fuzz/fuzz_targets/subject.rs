//! The certificate subject parsers: RFC 4514 strings and the DER walk over a certificate.
//!
//! The input is tried both ways: as a DER certificate, and (when it is UTF-8) as the string of
//! a `[[cert_callers]]` entry. Besides "never panics": every name either way displays as an
//! RFC 4514 string that parses back to the same name, except the empty name (a certificate
//! without a subject), whose empty string `parse` refuses, so that no configured subject
//! equals it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenbroker::identity::subject::DistinguishedName;

fn round_trips(name: &DistinguishedName) {
    let text = name.to_string();
    if text.is_empty() {
        assert!(DistinguishedName::parse(&text).is_err());
        return;
    }
    match DistinguishedName::parse(&text) {
        Ok(again) => assert_eq!(&again, name, "{text:?} reads back differently"),
        Err(err) => panic!("{text:?}, displayed from {name:?}, does not parse: {err}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(name) = DistinguishedName::from_certificate(data) {
        round_trips(&name);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(name) = DistinguishedName::parse(text)
    {
        round_trips(&name);
    }
});
