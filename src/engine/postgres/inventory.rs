//! What a PostgreSQL archive holds, proven: one LIST of `pg/`, every
//! object's envelope proven (`archive::prove`, two ranged reads each, no
//! download), sorted into base backups, WAL pieces and files. Objects that
//! do not prove out are refused (with the reason) and names offsite does
//! not write are ignored: neither is listed, planned with or deleted.
//! `list`, `prune` and `verify` all start from an [`Inventory`].

use std::collections::BTreeMap;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;

use super::archive::{self, BackupInfo, PgMeta, WalPiece};
use super::restore::archive_reach;
use super::walname::{format_lsn, SegmentName, WalFile};
use crate::layout::fmt_time_us;
use crate::sign::Trust;
use crate::storage::Storage;

/// Objects whose envelopes are proven at once.
const PROVE_PARALLEL: usize = 16;

/// One proven object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Obj {
    pub key: String,
    pub size: u64,
    /// When it was sealed (its signed envelope's time).
    pub time_us: i64,
}

/// A proven part of a base backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartObj {
    #[serde(flatten)]
    pub obj: Obj,
    pub archive: String,
    pub part: u32,
}

/// Everything under `pg/backups/<id>/` that proves out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupDir {
    /// The record (`backup.done`) and what it says, when it proves out.
    pub record: Option<(Obj, BackupInfo)>,
    /// A `backup.done` is there but does not prove out: nothing in this
    /// directory is planned with or deleted.
    pub record_refused: bool,
    pub parts: Vec<PartObj>,
}

impl BackupDir {
    /// The newest time any of its objects was sealed.
    pub fn newest_time_us(&self) -> Option<i64> {
        self.parts
            .iter()
            .map(|p| p.obj.time_us)
            .chain(self.record.iter().map(|(o, _)| o.time_us))
            .max()
    }
}

/// An object that does not prove out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub key: String,
    pub reason: String,
}

/// A proven listing of a PostgreSQL archive.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Complete base backups, oldest (by end time) first.
    pub backups: Vec<BackupInfo>,
    /// Every backup directory by id (complete or not).
    pub dirs: BTreeMap<String, BackupDir>,
    /// Proven WAL pieces, sorted by segment, start, longest first.
    pub wal: Vec<WalPiece>,
    /// Seal times of the proven WAL pieces, by key.
    pub wal_time_us: BTreeMap<String, i64>,
    /// Proven files (history, `.backup`, `.partial`) by name.
    pub files: BTreeMap<String, Obj>,
    pub refused: Vec<Refusal>,
    /// Keys under `pg/` that are not names offsite writes.
    pub ignored: Vec<String>,
    /// Whether the proven objects are encrypted (`None`: none proven;
    /// `Some(true)` if any is).
    pub encrypted: Option<bool>,
    /// Proven objects stored in plaintext (with `encrypted`: a mixed archive).
    pub plaintext: Vec<String>,
    pub objects: usize,
    pub bytes: u64,
}

/// What a key under `pg/` names, before anything is proven.
enum Name {
    Wal(WalPiece),
    File(String),
    Record(String),
    Part(String),
}

fn parse_name(key: &str, size: u64) -> Option<Name> {
    if let Some(p) = archive::parse_wal_key(key, size) {
        return Some(Name::Wal(p));
    }
    if let Some(name) = key.strip_prefix(archive::FILES_PREFIX) {
        let f = WalFile::parse(name).ok()?;
        return (archive::file_key(&f).ok()? == key).then(|| Name::File(name.to_string()));
    }
    let rest = key.strip_prefix(archive::BACKUPS_PREFIX)?;
    let (id, file) = rest.split_once('/')?;
    if file == "backup.done" {
        return (archive::done_key(id).ok()? == key).then(|| Name::Record(id.to_string()));
    }
    let (a, part) = file.rsplit_once('.')?;
    let part: u32 = part.parse().ok()?;
    (archive::part_key(id, a, part).ok()? == key).then(|| Name::Part(id.to_string()))
}

