//! Shipping SQLite: commits read from the WAL and snapshots read under the
//! read lock, written as `sqlite-pages` bodies into the codec's writer; the
//! resume position (docs/FORMAT.md, "SQLite resume position") and the proof,
//! after a restart, that the local database is still at the replica's head;
//! folding shipped commits into the compaction windows.

use std::io::Write;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::checksum::{terms_parallel, Checksum, PageState};
use super::compact::{Closed, Compactor};
use super::pages::{self, SegmentFields, SnapshotFields};
use super::source::{SnapshotView, SqliteSource, WalPos};
use super::wal::FrameBlocks;
use crate::codec::{Envelope, EnvelopeMeta, ObjectKind, ObjectWriter, Seal};
use crate::engine::Break;
use crate::engine::Engine;
use crate::segment::{Link, SegmentWriter, SnapshotWriter};

/// The SQLite resume position stored in every envelope (`resume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// WAL frames shipped in the current WAL.
    pub frames: u64,
    /// The resume tag: the WAL position and the state checksum there.
    pub tag: String,
    /// The state alone (used when the WAL is gone).
    pub state_tag: String,
}

impl Resume {
    fn new(pos: &WalPos, ck: &Checksum) -> Resume {
        Resume {
            frames: pos.frames as u64,
            tag: pos.resume_tag(ck),
            state_tag: ck.state_tag(),
        }
    }
    fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("resume serializes")
    }
}

/// What a built object is, for the pipeline: its txid range, last commit
/// time and raw size, and the engine state and chain link before its first
/// and after each of its commits (segments).
pub struct Built {
    pub first_txid: u64,
    pub last_txid: u64,
    pub last_time_us: i64,
    pub raw_bytes: u64,
    pub prev: (Checksum, Link),
    pub ends: Vec<(Checksum, Link)>,
}

impl Built {
    /// The chain link after the object.
    pub fn end_link(&self) -> Link {
        self.ends.last().map(|e| e.1).unwrap_or(self.prev.1)
    }
}

fn envelope(
    kind: ObjectKind,
    seal: &Seal,
    lineage: &str,
    (first, last): (u64, u64),
    (time_us, level): (i64, u8),
    link: Link,
    resume: serde_json::Value,
) -> Envelope {
    // The replica, database and signer fields are the seal's to fill.
    Envelope::new(
        kind,
        seal,
        EnvelopeMeta {
            engine: Engine::Sqlite.name().into(),
            replica: String::new(),
            database: String::new(),
            lineage: lineage.to_string(),
            first_txid: first,
            last_txid: last,
            time_us,
            level,
            signer: String::new(),
            link: link.to_hex(),
            resume,
        },
    )
}

/// Build a snapshot object of `view` in two passes: the checksum first (the
/// envelope's resume position needs it), then the pages, streamed into
/// `sink`. `link`: the chain's link at `txid` for a snapshot inside a
/// lineage; `None` for a lineage's first snapshot (its genesis link).
#[allow(clippy::too_many_arguments)]
pub fn build_snapshot<W: Write>(
    src: &mut SqliteSource,
    view: &SnapshotView,
    lineage: &str,
    (txid, time_us): (u64, i64),
    link: Option<Link>,
    seal: &Seal,
    sink: W,
) -> anyhow::Result<(W, Built, PageState)> {
    let page_size = src.page_size();
    let mut st = PageState::new(page_size as usize);
    // Pass 1 hashes on every core; pass 2 hashes again while zstd's
    // workers compress (the two must agree: nothing changed under R).
    for (i, t) in src.snapshot_terms(view)?.into_iter().enumerate() {
        st.set_term(i as u32 + 1, t);
    }
    st.resize(view.db_pages);
    let ck = st.checksum();
    let link = link.unwrap_or_else(|| Link::genesis(lineage, txid, time_us, &ck.0));
    let env = envelope(
        ObjectKind::Snapshot,
        seal,
        lineage,
        (txid, txid),
        (time_us, 0),
        link,
        Resume::new(&view.pos, &ck).to_value(),
    );
    let header = pages::snapshot_header(
        lineage,
        env.blake3_hex(),
        (txid, time_us),
        link,
        SnapshotFields::new(page_size, view.db_pages),
    );
    let ow = ObjectWriter::sized(sink, &env, seal, view.db_pages as u64 * page_size as u64)?;
    let mut sw = SnapshotWriter::new(ow, &header)?;
    let mut again = PageState::new(page_size as usize);
    src.snapshot_read(view, |pgno, page| {
        again.set_page(pgno, page);
        Ok(sw.write_data(page)?)
    })?;
    again.resize(view.db_pages);
    let ow = sw.finish(&ck.0)?;
    if !src.wal_unchanged()? {
        bail!("the WAL was restarted while the snapshot was read; retrying");
    }
    if again.checksum() != ck {
        bail!("the database changed under the snapshot's read lock (checksum {ck} vs {}); this is a bug, please report it", again.checksum());
    }
    let sink = ow.finish()?;
    Ok((
        sink,
        Built {
            first_txid: txid,
            last_txid: txid,
            last_time_us: time_us,
            raw_bytes: view.db_pages as u64 * page_size as u64,
            prev: (ck, link),
            ends: Vec::new(),
        },
        st,
    ))
}

