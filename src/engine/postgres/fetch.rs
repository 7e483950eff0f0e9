//! `offsite pg wal-fetch %f %p`: PostgreSQL's `restore_command`.
//!
//! Exit status (docs/POSTGRES.md, "restore_command"): 0 once the whole file
//! is at `%p`; 1 when the archive does not hold it (PostgreSQL probes for
//! files that do not exist, and 1 is the answer it expects); and for
//! anything else (the store unreachable after retries, a damaged or
//! forged object, a wrong key) [`FATAL_EXIT`], which PostgreSQL treats as
//! fatal: it stops instead of ending recovery early at the last segment it
//! got, which would silently restore an older state.
//!
//! A segment is assembled from the pieces that cover it (a whole segment
//! from archive-push, or the partial pieces streaming shipped), checked
//! against its name, and zero-filled after the last byte the archive holds
//! (as a streamed `.partial` file is). The next `prefetch` whole segments
//! are fetched into the spool directory by a detached prefetcher
//! ([`prefetch_after`], started by the CLI once the asked-for file is
//! written), where the next calls find them: PostgreSQL replays one
//! segment while the following ones download and decrypt.

use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::StreamExt;

use super::archive::{self, WalPiece};
use super::walname::{format_lsn, LongHeader, SegmentName, WalFile, SEGMENT_SIZE};
use super::Reader;

/// The exit status for a failure that is not "not in the archive": above
/// 125, which PostgreSQL treats as fatal for a restore_command.
pub const FATAL_EXIT: i32 = 126;

#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Written { bytes: u64, complete: bool },
    Missing,
}

pub struct FetchOptions {
    pub prefetch: usize,
    pub spool_dir: PathBuf,
}

pub async fn wal_fetch(
    r: &Reader,
    name: &str,
    dest: &Path,
    opts: &FetchOptions,
) -> anyhow::Result<Fetched> {
    let wf = WalFile::parse(name)?;
    let seg = match wf {
        WalFile::Segment(seg) => seg,
        other => {
            let key = archive::file_key(&other)?;
            let (_, data) =
                match archive::read(r.store.as_ref(), &key, &r.trust, r.ids.as_ref()).await {
                    Ok(x) => x,
                    Err(e) if is_missing(&e) => return Ok(Fetched::Missing),
                    Err(e) => return Err(e),
                };
            write_durably(dest, &data)?;
            return Ok(Fetched::Written {
                bytes: data.len() as u64,
                complete: true,
            });
        }
    };
    let cached = opts.spool_dir.join(seg.to_string());
    if let Ok(data) = std::fs::read(&cached) {
        // Written by an earlier call after full verification.
        if data.len() as u64 == SEGMENT_SIZE {
            write_durably(dest, &data)?;
            let _ = std::fs::remove_file(&cached);
            return Ok(Fetched::Written {
                bytes: SEGMENT_SIZE,
                complete: true,
            });
        }
    }
    match assemble(r, seg).await? {
        None => Ok(Fetched::Missing),
        Some((data, reach)) => {
            write_durably(dest, &data)?;
            Ok(Fetched::Written {
                bytes: reach - seg.start_lsn(),
                complete: reach == seg.end_lsn(),
            })
        }
    }
}

fn is_missing(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<archive::Missing>())
}

/// The segment from the archive: its bytes (zero-filled past what the
/// archive holds) and how far the archive's bytes reach. `None`: not held.
async fn assemble(r: &Reader, seg: SegmentName) -> anyhow::Result<Option<(Vec<u8>, u64)>> {
    let pieces = archive::list_wal(r.store.as_ref(), Some(seg)).await?;
    let (chosen, reach) = archive::cover(&pieces, seg.start_lsn());
    if chosen.is_empty() {
        return Ok(None);
    }
    if reach < seg.end_lsn() {
        if let Some(after) = pieces.iter().find(|p| p.start > reach) {
            tracing::warn!(segment = %seg, "the archive has a gap in {seg} from {} to {}: recovery ends at the gap", format_lsn(reach), format_lsn(after.start));
        }
    }
    let bufs: Vec<anyhow::Result<(WalPiece, Vec<u8>)>> =
        futures::stream::iter(chosen.into_iter().map(|p| async move {
            let (_, data) =
                archive::read(r.store.as_ref(), &p.key, &r.trust, r.ids.as_ref()).await?;
            Ok((p, data))
        }))
        .buffered(8)
        .collect()
        .await;
    let mut out = vec![0u8; SEGMENT_SIZE as usize];
    let mut at = seg.start_lsn();
    for b in bufs {
        let (p, data) = b?;
        // Pieces overlap only with identical bytes: take what is new.
        let from = (at - p.start) as usize;
        let off = (at - seg.start_lsn()) as usize;
        out[off..off + data.len() - from].copy_from_slice(&data[from..]);
        at = p.end;
    }
    LongHeader::read(&out)
        .and_then(|h| h.check(seg, r.system_id))
        .with_context(|| format!("the archive's bytes of segment {seg} are not that segment"))?;
    Ok(Some((out, reach)))
}

/// Segments fetched at once by the prefetcher.
const PREFETCH_PARALLEL: usize = 4;

/// The prefetcher: fetch the `prefetch` whole segments after `name` (a
/// segment name) that the spool lacks, then return. One runs per spool at
/// a time (an advisory lock; a second returns at once). Failures are left
/// for the call that needs the segment; a partial segment (it may still
/// grow) is not spooled.
pub async fn prefetch_after(r: &Reader, name: &str, opts: &FetchOptions) -> anyhow::Result<()> {
    let WalFile::Segment(seg) = WalFile::parse(name)? else {
        return Ok(());
    };
    if opts.prefetch == 0 {
        return Ok(());
    }
    std::fs::create_dir_all(&opts.spool_dir)
        .with_context(|| format!("cannot create {}", opts.spool_dir.display()))?;
    let lock = std::fs::File::create(opts.spool_dir.join(".prefetch.lock"))?;
    // SAFETY: flock on an open descriptor; released when `lock` closes.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Ok(());
    }
    let mut next = Vec::new();
    let mut s = seg;
    for _ in 0..opts.prefetch {
        s = s.next();
        if !opts.spool_dir.join(s.to_string()).exists() {
            next.push(s);
        }
    }
    futures::stream::iter(next.into_iter().map(|s| async move {
        if let Ok(Some((data, reach))) = assemble(r, s).await {
            if reach == s.end_lsn() {
                let _ = write_durably(&opts.spool_dir.join(s.to_string()), &data);
            }
        }
    }))
    .buffer_unordered(PREFETCH_PARALLEL)
    .collect::<Vec<()>>()
    .await;
    drop(lock);
    Ok(())
}

/// Write temp, fsync, rename: PostgreSQL must never see a partial file.
pub(crate) fn write_durably(dest: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    tmp.write_all(data)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", dest.display()))?;
    tmp.persist(dest)
        .with_context(|| format!("cannot write {}", dest.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
