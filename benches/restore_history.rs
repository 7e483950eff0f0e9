//! Restore cost in a replica with a day of steady writes, with and without
//! compaction (not a test; `scripts/bench-history.sh` runs it and writes
//! docs/BENCHMARKS-history.md).
//!
//! One real SQLite database, written by `offsite::workload` (one commit per
//! `--commit-every-s` simulated seconds, every 500th commit ~200 KB), is
//! replicated in-process by two `Replicator`s driven by one manual clock:
//! * "compacted": default compaction levels (1 min / 15 min / 4 h),
//! * "plain": `compaction_levels = []`,
//!
//! both with the default 24 h snapshot interval and retention 24 h + 2
//! snapshots, pruned as the daemon does (prune interval 1 h). Then restores
//! of a few targets are timed (`--runs` times each) and checked, the request
//! counts of the day and of an idle hour are read from the stores' counters,
//! and a markdown report is printed (and written to `--out-dir`).
//!
//! ```text
//! cargo bench --bench restore_history -- [--hours 24] [--commit-every-s 1]
//!     [--sync-every-s 1] [--target-back-h 1] [--runs 5] [--out-dir DIR]
//!     [--replica-url URL] [--quick]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use offsite::clock::{Clock, ManualClock};
use offsite::codec::Encryption;
use offsite::layout::{fmt_time_us, Catalog, Target};
use offsite::replicate::{Options, Replicator};
use offsite::restore::{restore, RestoreOptions, RestoreReport};
use offsite::retention::{Policy, SnapshotRetention};
use offsite::storage::{self, DynStorage, RequestCounts};
use offsite::workload;

const S_US: i64 = 1_000_000;
const HOUR_US: i64 = 3600 * S_US;

#[derive(Debug, Clone)]
struct Args {
    hours: f64,
    commit_every_s: u64,
    sync_every_s: u64,
    target_back_h: f64,
    runs: usize,
    out_dir: Option<PathBuf>,
    replica_url: Option<String>,
    quick: bool,
    idle_hours: f64,
}

fn usage() -> &'static str {
    "restore_history [--hours H (24)] [--commit-every-s S (1)] [--sync-every-s S (1)] \
     [--target-back-h H (1)] [--runs N (5)] [--idle-hours H (1)] [--out-dir DIR] \
     [--replica-url URL (a file:// temp dir)] [--quick (= --hours 2 --runs 1)]"
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        hours: 24.0,
        commit_every_s: 1,
        sync_every_s: 1,
        target_back_h: 1.0,
        runs: 5,
        out_dir: None,
        replica_url: None,
        quick: false,
        idle_hours: 1.0,
    };
    let (mut hours, mut runs) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--hours" => hours = Some(val()?.parse()?),
            "--commit-every-s" => a.commit_every_s = val()?.parse()?,
            "--sync-every-s" => a.sync_every_s = val()?.parse()?,
            "--target-back-h" => a.target_back_h = val()?.parse()?,
            "--runs" => runs = Some(val()?.parse()?),
            "--idle-hours" => a.idle_hours = val()?.parse()?,
            "--out-dir" => a.out_dir = Some(val()?.into()),
            "--replica-url" => a.replica_url = Some(val()?),
            "--quick" => a.quick = true,
            // `cargo bench` passes --bench to harness = false benches.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\nusage: {}", usage()),
        }
    }
    if a.quick {
        a.hours = 2.0;
        a.runs = 1;
    }
    a.hours = hours.unwrap_or(a.hours);
    a.runs = runs.unwrap_or(a.runs).max(1);
    ensure!(
        a.commit_every_s >= 1 && a.sync_every_s >= 1,
        "intervals are >= 1 s"
    );
    ensure!(
        a.hours > 0.0 && a.target_back_h >= 0.0,
        "bad --hours/--target-back-h"
    );
    if a.target_back_h > a.hours {
        eprintln!(
            "restore_history: --target-back-h {} is before the first commit: using {} (the day's start)",
            a.target_back_h, a.hours
        );
        a.target_back_h = a.hours;
    }
    Ok(a)
}

