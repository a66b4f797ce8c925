//! grpc-web on the gRPC listener (`server.grpc_web`), with real curl over HTTP/1.1: health and
//! TokenBroker calls in grpc-web and grpc-web-text, the CORS answers for an allowed and a
//! foreign origin, the same metrics, limits and audit events as native gRPC, HTTP/1.1 in TLS
//! ALPN, and the listener refusing HTTP/1.1 when grpc-web is off (the default).

use std::{net::SocketAddr, process::Stdio};

use base64::Engine as _;
use tokenbroker::app::settings::Settings;
use tokenbroker_client::pb;
use tokenbroker_tests::{TestBroker, claims_request, expose, http, require_tool};
use tokio::io::AsyncWriteExt as _;

use crate::{
    metrics::Scrape,
    tls::{Ca, Files},
};

/// The origin the test brokers allow.
const APP_ORIGIN: &str = "https://app.example.com";

/// The grpc-web content types: binary, and base64 text.
const WEB: &str = "application/grpc-web+proto";
const WEB_TEXT: &str = "application/grpc-web-text+proto";

/// A broker with grpc-web on and [`APP_ORIGIN`] allowed, and `configure`'s changes.
async fn web_broker(configure: impl FnOnce(&mut Settings)) -> TestBroker {
    TestBroker::spawn_with(|s| {
        s.server.grpc_web = true;
        s.server.cors.allowed_origins = vec![APP_ORIGIN.to_owned()];
        configure(s);
    })
    .await
}

/// What curl printed: the status line and headers, and the raw body (binary for grpc-web).
#[derive(Debug)]
struct Answer {
    head: http::Answer,
    body: Vec<u8>,
}

impl Answer {
    /// Returns the first value of header `name`, if present.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// The call's gRPC status: from the HTTP headers (a trailers-only answer, as errors come),
    /// or else from the trailer frame at the end of the body.
    fn grpc_status(&self, text: bool) -> String {
        if let Some(status) = self.header("grpc-status") {
            return status.to_owned();
        }
        let trailers = frames(&self.body_bytes(text))
            .into_iter()
            .find(|(flag, _)| *flag == 0x80)
            .expect("a trailer frame");
        let trailers = String::from_utf8(trailers.1).expect("trailers are text");
        trailers
            .lines()
            .find_map(|line| line.trim().strip_prefix("grpc-status:"))
            .expect("grpc-status in the trailers")
            .trim()
            .to_owned()
    }

    /// The body as frames' bytes. A grpc-web-text body is base64, encoded chunk by chunk, so
    /// padding may sit in the middle: each 4-character quantum is decoded on its own.
    fn body_bytes(&self, text: bool) -> Vec<u8> {
        if !text {
            return self.body.clone();
        }
        let mut bytes = Vec::new();
        for quantum in self.body.chunks(4) {
            bytes.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(quantum)
                    .expect("base64 body"),
            );
        }
        bytes
    }

    /// Decodes the single data frame as `M`.
    fn message<M: prost::Message + Default>(&self, text: bool) -> M {
        let data = frames(&self.body_bytes(text))
            .into_iter()
            .find(|(flag, _)| *flag == 0)
            .expect("a data frame");
        M::decode(data.1.as_slice()).expect("the data frame decodes")
    }
}

/// Splits a grpc-web body into its frames: (flag, payload).
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().expect("4 bytes")) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "trailing bytes after the frames");
    out
}

/// One grpc-web frame around `message`.
fn frame(message: &impl prost::Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut out = vec![0];
    out.extend(u32::try_from(bytes.len()).expect("small").to_be_bytes());
    out.extend(bytes);
    out
}

