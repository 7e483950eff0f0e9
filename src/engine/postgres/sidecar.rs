//! The PostgreSQL sidecar: one replica of one cluster, run by the daemon
//! for a `[[database]] engine = "postgres"` entry (and so for
//! `offsite replicate postgres://…` and `offsite pg stream`, which fill
//! the same settings). It holds the replica's lease, streams WAL through
//! the slot, takes base backups on schedule, prunes by the replica's
//! retention and runs restore drills, all published on the replica's
//! status (metrics, `/readyz`, `sync --wait`).

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use super::dsn::Dsn;
use super::stream::{FlushAfter, StreamOptions, Streamer};
use super::{archive, backup, drill, now_us, retention, wire, Reader, Writer};
use crate::codec::Encryption;
use crate::sign::{Signer, Trust};
use crate::status::{ReplicaState, ReplicaStatus};
use crate::storage::ReplicaUrl;

/// Everything one PostgreSQL replica runs with (validated settings).
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    pub dsn: Dsn,
    pub url: ReplicaUrl,
    pub encryption: Encryption,
    pub slot: String,
    pub sync_interval: Duration,
    pub flush_after: FlushAfter,
    /// Ship each arriving WAL message at once (`synchronous_standby_names`).
    pub synchronous: bool,
    /// Where the per-segment spool goes; the spool itself is
    /// `offsite-pg-<system id>-<slot>-spool` under it, stable across
    /// restarts (leftovers of `flush-after = "spool"` are shipped at start).
    pub spool_base: Option<PathBuf>,
    /// `None`: base backups only on demand (`offsite pg backup`).
    pub base_backup_interval: Option<Duration>,
    /// `None`: never pruned (`retention = "off"`).
    pub retention: Option<retention::Policy>,
    pub prune_interval: Duration,
    pub drills: Option<DrillSchedule>,
}

/// Restore drills run by the sidecar.
#[derive(Debug, Clone)]
pub struct DrillSchedule {
    pub interval: Duration,
    /// Identity files that decrypt the archive (absolute: the restored
    /// server's restore_command names them). Empty for a plaintext archive.
    pub identity_files: Vec<PathBuf>,
    pub check_query: String,
    pub check_user: String,
    /// Directory of pg_ctl, postgres and pg_verifybackup (default: by the
    /// backup's major version).
    pub pg_bin: Option<PathBuf>,
    /// The OS user the restored server runs as (default when root: postgres).
    pub os_user: Option<String>,
    pub timeout: Duration,
}

/// The default spool directory of a cluster's slot.
pub fn spool_dir(base: Option<&std::path::Path>, system_id: u64, slot: &str) -> PathBuf {
    base.map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("offsite-pg-{system_id}-{slot}-spool"))
}

