//! The sidecar: runs one replicator per database and replica, discovers
//! databases in directories, serves the HTTP listener, optionally runs the
//! application as a child (`--exec`), and shuts down by shipping everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::{DatabaseConfig, ReplicaConfig};
use crate::keys::Identities;
use crate::replicate::{self, Replicator};
use crate::status::{Registry, ReplicaStatus};
use crate::storage;

/// Exit with this status (the `--exec` child's), after a clean shutdown.
#[derive(Debug, thiserror::Error)]
#[error("the application exited with status {0}")]
pub struct ExitStatus(pub i32);

pub struct Daemon {
    /// Databases (`path` entries) and directories (`dir` entries).
    pub databases: Vec<DatabaseConfig>,
    pub listen: Option<String>,
    pub exec: Option<String>,
    pub shutdown_timeout: Duration,
    /// Restore a missing database from its replica before replicating it.
    pub restore_if_db_not_exists: bool,
    /// Identity files for that restore (default: the replica's own
    /// `age-identity-files`).
    pub restore_identities: Vec<PathBuf>,
    pub spool_base: Option<PathBuf>,
    pub clock: Clock,
    /// How often directories are searched for new or removed databases.
    pub discover_interval: Duration,
    /// The signing key every replicator signs with.
    pub signer: Option<Arc<crate::sign::Signer>>,
    /// Further verifying keys trusted (old keys during a rotation).
    pub verify_keys: Vec<crate::sign::PublicKey>,
}

/// A running replicator task's identity.
struct Task {
    db: PathBuf,
    replica: String,
    url: String,
    status: Arc<ReplicaStatus>,
}

/// The replicator options for one database and replica.
pub fn options_for(d: &DatabaseConfig, r: &ReplicaConfig) -> anyhow::Result<replicate::Options> {
    let mut o = replicate::Options::new(d.path.clone(), PathBuf::new());
    o.sync_interval = d.sync_interval;
    o.checkpoint_frames = d.checkpoint_frames;
    o.max_wal_bytes = d.max_wal_bytes;
    // Tests shorten the lease renewal (60 s) to see a lost lease quickly
    // (only in a build with the `testing` feature).
    #[cfg(feature = "testing")]
    if let Ok(v) = std::env::var("OFFSITE_TEST_LEASE_RENEW") {
        o.lease_renew = crate::config::parse_duration(&v, "OFFSITE_TEST_LEASE_RENEW")?;
    }
    // Tests make shipping slow with small segments behind a slow proxy.
    #[cfg(feature = "testing")]
    if let Ok(v) = std::env::var("OFFSITE_TEST_MAX_SEGMENT_BYTES") {
        o.max_segment_bytes = v.parse().context("OFFSITE_TEST_MAX_SEGMENT_BYTES")?;
    }
    o.replica_name = r.name.clone();
    o.retention = r.retention.clone();
    o.snapshot_interval = r.snapshot_interval;
    o.compaction_levels = r.compaction_levels.clone();
    o.prune_interval = r.prune_interval;
    o.object_lock = r.object_lock;
    o.object_lock_margin = r.object_lock_margin;
    o.verify_interval = r.verify_interval;
    o.drill_identities = match &r.verify_identity_file {
        Some(f) => Some(
            Identities::read_files(std::slice::from_ref(f))
                .with_context(|| format!("replica {}: verify-identity-file", r.name))?,
        ),
        None => None,
    };
    Ok(o)
}

/// Let the process open as many files as allowed: each database holds a
/// few descriptors (database, WAL, shm, spool files), a thousand need more
/// than the usual soft limit of 1024.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Signals (SIGTERM, SIGINT) as a stream of events.
fn signals() -> tokio::sync::mpsc::UnboundedReceiver<i32> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        loop {
            let s = tokio::select! {
                _ = term.recv() => libc::SIGTERM,
                _ = int.recv() => libc::SIGINT,
            };
            if tx.send(s).is_err() {
                break;
            }
        }
    });
    rx
}

