//! Traces end to end: the trigger's real handler, called with a Lambda X-Ray trace header,
//! calls a broker child process (on the Fauna store, a real Fauna double over HTTP) that
//! exports to a real OTLP/gRPC collector in this process. One IssueTokens is one trace: the
//! trigger's span → the broker's RPC span → store spans → the Fauna HTTP spans, whose context
//! Fauna receives as `traceparent`. With export off, the caller's `traceparent` still reaches
//! Fauna unchanged.
//!
//! The broker runs as a child process because the OpenTelemetry layer is process-global and
//! this test binary already has its own subscriber (the log capture).

use std::{path::Path, sync::Arc, time::Duration};

use lambda_runtime::{Context, LambdaEvent};
use secrecy::SecretString;
use serde_json::Value;
use tokenbroker::{
    app::dev::{api_key_digest, generate_api_key},
    model::clock::SystemClock,
    store::StoreBackend,
};
use tokenbroker_client::{CallOptions, Client};
use tokenbroker_tests::{
    BrokerProcess, TestBroker, claims_request, eventually, expose,
    fauna::{FaunaDouble, SERVER_KEY},
    otlp::{CollectedSpan, OtlpCollector},
};
use tokenbroker_trigger::{ClaimName, Config as TriggerConfig, handle};

/// The X-Ray header Lambda hands the trigger, and the trace context the trigger derives
/// from it (`trigger/src/trace.rs`).
const XRAY: &str = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
const TRACE_ID: &str = "5759e988bd862e3fe1be46a994272793";
const TRIGGER_SPAN_ID: &str = "53995c3f42cd8ad8";

const EVENT: &str = include_str!("../../trigger/tests/fixtures/v3-hosted-auth.json");

/// Writes a config that puts the broker on `fauna`, exports to `collector` and admits `key`
/// with the trigger role.
fn write_config(dir: &Path, fauna: &FaunaDouble, collector: &OtlpCollector, key: &SecretString) {
    let config = format!(
        r#"
[store]
backend = "fauna"

[store.fauna]
endpoint = "{fauna}"
secret = "{SERVER_KEY}"

[telemetry]
otlp_endpoint = "{collector}"
service_name = "tokenbroker-under-test"

[[api_keys]]
name = "cognito-trigger"
roles = ["trigger"]
sha256 = "{digest}"
"#,
        fauna = fauna.endpoint(),
        collector = collector.endpoint(),
        digest = api_key_digest(key),
    );
    std::fs::write(dir.join("tokenbroker.toml"), config).expect("config written");
}

/// Every string value under a `fauna_*_token` key of the trigger's reply.
fn claim_secrets(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match value {
                    Value::String(s) if key.starts_with("fauna_") => found.push(s.clone()),
                    other => claim_secrets(other, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| claim_secrets(v, found)),
        _ => {}
    }
}

