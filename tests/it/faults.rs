//! Fault tolerance against a real S3 server (Garage) behind a fault-injecting
//! proxy (tests/it/support/fault_proxy.rs): outages, resets, 5xx, throttling,
//! slow and hung responses, lost responses, multipart uploads that die half
//! way, a full or unwritable spool directory, and SIGKILL loops.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use offsite::layout::{Catalog, Target};
use offsite::restore::{restore, RestoreOptions};
use offsite::storage::{s3::S3Storage, Body, Storage, StorageError};
use support::fault_proxy::{Fault, FaultProxy, Kind, Outcome, S3Error, Scope};
use support::harness::*;

fn garage() -> Option<support::S3Target> {
    support::s3_target("garage")
}

async fn proxied_store(url: &str) -> S3Storage {
    let cfg = match url.parse().unwrap() {
        offsite::storage::ReplicaUrl::S3(c) => c,
        other => panic!("not s3: {other}"),
    };
    S3Storage::new(cfg).await.unwrap()
}

/// The storage layer through the proxy: every fault ends in a retryable
/// `Unavailable` error (not a hang, not a wrong success), and the store
/// works again once the proxy passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_are_retryable_and_bounded() {
    let Some(t) = garage() else { return };
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    let store = proxied_store(&url).await;
    let body = || Body::Bytes(bytes::Bytes::from(vec![7u8; 200_000]));
    store.put("lineages/a", body()).await.unwrap();
    for (name, fault) in [
        ("refuse", Fault::Refuse),
        ("reset", Fault::ResetOnRequest),
        ("500", Fault::Error(S3Error::INTERNAL)),
        ("503", Fault::Error(S3Error::UNAVAILABLE)),
        ("slowdown", Fault::Error(S3Error::SLOW_DOWN)),
        ("reset mid-upload", Fault::ResetAfterBytes(50_000)),
    ] {
        proxy.set(fault);
        let t0 = Instant::now();
        let r = store.put("lineages/b", body()).await;
        let took = t0.elapsed();
        eprintln!("{name}: {took:?} {r:?}");
        assert!(
            matches!(r, Err(StorageError::Unavailable(_))),
            "{name}: {r:?}"
        );
        if !matches!(proxy.fault(), Fault::ResetAfterBytes(_)) {
            // Requests without a body (LIST) fail the same way.
            let l = store.list("lineages/").await;
            assert!(
                matches!(l, Err(StorageError::Unavailable(_))),
                "{name}: {l:?}"
            );
        }
        assert!(took < Duration::from_secs(120), "{name}: took {took:?}");
    }
    // A server that takes the request and never answers: the attempt times
    // out (the SDK has no read timeout of its own) and the retry succeeds.
    proxy.set(Fault::Hang);
    let t0 = Instant::now();
    let put = store.put("lineages/b", body());
    tokio::pin!(put);
    tokio::select! {
        r = &mut put => panic!("a hung request returned: {r:?}"),
        _ = tokio::time::sleep(Duration::from_secs(3)) => {}
    }
    proxy.pass();
    put.await.unwrap();
    let took = t0.elapsed();
    eprintln!("hang, then pass: the put succeeded after {took:?}");
    assert!(took < Duration::from_secs(70), "{took:?}");
    assert_eq!(store.list("lineages/").await.unwrap().len(), 2);
    let recs = proxy.records();
    assert!(recs
        .iter()
        .any(|r| r.kind == Kind::PutObject && r.outcome == Outcome::Injected(503)));
    let _ = Scope::All;
}

// ---------------------------------------------------------------------------
// The real daemon under faults
// ---------------------------------------------------------------------------

/// One line of the writer's log: commit number, start and end (unix µs).
#[derive(Debug, Clone, Copy)]
struct Commit {
    n: u64,
    start_us: i64,
    end_us: i64,
}

fn read_log(p: &Path) -> Vec<Commit> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some(Commit {
                n: it.next()?.parse().ok()?,
                start_us: it.next()?.parse().ok()?,
                end_us: it.next()?.parse().ok()?,
            })
        })
        .collect()
}

fn now_us() -> i64 {
    offsite::clock::system_now_us()
}

/// A steady writer (`offsite-workload --rate`), logging every commit.
struct Writer {
    child: Child,
    log: PathBuf,
    err: PathBuf,
}

impl Writer {
    fn start(db: &Path, rate: u32, count: u64, extra: &[&str]) -> Writer {
        let log = db.with_extension("commits.log");
        let err = db.with_extension("writer.err");
        let child = workload_cmd(db)
            .args(["--rate", &rate.to_string(), "--count", &count.to_string()])
            .arg("--log")
            .arg(&log)
            .args(extra)
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Writer { child, log, err }
    }

    fn last(&self) -> u64 {
        read_log(&self.log).last().map(|c| c.n).unwrap_or(0)
    }

