//! Restore: the mirror image of replication. Pick a snapshot and segments
//! from one listing, download in parallel, verify every object and every
//! commit's state checksum, check integrity, then rename into place.

use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use anyhow::{bail, Context};
use futures::StreamExt;

use crate::engine::sqlite;
use crate::keys::Identities;
use crate::layout::{self, Catalog, Target};
use crate::replay::{apply_segment, apply_snapshot, download, Keys, Stop};
use crate::sign::Trust;
use crate::storage::Storage;

pub struct RestoreOptions {
    pub target: Target,
    pub output: PathBuf,
    pub force: bool,
    pub identities: Option<Identities>,
    /// The verifying keys pinned and the opt-ins (`--allow-unsigned`, …).
    pub trust: Trust,
    pub integrity_check: bool,
    pub parallel: usize,
    pub progress: bool,
    /// Permission bits of the restored database file (the `-wal`/`-shm`
    /// files SQLite creates later are SQLite's): default 0600, owner only.
    pub mode: u32,
}

impl RestoreOptions {
    /// The CLI's defaults: integrity check on, 8 parallel downloads, no
    /// identity, no progress bar, mode 0600, and replacing `output` if it
    /// exists.
    pub fn new(target: Target, output: PathBuf) -> RestoreOptions {
        RestoreOptions {
            target,
            output,
            force: true,
            identities: None,
            trust: Trust::default(),
            integrity_check: true,
            parallel: 8,
            progress: false,
            mode: crate::storage::DEFAULT_FILE_MODE,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub lineage: String,
    pub txid: u64,
    pub time_us: i64,
    pub objects: usize,
    pub bytes_downloaded: u64,
}

/// Removes the temporary output (and the files beside it) unless disarmed.
struct TempOutput {
    paths: Vec<PathBuf>,
    armed: bool,
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if self.armed {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

pub async fn restore(store: &dyn Storage, opts: RestoreOptions) -> anyhow::Result<RestoreReport> {
    let out = &opts.output;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!("output directory {} does not exist", dir.display());
    }
    if !opts.force {
        for p in sqlite::replay::files_of(out) {
            if p.exists() {
                bail!(
                    "{} already exists; offsite never overwrites a database unless you pass --force",
                    p.display()
                );
            }
        }
    }
    // Only SQLite restores to a file; the record refuses anything else.
    // The signed record names the replica every object must belong to.
    let mut trust = opts.trust.clone();
    let engine = crate::record::open(store, &mut trust).await?;
    // The head record before the listing: a shipper that runs meanwhile
    // moves the head only to states the later listing already holds.
    let head = crate::head::for_restore(store, opts.target, &trust).await?;
    let mut catalog = Catalog::load(store).await?;
    let plan = plan_proven(store, &mut catalog, opts.target, &trust).await?;
    crate::head::check_restore(head.as_ref(), &plan)?;
    let keys = Keys {
        ids: opts.identities.clone(),
        trust,
    };
    tracing::info!(lineage = %plan.lineage, snapshot = %plan.snapshot.key, segments = plan.segments.len(), "restore plan");

    let tmp_path = dir.join(format!(
        ".{}.offsite-restore-{:08x}",
        out.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rand::random::<u32>()
    ));
    let mut guard = TempOutput {
        paths: sqlite::replay::files_of(&tmp_path),
        armed: true,
    };
    let dl_dir = tempfile::Builder::new()
        .prefix(".offsite-download-")
        .tempdir_in(&dir)
        .context("cannot create a download directory next to the output")?;

    let total: u64 = plan.snapshot.size + plan.segments.iter().map(|s| s.size).sum::<u64>();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} restoring [{bar:40}] {bytes}/{total_bytes} {msg}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };

    // Snapshot.
    let snap = download(store, &plan.snapshot.key, plan.snapshot.size, dl_dir.path()).await?;
    if let Some(b) = &bar {
        b.inc(plan.snapshot.size);
    }
    let outf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(opts.mode)
        .open(&tmp_path)
        .with_context(|| format!("cannot create {}", tmp_path.display()))?;
    // Exactly `mode`, whatever the umask (0660 under 022 would be 0640),
    // before a page is written.
    outf.set_permissions(std::fs::Permissions::from_mode(opts.mode))
        .with_context(|| format!("cannot set the mode of {}", tmp_path.display()))?;
    // Segments, downloaded in parallel while the snapshot and then each
    // segment is applied on a blocking thread (so the downloads keep flowing
    // meanwhile), applied in order.
    let stream = futures::stream::iter(plan.segments.iter().cloned())
        .map(|s| {
            let dir = dl_dir.path().to_path_buf();
            async move {
                let d = download(store, &s.key, s.size, &dir).await;
                (s, d)
            }
        })
        .buffered(opts.parallel.max(1));
    let mut segs = Prefetch::new(stream);
    let job = {
        let (entry, keys) = (plan.snapshot.clone(), keys.clone());
        tokio::task::spawn_blocking(move || {
            apply_snapshot(&entry, &snap, &keys, Some(engine), Some(outf))
        })
    };
    let mut chain = segs
        .wait(job)
        .await?
        .with_context(|| format!("snapshot {} failed verification", plan.snapshot.key))?;

    let mut objects = 1;
    let mut stopped = false;
    while let Some((seg, d)) = segs.next().await {
        if stopped {
            break;
        }
        let d = d?;
        objects += 1;
        if let Some(b) = &bar {
            b.inc(seg.size);
        }
        let stop = Stop {
            txid: plan.stop_txid,
            time_us: plan.stop_time_us,
        };
        let keys = keys.clone();
        let job = tokio::task::spawn_blocking(move || {
            let r = apply_segment(&mut chain, stop, &seg, &d, &keys);
            (chain, seg, r)
        });
        let (c, seg, r) = segs.wait(job).await?;
        chain = c;
        let (_, stop) = r.with_context(|| format!("segment {} failed verification", seg.key))?;
        stopped = stop;
    }
    drop(segs);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let (at_txid, at_time) = (chain.txid, chain.time_us);
    if matches!(opts.target, Target::Txid(_) | Target::Latest) && at_txid != plan.stop_txid {
        bail!(
            "restore reached txid {at_txid} but txid {} was requested; the replica is incomplete",
            plan.stop_txid
        );
    }
    chain.replay.sync()?;
    drop(chain);

    if opts.integrity_check {
        sqlite::integrity_check(&tmp_path)?;
    }
    if opts.force {
        for p in sqlite::replay::files_of(out).into_iter().skip(1) {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove stale {}", p.display()))
                }
            }
        }
    }
    std::fs::rename(&tmp_path, out)
        .with_context(|| format!("cannot move the restored database to {}", out.display()))?;
    guard.armed = false;
    File::open(&dir)?.sync_all()?;
    Ok(RestoreReport {
        lineage: plan.lineage.clone(),
        txid: at_txid,
        time_us: at_time,
        objects,
        bytes_downloaded: total,
    })
}

