//! The double end to end, over HTTP: what each request is answered, byte for byte where the
//! real endpoint's answer is known.

use std::{collections::BTreeSet, sync::Arc, time::Instant};

use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Map, Value as Json, json};
use tokenbroker::{model::clock::ManualClock, store::fauna::queries};
use tokio::task::JoinSet;

use super::{
    query::hex_digest,
    secret::{decode_token_secret, mint_secret},
    *,
};

/// A started double on a manual clock, and an HTTP client.
struct Harness {
    double: FaunaDouble,
    clock: Arc<ManualClock>,
    http: reqwest::Client,
}

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    raw: String,
    body: Json,
}

/// The limits [`harness`] publishes: wider than any rotation below asks for, except where a
/// test shows the clamp.
const POLICY_ACCESS_TTL: i64 = 3600;
const POLICY_REFRESH_TTL: i64 = 7 * 86_400;
const POLICY_GRACE: i64 = 60;

fn policy_args(any_client: bool) -> Json {
    json!({
        "access_ttl": int(POLICY_ACCESS_TTL),
        "refresh_ttl": int(POLICY_REFRESH_TTL),
        "grace": int(POLICY_GRACE),
        "session_ttl": int(30 * 86_400),
        "any_client": any_client,
    })
}

/// A double with the broker's policy published, as the broker does at start.
async fn harness() -> Harness {
    let h = bare_harness().await;
    let answer = h
        .query(SERVER_KEY, queries::PUBLISH_POLICY, policy_args(true))
        .await;
    assert_eq!(answer.body["data"], json!(true), "{}", answer.raw);
    h.double.clear_requests();
    // The next transaction runs at the clock's time, not one tick after this one.
    h.clock.advance(Duration::from_secs(1));
    h
}

/// A double with nothing in it.
async fn bare_harness() -> Harness {
    let clock = Arc::new(ManualClock::new());
    let double = FaunaDouble::start(clock.clone()).await;
    Harness {
        double,
        clock,
        http: reqwest::Client::new(),
    }
}

fn int(n: i64) -> Json {
    json!({ "@int": n.to_string() })
}

/// Arguments for the issue texts.
fn issue_args(email: &str) -> Json {
    json!({
        "email": email,
        "cognito_sub": "5f0c1a3e-0000-4000-8000-000000000001",
        "client_id": "app",
        // A fresh broker call each time: the same nonce is a retry of one call.
        "nonce": format!("{:016x}", rand::random::<u64>()),
        "retried": false,
        "access_ttl": int(900),
        "refresh_ttl": int(86_400),
        "session_ttl": int(30 * 86_400),
        "metadata": { "groups": ["users"] },
    })
}

fn rotate_args(grace: i64, client_id: Option<&str>) -> Json {
    json!({
        "access_ttl": int(900),
        "refresh_ttl": int(86_400),
        "grace": int(grace),
        "client_id": client_id,
        "any_client": true,
        "session_ttl": int(30 * 86_400),
        // A fresh broker call each time.
        "attempt": format!("{:032x}", rand::random::<u128>()),
        "coalesce": false,
    })
}

fn s(v: &Json) -> &str {
    v.as_str().expect("a string")
}

impl Harness {
    /// Posts `body` to `path` with `Authorization: Bearer <bearer>` and `headers`, and with
    /// `X-Typecheck: false` unless `headers` name that header, as the broker sends it.
    async fn post(
        &self,
        path: &str,
        bearer: Option<&str>,
        headers: &[(&str, &str)],
        body: String,
    ) -> Answer {
        let mut request = self
            .http
            .post(format!("{}{path}", self.double.endpoint()))
            .body(body);
        if let Some(bearer) = bearer {
            request = request.header("authorization", format!("Bearer {bearer}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if !headers.iter().any(|(name, _)| *name == "x-typecheck") {
            request = request.header("x-typecheck", "false");
        }
        let response = request.send().await.expect("the double answers");
        let status = response.status().as_u16();
        let www_authenticate = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let raw = response.text().await.expect("a body");
        let body = serde_json::from_str(&raw).unwrap_or(Json::Null);
        Answer {
            status,
            www_authenticate,
            raw,
            body,
        }
    }

    /// Runs `text` in the tagged format, as the broker does.
    async fn query(&self, bearer: &str, text: &str, arguments: Json) -> Answer {
        let body = json!({ "query": text, "arguments": arguments }).to_string();
        self.post(
            "/query/1",
            Some(bearer),
            &[("x-format", "tagged"), ("x-query-tags", "rpc=test")],
            body,
        )
        .await
    }

    /// Issues a pair for `email` with the server key and returns `data`.
    async fn issue(&self, email: &str) -> Json {
        let answer = self
            .query(SERVER_KEY, queries::ISSUE_BY_EMAIL, issue_args(email))
            .await;
        assert_eq!(answer.status, 200, "{}", answer.raw);
        answer.body["data"].clone()
    }

    /// Whether `secret` authenticates `Query.token()`.
    async fn active(&self, secret: &str) -> bool {
        let answer = self.query(secret, queries::INTROSPECT, json!({})).await;
        match answer.status {
            200 => true,
            401 => false,
            _ => panic!("unexpected answer {answer:?}"),
        }
    }
}

/// The body of a 400 `invalid_request`.
fn invalid_request(message: &str) -> Json {
    json!({ "error": { "code": "invalid_request", "message": message } })
}

fn assert_query_error(answer: &Answer, code: &str, message: &str) {
    assert_eq!(answer.status, 400, "{}", answer.raw);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.raw);
    assert_eq!(answer.body["error"]["message"], message, "{}", answer.raw);
    assert!(answer.body["summary"].is_string(), "{}", answer.raw);
    assert!(answer.body["txn_ts"].is_i64(), "{}", answer.raw);
    assert!(answer.body["schema_version"].is_i64(), "{}", answer.raw);
    assert_eq!(
        answer.body["stats"].as_object().map(Map::len),
        Some(8),
        "{}",
        answer.raw
    );
    assert!(answer.body.get("data").is_none());
}

#[tokio::test]
async fn wrong_key_is_unauthorized_with_the_exact_body() {
    let h = harness().await;
    let unauthorized =
        json!({ "error": { "code": "unauthorized", "message": "Access token required" } });
    let body = json!({ "query": queries::INTROSPECT }).to_string();
    let forged = mint_secret(412_000_000_000_000_001, 7);
    for bearer in [
        Some("secret:wrong"),
        Some("secret"),
        Some(forged.as_str()),
        None,
    ] {
        let answer = h.post("/query/1", bearer, &[], body.clone()).await;
        assert_eq!(answer.status, 401, "{bearer:?}");
        assert_eq!(answer.body, unauthorized, "{bearer:?}");
        assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"));
    }
    // A 401 is rendered with the request's tags (FQL2Endpoint.exec → renderThunk).
    let answer = h
        .post(
            "/query/1",
            Some("nope"),
            &[("x-query-tags", "rpc=introspect")],
            body.clone(),
        )
        .await;
    assert_eq!(answer.status, 401);
    assert_eq!(
        answer.body,
        json!({ "error": unauthorized["error"], "query_tags": "rpc=introspect" })
    );
    // Basic carries `base64("<secret>:")`.
    let basic = |secret: &str| format!("Basic {}", STANDARD.encode(format!("{secret}:")));
    for (auth, status) in [(basic(SERVER_KEY), 200), (basic("secret:wrong"), 401)] {
        let response = h
            .http
            .post(format!("{}/query/1", h.double.endpoint()))
            .header("authorization", auth)
            .header("x-typecheck", "false")
            .body(body.clone())
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status().as_u16(), status);
    }
    let bearers: Vec<Bearer> = h.double.requests().iter().map(|r| r.bearer).collect();
    assert_eq!(
        bearers[..5],
        [
            Bearer::Other,
            Bearer::Other,
            Bearer::Token,
            Bearer::Missing,
            Bearer::Other
        ]
    );
    assert_eq!(bearers[5], Bearer::Key);
}

