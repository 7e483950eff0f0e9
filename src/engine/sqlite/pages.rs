//! The `sqlite-pages` payload (docs/FORMAT.md, "SQLite payload"): the
//! engine fields of snapshot and segment headers, and a commit's payload
//! (database size, then page records).

use std::io::Write;

use anyhow::{ensure, Context};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::segment::{CommitHead, Link, SegmentHeader, SegmentWriter, SnapshotHeader};

pub const PAYLOAD_TYPE: &str = "sqlite-pages";

/// A snapshot header's engine fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFields {
    #[serde(rename = "type")]
    pub kind: String,
    pub page_size: u32,
    /// Database size in pages: the data is pages 1..=db_pages in order.
    pub db_pages: u32,
}

/// A segment header's engine fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentFields {
    #[serde(rename = "type")]
    pub kind: String,
    pub page_size: u32,
    /// Compacted segments only: the smallest database size (pages) in the
    /// merged range, applied before the records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_to: Option<u32>,
}

fn check(kind: &str, page_size: u32) -> anyhow::Result<()> {
    ensure!(
        kind == PAYLOAD_TYPE,
        "unsupported payload type {kind:?} (this offsite reads {PAYLOAD_TYPE:?})"
    );
    ensure!(
        (512..=65536).contains(&page_size) && page_size.is_power_of_two(),
        "invalid page size {page_size}"
    );
    Ok(())
}

impl SnapshotFields {
    pub fn new(page_size: u32, db_pages: u32) -> SnapshotFields {
        SnapshotFields {
            kind: PAYLOAD_TYPE.into(),
            page_size,
            db_pages,
        }
    }
    pub fn parse(v: &serde_json::Value) -> anyhow::Result<SnapshotFields> {
        let f: SnapshotFields =
            serde_json::from_value(v.clone()).context("snapshot payload fields are not valid")?;
        check(&f.kind, f.page_size)?;
        Ok(f)
    }
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("fields serialize")
    }
}

impl SegmentFields {
    pub fn new(page_size: u32, truncate_to: Option<u32>) -> SegmentFields {
        SegmentFields {
            kind: PAYLOAD_TYPE.into(),
            page_size,
            truncate_to,
        }
    }
    pub fn parse(v: &serde_json::Value) -> anyhow::Result<SegmentFields> {
        let f: SegmentFields =
            serde_json::from_value(v.clone()).context("segment payload fields are not valid")?;
        check(&f.kind, f.page_size)?;
        Ok(f)
    }
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("fields serialize")
    }
}

/// Length of a commit's payload with `records` page records.
pub fn commit_len(records: u32, page_size: u32) -> u64 {
    8 + records as u64 * (4 + page_size as u64)
}

/// Write the start of a commit's payload: the database size after the
/// commit and the number of page records that follow.
pub fn write_commit_start<W: Write>(
    sw: &mut SegmentWriter<W>,
    db_pages: u32,
    records: u32,
) -> std::io::Result<()> {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&db_pages.to_le_bytes());
    b[4..].copy_from_slice(&records.to_le_bytes());
    sw.write_payload(&b)
}

/// Write one page record.
pub fn write_record<W: Write>(
    sw: &mut SegmentWriter<W>,
    db_pages: u32,
    pgno: u32,
    page: &[u8],
) -> std::io::Result<()> {
    assert!(
        pgno >= 1 && pgno <= db_pages,
        "page {pgno} outside the database"
    );
    sw.write_payload(&pgno.to_le_bytes())?;
    sw.write_payload(page)
}

/// Start a commit: the generic head (its payload length computed from the
/// record count) and the payload's start.
pub fn begin_commit<W: Write>(
    sw: &mut SegmentWriter<W>,
    head: (u64, i64),
    db_pages: u32,
    records: u32,
    page_size: u32,
) -> std::io::Result<()> {
    sw.begin_commit(CommitHead {
        txid: head.0,
        time_us: head.1,
        payload_len: commit_len(records, page_size),
    })?;
    write_commit_start(sw, db_pages, records)
}

/// A SQLite segment's header.
#[allow(clippy::too_many_arguments)]
pub fn segment_header(
    lineage: &str,
    envelope_blake3: String,
    (first_txid, last_txid): (u64, u64),
    commit_count: u32,
    level: u8,
    prev_link: Link,
    end_link: Option<Link>,
    fields: SegmentFields,
) -> SegmentHeader {
    SegmentHeader {
        kind: "segment".into(),
        engine: Engine::Sqlite.name().into(),
        lineage: lineage.to_string(),
        envelope_blake3,
        first_txid,
        last_txid,
        commit_count,
        level,
        prev_link: prev_link.to_hex(),
        end_link: end_link.map(|l| l.to_hex()),
        payload: fields.to_value(),
    }
}

/// A SQLite snapshot's header.
pub fn snapshot_header(
    lineage: &str,
    envelope_blake3: String,
    (txid, time_us): (u64, i64),
    link: Link,
    fields: SnapshotFields,
) -> SnapshotHeader {
    SnapshotHeader {
        kind: "snapshot".into(),
        engine: Engine::Sqlite.name().into(),
        lineage: lineage.to_string(),
        envelope_blake3,
        txid,
        time_us,
        link: link.to_hex(),
        payload: fields.to_value(),
    }
}