/// Restore `d` from the first replica holding a backup, if the database
/// does not exist. A replica with no backup yet is fine (a fresh
/// application); an unreachable one is an error.
async fn restore_if_missing(
    d: &DatabaseConfig,
    ids: &[PathBuf],
    trust: &crate::sign::Trust,
) -> anyhow::Result<()> {
    if d.postgres.is_some() {
        tracing::info!(db = %d.path.display(), "--restore-if-db-not-exists does not apply to a PostgreSQL cluster (restore one with `offsite restore URL -o DATADIR`)");
        return Ok(());
    }
    if std::fs::symlink_metadata(&d.path).is_ok() {
        tracing::info!(db = %d.path.display(), "database exists; nothing to restore");
        return Ok(());
    }
    for r in &d.replicas {
        let store = storage::open(&r.url).await?;
        let catalog = crate::layout::Catalog::load(store.as_ref())
            .await
            .with_context(|| {
                format!("--restore-if-db-not-exists: cannot list replica {}", r.name)
            })?;
        if catalog.newest_lineage().is_none() {
            continue;
        }
        let files = if ids.is_empty() {
            r.age_identity_files.clone()
        } else {
            ids.to_vec()
        };
        let identities = if files.is_empty() {
            None
        } else {
            Some(Identities::read_files(&files)?)
        };
        let mut o =
            crate::restore::RestoreOptions::new(crate::layout::Target::Latest, d.path.clone());
        o.force = false;
        o.identities = identities;
        // What this shipper signs, plus the pins in the identity files; and
        // the replica must be of this database.
        let mut t = trust.clone();
        for f in &files {
            if let Ok(text) = std::fs::read_to_string(f) {
                t.keys.extend(crate::sign::PublicKey::pins_in(&text)?);
            }
        }
        t.database = d.path.file_name().map(|n| n.to_string_lossy().into_owned());
        o.trust = t;
        let rep = crate::restore::restore(store.as_ref(), o)
            .await
            .with_context(|| {
                format!(
                    "--restore-if-db-not-exists: restoring {} from replica {}",
                    d.path.display(),
                    r.name
                )
            })?;
        tracing::info!(db = %d.path.display(), replica = %r.name, txid = rep.txid, lineage = %rep.lineage, "restored the missing database before replicating it");
        return Ok(());
    }
    tracing::info!(db = %d.path.display(), "no replica holds a backup yet; starting without a restore");
    Ok(())
}

