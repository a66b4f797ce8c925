//! Verifier tests with RSA keys generated here, a JWKS served by an in-memory source, and
//! tokens with Cognito's own claim sets; the same cases run over gRPC and a real HTTP JWKS in
//! `tests/it/cognito.rs`.

use std::{
    collections::BTreeMap,
    sync::{LazyLock, Mutex},
};

use async_trait::async_trait;
use aws_lc_rs::{
    hmac, rand,
    rsa::{KeyPair, KeySize},
    signature::{KeyPair as _, RSA_PKCS1_SHA256},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use super::*;
use crate::model::clock::{ManualClock, SystemClock};
use crate::{identity::AuthError, obs::metrics::Outcome};

const ISSUER: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_UnitPool1";
const CLIENT: &str = "5g2lhd0cunit0client0aaaaaa";
const SUB: &str = "2f1d4c8e-7a3b-4e29-9c61-0d5e8b7a6f10";

/// Two key pairs, generated once per test process (RSA key generation is the slow part).
static KEYS: LazyLock<[KeyPair; 2]> = LazyLock::new(|| {
    [
        KeyPair::generate(KeySize::Rsa2048).expect("rsa keygen"),
        KeyPair::generate(KeySize::Rsa2048).expect("rsa keygen"),
    ]
});

fn jwk(key: &KeyPair, kid: &str) -> Value {
    let public = key.public_key();
    json!({
        "alg": "RS256", "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
        "kid": kid, "kty": "RSA",
        "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()), "use": "sig",
    })
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn sign(key: &KeyPair, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let mut signature = vec![0; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("rsa sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn rs256(kid: &str) -> Value {
    json!({"kid": kid, "alg": "RS256"})
}

fn now() -> i64 {
    SystemClock.now().0 / 1_000_000
}

/// An ID token's claims, as Cognito writes them.
fn id_claims() -> Value {
    let now = now();
    json!({
        "sub": SUB, "email_verified": true, "iss": ISSUER,
        "cognito:username": "alice", "origin_jti": "7c0f-origin", "aud": CLIENT,
        "event_id": "e1b5-event", "token_use": "id", "auth_time": now - 60,
        "exp": now + 3600, "iat": now, "jti": "9a3e-jti", "email": "Alice@Example.com",
        "cognito:groups": ["admins", "users"],
    })
}

/// An access token's claims, as Cognito writes them: no `aud`, a `client_id`.
fn access_claims() -> Value {
    let now = now();
    json!({
        "sub": SUB, "cognito:groups": ["users"], "iss": ISSUER, "client_id": CLIENT,
        "origin_jti": "7c0f-origin", "event_id": "e1b5-event", "token_use": "access",
        "scope": "aws.cognito.signin.user.admin", "auth_time": now - 60, "exp": now + 3600,
        "iat": now, "jti": "1b2c-jti", "username": "alice",
    })
}

#[derive(Debug, Default)]
struct MemorySource {
    body: Mutex<Value>,
    fetches: AtomicU64,
}

#[async_trait]
impl JwksSource for MemorySource {
    async fn fetch(&self) -> Result<Jwks, JwksError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Jwks::parse(self.body.lock().unwrap().to_string().as_bytes())
    }
    fn url(&self) -> &str {
        "memory://jwks"
    }
}

struct Fixture {
    verifier: CognitoVerifier,
    source: Arc<MemorySource>,
    clock: Arc<ManualClock>,
}

fn settings() -> CognitoSettings {
    CognitoSettings {
        pools: vec![PoolSettings {
            issuer: ISSUER.into(),
            jwks_url: None,
            client_ids: vec![CLIENT.into()],
            group_roles: BTreeMap::from([("admins".into(), vec![Role::Admin])]),
            scope_roles: BTreeMap::from([("tokenbroker/introspect".into(), vec![Role::Service])]),
            direct_exchange: false,
        }],
        ..CognitoSettings::default()
    }
}

async fn fixture_with(settings: CognitoSettings) -> Fixture {
    let source = Arc::new(MemorySource::default());
    *source.body.lock().unwrap() =
        json!({"keys": [jwk(&KEYS[0], "id-key"), jwk(&KEYS[0], "access-key")]});
    let clock = Arc::new(ManualClock::new());
    let verifier = CognitoVerifier::with_sources(&settings, clock.clone(), |_| {
        source.clone() as Arc<dyn JwksSource>
    })
    .unwrap();
    assert!(verifier.hydrate().await);
    Fixture {
        verifier,
        source,
        clock,
    }
}

async fn fixture() -> Fixture {
    fixture_with(settings()).await
}

fn secret(token: String) -> SecretString {
    SecretString::from(token)
}

/// Exchanges `token` and returns the failure's stage, checking the message hides the token.
async fn exchange_stage(f: &Fixture, token: String) -> Stage {
    let err = f
        .verifier
        .exchange(&secret(token.clone()))
        .await
        .expect_err("the token must be rejected");
    let message = AuthError::from(err).to_string();
    assert!(
        !message.contains(&token) && !token.split('.').any(|s| s.len() > 8 && message.contains(s)),
        "the message echoes the token: {message}"
    );
    err.stage()
}

#[tokio::test]
async fn valid_id_token_exchanges_for_its_identity() {
    let f = fixture().await;
    let token = sign(&KEYS[0], &rs256("id-key"), &id_claims());
    let identity = f.verifier.exchange(&secret(token)).await.unwrap();
    assert_eq!(identity.email, "Alice@Example.com");
    assert_eq!(identity.sub, SUB);
    assert_eq!(identity.user_pool_id, "us-east-1_UnitPool1");
    assert_eq!(identity.client_id.as_deref(), Some(CLIENT));
    assert_eq!(identity.groups, ["admins", "users"]);
}

#[tokio::test]
async fn access_token_without_aud_authenticates_a_caller_with_mapped_roles() {
    let f = fixture().await;
    let plain = sign(&KEYS[0], &rs256("access-key"), &access_claims());
    let caller = f.verifier.caller(&secret(plain)).await.unwrap();
    assert_eq!(caller.name, format!("cognito:{SUB}"));
    assert!(caller.roles.is_empty(), "no group or scope maps to a role");

    let mut claims = access_claims();
    claims["cognito:groups"] = json!(["users", "admins"]);
    claims["scope"] = json!("openid tokenbroker/introspect");
    let mapped = sign(&KEYS[0], &rs256("access-key"), &claims);
    let caller = f.verifier.caller(&secret(mapped)).await.unwrap();
    assert_eq!(caller.roles, [Role::Admin, Role::Service]);
}

#[tokio::test]
async fn leeway_admits_a_just_expired_token_and_no_more() {
    let mut s = settings();
    s.leeway_seconds = 30;
    let f = fixture_with(s).await;
    let mut claims = id_claims();
    claims["exp"] = json!(now() - 20);
    claims["iat"] = json!(now() - 3620);
    let token = sign(&KEYS[0], &rs256("id-key"), &claims);
    f.verifier.exchange(&secret(token.clone())).await.unwrap();
    f.clock.advance(Duration::from_secs(15));
    assert_eq!(exchange_stage(&f, token).await, Stage::Claims);
}

#[tokio::test]
async fn time_claims_are_judged_by_the_injected_clock_without_leeway() {
    let f = fixture().await;
    let token = sign(&KEYS[0], &rs256("id-key"), &id_claims());
    f.verifier.exchange(&secret(token.clone())).await.unwrap();
    // Cached by now; the claims are still checked on every use.
    f.clock.advance(Duration::from_secs(3600));
    assert_eq!(exchange_stage(&f, token).await, Stage::Claims);

    let f = fixture().await;
    for (claim, offset) in [("nbf", 5), ("iat", 5), ("exp", -1)] {
        let mut claims = id_claims();
        claims[claim] = json!(now() + offset);
        let token = sign(&KEYS[0], &rs256("id-key"), &claims);
        assert_eq!(exchange_stage(&f, token).await, Stage::Claims, "{claim}");
    }
}

#[tokio::test]
async fn nbf_and_iat_within_the_leeway_pass() {
    let mut s = settings();
    s.leeway_seconds = 60;
    let f = fixture_with(s).await;
    let mut claims = id_claims();
    claims["nbf"] = json!(now() + 30);
    claims["iat"] = json!(now() + 30);
    let token = sign(&KEYS[0], &rs256("id-key"), &claims);
    f.verifier.exchange(&secret(token)).await.unwrap();
    claims["iat"] = json!(now() + 120);
    let token = sign(&KEYS[0], &rs256("id-key"), &claims);
    assert_eq!(exchange_stage(&f, token).await, Stage::Claims);
}

#[tokio::test]
async fn other_algorithms_are_rejected() {
    let f = fixture().await;
    let claims = id_claims();
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "id-key"})),
        b64(&claims)
    );
    assert_eq!(exchange_stage(&f, unsigned).await, Stage::Structure);
    let none = format!(
        "{}.{}.c2ln",
        b64(&json!({"alg": "none", "kid": "id-key"})),
        b64(&claims)
    );
    assert_eq!(exchange_stage(&f, none).await, Stage::Signature);

    // Algorithm confusion: HS256 keyed with the RSA public key a verifier might hand to HMAC.
    let public_der = KEYS[0].public_key().as_ref().to_vec();
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "kid": "id-key", "typ": "JWT"})),
        b64(&claims)
    );
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &public_der),
        input.as_bytes(),
    );
    let confused = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
    assert_eq!(exchange_stage(&f, confused).await, Stage::Signature);
    assert_eq!(f.verifier.signature_checks(), 0, "no key was even used");
}

