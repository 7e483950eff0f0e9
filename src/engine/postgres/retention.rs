//! Pruning a PostgreSQL archive (docs/POSTGRES.md, "Retention").
//!
//! Two separate promises (WAL-G #462, #1307 asked for them apart):
//! * the point-in-time window (`retention`): every point from now −
//!   retention to the end of the archive stays restorable, so the newest
//!   backup that ends at or before the window's start is kept (the window's
//!   *anchor*) with all WAL after its start;
//! * base-backup retention (`backup-retention`): the newest N backups (at
//!   least one), or all that ended within a duration, stay restorable.
//!
//! "Newest" is by the time a backup ended, never by LSN or timeline (WAL-G
//! #636 deleted the newest backups after a timeline reset). WAL is kept from
//! the segment holding the oldest kept backup's start onward, on every
//! timeline; timeline history files are never deleted.
//!
//! The plan is a pure function of a proven [`Inventory`], the policy and
//! "now": only objects whose envelopes proved out are ever deleted, and
//! before anything is, the plan is checked to leave every kept backup
//! reaching exactly as far as before.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, ensure};
use futures::StreamExt;
use serde::Serialize;

use super::archive::{BackupInfo, WalPiece};
use super::inventory::{reach_from_segment, Inventory, Refusal};
use super::walname::{format_lsn, SegmentName};
use crate::layout::fmt_time_us;
use crate::storage::{Storage, StorageError};

/// An incomplete backup (parts, no record) younger than this may still be
/// uploading: it is left alone.
pub const INCOMPLETE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How many base backups are kept regardless of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupRetention {
    /// The newest N (at least 1).
    Count(usize),
    /// Every backup that ended within this long before now (and the newest).
    Age(Duration),
}

impl BackupRetention {
    pub fn parse(s: &str) -> anyhow::Result<BackupRetention> {
        let s = s.trim();
        if let Ok(n) = s.parse::<usize>() {
            ensure!(
                n >= 1,
                "--backup-retention 0 would delete every base backup: give at least 1"
            );
            return Ok(BackupRetention::Count(n));
        }
        humantime::parse_duration(s)
            .map(BackupRetention::Age)
            .map_err(|_| {
                anyhow::anyhow!(
                    "invalid backup-retention {s:?}: give a count (e.g. 7) or a duration (e.g. 30d)"
                )
            })
    }
}

/// What to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The point-in-time window.
    pub retention: Duration,
    pub backup_retention: BackupRetention,
}

/// One object to delete, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deletion {
    pub key: String,
    pub size: u64,
    pub reason: String,
}

/// A backup kept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Kept {
    pub id: String,
    pub end_lsn: String,
    pub end_time: String,
    pub reasons: Vec<String>,
}

