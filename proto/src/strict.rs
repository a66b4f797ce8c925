//! A server-side codec that rejects requests carrying fields this build does not know.
//!
//! prost silently drops unknown fields. For a token service that is the wrong default: a client
//! built against a newer proto could send an option (a narrower scope, a shorter lifetime) that
//! an older broker would ignore while answering OK. So request messages are scanned at the wire
//! level before decoding, and a field number missing from the message's definition is
//! `INVALID_ARGUMENT`. Malformed bytes are `INVALID_ARGUMENT` too (tonic's default codec says
//! `INTERNAL`, which blames the server for a client's bytes).
//!
//! Responses decode leniently, so older clients keep working against newer brokers.
//!
//! Re-encoding and comparing lengths was rejected: encoders differ on default values inside map
//! entries (Go writes them, prost does not), which would flag valid requests.

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::v1;

/// Which fields a message may carry on the wire.
pub trait DecodePolicy {
    /// The known top-level field numbers; `None` decodes leniently (responses).
    const KNOWN_FIELDS: Option<&'static [u32]> = None;
    /// Known field numbers of nested messages, by the field that holds them.
    const NESTED: &'static [(u32, &'static [u32])] = &[];
}

/// The codec the generated client and server use: prost, plus [`DecodePolicy`] on decode.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + DecodePolicy + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

/// Decodes `U`, enforcing its [`DecodePolicy`].
#[derive(Debug)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: Message + Default + DecodePolicy> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode(buf).map(Some)
    }
}

/// Decodes one `U` from `buf` as [`StrictDecoder`] does: a request whose policy lists its
/// fields is scanned first, and an unknown field or malformed bytes are `INVALID_ARGUMENT`; a
/// message without a policy (a response) decodes leniently, and malformed bytes are `INTERNAL`.
///
/// # Errors
///
/// The [`Status`] the server answers for those bytes.
pub fn decode<U: Message + Default + DecodePolicy>(mut buf: impl Buf) -> Result<U, Status> {
    let Some(known) = U::KNOWN_FIELDS else {
        return U::decode(buf).map_err(|err| Status::internal(err.to_string()));
    };
    let bytes = buf.copy_to_bytes(buf.remaining());
    check_fields(&bytes, known, U::NESTED).map_err(Status::invalid_argument)?;
    U::decode(bytes).map_err(|err| Status::invalid_argument(format!("malformed request: {err}")))
}

/// Checks that every field in `bytes` is in `known` (recursing into `nested` messages).
fn check_fields(mut bytes: &[u8], known: &[u32], nested: &[(u32, &[u32])]) -> Result<(), String> {
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let field = u32::try_from(key >> 3).map_err(|_| "malformed request: bad field key")?;
        if !known.contains(&field) {
            return Err(format!(
                "request has field number {field}, which this broker does not know; \
                 upgrade the broker or leave the field out"
            ));
        }
        match key & 7 {
            0 => {
                varint(&mut bytes)?;
            }
            1 => skip(&mut bytes, 8)?,
            5 => skip(&mut bytes, 4)?,
            2 => {
                let len = usize::try_from(varint(&mut bytes)?)
                    .map_err(|_| "malformed request: length too large")?;
                let body = bytes
                    .get(..len)
                    .ok_or("malformed request: truncated field")?;
                if let Some((_, inner)) = nested.iter().find(|(f, _)| *f == field) {
                    check_fields(body, inner, &[])?;
                }
                bytes = &bytes[len..];
            }
            _ => return Err("malformed request: unsupported wire type".into()),
        }
    }
    Ok(())
}

fn varint(bytes: &mut &[u8]) -> Result<u64, String> {
    prost::encoding::decode_varint(bytes).map_err(|err| format!("malformed request: {err}"))
}

fn skip(bytes: &mut &[u8], n: usize) -> Result<(), String> {
    if bytes.len() < n {
        return Err("malformed request: truncated field".into());
    }
    *bytes = &bytes[n..];
    Ok(())
}

/// Field numbers of `AssertedClaims`.
const ASSERTED_CLAIMS: &[u32] = &[1, 2, 3, 4, 5];