#[tokio::test]
async fn tagged_arguments_must_tag_their_numbers() {
    let h = harness().await;
    let cases = [
        (
            json!({ "email": 5 }),
            "Invalid argument 'email': numbers must be tagged",
        ),
        (
            json!({ "email": { "@int": "1", "@long": "1" } }),
            "Invalid argument 'email': too many keys in tagged value",
        ),
        (
            json!({ "email": { "@int": "x" } }),
            "Invalid argument 'email': invalid integer",
        ),
        (
            json!({ "email": { "@int": 1 } }),
            "Invalid argument 'email': @int requires a string value",
        ),
        (
            json!({ "email": { "@time": "yesterday" } }),
            "Invalid argument 'email': invalid time",
        ),
        (
            json!({ "email": { "@foo": "1" } }),
            "Invalid argument 'email': invalid tag '@foo'",
        ),
        (
            json!({ "email": { "@mod": "Nope" } }),
            "Invalid argument 'email': no such module 'Nope'",
        ),
        (
            json!({ "email": [{ "a": 1.5 }] }),
            "Invalid argument 'email': numbers must be tagged",
        ),
    ];
    for (arguments, message) in cases {
        let answer = h
            .query(SERVER_KEY, queries::ACCOUNT_BY_EMAIL, arguments)
            .await;
        assert_eq!(answer.status, 400, "{message}");
        // An argument error is rendered with the request's tags.
        let mut expected = invalid_request(message);
        expected["query_tags"] = json!("rpc=test");
        assert_eq!(answer.body, expected);
    }
    // Well-formed tags decode, `@object` shields `@` keys.
    let metadata = json!({ "@object": { "@weird": { "@int": "1" } } });
    let mut args = issue_args("tags@example.com");
    args["metadata"] = metadata.clone();
    let issued = h.query(SERVER_KEY, queries::ISSUE_BY_EMAIL, args).await;
    assert_eq!(issued.status, 200, "{}", issued.raw);
    let access = s(&issued.body["data"]["access"]["secret"]).to_owned();
    let token = h.query(&access, queries::INTROSPECT, json!({})).await;
    assert_eq!(token.body["data"]["@doc"]["data"]["metadata"], metadata);
    // The simple format takes numbers as they are.
    let body = json!({ "query": queries::ACCOUNT_BY_EMAIL, "arguments": { "email": 5 } });
    let answer = h
        .post("/query/1", Some(SERVER_KEY), &[], body.to_string())
        .await;
    assert_eq!(answer.status, 200, "{}", answer.raw);
    assert_eq!(answer.body["data"], Json::Null);
}

#[tokio::test]
async fn unknown_query_text_is_invalid_query() {
    let h = harness().await;
    let answer = h
        .query(SERVER_KEY, "Account.all().toArray()", json!({}))
        .await;
    assert_query_error(
        &answer,
        "invalid_query",
        "The query failed 1 validation check",
    );
    assert!(s(&answer.body["summary"]).contains(&hex_digest(b"Account.all().toArray()")));
    assert_eq!(answer.body["query_tags"], "rpc=test");
    assert_eq!(h.double.requests()[0].query, None);
    // One changed byte is another query.
    let answer = h
        .query(SERVER_KEY, &format!("{} ", queries::INTROSPECT), json!({}))
        .await;
    assert_query_error(
        &answer,
        "invalid_query",
        "The query failed 1 validation check",
    );
    // A template made of text is its text; one with values cannot run here.
    let text = json!({ "query": { "fql": [queries::INTROSPECT] } }).to_string();
    let answer = h.post("/query/1", Some(SERVER_KEY), &[], text).await;
    assert_eq!(answer.status, 200, "{}", answer.raw);
    let template = json!({ "query": { "fql": ["1 + ", { "value": { "@int": "1" } }] } });
    let answer = h
        .post("/query/1", Some(SERVER_KEY), &[], template.to_string())
        .await;
    assert_query_error(
        &answer,
        "invalid_query",
        "The query failed 1 validation check",
    );
}