/// `url` with `/name` appended to its path (before any query string).
fn sub_url(url: &str, name: &str) -> String {
    match url.split_once('?') {
        Some((a, q)) => format!("{}/{name}?{q}", a.trim_end_matches('/')),
        None => format!("{}/{name}", url.trim_end_matches('/')),
    }
}

struct Replica {
    name: &'static str,
    store: DynStorage,
    rep: Replicator,
}

async fn step_all(rs: &mut [Replica]) -> anyhow::Result<()> {
    for r in rs.iter_mut() {
        r.rep
            .step(true)
            .await
            .with_context(|| format!("{} step", r.name))?;
        r.rep.wait_maintenance().await;
    }
    Ok(())
}

fn counts(rs: &[Replica]) -> Vec<RequestCounts> {
    rs.iter().map(|r| r.store.request_counts()).collect()
}

fn sub(a: &[RequestCounts], b: &[RequestCounts]) -> Vec<RequestCounts> {
    a.iter().zip(b).map(|(x, y)| *x - *y).collect()
}

#[derive(Debug, Clone, Default)]
struct BucketStats {
    lineages: usize,
    objects: usize,
    bytes: u64,
    snapshots: usize,
    snapshot_bytes: u64,
    by_level: Vec<(usize, u64)>, // index = level
}

fn bucket_stats(c: &Catalog) -> BucketStats {
    let mut b = BucketStats {
        lineages: c.lineages.len(),
        ..Default::default()
    };
    for l in c.lineages.values() {
        b.objects += l.object_count();
        b.bytes += l.bytes();
        b.snapshots += l.snapshots.len();
        b.snapshot_bytes += l.snapshots.iter().map(|s| s.size).sum::<u64>();
        for g in l.segments.values().chain(l.compacted.values()).flatten() {
            let lv = g.level as usize;
            if b.by_level.len() <= lv {
                b.by_level.resize(lv + 1, (0, 0));
            }
            b.by_level[lv].0 += 1;
            b.by_level[lv].1 += g.size;
        }
    }
    b
}

struct Measured {
    target: String,
    tgt: Target,
    replica: &'static str,
    report: RestoreReport,
    walls: Vec<f64>,
    requests: RequestCounts,
    hash: blake3::Hash,
    commit: u64,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn hash_file(p: &Path) -> anyhow::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p)?)?;
    Ok(h.finalize())
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

fn fmt_counts(c: &RequestCounts) -> String {
    format!(
        "{} | {} | {} | {} | {} | {} | {}",
        c.put,
        c.get,
        c.list,
        c.delete,
        c.head,
        c.other,
        c.total()
    )
}

fn chain_summary(plan: &offsite::layout::Plan) -> String {
    let mut lv: Vec<usize> = Vec::new();
    for s in &plan.segments {
        let i = s.level as usize;
        if lv.len() <= i {
            lv.resize(i + 1, 0);
        }
        lv[i] += 1;
    }
    let parts: Vec<String> = lv
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| format!("{n}×L{i}"))
        .collect();
    format!("1 snapshot + {}", parts.join(" + "))
}

