//! `offsite verify`: check a replica without restoring it (docs/FORMAT.md,
//! "Verification").
//!
//! Three passes (one file each):
//! 1. Structure (`structure`), from one LIST: every lineage has a snapshot, its level-0
//!    chain is continuous from the earliest snapshot to its newest txid,
//!    later snapshots and compacted segments sit on chain boundaries.
//! 2. Contents (`contents`): every object is downloaded (bounded parallelism) and its
//!    envelope checked against its key. With an identity (or a plaintext
//!    replica) the lineage's state checksum is replayed like restore does,
//!    but without writing a database: every stored digest, chain link and
//!    body hash is verified. Compacted segments are applied to a clone of
//!    the replayed state where they start, and their end checksum must equal
//!    the replay's when it reaches their last txid.
//! 3. `--deep` (`deep`): real restores (with `PRAGMA integrity_check`) of sampled points.
//!
//! Restore drills in the daemon (`drill`) restore sampled points the same way.

mod contents;
mod deep;
mod drill;
mod structure;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use serde::Serialize;

use crate::keys::Identities;
use crate::layout::{self, Catalog, Target};
use crate::storage::Storage;

use contents::check_contents;
use deep::{lr_problem, sample, Rng};
use structure::plan_lineage;

pub use drill::{drill, DrillResult};

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
    /// The pinned verifying keys and the opt-ins.
    pub trust: crate::sign::Trust,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            identities: None,
            trust: Default::default(),
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
fn err_text(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}
fn problem(v: &mut Vec<Problem>, key: &str, text: impl Into<String>) {
    v.push(Problem {
        key: key.to_string(),
        problem: text.into(),
    });
}
/// Verify a replica. Fails only when the replica cannot be listed; every
/// finding about its objects is in the report.
pub async fn verify(store: &dyn Storage, opts: &VerifyOptions) -> anyhow::Result<VerifyReport> {
    let mut trust = opts.trust.clone();
    // A record that does not prove out is a problem of its own; without a
    // proven replica id every signed object is then refused too.
    let (engine, record_problem) = match crate::record::open(store, &mut trust).await {
        Ok(e) => (e, None),
        Err(e) => (crate::record::engine(store).await?, Some(err_text(&e))),
    };
    // The head record before the listing: a shipper that runs meanwhile
    // moves the head only to states the later listing already holds.
    let head = crate::head::read(store, &trust).await;
    let catalog = Catalog::load(store).await?;
    let keys = crate::replay::Keys {
        ids: opts.identities.clone(),
        trust,
    };
    let ids = &keys;
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
    if let Some(p) = record_problem {
        problem(&mut report.problems, crate::record::RECORD_KEY, p);
    }
    if catalog.is_empty() {
        report
            .notices
            .push("the replica holds no backups (nothing under lineages/)".into());
    }
    let mut modes: BTreeMap<bool, Vec<String>> = BTreeMap::new();
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
        let c = check_contents(
            store,
            steps,
            (engine, &keys),
            opts.parallel,
            dl_dir.path(),
            &mut lr,
        )
        .await;
        unchecked += c.envelope_only;
        if let Some(e) = c.encrypted {
            report.encrypted = Some(report.encrypted.unwrap_or(false) || e);
            modes.entry(e).or_default().push(l.id.clone());
        }
        if c.unsigned > 0 {
            problem(
                &mut lr.warnings,
                &format!("{}{}/", layout::LINEAGES, l.id),
                format!("{} objects carry no signature (accepted with --allow-unsigned; written before format 3)", c.unsigned),
            );
        }
        report.lineages.push(lr);
    }
    // A replica is encrypted or not as a whole: plaintext lineages in an
    // encrypted replica are planted or misconfigured.
    if let (Some(_), Some(plain)) = (modes.get(&true), modes.get(&false)) {
        for id in plain {
            problem(
                &mut report.problems,
                &format!("{}{id}/", layout::LINEAGES),
                "plaintext lineage in a replica whose other lineages are encrypted (mixed replica: planted, or shipped with --no-encryption by mistake)",
            );
        }
    }
    // Rollback: the signed head record names the newest state shipped.
    match head {
        Ok(Some(h)) => {
            let newest = catalog.max_txid().unwrap_or(0);
            if h.txid > newest {
                problem(
                    &mut report.problems,
                    crate::head::HEAD_KEY,
                    format!(
                        "the signed head record says txid {} ({}) was shipped, but the newest object is txid {newest}: newer objects are missing (deleted, or rolled back)",
                        h.txid,
                        layout::fmt_time_us(h.time_us)
                    ),
                );
            }
        }
        Ok(None) => {}
        Err(e) if keys.trust.replica.is_some() => {
            problem(&mut report.problems, crate::head::HEAD_KEY, err_text(&e))
        }
        Err(_) => {}
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
