//! The shipped units: snapshot and segment bodies (docs/FORMAT.md, "Body").
//!
//! A body is a stream: a JSON header, then the engine's data framed in
//! commits, then a BLAKE3 of all of it. This module knows the generic frame
//! (txids, times, commit boundaries, the chain link, the body hash) and
//! nothing of what an engine puts in a commit's payload: it hands the engine
//! a reader bounded to the payload's declared length. Writers and readers
//! work in a stream, so memory never depends on the size of a database or a
//! transaction.
//!
//! Format-1 bodies (SQLite only, written before the engine boundary) are
//! read through the same interface: their headers are converted, and their
//! commits' SQLite fields are handed to the engine as the payload's start.

use std::io::{self, Read, Write};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::codec::{Envelope, HashingWriter, ObjectKind};

const MAX_HEADER: u32 = 1 << 20;

/// A link of the lineage's chain (docs/FORMAT.md, "Chain link"): 16 bytes
/// that name the history up to a txid. Engine-neutral: computed from txids,
/// times and the engine's 16-byte state digest after each commit.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Link(pub [u8; 16]);

/// An engine's 16-byte digest of its state after a commit or snapshot.
pub type Digest = [u8; 16];

impl Link {
    /// The link of a lineage's first snapshot.
    pub fn genesis(lineage: &str, txid: u64, time_us: i64, digest: &Digest) -> Link {
        let mut h = blake3::Hasher::new();
        h.update(b"offsite-genesis-v2");
        h.update(&(lineage.len() as u32).to_le_bytes());
        h.update(lineage.as_bytes());
        h.update(&txid.to_le_bytes());
        h.update(&time_us.to_le_bytes());
        h.update(digest);
        Link(h.finalize().as_bytes()[..16].try_into().unwrap())
    }

