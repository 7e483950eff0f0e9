//! `offsite verify` of a PostgreSQL archive (docs/POSTGRES.md,
//! "Verification"), without restoring:
//! 1. every object's envelope proven (the [`Inventory`]), refusals and
//!    foreign names reported;
//! 2. WAL continuity: from the segment holding the oldest backup's start to
//!    the newest WAL, on its timeline and the ones after it, as restores
//!    read it; every gap named by LSN and by the objects around it; every
//!    backup's WAL up to its end;
//! 3. every object downloaded and its payload checked against its signed
//!    hash; with an identity (or a plaintext archive) decoded too: every
//!    8 KiB WAL page header checked (magic, address, timeline, the first
//!    page's long header), every backup's archives hashed against its
//!    record, its manifest parsed and its WAL range compared with the record.
//!
//! `--deep` adds restore drills (`drill`).

use std::collections::BTreeMap;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;

use super::archive::{self, BackupInfo, PgMeta, WalPiece};
use super::drill::{self, DrillOptions, DrillResult};
use super::inventory::{gaps_between, timelines, Inventory, TimelineWal};
use super::walname::{
    format_lsn, parse_history, parse_lsn, LongHeader, SegmentName, PAGE_MAGIC_15, PAGE_SIZE,
};
use super::Reader;
use crate::verify::Problem;

/// `XLP_ALL_FLAGS`: the page header flags PostgreSQL 15 defines.
const XLP_ALL_FLAGS: u16 = 0x0007;
/// `SizeOfXLogShortPHD` (MAXALIGNed) and `SizeOfXLogLongPHD`.
const SHORT_HEADER: u64 = 24;
const LONG_HEADER: u64 = 40;

pub struct VerifyOptions {
    /// Objects downloaded at once.
    pub parallel: usize,
    /// Restore drills (`--deep`).
    pub drill: Option<DrillOptions>,
}

/// The WAL a restore from the oldest backup needs, and whether it is there.
#[derive(Debug, Clone, Serialize)]
pub struct Needed {
    pub backup: String,
    pub timeline: u32,
    pub from_lsn: String,
    pub to_lsn: String,
    pub continuous: bool,
}

