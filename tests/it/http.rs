//! The HTTP endpoints (RFC 7662 introspection, RFC 7009 revocation) against real clients: curl
//! and Python authlib, on a broker whose HTTP listener is on a loopback port; over TLS too; a
//! store outage; metrics; and no secret in any log line.

use std::{net::SocketAddr, sync::Arc};

use base64::Engine as _;
use secrecy::SecretString;
use tokenbroker::{
    app::settings::Settings,
    model::clock::{Clock, SystemClock},
    store::StoreBackend,
};
use tokenbroker_tests::{
    TestBroker, expose,
    fauna::{Fault, FaunaDouble},
    http::{Answer, curl, python},
    logs,
};

pub(crate) fn with_http(s: &mut Settings) {
    s.http.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
}

pub(crate) async fn http_broker() -> TestBroker {
    TestBroker::spawn_with(with_http).await
}

pub(crate) fn url(broker: &TestBroker, path: &str) -> String {
    format!(
        "http://{}{path}",
        broker.http_addr.expect("http.listen set")
    )
}

fn basic(name: &str, key: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{name}:{key}"));
    format!("authorization: Basic {encoded}")
}

fn service(broker: &TestBroker) -> String {
    basic("dev-service", &expose(&broker.keys.service))
}

/// POSTs a form with `auth` (a whole header line) to `path`.
async fn post(broker: &TestBroker, path: &str, auth: &str, form: &str) -> Answer {
    curl(&[
        "-H",
        auth,
        "-H",
        "content-type: application/x-www-form-urlencoded",
        "--data-raw",
        form,
        &url(broker, path),
    ])
    .await
}

async fn introspect(broker: &TestBroker, auth: &str, form: &str) -> Answer {
    post(broker, "/oauth2/introspect", auth, form).await
}