/// Plan the restore from snapshots whose signed envelopes prove out: a
/// planted snapshot or lineage (names anyone with bucket access can add) is
/// reported and planned around, never restored from.
async fn plan_proven(
    store: &dyn Storage,
    catalog: &mut Catalog,
    target: Target,
    trust: &Trust,
) -> anyhow::Result<layout::Plan> {
    let mut refused: Vec<String> = Vec::new();
    loop {
        let plan = match catalog.plan(target) {
            Ok(p) => p,
            Err(e) if refused.is_empty() => return Err(e),
            Err(e) => {
                return Err(e.context(format!(
                    "after refusing {} snapshot(s) that do not prove out: {}",
                    refused.len(),
                    refused.join("; ")
                )))
            }
        };
        let s = &plan.snapshot;
        match crate::trusted::envelope(store, &s.key, s.size, trust).await {
            Ok(_) => return Ok(plan),
            // Only what is not this replica's (planted) is planned around;
            // an object of this replica that fails its signature or hash is
            // damage, and the restore fails naming it rather than silently
            // restoring an older state.
            Err(e) if crate::codec::is_foreign(&e) => {
                tracing::error!(object = %s.key, error = %format!("{e:#}"), "refusing a snapshot that does not prove out; planning without it");
                if refused.len() < 3 {
                    refused.push(format!("{e:#}"));
                }
                let key = s.key.clone();
                for l in catalog.lineages.values_mut() {
                    l.snapshots.retain(|x| x.key != key);
                }
                catalog.lineages.retain(|_, l| !l.snapshots.is_empty());
            }
            Err(e) => {
                return Err(e.context(format!(
                    "snapshot {} failed verification (its signed envelope does not prove out)",
                    s.key
                )))
            }
        }
    }
}

