//! Replication of one database to one replica: source → segment → codec →
//! storage. The replica is the cursor: nothing is acknowledged (shipped
//! position advanced) before the object is durable in the store.
//!
//! Here: the `Replicator` (start or resume, the step loop, checkpoints,
//! shutdown). Beside it: `state` (what it is doing: one `Phase`, changed
//! through `Replicator::enter`), `options`, `build` (segment and snapshot
//! objects from the source), `spool` (staging), `retry` (storage requests
//! and backoff), `background` (drills, pruning, compaction uploads,
//! periodic snapshots).

mod background;
mod build;
mod idle;
mod options;
mod pace;
mod retry;
mod spool;
mod state;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::codec::{Encryption, Envelope, Seal};
use crate::engine::{Break, Compacted, Engine, Source};
use crate::layout::{self, Catalog, HeadObject};
use crate::segment::Link;
use crate::sign::{Binding, Trust};
use crate::status::ReplicaState;
use crate::storage::{DynStorage, ObjectLock};

pub use background::DrillRecord;
pub use options::Options;
pub use spool::spool_dir;

use build::Staged;
use idle::IdleBackoff;
use retry::{is_unavailable, put_object, requests_json, with_retries};
use spool::Spool;
use state::{Phase, Shipping};

/// Snapshots built and uploaded at once in this process. A sidecar that
/// starts with a thousand databases snapshots them a few at a time, so its
/// memory does not grow with the number of databases (Litestream #331).
static SNAPSHOT_PERMITS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// At most this much WAL is shipped while holding the application's write
/// lock for a checkpoint (more is shipped without the lock, and the
/// checkpoint retried).
const LOCKED_SHIP_MAX_BYTES: u64 = 2 << 20;

/// At most this long is spent uploading while holding the application's
/// write lock for a checkpoint.
const LOCKED_SHIP_TIMEOUT: Duration = Duration::from_millis(500);

