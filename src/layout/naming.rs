//! Object names (docs/FORMAT.md, "Bucket layout"): keys of snapshots and
//! segments, and parsing them back into entries. Every name read from a
//! listing is parsed here; anything that is not an offsite name is `None`.

use anyhow::Context;

pub const LINEAGES: &str = "lineages/";

/// The highest txid offsite writes or accepts in a name (2^62): a name
/// above it is not ours (hostile or damaged) and is ignored by planning and
/// reported by verify, so `txid + 1` can never wrap.
pub const MAX_TXID: u64 = 1 << 62;

/// Names with a time outside 1970..2262 (an i64 of nanoseconds) are not ours.
const MAX_TIME_US: u64 = i64::MAX as u64 / 1000;

pub fn new_lineage_id(start_txid: u64) -> String {
    format!("{start_txid:016x}-{:08x}", rand::random::<u32>())
}

pub fn snapshot_key(lineage: &str, txid: u64, time_us: i64) -> String {
    format!(
        "{LINEAGES}{lineage}/snapshots/{txid:016x}-{:016x}.snap",
        time_us as u64
    )
}

/// Keys are kept short (about 100 bytes plus the replica prefix): LIST
/// responses stay small, and some S3 servers derive file names from keys.
pub fn segment_key(lineage: &str, level: u8, first: u64, last: u64, t_last: i64) -> String {
    format!(
        "{LINEAGES}{lineage}/segments/{level}/{first:016x}-{last:016x}-{:016x}.seg",
        t_last as u64
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub key: String,
    pub lineage: String,
    pub txid: u64,
    pub time_us: i64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentEntry {
    pub key: String,
    pub lineage: String,
    pub level: u8,
    pub first_txid: u64,
    pub last_txid: u64,
    pub last_time_us: i64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Snapshot(SnapshotEntry),
    Segment(SegmentEntry),
}

fn hex_u64(s: &str) -> Option<u64> {
    if s.len() != 16
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn txid(s: &str) -> Option<u64> {
    hex_u64(s).filter(|t| (1..=MAX_TXID).contains(t))
}

fn time(s: &str) -> Option<i64> {
    hex_u64(s).filter(|t| *t <= MAX_TIME_US).map(|t| t as i64)
}

fn valid_lineage(s: &str) -> bool {
    let mut parts = s.split('-');
    let random = |r: &str| {
        r.len() == 8
            && r.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    matches!(
        (
            parts.next().and_then(txid),
            parts.next().map(random),
            parts.next()
        ),
        (Some(_), Some(true), None)
    )
}

pub fn lineage_start(lineage: &str) -> u64 {
    lineage.split('-').next().and_then(hex_u64).unwrap_or(0)
}

/// Parse a key relative to the replica root. `None` for keys that are not ours.
pub fn parse_key(key: &str, size: u64) -> Option<Entry> {
    let rest = key.strip_prefix(LINEAGES)?;
    let mut parts = rest.split('/');
    let lineage = parts.next()?;
    if !valid_lineage(lineage) {
        return None;
    }
    match (parts.next()?, parts.next(), parts.next(), parts.next()) {
        ("snapshots", Some(name), None, None) => {
            let stem = name.strip_suffix(".snap")?;
            let (a, b) = stem.split_once('-')?;
            Some(Entry::Snapshot(SnapshotEntry {
                key: key.to_string(),
                lineage: lineage.to_string(),
                txid: txid(a)?,
                time_us: time(b)?,
                size,
            }))
        }
        ("segments", Some(level), Some(name), None) => {
            let stem = name.strip_suffix(".seg")?;
            let f: Vec<&str> = stem.split('-').collect();
            if f.len() != 3 {
                return None;
            }
            let e = SegmentEntry {
                key: key.to_string(),
                lineage: lineage.to_string(),
                level: parse_level(level)?,
                first_txid: txid(f[0])?,
                last_txid: txid(f[1])?,
                last_time_us: time(f[2])?,
                size,
            };
            if e.last_txid < e.first_txid {
                return None;
            }
            Some(Entry::Segment(e))
        }
        _ => None,
    }
}

/// A decimal level as written (`0`..`255`, no sign, no leading zeros).
fn parse_level(s: &str) -> Option<u8> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

pub fn fmt_time_us(t: i64) -> String {
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(t as i128 * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| {
            format!("invalid timestamp {s:?}: expected RFC 3339, e.g. 2026-11-25T12:00:00Z")
        })?;
    // Floor to microseconds: a commit observed at t_us is at or before the instant.
    let ns = dt.unix_timestamp_nanos();
    Ok(ns.div_euclid(1000) as i64)
}