#[tokio::test]
async fn bad_headers_are_invalid_request() {
    let h = harness().await;
    let long_key = format!("{}=v", "k".repeat(41));
    let many: Vec<String> = (0..26).map(|i| format!("k{i}=v")).collect();
    let many = many.join(",");
    let cases: [(&str, &str, &str); 14] = [
        (
            "x-format",
            "json",
            "Invalid header 'x-format': Invalid format json",
        ),
        (
            "x-format",
            "Tagged",
            "Invalid header 'x-format': Invalid format Tagged",
        ),
        (
            "x-query-timeout-ms",
            "0",
            "Invalid header 'x-query-timeout-ms': Must be greater than 0.",
        ),
        (
            "x-query-timeout-ms",
            "600001",
            "Invalid header 'x-query-timeout-ms': Must be less than or equal to 600000.",
        ),
        (
            "x-query-timeout-ms",
            "5s",
            "Invalid header 'x-query-timeout-ms': Invalid number '5s'.",
        ),
        (
            "x-max-contention-retries",
            "8",
            "Invalid header 'x-max-contention-retries': Must be between 0 and 7.",
        ),
        (
            "x-linearized",
            "yes",
            "Invalid header 'x-linearized': Must be a boolean value.",
        ),
        (
            "x-typecheck",
            "1",
            "Invalid header 'x-typecheck': Must be a boolean value.",
        ),
        (
            "x-last-txn-ts",
            "later",
            "Invalid header 'x-last-txn-ts': Invalid timestamp 'later'.",
        ),
        (
            "x-query-tags",
            "foo,,",
            "Invalid header 'x-query-tags': invalid tags",
        ),
        (
            "x-query-tags",
            "a=b c",
            "Invalid header 'x-query-tags': invalid tags",
        ),
        (
            "x-query-tags",
            &long_key,
            "Invalid header 'x-query-tags': invalid key",
        ),
        (
            "x-query-tags",
            &many,
            "Invalid header 'x-query-tags': too many tags",
        ),
        (
            "x-query-tags",
            "a=1,b=2,a=3",
            "Invalid header 'x-query-tags': duplicate key",
        ),
    ];
    let body = json!({ "query": queries::INTROSPECT }).to_string();
    for (name, value, message) in cases {
        // Header errors come before authentication.
        let answer = h
            .post("/query/1", None, &[(name, value)], body.clone())
            .await;
        assert_eq!(answer.status, 400, "{name}: {value}");
        assert_eq!(answer.body, invalid_request(message), "{name}: {value}");
    }
    // Good values pass; tags come back in the server's (reversed) order.
    let good = [
        ("x-format", "simple"),
        ("x-query-timeout-ms", "600000"),
        ("x-max-contention-retries", "0"),
        ("x-linearized", "TRUE"),
        ("x-typecheck", "false"),
        ("x-last-txn-ts", "123"),
        ("x-query-tags", "a=1,b_2=x"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
    ];
    let answer = h.post("/query/1", Some(SERVER_KEY), &good, body).await;
    assert_eq!(answer.status, 200, "{}", answer.raw);
    assert_eq!(answer.body["query_tags"], "b_2=x,a=1");
    let recorded = h.double.requests().pop().expect("recorded");
    assert_eq!(recorded.query, Some("introspect"));
    assert_eq!(recorded.query_tags.as_deref(), Some("a=1,b_2=x"));
    assert_eq!(recorded.query_timeout_ms.as_deref(), Some("600000"));
    assert_eq!(recorded.last_txn_ts.as_deref(), Some("123"));
    assert_eq!(recorded.max_contention_retries.as_deref(), Some("0"));
    assert_eq!(recorded.format.as_deref(), Some("simple"));
    assert!(recorded.traceparent.is_some());
    assert_eq!(recorded.status, Some(200));
}

#[tokio::test]
async fn bad_bodies_are_invalid_request() {
    let h = harness().await;
    let cases = [
        ("", "No request body provided"),
        (r#"{"foo":"bar"}"#, "Invalid request body"),
        (r#"{"query":1}"#, "Invalid request body"),
        (
            r#"{"query":"Query.token()","arguments":[]}"#,
            "Invalid request body",
        ),
        ("[]", "Invalid request body"),
    ];
    for (body, message) in cases {
        let answer = h.post("/query/1", Some(SERVER_KEY), &[], body.into()).await;
        assert_eq!(answer.status, 400, "{body}");
        assert_eq!(answer.body, invalid_request(message), "{body}");
    }
    let answer = h
        .post("/query/1", Some(SERVER_KEY), &[], "{not json".into())
        .await;
    assert_eq!(answer.status, 400);
    assert!(s(&answer.body["error"]["message"]).starts_with("Invalid request body: "));
    let nested = format!("{{\"query\":{}1{}}}", "[".repeat(200), "]".repeat(200));
    let answer = h.post("/query/1", Some(SERVER_KEY), &[], nested).await;
    assert_eq!(
        answer.body,
        invalid_request("Invalid request body: JSON exceeds nesting limit")
    );
    let body = json!({ "query": queries::INTROSPECT }).to_string();
    let answer = h.post("/query/2", Some(SERVER_KEY), &[], body).await;
    assert_eq!(answer.status, 404);
}

#[tokio::test]
async fn issued_tokens_authenticate_until_their_ttl() {
    let h = harness().await;
    let data = h.issue("ttl@example.com").await;
    let account = s(&data["account"]);
    assert!(account.len() == 18 && account.bytes().all(|b| b.is_ascii_digit()));
    let family = s(&data["family"]);
    assert!(family.starts_with(&format!("fam_{account}_")) && family.len() == 18 + 5 + 16);
    assert!(data["now"]["@time"].is_string());
    let refresh = s(&data["refresh"]["secret"]).to_owned();
    let access = s(&data["access"]["secret"]).to_owned();
    for (minted, secret) in [(&data["refresh"], &refresh), (&data["access"], &access)] {
        assert_eq!(secret.len(), 51);
        assert!(secret.starts_with("fnE"));
        let (id, _, _) = decode_token_secret(secret).expect("a token secret's layout");
        assert_eq!(id.to_string(), s(&minted["id"]));
    }

    let answer = h.query(&access, queries::INTROSPECT, json!({})).await;
    assert_eq!(answer.status, 200, "{}", answer.raw);
    let doc = &answer.body["data"]["@doc"];
    assert_eq!(doc["id"], data["access"]["id"]);
    assert_eq!(doc["coll"], json!({ "@mod": "Token" }));
    assert_eq!(
        doc["document"],
        json!({ "@ref": { "id": account, "coll": { "@mod": "Account" } } })
    );
    assert_eq!(doc["ttl"], data["access"]["ttl"]);
    assert_eq!(doc["data"]["kind"], "access");
    assert_eq!(doc["data"]["parent"], data["refresh"]["id"]);
    assert_eq!(doc["data"]["issued_at"], data["now"]);
    assert_eq!(doc["data"]["client_id"], "app");
    assert!(doc.get("secret").is_none() && !answer.raw.contains(&access));
    assert_eq!(answer.body["summary"], "");
    assert!(answer.body["txn_ts"].as_i64() > Some(0));

    // A server key has no token.
    let answer = h.query(SERVER_KEY, queries::INTROSPECT, json!({})).await;
    assert_eq!(answer.body["data"], Json::Null);

    // Expiry is exact: at the ttl the secret is dead (`docs/design.md` "Fauna over HTTP ›
    // Authentication, expiry and revocation").
    h.clock.advance(Duration::from_secs(899));
    assert!(h.active(&access).await);
    h.clock.advance(Duration::from_secs(1));
    assert!(!h.active(&access).await);
    assert!(h.active(&refresh).await);
    assert_eq!(h.double.live_token_count(), 1);
    h.clock.advance(Duration::from_secs(86_400));
    assert!(!h.active(&refresh).await);
    // A scope suffix on a token is ignored; a tampered secret is not a token.
    let data = h.issue("ttl@example.com").await;
    let refresh = s(&data["refresh"]["secret"]).to_owned();
    assert!(h.active(&format!("{refresh}:@role/admin")).await);
    let mut tampered = refresh.clone().into_bytes();
    tampered[50] = if tampered[50] == b'A' { b'Q' } else { b'A' };
    assert!(!h.active(&String::from_utf8(tampered).expect("ascii")).await);
}

#[tokio::test]
async fn revoked_tokens_are_refused() {
    let h = harness().await;
    let data = h.issue("revoke@example.com").await;
    let refresh = s(&data["refresh"]["secret"]).to_owned();
    let access = s(&data["access"]["secret"]).to_owned();

    let answer = h
        .query(
            &access,
            queries::REVOKE_SECRET,
            json!({ "client_id": "other", "any_client": true }),
        )
        .await;
    assert_eq!(answer.body["data"], json!({ "outcome": "wrong_client" }));
    let answer = h
        .query(
            &access,
            queries::REVOKE_SECRET,
            json!({ "client_id": null, "any_client": true }),
        )
        .await;
    assert_eq!(
        answer.body["data"],
        json!({ "outcome": "revoked", "revoked": int(1) })
    );
    assert!(!h.active(&access).await);
    assert!(h.active(&refresh).await);
    let answer = h
        .query(
            &refresh,
            queries::REVOKE_SECRET,
            json!({ "client_id": "app", "any_client": true }),
        )
        .await;
    assert_eq!(
        answer.body["data"],
        json!({ "outcome": "revoked", "revoked": int(1) })
    );
    assert!(!h.active(&refresh).await);
    let answer = h
        .query(
            SERVER_KEY,
            queries::REVOKE_SECRET,
            json!({ "client_id": null, "any_client": true }),
        )
        .await;
    assert_eq!(answer.body["data"], json!({ "outcome": "inactive" }));

    // By id (a refresh id takes its family), by family, by account.
    let data = h.issue("revoke@example.com").await;
    let account = data["account"].clone();
    let answer = h
        .query(
            SERVER_KEY,
            queries::REVOKE_TOKEN,
            json!({ "token_id": data["refresh"]["id"] }),
        )
        .await;
    assert_eq!(answer.body["data"], int(2), "{}", answer.raw);
    let answer = h
        .query(
            SERVER_KEY,
            queries::REVOKE_TOKEN,
            json!({ "token_id": data["refresh"]["id"] }),
        )
        .await;
    assert_eq!(answer.body["data"], int(0));
    let data = h.issue("revoke@example.com").await;
    let family_args = json!({ "account_id": account, "family": data["family"] });
    let answer = h
        .query(SERVER_KEY, queries::REVOKE_FAMILY, family_args)
        .await;
    assert_eq!(answer.body["data"], int(2), "{}", answer.raw);
    h.issue("revoke@example.com").await;
    h.issue("revoke@example.com").await;
    let answer = h
        .query(
            SERVER_KEY,
            queries::REVOKE_ACCOUNT,
            json!({ "account_id": account }),
        )
        .await;
    assert_eq!(answer.body["data"], int(4), "{}", answer.raw);
    assert_eq!(h.double.live_token_count(), 0);
    let answer = h
        .query(
            SERVER_KEY,
            queries::REVOKE_ACCOUNT,
            json!({ "account_id": "1" }),
        )
        .await;
    assert_eq!(answer.body["data"], int(0));
}

#[tokio::test]
async fn concurrent_first_issues_converge_on_one_account() {
    let h = Arc::new(harness().await);
    let mut tasks = JoinSet::new();
    for _ in 0..16 {
        let h = Arc::clone(&h);
        tasks.spawn(async move { h.issue("Same@Example.com").await["account"].clone() });
    }
    let accounts: BTreeSet<String> = tasks
        .join_all()
        .await
        .iter()
        .map(|a| s(a).to_owned())
        .collect();
    assert_eq!(accounts.len(), 1);
    assert_eq!(h.double.account_count(), 1);
    assert_eq!(h.double.live_token_count(), 32);
    let answer = h
        .query(
            SERVER_KEY,
            queries::ACCOUNT_BY_EMAIL,
            json!({ "email": "Same@Example.com" }),
        )
        .await;
    assert_eq!(answer.body["data"], accounts.first().expect("one").as_str());
    // Uniqueness is an exact match (`docs/design.md` "Fauna over HTTP › Unique constraints"):
    // another spelling is another account.
    h.issue("same@example.com").await;
    assert_eq!(h.double.account_count(), 2);
}

/// Runs `n` queries at once, `call(i)` giving each its text, arguments and extra headers, and
/// returns the answers in the order of `i`.
async fn at_once(
    h: &Arc<Harness>,
    n: usize,
    call: impl Fn(usize) -> (&'static str, Json, Vec<(&'static str, &'static str)>),
) -> Vec<Answer> {
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let (text, arguments, headers) = call(i);
        let h = Arc::clone(h);
        tasks.spawn(async move {
            let mut all = vec![("x-format", "tagged")];
            all.extend(headers);
            let body = json!({ "query": text, "arguments": arguments }).to_string();
            (i, h.post("/query/1", Some(SERVER_KEY), &all, body).await)
        });
    }
    let mut answers = tasks.join_all().await;
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, a)| a).collect()
}

/// `stats.contention_retries` of each answer.
fn contention_retries(answers: &[Answer]) -> Vec<u64> {
    answers
        .iter()
        .map(|a| {
            a.body["stats"]["contention_retries"]
                .as_u64()
                .expect("stats")
        })
        .collect()
}

#[tokio::test]
async fn overlapping_transactions_conflict_on_what_they_read() {
    let h = Arc::new(harness().await);
    // Long enough that the requests below overlap on a loaded machine (300 ms was not always).
    h.double.set_transaction_time(Duration::from_secs(1));
    let issue = |email: String| move |_| (queries::ISSUE_BY_EMAIL, issue_args(&email), Vec::new());

    // First sign-ins of one email all read its index term; the first commit writes it, and the
    // others run again, and find that account.
    let answers = at_once(&h, 6, issue("crowd@example.com".into())).await;
    let accounts: BTreeSet<&str> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 200, "{}", a.raw);
            s(&a.body["data"]["account"])
        })
        .collect();
    assert_eq!(accounts.len(), 1);
    assert_eq!(h.double.account_count(), 1);
    let retries = contention_retries(&answers);
    assert!(retries.contains(&0) && retries.contains(&1), "{retries:?}");

    // Later sign-ins of that account read its email only, which none of them writes: the
    // tokens' index is written, never read, on a first attempt.
    let answers = at_once(&h, 6, issue("crowd@example.com".into())).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(contention_retries(&answers), [0; 6]);
    // Sign-ins of other emails share nothing.
    let answers = at_once(&h, 6, |i| {
        let email = format!("solo{i}@example.com");
        (queries::ISSUE_BY_EMAIL, issue_args(&email), Vec::new())
    })
    .await;
    assert_eq!(contention_retries(&answers), [0; 6]);
    assert_eq!(h.double.live_token_count(), 36);

    // Two rotations of one token both read and write it: one runs again.
    let refresh = s(&answers[0].body["data"]["refresh"]["secret"]).to_owned();
    let mut tasks = JoinSet::new();
    for _ in 0..2 {
        let (h, refresh) = (Arc::clone(&h), refresh.clone());
        tasks.spawn(async move {
            h.query(&refresh, queries::ROTATE, rotate_args(60, Some("app")))
                .await
        });
    }
    let answers = tasks.join_all().await;
    assert!(
        answers
            .iter()
            .all(|a| a.body["data"]["outcome"] == "rotated")
    );
    let mut retries = contention_retries(&answers);
    retries.sort_unstable();
    assert_eq!(retries, [0, 1]);

    // With no retry allowed, the loser gets 409 and writes nothing.
    let tokens = h.double.live_token_count();
    let answers = at_once(&h, 2, |_| {
        (
            queries::ISSUE_BY_EMAIL,
            issue_args("late@example.com"),
            vec![("x-max-contention-retries", "0")],
        )
    })
    .await;
    let mut statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409]);
    let lost = answers.iter().find(|a| a.status == 409).expect("a loser");
    assert_eq!(
        lost.body,
        json!({ "error": {
            "code": "contended_transaction",
            "message": "Transaction was aborted due to detection of concurrent modification."
        } })
    );
    assert_eq!(h.double.account_count(), 8);
    assert_eq!(h.double.live_token_count(), tokens + 2);
}

