//! Restore planning: which snapshot and which segments reach a target, and
//! the rules that tell a gap, a conflict, a superseded upload and pruned
//! history apart (docs/FORMAT.md, "Finding a restore point").

use std::collections::BTreeMap;

use anyhow::{bail, Context};

use super::catalog::{Catalog, Lineage};
use super::naming::{fmt_time_us, SegmentEntry, SnapshotEntry};

impl Lineage {
    /// The oldest snapshot from which the level-0 chain reaches the
    /// lineage's newest txid: every txid from it on is restorable. Older
    /// snapshots (kept by snapshot-retention after pruning) restore only to
    /// their own point.
    pub fn continuous_from(&self) -> Option<&SnapshotEntry> {
        let max = self.max_txid()?;
        // Walk back from the head while segments chain.
        let mut by_last: BTreeMap<u64, &SegmentEntry> = BTreeMap::new();
        for g in self.segments.values().flatten() {
            by_last.insert(g.last_txid, g);
        }
        let mut at = max;
        let mut oldest = None;
        loop {
            if let Some(s) = self.snapshots.iter().find(|s| s.txid == at) {
                oldest = Some(s);
            }
            match by_last.get(&at) {
                Some(g) if g.first_txid > 0 => at = g.first_txid - 1,
                _ => return oldest,
            }
        }
    }

    /// The level-0 segment that continues txid `at`. Fails on a gap and on
    /// conflicting segments; `prev_key` names the object before the gap.
    pub fn next_l0(
        &self,
        at: u64,
        until_txid: u64,
        prev_key: &str,
    ) -> anyhow::Result<&SegmentEntry> {
        match self.segments.get(&(at + 1)).map(|v| v.as_slice()) {
            Some([one]) => Ok(one),
            Some(many) if self.superseding(many).is_some() => Ok(self.superseding(many).unwrap()),
            Some(many) => bail!(
                "conflicting segments start at txid {} in lineage {} ({}); were two offsite processes shipping to this replica?",
                at + 1,
                self.id,
                many.iter().map(|s| s.key.as_str()).collect::<Vec<_>>().join(", ")
            ),
            None => bail!(
                "replica has a gap: no segment starts at txid {} in lineage {} (needed to reach txid {until_txid}); the object after {prev_key} is missing",
                at + 1,
                self.id,
            ),
        }
    }

    /// Of several level-0 segments starting at one txid, the one the chain
    /// continues with, when the others are only shorter dead ends: nothing
    /// starts right after them. That is what a shipper leaves when an upload
    /// reached the store but its response was lost: the retry ships the same
    /// commits plus newer ones under another name. Both hold the same
    /// commits (`verify` checks that the states agree); restores use the
    /// longer one. Anything else (two segments continued, equal ends) is a
    /// conflict: two shippers wrote different histories.
    pub fn superseding<'a>(&self, same_start: &'a [SegmentEntry]) -> Option<&'a SegmentEntry> {
        let longest = same_start.iter().max_by_key(|g| g.last_txid)?;
        let dead_end = |g: &SegmentEntry| {
            !self.segments.contains_key(&(g.last_txid + 1))
                && !self.compacted.contains_key(&(g.last_txid + 1))
        };
        same_start
            .iter()
            .filter(|g| g.key != longest.key)
            .all(|g| g.last_txid < longest.last_txid && dead_end(g))
            .then_some(longest)
    }

    /// Walk the level-0 chain from `snap` to `until_txid`.
    pub fn chain(
        &self,
        snap: &SnapshotEntry,
        until_txid: u64,
    ) -> anyhow::Result<Vec<SegmentEntry>> {
        self.route(snap, until_txid, None, false)
    }

    /// The objects that take the state at `snap` to `until_txid` (or, with
    /// `stop_time`, to the last commit at or before it). With `compacted`,
    /// each step takes the object starting right after the current txid
    /// that reaches furthest without passing the target: a compacted segment
    /// (applied whole) where one fits, else the level-0 segment (which may be
    /// applied in part). Restores read a bounded number of objects: a few per
    /// level, plus the level-0 segments of the last, partial window.
    pub fn route(
        &self,
        snap: &SnapshotEntry,
        until_txid: u64,
        stop_time: Option<i64>,
        compacted: bool,
    ) -> anyhow::Result<Vec<SegmentEntry>> {
        let mut out: Vec<SegmentEntry> = Vec::new();
        let mut at = snap.txid;
        while at < until_txid {
            let jump = if compacted {
                self.compacted
                    .get(&(at + 1))
                    .into_iter()
                    .flatten()
                    .filter(|c| {
                        c.last_txid <= until_txid && stop_time.is_none_or(|t| c.last_time_us <= t)
                    })
                    .max_by_key(|c| (c.last_txid, c.level))
            } else {
                None
            };
            if let Some(c) = jump {
                at = c.last_txid;
                out.push(c.clone());
                continue;
            }
            let prev = out.last().map(|s| s.key.as_str()).unwrap_or(&snap.key);
            let one = self.next_l0(at, until_txid, prev)?.clone();
            at = one.last_txid;
            let past = stop_time.is_some_and(|t| one.last_time_us > t);
            out.push(one);
            if past {
                // Commit times never decrease: the target lies inside this segment.
                break;
            }
        }
        Ok(out)
    }
}

