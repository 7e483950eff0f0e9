//! Retention (docs/FORMAT.md, "Retention"): which objects a replica must
//! keep, and pruning the rest.
//!
//! Two separate promises, as users of WAL-G and pgBackRest ask for:
//! * the point-in-time window (`retention`): every commit observed in the
//!   last `retention`, and the state at the window's start, stay restorable
//!   to the exact commit;
//! * the snapshot tail (`snapshot-retention`): the newest N snapshots, or
//!   those younger than a duration, stay restorable to their own point, even
//!   beyond the window.
//!
//! The newest state of the newest lineage is always restorable, however old.
//! The plan is a pure function of one listing, the policy and "now"; before
//! anything is deleted, the remaining catalog is checked to still restore
//! every promised point, so a bug here fails loudly instead of deleting.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use serde::Serialize;

use crate::layout::{fmt_time_us, Catalog, Lineage, SnapshotEntry, Target};
use crate::storage::{Storage, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotRetention {
    /// Keep the newest N snapshots (over all lineages).
    Count(usize),
    /// Keep snapshots taken within this long before now.
    Age(Duration),
}

impl SnapshotRetention {
    pub fn parse(s: &str) -> anyhow::Result<SnapshotRetention> {
        let s = s.trim();
        if let Ok(n) = s.parse::<usize>() {
            return Ok(SnapshotRetention::Count(n));
        }
        humantime::parse_duration(s)
            .map(SnapshotRetention::Age)
            .map_err(|_| {
                anyhow::anyhow!(
                "invalid snapshot-retention {s:?}: give a count (e.g. 7) or a duration (e.g. 30d)"
            )
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The point-in-time window.
    pub retention: Duration,
    pub snapshot_retention: SnapshotRetention,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            retention: crate::config::defaults::RETENTION,
            snapshot_retention: SnapshotRetention::Count(
                crate::config::defaults::SNAPSHOT_RETENTION_COUNT,
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Deletion {
    pub key: String,
    pub size: u64,
    pub reason: String,
}

/// What pruning would do.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PrunePlan {
    pub window_start: String,
    pub window_start_us: i64,
    pub delete: Vec<Deletion>,
    pub kept: usize,
    /// Snapshots kept, and why.
    pub kept_snapshots: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

/// What pruning did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PruneReport {
    pub window_start: String,
    pub deleted: Vec<Deletion>,
    pub kept: usize,
    /// Objects the store refused to delete because of an Object Lock
    /// retention; they are deleted by a later prune once the lock expires.
    pub locked: Vec<String>,
    pub bytes_deleted: u64,
    pub warnings: Vec<String>,
}

/// A duration in microseconds, saturating at `i64::MAX`.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The first level-0 segment whose last commit is after `t`, in chain order
/// from the lineage's earliest snapshot (None: every commit is at or before t).
fn first_segment_after(l: &Lineage, t: i64) -> anyhow::Result<Option<u64>> {
    let Some(first) = l.snapshots.first() else {
        return Ok(None);
    };
    let Some(max) = l.max_txid() else {
        return Ok(None);
    };
    let chain = l.chain(first, max)?;
    Ok(chain
        .iter()
        .find(|s| s.last_time_us > t)
        .map(|s| s.first_txid))
}

/// The snapshot restores of lineage `l` inside the window start from.
fn base_snapshot(l: &Lineage, window_start: i64) -> anyhow::Result<&SnapshotEntry> {
    let first_after = first_segment_after(l, window_start)?;
    // The state at the window's start may be inside that segment: the base
    // must be at or before the commit just before it, and taken at or before
    // the window's start (a restore by time picks snapshots by their time).
    let limit = first_after.map(|f| f - 1).unwrap_or(u64::MAX);
    let base = l
        .snapshots
        .iter()
        .rev()
        .find(|s| s.txid <= limit && s.time_us <= window_start)
        .or_else(|| l.snapshots.first())
        .context("lineage without snapshot")?;
    Ok(base)
}

/// Plan pruning. `now_us` comes from the caller's clock.
pub fn plan(catalog: &Catalog, policy: &Policy, now_us: i64) -> anyhow::Result<PrunePlan> {
    // A huge retention must not wrap into the future.
    let window_start = now_us.saturating_sub(micros(policy.retention));
    let mut out = PrunePlan {
        window_start: fmt_time_us(window_start),
        window_start_us: window_start,
        ..Default::default()
    };
    let newest = catalog.newest_lineage().map(|l| l.id.clone());
    // The lineage a restore to the window's start picks (as `Catalog::plan` does).
    let at_start = catalog
        .lineages
        .values()
        .filter(|l| {
            l.snapshots
                .first()
                .is_some_and(|s| s.time_us <= window_start)
        })
        .max_by_key(|l| l.start_txid())
        .map(|l| l.id.clone());

    // Snapshot tail, over all lineages.
    let mut all: Vec<&SnapshotEntry> = catalog
        .lineages
        .values()
        .flat_map(|l| l.snapshots.iter())
        .collect();
    all.sort_by_key(|s| std::cmp::Reverse((s.time_us, s.txid)));
    let mut keep_snap: BTreeSet<String> = BTreeSet::new();
    for (i, s) in all.iter().enumerate() {
        let keep = match policy.snapshot_retention {
            SnapshotRetention::Count(n) => i < n,
            SnapshotRetention::Age(d) => s.time_us >= now_us.saturating_sub(micros(d)),
        };
        if keep {
            keep_snap.insert(s.key.clone());
            out.kept_snapshots
                .push((s.key.clone(), "snapshot-retention".into()));
        }
    }

    for l in catalog.lineages.values() {
        let in_window = l.snapshots.iter().any(|s| s.time_us >= window_start)
            || l.segments
                .values()
                .flatten()
                .any(|s| s.last_time_us >= window_start);
        let active = in_window
            || newest.as_deref() == Some(l.id.as_str())
            || at_start.as_deref() == Some(l.id.as_str());
        let mut del = |key: &str, size: u64, reason: String| {
            out.delete.push(Deletion {
                key: key.to_string(),
                size,
                reason,
            })
        };
        if l.snapshots.is_empty() {
            // Segments without any snapshot restore nothing; but a shipper
            // may be uploading its first snapshot right now: leave them.
            out.warnings
                .push(format!("lineage {} has no snapshot; left untouched", l.id));
            out.kept += l.object_count();
            continue;
        }
        if !active {
            for s in &l.snapshots {
                if keep_snap.contains(&s.key) {
                    out.kept += 1;
                } else {
                    del(
                        &s.key,
                        s.size,
                        format!("snapshot of lineage {} which ended before the window", l.id),
                    );
                }
            }
            for g in l.segments.values().chain(l.compacted.values()).flatten() {
                del(
                    &g.key,
                    g.size,
                    format!(
                        "segment of lineage {} which ended before the window (last commit {})",
                        l.id,
                        fmt_time_us(g.last_time_us)
                    ),
                );
            }
            continue;
        }
        let base = match base_snapshot(l, window_start) {
            Ok(b) => b.clone(),
            Err(e) => {
                out.warnings.push(format!(
                    "lineage {} is not continuous ({e:#}); nothing in it is pruned",
                    l.id
                ));
                out.kept += l.object_count();
                continue;
            }
        };
        out.kept_snapshots
            .push((base.key.clone(), "base of the point-in-time window".into()));
        for s in &l.snapshots {
            if s.txid >= base.txid || keep_snap.contains(&s.key) {
                out.kept += 1;
            } else {
                del(
                    &s.key,
                    s.size,
                    format!(
                        "snapshot older than the window's base snapshot (txid {})",
                        base.txid
                    ),
                );
            }
        }
        for g in l.segments.values().flatten() {
            if g.last_txid <= base.txid {
                del(
                    &g.key,
                    g.size,
                    format!(
                        "level-0 segment before the window's base snapshot (txid {})",
                        base.txid
                    ),
                );
            } else {
                out.kept += 1;
            }
        }
        for g in l.compacted.values().flatten() {
            if g.first_txid <= base.txid {
                del(&g.key, g.size, format!("compacted segment starting at or before the window's base snapshot (txid {})", base.txid));
            } else {
                out.kept += 1;
            }
        }
    }
    check_plan(catalog, &out, window_start, &keep_snap)?;
    Ok(out)
}

/// Every promised point must still be restorable from what is kept.
fn check_plan(
    catalog: &Catalog,
    plan: &PrunePlan,
    window_start: i64,
    keep_snap: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let gone: BTreeSet<&str> = plan.delete.iter().map(|d| d.key.as_str()).collect();
    let mut rest = catalog.clone();
    for l in rest.lineages.values_mut() {
        l.snapshots.retain(|s| !gone.contains(s.key.as_str()));
        for v in l.segments.values_mut().chain(l.compacted.values_mut()) {
            v.retain(|s| !gone.contains(s.key.as_str()));
        }
        l.segments.retain(|_, v| !v.is_empty());
        l.compacted.retain(|_, v| !v.is_empty());
    }
    rest.lineages.retain(|_, l| l.object_count() > 0);
    let fail = |what: String, e: anyhow::Error| -> anyhow::Result<()> {
        bail!("refusing to prune: after pruning, {what} would not be restorable ({e:#}); this is a bug, please report it")
    };
    if catalog.plan(Target::Latest).is_ok() {
        if let Err(e) = rest.plan(Target::Latest) {
            return fail("the newest state".into(), e);
        }
    }
    let earliest = catalog.window().map(|((_, t), _)| t);
    if earliest.is_some_and(|e| e <= window_start)
        && catalog.plan(Target::Time(window_start)).is_ok()
    {
        if let Err(e) = rest.plan(Target::Time(window_start)) {
            return fail(
                format!("the window's start {}", fmt_time_us(window_start)),
                e,
            );
        }
    }
    // Every commit in the window: in each lineage with in-window commits,
    // some kept snapshot at or before the txid just before the first such
    // commit's segment must chain, level-0 segment by level-0 segment, to
    // the lineage's head. One walk per lineage (linear in its segments:
    // checking each txid with a full restore plan would be quadratic).
    for l in catalog.lineages.values() {
        let Some(first_in) = l
            .segments
            .values()
            .flatten()
            .filter(|g| g.last_time_us >= window_start)
            .map(|g| g.first_txid)
            .min()
        else {
            continue;
        };
        let Some(max) = l.max_txid() else { continue };
        // Only what was restorable before pruning is promised afterwards.
        let was = l
            .snapshots
            .iter()
            .filter(|s| s.txid < first_in)
            .any(|s| l.chain(s, max).is_ok());
        if !was {
            continue;
        }
        let Some(rl) = rest.lineages.get(&l.id) else {
            return fail(
                format!("lineage {} (it has commits inside the window)", l.id),
                anyhow::anyhow!("every object of it would be deleted"),
            );
        };
        let base = rl.snapshots.iter().rev().find(|s| s.txid < first_in);
        let ok = base.map(|b| rl.chain(b, max));
        match ok {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                return fail(
                    format!("the commits of lineage {} inside the window", l.id),
                    e,
                )
            }
            None => {
                return fail(
                    format!("the commits of lineage {} inside the window", l.id),
                    anyhow::anyhow!("no snapshot before txid {first_in} would remain"),
                )
            }
        }
    }
    for l in catalog.lineages.values() {
        for s in &l.snapshots {
            if keep_snap.contains(&s.key)
                && rest.plan(Target::Txid(s.txid)).is_err()
                && catalog.plan(Target::Txid(s.txid)).is_ok()
            {
                bail!("refusing to prune: kept snapshot {} would not be restorable; this is a bug, please report it", s.key);
            }
        }
    }
    Ok(())
}

/// List the replica, plan, and (unless `dry_run`) delete. Deletions run 8
/// at a time; an object the store refuses to delete because of an Object
/// Lock retention is reported as locked and left for a later prune.
///
/// Only what proves out plans: snapshots whose signed envelopes verify
/// under `trust` (`cache` remembers those already proven by this process).
/// A planted name (a lineage with a huge start txid and an old snapshot
/// time, a snapshot that would use up `snapshot-retention`) is reported and
/// never deleted, and never makes a real object look unneeded.
pub async fn prune(
    store: &dyn Storage,
    policy: &Policy,
    now_us: i64,
    dry_run: bool,
    trust: &crate::sign::Trust,
    cache: &mut BTreeSet<String>,
) -> anyhow::Result<PruneReport> {
    let listed = Catalog::load(store).await?;
    let (catalog, refused) = crate::trusted::verified(store, &listed, trust, cache).await;
    let plan = plan(&catalog, policy, now_us)?;
    let mut rep = PruneReport {
        window_start: plan.window_start.clone(),
        kept: plan.kept,
        warnings: plan.warnings.clone(),
        ..Default::default()
    };
    for r in refused {
        rep.warnings
            .push(format!("refused (left untouched, not planned with): {r}"));
    }
    if dry_run {
        rep.deleted = plan.delete;
        rep.bytes_deleted = rep.deleted.iter().map(|d| d.size).sum();
        return Ok(rep);
    }
    // Snapshots last: if pruning stops half-way, what remains still restores.
    let mut order = plan.delete;
    order.sort_by_key(|d| d.key.contains("/snapshots/"));
    let mut results = futures::stream::iter(order.into_iter().map(|d| async move {
        let r = store.delete(&d.key).await;
        (d, r)
    }))
    .buffer_unordered(8);
    let mut first_err = None;
    while let Some((d, r)) = results.next().await {
        match r {
            Ok(()) => {
                rep.bytes_deleted += d.size;
                rep.deleted.push(d);
            }
            Err(StorageError::Locked { .. }) => rep.locked.push(d.key),
            Err(e) => {
                if first_err.is_none() {
                    first_err =
                        Some(anyhow::Error::new(e).context(format!("cannot delete {}", d.key)));
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{segment_key, snapshot_key};
    use crate::storage::ObjectMeta;

    const MIN: i64 = 60_000_000;
    const HOUR: i64 = 60 * MIN;

    /// A replica built as the shipper builds it: a segment every 10 minutes,
    /// a snapshot every 6 hours (in the lineage), level-1 compaction per hour;
    /// a continuity break (new lineage) at hour 30.
    fn replica(hours: i64) -> (Vec<ObjectMeta>, Vec<(u64, i64)>) {
        let mut objs = Vec::new();
        let mut commits = Vec::new();
        let mut lineage = "0000000000000001-000000aa".to_string();
        objs.push(ObjectMeta {
            key: snapshot_key(&lineage, 1, 0),
            size: 100,
        });
        commits.push((1, 0));
        let mut txid = 1u64;
        let mut hour_first = 2u64;
        for step in 1..=(hours * 6) {
            let t = step * 10 * MIN;
            if t == 30 * HOUR {
                txid += 1;
                lineage = format!("{txid:016x}-000000bb");
                objs.push(ObjectMeta {
                    key: snapshot_key(&lineage, txid, t),
                    size: 100,
                });
                commits.push((txid, t));
                hour_first = txid + 1;
                continue;
            }
            let first = txid + 1;
            txid += 3;
            objs.push(ObjectMeta {
                key: segment_key(&lineage, 0, first, txid, t),
                size: 10,
            });
            commits.push((txid, t));
            if t % HOUR == 0 {
                objs.push(ObjectMeta {
                    key: segment_key(&lineage, 1, hour_first, txid, t),
                    size: 20,
                });
                hour_first = txid + 1;
            }
            if t % (6 * HOUR) == 0 {
                objs.push(ObjectMeta {
                    key: snapshot_key(&lineage, txid, t + 1),
                    size: 100,
                });
            }
        }
        (objs, commits)
    }

    fn apply(objs: &mut Vec<ObjectMeta>, plan: &PrunePlan) {
        let gone: BTreeSet<&str> = plan.delete.iter().map(|d| d.key.as_str()).collect();
        objs.retain(|o| !gone.contains(o.key.as_str()));
    }

    /// Prune every simulated hour for two days: each time, every commit of
    /// the last 6 hours (and the state at the window's start) restores, the
    /// newest state restores, kept snapshots restore, and nothing older than
    /// what the window needs is left behind.
    #[test]
    fn window_holds_exactly_what_the_policy_promises() {
        let policy = Policy {
            retention: Duration::from_secs(6 * 3600),
            snapshot_retention: SnapshotRetention::Count(3),
        };
        for now_h in 7..=48 {
            let now = now_h * HOUR;
            let (mut objs, commits) = replica(now_h);
            // Prune hourly up to now, as the daemon does.
            for h in 1..=now_h {
                let c = Catalog::from_list(&objs);
                let p = plan(&c, &policy, h * HOUR).unwrap();
                apply(&mut objs, &p);
            }
            let c = Catalog::from_list(&objs);
            let ws = now - 6 * HOUR;
            for &(txid, t) in &commits {
                if t >= ws {
                    c.plan(Target::Txid(txid))
                        .unwrap_or_else(|e| panic!("now {now_h}h: txid {txid} at {t}: {e:#}"));
                }
            }
            c.plan(Target::Time(ws)).unwrap();
            c.plan(Target::Latest).unwrap();
            // Exactly: nothing restorable before the base snapshot's time
            // except kept snapshots; the base is at most one snapshot
            // interval (6 h) plus one segment older than the window start.
            let earliest = c.window().unwrap().0 .1;
            assert!(earliest <= ws, "{now_h}: window start not covered");
            let snaps: Vec<&SnapshotEntry> = c
                .lineages
                .values()
                .flat_map(|l| l.snapshots.iter())
                .collect();
            for s in &snaps {
                assert!(
                    s.time_us >= ws - 6 * HOUR - 10 * MIN || snaps.len() <= 3 + 1,
                    "{now_h}h: snapshot {} kept beyond policy",
                    s.key
                );
            }
            // Level-0 segments older than the base are gone.
            for l in c.lineages.values() {
                let Some(first) = l.snapshots.first() else {
                    continue;
                };
                for g in l.segments.values().flatten() {
                    assert!(
                        g.first_txid > first.txid,
                        "{now_h}h: orphan segment {}",
                        g.key
                    );
                }
            }
            // The old lineage disappears entirely once the window has left it
            // and its snapshots fell out of the count.
            if now_h >= 48 {
                assert_eq!(c.lineages.len(), 1, "{:?}", c.lineages.keys());
            }
        }
    }

    /// The post-plan check catches a plan that would delete a needed
    /// object (a stand-in for a planner bug).
    #[test]
    fn check_refuses_a_plan_that_breaks_the_window() {
        let (objs, _) = replica(20);
        let c = Catalog::from_list(&objs);
        let policy = Policy {
            retention: Duration::from_secs(6 * 3600),
            snapshot_retention: SnapshotRetention::Count(1),
        };
        let now = 20 * HOUR;
        let mut p = plan(&c, &policy, now).unwrap();
        let keep: BTreeSet<String> = BTreeSet::new();
        check_plan(&c, &p, now - 6 * HOUR, &keep).unwrap();
        // Also delete a level-0 segment from inside the window.
        let victim = c
            .lineages
            .values()
            .flat_map(|l| l.segments.values().flatten())
            .find(|g| g.last_time_us > now - 3 * HOUR)
            .unwrap();
        p.delete.push(Deletion {
            key: victim.key.clone(),
            size: victim.size,
            reason: "bug".into(),
        });
        let e = check_plan(&c, &p, now - 6 * HOUR, &keep).unwrap_err();
        assert!(format!("{e:#}").contains("refusing to prune"), "{e:#}");
    }

    #[test]
    fn snapshot_retention_parses() {
        assert_eq!(
            SnapshotRetention::parse("7").unwrap(),
            SnapshotRetention::Count(7)
        );
        assert_eq!(
            SnapshotRetention::parse("2d").unwrap(),
            SnapshotRetention::Age(Duration::from_secs(2 * 86400))
        );
        assert!(SnapshotRetention::parse("lots").is_err());
    }

    #[test]
    fn gap_means_nothing_pruned_in_that_lineage() {
        let (mut objs, _) = replica(20);
        // Remove a middle segment: the lineage is broken; prune must not
        // "fix" it by deleting around the gap.
        let i = objs
            .iter()
            .position(|o| o.key.contains("/segments/0/") && o.key.contains("0000000000000020-"))
            .unwrap();
        objs.remove(i);
        let c = Catalog::from_list(&objs);
        let p = plan(&c, &Policy::default(), 20 * HOUR).unwrap();
        assert!(p.delete.is_empty(), "{:?}", p.delete);
        assert!(!p.warnings.is_empty());
    }
}
