//! `offsite verify`: check a replica without restoring it (docs/FORMAT.md,
//! "Verification").
//!
//! Three passes:
//! 1. Structure, from one LIST: every lineage has a snapshot, its level-0
//!    chain is continuous from the earliest snapshot to its newest txid,
//!    later snapshots and compacted segments sit on chain boundaries.
//! 2. Contents: every object is downloaded (bounded parallelism) and its
//!    envelope checked against its key. With an identity (or a plaintext
//!    replica) the lineage's state checksum is replayed like restore does,
//!    but without writing a database: every stored checksum, `prev_checksum`
//!    and body hash is verified. Compacted segments are applied to a clone of
//!    the replayed state where they start, and their end checksum must equal
//!    the replay's when it reaches their last txid.
//! 3. `--deep`: real restores (with `PRAGMA integrity_check`) of sampled points.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use anyhow::{ensure, Context};
use futures::StreamExt;
use serde::Serialize;

use crate::checksum::{Checksum, PageState};
use crate::codec::{open_object, Envelope, ObjectKind};
use crate::keys::Identities;
use crate::layout::{self, Catalog, Entry, Lineage, SegmentEntry, SnapshotEntry, Target};
use crate::restore::{self, apply_segment, apply_snapshot, download, Downloaded, Stop};
use crate::segment::{BodyReader, Header};
use crate::storage::Storage;

/// What `verify` does beyond the structure and contents checks.
#[derive(Clone)]
pub struct VerifyOptions {
    /// Needed to check the contents of an encrypted replica; without it only
    /// structure and envelopes are checked.
    pub identities: Option<Identities>,
    /// Restore sampled points into a temp dir and run `integrity_check`.
    pub deep: bool,
    /// Random restore points per lineage with `deep` (besides oldest and newest).
    pub samples: usize,
    /// Seed for choosing the random points (random when `None`).
    pub rng_seed: Option<u64>,
    /// Objects downloaded in parallel.
    pub parallel: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            identities: None,
            deep: false,
            samples: 3,
            rng_seed: None,
            parallel: 8,
        }
    }
}

/// One finding, naming the object it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub key: String,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    pub txid: u64,
    pub time_us: i64,
    pub time: String,
}

