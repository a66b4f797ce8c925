//! Admission control: a global in-flight limit that sheds load, and per-caller token buckets.
//!
//! Every `TokenBroker` call takes a permit from the in-flight limit before anything else (a
//! call over the limit is refused at once, not queued), then is charged to one bucket once its
//! caller is known: the caller's own (`[limits.callers.<name>]`), else its roles'
//! (`[limits.roles.<role>]`); for a direct-exchange caller, its Cognito user's
//! (`[limits.direct_exchange]`); else, for calls without a credential (refresh and self-revoke by
//! secret) and callers that hold no role, the client network's (`[limits.anonymous]`: an IPv4
//! address, an IPv6 /64), and also one bucket all of those share (`[limits.anonymous_total]`),
//! so that no number of addresses buys more. A network whose calls keep failing
//! authentication is refused before its next credential is checked
//! (`[limits.failed_auth]`). Behind a proxy listed in `trusted_proxies` the client is the
//! address the proxy put in `x-forwarded-for`. A refused call gets `RESOURCE_EXHAUSTED` with
//! the time after which a retry can succeed.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    domain::error::BrokerError,
    identity::{Caller, Role},
    obs::metrics::{Counter, Family, MetricSet, Zeros},
};

crate::label! {
    /// Why admission control refused a call, as the `reason` label.
    pub enum ThrottleReason: "reason" {
        /// A caller's (or its role's) rate limit.
        CallerRate = "caller_rate",
        /// A Cognito user's direct-exchange limit (`limits.direct_exchange`).
        DirectExchange = "direct_exchange",
        /// The per-network limit of calls without a credential.
        AnonymousRate = "anonymous_rate",
        /// The limit all calls without a credential share.
        AnonymousTotal = "anonymous_total",
        /// The per-network limit of failed authentications.
        FailedAuth = "failed_auth",
        /// The in-flight limit.
        Concurrency = "concurrency",
    }
}

/// `tokenbroker_throttled_total{reason}`: calls admission control refused.
#[derive(Debug)]
pub struct AdmissionMetrics {
    /// `tokenbroker_throttled_total{reason}`.
    pub throttled: Family<Counter, ThrottleReason>,
}

impl Default for AdmissionMetrics {
    fn default() -> Self {
        Self {
            throttled: Family::new(
                "tokenbroker_throttled_total",
                "Calls refused with RESOURCE_EXHAUSTED by admission control, by reason.",
                Zeros::Show,
            ),
        }
    }
}

impl MetricSet for AdmissionMetrics {
    fn render(&self, out: &mut String) {
        self.throttled.render(out);
    }
}

/// How long a call refused by the in-flight limit is told to wait.
const OVERLOAD_RETRY_AFTER: Duration = Duration::from_millis(100);
/// Above this many buckets, full (idle) ones are dropped so that a stream of new peer
/// addresses or Cognito users cannot grow the table without bound.
const SWEEP_ABOVE: usize = 10_000;