    /// The link after commit `txid` (at `time_us`, leaving the engine state
    /// `digest`) that continues `self`.
    pub fn next(&self, txid: u64, time_us: i64, digest: &Digest) -> Link {
        let mut h = blake3::Hasher::new();
        h.update(b"offsite-link-v2");
        h.update(&self.0);
        h.update(&txid.to_le_bytes());
        h.update(&time_us.to_le_bytes());
        h.update(digest);
        Link(h.finalize().as_bytes()[..16].try_into().unwrap())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> anyhow::Result<Link> {
        let v = hex::decode(s).map_err(|e| anyhow::anyhow!("invalid chain link {s:?}: {e}"))?;
        let arr: [u8; 16] = v
            .try_into()
            .map_err(|_| anyhow::anyhow!("invalid chain link {s:?}: expected 32 hex digits"))?;
        Ok(Link(arr))
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotHeader {
    pub kind: String,
    pub engine: String,
    pub lineage: String,
    pub envelope_blake3: String,
    pub txid: u64,
    pub time_us: i64,
    /// The chain link at `txid`: the genesis link for a lineage's first
    /// snapshot, the chain's link at that txid for a later one. Empty in
    /// format 1, where the state digest is the link.
    pub link: String,
    /// The engine's own header fields (SQLite: page size, database size).
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentHeader {
    pub kind: String,
    pub engine: String,
    pub lineage: String,
    pub envelope_blake3: String,
    pub first_txid: u64,
    pub last_txid: u64,
    pub commit_count: u32,
    /// Compaction level: 0 for shipped segments (every commit kept); 1 and
    /// up for compacted segments, which hold one merged commit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub level: u8,
    /// The chain link the first commit continues.
    pub prev_link: String,
    /// Compacted segments only: the chain link after `last_txid` (the merged
    /// commit stands for several, so the link cannot be recomputed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_link: Option<String>,
    /// The engine's own header fields.
    pub payload: serde_json::Value,
}

impl SegmentHeader {
    /// The txid the `i`-th commit of the body must carry: consecutive from
    /// `first_txid`, or `last_txid` for a compacted segment's merged commit.
    pub fn commit_txid(&self, i: u32) -> u64 {
        if self.level == 0 {
            self.first_txid.saturating_add(i as u64)
        } else {
            self.last_txid
        }
    }
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// Generic head of one commit: its txid and time and the length of the
/// engine payload that follows (then the engine's 16-byte state digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitHead {
    pub txid: u64,
    pub time_us: i64,
    pub payload_len: u64,
}

const COMMIT_HEAD_SIZE: usize = 24;

impl CommitHead {
    fn encode(&self) -> [u8; COMMIT_HEAD_SIZE] {
        let mut b = [0u8; COMMIT_HEAD_SIZE];
        b[0..8].copy_from_slice(&self.txid.to_le_bytes());
        b[8..16].copy_from_slice(&self.time_us.to_le_bytes());
        b[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }
}

/// The body's trailing hash: what the writer hashed, appended.
fn finish_hashed<W: Write>(w: HashingWriter<W>) -> io::Result<W> {
    let (mut inner, digest) = w.finish()?;
    inner.write_all(digest.as_bytes())?;
    Ok(inner)
}

fn write_header<W: Write, T: Serialize>(w: &mut W, h: &T) -> io::Result<()> {
    let json = serde_json::to_vec(h).expect("header serializes");
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&json)
}

/// Writes a snapshot body: the header, the engine's data, its digest.
pub struct SnapshotWriter<W: Write> {
    w: HashingWriter<W>,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(sink: W, header: &SnapshotHeader) -> io::Result<Self> {
        let mut w = HashingWriter::new(sink);
        write_header(&mut w, header)?;
        Ok(SnapshotWriter { w })
    }

    /// The engine's snapshot data.
    pub fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        self.w.write_all(data)
    }

    pub fn finish(mut self, digest: &Digest) -> io::Result<W> {
        self.w.write_all(digest)?;
        finish_hashed(self.w)
    }
}

/// Writes a segment body: the header, then per commit the generic head, the
/// engine payload (exactly `payload_len` bytes) and the engine's digest.
pub struct SegmentWriter<W: Write> {
    w: HashingWriter<W>,
    /// The open commit's declared and written payload bytes.
    open: Option<(u64, u64)>,
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
        self.open = Some((head.payload_len, 0));
        Ok(())
    }

    pub fn write_payload(&mut self, data: &[u8]) -> io::Result<()> {
        let (len, n) = self.open.as_mut().expect("begin_commit first");
        *n += data.len() as u64;
        assert!(*n <= *len, "payload longer than its commit head declares");
        self.w.write_all(data)
    }

    pub fn end_commit(&mut self, digest: &Digest) -> io::Result<()> {
        let (len, n) = self.open.take().expect("begin_commit first");
        assert_eq!(n, len, "payload shorter than its commit head declares");
        self.w.write_all(digest)?;
        self.commits_left -= 1;
        Ok(())
    }

    pub fn finish(self) -> io::Result<W> {
        assert!(self.open.is_none() && self.commits_left == 0);
        finish_hashed(self.w)
    }
}

/// Reads a body and checks it against its envelope.
pub struct BodyReader<R: Read> {
    r: R,
    hasher: blake3::Hasher,
    /// Read but not yet hashed (at most `HASH_BATCH` bytes).
    unhashed: Vec<u8>,
    legacy: Option<legacy::Reading>,
    /// Bytes of the current commit's payload not yet read.
    payload_left: u64,
    /// Format 1: the commit head's SQLite fields, handed out first.
    prefix: Vec<u8>,
}

pub enum Header {
    Snapshot(SnapshotHeader),
    Segment(SegmentHeader),
}

/// Bytes read gathered before they are hashed: BLAKE3 hashes a long input
/// many chunks at a time, a short one (a page number, a page) a block at a time.
const HASH_BATCH: usize = 64 << 10;

impl<R: Read> BodyReader<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        self.r
            .read_exact(buf)
            .context("object body is truncated or damaged")?;
        if self.unhashed.len() + buf.len() > HASH_BATCH {
            self.hasher.update(&self.unhashed);
            self.unhashed.clear();
        }
        if buf.len() >= HASH_BATCH {
            self.hasher.update(buf);
        } else {
            self.unhashed.extend_from_slice(buf);
        }
        Ok(())
    }

    /// Written before the engine boundary (format 1).
    pub fn is_legacy(&self) -> bool {
        self.legacy.is_some()
    }

