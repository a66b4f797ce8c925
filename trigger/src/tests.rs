//! Handler tests: every event version and trigger source, the samples shipped with
//! `aws_lambda_events` (copied into `tests/fixtures/`) plus our own V3 and trap events, against a
//! fake broker.
//!
//! One regression test per trap of `aws_lambda_events` 1.2.1 on real events (`docs/design.md`
//! "Cognito › Event shapes and traps"), numbered as the tests below cite them:
//!
//! 1. a V2 event without `request.scopes` fails to parse (the field has no serde default);
//! 2. V3 `TokenGeneration_ClientCredentials` fails to parse (an unknown enum variant);
//! 3. the `Default` replies carry an empty `groupOverrideDetails`, which Cognito reads as
//!    "remove all groups";
//! 4. V1 `claimsOverrideDetails: null` parses (fine there; our reply must still replace it);
//! 5. the structs are `#[non_exhaustive]` (a compile-time matter, nothing to test here);
//! 6. an event without `callerContext`, `request` or `response` fails to parse, and unknown
//!    fields are dropped;
//! 7. the crate's V2 samples say `"version": "1"`, and its V2 incoming sample carries a V1
//!    `claimsOverrideDetails: null` response (our copies are corrected).

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lambda_runtime::{Context, Diagnostic, LambdaEvent};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokenbroker_client::{ClientError, ClientResult, IssuedToken, TokenPair, pb};
use tonic::Status;

use super::*;
use crate::config::RESERVED_CLAIMS;

macro_rules! fixture {
    ($name:literal) => {
        serde_json::from_str::<Value>(include_str!(concat!("../tests/fixtures/", $name)))
            .expect(concat!($name, " is valid JSON"))
    };
}

const V1_INCOMING: &str = "v1-incoming";

/// Every shipped sample and every event of ours, by short name.
fn all_fixtures() -> Vec<(&'static str, Value)> {
    vec![
        (
            V1_INCOMING,
            fixture!("example-cognito-event-userpools-pretokengen-incoming.json"),
        ),
        (
            "v1",
            fixture!("example-cognito-event-userpools-pretokengen.json"),
        ),
        (
            "v1-null-groups",
            fixture!("example-cognito-event-userpools-pretokengen-null-group-configuration.json"),
        ),
        (
            "v2-incoming",
            fixture!("example-cognito-event-userpools-pretokengen-v2-incoming.json"),
        ),
        (
            "v2",
            fixture!("example-cognito-event-userpools-pretokengen-v2.json"),
        ),
        (
            "v2-null-groups",
            fixture!(
                "example-cognito-event-userpools-pretokengen-v2-null-group-configuration.json"
            ),
        ),
        ("v3-hosted-auth", fixture!("v3-hosted-auth.json")),
        ("v2-without-scopes", fixture!("v2-without-scopes.json")),
        (
            "v2-unknown-trigger-source",
            fixture!("v2-unknown-trigger-source.json"),
        ),
        ("v2-unknown-fields", fixture!("v2-unknown-fields.json")),
        ("v1-bare", fixture!("v1-bare.json")),
    ]
}

/// What the fake broker does.
#[derive(Debug, Clone)]
enum Behaviour {
    Mint,
    Fail(Status),
    Hang,
}

/// A broker that mints numbered secrets, fails, or never answers, and records every call.
#[derive(Debug)]
struct FakeBroker {
    behaviour: Behaviour,
    calls: Mutex<Vec<(pb::IssueTokensRequest, CallContext)>>,
}

impl FakeBroker {
    fn new(behaviour: Behaviour) -> Self {
        Self {
            behaviour,
            calls: Mutex::default(),
        }
    }

    fn minting() -> Self {
        Self::new(Behaviour::Mint)
    }

    fn calls(&self) -> Vec<(pb::IssueTokensRequest, CallContext)> {
        self.calls.lock().unwrap().clone()
    }

    fn only_call(&self) -> (pb::AssertedClaims, String, CallContext) {
        let calls = self.calls();
        assert_eq!(calls.len(), 1, "one broker call");
        let (request, call) = calls.into_iter().next().unwrap();
        let Some(pb::issue_tokens_request::Subject::Claims(claims)) = request.subject else {
            panic!("asserted claims expected");
        };
        (claims, request.idempotency_key, call)
    }
}

fn access_secret(n: usize) -> String {
    format!("tba_ACCESSSECRET{n}")
}

fn refresh_secret(n: usize) -> String {
    format!("tbr_REFRESHSECRET{n}")
}

