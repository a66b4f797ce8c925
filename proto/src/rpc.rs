//! The two `google.rpc` messages the broker puts in error details (`grpc-status-details-bin`):
//! `Status` and `RetryInfo`, as in `google/rpc/status.proto` and `google/rpc/error_details.proto`.
//! A `RESOURCE_EXHAUSTED` answer carries a `RetryInfo` saying when a retry can succeed.

use std::time::Duration;

use prost::Message as _;

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// The gRPC code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The message.
    #[prost(string, tag = "2")]
    pub message: String,
    /// Typed details.
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RetryInfo {
    /// How long to wait before retrying.
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<prost_types::Duration>,
}

/// The type URL of [`RetryInfo`] in an `Any`.
pub const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// Encodes the `grpc-status-details-bin` value of an error whose retry can succeed after
/// `delay`.
pub fn retry_details(code: i32, message: &str, delay: Duration) -> Vec<u8> {
    let retry = RetryInfo {
        retry_delay: Some(prost_types::Duration {
            seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(delay.subsec_nanos()).unwrap_or(0),
        }),
    };
    Status {
        code,
        message: message.to_owned(),
        details: vec![prost_types::Any {
            type_url: RETRY_INFO_TYPE_URL.to_owned(),
            value: retry.encode_to_vec(),
        }],
    }
    .encode_to_vec()
}

/// Reads the retry delay from a `grpc-status-details-bin` value, if it has a `RetryInfo`.
pub fn retry_delay(details: &[u8]) -> Option<Duration> {
    let status = Status::decode(details).ok()?;
    let any = status
        .details
        .iter()
        .find(|any| any.type_url == RETRY_INFO_TYPE_URL)?;
    let delay = RetryInfo::decode(any.value.as_slice()).ok()?.retry_delay?;
    Some(
        Duration::from_secs(u64::try_from(delay.seconds).ok()?)
            + Duration::from_nanos(u64::try_from(delay.nanos).ok()?),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_round_trips() {
        let bytes = retry_details(8, "slow down", Duration::from_millis(1250));
        assert_eq!(retry_delay(&bytes), Some(Duration::from_millis(1250)));
        assert_eq!(retry_delay(b"\xff\xff"), None);
        let no_retry = Status {
            code: 8,
            message: String::new(),
            details: vec![],
        };
        assert_eq!(retry_delay(&no_retry.encode_to_vec()), None);
    }
}