impl Daemon {
    pub async fn run(self) -> anyhow::Result<()> {
        raise_fd_limit();
        let registry = Registry::new(self.clock.clone());
        let spool = replicate::spool_dir(self.spool_base.clone())?;
        let (stop_all, stop_rx) = watch::channel(false);
        let listener = match &self.listen {
            Some(addr) => Some(crate::http::serve(addr, registry.clone(), stop_rx.clone()).await?),
            None => None,
        };
        let mut sigs = signals();

        let (statics, dirs): (Vec<_>, Vec<_>) = self
            .databases
            .iter()
            .cloned()
            .partition(|d| d.discover.is_none());
        if self.restore_if_db_not_exists {
            for d in &statics {
                let trust = crate::sign::Trust::with_keys(
                    self.signer
                        .iter()
                        .map(|s| s.public())
                        .chain(self.verify_keys.iter().copied())
                        .collect(),
                );
                restore_if_missing(d, &self.restore_identities, &trust).await?;
            }
        }

        let mut set: tokio::task::JoinSet<(usize, anyhow::Result<()>)> = Default::default();
        let mut tasks: BTreeMap<usize, Task> = BTreeMap::new();
        let mut next_id = 0usize;
        // Per-database stop signals (a database removed from its directory
        // stops alone).
        let mut db_stops: BTreeMap<PathBuf, watch::Sender<bool>> = BTreeMap::new();
        let mut ctx = Spawner {
            registry: registry.clone(),
            spool: spool.path().to_path_buf(),
            spool_base: self.spool_base.clone(),
            clock: self.clock.clone(),
            shutdown_timeout: self.shutdown_timeout,
            signer: self.signer.clone(),
            verify_keys: self.verify_keys.clone(),
            s3_clients: storage::S3Clients::default(),
        };
        for d in &statics {
            let (tx, rx) = watch::channel(false);
            db_stops.insert(d.path.clone(), tx);
            ctx.spawn_db(d, rx, &mut set, &mut tasks, &mut next_id)
                .await?;
        }
        let mut discovered: BTreeMap<PathBuf, usize> = BTreeMap::new();
        let mut scans: Vec<crate::config::DirScan> =
            dirs.iter().map(|_| Default::default()).collect();
        let mut discover = tokio::time::interval(self.discover_interval);
        discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // The application, started once replication runs.
        let (child_pid, mut child_exit) = match &self.exec {
            Some(cmd) => {
                let mut c = spawn_child(cmd)?;
                let pid = c.id();
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let code = match c.wait().await {
                        Ok(s) => exit_code(s),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot wait for the application");
                            1
                        }
                    };
                    let _ = tx.send(code);
                });
                (pid, Some(rx))
            }
            None => (None, None),
        };
        let mut child_status: Option<i32> = None;
        let mut first_err: Option<anyhow::Error> = None;
        let mut shutting_down = false;

        loop {
            let child_running = child_exit.is_some() && child_status.is_none();
            if !shutting_down && set.is_empty() && dirs.is_empty() && !child_running {
                break;
            }
            if shutting_down && set.is_empty() {
                break;
            }
            tokio::select! {
                Some(j) = set.join_next(), if !set.is_empty() => {
                    let (id, r) = match j {
                        Ok(x) => x,
                        Err(e) => {
                            first_err.get_or_insert(anyhow::anyhow!("a replication task panicked: {e}"));
                            continue;
                        }
                    };
                    let t = tasks.remove(&id).expect("task");
                    let removed = !shutting_down && !db_stops.contains_key(&t.db);
                    match r {
                        Ok(()) => tracing::debug!(db = %t.db.display(), replica = %t.replica, "replicator stopped"),
                        Err(e) if removed => {
                            tracing::warn!(db = %t.db.display(), replica = %t.replica, error = format!("{e:#}"), "replication of a removed database ended with an error");
                        }
                        Err(e) => {
                            // A replica that cannot go on (wrong credentials, a
                            // replica holding other backups, a database that is
                            // not in WAL mode) is reported; the others go on.
                            tracing::error!(db = %t.db.display(), replica = %t.replica, url = %t.url, error = format!("{e:#}"), running = set.len(), "a replica stopped");
                            first_err.get_or_insert(e.context(format!("replicating {} to replica {} ({})", t.db.display(), t.replica, t.url)));
                        }
                    }
                    // A failed replica stays visible (not ready) until its
                    // database is removed; a stopped one goes.
                    if removed || t.status.failed.lock().unwrap().is_none() {
                        registry.unregister(&t.status);
                    }
                }
                _ = discover.tick(), if !dirs.is_empty() && !shutting_down => {
                    // Nothing created, removed or renamed since the last
                    // search: nothing to do (see DirScan).
                    if dirs.iter().zip(&scans).all(|(d, s)| s.unchanged(d)) {
                        continue;
                    }
                    let mut seen = std::collections::BTreeSet::new();
                    for (d, scan) in dirs.iter().zip(scans.iter_mut()) {
                        // Files already replicated are not opened again
                        // (that would drop our SQLite locks on them).
                        let known = |f: &Path| discovered.contains_key(f) || db_stops.contains_key(f);
                        for f in scan.search(d, known) {
                            seen.insert(f.clone());
                            if discovered.contains_key(&f) || db_stops.contains_key(&f) {
                                continue;
                            }
                            let dc = match d.for_file(&f) {
                                Ok(dc) => dc,
                                Err(e) => {
                                    tracing::warn!(db = %f.display(), error = format!("{e:#}"), "database skipped");
                                    discovered.insert(f, 0);
                                    continue;
                                }
                            };
                            tracing::info!(db = %f.display(), dir = %d.path.display(), "found a new database");
                            let (tx, rx) = watch::channel(false);
                            db_stops.insert(f.clone(), tx);
                            discovered.insert(f.clone(), 1);
                            if let Err(e) = ctx.spawn_db(&dc, rx, &mut set, &mut tasks, &mut next_id).await {
                                tracing::error!(db = %f.display(), error = format!("{e:#}"), "cannot replicate this database");
                            }
                        }
                    }
                    let gone: Vec<PathBuf> = discovered.keys().filter(|f| !seen.contains(*f)).cloned().collect();
                    for f in gone {
                        discovered.remove(&f);
                        if let Some(tx) = db_stops.remove(&f) {
                            tracing::info!(db = %f.display(), "database removed; its replication stops (its backups stay)");
                            let _ = tx.send(true);
                        }
                    }
                }
                Some(sig) = sigs.recv() => {
                    match child_pid {
                        Some(pid) if child_status.is_none() => {
                            tracing::info!(signal = sig, pid, "forwarding the signal to the application");
                            // SAFETY: kill(2) with the child's pid.
                            unsafe { libc::kill(pid as i32, sig) };
                        }
                        _ => {
                            if shutting_down {
                                tracing::warn!("second signal: still shipping pending commits; kill -9 to abandon them (they stay in the WAL)");
                            } else {
                                tracing::info!(signal = sig, "signal received; shipping pending commits, then exiting");
                                shutting_down = true;
                                let _ = stop_all.send(true);
                                for tx in db_stops.values() { let _ = tx.send(true); }
                            }
                        }
                    }
                }
                code = async { child_exit.as_mut().unwrap().await }, if child_running => {
                    let code = code.unwrap_or(1);
                    tracing::info!(status = code, "the application exited; shipping its last commits");
                    child_status = Some(code);
                    shutting_down = true;
                    let _ = stop_all.send(true);
                    for tx in db_stops.values() { let _ = tx.send(true); }
                }
            }
        }
        let _ = stop_all.send(true);
        if let Some(l) = listener {
            let _ = l.await;
        }
        drop(spool);
        match (child_status, first_err) {
            (_, Some(e)) => Err(e),
            (Some(0) | None, None) => Ok(()),
            (Some(c), None) => Err(ExitStatus(c).into()),
        }
    }
}