/// One base backup's check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupCheck {
    pub id: String,
    /// Its WAL from start to end is in the archive.
    pub wal_ok: bool,
    /// Its parts were decoded and hashed against the record.
    pub contents_checked: bool,
    pub parts: usize,
    pub bytes: u64,
    /// The manifest's WAL range, when it was read.
    pub manifest: Option<String>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub replica: String,
    pub engine: &'static str,
    pub system_id: Option<String>,
    pub encrypted: Option<bool>,
    /// Whether WAL pages and backup contents were decoded and checked
    /// (false: an encrypted archive and no --age-identity).
    pub contents_checked: bool,
    pub objects: usize,
    pub bytes: u64,
    pub wal: Vec<TimelineWal>,
    pub needed: Option<Needed>,
    pub backups: Vec<BackupCheck>,
    pub wal_objects_checked: usize,
    pub pages_checked: u64,
    pub files_checked: usize,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
    pub notices: Vec<String>,
    pub drills: Vec<DrillResult>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The human-readable report: one line per finding.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "replica  {}", self.replica);
        let _ = writeln!(
            s,
            "engine   postgres (system {}), {}, {} objects, {} bytes",
            self.system_id.as_deref().unwrap_or("?"),
            match (self.encrypted, self.contents_checked) {
                (Some(true), true) => "encrypted, contents checked",
                (Some(true), false) => "encrypted, contents NOT checked (no --age-identity)",
                (Some(false), _) => "plaintext, contents checked",
                (None, _) => "empty",
            },
            self.objects,
            self.bytes
        );
        for t in &self.wal {
            for r in &t.ranges {
                let _ = writeln!(
                    s,
                    "wal      timeline {}  {} .. {}  ({} objects, {} bytes)",
                    t.timeline, r.start_lsn, r.end_lsn, r.objects, r.bytes
                );
            }
        }
        if let Some(n) = &self.needed {
            let _ = writeln!(
                s,
                "needed   timeline {}  {} .. {} (from the oldest backup {}): {}",
                n.timeline,
                n.from_lsn,
                n.to_lsn,
                n.backup,
                if n.continuous { "continuous" } else { "GAPS" }
            );
        }
        for b in &self.backups {
            let _ = writeln!(
                s,
                "backup   {}  {}{}",
                b.id,
                if b.ok { "ok" } else { "PROBLEM" },
                if b.contents_checked {
                    format!(
                        ": {} parts, {} bytes, hashes match its record{}",
                        b.parts,
                        b.bytes,
                        b.manifest
                            .as_deref()
                            .map(|m| format!("; manifest WAL-Ranges {m}"))
                            .unwrap_or_default()
                    )
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(
            s,
            "checked  {} WAL objects ({} pages), {} files",
            self.wal_objects_checked, self.pages_checked, self.files_checked
        );
        for d in &self.drills {
            let _ = writeln!(s, "drill    {}", d.describe());
        }
        for p in &self.problems {
            let _ = writeln!(s, "PROBLEM  {}: {}", p.key, p.problem);
        }
        for p in &self.warnings {
            let _ = writeln!(s, "warning  {}: {}", p.key, p.problem);
        }
        for n in &self.notices {
            let _ = writeln!(s, "notice   {n}");
        }
        let _ = writeln!(
            s,
            "verify   {} objects, {} bytes, {} problems, {} warnings, {} drills",
            self.objects,
            self.bytes,
            self.problems.len(),
            self.warnings.len(),
            self.drills.len()
        );
        s
    }
}

/// A finding about `key`; the text does not repeat the key.
fn problem(v: &mut Vec<Problem>, key: &str, text: impl Into<String>) {
    let text: String = text.into();
    let text = text.replace(&format!("object {key}: "), "");
    v.push(Problem {
        key: key.to_string(),
        problem: text,
    });
}

/// What the page check of one WAL object found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pages {
    pub checked: u64,
    /// All-zero pages from this LSN to the object's end.
    pub zero_tail_from: Option<u64>,
    /// Every byte is zero.
    pub all_zero: bool,
    pub problem: Option<String>,
}