/// Run until `stop` (then stop streaming, after what is received is
/// shipped) or an error no reconnect fixes.
pub async fn run(
    o: SidecarOptions,
    signer: Arc<Signer>,
    trust: Trust,
    status: Arc<ReplicaStatus>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let dsn = o.dsn.clone().with_application_name("offsite");
    // The cluster's identity binds every object. A server that cannot be
    // reached at start is an error (a wrong host or port would otherwise
    // look like a slow start); later disconnects are retried.
    let system_id = system_id(&dsn)
        .await
        .inspect_err(|e| *status.failed.lock().unwrap() = Some(format!("{e:#}")))?;
    let w = Writer::open(&o.url, o.encryption.clone(), signer, trust, system_id)
        .await
        .inspect_err(|e| *status.failed.lock().unwrap() = Some(format!("{e:#}")))?;
    let so = StreamOptions {
        slot: o.slot.clone(),
        sync_interval: if o.synchronous {
            Duration::from_millis(5)
        } else {
            o.sync_interval
        },
        flush_after: o.flush_after,
        spool_dir: spool_dir(o.spool_base.as_deref(), system_id, &o.slot),
        consolidate_after: 8,
        synchronous: o.synchronous,
    };
    let mut lease = crate::lease::Lease::new(
        &super::database_name(system_id),
        Duration::from_secs(300),
        Duration::from_secs(60),
    );
    lease
        .ensure(w.store.as_ref(), now_us())
        .await
        .inspect_err(|e| *status.failed.lock().unwrap() = Some(format!("{e:#}")))?;
    let lease = Arc::new(tokio::sync::Mutex::new(lease));
    // Stops the streamer when the lease is lost, besides the caller's stop.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let (stop_tx, mut outer) = (stop_tx.clone(), stop.clone());
        tokio::spawn(async move {
            while !*outer.borrow() {
                if outer.changed().await.is_err() {
                    break;
                }
            }
            let _ = stop_tx.send(true);
        });
    }
    let w = Arc::new(w);
    let maintenance = tokio::spawn(maintenance(
        w.clone(),
        dsn.clone(),
        o.clone(),
        stop_rx.clone(),
        status.clone(),
    ));
    let renew = tokio::spawn(renew_lease(
        lease.clone(),
        w.clone(),
        stop_tx.clone(),
        status.clone(),
    ));
    let mut streamer = Streamer::new(&w, &so, status.clone());
    let mut delay = Duration::from_millis(500);
    let result = loop {
        match streamer.run(&dsn, &mut stop_rx).await {
            Ok(()) => break Ok(()),
            Err(e) if *stop_rx.borrow() => break Err(e),
            Err(e) if is_fatal(&e) => {
                *status.failed.lock().unwrap() = Some(format!("{e:#}"));
                break Err(e);
            }
            Err(e) => {
                status.running.store(false, Relaxed);
                status.set_state(ReplicaState::Restarting);
                tracing::warn!("streaming stopped, reconnecting in {delay:?}: {e:#}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop_rx.changed() => break Ok(()),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
        if let Err(e) = lease.lock().await.ensure(w.store.as_ref(), now_us()).await {
            break Err(e);
        }
    };
    renew.abort();
    maintenance.abort();
    status.set_state(ReplicaState::Stopped);
    let lost = status.failed.lock().unwrap().clone();
    let result = match (result, lost) {
        (Ok(()), Some(why)) if why.contains("another offsite") => Err(anyhow::anyhow!(why)),
        (r, _) => r,
    };
    let held_elsewhere = result
        .as_ref()
        .is_err_and(|e| crate::lease::is_held(e) || format!("{e:#}").contains("another offsite"));
    if !held_elsewhere {
        lease.lock().await.release(w.store.as_ref()).await;
    }
    result
}

/// The system identifier of the cluster at `dsn` (IDENTIFY_SYSTEM).
pub async fn system_id(dsn: &Dsn) -> anyhow::Result<u64> {
    let mut c = wire::Conn::connect(dsn, true).await?;
    let sys = c.identify_system().await?;
    c.close().await;
    sys.system_id
        .parse()
        .with_context(|| format!("PostgreSQL sent system identifier {:?}", sys.system_id))
}

/// Errors no reconnect fixes: the user must act.
pub fn is_fatal(e: &anyhow::Error) -> bool {
    let t = format!("{e:#}");
    [
        "give each cluster its own replica URL",
        "password authentication failed",
        "REPLICATION",
        "different content",
        "wal_level",
        "replication slots",
        "holds a",
    ]
    .iter()
    .any(|k| t.contains(k))
}

/// The lease is renewed while streaming; another shipper holding it stops
/// this one (one shipper per archive).
async fn renew_lease(
    lease: Arc<tokio::sync::Mutex<crate::lease::Lease>>,
    w: Arc<Writer>,
    stop_tx: Arc<watch::Sender<bool>>,
    status: Arc<ReplicaStatus>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(20)).await;
        let r = lease.lock().await.ensure(w.store.as_ref(), now_us()).await;
        match r {
            Ok(()) => {}
            Err(e) if crate::lease::is_held(&e) => {
                tracing::error!("lost the replica's lease, stopping: {e:#}");
                *status.failed.lock().unwrap() = Some(format!("{e:#}"));
                let _ = stop_tx.send(true);
                return;
            }
            Err(e) => tracing::warn!("cannot renew the replica's lease (retrying): {e:#}"),
        }
    }
}