/// What pruning would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub window_start: String,
    pub window_start_us: i64,
    pub kept: Vec<Kept>,
    /// WAL is kept from the start of this segment on (every timeline).
    pub wal_kept_from: Option<String>,
    /// In deletion order: backup records before their parts.
    pub delete: Vec<Deletion>,
    pub warnings: Vec<String>,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Which backups are kept, with reasons (index into `backups`, which is
/// sorted oldest first by end time).
fn keep_backups(backups: &[BackupInfo], policy: &Policy, now_us: i64) -> Vec<Vec<String>> {
    let mut reasons = vec![Vec::new(); backups.len()];
    let n = backups.len();
    if n == 0 {
        return reasons;
    }
    match policy.backup_retention {
        BackupRetention::Count(k) => {
            let k = k.max(1);
            for r in reasons.iter_mut().skip(n.saturating_sub(k)) {
                r.push(format!("one of the newest {k} (backup-retention {k})"));
            }
        }
        BackupRetention::Age(d) => {
            let since = now_us.saturating_sub(micros(d));
            for (b, r) in backups.iter().zip(reasons.iter_mut()) {
                if b.end_time_us >= since {
                    r.push(format!(
                        "ended within {} (backup-retention)",
                        humantime::format_duration(d)
                    ));
                }
            }
            if reasons[n - 1].is_empty() {
                reasons[n - 1].push("the newest backup (always kept)".into());
            }
        }
    }
    let window_start = now_us.saturating_sub(micros(policy.retention));
    match backups.iter().rposition(|b| b.end_time_us <= window_start) {
        Some(i) => reasons[i].push(format!(
            "the newest backup that ends before the window's start ({}): every point in the window restores from it",
            fmt_time_us(window_start)
        )),
        // The archive is younger than the window: its oldest backup is the
        // earliest point there is.
        None => reasons[0].push(format!(
            "the oldest backup, and the window reaches back before it ({})",
            fmt_time_us(window_start)
        )),
    }
    reasons
}

/// Plan pruning from a proven inventory. Pure; `now_us` from the caller's clock.
pub fn plan(inv: &Inventory, policy: &Policy, now_us: i64) -> anyhow::Result<Plan> {
    let window_start = now_us.saturating_sub(micros(policy.retention));
    let mut out = Plan {
        window_start: fmt_time_us(window_start),
        window_start_us: window_start,
        ..Default::default()
    };
    let mut backups = inv.backups.clone();
    backups.sort_by(|a, b| (a.end_time_us, &a.id).cmp(&(b.end_time_us, &b.id)));
    let reasons = keep_backups(&backups, policy, now_us);
    let mut kept: Vec<&BackupInfo> = Vec::new();
    for (b, r) in backups.iter().zip(&reasons) {
        if r.is_empty() {
            let Some(dir) = inv.dirs.get(&b.id) else {
                continue;
            };
            let why = format!(
                "base backup {} (ended {}, LSN {}) is not kept: neither among the retained backups nor the window's anchor",
                b.id,
                fmt_time_us(b.end_time_us),
                format_lsn(b.end_lsn)
            );
            // The record first: a half-deleted backup is never listed complete.
            if let Some((o, _)) = &dir.record {
                out.delete.push(Deletion {
                    key: o.key.clone(),
                    size: o.size,
                    reason: format!("{why} (its record, deleted first)"),
                });
            }
            for p in &dir.parts {
                out.delete.push(Deletion {
                    key: p.obj.key.clone(),
                    size: p.obj.size,
                    reason: why.clone(),
                });
            }
        } else {
            kept.push(b);
            out.kept.push(Kept {
                id: b.id.clone(),
                end_lsn: format_lsn(b.end_lsn),
                end_time: fmt_time_us(b.end_time_us),
                reasons: r.clone(),
            });
        }
    }
    // Incomplete backups: parts without a record.
    let grace = now_us.saturating_sub(micros(INCOMPLETE_GRACE));
    for (id, dir) in &inv.dirs {
        if dir.record.is_some() {
            continue;
        }
        if dir.record_refused {
            out.warnings.push(format!(
                "backup {id}: its record does not prove out; nothing of it is deleted"
            ));
            continue;
        }
        let Some(newest) = dir.newest_time_us() else {
            continue;
        };
        if newest >= grace {
            out.warnings.push(format!(
                "backup {id} is incomplete (no record) but was written {}: still uploading? left alone for 24 h",
                fmt_time_us(newest)
            ));
            continue;
        }
        for p in &dir.parts {
            out.delete.push(Deletion {
                key: p.obj.key.clone(),
                size: p.obj.size,
                reason: format!(
                    "part of incomplete base backup {id} (no record; last written {}, over 24 h ago)",
                    fmt_time_us(newest)
                ),
            });
        }
    }
    // WAL before the oldest kept backup's start (whole segments).
    let mut gone: BTreeSet<&str> = BTreeSet::new();
    if let Some(oldest) = kept.iter().min_by_key(|b| b.start_lsn) {
        let seg = SegmentName::of_lsn(oldest.timeline, oldest.start_lsn);
        out.wal_kept_from = Some(format!("{} (LSN {})", seg, format_lsn(seg.start_lsn())));
        for p in inv.wal.iter().filter(|p| p.seg.segno < seg.segno) {
            gone.insert(&p.key);
            out.delete.push(Deletion {
                key: p.key.clone(),
                size: p.size,
                reason: format!(
                    "WAL before LSN {} (on every timeline), the start of the segment where the oldest kept backup {} starts (LSN {})",
                    format_lsn(seg.start_lsn()),
                    oldest.id,
                    format_lsn(oldest.start_lsn)
                ),
            });
        }
    } else if !inv.wal.is_empty() {
        out.warnings
            .push("the archive holds no complete base backup: no WAL is pruned".into());
    }
    // Pieces a whole segment replaces.
    for p in &inv.wal {
        if p.is_whole() || gone.contains(p.key.as_str()) {
            continue;
        }
        if let Some(w) = inv.wal.iter().find(|w| w.seg == p.seg && w.is_whole()) {
            out.delete.push(Deletion {
                key: p.key.clone(),
                size: p.size,
                reason: format!("partial piece covered by the whole segment {}", w.key),
            });
        }
    }
    check(inv, &kept, &out)?;
    Ok(out)
}

/// Every kept backup must reach exactly as far after pruning as before,
/// and the newest backup must be kept.
fn check(inv: &Inventory, kept: &[&BackupInfo], plan: &Plan) -> anyhow::Result<()> {
    let gone: BTreeSet<&str> = plan.delete.iter().map(|d| d.key.as_str()).collect();
    let rest: Vec<WalPiece> = inv
        .wal
        .iter()
        .filter(|p| !gone.contains(p.key.as_str()))
        .cloned()
        .collect();
    if let Some(newest) = inv.backups.iter().max_by_key(|b| b.end_time_us) {
        if !kept.iter().any(|b| b.id == newest.id) {
            bail!("refusing to prune: the plan would delete the newest base backup {}; this is a bug, please report it", newest.id);
        }
    }
    for b in kept {
        let before = reach_from_segment(&inv.wal, b.timeline, b.start_lsn);
        let after = reach_from_segment(&rest, b.timeline, b.start_lsn);
        if before != after {
            bail!(
                "refusing to prune: kept base backup {} would reach WAL only up to {} instead of {}; this is a bug, please report it",
                b.id,
                format_lsn(after),
                format_lsn(before)
            );
        }
    }
    Ok(())
}

/// What pruning did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub window_start: String,
    pub kept: Vec<Kept>,
    pub wal_kept_from: Option<String>,
    pub deleted: Vec<Deletion>,
    pub bytes_deleted: u64,
    /// Objects that do not prove out: never deleted, never planned with.
    pub refused: Vec<Refusal>,
    /// Names under `pg/` offsite does not write: left alone.
    pub ignored: Vec<String>,
    /// Objects the store would not delete (Object Lock).
    pub locked: Vec<String>,
    pub warnings: Vec<String>,
}