/// Window and per-lineage summary for `offsite list`.
pub fn describe(catalog: &Catalog) -> serde_json::Value {
    let t = |tx: u64, us: i64| serde_json::json!({"txid": tx, "time": layout::fmt_time_us(us)});
    let lineages: Vec<serde_json::Value> = catalog
        .lineages
        .values()
        .map(|l| {
            let head = l.head();
            let level0 = l.segments.values().map(|v| v.len()).sum::<usize>();
            let compacted = l.compacted.values().map(|v| v.len()).sum::<usize>();
            serde_json::json!({
                "lineage": l.id,
                "snapshots": l.snapshots.iter().map(|s| t(s.txid, s.time_us)).collect::<Vec<_>>(),
                "earliest": l.snapshots.first().map(|s| t(s.txid, s.time_us)),
                // Every txid from here to "latest" restores; before it, only
                // the listed snapshots.
                "restorable_from": l.continuous_from().map(|s| t(s.txid, s.time_us)),
                "latest": head.as_ref().map(|h| t(h.last_txid(), h.last_time_us())),
                "objects": l.object_count(),
                "snapshot_objects": l.snapshots.len(),
                "level0_segments": level0,
                "compacted_segments": compacted,
                "bytes": l.bytes(),
            })
        })
        .collect();
    let (earliest, latest) = match catalog.window() {
        Some(((a, at), (b, bt))) => (t(a, at), t(b, bt)),
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    serde_json::json!({
        "earliest": earliest,
        "latest": latest,
        "lineages": lineages,
        "ignored_objects": catalog.ignored,
    })
}

/// Downloads kept flowing while a blocking job (applying an object) runs:
/// up to `READY` finished downloads wait here beyond the ones `buffered`
/// holds, so the store's response bodies are read while pages are applied
/// (an unpolled body would also trip the S3 client's stall protection).
struct Prefetch<S: futures::Stream + Unpin> {
    stream: S,
    ready: std::collections::VecDeque<S::Item>,
    ended: bool,
}

/// Finished downloads held beyond the `parallel` in flight.
const READY: usize = 2;

impl<S: futures::Stream + Unpin> Prefetch<S> {
    fn new(stream: S) -> Self {
        Prefetch {
            stream,
            ready: std::collections::VecDeque::new(),
            ended: false,
        }
    }

    async fn next(&mut self) -> Option<S::Item> {
        if let Some(x) = self.ready.pop_front() {
            return Some(x);
        }
        if self.ended {
            return None;
        }
        let x = self.stream.next().await;
        self.ended = x.is_none();
        x
    }

    /// Wait for `job`, downloading meanwhile.
    async fn wait<T>(&mut self, mut job: tokio::task::JoinHandle<T>) -> anyhow::Result<T> {
        loop {
            tokio::select! {
                r = &mut job => return r.context("applying an object failed"),
                x = self.stream.next(), if !self.ended && self.ready.len() < READY => match x {
                    Some(x) => self.ready.push_back(x),
                    None => self.ended = true,
                },
            }
        }
    }
}