struct Spawner {
    registry: Arc<Registry>,
    spool: PathBuf,
    /// Where PostgreSQL spools go (stable across restarts, unlike `spool`).
    spool_base: Option<PathBuf>,
    clock: Clock,
    shutdown_timeout: Duration,
    signer: Option<Arc<crate::sign::Signer>>,
    verify_keys: Vec<crate::sign::PublicKey>,
    /// One S3 client per endpoint, region and addressing style for every
    /// replicator (each still counts its own requests).
    s3_clients: storage::S3Clients,
}

impl Spawner {
    async fn spawn_db(
        &mut self,
        d: &DatabaseConfig,
        stop: watch::Receiver<bool>,
        set: &mut tokio::task::JoinSet<(usize, anyhow::Result<()>)>,
        tasks: &mut BTreeMap<usize, Task>,
        next_id: &mut usize,
    ) -> anyhow::Result<()> {
        if let Some(pg) = &d.postgres {
            return self.spawn_pg(d, pg, stop, set, tasks, next_id).await;
        }
        for r in &d.replicas {
            let mut o = options_for(d, r)?;
            o.signer = self.signer.clone();
            o.verify_keys = self.verify_keys.clone();
            o.spool_dir = self.spool.clone();
            o.clock = self.clock.clone();
            o.shutdown_timeout = self.shutdown_timeout;
            o.poll_interval = o.sync_interval.min(Duration::from_millis(100));
            let db = d.path.display().to_string();
            let url = r.url.to_string();
            let status = Arc::new(ReplicaStatus::new(
                &db,
                &r.name,
                &url,
                d.max_lag,
                self.clock.now_us(),
            ));
            o.status = status.clone();
            if matches!(r.encryption, crate::codec::Encryption::None) {
                tracing::warn!(%db, replica = %r.name, %url, "encryption is off: backups are stored in plaintext, as requested");
            }
            let store = storage::open_shared(&r.url, &self.s3_clients)
                .await
                .with_context(|| format!("replica {} of {db}", r.name))?;
            self.registry.register(status.clone(), store.clone());
            let id = add_task(tasks, next_id, d, &r.name, &url, &status);
            let span = tracing::info_span!("replica", db = %db, replica = %r.name);
            let enc = r.encryption.clone();
            let stop = stop.clone();
            set.spawn(
                async move { (id, Replicator::new(o, store, enc).run(stop).await) }
                    .instrument(span),
            );
        }
        Ok(())
    }
}

