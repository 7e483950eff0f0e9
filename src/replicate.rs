//! Replication of one database to one replica: source → segment → codec →
//! storage. The replica is the cursor: nothing is acknowledged (shipped
//! position advanced) before the object is durable in the store.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use tokio::sync::watch;

use crate::checksum::{Checksum, PageState};
use crate::clock::Clock;
use crate::codec::{Encryption, Envelope, EnvelopeMeta, ObjectKind, ObjectWriter};
use crate::compact::{Closed, Compactor};
use crate::layout::{self, Catalog, HeadObject};
use crate::segment::{
    CommitHead, SegmentHeader, SegmentWriter, SnapshotHeader, SnapshotWriter, PAYLOAD_SQLITE_PAGES,
};
use crate::source::sqlite::{Break, SqliteSource, WalPos};
use crate::storage::{Body, DynStorage, ObjectLock, StorageError};

/// Settings for replicating one database.
#[derive(Debug, Clone)]
pub struct Options {
    pub db_path: PathBuf,
    pub sync_interval: Duration,
    /// How often the WAL is read for new commits (commit times have this resolution).
    pub poll_interval: Duration,
    /// Checkpoint once the WAL holds this many frames and everything is shipped.
    pub checkpoint_frames: u32,
    /// Upper bound of page bytes in one segment (a bigger single transaction
    /// still goes into one segment, streamed through a spool file).
    pub max_segment_bytes: u64,
    /// Where segment/snapshot objects are staged before upload.
    pub spool_dir: PathBuf,
    /// How long shutdown may spend shipping what is pending.
    pub shutdown_timeout: Duration,
    /// The clock commit times and schedules read (tests inject one).
    pub clock: Clock,
    /// Window lengths of compaction levels 1.. (empty: no compaction).
    pub compaction_levels: Vec<Duration>,
    /// Take a new snapshot inside the lineage this long after the last one
    /// (if anything was committed since).
    pub snapshot_interval: Option<Duration>,
    /// Pruning after uploads (None: the replica is never pruned by the daemon).
    pub retention: Option<crate::retention::Policy>,
    /// How often pruning may run (it runs only after something was uploaded).
    pub prune_interval: Duration,
    /// Name of the replica, for logs.
    pub replica_name: String,
    /// S3 Object Lock: every upload is retained for the time it may be
    /// needed (retention window + snapshot interval) plus `object_lock_margin`.
    pub object_lock: Option<crate::storage::LockMode>,
    pub object_lock_margin: Duration,
    /// Restore drills: how often, and the identity they decrypt with (None
    /// for a plaintext replica). Drills only run when this is set.
    pub verify_interval: Option<Duration>,
    pub drill_identities: Option<crate::keys::Identities>,
    /// While the replica cannot take commits, offsite holds the WAL (no gap)
    /// up to this size; beyond it, it lets the WAL be checkpointed, records
    /// the loss of continuity and takes a new snapshot once the replica is back.
    pub max_wal_bytes: u64,
    /// Fencing (see `lease`): another shipper's lease blocks writing until it
    /// is this old without renewal; ours is renewed before uploads once
    /// older than `lease_renew`.
    pub lease_ttl: Duration,
    pub lease_renew: Duration,
    /// Live counters for metrics, readiness and `sync --wait`.
    pub status: std::sync::Arc<crate::status::ReplicaStatus>,
}

impl Options {
    /// Every setting at its default (`config::defaults`).
    pub fn new(db_path: PathBuf, spool_dir: PathBuf) -> Options {
        use crate::config::defaults;
        Options {
            db_path,
            sync_interval: defaults::SYNC_INTERVAL,
            poll_interval: Duration::from_millis(100),
            checkpoint_frames: defaults::CHECKPOINT_FRAMES,
            max_segment_bytes: 64 << 20,
            spool_dir,
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            clock: Clock::system(),
            compaction_levels: defaults::COMPACTION_LEVELS.to_vec(),
            snapshot_interval: Some(defaults::SNAPSHOT_INTERVAL),
            retention: None,
            prune_interval: defaults::PRUNE_INTERVAL,
            replica_name: String::new(),
            object_lock: None,
            object_lock_margin: defaults::OBJECT_LOCK_MARGIN,
            verify_interval: None,
            drill_identities: None,
            status: crate::status::ReplicaStatus::detached(),
            max_wal_bytes: defaults::MAX_WAL_BYTES,
            lease_ttl: Duration::from_secs(300),
            lease_renew: Duration::from_secs(60),
        }
    }
}

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

/// Objects up to this size are staged in memory, larger ones in a spool file.
const SPOOL_MEMORY_LIMIT: usize = 8 << 20;

/// A staging buffer that starts in memory and moves to a file when large.
struct Spool {
    dir: PathBuf,
    mem: Vec<u8>,
    file: Option<(tempfile::NamedTempFile, std::io::BufWriter<std::fs::File>)>,
}

impl Spool {
    fn new(dir: PathBuf) -> Spool {
        Spool {
            dir,
            mem: Vec::new(),
            file: None,
        }
    }

    fn into_body(self) -> anyhow::Result<(Body, Option<tempfile::NamedTempFile>)> {
        match self.file {
            None => Ok((Body::Bytes(Bytes::from(self.mem)), None)),
            Some((tmp, mut w)) => {
                w.flush()?;
                drop(w);
                Ok((Body::File(tmp.path().to_path_buf()), Some(tmp)))
            }
        }
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some((_, w)) = &mut self.file {
            let dir = &self.dir;
            return w.write(buf).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot write a spool file in {}: {e}", dir.display()),
                )
            });
        }
        if self.mem.len() + buf.len() > SPOOL_MEMORY_LIMIT {
            // The temp file is removed when dropped, on every path (Litestream #784).
            let tmp = tempfile::Builder::new()
                .prefix("offsite-spool-")
                .tempfile_in(&self.dir)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot create a spool file in {}: {e}", self.dir.display()),
                    )
                })?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.reopen()?);
            w.write_all(&self.mem).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot write a spool file in {}: {e}", self.dir.display()),
                )
            })?;
            self.mem = Vec::new();
            self.file = Some((tmp, w));
            return self.write(buf);
        }
        self.mem.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some((_, w)) => w.flush(),
            None => Ok(()),
        }
    }
}

