//! The live state of every replica the daemon ships to: counters and gauges
//! for `/metrics`, the readiness rule of `/readyz`, and the request/response
//! channel behind `sync --wait`. Replicators write it with atomics; the HTTP
//! listener reads it. Nothing here knows SQLite or S3.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::storage::DynStorage;

/// What a replicator is doing. Exported as `offsite_replica_state`: one
/// series per state, the current one at 1 and the others at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Reading the replica to resume its lineage or start one (retried
    /// while the replica is unreachable).
    Starting,
    /// The database file does not exist yet.
    WaitingForDatabase,
    /// A lineage is open: commits are shipped as they come.
    Shipping,
    /// Another shipper holds the replica's lease; nothing is written.
    Fenced,
    /// The WAL outgrew `max-wal-size` while the replica could not take
    /// commits and was released; a new lineage starts once the replica answers.
    OverWalBound,
    /// After an error or a break in continuity: a new lineage (snapshot) is
    /// taken on the next step.
    Restarting,
    /// The replicator ended (shutdown, or an error it cannot retry).
    Stopped,
}

impl ReplicaState {
    pub const ALL: [ReplicaState; 7] = [
        ReplicaState::Starting,
        ReplicaState::WaitingForDatabase,
        ReplicaState::Shipping,
        ReplicaState::Fenced,
        ReplicaState::OverWalBound,
        ReplicaState::Restarting,
        ReplicaState::Stopped,
    ];

    /// The `state` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Starting => "starting",
            ReplicaState::WaitingForDatabase => "waiting_for_database",
            ReplicaState::Shipping => "shipping",
            ReplicaState::Fenced => "fenced",
            ReplicaState::OverWalBound => "over_wal_bound",
            ReplicaState::Restarting => "restarting",
            ReplicaState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters and gauges of one database → replica pair.
#[derive(Debug)]
pub struct ReplicaStatus {
    pub db: String,
    pub replica: String,
    /// The replica's URL, for messages (never holds credentials).
    pub url: String,
    /// How far behind this replica may be and still count as ready.
    pub max_lag: Duration,
    /// When the replicator was registered (unix µs).
    pub registered_us: i64,
    /// The replica was reached and shipping runs.
    pub running: AtomicBool,
    /// The database file does not exist yet (offsite waits for it; after
    /// `max_lag` that counts as not ready, so a wrong path is noticed).
    pub waiting_for_db: AtomicBool,
    /// The replicator stopped on an error it cannot retry.
    pub failed: Mutex<Option<String>>,
    /// The replicator's `ReplicaState`, as its index in `ReplicaState::ALL`.
    state: AtomicU8,
    /// Newest txid durable in the replica.
    pub shipped_txid: AtomicU64,
    /// Observation time (unix µs) of the oldest commit not yet durable in
    /// the replica; 0 when everything observed is shipped.
    pub pending_since_us: AtomicI64,
    pub raw_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub segments: AtomicU64,
    pub upload_errors: AtomicU64,
    pub last_upload_us: AtomicI64,
    pub wal_bytes: AtomicU64,
    /// Bytes of commits found and not yet shipped.
    pub unshipped_bytes: AtomicU64,
    /// Write and ship rates over the last pace window (bytes/s), and
    /// whether the backlog keeps growing (`replicate::pace`).
    pub write_rate_bps: AtomicU64,
    pub ship_rate_bps: AtomicU64,
    pub shipping_behind: AtomicBool,
    pub checkpoints: AtomicU64,
    /// Looks at the database for new commits (fewer while it is idle).
    pub polls: AtomicU64,
    pub snapshots: AtomicU64,
    pub lineage_breaks: AtomicU64,
    /// Objects read back that did not prove out (planted, foreign, forged).
    pub refused_objects: AtomicU64,
    /// Times the WAL outgrew `max-wal-size` while commits could not be
    /// shipped, and offsite let it go (continuity lost).
    pub wal_overflows: AtomicU64,
    /// Restore drills: when the newest ran, the commit time of the newest
    /// point it verified, and how many failed.
    pub drill_ran_us: AtomicI64,
    pub verified_time_us: AtomicI64,
    pub verified_txid: AtomicU64,
    pub drill_failures: AtomicU64,
    /// PostgreSQL: WAL received and not yet durable in the replica (bytes).
    pub pg_lag_bytes: AtomicU64,
    /// PostgreSQL: WAL the replication slot holds on the primary (the
    /// server's end of WAL minus what offsite reported flushed).
    pub pg_slot_lag_bytes: AtomicU64,
    /// PostgreSQL: when the newest complete base backup ended (unix µs).
    pub pg_last_base_backup_us: AtomicI64,
    /// `sync --wait`: requests are numbered; the replicator publishes the
    /// highest request number whose state is durable.
    sync_requested: watch::Sender<u64>,
    sync_done: watch::Sender<u64>,
}

impl ReplicaStatus {
    pub fn new(db: &str, replica: &str, url: &str, max_lag: Duration, now_us: i64) -> Self {
        ReplicaStatus {
            db: db.to_string(),
            replica: replica.to_string(),
            url: url.to_string(),
            max_lag,
            registered_us: now_us,
            running: AtomicBool::new(false),
            waiting_for_db: AtomicBool::new(false),
            failed: Mutex::new(None),
            state: AtomicU8::new(0),
            shipped_txid: AtomicU64::new(0),
            pending_since_us: AtomicI64::new(0),
            raw_bytes: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
            segments: AtomicU64::new(0),
            upload_errors: AtomicU64::new(0),
            last_upload_us: AtomicI64::new(0),
            wal_bytes: AtomicU64::new(0),
            unshipped_bytes: AtomicU64::new(0),
            write_rate_bps: AtomicU64::new(0),
            ship_rate_bps: AtomicU64::new(0),
            shipping_behind: AtomicBool::new(false),
            checkpoints: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            lineage_breaks: AtomicU64::new(0),
            refused_objects: AtomicU64::new(0),
            wal_overflows: AtomicU64::new(0),
            drill_ran_us: AtomicI64::new(0),
            verified_time_us: AtomicI64::new(0),
            verified_txid: AtomicU64::new(0),
            drill_failures: AtomicU64::new(0),
            pg_lag_bytes: AtomicU64::new(0),
            pg_slot_lag_bytes: AtomicU64::new(0),
            pg_last_base_backup_us: AtomicI64::new(0),
            sync_requested: watch::channel(0).0,
            sync_done: watch::channel(0).0,
        }
    }

