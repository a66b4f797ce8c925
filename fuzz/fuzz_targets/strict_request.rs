//! The strict request codec: arbitrary bytes decoded as each request message under its policy.
//!
//! The first byte picks the message type, the rest is the message body as it would arrive in a
//! gRPC frame. Besides "never panics", checks what the strict scan promises: it refuses with
//! `INVALID_ARGUMENT` only (a client's bytes are never the server's fault), it accepts nothing
//! that prost itself would refuse, what it accepts decodes to what prost decodes, and a
//! re-encoded request is accepted again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokenbroker_client::Code;
use tokenbroker_proto::{
    strict::{DecodePolicy, decode},
    v1,
};

fn check<U: Message + Default + DecodePolicy + PartialEq + std::fmt::Debug>(body: &[u8]) {
    let lenient = U::decode(body);
    match decode::<U>(body) {
        Ok(message) => {
            assert_eq!(
                lenient.as_ref().ok(),
                Some(&message),
                "strict accepted what prost decodes differently"
            );
            let again = decode::<U>(message.encode_to_vec().as_slice())
                .expect("a re-encoded request is accepted");
            assert_eq!(again, message, "a re-encoded request decodes to itself");
        }
        Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{status:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => check::<v1::IssueTokensRequest>(body),
        1 => check::<v1::RefreshTokensRequest>(body),
        2 => check::<v1::RevokeRequest>(body),
        3 => check::<v1::IntrospectRequest>(body),
        _ => check::<v1::ListTokensRequest>(body),
    }
});