/// Build a level-0 segment of the first `n` pending commits, continuing
/// `state` and the chain at `link`, into `sink`. The state is advanced (the
/// caller journals it, to roll back if the upload fails).
pub fn build_segment<W: Write>(
    src: &mut SqliteSource,
    n: usize,
    state: &mut PageState,
    link: Link,
    lineage: &str,
    seal: &Seal,
    sink: W,
) -> anyhow::Result<(W, Built)> {
    let commits = &src.pending()[..n];
    let ps = src.page_size();
    let prev = (state.checksum(), link);
    // Pass 1: per-commit state checksums and links (the envelope carries the last).
    let mut ends: Vec<(Checksum, Link)> = Vec::with_capacity(n);
    let mut raw = 0u64;
    let frames: Vec<Vec<(u32, u32)>> = commits.iter().map(|c| c.page_frames()).collect();
    let mut at = link;
    // The pages' terms, hashed on every core, then applied in order.
    let flat: Vec<(u32, u32)> = frames.iter().flatten().copied().collect();
    let wal = src.wal_parts();
    let terms = terms_parallel(flat.len(), |range, sink| {
        let mut blocks = FrameBlocks::new(wal);
        for &(pgno, idx) in &flat[range] {
            sink(pgno, blocks.page(idx)?);
        }
        Ok(())
    })?;
    let mut terms = terms.into_iter();
    for (c, pages) in commits.iter().zip(&frames) {
        for &(pgno, _) in pages {
            state.set_term(pgno, terms.next().expect("a term per page"));
            raw += ps as u64;
        }
        state.resize(c.commit.db_pages);
        let ck = state.checksum();
        at = at.next(c.txid, c.time_us, &ck.0);
        ends.push((ck, at));
    }
    let first = commits[0].txid;
    let last = commits[n - 1].txid;
    let pos = src.position_after(n);
    let end_ck = ends.last().unwrap().0;
    let env = envelope(
        ObjectKind::Segment,
        seal,
        lineage,
        (first, last),
        (commits[n - 1].time_us, 0),
        at,
        Resume::new(&pos, &end_ck).to_value(),
    );
    let header = pages::segment_header(
        lineage,
        env.blake3_hex(),
        (first, last),
        n as u32,
        0,
        link,
        None,
        SegmentFields::new(ps, None),
    );
    let ow = ObjectWriter::sized(sink, &env, seal, raw)?;
    let mut sw = SegmentWriter::new(ow, &header)?;
    // Pass 2: write the records.
    let mut blocks = src.frame_blocks();
    for ((c, (ck, _)), pages) in commits.iter().zip(&ends).zip(&frames) {
        let db_pages = c.commit.db_pages;
        pages::begin_commit(
            &mut sw,
            (c.txid, c.time_us),
            db_pages,
            pages.len() as u32,
            ps,
        )?;
        for &(pgno, idx) in pages {
            pages::write_record(&mut sw, db_pages, pgno, blocks.page(idx)?)?;
        }
        sw.end_commit(&ck.0)?;
    }
    let t_last = commits[n - 1].time_us;
    let sink = sw.finish()?.finish()?;
    // The pages are valid only if the WAL was not restarted while we read them.
    if !src.wal_unchanged()? {
        bail!("the WAL was restarted while its frames were being read");
    }
    Ok((
        sink,
        Built {
            first_txid: first,
            last_txid: last,
            last_time_us: t_last,
            raw_bytes: raw,
            prev,
            ends,
        },
    ))
}