#[tokio::test]
async fn a_typechecked_database_runs_only_the_function_calls() {
    let h = harness().await;
    let pair = h.issue("typed@example.com").await;
    let refresh = s(&pair["refresh"]["secret"]).to_owned();
    // Exactly these headers: `Harness::post` would turn the checker off.
    let send = async |bearer: &str, text: &str, arguments: Json, typecheck: Option<&str>| {
        let mut request = h
            .http
            .post(format!("{}/query/1", h.double.endpoint()))
            .bearer_auth(bearer)
            .header("x-format", "tagged")
            .body(json!({ "query": text, "arguments": arguments }).to_string());
        if let Some(value) = typecheck {
            request = request.header("x-typecheck", value);
        }
        let response = request.send().await.expect("an answer");
        let status = response.status().as_u16();
        (status, response.json::<Json>().await.expect("JSON"))
    };
    // The checker is on unless the request turns it off.
    for typecheck in [None, Some("true"), Some("TRUE")] {
        let (status, body) = send(SERVER_KEY, queries::INTROSPECT, json!({}), typecheck).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{body}");
        assert!(s(&body["summary"]).contains("X-Typecheck: false"), "{body}");
        // A token holder's direct call of a schema function passes the checker.
        let (status, body) = send(
            &refresh,
            queries::ROTATE,
            rotate_args(60, Some("app")),
            typecheck,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["outcome"], "rotated", "{body}");
    }
    let (status, body) = send(SERVER_KEY, queries::INTROSPECT, json!({}), Some("false")).await;
    assert_eq!(status, 200, "{body}");
    let recorded: Vec<Option<String>> = h
        .double
        .requests()
        .into_iter()
        .map(|r| r.typecheck)
        .collect();
    assert_eq!(recorded[1], None);
    assert_eq!(recorded[3].as_deref(), Some("true"));
    assert_eq!(recorded.last().cloned().flatten().as_deref(), Some("false"));
}