    pub fn open(r: R, env: &Envelope) -> anyhow::Result<(Self, Header)> {
        let mut br = BodyReader {
            r,
            hasher: blake3::Hasher::new(),
            unhashed: Vec::with_capacity(HASH_BATCH),
            legacy: None,
            payload_left: 0,
            prefix: Vec::new(),
        };
        let mut len = [0u8; 4];
        br.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        ensure!(len <= MAX_HEADER, "object body header is implausibly large");
        let mut json = vec![0u8; len as usize];
        br.read_exact(&mut json)?;
        let header = if env.is_legacy() {
            let (h, reading) = legacy::convert(&json, env)?;
            br.legacy = Some(reading);
            h
        } else {
            match env.kind {
                ObjectKind::Snapshot => Header::Snapshot(
                    serde_json::from_slice(&json).context("snapshot header is not valid")?,
                ),
                ObjectKind::Segment => Header::Segment(
                    serde_json::from_slice(&json).context("segment header is not valid")?,
                ),
            }
        };
        match &header {
            Header::Snapshot(h) => {
                ensure!(
                    h.kind == "snapshot" && env.kind == ObjectKind::Snapshot,
                    "body kind {:?} differs from envelope",
                    h.kind
                );
                ensure!(
                    h.txid == env.meta.first_txid && h.txid == env.meta.last_txid,
                    "snapshot txid differs from its envelope"
                );
                check_common(&h.engine, &h.lineage, &h.envelope_blake3, env)?;
                if !env.is_legacy() {
                    Link::from_hex(&h.link).context("snapshot header")?;
                }
            }
            Header::Segment(h) => {
                ensure!(
                    h.kind == "segment" && env.kind == ObjectKind::Segment,
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
                            && h.end_link.is_none(),
                        "segment commit count does not match its txid range"
                    );
                } else {
                    ensure!(
                        h.commit_count == 1 && (env.is_legacy() || h.end_link.is_some()),
                        "compacted segment must hold exactly one merged commit and its end link"
                    );
                }
                check_common(&h.engine, &h.lineage, &h.envelope_blake3, env)?;
                Link::from_hex(&h.prev_link).context("segment header")?;
                if let Some(l) = &h.end_link {
                    Link::from_hex(l).context("segment header")?;
                }
            }
        }
        Ok((br, header))
    }

    /// The engine's snapshot data or commit payload: read exactly.
    pub fn read_data(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        self.read_exact(buf)
    }

    pub fn read_commit_head(&mut self) -> anyhow::Result<CommitHead> {
        ensure!(
            self.payload_left == 0 && self.prefix.is_empty(),
            "the previous commit's payload was not read to its end"
        );
        let mut b = [0u8; COMMIT_HEAD_SIZE];
        self.read_exact(&mut b)?;
        let txid = u64::from_le_bytes(b[0..8].try_into().unwrap());
        let time_us = i64::from_le_bytes(b[8..16].try_into().unwrap());
        let tail: [u8; 8] = b[16..24].try_into().unwrap();
        let payload_len = match &self.legacy {
            Some(l) => {
                // Format 1: db_pages and the record count; the payload is
                // those 8 bytes and the records.
                let records = u32::from_le_bytes(tail[4..8].try_into().unwrap()) as u64;
                // Checked: the header's page size is not validated here.
                let len = records
                    .checked_mul(4 + l.page_size as u64)
                    .and_then(|n| n.checked_add(8))
                    .context("commit payload length overflows (damaged or hostile commit head)")?;
                self.prefix = tail.to_vec();
                len
            }
            None => u64::from_le_bytes(tail),
        };
        self.payload_left = payload_len - self.prefix.len() as u64;
        Ok(CommitHead {
            txid,
            time_us,
            payload_len,
        })
    }

    /// The open commit's payload, bounded to its declared length.
    pub fn payload(&mut self) -> Payload<'_, R> {
        Payload { br: self }
    }

    /// Read (and hash) the rest of the open commit's payload unapplied.
    pub fn skip_payload(&mut self) -> anyhow::Result<()> {
        self.prefix.clear();
        let mut buf = vec![0u8; 64 << 10];
        while self.payload_left > 0 {
            let n = self.payload_left.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..n])?;
            self.payload_left -= n as u64;
        }
        Ok(())
    }

    /// The engine's 16-byte digest after a commit or a snapshot's data.
    pub fn read_digest(&mut self) -> anyhow::Result<Digest> {
        ensure!(
            self.payload_left == 0 && self.prefix.is_empty(),
            "commit payload is longer than its engine read"
        );
        let mut b = [0u8; 16];
        self.read_exact(&mut b)?;
        Ok(b)
    }

    /// Verify the trailing BLAKE3 and that nothing follows it.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.hasher.update(&self.unhashed);
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

/// A commit's engine payload: reads never pass its declared length.
pub struct Payload<'a, R: Read> {
    br: &'a mut BodyReader<R>,
}

impl<R: Read> Payload<'_, R> {
    /// Bytes of the payload not read yet.
    pub fn remaining(&self) -> u64 {
        self.br.prefix.len() as u64 + self.br.payload_left
    }

    pub fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        ensure!(
            buf.len() as u64 <= self.remaining(),
            "commit payload is shorter than its engine expects"
        );
        let from_prefix = buf.len().min(self.br.prefix.len());
        buf[..from_prefix].copy_from_slice(&self.br.prefix[..from_prefix]);
        self.br.prefix.drain(..from_prefix);
        let rest = &mut buf[from_prefix..];
        if !rest.is_empty() {
            self.br.read_exact(rest)?;
            self.br.payload_left -= rest.len() as u64;
        }
        Ok(())
    }
}