impl Spawner {
    /// A PostgreSQL cluster: one sidecar (slot, streamer, backups, pruning,
    /// drills) per replica.
    async fn spawn_pg(
        &mut self,
        d: &DatabaseConfig,
        pg: &crate::config::PgDatabase,
        stop: watch::Receiver<bool>,
        set: &mut tokio::task::JoinSet<(usize, anyhow::Result<()>)>,
        tasks: &mut BTreeMap<usize, Task>,
        next_id: &mut usize,
    ) -> anyhow::Result<()> {
        use crate::engine::postgres::{retention, sidecar};
        let signer = self.signer.clone().context(crate::sign::NO_SIGNER)?;
        for (i, r) in d.replicas.iter().enumerate() {
            let url = r.url.to_string();
            let status = Arc::new(ReplicaStatus::new(
                &pg.name,
                &r.name,
                &url,
                d.max_lag,
                self.clock.now_us(),
            ));
            if matches!(r.encryption, crate::codec::Encryption::None) {
                tracing::warn!(db = %pg.name, replica = %r.name, %url, "encryption is off: backups are stored in plaintext, as requested");
            }
            let store = storage::open(&r.url)
                .await
                .with_context(|| format!("replica {} of {}", r.name, pg.name))?;
            self.registry.register(status.clone(), store);
            let drills = r.verify_interval.map(|interval| sidecar::DrillSchedule {
                interval,
                identity_files: r
                    .verify_identity_file
                    .iter()
                    .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
                    .collect(),
                check_query: pg.check_query.clone(),
                check_user: pg.check_user.clone(),
                pg_bin: pg.pg_bin.clone(),
                os_user: pg.pg_user.clone(),
                timeout: pg.drill_timeout,
            });
            let o = sidecar::SidecarOptions {
                dsn: pg.dsn.clone(),
                url: r.url.clone(),
                encryption: r.encryption.clone(),
                slot: pg.slot_for(i, &r.name),
                sync_interval: d.sync_interval,
                flush_after: pg.flush_after,
                synchronous: pg.synchronous,
                spool_base: self.spool_base.clone(),
                base_backup_interval: pg.base_backup_interval,
                retention: r.retention.as_ref().map(|p| retention::Policy {
                    retention: p.retention,
                    backup_retention: r.backup_retention,
                }),
                prune_interval: r.prune_interval,
                drills,
            };
            let trust = crate::sign::Trust::with_keys(
                std::iter::once(signer.public())
                    .chain(self.verify_keys.iter().copied())
                    .collect(),
            );
            let id = add_task(tasks, next_id, d, &r.name, &url, &status);
            let span = tracing::info_span!("replica", db = %pg.name, replica = %r.name);
            let signer = signer.clone();
            let stop = stop.clone();
            set.spawn(
                async move { (id, sidecar::run(o, signer, trust, status, stop).await) }
                    .instrument(span),
            );
        }
        Ok(())
    }
}