/// `[limits]`: admission control.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Most `TokenBroker` calls in flight at once; a call over it is refused with
    /// `RESOURCE_EXHAUSTED` instead of queueing (load shedding). 0 means no limit.
    pub max_concurrent_requests: u32,
    /// Largest request message accepted, in bytes; a larger one gets `RESOURCE_EXHAUSTED`.
    pub max_request_bytes: usize,
    /// Calls without a credential (refresh, self-revoke) and by callers that hold no role, per
    /// client network (see `ipv4_prefix`, `ipv6_prefix` and `trusted_proxies`).
    pub anonymous: Option<RateLimit>,
    /// All calls that `anonymous` limits, together, whatever their address.
    pub anonymous_total: Option<RateLimit>,
    /// Failed authentications per client network; once its bucket is empty, that network's
    /// calls are refused before their credentials are checked.
    pub failed_auth: Option<RateLimit>,
    /// The leading bits of an IPv4 address that name one client network.
    pub ipv4_prefix: u8,
    /// The leading bits of an IPv6 address that name one client network (a /64 is what one
    /// subscriber gets).
    pub ipv6_prefix: u8,
    /// Proxies and load balancers (addresses or CIDR blocks) whose `x-forwarded-for` header is
    /// believed: a call from one is charged to the address it forwarded for.
    pub trusted_proxies: Vec<String>,
    /// Per role (`trigger`, `service`, `admin`). A caller with several roles gets the most
    /// generous of them, and none if one of its roles has no limit.
    pub roles: HashMap<Role, RateLimit>,
    /// Per caller name (an API key's or client certificate's `name`); wins over `roles`.
    pub callers: HashMap<String, RateLimit>,
    /// Direct exchange (a user's own Cognito ID token as the credential), per Cognito `sub`.
    /// A user signs in a few times a day; a few exchanges a minute are plenty, and bound what
    /// a stolen ID token can mint before its `exp`.
    pub direct_exchange: Option<RateLimit>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 1024,
            max_request_bytes: 64 * 1024,
            anonymous: Some(RateLimit {
                per_second: 100.0,
                burst: 200,
            }),
            anonymous_total: Some(RateLimit {
                per_second: 2000.0,
                burst: 4000,
            }),
            failed_auth: Some(RateLimit {
                per_second: 5.0,
                burst: 50,
            }),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            trusted_proxies: Vec::new(),
            roles: HashMap::new(),
            callers: HashMap::new(),
            // 3 a minute, 5 at once.
            direct_exchange: Some(RateLimit {
                per_second: 0.05,
                burst: 5,
            }),
        }
    }
}

/// A token bucket: `burst` calls at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained calls per second; 0 means no limit (to exempt one caller from its role's
    /// limit, or to turn the anonymous limit off).
    pub per_second: f64,
    /// Calls that may be made at once after a quiet period.
    #[serde(default)]
    pub burst: u32,
}

impl RateLimit {
    /// Whether this entry lifts the limit instead of setting one.
    pub fn is_unlimited(&self) -> bool {
        self.per_second == 0.0
    }
}

impl LimitSettings {
    /// Checks every rate.
    ///
    /// # Errors
    ///
    /// Names the first limit whose rate is not positive and finite or whose burst is 0.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_request_bytes < 1024 {
            return Err("limits.max_request_bytes must be at least 1024".into());
        }
        if self.ipv4_prefix > 32 || self.ipv6_prefix > 128 {
            return Err(
                "limits.ipv4_prefix must be at most 32 and limits.ipv6_prefix at most 128".into(),
            );
        }
        for proxy in &self.trusted_proxies {
            Network::parse(proxy).map_err(|err| format!("limits.trusted_proxies: {err}"))?;
        }
        let named = [
            ("limits.anonymous", &self.anonymous),
            ("limits.anonymous_total", &self.anonymous_total),
            ("limits.failed_auth", &self.failed_auth),
            ("limits.direct_exchange", &self.direct_exchange),
        ]
        .into_iter()
        .filter_map(|(name, limit)| Some((name.to_owned(), limit.as_ref()?)))
        .chain(
            self.roles
                .iter()
                .map(|(r, l)| (format!("limits.roles.{}", r.as_str()), l)),
        )
        .chain(
            self.callers
                .iter()
                .map(|(n, l)| (format!("limits.callers.{n}"), l)),
        );
        for (name, limit) in named {
            if !(limit.per_second.is_finite() && limit.per_second >= 0.0) {
                return Err(format!(
                    "{name}.per_second must be a number of calls per second (0 for no limit)"
                ));
            }
            if limit.burst == 0 && !limit.is_unlimited() {
                return Err(format!("{name}.burst must be at least 1"));
            }
        }
        Ok(())
    }
}