impl Inventory {
    /// List `pg/` and prove every object offsite could have written.
    pub async fn load(store: &dyn Storage, trust: &Trust) -> anyhow::Result<Inventory> {
        let listing = store
            .list("pg/")
            .await
            .with_context(|| format!("cannot list pg/ in {}", store.describe()))?;
        let mut inv = Inventory::default();
        let mut named = Vec::new();
        for m in listing {
            match parse_name(&m.key, m.size) {
                Some(n) => named.push((m, n)),
                None => inv.ignored.push(m.key),
            }
        }
        let proven: Vec<_> = futures::stream::iter(named.into_iter().map(|(m, n)| async move {
            let r = archive::prove(store, &m.key, m.size, trust).await;
            (m, n, r)
        }))
        .buffer_unordered(PROVE_PARALLEL)
        .collect()
        .await;
        for (m, n, r) in proven {
            let (env, meta) = match r {
                Ok(x) => x,
                Err(e) => {
                    if let Name::Record(id) = &n {
                        inv.dirs.entry(id.clone()).or_default().record_refused = true;
                    }
                    let reason = format!("{e:#}")
                        .replace('\n', " ")
                        .replace(&format!("object {}: ", m.key), "");
                    inv.refused.push(Refusal { key: m.key, reason });
                    continue;
                }
            };
            inv.objects += 1;
            inv.bytes += m.size;
            if env.encrypted {
                inv.encrypted = Some(true);
            } else {
                inv.plaintext.push(m.key.clone());
                inv.encrypted.get_or_insert(false);
            }
            let obj = Obj {
                key: m.key.clone(),
                size: m.size,
                time_us: env.meta.time_us,
            };
            match (n, meta) {
                (Name::Wal(p), PgMeta::Wal { .. }) => {
                    inv.wal_time_us.insert(p.key.clone(), obj.time_us);
                    inv.wal.push(p);
                }
                (Name::File(name), PgMeta::File { .. }) => {
                    inv.files.insert(name, obj);
                }
                (Name::Record(id), PgMeta::Backup(b)) => {
                    inv.backups.push(b.clone());
                    inv.dirs.entry(id).or_default().record = Some((obj, b));
                }
                (Name::Part(id), PgMeta::BackupPart { archive, part, .. }) => {
                    inv.dirs
                        .entry(id)
                        .or_default()
                        .parts
                        .push(PartObj { obj, archive, part });
                }
                // `prove` checked the key against what the envelope says.
                _ => inv.refused.push(Refusal {
                    key: m.key,
                    reason: "its envelope describes another kind of object".into(),
                }),
            }
        }
        inv.sort();
        Ok(inv)
    }

    /// Put everything in its canonical order.
    pub fn sort(&mut self) {
        self.backups
            .sort_by(|a, b| (a.end_time_us, &a.id).cmp(&(b.end_time_us, &b.id)));
        self.wal
            .sort_by_key(|p| (p.seg, p.start, std::cmp::Reverse(p.end)));
        for d in self.dirs.values_mut() {
            d.parts
                .sort_by(|a, b| (&a.archive, a.part).cmp(&(&b.archive, b.part)));
        }
        self.refused.sort_by(|a, b| a.key.cmp(&b.key));
        self.ignored.sort();
    }

    /// How far the WAL reaches continuously from the start of the segment
    /// holding `b`'s start (what a restore from `b` can replay).
    pub fn reach_of(&self, b: &BackupInfo) -> u64 {
        reach_from_segment(&self.wal, b.timeline, b.start_lsn)
    }

    /// Timeline history files held.
    pub fn history(&self) -> Vec<(u32, &Obj)> {
        self.files
            .iter()
            .filter_map(|(n, o)| match WalFile::parse(n) {
                Ok(WalFile::History(t)) => Some((t, o)),
                _ => None,
            })
            .collect()
    }
}

/// How far `pieces` reach continuously from the start of the segment
/// holding `lsn` (a restore fetches whole segments), on `timeline` or the
/// timelines after it; `lsn` itself when that segment's start is missing.
pub fn reach_from_segment(pieces: &[WalPiece], timeline: u32, lsn: u64) -> u64 {
    let seg_start = SegmentName::of_lsn(timeline, lsn).start_lsn();
    let reach = archive_reach(pieces, timeline, seg_start);
    if reach < lsn {
        // The segment does not start with archived bytes: nothing from it
        // can be fetched, so nothing after `lsn` is reachable either.
        lsn.min(reach)
    } else {
        reach
    }
}