    /// The writer must still be running (it exits on SQLITE_BUSY or any error).
    fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "the writer exited ({st}): {}",
                std::fs::read_to_string(&self.err).unwrap_or_default()
            );
        }
    }

    /// Stop it (it may be killed between two commits; SQLite keeps whole
    /// transactions) and return its log.
    fn stop(mut self) -> Vec<Commit> {
        self.assert_alive();
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        read_log(&self.log)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Commits whose transaction took longest, and the rate, in `[t0, t1)`.
fn writer_stats(log: &[Commit], t0: i64, t1: i64) -> (usize, f64, i64) {
    let w: Vec<&Commit> = log
        .iter()
        .filter(|c| c.end_us >= t0 && c.end_us < t1)
        .collect();
    let max_latency = w.iter().map(|c| c.end_us - c.start_us).max().unwrap_or(0);
    let secs = (t1 - t0) as f64 / 1e6;
    (w.len(), w.len() as f64 / secs, max_latency)
}

fn count_in(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// A shipper process whose stderr goes to a file, optionally wrapped (a
/// private mount namespace) and without the capabilities that let root
/// ignore file permissions.
fn spawn_shipper(db: &Path, url: &str, args: &[&str], wrap: &[String], drop_dac: bool) -> Shipper {
    let log = db.with_extension(format!("shipper-{:08x}.log", rand::random::<u32>()));
    let f = std::fs::File::create(&log).unwrap();
    let exe = env!("CARGO_BIN_EXE_offsite");
    let mut c = if wrap.is_empty() {
        Command::new(exe)
    } else {
        let mut c = Command::new(&wrap[0]);
        c.args(&wrap[1..]).arg(exe);
        c
    };
    c.env("OFFSITE_LOG", "info,offsite=debug")
        .env("OFFSITE_SIGNING_KEY", TEST_SIGNING_KEY)
        .env("OFFSITE_VERIFY_KEY", TEST_VERIFY_KEY)
        .arg("replicate")
        .arg(db)
        .arg(url)
        .args(["--sync-interval", "200ms", "--log-format", "text"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f);
    if drop_dac {
        unsafe {
            c.pre_exec(|| {
                if libc::geteuid() == 0 {
                    // CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: gone after exec.
                    for cap in [1, 2] {
                        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
    }
    Shipper {
        child: c.spawn().unwrap(),
        log,
    }
}

/// Checks against the replica, in-process, straight to the store (not
/// through the proxy).
struct Replica {
    rt: tokio::runtime::Runtime,
    store: offsite::storage::DynStorage,
    ids: Option<offsite::keys::Identities>,
}

impl Replica {
    fn new(url: &str, key: Option<&Path>) -> Replica {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = rt
            .block_on(offsite::storage::open(&url.parse().unwrap()))
            .unwrap();
        let ids = key.map(|k| offsite::keys::Identities::read_files(&[k.to_path_buf()]).unwrap());
        Replica { rt, store, ids }
    }

    fn catalog(&self) -> Catalog {
        self.rt
            .block_on(Catalog::load(self.store.as_ref()))
            .unwrap()
    }

    fn latest_txid(&self) -> Option<u64> {
        self.catalog().max_txid()
    }

    /// Restore `target` into `out`; (txid, writer commit number).
    fn restore(&self, target: Target, out: &Path) -> anyhow::Result<(u64, u64)> {
        let mut o = RestoreOptions::new(target, out.to_path_buf());
        o.identities = self.ids.clone();
        o.trust = test_trust();
        let rep = self.rt.block_on(restore(self.store.as_ref(), o))?;
        let m = offsite::workload::verify(out)?;
        Ok((rep.txid, m))
    }
}

/// After the run: one lineage, every sampled txid restores exactly commit
/// `txid - offset`, the latest restore is the writer's last commit, and
/// `offsite verify` passes. Returns the number of restores checked.
fn check_no_gap(
    r: &Replica,
    url: &str,
    key: &Path,
    offset: i64,
    final_commit: u64,
    must_hold: &[u64],
    dir: &Path,
) -> usize {
    let c = r.catalog();
    assert_eq!(
        c.lineages.len(),
        1,
        "continuity was lost (a new lineage started): {:?}",
        c.lineages.keys().collect::<Vec<_>>()
    );
    let out = dir.join("check.db");
    let (t, m) = r.restore(Target::Latest, &out).unwrap();
    assert_eq!(m, final_commit, "latest restore (txid {t})");
    assert_eq!(t as i64 - offset, m as i64);
    let first = c.lineages.values().next().unwrap().snapshots[0].txid;
    let mut n = 1;
    let mut sample: Vec<u64> = must_hold.to_vec();
    let lo = (first as i64 - offset).max(1) as u64;
    for k in 0..10 {
        sample.push(lo + (final_commit - lo) * k / 10);
    }
    sample.sort_unstable();
    sample.dedup();
    for commit in sample {
        let txid = (commit as i64 + offset) as u64;
        if txid < first {
            continue;
        }
        let (t, m) = r
            .restore(Target::Txid(txid), &out)
            .unwrap_or_else(|e| panic!("restore of commit {commit} (txid {txid}): {e:#}"));
        assert_eq!(
            (t, m),
            (txid, commit),
            "txid {txid} must hold commit {commit}"
        );
        n += 1;
    }
    let o = offsite()
        .args(["verify", url, "--age-identity"])
        .arg(key)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "offsite verify: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    n
}

/// Learn txid = commit + offset from one restore of the latest state.
fn learn_offset(r: &Replica, dir: &Path) -> i64 {
    let (t, m) = r.restore(Target::Latest, &dir.join("offset.db")).unwrap();
    t as i64 - m as i64
}

struct PhaseResult {
    name: &'static str,
    held: Duration,
    writer_commits: usize,
    writer_rate: f64,
    max_commit_latency_ms: i64,
    requests: usize,
    failed_requests: usize,
    upload_errors: usize,
    catch_up: Duration,
    commits_inside: Vec<u64>,
}

/// Hold `fault` for `hold`, then pass again and wait for the replica to
/// hold every commit made until then.
#[allow(clippy::too_many_arguments)]
fn phase(
    name: &'static str,
    proxy: &FaultProxy,
    scope: Scope,
    fault: Fault,
    hold: Duration,
    w: &mut Writer,
    shipper: &Shipper,
    r: &Replica,
    offset: i64,
) -> PhaseResult {
    let errors_before = count_in(&shipper.log_text(), "upload failed");
    let recs_before = proxy.records().len();
    let t0 = now_us();
    let p0 = proxy.now();
    let first = w.last() + 1;
    proxy.set_scoped(scope, fault);
    // The fault's duration is the experiment itself, not a synchronisation.
    std::thread::sleep(hold);
    let last = w.last();
    proxy.pass();
    let p1 = proxy.now();
    let t1 = now_us();
    let pass_at = Instant::now();
    w.assert_alive();
    let want = (last as i64 + offset) as u64;
    wait_for(
        &format!("{name}: the replica to catch up to commit {last}"),
        Duration::from_secs(150),
        || r.latest_txid().is_some_and(|t| t >= want),
    );
    let catch_up = pass_at.elapsed();
    let recs: Vec<_> = proxy.records()[recs_before..].to_vec();
    let in_fault: Vec<_> = recs.iter().filter(|x| x.at >= p0 && x.at < p1).collect();
    let failed = in_fault
        .iter()
        .filter(|x| !matches!(x.outcome, Outcome::Forwarded(s) if s < 400))
        .count();
    let log = read_log(&w.log);
    let (n, rate, lat) = writer_stats(&log, t0, t1);
    let upload_errors = count_in(&shipper.log_text(), "upload failed") - errors_before;
    let mid = (first + last) / 2;
    PhaseResult {
        name,
        held: hold,
        writer_commits: n,
        writer_rate: rate,
        max_commit_latency_ms: lat / 1000,
        requests: in_fault.len(),
        failed_requests: failed,
        upload_errors,
        catch_up,
        commits_inside: vec![first, mid, last],
    }
}

/// Every kind of store failure, one after the other, under a steady writer
/// (25 commits/s): the writer is never blocked, offsite retries with
/// backoff, and the replica catches up with no gap once the store answers.
#[test]
fn store_faults_leave_no_gap_and_never_block_the_writer() {
    let Some(t) = garage() else { return };
    let (_tmp, dir, _, db, _, key, rcpt) = file_fixture();
    workload(&db, &["--count", "5"]);
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    let r = Replica::new(&t.url, Some(&key));
    let mut w = Writer::start(&db, 25, 1_000_000, &[]);
    let shipper = spawn_shipper(&db, &url, &["--age-recipient", &rcpt], &[], false);
    wait_for("the first snapshot", Duration::from_secs(60), || {
        r.latest_txid().is_some()
    });
    let offset = learn_offset(&r, &dir);
    let hold = Duration::from_secs(5);
    let mut results = Vec::new();
    for (name, scope, fault) in [
        ("connection refused", Scope::All, Fault::Refuse),
        ("connection reset", Scope::All, Fault::ResetOnRequest),
        ("HTTP 500", Scope::All, Fault::Error(S3Error::INTERNAL)),
        ("HTTP 503", Scope::All, Fault::Error(S3Error::UNAVAILABLE)),
        ("503 SlowDown", Scope::All, Fault::Error(S3Error::SLOW_DOWN)),
        (
            "reset mid-upload",
            Scope::Writes,
            Fault::ResetAfterBytes(2000),
        ),
        (
            "slow responses (2 s)",
            Scope::All,
            Fault::Delay(Duration::from_secs(2)),
        ),
        ("hung responses", Scope::Writes, Fault::Hang),
    ] {
        let res = phase(
            name, &proxy, scope, fault, hold, &mut w, &shipper, &r, offset,
        );
        eprintln!(
            "{:<22} held {:?}: writer {} commits ({:.1}/s, max commit latency {} ms); {} requests, {} failed; {} upload errors logged; caught up {:.1?} after the store answered again",
            res.name,
            res.held,
            res.writer_commits,
            res.writer_rate,
            res.max_commit_latency_ms,
            res.requests,
            res.failed_requests,
            res.upload_errors,
            res.catch_up
        );
        results.push(res);
    }
    let log = w.stop();
    let (st, out) = shipper.stop();
    assert!(st.success(), "shipper: {out}");
    let final_commit =
        offsite::workload::last_commit(&rusqlite::Connection::open(&db).unwrap()).unwrap();
    assert!(log.last().unwrap().n <= final_commit);
    let must: Vec<u64> = results
        .iter()
        .flat_map(|x| x.commits_inside.clone())
        .collect();
    let n = check_no_gap(&r, &t.url, &key, offset, final_commit, &must, &dir);
    eprintln!("{n} restores exact, final commit {final_commit}");
    for res in &results {
        // The writer never waited on offsite: at least 80% of its rate, and
        // no commit took longer than a second.
        assert!(
            res.writer_rate >= 20.0 && res.max_commit_latency_ms < 1000,
            "{}: the writer was slowed down: {:.1}/s, max latency {} ms",
            res.name,
            res.writer_rate,
            res.max_commit_latency_ms
        );
        if res.name.starts_with("slow") {
            continue;
        }
        // The fault was felt (a hung request times out and the SDK's retry
        // succeeds once the store answers: no error reaches offsite).
        assert!(
            res.failed_requests >= 1 && (res.upload_errors >= 1 || res.name.starts_with("hung")),
            "{}: the fault was not felt",
            res.name
        );
        // At most the SDK's 5 attempts per upload, a few uploads per fault.
        assert!(
            res.requests <= 40,
            "{}: {} requests in {:?}: not backing off",
            res.name,
            res.requests,
            res.held
        );
        assert!(
            res.catch_up < Duration::from_secs(60),
            "{}: catching up took {:?}",
            res.name,
            res.catch_up
        );
    }
    assert!(
        out.contains("retry_in"),
        "the log must say when the next attempt is: {out}"
    );
}

fn wal_size(db: &Path) -> u64 {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// A long outage (the store refuses connections) under 20 commits/s: the
/// writer goes on, the commits wait in the WAL, and once the store is back
/// the replica catches up with no gap. `OFFSITE_OUTAGE_SECS` sets the
/// outage (CI: 20 s; docs/FAULTS.md reports a 120 s run).
#[test]
fn long_outage_without_gap() {
    let Some(t) = garage() else { return };
    let secs: u64 = std::env::var("OFFSITE_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (_tmp, dir, _, db, _, key, rcpt) = file_fixture();
    workload(&db, &["--count", "5"]);
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    let r = Replica::new(&t.url, Some(&key));
    let mut w = Writer::start(&db, 20, 1_000_000, &[]);
    let shipper = spawn_shipper(&db, &url, &["--age-recipient", &rcpt], &[], false);
    wait_for("the first snapshot", Duration::from_secs(60), || {
        r.latest_txid().is_some()
    });
    let offset = learn_offset(&r, &dir);
    let wal_before = wal_size(&db);
    let res = phase(
        "outage",
        &proxy,
        Scope::All,
        Fault::Refuse,
        Duration::from_secs(secs),
        &mut w,
        &shipper,
        &r,
        offset,
    );
    let wal_after = wal_size(&db);
    let log = w.stop();
    let (st, out) = shipper.stop();
    assert!(st.success(), "{out}");
    let final_commit =
        offsite::workload::last_commit(&rusqlite::Connection::open(&db).unwrap()).unwrap();
    let n = check_no_gap(
        &r,
        &t.url,
        &key,
        offset,
        final_commit,
        &res.commits_inside,
        &dir,
    );
    let waits: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("upload failed"))
        .filter_map(|l| l.split("retry_in=").nth(1))
        .collect();
    eprintln!(
        "OUTAGE RESULT: {secs} s outage at 20 commits/s: writer {} commits during it ({:.1}/s, max commit latency {} ms), no gap ({n} exact restores, one lineage); WAL {} KiB before, {} KiB at the end of the outage; upload retries waited {waits:?}; caught up {:.1?} after the store came back",
        res.writer_commits,
        res.writer_rate,
        res.max_commit_latency_ms,
        wal_before / 1024,
        wal_after / 1024,
        res.catch_up
    );
    assert!(res.writer_rate >= 16.0 && res.max_commit_latency_ms < 1000);
    // Retried with exponential backoff, not hammered.
    let secs_of = |w: &str| w.trim().trim_end_matches('s').parse::<f64>().unwrap_or(0.0);
    assert!(waits.len() >= 2, "offsite retried: {waits:?}");
    assert!(
        waits
            .windows(2)
            .all(|p| secs_of(p[1]) > secs_of(p[0]) || secs_of(p[1]) >= 64.0),
        "backoff must grow: {waits:?}"
    );
    assert!(log.len() as u64 >= res.writer_commits as u64);
}

/// offsite checkpoints for the application once the WAL is long; under a
/// steady writer it ships the last commits while holding the write lock
/// (docs/SQLITE.md, "Checkpoints"). With a slow store that upload must not
/// hold the application's writers.
#[test]
fn slow_store_at_checkpoints_does_not_block_the_writer() {
    let Some(t) = garage() else { return };
    let (_tmp, dir, _, db, _, key, rcpt) = file_fixture();
    workload(&db, &["--count", "5"]);
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    let r = Replica::new(&t.url, Some(&key));
    let mut w = Writer::start(&db, 25, 1_000_000, &[]);
    let shipper = spawn_shipper(
        &db,
        &url,
        &["--age-recipient", &rcpt, "--checkpoint-frames", "100"],
        &[],
        false,
    );
    wait_for("the first snapshot", Duration::from_secs(60), || {
        r.latest_txid().is_some()
    });
    let offset = learn_offset(&r, &dir);
    let res = phase(
        "slow uploads (1.5 s) at checkpoints",
        &proxy,
        Scope::Writes,
        Fault::Delay(Duration::from_millis(1500)),
        Duration::from_secs(15),
        &mut w,
        &shipper,
        &r,
        offset,
    );
    let _ = w.stop();
    let (st, out) = shipper.stop();
    assert!(st.success(), "{out}");
    let locked = count_in(&out, "checkpoint under the write lock");
    eprintln!(
        "slow store: writer {:.1}/s, max commit latency {} ms; {locked} checkpoints under the write lock",
        res.writer_rate, res.max_commit_latency_ms
    );
    assert!(
        res.max_commit_latency_ms < 1000,
        "the writer waited {} ms for offsite's checkpoint",
        res.max_commit_latency_ms
    );
}

/// Uploads whose response is lost (the object was stored, the client saw
/// the connection die) for long enough that offsite gives up on the attempt
/// and ships again later, with more commits in the segment. The replica must
/// still restore every commit and verify clean.
#[test]
fn lost_upload_responses_leave_a_restorable_chain() {
    let Some(t) = garage() else { return };
    let (_tmp, dir, _, db, _, key, rcpt) = file_fixture();
    workload(&db, &["--count", "5"]);
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    let r = Replica::new(&t.url, Some(&key));
    let mut w = Writer::start(&db, 25, 1_000_000, &[]);
    let shipper = spawn_shipper(&db, &url, &["--age-recipient", &rcpt], &[], false);
    wait_for("the first snapshot", Duration::from_secs(60), || {
        r.latest_txid().is_some()
    });
    let offset = learn_offset(&r, &dir);
    let res = phase(
        "lost responses",
        &proxy,
        Scope::Only(vec![Kind::PutObject]),
        Fault::DropResponse,
        Duration::from_secs(4),
        &mut w,
        &shipper,
        &r,
        offset,
    );
    let dropped = proxy
        .records()
        .iter()
        .filter(|x| x.outcome == Outcome::ResponseDropped)
        .count();
    eprintln!(
        "{dropped} responses dropped, {} upload errors, caught up after {:?}",
        res.upload_errors, res.catch_up
    );
    assert!(dropped >= 1 && res.upload_errors >= 1);
    let _ = w.stop();
    let (st, out) = shipper.stop();
    assert!(st.success(), "{out}");
    let final_commit =
        offsite::workload::last_commit(&rusqlite::Connection::open(&db).unwrap()).unwrap();
    check_no_gap(
        &r,
        &t.url,
        &key,
        offset,
        final_commit,
        &res.commits_inside,
        &dir,
    );
    // The segment whose response was lost is still there, superseded by the
    // retry (same first txid, more commits): verify checked that both hold
    // the same states and says so.
    let o = offsite()
        .args(["verify", &t.url, "--json", "--age-identity"])
        .arg(&key)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let warnings = v["lineages"][0]["warnings"].to_string();
    assert!(
        warnings.contains("superseded by"),
        "no superseded segment reported: {warnings}"
    );
}

// ---------------------------------------------------------------------------
// Multipart uploads that die half way
// ---------------------------------------------------------------------------

/// A client straight to the server, to see what offsite left there.
async fn raw_client(url: &str) -> (aws_sdk_s3::Client, String, String) {
    let cfg = match url.parse().unwrap() {
        offsite::storage::ReplicaUrl::S3(c) => c,
        other => panic!("not s3: {other}"),
    };
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(
            cfg.region.clone().unwrap_or_else(|| "us-east-1".into()),
        ))
        .load()
        .await;
    let mut b = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true);
    if let Some(e) = &cfg.endpoint {
        b = b.endpoint_url(e);
    }
    (
        aws_sdk_s3::Client::from_conf(b.build()),
        cfg.bucket.clone(),
        format!("{}/", cfg.prefix),
    )
}

/// Multipart uploads in progress under `prefix`.
async fn uploads(c: &(aws_sdk_s3::Client, String, String)) -> Vec<String> {
    let out =
        c.0.list_multipart_uploads()
            .bucket(&c.1)
            .prefix(&c.2)
            .send()
            .await
            .unwrap();
    out.uploads()
        .iter()
        .map(|u| u.key().unwrap_or("").to_string())
        .collect()
}

fn random_file(dir: &Path, len: usize) -> PathBuf {
    let p = dir.join(format!("body-{:08x}", rand::random::<u32>()));
    let mut v = vec![0u8; len];
    let mut x = rand::random::<u64>() | 1;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&p, v).unwrap();
    p
}

/// The store goes away after the first part of a multipart upload: the
/// upload fails (retryable), even its abort cannot reach the store, so the
/// upload is left on the server. Once the store answers again, the next put
/// aborts it first: nothing stays behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_upload_cut_half_way_is_aborted_later() {
    let Some(t) = garage() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    let store = proxied_store(&url).await.with_multipart(5 << 20, 5 << 20);
    let raw = raw_client(&t.url).await;
    let big = random_file(tmp.path(), 17 << 20);
    proxy.set(Fault::CutMultipartAfter(1));
    let r = store.put("lineages/l/big", Body::File(big.clone())).await;
    assert!(matches!(r, Err(StorageError::Unavailable(_))), "{r:?}");
    assert_eq!(proxy.fault(), Fault::Refuse, "the cut fired");
    let left = uploads(&raw).await;
    assert_eq!(left.len(), 1, "the dead store kept the upload: {left:?}");
    proxy.pass();
    store
        .put(
            "lineages/l/small",
            Body::Bytes(bytes::Bytes::from_static(b"x")),
        )
        .await
        .unwrap();
    assert!(
        uploads(&raw).await.is_empty(),
        "the abandoned upload was aborted before the next put"
    );
    assert!(proxy
        .records()
        .iter()
        .any(|r| r.kind == Kind::AbortMultipart && r.outcome == Outcome::Forwarded(204)));
    // The whole object goes up once the store is back.
    store
        .put("lineages/l/big", Body::File(big.clone()))
        .await
        .unwrap();
    assert_eq!(
        store.get("lineages/l/big").await.unwrap().len(),
        std::fs::metadata(&big).unwrap().len() as usize
    );
    assert!(uploads(&raw).await.is_empty());
}

/// `kill -9` in the middle of a multipart upload (a snapshot of a 45 MB
/// database) leaves the upload on the server; `abort_abandoned_uploads`
/// (for the shipper's start-up) removes it, and the restarted shipper
/// completes the replica.
#[test]
fn multipart_upload_of_a_killed_shipper_is_cleaned_up() {
    let Some(t) = garage() else { return };
    let (_tmp, dir, _, db, _, key, rcpt) = file_fixture();
    workload(
        &db,
        &[
            "--count",
            "3",
            "--big-every",
            "1",
            "--big-bytes",
            "15000000",
        ],
    );
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    // Parts take a while, so the kill lands inside the upload.
    proxy.set_scoped(
        Scope::Only(vec![Kind::UploadPart]),
        Fault::Delay(Duration::from_secs(3)),
    );
    let s = spawn_shipper(&db, &url, &["--age-recipient", &rcpt], &[], false);
    wait_for(
        "a multipart upload to start",
        Duration::from_secs(60),
        || {
            proxy
                .records()
                .iter()
                .any(|r| r.kind == Kind::CreateMultipart)
        },
    );
    s.kill9();
    proxy.pass();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let raw = rt.block_on(raw_client(&t.url));
    let left = rt.block_on(uploads(&raw));
    assert!(!left.is_empty(), "the killed upload is still on the server");
    let store = rt.block_on(S3Storage::new(t.s3_config())).unwrap();
    let n = rt.block_on(store.abort_abandoned_uploads()).unwrap();
    assert_eq!(n, left.len());
    assert!(rt.block_on(uploads(&raw)).is_empty());
    // A fresh start ships the whole database.
    let s = spawn_shipper(&db, &t.url, &["--age-recipient", &rcpt], &[], false);
    let r = Replica::new(&t.url, Some(&key));
    wait_for("the snapshot", Duration::from_secs(120), || {
        r.latest_txid().is_some()
    });
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    let (_, m) = r.restore(Target::Latest, &dir.join("big.db")).unwrap();
    assert_eq!(m, 3);
    assert!(rt.block_on(uploads(&raw)).is_empty());
}

// ---------------------------------------------------------------------------
// Local disk trouble: the spool directory
// ---------------------------------------------------------------------------

/// The spool directory cannot be created or written at start-up: one clear
/// line, exit 1, nothing shipped.
#[test]
fn unwritable_spool_dir_at_start_is_a_clear_error() {
    let (_tmp, dir, url, db, _, _, rcpt) = file_fixture();
    workload(&db, &["--count", "3"]);
    let spool = dir.join("ro-spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o555)).unwrap();
    let spool_s = spool.to_str().unwrap().to_string();
    let mut s = spawn_shipper(
        &db,
        &url,
        &["--age-recipient", &rcpt, "--spool-dir", &spool_s],
        &[],
        true,
    );
    let st = wait_timeout(&mut s.child, Duration::from_secs(30));
    let out = s.log_text();
    assert_eq!(st.code(), Some(1), "{out}");
    let line = last_line(&out);
    assert!(
        line.starts_with("offsite: error:")
            && line.contains(&spool_s)
            && line.contains("ermission denied"),
        "{line}"
    );
    assert!(!dir.join("replica").join("lineages").exists());
}

enum SpoolTrouble {
    /// The per-run spool directory turns read-only.
    ReadOnly,
    /// The spool is a small tmpfs (private mount namespace) that fills up.
    Full,
}

/// The per-run spool directory of `pid` in `base` (seen through `root`).
fn run_spool(root: &Path, base: &Path, pid: u32) -> PathBuf {
    let dir = root.join(base.strip_prefix("/").unwrap());
    let want = format!("offsite-spool-{pid}-");
    let mut found = None;
    wait_for(
        "the per-run spool directory",
        Duration::from_secs(10),
        || {
            found = std::fs::read_dir(&dir).ok().and_then(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&want))
            });
            found.is_some()
        },
    );
    found.unwrap()
}

fn free_bytes(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

/// The spool directory becomes unwritable or full while offsite runs and a
/// 20 MB transaction needs a spool file: a clear error naming the cause,
/// retried with backoff; the writer goes on; once the directory works again
/// the replica catches up with no gap.
fn spool_trouble(kind: SpoolTrouble) {
    let Some(t) = garage() else { return };
    let (_tmp, dir, _, db, _, key, rcpt) = file_fixture();
    workload(&db, &["--count", "5"]);
    let base = dir.join("spool");
    std::fs::create_dir(&base).unwrap();
    let base_s = base.to_str().unwrap().to_string();
    let wrap: Vec<String> = match kind {
        SpoolTrouble::ReadOnly => vec![],
        SpoolTrouble::Full => vec![
            "unshare".into(),
            "-m".into(),
            "sh".into(),
            "-c".into(),
            "mount -t tmpfs -o size=40m offsite-test-spool \"$0\" && exec \"$@\"".into(),
            base_s.clone(),
        ],
    };
    let s = spawn_shipper(
        &db,
        &t.url,
        &["--age-recipient", &rcpt, "--spool-dir", &base_s],
        &wrap,
        matches!(kind, SpoolTrouble::ReadOnly),
    );
    let r = Replica::new(&t.url, Some(&key));
    wait_for("the first snapshot", Duration::from_secs(60), || {
        r.latest_txid().is_some()
    });
    let offset = learn_offset(&r, &dir);
    let pid = s.child.id();
    let root = match kind {
        SpoolTrouble::ReadOnly => PathBuf::from("/"),
        // The tmpfs exists only in the shipper's mount namespace.
        SpoolTrouble::Full => PathBuf::from(format!("/proc/{pid}/root")),
    };
    let spool = run_spool(&root, &base, pid);
    let filler = spool.with_file_name("filler");
    let (needle, undo): (&str, Box<dyn Fn()>) = match kind {
        SpoolTrouble::ReadOnly => {
            std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o555)).unwrap();
            let sp = spool.clone();
            (
                "Permission denied",
                Box::new(move || {
                    std::fs::set_permissions(&sp, std::fs::Permissions::from_mode(0o755)).unwrap()
                }),
            )
        }
        SpoolTrouble::Full => {
            let free = free_bytes(&spool);
            assert!(
                free < 41 << 20,
                "the spool is not the small tmpfs ({free} bytes free)"
            );
            let f = std::fs::File::create(&filler).unwrap();
            f.set_len(0).unwrap();
            // Fill all but 256 KiB with real pages (a sparse file would not count).
            let mut w = std::io::BufWriter::new(f);
            let chunk = vec![1u8; 1 << 20];
            let mut left = free.saturating_sub(256 << 10);
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                std::io::Write::write_all(&mut w, &chunk[..n]).unwrap();
                left -= n as u64;
            }
            std::io::Write::flush(&mut w).unwrap();
            let fl = filler.clone();
            (
                "No space left on device",
                Box::new(move || std::fs::remove_file(&fl).unwrap()),
            )
        }
    };
    // Rows 100, 200, … are 20 MB: their segment needs a spool file.
    let mut w = Writer::start(
        &db,
        20,
        1_000_000,
        &["--big-every", "100", "--big-bytes", "20000000"],
    );
    wait_for("the spool error", Duration::from_secs(60), || {
        s.log_text().contains(needle)
    });
    let t_err = now_us();
    // Keep it broken a little longer: offsite retries, the writer goes on.
    let before = count_in(&s.log_text(), "upload failed");
    wait_for("a retry", Duration::from_secs(30), || {
        count_in(&s.log_text(), "upload failed") > before
    });
    w.assert_alive();
    undo();
    let t_fix = now_us();
    let last = w.last();
    let want = (last as i64 + offset) as u64;
    wait_for(
        "catch-up after the spool works again",
        Duration::from_secs(120),
        || r.latest_txid().is_some_and(|t| t >= want),
    );
    let log = w.stop();
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("upload failed") && l.contains(needle))
        .unwrap_or_else(|| panic!("no upload error naming {needle:?}: {out}"));
    eprintln!("spool error as logged: {line}");
    let (n, rate, lat) = writer_stats(&log, t_err, t_fix);
    eprintln!(
        "while broken: writer {n} commits ({rate:.1}/s), max commit latency {} ms",
        lat / 1000
    );
    assert!(lat < 1_000_000, "the writer was blocked {lat} µs");
    let final_commit =
        offsite::workload::last_commit(&rusqlite::Connection::open(&db).unwrap()).unwrap();
    let big: Vec<u64> = (100..=final_commit).step_by(100).collect();
    check_no_gap(&r, &t.url, &key, offset, final_commit, &big, &dir);
    if matches!(kind, SpoolTrouble::Full) {
        assert!(!filler.exists());
    }
}

