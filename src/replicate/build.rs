//! Building segment and snapshot objects from the source (and reading the
//! replica's newest envelope at startup).

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::retry::with_retries;
use super::spool::Spool;
use crate::checksum::{Checksum, PageState};
use crate::codec::{Encryption, Envelope, EnvelopeMeta, ObjectKind, ObjectWriter};
use crate::layout;
use crate::segment::{
    CommitHead, SegmentHeader, SegmentWriter, SnapshotHeader, SnapshotWriter, PAYLOAD_SQLITE_PAGES,
};
use crate::source::sqlite::{SqliteSource, WalPos};
use crate::storage::{Body, DynStorage};

/// A finished object ready for upload.
pub(super) struct Staged {
    pub(super) key: String,
    pub(super) body: Body,
    _tmp: Option<tempfile::NamedTempFile>,
    pub(super) raw_bytes: u64,
    /// Segments: the state checksum before the first commit and after each.
    pub(super) prev: Option<Checksum>,
    pub(super) sums: Vec<Checksum>,
}

pub(super) async fn read_envelope(store: &DynStorage, key: &str) -> anyhow::Result<Envelope> {
    let head = with_retries("read the newest object", || store.get_range(key, 0, 4096)).await?;
    Envelope::read_from(&mut &head[..]).with_context(|| format!("object {key} is damaged"))
}

/// Positions the local WAL offers for resuming, newest first.
pub(super) fn candidate_positions(src: &mut SqliteSource) -> anyhow::Result<Vec<WalPos>> {
    let mut v = src.local_positions()?;
    v.reverse();
    Ok(v)
}

/// Build a snapshot object of `view` in two passes: the checksum first (the
/// envelope's resume tag needs it), then the pages, streamed.
pub(super) fn build_snapshot(
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

pub(super) fn build_segment(
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