/// Runs curl with `args`, sending `body` as the request body; curl's error when it fails (the
/// connection refused or closed without an answer).
async fn try_curl(args: &[&str], body: &[u8]) -> Result<Answer, String> {
    require_tool("curl");
    let mut child = tokio::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-H", "Expect:", "--max-time", "20"])
        .args(["--data-binary", "@-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs");
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(body).await.expect("curl reads its body");
    drop(stdin);
    let output = child.wait_with_output().await.expect("curl ends");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let raw = output.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    Ok(Answer {
        head: http::parse_answer(&String::from_utf8_lossy(&raw[..split])),
        body: raw[split + 4..].to_vec(),
    })
}

/// A grpc-web call over HTTP/1.1: POSTs `message` to `/service/method` on `addr` as
/// `content_type`, with `extra` curl arguments (headers).
async fn web_call(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    message: &impl prost::Message,
    extra: &[&str],
) -> Answer {
    let mut body = frame(message);
    if content_type == WEB_TEXT {
        body = base64::engine::general_purpose::STANDARD
            .encode(body)
            .into_bytes();
    }
    let url = format!("http://{addr}{path}");
    let content = format!("content-type: {content_type}");
    // A grpc-web client says which encoding it wants back; text is asked for, binary is the
    // default.
    let accept = format!("accept: {content_type}");
    let mut args = vec![
        "--http1.1",
        "-X",
        "POST",
        &url,
        "-H",
        &content,
        "-H",
        &accept,
    ];
    args.extend(["-H", "x-grpc-web: 1"]);
    args.extend(extra);
    try_curl(&args, &body)
        .await
        .unwrap_or_else(|err| panic!("curl got no answer: {err}"))
}

/// IssueTokens over grpc-web in `content_type` (binary or text), as the trigger, for `email`
/// on app client `web`; checks the answer is a success in that same encoding.
async fn web_issue(
    broker: &TestBroker,
    email: &str,
    content_type: &str,
) -> pb::IssueTokensResponse {
    let answer = web_call(
        broker.addr,
        "/tokenbroker.v1.TokenBroker/IssueTokens",
        content_type,
        &claims_request(email, "web"),
        &["-H", &bearer(&broker.keys.trigger)],
    )
    .await;
    let text = content_type == WEB_TEXT;
    assert_eq!(answer.head.status, 200, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some(content_type));
    assert_eq!(answer.grpc_status(text), "0", "{answer:?}");
    answer.message(text)
}

fn bearer(key: &secrecy::SecretString) -> String {
    format!("authorization: Bearer {}", expose(key))
}

#[tokio::test]
async fn grpc_web_health_check_answers_over_http1() {
    let broker = web_broker(|_| {}).await;
    let answer = web_call(
        broker.addr,
        "/grpc.health.v1.Health/Check",
        WEB,
        &tonic_health::pb::HealthCheckRequest::default(),
        &[],
    )
    .await;
    assert_eq!(
        (answer.head.version.as_str(), answer.head.status),
        ("HTTP/1.1", 200)
    );
    assert_eq!(answer.header("content-type"), Some(WEB));
    assert_eq!(answer.grpc_status(false), "0", "{answer:?}");
    let health: tonic_health::pb::HealthCheckResponse = answer.message(false);
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn token_broker_calls_work_in_grpc_web_and_grpc_web_text() {
    let broker = web_broker(|_| {}).await;
    // IssueTokens in grpc-web-text (base64), as a trigger.
    let issued = web_issue(&broker, "web@example.com", WEB_TEXT).await;
    let access = issued.access.expect("an access token").secret;

    // Introspect in binary grpc-web, as a service: the same token is active.
    let introspect = pb::IntrospectRequest {
        token: access.clone(),
        ..Default::default()
    };
    let path = "/tokenbroker.v1.TokenBroker/Introspect";
    let answer = web_call(
        broker.addr,
        path,
        WEB,
        &introspect,
        &["-H", &bearer(&broker.keys.service)],
    )
    .await;
    assert_eq!(answer.grpc_status(false), "0", "{answer:?}");
    let facts: pb::IntrospectResponse = answer.message(false);
    assert!(facts.active);
    assert_eq!(facts.email, "web@example.com");

    // Without a key: UNAUTHENTICATED, as grpc-status in the HTTP headers (trailers-only).
    let refused = web_call(broker.addr, path, WEB, &introspect, &[]).await;
    assert_eq!(refused.head.status, 200);
    assert_eq!(refused.grpc_status(false), "16", "{refused:?}");
    assert!(
        !String::from_utf8_lossy(&refused.body).contains(&access),
        "the secret echoed back"
    );
}

#[tokio::test]
async fn cors_preflight_answers_allowed_origins_only() {
    let broker = web_broker(|_| {}).await;
    let url = format!(
        "http://{}/tokenbroker.v1.TokenBroker/Introspect",
        broker.addr
    );
    let preflight = |origin: &'static str| {
        let url = url.clone();
        async move {
            let origin = format!("origin: {origin}");
            let args = [
                "--http1.1",
                "-X",
                "OPTIONS",
                &url,
                "-H",
                &origin,
                "-H",
                "access-control-request-method: POST",
                "-H",
                "access-control-request-headers: authorization,content-type,x-grpc-web,x-user-agent",
            ];
            try_curl(&args, b"")
                .await
                .unwrap_or_else(|err| panic!("curl got no answer: {err}"))
        }
    };

    let allowed = preflight(APP_ORIGIN).await;
    assert_eq!(allowed.head.status, 200, "{allowed:?}");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some(APP_ORIGIN)
    );
    assert_eq!(allowed.header("access-control-allow-methods"), Some("POST"));
    let headers = allowed
        .header("access-control-allow-headers")
        .expect("allowed headers");
    for name in [
        "authorization",
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
    ] {
        assert!(
            headers.split(',').any(|h| h.trim() == name),
            "{name} in {headers}"
        );
    }
    // No credentialed requests (cookies): the key travels in `authorization`.
    assert_eq!(allowed.header("access-control-allow-credentials"), None);

    let foreign = preflight("https://evil.example.com").await;
    assert_eq!(
        foreign.header("access-control-allow-origin"),
        None,
        "{foreign:?}"
    );

    // The call itself: the allowed origin may read the status headers; a foreign one gets no
    // allow-origin, so its browser hides the answer from the page.
    let request = pb::IntrospectRequest {
        token: "tbk_not_a_token".into(),
        ..Default::default()
    };
    let path = "/tokenbroker.v1.TokenBroker/Introspect";
    let key = bearer(&broker.keys.service);
    let call = web_call(
        broker.addr,
        path,
        WEB,
        &request,
        &["-H", &key, "-H", &format!("origin: {APP_ORIGIN}")],
    )
    .await;
    assert_eq!(call.grpc_status(false), "0", "{call:?}");
    assert_eq!(call.header("access-control-allow-origin"), Some(APP_ORIGIN));
    let exposed = call
        .header("access-control-expose-headers")
        .expect("exposed headers");
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(
            exposed.split(',').any(|h| h.trim() == name),
            "{name} in {exposed}"
        );
    }
    let foreign_call = web_call(
        broker.addr,
        path,
        WEB,
        &request,
        &["-H", &key, "-H", "origin: https://evil.example.com"],
    )
    .await;
    assert_eq!(foreign_call.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn grpc_web_is_off_by_default_and_http1_is_refused() {
    let broker = TestBroker::spawn().await;
    let request = tonic_health::pb::HealthCheckRequest::default();
    let url = format!("http://{}/grpc.health.v1.Health/Check", broker.addr);
    let args = [
        "--http1.1",
        "-X",
        "POST",
        &url,
        "-H",
        "content-type: application/grpc-web+proto",
        "-H",
        "x-grpc-web: 1",
    ];
    // The listener speaks HTTP/2 only: curl gets no HTTP/1.1 answer at all.
    let answer = try_curl(&args, &frame(&request)).await;
    assert!(answer.is_err(), "an HTTP/1.1 answer: {answer:?}");
    // Native gRPC still works.
    let pair = broker.issue("native@example.com").await;
    assert!(broker.is_active(&pair.access.secret).await);
}

#[tokio::test]
async fn grpc_web_calls_are_metered_and_limited_like_native_ones() {
    let broker = web_broker(|s| {
        s.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        // Small, so an oversized request is still small. The broker refuses a request from
        // its first bytes over the limit; an HTTP/1.1 connection closed with a body left
        // unread ends in a TCP reset, which on a loaded machine reached curl before the
        // answer (seen once with 70 KiB). A body that arrives whole leaves nothing unread.
        s.limits.max_request_bytes = 1024;
    })
    .await;
    let ok = r#"tokenbroker_rpc_requests_total{method="Introspect",code="OK"}"#;
    let unauthenticated =
        r#"tokenbroker_rpc_requests_total{method="Introspect",code="UNAUTHENTICATED"}"#;
    let exhausted =
        r#"tokenbroker_rpc_requests_total{method="Introspect",code="RESOURCE_EXHAUSTED"}"#;

    // One native call, then the same call over grpc-web, then a refused one.
    let pair = broker.issue("metered@example.com").await;
    assert!(broker.is_active(&pair.access.secret).await);
    let before = Scrape::parse(broker.scrape().await);
    assert_eq!(before.value(ok), 1.0);
    let request = pb::IntrospectRequest {
        token: expose(&pair.access.secret),
        ..Default::default()
    };
    let path = "/tokenbroker.v1.TokenBroker/Introspect";
    let key = bearer(&broker.keys.service);
    let answer = web_call(broker.addr, path, WEB, &request, &["-H", &key]).await;
    assert_eq!(answer.grpc_status(false), "0");
    web_call(broker.addr, path, WEB, &request, &[]).await;

    // Over the request size limit: refused as for native gRPC.
    let huge = pb::IntrospectRequest {
        token: "x".repeat(2048),
        ..Default::default()
    };
    let refused = web_call(broker.addr, path, WEB, &huge, &["-H", &key]).await;
    assert_eq!(refused.grpc_status(false), "8", "{refused:?}");

    let after = Scrape::parse(broker.scrape().await);
    assert_eq!(after.value(ok), 2.0, "the grpc-web call counts as one more");
    assert_eq!(after.value_or_hidden_zero(unauthenticated), 1.0);
    assert_eq!(after.value_or_hidden_zero(exhausted), 1.0);
}

#[tokio::test]
async fn grpc_web_over_tls_offers_http1_in_alpn() {
    let ca = Ca::new("Web CA");
    let files = Files::new(&ca.server(), &ca);
    let ca_file = tempfile::NamedTempFile::new().expect("a temp file");
    std::fs::write(ca_file.path(), ca.pem()).expect("the CA is written");
    let broker = TestBroker::spawn_tls(
        |s| {
            s.server.tls = Some(files.settings(None));
            s.server.grpc_web = true;
        },
        crate::tls::trusting(&ca),
    )
    .await;
    let url = format!(
        "https://localhost:{}/grpc.health.v1.Health/Check",
        broker.addr.port()
    );
    let resolve = format!("localhost:{}:127.0.0.1", broker.addr.port());
    let ca_path = ca_file.path().to_str().expect("a UTF-8 path");
    let args = [
        "--http1.1",
        "--cacert",
        ca_path,
        "--resolve",
        &resolve,
        "-X",
        "POST",
        &url,
        "-H",
        "content-type: application/grpc-web+proto",
        "-H",
        "x-grpc-web: 1",
    ];
    let request = tonic_health::pb::HealthCheckRequest::default();
    let answer = try_curl(&args, &frame(&request))
        .await
        .unwrap_or_else(|err| panic!("no TLS answer over HTTP/1.1: {err}"));
    assert_eq!(
        (answer.head.version.as_str(), answer.head.status),
        ("HTTP/1.1", 200)
    );
    assert_eq!(answer.grpc_status(false), "0");
    // Native gRPC over TLS (ALPN h2) still works beside it.
    let pair = broker.issue("tls-web@example.com").await;
    assert!(broker.is_active(&pair.access.secret).await);
}

#[tokio::test]
async fn grpc_web_calls_are_audited_like_native_ones() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("audit.log");
    let broker = crate::audit::audited_broker(&path, |s| {
        s.server.grpc_web = true;
    })
    .await;
    let issued = web_issue(&broker, "audited-web@example.com", WEB).await;
    let revoke = pb::RevokeRequest {
        target: Some(pb::revoke_request::Target::FamilyId(
            issued.family_id.clone(),
        )),
        ..Default::default()
    };
    let revoked = web_call(
        broker.addr,
        "/tokenbroker.v1.TokenBroker/Revoke",
        WEB,
        &revoke,
        &["-H", &bearer(&broker.keys.admin)],
    )
    .await;
    assert_eq!(revoked.grpc_status(false), "0", "{revoked:?}");
    broker.stop().await.expect("a clean stop");

    let events = crate::audit::read_events(&path);
    let response = |name: &str| {
        events
            .iter()
            .find(|e| e["event"] == name && e["phase"] == "response")
            .unwrap_or_else(|| panic!("no {name} response in {events:?}"))
    };
    let issued_event = response("issue");
    assert_eq!(issued_event["outcome"], "ok");
    assert_eq!(issued_event["family_id"], issued.family_id.as_str());
    let revoked_event = response("revoke");
    assert_eq!(revoked_event["outcome"], "ok");
    let secret = issued.access.expect("an access token").secret;
    assert!(
        !std::fs::read_to_string(&path)
            .expect("the audit file")
            .contains(&secret),
        "a secret in the audit log"
    );
}