#[tokio::test]
async fn unknown_kid_and_bad_signatures_are_signature_errors() {
    let f = fixture().await;
    let unknown = sign(&KEYS[0], &rs256("not-in-the-set"), &id_claims());
    assert_eq!(exchange_stage(&f, unknown).await, Stage::Signature);
    let other_key = sign(&KEYS[1], &rs256("id-key"), &id_claims());
    assert_eq!(exchange_stage(&f, other_key).await, Stage::Signature);
    let genuine = sign(&KEYS[0], &rs256("id-key"), &id_claims());
    let mut forged_claims = id_claims();
    forged_claims["email"] = json!("mallory@example.com");
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let forged_payload = b64(&forged_claims);
    parts[1] = &forged_payload;
    assert_eq!(exchange_stage(&f, parts.join(".")).await, Stage::Signature);
}

#[tokio::test]
async fn claims_that_do_not_match_the_pool_or_call_are_rejected() {
    let f = fixture().await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "wrong iss",
            json!({"iss": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Other"}),
            "id-key",
        ),
        (
            "foreign aud",
            json!({"aud": "someone-elses-client"}),
            "id-key",
        ),
        (
            "unknown token_use",
            json!({"token_use": "refresh"}),
            "id-key",
        ),
        (
            "no verified email",
            json!({"email_verified": false}),
            "id-key",
        ),
        ("no email", json!({"email": null}), "id-key"),
    ];
    for (what, patch, kid) in cases {
        let mut claims = id_claims();
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let token = sign(&KEYS[0], &rs256(kid), &claims);
        assert_eq!(exchange_stage(&f, token).await, Stage::Claims, "{what}");
    }
    let mut claims = access_claims();
    claims["client_id"] = json!("someone-elses-client");
    let foreign = sign(&KEYS[0], &rs256("access-key"), &claims);
    let err = f.verifier.caller(&secret(foreign)).await.unwrap_err();
    assert_eq!(err.stage(), Stage::Claims);
    // An ID token is not a caller credential, even a valid one.
    let id = sign(&KEYS[0], &rs256("id-key"), &id_claims());
    let err = f.verifier.caller(&secret(id)).await.unwrap_err();
    assert_eq!(err.stage(), Stage::Claims);
}

