//! Is shipping keeping up with the database's writes?
//!
//! A writer that outruns the shipper grows the backlog of unshipped commits,
//! and with it the WAL that offsite's read lock keeps, until `max-wal-size`
//! releases it and continuity with the replica is lost. This module says so
//! long before: over windows of [`WINDOW`], it compares the bytes of commits
//! found with the growth of the backlog. A backlog that grew through
//! [`BEHIND_WINDOWS`] windows in a row, while uploads succeed, is "behind";
//! the replicator logs the write rate, the ship rate, the gap and the time
//! left until `max-wal-size`, and exports them (`offsite_shipping_behind`,
//! `offsite_write_rate_bytes`, `offsite_ship_rate_bytes`,
//! `offsite_unshipped_bytes`). Upload failures are not "behind": they have
//! their own errors and backoff.

use std::time::{Duration, Instant};

/// Length of one measuring window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Consecutive growing windows before the backlog counts as falling behind.
pub const BEHIND_WINDOWS: u32 = 2;
/// A backlog below this is the ordinary batch of one sync interval.
pub const MIN_BACKLOG: u64 = 8 << 20;

/// Rates over the last window, in bytes of commits (frames × page size).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub write_bps: f64,
    pub ship_bps: f64,
    pub backlog: u64,
}

impl Rates {
    /// Bytes per second by which the backlog grows.
    pub fn gap_bps(&self) -> f64 {
        (self.write_bps - self.ship_bps).max(0.0)
    }

    /// Seconds until the WAL, now `wal` bytes, reaches `max` at this gap.
    pub fn secs_to(&self, wal: u64, max: u64) -> Option<f64> {
        let gap = self.gap_bps();
        (gap > 0.0).then(|| max.saturating_sub(wal) as f64 / gap)
    }
}

/// What changed at the end of a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Nothing new to say.
    Same(Rates),
    /// The backlog has grown for [`BEHIND_WINDOWS`] windows.
    FellBehind(Rates),
    /// Still behind (said again every [`REPEAT_WINDOWS`] windows).
    StillBehind(Rates),
    /// The backlog is small again.
    CaughtUp(Rates),
}

/// Repeat the warning every this many windows while behind.
pub const REPEAT_WINDOWS: u32 = 6;

#[derive(Debug)]
pub struct Pace {
    start: Instant,
    found_at_start: u64,
    backlog_at_start: u64,
    /// Bytes of commits found by polls since the replicator started.
    found: u64,
    /// Bytes found and not shipped, as the last poll saw them.
    backlog: u64,
    /// The first txid not yet counted as found.
    next_txid: u64,
    growing: u32,
    behind: bool,
}

impl Pace {
    pub fn new(now: Instant) -> Pace {
        Pace {
            start: now,
            found_at_start: 0,
            backlog_at_start: 0,
            found: 0,
            backlog: 0,
            next_txid: 0,
            growing: 0,
            behind: false,
        }
    }

    /// A poll found commits of `found` bytes; `backlog` bytes are now
    /// found and not shipped (those included). Measured at the poll: a step
    /// ships everything it found, so after it the backlog is what the
    /// writer added meanwhile, which only the next poll sees.
    pub fn polled(&mut self, found: u64, backlog: u64) {
        self.found += found;
        self.backlog = backlog;
    }

    /// After a poll: `pending` holds every commit found and not shipped,
    /// as (txid, bytes), oldest first. Commits are counted as found once,
    /// whichever poll found them.
    pub fn pending(&mut self, pending: impl IntoIterator<Item = (u64, u64)>) {
        let (mut found, mut backlog) = (0, 0);
        for (txid, bytes) in pending {
            backlog += bytes;
            if txid >= self.next_txid {
                found += bytes;
                self.next_txid = txid + 1;
            }
        }
        self.polled(found, backlog);
    }

    /// The backlog the last poll saw.
    pub fn backlog(&self) -> u64 {
        self.backlog
    }

    pub fn behind(&self) -> bool {
        self.behind
    }