/// Base backups (one at start when the archive holds none, then every
/// interval, and at once after a gap), pruning after each backup and every
/// prune interval, and restore drills, one at a time.
async fn maintenance(
    w: Arc<Writer>,
    dsn: Dsn,
    o: SidecarOptions,
    mut stop: watch::Receiver<bool>,
    status: Arc<ReplicaStatus>,
) {
    let mut last: Option<i64> = match archive::list_backups(w.store.as_ref(), &w.trust).await {
        Ok((b, _)) => b.last().map(|b| b.end_time_us),
        Err(_) => None,
    };
    let publish = |t: Option<i64>| status.pg_last_base_backup_us.store(t.unwrap_or(0), Relaxed);
    publish(last);
    let mut seen_breaks = status.lineage_breaks.load(Relaxed);
    let mut last_prune = now_us();
    // The first drill after one interval (a fresh archive has little to drill).
    let mut last_drill = now_us();
    let mut backup_failed_at: Option<i64> = None;
    loop {
        let now = now_us();
        // A gap in the WAL (an invalidated slot) needs a new backup now.
        let breaks = status.lineage_breaks.load(Relaxed);
        let retry_ok = backup_failed_at.is_none_or(|t| now - t >= 60_000_000);
        let due = retry_ok
            && match (last, o.base_backup_interval) {
                _ if breaks != seen_breaks => true,
                (None, _) => true,
                (Some(t), Some(i)) => now - t >= i.as_micros() as i64,
                (Some(_), None) => false,
            };
        let mut backed_up = false;
        if due {
            let bo = backup::BackupOptions {
                label: "offsite scheduled".into(),
                wal_timeout: Duration::from_secs(600),
            };
            match backup::base_backup(&w, &dsn, &bo).await {
                Ok(b) => {
                    seen_breaks = breaks;
                    backup_failed_at = None;
                    tracing::info!(backup = %b.id, "scheduled base backup complete");
                    last = Some(b.end_time_us);
                    publish(last);
                    backed_up = true;
                }
                Err(e) => {
                    backup_failed_at = Some(now);
                    tracing::error!("scheduled base backup failed (retried in 1 min): {e:#}");
                }
            }
        }
        if let Some(p) = &o.retention {
            if backed_up || now_us() - last_prune >= o.prune_interval.as_micros() as i64 {
                last_prune = now_us();
                prune(&w, p).await;
            }
        }
        if let Some(d) = &o.drills {
            if last.is_some() && now_us() - last_drill >= d.interval.as_micros() as i64 {
                last_drill = now_us();
                run_drill(&w, &o.url, &o.encryption, d, &status).await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn prune(w: &Writer, policy: &retention::Policy) {
    match retention::prune(w.store.as_ref(), &w.trust, policy, now_us(), false).await {
        Ok(rep) => {
            let n = rep.deleted.len();
            if n > 0 {
                tracing::info!(
                    deleted = n,
                    window_start = %rep.window_start,
                    kept_backups = rep.kept.len(),
                    "pruned the archive"
                );
            }
        }
        Err(e) => tracing::error!("pruning failed (retried at the next prune interval): {e:#}"),
    }
}

/// One round of restore drills; publishes the newest verified point.
async fn run_drill(
    w: &Writer,
    url: &ReplicaUrl,
    enc: &Encryption,
    d: &DrillSchedule,
    status: &ReplicaStatus,
) {
    let started = now_us();
    let outcome = async {
        let ids = if d.identity_files.is_empty() {
            None
        } else {
            Some(crate::keys::Identities::read_files(&d.identity_files)?)
        };
        let r = Reader {
            store: w.store.clone(),
            trust: w.trust.clone(),
            ids,
            system_id: Some(w.system_id),
        };
        let inv = super::inventory::Inventory::load(r.store.as_ref(), &r.trust).await?;
        // Everything sealed up to here is what `latest` replays.
        let newest = inv.wal_time_us.values().copied().max();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let opts = drill::DrillOptions {
            restore_command: super::restore::restore_command(
                url,
                &d.identity_files,
                &r.trust,
                matches!(enc, Encryption::None) && !d.identity_files.is_empty(),
            )?,
            check_query: d.check_query.clone(),
            check_user: d.check_user.clone(),
            bin: d.pg_bin.clone(),
            os_user: d
                .os_user
                .clone()
                .or_else(|| root.then(|| "postgres".to_string())),
            timeout: d.timeout,
            random_points: 1,
            temp_dir: None,
        };
        let results = drill::drills(&r, &inv, &opts).await;
        anyhow::Ok((results, newest))
    }
    .await;
    status.drill_ran_us.store(started, Relaxed);
    match outcome {
        Ok((results, newest)) => {
            let failed: Vec<&drill::DrillResult> = results.iter().filter(|r| !r.ok).collect();
            if failed.is_empty() && !results.is_empty() {
                if let Some(t) = newest {
                    status.verified_time_us.store(t, Relaxed);
                }
                tracing::info!(
                    points = results.len(),
                    "restore drill passed: each point restored, pg_verifybackup passed, the server reached its target and answered the check query"
                );
            } else {
                status.add(&status.drill_failures, 1);
                for f in failed {
                    tracing::error!("restore drill FAILED: {}", f.describe());
                }
            }
        }
        Err(e) => {
            status.add(&status.drill_failures, 1);
            tracing::error!("restore drill FAILED: {e:#}");
        }
    }
}
