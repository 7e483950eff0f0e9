//! `offsite pg archive-push %p`: PostgreSQL's `archive_command`.
//!
//! Exit 0 only once the file is durable in the store (an upload that
//! returned, after the storage backend's own durability: fsync + rename on
//! `file://`, a completed PUT on S3). A re-push of identical content is
//! success; the same name with different content is an error and nothing
//! is overwritten (history files included). The archiver runs one command
//! at a time, so each call also pushes up to `lookahead` other files that
//! `archive_status/*.ready` lists, in parallel; their later calls find
//! them stored (a local marker, checked against the file's hash, saves the
//! round trip).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use futures::StreamExt;

use super::archive::{self, PgMeta, PutOutcome};
use super::walname::{LongHeader, WalFile, SEGMENT_SIZE};
use super::Writer;

pub struct PushOptions {
    /// Other `.ready` files pushed alongside, in parallel.
    pub lookahead: usize,
    /// Where markers of pushed files are kept (local cache only).
    pub spool_dir: PathBuf,
}

/// Push the file at `path` (and look ahead). Returns what happened to `path`.
pub async fn archive_push(
    w: &Writer,
    path: &Path,
    opts: &PushOptions,
) -> anyhow::Result<PutOutcome> {
    let name = file_name(path)?;
    let wf = WalFile::parse(&name)?;
    let mut others = Vec::new();
    if opts.lookahead > 0 {
        others = ready_files(path, &name, opts.lookahead);
    }
    let main = push_file(w, path, &name, &wf, &opts.spool_dir);
    let rest = futures::stream::iter(others.into_iter().map(|(p, n)| {
        let spool = opts.spool_dir.clone();
        async move {
            let r = match WalFile::parse(&n) {
                Ok(wf) => push_file(w, &p, &n, &wf, &spool).await,
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                // PostgreSQL will ask for it again; that call reports it.
                tracing::warn!(file = %n, "look-ahead push failed (retried when PostgreSQL archives it): {e:#}");
            }
        }
    }))
    .buffer_unordered(opts.lookahead.max(1))
    .collect::<Vec<()>>();
    let (r, _) = tokio::join!(main, rest);
    r
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{} is not a WAL file path", path.display()))
}

/// The next `n` files (oldest first) PostgreSQL has marked ready to archive
/// beside `path` (`pg_wal/archive_status/<name>.ready`), other than `name`.
fn ready_files(path: &Path, name: &str, n: usize) -> Vec<(PathBuf, String)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let Ok(rd) = std::fs::read_dir(dir.join("archive_status")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|s| s.strip_suffix(".ready"))
                .map(str::to_string)
        })
        .filter(|s| s != name && WalFile::parse(s).is_ok())
        .collect();
    // Segments before history files, in WAL order (what the archiver does).
    names.sort_by_key(|s| (s.ends_with(".history"), s.clone()));
    names
        .into_iter()
        .take(n)
        .map(|s| (dir.join(&s), s))
        .collect()
}

async fn push_file(
    w: &Writer,
    path: &Path,
    name: &str,
    wf: &WalFile,
    spool: &Path,
) -> anyhow::Result<PutOutcome> {
    let data = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let hash = archive::content_hash(&data);
    let marker = spool.join(format!("{name}.pushed"));
    if tokio::fs::read_to_string(&marker)
        .await
        .is_ok_and(|m| m.trim() == hash)
    {
        return Ok(PutOutcome::AlreadyThere);
    }
    let system_id = w.system_id.to_string();
    let meta = match wf {
        WalFile::Segment(seg) => {
            ensure!(
                data.len() as u64 == SEGMENT_SIZE,
                "{} is {} bytes, not a 16 MiB WAL segment (this offsite supports the default --wal-segsize only)",
                path.display(),
                data.len()
            );
            LongHeader::read(&data)
                .and_then(|h| h.check(*seg, Some(w.system_id)))
                .with_context(|| {
                    format!(
                        "{} is not WAL segment {seg} of this cluster",
                        path.display()
                    )
                })?;
            PgMeta::Wal {
                segment: seg.to_string(),
                start: seg.start_lsn(),
                end: seg.end_lsn(),
                blake3: hash.clone(),
                system_id,
            }
        }
        other => {
            ensure!(
                data.len() as u64 <= SEGMENT_SIZE,
                "{} is larger than any file PostgreSQL archives",
                path.display()
            );
            PgMeta::File {
                name: other.to_string(),
                blake3: hash.clone(),
                system_id,
            }
        }
    };
    let key = meta.key()?;
    let seal = w.seal.clone();
    let sealed =
        tokio::task::spawn_blocking(move || archive::seal(&seal, &meta, super::now_us(), &data))
            .await
            .context("sealing task failed")??;
    let out = archive::put_once(w.store.as_ref(), &key, sealed, &hash, &w.trust).await?;
    // A local cache only: losing it costs one check against the store.
    if tokio::fs::create_dir_all(spool).await.is_ok() {
        let _ = tokio::fs::write(&marker, &hash).await;
    }
    match out {
        PutOutcome::Stored => tracing::info!(file = %name, key = %key, "archived"),
        PutOutcome::AlreadyThere => {
            tracing::info!(file = %name, "already archived with the same content")
        }
    }
    Ok(out)
}