async fn run(args: Args) -> anyhow::Result<String> {
    let tmp = tempfile::Builder::new()
        .prefix("offsite-bench-history-")
        .tempdir()?;
    let base_url = match &args.replica_url {
        Some(u) => u.clone(),
        None => format!("file://{}", tmp.path().join("replicas").display()),
    };
    let db = tmp.path().join("app.db");
    let spool = tmp.path().join("spool");
    std::fs::create_dir_all(&spool)?;
    let p = workload::Params {
        big_every: 500,
        big_bytes: 200_000,
    };
    let mut conn = workload::open(&db, &p)?;
    // Only offsite checkpoints (as in tests/it/retention_compaction.rs).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    let mut s = 1u64;
    workload::commit(&mut conn, &p, s)?;

    // An hour boundary that is also a multiple of 4 h: compaction windows tile the day.
    let start = 1_800_000_000 * S_US;
    let (clock, hand): (Clock, ManualClock) = Clock::manual(start);
    let policy = Policy {
        retention: Duration::from_secs(24 * 3600),
        snapshot_retention: SnapshotRetention::Count(2),
    };
    // Objects are signed; the restores below pin this key.
    let signer = std::sync::Arc::new(offsite::sign::Signer::generate());
    let mk = |compaction: bool| {
        let mut o = Options::new(db.clone(), spool.clone());
        o.clock = clock.clone();
        if !compaction {
            o.compaction_levels = vec![];
        }
        o.snapshot_interval = Some(Duration::from_secs(24 * 3600));
        o.retention = Some(policy.clone());
        o.prune_interval = Duration::from_secs(3600);
        o
    };
    let defaults = mk(true);
    let levels = defaults.compaction_levels.clone();
    let max_level = levels.iter().max().copied().unwrap_or_default();
    let mut rs = Vec::new();
    for (name, compaction) in [("compacted", true), ("plain", false)] {
        let url = sub_url(&base_url, name);
        let store = storage::open(&url.parse()?).await?;
        let mut o = mk(compaction);
        o.replica_name = name.into();
        o.signer = Some(signer.clone());
        rs.push(Replica {
            name,
            rep: Replicator::new(o, store.clone(), Encryption::None),
            store,
        });
    }
    let c0 = counts(&rs);
    for r in rs.iter_mut() {
        r.rep.start().await?;
    }

    // The day: one simulated second per iteration.
    let total_s = (args.hours * 3600.0).round() as u64;
    let mut stamps: Vec<(u64, i64)> = vec![(1, start)]; // (commit, time it was observed)
    let mut unstamped = 0u64; // commits since the last step
    let t_day = Instant::now();
    let mut t_hour = Instant::now();
    let mut hour_walls: Vec<f64> = Vec::new();
    for sec in 1..=total_s {
        hand.advance(Duration::from_secs(1));
        if sec % args.commit_every_s == 0 {
            s += 1;
            workload::commit(&mut conn, &p, s)?;
            unstamped += 1;
        }
        if sec % args.sync_every_s == 0 || sec == total_s {
            step_all(&mut rs).await?;
            let now = hand.now_us();
            for k in 0..unstamped {
                stamps.push((s - unstamped + 1 + k, now));
            }
            unstamped = 0;
        }
        if sec % 3600 == 0 {
            hour_walls.push(t_hour.elapsed().as_secs_f64());
            eprintln!(
                "restore_history: simulated hour {} done in {:.1} s (total {:.1} s), {s} commits",
                sec / 3600,
                t_hour.elapsed().as_secs_f64(),
                t_day.elapsed().as_secs_f64()
            );
            t_hour = Instant::now();
        }
    }
    let day_end = hand.now_us();
    let day_wall = t_day.elapsed().as_secs_f64();
    let db_bytes = std::fs::metadata(&db)?.len();
    // Close the last compaction windows (the longest level's window), as the
    // daemon would by the time that window is over.
    hand.advance(max_level + Duration::from_secs(1));
    step_all(&mut rs).await?;
    let c_day = counts(&rs);
    let day_counts = sub(&c_day, &c0);

    // An idle stretch: no commits, a step every simulated second.
    let idle_s = (args.idle_hours * 3600.0).round() as u64;
    for _ in 0..idle_s {
        hand.advance(Duration::from_secs(1));
        step_all(&mut rs).await?;
    }
    let c_idle = counts(&rs);
    let idle_counts = sub(&c_idle, &c_day);

    // The replicas.
    let mut cats = Vec::new();
    for r in &rs {
        let c = Catalog::load(r.store.as_ref()).await?;
        ensure!(
            c.lineages.len() == 1,
            "{}: {} lineages (a continuity break makes the measurement meaningless)",
            r.name,
            c.lineages.len()
        );
        cats.push(c);
    }
    let stats: Vec<BucketStats> = cats.iter().map(bucket_stats).collect();
    let max_txid = cats[0].max_txid().unwrap();
    ensure!(
        Some(max_txid) == cats[1].max_txid(),
        "the replicas saw different commits"
    );
    let la = cats[0].lineages.values().next().unwrap();
    let lb = cats[1].lineages.values().next().unwrap();
    ensure!(
        lb.compacted.is_empty(),
        "plain replica has compacted objects"
    );

    // Targets.
    let back_us = (args.target_back_h * HOUR_US as f64) as i64;
    let back_t = day_end - back_us;
    let mut targets: Vec<(String, Target, u64)> = Vec::new();
    targets.push((format!("latest (txid {max_txid})"), Target::Latest, s));
    let want_back = stamps
        .iter()
        .rev()
        .find(|(_, t)| *t <= back_t)
        .map(|(c, _)| *c)
        .context("target before the first commit")?;
    targets.push((
        format!("{} h back (time)", args.target_back_h),
        Target::Time(back_t),
        want_back,
    ));
    // Most segments from one snapshot: the last commit before the newest
    // snapshot taken during the day (or the latest commit if none was).
    let newest_snap = la.snapshots.iter().map(|x| x.txid).max().unwrap();
    let worst = if la.snapshots.len() > 1 && newest_snap > 1 {
        newest_snap - 1
    } else {
        max_txid
    };
    // Txid n is commit n here: commit 1 is in the first snapshot (txid 1),
    // and every commit after it is one txid.
    ensure!(max_txid == s, "txid {max_txid} != commit {s}");
    targets.push((
        format!("last commit before the newest snapshot (txid {worst})"),
        Target::Txid(worst),
        worst,
    ));

    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir)?;
    let mut measured: Vec<Measured> = Vec::new();
    for (tname, target, want) in &targets {
        for r in &rs {
            let out = out_dir.join(format!("{}.db", r.name));
            let mut walls = Vec::new();
            let mut last = None;
            let mut reqs = RequestCounts::default();
            for i in 0..args.runs {
                let _ = std::fs::remove_file(&out);
                let before = r.store.request_counts();
                let t = Instant::now();
                let mut ro = RestoreOptions::new(*target, out.clone());
                ro.trust = offsite::sign::Trust::with_keys(vec![signer.public()]);
                let rep = restore(r.store.as_ref(), ro)
                    .await
                    .with_context(|| format!("restore {tname} from {}", r.name))?;
                walls.push(t.elapsed().as_secs_f64());
                if i == 0 {
                    reqs = r.store.request_counts() - before;
                }
                last = Some(rep);
            }
            let commit = workload::verify(&out)
                .with_context(|| format!("verify {tname} from {}", r.name))?;
            ensure!(
                commit == *want,
                "{tname} from {}: restored commit {commit}, expected {want}",
                r.name
            );
            let rep = last.unwrap();
            eprintln!(
                "restore_history: {tname} from {}: {} objects, {} B, median {:.3} s",
                r.name,
                rep.objects,
                rep.bytes_downloaded,
                median(&walls)
            );
            measured.push(Measured {
                target: tname.clone(),
                tgt: *target,
                replica: r.name,
                report: rep,
                walls,
                requests: reqs,
                hash: hash_file(&out)?,
                commit,
            });
        }
        let n = measured.len();
        ensure!(
            measured[n - 1].hash == measured[n - 2].hash,
            "{tname}: compacted and plain restores differ"
        );
    }

    // Report.
    let mut md = String::new();
    let w = &mut md;
    let url_shown = if args.replica_url.is_some() {
        base_url.split('?').next().unwrap_or("").to_string()
    } else {
        "file:// (temp dir)".into()
    };
    writeln!(
        w,
        "Simulated day: **{} h** ({} → {}), one commit every {} s, `step(true)` every {} s → {} commits \
         (every 500th ~200 KB, the others 50–2000 B); real time to simulate it with both replicators: {:.0} s. \
         Database at the end: {} MB. Replica: {url_shown}. Compaction levels of \"compacted\": {}. \
         Both: snapshot interval 24 h, retention 24 h + 2 snapshots, prune interval 1 h. \
         Restores: `--parallel 8`, integrity check on (as the CLI), {} run(s) each.\n",
        args.hours,
        fmt_time_us(start),
        fmt_time_us(day_end),
        args.commit_every_s,
        args.sync_every_s,
        s,
        day_wall,
        mb(db_bytes),
        levels
            .iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect::<Vec<_>>()
            .join(" / "),
        args.runs
    )?;
    writeln!(
        w,
        "Real seconds per simulated hour (commits, both replicators' steps and their hourly prunes, \
         which `wait_maintenance()` waits for): {}\n",
        hour_walls
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(w, "#### Restores\n")?;
    writeln!(
        w,
        "| restore to | replica | restored commit | objects read (plan) | wall s median (min–max) | MB downloaded | requests (GET + LIST) |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|")?;
    for m in &measured {
        let cat = if m.replica == "compacted" {
            &cats[0]
        } else {
            &cats[1]
        };
        let plan = cat.plan(m.tgt)?;
        let min = m.walls.iter().cloned().fold(f64::MAX, f64::min);
        let max = m.walls.iter().cloned().fold(0.0, f64::max);
        writeln!(
            w,
            "| {} | {} | {} | **{}** ({}) | **{:.3}** ({:.3}–{:.3}) | {} | {} + {} |",
            m.target,
            m.replica,
            m.commit,
            m.report.objects,
            chain_summary(&plan),
            median(&m.walls),
            min,
            max,
            mb(m.report.bytes_downloaded),
            m.requests.get,
            m.requests.list
        )?;
    }
    writeln!(
        w,
        "\nEvery restored database passed `workload::verify` (exact rows of the expected commit, integrity check); \
         compacted and plain restores of each target are byte-identical (BLAKE3 of the files).\n"
    )?;
    writeln!(w, "#### Requests\n")?;
    writeln!(
        w,
        "| replica | period | PUT | GET | LIST | DELETE | HEAD | other | total |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|---|---|")?;
    for (i, r) in rs.iter().enumerate() {
        writeln!(
            w,
            "| {} | the day (start, {} h of commits, closing the last {} window) | {} |",
            r.name,
            args.hours,
            humantime::format_duration(max_level),
            fmt_counts(&day_counts[i])
        )?;
    }
    for (i, r) in rs.iter().enumerate() {
        writeln!(
            w,
            "| {} | idle {} h afterwards (a step every second, no commits) | {} |",
            r.name,
            args.idle_hours,
            fmt_counts(&idle_counts[i])
        )?;
    }
    writeln!(w, "\n#### Bucket at the end\n")?;
    let nlev = stats.iter().map(|b| b.by_level.len()).max().unwrap_or(1);
    let lev_hdr: String = (0..nlev).map(|i| format!(" L{i} objects (MB) |")).collect();
    writeln!(
        w,
        "| replica | lineages | objects | MB | snapshots (MB) |{lev_hdr}"
    )?;
    writeln!(w, "|---|---|---|---|---|{}", "---|".repeat(nlev))?;
    for (i, r) in rs.iter().enumerate() {
        let b = &stats[i];
        let lev: String = (0..nlev)
            .map(|l| {
                let (n, by) = b.by_level.get(l).copied().unwrap_or((0, 0));
                format!(" {n} ({}) |", mb(by))
            })
            .collect();
        writeln!(
            w,
            "| {} | {} | {} | {} | {} ({}) |{lev}",
            r.name,
            b.lineages,
            b.objects,
            mb(b.bytes),
            b.snapshots,
            mb(b.snapshot_bytes)
        )?;
    }
    writeln!(w)?;
    drop(conn);
    Ok(md)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let md = rt.block_on(run(args.clone()))?;
    println!("{md}");
    if let Some(d) = &args.out_dir {
        std::fs::create_dir_all(d)?;
        std::fs::write(d.join("restore_history.md"), &md)?;
    }
    Ok(())
}
