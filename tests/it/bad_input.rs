//! Bad input: a clear INVALID_ARGUMENT and nothing stored.

use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{TestBroker, claims_request};

/// Sends `request`, expects INVALID_ARGUMENT mentioning `mentions`, and checks that no account
/// exists for `stored_under` (a valid email the request would have used) afterwards.
async fn rejected(
    broker: &TestBroker,
    request: pb::IssueTokensRequest,
    mentions: &str,
    stored_under: Option<&str>,
) {
    let err = broker.trigger.issue_tokens(request).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ClientErrorKind::InvalidArgument,
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(mentions),
        "{:?} lacks {mentions:?}",
        err.message()
    );
    if let Some(email) = stored_under {
        let page = broker
            .admin
            .list_tokens(pb::ListTokensRequest {
                account: Some(pb::list_tokens_request::Account::Email(email.into())),
                include_inactive: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(
            page.account_id.is_empty(),
            "an account was created for {email}"
        );
    }
}

#[tokio::test]
async fn malformed_emails_are_rejected() {
    let broker = TestBroker::spawn().await;
    let long_local = format!("{}@example.com", "a".repeat(65));
    let long = format!("a@{}.com", "b".repeat(260));
    for (email, mentions) in [
        ("", "email is required"),
        ("   ", "email is required"),
        ("no-at-sign", "email has no '@'"),
        ("two@@example.com", "email must be"),
        ("sp ace@example.com", "whitespace"),
        (long_local.as_str(), "email must be"),
        (long.as_str(), "longer than 254"),
    ] {
        // A malformed email cannot be stored under any account: nothing to look up.
        rejected(&broker, claims_request(email, ""), mentions, None).await;
    }
}

#[tokio::test]
async fn oversized_or_malformed_fields_are_rejected() {
    let broker = TestBroker::spawn().await;
    let email = "meta@example.com";

    let mut request = claims_request(email, "");
    request.metadata = (0..17).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    rejected(&broker, request, "more than 16 entries", Some(email)).await;

    let mut request = claims_request(email, "");
    request.metadata = [("k".to_owned(), "v".repeat(257))].into();
    rejected(&broker, request, "at most 256 bytes", Some(email)).await;

    let mut request = claims_request(email, "");
    request.metadata = [("bad key".to_owned(), "v".to_owned())].into();
    rejected(&broker, request, "metadata keys", Some(email)).await;

    let mut request = claims_request(email, "");
    request.idempotency_key = "x".repeat(129);
    rejected(&broker, request, "idempotency_key", Some(email)).await;

    let mut request = claims_request(email, &"c".repeat(129));
    request.access_ttl_seconds = 0;
    rejected(&broker, request, "client_id", Some(email)).await;

    let mut request = claims_request(email, "");
    request.refresh_ttl_seconds = 30 * 24 * 3600 + 1;
    rejected(&broker, request, "refresh_ttl_seconds", Some(email)).await;

    let mut request = claims_request(email, "");
    if let Some(pb::issue_tokens_request::Subject::Claims(claims)) = &mut request.subject {
        claims.groups = (0..33).map(|i| format!("g{i}")).collect();
    }
    rejected(&broker, request, "groups", Some(email)).await;

    rejected(
        &broker,
        pb::IssueTokensRequest::default(),
        "subject is required",
        None,
    )
    .await;
}

#[tokio::test]
async fn unknown_fields_are_rejected_before_anything_happens() {
    use prost::Message as _;
    let broker = TestBroker::spawn().await;
    let mut body = claims_request("unknown@example.com", "").encode_to_vec();
    body.extend([0x98, 0x06, 0x01]); // field 99 = 1, which the proto does not define
    let status = raw_call(&broker, "/tokenbroker.v1.TokenBroker/IssueTokens", body).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("field number 99"),
        "{}",
        status.message()
    );

    let status = raw_call(
        &broker,
        "/tokenbroker.v1.TokenBroker/IssueTokens",
        vec![0x0a, 0x7f, 0x01],
    )
    .await;
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("malformed"),
        "{}",
        status.message()
    );

    let page = broker
        .admin
        .list_tokens(pb::ListTokensRequest {
            account: Some(pb::list_tokens_request::Account::Email(
                "unknown@example.com".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(page.account_id.is_empty(), "nothing stored");
}

/// Sends raw protobuf bytes to `path` with the trigger key, returning the status.
async fn raw_call(broker: &TestBroker, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(broker.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", tokenbroker_tests::expose(&broker.keys.trigger))
            .parse()
            .unwrap(),
    );
    grpc.unary::<_, Vec<u8>, _>(
        request,
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("the broker must refuse")
}

/// A codec that sends and receives bytes as they are.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}