/// Replicates one database to one replica.
pub struct Replicator {
    opts: Options,
    store: DynStorage,
    enc: Encryption,
    /// Encryption, signing key and replica binding of every object (signed
    /// and bound once `start` has claimed the replica).
    seal: Seal,
    /// What this shipper trusts when it reads the replica back: its own
    /// key, the old keys of a rotation, this replica's id.
    trust: Trust,
    /// When the head record was last written, and at which txid.
    head_written: Option<(Instant, u64)>,
    /// Snapshots whose signed envelopes pruning already proved.
    proven: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// The database's engine (only SQLite has a source so far).
    engine: Engine,
    /// What the replicator is doing; while shipping it holds the source
    /// (with the replicated state and the compaction windows) and the lineage.
    phase: Phase,
    /// When `phase` was entered (unix µs), for the transition log.
    phase_since_us: i64,
    next_txid: u64,
    /// Highest txid durable in the replica; a new lineage starts after it.
    stored_txid: u64,
    last_ship: Instant,
    failures: u32,
    retry_at: Option<Instant>,
    last_time_us: i64,
    checkpoint_misses: u32,
    /// Closed compaction windows waiting for upload, with their lineage.
    closed: std::collections::VecDeque<(String, Box<dyn Compacted>)>,
    /// Txid and time of the newest snapshot of the current lineage.
    last_snapshot: (u64, i64),
    last_prune_us: i64,
    uploaded_since_prune: bool,
    prune_task: Option<tokio::task::JoinHandle<()>>,
    drill_task: Option<tokio::task::JoinHandle<()>>,
    last_drill_us: i64,
    /// The newest restore drill's outcome: (time it ran, result).
    drill: std::sync::Arc<std::sync::Mutex<Option<DrillRecord>>>,
    lease: crate::lease::Lease,
    /// Write rate against ship rate (`pace`).
    pace: pace::Pace,
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl Replicator {
    pub fn new(opts: Options, store: DynStorage, enc: Encryption) -> Replicator {
        opts.status.set_state(ReplicaState::Starting);
        Replicator {
            store,
            seal: Seal::unsigned(enc.clone()),
            trust: Trust::default(),
            head_written: None,
            proven: Default::default(),
            enc,
            engine: Engine::Sqlite,
            phase: Phase::Starting,
            phase_since_us: opts.clock.now_us(),
            next_txid: 1,
            stored_txid: 0,
            last_ship: Instant::now(),
            failures: 0,
            retry_at: None,
            last_time_us: 0,
            checkpoint_misses: 0,
            closed: Default::default(),
            last_snapshot: (0, 0),
            last_prune_us: 0,
            uploaded_since_prune: false,
            prune_task: None,
            drill_task: None,
            last_drill_us: 0,
            drill: Default::default(),
            pace: pace::Pace::new(Instant::now()),
            lease: crate::lease::Lease::new(
                &opts.db_path.display().to_string(),
                opts.lease_ttl,
                opts.lease_renew,
            ),
            opts,
        }
    }

    /// The database's name, as objects and the replica record carry it.
    fn database_name(&self) -> String {
        self.opts
            .db_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn now_us(&self) -> i64 {
        self.opts.clock.now_us()
    }

    /// The Object Lock retention for an object uploaded now.
    fn lock(&self) -> Option<ObjectLock> {
        object_lock(&self.opts, self.now_us())
    }

    /// Enter `to`, the one way the state changes: a change is exported as
    /// `offsite_replica_state` and logged once, with what it came from,
    /// how long that lasted and why (`why`).
    fn enter(&mut self, to: Phase, why: &str) {
        let now = self.now_us();
        let lineage = to.shipping().map(|s| s.lineage.clone());
        let lineage = lineage.as_deref();
        let Some((from, to)) = state::transition(&mut self.phase, to, &self.opts.status) else {
            return;
        };
        let was = Duration::from_micros((now - self.phase_since_us).max(0) as u64);
        self.phase_since_us = now;
        let (db, replica) = (self.db(), &self.opts.replica_name);
        let trouble = state::is_trouble(to);
        let (from, to) = (from.as_str(), to.as_str());
        if trouble {
            tracing::warn!(%db, %replica, from, to, after = ?was, reason = why, "replica state changed");
        } else {
            tracing::info!(%db, %replica, from, to, after = ?was, lineage, reason = why, "replica state changed");
        }
    }

    fn db(&self) -> String {
        self.opts.db_path.display().to_string()
    }

    /// Replicate until `shutdown` turns true, then ship what is pending.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let status = self.opts.status.clone();
        let r = self.run_inner(&mut shutdown).await;
        if let Err(e) = &r {
            *status.failed.lock().unwrap() = Some(format!("{e:#}"));
        }
        let why = match &r {
            Ok(()) => "shut down".to_string(),
            Err(e) => format!("{e:#}"),
        };
        self.enter(Phase::Stopped, &why);
        r
    }

    async fn run_inner(&mut self, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        // A sidecar may start before its application created the database;
        // a directory that does not exist is a wrong path, not a wait.
        let dir = self
            .opts
            .db_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty());
        if !self.opts.db_path.exists() && dir.is_some_and(|d| !d.is_dir()) {
            bail!(
                "cannot open database {}: its directory does not exist (check the path)",
                self.db()
            );
        }
        if !self.opts.db_path.exists() {
            tracing::info!(db = %self.db(), "waiting for the database to be created");
            self.enter(
                Phase::WaitingForDatabase,
                "the database file does not exist yet",
            );
            let mut next_note = Instant::now() + Duration::from_secs(60);
            while !self.opts.db_path.exists() {
                if Instant::now() >= next_note {
                    tracing::warn!(db = %self.db(), "still waiting for the database to be created (is the path right?)");
                    next_note = Instant::now() + Duration::from_secs(60);
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.opts.poll_interval.max(Duration::from_millis(250))) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return Ok(());
                }
            }
            self.enter(Phase::Starting, "the database file was created");
        }
        // An unreachable replica is retried for as long as it takes; other
        // replicas of the same database are separate tasks and go on.
        let mut wait = Duration::from_secs(1);
        loop {
            match self.start().await {
                Ok(()) => break,
                Err(e) if crate::lease::is_held(&e) => {
                    tracing::error!(db = %self.db(), replica = %self.opts.replica_name, url = %self.store.describe(), error = format!("{e:#}"), "not writing to this replica");
                    self.enter(Phase::Fenced, "another shipper holds the replica's lease");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        bail!("{e:#}");
                    }
                }
                Err(e) if is_unavailable(&e) => {
                    self.opts.status.add(&self.opts.status.upload_errors, 1);
                    tracing::error!(db = %self.db(), replica = %self.opts.replica_name, url = %self.store.describe(), error = format!("{e:#}"), retry_in = ?wait, "replica unreachable; commits stay in the WAL until it is back");
                    self.enter(Phase::Starting, "the replica is unreachable");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        bail!(
                            "replica {} ({}) was never reachable; nothing was shipped to it",
                            self.opts.replica_name,
                            self.store.describe()
                        );
                    }
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
                Err(e) => return Err(e),
            }
        }
        self.opts.status.running.store(true, Relaxed);
        self.publish();
        // Every poll interval while busy, backing off to the sync interval
        // while idle (`idle`).
        let mut idle = IdleBackoff::new(self.opts.poll_interval, self.opts.sync_interval);
        let mut next_look = tokio::time::Instant::now();
        let mut sync_rx = self.opts.status.sync_requests();
        let mut synced = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_look) => {}
                _ = shutdown.changed() => {}
                _ = sync_rx.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
            let looked_at = tokio::time::Instant::now();
            let txid_before = self.next_txid;
            self.opts.status.add(&self.opts.status.polls, 1);
            // Read before the step: the step's poll sees every commit made
            // before the request.
            // Any number of requests since the last step are one wake-up
            // (the channel keeps only the newest number). A pending request
            // skips the sync interval, never the upload backoff: during an
            // outage the retries keep their pace however many callers
            // wait, and after they gave up.
            let requested = *sync_rx.borrow_and_update();
            let force = requested > synced;
            match self.step(force).await {
                Ok(()) => {
                    if force && self.caught_up() {
                        synced = requested;
                        self.opts.status.sync_satisfied(requested);
                    }
                }
                Err(e) if crate::lease::is_held(&e) => {
                    // Another shipper writes this replica now: stop writing
                    // (nothing interleaves) and check again later.
                    tracing::error!(db = %self.db(), replica = %self.opts.replica_name, error = format!("{e:#}"), "not writing to this replica");
                    self.enter(Phase::Fenced, "another shipper holds the replica's lease");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Err(e) => {
                    // Local errors (I/O on the database, lost read lock): start over
                    // with a fresh lineage rather than risk a wrong replica.
                    tracing::error!(db = %self.db(), error = format!("{e:#}"), "replication step failed; will take a new snapshot");
                    self.enter(Phase::Restarting, "the replication step failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            self.publish();
            let busy =
                self.next_txid != txid_before || !self.caught_up() || self.retry_at.is_some();
            next_look = looked_at + idle.next(busy);
        }
        let requested = *sync_rx.borrow();
        let r = self.shutdown().await;
        if r.is_ok() {
            self.opts.status.sync_satisfied(requested);
        }
        r
    }

    fn count_snapshot(&self, raw: u64, stored: u64) {
        let st = &self.opts.status;
        st.add(&st.snapshots, 1);
        st.add(&st.raw_bytes, raw);
        st.add(&st.stored_bytes, stored);
        st.last_upload_us.store(self.opts.clock.now_us(), Relaxed);
    }

    /// Everything observed is durable in the replica.
    fn caught_up(&self) -> bool {
        self.phase
            .shipping()
            .is_some_and(|s| s.source.pending_len() == 0)
    }

    /// Refresh the gauges read by `/metrics` and `/readyz`.
    fn publish(&mut self) {
        let st = &self.opts.status;
        st.shipped_txid.store(self.stored_txid, Relaxed);
        if let Some(sh) = self.phase.shipping() {
            let since = sh.source.pending().first().map(|p| p.time_us).unwrap_or(0);
            st.pending_since_us.store(since, Relaxed);
        }
        st.unshipped_bytes.store(self.pace.backlog(), Relaxed);
        let wal = self.wal_size();
        st.wal_bytes.store(wal, Relaxed);
        let failing = self.retry_at.is_some();
        if let Some(v) = self.pace.observe(Instant::now(), failing) {
            self.report_pace(v, wal);
        }
    }

    /// Export the pace window's rates; say when shipping falls behind the
    /// writer, and when it caught up again.
    fn report_pace(&self, v: pace::Verdict, wal: u64) {
        use pace::Verdict::*;
        let (Same(r) | FellBehind(r) | StillBehind(r) | CaughtUp(r)) = v;
        let st = &self.opts.status;
        st.write_rate_bps.store(r.write_bps as u64, Relaxed);
        st.ship_rate_bps.store(r.ship_bps as u64, Relaxed);
        st.shipping_behind.store(self.pace.behind(), Relaxed);
        let mb = |b: f64| (b / 1e5).round() / 10.0;
        let max = self.opts.max_wal_bytes;
        match v {
            FellBehind(_) | StillBehind(_) => {
                let eta = r
                    .secs_to(wal, max)
                    .map(|s| format!("{s:.0} s"))
                    .unwrap_or_else(|| "unknown".into());
                tracing::warn!(db = %self.db(), replica = %self.opts.replica_name,
                    write_mb_s = mb(r.write_bps), ship_mb_s = mb(r.ship_bps), gap_mb_s = mb(r.gap_bps()),
                    unshipped_mb = mb(r.backlog as f64), wal_mb = mb(wal as f64), max_wal_mb = mb(max as f64),
                    "shipping cannot keep up with the writer: the database writes {} MB/s, offsite ships {} MB/s, the backlog grows {} MB/s; at this pace the WAL reaches max-wal-size in {eta}, which ends the lineage (a new snapshot follows). Give offsite more CPU or a faster store, or slow the writer",
                    mb(r.write_bps), mb(r.ship_bps), mb(r.gap_bps()));
            }
            CaughtUp(_) => {
                tracing::info!(db = %self.db(), replica = %self.opts.replica_name, unshipped_mb = mb(r.backlog as f64), "shipping caught up with the writer");
            }
            Same(_) => {}
        }
    }

    /// Size of the database's change log (SQLite: the `-wal` file).
    fn wal_size(&self) -> u64 {
        self.engine.log_bytes(&self.opts.db_path)
    }

    /// Open the database's source.
    fn open_source(&self) -> anyhow::Result<Box<dyn Source>> {
        let (db, levels) = (&self.opts.db_path, &self.opts.compaction_levels);
        blocking(|| {
            self.engine
                .open_source(db, levels, self.opts.spool_dir.clone())
        })
    }

    async fn shutdown(&mut self) -> anyhow::Result<()> {
        tracing::info!(db = %self.db(), "shutting down: shipping pending commits");
        let deadline = Instant::now() + self.opts.shutdown_timeout;
        loop {
            self.retry_at = None;
            match self.step(true).await {
                Ok(()) if self.caught_up() => {
                    self.flush_compaction().await;
                    self.maybe_write_head(true).await;
                    // A drill only reads; a prune must not outlive the lease.
                    if let Some(t) = self.drill_task.take() {
                        t.abort();
                    }
                    if let Some(t) = self.prune_task.take() {
                        let _ = t.await;
                    }
                    self.lease.release(self.store.as_ref()).await;
                    tracing::info!(db = %self.db(), replica = %self.opts.replica_name, next_txid = self.next_txid, requests = %requests_json(self.store.as_ref()), "all commits shipped");
                    return Ok(());
                }
                Ok(()) => {}
                Err(e) if crate::lease::is_held(&e) => {
                    bail!("the last commits of {} were not shipped: {e:#}", self.db());
                }
                Err(e) => {
                    if !self.opts.db_path.exists() {
                        bail!(
                            "{} was removed before its last commits were shipped: {e:#}",
                            self.db()
                        );
                    }
                    tracing::warn!(db = %self.db(), error = format!("{e:#}"), "final ship failed")
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "could not ship the last commits of {} to {} within {:?}; they are still in the WAL and will be shipped when offsite runs again",
                    self.db(),
                    self.store.describe(),
                    self.opts.shutdown_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Startup: read the replica once and continue its newest lineage if the
    /// local database provably matches, else start a new lineage.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.opts.object_lock.is_some() {
            let status = with_retries("check the bucket's Object Lock configuration", || {
                self.store.object_lock_status()
            })
            .await?;
            if status.is_none() {
                bail!(
                    "object-lock is configured for replica {} but the bucket at {} does not have S3 Object Lock enabled (it can only be turned on when a bucket is created, e.g. `aws s3api create-bucket --object-lock-enabled-for-bucket`; some S3-compatible servers do not implement it at all)",
                    self.opts.replica_name,
                    self.store.describe()
                );
            }
        }
        // The replica records its engine, database and id, signed: one of
        // another engine or database, or signed by a key this shipper does
        // not trust, is refused before anything (the lease included) is
        // written to it.
        let signer = self.opts.signer.clone().context(crate::sign::NO_SIGNER)?;
        let mut trust = Trust::with_keys(
            std::iter::once(signer.public())
                .chain(self.opts.verify_keys.iter().copied())
                .collect(),
        );
        let (replica, database) = crate::record::claim(
            self.store.as_ref(),
            Engine::Sqlite,
            &self.database_name(),
            &signer,
            &trust,
        )
        .await?;
        trust.replica = Some(replica.clone());
        trust.database = Some(database.clone());
        self.trust = trust;
        self.seal = Seal {
            enc: self.enc.clone(),
            binding: Binding {
                signer: Some(signer),
                replica,
                database,
            },
        };
        self.lease_ok().await?;
        // Multipart uploads a killed predecessor left behind (one LIST).
        match self.store.abort_abandoned_uploads().await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(db = %self.db(), replica = %self.opts.replica_name, aborted = n, "aborted multipart uploads left by an earlier run")
            }
            Err(e) => {
                tracing::warn!(db = %self.db(), replica = %self.opts.replica_name, error = %e, "could not clean up abandoned multipart uploads")
            }
        }
        let objects =
            with_retries("list the replica", || self.store.list(layout::LINEAGES)).await?;
        let catalog = Catalog::from_list(&objects);
        self.stored_txid = catalog.max_txid().unwrap_or(0);
        self.next_txid = self.stored_txid + 1;
        let mut src = self.open_source()?;
        let Some(l) = catalog.newest_lineage() else {
            return self.new_lineage(Some(src), "the replica is empty").await;
        };
        let head = l.head().expect("lineage with objects");
        let size = match &head {
            HeadObject::Snapshot(s) => s.size,
            HeadObject::Segment(g) => g.size,
        };
        // Only a head this shipper signed for this replica is continued; any
        // other (planted, damaged, written before format 3) starts a new
        // lineage, loudly, instead of stopping the shipper.
        // (An unreachable store is retried, like every startup read.)
        let deadline = Instant::now() + Duration::from_secs(60);
        let proven = loop {
            let r =
                crate::trusted::envelope(self.store.as_ref(), head.key(), size, &self.trust).await;
            let transient = r.as_ref().err().is_some_and(|e| {
                e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<crate::storage::StorageError>(),
                        Some(crate::storage::StorageError::Unavailable(_))
                    )
                })
            });
            if !transient || Instant::now() >= deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let env = match proven {
            Ok((env, _)) => env,
            Err(e) if e.chain().any(|c| c.is::<crate::storage::StorageError>()) => {
                return Err(e).context("read the replica's newest object");
            }
            Err(e) => {
                tracing::error!(db = %self.db(), replica = %self.opts.replica_name, object = %head.key(), error = %format!("{e:#}"), "the replica's newest object does not prove out; starting a new lineage");
                self.opts.status.add(&self.opts.status.refused_objects, 1);
                return self
                    .new_lineage(
                        Some(src),
                        &format!(
                            "the replica's newest object {} does not prove out",
                            head.key()
                        ),
                    )
                    .await;
            }
        };
        if env.encrypted != matches!(self.enc, Encryption::Age(_)) {
            bail!(
                "the replica at {} holds {} objects but offsite is configured {}; refusing to mix encrypted and plaintext backups in one replica (use another prefix, or fix the encryption settings)",
                self.store.describe(),
                if env.encrypted { "encrypted" } else { "plaintext" },
                if env.encrypted { "without encryption" } else { "with age encryption" },
            );
        }
        match self.try_resume(src.as_mut(), &l.id, &head, &env)? {
            Ok(link) => {
                self.last_snapshot = l
                    .snapshots
                    .last()
                    .map(|s| (s.txid, s.time_us))
                    .unwrap_or((0, 0));
                self.last_time_us = self.last_time_us.max(head.last_time_us());
                let shipping = Shipping {
                    source: src,
                    lineage: l.id.clone(),
                    link,
                };
                self.enter(
                    Phase::Shipping(Box::new(shipping)),
                    "the local database continues the replica's newest lineage",
                );
                Ok(())
            }
            Err(b) => self.new_lineage(Some(src), &b.reason).await,
        }
    }

    /// The chain link at the replica's head, if the local database
    /// provably continues it (the source then continues from there).
    fn try_resume(
        &self,
        src: &mut dyn Source,
        lineage: &str,
        head: &HeadObject,
        env: &Envelope,
    ) -> anyhow::Result<Result<Link, Break>> {
        if env.is_legacy() {
            // A lineage is written in one format: continue in a new one.
            return Ok(Err(Break::hard(
                "the replica's newest lineage was written by an earlier offsite (format 1); continuing in a new lineage (format 2)",
            )));
        }
        // A head this shipper cannot continue is a break, not a reason to stop.
        if env.meta.engine != self.engine.name() {
            return Ok(Err(Break::hard(format!(
                "the replica's newest object {} names the {:?} engine, not {}",
                head.key(),
                env.meta.engine,
                self.engine
            ))));
        }
        let Ok(link) = Link::from_hex(&env.meta.link) else {
            return Ok(Err(Break::hard(format!(
                "the replica's newest object {} has no valid chain link",
                head.key()
            ))));
        };
        match blocking(|| src.resume(&env.meta.resume))? {
            Ok(r) => {
                tracing::info!(db = %self.opts.db_path.display(), lineage, txid = head.last_txid(), how = %r.how, "resuming replication: {}", r.how);
                Ok(Ok(link))
            }
            Err(b) => Ok(Err(b)),
        }
    }

    /// Start a new lineage with a snapshot of `src` (opened here if None)
    /// and ship in it.
    async fn new_lineage(&mut self, src: Option<Box<dyn Source>>, why: &str) -> anyhow::Result<()> {
        self.lease_ok().await?;
        let _permit = SNAPSHOT_PERMITS.acquire().await?;
        // Txids observed but never shipped named no stored state: reuse them,
        // so the new lineage continues right after the highest stored txid.
        let txid = self.stored_txid + 1;
        if txid > layout::MAX_TXID {
            bail!("the replica's txids reached {} (the highest offsite writes): objects with implausible txids were planted in the bucket, or it is damaged; run `offsite verify` and remove what it reports before shipping again", layout::MAX_TXID);
        }
        let lineage = layout::new_lineage_id(txid);
        tracing::warn!(db = %self.db(), replica = %self.opts.replica_name, %lineage, txid, reason = why, "starting a new lineage with a snapshot");
        let mut src = match src {
            Some(s) => s,
            None => self.open_source()?,
        };
        let floor = self.last_time_us;
        let seal = self.seal.clone();
        let spool_dir = self.opts.spool_dir.clone();
        let clock = self.opts.clock.clone();
        let staged = blocking(|| -> anyhow::Result<_> {
            let mut spool = Spool::new(spool_dir);
            let mut now = || clock.now_us().max(floor);
            let built = src.snapshot(&lineage, txid, &mut now, &seal, &mut spool)?;
            Staged::snapshot(&lineage, spool, built)
        })?;
        let time_us = staged.built.last_time_us;
        let stored = staged.body.len().await?;
        let lock = self.lock();
        let store = &self.store;
        with_retries("upload the snapshot", || {
            put_object(store, &staged.key, staged.body.clone(), lock)
        })
        .await?;
        tracing::info!(db = %self.db(), replica = %self.opts.replica_name, key = %staged.key, txid, raw_bytes = staged.raw_bytes, stored_bytes = stored, "snapshot uploaded");
        self.count_snapshot(staged.raw_bytes, stored);
        if self.stored_txid > 0 {
            // A lineage existed: continuity with it is broken.
            self.opts.status.add(&self.opts.status.lineage_breaks, 1);
        }
        self.next_txid = txid + 1;
        self.stored_txid = txid;
        self.last_time_us = time_us;
        self.last_ship = Instant::now();
        self.last_snapshot = (txid, time_us);
        self.uploaded_since_prune = true;
        self.closed.clear();
        let shipping = Shipping {
            source: src,
            lineage,
            link: staged.built.end_link,
        };
        self.enter(Phase::Shipping(Box::new(shipping)), why);
        Ok(())
    }

    /// One iteration: poll, ship when due, checkpoint when useful.
    pub async fn step(&mut self, force_ship: bool) -> anyhow::Result<()> {
        if self.phase.shipping().is_none() {
            let why = if matches!(self.phase, Phase::OverWalBound) {
                // Probe before reading the whole database for a snapshot.
                if self.retry_at.is_some_and(|t| Instant::now() < t) {
                    return Ok(());
                }
                if let Err(e) = self.store.list(layout::LINEAGES).await {
                    self.upload_failed(&anyhow::Error::new(e));
                    return Ok(());
                }
                self.failures = 0;
                self.retry_at = None;
                // Should the new lineage fail, the next step restarts "after an error".
                self.enter(Phase::Restarting, "the replica answers again");
                "the WAL outgrew max-wal-size while the replica was unreachable and was checkpointed"
            } else {
                // Restarting, fenced, or never started: the phase stays
                // until the new lineage is shipping.
                "restarting after an error"
            };
            self.new_lineage(None, why).await?;
        }
        let mut next = self.next_txid;
        // Every commit found by this poll is stamped at or after t0.
        let t0 = self.now_us().max(self.last_time_us);
        let Some(sh) = self.phase.shipping_mut() else {
            return Ok(());
        };
        // Commit times never go backwards, even if the clock does.
        let floor = self.last_time_us;
        let clock = self.opts.clock.clone();
        let src = &mut sh.source;
        // An idle look that `stat` shows to be idle skips the blocking calls
        // (each moves this task off its worker thread and back).
        let quiet = !force_ship && src.quiet();
        let polled = if quiet {
            Ok(())
        } else {
            blocking(|| src.poll(&mut next, &mut || clock.now_us().max(floor)))?
        };
        if !quiet {
            self.pace
                .pending(src.pending().iter().map(|p| (p.txid, p.bytes)));
        }
        if let Some(p) = src.pending().last() {
            self.last_time_us = self.last_time_us.max(p.time_us);
        }
        self.next_txid = next;
        if let Err(b) = polled {
            if b.verifiable && blocking(|| sh.source.verify_continuation())? {
                tracing::info!(db = %self.db(), reason = %b.reason, "WAL restarted; the database provably continues the replica, continuing the lineage");
                return Ok(());
            }
            self.enter(Phase::Restarting, &b.reason);
            return self.new_lineage(None, &b.reason).await;
        }
        let pending = sh.source.pending_len();
        // Half a poll of slack, so shipping keeps the sync interval rather
        // than slipping to the next poll tick.
        let due = force_ship
            || self.last_ship.elapsed() + self.opts.poll_interval / 2 >= self.opts.sync_interval;
        let backoff = self.retry_at.is_some_and(|t| Instant::now() < t);
        if pending > 0 && due && !backoff {
            match self.ship_pending().await {
                Ok(()) => {
                    self.failures = 0;
                    self.retry_at = None;
                    self.maybe_write_head(false).await;
                }
                Err(e) if crate::lease::is_held(&e) => return Err(e),
                Err(e) => {
                    self.upload_failed(&e);
                    self.release_wal_if_over_bound();
                    return Ok(());
                }
            }
        } else if pending > 0 && backoff {
            self.release_wal_if_over_bound();
        }
        if self.caught_up() && !backoff {
            self.after_ship(t0).await;
        }
        let db = self.db();
        // Released at the WAL bound, or a periodic snapshot found the
        // replicated state wrong: nothing to checkpoint from here.
        let Some(sh) = self.phase.shipping_mut() else {
            return Ok(());
        };
        let src = &mut sh.source;
        if src.pending_len() == 0 && src.log_frames() >= self.opts.checkpoint_frames {
            let src_frames = src.log_frames();
            let done = blocking(|| src.checkpoint())?;
            tracing::debug!(db = %db, done, "checkpoint attempt");
            self.checkpoint_misses = if done { 0 } else { self.checkpoint_misses + 1 };
            if done {
                self.opts.status.add(&self.opts.status.checkpoints, 1);
            }
            let far = src_frames >= self.opts.checkpoint_frames.saturating_mul(2);
            if self.checkpoint_misses >= 3 || (self.checkpoint_misses >= 1 && far) {
                // A steady writer always commits between our ship and our
                // lock: ship under the lock instead, or the WAL grows forever.
                self.checkpoint_locked().await?;
            }
        }
        let now = self.now_us();
        self.maybe_drill(now);
        let Some(sh) = self.phase.shipping_mut() else {
            return Ok(());
        };
        let src = &mut sh.source;
        if src.pending_len() == 0 && !quiet && blocking(|| src.yield_to_checkpointer())? {
            tracing::debug!(db = %db, "let the application's checkpoint run");
        }
        Ok(())
    }

    /// Hold the replica's lease before writing to it (fencing).
    async fn lease_ok(&mut self) -> anyhow::Result<()> {
        let now = self.now_us();
        self.lease.ensure(self.store.as_ref(), now).await
    }

    fn upload_failed(&mut self, e: &anyhow::Error) {
        self.opts.status.add(&self.opts.status.upload_errors, 1);
        self.failures += 1;
        let wait = retry::upload_backoff(self.failures);
        tracing::error!(db = %self.db(), replica = %self.store.describe(), error = format!("{e:#}"), retry_in = ?wait, "upload failed; commits stay in the WAL and will be retried");
        self.retry_at = Some(Instant::now() + wait);
    }

    /// While commits cannot be shipped, offsite's read lock keeps the
    /// application from checkpointing them away, so the WAL grows. Past
    /// `max_wal_bytes` that would end in a full disk: release the lock,
    /// checkpoint, and record that continuity is lost (a new lineage starts
    /// with a snapshot once the replica answers). Never blocks the application.
    fn release_wal_if_over_bound(&mut self) {
        let size = self.wal_size();
        if size <= self.opts.max_wal_bytes {
            return;
        }
        let unshipped = self
            .phase
            .shipping()
            .map(|s| s.source.pending_len())
            .unwrap_or(0);
        tracing::error!(db = %self.db(), replica = %self.opts.replica_name, wal_bytes = size, max_wal_bytes = self.opts.max_wal_bytes, unshipped_commits = unshipped, "the WAL reached max-wal-size while the replica cannot take commits: releasing it so the database can checkpoint. Continuity with the replica is LOST; a new snapshot (new lineage) is taken as soon as the replica is back");
        self.opts.status.add(&self.opts.status.wal_overflows, 1);
        // Drops the source (its read lock), the lineage and the windows.
        self.enter(
            Phase::OverWalBound,
            "the WAL reached max-wal-size while the replica cannot take commits",
        );
        self.closed.clear();
        let db = self.opts.db_path.clone();
        let engine = self.engine;
        match blocking(|| engine.release_log(&db)) {
            Ok(true) => tracing::info!(db = %self.db(), "WAL checkpointed and truncated"),
            Ok(false) => {
                tracing::warn!(db = %self.db(), "WAL checkpoint could not finish now (busy); the application's own checkpoints go on")
            }
            Err(e) => {
                tracing::warn!(db = %self.db(), error = format!("{e:#}"), "WAL checkpoint failed")
            }
        }
    }

    /// Checkpoint while holding the write lock across the last ship. The
    /// application's writers wait for one upload and one PASSIVE checkpoint.
    async fn checkpoint_locked(&mut self) -> anyhow::Result<()> {
        let Some(sh) = self.phase.shipping_mut() else {
            return Ok(());
        };
        let src = &mut sh.source;
        if !blocking(|| src.checkpoint_lock(Duration::from_millis(500)))? {
            return Ok(());
        }
        let res = async {
            let mut next = self.next_txid;
            let floor = self.last_time_us;
            // Shipping cannot end while the lock is held (only steps end it).
            let Some(sh) = self.phase.shipping_mut() else {
                return Ok(false);
            };
            let src = &mut sh.source;
            let clock = self.opts.clock.clone();
            let polled = blocking(|| src.poll(&mut next, &mut || clock.now_us().max(floor)))?;
            self.next_txid = next;
            self.pace
                .pending(src.pending().iter().map(|p| (p.txid, p.bytes)));
            if polled.is_err() {
                // Handled by the next step's poll.
                return Ok(false);
            }
            if let Some(p) = src.pending().last() {
                self.last_time_us = self.last_time_us.max(p.time_us);
            }
            // Writers wait while we hold the lock: ship only a little under it.
            let bytes: u64 = src.pending().iter().map(|p| p.bytes).sum();
            if bytes > LOCKED_SHIP_MAX_BYTES {
                return Ok(false);
            }
            // The application's writers wait meanwhile: a slow store must not
            // stall them. Give up the attempt (the commits stay pending; an
            // upload that did land is superseded by the next, see FORMAT.md).
            match tokio::time::timeout(LOCKED_SHIP_TIMEOUT, self.ship_pending()).await {
                Ok(r) => r?,
                Err(_) => {
                    if let Some(sh) = self.phase.shipping_mut() {
                        // The segment built for it never landed.
                        sh.source.settle(0, false);
                    }
                    tracing::debug!(db = %self.db(), "upload under the write lock too slow; checkpoint postponed");
                    return Ok(false);
                }
            }
            let Some(sh) = self.phase.shipping_mut() else {
                return Ok(false);
            };
            blocking(|| sh.source.checkpoint_run())
        }
        .await;
        let unlock = match self.phase.shipping_mut() {
            Some(sh) => blocking(|| sh.source.checkpoint_unlock()),
            // The source, and its lock with it, is gone.
            None => Ok(()),
        };
        let done = res?;
        unlock?;
        tracing::debug!(db = %self.db(), done, "checkpoint under the write lock");
        if done {
            self.checkpoint_misses = 0;
            self.opts.status.add(&self.opts.status.checkpoints, 1);
        }
        Ok(())
    }

    /// Ship every pending commit, in segments of bounded size.
    async fn ship_pending(&mut self) -> anyhow::Result<()> {
        self.lease_ok().await?;
        loop {
            let Some(sh) = self.phase.shipping_mut() else {
                return Ok(());
            };
            if sh.source.pending_len() == 0 {
                return Ok(());
            }
            let n = sh.source.batch_len(self.opts.max_segment_bytes);
            let staged = {
                let Shipping {
                    source,
                    lineage,
                    link,
                } = &mut *sh;
                let seal = &self.seal;
                let mut spool = Spool::new(self.opts.spool_dir.clone());
                let link = *link;
                blocking(|| {
                    let built = source.build_segment(n, link, lineage, seal, &mut spool)?;
                    Staged::segment(lineage, spool, built)
                })?
            };
            let stored = staged.body.len().await.unwrap_or(0);
            let lock = object_lock(&self.opts, self.opts.clock.now_us());
            let put = put_object(&self.store, &staged.key, staged.body.clone(), lock).await;
            match put {
                Ok(()) => {
                    sh.link = staged.built.end_link;
                    let closed = blocking(|| sh.source.settle(n, true));
                    let lineage = sh.lineage.clone();
                    self.closed
                        .extend(closed.into_iter().map(|w| (lineage.clone(), w)));
                    self.stored_txid = staged.built.last_txid;
                    self.last_ship = Instant::now();
                    self.uploaded_since_prune = true;
                    let st = &self.opts.status;
                    st.add(&st.segments, 1);
                    st.add(&st.raw_bytes, staged.raw_bytes);
                    st.add(&st.stored_bytes, stored);
                    st.last_upload_us.store(self.opts.clock.now_us(), Relaxed);
                    st.shipped_txid.store(self.stored_txid, Relaxed);
                    tracing::debug!(db = %self.db(), key = %staged.key, commits = n, raw_bytes = staged.raw_bytes, stored_bytes = stored, "segment uploaded");
                }
                Err(e) => {
                    sh.source.settle(n, false);
                    return Err(
                        anyhow::Error::new(e).context(format!("cannot upload {}", staged.key))
                    );
                }
            }
        }
    }

    /// Rewrite the signed head record (rollback detection, docs/FORMAT.md
    /// "Head record") when something newer was shipped, at most every
    /// `HEAD_INTERVAL` unless `force` (shutdown). A failure is logged: the
    /// record only helps detection, it never blocks shipping.
    async fn maybe_write_head(&mut self, force: bool) {
        let Some(lineage) = self.lineage().map(str::to_string) else {
            return;
        };
        let due = match self.head_written {
            None => true,
            Some((at, txid)) => {
                self.stored_txid > txid && (force || at.elapsed() >= crate::head::HEAD_INTERVAL)
            }
        };
        let Some(signer) = self.seal.binding.signer.clone() else {
            return;
        };
        if !due || self.stored_txid == 0 {
            return;
        }
        let rec = crate::head::HeadRecord::new(
            &self.seal.binding.replica,
            &lineage,
            self.stored_txid,
            self.last_time_us,
            &signer,
        );
        match crate::head::write(self.store.as_ref(), &rec).await {
            Ok(()) => self.head_written = Some((Instant::now(), self.stored_txid)),
            Err(e) => {
                tracing::warn!(db = %self.db(), replica = %self.opts.replica_name, error = %format!("{e:#}"), "could not write the head record")
            }
        }
    }

    /// The lineage being shipped to.
    pub fn lineage(&self) -> Option<&str> {
        self.phase.shipping().map(|s| s.lineage.as_str())
    }
}

/// The Object Lock retention for an object uploaded at `now_us`: it covers
/// the longest time a kept restore point can need it (the window, plus up
/// to one snapshot interval until the next base snapshot), plus a margin.
fn object_lock(opts: &Options, now_us: i64) -> Option<ObjectLock> {
    let mode = opts.object_lock?;
    let window = opts
        .retention
        .as_ref()
        .map(|p| p.retention)
        .unwrap_or_default();
    let hold = window + opts.snapshot_interval.unwrap_or_default() + opts.object_lock_margin;
    Some(ObjectLock {
        mode,
        retain_until_us: now_us + hold.as_micros() as i64,
    })
}