#[test]
fn spool_dir_turns_read_only() {
    spool_trouble(SpoolTrouble::ReadOnly);
}

#[test]
fn spool_dir_fills_up() {
    // A private mount namespace needs root (or user namespaces).
    let ok = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`unshare -m` is not permitted here: this test mounts a small tmpfs in a private mount namespace"
    );
    spool_trouble(SpoolTrouble::Full);
}

// ---------------------------------------------------------------------------
// Crash loop: SIGKILL at random moments
// ---------------------------------------------------------------------------

/// What a soak run found.
#[derive(Debug, Default)]
pub struct SoakReport {
    cycles: usize,
    lineages: usize,
    restores: usize,
    mismatches: Vec<String>,
    final_commit: u64,
    commits_individually_restorable: u64,
    killed_in: std::collections::BTreeMap<&'static str, usize>,
}

/// What the shipper was doing when it was killed, from its last log line.
fn doing(log: &str) -> &'static str {
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains(" offsite"))
        .unwrap_or("");
    if last.contains("starting a new lineage") || last.contains("snapshot") {
        "snapshot"
    } else if last.contains("checkpoint") || last.contains("application's checkpoint") {
        "checkpoint"
    } else if last.contains("segment uploaded") || last.contains("compacted") {
        "shipping"
    } else if last.contains("resuming") || last.contains("listing") {
        "start-up"
    } else {
        "other"
    }
}