impl Deps for FakeBroker {
    async fn issue_tokens(
        &self,
        request: pb::IssueTokensRequest,
        call: CallContext,
    ) -> ClientResult<TokenPair> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((request, call));
            calls.len() - 1
        };
        match &self.behaviour {
            Behaviour::Mint => Ok(TokenPair {
                account_id: "acct_1".into(),
                family_id: format!("fam_{n}"),
                refresh: IssuedToken {
                    token_id: format!("tok_r{n}"),
                    secret: SecretString::from(refresh_secret(n)),
                    expires_at: None,
                },
                access: IssuedToken {
                    token_id: format!("tok_a{n}"),
                    secret: SecretString::from(access_secret(n)),
                    expires_at: None,
                },
                replayed: false,
            }),
            Behaviour::Fail(status) => Err(ClientError::from(status.clone())),
            Behaviour::Hang => std::future::pending().await,
        }
    }
}

/// The defaults, but without the `email_verified` requirement: the shipped samples have no
/// such attribute.
fn samples_config() -> Config {
    let mut config = Config::new("http://127.0.0.1:1", SecretString::from("tbk_APIKEYSECRET"));
    config.require_verified_email = false;
    config
}

async fn run(event: &Value, config: &Config, broker: &FakeBroker) -> Result<Value, TriggerError> {
    handle(
        LambdaEvent::new(event.clone(), Context::default()),
        config,
        broker,
    )
    .await
}

/// The event without its `response`: what the reply must echo unchanged.
fn without_response(event: &Value) -> Value {
    let mut event = event.clone();
    event.as_object_mut().unwrap().remove("response");
    event
}

/// The claims the defaults add for the `n`th minted pair: its access secret, and not its
/// refresh secret.
fn fauna_claims(n: usize) -> Value {
    json!({"fauna_access_token": access_secret(n)})
}

/// Asserts the reply adds no reserved claim, whatever its shape.
fn assert_no_reserved_claim(reply: &Value) {
    let response = &reply["response"];
    let tokens = [
        &response["claimsOverrideDetails"],
        &response["claimsAndScopeOverrideDetails"]["idTokenGeneration"],
        &response["claimsAndScopeOverrideDetails"]["accessTokenGeneration"],
    ];
    for token in tokens {
        let Some(claims) = token["claimsToAddOrOverride"].as_object() else {
            continue;
        };
        for name in claims.keys() {
            let lower = name.to_ascii_lowercase();
            assert!(
                !RESERVED_CLAIMS.contains(&lower.as_str()) && !lower.starts_with("cognito:"),
                "reserved claim {name} added"
            );
        }
    }
}

// ---- V1 ----

#[tokio::test]
async fn v1_incoming_sample_gets_the_claims_in_the_id_token() {
    let event = fixture!("example-cognito-event-userpools-pretokengen-incoming.json");
    let broker = FakeBroker::minting();
    let reply = run(&event, &samples_config(), &broker).await.unwrap();

    let response = reply["response"].as_object().unwrap();
    assert_eq!(response.len(), 1, "{response:?}");
    let details = &response["claimsOverrideDetails"];
    assert_eq!(details["claimsToAddOrOverride"], fauna_claims(0));
    assert_eq!(details["claimsToSuppress"], json!(["email"]));
    assert_eq!(
        details["groupOverrideDetails"],
        event["request"]["groupConfiguration"]
    );
    assert_eq!(without_response(&reply), without_response(&event));

    let (claims, key, call) = broker.only_call();
    assert_eq!(claims.email, "email");
    assert_eq!(claims.user_pool_id, "userPoolId");
    assert_eq!(claims.client_id, "apps client id");
    assert_eq!(claims.cognito_sub, "", "the sample has no sub");
    assert_eq!(claims.groups, ["group-A", "group-B", "group-C"]);
    assert!(key.starts_with("cognito-") && key.len() <= 128, "{key}");
    assert_eq!(
        call.timeout,
        Duration::from_secs(2),
        "no Lambda deadline: the default"
    );
    assert_eq!(call.traceparent, None);
}

/// Trap 4: `claimsOverrideDetails: null` parses, and our reply replaces it.
#[tokio::test]
async fn v1_null_claims_override_details_is_answered() {
    let event = fixture!("example-cognito-event-userpools-pretokengen-incoming.json");
    assert_eq!(event["response"]["claimsOverrideDetails"], Value::Null);
    let reply = run(&event, &samples_config(), &FakeBroker::minting())
        .await
        .unwrap();
    assert!(reply["response"]["claimsOverrideDetails"].is_object());
}