#[tokio::test]
async fn issue_for_a_missing_account_is_document_not_found() {
    let h = harness().await;
    let mut args = issue_args("x@example.com");
    args["account_id"] = json!("412000000000000001");
    let answer = h
        .query(SERVER_KEY, queries::ISSUE_FOR_ACCOUNT, args.clone())
        .await;
    assert_query_error(
        &answer,
        "document_not_found",
        "Collection `Account` does not contain document with id 412000000000000001.",
    );
    assert!(
        s(&answer.body["summary"]).contains("at *query*:1:27"),
        "{}",
        answer.raw
    );
    assert_eq!(h.double.live_token_count(), 0);
    // With a known account it mints without a lookup by email.
    let data = h.issue("x@example.com").await;
    args["account_id"] = data["account"].clone();
    let answer = h
        .query(SERVER_KEY, queries::ISSUE_FOR_ACCOUNT, args.clone())
        .await;
    assert_eq!(
        answer.body["data"]["account"], data["account"],
        "{}",
        answer.raw
    );
    // A missing argument is a runtime error, and nothing is written.
    let before = h.double.live_token_count();
    let mut partial = args;
    partial.as_object_mut().expect("object").remove("nonce");
    let answer = h
        .query(SERVER_KEY, queries::ISSUE_FOR_ACCOUNT, partial)
        .await;
    assert_query_error(&answer, "unbound_variable", "Unbound variable `nonce`");
    assert_eq!(h.double.live_token_count(), before);
}