    /// A status nobody watches (library use and tests).
    pub fn detached() -> Arc<Self> {
        Arc::new(Self::new("", "", "", Duration::from_secs(60), 0))
    }

    /// Seconds the replica is behind at `now_us`: the age of the oldest
    /// commit not yet durable in it. Before the replica was ever reached,
    /// the time since the replicator started (commits may be waiting in the
    /// WAL that nobody has looked at).
    pub fn lag_seconds(&self, now_us: i64) -> f64 {
        let since = if !self.running.load(Relaxed) || self.waiting_for_db.load(Relaxed) {
            self.registered_us
        } else {
            self.pending_since_us.load(Relaxed)
        };
        if since == 0 {
            0.0
        } else {
            (now_us - since).max(0) as f64 / 1e6
        }
    }

    /// None when ready, else why not.
    pub fn not_ready(&self, now_us: i64) -> Option<String> {
        if let Some(e) = self.failed.lock().unwrap().as_ref() {
            return Some(format!("stopped: {e}"));
        }
        let lag = self.lag_seconds(now_us);
        if lag > self.max_lag.as_secs_f64() {
            return Some(if self.waiting_for_db.load(Relaxed) {
                format!("the database does not exist yet (waited {lag:.1}s)")
            } else if self.running.load(Relaxed) {
                format!("{lag:.1}s behind (allowed {}s)", self.max_lag.as_secs_f64())
            } else {
                format!("replica not reached for {lag:.1}s")
            });
        }
        None
    }

    /// Ask the replicator to ship now; returns the request number to wait for.
    pub fn request_sync(&self) -> u64 {
        let mut n = 0;
        self.sync_requested.send_modify(|v| {
            *v += 1;
            n = *v;
        });
        n
    }

    /// Wait until request `n` is satisfied.
    pub async fn wait_synced(&self, n: u64) -> bool {
        let mut rx = self.sync_done.subscribe();
        let ok = rx.wait_for(|d| *d >= n).await.is_ok();
        ok
    }

    /// For the replicator: the channel of sync requests.
    pub fn sync_requests(&self) -> watch::Receiver<u64> {
        self.sync_requested.subscribe()
    }

    /// For the replicator: everything observed after request `n` was made
    /// is durable.
    pub fn sync_satisfied(&self, n: u64) {
        self.sync_done.send_if_modified(|d| {
            if n > *d {
                *d = n;
                true
            } else {
                false
            }
        });
    }

    /// What the replicator is doing now.
    pub fn state(&self) -> ReplicaState {
        ReplicaState::ALL[self.state.load(Relaxed) as usize]
    }

    /// For the replicator: it entered `s` (also keeps `waiting_for_db`,
    /// which readiness reads, in step).
    pub fn set_state(&self, s: ReplicaState) {
        let i = ReplicaState::ALL.iter().position(|x| *x == s).unwrap_or(0);
        self.state.store(i as u8, Relaxed);
        self.waiting_for_db
            .store(s == ReplicaState::WaitingForDatabase, Relaxed);
    }