#[tokio::test]
async fn v1_sample_with_a_response_is_answered_afresh() {
    let event = fixture!("example-cognito-event-userpools-pretokengen.json");
    let reply = run(&event, &samples_config(), &FakeBroker::minting())
        .await
        .unwrap();
    let details = &reply["response"]["claimsOverrideDetails"];
    assert_eq!(
        details["claimsToAddOrOverride"],
        fauna_claims(0),
        "the stale claims are gone"
    );
    assert_eq!(
        details["groupOverrideDetails"],
        event["request"]["groupConfiguration"]
    );
}

/// `groupConfiguration: null`: no groups to keep, so no override at all (an empty one would
/// read as "remove the groups").
#[tokio::test]
async fn v1_null_group_configuration_sends_no_group_override() {
    let event =
        fixture!("example-cognito-event-userpools-pretokengen-null-group-configuration.json");
    let broker = FakeBroker::minting();
    let reply = run(&event, &samples_config(), &broker).await.unwrap();
    let details = reply["response"]["claimsOverrideDetails"]
        .as_object()
        .unwrap();
    assert!(!details.contains_key("groupOverrideDetails"), "{details:?}");
    assert_eq!(details["claimsToAddOrOverride"], fauna_claims(0));
    assert!(broker.only_call().0.groups.is_empty());
}

/// Trap 6: an event without `callerContext` and `response` parses; `version` may be a number.
#[tokio::test]
async fn v1_bare_event_without_caller_context_or_response_is_answered() {
    let event = fixture!("v1-bare.json");
    let broker = FakeBroker::minting();
    let reply = run(
        &event,
        &Config::new("http://x", SecretString::from("k")),
        &broker,
    )
    .await
    .unwrap();
    let details = &reply["response"]["claimsOverrideDetails"];
    assert_eq!(details["claimsToAddOrOverride"], fauna_claims(0));
    let (claims, _, _) = broker.only_call();
    assert_eq!(claims.email, "erin@example.com");
    assert_eq!(claims.cognito_sub, "3f5e7a90-0000-4000-8000-0000000000e5");
    assert_eq!(claims.client_id, "");
}

// ---- V2 and V3 ----

#[tokio::test]
async fn v2_incoming_sample_gets_the_claims_in_the_configured_tokens() {
    let event = fixture!("example-cognito-event-userpools-pretokengen-v2-incoming.json");
    let groups = &event["request"]["groupConfiguration"];
    for (tokens, in_id, in_access) in [
        (
            ClaimTokens {
                id: true,
                access: false,
            },
            true,
            false,
        ),
        (
            ClaimTokens {
                id: false,
                access: true,
            },
            false,
            true,
        ),
        (
            ClaimTokens {
                id: true,
                access: true,
            },
            true,
            true,
        ),
    ] {
        let mut config = samples_config();
        config.claim_tokens = tokens;
        let reply = run(&event, &config, &FakeBroker::minting()).await.unwrap();
        let response = reply["response"].as_object().unwrap();
        assert_eq!(response.len(), 1);
        let details = &response["claimsAndScopeOverrideDetails"];
        assert_eq!(&details["groupOverrideDetails"], groups);
        let id = &details["idTokenGeneration"];
        let access = &details["accessTokenGeneration"];
        assert_eq!(id["claimsToSuppress"], json!(["email"]), "{tokens:?}");
        assert_eq!(
            id["claimsToAddOrOverride"] == fauna_claims(0),
            in_id,
            "{tokens:?}"
        );
        assert_eq!(
            access["claimsToAddOrOverride"] == fauna_claims(0),
            in_access,
            "{tokens:?}"
        );
        assert!(access.get("claimsToSuppress").is_none());
        assert!(access.get("scopesToAdd").is_none() && access.get("scopesToSuppress").is_none());
        assert_eq!(without_response(&reply), without_response(&event));
    }
}

#[tokio::test]
async fn v2_sample_with_a_response_is_answered_afresh() {
    let event = fixture!("example-cognito-event-userpools-pretokengen-v2.json");
    let reply = run(&event, &samples_config(), &FakeBroker::minting())
        .await
        .unwrap();
    let details = &reply["response"]["claimsAndScopeOverrideDetails"];
    assert_eq!(
        details["idTokenGeneration"],
        json!({"claimsToAddOrOverride": fauna_claims(0), "claimsToSuppress": ["email"]})
    );
    assert!(
        details.get("accessTokenGeneration").is_none(),
        "nothing for the access token by default"
    );
}

#[tokio::test]
async fn v2_null_group_configuration_sends_no_group_override() {
    let event =
        fixture!("example-cognito-event-userpools-pretokengen-v2-null-group-configuration.json");
    let reply = run(&event, &samples_config(), &FakeBroker::minting())
        .await
        .unwrap();
    let details = reply["response"]["claimsAndScopeOverrideDetails"]
        .as_object()
        .unwrap();
    assert!(!details.contains_key("groupOverrideDetails"), "{details:?}");
}