impl DecodePolicy for v1::IssueTokensRequest {
    const KNOWN_FIELDS: Option<&'static [u32]> = Some(&[1, 2, 3, 4, 5, 6]);
    const NESTED: &'static [(u32, &'static [u32])] = &[(1, ASSERTED_CLAIMS)];
}
impl DecodePolicy for v1::RefreshTokensRequest {
    const KNOWN_FIELDS: Option<&'static [u32]> = Some(&[1, 2, 3, 4]);
}
impl DecodePolicy for v1::RevokeRequest {
    const KNOWN_FIELDS: Option<&'static [u32]> = Some(&[1, 2, 3, 4, 5, 6, 7]);
}
impl DecodePolicy for v1::IntrospectRequest {
    const KNOWN_FIELDS: Option<&'static [u32]> = Some(&[1, 2, 3, 4]);
}
impl DecodePolicy for v1::ListTokensRequest {
    const KNOWN_FIELDS: Option<&'static [u32]> = Some(&[1, 2, 3, 4, 5]);
}
impl DecodePolicy for v1::IssueTokensResponse {}
impl DecodePolicy for v1::RefreshTokensResponse {}
impl DecodePolicy for v1::RevokeResponse {}
impl DecodePolicy for v1::IntrospectResponse {}
impl DecodePolicy for v1::ListTokensResponse {}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::FileDescriptorSet;

    fn declared(message: &str) -> Vec<u32> {
        let fds = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let file = fds
            .file
            .iter()
            .find(|f| f.package() == "tokenbroker.v1")
            .unwrap();
        let mut numbers: Vec<u32> = file
            .message_type
            .iter()
            .find(|m| m.name() == message)
            .unwrap()
            .field
            .iter()
            .map(|f| u32::try_from(f.number()).unwrap())
            .collect();
        numbers.sort_unstable();
        numbers
    }

    #[test]
    fn known_fields_match_the_proto() {
        let cases: [(&str, &[u32]); 6] = [
            (
                "IssueTokensRequest",
                v1::IssueTokensRequest::KNOWN_FIELDS.unwrap(),
            ),
            ("AssertedClaims", ASSERTED_CLAIMS),
            (
                "RefreshTokensRequest",
                v1::RefreshTokensRequest::KNOWN_FIELDS.unwrap(),
            ),
            ("RevokeRequest", v1::RevokeRequest::KNOWN_FIELDS.unwrap()),
            (
                "IntrospectRequest",
                v1::IntrospectRequest::KNOWN_FIELDS.unwrap(),
            ),
            (
                "ListTokensRequest",
                v1::ListTokensRequest::KNOWN_FIELDS.unwrap(),
            ),
        ];
        for (name, known) in cases {
            assert_eq!(declared(name), known, "{name}");
        }
    }

    #[test]
    fn unknown_top_level_and_nested_fields_are_found() {
        let known = v1::IssueTokensRequest::KNOWN_FIELDS.unwrap();
        let nested = v1::IssueTokensRequest::NESTED;
        let valid = v1::IssueTokensRequest {
            subject: Some(v1::issue_tokens_request::Subject::Claims(
                v1::AssertedClaims {
                    email: "a@b.c".into(),
                    ..Default::default()
                },
            )),
            metadata: [("k".to_owned(), String::new())].into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(check_fields(&valid, known, nested), Ok(()));

        let mut extra = valid.clone();
        extra.extend([0x98, 0x06, 0x01]); // field 99, varint 1
        assert!(
            check_fields(&extra, known, nested)
                .unwrap_err()
                .contains("99")
        );

        // claims (field 1) holding an unknown field 9.
        let claims = [0x48, 0x01];
        let mut nested_bad = vec![0x0a, claims.len() as u8];
        nested_bad.extend(claims);
        assert!(
            check_fields(&nested_bad, known, nested)
                .unwrap_err()
                .contains('9')
        );

        assert!(check_fields(&[0x0a, 0x05, 0x01], known, nested).is_err());
        assert!(check_fields(&[0xff], known, nested).is_err());
    }
}
