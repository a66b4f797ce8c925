//! Time as the broker sees it, behind a trait so tests can move it by hand.

use std::{
    fmt,
    sync::atomic::{AtomicI64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::model::UnixMicros;

/// A source of the current time.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// Returns the current time.
    fn now(&self) -> UnixMicros;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMicros {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        UnixMicros(i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
    }
}

/// A clock that only moves when told to, for tests of expiry and grace windows.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// Returns a clock stopped at the current system time.
    pub fn new() -> Self {
        Self(AtomicI64::new(SystemClock.now().0))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        self.0.fetch_add(micros, Ordering::SeqCst);
    }

    /// Moves the clock back by `d`, as a wall clock stepped back by NTP or an operator would.
    pub fn rewind(&self, d: Duration) {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        self.0.fetch_sub(micros, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixMicros {
        UnixMicros(self.0.load(Ordering::SeqCst))
    }
}

/// A clock that never goes back: the later of its source's time and the latest time it has
/// handed out (or was told about at start). A store reads its time from one of these, so a wall
/// clock stepped backwards can neither revive an expired token nor stamp a new one before a
/// revoke-all watermark already written.
#[derive(Debug)]
pub struct MonotonicClock {
    source: std::sync::Arc<dyn Clock>,
    latest: AtomicI64,
}

impl MonotonicClock {
    /// Wraps `source`; no time before `floor` (the latest time already stored) is handed out.
    pub fn new(source: std::sync::Arc<dyn Clock>, floor: UnixMicros) -> Self {
        Self {
            source,
            latest: AtomicI64::new(floor.0),
        }
    }

    /// Returns a time strictly after every time this clock handed out before: two stamps
    /// never tie, whatever the source's resolution.
    pub fn stamp(&self) -> UnixMicros {
        let now = self.source.now().0;
        let previous = self
            .latest
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |latest| {
                Some(now.max(latest.saturating_add(1)))
            })
            .unwrap_or_else(|latest| latest);
        UnixMicros(now.max(previous.saturating_add(1)))
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> UnixMicros {
        let now = self.source.now().0;
        let previous = self.latest.fetch_max(now, Ordering::SeqCst);
        UnixMicros(now.max(previous))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_monotonic_clock_holds_its_latest_time_while_the_source_steps_back() {
        let source = Arc::new(ManualClock::new());
        let start = source.now();
        let clock = MonotonicClock::new(Arc::clone(&source) as Arc<dyn Clock>, UnixMicros(0));
        assert_eq!(clock.now(), start);
        source.rewind(Duration::from_secs(3600));
        assert_eq!(clock.now(), start, "a step back is not followed");
        let stamp = clock.stamp();
        assert_eq!(stamp, UnixMicros(start.0 + 1), "stamps still move on");
        assert!(clock.stamp() > stamp);
        source.advance(Duration::from_secs(7200));
        assert_eq!(clock.now(), UnixMicros(start.0 + 3_600_000_000));
    }

    #[test]
    fn the_floor_is_never_undercut() {
        let source = Arc::new(ManualClock::new());
        let floor = UnixMicros(source.now().0 + 5_000_000);
        let clock = MonotonicClock::new(source as Arc<dyn Clock>, floor);
        assert_eq!(clock.now(), floor);
        assert_eq!(clock.stamp(), UnixMicros(floor.0 + 1));
    }
}