#[tokio::test]
async fn v3_sign_in_is_answered_in_the_v2_shape() {
    let event = fixture!("v3-hosted-auth.json");
    let broker = FakeBroker::minting();
    let reply = run(
        &event,
        &Config::new("http://x", SecretString::from("k")),
        &broker,
    )
    .await
    .unwrap();
    let details = &reply["response"]["claimsAndScopeOverrideDetails"];
    assert_eq!(
        details["idTokenGeneration"]["claimsToAddOrOverride"],
        fauna_claims(0)
    );
    assert_eq!(
        details["groupOverrideDetails"],
        json!({"groupsToOverride": ["admins", "readers"], "iamRolesToOverride": [], "preferredRole": null})
    );
    let (claims, _, _) = broker.only_call();
    assert_eq!(claims.email, "alice@example.com");
    assert_eq!(claims.cognito_sub, "0c6e3a5a-7c1d-4f59-9a55-1f1a2b3c4d5e");
    assert_eq!(claims.user_pool_id, "us-east-1_AbC123xyZ");
    assert_eq!(claims.client_id, "4l3ov1c3b8v7ftq0tqbq0f9a1b");
    assert_eq!(claims.groups, ["admins", "readers"]);
}

/// Trap 2: V3 `TokenGeneration_ClientCredentials` parses, and (no user) passes through
/// unchanged without a broker call.
#[tokio::test]
async fn v3_client_credentials_passes_through_unchanged() {
    let event = fixture!("v3-client-credentials.json");
    for policy in [FailurePolicy::FailClosed, FailurePolicy::FailOpen] {
        let mut config = Config::new("http://x", SecretString::from("k"));
        config.failure_policy = policy;
        let broker = FakeBroker::new(Behaviour::Fail(Status::unavailable("down")));
        let reply = run(&event, &config, &broker).await.unwrap();
        assert_eq!(reply, event);
        assert!(broker.calls().is_empty());
    }
}

/// Trap 1: a V2 event without `request.scopes` parses.
#[tokio::test]
async fn v2_event_without_scopes_is_answered() {
    let event = fixture!("v2-without-scopes.json");
    assert!(event["request"].get("scopes").is_none());
    let reply = run(
        &event,
        &Config::new("http://x", SecretString::from("k")),
        &FakeBroker::minting(),
    )
    .await
    .unwrap();
    assert_eq!(
        reply["response"]["claimsAndScopeOverrideDetails"]["idTokenGeneration"]["claimsToAddOrOverride"],
        fauna_claims(0)
    );
}

/// Trap 6 and "ignore unknown fields": unknown fields at every level are ignored, and the reply
/// echoes them (Cognito reads only `response`).
#[tokio::test]
async fn unknown_fields_are_ignored_and_echoed() {
    let event = fixture!("v2-unknown-fields.json");
    let reply = run(
        &event,
        &Config::new("http://x", SecretString::from("k")),
        &FakeBroker::minting(),
    )
    .await
    .unwrap();
    assert_eq!(without_response(&reply), without_response(&event));
    let details = &reply["response"]["claimsAndScopeOverrideDetails"];
    assert_eq!(
        details["groupOverrideDetails"]["futureGroupField"], "kept",
        "the group configuration is copied whole"
    );
    assert_eq!(
        details["idTokenGeneration"]["claimsToAddOrOverride"],
        fauna_claims(0)
    );
}

/// An unknown `triggerSource` is never rejected: with a user, it gets the claims (and a warning
/// in the log); without one, the event passes through.
#[tokio::test]
async fn unknown_trigger_source_is_logged_and_not_rejected() {
    let logs = LogCapture::start();
    let event = fixture!("v2-unknown-trigger-source.json");
    let config = Config::new("http://x", SecretString::from("k"));
    let broker = FakeBroker::minting();
    let reply = run(&event, &config, &broker).await.unwrap();
    assert_eq!(
        reply["response"]["claimsAndScopeOverrideDetails"]["idTokenGeneration"]["claimsToAddOrOverride"],
        fauna_claims(0)
    );
    assert!(
        logs.contents().contains("TokenGeneration_SomethingNew"),
        "{}",
        logs.contents()
    );

    let mut no_user = event.clone();
    no_user["request"]["userAttributes"] = json!({});
    let broker = FakeBroker::minting();
    assert_eq!(run(&no_user, &config, &broker).await.unwrap(), no_user);
    assert!(broker.calls().is_empty());
}