/// An address block: an address and how many leading bits of it count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `192.0.2.7`, `10.0.0.0/8` or `2001:db8::/32`.
    fn parse(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix =
            match prefix {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                    format!("{text:?} has a prefix length that is not 0 to {max}")
                })?,
            };
        Ok(Self { address, prefix })
    }

    fn contains(&self, address: IpAddr) -> bool {
        masked(address, self.prefix, self.prefix) == masked(self.address, self.prefix, self.prefix)
    }
}

/// `address` with all but its leading `v4` (IPv4) or `v6` (IPv6) bits cleared. An IPv4 address
/// mapped into IPv6 counts as IPv4.
fn masked(address: IpAddr, v4: u8, v6: u8) -> IpAddr {
    let address = match address {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4_address => v4_address,
    };
    match address {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(v4.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(v6.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// Whose bucket a call is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BucketKey {
    Caller(Arc<str>),
    /// A client network, for calls without a credential.
    Peer(Option<IpAddr>),
    /// Every call without a credential.
    AllAnonymous,
    /// A client network's failed authentications.
    Failed(Option<IpAddr>),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// Refills for the time since the last call, then takes one token, or says how long until
    /// one is there.
    fn take(&mut self, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(limit.burst);
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / limit.per_second,
            ))
        }
    }

    /// How long until the bucket has a token, if it has none now.
    fn wait(&self, limit: RateLimit, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        let tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        (tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - tokens) / limit.per_second))
    }

    fn is_full(&self, limit: RateLimit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * limit.per_second >= f64::from(limit.burst)
    }
}

/// A permit for one call in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct InFlight(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// The broker's admission control.
#[derive(Debug)]
pub struct Limiter {
    settings: LimitSettings,
    trusted_proxies: Vec<Network>,
    in_flight: Option<Arc<Semaphore>>,
    buckets: Mutex<HashMap<BucketKey, (Bucket, RateLimit)>>,
    metrics: Option<Arc<AdmissionMetrics>>,
}

impl Limiter {
    /// Builds the limiter from validated settings.
    pub fn new(settings: LimitSettings) -> Self {
        let in_flight = (settings.max_concurrent_requests > 0).then(|| {
            Arc::new(Semaphore::new(
                usize::try_from(settings.max_concurrent_requests).unwrap_or(usize::MAX),
            ))
        });
        let trusted_proxies = settings
            .trusted_proxies
            .iter()
            .filter_map(|proxy| Network::parse(proxy).ok())
            .collect();
        Self {
            settings,
            trusted_proxies,
            in_flight,
            buckets: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }

    /// Counts refused calls in `tokenbroker_throttled_total`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<AdmissionMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn throttled(&self, reason: ThrottleReason) {
        if let Some(metrics) = &self.metrics {
            metrics.throttled.get(reason).inc();
        }
    }

    /// The largest request message accepted, in bytes.
    pub fn max_request_bytes(&self) -> usize {
        self.settings.max_request_bytes
    }

    /// Takes a slot of the in-flight limit, or refuses the call when none is free.
    ///
    /// # Errors
    ///
    /// [`BrokerError::ResourceExhausted`] when the broker is at its limit.
    pub fn enter(&self) -> Result<InFlight, BrokerError> {
        match &self.in_flight {
            None => Ok(InFlight(None)),
            Some(semaphore) => Arc::clone(semaphore)
                .try_acquire_owned()
                .map(|permit| InFlight(Some(permit)))
                .map_err(|_| {
                    self.throttled(ThrottleReason::Concurrency);
                    BrokerError::ResourceExhausted {
                        message: "the broker is at its limit of concurrent calls".into(),
                        retry_after: OVERLOAD_RETRY_AFTER,
                    }
                }),
        }
    }

