//! End to end: a real writer process, the real `offsite` binary, a real
//! store (`file://`, Garage, s3s-fs). Restores are compared row by row with
//! the state the writer committed (see `offsite::workload`).

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use support::harness::*;

fn verify(path: &Path) -> u64 {
    offsite::workload::verify(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// Writer commit times from the workload log: commit number → unix micros
/// at which the commit's transaction started (a lower bound of its commit time).
fn commit_log(p: &Path) -> BTreeMap<u64, i64> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect()
}

fn rfc3339_us(s: &str) -> i64 {
    offsite::layout::parse_time(s).unwrap()
}

/// Restore many txids and timestamps of `url` and check each against the
/// writer's deterministic state. Returns the number of restores checked.
fn check_replica(url: &str, dir: &Path, key: &Path, final_commit: u64, log: &Path) -> usize {
    let id = key.to_str().unwrap();
    let l = list_json(url);
    let earliest = l["earliest"]["txid"].as_u64().unwrap();
    let latest = l["latest"]["txid"].as_u64().unwrap();
    let out = dir.join("latest.db");
    let r = restore(url, &out, &["--age-identity", id]);
    assert!(r.ok(), "restore latest: {}", r.stderr());
    assert_eq!(r.txid, Some(latest));
    assert_eq!(
        verify(&out),
        final_commit,
        "latest restore must hold the last commit"
    );

    // Sample txids: the ends, runs of consecutive txids, and a spread.
    let mut txids: Vec<u64> = vec![earliest, latest];
    let span = latest - earliest;
    for k in 0..12 {
        txids.push(earliest + span * k / 12);
    }
    for start in [earliest + span / 3, earliest + 2 * span / 3] {
        for d in 0..4 {
            txids.push((start + d).min(latest));
        }
    }
    txids.sort();
    txids.dedup();
    let mut by_txid: BTreeMap<u64, (u64, String)> = BTreeMap::new();
    for &t in &txids {
        let out = dir.join(format!("txid-{t}.db"));
        let r = restore(url, &out, &["--txid", &t.to_string(), "--age-identity", id]);
        if !r.ok() {
            // A txid in the gap between lineages does not exist; nothing else may fail.
            let lineage_gap = r.stderr().contains("is not restorable");
            assert!(lineage_gap, "restore --txid {t}: {}", r.stderr());
            continue;
        }
        assert_eq!(r.txid, Some(t), "restore --txid {t} stopped elsewhere");
        let m = verify(&out);
        by_txid.insert(t, (m, r.time.clone().unwrap()));
        std::fs::remove_file(&out).unwrap();
    }
    // Commit numbers never go backwards with txids, and one txid is one commit.
    let lineage_starts: Vec<u64> = l["lineages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| u64::from_str_radix(&x["lineage"].as_str().unwrap()[..16], 16).unwrap())
        .collect();
    let v: Vec<(&u64, &(u64, String))> = by_txid.iter().collect();
    for w in v.windows(2) {
        let ((t1, (m1, _)), (t2, (m2, _))) = (w[0], w[1]);
        assert!(
            m2 >= m1,
            "txid {t2} holds commit {m2} < commit {m1} of txid {t1}"
        );
        // A new lineage's first snapshot holds the commits made while
        // offsite could not follow them (docs/FORMAT.md, "Concepts").
        if *t2 == t1 + 1 && !lineage_starts.contains(t2) {
            assert!(
                m2 - m1 <= 1,
                "txids {t1},{t2} differ by {} commits: not per-commit",
                m2 - m1
            );
        }
    }
    // Timestamps: restoring at a txid's time gives a state at or after it, at
    // that same time; never a commit the writer had not made by then.
    let commits = commit_log(log);
    let mut n = by_txid.len() + 1;
    for (t, (m, time)) in by_txid.iter().step_by(3) {
        let out = dir.join(format!("ts-{t}.db"));
        let r = restore(url, &out, &["--timestamp", time, "--age-identity", id]);
        assert!(r.ok(), "restore --timestamp {time}: {}", r.stderr());
        assert!(r.txid.unwrap() >= *t);
        assert_eq!(r.time.as_deref(), Some(time.as_str()));
        let m2 = verify(&out);
        assert!(m2 >= *m);
        let committed_by = commits
            .iter()
            .filter(|(_, &us)| us <= rfc3339_us(time))
            .map(|(s, _)| *s)
            .max()
            .unwrap_or(0);
        assert!(
            m2 <= committed_by,
            "restore at {time} holds commit {m2}, writer had only reached {committed_by}"
        );
        std::fs::remove_file(&out).unwrap();
        n += 1;
    }
    n
}

#[test]
fn live_writer_checkpoints_vacuum_big_transactions() {
    let _shared = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    for target in targets(tmp.path()) {
        let dir = tmp.path().join(&target.name);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("app.db");
        let log = dir.join("commits.log");
        let (key, rcpt) = keygen(&dir);
        let logs = log.to_str().unwrap();
        workload(&db, &["--count", "5", "--log", logs]);
        let s = Shipper::start(
            &db,
            &target.url,
            &["--age-recipient", &rcpt, "--checkpoint-frames", "300"],
        );
        // Phase 1: steady writes, multi-MB transactions, the app's PASSIVE checkpoints.
        workload(
            &db,
            &[
                "--count",
                "250",
                "--rate",
                "300",
                "--big-every",
                "60",
                "--big-bytes",
                "1500000",
                "--checkpoint-every",
                "40",
                "--checkpoint-mode",
                "passive",
                "--log",
                logs,
            ],
        );
        // Phase 2: the app's TRUNCATE checkpoints (busy while offsite holds its
        // read lock) and a VACUUM.
        workload(
            &db,
            &[
                "--count",
                "120",
                "--rate",
                "400",
                "--checkpoint-every",
                "25",
                "--checkpoint-mode",
                "truncate",
                "--checkpoint-busy-ms",
                "300",
                "--vacuum-at",
                "300",
                "--log",
                logs,
            ],
        );
        let (st, out) = s.stop();
        assert!(st.success(), "{}: shipper exit {st}: {out}", target.name);
        // Continuity across the application's checkpoints is asserted strictly
        // in application_truncate_checkpoints_complete_while_offsite_runs; here,
        // under a much faster writer on a loaded CI machine, a second lineage is
        // allowed (offsite could not prove continuity and took a snapshot: safe),
        // and every sampled restore must still be exact.
        let lineages = out.matches("starting a new lineage").count();
        assert!(lineages >= 1, "{}: {out}", target.name);
        eprintln!("{}: {lineages} lineage(s)", target.name);
        let n = check_replica(&target.url, &dir, &key, 375, &log);
        eprintln!("{}: {n} restores verified", target.name);
    }
}

#[test]
fn application_truncate_checkpoints_complete_while_offsite_runs() {
    let _shared = support::gate::shared();
    // offsite holds a read lock; an application's TRUNCATE checkpoint would
    // wait for it (holding the write lock) until its busy timeout. offsite
    // steps aside once everything is shipped, then proves the database still
    // continues the replica instead of starting a new lineage.
    let (_tmp, dir_buf, url, db, log, key, rcpt) = file_fixture();
    let dir = dir_buf.as_path();
    let logs = log.to_str().unwrap();
    workload(&db, &["--count", "10", "--log", logs]);
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    wait_for("snapshot", Duration::from_secs(30), || {
        latest_txid(&url).is_some()
    });
    let t = std::time::Instant::now();
    // Default busy timeout of 30 s per checkpoint: 6 checkpoints would take
    // 3 minutes if offsite did not step aside.
    workload(
        &db,
        &[
            "--count",
            "60",
            "--rate",
            "50",
            "--checkpoint-every",
            "10",
            "--checkpoint-mode",
            "truncate",
            "--checkpoint-must-complete",
            "--log",
            logs,
        ],
    );
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "checkpoints waited for offsite: {:?}",
        t.elapsed()
    );
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    let l = list_json(&url);
    assert_eq!(
        l["lineages"].as_array().unwrap().len(),
        1,
        "no new lineage expected: {l}\n{out}"
    );
    assert!(out.contains("provably continues"), "{out}");
    check_replica(&url, dir, &key, 70, &log);
}

#[test]
fn kill9_restart_resumes_without_gap_or_duplicate() {
    let _shared = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let all = targets(tmp.path());
    for target in all
        .iter()
        .filter(|t| t.name == "file" || t.name == "garage")
    {
        let dir = tmp.path().join(&target.name);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("app.db");
        let log = dir.join("commits.log");
        let logs = log.to_str().unwrap();
        let (key, rcpt) = keygen(&dir);
        workload(&db, &["--count", "3", "--log", logs]);
        let spool = dir.join("spool");
        let args = [
            "--age-recipient",
            rcpt.as_str(),
            "--spool-dir",
            spool.to_str().unwrap(),
        ];
        // The writer never checkpoints, so after each kill the WAL still
        // proves where the replica stopped: offsite must resume, not re-snapshot.
        let mut writer = workload_cmd(&db)
            .args([
                "--count",
                "400",
                "--rate",
                "150",
                "--no-autocheckpoint",
                "--log",
                logs,
            ])
            .spawn()
            .unwrap();
        for round in 0..3 {
            let shipped = latest_txid(&target.url);
            let s = Shipper::start(&db, &target.url, &args);
            // Killed while it is shipping (the writer goes on meanwhile):
            // once it has uploaded its first snapshot, or resumed after a
            // kill, and shipped commits of this round.
            wait_for(
                &format!("{}: round {round}: shipping", target.name),
                Duration::from_secs(60),
                || {
                    let started = round == 0 || s.log_text().contains("resuming replication");
                    started
                        && (latest_txid(&target.url) > shipped
                            || writer.try_wait().unwrap().is_some())
                },
            );
            let out = s.kill9();
            if round > 0 {
                assert!(
                    out.contains("resuming replication"),
                    "round {round}: did not resume:\n{out}"
                );
            }
        }
        // Restarted while the writer still runs (its connection's close
        // checkpoints the WAL unless a shipper holds its read lock then).
        let s = Shipper::start(&db, &target.url, &args);
        assert!(wait_timeout(&mut writer, Duration::from_secs(60)).success());
        let caught_up =
            || s.log_text().contains("resuming replication") && latest_txid(&target.url).is_some();
        let end = std::time::Instant::now() + Duration::from_secs(90);
        while !caught_up() {
            assert!(
                std::time::Instant::now() < end,
                "{}: shipper did not catch up:\n{}",
                target.name,
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (st, out) = s.stop();
        assert!(st.success(), "{out}");
        // Spool directories of the killed processes were swept, ours removed.
        let left: Vec<_> = std::fs::read_dir(&spool)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "spool not cleaned: {left:?}");
        let l = list_json(&target.url);
        assert_eq!(
            l["lineages"].as_array().unwrap().len(),
            1,
            "kill -9 must not break the lineage: {l}"
        );
        check_replica(&target.url, &dir, &key, 403, &log);
    }
}

#[test]
fn wal_reset_while_offsite_is_down_starts_a_new_lineage() {
    let _shared = support::gate::shared();
    let (_tmp, dir_buf, url, db, log, key, rcpt) = file_fixture();
    let dir = dir_buf.as_path();
    let logs = log.to_str().unwrap();
    workload(&db, &["--count", "20", "--log", logs]);
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    workload(&db, &["--count", "30", "--rate", "200", "--log", logs]);
    let (st, _) = s.stop();
    assert!(st.success());
    let before = latest_txid(&url).unwrap();
    // While offsite is down the application checkpoints and resets the WAL.
    workload(
        &db,
        &[
            "--count",
            "15",
            "--checkpoint-every",
            "5",
            "--checkpoint-mode",
            "truncate",
            "--log",
            logs,
        ],
    );
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    workload(&db, &["--count", "10", "--rate", "100", "--log", logs]);
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    assert!(out.contains("starting a new lineage"), "{out}");
    let l = list_json(&url);
    let lineages = l["lineages"].as_array().unwrap();
    assert_eq!(lineages.len(), 2, "{l}");
    // The new lineage continues the txids of the old one.
    assert_eq!(
        lineages[1]["earliest"]["txid"].as_u64(),
        Some(before + 1),
        "{l}"
    );
    // The old lineage is still restorable, and the new one holds everything.
    let out = dir.join("old.db");
    let r = restore(
        &url,
        &out,
        &[
            "--txid",
            &before.to_string(),
            "--age-identity",
            key.to_str().unwrap(),
        ],
    );
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(verify(&out), 50);
    check_replica(&url, dir, &key, 75, &log);
}

#[test]
fn database_replaced_while_running_starts_a_new_lineage() {
    let _shared = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    workload(&db, &["--count", "10"]);
    let s = Shipper::start(&db, &url, &["--no-encryption"]);
    wait_for("first snapshot", Duration::from_secs(30), || {
        latest_txid(&url).is_some()
    });
    // Build a different database and move it over the original.
    let other = dir.join("other.db");
    workload(&other, &["--count", "42"]);
    {
        let c = rusqlite::Connection::open(&other).unwrap();
        let _: i64 = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap();
    }
    std::fs::rename(&other, &db).unwrap();
    let _ = std::fs::remove_file(dir.join("app.db-wal"));
    let _ = std::fs::remove_file(dir.join("app.db-shm"));
    wait_for("new lineage", Duration::from_secs(30), || {
        s.log_text().contains("the database file was replaced")
    });
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    let out_db = dir.join("restored.db");
    let r = restore(&url, &out_db, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(verify(&out_db), 42);
}

#[test]
fn replicate_from_config_file_with_env_expansion() {
    let _shared = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (key, rcpt) = keygen(dir);
    let a = dir.join("a.db");
    let b = dir.join("b.db");
    workload(&a, &["--count", "7"]);
    workload(&b, &["--count", "9"]);
    let cfg = dir.join("offsite.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"sync-interval = "200ms"
[[database]]
path = "{a}"
[[database.replica]]
url = "file://${{OFFSITE_TEST_DIR}}/ra"
age-recipients = ["${{OFFSITE_TEST_RCPT}}"]
age-identity-files = ["{key}"]

[[database]]
path = "{b}"
[[database.replica]]
url = "file://${{OFFSITE_TEST_DIR}}/rb"
age-recipients = ["{rcpt}"]
"#,
            a = a.display(),
            b = b.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    let mut child = offsite()
        .args(["replicate", "--config"])
        .arg(&cfg)
        .env("OFFSITE_TEST_DIR", dir)
        .env("OFFSITE_TEST_RCPT", &rcpt)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    workload(&a, &["--count", "5", "--rate", "50"]);
    workload(&b, &["--count", "5", "--rate", "50"]);
    std::thread::sleep(Duration::from_millis(500));
    sigterm(&child);
    assert!(wait_timeout(&mut child, Duration::from_secs(30)).success());
    // Encryption configured in the file really is applied (Litestream #790:
    // encryption silently dropped while the config still parsed it).
    for r in ["ra", "rb"] {
        // Every object (the lease beside them holds no data).
        let mut stack = vec![dir.join(r).join("lineages")];
        let mut n = 0;
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
            } else {
                assert_eq!(
                    std::fs::read(&p).unwrap()[11],
                    1,
                    "{} is not encrypted",
                    p.display()
                );
                n += 1;
            }
        }
        assert!(n >= 2, "{r}: {n} objects");
    }
    // restore --config DB_PATH takes URL and identity from the config file.
    let out = offsite()
        .args(["restore", "--config"])
        .arg(&cfg)
        .arg(&a)
        .arg("-o")
        .arg(dir.join("ra.db"))
        .env("OFFSITE_TEST_DIR", dir)
        .env("OFFSITE_TEST_RCPT", &rcpt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(verify(&dir.join("ra.db")), 12);
    let r = restore(
        &format!("file://{}/rb", dir.display()),
        &dir.join("rb.db"),
        &["--age-identity", key.to_str().unwrap()],
    );
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(verify(&dir.join("rb.db")), 14);
}

#[test]
fn idle_database_uploads_nothing() {
    let _shared = support::gate::shared();
    // No commits, no objects: an idle database costs no PUT (and the loop
    // never lists the bucket: it reads only the local WAL).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    workload(&db, &["--count", "5"]);
    let s = Shipper::start(&db, &url, &["--no-encryption"]);
    wait_for("snapshot", Duration::from_secs(30), || {
        latest_txid(&url).is_some()
    });
    workload(&db, &["--count", "3"]);
    wait_for("3 commits shipped", Duration::from_secs(30), || {
        latest_txid(&url) == Some(4)
    });
    let count = || {
        let l = list_json(&url);
        l["lineages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                l["snapshot_objects"].as_u64().unwrap() + l["level0_segments"].as_u64().unwrap()
            })
            .sum::<u64>()
    };
    // Restore points (snapshots, level-0 segments). A compaction window that
    // ends after the last commit is still written once (at its end, or at
    // shutdown): a compacted copy of commits already shipped, no new point.
    let before = count();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        count(),
        before,
        "objects were uploaded while the database was idle"
    );
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    assert_eq!(
        count(),
        before,
        "shutdown of an idle database uploaded something"
    );
}

#[test]
fn replicating_a_restored_database_continues_the_replica() {
    let _shared = support::gate::shared();
    // Litestream #781: after a restore the shipper must keep backing up,
    // continuing the txids, not silently stop.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let (key, rcpt) = keygen(dir);
    let id = key.to_str().unwrap();
    let db = dir.join("app.db");
    workload(&db, &["--count", "20"]);
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    workload(&db, &["--count", "10", "--rate", "100"]);
    let (st, _) = s.stop();
    assert!(st.success());
    let before = latest_txid(&url).unwrap();
    // The primary is lost; restore it elsewhere and carry on there.
    let db2 = dir.join("restored.db");
    let r = restore(&url, &db2, &["--age-identity", id]);
    assert!(r.ok(), "{}", r.stderr());
    let s = Shipper::start(&db2, &url, &["--age-recipient", &rcpt]);
    wait_for("offsite to start", Duration::from_secs(30), || {
        s.log_text().contains("resuming replication")
    });
    workload(&db2, &["--count", "7", "--rate", "100"]);
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    // The restored file is exactly the replica's newest state: offsite
    // recognises it (state tag) and continues the same lineage, no snapshot.
    assert!(
        out.contains("the database file is the replica's newest state"),
        "{out}"
    );
    let l = list_json(&url);
    let lineages = l["lineages"].as_array().unwrap();
    assert_eq!(lineages.len(), 1, "{l}");
    assert_eq!(l["latest"]["txid"].as_u64(), Some(before + 7), "{l}");
    let out_db = dir.join("final.db");
    let r = restore(&url, &out_db, &["--age-identity", id]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(verify(&out_db), 37);
}

/// The WAL header's checkpoint sequence number (bytes 12..16, big-endian),
/// which SQLite increments every time it resets the WAL to its start after a
/// checkpoint; `None` without a (whole, valid) header.
fn wal_checkpoint_seq(wal: &Path) -> Option<u32> {
    let b = std::fs::read(wal).ok()?;
    let h = b.get(..32)?;
    let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
    (magic & !1 == 0x377f_0682).then(|| u32::from_be_bytes(h[12..16].try_into().unwrap()))
}

#[test]
fn wal_stays_bounded_under_a_steady_writer() {
    let _alone = support::gate::alone();
    // offsite's read lock stops the application's own checkpoints, so offsite
    // must checkpoint even when the writer never pauses. The mechanism is
    // asserted, not a WAL size (which depends on the machine's speed): the
    // WAL is reset again and again while the writer runs, in its second
    // half as in its first.
    let (_tmp, dir_buf, url, db, log, key, rcpt) = file_fixture();
    let dir = dir_buf.as_path();
    let logs = log.to_str().unwrap();
    workload(&db, &["--count", "5", "--log", logs]);
    let s = Shipper::start(
        &db,
        &url,
        &["--age-recipient", &rcpt, "--checkpoint-frames", "200"],
    );
    // 5 s of writes with no pause, ~7 pages per commit: ~58 MB through the
    // WAL, which would all stay in it without offsite's checkpoints. The rate
    // is one the shipper outpaces on a loaded 2-core machine with a debug
    // build: at 800 commits/s (~14 MB/s) a fresh-clone CI run saw it fall
    // behind (one reset in 5 s, a 117 MB WAL) — a writer that outruns the
    // shipper is issue 13's ("say so before max-wal-size"), not this test's.
    let mut writer = workload_cmd(&db)
        .args([
            "--count",
            "2000",
            "--rate",
            "400",
            "--big-every",
            "1",
            "--big-bytes",
            "18000",
            "--log",
            logs,
        ])
        .spawn()
        .unwrap();
    let wal_path = dir.join("app.db-wal");
    let start = std::time::Instant::now();
    // (time since start, WAL size) at every reset seen.
    let mut resets: Vec<(Duration, u64)> = Vec::new();
    let mut seq = wal_checkpoint_seq(&wal_path);
    let mut max_wal = 0u64;
    let status = loop {
        let done = writer.try_wait().unwrap();
        let size = std::fs::metadata(&wal_path).map(|m| m.len()).unwrap_or(0);
        max_wal = max_wal.max(size);
        let now = wal_checkpoint_seq(&wal_path);
        if now.is_some() && now > seq {
            resets.push((start.elapsed(), size));
            seq = now;
        }
        if let Some(st) = done {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the writer did not finish"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = start.elapsed();
    assert!(status.success(), "the writer failed (blocked by offsite?)");
    eprintln!(
        "writer: {took:?}; WAL resets seen: {}; largest WAL seen: {max_wal} bytes",
        resets.len()
    );
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    assert!(
        resets.len() >= 4,
        "the WAL was reset only {} times while the writer ran for {took:?} \
         (offsite's checkpoints do not keep up):\n{out}",
        resets.len()
    );
    assert!(
        resets.iter().any(|(t, _)| *t > took / 2),
        "no WAL reset in the second half of the writer's run ({took:?}; resets at \
         {resets:?}): offsite stopped checkpointing:\n{out}"
    );
    check_replica(&url, dir, &key, 2005, &log);
}

#[test]
fn a_transaction_larger_than_memory_staging_and_multipart() {
    let _shared = support::gate::shared();
    // One 40 MB transaction (~20 MB compressed): staged through a spool file (8 MiB memory limit),
    // uploaded with multipart to S3 (16 MiB threshold), restored exactly.
    let tmp = tempfile::tempdir().unwrap();
    for target in targets(tmp.path()) {
        let dir = tmp.path().join(&target.name);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("app.db");
        workload(&db, &["--count", "3"]);
        let (key, rcpt) = keygen(&dir);
        let s = Shipper::start(&db, &target.url, &["--age-recipient", &rcpt]);
        wait_for("snapshot", Duration::from_secs(30), || {
            latest_txid(&target.url).is_some()
        });
        workload(
            &db,
            &[
                "--count",
                "2",
                "--big-every",
                "4",
                "--big-bytes",
                "40000000",
            ],
        );
        let (st, out) = s.stop();
        assert!(st.success(), "{}: {out}", target.name);
        assert!(
            out.contains("raw_bytes=4"),
            "{}: expected a ~40 MB segment:\n{out}",
            target.name
        );
        let out_db = dir.join("restored.db");
        let r = restore(
            &target.url,
            &out_db,
            &["--age-identity", key.to_str().unwrap()],
        );
        assert!(r.ok(), "{}: {}", target.name, r.stderr());
        assert_eq!(verify(&out_db), 5);
    }
}

#[test]
fn restart_after_the_application_checkpointed_and_deleted_the_wal_resumes() {
    let _shared = support::gate::shared();
    // A pod restart: offsite stops after shipping everything, the application
    // closes last (SQLite checkpoints and deletes the WAL), the application
    // starts again and writes before offsite is back. The database file is
    // still exactly the replica's newest state, so offsite continues the
    // lineage instead of uploading a new snapshot.
    let (_tmp, dir_buf, url, db, log, key, rcpt) = file_fixture();
    let dir = dir_buf.as_path();
    let logs = log.to_str().unwrap();
    workload(&db, &["--count", "10", "--log", logs]);
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    workload(&db, &["--count", "10", "--rate", "100", "--log", logs]);
    let (st, _) = s.stop();
    assert!(st.success());
    // The application opens and closes: last connection, WAL checkpointed and deleted.
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert!(n > 0);
    }
    assert!(
        !dir.join("app.db-wal").exists(),
        "SQLite should have deleted the WAL"
    );
    // The application is back and writes 5 commits before offsite starts.
    let p = offsite::workload::Params {
        big_every: 0,
        big_bytes: 0,
    };
    let mut app = offsite::workload::open(&db, &p).unwrap();
    for n in 21..=25 {
        offsite::workload::commit(&mut app, &p, n).unwrap();
    }
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    wait_for("offsite to start", Duration::from_secs(30), || {
        let t = s.log_text();
        t.contains("resuming replication") || t.contains("starting a new lineage")
    });
    drop(app);
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    assert!(
        out.contains("the database file is the replica's newest state"),
        "{out}"
    );
    let l = list_json(&url);
    assert_eq!(l["lineages"].as_array().unwrap().len(), 1, "{l}\n{out}");
    let out_db = dir.join("r.db");
    let r = restore(&url, &out_db, &["--age-identity", key.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(verify(&out_db), 25);
}