/// A continuous LSN range of WAL held on one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalRange {
    pub start: u64,
    pub end: u64,
    pub start_lsn: String,
    pub end_lsn: String,
    /// The objects that begin and end it.
    pub first: String,
    pub last: String,
    pub objects: usize,
    pub bytes: u64,
}

/// LSNs no object holds, between two that are held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub from_lsn: String,
    pub to_lsn: String,
    /// The object ending where the gap begins, and the one after it
    /// (empty: nothing after it).
    pub after: String,
    pub before: String,
}

impl Gap {
    fn new(from: u64, to: u64, after: &str, before: &str) -> Gap {
        Gap {
            from,
            to,
            from_lsn: format_lsn(from),
            to_lsn: format_lsn(to),
            after: after.to_string(),
            before: before.to_string(),
        }
    }

    /// "0/3000000 .. 0/5000000 (after pg/wal/…, before pg/wal/…)"
    pub fn describe(&self) -> String {
        let before = if self.before.is_empty() {
            "no WAL after it".to_string()
        } else {
            format!("before {}", self.before)
        };
        format!(
            "{} .. {} (after {}, {before})",
            self.from_lsn, self.to_lsn, self.after
        )
    }
}

/// The WAL of one timeline: its continuous ranges and the gaps between them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineWal {
    pub timeline: u32,
    pub ranges: Vec<WalRange>,
    pub gaps: Vec<Gap>,
}

/// Continuous ranges and gaps, per timeline.
pub fn timelines(pieces: &[WalPiece]) -> Vec<TimelineWal> {
    let mut by_tli: BTreeMap<u32, Vec<&WalPiece>> = BTreeMap::new();
    for p in pieces {
        by_tli.entry(p.seg.timeline).or_default().push(p);
    }
    let mut out = Vec::new();
    for (tli, mut ps) in by_tli {
        ps.sort_by_key(|p| (p.start, std::cmp::Reverse(p.end)));
        let mut t = TimelineWal {
            timeline: tli,
            ranges: Vec::new(),
            gaps: Vec::new(),
        };
        for p in ps {
            match t.ranges.last_mut() {
                Some(r) if p.start <= r.end => {
                    if p.end > r.end {
                        r.end = p.end;
                        r.end_lsn = format_lsn(p.end);
                        r.last = p.key.clone();
                    }
                    r.objects += 1;
                    r.bytes += p.size;
                }
                last => {
                    if let Some(r) = last {
                        t.gaps.push(Gap::new(r.end, p.start, &r.last, &p.key));
                    }
                    t.ranges.push(WalRange {
                        start: p.start,
                        end: p.end,
                        start_lsn: format_lsn(p.start),
                        end_lsn: format_lsn(p.end),
                        first: p.key.clone(),
                        last: p.key.clone(),
                        objects: 1,
                        bytes: p.size,
                    });
                }
            }
        }
        out.push(t);
    }
    out
}

/// The gaps a restore from `from` (on `timeline`, continuing on later
/// timelines as restores do) meets before `to`.
pub fn gaps_between(pieces: &[WalPiece], timeline: u32, from: u64, to: u64) -> Vec<Gap> {
    let mut gaps = Vec::new();
    let mut at = SegmentName::of_lsn(timeline, from).start_lsn();
    let mut after = String::new();
    while at < to {
        let reach = archive_reach(pieces, timeline, at);
        if reach > at {
            after = pieces
                .iter()
                .filter(|p| p.seg.timeline >= timeline && p.end == reach)
                .map(|p| p.key.clone())
                .next()
                .unwrap_or_default();
            at = reach;
            continue;
        }
        let next = pieces
            .iter()
            .filter(|p| p.seg.timeline >= timeline && p.start > at)
            .min_by_key(|p| p.start);
        let after_name = if after.is_empty() {
            format!("the start of segment {}", SegmentName::of_lsn(timeline, at))
        } else {
            after.clone()
        };
        match next {
            Some(n) if n.start < to => {
                gaps.push(Gap::new(at, n.start, &after_name, &n.key));
                at = n.start;
            }
            _ => {
                gaps.push(Gap::new(at, to, &after_name, ""));
                break;
            }
        }
    }
    gaps
}

/// A span of LSNs every point of which can be restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// The end of the oldest backup the span starts from.
    pub from: u64,
    pub from_lsn: String,
    pub from_time: String,
    /// The end of the WAL held continuously after it.
    pub to: u64,
    pub to_lsn: String,
    /// When the last WAL object of the span was sealed (about when that
    /// WAL was written).
    pub to_time: Option<String>,
    pub backup: String,
}

