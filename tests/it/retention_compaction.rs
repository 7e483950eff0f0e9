//! Compaction, periodic snapshots, retention and several replicas, with a
//! real SQLite database, a real S3 server (and file://), and an injected
//! clock so hours of history take seconds.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use offsite::clock::{Clock, ManualClock};
use offsite::codec::Encryption;
use offsite::layout::{Catalog, Target};
use offsite::replicate::{Options, Replicator};
use offsite::restore::{restore, RestoreOptions};
use offsite::retention::{Policy, SnapshotRetention};
use offsite::storage::{self, DynStorage};
use offsite::workload;
use support::harness;
use support::writer::Writer;

const HOUR_US: i64 = 3_600_000_000;

async fn open_store(url: &str) -> DynStorage {
    storage::open(&url.parse().unwrap()).await.unwrap()
}

/// `url` with `/name` appended to its path (before any query string).
fn sub_url(url: &str, name: &str) -> String {
    match url.split_once('?') {
        Some((a, q)) => format!("{}/{name}?{q}", a.trim_end_matches('/')),
        None => format!("{}/{name}", url.trim_end_matches('/')),
    }
}

fn verify_opts() -> offsite::verify::VerifyOptions {
    offsite::verify::VerifyOptions {
        trust: crate::support::harness::test_trust(),
        ..Default::default()
    }
}

fn options(db: &Path, spool: &Path, clock: &Clock) -> Options {
    let mut o = Options::new(db.to_path_buf(), spool.to_path_buf());
    o.signer = Some(crate::support::harness::test_signer());
    o.clock = clock.clone();
    o.retention = None;
    o.snapshot_interval = None;
    o
}

async fn restore_to(
    store: &DynStorage,
    target: Target,
    out: &Path,
) -> offsite::restore::RestoreReport {
    let mut o = RestoreOptions::new(target, out.to_path_buf());
    o.trust = crate::support::harness::test_trust();
    restore(store.as_ref(), o)
        .await
        .unwrap_or_else(|e| panic!("restore {target:?}: {e:#}"))
}