#[tokio::test]
async fn every_trigger_source_of_every_version_is_handled() {
    let base = fixture!("v3-hosted-auth.json");
    let config = Config::new("http://x", SecretString::from("k"));
    let user_sources = [
        "TokenGeneration_HostedAuth",
        "TokenGeneration_Authentication",
        "TokenGeneration_NewPasswordChallenge",
        "TokenGeneration_AuthenticateDevice",
        "TokenGeneration_RefreshTokens",
    ];
    let mut keys = Vec::new();
    for version in ["1", "2", "3"] {
        for source in user_sources {
            let mut event = base.clone();
            event["version"] = json!(version);
            event["triggerSource"] = json!(source);
            let broker = FakeBroker::minting();
            let reply = run(&event, &config, &broker).await.unwrap();
            let claims = if version == "1" {
                &reply["response"]["claimsOverrideDetails"]["claimsToAddOrOverride"]
            } else {
                &reply["response"]["claimsAndScopeOverrideDetails"]["idTokenGeneration"]["claimsToAddOrOverride"]
            };
            assert_eq!(claims, &fauna_claims(0), "{version} {source}");
            assert_no_reserved_claim(&reply);
            keys.push(broker.only_call().1);
        }
        let mut event = base.clone();
        event["version"] = json!(version);
        event["triggerSource"] = json!("TokenGeneration_ClientCredentials");
        event["request"]["userAttributes"] = json!({});
        let broker = FakeBroker::minting();
        assert_eq!(run(&event, &config, &broker).await.unwrap(), event);
        assert!(broker.calls().is_empty());
    }
    // The source is part of the key; the version is not (it is the pool's, not the sign-in's).
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), user_sources.len());
}

/// `version` as a string, a number, or the pool's `V2_0` spelling; else the response's key.
#[test]
fn reply_shape_follows_the_version_then_the_response_key() {
    let shape = |event: Value| PreTokenGenEvent::deserialize(&event).unwrap().reply_shape();
    assert_eq!(shape(json!({"version": "1"})), ReplyShape::V1);
    assert_eq!(shape(json!({"version": 1})), ReplyShape::V1);
    assert_eq!(shape(json!({"version": "2"})), ReplyShape::V2);
    assert_eq!(shape(json!({"version": "V2_0"})), ReplyShape::V2);
    assert_eq!(shape(json!({"version": 3})), ReplyShape::V2);
    assert_eq!(shape(json!({"version": "3.0"})), ReplyShape::V2);
    assert_eq!(
        shape(json!({"version": null, "response": {"claimsAndScopeOverrideDetails": null}})),
        ReplyShape::V2
    );
    assert_eq!(
        shape(json!({"version": "x", "response": {"claimsOverrideDetails": null}})),
        ReplyShape::V1
    );
    assert_eq!(shape(json!({})), ReplyShape::V1);
}

/// Trap 7: the crate's V2 samples said `"version": "1"` with a V1 incoming response; our
/// copies are corrected, and every V2 sample is answered in the V2 shape.
#[tokio::test]
async fn corrected_v2_samples_are_answered_as_v2() {
    for (name, event) in all_fixtures() {
        if !name.starts_with("v2") {
            continue;
        }
        assert_eq!(event["version"], "2", "{name}");
        assert!(
            event["response"].get("claimsOverrideDetails").is_none(),
            "{name} has a V1 response"
        );
        let reply = run(&event, &samples_config(), &FakeBroker::minting())
            .await
            .unwrap();
        assert!(
            reply["response"]["claimsAndScopeOverrideDetails"].is_object(),
            "{name}"
        );
    }
}

/// Trap 3: the reply never removes groups. Whenever the request has a group configuration,
/// `groupOverrideDetails` is that configuration, exactly; never an empty override.
#[tokio::test]
async fn every_reply_keeps_the_request_groups() {
    for (name, event) in all_fixtures() {
        let reply = run(&event, &samples_config(), &FakeBroker::minting())
            .await
            .unwrap();
        let response = &reply["response"];
        let details = response
            .get("claimsOverrideDetails")
            .or_else(|| response.get("claimsAndScopeOverrideDetails"))
            .unwrap_or_else(|| panic!("{name}: no reply"));
        let groups = &event["request"]["groupConfiguration"];
        if groups.is_object() {
            assert_eq!(&details["groupOverrideDetails"], groups, "{name}");
        } else {
            assert!(details.get("groupOverrideDetails").is_none(), "{name}");
        }
        assert_no_reserved_claim(&reply);
    }
}

