//! A stand-in for a Cognito user pool: RSA keys generated in the process, a JWKS served over
//! real HTTP on loopback (with a fetch counter and failure modes), and tokens minted with the
//! exact claim sets Cognito puts in ID and access tokens (section 4 of the Cognito reference).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    hmac, rand,
    rsa::{KeyPair, KeySize},
    signature::{KeyPair as _, RSA_PKCS1_SHA256},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokenbroker::{
    identity::Role,
    identity::cognito::{CognitoSettings, PoolSettings},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// The issuer every test pool uses: the AWS form, while the keys come from loopback.
pub const ISSUER: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_TestPool1";
/// The app client the test pool accepts.
pub const CLIENT_ID: &str = "5g2lhd0ctest0client0aaaaaaa";
/// A `sub` for test users.
pub const SUB: &str = "2f1d4c8e-7a3b-4e29-9c61-0d5e8b7a6f10";
/// The group the test pool maps to the admin role.
pub const ADMIN_GROUP: &str = "admins";
/// The scope the test pool maps to the service role.
pub const SERVICE_SCOPE: &str = "tokenbroker/introspect";

/// RSA key pairs, generated once per process (key generation is the slow part).
static KEYS: LazyLock<Vec<Arc<KeyPair>>> = LazyLock::new(|| {
    (0..3)
        .map(|_| Arc::new(KeyPair::generate(KeySize::Rsa2048).expect("rsa key generation")))
        .collect()
});

/// A signing key with its `kid`.
#[derive(Debug, Clone)]
pub struct SigningKey {
    /// The `kid` it is published under.
    pub kid: String,
    pair: Arc<KeyPair>,
}

impl SigningKey {
    /// Returns the `n`-th process-wide key pair (0 to 2) under `kid`.
    ///
    /// # Panics
    ///
    /// For `n` over 2.
    pub fn nth(n: usize, kid: &str) -> Self {
        Self {
            kid: kid.into(),
            pair: Arc::clone(&KEYS[n]),
        }
    }

    /// Returns the key's JWK, as Cognito publishes it.
    pub fn jwk(&self) -> Value {
        let public = self.pair.public_key();
        json!({
            "alg": "RS256",
            "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
            "kid": self.kid,
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
            "use": "sig",
        })
    }

    /// Returns the public key's DER (RSAPublicKey), the "secret" of an algorithm-confusion
    /// attack.
    pub fn public_der(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// Signs `claims` with RS256 under a standard header (`kid`, `alg`).
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(&json!({"kid": self.kid, "alg": "RS256"}), claims)
    }

    /// Signs `claims` with RS256 under `header`, whatever it says.
    ///
    /// # Panics
    ///
    /// If signing fails.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!("{}.{}", b64(header), b64(claims));
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &rand::SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .expect("rsa signing");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// Returns the base64url (no padding) of a JSON value.
pub fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// Returns `header.claims.` signed with HS256 keyed by `secret` (algorithm confusion when the
/// secret is an RSA public key).
pub fn sign_hs256(kid: &str, secret: &[u8], claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "kid": kid, "typ": "JWT"})),
        b64(claims)
    );
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Returns `header.claims.` with `alg: none` and an empty signature.
pub fn unsigned(kid: &str, claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": kid})),
        b64(claims)
    )
}

/// Seconds since the epoch now.
pub fn now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

/// The claims of an ID token for `email`, exactly as Cognito issues them (valid for an hour).
pub fn id_claims(email: &str) -> Value {
    let now = now();
    json!({
        "sub": SUB,
        "email_verified": true,
        "iss": ISSUER,
        "cognito:username": "alice",
        "origin_jti": "5b1e2c9a-1f0d-4c8b-a7e6-3d2f1e0c9b8a",
        "aud": CLIENT_ID,
        "event_id": "0e6c7a4b-2d3f-4a1e-9b8c-7f6e5d4c3b2a",
        "token_use": "id",
        "auth_time": now - 60,
        "exp": now + 3600,
        "iat": now,
        "jti": "8c7b6a5d-4e3f-4a2b-9c1d-0e9f8a7b6c5d",
        "email": email,
        "cognito:groups": ["users"],
    })
}

/// The claims of an access token, exactly as Cognito issues them: no `aud`, a `client_id`, a
/// `scope` (valid for an hour).
pub fn access_claims(groups: &[&str], scope: &str) -> Value {
    let now = now();
    json!({
        "sub": SUB,
        "cognito:groups": groups,
        "iss": ISSUER,
        "client_id": CLIENT_ID,
        "origin_jti": "5b1e2c9a-1f0d-4c8b-a7e6-3d2f1e0c9b8a",
        "event_id": "0e6c7a4b-2d3f-4a1e-9b8c-7f6e5d4c3b2a",
        "token_use": "access",
        "scope": scope,
        "auth_time": now - 60,
        "exp": now + 3600,
        "iat": now,
        "jti": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
        "username": "alice",
    })
}

/// Returns `claims` with the fields of `patch` set (a `null` removes the claim).
pub fn patched(mut claims: Value, patch: &Value) -> Value {
    let object = claims.as_object_mut().expect("claims are an object");
    for (key, value) in patch.as_object().expect("a patch is an object") {
        if value.is_null() {
            object.remove(key);
        } else {
            object.insert(key.clone(), value.clone());
        }
    }
    claims
}