/// Compacted and uncompacted replicas of the same database restore to
/// identical bytes at every sampled commit; restores from the compacted one
/// read far fewer objects. Runs on file:// and every S3 server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_and_uncompacted_replicas_restore_identically() {
    let dir = tempfile::tempdir().unwrap();
    for target in harness::targets(dir.path()) {
        let sub = dir.path().join(&target.name);
        std::fs::create_dir_all(&sub).unwrap();
        let db = sub.join("app.db");
        let spool = sub.join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let mut w = Writer::new(&db, 7, 40_000);
        w.commit();
        let start = 1_800_000_000 * 1_000_000i64; // an hour boundary
        let (clock, hand) = Clock::manual(start);
        let url_a = sub_url(&target.url, "compacted");
        let url_b = sub_url(&target.url, "plain");
        let (sa, sb) = (open_store(&url_a).await, open_store(&url_b).await);
        let mut oa = options(&db, &spool, &clock);
        oa.compaction_levels = vec![Duration::from_secs(60), Duration::from_secs(600)];
        oa.snapshot_interval = Some(Duration::from_secs(40 * 60));
        let mut ob = options(&db, &spool, &clock);
        ob.compaction_levels = vec![];
        let mut ra = Replicator::new(oa, sa.clone(), Encryption::None);
        let mut rb = Replicator::new(ob, sb.clone(), Encryption::None);
        ra.start().await.unwrap();
        rb.start().await.unwrap();
        // Two simulated hours: bursts of 1-4 commits every 10-80 s.
        let mut rng = 7u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut step = 0u64;
        while hand.now_us() < start + 2 * HOUR_US {
            for _ in 0..(1 + next() % 4) {
                w.commit();
            }
            step += 1;
            if step.is_multiple_of(40) {
                // Alternately grow a side table and drop it + VACUUM.
                if (step / 40).is_multiple_of(2) {
                    w.grow(60, 3000);
                } else {
                    w.shrink();
                }
            }
            hand.advance(Duration::from_secs(10 + next() % 70));
            ra.step(true).await.unwrap();
            rb.step(true).await.unwrap();
        }
        // Let every window close.
        hand.advance(Duration::from_secs(3600));
        ra.step(true).await.unwrap();
        rb.step(true).await.unwrap();

        let ca = Catalog::load(sa.as_ref()).await.unwrap();
        let cb = Catalog::load(sb.as_ref()).await.unwrap();
        assert_eq!(ca.lineages.len(), 1, "{}: one lineage", target.name);
        let la = ca.lineages.values().next().unwrap();
        let lb = cb.lineages.values().next().unwrap();
        let l1 = la
            .compacted
            .values()
            .flatten()
            .filter(|c| c.level == 1)
            .count();
        let l2 = la
            .compacted
            .values()
            .flatten()
            .filter(|c| c.level == 2)
            .count();
        assert!(
            l1 >= 100 && l2 >= 10,
            "{}: compacted objects: {l1} L1, {l2} L2",
            target.name
        );
        assert!(
            la.snapshots.len() >= 3,
            "{}: periodic snapshots: {}",
            target.name,
            la.snapshots.len()
        );
        assert!(lb.compacted.is_empty());
        let max = la.max_txid().unwrap();
        assert_eq!(
            max,
            lb.max_txid().unwrap(),
            "both replicas saw the same commits"
        );

        // Samples: both ends of every 5th compacted object, plus a spread.
        let mut samples: Vec<u64> = la
            .compacted
            .values()
            .flatten()
            .step_by(5)
            .flat_map(|c| [c.first_txid, c.last_txid])
            .collect();
        samples.extend((1..=12).map(|i| 1 + (max - 1) * i / 12));
        samples.sort_unstable();
        samples.dedup();
        let (out_a, out_b) = (sub.join("a.db"), sub.join("b.db"));
        let (mut objs_a, mut objs_b) = (0, 0);
        for &t in &samples {
            let ra_ = restore_to(&sa, Target::Txid(t), &out_a).await;
            let rb_ = restore_to(&sb, Target::Txid(t), &out_b).await;
            assert_eq!(ra_.txid, t);
            objs_a += ra_.objects;
            objs_b += rb_.objects;
            let (a, b) = (
                std::fs::read(&out_a).unwrap(),
                std::fs::read(&out_b).unwrap(),
            );
            assert!(
                a == b,
                "{}: txid {t}: compacted restore differs from the uncompacted one",
                target.name
            );
            workload::verify(&out_a).unwrap_or_else(|e| panic!("txid {t}: {e:#}"));
        }
        // verify replays every compacted segment against the level-0 chain.
        for st in [&sa, &sb] {
            let rep = offsite::verify::verify(st.as_ref(), &verify_opts())
                .await
                .unwrap();
            assert!(rep.ok(), "{}: {}", target.name, rep.human());
        }
        // Latest: a snapshot is at most 40 min old, compaction covers the rest.
        let la_ = restore_to(&sa, Target::Latest, &out_a).await;
        let lb_ = restore_to(&sb, Target::Latest, &out_b).await;
        assert_eq!(
            std::fs::read(&out_a).unwrap(),
            std::fs::read(&out_b).unwrap()
        );
        assert_eq!(workload::verify(&out_a).unwrap(), w.s);
        eprintln!(
            "{}: {} samples; objects read compacted {objs_a} vs plain {objs_b}; latest {} vs {}",
            target.name,
            samples.len(),
            la_.objects,
            lb_.objects
        );
        assert!(
            la_.objects * 4 < lb_.objects,
            "{}: latest restore reads {} objects (plain: {})",
            target.name,
            la_.objects,
            lb_.objects
        );
    }
}

