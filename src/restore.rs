//! Restore: the mirror image of replication. Pick a snapshot and segments
//! from one listing, download in parallel, verify every object and every
//! commit's state checksum, check integrity, then rename into place.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use futures::StreamExt;

use crate::checksum::PageState;
use crate::codec::open_object;
use crate::keys::Identities;
use crate::layout::{self, Catalog, SegmentEntry, SnapshotEntry, Target};
use crate::segment::{BodyReader, Header};
use crate::storage::Storage;

pub struct RestoreOptions {
    pub target: Target,
    pub output: PathBuf,
    pub force: bool,
    pub identities: Option<Identities>,
    pub integrity_check: bool,
    pub parallel: usize,
    pub progress: bool,
}

impl RestoreOptions {
    /// The CLI's defaults: integrity check on, 8 parallel downloads, no
    /// identity, no progress bar, and replacing `output` if it exists.
    pub fn new(target: Target, output: PathBuf) -> RestoreOptions {
        RestoreOptions {
            target,
            output,
            force: true,
            identities: None,
            integrity_check: true,
            parallel: 8,
            progress: false,
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

/// Objects above this size are downloaded to a temp file instead of memory
/// (with 8 downloads in flight, at most 64 MiB of objects are in memory).
const MEMORY_LIMIT: u64 = 8 << 20;

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Removes the temporary output (and its -wal/-shm) unless disarmed.
struct TempOutput {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if self.armed {
            for p in [
                self.path.clone(),
                sidecar(&self.path, "-wal"),
                sidecar(&self.path, "-shm"),
            ] {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

pub(crate) enum Downloaded {
    Mem(bytes::Bytes),
    File(tempfile::NamedTempFile),
}

impl Downloaded {
    pub(crate) fn reader(&self) -> anyhow::Result<Box<dyn Read + '_>> {
        Ok(match self {
            Downloaded::Mem(b) => Box::new(&b[..]),
            Downloaded::File(f) => Box::new(BufReader::with_capacity(1 << 20, f.reopen()?)),
        })
    }
}

pub(crate) async fn download(
    store: &dyn Storage,
    key: &str,
    size: u64,
    tmpdir: &Path,
) -> anyhow::Result<Downloaded> {
    let res = if size > MEMORY_LIMIT {
        let tmp = tempfile::NamedTempFile::new_in(tmpdir)?;
        store
            .get_to_file(key, tmp.path())
            .await
            .map(|_| Downloaded::File(tmp))
    } else {
        store.get(key).await.map(Downloaded::Mem)
    };
    res.map_err(|e| match e {
        crate::storage::StorageError::NotFound { .. } => anyhow::anyhow!(
            "object {key} is missing from the replica (it was listed a moment ago: deleted concurrently, or the store is inconsistent)"
        ),
        other => anyhow::Error::new(other).context(format!("cannot download {key}")),
    })
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
        for p in [out.clone(), sidecar(out, "-wal"), sidecar(out, "-shm")] {
            if p.exists() {
                bail!(
                    "{} already exists; offsite never overwrites a database unless you pass --force",
                    p.display()
                );
            }
        }
    }
    let catalog = Catalog::load(store).await?;
    let plan = catalog.plan(opts.target)?;
    tracing::info!(lineage = %plan.lineage, snapshot = %plan.snapshot.key, segments = plan.segments.len(), "restore plan");

    let tmp_path = dir.join(format!(
        ".{}.offsite-restore-{:08x}",
        out.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rand::random::<u32>()
    ));
    let mut guard = TempOutput {
        path: tmp_path.clone(),
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
    let mut outf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .with_context(|| format!("cannot create {}", tmp_path.display()))?;
    let ids = opts.identities.as_ref();
    let (mut state, encrypted, mut at_txid, mut at_time) =
        tokio::task::block_in_place(|| apply_snapshot(&plan.snapshot, &snap, ids, Some(&mut outf)))
            .with_context(|| format!("snapshot {} failed verification", plan.snapshot.key))?;
    drop(snap);

    // Segments, downloaded in parallel, applied in order.
    let mut stream = futures::stream::iter(plan.segments.iter().cloned())
        .map(|s| {
            let dir = dl_dir.path().to_path_buf();
            async move {
                let d = download(store, &s.key, s.size, &dir).await;
                (s, d)
            }
        })
        .buffered(opts.parallel.max(1));
    let mut objects = 1;
    let mut stopped = false;
    while let Some((seg, d)) = stream.next().await {
        if stopped {
            break;
        }
        let d = d?;
        objects += 1;
        if let Some(b) = &bar {
            b.inc(seg.size);
        }
        let r = tokio::task::block_in_place(|| {
            apply_segment(
                Stop {
                    txid: plan.stop_txid,
                    time_us: plan.stop_time_us,
                },
                &seg,
                &d,
                ids,
                encrypted,
                &mut state,
                Some(&mut outf),
                at_txid,
            )
        })
        .with_context(|| format!("segment {} failed verification", seg.key))?;
        let (applied, stop) = r;
        if let Some((t, tm)) = applied {
            at_txid = t;
            at_time = tm;
        }
        stopped = stop;
    }
    drop(stream);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if matches!(opts.target, Target::Txid(_) | Target::Latest) && at_txid != plan.stop_txid {
        bail!(
            "restore reached txid {at_txid} but txid {} was requested; the replica is incomplete",
            plan.stop_txid
        );
    }
    outf.sync_all()?;
    drop(outf);

    if opts.integrity_check {
        integrity_check(&tmp_path)?;
    }
    if opts.force {
        for p in [sidecar(out, "-wal"), sidecar(out, "-shm")] {
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

/// Where a replay stops: after `txid`, or before the first commit observed after `time_us`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stop {
    pub txid: u64,
    pub time_us: Option<i64>,
}

impl Stop {
    /// Apply everything.
    pub(crate) const NEVER: Stop = Stop {
        txid: u64::MAX,
        time_us: None,
    };
}

/// Verify a snapshot against its name and stored checksum, computing its
/// page state; with `out`, also write its pages there (restore). Returns the
/// state, whether the object is encrypted, and its txid and time.
pub(crate) fn apply_snapshot(
    key: &SnapshotEntry,
    obj: &Downloaded,
    ids: Option<&Identities>,
    out: Option<&mut File>,
) -> anyhow::Result<(PageState, bool, u64, i64)> {
    let (env, body) = open_object(obj.reader()?, ids)?;
    let (mut br, header) = BodyReader::open(body, &env)?;
    let Header::Snapshot(h) = header else {
        bail!("object is not a snapshot");
    };
    ensure!(
        h.lineage == key.lineage && h.txid == key.txid && h.time_us == key.time_us,
        "snapshot contents (lineage {}, txid {}, time {}) do not match its name (swapped or renamed object)",
        h.lineage,
        h.txid,
        h.time_us
    );
    let mut state = PageState::new(h.page_size as usize);
    let mut buf = vec![0u8; h.page_size as usize];
    let mut w = match out {
        Some(f) => {
            f.set_len(0)?;
            f.seek(SeekFrom::Start(0))?;
            Some(BufWriter::with_capacity(1 << 20, f))
        }
        None => None,
    };
    for pgno in 1..=h.db_pages {
        br.read_page(&mut buf)?;
        state.set_page(pgno, &buf);
        if let Some(w) = w.as_mut() {
            w.write_all(&buf)?;
        }
    }
    if let Some(mut w) = w {
        w.flush()?;
    }
    state.resize(h.db_pages);
    let ck = br.read_checksum()?;
    ensure!(
        ck == state.checksum(),
        "state checksum mismatch after applying the snapshot (stored {ck}, computed {})",
        state.checksum()
    );
    br.finish()?;
    Ok((state, env.encrypted, h.txid, h.time_us))
}

/// Apply one segment to `state` (and, with `out`, to the file being
/// restored), verifying it against its name, the state it continues and
/// every stored checksum. Returns the last applied (txid, time), if any, and
/// whether the target was reached.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_segment(
    stop: Stop,
    seg: &SegmentEntry,
    obj: &Downloaded,
    ids: Option<&Identities>,
    encrypted: bool,
    state: &mut PageState,
    mut out: Option<&mut File>,
    at_txid: u64,
) -> anyhow::Result<(Option<(u64, i64)>, bool)> {
    let (env, body) = open_object(obj.reader()?, ids)?;
    ensure!(
        env.encrypted == encrypted,
        "object is {} but the snapshot is {}: refusing to mix encrypted and plaintext objects",
        if env.encrypted {
            "encrypted"
        } else {
            "plaintext"
        },
        if encrypted { "encrypted" } else { "plaintext" }
    );
    let (mut br, header) = BodyReader::open(body, &env)?;
    let Header::Segment(h) = header else {
        bail!("object is not a segment");
    };
    ensure!(
        h.lineage == seg.lineage && h.first_txid == seg.first_txid && h.last_txid == seg.last_txid,
        "segment contents (lineage {}, txids {}..={}) do not match its name (swapped or renamed object)",
        h.lineage,
        h.first_txid,
        h.last_txid
    );
    ensure!(
        h.first_txid == at_txid + 1,
        "segment does not continue txid {at_txid}"
    );
    ensure!(
        h.page_size as usize == state.page_size(),
        "page size {} differs from the snapshot's {}",
        h.page_size,
        state.page_size()
    );
    ensure!(
        h.prev_checksum == state.checksum().to_hex(),
        "segment does not continue the restored state (prev_checksum {} vs {}): an object was replaced or is out of order",
        h.prev_checksum,
        state.checksum()
    );
    let ps = h.page_size as usize;
    let mut buf = vec![0u8; ps];
    let mut last = None;
    let mut done = false;
    for i in 0..h.commit_count {
        let head = br.read_commit_head()?;
        ensure!(
            head.txid == h.commit_txid(i),
            "commit txids are not consecutive"
        );
        ensure!(
            h.level == seg.level,
            "segment level {} differs from its name's level {}",
            h.level,
            seg.level
        );
        if i + 1 == h.commit_count {
            ensure!(
                head.time_us == seg.last_time_us,
                "last commit time differs from the object name"
            );
        }
        if let Some(t) = stop.time_us {
            if head.time_us > t {
                // The target lies before this commit: stop applying here.
                done = true;
            }
        }
        if done {
            // Past the target: read (and hash) the rest without applying it,
            // so damage anywhere in an object a restore uses is detected.
            for _ in 0..head.records {
                br.read_record(&mut buf)?;
            }
            br.read_checksum()?;
            continue;
        }
        if let Some(t) = h.truncate_to {
            ensure!(
                t <= head.db_pages,
                "compacted segment truncation size {t} is invalid"
            );
            if let Some(f) = out.as_deref_mut() {
                f.set_len(t as u64 * ps as u64)?;
            }
            state.resize(t);
        }
        for _ in 0..head.records {
            let pgno = br.read_record(&mut buf)?;
            ensure!(
                pgno >= 1 && pgno <= head.db_pages,
                "record for page {pgno} outside the database"
            );
            if let Some(f) = out.as_deref_mut() {
                f.write_all_at(&buf, (pgno as u64 - 1) * ps as u64)?;
            }
            state.set_page(pgno, &buf);
        }
        if let Some(f) = out.as_deref_mut() {
            f.set_len(head.db_pages as u64 * ps as u64)?;
        }
        state.resize(head.db_pages);
        let ck = br.read_checksum()?;
        ensure!(
            ck == state.checksum(),
            "state checksum mismatch after txid {} (stored {ck}, computed {})",
            head.txid,
            state.checksum()
        );
        last = Some((head.txid, head.time_us));
        if head.txid >= stop.txid {
            done = true;
        }
    }
    br.finish()?;
    Ok((last, done))
}

/// `PRAGMA integrity_check` on the restored file; anything but "ok" fails.
pub fn integrity_check(path: &Path) -> anyhow::Result<()> {
    let c = rusqlite::Connection::open(path)
        .with_context(|| format!("cannot open restored database {}", path.display()))?;
    let mut stmt = c.prepare("PRAGMA integrity_check")?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()
        .context("integrity_check failed to run on the restored database")?;
    drop(stmt);
    c.close().map_err(|(_, e)| e)?;
    if rows != ["ok"] {
        bail!(
            "restored database fails PRAGMA integrity_check: {}",
            rows.into_iter().take(5).collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
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