/// How the JWKS server answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200 with the current key set.
    Keys,
    /// This status, with a small HTML body.
    Status(u16),
    /// The key set, after this delay.
    Slow(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with a `Content-Length` longer than the body, then the connection closes.
    Truncated,
    /// 200 with a body over the broker's limit.
    Huge,
}

#[derive(Debug)]
struct ServerState {
    keys: Mutex<Value>,
    answer: Mutex<Answer>,
    requests: AtomicU64,
}

/// A JWKS endpoint over HTTP/1.1 on loopback that counts its requests.
#[derive(Debug)]
pub struct JwksServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl JwksServer {
    /// Serves `keys` on a free loopback port.
    ///
    /// # Panics
    ///
    /// If no port can be bound.
    pub async fn start(keys: &[SigningKey]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind jwks");
        Self::serve(listener, keys)
    }

    /// Returns an address on which nothing listens yet, for a server started later with
    /// [`JwksServer::start_on`].
    ///
    /// # Panics
    ///
    /// If no port can be bound.
    pub async fn reserve_address() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("address")
    }

    /// Serves `keys` on `addr`.
    ///
    /// # Panics
    ///
    /// If `addr` cannot be bound.
    pub async fn start_on(addr: SocketAddr, keys: &[SigningKey]) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind jwks address");
        Self::serve(listener, keys)
    }

    fn serve(listener: TcpListener, keys: &[SigningKey]) -> Self {
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(ServerState {
            keys: Mutex::new(key_set(keys)),
            answer: Mutex::new(Answer::Keys),
            requests: AtomicU64::new(0),
        });
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(respond(stream, Arc::clone(&shared)));
            }
        });
        Self {
            addr,
            state,
            task: Mutex::new(Some(task)),
        }
    }

    /// Returns the JWKS URL.
    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    /// Returns the bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns how many requests have arrived.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Publishes `keys` instead of the current set.
    pub fn publish(&self, keys: &[SigningKey]) {
        *self.state.keys.lock().expect("keys lock") = key_set(keys);
    }

    /// Changes how the server answers.
    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().expect("answer lock") = answer;
    }

    /// Stops listening: later connections are refused.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().expect("task lock").take() {
            task.abort();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn key_set(keys: &[SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(SigningKey::jwk).collect::<Vec<_>>() })
}

async fn respond(mut stream: TcpStream, state: Arc<ServerState>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let answer = state.answer.lock().expect("answer lock").clone();
    let keys = state.keys.lock().expect("keys lock").to_string();
    let (status, body, declared) = match answer {
        Answer::Keys => (200, keys, None),
        Answer::Slow(delay) => {
            tokio::time::sleep(delay).await;
            (200, keys, None)
        }
        Answer::Status(code) => (code, "<html>error</html>".to_owned(), None),
        Answer::Garbage => (200, "<html>not json</html>".to_owned(), None),
        Answer::Truncated => (200, keys[..keys.len() / 2].to_owned(), Some(keys.len())),
        Answer::Huge => (200, " ".repeat(2 << 20), None),
    };
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        declared.unwrap_or(body.len())
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A test user pool: its keys (an ID-token key and an access-token key, as Cognito has), its
/// JWKS server, and the broker settings that trust it.
#[derive(Debug)]
pub struct TestPool {
    /// The key ID tokens are signed with.
    pub id_key: SigningKey,
    /// The key access tokens are signed with.
    pub access_key: SigningKey,
    /// The JWKS endpoint.
    pub jwks: JwksServer,
}

impl TestPool {
    /// Starts a pool whose JWKS server publishes both keys.
    pub async fn start() -> Self {
        let (id_key, access_key) = pool_keys();
        let jwks = JwksServer::start(&[id_key.clone(), access_key.clone()]).await;
        Self {
            id_key,
            access_key,
            jwks,
        }
    }

    /// Returns settings that trust this pool: `admins` → admin, `tokenbroker/introspect` →
    /// service.
    pub fn settings(&self) -> CognitoSettings {
        settings_for(&self.jwks.url())
    }

    /// Returns an ID token for `email`.
    pub fn id_token(&self, email: &str) -> SecretString {
        SecretString::from(self.id_key.sign(&id_claims(email)))
    }

    /// Returns an access token with `groups` and `scope`.
    pub fn access_token(&self, groups: &[&str], scope: &str) -> SecretString {
        SecretString::from(self.access_key.sign(&access_claims(groups, scope)))
    }
}

/// Returns the ID-token and access-token keys every test pool uses.
pub fn pool_keys() -> (SigningKey, SigningKey) {
    (
        SigningKey::nth(0, "id-key-2024"),
        SigningKey::nth(1, "access-key-2024"),
    )
}

/// Returns settings that trust [`ISSUER`] with keys at `jwks_url`: `admins` → admin,
/// `tokenbroker/introspect` → service.
pub fn settings_for(jwks_url: &str) -> CognitoSettings {
    CognitoSettings {
        pools: vec![PoolSettings {
            issuer: ISSUER.into(),
            jwks_url: Some(jwks_url.into()),
            client_ids: vec![CLIENT_ID.into()],
            group_roles: BTreeMap::from([(ADMIN_GROUP.into(), vec![Role::Admin])]),
            scope_roles: BTreeMap::from([(SERVICE_SCOPE.into(), vec![Role::Service])]),
            direct_exchange: false,
        }],
        ..CognitoSettings::default()
    }
}