/// Retention in the daemon's own pruning, over 6 simulated hours with a
/// 1-hour window: at every simulated 10 minutes, every commit of the last
/// hour restores to the exact commit, the window's start restores, and no
/// more history is kept than one snapshot interval before the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_window_holds_across_simulated_hours() {
    let dir = tempfile::tempdir().unwrap();
    let mut targets = harness::targets(dir.path());
    targets.truncate(2); // file:// and the first S3 server
    for target in targets {
        let sub = dir.path().join(&target.name);
        std::fs::create_dir_all(sub.join("spool")).unwrap();
        let db = sub.join("app.db");
        let mut w = Writer::new(&db, 7, 40_000);
        w.commit();
        let start = 1_800_000_000 * 1_000_000i64;
        let (clock, hand): (Clock, ManualClock) = Clock::manual(start);
        let store = open_store(&target.url).await;
        let mut o = options(&db, &sub.join("spool"), &clock);
        o.compaction_levels = vec![Duration::from_secs(300)];
        o.snapshot_interval = Some(Duration::from_secs(20 * 60));
        o.retention = Some(Policy {
            retention: Duration::from_secs(3600),
            snapshot_retention: SnapshotRetention::Count(2),
        });
        o.prune_interval = Duration::from_secs(600);
        let mut r = Replicator::new(o, store.clone(), Encryption::None);
        r.start().await.unwrap();
        let mut commits: Vec<(u64, i64)> = Vec::new(); // (writer commit, time)
        let out = sub.join("r.db");
        let mut checks = 0;
        while hand.now_us() < start + 6 * HOUR_US {
            w.commit();
            hand.advance(Duration::from_secs(60));
            r.step(true).await.unwrap();
            r.wait_maintenance().await;
            commits.push((w.s, hand.now_us()));
            let now = hand.now_us();
            if (now - start) % (10 * 60_000_000) != 0 || now - start < 2 * HOUR_US {
                continue;
            }
            checks += 1;
            let ws = now - HOUR_US;
            let c = Catalog::load(store.as_ref()).await.unwrap();
            let (earliest, _) = c.window().unwrap();
            assert!(
                earliest.1 <= ws,
                "window start {ws} not covered (earliest {})",
                earliest.1
            );
            // Only what the window needs (plus the prune interval's lag and
            // the base snapshot's distance, at most one snapshot interval).
            assert!(
                earliest.1 >= ws - 20 * 60_000_000 - 10 * 60_000_000 - 120_000_000,
                "kept too much: earliest {} vs window start {ws}",
                earliest.1
            );
            let snaps: usize = c.lineages.values().map(|l| l.snapshots.len()).sum();
            assert!(snaps <= 6, "{snaps} snapshots kept");
            // Every commit in the window restores exactly (by time: the
            // commit was observed at the step after it).
            for &(s, t) in commits.iter().filter(|(_, t)| *t >= ws).step_by(7) {
                let rep = restore_to(&store, Target::Time(t), &out).await;
                assert!(rep.time_us <= t);
                assert_eq!(workload::verify(&out).unwrap(), s, "commit {s} at {t}");
            }
            let rep = restore_to(&store, Target::Time(ws), &out).await;
            let want = commits.iter().rfind(|(_, t)| *t <= ws).unwrap().0;
            assert_eq!(
                workload::verify(&out).unwrap(),
                want,
                "state at the window's start"
            );
            assert!(rep.time_us <= ws);
        }
        assert!(checks >= 20, "{checks}");
        // The pruned replica verifies clean: kept tail snapshots stand alone,
        // the window's chain is whole.
        let rep = offsite::verify::verify(store.as_ref(), &verify_opts())
            .await
            .unwrap();
        assert!(rep.ok(), "{}", rep.human());
        assert!(rep.contents_checked);
        // A point older than the window is gone (unless it is a kept snapshot).
        let c = Catalog::load(store.as_ref()).await.unwrap();
        assert!(c.plan(Target::Time(start + 30 * 60_000_000)).is_err());
    }
}

/// `harness::wait_for`, printing the daemon's log when it times out.
fn wait_log(what: &str, t: Duration, log: &Path, mut f: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + t;
    while std::time::Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(30).collect();
    panic!(
        "timed out waiting for {what}; log tail (newest first):\n{}",
        tail.join("\n")
    );
}

/// Wait until the replica's newest state is the database's last commit.
fn wait_caught_up(url: &str, db: &Path, log: &Path) {
    let c = rusqlite::Connection::open(db).unwrap();
    let want = workload::last_commit(&c).unwrap();
    drop(c);
    let out = db.with_extension("caught-up.db");
    wait_log(
        &format!("the replica to hold commit {want}"),
        Duration::from_secs(60),
        log,
        || {
            harness::restore(url, &out, &["--force"]).ok()
                && workload::verify(&out).is_ok_and(|m| m == want)
        },
    );
}