    /// The client a call is charged to: the peer address, or, when the peer is a trusted
    /// proxy, the nearest address in `forwarded_for` (an `x-forwarded-for` value) that is not
    /// one; reduced to its network (`ipv4_prefix`, `ipv6_prefix`).
    pub fn client(&self, peer: Option<IpAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        let trusted = |address: &IpAddr| self.trusted_proxies.iter().any(|n| n.contains(*address));
        let mut client = peer;
        if let (Some(address), Some(forwarded)) = (peer, forwarded_for)
            && trusted(&address)
        {
            // Each proxy appends the address it received the call from: read from the right,
            // past the proxies we trust; a malformed entry ends the search there.
            for hop in forwarded.rsplit(',').map(str::trim) {
                let Ok(hop) = hop.parse::<IpAddr>() else {
                    break;
                };
                client = Some(hop);
                if !trusted(&hop) {
                    break;
                }
            }
        }
        client.map(|address| {
            masked(
                address,
                self.settings.ipv4_prefix,
                self.settings.ipv6_prefix,
            )
        })
    }

    /// Refuses a call from a `client` network whose failed authentications used up its
    /// bucket, before its credential is checked.
    ///
    /// # Errors
    ///
    /// [`BrokerError::ResourceExhausted`] with the wait until the bucket has a token again.
    pub fn check_failures(&self, client: Option<IpAddr>) -> Result<(), BrokerError> {
        let Some(limit) = self.settings.failed_auth.filter(|l| !l.is_unlimited()) else {
            return Ok(());
        };
        let now = Instant::now();
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let Some((bucket, _)) = buckets.get(&BucketKey::Failed(client)) else {
            return Ok(());
        };
        let wait = bucket.wait(limit, now);
        drop(buckets);
        match wait {
            None => Ok(()),
            Some(retry_after) => Err(self.refuse(
                ThrottleReason::FailedAuth,
                "too many failed authentications from this address".into(),
                retry_after,
            )),
        }
    }

    /// Counts a failed authentication against the `client` network.
    pub fn charge_failure(&self, client: Option<IpAddr>) {
        if let Some(limit) = self.settings.failed_auth.filter(|l| !l.is_unlimited()) {
            let _ = self.take(BucketKey::Failed(client), limit, Instant::now());
        }
    }

    /// Charges one call to the caller's bucket (a direct-exchange caller's is its Cognito
    /// user's, `limits.direct_exchange`), or, for a call without a credential or by a caller
    /// that holds no role, to the client network's and the shared anonymous one.
    ///
    /// # Errors
    ///
    /// [`BrokerError::ResourceExhausted`] with the wait until the bucket has a token again.
    pub fn charge(
        &self,
        caller: Option<&Caller>,
        client: Option<IpAddr>,
    ) -> Result<(), BrokerError> {
        self.charge_at(caller, client, Instant::now())
    }

    fn charge_at(
        &self,
        caller: Option<&Caller>,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), BrokerError> {
        // A named bucket: a direct-exchange caller's is its user's (`cognito-id:<sub>`, whatever
        // the address); a caller with a role has its own.
        let named = match caller {
            Some(c) if c.direct_exchange.is_some() => Some((
                c,
                self.settings.direct_exchange.filter(|l| !l.is_unlimited()),
                ThrottleReason::DirectExchange,
            )),
            Some(c) if !c.roles.is_empty() => {
                Some((c, self.caller_limit(c), ThrottleReason::CallerRate))
            }
            _ => None,
        };
        match named {
            Some((caller, limit, reason)) => match limit {
                None => Ok(()),
                Some(limit) => self
                    .take(
                        BucketKey::Caller(Arc::from(caller.name.as_str())),
                        limit,
                        now,
                    )
                    .map_err(|retry_after| {
                        self.refuse(
                            reason,
                            format!("caller {} is over its rate limit", caller.name),
                            retry_after,
                        )
                    }),
            },
            None => {
                if let Some(limit) = self.settings.anonymous.filter(|l| !l.is_unlimited()) {
                    self.take(BucketKey::Peer(client), limit, now)
                        .map_err(|retry_after| {
                            self.refuse(
                                ThrottleReason::AnonymousRate,
                                "calls without a credential from this address are over their \
                                 rate limit"
                                    .into(),
                                retry_after,
                            )
                        })?;
                }
                if let Some(limit) = self.settings.anonymous_total.filter(|l| !l.is_unlimited()) {
                    self.take(BucketKey::AllAnonymous, limit, now)
                        .map_err(|retry_after| {
                            self.refuse(
                                ThrottleReason::AnonymousTotal,
                                "calls without a credential are over their rate limit".into(),
                                retry_after,
                            )
                        })?;
                }
                Ok(())
            }
        }
    }