/// A finished object ready for upload.
struct Staged {
    key: String,
    body: Body,
    _tmp: Option<tempfile::NamedTempFile>,
    raw_bytes: u64,
    /// Segments: the state checksum before the first commit and after each.
    prev: Option<Checksum>,
    sums: Vec<Checksum>,
}

pub struct Replicator {
    opts: Options,
    store: DynStorage,
    enc: Encryption,
    source: Option<SqliteSource>,
    lineage: Option<String>,
    next_txid: u64,
    /// Highest txid durable in the replica; a new lineage starts after it.
    stored_txid: u64,
    state: Option<PageState>,
    last_ship: Instant,
    failures: u32,
    retry_at: Option<Instant>,
    last_time_us: i64,
    checkpoint_misses: u32,
    compactor: Option<Compactor>,
    /// Closed compaction windows waiting for upload, with their lineage.
    closed: std::collections::VecDeque<(String, Closed)>,
    /// Txid and time of the newest snapshot of the current lineage.
    last_snapshot: (u64, i64),
    last_prune_us: i64,
    uploaded_since_prune: bool,
    prune_task: Option<tokio::task::JoinHandle<()>>,
    drill_task: Option<tokio::task::JoinHandle<()>>,
    last_drill_us: i64,
    /// The newest restore drill's outcome: (time it ran, result).
    drill: std::sync::Arc<std::sync::Mutex<Option<DrillRecord>>>,
    /// The WAL was released at `max-wal-size`: the next lineage starts only
    /// once the replica answers again.
    overflowed: bool,
    lease: crate::lease::Lease,
}

/// What the newest restore drill found.
#[derive(Debug, Clone)]
pub struct DrillRecord {
    pub ran_at_us: i64,
    pub ok: bool,
    pub newest_verified_txid: Option<u64>,
    pub newest_verified_time_us: Option<i64>,
    pub error: Option<String>,
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl Replicator {
    pub fn new(opts: Options, store: DynStorage, enc: Encryption) -> Replicator {
        Replicator {
            store,
            enc,
            source: None,
            lineage: None,
            next_txid: 1,
            stored_txid: 0,
            state: None,
            last_ship: Instant::now(),
            failures: 0,
            retry_at: None,
            last_time_us: 0,
            checkpoint_misses: 0,
            compactor: None,
            closed: Default::default(),
            last_snapshot: (0, 0),
            last_prune_us: 0,
            uploaded_since_prune: false,
            prune_task: None,
            drill_task: None,
            last_drill_us: 0,
            drill: Default::default(),
            overflowed: false,
            lease: crate::lease::Lease::new(
                &opts.db_path.display().to_string(),
                opts.lease_ttl,
                opts.lease_renew,
            ),
            opts,
        }
    }

    /// The newest restore drill's outcome, if one ran.
    pub fn last_drill(&self) -> Option<DrillRecord> {
        self.drill.lock().unwrap().clone()
    }

    /// Start a restore drill in the background when one is due.
    fn maybe_drill(&mut self, now: i64) {
        let Some(iv) = self.opts.verify_interval else {
            return;
        };
        if self.drill_task.as_ref().is_some_and(|t| !t.is_finished())
            || now - self.last_drill_us < iv.as_micros() as i64
            || self.lineage.is_none()
        {
            return;
        }
        self.last_drill_us = now;
        let store = self.store.clone();
        let ids = self.opts.drill_identities.clone();
        let out = self.drill.clone();
        let db = self.db();
        let replica = self.opts.replica_name.clone();
        let status = self.opts.status.clone();
        self.drill_task = Some(tokio::spawn(tracing::Instrument::in_current_span(
            async move {
                let r = crate::verify::drill(store.as_ref(), ids.as_ref(), 1, rand::random()).await;
                let rec = match r {
                    Ok(d) => DrillRecord {
                        ran_at_us: now,
                        ok: d.ok,
                        newest_verified_txid: d.newest_verified_txid,
                        newest_verified_time_us: d.newest_verified_time_us,
                        error: d.samples.iter().find_map(|s| s.error.clone()),
                    },
                    Err(e) => DrillRecord {
                        ran_at_us: now,
                        ok: false,
                        newest_verified_txid: None,
                        newest_verified_time_us: None,
                        error: Some(format!("{e:#}")),
                    },
                };
                status.drill_ran_us.store(now, Relaxed);
                if let (true, Some(t), Some(x)) = (
                    rec.ok,
                    rec.newest_verified_time_us,
                    rec.newest_verified_txid,
                ) {
                    status.verified_time_us.store(t, Relaxed);
                    status.verified_txid.store(x, Relaxed);
                }
                if !rec.ok {
                    status.add(&status.drill_failures, 1);
                }
                if rec.ok {
                    tracing::info!(%db, %replica, txid = rec.newest_verified_txid, "restore drill passed: the newest point restores and passes integrity_check");
                } else {
                    tracing::error!(%db, %replica, error = rec.error.as_deref().unwrap_or(""), "restore drill FAILED: the replica does not restore");
                }
                *out.lock().unwrap() = Some(rec);
            },
        )));
    }

    fn now_us(&self) -> i64 {
        self.opts.clock.now_us()
    }

    /// The Object Lock retention for an object uploaded now: it covers the
    /// longest time a kept restore point can need it (the window, plus up to
    /// one snapshot interval until the next base snapshot), plus a margin.
    fn lock(&self) -> Option<ObjectLock> {
        let mode = self.opts.object_lock?;
        let window = self
            .opts
            .retention
            .as_ref()
            .map(|p| p.retention)
            .unwrap_or_default();
        let hold =
            window + self.opts.snapshot_interval.unwrap_or_default() + self.opts.object_lock_margin;
        Some(ObjectLock {
            mode,
            retain_until_us: self.now_us() + hold.as_micros() as i64,
        })
    }

    fn reset_compactor(&mut self) {
        let ps = self.source.as_ref().map(|s| s.page_size()).unwrap_or(4096) as usize;
        self.compactor = Some(Compactor::new(
            &self.opts.compaction_levels,
            ps,
            self.opts.spool_dir.clone(),
        ));
    }

    fn db(&self) -> String {
        self.opts.db_path.display().to_string()
    }

    /// Replicate until `shutdown` turns true, then ship what is pending.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let status = self.opts.status.clone();
        let r = self.run_inner(&mut shutdown).await;
        if let Err(e) = &r {
            *status.failed.lock().unwrap() = Some(format!("{e:#}"));
        }
        r
    }