/// `offsite replicate --config CFG`, logging to LOG, killed when dropped.
fn daemon(cfg: &Path, log: &Path) -> KillOnDrop {
    KillOnDrop(
        harness::offsite()
            .args(["replicate", "--config"])
            .arg(cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// Kills the child process even when the test fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two replicas of one database in one daemon: the first points at an
/// endpoint nobody listens on, the second keeps receiving every commit; a
/// restore through the config picks the healthy one.
#[test]
fn second_replica_keeps_working_while_the_first_is_unreachable() {
    let (_g, dir, _url, db, _log, _id, _recipient) = harness::file_fixture();
    let cfg = dir.join("offsite.toml");
    let good = dir.join("good");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[database]]
path = "{db}"
  [[database.replica]]
  name = "down"
  url = "s3://nobody/x?endpoint=http://127.0.0.1:9&region=us-east-1&force-path-style=true"
  encryption = "none"
  [[database.replica]]
  name = "local"
  url = "file://{good}"
  encryption = "none"
"#,
            db = db.display(),
            good = good.display()
        ),
    )
    .unwrap();
    harness::workload(&db, &["--count", "5"]);
    let log_path = dir.join("offsite.log");
    let mut child = daemon(&cfg, &log_path);
    let url = format!("file://{}", good.display());
    harness::workload(&db, &["--count", "200", "--rate", "200"]);
    wait_caught_up(&url, &db, &log_path);
    assert!(child.0.try_wait().unwrap().is_none(), "offsite exited");
    let out = dir.join("restored.db");
    let r = harness::offsite()
        .args(["restore", "--config"])
        .arg(&cfg)
        .arg(&db)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(workload::verify(&out).unwrap(), 205);
    harness::wait_for(
        "the broken replica's error in the log",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("replica unreachable")
        },
    );
    assert!(child.0.try_wait().unwrap().is_none(), "offsite exited");
    drop(child);
    // Named restore from the broken replica fails with a clear error.
    let r = harness::offsite()
        .args(["restore", "--replica", "down", "--config"])
        .arg(&cfg)
        .arg(&db)
        .arg("-o")
        .arg(dir.join("x.db"))
        .output()
        .unwrap();
    assert!(!r.status.success());
}