    /// After a step (`failing`: uploads are being retried). `None` until a
    /// window is complete.
    pub fn observe(&mut self, now: Instant, failing: bool) -> Option<Verdict> {
        let backlog = self.backlog;
        let dt = now.saturating_duration_since(self.start);
        if dt < WINDOW {
            return None;
        }
        let secs = dt.as_secs_f64();
        let write = self.found - self.found_at_start;
        // found - shipped = backlog growth, so shipped = found - growth.
        let shipped = (write + self.backlog_at_start).saturating_sub(backlog);
        let rates = Rates {
            write_bps: write as f64 / secs,
            ship_bps: shipped as f64 / secs,
            backlog,
        };
        let grew = backlog > self.backlog_at_start && backlog >= MIN_BACKLOG;
        self.start = now;
        self.found_at_start = self.found;
        self.backlog_at_start = backlog;
        if failing {
            // An outage, not a pace problem; judged afresh once it ends.
            self.growing = 0;
            return Some(Verdict::Same(rates));
        }
        if grew {
            self.growing += 1;
        } else if !self.behind {
            self.growing = 0;
        }
        if backlog < MIN_BACKLOG {
            self.growing = 0;
            if self.behind {
                self.behind = false;
                return Some(Verdict::CaughtUp(rates));
            }
        }
        if self.growing >= BEHIND_WINDOWS {
            if !self.behind {
                self.behind = true;
                return Some(Verdict::FellBehind(rates));
            }
            if (self.growing - BEHIND_WINDOWS).is_multiple_of(REPEAT_WINDOWS) {
                return Some(Verdict::StillBehind(rates));
            }
        }
        Some(Verdict::Same(rates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    /// Feed windows of (found bytes, backlog after) and collect verdicts.
    fn run(windows: &[(u64, u64, bool)]) -> Vec<Verdict> {
        let t0 = Instant::now();
        let mut p = Pace::new(t0);
        let mut out = vec![];
        for (i, &(found, backlog, failing)) in windows.iter().enumerate() {
            p.polled(found, backlog);
            // Mid-window observations say nothing.
            assert_eq!(
                p.observe(t0 + WINDOW * i as u32 + WINDOW / 2, failing),
                None
            );
            out.push(p.observe(t0 + WINDOW * (i as u32 + 1), failing).unwrap());
        }
        out
    }

    #[test]
    fn a_growing_backlog_is_reported_after_two_windows_with_its_rates() {
        // 300 MB written and 200 MB shipped per window: the backlog grows 100 MB each.
        let v = run(&[(300 * MB, 100 * MB, false), (300 * MB, 200 * MB, false)]);
        assert!(matches!(v[0], Verdict::Same(_)));
        let Verdict::FellBehind(r) = v[1] else {
            panic!("{v:?}")
        };
        assert_eq!(r.write_bps, 30.0 * MB as f64);
        assert_eq!(r.ship_bps, 20.0 * MB as f64);
        assert_eq!(r.gap_bps(), 10.0 * MB as f64);
        assert_eq!(r.backlog, 200 * MB);
        // 1 GiB max, WAL at 424 MiB: 600 MiB left at 10 MiB/s.
        assert_eq!(r.secs_to(424 * MB, 1024 * MB), Some(60.0));
    }

    #[test]
    fn commits_are_counted_once_whichever_poll_found_them() {
        let mut p = Pace::new(Instant::now());
        p.pending([(5, 10), (6, 20)]);
        assert_eq!((p.found, p.backlog()), (30, 30));
        // A second poll (the checkpoint's) finds one more; nothing shipped.
        p.pending([(5, 10), (6, 20), (7, 40)]);
        assert_eq!((p.found, p.backlog()), (70, 70));
        // Shipped up to 6; 8 is new.
        p.pending([(7, 40), (8, 1)]);
        assert_eq!((p.found, p.backlog()), (71, 41));
    }

    #[test]
    fn a_steady_batch_or_a_shrinking_backlog_is_not_behind() {
        // The usual sync-interval batch: found and shipped alike.
        let v = run(&[(50 * MB, 4 * MB, false); 5]);
        assert!(v.iter().all(|v| matches!(v, Verdict::Same(_))), "{v:?}");
        // A big backlog that shrinks.
        let v = run(&[
            (10 * MB, 900 * MB, false),
            (10 * MB, 800 * MB, false),
            (10 * MB, 700 * MB, false),
        ]);
        assert!(
            v[1..].iter().all(|v| matches!(v, Verdict::Same(_))),
            "{v:?}"
        );
    }

    #[test]
    fn an_outage_is_not_a_pace_problem() {
        let v = run(&[
            (100 * MB, 100 * MB, true),
            (100 * MB, 200 * MB, true),
            (100 * MB, 300 * MB, true),
        ]);
        assert!(v.iter().all(|v| matches!(v, Verdict::Same(_))), "{v:?}");
    }

    #[test]
    fn behind_is_repeated_then_cleared_when_the_backlog_is_small_again() {
        let mut w: Vec<(u64, u64, bool)> =
            (1..=9).map(|i| (300 * MB, i * 100 * MB, false)).collect();
        w.push((0, 850 * MB, false)); // shrinking: still behind, says nothing
        w.push((0, MB, false)); // caught up
        let v = run(&w);
        assert!(matches!(v[1], Verdict::FellBehind(_)), "{v:?}");
        assert!(matches!(v[7], Verdict::StillBehind(_)), "{v:?}");
        let said = v.iter().filter(|v| !matches!(v, Verdict::Same(_))).count();
        assert_eq!(said, 3, "{v:?}");
        assert!(matches!(v[10], Verdict::CaughtUp(_)), "{v:?}");
    }
}