#[tokio::test]
async fn email_verification_can_be_switched_off() {
    let mut s = settings();
    s.require_email_verified = false;
    let f = fixture_with(s).await;
    let mut claims = id_claims();
    claims["email_verified"] = json!(false);
    let token = sign(&KEYS[0], &rs256("id-key"), &claims);
    f.verifier.exchange(&secret(token)).await.unwrap();
}

#[tokio::test]
async fn malformed_and_oversized_tokens_are_structure_errors() {
    let f = fixture().await;
    let genuine = sign(&KEYS[0], &rs256("id-key"), &id_claims());
    let (head, rest) = genuine.split_once('.').unwrap();
    for bad in [
        format!("{head}.!!!{rest}"),
        format!("{head}.+{rest}"),
        format!("{genuine}=="),
        genuine.replace('.', ".."),
        format!("ey{}", "A".repeat(100 * 1024)),
        format!("{genuine}{}", "A".repeat(100 * 1024)),
    ] {
        let len = bad.len();
        assert_eq!(exchange_stage(&f, bad).await, Stage::Structure, "{len}");
    }
    assert_eq!(f.source.fetches.load(Ordering::SeqCst), 1, "hydrate only");
}

#[tokio::test]
async fn repeated_token_is_verified_once() {
    let f = fixture().await;
    let token = secret(sign(&KEYS[0], &rs256("id-key"), &id_claims()));
    for _ in 0..20 {
        f.verifier.exchange(&token).await.unwrap();
    }
    assert_eq!(f.verifier.signature_checks(), 1);
    // A different token_use is judged per call, from the cache.
    assert!(f.verifier.caller(&token).await.is_err());
    assert_eq!(f.verifier.signature_checks(), 1);
}