/// What to restore to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Latest,
    Txid(u64),
    /// Unix microseconds: the state after the last commit observed at or before it.
    Time(i64),
}

/// A restore plan: a snapshot, the segments after it, and where to stop.
#[derive(Debug, Clone)]
pub struct Plan {
    pub lineage: String,
    pub snapshot: SnapshotEntry,
    pub segments: Vec<SegmentEntry>,
    /// Stop after this txid (for Time targets: an upper bound; commits after
    /// the target time are not applied).
    pub stop_txid: u64,
    pub stop_time_us: Option<i64>,
}

impl Catalog {
    pub fn plan(&self, target: Target) -> anyhow::Result<Plan> {
        let Some(((etx, et), (ltx, lt))) = self.window() else {
            bail!("the replica holds no snapshot: nothing to restore (is the URL right, and has offsite replicate run?)");
        };
        let window = format!(
            "the replica holds txids {etx}..={ltx}, times {}..{}",
            fmt_time_us(et),
            fmt_time_us(lt)
        );
        // Choose the lineage and the stop txid.
        let (lineage, stop_txid, stop_time) = match target {
            Target::Latest => {
                let l = self.newest_lineage().unwrap();
                (l, l.max_txid().unwrap(), None)
            }
            Target::Txid(t) => {
                let l = self
                    .lineages
                    .values()
                    .filter(|l| l.snapshots.iter().any(|s| s.txid <= t) && l.max_txid() >= Some(t))
                    .max_by_key(|l| l.start_txid())
                    .with_context(|| format!("txid {t} is not restorable: {window}"))?;
                (l, t, None)
            }
            Target::Time(t) => {
                // The newest lineage whose first snapshot was taken at or before t.
                let l = self
                    .lineages
                    .values()
                    .filter(|l| l.snapshots.first().is_some_and(|s| s.time_us <= t))
                    .max_by_key(|l| l.start_txid())
                    .with_context(|| {
                        format!("no restore point at or before {}: {window}", fmt_time_us(t))
                    })?;
                (l, l.max_txid().unwrap(), Some(t))
            }
        };
        if let Some(base) = lineage.continuous_from() {
            let exact_snapshot =
                stop_time.is_none() && lineage.snapshots.iter().any(|s| s.txid == stop_txid);
            let before = match stop_time {
                Some(t) => t < base.time_us,
                None => stop_txid < base.txid,
            };
            // Pruned (no level-0 segment before the base), not damaged: a
            // missing object inside the history is reported by the route.
            let pruned = lineage.segments.range(..=base.txid).next().is_none();
            if before && !exact_snapshot && pruned {
                bail!(
                    "{} is before lineage {}'s point-in-time window, which starts at txid {} ({}); older history was pruned, and the snapshots kept before it restore only to their own txid ({})",
                    match stop_time {
                        Some(t) => fmt_time_us(t),
                        None => format!("txid {stop_txid}"),
                    },
                    lineage.id,
                    base.txid,
                    fmt_time_us(base.time_us),
                    lineage
                        .snapshots
                        .iter()
                        .filter(|s| s.txid < base.txid)
                        .map(|s| format!("--txid {}", s.txid))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let snapshot = lineage
            .snapshots
            .iter()
            .rev()
            .find(|s| s.txid <= stop_txid && stop_time.is_none_or(|t| s.time_us <= t))
            .cloned()
            .with_context(|| {
                format!(
                    "no snapshot at or before the target in lineage {}",
                    lineage.id
                )
            })?;
        let segments = lineage.route(&snapshot, stop_txid, stop_time, true)?;
        Ok(Plan {
            lineage: lineage.id.clone(),
            snapshot,
            segments,
            stop_txid,
            stop_time_us: stop_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{parse_time, segment_key, snapshot_key};
    use crate::storage::ObjectMeta;

    fn om(key: String) -> ObjectMeta {
        ObjectMeta { key, size: 10 }
    }

    #[test]
    fn keys_roundtrip_and_plan() {
        let l1 = "0000000000000001-000000aa".to_string();
        let l2 = "0000000000000006-000000bb".to_string();
        let objs = vec![
            om(snapshot_key(&l1, 1, 100)),
            om(segment_key(&l1, 0, 2, 3, 300)),
            om(segment_key(&l1, 0, 4, 5, 500)),
            om(snapshot_key(&l2, 6, 600)),
            om(segment_key(&l2, 0, 7, 9, 900)),
            om("lineages/junk".into()),
        ];
        let c = Catalog::from_list(&objs);
        assert_eq!(c.ignored, vec!["lineages/junk".to_string()]);
        assert_eq!(c.window(), Some(((1, 100), (9, 900))));
        let p = c.plan(Target::Latest).unwrap();
        assert_eq!(
            (p.lineage.as_str(), p.stop_txid, p.segments.len()),
            (l2.as_str(), 9, 1)
        );
        let p = c.plan(Target::Txid(3)).unwrap();
        assert_eq!((p.lineage.as_str(), p.segments.len()), (l1.as_str(), 1));
        let p = c.plan(Target::Time(450)).unwrap();
        assert_eq!((p.lineage.as_str(), p.segments.len()), (l1.as_str(), 2));
        // The first segment after the snapshot may hold commits at or before
        // the target time; restore stops inside it at the exact commit.
        let p = c.plan(Target::Time(650)).unwrap();
        assert_eq!((p.lineage.as_str(), p.segments.len()), (l2.as_str(), 1));
        let p = c.plan(Target::Time(350)).unwrap();
        assert_eq!(
            p.segments.len(),
            2,
            "ends with the first segment that passes the time"
        );
        assert!(c.plan(Target::Time(50)).is_err());
        assert!(c.plan(Target::Txid(10)).is_err());
        // A missing middle segment is a gap, reported with the txid.
        let mut objs2 = objs.clone();
        objs2.remove(1);
        let err = Catalog::from_list(&objs2)
            .plan(Target::Txid(5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gap") && err.contains("txid 2"), "{err}");
    }

    #[test]
    fn pruned_tail_snapshots_stand_alone() {
        let l = "0000000000000001-000000aa".to_string();
        // Snapshot 1 (kept tail), segments 2..=5 pruned, base snapshot at 5,
        // chain 6..=9 to the head.
        let objs = vec![
            om(snapshot_key(&l, 1, 100)),
            om(snapshot_key(&l, 5, 500)),
            om(segment_key(&l, 0, 6, 7, 700)),
            om(segment_key(&l, 0, 8, 9, 900)),
        ];
        let c = Catalog::from_list(&objs);
        let lin = c.lineages.values().next().unwrap();
        assert_eq!(lin.continuous_from().unwrap().txid, 5);
        assert!(c.plan(Target::Txid(1)).is_ok(), "a kept snapshot restores");
        assert!(c.plan(Target::Txid(7)).is_ok());
        let e = c.plan(Target::Txid(3)).unwrap_err().to_string();
        assert!(e.contains("pruned") && e.contains("--txid 1"), "{e}");
        let e = c.plan(Target::Time(300)).unwrap_err().to_string();
        assert!(e.contains("before lineage"), "{e}");
        // A missing segment inside the chain is a gap, not pruning.
        let objs2 = vec![
            om(snapshot_key(&l, 1, 100)),
            om(segment_key(&l, 0, 2, 3, 300)),
            om(snapshot_key(&l, 5, 500)),
            om(segment_key(&l, 0, 6, 7, 700)),
        ];
        let e = Catalog::from_list(&objs2)
            .plan(Target::Txid(4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gap"), "{e}");
    }

    #[test]
    fn a_shorter_dead_end_at_the_same_start_is_superseded() {
        let l = "0000000000000001-000000aa".to_string();
        // A lost response left 2..=3; the retry shipped 2..=5; the chain goes on at 6.
        let mut objs = vec![
            om(snapshot_key(&l, 1, 100)),
            om(segment_key(&l, 0, 2, 3, 300)),
            om(segment_key(&l, 0, 2, 5, 500)),
            om(segment_key(&l, 0, 6, 7, 700)),
        ];
        let c = Catalog::from_list(&objs);
        let p = c.plan(Target::Txid(3)).unwrap();
        assert_eq!(p.segments[0].last_txid, 5, "the longer segment is used");
        assert_eq!(c.plan(Target::Latest).unwrap().segments.len(), 2);
        // Something continues the shorter one too: a fork, refused.
        objs.push(om(segment_key(&l, 0, 4, 4, 400)));
        let e = Catalog::from_list(&objs)
            .plan(Target::Latest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("conflicting"), "{e}");
        // Two segments ending at the same txid (different times): a fork.
        let objs = vec![
            om(snapshot_key(&l, 1, 100)),
            om(segment_key(&l, 0, 2, 5, 500)),
            om(segment_key(&l, 0, 2, 5, 501)),
        ];
        let e = Catalog::from_list(&objs)
            .plan(Target::Latest)
            .unwrap_err()
            .to_string();
        assert!(e.contains("conflicting"), "{e}");
    }

    #[test]
    fn parse_time_floors_to_micros() {
        assert_eq!(
            parse_time("1970-01-01T00:00:01.0000019Z").unwrap(),
            1_000_001
        );
        assert!(parse_time("yesterday").is_err());
    }
}
