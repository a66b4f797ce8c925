//! JSON Web Key Sets: a fetcher trait ([`JwksSource`]), its HTTP implementation, and the cache
//! that decides when to fetch ([`CachedJwks`]).
//!
//! The cache follows aws-jwt-verify: keys are loaded at start-up and cached by `kid`; only an
//! unknown `kid` triggers a refetch, and then at most once per URL per cooldown; concurrent
//! misses wait for one in-flight fetch instead of starting their own; a `kid` that a fetch did
//! not bring is remembered as missing until the next fetch is allowed, so a flood of made-up
//! kids costs one fetch and then nothing. A failed fetch keeps the last good keys.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use tokio::sync::{Mutex, watch};
use tracing::{Instrument as _, debug, info, warn};

use super::CognitoMetrics;
use crate::{
    model::{UnixMicros, clock::Clock},
    obs::metrics::Outcome,
};

/// Largest JWKS body read; Cognito's is about 1 KiB.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// Most kids remembered as missing between two fetches; past it, unknown kids are still
/// refused, just without being remembered.
const MAX_MISSING_KIDS: usize = 4096;

/// Why a JWKS could not be fetched or used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The endpoint could not be reached.
    #[error("cannot connect to the jwks endpoint")]
    Connect(#[source] reqwest::Error),
    /// The endpoint did not answer within the timeout.
    #[error("the jwks request timed out")]
    Timeout(#[source] reqwest::Error),
    /// The endpoint answered with a status other than 2xx.
    #[error("the jwks endpoint answered http {0}")]
    Status(u16),
    /// The request failed in another way (a broken connection mid-body, a redirect loop).
    #[error("the jwks request failed")]
    Request(#[source] reqwest::Error),
    /// The body was over [`MAX_JWKS_BYTES`].
    #[error("the jwks body is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// The body is not a JWKS.
    #[error("the jwks body is not a json web key set")]
    Malformed(#[source] serde_json::Error),
    /// The set holds no RSA signing key with a `kid`.
    #[error("the jwks holds no usable RS256 key")]
    NoUsableKeys,
}

/// A parsed key set: RS256 verification keys by `kid`.
#[derive(Clone, Default)]
pub struct Jwks {
    keys: HashMap<String, Arc<DecodingKey>>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwks")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

impl Jwks {
    /// Parses a JWKS document, keeping the RSA keys that may verify RS256 signatures (no `alg`
    /// or `RS256`, no `use` or `sig`, with a `kid`); other keys are skipped, not errors, so a
    /// pool that adds an unrelated key type keeps working.
    ///
    /// # Errors
    ///
    /// [`JwksError::Malformed`] for a body that is not a JWKS, [`JwksError::NoUsableKeys`] when
    /// no key is usable.
    pub fn parse(body: &[u8]) -> Result<Self, JwksError> {
        let raw: RawJwks = serde_json::from_slice(body).map_err(JwksError::Malformed)?;
        let mut keys = HashMap::new();
        for jwk in raw.keys {
            let usable = jwk.kty == "RSA"
                && jwk.alg.as_deref().is_none_or(|alg| alg == "RS256")
                && jwk.use_.as_deref().is_none_or(|u| u == "sig");
            let (Some(kid), Some(n), Some(e), true) = (jwk.kid, jwk.n, jwk.e, usable) else {
                continue;
            };
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(key) => {
                    keys.insert(kid, Arc::new(key));
                }
                Err(err) => debug!(%kid, error = %err, "skipping a jwk that is not an rsa key"),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Ok(Self { keys })
    }

    /// Returns the key with this `kid`.
    pub fn get(&self, kid: &str) -> Option<&Arc<DecodingKey>> {
        self.keys.get(kid)
    }

    /// Returns how many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Something that can fetch a pool's current key set.
#[async_trait]
pub trait JwksSource: fmt::Debug + Send + Sync + 'static {
    /// Fetches and parses the key set.
    async fn fetch(&self) -> Result<Jwks, JwksError>;

    /// Returns where the keys come from, for logs.
    fn url(&self) -> &str;
}

/// Fetches a JWKS over HTTP(S) with a shared `reqwest::Client`.
#[derive(Debug, Clone)]
pub struct HttpJwksSource {
    client: reqwest::Client,
    url: String,
}

impl HttpJwksSource {
    /// Returns a source for `url` that uses `client` (built once, with a timeout; see
    /// [`http_client`]).
    pub fn new(client: reqwest::Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
        }
    }

    /// Fetches once, in an HTTP client span (`DEBUG`) whose context the request carries as
    /// `traceparent`.
    async fn fetch_once(&self) -> Result<Jwks, JwksError> {
        let span = tracing::debug_span!(
            "jwks.fetch",
            otel.name = "GET",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = "GET",
            url.full = %self.url,
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let trace = span.in_scope(crate::obs::context::outgoing);
        let fetched = self.fetch_in_span(trace).instrument(span.clone()).await;
        if let Err(err) = &fetched {
            span.record("error.type", tracing::field::display(err));
            span.record("otel.status_code", "ERROR");
        }
        fetched
    }

    async fn fetch_in_span(
        &self,
        trace: Option<crate::obs::context::Outgoing>,
    ) -> Result<Jwks, JwksError> {
        use crate::obs::context::{TRACEPARENT, TRACESTATE};
        let mut request = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(trace) = trace {
            request = request.header(TRACEPARENT, trace.traceparent);
            if let Some(state) = trace.tracestate {
                request = request.header(TRACESTATE, state);
            }
        }
        let mut response = request.send().await.map_err(classify)?;
        // Classify by status before reading the body: an error page is not a malformed JWKS.
        let status = response.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        if !status.is_success() {
            return Err(JwksError::Status(status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(JwksError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(JwksError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Jwks::parse(&body)
    }
}

#[async_trait]
impl JwksSource for HttpJwksSource {
    async fn fetch(&self) -> Result<Jwks, JwksError> {
        // Like aws-jwt-verify's default fetcher: one immediate retry on a connection error (a
        // pooled connection the server had closed), none on anything else.
        match self.fetch_once().await {
            Err(JwksError::Connect(_)) => self.fetch_once().await,
            other => other,
        }
    }

    fn url(&self) -> &str {
        &self.url
    }
}

fn classify(err: reqwest::Error) -> JwksError {
    if err.is_timeout() {
        JwksError::Timeout(err)
    } else if err.is_connect() {
        JwksError::Connect(err)
    } else {
        JwksError::Request(err)
    }
}

/// Builds the one HTTP client every JWKS source shares.
///
/// # Errors
///
/// When the TLS backend cannot be initialised.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("tokenbroker/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Why a key could not be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLookupError {
    /// The key set (as last fetched) has no such `kid`.
    UnknownKid,
    /// The `kid` is not cached and the last fetch of the key set failed.
    Unavailable,
}

#[derive(Debug, Default)]
struct State {
    keys: Jwks,
    /// When the last fetch started (success or not), by the injected clock.
    last_fetch: Option<UnixMicros>,
    /// Whether the last fetch failed.
    last_failed: bool,
    /// Kids the last fetch did not bring (or asked for during the cooldown after it).
    missing: HashSet<String>,
}

/// A [`JwksSource`] behind a cache by `kid` with a per-URL fetch cooldown.
pub struct CachedJwks {
    source: Arc<dyn JwksSource>,
    clock: Arc<dyn Clock>,
    cooldown: Duration,
    state: RwLock<State>,
    /// Held for the whole of a fetch, so concurrent misses coalesce into one.
    fetching: Mutex<()>,
    loaded: watch::Sender<bool>,
    fetches: AtomicU64,
    /// Where fetch outcomes are counted, once attached (the cache is shared by pools, so it is
    /// attached after it is built).
    metrics: OnceLock<Arc<CognitoMetrics>>,
}

impl fmt::Debug for CachedJwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedJwks")
            .field("url", &self.source.url())
            .field("cooldown", &self.cooldown)
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

impl CachedJwks {
    /// Wraps `source`; `clock` times the cooldown (tests inject a manual one).
    pub fn new(source: Arc<dyn JwksSource>, clock: Arc<dyn Clock>, cooldown: Duration) -> Self {
        Self {
            source,
            clock,
            cooldown,
            state: RwLock::new(State::default()),
            fetching: Mutex::new(()),
            loaded: watch::Sender::new(false),
            fetches: AtomicU64::new(0),
            metrics: OnceLock::new(),
        }
    }

    /// Counts fetches by outcome in `metrics` (`tokenbroker_cognito_jwks_fetches_total`); the
    /// first call wins.
    pub fn attach_metrics(&self, metrics: Arc<CognitoMetrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// Returns the URL the keys come from.
    pub fn url(&self) -> &str {
        self.source.url()
    }

    /// Whether a fetch has ever succeeded (the keys it brought keep serving from then on).
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Returns a receiver that turns `true` once keys are loaded.
    pub fn subscribe_loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    /// Returns how many fetches this cache has started.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Loads the keys now unless a fetch is in flight or the cooldown forbids it; returns
    /// whether keys are loaded afterwards. Used at start-up and by the background retry of a
    /// pool whose keys never arrived.
    pub async fn hydrate(&self) -> bool {
        let _fetching = self.fetching.lock().await;
        if self.fetch_allowed() {
            self.fetch_locked().await;
        }
        self.is_loaded()
    }

    /// Returns the key for `kid`, fetching the key set when the `kid` is unknown and the
    /// cooldown allows.
    ///
    /// # Errors
    ///
    /// [`KeyLookupError::UnknownKid`] when the key set has no such key (now, or as of the last
    /// fetch during the cooldown); [`KeyLookupError::Unavailable`] when the key is not cached and
    /// the last fetch failed.
    pub async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>, KeyLookupError> {
        if let Some(found) = self.cached(kid)? {
            return Ok(found);
        }
        // Coalesce: whoever holds the lock fetches; the others wait for it and look again.
        let _fetching = self.fetching.lock().await;
        if let Some(found) = self.cached(kid)? {
            return Ok(found);
        }
        if self.fetch_allowed() {
            self.fetch_locked().await;
        }
        let mut state = self.state.write().expect("jwks state lock poisoned");
        if let Some(found) = state.keys.get(kid) {
            return Ok(Arc::clone(found));
        }
        if state.missing.len() < MAX_MISSING_KIDS {
            state.missing.insert(kid.to_owned());
        }
        Err(lookup_error(&state))
    }

    /// Looks `kid` up without fetching: `Some` when cached, `None` when a fetch may bring it,
    /// an error when it is known to be missing until the next allowed fetch.
    fn cached(&self, kid: &str) -> Result<Option<Arc<DecodingKey>>, KeyLookupError> {
        let state = self.state.read().expect("jwks state lock poisoned");
        if let Some(found) = state.keys.get(kid) {
            return Ok(Some(Arc::clone(found)));
        }
        if state.missing.contains(kid) && !self.allowed_at(&state) {
            return Err(lookup_error(&state));
        }
        Ok(None)
    }

    fn fetch_allowed(&self) -> bool {
        self.allowed_at(&self.state.read().expect("jwks state lock poisoned"))
    }

    fn allowed_at(&self, state: &State) -> bool {
        state
            .last_fetch
            .is_none_or(|last| self.clock.now() >= last.plus(self.cooldown))
    }

    /// Fetches and installs the key set; the caller holds `fetching`.
    async fn fetch_locked(&self) {
        {
            let mut state = self.state.write().expect("jwks state lock poisoned");
            state.last_fetch = Some(self.clock.now());
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self.source.fetch().await;
        if let Some(metrics) = self.metrics.get() {
            let outcome = if result.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Error
            };
            metrics.jwks_fetches.get(outcome).inc();
        }
        let mut state = self.state.write().expect("jwks state lock poisoned");
        state.missing.clear();
        match result {
            Ok(keys) => {
                let changed = !self.is_loaded() || !same_kids(&state.keys, &keys);
                if changed {
                    info!(jwks_url = %self.url(), keys = keys.len(), "cognito jwks loaded");
                }
                state.keys = keys;
                state.last_failed = false;
                self.loaded.send_replace(true);
            }
            Err(err) => {
                state.last_failed = true;
                warn!(
                    jwks_url = %self.url(),
                    error = %error_chain(&err),
                    cached_keys = state.keys.len(),
                    retry_after_seconds = self.cooldown.as_secs(),
                    "cognito jwks fetch failed; keeping the last good keys"
                );
            }
        }
    }
}

/// Returns the error and its sources, `: `-separated ("cannot connect …: … connection refused").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn same_kids(a: &Jwks, b: &Jwks) -> bool {
    a.len() == b.len() && a.keys.keys().all(|kid| b.keys.contains_key(kid))
}

fn lookup_error(state: &State) -> KeyLookupError {
    if state.last_failed {
        KeyLookupError::Unavailable
    } else {
        KeyLookupError::UnknownKid
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::model::clock::ManualClock;

    /// A source whose answer the test sets, counting fetches.
    #[derive(Debug, Default)]
    struct FakeSource {
        answer: StdMutex<Option<Jwks>>,
        fetches: AtomicU64,
        delay: Duration,
    }

    #[async_trait]
    impl JwksSource for FakeSource {
        async fn fetch(&self) -> Result<Jwks, JwksError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.answer
                .lock()
                .unwrap()
                .clone()
                .ok_or(JwksError::Status(503))
        }
        fn url(&self) -> &str {
            "fake://jwks"
        }
    }

    /// A well-formed RSA modulus is not needed to build a `DecodingKey` from components, so
    /// these sets are cheap; signatures are tested in the verifier's tests.
    fn set(kids: &[&str]) -> Jwks {
        let keys: Vec<_> = kids
            .iter()
            .map(|kid| serde_json::json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": "sXch", "e": "AQAB"}))
            .collect();
        Jwks::parse(serde_json::json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    fn cache(source: &Arc<FakeSource>, clock: &Arc<ManualClock>) -> CachedJwks {
        CachedJwks::new(source.clone(), clock.clone(), Duration::from_secs(10))
    }

    #[test]
    fn parse_keeps_only_rs256_signing_keys() {
        let body = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "a", "alg": "RS256", "use": "sig", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "kid": "b", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": "sXch", "e": "AQAB"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "RSA", "n": "sXch", "e": "AQAB"},
        ]});
        let jwks = Jwks::parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(jwks.len(), 2);
        assert!(jwks.get("a").is_some() && jwks.get("b").is_some());
        assert!(matches!(
            Jwks::parse(br#"{"keys": [{"kty": "EC", "kid": "x"}]}"#),
            Err(JwksError::NoUsableKeys)
        ));
        assert!(matches!(
            Jwks::parse(b"<html>"),
            Err(JwksError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn hydrate_loads_keys_and_known_kids_never_fetch() {
        let source = Arc::new(FakeSource::default());
        *source.answer.lock().unwrap() = Some(set(&["k1"]));
        let clock = Arc::new(ManualClock::new());
        let jwks = cache(&source, &clock);
        assert!(!jwks.is_loaded());
        assert!(jwks.hydrate().await);
        for _ in 0..10 {
            jwks.key("k1").await.unwrap();
        }
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_kid_fetches_once_then_waits_for_the_cooldown() {
        let source = Arc::new(FakeSource::default());
        *source.answer.lock().unwrap() = Some(set(&["k1"]));
        let clock = Arc::new(ManualClock::new());
        let jwks = cache(&source, &clock);
        jwks.hydrate().await;
        clock.advance(Duration::from_secs(11));
        assert_eq!(
            jwks.key("k2").await.unwrap_err(),
            KeyLookupError::UnknownKid
        );
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
        // The rotation lands at the endpoint, but the cooldown holds it back …
        *source.answer.lock().unwrap() = Some(set(&["k1", "k2"]));
        for kid in ["k2", "k3", "k2"] {
            assert_eq!(jwks.key(kid).await.unwrap_err(), KeyLookupError::UnknownKid);
        }
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
        // … until it has passed.
        clock.advance(Duration::from_secs(10));
        jwks.key("k2").await.unwrap();
        jwks.key("k1").await.unwrap();
        assert_eq!(source.fetches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_misses_coalesce_into_one_fetch() {
        let source = Arc::new(FakeSource {
            delay: Duration::from_millis(50),
            ..FakeSource::default()
        });
        *source.answer.lock().unwrap() = Some(set(&["k1"]));
        let clock = Arc::new(ManualClock::new());
        let jwks = Arc::new(cache(&source, &clock));
        // 200 callers miss the same new kid and 200 miss made-up ones, all at once: one fetch,
        // which every caller waits for, so the real kid is found by all of its callers.
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let jwks = Arc::clone(&jwks);
                let kid = if i % 2 == 0 {
                    "k1".to_owned()
                } else {
                    format!("random-{i}")
                };
                tokio::spawn(async move { (kid.clone(), jwks.key(&kid).await) })
            })
            .collect();
        for task in tasks {
            let (kid, result) = task.await.unwrap();
            assert_eq!(result.is_ok(), kid == "k1", "{kid}");
        }
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn failed_fetch_keeps_the_last_good_keys() {
        let source = Arc::new(FakeSource::default());
        *source.answer.lock().unwrap() = Some(set(&["k1"]));
        let clock = Arc::new(ManualClock::new());
        let jwks = cache(&source, &clock);
        jwks.hydrate().await;
        *source.answer.lock().unwrap() = None;
        clock.advance(Duration::from_secs(11));
        assert_eq!(
            jwks.key("k9").await.unwrap_err(),
            KeyLookupError::Unavailable
        );
        jwks.key("k1").await.unwrap();
        assert!(jwks.is_loaded());
    }

    #[tokio::test]
    async fn a_down_endpoint_at_start_is_retried_after_the_cooldown() {
        let source = Arc::new(FakeSource::default());
        let clock = Arc::new(ManualClock::new());
        let jwks = cache(&source, &clock);
        let mut loaded = jwks.subscribe_loaded();
        assert!(!jwks.hydrate().await);
        assert_eq!(
            jwks.key("k1").await.unwrap_err(),
            KeyLookupError::Unavailable
        );
        *source.answer.lock().unwrap() = Some(set(&["k1"]));
        assert!(!jwks.hydrate().await, "still in the cooldown");
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(10));
        assert!(jwks.hydrate().await);
        assert!(*loaded.borrow_and_update());
        jwks.key("k1").await.unwrap();
    }
}