    /// The `offsite_replica_state` series: every state with 1 for the
    /// current one, 0 for the others.
    pub fn state_series(&self) -> impl Iterator<Item = (&'static str, i64)> {
        let now = self.state();
        ReplicaState::ALL
            .into_iter()
            .map(move |s| (s.as_str(), (s == now) as i64))
    }

    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

/// One registered replicator: its status and its store (for request counts).
#[derive(Clone)]
pub struct Entry {
    pub status: Arc<ReplicaStatus>,
    pub store: DynStorage,
}

/// Every replica the daemon ships to (databases come and go with directory
/// discovery).
pub struct Registry {
    pub clock: Clock,
    entries: Mutex<Vec<Entry>>,
}

impl Registry {
    pub fn new(clock: Clock) -> Arc<Registry> {
        Arc::new(Registry {
            clock,
            entries: Mutex::new(Vec::new()),
        })
    }

    pub fn register(&self, status: Arc<ReplicaStatus>, store: DynStorage) {
        self.entries.lock().unwrap().push(Entry { status, store });
    }

    pub fn unregister(&self, status: &Arc<ReplicaStatus>) {
        self.entries
            .lock()
            .unwrap()
            .retain(|e| !Arc::ptr_eq(&e.status, status));
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().clone()
    }

    /// The replicas of database `db` (matched by path, or canonical path).
    pub fn for_db(&self, db: &str) -> Vec<Arc<ReplicaStatus>> {
        let want = std::fs::canonicalize(db)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| db.to_string());
        self.entries()
            .into_iter()
            .filter(|e| {
                e.status.db == db
                    || std::fs::canonicalize(&e.status.db)
                        .map(|p| p.display().to_string())
                        .ok()
                        .as_deref()
                        == Some(want.as_str())
            })
            .map(|e| e.status)
            .collect()
    }

    /// Every replica that is not ready, with the reason.
    pub fn not_ready(&self) -> Vec<(Arc<ReplicaStatus>, String)> {
        let now = self.clock.now_us();
        self.entries()
            .into_iter()
            .filter_map(|e| e.status.not_ready(now).map(|r| (e.status, r)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_unshipped_commit() {
        let s = ReplicaStatus::new(
            "/d.db",
            "r",
            "file:///x",
            Duration::from_secs(10),
            1_000_000,
        );
        // Never reached: lag counts from registration.
        assert_eq!(s.lag_seconds(4_000_000), 3.0);
        assert!(s.not_ready(12_000_000).unwrap().contains("not reached"));
        s.running.store(true, Relaxed);
        assert_eq!(s.lag_seconds(4_000_000), 0.0);
        assert!(s.not_ready(100_000_000).is_none());
        s.pending_since_us.store(5_000_000, Relaxed);
        assert_eq!(s.lag_seconds(7_500_000), 2.5);
        assert!(s.not_ready(16_000_000).unwrap().contains("behind"));
        *s.failed.lock().unwrap() = Some("boom".into());
        assert!(s.not_ready(5_000_000).unwrap().contains("boom"));
    }

    #[test]
    fn exactly_one_state_series_is_set() {
        let s = ReplicaStatus::detached();
        assert_eq!(s.state(), ReplicaState::Starting);
        for st in ReplicaState::ALL {
            s.set_state(st);
            assert_eq!(s.state(), st);
            let series: Vec<_> = s.state_series().collect();
            assert_eq!(series.len(), ReplicaState::ALL.len());
            assert_eq!(series.iter().map(|(_, v)| v).sum::<i64>(), 1);
            assert!(series.contains(&(st.as_str(), 1)));
            assert_eq!(
                s.waiting_for_db.load(Relaxed),
                st == ReplicaState::WaitingForDatabase
            );
        }
        let names: std::collections::BTreeSet<_> =
            ReplicaState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names.len(),
            ReplicaState::ALL.len(),
            "label values are distinct"
        );
    }

    #[tokio::test]
    async fn sync_requests_are_satisfied_in_order() {
        let s = ReplicaStatus::detached();
        let rx = s.sync_requests();
        let a = s.request_sync();
        let b = s.request_sync();
        assert_eq!((a, b), (1, 2));
        assert_eq!(*rx.borrow(), 2);
        s.sync_satisfied(1);
        let w = tokio::time::timeout(Duration::from_millis(50), s.wait_synced(2)).await;
        assert!(w.is_err(), "request 2 is not satisfied by 1");
        s.sync_satisfied(2);
        assert!(s.wait_synced(2).await);
        assert!(s.wait_synced(1).await);
    }
}