/// SIGKILL offsite at random moments for `cycles` cycles under a steady
/// writer, then restore sampled txids of every lineage (the commits around
/// every kill among them) and compare each with what the writer committed.
///
/// offsite runs 0.2–3 s per cycle and is down 0–0.5 s between cycles; it
/// checkpoints every 200 frames and compacts in 2 s and 10 s windows. The
/// writer commits 50 times a second (every 199th commit 1 MB) and runs a
/// TRUNCATE checkpoint every 400 commits (offsite steps aside for it when
/// running; when not, the WAL restarts and the next start needs a new lineage).
fn soak(url: &str, cycles: usize, seed: u64) -> SoakReport {
    let (_tmp, dir, _, db, _, key, rcpt) = file_fixture();
    workload(&db, &["--count", "5"]);
    let r = Replica::new(url, Some(&key));
    let mut w = Writer::start(
        &db,
        50,
        10_000_000,
        &[
            "--big-every",
            "199",
            "--big-bytes",
            "1000000",
            "--checkpoint-every",
            "400",
            "--checkpoint-mode",
            "truncate",
            "--checkpoint-busy-ms",
            "300",
        ],
    );
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let args = [
        "--age-recipient",
        rcpt.as_str(),
        "--checkpoint-frames",
        "200",
        "--compaction-levels",
        "2s,10s",
    ];
    let mut rep = SoakReport {
        cycles,
        ..Default::default()
    };
    let mut kills: Vec<u64> = Vec::new();
    for c in 0..cycles {
        let s = spawn_shipper(&db, url, &args, &[], false);
        std::thread::sleep(Duration::from_millis(200 + next() % 2800));
        let log = s.kill9();
        kills.push(w.last());
        *rep.killed_in.entry(doing(&log)).or_default() += 1;
        w.assert_alive();
        if log.contains("panicked") {
            rep.mismatches
                .push(format!("cycle {c}: offsite panicked: {log}"));
        }
        if c % 10 == 9 {
            eprintln!("soak: {} cycles, writer at commit {}", c + 1, w.last());
        }
        std::thread::sleep(Duration::from_millis(next() % 500));
    }
    // A last, clean run ships everything the writer committed.
    let log = w.stop();
    let final_commit =
        offsite::workload::last_commit(&rusqlite::Connection::open(&db).unwrap()).unwrap();
    rep.final_commit = final_commit;
    let s = spawn_shipper(&db, url, &args, &[], false);
    let out = dir.join("soak.db");
    wait_for("the final state shipped", Duration::from_secs(300), || {
        r.restore(Target::Latest, &out)
            .is_ok_and(|(_, m)| m == final_commit)
    });
    let (st, slog) = s.stop();
    if !st.success() {
        rep.mismatches
            .push(format!("final shipper exit {st}: {slog}"));
    }
    // Every lineage: its first snapshot, its head, the commits around every
    // kill, random txids and their successors. Each must be an exact
    // committed state, and inside a lineage txid `lo + k` must hold the
    // snapshot's commit plus k (one txid per commit, no gap).
    let c = r.catalog();
    rep.lineages = c.lineages.len();
    let mut by_txid: std::collections::BTreeMap<u64, u64> = Default::default();
    for l in c.lineages.values() {
        let lo = l.snapshots[0].txid;
        let hi = l.max_txid().unwrap();
        let f = match r.restore(Target::Txid(lo), &out) {
            Ok((_, m)) => m,
            Err(e) => {
                rep.mismatches.push(format!(
                    "lineage {}: its snapshot does not restore: {e:#}",
                    l.id
                ));
                continue;
            }
        };
        rep.restores += 1;
        by_txid.insert(lo, f);
        rep.commits_individually_restorable += hi - lo;
        let mut ts = vec![hi, lo + 1, hi.saturating_sub(1)];
        for _ in 0..3 {
            let t = lo + next() % (hi - lo + 1);
            ts.extend([t, t + 1]);
        }
        for &k in &kills {
            if k >= f && k - f <= hi - lo {
                let t = lo + (k - f);
                ts.extend([t.saturating_sub(1), t, t + 1]);
            }
        }
        ts.retain(|t| (lo + 1..=hi).contains(t));
        ts.sort_unstable();
        ts.dedup();
        for t in ts {
            match r.restore(Target::Txid(t), &out) {
                Ok((got, m)) if got == t => {
                    rep.restores += 1;
                    by_txid.insert(t, m);
                    if m != f + (t - lo) {
                        rep.mismatches.push(format!(
                            "lineage {}: txid {t} holds commit {m}, expected {} (snapshot txid {lo} = commit {f})",
                            l.id,
                            f + (t - lo)
                        ));
                    }
                }
                Ok((got, _)) => rep
                    .mismatches
                    .push(format!("restore --txid {t} stopped at txid {got}")),
                Err(e) => rep
                    .mismatches
                    .push(format!("restore --txid {t} failed: {e:#}")),
            }
        }
    }
    let v: Vec<(&u64, &u64)> = by_txid.iter().collect();
    for p in v.windows(2) {
        if p[1].1 < p[0].1 {
            rep.mismatches.push(format!(
                "txid {} holds commit {} but the earlier txid {} holds commit {}",
                p[1].0, p[1].1, p[0].0, p[0].1
            ));
        }
    }
    // Times: a restore at a lineage head's time never holds a commit the
    // writer had not begun by then.
    for l in c.lineages.values() {
        let Some(h) = l.head() else { continue };
        let t = h.last_time_us();
        match r.restore(Target::Time(t), &out) {
            Ok((_, m)) => {
                rep.restores += 1;
                let made = log.iter().filter(|x| x.start_us <= t).map(|x| x.n).max();
                if made.is_some_and(|made| m > made) {
                    rep.mismatches.push(format!(
                        "restore at {t} holds commit {m}, the writer had only begun {made:?}"
                    ));
                }
            }
            Err(e) => rep
                .mismatches
                .push(format!("restore --timestamp {t}: {e:#}")),
        }
    }
    let o = offsite()
        .args(["verify", url, "--age-identity"])
        .arg(&key)
        .output()
        .unwrap();
    if !o.status.success() {
        rep.mismatches.push(format!(
            "offsite verify: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    rep
}

/// The CI-sized crash loop (`scripts/soak-crash.sh` runs 100 cycles).
/// `OFFSITE_SOAK_CYCLES`, `OFFSITE_SOAK_SEED` and `OFFSITE_SOAK_URL`
/// (default: Garage) change it.
#[test]
fn soak_kill9_cycles() {
    let cycles: usize = std::env::var("OFFSITE_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("OFFSITE_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    let url = match std::env::var("OFFSITE_SOAK_URL") {
        Ok(u) if !u.is_empty() => {
            // A fresh prefix (or subdirectory) per run.
            let (loc, q) = u.split_once('?').unwrap_or((u.as_str(), ""));
            let loc = format!("{}/{}", loc.trim_end_matches('/'), support::unique_prefix());
            if q.is_empty() {
                loc
            } else {
                format!("{loc}?{q}")
            }
        }
        _ => match garage() {
            Some(t) => t.url,
            None => return,
        },
    };
    let t0 = Instant::now();
    let rep = soak(&url, cycles, seed);
    eprintln!(
        "SOAK RESULT: seed {seed}, {} kill -9 cycles in {:.0?} (killed during {:?}), {} lineages, final commit {}, {} commits individually restorable, {} restores checked, {} mismatches",
        rep.cycles,
        t0.elapsed(),
        rep.killed_in,
        rep.lineages,
        rep.final_commit,
        rep.commits_individually_restorable,
        rep.restores,
        rep.mismatches.len()
    );
    assert!(
        rep.mismatches.is_empty(),
        "seed {seed}: {}",
        rep.mismatches.join("\n")
    );
    assert!(rep.restores >= cycles.min(rep.lineages * 4));
}