/// Restorable spans, oldest first: each backup restores from its end to
/// where its WAL reaches; overlapping spans merge.
pub fn windows(inv: &Inventory) -> Vec<Window> {
    let mut spans: Vec<(u64, u64, &BackupInfo)> = inv
        .backups
        .iter()
        .map(|b| (b.end_lsn, inv.reach_of(b), b))
        .filter(|(end, reach, _)| reach >= end)
        .collect();
    spans.sort_by_key(|(e, _, _)| *e);
    let mut out: Vec<Window> = Vec::new();
    for (from, to, b) in spans {
        match out.last_mut() {
            Some(w) if from <= w.to => {
                if to > w.to {
                    w.to = to;
                    w.to_lsn = format_lsn(to);
                }
            }
            _ => out.push(Window {
                from,
                from_lsn: format_lsn(from),
                from_time: fmt_time_us(b.end_time_us),
                to,
                to_lsn: format_lsn(to),
                to_time: None,
                backup: b.id.clone(),
            }),
        }
    }
    for w in &mut out {
        w.to_time = inv
            .wal
            .iter()
            .filter(|p| p.start < w.to && p.end == w.to)
            .filter_map(|p| inv.wal_time_us.get(&p.key))
            .max()
            .map(|t| fmt_time_us(*t));
    }
    out
}

/// A base backup as `offsite list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    pub id: String,
    pub label: String,
    pub timeline: u32,
    pub start: u64,
    pub end: u64,
    pub start_lsn: String,
    pub end_lsn: String,
    pub start_time: String,
    pub end_time: String,
    pub end_time_us: i64,
    /// Raw (tar) bytes of its archives.
    pub bytes: u64,
    pub archives: usize,
    pub pg_version: String,
    /// How far the WAL reaches continuously from its start.
    pub wal_reach_lsn: String,
    /// Whether the archive holds the WAL up to its end (it restores).
    pub restorable: bool,
}

/// Parts without a record: a backup being uploaded, or an abandoned one.
#[derive(Debug, Clone, Serialize)]
pub struct IncompleteSummary {
    pub id: String,
    pub parts: usize,
    pub bytes: u64,
    pub last_written: Option<String>,
    /// Its record is there but does not prove out.
    pub record_refused: bool,
}

/// What `offsite list` shows of a PostgreSQL archive.
#[derive(Debug, Clone, Serialize)]
pub struct ListReport {
    pub engine: &'static str,
    pub system_id: Option<String>,
    pub encrypted: Option<bool>,
    pub objects: usize,
    pub bytes: u64,
    pub backups: Vec<BackupSummary>,
    pub incomplete: Vec<IncompleteSummary>,
    pub wal: Vec<TimelineWal>,
    pub history: Vec<String>,
    /// `.backup` and `.partial` files.
    pub files: Vec<String>,
    /// The restore window: the restorable span that reaches furthest.
    pub window: Option<Window>,
    /// Every restorable span (more than one when a gap splits them).
    pub windows: Vec<Window>,
    pub refused: Vec<Refusal>,
    pub ignored: Vec<String>,
}

