//! The catalog of a replica, built from one listing: lineages, their
//! snapshots and segments, heads and the restore window.

use std::collections::BTreeMap;

use anyhow::Context;

use super::naming::{lineage_start, parse_key, Entry, SegmentEntry, SnapshotEntry, LINEAGES};
use crate::storage::{ObjectMeta, Storage};

#[derive(Debug, Clone, Default)]
pub struct Lineage {
    pub id: String,
    pub snapshots: Vec<SnapshotEntry>,
    /// Level-0 segments by first txid; more than one entry for a txid means
    /// conflicting writers.
    pub segments: BTreeMap<u64, Vec<SegmentEntry>>,
    /// Compacted segments (level 1 and up) by first txid.
    pub compacted: BTreeMap<u64, Vec<SegmentEntry>>,
}

impl Lineage {
    pub fn start_txid(&self) -> u64 {
        lineage_start(&self.id)
    }

    /// Highest txid stored in this lineage (snapshot or segment).
    pub fn max_txid(&self) -> Option<u64> {
        let s = self.snapshots.iter().map(|s| s.txid).max();
        let g = self.segments.values().flatten().map(|s| s.last_txid).max();
        s.max(g)
    }

    /// The newest object (the one whose last commit is the lineage's head).
    pub fn head(&self) -> Option<HeadObject> {
        let snap = self.snapshots.iter().max_by_key(|s| s.txid);
        let seg = self.segments.values().flatten().max_by_key(|s| s.last_txid);
        match (snap, seg) {
            (Some(s), Some(g)) if g.last_txid > s.txid => Some(HeadObject::Segment(g.clone())),
            (Some(s), _) => Some(HeadObject::Snapshot(s.clone())),
            (None, Some(g)) => Some(HeadObject::Segment(g.clone())),
            (None, None) => None,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.snapshots.iter().map(|s| s.size).sum::<u64>()
            + self
                .segments
                .values()
                .chain(self.compacted.values())
                .flatten()
                .map(|s| s.size)
                .sum::<u64>()
    }

    pub fn object_count(&self) -> usize {
        self.snapshots.len()
            + self
                .segments
                .values()
                .chain(self.compacted.values())
                .map(|v| v.len())
                .sum::<usize>()
    }

    /// Every object of the lineage.
    pub fn keys(&self) -> impl Iterator<Item = (&str, u64)> {
        self.snapshots
            .iter()
            .map(|s| (s.key.as_str(), s.size))
            .chain(
                self.segments
                    .values()
                    .chain(self.compacted.values())
                    .flatten()
                    .map(|s| (s.key.as_str(), s.size)),
            )
    }
}

#[derive(Debug, Clone)]
pub enum HeadObject {
    Snapshot(SnapshotEntry),
    Segment(SegmentEntry),
}

impl HeadObject {
    pub fn key(&self) -> &str {
        match self {
            HeadObject::Snapshot(s) => &s.key,
            HeadObject::Segment(s) => &s.key,
        }
    }
    pub fn last_txid(&self) -> u64 {
        match self {
            HeadObject::Snapshot(s) => s.txid,
            HeadObject::Segment(s) => s.last_txid,
        }
    }
    pub fn last_time_us(&self) -> i64 {
        match self {
            HeadObject::Snapshot(s) => s.time_us,
            HeadObject::Segment(s) => s.last_time_us,
        }
    }
}

/// Everything in a replica, from one LIST.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub lineages: BTreeMap<String, Lineage>,
    pub ignored: Vec<String>,
}

impl Catalog {
    pub fn from_list(objects: &[ObjectMeta]) -> Catalog {
        let mut c = Catalog::default();
        for o in objects {
            match parse_key(&o.key, o.size) {
                Some(Entry::Snapshot(s)) => c
                    .lineages
                    .entry(s.lineage.clone())
                    .or_insert_with(|| Lineage {
                        id: s.lineage.clone(),
                        ..Default::default()
                    })
                    .snapshots
                    .push(s),
                Some(Entry::Segment(g)) => {
                    let l = c
                        .lineages
                        .entry(g.lineage.clone())
                        .or_insert_with(|| Lineage {
                            id: g.lineage.clone(),
                            ..Default::default()
                        });
                    if g.level == 0 {
                        l.segments.entry(g.first_txid).or_default().push(g);
                    } else {
                        l.compacted.entry(g.first_txid).or_default().push(g);
                    }
                }
                None => c.ignored.push(o.key.clone()),
            }
        }
        for l in c.lineages.values_mut() {
            l.snapshots.sort_by_key(|s| s.txid);
        }
        c
    }

    pub async fn load(store: &dyn Storage) -> anyhow::Result<Catalog> {
        let objects = store
            .list(LINEAGES)
            .await
            .with_context(|| format!("cannot list replica {}", store.describe()))?;
        Ok(Catalog::from_list(&objects))
    }

    pub fn is_empty(&self) -> bool {
        self.lineages.is_empty()
    }

    pub fn max_txid(&self) -> Option<u64> {
        self.lineages.values().filter_map(|l| l.max_txid()).max()
    }

    /// The lineage holding the highest txid.
    pub fn newest_lineage(&self) -> Option<&Lineage> {
        self.lineages
            .values()
            .filter(|l| l.max_txid().is_some())
            .max_by_key(|l| (l.max_txid(), l.start_txid()))
    }

    /// Earliest and latest restorable (txid, time_us).
    pub fn window(&self) -> Option<((u64, i64), (u64, i64))> {
        let earliest = self
            .lineages
            .values()
            .flat_map(|l| l.snapshots.iter())
            .min_by_key(|s| s.txid)
            .map(|s| (s.txid, s.time_us))?;
        let head = self.newest_lineage()?.head()?;
        Some((earliest, (head.last_txid(), head.last_time_us())))
    }
}