#[tokio::test]
async fn email_suppression_and_the_refresh_claim_are_configurable() {
    let event = fixture!("v3-hosted-auth.json");
    let mut config = Config::new("http://x", SecretString::from("k"));
    let reply = run(&event, &config, &FakeBroker::minting()).await.unwrap();
    assert!(
        !reply.to_string().contains(&refresh_secret(0)),
        "by default the refresh secret is nowhere in the reply: {reply}"
    );

    config.suppress_email = false;
    config.refresh_claim = Some(ClaimName::parse("db_refresh").unwrap());
    config.access_claim = ClaimName::parse("db_secret").unwrap();
    config.claim_tokens = ClaimTokens {
        id: true,
        access: true,
    };
    let both = json!({"db_secret": access_secret(0), "db_refresh": refresh_secret(0)});
    let reply = run(&event, &config, &FakeBroker::minting()).await.unwrap();
    let details = &reply["response"]["claimsAndScopeOverrideDetails"];
    for token in ["idTokenGeneration", "accessTokenGeneration"] {
        assert_eq!(
            details[token],
            json!({"claimsToAddOrOverride": both}),
            "{token}"
        );
    }

    let mut event = fixture!("v1-bare.json");
    event["version"] = json!("1");
    let reply = run(&event, &config, &FakeBroker::minting()).await.unwrap();
    assert_eq!(
        reply["response"]["claimsOverrideDetails"],
        json!({"claimsToAddOrOverride": both}),
        "V1: the ID token, whatever claim_tokens says"
    );
}

#[tokio::test]
async fn unverified_email_gets_no_claims_by_default() {
    let mut event = fixture!("v3-hosted-auth.json");
    event["request"]["userAttributes"]["email_verified"] = json!("false");
    let broker = FakeBroker::minting();
    let config = Config::new("http://x", SecretString::from("k"));
    assert_eq!(run(&event, &config, &broker).await.unwrap(), event);
    assert!(broker.calls().is_empty());

    // The shipped samples have no email_verified at all.
    let event = fixture!("example-cognito-event-userpools-pretokengen-incoming.json");
    assert_eq!(run(&event, &config, &broker).await.unwrap(), event);
    assert!(broker.calls().is_empty());
}

// ---- failures ----

#[tokio::test]
async fn fail_closed_returns_a_user_safe_error() {
    let event = fixture!("v3-hosted-auth.json");
    let config = Config::new("http://x", SecretString::from("k"));
    let cases = [
        (
            Status::unavailable("store down: connection refused"),
            TriggerErrorKind::Unavailable,
        ),
        (
            Status::resource_exhausted("over budget"),
            TriggerErrorKind::Unavailable,
        ),
        (
            Status::deadline_exceeded("too slow"),
            TriggerErrorKind::Timeout,
        ),
        (
            Status::permission_denied("role trigger needed"),
            TriggerErrorKind::Rejected,
        ),
        (
            Status::invalid_argument("email: not an address"),
            TriggerErrorKind::Rejected,
        ),
        (
            Status::internal("internal error"),
            TriggerErrorKind::Internal,
        ),
    ];
    for (status, kind) in cases {
        let message = status.message().to_owned();
        let broker = FakeBroker::new(Behaviour::Fail(status));
        let err = run(&event, &config, &broker).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{message}");
        assert!(err.to_string().contains(&message), "the log detail: {err}");
        let diagnostic = Diagnostic::from(err);
        assert_eq!(diagnostic.error_type, kind.error_type());
        assert_eq!(diagnostic.error_message, kind.user_message());
        assert!(!diagnostic.error_message.contains(&message));
    }
}

#[tokio::test]
async fn fail_open_returns_the_event_unchanged() {
    let logs = LogCapture::start();
    let event = fixture!("v3-hosted-auth.json");
    let mut config = Config::new("http://x", SecretString::from("k"));
    config.failure_policy = FailurePolicy::FailOpen;
    let broker = FakeBroker::new(Behaviour::Fail(Status::unavailable("store down")));
    assert_eq!(run(&event, &config, &broker).await.unwrap(), event);
    assert_eq!(broker.calls().len(), 1);
    let logs = logs.contents();
    assert!(logs.contains("WARN"), "{logs}");
    assert!(
        logs.contains("sign-in continues without fauna claims"),
        "{logs}"
    );
}

#[tokio::test]
async fn user_sign_in_without_email_follows_the_failure_policy() {
    let mut event = fixture!("v3-hosted-auth.json");
    event["request"]["userAttributes"]
        .as_object_mut()
        .unwrap()
        .remove("email");
    let mut config = Config::new("http://x", SecretString::from("k"));
    let broker = FakeBroker::minting();
    let err = run(&event, &config, &broker).await.unwrap_err();
    assert_eq!(err.kind(), TriggerErrorKind::InvalidEvent);
    config.failure_policy = FailurePolicy::FailOpen;
    assert_eq!(run(&event, &config, &broker).await.unwrap(), event);
    assert!(broker.calls().is_empty());
}