    fn refuse(
        &self,
        reason: ThrottleReason,
        message: String,
        retry_after: Duration,
    ) -> BrokerError {
        self.throttled(reason);
        BrokerError::ResourceExhausted {
            message,
            retry_after,
        }
    }

    /// Takes a token from `key`'s bucket, or says how long until one is there.
    fn take(&self, key: BucketKey, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= SWEEP_ABOVE && !buckets.contains_key(&key) {
            buckets.retain(|_, (bucket, limit)| !bucket.is_full(*limit, now));
        }
        let (bucket, current) = buckets.entry(key).or_insert((
            Bucket {
                tokens: f64::from(limit.burst),
                updated: now,
            },
            limit,
        ));
        *current = limit;
        bucket.take(limit, now)
    }

    /// The limit of a caller that holds a role: its own, else the most generous of its
    /// roles'; `None` when unlimited.
    fn caller_limit(&self, caller: &Caller) -> Option<RateLimit> {
        let limit = match self.settings.callers.get(&caller.name) {
            Some(limit) => *limit,
            None => {
                // The most generous of the caller's roles; a role without a limit lifts it.
                let mut best: Option<RateLimit> = None;
                for role in &caller.roles {
                    let limit = self.settings.roles.get(role)?;
                    if limit.is_unlimited() {
                        return None;
                    }
                    if best.is_none_or(|b| limit.per_second > b.per_second) {
                        best = Some(*limit);
                    }
                }
                best?
            }
        };
        (!limit.is_unlimited()).then_some(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, roles: &[Role]) -> Caller {
        Caller {
            direct_exchange: None,
            name: name.into(),
            roles: roles.to_vec(),
        }
    }

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    fn exhausted_after(err: BrokerError) -> Duration {
        match err {
            BrokerError::ResourceExhausted { retry_after, .. } => retry_after,
            other => panic!("expected ResourceExhausted, got {other:?}"),
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let mut settings = LimitSettings::default();
        settings.callers.insert("noisy".into(), limit(10.0, 3));
        let limiter = Limiter::new(settings);
        let noisy = caller("noisy", &[Role::Service]);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.charge_at(Some(&noisy), None, t0).unwrap();
        }
        let wait = exhausted_after(limiter.charge_at(Some(&noisy), None, t0).unwrap_err());
        assert_eq!(wait, Duration::from_millis(100));
        // Half the wait is not enough; the whole wait is.
        let early = t0 + Duration::from_millis(50);
        let wait = exhausted_after(limiter.charge_at(Some(&noisy), None, early).unwrap_err());
        assert_eq!(wait, Duration::from_millis(50));
        limiter
            .charge_at(Some(&noisy), None, t0 + Duration::from_millis(100))
            .unwrap();
    }

    #[test]
    fn callers_win_over_roles_and_unlimited_roles_lift_the_limit() {
        let mut settings = LimitSettings::default();
        settings.roles.insert(Role::Trigger, limit(1.0, 1));
        settings.roles.insert(Role::Service, limit(5.0, 2));
        settings.callers.insert("vip".into(), limit(1000.0, 1000));
        let limiter = Limiter::new(settings);
        let now = Instant::now();
        let vip = caller("vip", &[Role::Trigger]);
        for _ in 0..100 {
            limiter.charge_at(Some(&vip), None, now).unwrap();
        }
        // Trigger + service: the service limit (the more generous) applies.
        let both = caller("both", &[Role::Trigger, Role::Service]);
        limiter.charge_at(Some(&both), None, now).unwrap();
        limiter.charge_at(Some(&both), None, now).unwrap();
        limiter.charge_at(Some(&both), None, now).unwrap_err();
        // A caller entry with rate 0 exempts that caller from its role's limit.
        let mut settings = LimitSettings::default();
        settings.roles.insert(Role::Trigger, limit(1.0, 1));
        settings.callers.insert("exempt".into(), limit(0.0, 0));
        settings.anonymous = Some(limit(0.0, 0));
        let exempting = Limiter::new(settings);
        for _ in 0..10 {
            exempting
                .charge_at(Some(&caller("exempt", &[Role::Trigger])), None, now)
                .unwrap();
            exempting.charge_at(None, None, now).unwrap();
        }
        // Admin has no limit configured: never throttled.
        let admin = caller("ops", &[Role::Admin, Role::Trigger]);
        for _ in 0..100 {
            limiter.charge_at(Some(&admin), None, now).unwrap();
        }
    }

    #[test]
    fn anonymous_calls_are_limited_per_peer_address() {
        let settings = LimitSettings {
            anonymous: Some(limit(1.0, 2)),
            ..LimitSettings::default()
        };
        let limiter = Limiter::new(settings);
        let now = Instant::now();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        limiter.charge_at(None, a, now).unwrap();
        limiter.charge_at(None, a, now).unwrap();
        limiter.charge_at(None, a, now).unwrap_err();
        limiter.charge_at(None, b, now).unwrap();
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client_and_ipv4_addresses_are_each_one() {
        let settings = LimitSettings {
            anonymous: Some(limit(1.0, 1)),
            ..LimitSettings::default()
        };
        let limiter = Limiter::new(settings);
        let now = Instant::now();
        let client = |text: &str| limiter.client(Some(text.parse().unwrap()), None);
        limiter
            .charge_at(None, client("2001:db8:1:2::1"), now)
            .unwrap();
        limiter
            .charge_at(None, client("2001:db8:1:2:ffff::9"), now)
            .unwrap_err();
        limiter
            .charge_at(None, client("2001:db8:1:3::1"), now)
            .unwrap();
        limiter.charge_at(None, client("192.0.2.1"), now).unwrap();
        limiter.charge_at(None, client("192.0.2.2"), now).unwrap();
        // An IPv4 address mapped into IPv6 is that IPv4 address.
        limiter
            .charge_at(None, client("::ffff:192.0.2.1"), now)
            .unwrap_err();
    }

    #[test]
    fn all_anonymous_calls_share_one_bucket_whatever_their_address() {
        let settings = LimitSettings {
            anonymous: Some(limit(100.0, 100)),
            anonymous_total: Some(limit(10.0, 5)),
            ..LimitSettings::default()
        };
        let limiter = Limiter::new(settings);
        let now = Instant::now();
        for i in 0..5u8 {
            limiter
                .charge_at(None, Some(IpAddr::from([127, 0, 0, i])), now)
                .unwrap();
        }
        let wait = exhausted_after(
            limiter
                .charge_at(None, Some(IpAddr::from([127, 9, 9, 9])), now)
                .unwrap_err(),
        );
        assert_eq!(wait, Duration::from_millis(100));
        // A caller with a role is not charged to it.
        limiter
            .charge_at(Some(&caller("svc", &[Role::Service])), None, now)
            .unwrap();
    }

    #[test]
    fn a_caller_without_a_role_is_charged_as_anonymous() {
        let settings = LimitSettings {
            anonymous: Some(limit(1.0, 1)),
            ..LimitSettings::default()
        };
        let limiter = Limiter::new(settings);
        let now = Instant::now();
        let nobody = caller("cognito:123", &[]);
        let peer = Some(IpAddr::from([10, 0, 0, 1]));
        limiter.charge_at(Some(&nobody), peer, now).unwrap();
        limiter.charge_at(Some(&nobody), peer, now).unwrap_err();
        limiter.charge_at(None, peer, now).unwrap_err();
    }

    #[test]
    fn failed_authentications_close_the_door_to_their_network_only() {
        let settings = LimitSettings {
            failed_auth: Some(limit(1.0, 3)),
            ..LimitSettings::default()
        };
        let limiter = Limiter::new(settings);
        let bad = Some(IpAddr::from([10, 0, 0, 1]));
        let good = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            limiter.check_failures(bad).unwrap();
            limiter.charge_failure(bad);
        }
        let wait = exhausted_after(limiter.check_failures(bad).unwrap_err());
        assert!(wait > Duration::from_millis(900), "{wait:?}");
        limiter.check_failures(good).unwrap();
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let settings = LimitSettings {
            trusted_proxies: vec!["10.0.0.0/8".into(), "2001:db8::1".into()],
            ..LimitSettings::default()
        };
        settings.validate().unwrap();
        let limiter = Limiter::new(settings);
        let ip = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        // From a trusted proxy: the nearest address that is not a trusted proxy.
        assert_eq!(
            limiter.client(ip("10.1.2.3"), Some("198.51.100.7, 203.0.113.9, 10.9.9.9")),
            ip("203.0.113.9")
        );
        assert_eq!(
            limiter.client(ip("2001:db8::1"), Some("192.0.2.4")),
            ip("192.0.2.4")
        );
        // From anyone else the header is ignored.
        assert_eq!(
            limiter.client(ip("192.0.2.50"), Some("198.51.100.7")),
            ip("192.0.2.50")
        );
        // A malformed hop ends the search at the last good one.
        assert_eq!(
            limiter.client(ip("10.1.2.3"), Some("junk, 10.2.2.2")),
            ip("10.2.2.2")
        );
        for bad in ["10.0.0.0/33", "not-an-address", "::/129"] {
            let settings = LimitSettings {
                trusted_proxies: vec![bad.into()],
                ..LimitSettings::default()
            };
            assert!(
                settings
                    .validate()
                    .unwrap_err()
                    .contains("limits.trusted_proxies"),
                "{bad}"
            );
        }
    }

    #[test]
    fn idle_buckets_are_swept_when_the_table_grows() {
        let settings = LimitSettings {
            anonymous: Some(limit(1000.0, 1)),
            anonymous_total: None,
            ..LimitSettings::default()
        };
        let limiter = Limiter::new(settings);
        let t0 = Instant::now();
        for i in 0..SWEEP_ABOVE as u32 {
            limiter
                .charge_at(None, Some(IpAddr::from(i.to_be_bytes())), t0)
                .unwrap();
        }
        let later = t0 + Duration::from_secs(1);
        limiter
            .charge_at(None, Some(IpAddr::from([255, 0, 0, 1])), later)
            .unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_in_flight_limit_sheds_and_frees() {
        let settings = LimitSettings {
            max_concurrent_requests: 2,
            ..LimitSettings::default()
        };
        let limiter = Limiter::new(settings);
        let a = limiter.enter().unwrap();
        let _b = limiter.enter().unwrap();
        exhausted_after(limiter.enter().unwrap_err());
        drop(a);
        limiter.enter().unwrap();
    }

    #[test]
    fn bad_rates_are_named() {
        let mut settings = LimitSettings::default();
        settings.roles.insert(Role::Trigger, limit(-1.0, 1));
        assert!(
            settings
                .validate()
                .unwrap_err()
                .contains("limits.roles.trigger.per_second")
        );
        let mut settings = LimitSettings::default();
        settings.roles.insert(Role::Trigger, limit(0.0, 0));
        settings.validate().unwrap();
        let mut settings = LimitSettings::default();
        settings.callers.insert("x".into(), limit(1.0, 0));
        assert!(
            settings
                .validate()
                .unwrap_err()
                .contains("limits.callers.x.burst")
        );
    }
}
