//! How long a replicator waits between two looks at its database.
//!
//! A database that is being written is polled every `poll_interval`
//! (100 ms), so commits are found promptly and shipped once the sync interval
//! is due. One that is idle is looked at less and less often: the wait
//! doubles after every look that found nothing, up to the sync interval. A
//! sidecar with a thousand quiet databases thus makes about a thousand polls
//! a second instead of ten thousand.
//!
//! The data-loss window is kept: a commit made while the replicator waits is
//! found at most one sync interval later, and since nothing was shipped for
//! longer than that, it is shipped in the same step. What grows is only the
//! reaction time to the first commit after a quiet spell (from one poll to
//! at most one sync interval), and with it how long an application's
//! FULL/RESTART/TRUNCATE checkpoint may wait for offsite to step aside.
//! `sync --wait` and shutdown wake the replicator at once, whatever the wait.

use std::time::Duration;

#[derive(Debug, Clone)]
pub(super) struct IdleBackoff {
    poll: Duration,
    max: Duration,
    wait: Duration,
}

impl IdleBackoff {
    /// Waits from `poll` while busy up to `max(poll, sync)` while idle.
    pub fn new(poll: Duration, sync: Duration) -> Self {
        let poll = poll.max(Duration::from_millis(1));
        IdleBackoff {
            poll,
            max: sync.max(poll),
            wait: poll,
        }
    }

    /// The wait before the next look, given whether the last one found
    /// anything to do (new or pending commits, a retry, any phase but
    /// plain shipping).
    pub fn next(&mut self, busy: bool) -> Duration {
        if busy {
            self.wait = self.poll;
            return self.poll;
        }
        let wait = self.wait;
        self.wait = (wait * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn idle_waits_double_up_to_the_sync_interval_and_a_busy_look_resets_them() {
        let mut b = IdleBackoff::new(100 * MS, 1000 * MS);
        let idle: Vec<_> = (0..7).map(|_| b.next(false)).collect();
        assert_eq!(idle, [100, 200, 400, 800, 1000, 1000, 1000].map(|m| m * MS));
        assert_eq!(b.next(true), 100 * MS);
        assert_eq!(b.next(false), 100 * MS);
        assert_eq!(b.next(false), 200 * MS);
    }

    #[test]
    fn a_sync_interval_at_or_below_the_poll_interval_never_backs_off() {
        let mut b = IdleBackoff::new(100 * MS, 50 * MS);
        for _ in 0..5 {
            assert_eq!(b.next(false), 100 * MS);
        }
        let mut b = IdleBackoff::new(100 * MS, 100 * MS);
        for _ in 0..5 {
            assert_eq!(b.next(false), 100 * MS);
        }
    }
}
