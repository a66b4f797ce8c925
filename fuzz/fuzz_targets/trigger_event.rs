//! The trigger's Pre Token Generation event parser, and what the handler derives from an event.
//!
//! The first byte picks the configuration (failure policy, which tokens get the claims,
//! refresh claim, email suppression, verified-email check); the rest is the event as Lambda
//! delivers it. The event is read both straight from the bytes and through the handler (from
//! a JSON value, as the runtime hands it over), with a broker that mints at once. Besides
//! "never panics": the handler answers with the event it received, changing `response` alone;
//! the broker is called only for an event with an email, with that email trimmed, at most 32
//! groups and the event's idempotency key.

#![no_main]

use std::sync::{Mutex, OnceLock};

use lambda_runtime::{Context, LambdaEvent};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;
use serde_json::Value;
use tokenbroker_client::{ClientResult, IssuedToken, TokenPair, pb};
use tokenbroker_trigger::{
    CallContext, ClaimName, ClaimTokens, Config, Deps, FailurePolicy, PreTokenGenEvent, handle,
    idempotency_key,
};

/// A broker that mints a fixed pair and keeps the requests it was sent.
#[derive(Default)]
struct Broker(Mutex<Vec<pb::IssueTokensRequest>>);

impl Deps for Broker {
    async fn issue_tokens(
        &self,
        request: pb::IssueTokensRequest,
        _call: CallContext,
    ) -> ClientResult<TokenPair> {
        self.0.lock().expect("no panic while held").push(request);
        let token = |id: &str| IssuedToken {
            token_id: id.to_owned(),
            secret: SecretString::from(format!("secret-{id}")),
            expires_at: None,
        };
        Ok(TokenPair {
            account_id: "account".into(),
            family_id: "family".into(),
            refresh: token("refresh"),
            access: token("access"),
            replayed: false,
        })
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds")
    })
}

fn config(bits: u8) -> Config {
    let mut config = Config::new("http://127.0.0.1:1", SecretString::from("key"));
    if bits & 1 != 0 {
        config.failure_policy = FailurePolicy::FailOpen;
    }
    config.claim_tokens = match (bits >> 1) % 3 {
        0 => ClaimTokens::default(),
        1 => ClaimTokens {
            id: false,
            access: true,
        },
        _ => ClaimTokens {
            id: true,
            access: true,
        },
    };
    if bits & 0x08 != 0 {
        config.refresh_claim = Some(ClaimName::parse("fauna_refresh_token").expect("valid"));
    }
    config.suppress_email = bits & 0x10 == 0;
    config.require_verified_email = bits & 0x20 == 0;
    config
}

fn without_response(value: &Value) -> Value {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        object.remove("response");
    }
    value
}

fuzz_target!(|data: &[u8]| {
    let Some((&bits, json)) = data.split_first() else {
        return;
    };
    let direct = serde_json::from_slice::<PreTokenGenEvent>(json);
    if let Ok(event) = &direct {
        std::hint::black_box((
            event.reply_shape(),
            event.email_verified(),
            event.groups().count(),
            idempotency_key(event),
        ));
    }
    let Ok(payload) = serde_json::from_slice::<Value>(json) else {
        return;
    };
    let config = config(bits);
    let broker = Broker::default();
    let answer = runtime().block_on(handle(
        LambdaEvent::new(payload.clone(), Context::default()),
        &config,
        &broker,
    ));
    let calls = broker.0.into_inner().expect("not poisoned");
    assert!(calls.len() <= 1);
    if let Ok(reply) = &answer {
        assert_eq!(without_response(reply), without_response(&payload));
        if calls.is_empty() {
            assert_eq!(reply, &payload, "no broker call, yet the event changed");
        }
    }
    let Some(request) = calls.first() else {
        return;
    };
    let event: PreTokenGenEvent =
        serde_json::from_value(payload).expect("the handler read this event");
    let email = event.email().expect("the broker is called for an email");
    let Some(pb::issue_tokens_request::Subject::Claims(claims)) = &request.subject else {
        panic!("the trigger asserts claims");
    };
    assert_eq!(claims.email, email.trim());
    assert!(claims.groups.len() <= 32);
    assert_eq!(request.idempotency_key, idempotency_key(&event));
});