/// Check every page header in WAL bytes `[start, start + data.len())` of
/// segment `seg`: magic, the page's own address, a timeline not after the
/// segment's; the segment's first page's long header (cluster, sizes).
/// All-zero pages are allowed only as a tail (nothing but zeros after them).
pub fn check_pages(seg: SegmentName, start: u64, data: &[u8], system_id: Option<u64>) -> Pages {
    let mut out = Pages {
        all_zero: data.iter().all(|b| *b == 0),
        ..Default::default()
    };
    let end = start + data.len() as u64;
    let mut p = start.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    while p + SHORT_HEADER <= end {
        let off = (p - start) as usize;
        let h = &data[off..];
        if h[..SHORT_HEADER as usize].iter().all(|b| *b == 0) {
            match h.iter().position(|b| *b != 0) {
                None => out.zero_tail_from = Some(p),
                Some(i) => {
                    out.problem = Some(format!(
                    "the page at LSN {} is all zeros but WAL bytes follow it (at LSN {}): damaged",
                    format_lsn(p),
                    format_lsn(p + i as u64)
                ))
                }
            }
            return out;
        }
        let u16_at = |o: usize| u16::from_le_bytes(h[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        let (magic, info, tli, addr) = (u16_at(0), u16_at(2), u32_at(4), u64_at(8));
        let bad = if magic != PAGE_MAGIC_15 {
            Some(format!(
                "magic {magic:#06x} is not PostgreSQL 15's {PAGE_MAGIC_15:#06x}"
            ))
        } else if info & !XLP_ALL_FLAGS != 0 {
            Some(format!("invalid flags {info:#06x}"))
        } else if addr != p {
            Some(format!(
                "it says it is the page at LSN {} (a misplaced or damaged page)",
                format_lsn(addr)
            ))
        } else if tli > seg.timeline {
            Some(format!(
                "its timeline {tli} is later than the segment's {}",
                seg.timeline
            ))
        } else if p == seg.start_lsn() && p + LONG_HEADER <= end {
            LongHeader::read(h)
                .and_then(|l| l.check(seg, system_id))
                .err()
                .map(|e| format!("{e:#}"))
        } else {
            None
        };
        if let Some(b) = bad {
            out.problem = Some(format!("WAL page at LSN {}: {b}", format_lsn(p)));
            return out;
        }
        out.checked += 1;
        p += PAGE_SIZE;
    }
    out
}

/// A backup manifest's WAL range: (timeline, start, end) of its first and
/// last `WAL-Ranges` entries.
pub fn manifest_wal_range(manifest: &[u8]) -> anyhow::Result<(u32, u64, u64)> {
    let v: serde_json::Value =
        serde_json::from_slice(manifest).context("the backup manifest is not JSON")?;
    anyhow::ensure!(
        v.get("PostgreSQL-Backup-Manifest-Version").is_some(),
        "not a PostgreSQL backup manifest (no PostgreSQL-Backup-Manifest-Version)"
    );
    let ranges = v
        .get("WAL-Ranges")
        .and_then(|r| r.as_array())
        .filter(|r| !r.is_empty())
        .context("the backup manifest has no WAL-Ranges")?;
    let field = |r: &serde_json::Value, k: &str| -> anyhow::Result<u64> {
        parse_lsn(
            r.get(k)
                .and_then(|x| x.as_str())
                .with_context(|| format!("WAL-Ranges entry without {k}"))?,
        )
    };
    let first = &ranges[0];
    let last = &ranges[ranges.len() - 1];
    let tli = last
        .get("Timeline")
        .and_then(|t| t.as_u64())
        .context("WAL-Ranges entry without Timeline")? as u32;
    Ok((tli, field(first, "Start-LSN")?, field(last, "End-LSN")?))
}

/// Verify the archive `r` reads. Fails only when it cannot be listed;
/// every finding about its objects is in the report.
pub async fn verify(r: &Reader, o: &VerifyOptions) -> anyhow::Result<VerifyReport> {
    let store = r.store.as_ref();
    let inv = Inventory::load(store, &r.trust).await?;
    let decode = r.ids.is_some() || inv.encrypted == Some(false);
    let mut rep = VerifyReport {
        replica: store.describe(),
        engine: "postgres",
        system_id: r.system_id.map(|s| s.to_string()),
        encrypted: inv.encrypted,
        contents_checked: decode,
        objects: inv.objects,
        bytes: inv.bytes,
        wal: timelines(&inv.wal),
        needed: None,
        backups: Vec::new(),
        wal_objects_checked: 0,
        pages_checked: 0,
        files_checked: 0,
        problems: Vec::new(),
        warnings: Vec::new(),
        notices: Vec::new(),
        drills: Vec::new(),
    };
    for f in &inv.refused {
        problem(
            &mut rep.problems,
            &f.key,
            format!(
                "does not prove out (never restored from, planned with or deleted): {}",
                f.reason
            ),
        );
    }
    for k in &inv.ignored {
        problem(
            &mut rep.warnings,
            k,
            "not a name offsite writes; ignored by restore and prune",
        );
    }
    if inv.encrypted == Some(true) {
        for k in &inv.plaintext {
            problem(&mut rep.problems, k, "plaintext object in an encrypted archive (planted, or written with --no-encryption by mistake)");
        }
    }
    continuity(&inv, &mut rep);
    contents(r, &inv, o.parallel.max(1), decode, &mut rep).await;
    if !decode {
        rep.notices.push("WAL pages and backup contents not checked: pass --age-identity (payloads were checked against their signed hashes only)".into());
    }
    if let Some(d) = &o.drill {
        if !decode {
            rep.notices
                .push("restore drills skipped: restoring needs --age-identity".into());
        } else if inv.backups.is_empty() {
            rep.notices
                .push("restore drills skipped: no complete base backup".into());
        } else {
            rep.drills = drill::drills(r, &inv, d).await;
            for dr in rep.drills.iter().filter(|d| !d.ok) {
                problem(
                    &mut rep.problems,
                    dr.backup.as_deref().map_or("pg/backups/", |b| b),
                    format!(
                        "restore drill to {} failed: {}",
                        dr.target,
                        dr.error.as_deref().unwrap_or("?")
                    ),
                );
            }
        }
    }
    Ok(rep)
}

/// WAL continuity from the oldest backup's start to the newest WAL, and
/// every backup's own WAL.
fn continuity(inv: &Inventory, rep: &mut VerifyReport) {
    for t in &rep.wal {
        for g in &t.gaps {
            rep.notices.push(format!(
                "timeline {} has no WAL {}",
                t.timeline,
                g.describe()
            ));
        }
    }
    let Some(oldest) = inv.backups.iter().min_by_key(|b| (b.start_lsn, b.timeline)) else {
        if !inv.wal.is_empty() {
            problem(
                &mut rep.warnings,
                archive::BACKUPS_PREFIX,
                "no complete base backup: the WAL restores nothing (run `offsite pg backup`)",
            );
        }
        return;
    };
    let to = inv
        .wal
        .iter()
        .filter(|p| p.seg.timeline >= oldest.timeline)
        .map(|p| p.end)
        .max()
        .unwrap_or(oldest.start_lsn);
    let gaps = gaps_between(&inv.wal, oldest.timeline, oldest.start_lsn, to);
    for g in &gaps {
        let key = if g.before.is_empty() {
            g.after.clone()
        } else {
            g.before.clone()
        };
        problem(
            &mut rep.problems,
            &key,
            format!(
                "WAL gap {}: points after {} cannot be restored from backup {}",
                g.describe(),
                g.from_lsn,
                oldest.id
            ),
        );
    }
    rep.needed = Some(Needed {
        backup: oldest.id.clone(),
        timeline: oldest.timeline,
        from_lsn: format_lsn(SegmentName::of_lsn(oldest.timeline, oldest.start_lsn).start_lsn()),
        to_lsn: format_lsn(to),
        continuous: gaps.is_empty(),
    });
    for b in &inv.backups {
        let reach = inv.reach_of(b);
        let ok = reach >= b.end_lsn;
        if !ok {
            let key = archive::done_key(&b.id).unwrap_or_default();
            problem(
                &mut rep.problems,
                &key,
                format!(
                    "base backup {} needs WAL from {} to {}, but the archive holds it only up to {}: it cannot be restored",
                    b.id,
                    format_lsn(b.start_lsn),
                    format_lsn(b.end_lsn),
                    format_lsn(reach)
                ),
            );
        }
        rep.backups.push(BackupCheck {
            id: b.id.clone(),
            wal_ok: ok,
            ok,
            ..Default::default()
        });
    }
}

/// Download every object and check it (see the module documentation).
async fn contents(
    r: &Reader,
    inv: &Inventory,
    parallel: usize,
    decode: bool,
    rep: &mut VerifyReport,
) {
    // WAL: pages may end in zeros (after a WAL switch, or in a partial
    // segment); zeros with WAL after them are damage.
    let results: Vec<(WalPiece, anyhow::Result<Option<Pages>>)> =
        futures::stream::iter(inv.wal.iter().cloned().map(|p| async move {
            let res = fetch(r, &p.key, decode).await.map(|data| {
                data.map(|(meta, bytes)| match meta {
                    PgMeta::Wal { start, .. } => check_pages(p.seg, start, &bytes, r.system_id),
                    _ => Pages {
                        problem: Some("not a WAL object".into()),
                        ..Default::default()
                    },
                })
            });
            (p, res)
        }))
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut by_seg: BTreeMap<SegmentName, Vec<(WalPiece, Pages)>> = BTreeMap::new();
    for (p, res) in results {
        rep.wal_objects_checked += 1;
        match res {
            Err(e) => problem(
                &mut rep.problems,
                &p.key,
                format!("{e:#}").replace('\n', " "),
            ),
            Ok(None) => {}
            Ok(Some(pages)) => {
                rep.pages_checked += pages.checked;
                if let Some(e) = &pages.problem {
                    problem(&mut rep.problems, &p.key, e.clone());
                }
                by_seg.entry(p.seg).or_default().push((p, pages));
            }
        }
    }
    let mut switched = 0usize;
    for (seg, mut pieces) in by_seg {
        pieces.sort_by_key(|(p, _)| (p.start, std::cmp::Reverse(p.end)));
        let all: Vec<WalPiece> = pieces.iter().map(|(p, _)| p.clone()).collect();
        // Zeros are judged along the pieces a restore reads.
        let (chain, reach) = archive::cover(&all, seg.start_lsn());
        let mut zero_since: Option<(u64, String)> = None;
        for c in &chain {
            let Some((p, pages)) = pieces.iter().find(|(p, _)| p.key == c.key) else {
                continue;
            };
            if let Some((z, zkey)) = &zero_since {
                if !pages.all_zero {
                    problem(
                        &mut rep.problems,
                        &p.key,
                        format!(
                            "segment {seg} is all zeros from LSN {} ({zkey}) but WAL follows in this object: damaged",
                            format_lsn(*z)
                        ),
                    );
                    zero_since = None;
                }
                continue;
            }
            if let Some(z) = pages.zero_tail_from {
                zero_since = Some((z, p.key.clone()));
            } else if pages.all_zero && pages.problem.is_none() && p.start > seg.start_lsn() {
                zero_since = Some((p.start, p.key.clone()));
            }
        }
        let Some((z, _)) = zero_since else { continue };
        if reach == seg.end_lsn() {
            // PostgreSQL zero-fills the rest of a segment after a WAL switch.
            switched += 1;
        } else {
            rep.notices.push(format!(
                "segment {seg}: {} all-zero pages from LSN {} after the last WAL of a partial segment (ignored)",
                (reach - z).div_ceil(PAGE_SIZE),
                format_lsn(z)
            ));
        }
    }
    if switched > 0 {
        rep.notices.push(format!(
            "{switched} segment(s) end in all-zero pages (PostgreSQL zero-fills a segment after a WAL switch): expected"
        ));
    }
    for (name, obj) in &inv.files {
        rep.files_checked += 1;
        match fetch(r, &obj.key, decode).await {
            Err(e) => problem(&mut rep.problems, &obj.key, format!("{e:#}")),
            Ok(Some((_, bytes))) if name.ends_with(".history") => {
                if let Err(e) = std::str::from_utf8(&bytes)
                    .context("not text")
                    .and_then(parse_history)
                {
                    problem(
                        &mut rep.problems,
                        &obj.key,
                        format!("not a timeline history file: {e:#}"),
                    );
                }
            }
            Ok(_) => {}
        }
    }
    for b in &inv.backups {
        let chk = check_backup(r, inv, b, parallel, decode, &mut rep.problems).await;
        if let Some(c) = rep.backups.iter_mut().find(|c| c.id == b.id) {
            c.ok = c.ok && chk.ok;
            c.contents_checked = chk.contents_checked;
            c.parts = chk.parts;
            c.bytes = chk.bytes;
            c.manifest = chk.manifest;
        }
    }
}

/// Download one object and authenticate it; decoded when `decode`.
async fn fetch(r: &Reader, key: &str, decode: bool) -> anyhow::Result<Option<(PgMeta, Vec<u8>)>> {
    if decode {
        return archive::read(r.store.as_ref(), key, &r.trust, r.ids.as_ref())
            .await
            .map(Some);
    }
    let bytes = r
        .store
        .get(key)
        .await
        .with_context(|| format!("cannot download {key}"))?;
    crate::codec::authenticate(&bytes[..], bytes.len() as u64, &r.trust)
        .with_context(|| format!("object {key}"))?;
    Ok(None)
}

/// A backup's parts: all there, each authentic, each archive's length and
/// hash as its record says, its manifest's WAL range the record's.
async fn check_backup(
    r: &Reader,
    inv: &Inventory,
    b: &BackupInfo,
    parallel: usize,
    decode: bool,
    problems: &mut Vec<Problem>,
) -> BackupCheck {
    let mut c = BackupCheck {
        id: b.id.clone(),
        ok: true,
        contents_checked: decode,
        ..Default::default()
    };
    let done = archive::done_key(&b.id).unwrap_or_default();
    let mut fail = |c: &mut BackupCheck, key: &str, text: String| {
        c.ok = false;
        problem(problems, key, text);
    };
    let held = inv
        .dirs
        .get(&b.id)
        .map(|d| d.parts.clone())
        .unwrap_or_default();
    for p in &held {
        if !b
            .archives
            .iter()
            .any(|a| a.name == p.archive && p.part < a.parts)
        {
            fail(
                &mut c,
                &p.obj.key,
                format!("part not in backup {}'s record (left over?)", b.id),
            );
        }
    }
    if b.manifest && !b.archives.iter().any(|a| a.name == "backup_manifest") {
        fail(
            &mut c,
            &done,
            "the record says the backup has a manifest but lists no backup_manifest archive".into(),
        );
    }
    for a in &b.archives {
        let keys: Vec<String> = (0..a.parts)
            .filter_map(|i| archive::part_key(&b.id, &a.name, i).ok())
            .collect();
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| !held.iter().any(|p| p.obj.key == **k))
            .collect();
        if !missing.is_empty() {
            for k in missing {
                fail(
                    &mut c,
                    k,
                    format!("part of backup {} is missing (or does not prove out)", b.id),
                );
            }
            continue;
        }
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        let mut manifest = Vec::new();
        let mut parts = futures::stream::iter(
            keys.iter()
                .map(|k| async move { (k, fetch(r, k, decode).await) }),
        )
        .buffered(parallel.min(4));
        let mut broken = false;
        let mut i = 0u32;
        while let Some((k, res)) = parts.next().await {
            c.parts += 1;
            match res {
                Err(e) => {
                    fail(&mut c, k, format!("{e:#}").replace('\n', " "));
                    broken = true;
                }
                Ok(None) => {}
                Ok(Some((meta, data))) => {
                    let right = matches!(&meta, PgMeta::BackupPart { backup, archive, part, .. }
                        if *backup == b.id && *archive == a.name && *part == i);
                    if !right {
                        fail(
                            &mut c,
                            k,
                            format!("not part {i} of {} of backup {}", a.name, b.id),
                        );
                        broken = true;
                    }
                    hasher.update(&data);
                    total += data.len() as u64;
                    c.bytes += data.len() as u64;
                    if a.name == "backup_manifest" {
                        manifest.extend_from_slice(&data);
                    }
                }
            }
            i += 1;
        }
        if !decode || broken {
            continue;
        }
        let hash = hasher.finalize().to_hex().to_string();
        if total != a.bytes || hash != a.blake3 {
            fail(
                &mut c,
                &done,
                format!(
                    "archive {} of backup {} is {total} bytes hashing to {}…, but its record says {} bytes hashing to {}…: damaged or swapped parts",
                    a.name,
                    b.id,
                    &hash[..12],
                    a.bytes,
                    &a.blake3[..a.blake3.len().min(12)]
                ),
            );
            continue;
        }
        if a.name == "backup_manifest" {
            let key = archive::part_key(&b.id, &a.name, 0).unwrap_or_default();
            match manifest_wal_range(&manifest) {
                Err(e) => fail(&mut c, &key, format!("{e:#}")),
                Ok((tli, s, e)) => {
                    c.manifest = Some(format!(
                        "{} .. {} on timeline {tli}",
                        format_lsn(s),
                        format_lsn(e)
                    ));
                    if s != b.start_lsn || e != b.end_lsn || tli != b.timeline {
                        fail(
                            &mut c,
                            &key,
                            format!(
                                "the manifest's WAL-Ranges ({} .. {} on timeline {tli}) are not the record's ({} .. {} on timeline {})",
                                format_lsn(s),
                                format_lsn(e),
                                format_lsn(b.start_lsn),
                                format_lsn(b.end_lsn),
                                b.timeline
                            ),
                        );
                    }
                }
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake segment: every page with a valid header, the first a long one.
    fn segment(seg: SegmentName, sysid: u64, pages: u64) -> Vec<u8> {
        let mut d = vec![0u8; (pages * PAGE_SIZE) as usize];
        for i in 0..pages {
            let o = (i * PAGE_SIZE) as usize;
            d[o..o + 2].copy_from_slice(&PAGE_MAGIC_15.to_le_bytes());
            let info: u16 = if i == 0 { 2 } else { 0 };
            d[o + 2..o + 4].copy_from_slice(&info.to_le_bytes());
            d[o + 4..o + 8].copy_from_slice(&seg.timeline.to_le_bytes());
            d[o + 8..o + 16].copy_from_slice(&(seg.start_lsn() + i * PAGE_SIZE).to_le_bytes());
            if i == 0 {
                d[o + 24..o + 32].copy_from_slice(&sysid.to_le_bytes());
                d[o + 32..o + 36].copy_from_slice(&(16u32 << 20).to_le_bytes());
                d[o + 36..o + 40].copy_from_slice(&8192u32.to_le_bytes());
            }
            d[o + 100] = 1; // some record bytes
        }
        d
    }

    #[test]
    fn page_headers_are_checked() {
        let seg = SegmentName::parse("000000020000000000000003").unwrap();
        let s0 = seg.start_lsn();
        let mut d = segment(seg, 7, 6);
        assert_eq!(check_pages(seg, s0, &d, Some(7)).checked, 6);
        // Another cluster's segment.
        let e = check_pages(seg, s0, &d, Some(8)).problem.unwrap();
        assert!(e.contains("database system"), "{e}");
        // A piece starting mid-page checks the pages it holds headers of.
        let p = check_pages(seg, s0 + 100, &d[100..], Some(7));
        assert_eq!((p.checked, p.problem), (5, None));
        // A misplaced page.
        d[(2 * PAGE_SIZE + 8) as usize] ^= 0x20;
        let e = check_pages(seg, s0, &d, Some(7)).problem.unwrap();
        assert!(
            e.contains("LSN 0/3004000") && e.contains("misplaced"),
            "{e}"
        );
        d[(2 * PAGE_SIZE + 8) as usize] ^= 0x20;
        // Bad magic, a later timeline.
        d[(3 * PAGE_SIZE) as usize] = 0x11;
        assert!(check_pages(seg, s0, &d, None)
            .problem
            .unwrap()
            .contains("magic"));
        d[(3 * PAGE_SIZE) as usize] = 0x10;
        d[(3 * PAGE_SIZE + 4) as usize] = 3;
        assert!(check_pages(seg, s0, &d, None)
            .problem
            .unwrap()
            .contains("timeline 3"));
        d[(3 * PAGE_SIZE + 4) as usize] = 1; // an earlier timeline is fine
        assert_eq!(check_pages(seg, s0, &d, None).problem, None);
        // Zeros to the end: a tail; zeros with WAL after them: damage.
        let mut z = d.clone();
        z[(4 * PAGE_SIZE) as usize..].fill(0);
        let p = check_pages(seg, s0, &z, None);
        assert_eq!((p.checked, p.zero_tail_from), (4, Some(s0 + 4 * PAGE_SIZE)));
        z[(5 * PAGE_SIZE + 9) as usize] = 1;
        assert!(check_pages(seg, s0, &z, None)
            .problem
            .unwrap()
            .contains("all zeros but WAL bytes follow"));
    }

    #[test]
    fn manifests_give_their_wal_range() {
        let m = br#"{ "PostgreSQL-Backup-Manifest-Version": 1,
"Files": [],
"WAL-Ranges": [
{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }
],
"Manifest-Checksum": "00"}"#;
        assert_eq!(manifest_wal_range(m).unwrap(), (1, 0x2000028, 0x2000100));
        assert!(manifest_wal_range(b"{}").is_err());
        assert!(manifest_wal_range(b"not json").is_err());
        assert!(manifest_wal_range(
            br#"{"PostgreSQL-Backup-Manifest-Version": 1, "WAL-Ranges": []}"#
        )
        .is_err());
    }
}