/// `00-<trace id>-<parent id>-<flags>` → (trace id, parent id).
fn split_traceparent(value: &str) -> (String, String) {
    let fields: Vec<&str> = value.split('-').collect();
    assert_eq!(fields.len(), 4, "{value}");
    assert_eq!(fields[0], "00", "{value}");
    (fields[1].to_owned(), fields[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sign_in_is_one_trace_from_the_trigger_through_the_broker_to_fauna() {
    let collector = OtlpCollector::start().await;
    let fauna = FaunaDouble::start(Arc::new(SystemClock)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = generate_api_key();
    write_config(dir.path(), &fauna, &collector, &key);
    let config_path = dir.path().join("tokenbroker.toml");
    let mut broker = BrokerProcess::start_with_env(
        dir.path(),
        &["--config".as_ref(), config_path.as_os_str()],
        &[("RUST_LOG", "info")],
    )
    .await;

    // The trigger's own code path: its handler, its broker client, its traceparent.
    let mut trigger_config = TriggerConfig::new(broker.endpoint.clone(), key.clone());
    // Both secrets in the reply, so that the leak check below looks for both in the spans.
    trigger_config.refresh_claim = Some(ClaimName::parse("fauna_refresh_token").unwrap());
    let client = Client::connect(&broker.endpoint)
        .await
        .expect("broker reachable")
        .with_api_key(&key)
        .expect("ascii key");
    let mut context = Context::default();
    context.xray_trace_id = Some(XRAY.into());
    let event: Value = serde_json::from_str(EVENT).expect("fixture is JSON");
    let reply = handle(LambdaEvent::new(event, context), &trigger_config, &client)
        .await
        .expect("the trigger adds the claims");
    let mut secrets = Vec::new();
    claim_secrets(&reply, &mut secrets);
    assert_eq!(secrets.len(), 2, "access and refresh secrets: {reply}");
    // The sign-in's requests; the policy written at start belongs to no trace.
    let fauna_requests: Vec<_> = fauna
        .requests()
        .into_iter()
        .filter(|r| r.query != Some("publish_policy"))
        .collect();
    assert!(!fauna_requests.is_empty(), "the broker queried fauna");

    // A graceful stop flushes the exporter.
    let status = broker.terminate().await;
    assert!(status.success(), "the broker stopped cleanly: {status}");
    eventually("the collector has the IssueTokens span", || {
        let found = collector
            .spans()
            .iter()
            .any(|s| s.span.name == "tokenbroker.v1.TokenBroker/IssueTokens");
        async move { found }
    })
    .await;
    let spans = collector.spans();
    let trace: Vec<&CollectedSpan> = spans.iter().filter(|s| s.trace_id() == TRACE_ID).collect();
    let names: Vec<&str> = trace.iter().map(|s| s.span.name.as_str()).collect();

    // The RPC span: a child of the trigger's span, in the trigger's trace.
    let rpc = trace
        .iter()
        .find(|s| s.span.name == "tokenbroker.v1.TokenBroker/IssueTokens")
        .unwrap_or_else(|| panic!("no IssueTokens span in the trigger's trace: {names:?}"));
    assert_eq!(rpc.service, "tokenbroker-under-test");
    assert_eq!(rpc.parent_span_id(), TRIGGER_SPAN_ID);
    assert_eq!(rpc.span.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(rpc.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        rpc.attribute("rpc.service").as_deref(),
        Some("tokenbroker.v1.TokenBroker")
    );
    assert_eq!(rpc.attribute("rpc.method").as_deref(), Some("IssueTokens"));
    assert_eq!(rpc.attribute("rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(rpc.attribute("caller").as_deref(), Some("cognito-trigger"));
    assert!(rpc.attribute("account_id").is_some(), "{:?}", rpc.span);
    assert!(rpc.attribute("access_token_id").is_some(), "{:?}", rpc.span);

    // Store spans: children of the RPC span.
    let store: Vec<&&CollectedSpan> = trace
        .iter()
        .filter(|s| s.span.name.starts_with("store."))
        .collect();
    assert!(!store.is_empty(), "no store span: {names:?}");
    for span in &store {
        assert_eq!(span.parent_span_id(), rpc.span_id(), "{}", span.span.name);
        assert_eq!(span.attribute("db.system.name").as_deref(), Some("fauna"));
    }

    // Outbound HTTP spans: children of a store span; each is the parent Fauna was sent.
    let http: Vec<&&CollectedSpan> = trace.iter().filter(|s| s.span.name == "POST").collect();
    assert!(!http.is_empty(), "no fauna HTTP span: {names:?}");
    for span in &http {
        assert!(
            store.iter().any(|s| s.span_id() == span.parent_span_id()),
            "an HTTP span outside the store spans"
        );
        assert_eq!(span.span.kind, 3, "SPAN_KIND_CLIENT");
        assert_eq!(
            span.attribute("http.request.method").as_deref(),
            Some("POST")
        );
        assert_eq!(
            span.attribute("http.response.status_code").as_deref(),
            Some("200")
        );
        assert_eq!(
            span.attribute("server.address").as_deref(),
            Some("127.0.0.1")
        );
    }
    for request in &fauna_requests {
        let traceparent = request
            .traceparent
            .as_deref()
            .unwrap_or_else(|| panic!("a fauna request without traceparent: {request:?}"));
        let (trace_id, parent) = split_traceparent(traceparent);
        assert_eq!(trace_id, TRACE_ID);
        assert!(
            http.iter().any(|s| s.span_id() == parent),
            "fauna's parent {parent} is not an exported HTTP span"
        );
    }

    // No secret in any exported span: not the minted ones, not the API key, not Fauna's key.
    secrets.extend([expose(&key), SERVER_KEY.to_owned()]);
    for span in &spans {
        for text in span.all_text() {
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "a secret in span {}: {text}",
                    span.span.name
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_the_callers_traceparent_reaches_fauna_unchanged() {
    let fauna = FaunaDouble::start(Arc::new(SystemClock)).await;
    let (endpoint, server_key) = (fauna.endpoint(), fauna.server_key());
    let broker = TestBroker::spawn_with(move |s| {
        s.store.backend = StoreBackend::Fauna;
        s.store.fauna.endpoint = endpoint;
        s.store.fauna.secret = Some(server_key);
    })
    .await;
    // The policy written at start belongs to no call.
    fauna.clear_requests();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let options = CallOptions::new()
        .with_timeout(Duration::from_secs(10))
        .with_metadata("traceparent", traceparent)
        .and_then(|o| o.with_metadata("tracestate", "vendor=opaque"))
        .expect("valid metadata");
    broker
        .trigger
        .issue_tokens_with(claims_request("traced@example.com", "app"), &options)
        .await
        .expect("IssueTokens succeeds");
    let requests = fauna.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(request.traceparent.as_deref(), Some(traceparent));
        assert_eq!(request.tracestate.as_deref(), Some("vendor=opaque"));
    }

    // A malformed traceparent is not forwarded; no traceparent, none forwarded.
    fauna.clear_requests();
    let bad = CallOptions::new()
        .with_metadata("traceparent", "00-not-a-trace-01")
        .expect("valid metadata");
    broker
        .trigger
        .issue_tokens_with(claims_request("traced@example.com", "app"), &bad)
        .await
        .expect("IssueTokens succeeds");
    broker
        .trigger
        .issue_tokens(claims_request("untraced@example.com", "app"))
        .await
        .expect("IssueTokens succeeds");
    let requests = fauna.requests();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|r| r.traceparent.is_none()),
        "{requests:?}"
    );
}
