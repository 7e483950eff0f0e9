//! The shipped units: snapshot and segment bodies (docs/FORMAT.md, "Body").
//!
//! A body is a stream: a JSON header, then records, then a BLAKE3 of all of
//! it. Writers and readers work page by page so memory never depends on the
//! size of a database or a transaction.

use std::io::{self, Read, Write};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::checksum::{Checksum, PageState};
use crate::codec::{Envelope, ObjectKind};

pub const PAYLOAD_SQLITE_PAGES: &str = "sqlite-pages";
const MAX_HEADER: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotHeader {
    pub kind: String,
    pub payload: String,
    pub lineage: String,
    pub page_size: u32,
    pub envelope_blake3: String,
    pub txid: u64,
    pub time_us: i64,
    pub db_pages: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentHeader {
    pub kind: String,
    pub payload: String,
    pub lineage: String,
    pub page_size: u32,
    pub envelope_blake3: String,
    pub first_txid: u64,
    pub last_txid: u64,
    pub commit_count: u32,
    pub prev_checksum: String,
    /// Compaction level: 0 for shipped segments (every commit kept); 1 and
    /// up for compacted segments, which hold one merged commit (the newest
    /// version of every page written in the range). Absent means 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub level: u8,
    /// Compacted segments only: the smallest database size (pages) seen in
    /// the range. A reader truncates to it before writing the pages, so pages
    /// dropped and re-grown inside the range read as zeros, as they would
    /// after applying every commit in turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_to: Option<u32>,
}

impl SegmentHeader {
    /// The txid the `i`-th commit of the body must carry: consecutive from
    /// `first_txid`, or `last_txid` for a compacted segment's merged commit.
    pub fn commit_txid(&self, i: u32) -> u64 {
        if self.level == 0 {
            self.first_txid + i as u64
        } else {
            self.last_txid
        }
    }
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// Fixed-size head of one commit inside a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitHead {
    pub txid: u64,
    pub time_us: i64,
    pub db_pages: u32,
    pub records: u32,
}

const COMMIT_HEAD_SIZE: usize = 24;

impl CommitHead {
    fn encode(&self) -> [u8; COMMIT_HEAD_SIZE] {
        let mut b = [0u8; COMMIT_HEAD_SIZE];
        b[0..8].copy_from_slice(&self.txid.to_le_bytes());
        b[8..16].copy_from_slice(&self.time_us.to_le_bytes());
        b[16..20].copy_from_slice(&self.db_pages.to_le_bytes());
        b[20..24].copy_from_slice(&self.records.to_le_bytes());
        b
    }
    fn decode(b: &[u8; COMMIT_HEAD_SIZE]) -> Self {
        CommitHead {
            txid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            time_us: i64::from_le_bytes(b[8..16].try_into().unwrap()),
            db_pages: u32::from_le_bytes(b[16..20].try_into().unwrap()),
            records: u32::from_le_bytes(b[20..24].try_into().unwrap()),
        }
    }
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: blake3::Hasher::new(),
        }
    }
    fn finish(mut self) -> io::Result<W> {
        let digest = self.hasher.finalize();
        self.inner.write_all(digest.as_bytes())?;
        Ok(self.inner)
    }
}

fn write_header<W: Write, T: Serialize>(w: &mut W, h: &T) -> io::Result<()> {
    let json = serde_json::to_vec(h).expect("header serializes");
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&json)
}

/// Writes a snapshot body: pages 1..=db_pages in order.
pub struct SnapshotWriter<W: Write> {
    w: HashingWriter<W>,
    state: PageState,
    next_pgno: u32,
    db_pages: u32,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(sink: W, header: &SnapshotHeader) -> io::Result<Self> {
        let mut w = HashingWriter::new(sink);
        write_header(&mut w, header)?;
        Ok(SnapshotWriter {
            w,
            state: PageState::new(header.page_size as usize),
            next_pgno: 1,
            db_pages: header.db_pages,
        })
    }

    pub fn write_page(&mut self, page: &[u8]) -> io::Result<()> {
        assert!(self.next_pgno <= self.db_pages, "more pages than announced");
        self.state.set_page(self.next_pgno, page);
        self.w.write_all(page)?;
        self.next_pgno += 1;
        Ok(())
    }

    /// Returns the sink and the page state of the snapshot (the shipper keeps
    /// it to checksum the segments that follow).
    pub fn finish(mut self) -> io::Result<(W, PageState)> {
        assert_eq!(
            self.next_pgno,
            self.db_pages + 1,
            "fewer pages than announced"
        );
        let ck = self.state.checksum();
        self.w.write_all(&ck.0)?;
        Ok((self.w.finish()?, self.state))
    }
}

/// Writes a segment body. The caller computed each commit's state checksum
/// beforehand (the envelope's resume tag needs the last one before the body
/// is written).
pub struct SegmentWriter<W: Write> {
    w: HashingWriter<W>,
    open: Option<(CommitHead, u32)>,
    commits_left: u32,
}

impl<W: Write> SegmentWriter<W> {
    pub fn new(sink: W, header: &SegmentHeader) -> io::Result<Self> {
        let mut w = HashingWriter::new(sink);
        write_header(&mut w, header)?;
        Ok(SegmentWriter {
            w,
            open: None,
            commits_left: header.commit_count,
        })
    }

    pub fn begin_commit(&mut self, head: CommitHead) -> io::Result<()> {
        assert!(self.open.is_none() && self.commits_left > 0);
        self.w.write_all(&head.encode())?;
        self.open = Some((head, 0));
        Ok(())
    }

