//! The structure check (from one listing, no download): continuity of each
//! lineage's level-0 chain, snapshots and compacted segments on chain
//! boundaries; and the order in which the contents check reads objects.

use std::collections::{BTreeSet, HashSet};

use super::{err_text, problem, LineageReport};
use crate::layout::{Entry, Lineage, SegmentEntry, SnapshotEntry};

/// One object to read, in the order the replay needs it.
#[derive(Debug, Clone)]
pub(super) enum Step {
    /// (Re)start the replay from this snapshot.
    Base(SnapshotEntry),
    /// A later snapshot at the replay's current txid: must equal the state.
    Snapshot(SnapshotEntry),
    /// The next level-0 segment of the chain.
    Segment(SegmentEntry),
    /// A compacted segment starting right after the replay's current txid.
    Compacted(SegmentEntry),
    /// A shorter level-0 segment the chain's next segment supersedes (see
    /// `Lineage::superseding`): replayed on a copy of the state, its end
    /// state must equal the chain's at its last txid.
    Superseded(SegmentEntry),
    /// Not on the chain (already reported): checked on its own.
    Lone(Entry),
}

impl Step {
    pub(super) fn entry(&self) -> Entry {
        match self {
            Step::Base(s) | Step::Snapshot(s) => Entry::Snapshot(s.clone()),
            Step::Segment(g) | Step::Compacted(g) | Step::Superseded(g) => {
                Entry::Segment(g.clone())
            }
            Step::Lone(e) => e.clone(),
        }
    }
}
pub(super) fn entry_key(e: &Entry) -> &str {
    match e {
        Entry::Snapshot(s) => &s.key,
        Entry::Segment(g) => &g.key,
    }
}