#[tokio::test]
async fn event_that_is_not_an_object_follows_the_failure_policy() {
    let mut config = Config::new("http://x", SecretString::from("k"));
    for event in [
        json!([1, 2]),
        json!("text"),
        json!({"request": "not an object"}),
    ] {
        config.failure_policy = FailurePolicy::FailClosed;
        let err = run(&event, &config, &FakeBroker::minting())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), TriggerErrorKind::InvalidEvent, "{event}");
        config.failure_policy = FailurePolicy::FailOpen;
        assert_eq!(
            run(&event, &config, &FakeBroker::minting()).await.unwrap(),
            event
        );
    }
}

/// A broker that never answers cannot hold the sign-in past the budget.
#[tokio::test(start_paused = true)]
async fn hung_broker_times_out_at_the_budget() {
    let event = fixture!("v3-hosted-auth.json");
    let mut config = Config::new("http://x", SecretString::from("k"));
    config.timeout = Duration::from_millis(1500);
    let broker = FakeBroker::new(Behaviour::Hang);
    let started = tokio::time::Instant::now();
    let err = run(&event, &config, &broker).await.unwrap_err();
    assert_eq!(err.kind(), TriggerErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(1500));
    assert_eq!(broker.only_call().2.timeout, Duration::from_millis(1500));
}

#[test]
fn budget_is_the_setting_capped_by_the_lambda_deadline() {
    let config = Config::new("http://x", SecretString::from("k"));
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let ms = |d: Duration| (now + d).duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    // No deadline known (Context::default()): the setting.
    assert_eq!(
        broker_budget(0, now, &config).unwrap(),
        Duration::from_secs(2)
    );
    // Plenty of time: the setting.
    assert_eq!(
        broker_budget(ms(Duration::from_secs(5)), now, &config).unwrap(),
        Duration::from_secs(2)
    );
    // 1 s left: 1 s less the 200 ms margin.
    assert_eq!(
        broker_budget(ms(Duration::from_secs(1)), now, &config).unwrap(),
        Duration::from_millis(800)
    );
    // Less than the margin left, or the deadline passed: no call.
    for left in [Duration::from_millis(150), Duration::ZERO] {
        let err = broker_budget(ms(left), now, &config).unwrap_err();
        assert_eq!(err.kind(), TriggerErrorKind::Timeout);
    }
    let past = ms(Duration::ZERO) - 1000;
    assert!(broker_budget(past, now, &config).is_err());
    // Not real deadlines: cargo lambda watch's constant, and one past Lambda's 15 minutes.
    for bogus in [600_000, ms(Duration::from_secs(3600))] {
        assert_eq!(
            broker_budget(bogus, now, &config).unwrap(),
            Duration::from_secs(2)
        );
    }
}

#[tokio::test]
async fn lambda_deadline_and_trace_reach_the_broker_call() {
    let event = fixture!("v3-hosted-auth.json");
    let config = Config::new("http://x", SecretString::from("k"));
    let broker = FakeBroker::minting();
    let mut context = Context::default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    context.deadline = (now + Duration::from_millis(1200)).as_millis() as u64;
    context.xray_trace_id =
        Some("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1".into());
    handle(LambdaEvent::new(event, context), &config, &broker)
        .await
        .unwrap();
    let (_, _, call) = broker.only_call();
    assert!(
        call.timeout <= Duration::from_millis(1000) && call.timeout > Duration::from_millis(500),
        "{:?}",
        call.timeout
    );
    assert_eq!(
        call.traceparent.as_deref(),
        Some("00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01")
    );

    let deadline_passed = {
        let mut context = Context::default();
        context.deadline = now.as_millis() as u64 - 1;
        context
    };
    let broker = FakeBroker::minting();
    let err = handle(
        LambdaEvent::new(fixture!("v3-hosted-auth.json"), deadline_passed),
        &config,
        &broker,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), TriggerErrorKind::Timeout);
    assert!(broker.calls().is_empty(), "no call without time for it");
}

// ---- idempotency ----