    async fn run_inner(mut self, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
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
            self.opts.status.waiting_for_db.store(true, Relaxed);
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
            self.opts.status.waiting_for_db.store(false, Relaxed);
        }
        // An unreachable replica is retried for as long as it takes; other
        // replicas of the same database are separate tasks and go on.
        let mut wait = Duration::from_secs(1);
        loop {
            match self.start().await {
                Ok(()) => break,
                Err(e) if crate::lease::is_held(&e) => {
                    tracing::error!(db = %self.db(), replica = %self.opts.replica_name, url = %self.store.describe(), error = format!("{e:#}"), "not writing to this replica");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        bail!("{e:#}");
                    }
                    self.source = None;
                }
                Err(e) if is_unavailable(&e) => {
                    self.opts.status.add(&self.opts.status.upload_errors, 1);
                    tracing::error!(db = %self.db(), replica = %self.opts.replica_name, url = %self.store.describe(), error = format!("{e:#}"), retry_in = ?wait, "replica unreachable; commits stay in the WAL until it is back");
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
                    self.source = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.opts.status.running.store(true, Relaxed);
        self.publish();
        let mut tick = tokio::time::interval(self.opts.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sync_rx = self.opts.status.sync_requests();
        let mut synced = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => {}
                _ = sync_rx.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
            // Read before the step: the step's poll sees every commit made
            // before the request.
            let requested = *sync_rx.borrow_and_update();
            let force = requested > synced;
            if force {
                // An explicit request skips the upload backoff once.
                self.retry_at = None;
            }
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
                    self.source = None;
                    self.lineage = None;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Err(e) => {
                    // Local errors (I/O on the database, lost read lock): start over
                    // with a fresh lineage rather than risk a wrong replica.
                    tracing::error!(db = %self.db(), error = format!("{e:#}"), "replication step failed; will take a new snapshot");
                    self.source = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            self.publish();
        }
        let requested = *sync_rx.borrow();
        let status = self.opts.status.clone();
        let r = self.shutdown().await;
        if r.is_ok() {
            status.sync_satisfied(requested);
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
        self.source.as_ref().is_some_and(|s| s.pending().is_empty()) && self.lineage.is_some()
    }

    /// Refresh the gauges read by `/metrics` and `/readyz`.
    fn publish(&self) {
        let st = &self.opts.status;
        st.shipped_txid.store(self.stored_txid, Relaxed);
        if let Some(src) = self.source.as_ref() {
            let since = src.pending().first().map(|p| p.time_us).unwrap_or(0);
            st.pending_since_us.store(since, Relaxed);
        }
        st.wal_bytes.store(self.wal_size(), Relaxed);
    }

    /// Size of the database's `-wal` file (0 if there is none).
    fn wal_size(&self) -> u64 {
        let mut wal = self.opts.db_path.clone().into_os_string();
        wal.push("-wal");
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0)
    }

    async fn shutdown(mut self) -> anyhow::Result<()> {
        tracing::info!(db = %self.db(), "shutting down: shipping pending commits");
        let deadline = Instant::now() + self.opts.shutdown_timeout;
        loop {
            self.retry_at = None;
            match self.step(true).await {
                Ok(()) if self.source.as_ref().is_some_and(|s| s.pending().is_empty()) => {
                    self.flush_compaction().await;
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
        let src = blocking(|| SqliteSource::open(&self.opts.db_path))?;
        self.source = Some(src);
        let Some(l) = catalog.newest_lineage() else {
            return self.new_lineage("the replica is empty").await;
        };
        let head = l.head().expect("lineage with objects");
        let env = read_envelope(&self.store, head.key()).await?;
        if env.encrypted != matches!(self.enc, Encryption::Age(_)) {
            bail!(
                "the replica at {} holds {} objects but offsite is configured {}; refusing to mix encrypted and plaintext backups in one replica (use another prefix, or fix the encryption settings)",
                self.store.describe(),
                if env.encrypted { "encrypted" } else { "plaintext" },
                if env.encrypted { "without encryption" } else { "with age encryption" },
            );
        }
        match self.try_resume(&l.id, &head, &env.meta)? {
            Ok(()) => {
                self.last_snapshot = l
                    .snapshots
                    .last()
                    .map(|s| (s.txid, s.time_us))
                    .unwrap_or((0, 0));
                self.last_time_us = self.last_time_us.max(head.last_time_us());
                self.reset_compactor();
                Ok(())
            }
            Err(b) => self.new_lineage(&b.reason).await,
        }
    }

    fn try_resume(
        &mut self,
        lineage: &str,
        head: &HeadObject,
        meta: &EnvelopeMeta,
    ) -> anyhow::Result<Result<(), Break>> {
        let (resume_at, tag) = (meta.resume_at, meta.resume_tag.as_str());
        // Find the local WAL position with the replica's frame count, then
        // prove it (and the database state there) against the tag.
        let src = self.source.as_mut().unwrap();
        let candidates = blocking(|| candidate_positions(src))?;
        for pos in candidates
            .into_iter()
            .filter(|p| p.frames as u64 == resume_at)
        {
            let r = blocking(|| src.resume(&pos, |p, ck| p.resume_tag(ck) == tag))?;
            if let Ok(state) = r {
                tracing::info!(db = %self.opts.db_path.display(), lineage, txid = head.last_txid(), frames = pos.frames, "resuming replication");
                self.state = Some(state);
                self.lineage = Some(lineage.to_string());
                return Ok(Ok(()));
            }
        }
        // The WAL offsite shipped from is gone (typically: the application
        // closed last, so SQLite checkpointed and deleted it). If the database
        // file alone is still exactly the replica's newest state, continue
        // from the start of the current WAL: whatever it holds was written on
        // top of that state.
        let start = WalPos {
            page_size: src.page_size(),
            salt1: 0,
            salt2: 0,
            ckpt_seq: 0,
            frames: 0,
            cksum: (0, 0),
        };
        let want = meta.state_tag.as_str();
        let untouched = src.wal_untouched_by_checkpoints();
        if !untouched {
            return Ok(Err(Break::hard(
                "the WAL offsite shipped from is gone and the current one was already checkpointed",
            )));
        }
        if let Ok(state) = blocking(|| src.resume(&start, |_, ck| ck.state_tag() == want))? {
            tracing::info!(db = %self.opts.db_path.display(), lineage, txid = head.last_txid(), "resuming replication: the database file is the replica's newest state");
            self.state = Some(state);
            self.lineage = Some(lineage.to_string());
            return Ok(Ok(()));
        }
        Ok(Err(Break::hard(
            "the local database is not at the replica's newest state (the WAL was checkpointed or changed while offsite was not running)",
        )))
    }

    async fn new_lineage(&mut self, why: &str) -> anyhow::Result<()> {
        self.lease_ok().await?;
        let _permit = SNAPSHOT_PERMITS.acquire().await?;
        // Txids observed but never shipped named no stored state: reuse them,
        // so the new lineage continues right after the highest stored txid.
        let txid = self.stored_txid + 1;
        let lineage = layout::new_lineage_id(txid);
        tracing::warn!(db = %self.db(), replica = %self.opts.replica_name, %lineage, txid, reason = why, "starting a new lineage with a snapshot");
        if self.source.is_none() {
            self.source = Some(blocking(|| SqliteSource::open(&self.opts.db_path))?);
        }
        let floor = self.last_time_us;
        let enc = self.enc.clone();
        let spool_dir = self.opts.spool_dir.clone();
        let clock = self.opts.clock.clone();
        let src = self.source.as_mut().unwrap();
        let (staged, state, time_us) = blocking(|| -> anyhow::Result<_> {
            let view = src.snapshot_begin()?;
            // Stamped after the state was fixed: it holds no later commit.
            let time_us = clock.now_us().max(floor);
            let (staged, st) =
                build_snapshot(src, &view, &lineage, txid, time_us, &enc, spool_dir)?;
            Ok((staged, st, time_us))
        })?;
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
        self.state = Some(state);
        self.lineage = Some(lineage);
        self.next_txid = txid + 1;
        self.stored_txid = txid;
        self.last_time_us = time_us;
        self.last_ship = Instant::now();
        self.last_snapshot = (txid, time_us);
        self.uploaded_since_prune = true;
        self.closed.clear();
        self.reset_compactor();
        Ok(())
    }

    /// A new snapshot inside the current lineage, of the replica's newest
    /// state (everything shipped), so restores start from a recent full copy
    /// and older history can be pruned. Its state checksum must equal the
    /// replicated state's: a mismatch is reported and starts a new lineage.
    async fn snapshot_in_lineage(&mut self) -> anyhow::Result<()> {
        self.lease_ok().await?;
        let _permit = SNAPSHOT_PERMITS.acquire().await?;
        let txid = self.stored_txid;
        let lineage = self.lineage.clone().unwrap();
        let floor = self.last_time_us;
        let enc = self.enc.clone();
        let spool_dir = self.opts.spool_dir.clone();
        let clock = self.opts.clock.clone();
        let want = self.state.as_ref().unwrap().checksum();
        let src = self.source.as_mut().unwrap();
        let built = blocking(|| -> anyhow::Result<_> {
            let Some(view) = src.shipped_view()? else {
                return Ok(None);
            };
            let time_us = clock.now_us().max(floor);
            let (staged, st) =
                build_snapshot(src, &view, &lineage, txid, time_us, &enc, spool_dir)?;
            Ok(Some((staged, st.checksum(), time_us)))
        })?;
        let Some((staged, got, time_us)) = built else {
            return Ok(());
        };
        if got != want {
            self.source = None;
            self.lineage = None;
            bail!("the database state at txid {txid} (checksum {got}) differs from the replicated state ({want}); this is a bug, please report it");
        }
        let stored = staged.body.len().await?;
        put_object(&self.store, &staged.key, staged.body.clone(), self.lock())
            .await
            .with_context(|| format!("cannot upload {}", staged.key))?;
        tracing::info!(db = %self.db(), replica = %self.opts.replica_name, key = %staged.key, txid, raw_bytes = staged.raw_bytes, stored_bytes = stored, "periodic snapshot uploaded");
        self.count_snapshot(staged.raw_bytes, stored);
        self.last_snapshot = (txid, time_us);
        self.last_time_us = self.last_time_us.max(time_us);
        self.uploaded_since_prune = true;
        Ok(())
    }

    /// One iteration: poll, ship when due, checkpoint when useful.
    pub async fn step(&mut self, force_ship: bool) -> anyhow::Result<()> {
        if self.source.is_none() || self.lineage.is_none() {
            let why = if self.overflowed {
                // Probe before reading the whole database for a snapshot.
                if self.retry_at.is_some_and(|t| Instant::now() < t) {
                    return Ok(());
                }
                if let Err(e) = self.store.list(layout::LINEAGES).await {
                    self.upload_failed(&anyhow::Error::new(e));
                    return Ok(());
                }
                self.overflowed = false;
                self.failures = 0;
                self.retry_at = None;
                "the WAL outgrew max-wal-size while the replica was unreachable and was checkpointed"
            } else {
                "restarting after an error"
            };
            self.source = None;
            self.new_lineage(why).await?;
        }
        let mut next = self.next_txid;
        // Every commit found by this poll is stamped at or after t0.
        let t0 = self.now_us().max(self.last_time_us);
        let src = self.source.as_mut().unwrap();
        // Commit times never go backwards, even if the clock does.
        let floor = self.last_time_us;
        let clock = self.opts.clock.clone();
        let polled = blocking(|| src.poll(&mut next, || clock.now_us().max(floor)))?;
        if let Some(p) = src.pending().last() {
            self.last_time_us = self.last_time_us.max(p.time_us);
        }
        self.next_txid = next;
        if let Err(b) = polled {
            if b.verifiable {
                let src = self.source.as_mut().unwrap();
                let state = self.state.as_ref().unwrap();
                if blocking(|| src.verify_continuation(state))? {
                    tracing::info!(db = %self.db(), reason = %b.reason, "WAL restarted; the database provably continues the replica, continuing the lineage");
                    return Ok(());
                }
            }
            self.source = None;
            self.lineage = None;
            return self.new_lineage(&b.reason).await;
        }
        let pending = self.source.as_ref().unwrap().pending().len();
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
            if self.source.is_none() {
                return Ok(());
            }
        }
        if self.source.as_ref().unwrap().pending().is_empty() && !backoff {
            self.after_ship(t0).await;
        }
        let db = self.db();
        let src = self.source.as_mut().unwrap();
        if src.pending().is_empty() && src.wal_frames() >= self.opts.checkpoint_frames {
            let src_frames = src.wal_frames();
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
        let src = self.source.as_mut().unwrap();
        if src.pending().is_empty() && blocking(|| src.yield_to_checkpointer())? {
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
        // 1, 2, 4 … 30 s: after a long outage the next attempt is never
        // more than 30 s away.
        let wait = Duration::from_millis((500 * 2u64.pow(self.failures.min(6))).min(30_000));
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
        let unshipped = self.source.as_ref().map(|s| s.pending().len()).unwrap_or(0);
        tracing::error!(db = %self.db(), replica = %self.opts.replica_name, wal_bytes = size, max_wal_bytes = self.opts.max_wal_bytes, unshipped_commits = unshipped, "the WAL reached max-wal-size while the replica cannot take commits: releasing it so the database can checkpoint. Continuity with the replica is LOST; a new snapshot (new lineage) is taken as soon as the replica is back");
        self.opts.status.add(&self.opts.status.wal_overflows, 1);
        self.source = None;
        self.lineage = None;
        self.state = None;
        self.overflowed = true;
        self.closed.clear();
        self.reset_compactor();
        let db = self.opts.db_path.clone();
        match blocking(|| crate::source::sqlite::checkpoint_truncate(&db)) {
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
        let src = self.source.as_mut().unwrap();
        if !blocking(|| src.checkpoint_lock(Duration::from_millis(500)))? {
            return Ok(());
        }
        let res = async {
            let mut next = self.next_txid;
            let floor = self.last_time_us;
            let src = self.source.as_mut().unwrap();
            let clock = self.opts.clock.clone();
            let polled = blocking(|| src.poll(&mut next, || clock.now_us().max(floor)))?;
            self.next_txid = next;
            if polled.is_err() {
                // Handled by the next step's poll.
                return Ok(false);
            }
            if let Some(p) = src.pending().last() {
                self.last_time_us = self.last_time_us.max(p.time_us);
            }
            // Writers wait while we hold the lock: ship only a little under it.
            let ps = src.page_size() as u64;
            let bytes: u64 = src
                .pending()
                .iter()
                .map(|p| p.commit.frames.len() as u64 * ps)
                .sum();
            if bytes > LOCKED_SHIP_MAX_BYTES {
                return Ok(false);
            }
            // The application's writers wait meanwhile: a slow store must not
            // stall them. Give up the attempt (the commits stay pending; an
            // upload that did land is superseded by the next, see FORMAT.md).
            match tokio::time::timeout(LOCKED_SHIP_TIMEOUT, self.ship_pending()).await {
                Ok(r) => r?,
                Err(_) => {
                    if let Some(st) = self.state.as_mut() {
                        st.rollback();
                    }
                    tracing::debug!(db = %self.db(), "upload under the write lock too slow; checkpoint postponed");
                    return Ok(false);
                }
            }
            let src = self.source.as_mut().unwrap();
            blocking(|| src.checkpoint_run())
        }
        .await;
        let src = self.source.as_mut().unwrap();
        let unlock = blocking(|| src.checkpoint_unlock());
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
        while !self.source.as_ref().unwrap().pending().is_empty() {
            let n = self.next_batch();
            let staged = {
                let src = self.source.as_mut().unwrap();
                let state = self.state.as_mut().unwrap();
                let lineage = self.lineage.as_deref().unwrap();
                let enc = &self.enc;
                let spool = self.opts.spool_dir.clone();
                state.begin();
                match blocking(|| build_segment(src, n, state, lineage, enc, spool)) {
                    Ok(s) => s,
                    Err(e) => {
                        state.rollback();
                        return Err(e);
                    }
                }
            };
            let stored = staged.body.len().await.unwrap_or(0);
            let put = put_object(&self.store, &staged.key, staged.body.clone(), self.lock()).await;
            let state = self.state.as_mut().unwrap();
            match put {
                Ok(()) => {
                    state.commit();
                    self.fold(n, &staged);
                    let src = self.source.as_mut().unwrap();
                    self.stored_txid = src.pending()[n - 1].txid;
                    src.mark_shipped(n);
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
                    state.rollback();
                    return Err(
                        anyhow::Error::new(e).context(format!("cannot upload {}", staged.key))
                    );
                }
            }
        }
        Ok(())
    }

    /// Fold the first `n` pending commits (just uploaded as `staged`) into
    /// the open compaction windows. Compaction only speeds restores up: on a
    /// local error the windows are dropped and restores of that range read
    /// level-0 segments.
    fn fold(&mut self, n: usize, staged: &Staged) {
        let (Some(c), Some(src), Some(lineage)) = (
            self.compactor.as_mut(),
            self.source.as_ref(),
            self.lineage.as_ref(),
        ) else {
            return;
        };
        if !c.enabled() {
            return;
        }
        let res = blocking(|| -> anyhow::Result<()> {
            let mut prev = staged.prev.expect("segment");
            let mut buf = vec![0u8; src.page_size() as usize];
            for (p, ck) in src.pending()[..n].iter().zip(&staged.sums) {
                for closed in c.close_due(p.time_us)? {
                    self.closed.push_back((lineage.clone(), closed));
                }
                c.begin_commit(p.txid, p.time_us, prev)?;
                for (pgno, idx) in p.page_frames() {
                    src.read_frame(idx, &mut buf)?;
                    c.put_page(pgno, &buf)?;
                }
                c.end_commit(p.commit.db_pages, *ck);
                prev = *ck;
            }
            Ok(())
        });
        if let Err(e) = res {
            tracing::warn!(db = %self.opts.db_path.display(), error = format!("{e:#}"), "compaction window dropped after a local error; restores of that range read level-0 segments");
            c.reset();
        }
    }

    /// Work done when everything is shipped: close compaction windows that
    /// are over, upload compacted segments, take a periodic snapshot, prune.
    /// Failures here never stop shipping; they are logged and retried.
    async fn after_ship(&mut self, t0: i64) {
        if let (Some(c), Some(lineage)) = (self.compactor.as_mut(), self.lineage.as_ref()) {
            match c.close_due(t0) {
                Ok(v) => self
                    .closed
                    .extend(v.into_iter().map(|w| (lineage.clone(), w))),
                Err(e) => {
                    tracing::warn!(db = %self.opts.db_path.display(), error = %e, "compaction window dropped after a local error");
                    c.reset();
                }
            }
        }
        while let Some((lineage, w)) = self.closed.pop_front() {
            match self.upload_closed(&lineage, &w).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(db = %self.db(), replica = %self.opts.replica_name, error = format!("{e:#}"), "compacted segment upload failed; will retry");
                    self.closed.push_front((lineage, w));
                    // Bounded: the oldest windows are given up first.
                    while self.closed.len() > 32 {
                        self.closed.pop_front();
                    }
                    break;
                }
            }
        }
        let now = self.now_us();
        if let Some(iv) = self.opts.snapshot_interval {
            let due = now - self.last_snapshot.1 >= iv.as_micros() as i64;
            if due && self.stored_txid > self.last_snapshot.0 && self.lineage.is_some() {
                if let Err(e) = self.snapshot_in_lineage().await {
                    tracing::error!(db = %self.db(), replica = %self.opts.replica_name, error = format!("{e:#}"), "periodic snapshot failed; will retry");
                    // Retry after a tenth of the interval, not on every step.
                    self.last_snapshot.1 = now - (iv.as_micros() as i64) * 9 / 10;
                }
            }
        }
        self.maybe_prune(now);
    }

    /// At shutdown: write the open compaction windows as they are (a
    /// compacted segment may cover part of a window; restore plans only
    /// need objects to tile the txid line), so they are not lost.
    async fn flush_compaction(&mut self) {
        if let (Some(c), Some(lineage)) = (self.compactor.as_mut(), self.lineage.as_ref()) {
            if let Ok(v) = c.close_due(i64::MAX) {
                self.closed
                    .extend(v.into_iter().map(|w| (lineage.clone(), w)));
            }
        }
        while let Some((lineage, w)) = self.closed.pop_front() {
            if let Err(e) = self.upload_closed(&lineage, &w).await {
                tracing::warn!(db = %self.db(), replica = %self.opts.replica_name, error = format!("{e:#}"), "compacted segment not uploaded at shutdown; restores of that range read level-0 segments");
                break;
            }
        }
    }

    async fn upload_closed(&mut self, lineage: &str, w: &Closed) -> anyhow::Result<()> {
        self.lease_ok().await?;
        let enc = self.enc.clone();
        let spool = Spool::new(self.opts.spool_dir.clone());
        let key = layout::segment_key(
            lineage,
            w.level,
            w.first_txid(),
            w.last_txid(),
            w.last_time_us(),
        );
        let (body, _tmp) = blocking(|| -> anyhow::Result<_> {
            let ck = w.end_checksum();
            let env = Envelope::new(
                ObjectKind::Segment,
                &enc,
                EnvelopeMeta {
                    lineage: lineage.to_string(),
                    first_txid: w.first_txid(),
                    last_txid: w.last_txid(),
                    // Compacted segments are never a resume point.
                    resume_at: 0,
                    resume_tag: ck.state_tag(),
                    state_tag: ck.state_tag(),
                },
            );
            let header = w.header(lineage, env.blake3_hex());
            let ow = ObjectWriter::new(spool, &env, &enc)?;
            let spool = w.write_body(ow, &header)?.finish()?;
            spool.into_body()
        })?;
        put_object(&self.store, &key, body, self.lock())
            .await
            .with_context(|| format!("cannot upload {key}"))?;
        tracing::debug!(db = %self.db(), %key, level = w.level, raw_bytes = w.raw_bytes(), "compacted segment uploaded");
        self.uploaded_since_prune = true;
        Ok(())
    }

    /// Wait for a background prune or drill to finish (tests and shutdown).
    pub async fn wait_maintenance(&mut self) {
        if let Some(t) = self.prune_task.take() {
            let _ = t.await;
        }
        if let Some(t) = self.drill_task.take() {
            let _ = t.await;
        }
    }

    /// The lineage being shipped to.
    pub fn lineage(&self) -> Option<&str> {
        self.lineage.as_deref()
    }

    /// Prune in the background, at most once per `prune_interval`, and only
    /// after something was uploaded (an idle replica costs no request).
    fn maybe_prune(&mut self, now: i64) {
        let Some(policy) = self.opts.retention.clone() else {
            return;
        };
        if self.prune_task.as_ref().is_some_and(|t| !t.is_finished()) || !self.lease.held() {
            return;
        }
        if !self.uploaded_since_prune
            || now - self.last_prune_us < self.opts.prune_interval.as_micros() as i64
        {
            return;
        }
        self.uploaded_since_prune = false;
        self.last_prune_us = now;
        let store = self.store.clone();
        let db = self.db();
        let replica = self.opts.replica_name.clone();
        self.prune_task = Some(tokio::spawn(tracing::Instrument::in_current_span(
            async move {
                match crate::retention::prune(store.as_ref(), &policy, now, false).await {
                    Ok(r) => {
                        tracing::info!(%db, %replica, deleted = r.deleted.len(), kept = r.kept, locked = r.locked.len(), bytes_freed = r.bytes_deleted, requests = %requests_json(store.as_ref()), "pruned the replica")
                    }
                    Err(e) => {
                        tracing::error!(%db, %replica, error = format!("{e:#}"), "pruning failed; will retry after the next upload")
                    }
                }
            },
        )));
    }

    /// How many pending commits go into the next segment.
    fn next_batch(&self) -> usize {
        let src = self.source.as_ref().unwrap();
        let ps = src.page_size() as u64;
        let mut bytes = 0u64;
        let mut n = 0;
        let window = |t| self.compactor.as_ref().and_then(|c| c.l1_window(t));
        let first_window = src.pending().first().and_then(|p| window(p.time_us));
        for p in src.pending() {
            let b = p.commit.frames.len() as u64 * ps;
            if n > 0 && (bytes + b > self.opts.max_segment_bytes || n >= 100_000) {
                break;
            }
            // A level-0 segment never straddles a level-1 compaction window.
            if n > 0 && window(p.time_us) != first_window {
                break;
            }
            bytes += b;
            n += 1;
        }
        n
    }
}

async fn read_envelope(store: &DynStorage, key: &str) -> anyhow::Result<Envelope> {
    let head = with_retries("read the newest object", || store.get_range(key, 0, 4096)).await?;
    Envelope::read_from(&mut &head[..]).with_context(|| format!("object {key} is damaged"))
}

/// Positions the local WAL offers for resuming, newest first.
fn candidate_positions(src: &mut SqliteSource) -> anyhow::Result<Vec<WalPos>> {
    let mut v = src.local_positions()?;
    v.reverse();
    Ok(v)
}

/// Build a snapshot object of `view` in two passes: the checksum first (the
/// envelope's resume tag needs it), then the pages, streamed.
fn build_snapshot(
    src: &mut SqliteSource,
    view: &crate::source::sqlite::SnapshotView,
    lineage: &str,
    txid: u64,
    time_us: i64,
    enc: &Encryption,
    spool_dir: PathBuf,
) -> anyhow::Result<(Staged, PageState)> {
    let page_size = src.page_size();
    let mut st = PageState::new(page_size as usize);
    src.snapshot_read(view, |pgno, page| {
        st.set_page(pgno, page);
        Ok(())
    })?;
    st.resize(view.db_pages);
    let ck = st.checksum();
    let env = Envelope::new(
        ObjectKind::Snapshot,
        enc,
        EnvelopeMeta {
            lineage: lineage.to_string(),
            first_txid: txid,
            last_txid: txid,
            resume_at: view.pos.frames as u64,
            resume_tag: view.pos.resume_tag(&ck),
            state_tag: ck.state_tag(),
        },
    );
    let header = SnapshotHeader {
        kind: "snapshot".into(),
        payload: PAYLOAD_SQLITE_PAGES.into(),
        lineage: lineage.to_string(),
        page_size,
        envelope_blake3: env.blake3_hex(),
        txid,
        time_us,
        db_pages: view.db_pages,
    };
    let ow = ObjectWriter::new(Spool::new(spool_dir), &env, enc)?;
    let mut sw = SnapshotWriter::new(ow, &header)?;
    src.snapshot_read(view, |_, page| Ok(sw.write_page(page)?))?;
    let (ow, state2) = sw.finish()?;
    if !src.wal_unchanged()? {
        bail!("the WAL was restarted while the snapshot was read; retrying");
    }
    if state2.checksum() != ck {
        bail!("the database changed under the snapshot's read lock (checksum {ck} vs {}); this is a bug, please report it", state2.checksum());
    }
    let spool = ow.finish()?;
    let (body, tmp) = spool.into_body()?;
    Ok((
        Staged {
            key: layout::snapshot_key(lineage, txid, time_us),
            body,
            _tmp: tmp,
            raw_bytes: view.db_pages as u64 * page_size as u64,
            prev: None,
            sums: Vec::new(),
        },
        st,
    ))
}

fn build_segment(
    src: &mut SqliteSource,
    n: usize,
    state: &mut PageState,
    lineage: &str,
    enc: &Encryption,
    spool_dir: PathBuf,
) -> anyhow::Result<Staged> {
    let commits = &src.pending()[..n];
    let ps = src.page_size() as usize;
    let prev = state.checksum();
    let mut buf = vec![0u8; ps];
    // Pass 1: per-commit state checksums (the state is journaled by the caller).
    let mut sums: Vec<Checksum> = Vec::with_capacity(n);
    let mut raw = 0u64;
    let frames: Vec<Vec<(u32, u32)>> = commits.iter().map(|c| c.page_frames()).collect();
    for (c, pages) in commits.iter().zip(&frames) {
        for &(pgno, idx) in pages {
            src.read_frame(idx, &mut buf)?;
            state.set_page(pgno, &buf);
            raw += ps as u64;
        }
        state.resize(c.commit.db_pages);
        sums.push(state.checksum());
    }
    let first = commits[0].txid;
    let last = commits[n - 1].txid;
    let pos = src.position_after(n);
    let env = Envelope::new(
        ObjectKind::Segment,
        enc,
        EnvelopeMeta {
            lineage: lineage.to_string(),
            first_txid: first,
            last_txid: last,
            resume_at: pos.frames as u64,
            resume_tag: pos.resume_tag(sums.last().unwrap()),
            state_tag: sums.last().unwrap().state_tag(),
        },
    );
    let header = SegmentHeader {
        kind: "segment".into(),
        payload: PAYLOAD_SQLITE_PAGES.into(),
        lineage: lineage.to_string(),
        page_size: ps as u32,
        envelope_blake3: env.blake3_hex(),
        first_txid: first,
        last_txid: last,
        commit_count: n as u32,
        prev_checksum: prev.to_hex(),
        level: 0,
        truncate_to: None,
    };
    let ow = ObjectWriter::new(Spool::new(spool_dir), &env, enc)?;
    let mut sw = SegmentWriter::new(ow, &header)?;
    // Pass 2: write the records.
    for ((c, ck), pages) in commits.iter().zip(&sums).zip(&frames) {
        sw.begin_commit(CommitHead {
            txid: c.txid,
            time_us: c.time_us,
            db_pages: c.commit.db_pages,
            records: pages.len() as u32,
        })?;
        for &(pgno, idx) in pages {
            src.read_frame(idx, &mut buf)?;
            sw.write_record(pgno, &buf)?;
        }
        sw.end_commit(ck)?;
    }
    let t_last = commits[n - 1].time_us;
    let spool = sw.finish()?.finish()?;
    // The pages are valid only if the WAL was not restarted while we read them.
    if !src.wal_unchanged()? {
        bail!("the WAL was restarted while its frames were being read");
    }
    let (body, tmp) = spool.into_body()?;
    Ok(Staged {
        key: layout::segment_key(lineage, 0, first, last, t_last),
        body,
        _tmp: tmp,
        raw_bytes: raw,
        prev: Some(prev),
        sums,
    })
}

async fn put_object(
    store: &DynStorage,
    key: &str,
    body: Body,
    lock: Option<ObjectLock>,
) -> Result<(), StorageError> {
    match lock {
        Some(l) => store.put_locked(key, body, l).await,
        None => store.put(key, body).await,
    }
}

/// Requests made to the store since the process started, by kind.
fn requests_json(store: &dyn crate::storage::Storage) -> String {
    serde_json::to_string(&store.request_counts()).unwrap_or_default()
}

fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StorageError>(),
            Some(StorageError::Unavailable(_))
        )
    })
}

/// Retry an operation on a store that is unavailable (connection refused,
/// 5xx, throttling) with backoff for up to ~1 minute; other errors fail at once.
async fn with_retries<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T, StorageError>>,
{
    let mut wait = Duration::from_millis(250);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(StorageError::Unavailable(m)) if Instant::now() < deadline => {
                tracing::warn!(error = %m, retry_in = ?wait, "cannot {what}; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot {what}"))),
        }
    }
}

/// Remove spool directories of offsite processes that no longer run (killed
/// with SIGKILL, so their own cleanup never ran: Litestream #784/#927).
fn sweep_stale_spools(base: &std::path::Path) {
    let Ok(rd) = std::fs::read_dir(base) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("offsite-spool-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(dir = %e.path().display(), "removing a stale spool directory");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Keep the replica's spool directory alive for the process.
pub fn spool_dir(base: Option<PathBuf>) -> anyhow::Result<tempfile::TempDir> {
    let base = base.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)
        .with_context(|| format!("cannot create spool directory {}", base.display()))?;
    sweep_stale_spools(&base);
    tempfile::Builder::new()
        .prefix(&format!("offsite-spool-{}-", std::process::id()))
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a spool directory in {}", base.display()))
}