#[tokio::test]
async fn rotation_follows_the_udf() {
    let h = harness().await;
    let data = h.issue("rotate@example.com").await;
    let first = s(&data["refresh"]["secret"]).to_owned();
    let access = s(&data["access"]["secret"]).to_owned();

    // Access tokens have no call privilege; a key has no token.
    let answer = h
        .query(&access, queries::ROTATE, rotate_args(10, None))
        .await;
    assert_query_error(
        &answer,
        "permission_denied",
        "Insufficient privileges to perform the action.",
    );
    let answer = h
        .query(SERVER_KEY, queries::ROTATE, rotate_args(10, None))
        .await;
    assert_eq!(answer.body["data"], json!({ "outcome": "inactive" }));
    let answer = h
        .query(&first, queries::ROTATE, rotate_args(10, Some("web")))
        .await;
    assert_eq!(answer.body["data"], json!({ "outcome": "wrong_client" }));

    let answer = h
        .query(&first, queries::ROTATE, rotate_args(10, Some("app")))
        .await;
    let rotated = &answer.body["data"];
    assert_eq!(rotated["outcome"], "rotated", "{}", answer.raw);
    assert_eq!(rotated["family"], data["family"]);
    assert_eq!(rotated["account"], data["account"]);
    let second = s(&rotated["refresh"]["secret"]).to_owned();
    let second_access = s(&rotated["access"]["secret"]).to_owned();
    let introspected = h.query(&first, queries::INTROSPECT, json!({})).await;
    let consumed = &introspected.body["data"]["@doc"]["data"];
    assert_eq!(consumed["replaced_by"], rotated["refresh"]["id"]);
    assert!(consumed["rotated_at"]["@time"].is_string());
    // A consumed refresh token can still be revoked only as inactive.
    let answer = h
        .query(
            &first,
            queries::REVOKE_SECRET,
            json!({ "client_id": null, "any_client": true }),
        )
        .await;
    assert_eq!(answer.body["data"], json!({ "outcome": "inactive" }));

    // Within grace, the predecessor supersedes its successor (a lost answer retried).
    h.clock.advance(Duration::from_secs(5));
    let answer = h
        .query(&first, queries::ROTATE, rotate_args(10, None))
        .await;
    assert_eq!(answer.body["data"]["outcome"], "rotated", "{}", answer.raw);
    let third = s(&answer.body["data"]["refresh"]["secret"]).to_owned();
    // The superseded successor is kept, marked, so that presenting it again is reuse; its
    // access token is gone.
    let superseded = h.query(&second, queries::INTROSPECT, json!({})).await;
    assert_eq!(
        superseded.body["data"]["@doc"]["data"]["superseded"], true,
        "{}",
        superseded.raw
    );
    assert!(!h.active(&second_access).await);
    assert!(h.active(&third).await);
    assert!(h.active(&access).await);

    // After grace it is reuse: the family goes, and `revoked` counts the unconsumed.
    h.clock.advance(Duration::from_secs(6));
    let answer = h
        .query(&first, queries::ROTATE, rotate_args(10, None))
        .await;
    assert_eq!(
        answer.body["data"],
        json!({ "outcome": "reuse", "family": data["family"], "revoked": int(3) }),
        "{}",
        answer.raw
    );
    for secret in [&first, &second, &third, &access] {
        assert!(!h.active(secret).await);
    }
    assert_eq!(h.double.live_token_count(), 0);
}

#[tokio::test]
async fn tokens_may_run_only_their_own_queries() {
    let h = harness().await;
    let data = h.issue("perm@example.com").await;
    for bearer in [&data["access"]["secret"], &data["refresh"]["secret"]] {
        let answer = h
            .query(
                s(bearer),
                queries::ACCOUNT_BY_EMAIL,
                json!({ "email": "perm@example.com" }),
            )
            .await;
        assert_query_error(
            &answer,
            "permission_denied",
            "Insufficient privileges to perform the action.",
        );
        assert!(
            s(&answer.body["summary"]).starts_with(
                "error: Insufficient privileges to perform the action.\nat *query*:1:1\n  |\n1 | Account.byEmail(email).first()?.id\n  | ^^^^^^^^^^^^^^^^^^^^^^\n  |"
            ),
            "{}",
            answer.raw
        );
    }
}

#[tokio::test]
async fn list_tokens_pages_newest_first() {
    let h = harness().await;
    let first = h.issue("list@example.com").await;
    h.clock.advance(Duration::from_secs(1));
    let second = h.issue("list@example.com").await;
    let account = first["account"].clone();
    let rotated = h
        .query(
            s(&second["refresh"]["secret"]),
            queries::ROTATE,
            rotate_args(0, None),
        )
        .await;
    assert_eq!(rotated.body["data"]["outcome"], "rotated");
    let list = |after_issued_at: Json, after_id: &str, consumed: bool, limit: i64| {
        json!({
            "account_id": account,
            "after_issued_at": after_issued_at,
            "after_id": after_id,
            "include_consumed": consumed,
            "limit": int(limit),
        })
    };
    let end = json!({ "@time": "9999-12-31T23:59:59Z" });
    let answer = h
        .query(
            SERVER_KEY,
            queries::LIST_TOKENS,
            list(end.clone(), "", true, 10),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.raw);
    let ids: Vec<&str> = answer.body["data"]
        .as_array()
        .expect("array")
        .iter()
        .map(|d| s(&d["@doc"]["id"]))
        .collect();
    // Newest issued_at first; within one instant, the larger id first.
    let expected = [
        &rotated.body["data"]["access"]["id"],
        &rotated.body["data"]["refresh"]["id"],
        &second["access"]["id"],
        &second["refresh"]["id"],
        &first["access"]["id"],
        &first["refresh"]["id"],
    ]
    .map(s);
    assert_eq!(ids, expected);
    // The cursor resumes after (issued_at, id); consumed tokens can be left out.
    let page = h
        .query(
            SERVER_KEY,
            queries::LIST_TOKENS,
            list(end.clone(), "", false, 2),
        )
        .await;
    let page = page.body["data"].as_array().expect("array").clone();
    assert_eq!(page.len(), 2);
    let last = &page[1]["@doc"];
    let next = h
        .query(
            SERVER_KEY,
            queries::LIST_TOKENS,
            list(last["data"]["issued_at"].clone(), s(&last["id"]), false, 10),
        )
        .await;
    let next: Vec<&str> = next.body["data"]
        .as_array()
        .expect("array")
        .iter()
        .map(|d| s(&d["@doc"]["id"]))
        .collect();
    assert_eq!(next, [expected[2], expected[4], expected[5]]);
    let answer = h
        .query(
            SERVER_KEY,
            queries::LIST_TOKENS,
            json!({ "account_id": "1" }),
        )
        .await;
    assert_eq!(answer.body["data"], json!([]));
}