#[tokio::test]
async fn retries_of_one_sign_in_share_a_key_and_other_sign_ins_do_not() {
    let base = fixture!("v3-hosted-auth.json");
    let key_of = |event: &Value| idempotency_key(&PreTokenGenEvent::deserialize(event).unwrap());
    let key = key_of(&base);
    assert!(key.len() <= 128 && key.bytes().all(|b| b.is_ascii_graphic()));

    // A retry is the same event; attribute order and the incoming response do not matter.
    let mut retry: Value = serde_json::from_str(&base.to_string()).unwrap();
    retry["response"] = json!({"claimsAndScopeOverrideDetails": null});
    assert_eq!(key_of(&retry), key);
    let mut reordered = base.clone();
    reordered["request"]["scopes"] = json!(["aws.cognito.signin.user.admin", "email", "openid"]);
    assert_eq!(key_of(&reordered), key, "scope order is not significant");

    type Change = fn(&mut Value);
    let changes: [(&str, Change); 6] = [
        ("pool", |e| e["userPoolId"] = json!("us-east-1_Other")),
        ("user", |e| {
            e["request"]["userAttributes"]["sub"] = json!("another-sub")
        }),
        ("client", |e| {
            e["callerContext"]["clientId"] = json!("other-client")
        }),
        ("source", |e| {
            e["triggerSource"] = json!("TokenGeneration_RefreshTokens")
        }),
        ("metadata nonce", |e| {
            e["request"]["clientMetadata"] = json!({"signin_nonce": "n-2"})
        }),
        ("scopes", |e| e["request"]["scopes"] = json!(["openid"])),
    ];
    for (what, change) in changes {
        let mut other = base.clone();
        change(&mut other);
        assert_ne!(key_of(&other), key, "{what} must change the key");
    }

    // Through the handler: the key sent to the broker is this key.
    let broker = FakeBroker::minting();
    let config = Config::new("http://x", SecretString::from("k"));
    run(&base, &config, &broker).await.unwrap();
    run(&retry, &config, &broker).await.unwrap();
    let sent: Vec<String> = broker
        .calls()
        .into_iter()
        .map(|(request, _)| request.idempotency_key)
        .collect();
    assert_eq!(sent, [key.clone(), key]);
}

#[tokio::test]
async fn groups_sent_to_the_broker_stay_within_its_limits() {
    let mut event = fixture!("v3-hosted-auth.json");
    let many: Vec<String> = (0..40).map(|i| format!("group-{i}")).collect();
    let mut groups: Vec<Value> = many.iter().map(|g| json!(g)).collect();
    groups.insert(0, json!("x".repeat(129)));
    event["request"]["groupConfiguration"]["groupsToOverride"] = json!(groups);
    let broker = FakeBroker::minting();
    let reply = run(
        &event,
        &Config::new("http://x", SecretString::from("k")),
        &broker,
    )
    .await
    .unwrap();
    let (claims, _, _) = broker.only_call();
    assert_eq!(claims.groups, many[..32]);
    assert_eq!(
        reply["response"]["claimsAndScopeOverrideDetails"]["groupOverrideDetails"]
            ["groupsToOverride"]
            .as_array()
            .unwrap()
            .len(),
        41,
        "the tokens keep every group"
    );
}

// ---- secrets ----

/// Captures this thread's log output at TRACE while alive.
struct LogCapture {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn start() -> Self {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        Self {
            buffer,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn contents(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn no_secret_in_logs_errors_or_debug_output() {
    let logs = LogCapture::start();
    let config = Config::new("http://x", SecretString::from("tbk_APIKEYSECRET"));
    let mut outputs = Vec::new();
    for (_, event) in all_fixtures() {
        let broker = FakeBroker::minting();
        let reply = run(&event, &samples_config(), &broker).await.unwrap();
        outputs.push(format!("{:?}", broker.calls()));
        assert!(
            reply.to_string().contains("SECRET0"),
            "the reply itself carries the secrets"
        );
        let failing = FakeBroker::new(Behaviour::Fail(Status::unavailable("down")));
        let err = run(&event, &samples_config(), &failing).await.unwrap_err();
        let text = format!("{err} {err:?}");
        outputs.push(format!("{text} {:?}", Diagnostic::from(err)));
    }
    outputs.push(format!("{config:?}"));
    let event = PreTokenGenEvent::deserialize(&fixture!("v3-hosted-auth.json")).unwrap();
    let minted = FakeBroker::minting()
        .issue_tokens(
            Default::default(),
            CallContext {
                timeout: Duration::ZERO,
                traceparent: None,
            },
        )
        .await
        .unwrap();
    for shape in [ReplyShape::V1, ReplyShape::V2] {
        let built = reply(shape, &event, &minted, &config);
        let debug = format!("{built:?}");
        assert!(debug.contains("fauna_access_token"), "{debug}");
        outputs.push(debug);
        outputs.push(format!("{minted:?}"));
    }
    let logs = logs.contents();
    assert!(
        logs.contains("fauna claims added"),
        "the capture works: {logs}"
    );
    for text in outputs.iter().chain([&logs]) {
        for secret in ["SECRET", "tba_", "tbr_", "APIKEY"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
}