/// Prove the archive, plan, and (unless `dry_run`) delete: backup records
/// one by one first, then everything else 8 at a time.
pub async fn prune(
    store: &dyn Storage,
    trust: &crate::sign::Trust,
    policy: &Policy,
    now_us: i64,
    dry_run: bool,
) -> anyhow::Result<PruneReport> {
    let inv = Inventory::load(store, trust).await?;
    let plan = plan(&inv, policy, now_us)?;
    let mut rep = PruneReport {
        dry_run,
        window_start: plan.window_start.clone(),
        kept: plan.kept.clone(),
        wal_kept_from: plan.wal_kept_from.clone(),
        refused: inv.refused.clone(),
        ignored: inv.ignored.clone(),
        warnings: plan.warnings.clone(),
        ..Default::default()
    };
    if dry_run {
        rep.bytes_deleted = plan.delete.iter().map(|d| d.size).sum();
        rep.deleted = plan.delete;
        return Ok(rep);
    }
    let (records, rest): (Vec<Deletion>, Vec<Deletion>) = plan
        .delete
        .into_iter()
        .partition(|d| d.key.ends_with("/backup.done"));
    let mut first_err = None;
    let mut skip_ids: BTreeSet<String> = BTreeSet::new();
    for d in records {
        match store.delete(&d.key).await {
            Ok(()) => {
                rep.bytes_deleted += d.size;
                rep.deleted.push(d);
            }
            Err(e) => {
                // Its parts stay: the backup stays complete.
                let id = d.key.rsplit('/').nth(1).unwrap_or_default().to_string();
                skip_ids.insert(id);
                if let StorageError::Locked { .. } = e {
                    rep.locked.push(d.key);
                } else if first_err.is_none() {
                    first_err =
                        Some(anyhow::Error::new(e).context(format!("cannot delete {}", d.key)));
                }
            }
        }
    }
    let rest: Vec<Deletion> = rest
        .into_iter()
        .filter(|d| {
            !skip_ids.iter().any(|id| {
                d.key
                    .starts_with(&format!("{}{id}/", super::archive::BACKUPS_PREFIX))
            })
        })
        .collect();
    let mut results = futures::stream::iter(rest.into_iter().map(|d| async move {
        let r = store.delete(&d.key).await;
        (d, r)
    }))
    .buffer_unordered(8);
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
    use crate::engine::postgres::archive::{self, ArchiveInfo};
    use crate::engine::postgres::inventory::tests::{piece, whole};
    use crate::engine::postgres::inventory::{BackupDir, Obj, PartObj};
    use crate::engine::postgres::walname::SEGMENT_SIZE;

    const S: u64 = SEGMENT_SIZE;
    const H: i64 = 3_600_000_000;

    /// A backup on `tli` from segment `seg` (+40 bytes) to the next
    /// segment, ending at hour `h`, with a record and two parts.
    fn add_backup(inv: &mut Inventory, tli: u32, seg: u64, h: i64) -> String {
        let start = seg * S + 40;
        let id = archive::backup_id(h * H - 1000, start);
        let b = BackupInfo {
            id: id.clone(),
            label: "t".into(),
            system_id: "1".into(),
            timeline: tli,
            start_lsn: start,
            end_lsn: (seg + 1) * S + 100,
            start_time_us: h * H - 1000,
            end_time_us: h * H,
            pg_version: "15".into(),
            archives: vec![ArchiveInfo {
                name: "base.tar".into(),
                parts: 2,
                bytes: 10,
                blake3: String::new(),
                tablespace: None,
            }],
            manifest: false,
        };
        let obj = |key: String| Obj {
            key,
            size: 7,
            time_us: h * H,
        };
        let dir = BackupDir {
            record: Some((obj(archive::done_key(&id).unwrap()), b.clone())),
            record_refused: false,
            parts: (0..2)
                .map(|i| PartObj {
                    obj: obj(archive::part_key(&id, "base.tar", i).unwrap()),
                    archive: "base.tar".into(),
                    part: i,
                })
                .collect(),
        };
        inv.backups.push(b);
        inv.dirs.insert(id.clone(), dir);
        inv.sort();
        id
    }

    fn policy(ret_h: u64, br: BackupRetention) -> Policy {
        Policy {
            retention: Duration::from_secs(ret_h * 3600),
            backup_retention: br,
        }
    }

    fn deleted(p: &Plan) -> BTreeSet<String> {
        p.delete.iter().map(|d| d.key.clone()).collect()
    }

    fn backup_deleted(p: &Plan, id: &str) -> bool {
        p.delete
            .iter()
            .any(|d| d.key == archive::done_key(id).unwrap())
    }

    /// Daily-ish backups at hours 1, 10, 20, 30 on segments 1, 3, 5, 7; WAL 1..9.
    fn archive4() -> (Inventory, Vec<String>) {
        let mut inv = Inventory {
            wal: whole(1, 1, 9),
            ..Default::default()
        };
        let ids = [(1, 1), (3, 10), (5, 20), (7, 30)]
            .iter()
            .map(|&(seg, h)| add_backup(&mut inv, 1, seg, h))
            .collect();
        (inv, ids)
    }

    #[test]
    fn count_keeps_the_newest_and_the_window_anchor() {
        let (inv, ids) = archive4();
        // now 32 h, window 15 h → starts at hour 17: the anchor is the hour-10 backup.
        let p = plan(&inv, &policy(15, BackupRetention::Count(1)), 32 * H).unwrap();
        let kept: Vec<&str> = p.kept.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(kept, vec![ids[1].as_str(), ids[3].as_str()]);
        assert!(backup_deleted(&p, &ids[0]));
        assert!(backup_deleted(&p, &ids[2]));
        // Records come before their parts.
        let pos = |k: String| p.delete.iter().position(|d| d.key == k).unwrap();
        assert!(
            pos(archive::done_key(&ids[0]).unwrap())
                < pos(archive::part_key(&ids[0], "base.tar", 0).unwrap())
        );
        // WAL before segment 3 (where the anchor starts) goes, on every timeline.
        let d = deleted(&p);
        assert!(d.contains(&inv.wal[0].key) && d.contains(&inv.wal[1].key));
        assert!(!d.contains(&inv.wal[2].key), "segment 3 is needed");
        assert_eq!(
            p.wal_kept_from.as_deref(),
            Some("000000010000000000000003 (LSN 0/3000000)")
        );
        assert!(p.kept[0].reasons[0].contains("window"));
    }

    #[test]
    fn count_two_and_a_window_inside_the_newest() {
        let (inv, ids) = archive4();
        // Window 1 h: starts at hour 31, the anchor is the newest backup itself.
        let p = plan(&inv, &policy(1, BackupRetention::Count(2)), 32 * H).unwrap();
        let kept: Vec<&str> = p.kept.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(kept, vec![ids[2].as_str(), ids[3].as_str()]);
        assert_eq!(p.kept[1].reasons.len(), 2, "{:?}", p.kept[1]);
    }

    #[test]
    fn duration_retention_keeps_every_backup_that_ended_within_it() {
        let (inv, ids) = archive4();
        let p = plan(
            &inv,
            &policy(1, BackupRetention::Age(Duration::from_secs(15 * 3600))),
            32 * H,
        )
        .unwrap();
        let kept: Vec<&str> = p.kept.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(kept, vec![ids[2].as_str(), ids[3].as_str()]);
        // All too old: the newest stays anyway.
        let p = plan(
            &inv,
            &policy(1, BackupRetention::Age(Duration::from_secs(60))),
            320 * H,
        )
        .unwrap();
        let kept: Vec<&str> = p.kept.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(kept, vec![ids[3].as_str()]);
    }

    #[test]
    fn the_only_backup_is_never_deleted() {
        let mut inv = Inventory {
            wal: whole(1, 1, 4),
            ..Default::default()
        };
        let id = add_backup(&mut inv, 1, 2, 1);
        for br in [
            BackupRetention::Count(1),
            BackupRetention::Age(Duration::from_secs(1)),
        ] {
            let p = plan(&inv, &policy(1, br), 1000 * H).unwrap();
            assert_eq!(p.kept.len(), 1);
            assert_eq!(p.kept[0].id, id);
            let d = deleted(&p);
            assert_eq!(d, BTreeSet::from([inv.wal[0].key.clone()]), "{d:?}");
        }
        assert!(BackupRetention::parse("0").is_err());
        assert_eq!(
            BackupRetention::parse("3").unwrap(),
            BackupRetention::Count(3)
        );
        assert_eq!(
            BackupRetention::parse("2d").unwrap(),
            BackupRetention::Age(Duration::from_secs(2 * 86400))
        );
    }

    /// A timeline switch (promotion at segment 6 to timeline 2) and a
    /// backup on timeline 2 whose start LSN is lower than the old
    /// timeline's newest backup's is not "older" (WAL-G #636): newest is by
    /// time, and WAL of both timelines after the kept backup's start stays.
    #[test]
    fn timeline_switch_orders_by_time_not_lsn() {
        let mut inv = Inventory {
            wal: whole(1, 1, 9),
            ..Default::default()
        };
        inv.wal.extend(whole(2, 5, 8));
        inv.sort();
        let old = add_backup(&mut inv, 1, 7, 10); // tl 1, high LSN, older
        let new = add_backup(&mut inv, 2, 5, 20); // tl 2, lower LSN, newer
        let p = plan(&inv, &policy(1, BackupRetention::Count(1)), 21 * H).unwrap();
        let kept: Vec<&str> = p.kept.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(kept, vec![new.as_str()]);
        assert!(backup_deleted(&p, &old));
        let d = deleted(&p);
        for w in &inv.wal {
            assert_eq!(
                d.contains(&w.key),
                w.seg.segno < 5,
                "{} (timeline {})",
                w.key,
                w.seg.timeline
            );
        }
    }

    #[test]
    fn pieces_covered_by_a_whole_segment_go_and_incomplete_backups_after_a_day() {
        let mut inv = Inventory {
            wal: whole(1, 1, 4),
            ..Default::default()
        };
        inv.wal.push(piece(1, 3 * S, 3 * S + 100));
        inv.wal.push(piece(1, 3 * S + 100, 3 * S + 900));
        inv.wal.push(piece(1, 4 * S, 4 * S + 100)); // no whole segment 4: kept
        inv.sort();
        add_backup(&mut inv, 1, 1, 1);
        let mut stale = BackupDir::default();
        stale.parts.push(PartObj {
            obj: Obj {
                key: "pg/backups/x/base.tar.00000".into(),
                size: 1,
                time_us: 2 * H,
            },
            archive: "base.tar".into(),
            part: 0,
        });
        inv.dirs.insert("stale".into(), stale.clone());
        let mut fresh = stale.clone();
        fresh.parts[0].obj.time_us = 40 * H;
        fresh.parts[0].obj.key = "pg/backups/y/base.tar.00000".into();
        inv.dirs.insert("fresh".into(), fresh);
        let mut refused = stale.clone();
        refused.record_refused = true;
        refused.parts[0].obj.key = "pg/backups/z/base.tar.00000".into();
        inv.dirs.insert("refused".into(), refused);
        let p = plan(&inv, &policy(1, BackupRetention::Count(1)), 50 * H).unwrap();
        let d = deleted(&p);
        assert_eq!(
            d,
            BTreeSet::from([
                archive::wal_key(SegmentName::of_lsn(1, 3 * S), 3 * S, 3 * S + 100),
                archive::wal_key(SegmentName::of_lsn(1, 3 * S), 3 * S + 100, 3 * S + 900),
                "pg/backups/x/base.tar.00000".to_string(),
            ]),
            "{:#?}",
            p.delete
        );
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    }

    #[test]
    fn the_check_refuses_a_plan_that_cuts_a_kept_backups_wal() {
        let mut inv = Inventory {
            wal: whole(1, 1, 6),
            ..Default::default()
        };
        let id = add_backup(&mut inv, 1, 3, 1);
        let mut p = plan(&inv, &policy(1, BackupRetention::Count(1)), 2 * H).unwrap();
        let b = inv.backups[0].clone();
        check(&inv, &[&b], &p).unwrap();
        p.delete.push(Deletion {
            key: inv.wal[3].key.clone(),
            size: 1,
            reason: "bug".into(),
        });
        let e = check(&inv, &[&b], &p).unwrap_err().to_string();
        assert!(e.contains("refusing to prune") && e.contains(&id), "{e}");
        let e = check(&inv, &[], &p).unwrap_err().to_string();
        assert!(e.contains("newest base backup"), "{e}");
    }
}