pub(super) fn entry_size(e: &Entry) -> u64 {
    match e {
        Entry::Snapshot(s) => s.size,
        Entry::Segment(g) => g.size,
    }
}
/// Structure check of one lineage (no download). Returns the order in which
/// its objects are read by the contents check.
pub(super) fn plan_lineage(l: &Lineage, lr: &mut LineageReport) -> Vec<Step> {
    let all: Vec<Entry> = l
        .snapshots
        .iter()
        .cloned()
        .map(Entry::Snapshot)
        .chain(
            l.segments
                .values()
                .chain(l.compacted.values())
                .flatten()
                .cloned()
                .map(Entry::Segment),
        )
        .collect();
    let Some(first) = l.snapshots.first() else {
        let key = all.first().map(entry_key).unwrap_or_default().to_string();
        problem(
            &mut lr.problems,
            &key,
            format!(
                "lineage {} has no snapshot: none of its {} objects can be restored",
                l.id,
                all.len()
            ),
        );
        return all.into_iter().map(Step::Lone).collect();
    };
    let max = l.max_txid().unwrap_or(first.txid);
    let mut steps = vec![Step::Base(first.clone())];
    let mut visited: HashSet<String> = [first.key.clone()].into();
    let mut boundaries: BTreeSet<u64> = [first.txid].into();
    let mut at = first.txid;
    let mut prev_key = first.key.clone();
    loop {
        for s in l.snapshots.iter().filter(|s| s.txid == at) {
            if visited.insert(s.key.clone()) {
                steps.push(Step::Snapshot(s.clone()));
            }
        }
        for c in l.compacted.get(&(at + 1)).into_iter().flatten() {
            if visited.insert(c.key.clone()) {
                steps.push(Step::Compacted(c.clone()));
            }
        }
        if at >= max {
            break;
        }
        match l.next_l0(at, max, &prev_key) {
            Ok(g) => {
                for o in l.segments[&g.first_txid].iter().filter(|o| o.key != g.key) {
                    visited.insert(o.key.clone());
                    steps.push(Step::Superseded(o.clone()));
                }
                visited.insert(g.key.clone());
                steps.push(Step::Segment(g.clone()));
                at = g.last_txid;
                prev_key = g.key.clone();
                boundaries.insert(at);
            }
            Err(e) => {
                // After pruning, a lineage is: snapshots kept by
                // snapshot-retention (restorable to their own point, with no
                // segments), then the window's base snapshot and an unbroken
                // chain to the head. A gap is legitimate only there: right
                // after a snapshot, with no level-0 segment at all up to the
                // next snapshot.
                let next_snap = l.snapshots.iter().find(|s| s.txid > at);
                let pruned_tail = l
                    .snapshots
                    .iter()
                    .any(|s| s.txid == at && s.key == prev_key)
                    && next_snap.is_some_and(|n| l.segments.range(..=n.txid).next().is_none());
                if !pruned_tail {
                    problem(&mut lr.problems, &prev_key, err_text(&e));
                }
                // Resume the replay at the next snapshot, if any.
                match l.snapshots.iter().find(|s| s.txid > at) {
                    Some(s) => {
                        visited.insert(s.key.clone());
                        steps.push(Step::Base(s.clone()));
                        at = s.txid;
                        prev_key = s.key.clone();
                        boundaries.insert(at);
                    }
                    None => break,
                }
            }
        }
    }
    for st in &steps {
        if let Step::Compacted(c) = st {
            if !boundaries.contains(&c.last_txid) {
                problem(
                    &mut lr.problems,
                    &c.key,
                    format!(
                        "compacted segment ends at txid {}, which is not the end of a level-0 segment of the chain",
                        c.last_txid
                    ),
                );
            }
        }
    }
    for e in all {
        let key = entry_key(&e).to_string();
        if visited.contains(&key) {
            continue;
        }
        match &e {
            Entry::Snapshot(s) => problem(
                &mut lr.problems,
                &key,
                format!(
                    "snapshot at txid {} does not lie on the level-0 chain (no segment of the chain ends at that txid)",
                    s.txid
                ),
            ),
            Entry::Segment(g) if g.level == 0 && g.last_txid <= first.txid => problem(
                &mut lr.warnings,
                &key,
                format!(
                    "segment precedes the earliest snapshot (txid {}) and cannot be restored",
                    first.txid
                ),
            ),
            Entry::Segment(g) if g.level == 0 => problem(
                &mut lr.problems,
                &key,
                format!(
                    "segment txids {}..={} are not reachable on the level-0 chain from a snapshot (gap before it, or it conflicts with another segment)",
                    g.first_txid, g.last_txid
                ),
            ),
            Entry::Segment(g) => problem(
                &mut lr.problems,
                &key,
                format!(
                    "compacted segment (level {}) starts at txid {}, which does not follow the end of a level-0 segment of the chain",
                    g.level, g.first_txid
                ),
            ),
        }
        steps.push(Step::Lone(e));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Catalog;
    use crate::layout::{segment_key, snapshot_key};
    use crate::storage::ObjectMeta;

    fn om(key: String) -> ObjectMeta {
        ObjectMeta { key, size: 10 }
    }

    fn structure(objs: &[ObjectMeta]) -> Vec<LineageReport> {
        let c = Catalog::from_list(objs);
        c.lineages
            .values()
            .map(|l| {
                let mut lr = LineageReport {
                    lineage: l.id.clone(),
                    first: None,
                    last: None,
                    snapshots: 0,
                    objects: 0,
                    bytes: 0,
                    checked_objects: 0,
                    problems: vec![],
                    warnings: vec![],
                };
                let steps = plan_lineage(l, &mut lr);
                assert_eq!(steps.len(), l.object_count());
                lr
            })
            .collect()
    }

    #[test]
    fn structure_finds_gaps_stray_snapshots_and_compaction_misfits() {
        let l = "0000000000000001-000000aa".to_string();
        let good = vec![
            om(snapshot_key(&l, 1, 100)),
            om(segment_key(&l, 0, 2, 3, 300)),
            om(segment_key(&l, 0, 4, 5, 500)),
            om(segment_key(&l, 0, 6, 9, 900)),
            om(segment_key(&l, 1, 2, 5, 500)),
            om(snapshot_key(&l, 5, 500)),
        ];
        let r = structure(&good);
        assert!(r[0].problems.is_empty(), "{:?}", r[0].problems);

        // Missing middle segment: the gap names the object before it.
        let mut g = good.clone();
        g.remove(2);
        let r = structure(&g);
        let p = &r[0].problems;
        assert!(
            p.iter()
                .any(|p| p.key == segment_key(&l, 0, 2, 3, 300) && p.problem.contains("gap")),
            "{p:?}"
        );
        // The stranded segment after the gap is named as unreachable... but the
        // replay restarts at the snapshot at txid 5, so 6..=9 stays reachable.
        assert!(!p.iter().any(|p| p.key == segment_key(&l, 0, 6, 9, 900)));

        // A snapshot off the chain, a compacted segment that ends mid-segment,
        // one that starts mid-segment, and an orphan before the snapshot.
        let mut b = good.clone();
        b.push(om(snapshot_key(&l, 7, 700)));
        b.push(om(segment_key(&l, 1, 4, 7, 700)));
        b.push(om(segment_key(&l, 1, 3, 5, 500)));
        let r = structure(&b);
        let keys: Vec<&str> = r[0].problems.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.contains(&snapshot_key(&l, 7, 700).as_str()),
            "{keys:?}"
        );
        assert!(keys.contains(&segment_key(&l, 1, 4, 7, 700).as_str()));
        assert!(keys.contains(&segment_key(&l, 1, 3, 5, 500).as_str()));
        assert_eq!(keys.len(), 3, "{:?}", r[0].problems);

        // Conflicting segments are reported, each by name.
        let mut c = good.clone();
        c.push(om(segment_key(&l, 0, 4, 6, 600)));
        let r = structure(&c);
        let text = format!("{:?}", r[0].problems);
        assert!(text.contains("conflicting"), "{text}");
        assert!(text.contains(&segment_key(&l, 0, 4, 6, 600)), "{text}");

        // No snapshot.
        let r = structure(&good[1..4]);
        assert!(r[0].problems[0].problem.contains("no snapshot"));
    }
}
