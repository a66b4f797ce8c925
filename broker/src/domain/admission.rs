//! Admission control: a global in-flight limit that sheds load, and per-caller token buckets.
//!
//! Every `TokenBroker` call takes a permit from the in-flight limit before anything else (a
//! call over the limit is refused at once, not queued), then is charged to one bucket once its
//! caller is known: the caller's own (`[limits.callers.<name>]`), else its roles'
//! (`[limits.roles.<role>]`), else, for calls without a credential (refresh and self-revoke by
//! secret), the peer address's (`[limits.anonymous]`). A refused call gets
//! `RESOURCE_EXHAUSTED` with the time after which a retry can succeed.

use std::{
    collections::HashMap,
    net::IpAddr,
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
        /// The per-address limit of calls without a credential.
        AnonymousRate = "anonymous_rate",
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
    /// Calls without a credential (refresh, self-revoke), per peer IP address. Behind a
    /// proxy that hides client addresses every such call shares one bucket: raise it, or set
    /// `per_second = 0` to turn it off.
    pub anonymous: Option<RateLimit>,
    /// Per role (`trigger`, `service`, `admin`). A caller with several roles gets the most
    /// generous of them, and none if one of its roles has no limit.
    pub roles: HashMap<Role, RateLimit>,
    /// Per caller name (an API key's or client certificate's `name`); wins over `roles`.
    pub callers: HashMap<String, RateLimit>,
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
            roles: HashMap::new(),
            callers: HashMap::new(),
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
        let named = self
            .anonymous
            .iter()
            .map(|l| ("limits.anonymous".to_owned(), l))
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

/// Whose bucket a call is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BucketKey {
    Caller(Arc<str>),
    Peer(Option<IpAddr>),
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
        Self {
            settings,
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

    /// Charges one call to the caller's bucket (or the peer's, for a call without a
    /// credential).
    ///
    /// # Errors
    ///
    /// [`BrokerError::ResourceExhausted`] with the wait until the bucket has a token again.
    pub fn charge(&self, caller: Option<&Caller>, peer: Option<IpAddr>) -> Result<(), BrokerError> {
        self.charge_at(caller, peer, Instant::now())
    }

    fn charge_at(
        &self,
        caller: Option<&Caller>,
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), BrokerError> {
        let Some((key, limit)) = self.bucket_for(caller, peer) else {
            return Ok(());
        };
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
        let taken = bucket.take(limit, now);
        drop(buckets);
        taken.map_err(|retry_after| {
            self.throttled(if caller.is_some() {
                ThrottleReason::CallerRate
            } else {
                ThrottleReason::AnonymousRate
            });
            BrokerError::ResourceExhausted {
                message: match caller {
                    Some(caller) => format!("caller {} is over its rate limit", caller.name),
                    None => "calls without a credential from this address are over their rate \
                             limit"
                        .to_owned(),
                },
                retry_after,
            }
        })
    }

    fn bucket_for(
        &self,
        caller: Option<&Caller>,
        peer: Option<IpAddr>,
    ) -> Option<(BucketKey, RateLimit)> {
        let Some(caller) = caller else {
            return self
                .settings
                .anonymous
                .filter(|limit| !limit.is_unlimited())
                .map(|limit| (BucketKey::Peer(peer), limit));
        };
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
        if limit.is_unlimited() {
            return None;
        }
        Some((BucketKey::Caller(Arc::from(caller.name.as_str())), limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, roles: &[Role]) -> Caller {
        Caller {
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
    fn idle_buckets_are_swept_when_the_table_grows() {
        let settings = LimitSettings {
            anonymous: Some(limit(1000.0, 1)),
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