impl Point {
    fn new(txid: u64, time_us: i64) -> Point {
        Point {
            txid,
            time_us,
            time: layout::fmt_time_us(time_us),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LineageReport {
    pub lineage: String,
    /// The earliest snapshot.
    pub first: Option<Point>,
    /// The newest commit (or snapshot).
    pub last: Option<Point>,
    pub snapshots: usize,
    pub objects: usize,
    pub bytes: u64,
    /// Objects whose contents were decrypted and fully verified.
    pub checked_objects: usize,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// One restored point of `--deep` (or of a drill).
#[derive(Debug, Clone, Serialize)]
pub struct DeepSample {
    /// `oldest`, `newest`, `random` or `time`.
    pub kind: String,
    /// What was asked for: `txid N` or an RFC 3339 time.
    pub target: String,
    pub lineage: Option<String>,
    pub txid: Option<u64>,
    pub time: Option<String>,
    pub time_us: Option<i64>,
    pub objects: Option<usize>,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub lineages: usize,
    pub objects: usize,
    pub bytes: u64,
    pub checked_objects: usize,
    pub problems: usize,
    pub warnings: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub replica: String,
    /// Whether the replica's objects are encrypted (`None`: no object read).
    pub encrypted: Option<bool>,
    /// Whether object contents were checked (false: encrypted and no identity).
    pub contents_checked: bool,
    pub lineages: Vec<LineageReport>,
    /// Findings that belong to no lineage.
    pub problems: Vec<Problem>,
    /// Objects under `lineages/` that are not offsite's (ignored by restore).
    pub warnings: Vec<Problem>,
    pub notices: Vec<String>,
    pub deep: Vec<DeepSample>,
    pub totals: Totals,
}

impl VerifyReport {
    pub fn problem_count(&self) -> usize {
        self.totals.problems
    }

    pub fn ok(&self) -> bool {
        self.totals.problems == 0
    }

    fn finish_totals(&mut self) {
        let mut t = Totals {
            lineages: self.lineages.len(),
            problems: self.problems.len(),
            warnings: self.warnings.len(),
            ..Default::default()
        };
        for l in &self.lineages {
            t.objects += l.objects;
            t.bytes += l.bytes;
            t.checked_objects += l.checked_objects;
            t.problems += l.problems.len();
            t.warnings += l.warnings.len();
        }
        self.totals = t;
    }

    /// The human-readable report: one line per lineage, one per finding.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "replica  {}", self.replica);
        let pt = |p: &Option<Point>| match p {
            Some(p) => format!("txid {} ({})", p.txid, p.time),
            None => "-".to_string(),
        };
        for l in &self.lineages {
            let _ = writeln!(
                s,
                "lineage  {}  {} .. {}  snapshots {}  objects {} (checked {})  bytes {}  {}",
                l.lineage,
                pt(&l.first),
                pt(&l.last),
                l.snapshots,
                l.objects,
                l.checked_objects,
                l.bytes,
                if l.problems.is_empty() {
                    "ok".to_string()
                } else {
                    format!("{} problems", l.problems.len())
                }
            );
            for p in &l.problems {
                let _ = writeln!(s, "  PROBLEM {}: {}", p.key, p.problem);
            }
            for p in &l.warnings {
                let _ = writeln!(s, "  warning {}: {}", p.key, p.problem);
            }
        }
        for p in &self.problems {
            let _ = writeln!(s, "PROBLEM  {}: {}", p.key, p.problem);
        }
        for p in &self.warnings {
            let _ = writeln!(s, "warning  {}: {}", p.key, p.problem);
        }
        for d in &self.deep {
            let _ = writeln!(
                s,
                "deep     {:<6} {}: {}",
                d.kind,
                d.target,
                if d.ok {
                    format!(
                        "ok, restored txid {} ({}) from {} objects, integrity_check ok",
                        d.txid.unwrap_or(0),
                        d.time.as_deref().unwrap_or("-"),
                        d.objects.unwrap_or(0)
                    )
                } else {
                    format!("FAILED: {}", d.error.as_deref().unwrap_or("?"))
                }
            );
        }
        for n in &self.notices {
            let _ = writeln!(s, "notice   {n}");
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "verify   {} lineages, {} objects, {} bytes, {} checked, {} problems, {} warnings",
            t.lineages, t.objects, t.bytes, t.checked_objects, t.problems, t.warnings
        );
        s
    }
}

/// Result of a restore drill (see [`drill`]).
#[derive(Debug, Clone, Serialize)]
pub struct DrillResult {
    /// The newest txid that was restored and passed `integrity_check`.
    pub newest_verified_txid: Option<u64>,
    pub newest_verified_time_us: Option<i64>,
    /// Every sampled point restored and passed.
    pub ok: bool,
    pub samples: Vec<DeepSample>,
}

/// A small deterministic generator (splitmix64) for choosing sample points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = hi - lo;
        if span == u64::MAX {
            return self.next();
        }
        lo + self.next() % (span + 1)
    }
}

fn err_text(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Verify a replica. Fails only when the replica cannot be listed; every
/// finding about its objects is in the report.
pub async fn verify(store: &dyn Storage, opts: &VerifyOptions) -> anyhow::Result<VerifyReport> {
    let catalog = Catalog::load(store).await?;
    let ids = opts.identities.as_ref();
    let mut report = VerifyReport {
        replica: store.describe(),
        encrypted: None,
        contents_checked: true,
        lineages: Vec::new(),
        problems: Vec::new(),
        warnings: catalog
            .ignored
            .iter()
            .map(|k| Problem {
                key: k.clone(),
                problem: "not an offsite object name; ignored by restore".into(),
            })
            .collect(),
        notices: Vec::new(),
        deep: Vec::new(),
        totals: Totals::default(),
    };
    if catalog.is_empty() {
        report
            .notices
            .push("the replica holds no backups (nothing under lineages/)".into());
    }
    let dl_dir = tempfile::Builder::new()
        .prefix(".offsite-verify-")
        .tempdir()
        .context("cannot create a temporary download directory")?;
    let mut unchecked = 0usize;
    for l in catalog.lineages.values() {
        let mut lr = LineageReport {
            lineage: l.id.clone(),
            first: l.snapshots.first().map(|s| Point::new(s.txid, s.time_us)),
            last: l
                .head()
                .map(|h| Point::new(h.last_txid(), h.last_time_us())),
            snapshots: l.snapshots.len(),
            objects: l.object_count(),
            bytes: l.bytes(),
            checked_objects: 0,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let steps = plan_lineage(l, &mut lr);
        let c = check_contents(store, steps, ids, opts.parallel, dl_dir.path(), &mut lr).await;
        unchecked += c.envelope_only;
        if let Some(e) = c.encrypted {
            report.encrypted = Some(report.encrypted.unwrap_or(false) || e);
        }
        report.lineages.push(lr);
    }
    if unchecked > 0 {
        report.contents_checked = false;
        report.notices.push(format!(
            "contents not checked: pass --age-identity (the replica is encrypted; {unchecked} objects were checked by name and envelope only)"
        ));
    }
    if opts.deep {
        if unchecked > 0 {
            report
                .notices
                .push("deep checks skipped: restoring needs --age-identity".into());
        } else if !catalog.is_empty() {
            let seed = opts.rng_seed.unwrap_or_else(rand::random::<u64>);
            let mut rng = Rng(seed);
            let tmp = tempfile::Builder::new()
                .prefix(".offsite-verify-deep-")
                .tempdir()
                .context("cannot create a temporary directory for deep checks")?;
            for l in catalog.lineages.values() {
                let Some(first) = l.snapshots.first() else {
                    continue;
                };
                let hi = l.max_txid().unwrap_or(first.txid);
                // Random points inside the continuous range (before it, only
                // snapshots kept by snapshot-retention, restorable as such).
                let lo = l.continuous_from().map(|s| s.txid).unwrap_or(first.txid);
                let mut points = vec![("oldest", first.txid), ("newest", hi)];
                let mut seen: BTreeSet<u64> = [first.txid, hi].into();
                if hi > lo + 1 {
                    let inner = (hi - lo - 1) as usize;
                    for _ in 0..opts.samples.min(inner) {
                        // Distinct points where there are enough.
                        for _ in 0..16 {
                            let t = rng.range(lo + 1, hi - 1);
                            if seen.insert(t) {
                                points.push(("random", t));
                                break;
                            }
                        }
                    }
                }
                if first.txid == hi {
                    points.truncate(1);
                }
                for (kind, t) in points {
                    let s = sample(store, ids, tmp.path(), kind, Target::Txid(t)).await;
                    if !s.ok {
                        lr_problem(&mut report, &l.id, &s);
                    }
                    report.deep.push(s);
                }
            }
            let window = catalog.window().map(|((_, t0), (_, t1))| {
                // Restorable times start at the newest lineage's continuous range.
                let base = catalog
                    .newest_lineage()
                    .and_then(|l| l.continuous_from())
                    .map(|s| s.time_us);
                (base.map_or(t0, |b| b.max(t0)), t1)
            });
            if let Some((t0, t1)) = window {
                let t = rng.range(t0 as u64, t1.max(t0) as u64) as i64;
                let s = sample(store, ids, tmp.path(), "time", Target::Time(t)).await;
                if !s.ok {
                    report.problems.push(Problem {
                        key: layout::LINEAGES.to_string(),
                        problem: format!(
                            "deep restore to {} failed: {}",
                            s.target,
                            s.error.clone().unwrap_or_default()
                        ),
                    });
                }
                report.deep.push(s);
            }
        }
    }
    report.finish_totals();
    Ok(report)
}

fn lr_problem(report: &mut VerifyReport, lineage: &str, s: &DeepSample) {
    if let Some(lr) = report.lineages.iter_mut().find(|l| l.lineage == lineage) {
        lr.problems.push(Problem {
            key: format!("{}{lineage}/", layout::LINEAGES),
            problem: format!(
                "deep restore to {} failed: {}",
                s.target,
                s.error.clone().unwrap_or_default()
            ),
        });
    }
}

/// Restore one point into `dir` with `integrity_check`, then delete it.
async fn sample(
    store: &dyn Storage,
    ids: Option<&Identities>,
    dir: &Path,
    kind: &str,
    target: Target,
) -> DeepSample {
    let out = dir.join(format!("sample-{:08x}.db", rand::random::<u32>()));
    let r = restore::restore(
        store,
        restore::RestoreOptions {
            identities: ids.cloned(),
            ..restore::RestoreOptions::new(target, out.clone())
        },
    )
    .await;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = out.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    let target = match target {
        Target::Txid(t) => format!("txid {t}"),
        Target::Time(t) => layout::fmt_time_us(t),
        Target::Latest => "latest".into(),
    };
    match r {
        Ok(r) => DeepSample {
            kind: kind.into(),
            target,
            lineage: Some(r.lineage),
            txid: Some(r.txid),
            time: Some(layout::fmt_time_us(r.time_us)),
            time_us: Some(r.time_us),
            objects: Some(r.objects),
            ok: true,
            error: None,
        },
        Err(e) => DeepSample {
            kind: kind.into(),
            target,
            lineage: None,
            txid: None,
            time: None,
            time_us: None,
            objects: None,
            ok: false,
            error: Some(err_text(&e)),
        },
    }
}

/// A restore drill for a running daemon: restores the newest lineage's
/// newest point and `samples` random points of it (at least one), each with
/// `integrity_check`. Fails only when the replica cannot be listed.
pub async fn drill(
    store: &dyn Storage,
    identities: Option<&Identities>,
    samples: usize,
    rng_seed: u64,
) -> anyhow::Result<DrillResult> {
    let catalog = Catalog::load(store).await?;
    let mut out = DrillResult {
        newest_verified_txid: None,
        newest_verified_time_us: None,
        ok: false,
        samples: Vec::new(),
    };
    let Some(l) = catalog.newest_lineage() else {
        return Ok(out);
    };
    let Some(first) = l.snapshots.first() else {
        return Ok(out);
    };
    let hi = l.max_txid().unwrap_or(first.txid);
    let first = l.continuous_from().unwrap_or(first);
    let mut rng = Rng(rng_seed);
    let tmp = tempfile::Builder::new()
        .prefix(".offsite-drill-")
        .tempdir()
        .context("cannot create a temporary directory for the drill")?;
    let mut points = vec![("newest", hi)];
    for _ in 0..samples.max(1) {
        points.push(("random", rng.range(first.txid, hi)));
    }
    for (kind, t) in points {
        let s = sample(store, identities, tmp.path(), kind, Target::Txid(t)).await;
        if s.ok && s.txid > out.newest_verified_txid {
            out.newest_verified_txid = s.txid;
            out.newest_verified_time_us = s.time_us;
        }
        out.samples.push(s);
    }
    out.ok = out.samples.iter().all(|s| s.ok);
    Ok(out)
}

/// One object to read, in the order the replay needs it.
#[derive(Debug, Clone)]
enum Step {
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
    fn entry(&self) -> Entry {
        match self {
            Step::Base(s) | Step::Snapshot(s) => Entry::Snapshot(s.clone()),
            Step::Segment(g) | Step::Compacted(g) | Step::Superseded(g) => {
                Entry::Segment(g.clone())
            }
            Step::Lone(e) => e.clone(),
        }
    }
}

fn entry_key(e: &Entry) -> &str {
    match e {
        Entry::Snapshot(s) => &s.key,
        Entry::Segment(g) => &g.key,
    }
}

fn entry_size(e: &Entry) -> u64 {
    match e {
        Entry::Snapshot(s) => s.size,
        Entry::Segment(g) => g.size,
    }
}

fn problem(v: &mut Vec<Problem>, key: &str, text: impl Into<String>) {
    v.push(Problem {
        key: key.to_string(),
        problem: text.into(),
    });
}

/// Structure check of one lineage (no download). Returns the order in which
/// its objects are read by the contents check.
fn plan_lineage(l: &Lineage, lr: &mut LineageReport) -> Vec<Step> {
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

struct ContentsOutcome {
    /// Encrypted objects that could only be checked by envelope (no identity).
    envelope_only: usize,
    encrypted: Option<bool>,
}

/// Check the envelope against the object's name.
fn check_envelope(e: &Entry, obj: &Downloaded) -> anyhow::Result<Envelope> {
    let env = Envelope::read_from(&mut obj.reader()?)?;
    let (kind, lineage, first, last) = match e {
        Entry::Snapshot(s) => (ObjectKind::Snapshot, &s.lineage, s.txid, s.txid),
        Entry::Segment(g) => (ObjectKind::Segment, &g.lineage, g.first_txid, g.last_txid),
    };
    ensure!(
        env.kind == kind,
        "object is a {} but its name is a {}'s",
        env.kind.name(),
        kind.name()
    );
    ensure!(
        env.meta.lineage == *lineage
            && env.meta.first_txid == first
            && env.meta.last_txid == last,
        "envelope (lineage {}, txids {}..={}) does not match the object's name (swapped, renamed or edited object)",
        env.meta.lineage,
        env.meta.first_txid,
        env.meta.last_txid
    );
    Ok(env)
}

/// Read a segment that is not on the chain: everything but the state checksums.
fn check_lone_segment(
    g: &SegmentEntry,
    obj: &Downloaded,
    ids: Option<&Identities>,
) -> anyhow::Result<()> {
    let (env, body) = open_object(obj.reader()?, ids)?;
    let (mut br, header) = BodyReader::open(body, &env)?;
    let Header::Segment(h) = header else {
        anyhow::bail!("object is not a segment");
    };
    ensure!(
        h.lineage == g.lineage
            && h.first_txid == g.first_txid
            && h.last_txid == g.last_txid
            && h.level == g.level,
        "segment contents (lineage {}, txids {}..={}, level {}) do not match its name (swapped or renamed object)",
        h.lineage,
        h.first_txid,
        h.last_txid,
        h.level
    );
    let mut buf = vec![0u8; h.page_size as usize];
    for i in 0..h.commit_count {
        let head = br.read_commit_head()?;
        ensure!(
            head.txid == h.commit_txid(i),
            "commit txids are not consecutive"
        );
        for _ in 0..head.records {
            let pgno = br.read_record(&mut buf)?;
            ensure!(
                pgno >= 1 && pgno <= head.db_pages,
                "record for page {pgno} outside the database"
            );
        }
        br.read_checksum()?;
    }
    br.finish()
}

/// Download every object of the lineage (in step order, `parallel` at a
/// time) and check it; with keys, replay the state checksum along the chain.
async fn check_contents(
    store: &dyn Storage,
    steps: Vec<Step>,
    ids: Option<&Identities>,
    parallel: usize,
    dl_dir: &Path,
    lr: &mut LineageReport,
) -> ContentsOutcome {
    let mut out = ContentsOutcome {
        envelope_only: 0,
        encrypted: None,
    };
    // The replayed state and its txid; `None` after a failure (until the
    // next snapshot restarts the replay).
    let mut state: Option<PageState> = None;
    // Compacted segments' end checksums, by last txid.
    let mut pending: BTreeMap<u64, Vec<(String, Checksum)>> = BTreeMap::new();
    // Superseded segments: (key, last txid, end checksum), checked against
    // the chain's segment that starts where they do.
    let mut superseded: BTreeMap<u64, Vec<(String, u64, Checksum)>> = BTreeMap::new();
    let mut stream = futures::stream::iter(steps)
        .map(|step| {
            let dir = dl_dir.to_path_buf();
            async move {
                let e = step.entry();
                let d = download(store, entry_key(&e), entry_size(&e), &dir).await;
                (step, d)
            }
        })
        .buffered(parallel.max(1));
    while let Some((step, d)) = stream.next().await {
        let entry = step.entry();
        let key = entry_key(&entry).to_string();
        let d = match d {
            Ok(d) => d,
            Err(e) => {
                problem(&mut lr.problems, &key, err_text(&e));
                if matches!(step, Step::Base(_) | Step::Segment(_)) {
                    state = None;
                }
                continue;
            }
        };
        let env = match check_envelope(&entry, &d) {
            Ok(env) => env,
            Err(e) => {
                problem(&mut lr.problems, &key, err_text(&e));
                if matches!(step, Step::Base(_) | Step::Segment(_)) {
                    state = None;
                }
                continue;
            }
        };
        match out.encrypted {
            None => out.encrypted = Some(env.encrypted),
            Some(e) if e != env.encrypted => problem(
                &mut lr.problems,
                &key,
                format!(
                    "object is {} but the lineage's first object is {}: a lineage must not mix encrypted and plaintext objects",
                    if env.encrypted { "encrypted" } else { "plaintext" },
                    if e { "encrypted" } else { "plaintext" }
                ),
            ),
            Some(_) => {}
        }
        if env.encrypted && ids.is_none() {
            out.envelope_only += 1;
            state = None;
            continue;
        }
        let r: anyhow::Result<()> = tokio::task::block_in_place(|| match &step {
            Step::Base(s) => {
                state = None;
                let (st, _, txid, _) = apply_snapshot(s, &d, ids, None)?;
                state = Some(st);
                settle(&mut pending, state.as_ref(), txid, &mut lr.problems);
                Ok(())
            }
            Step::Snapshot(s) => {
                let (st, _, txid, _) = apply_snapshot(s, &d, ids, None)?;
                match &state {
                    Some(cur) => ensure!(
                        cur.checksum() == st.checksum(),
                        "snapshot state (checksum {}) differs from the state replayed along the chain at txid {txid} ({}): the snapshot does not belong to this lineage's history",
                        st.checksum(),
                        cur.checksum()
                    ),
                    None => {
                        // The replay broke earlier: continue from here.
                        state = Some(st);
                        settle(&mut pending, state.as_ref(), txid, &mut lr.problems);
                    }
                }
                Ok(())
            }
            Step::Superseded(o) => match &state {
                Some(st) => {
                    let mut fork = st.clone();
                    apply_segment(
                        Stop::NEVER,
                        o,
                        &d,
                        ids,
                        env.encrypted,
                        &mut fork,
                        None,
                        o.first_txid - 1,
                    )?;
                    superseded.entry(o.first_txid).or_default().push((
                        o.key.clone(),
                        o.last_txid,
                        fork.checksum(),
                    ));
                    Ok(())
                }
                None => check_lone_segment(o, &d, ids),
            },
            Step::Segment(g) => match state.as_mut() {
                Some(st) => {
                    for (okey, olast, ock) in superseded.remove(&g.first_txid).unwrap_or_default() {
                        // The chain's state at the shorter segment's end.
                        let mut at_end = st.clone();
                        let stop = Stop {
                            txid: olast,
                            time_us: None,
                        };
                        // A damaged `g` is reported by its own replay below.
                        let applied = apply_segment(
                            stop,
                            g,
                            &d,
                            ids,
                            env.encrypted,
                            &mut at_end,
                            None,
                            g.first_txid - 1,
                        );
                        if applied.is_err() {
                            continue;
                        }
                        if at_end.checksum() == ock {
                            problem(
                                &mut lr.warnings,
                                &okey,
                                format!(
                                    "superseded by {}: the same commits (txids {}..={}), left by an upload whose response was lost and which was shipped again with more commits; restores use {}; this object can be deleted",
                                    g.key, g.first_txid, olast, g.key
                                ),
                            );
                        } else {
                            problem(
                                &mut lr.problems,
                                &okey,
                                format!(
                                    "conflicts with {}: a different state at txid {olast} ({ock} vs {}); two shippers wrote different histories (restores use {})",
                                    g.key,
                                    at_end.checksum(),
                                    g.key
                                ),
                            );
                        }
                    }
                    let r = apply_segment(
                        Stop::NEVER,
                        g,
                        &d,
                        ids,
                        env.encrypted,
                        st,
                        None,
                        g.first_txid - 1,
                    );
                    if r.is_err() {
                        state = None;
                    }
                    r?;
                    settle(&mut pending, state.as_ref(), g.last_txid, &mut lr.problems);
                    Ok(())
                }
                None => {
                    pending.remove(&g.last_txid);
                    check_lone_segment(g, &d, ids)
                }
            },
            Step::Compacted(c) => match &state {
                Some(st) => {
                    // One clone at a time: applied and dropped right here.
                    let mut fork = st.clone();
                    apply_segment(
                        Stop::NEVER,
                        c,
                        &d,
                        ids,
                        env.encrypted,
                        &mut fork,
                        None,
                        c.first_txid - 1,
                    )?;
                    pending
                        .entry(c.last_txid)
                        .or_default()
                        .push((c.key.clone(), fork.checksum()));
                    Ok(())
                }
                None => check_lone_segment(c, &d, ids),
            },
            Step::Lone(Entry::Snapshot(s)) => apply_snapshot(s, &d, ids, None).map(|_| ()),
            Step::Lone(Entry::Segment(g)) => check_lone_segment(g, &d, ids),
        });
        match r {
            Ok(()) => lr.checked_objects += 1,
            Err(e) => problem(&mut lr.problems, &key, err_text(&e)),
        }
    }
    out
}

/// The replay reached `txid`: compacted segments ending there must agree.
fn settle(
    pending: &mut BTreeMap<u64, Vec<(String, Checksum)>>,
    state: Option<&PageState>,
    txid: u64,
    problems: &mut Vec<Problem>,
) {
    let (Some(st), Some(v)) = (state, pending.remove(&txid)) else {
        return;
    };
    let cur = st.checksum();
    for (key, ck) in v {
        if ck != cur {
            problem(
                problems,
                &key,
                format!(
                    "compacted segment ends in state {ck} but the level-0 chain reaches state {cur} at txid {txid}: the merged commit is wrong"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    mod replay {
        use std::io::Write;

        use super::super::*;
        use crate::codec::{Encryption, EnvelopeMeta, ObjectWriter};
        use crate::layout::{segment_key, snapshot_key};
        use crate::segment::{
            CommitHead, SegmentHeader, SegmentWriter, SnapshotHeader, SnapshotWriter,
            PAYLOAD_SQLITE_PAGES,
        };
        use crate::storage::{file::FileStorage, Body};

        const PS: usize = 512;
        const L: &str = "0000000000000001-000000aa";

        fn env(kind: ObjectKind, first: u64, last: u64) -> Envelope {
            Envelope::new(
                kind,
                &Encryption::None,
                EnvelopeMeta {
                    lineage: L.into(),
                    first_txid: first,
                    last_txid: last,
                    resume_at: 0,
                    resume_tag: "00".repeat(16),
                    state_tag: "00".repeat(16),
                },
            )
        }

        fn seal(e: &Envelope, body: &[u8]) -> bytes::Bytes {
            let mut w = ObjectWriter::new(Vec::new(), e, &Encryption::None).unwrap();
            w.write_all(body).unwrap();
            w.finish().unwrap().into()
        }

        fn page(b: u8) -> Vec<u8> {
            vec![b; PS]
        }

        fn state(pages: &[Vec<u8>]) -> PageState {
            let mut st = PageState::new(PS);
            for (i, p) in pages.iter().enumerate() {
                st.set_page(i as u32 + 1, p);
            }
            st
        }

        /// One segment object holding one commit (level 0) or one merged commit.
        #[allow(clippy::too_many_arguments)]
        fn segment(
            level: u8,
            first: u64,
            last: u64,
            t: i64,
            prev: &PageState,
            truncate_to: Option<u32>,
            records: &[(u32, Vec<u8>)],
            db_pages: u32,
            end: &PageState,
        ) -> (String, bytes::Bytes) {
            let e = env(ObjectKind::Segment, first, last);
            let h = SegmentHeader {
                kind: "segment".into(),
                payload: PAYLOAD_SQLITE_PAGES.into(),
                lineage: L.into(),
                page_size: PS as u32,
                envelope_blake3: e.blake3_hex(),
                first_txid: first,
                last_txid: last,
                commit_count: 1,
                prev_checksum: prev.checksum().to_hex(),
                level,
                truncate_to,
            };
            let mut w = SegmentWriter::new(Vec::new(), &h).unwrap();
            w.begin_commit(CommitHead {
                txid: last,
                time_us: t,
                db_pages,
                records: records.len() as u32,
            })
            .unwrap();
            for (p, b) in records {
                w.write_record(*p, b).unwrap();
            }
            w.end_commit(&end.checksum()).unwrap();
            let body = w.finish().unwrap();
            (segment_key(L, level, first, last, t), seal(&e, &body))
        }

        /// Snapshot [A,B] at txid 1; txid 2 writes page 1 = C; txid 3 grows
        /// to 3 pages and writes page 2 = D; a level-1 segment merges 2..=3.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn compacted_segments_are_replayed_against_the_chain() {
            let tmp = tempfile::tempdir().unwrap();
            let store = FileStorage::new(tmp.path().to_path_buf()).unwrap();
            let s0 = state(&[page(1), page(2)]);
            let e = env(ObjectKind::Snapshot, 1, 1);
            let mut w = SnapshotWriter::new(
                Vec::new(),
                &SnapshotHeader {
                    kind: "snapshot".into(),
                    payload: PAYLOAD_SQLITE_PAGES.into(),
                    lineage: L.into(),
                    page_size: PS as u32,
                    envelope_blake3: e.blake3_hex(),
                    txid: 1,
                    time_us: 100,
                    db_pages: 2,
                },
            )
            .unwrap();
            w.write_page(&page(1)).unwrap();
            w.write_page(&page(2)).unwrap();
            let (body, _) = w.finish().unwrap();
            store
                .put(&snapshot_key(L, 1, 100), Body::Bytes(seal(&e, &body)))
                .await
                .unwrap();
            let s1 = state(&[page(3), page(2)]);
            let mut s2 = state(&[page(3), page(4)]);
            s2.resize(3);
            let objs = [
                segment(0, 2, 2, 200, &s0, None, &[(1, page(3))], 2, &s1),
                segment(0, 3, 3, 300, &s1, None, &[(2, page(4))], 3, &s2),
                segment(
                    1,
                    2,
                    3,
                    300,
                    &s0,
                    Some(2),
                    &[(1, page(3)), (2, page(4))],
                    3,
                    &s2,
                ),
            ];
            for (k, b) in &objs {
                store.put(k, Body::Bytes(b.clone())).await.unwrap();
            }
            let opts = VerifyOptions::default();
            let r = verify(&store, &opts).await.unwrap();
            assert!(r.ok(), "{}", r.human());
            assert_eq!(r.totals.checked_objects, 4);

            // A merged commit that is consistent in itself but not with the
            // chain (page 2 = E instead of D): named by the end-state check.
            let mut bad_end = state(&[page(3), page(5)]);
            bad_end.resize(3);
            let (k, b) = segment(
                1,
                2,
                3,
                300,
                &s0,
                Some(2),
                &[(1, page(3)), (2, page(5))],
                3,
                &bad_end,
            );
            store.put(&k, Body::Bytes(b)).await.unwrap();
            let r = verify(&store, &opts).await.unwrap();
            assert_eq!(r.problem_count(), 1, "{}", r.human());
            let p = &r.lineages[0].problems[0];
            assert!(p.key == k && p.problem.contains("merged commit"), "{p:?}");

            // A merged commit whose stored checksum is wrong: caught on the clone.
            let (k, b) = segment(
                1,
                2,
                3,
                300,
                &s0,
                Some(2),
                &[(1, page(3)), (2, page(5))],
                3,
                &s2,
            );
            store.put(&k, Body::Bytes(b)).await.unwrap();
            let r = verify(&store, &opts).await.unwrap();
            assert_eq!(r.problem_count(), 1, "{}", r.human());
            let p = &r.lineages[0].problems[0];
            assert!(
                p.key == k && p.problem.contains("checksum mismatch"),
                "{p:?}"
            );
            // The level-0 chain and snapshot were still fully checked.
            assert_eq!(r.totals.checked_objects, 3);
        }
    }

    #[test]
    fn rng_ranges() {
        let mut r = Rng(7);
        for _ in 0..1000 {
            let v = r.range(5, 9);
            assert!((5..=9).contains(&v));
        }
        assert_eq!(r.range(3, 3), 3);
    }
}