#[tokio::test]
async fn injected_faults_answer_with_their_status_and_body() {
    let h = harness().await;
    let error =
        |code: &str, message: &str| json!({ "error": { "code": code, "message": message } });
    let cases = [
        (
            Fault::Contended,
            409,
            error(
                "contended_transaction",
                "Transaction was aborted due to detection of concurrent modification.",
            ),
        ),
        (
            Fault::ClientTimeout,
            440,
            error(
                "time_out",
                "Client set aggressive deadline: query needs 1000, timed out within 500",
            ),
        ),
        (
            Fault::Internal,
            500,
            error(
                "internal_error",
                "java.lang.IllegalStateException: fault injected by the test double Please create a ticket at https://support.fauna.com",
            ),
        ),
        (Fault::Unavailable, 503, error("time_out", "Read timed out")),
    ];
    let body = json!({ "query": queries::INTROSPECT }).to_string();
    let headers = [("x-query-timeout-ms", "500"), ("x-query-tags", "rpc=fault")];
    for (fault, status, expected) in cases {
        h.double.inject(fault, 1);
        let answer = h
            .post("/query/1", Some(SERVER_KEY), &headers, body.clone())
            .await;
        assert_eq!(
            (answer.status, &answer.body),
            (status, &expected),
            "{fault:?}"
        );
    }
    h.double.inject(Fault::RateLimited, 1);
    let answer = h
        .post("/query/1", Some(SERVER_KEY), &headers, body.clone())
        .await;
    assert_eq!(answer.status, 429);
    assert_eq!(
        answer.body["error"],
        error("limit_exceeded", "Rate limit exceeded")["error"]
    );
    assert_eq!(answer.body["stats"]["rate_limits_hit"], json!(["read"]));
    assert_eq!(answer.body.as_object().map(Map::len), Some(2));

    h.double.inject(Fault::EmptyBody, 1);
    h.double.inject(Fault::MalformedBody, 1);
    let empty = h
        .post("/query/1", Some(SERVER_KEY), &[], body.clone())
        .await;
    assert_eq!((empty.status, empty.raw.as_str()), (200, ""));
    let malformed = h
        .post("/query/1", Some(SERVER_KEY), &[], body.clone())
        .await;
    assert_eq!(malformed.status, 200);
    assert!(serde_json::from_str::<Json>(&malformed.raw).is_err());

    // `times` counts requests; then the double answers normally again.
    h.double.inject(Fault::Contended, 2);
    for status in [409, 409, 200] {
        let answer = h
            .post("/query/1", Some(SERVER_KEY), &[], body.clone())
            .await;
        assert_eq!(answer.status, status);
    }
    // A slow answer runs the query at once and answers late.
    h.double.inject(Fault::Slow(Duration::from_millis(300)), 1);
    let started = Instant::now();
    let data = h.issue("slow@example.com").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(data["refresh"]["secret"].is_string());
    // Latency applies to every request.
    h.double.set_latency(Duration::from_millis(50));
    let started = Instant::now();
    h.post("/query/1", Some(SERVER_KEY), &[], body).await;
    assert!(started.elapsed() >= Duration::from_millis(50));

    let requests = h.double.requests();
    let faults: Vec<Option<Fault>> = requests.iter().map(|r| r.fault).collect();
    assert_eq!(faults[0], Some(Fault::Contended));
    assert_eq!(requests.len(), 12);
    assert!(requests.iter().all(|r| r.status.is_some()));
    h.double.clear_requests();
    assert!(h.double.requests().is_empty());
}