/// Build a compacted segment's object (`closed`, one merged commit) into `sink`.
pub fn build_compacted<W: Write>(
    closed: &Closed,
    lineage: &str,
    seal: &Seal,
    sink: W,
) -> anyhow::Result<W> {
    let env = envelope(
        ObjectKind::Segment,
        seal,
        lineage,
        (closed.first_txid(), closed.last_txid()),
        (closed.last_time_us(), closed.level),
        closed.end_link(),
        // Compacted segments are never a resume point.
        serde_json::Value::Null,
    );
    let header = closed.header(lineage, env.blake3_hex());
    let ow = ObjectWriter::sized(sink, &env, seal, closed.raw_bytes())?;
    Ok(closed.write_body(ow, &header)?.finish()?)
}

/// Fold the first `n` pending commits (just shipped as `built`) into the
/// open compaction windows; windows that closed are appended to `closed`.
pub fn fold(
    compactor: &mut Compactor,
    src: &SqliteSource,
    n: usize,
    built: &Built,
    closed: &mut Vec<Closed>,
) -> anyhow::Result<()> {
    let mut prev = built.prev;
    let mut blocks = src.frame_blocks();
    for (p, end) in src.pending()[..n].iter().zip(&built.ends) {
        closed.extend(compactor.close_due(p.time_us)?);
        compactor.begin_commit(p.txid, p.time_us, prev)?;
        for (pgno, idx) in p.page_frames() {
            compactor.put_page(pgno, blocks.page(idx)?)?;
        }
        compactor.end_commit(p.commit.db_pages, *end);
        prev = *end;
    }
    Ok(())
}

/// How a resume was proven.
pub enum Resumed {
    /// At the WAL position the replica's head names.
    AtWal { frames: u32 },
    /// The WAL offsite shipped from is gone, and the database file alone is
    /// the replica's head state.
    AtDatabaseFile,
}

/// Prove that the local database is at the state the replica's head object
/// names (`resume`, from its envelope): at the same WAL position, or (when
/// that WAL is gone) as the database file alone. Returns the page state
/// there, or why the chain cannot continue.
pub fn resume(
    src: &mut SqliteSource,
    resume: &serde_json::Value,
) -> anyhow::Result<Result<(PageState, Resumed), Break>> {
    let r: Resume = serde_json::from_value(resume.clone())
        .context("the replica's newest object has no valid SQLite resume position")?;
    // Find the local WAL position with the replica's frame count, then
    // prove it (and the database state there) against the tag.
    let mut candidates = src.local_positions()?;
    candidates.reverse();
    for pos in candidates
        .into_iter()
        .filter(|p| p.frames as u64 == r.frames)
    {
        if let Ok(state) = src.resume(&pos, |p, ck| p.resume_tag(ck) == r.tag)? {
            return Ok(Ok((state, Resumed::AtWal { frames: pos.frames })));
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
    if !src.wal_untouched_by_checkpoints() {
        return Ok(Err(Break::hard(
            "the WAL offsite shipped from is gone and the current one was already checkpointed",
        )));
    }
    if let Ok(state) = src.resume(&start, |_, ck| ck.state_tag() == r.state_tag)? {
        return Ok(Ok((state, Resumed::AtDatabaseFile)));
    }
    Ok(Err(Break::hard(
        "the local database is not at the replica's newest state (the WAL was checkpointed or changed while offsite was not running)",
    )))
}