/// Describe a proven inventory.
pub fn describe(inv: &Inventory, system_id: Option<u64>) -> ListReport {
    let backups = inv
        .backups
        .iter()
        .map(|b| {
            let reach = inv.reach_of(b);
            BackupSummary {
                id: b.id.clone(),
                label: b.label.clone(),
                timeline: b.timeline,
                start: b.start_lsn,
                end: b.end_lsn,
                start_lsn: format_lsn(b.start_lsn),
                end_lsn: format_lsn(b.end_lsn),
                start_time: fmt_time_us(b.start_time_us),
                end_time: fmt_time_us(b.end_time_us),
                end_time_us: b.end_time_us,
                bytes: b.archives.iter().map(|a| a.bytes).sum(),
                archives: b.archives.len(),
                pg_version: b.pg_version.clone(),
                wal_reach_lsn: format_lsn(reach),
                restorable: reach >= b.end_lsn,
            }
        })
        .collect();
    let incomplete = inv
        .dirs
        .iter()
        .filter(|(_, d)| d.record.is_none())
        .map(|(id, d)| IncompleteSummary {
            id: id.clone(),
            parts: d.parts.len(),
            bytes: d.parts.iter().map(|p| p.obj.size).sum(),
            last_written: d.newest_time_us().map(fmt_time_us),
            record_refused: d.record_refused,
        })
        .collect();
    let windows = windows(inv);
    ListReport {
        engine: "postgres",
        system_id: system_id.map(|s| s.to_string()),
        encrypted: inv.encrypted,
        objects: inv.objects,
        bytes: inv.bytes,
        backups,
        incomplete,
        wal: timelines(&inv.wal),
        history: inv
            .history()
            .iter()
            .map(|(t, _)| format!("{t:08X}.history"))
            .collect(),
        files: inv
            .files
            .keys()
            .filter(|n| !n.ends_with(".history"))
            .cloned()
            .collect(),
        window: windows.iter().max_by_key(|w| w.to).cloned(),
        windows,
        refused: inv.refused.clone(),
        ignored: inv.ignored.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::postgres::walname::SEGMENT_SIZE;

    pub fn piece(tli: u32, start: u64, end: u64) -> WalPiece {
        let seg = SegmentName::of_lsn(tli, start);
        WalPiece {
            seg,
            start,
            end,
            key: archive::wal_key(seg, start, end),
            size: 100,
        }
    }

    /// Whole segments `[from, to)` (segment numbers) on a timeline.
    pub fn whole(tli: u32, from: u64, to: u64) -> Vec<WalPiece> {
        (from..to)
            .map(|s| piece(tli, s * SEGMENT_SIZE, (s + 1) * SEGMENT_SIZE))
            .collect()
    }

    #[test]
    fn names_parse_strictly() {
        assert!(matches!(
            parse_name("pg/files/00000002.history", 1),
            Some(Name::File(_))
        ));
        assert!(parse_name("pg/files/00000002.histor", 1).is_none());
        let id = "0000000000000001-0000000003000000";
        assert!(matches!(
            parse_name(&format!("pg/backups/{id}/backup.done"), 1),
            Some(Name::Record(_))
        ));
        assert!(matches!(
            parse_name(&format!("pg/backups/{id}/base.tar.00003"), 1),
            Some(Name::Part(_))
        ));
        for bad in [
            format!("pg/backups/{id}/base.tar.3"),
            format!("pg/backups/{id}/x.tar.00000"),
            format!("pg/backups/{id}/backup.done.x"),
            "pg/backups/zz/backup.done".to_string(),
            "pg/other".to_string(),
        ] {
            assert!(parse_name(&bad, 1).is_none(), "{bad}");
        }
    }

    #[test]
    fn ranges_and_gaps_per_timeline() {
        let s = SEGMENT_SIZE;
        let mut ps = whole(1, 1, 3);
        ps.push(piece(1, 4 * s, 4 * s + 100));
        ps.push(piece(1, 4 * s + 100, 4 * s + 300));
        ps.push(piece(1, 4 * s, 5 * s)); // the whole segment over its pieces
        ps.extend(whole(2, 5, 7));
        let t = timelines(&ps);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].ranges.len(), 2);
        assert_eq!((t[0].ranges[0].start, t[0].ranges[0].end), (s, 3 * s));
        assert_eq!(t[0].gaps.len(), 1);
        assert_eq!((t[0].gaps[0].from, t[0].gaps[0].to), (3 * s, 4 * s));
        assert!(t[0].gaps[0].after.contains("000000010000000000000002"));
        assert!(t[0].gaps[0].before.contains("000000010000000000000004"));
        assert_eq!(t[1].ranges.len(), 1);
        // A restore from timeline 1 continues on timeline 2, but meets the gap.
        let g = gaps_between(&ps, 1, s + 10, 7 * s);
        assert_eq!(g.len(), 1, "{g:?}");
        assert_eq!((g[0].from, g[0].to), (3 * s, 4 * s));
        assert!(gaps_between(&ps, 1, 4 * s + 5, 7 * s).is_empty());
        let g = gaps_between(&ps, 2, 5 * s, 8 * s);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].before, "");
        // A backup starting inside a segment whose start is missing reaches nothing.
        let ps = vec![piece(1, s + 100, s + 200)];
        assert_eq!(reach_from_segment(&ps, 1, s + 150), s);
    }
}