/// `offsite prune --dry-run` prints what it would delete and why, deletes
/// nothing; without --dry-run it deletes exactly that; the newest state
/// still restores. The clock is moved with OFFSITE_TEST_CLOCK.
#[test]
fn prune_cli_dry_run_then_real() {
    let (_g, dir, url, db, _log, _id, _recipient) = harness::file_fixture();
    harness::workload(&db, &["--count", "20"]);
    // Build history across three lineages (database replaced twice).
    for i in 0..3 {
        let before = harness::latest_txid(&url);
        let s = harness::Shipper::start(&db, &url, &["--no-encryption"]);
        harness::workload(&db, &["--count", "20"]);
        harness::wait_shipped(&url, before, Duration::from_secs(60));
        s.stop();
        if i < 2 {
            // VACUUM INTO + swap: a new file, so a new lineage.
            let tmp = dir.join("swap.db");
            let _ = std::fs::remove_file(&tmp);
            let c = rusqlite::Connection::open(&db).unwrap();
            c.execute("VACUUM INTO ?1", [tmp.to_str().unwrap()])
                .unwrap();
            drop(c);
            for sfx in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{sfx}", db.display()));
            }
            std::fs::rename(&tmp, &db).unwrap();
            let c = rusqlite::Connection::open(&db).unwrap();
            c.pragma_update(None, "journal_mode", "wal").unwrap();
        }
    }
    let before = harness::list_json(&url);
    let lineages = before["lineages"].as_array().unwrap().len();
    assert!(lineages >= 2, "{before}");
    let future = offsite::layout::fmt_time_us(offsite::clock::system_now_us() + 3 * HOUR_US);
    let run = |dry: bool| {
        let mut c = harness::offsite();
        c.env("OFFSITE_TEST_CLOCK", format!("1@{future}")).args([
            "prune",
            &url,
            "--retention",
            "1h",
            "--snapshot-retention",
            "1",
        ]);
        if dry {
            c.arg("--dry-run");
        }
        c.output().unwrap()
    };
    let dry = run(true);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let text = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(
        text.contains("would delete") && text.contains("lineage"),
        "{text}"
    );
    assert_eq!(
        harness::list_json(&url),
        before,
        "dry run deleted something"
    );
    let real = run(false);
    assert!(
        real.status.success(),
        "{}",
        String::from_utf8_lossy(&real.stderr)
    );
    let after = harness::list_json(&url);
    assert_eq!(after["lineages"].as_array().unwrap().len(), 1, "{after}");
    let out = dir.join("r.db");
    let r = harness::restore(&url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(workload::verify(&out).unwrap(), 80);
    // Prune without a policy is refused rather than guessed.
    let o = harness::offsite().args(["prune", &url]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--retention"));
    let _: Option<PathBuf> = None;
}

/// Object Lock end to end on a server that implements it (moto): every
/// object the daemon uploads carries a retention; pruning cannot delete a
/// locked object (the server refuses; prune reports it and keeps going),
/// and deletes it once the lock has expired. A bucket without Object Lock
/// is refused at startup.
#[test]
fn object_lock_protects_uploads_until_pruning_may_delete_them() {
    let Some(lock) = support::s3_lock_target() else {
        return;
    };
    let (_g, dir, _url, db, _log, _id, _recipient) = harness::file_fixture();
    harness::workload(&db, &["--count", "10"]);
    let cfg = dir.join("offsite.toml");
    let write_cfg = |url: &str| {
        std::fs::write(
            &cfg,
            format!(
                r#"
[[database]]
path = "{db}"
  [[database.replica]]
  url = "{url}"
  encryption = "none"
  object-lock = "governance"
  retention = "1s"
  snapshot-interval = "2s"
  snapshot-retention = "1"
  object-lock-margin = "6s"
  prune-interval = "1h"
"#,
                db = db.display()
            ),
        )
        .unwrap()
    };
    // A bucket without Object Lock: refused at startup, clearly.
    if let Some(plain) = support::s3_targets().first() {
        write_cfg(&plain.url);
        let o = harness::offsite()
            .args(["replicate", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("does not have S3 Object Lock enabled"),
            "{err}"
        );
    }
    write_cfg(&lock.url);
    let log_path = dir.join("offsite.log");
    let child = daemon(&cfg, &log_path);
    for _ in 0..4 {
        harness::workload(&db, &["--count", "10"]);
        std::thread::sleep(Duration::from_millis(1500));
    }
    wait_caught_up(&lock.url, &db, &log_path);
    drop(child);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("periodic snapshot uploaded"), "{log}");
    // Every object has a retention about 1s + 2s + 6s after its upload.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(open_store(&lock.url));
    let objs = rt.block_on(store.list("lineages/")).unwrap();
    assert!(objs.len() >= 4, "{objs:?}");
    let now = offsite::clock::system_now_us();
    for o in &objs {
        let until = rt.block_on(store.retention(&o.key)).unwrap();
        let until = until.unwrap_or_else(|| panic!("{} has no retention", o.key));
        assert!(
            until > now - 2_000_000 && until < now + 12_000_000,
            "{}: {until} vs {now}",
            o.key
        );
    }
    // Prune now: old objects are due but locked; the server refuses.
    let prune = || {
        harness::offsite()
            .args(["prune", "--json", "--config"])
            .arg(&cfg)
            .arg(&db)
            .output()
            .unwrap()
    };
    let o = prune();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let locked = rep["locked"].as_array().unwrap().len();
    assert!(locked > 0, "{rep}");
    assert_eq!(rep["deleted"].as_array().unwrap().len(), 0, "{rep}");
    assert_eq!(
        rt.block_on(store.list("lineages/")).unwrap().len(),
        objs.len()
    );
    // After the locks expire, the same prune deletes them.
    std::thread::sleep(Duration::from_secs(10));
    let o = prune();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(rep["deleted"].as_array().unwrap().len() >= locked, "{rep}");
    assert!(rep["locked"].as_array().unwrap().is_empty(), "{rep}");
    let out = dir.join("r.db");
    let r = harness::restore(&lock.url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(workload::verify(&out).unwrap(), 50);
}

/// An idle database costs no request: once compaction windows have closed,
/// the periodic snapshot is taken and pruning has run, a simulated day with
/// no commit makes no PUT, GET, LIST, HEAD or DELETE (Litestream #1171: 480
/// PUTs/hour for an idle database). Counted by the store itself (true HTTP
/// requests on S3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_database_costs_no_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut targets = harness::targets(dir.path());
    targets.truncate(2);
    for target in targets {
        let sub = dir.path().join(&target.name);
        std::fs::create_dir_all(sub.join("spool")).unwrap();
        let db = sub.join("app.db");
        let mut w = Writer::new(&db, 7, 40_000);
        let start = 1_800_000_000 * 1_000_000i64;
        let (clock, hand) = Clock::manual(start);
        let store = open_store(&target.url).await;
        let mut o = options(&db, &sub.join("spool"), &clock);
        o.retention = Some(Policy::default());
        o.snapshot_interval = Some(Duration::from_secs(3600));
        let mut r = Replicator::new(o, store.clone(), Encryption::None);
        w.commit();
        r.start().await.unwrap();
        for _ in 0..30 {
            w.commit();
            hand.advance(Duration::from_secs(20));
            r.step(true).await.unwrap();
        }
        // Settle: windows close, one periodic snapshot, pruning.
        for _ in 0..(6 * 60) {
            hand.advance(Duration::from_secs(60));
            r.step(false).await.unwrap();
            r.wait_maintenance().await;
        }
        let before = store.request_counts();
        assert!(
            before.put > 0,
            "{}: nothing counted: {before:?}",
            target.name
        );
        for _ in 0..(24 * 60) {
            hand.advance(Duration::from_secs(60));
            r.step(false).await.unwrap();
            r.wait_maintenance().await;
        }
        let after = store.request_counts();
        assert_eq!(before, after, "{}: an idle day made requests", target.name);
        // The state is still exactly the last commit.
        let out = sub.join("r.db");
        restore_to(&store, Target::Latest, &out).await;
        assert_eq!(workload::verify(&out).unwrap(), w.s);
    }
}

/// A configured restore drill runs on its schedule inside the daemon and
/// records the newest verified restore point; a damaged newest object makes
/// the next drill fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_drill_records_the_newest_verified_point() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let url = format!("file://{}", dir.path().join("replica").display());
    let mut w = Writer::new(&db, 7, 40_000);
    w.commit();
    let (clock, hand) = Clock::manual(1_800_000_000 * 1_000_000);
    let store = open_store(&url).await;
    let mut o = options(&db, &spool, &clock);
    o.verify_interval = Some(Duration::from_secs(600));
    // Without compaction the newest point needs the newest level-0 segment
    // (with it, a drill restores through the compacted copy instead; every
    // object is checked by `offsite verify`, not by drills).
    o.compaction_levels = vec![];
    let mut r = Replicator::new(o, store.clone(), Encryption::None);
    r.start().await.unwrap();
    for _ in 0..20 {
        w.commit();
        hand.advance(Duration::from_secs(30));
        r.step(true).await.unwrap();
    }
    r.wait_maintenance().await;
    let d = r.last_drill().expect("a drill ran");
    assert!(d.ok, "{d:?}");
    let c = Catalog::load(store.as_ref()).await.unwrap();
    let latest = c.newest_lineage().unwrap().max_txid().unwrap();
    // The drill ran at the first step; its newest point was the head then.
    assert!(d.newest_verified_txid.is_some());
    // Damage the newest segment; the next drill (10 simulated minutes on) fails.
    let head = c.newest_lineage().unwrap().head().unwrap();
    let p = dir.path().join("replica").join(head.key());
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 0x55;
    std::fs::write(&p, bytes).unwrap();
    hand.advance(Duration::from_secs(601));
    r.step(false).await.unwrap();
    r.wait_maintenance().await;
    let d2 = r.last_drill().unwrap();
    assert!(!d2.ok && d2.ran_at_us > d.ran_at_us, "{d2:?}");
    assert!(
        d2.error.unwrap_or_default().contains(head.key()),
        "the error names the object"
    );
    let _ = latest;
}