fn check_common(engine: &str, lineage: &str, env_hash: &str, env: &Envelope) -> anyhow::Result<()> {
    ensure!(
        engine == env.meta.engine,
        "body engine {engine:?} differs from envelope engine {:?}",
        env.meta.engine
    );
    ensure!(
        lineage == env.meta.lineage,
        "body lineage {lineage} differs from envelope lineage {}",
        env.meta.lineage
    );
    ensure!(
        env_hash == env.blake3_hex(),
        "envelope was modified (envelope_blake3 mismatch)"
    );
    Ok(())
}

/// Format-1 bodies: SQLite page fields in the generic header.
mod legacy {
    use super::*;

    /// What reading a format-1 body needs beyond the generic header.
    pub(super) struct Reading {
        pub page_size: u32,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Snapshot {
        kind: String,
        payload: String,
        lineage: String,
        page_size: u32,
        envelope_blake3: String,
        txid: u64,
        time_us: i64,
        db_pages: u32,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Segment {
        kind: String,
        payload: String,
        lineage: String,
        page_size: u32,
        envelope_blake3: String,
        first_txid: u64,
        last_txid: u64,
        commit_count: u32,
        prev_checksum: String,
        #[serde(default)]
        level: u8,
        #[serde(default)]
        truncate_to: Option<u32>,
    }

    fn check_payload(payload: &str) -> anyhow::Result<()> {
        ensure!(
            payload == "sqlite-pages",
            "unsupported payload type {payload:?}"
        );
        Ok(())
    }

    /// The generic header of a format-1 body. Its engine fields move to
    /// `payload` as format 2 has them; its `prev_checksum` is its link (in
    /// format 1 the state checksum links objects).
    pub(super) fn convert(json: &[u8], env: &Envelope) -> anyhow::Result<(Header, Reading)> {
        let engine = crate::codec::LEGACY_ENGINE.to_string();
        Ok(match env.kind {
            ObjectKind::Snapshot => {
                let h: Snapshot =
                    serde_json::from_slice(json).context("snapshot header is not valid")?;
                check_payload(&h.payload)?;
                (
                    Header::Snapshot(SnapshotHeader {
                        kind: h.kind,
                        engine,
                        lineage: h.lineage,
                        envelope_blake3: h.envelope_blake3,
                        txid: h.txid,
                        time_us: h.time_us,
                        link: String::new(),
                        payload: serde_json::json!({
                            "type": h.payload,
                            "page_size": h.page_size,
                            "db_pages": h.db_pages,
                        }),
                    }),
                    Reading {
                        page_size: h.page_size,
                    },
                )
            }
            ObjectKind::Segment => {
                let h: Segment =
                    serde_json::from_slice(json).context("segment header is not valid")?;
                check_payload(&h.payload)?;
                if h.level == 0 {
                    ensure!(
                        h.truncate_to.is_none(),
                        "segment commit count does not match its txid range"
                    );
                } else {
                    ensure!(
                        h.truncate_to.is_some(),
                        "compacted segment must hold exactly one merged commit and its truncation size"
                    );
                }
                let mut payload = serde_json::json!({
                    "type": h.payload,
                    "page_size": h.page_size,
                });
                if let Some(t) = h.truncate_to {
                    payload["truncate_to"] = t.into();
                }
                (
                    Header::Segment(SegmentHeader {
                        kind: h.kind,
                        engine,
                        lineage: h.lineage,
                        envelope_blake3: h.envelope_blake3,
                        first_txid: h.first_txid,
                        last_txid: h.last_txid,
                        commit_count: h.commit_count,
                        level: h.level,
                        prev_link: h.prev_checksum,
                        end_link: None,
                        payload,
                    }),
                    Reading {
                        page_size: h.page_size,
                    },
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_depend_on_every_input() {
        let d = [7u8; 16];
        let g = Link::genesis("0000000000000001-000000aa", 1, 100, &d);
        assert_ne!(g, Link::genesis("0000000000000001-000000bb", 1, 100, &d));
        let n = g.next(2, 200, &d);
        assert_ne!(n, g.next(3, 200, &d));
        assert_ne!(n, g.next(2, 201, &d));
        assert_ne!(n, g.next(2, 200, &[8u8; 16]));
        assert_eq!(Link::from_hex(&n.to_hex()).unwrap(), n);
        assert!(Link::from_hex("zz").is_err());
    }
}