#[track_caller]
fn assert_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{answer:?}"
    );
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    let body = answer.json();
    assert_eq!(body["error"], code, "{answer:?}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_answers_rfc_7662_over_basic_and_bearer() {
    let broker = http_broker().await;
    let pair = broker.issue_for_client("http@example.com", "app").await;
    let access = expose(&pair.access.secret);

    let answer = introspect(&broker, &service(&broker), &format!("token={access}")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    let body = answer.json();
    assert_eq!(body["active"], true);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["token_use"], "access_token");
    assert_eq!(body["client_id"], "app");
    assert_eq!(body["sub"], pair.account_id.as_str());
    assert_eq!(body["email"], "http@example.com");
    assert_eq!(body["jti"], pair.access.token_id.as_str());
    let exp = pair.access.expires_at.as_ref().unwrap().seconds;
    assert_eq!(body["exp"], exp);
    assert!(body["iat"].as_i64().unwrap() <= exp - 500, "{body}");

    // Bearer with the API key, over HTTP/2 (prior knowledge) this time.
    let bearer = format!("authorization: Bearer {}", expose(&broker.keys.service));
    let answer = curl(&[
        "--http2-prior-knowledge",
        "-H",
        &bearer,
        "--data-urlencode",
        &format!("token={}", expose(&pair.refresh.secret)),
        "--data-urlencode",
        "token_type_hint=access_token",
        &url(&broker, "/oauth2/introspect"),
    ])
    .await;
    assert_eq!(answer.version, "HTTP/2");
    assert_eq!(answer.status, 200, "{answer:?}");
    let body = answer.json();
    assert_eq!(
        body["token_use"], "refresh_token",
        "the hint is only a hint"
    );
    assert_eq!(body["jti"], pair.refresh.token_id.as_str());

    // Anything else is exactly {"active": false}.
    for form in [
        "token=garbage".to_owned(),
        "token=eyJhbGciOiJSUzI1NiJ9.e30.c2ln".to_owned(),
        format!("token={access}&client_id=another-app"),
        format!("token={access}x"),
    ] {
        let answer = introspect(&broker, &service(&broker), &form).await;
        assert_eq!(answer.status, 200, "{form}");
        assert_eq!(answer.body, r#"{"active":false}"#, "{form}");
    }
    // The admin key may introspect too (as on gRPC).
    let admin = basic("dev-admin", &expose(&broker.keys.admin));
    let answer = introspect(&broker, &admin, &format!("token={access}")).await;
    assert_eq!(answer.json()["active"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_caller_is_401_or_403_never_active_false() {
    let broker = http_broker().await;
    let pair = broker.issue("caller@example.com").await;
    let form = format!("token={}", expose(&pair.access.secret));
    let service_key = expose(&broker.keys.service);
    for auth in [
        basic("dev-service", "tbk_not_the_key"),
        basic("dev-admin", &service_key),
        basic("dev-service", ""),
        "authorization: Basic not-base64!".to_owned(),
        "authorization: Bearer tbk_not_the_key".to_owned(),
        "authorization: Digest x".to_owned(),
        "x-nothing: at all".to_owned(),
    ] {
        for path in ["/oauth2/introspect", "/oauth2/revoke"] {
            let answer = post(&broker, path, &auth, &form).await;
            assert_error(&answer, 401, "invalid_client");
            let challenges = answer.all("www-authenticate");
            assert!(
                challenges.iter().any(|c| c.starts_with("Basic")),
                "{answer:?}"
            );
        }
    }
    // A key without the service or admin role.
    let trigger = basic("dev-trigger", &expose(&broker.keys.trigger));
    for path in ["/oauth2/introspect", "/oauth2/revoke"] {
        let answer = post(&broker, path, &trigger, &form).await;
        assert_error(&answer, 403, "unauthorized_client");
    }
    assert!(
        broker.is_active(&pair.access.secret).await,
        "nothing revoked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_are_400_and_413() {
    let broker = http_broker().await;
    let auth = service(&broker);
    for form in [
        "",
        "tok=x",
        "token=",
        "token=a&token=b",
        "token=a&client_id=",
        "token=a&client_id=a&client_id=b",
    ] {
        let answer = introspect(&broker, &auth, form).await;
        if form == "token=a&client_id=" {
            // An empty client_id is no client_id, as on gRPC.
            assert_eq!(answer.body, r#"{"active":false}"#, "{form}");
            continue;
        }
        assert_error(&answer, 400, "invalid_request");
    }
    let json = curl(&[
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "--data-raw",
        r#"{"token":"x"}"#,
        &url(&broker, "/oauth2/introspect"),
    ])
    .await;
    assert_error(&json, 400, "invalid_request");
    let big = format!("token={}", "a".repeat(5000));
    for path in ["/oauth2/introspect", "/oauth2/revoke"] {
        let answer = post(&broker, path, &auth, &big).await;
        assert_error(&answer, 413, "invalid_request");
    }
    // Only POST; unknown paths are 404.
    let get = curl(&["-H", &auth, &url(&broker, "/oauth2/introspect")]).await;
    assert_eq!(get.status, 405);
    let nowhere = curl(&["-H", &auth, &url(&broker, "/oauth2/token")]).await;
    assert_error(&nowhere, 404, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_follows_rfc_7009_and_the_grpc_client_rules() {
    let broker = http_broker().await;
    let auth = service(&broker);
    let revoke = async |form: &str| post(&broker, "/oauth2/revoke", &auth, form).await;

    // Unknown, garbage, twice: 200 each time, with an empty body.
    for form in [
        "token=garbage",
        "token=garbage&token_type_hint=refresh_token",
    ] {
        let answer = revoke(form).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.body, "");
        assert_eq!(answer.header("cache-control"), Some("no-store"));
    }
    let answer = revoke("token=garbage&token_type_hint=id_token").await;
    assert_error(&answer, 400, "unsupported_token_type");
    let answer = revoke("token_type_hint=access_token").await;
    assert_error(&answer, 400, "invalid_request");

    // An app client's token needs its client_id (tokens.require_client_id).
    let pair = broker
        .issue_for_client("revoke-http@example.com", "app")
        .await;
    let other = broker
        .issue_for_client("revoke-http@example.com", "app")
        .await;
    let refresh = expose(&pair.refresh.secret);
    let answer = revoke(&format!("token={refresh}")).await;
    assert_error(&answer, 403, "unauthorized_client");
    let answer = revoke(&format!("token={refresh}&client_id=other-app")).await;
    assert_error(&answer, 403, "unauthorized_client");
    assert!(broker.is_active(&pair.access.secret).await);

    // Revoking the refresh token takes its access token with it, not the other session.
    let answer = revoke(&format!(
        "token={refresh}&client_id=app&token_type_hint=access_token"
    ))
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(!broker.is_active(&pair.refresh.secret).await);
    assert!(!broker.is_active(&pair.access.secret).await, "cascade");
    assert!(broker.is_active(&other.access.secret).await);
    let again = revoke(&format!("token={refresh}&client_id=app")).await;
    assert_eq!(again.status, 200, "idempotent");
    let answer = introspect(
        &broker,
        &auth,
        &format!("token={}", expose(&pair.access.secret)),
    )
    .await;
    assert_eq!(answer.body, r#"{"active":false}"#);
}

/// authlib's `introspect_token` and `revoke_token`, an RFC 7662/7009 client we did not write.
const AUTHLIB: &str = r#"
import json, sys
from authlib.integrations.requests_client import OAuth2Session
base, name, key, token = sys.argv[1:5]
def session(secret):
    return OAuth2Session(client_id=name, client_secret=secret,
                         token_endpoint_auth_method="client_secret_basic")
out = {}
r = session(key).introspect_token(base + "/oauth2/introspect", token=token, token_type_hint="access_token")
out["introspect"] = [r.status_code, r.json(), r.headers.get("cache-control")]
r = session(key + "x").introspect_token(base + "/oauth2/introspect", token=token)
out["wrong_secret"] = [r.status_code, r.json(), r.headers.get("www-authenticate")]
r = session(key).revoke_token(base + "/oauth2/revoke", token=token, token_type_hint="access_token")
out["revoke"] = [r.status_code, r.text]
r = session(key).introspect_token(base + "/oauth2/introspect", token=token)
out["after"] = [r.status_code, r.json()]
r = session(key).revoke_token(base + "/oauth2/revoke", token="never-issued")
out["unknown"] = [r.status_code]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_introspects_and_revokes() {
    let broker = http_broker().await;
    let pair = broker.issue("authlib@example.com").await;
    let base = url(&broker, "");
    let run = async |name: &str, key: &SecretString| {
        let out = python(
            AUTHLIB,
            &[&base, name, &expose(key), &expose(&pair.access.secret)],
        )
        .await;
        serde_json::from_str::<serde_json::Value>(&out).expect("json")
    };
    // A trigger key holds no role for these: 403 throughout, and nothing revoked.
    let denied = run("dev-trigger", &broker.keys.trigger).await;
    assert_eq!(denied["introspect"][0], 403, "{denied}");
    assert_eq!(denied["introspect"][1]["error"], "unauthorized_client");
    assert_eq!(denied["revoke"][0], 403);
    assert!(broker.is_active(&pair.access.secret).await);

    let out = run("dev-service", &broker.keys.service).await;
    assert_eq!(out["introspect"][0], 200, "{out}");
    assert_eq!(out["introspect"][1]["active"], true);
    assert_eq!(out["introspect"][1]["jti"], pair.access.token_id.as_str());
    assert_eq!(out["introspect"][2], "no-store");
    assert_eq!(out["wrong_secret"][0], 401);
    assert_eq!(out["wrong_secret"][1]["error"], "invalid_client");
    assert!(
        out["wrong_secret"][2]
            .as_str()
            .is_some_and(|c| c.contains("Basic"))
    );
    assert_eq!(out["revoke"][0], 200);
    assert_eq!(out["after"][0], 200);
    assert_eq!(out["after"][1], serde_json::json!({ "active": false }));
    assert_eq!(out["unknown"][0], 200);
    assert!(!broker.is_active(&pair.access.secret).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_503_never_active_false() {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let double = FaunaDouble::start(clock).await;
    let endpoint = double.endpoint();
    let key = double.server_key();
    let broker = TestBroker::spawn_with(move |s| {
        with_http(s);
        s.store.backend = StoreBackend::Fauna;
        s.store.fauna.endpoint = endpoint;
        s.store.fauna.secret = Some(key);
        s.store.fauna.max_attempts = 2;
        s.metrics.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let pair = broker.issue("outage@example.com").await;
    let form = format!("token={}", expose(&pair.access.secret));
    let auth = service(&broker);
    assert_eq!(
        introspect(&broker, &auth, &form).await.json()["active"],
        true
    );

    double.inject(Fault::Internal, 2);
    let answer = introspect(&broker, &auth, &form).await;
    assert_error(&answer, 503, "temporarily_unavailable");
    assert!(answer.header("retry-after").is_some(), "{answer:?}");
    double.inject(Fault::Internal, 2);
    let answer = post(&broker, "/oauth2/revoke", &auth, &form).await;
    assert_error(&answer, 503, "temporarily_unavailable");
    assert_eq!(
        introspect(&broker, &auth, &form).await.json()["active"],
        true
    );

    let scrape = broker.scrape().await;
    for series in [
        r#"tokenbroker_http_requests_total{endpoint="introspect",status="200"} 2"#,
        r#"tokenbroker_http_requests_total{endpoint="introspect",status="503"} 1"#,
        r#"tokenbroker_http_requests_total{endpoint="revoke",status="503"} 1"#,
    ] {
        assert!(scrape.contains(series), "{series} missing from\n{scrape}");
    }
    assert!(scrape.contains(
        "tokenbroker_http_duration_seconds_bucket{endpoint=\"introspect\",status=\"200\""
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_on_the_http_path() {
    let broker = http_broker().await;
    let pair = broker
        .issue_for_client("http-leak@example.com", "app")
        .await;
    let wrong_key = "tbk_wrong_http_key_that_must_not_be_echoed_0123456789";
    let garbage = "tbr_garbage_secret_that_must_not_be_logged_9876543210";
    let secrets = vec![
        expose(&broker.keys.service),
        expose(&broker.keys.trigger),
        expose(&pair.access.secret),
        expose(&pair.refresh.secret),
        wrong_key.to_owned(),
        garbage.to_owned(),
    ];
    let auth = service(&broker);
    let access = expose(&pair.access.secret);
    let refresh = expose(&pair.refresh.secret);
    let mut bodies = Vec::new();
    for (auth, path, form) in [
        (
            auth.clone(),
            "/oauth2/introspect",
            format!("token={access}"),
        ),
        (
            auth.clone(),
            "/oauth2/introspect",
            format!("token={garbage}"),
        ),
        (
            basic("dev-service", wrong_key),
            "/oauth2/introspect",
            format!("token={access}"),
        ),
        (
            format!("authorization: Bearer {wrong_key}"),
            "/oauth2/revoke",
            format!("token={access}"),
        ),
        (
            basic("dev-trigger", &expose(&broker.keys.trigger)),
            "/oauth2/revoke",
            format!("token={refresh}"),
        ),
        (auth.clone(), "/oauth2/revoke", format!("token={refresh}")),
        (
            auth.clone(),
            "/oauth2/revoke",
            format!("token={refresh}&client_id=app"),
        ),
        (
            auth.clone(),
            "/oauth2/revoke",
            format!("token={garbage}&token_type_hint=x"),
        ),
        (
            auth.clone(),
            "/oauth2/introspect",
            format!("token={garbage}&token={garbage}"),
        ),
    ] {
        bodies.push(post(&broker, path, &auth, &form).await.body);
    }
    let authz = curl(&[
        "-H",
        &format!("x-tokenbroker-key: {wrong_key}"),
        "-H",
        &format!("authorization: Bearer {access}"),
        &url(&broker, "/oauth2/authz"),
    ])
    .await;
    bodies.push(authz.body);
    let logged = logs().contents();
    for secret in &secrets {
        assert!(
            !logged.contains(secret.as_str()),
            "a secret reached the log"
        );
        for body in &bodies {
            assert!(
                !body.contains(secret.as_str()),
                "an answer echoes a secret: {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_speaks_tls_with_the_grpc_certificate_and_mtls_callers() {
    use tokenbroker::{
        app::tls::ClientAuth,
        identity::{Role, auth::CertCallerConfig},
    };

    use crate::tls::{Ca, Files, trusting};

    let ca = Ca::new("Test CA");
    let files = Files::new(&ca.server(), &ca);
    let gateway = ca.client("gateway");
    let broker = TestBroker::spawn_tls(
        |s| {
            with_http(s);
            s.server.tls = Some(files.settings(Some(ClientAuth::Optional)));
            s.cert_callers = vec![CertCallerConfig {
                name: "gateway".into(),
                subject: "CN=gateway,O=Example".into(),
                roles: vec![Role::Service],
            }];
        },
        trusting(&ca),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca_file = write("ca.pem", &ca.pem());
    let cert_file = write("client.pem", &gateway.cert);
    let key_file = write("client.key", &gateway.key);
    let pair = broker.issue("tls-http@example.com").await;
    let https = format!("https://{}/oauth2/introspect", broker.http_addr.unwrap());
    let form = format!("token={}", expose(&pair.access.secret));
    let auth = service(&broker);
    for version in ["--http1.1", "--http2"] {
        let answer = curl(&[
            version,
            "--cacert",
            &ca_file,
            "-H",
            &auth,
            "--data-raw",
            &form,
            &https,
        ])
        .await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json()["active"], true);
        let expected = if version == "--http1.1" {
            "HTTP/1.1"
        } else {
            "HTTP/2"
        };
        assert_eq!(answer.version, expected);
    }
    // A mapped client certificate is the caller when no authorization header is sent.
    let answer = curl(&[
        "--cacert",
        &ca_file,
        "--cert",
        &cert_file,
        "--key",
        &key_file,
        "--data-raw",
        &form,
        &https,
    ])
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json()["active"], true);
    let answer = curl(&["--cacert", &ca_file, "--data-raw", &form, &https]).await;
    assert_error(&answer, 401, "invalid_client");

    // Plaintext to the TLS port gets no answer.
    let plain = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "--data-raw", &form])
        .arg(format!(
            "http://{}/oauth2/introspect",
            broker.http_addr.unwrap()
        ))
        .output()
        .await
        .unwrap();
    assert!(!plain.status.success() || !String::from_utf8_lossy(&plain.stdout).contains("active"));
}
