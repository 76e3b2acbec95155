//! Time as the agent and the scheduler see it: a [`Clock`] trait, the wall clock in production,
//! an offset wall clock for tests that move the scheduler's time, and a manual clock for unit
//! tests.
//!
//! Only wall-clock *timestamps* (unix seconds written into documents, the UTC day of the token
//! budget, schedule slots) come from a `Clock`. Durations and windows (progress throttling,
//! the per-device rate limit) use `tokio::time`, so tests control them with paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix seconds now.
    fn now_secs(&self) -> i64;
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_secs(&self) -> i64 {
        crate::time::now_secs() as i64
    }
}

/// The wall clock moved by a fixed number of seconds (`IOM_CLOCK_OFFSET_SECS`, so tests can
/// fire schedules without waiting minutes).
#[derive(Debug, Clone, Copy, Default)]
pub struct OffsetClock {
    offset_secs: i64,
}

impl OffsetClock {
    /// The wall clock plus `offset_secs`.
    pub fn new(offset_secs: i64) -> OffsetClock {
        OffsetClock { offset_secs }
    }
}

impl Clock for OffsetClock {
    fn now_secs(&self) -> i64 {
        SystemClock.now_secs().saturating_add(self.offset_secs)
    }
}

/// A clock that only moves when told to (for tests and in-process harnesses).
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `now_secs`.
    pub fn new(now_secs: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now: AtomicI64::new(now_secs),
        })
    }

    /// Sets the time.
    pub fn set(&self, now_secs: i64) {
        self.now.store(now_secs, Ordering::SeqCst);
    }

    /// Moves the time forward by `secs`.
    pub fn advance(&self, secs: i64) {
        self.now.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_secs(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_clock_is_the_wall_clock_moved() {
        let wall = SystemClock.now_secs();
        let ahead = OffsetClock::new(3_600).now_secs();
        assert!((ahead - wall - 3_600).abs() <= 1, "{ahead} vs {wall}");
        let behind = OffsetClock::new(-60).now_secs();
        assert!((wall - 60 - behind).abs() <= 1);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now_secs(), 1_000);
        c.advance(61);
        assert_eq!(c.now_secs(), 1_061);
        c.set(5);
        assert_eq!(c.now_secs(), 5);
    }
}
