//! The Fauna response decoder: an arbitrary HTTP status and body, classified and decoded as the
//! store reads an answer.
//!
//! The first two bytes are the status (big-endian, folded onto 100–599), the rest the body.
//! Besides "never panics": the class follows the status where the status alone decides it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenbroker::store::{fauna::decode_answer, metrics::FaunaClass};

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = 100 + u16::from_be_bytes(*status) % 500;
    let class = decode_answer(status, body);
    let expected = match status {
        401 => Some(FaunaClass::Unauthorized),
        409 => Some(FaunaClass::Contended),
        429 => Some(FaunaClass::Throttled),
        440 | 500..=599 => Some(FaunaClass::Transient),
        200 | 400 => None,
        _ => Some(FaunaClass::Refused),
    };
    if let Some(expected) = expected {
        assert_eq!(class, expected, "status {status}");
    }
});