#[tokio::test]
async fn rotated_key_is_found_after_the_cooldown() {
    let f = fixture().await;
    let rotated = sign(&KEYS[1], &rs256("new-key"), &id_claims());
    // A token with a kid the endpoint does not publish yet: one refetch, then the cooldown.
    f.clock.advance(Duration::from_secs(11));
    assert_eq!(exchange_stage(&f, rotated.clone()).await, Stage::Signature);
    // The pool rotates; the cooldown still holds the refetch back …
    *f.source.body.lock().unwrap() = json!({"keys": [jwk(&KEYS[1], "new-key")]});
    assert_eq!(exchange_stage(&f, rotated.clone()).await, Stage::Signature);
    assert_eq!(f.source.fetches.load(Ordering::SeqCst), 2);
    // … until it has passed.
    f.clock.advance(Duration::from_secs(10));
    f.verifier.exchange(&secret(rotated)).await.unwrap();
    assert_eq!(f.source.fetches.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn unavailable_keys_are_unavailable_not_unauthenticated() {
    let source = Arc::new(MemorySource::default());
    *source.body.lock().unwrap() = json!("down");
    let verifier = CognitoVerifier::with_sources(&settings(), Arc::new(ManualClock::new()), |_| {
        source.clone() as Arc<dyn JwksSource>
    })
    .unwrap();
    assert!(!verifier.hydrate().await);
    assert!(!verifier.is_ready());
    let token = sign(&KEYS[0], &rs256("id-key"), &id_claims());
    let err = verifier.exchange(&secret(token)).await.unwrap_err();
    assert_eq!(err.stage(), Stage::Unavailable);
    assert!(matches!(AuthError::from(err), AuthError::Unavailable(_)));
}

#[tokio::test]
async fn cache_lookups_and_jwks_fetches_are_counted() {
    let metrics = Arc::new(CognitoMetrics::default());
    let source = Arc::new(MemorySource::default());
    *source.body.lock().unwrap() = json!({"keys": [jwk(&KEYS[0], "id-key")]});
    let clock = Arc::new(ManualClock::new());
    let verifier = CognitoVerifier::with_sources(&settings(), clock.clone(), |_| {
        source.clone() as Arc<dyn JwksSource>
    })
    .unwrap()
    .with_metrics(Arc::clone(&metrics));
    assert!(verifier.hydrate().await);

    let token = secret(sign(&KEYS[0], &rs256("id-key"), &id_claims()));
    verifier.exchange(&token).await.unwrap();
    verifier.exchange(&token).await.unwrap();
    assert_eq!(
        metrics.verified_cache.get(CacheResult::Hit).get(),
        1,
        "hits"
    );
    assert_eq!(
        metrics.verified_cache.get(CacheResult::Miss).get(),
        1,
        "misses"
    );

    // An unknown kid after the cooldown fetches again; the endpoint now serves no keys.
    *source.body.lock().unwrap() = json!({"keys": []});
    clock.advance(Duration::from_secs(11));
    let unknown = secret(sign(&KEYS[0], &rs256("new-key"), &id_claims()));
    verifier.exchange(&unknown).await.unwrap_err();
    assert_eq!(metrics.jwks_fetches.get(Outcome::Ok).get(), 1, "ok fetches");
    assert_eq!(
        metrics.jwks_fetches.get(Outcome::Error).get(),
        1,
        "failed fetches"
    );
    assert_eq!(
        metrics.verified_cache.get(CacheResult::Miss).get(),
        2,
        "a failure is a miss"
    );
}
