//! The wall clock every schedule reads: commit times, snapshot intervals,
//! compaction windows, retention and object-lock dates.
//!
//! Production uses the system clock. Tests inject a manual clock (advanced
//! by hand, so hours of retention can be simulated without sleeping), and the
//! benchmark scripts may run the binary with an accelerated clock through
//! `OFFSITE_TEST_CLOCK=<rate>[@<RFC 3339 start>]` (for example `600` makes
//! one real second ten simulated minutes). The variable is for tests and
//! benchmarks only: only a build with the `testing` feature reads it (and
//! logs it loudly when set); other builds ignore it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

pub const TEST_CLOCK_ENV: &str = "OFFSITE_TEST_CLOCK";

#[derive(Clone)]
enum Kind {
    System,
    Manual(Arc<AtomicI64>),
    Scaled {
        start_us: i64,
        real_start: Instant,
        rate: f64,
    },
}

/// A source of "now" in unix microseconds. Cheap to clone.
#[derive(Clone)]
pub struct Clock(Kind);

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Kind::System => write!(f, "Clock::system"),
            Kind::Manual(t) => write!(f, "Clock::manual({})", t.load(Ordering::SeqCst)),
            Kind::Scaled { rate, .. } => write!(f, "Clock::scaled(x{rate})"),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

pub fn system_now_us() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    d.as_micros() as i64
}

/// Handle that moves a manual clock.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn set_us(&self, t: i64) {
        self.0.store(t, Ordering::SeqCst);
    }
    pub fn advance(&self, d: std::time::Duration) {
        self.0.fetch_add(d.as_micros() as i64, Ordering::SeqCst);
    }
    pub fn now_us(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Clock {
    pub fn system() -> Clock {
        Clock(Kind::System)
    }

    /// A clock that only moves when told to.
    pub fn manual(start_us: i64) -> (Clock, ManualClock) {
        let a = Arc::new(AtomicI64::new(start_us));
        (Clock(Kind::Manual(a.clone())), ManualClock(a))
    }

    /// The system clock, or the accelerated test clock named by
    /// `OFFSITE_TEST_CLOCK`.
    ///
    /// Only a build with the `testing` feature reads the variable; any
    /// other build ignores it and uses the system clock.
    pub fn from_env() -> anyhow::Result<Clock> {
        #[cfg(feature = "testing")]
        let v = std::env::var(TEST_CLOCK_ENV).ok();
        #[cfg(not(feature = "testing"))]
        let v: Option<String> = None;
        let Some(v) = v else {
            return Ok(Clock::system());
        };
        let (rate, start) = match v.split_once('@') {
            Some((r, s)) => (r, Some(s)),
            None => (v.as_str(), None),
        };
        let rate: f64 = rate
            .trim()
            .parse()
            .ok()
            .filter(|r: &f64| *r > 0.0 && r.is_finite())
            .with_context(|| {
                format!("{TEST_CLOCK_ENV}={v:?}: expected RATE[@RFC3339], e.g. 600")
            })?;
        let start_us = match start {
            Some(s) => crate::layout::parse_time(s).with_context(|| TEST_CLOCK_ENV)?,
            None => system_now_us(),
        };
        tracing::warn!(rate, start = %crate::layout::fmt_time_us(start_us), "{TEST_CLOCK_ENV} is set: using an accelerated test clock (never in production)");
        Ok(Clock(Kind::Scaled {
            start_us,
            real_start: Instant::now(),
            rate,
        }))
    }

    pub fn now_us(&self) -> i64 {
        match &self.0 {
            Kind::System => system_now_us(),
            Kind::Manual(t) => t.load(Ordering::SeqCst),
            Kind::Scaled {
                start_us,
                real_start,
                rate,
            } => start_us + (real_start.elapsed().as_micros() as f64 * rate) as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let (c, h) = Clock::manual(1_000);
        assert_eq!(c.now_us(), 1_000);
        h.advance(std::time::Duration::from_secs(3600));
        assert_eq!(c.clone().now_us(), 1_000 + 3_600_000_000);
    }
}