#[tokio::test]
async fn serves_h2c_with_prior_knowledge() {
    let h = harness().await;
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = http
        .post(format!("{}/query/1", h.double.endpoint()))
        .bearer_auth(SERVER_KEY)
        .header("x-typecheck", "false")
        .body(json!({ "query": queries::INTROSPECT }).to_string())
        .send()
        .await
        .expect("answer");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn debug_output_shows_no_secret() {
    let h = harness().await;
    let shown = format!("{:?}", h.double);
    assert!(!shown.contains(SERVER_KEY), "{shown}");
    assert!(shown.starts_with("FaunaDouble"));
}

#[tokio::test]
async fn committed_faults_commit_then_fail() {
    let h = harness().await;
    let mut args = issue_args("c@example.com");
    let first = json!({ "query": queries::ISSUE_BY_EMAIL, "arguments": args }).to_string();
    args["retried"] = json!(true);
    let again = json!({ "query": queries::ISSUE_BY_EMAIL, "arguments": args }).to_string();
    let send = |body: &String, timeout: Duration| {
        h.http
            .post(format!("{}/query/1", h.double.endpoint()))
            .header("authorization", format!("Bearer {SERVER_KEY}"))
            .header("x-format", "tagged")
            .header("x-query-timeout-ms", "200")
            .header("x-typecheck", "false")
            .timeout(timeout)
            .body(body.clone())
            .send()
    };

    h.double.inject(Fault::CommittedUnavailable, 1);
    let response = send(&first, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response.json::<Json>().await.expect("JSON"),
        json!({ "error": { "code": "time_out", "message": "Read timed out" } })
    );
    assert_eq!(h.double.live_token_count(), 2, "the pair was committed");
    assert_eq!(h.double.account_count(), 1);

    // The same call again (its nonce, as a retry): the committed pair is replaced, not
    // doubled.
    h.double.inject(Fault::CommittedLost, 1);
    let lost = send(&again, Duration::from_secs(10)).await;
    assert!(lost.is_err(), "no answer: {lost:?}");
    assert_eq!(
        h.double.live_token_count(),
        2,
        "committed, and still one pair"
    );
    assert_eq!(h.double.requests().last().and_then(|r| r.status), None);

    // Held past the query timeout: the client gives up first.
    h.double.inject(Fault::CommittedTimeout, 1);
    let timed_out = send(&again, Duration::from_millis(600)).await;
    assert!(
        timed_out.as_ref().is_err_and(reqwest::Error::is_timeout),
        "{timed_out:?}"
    );
    assert_eq!(h.double.live_token_count(), 2);
    assert_eq!(h.double.requests().len(), 3);
}

#[tokio::test]
async fn email_taken_is_the_unique_constraint_of_a_concurrent_create() {
    let h = harness().await;
    h.double.inject(Fault::EmailTaken, 1);
    let answer = h
        .query(
            SERVER_KEY,
            queries::ISSUE_BY_EMAIL,
            issue_args("race@example.com"),
        )
        .await;
    assert_query_error(&answer, "constraint_failure", "Failed unique constraint.");
    assert_eq!(
        answer.body["error"]["constraint_failures"],
        json!([{ "paths": [["email"]], "message": "Failed unique constraint" }])
    );
    assert_eq!(h.double.account_count(), 1, "the concurrent winner's");
    assert_eq!(h.double.live_token_count(), 0, "the loser wrote nothing");
    let data = h.issue("race@example.com").await;
    assert_eq!(
        h.double.account_count(),
        1,
        "issuing again finds it: {data}"
    );
}

#[tokio::test]
async fn rotation_is_held_to_the_published_policy() {
    let h = bare_harness().await;
    let data = h.issue("policy@example.com").await;
    let refresh = s(&data["refresh"]["secret"]).to_owned();
    // No policy: nothing rotates.
    let answer = h
        .query(&refresh, queries::ROTATE, rotate_args(10, None))
        .await;
    assert_eq!(
        answer.body["data"],
        json!({ "outcome": "no_policy" }),
        "{}",
        answer.raw
    );

    // A policy that requires the client: naming none does not skip the check.
    let answer = h
        .query(SERVER_KEY, queries::PUBLISH_POLICY, policy_args(false))
        .await;
    assert_eq!(answer.body["data"], json!(true), "{}", answer.raw);
    let answer = h
        .query(&refresh, queries::ROTATE, rotate_args(10, None))
        .await;
    assert_eq!(
        answer.body["data"],
        json!({ "outcome": "wrong_client" }),
        "{}",
        answer.raw
    );
    let revoke = h
        .query(
            &refresh,
            queries::REVOKE_SECRET,
            json!({ "client_id": null, "any_client": true }),
        )
        .await;
    assert_eq!(
        revoke.body["data"],
        json!({ "outcome": "wrong_client" }),
        "{}",
        revoke.raw
    );

    // Lifetimes past the policy are cut to it.
    let mut args = rotate_args(10, Some("app"));
    for key in ["access_ttl", "refresh_ttl", "grace", "session_ttl"] {
        args[key] = int(315_360_000);
    }
    let answer = h.query(&refresh, queries::ROTATE, args.clone()).await;
    let rotated = &answer.body["data"];
    assert_eq!(rotated["outcome"], "rotated", "{}", answer.raw);
    let ttl = |v: &Json| {
        time::OffsetDateTime::parse(
            s(&v["@time"]),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("a time")
        .unix_timestamp_nanos()
    };
    let second = 1_000_000_000;
    let now = ttl(&rotated["now"]);
    assert_eq!(
        ttl(&rotated["access"]["ttl"]),
        now + i128::from(POLICY_ACCESS_TTL) * second
    );
    assert_eq!(
        ttl(&rotated["refresh"]["ttl"]),
        now + i128::from(POLICY_REFRESH_TTL) * second
    );

    // Past the policy's grace, a ten-year grace is still reuse.
    h.clock.advance(Duration::from_secs(
        u64::try_from(POLICY_GRACE).unwrap() + 1,
    ));
    args["attempt"] = json!("another call");
    let answer = h.query(&refresh, queries::ROTATE, args).await;
    assert_eq!(answer.body["data"]["outcome"], "reuse", "{}", answer.raw);
    assert_eq!(h.double.live_token_count(), 0);
}

#[tokio::test]
async fn the_same_attempt_replaces_its_own_rotation() {
    let h = harness().await;
    let data = h.issue("attempt@example.com").await;
    let refresh = s(&data["refresh"]["secret"]).to_owned();
    let args = rotate_args(0, None);
    let first = h.query(&refresh, queries::ROTATE, args.clone()).await;
    assert_eq!(first.body["data"]["outcome"], "rotated", "{}", first.raw);
    h.clock.advance(Duration::from_secs(5));
    // The same call again, past grace 0: its own commit, not reuse.
    let again = h.query(&refresh, queries::ROTATE, args.clone()).await;
    assert_eq!(again.body["data"]["outcome"], "rotated", "{}", again.raw);
    for minted in ["refresh", "access"] {
        assert!(
            !h.active(s(&first.body["data"][minted]["secret"])).await,
            "{minted}"
        );
        assert!(
            h.active(s(&again.body["data"][minted]["secret"])).await,
            "{minted}"
        );
    }
    assert_eq!(
        h.double.live_token_count(),
        4,
        "the first access, the consumed, one pair"
    );
    // Once the successor is used, the same nonce is no longer a retry: reuse.
    let next = s(&again.body["data"]["refresh"]["secret"]).to_owned();
    let used = h.query(&next, queries::ROTATE, rotate_args(0, None)).await;
    assert_eq!(used.body["data"]["outcome"], "rotated", "{}", used.raw);
    let replayed = h.query(&refresh, queries::ROTATE, args.clone()).await;
    assert_eq!(
        replayed.body["data"]["outcome"], "reuse",
        "{}",
        replayed.raw
    );
    assert_eq!(h.double.live_token_count(), 0);
}

#[tokio::test]
async fn a_stale_key_cache_authenticates_deleted_tokens_for_sixty_seconds() {
    let h = harness().await;
    let data = h.issue("stale@example.com").await;
    let access = s(&data["access"]["secret"]).to_owned();
    let answer = h
        .query(
            SERVER_KEY,
            queries::REVOKE_TOKEN,
            json!({ "token_id": data["access"]["id"] }),
        )
        .await;
    assert_eq!(answer.body["data"], int(1), "{}", answer.raw);
    assert!(!h.active(&access).await, "the deleting node refuses it");

    h.double.inject(Fault::StaleKeyCache, 1);
    let answer = h.query(&access, queries::INTROSPECT, json!({})).await;
    assert_eq!(
        answer.status, 200,
        "a cached token authenticates: {}",
        answer.raw
    );
    assert_eq!(answer.body["data"], Json::Null, "but its document is gone");

    h.clock.advance(Duration::from_secs(61));
    h.double.inject(Fault::StaleKeyCache, 1);
    let answer = h.query(&access, queries::INTROSPECT, json!({})).await;
    assert_eq!(
        answer.status, 401,
        "the cache entry has expired: {}",
        answer.raw
    );
}