    pub fn write_record(&mut self, pgno: u32, page: &[u8]) -> io::Result<()> {
        let (head, n) = self.open.as_mut().expect("begin_commit first");
        assert!(
            pgno >= 1 && pgno <= head.db_pages,
            "page {pgno} outside the database"
        );
        *n += 1;
        self.w.write_all(&pgno.to_le_bytes())?;
        self.w.write_all(page)
    }

    pub fn end_commit(&mut self, checksum: &Checksum) -> io::Result<()> {
        let (head, n) = self.open.take().expect("begin_commit first");
        assert_eq!(n, head.records, "record count differs from the commit head");
        self.w.write_all(&checksum.0)?;
        self.commits_left -= 1;
        Ok(())
    }

    pub fn finish(self) -> io::Result<W> {
        assert!(self.open.is_none() && self.commits_left == 0);
        self.w.finish()
    }
}

/// Reads a body and checks it against its envelope and object key.
pub struct BodyReader<R: Read> {
    r: R,
    hasher: blake3::Hasher,
    pub page_size: usize,
}

pub enum Header {
    Snapshot(SnapshotHeader),
    Segment(SegmentHeader),
}

impl<R: Read> BodyReader<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        self.r
            .read_exact(buf)
            .context("object body is truncated or damaged")?;
        self.hasher.update(buf);
        Ok(())
    }

    pub fn open(r: R, env: &Envelope) -> anyhow::Result<(Self, Header)> {
        let mut br = BodyReader {
            r,
            hasher: blake3::Hasher::new(),
            page_size: 0,
        };
        let mut len = [0u8; 4];
        br.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        ensure!(len <= MAX_HEADER, "object body header is implausibly large");
        let mut json = vec![0u8; len as usize];
        br.read_exact(&mut json)?;
        let header = match env.kind {
            ObjectKind::Snapshot => {
                let h: SnapshotHeader =
                    serde_json::from_slice(&json).context("snapshot header is not valid")?;
                ensure!(
                    h.kind == "snapshot",
                    "body kind {:?} differs from envelope",
                    h.kind
                );
                ensure!(
                    h.txid == env.meta.first_txid && h.txid == env.meta.last_txid,
                    "snapshot txid differs from its envelope"
                );
                check_common(&h.payload, &h.lineage, h.page_size, &h.envelope_blake3, env)?;
                br.page_size = h.page_size as usize;
                Header::Snapshot(h)
            }
            ObjectKind::Segment => {
                let h: SegmentHeader =
                    serde_json::from_slice(&json).context("segment header is not valid")?;
                ensure!(
                    h.kind == "segment",
                    "body kind {:?} differs from envelope",
                    h.kind
                );
                ensure!(
                    h.first_txid == env.meta.first_txid && h.last_txid == env.meta.last_txid,
                    "segment txid range differs from its envelope"
                );
                ensure!(
                    h.last_txid >= h.first_txid,
                    "segment txid range is inverted"
                );
                if h.level == 0 {
                    ensure!(
                        h.last_txid - h.first_txid + 1 == h.commit_count as u64
                            && h.truncate_to.is_none(),
                        "segment commit count does not match its txid range"
                    );
                } else {
                    ensure!(
                        h.commit_count == 1 && h.truncate_to.is_some(),
                        "compacted segment must hold exactly one merged commit and its truncation size"
                    );
                }
                check_common(&h.payload, &h.lineage, h.page_size, &h.envelope_blake3, env)?;
                br.page_size = h.page_size as usize;
                Header::Segment(h)
            }
        };
        Ok((br, header))
    }

    pub fn read_page(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        self.read_exact(buf)
    }

    pub fn read_commit_head(&mut self) -> anyhow::Result<CommitHead> {
        let mut b = [0u8; COMMIT_HEAD_SIZE];
        self.read_exact(&mut b)?;
        Ok(CommitHead::decode(&b))
    }

    pub fn read_record(&mut self, buf: &mut [u8]) -> anyhow::Result<u32> {
        let mut p = [0u8; 4];
        self.read_exact(&mut p)?;
        self.read_exact(buf)?;
        Ok(u32::from_le_bytes(p))
    }

    pub fn read_checksum(&mut self) -> anyhow::Result<Checksum> {
        let mut b = [0u8; 16];
        self.read_exact(&mut b)?;
        Ok(Checksum(b))
    }

    /// Verify the trailing BLAKE3 and that nothing follows it.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let expect = self.hasher.finalize();
        let mut got = [0u8; 32];
        self.r
            .read_exact(&mut got)
            .context("object body is truncated (missing final hash)")?;
        if got != *expect.as_bytes() {
            bail!("object body hash mismatch (object damaged or tampered with)");
        }
        let mut extra = [0u8; 1];
        match self.r.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => bail!("object has trailing data after its body"),
            Err(e) => Err(anyhow::Error::new(e).context("object is damaged after its body")),
        }
    }
}

fn check_common(
    payload: &str,
    lineage: &str,
    page_size: u32,
    env_hash: &str,
    env: &Envelope,
) -> anyhow::Result<()> {
    ensure!(
        payload == PAYLOAD_SQLITE_PAGES,
        "unsupported payload type {payload:?}"
    );
    ensure!(
        lineage == env.meta.lineage,
        "body lineage {lineage} differs from envelope lineage {}",
        env.meta.lineage
    );
    ensure!(
        (512..=65536).contains(&page_size) && page_size.is_power_of_two(),
        "invalid page size {page_size}"
    );
    ensure!(
        env_hash == env.blake3_hex(),
        "envelope was modified (envelope_blake3 mismatch)"
    );
    Ok(())
}