/// Record a replicator task under a fresh id.
fn add_task(
    tasks: &mut BTreeMap<usize, Task>,
    next_id: &mut usize,
    d: &DatabaseConfig,
    replica: &str,
    url: &str,
    status: &Arc<ReplicaStatus>,
) -> usize {
    let id = *next_id;
    *next_id += 1;
    tasks.insert(
        id,
        Task {
            db: d.path.clone(),
            replica: replica.to_string(),
            url: url.to_string(),
            status: status.clone(),
        },
    );
    id
}

/// Whether the application inherits variable `name`: not offsite's own
/// (`OFFSITE_*`) nor the AWS SDK's (`AWS_*`: the shipper's credentials,
/// which can write and delete backups). Case-insensitive, as some tools are.
fn child_inherits(name: &std::ffi::OsStr) -> bool {
    let n = name.as_encoded_bytes();
    let starts = |p: &[u8]| n.len() >= p.len() && n[..p.len()].eq_ignore_ascii_case(p);
    !(starts(b"AWS_") || starts(b"OFFSITE_"))
}

fn spawn_child(cmd: &str) -> anyhow::Result<tokio::process::Child> {
    // The command line may carry secrets (a password argument): no message
    // shows it, only the program's name.
    let words = shell_words::split(cmd).map_err(|e| {
        anyhow::anyhow!("--exec: cannot split the command into words ({e}); check the quotes")
    })?;
    let Some((prog, args)) = words.split_first() else {
        bail!("--exec is empty; give the application's command, e.g. --exec \"/app/server --port 8080\"");
    };
    let mut command = tokio::process::Command::new(prog);
    command.args(args).kill_on_drop(false);
    for (name, _) in std::env::vars_os() {
        if !child_inherits(&name) {
            command.env_remove(&name);
        }
    }
    let child = command
        .spawn()
        .with_context(|| format!("--exec: cannot start {prog:?}"))?;
    tracing::info!(pid = child.id(), program = %prog, args = args.len(), "started the application");
    Ok(child)
}

/// A shell-style exit code: the status, or 128 + the signal that ended it.
fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// Used by `offsite sync`: ask a running daemon to ship `db` now and wait.
pub async fn sync_via_http(
    addr: &str,
    db: &Path,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db_abs = std::path::absolute(db).unwrap_or_else(|_| db.to_path_buf());
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("db", &db_abs.display().to_string());
    // A bare name may also name a replica by its name (a PostgreSQL
    // cluster, `pg stream --name`): the daemon tries it when no database
    // has the path.
    if db.components().count() == 1 {
        q.append_pair("name", &db.display().to_string());
    }
    let q: String = q
        .append_pair("wait", if wait { "true" } else { "false" })
        .append_pair("timeout", &timeout.as_secs_f64().to_string())
        .finish();
    let mut conn = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!("cannot reach the offsite daemon at {addr}; is `offsite replicate` running with --listen {addr} (or `listen` in its config)?")
    })?;
    let host = addr;
    conn.write_all(
        format!("POST /sync?{q} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut resp = Vec::new();
    tokio::time::timeout(
        timeout + Duration::from_secs(5),
        conn.read_to_end(&mut resp),
    )
    .await
    .context("the daemon did not answer in time")??;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if code != 200 {
        bail!(
            "the daemon refused the sync ({status_line}): {}",
            body.trim()
        );
    }
    Ok(body.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_application_inherits_neither_aws_nor_offsite_variables() {
        for n in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "aws_secret_access_key",
            "OFFSITE_LOG",
            "OFFSITE_BUCKET",
            "Offsite_Anything",
        ] {
            assert!(!child_inherits(std::ffi::OsStr::new(n)), "{n}");
        }
        for n in [
            "PATH",
            "HOME",
            "APP_AWS_REGION",
            "MY_OFFSITE_X",
            "AWS",
            "OFFSITE",
        ] {
            assert!(child_inherits(std::ffi::OsStr::new(n)), "{n}");
        }
    }
}
