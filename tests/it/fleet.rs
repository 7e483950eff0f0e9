//! Fleet scale and past one host: replicas sharing one S3 client while each
//! counts its own requests, idle databases polled less often without losing
//! a commit, and a 3-node Garage cluster (replication factor 3) losing a node
//! while offsite ships and restores.

use crate::support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use offsite::storage::{s3::S3Storage, Body, S3Clients, Storage};
use sha2::{Digest, Sha256};
use support::harness::{
    keygen, latest_txid, list_json, offsite, restore, sigterm, wait_for, wait_shipped,
    wait_timeout, workload, Shipper,
};

// ---------------------------------------------------------------------------
// One client per endpoint, requests counted per replica
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_client_per_endpoint_and_count_their_own_requests() {
    let targets = support::s3_targets();
    let Some(garage) = targets.iter().find(|t| t.name == "garage") else {
        return;
    };
    let clients = S3Clients::default();
    // Each call: a fresh prefix on that server.
    let cfg = |name: &str| {
        support::s3_targets()
            .into_iter()
            .find(|o| o.name == name)
            .unwrap()
            .s3_config()
    };
    // Two replicas on one endpoint, one on another.
    let a = S3Storage::shared(cfg(&garage.name), &clients)
        .await
        .unwrap();
    let b = S3Storage::shared(cfg(&garage.name), &clients)
        .await
        .unwrap();
    assert_ne!(a.config().prefix, b.config().prefix);
    assert!(a.shares_client_with(&b));
    assert_eq!(clients.len().await, 1);
    if let Some(other) = targets.iter().find(|t| t.name != "garage") {
        let c = S3Storage::shared(cfg(&other.name), &clients).await.unwrap();
        assert!(!c.shares_client_with(&a));
        assert_eq!(clients.len().await, 2);
    }

    for i in 0..3 {
        a.put(&format!("x/{i}"), Body::Bytes(vec![i as u8; 10].into()))
            .await
            .unwrap();
    }
    b.put("y", Body::Bytes(b"hello"[..].into())).await.unwrap();
    assert_eq!(&b.get("y").await.unwrap()[..], b"hello");
    assert_eq!(a.list("x/").await.unwrap().len(), 3);
    assert!(b.list("x/").await.unwrap().is_empty(), "prefixes are apart");
    let (ca, cb) = (a.request_counts(), b.request_counts());
    assert_eq!((ca.put, ca.get, ca.list), (3, 0, 1), "{ca:?}");
    assert_eq!((cb.put, cb.get, cb.list), (1, 1, 1), "{cb:?}");
    assert_eq!(ca.total(), 4, "{ca:?}");
    assert_eq!(cb.total(), 3, "{cb:?}");
}

// ---------------------------------------------------------------------------
// Idle databases
// ---------------------------------------------------------------------------

/// A daemon killed when the test ends, passed or not.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn scrape(addr: &str) -> Option<String> {
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    Some(s.split_once("\r\n\r\n")?.1.to_string())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_commit_after_a_long_idle_is_shipped_and_idle_polls_back_off() {
    let _shared = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("app.db");
    let url = format!("file://{}", dir.join("replica").display());
    let (key, rcpt) = keygen(dir);
    workload(&db, &["--count", "5"]);
    let addr = free_addr();
    let log = dir.join("shipper.log");
    let mut s = Daemon(
        offsite()
            .arg("replicate")
            .arg(&db)
            .arg(&url)
            .args(["--age-recipient", &rcpt, "--listen", &addr])
            // The default: the interval idle polls back off to.
            .args(["--sync-interval", "1s", "--log-format", "text"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let shipped = wait_shipped(&url, None, Duration::from_secs(60));
    let polls = || metric(&scrape(&addr).unwrap_or_default(), "offsite_polls_total");
    wait_for("metrics", Duration::from_secs(30), || polls().is_some());

    // Idle: polled every 100 ms this would be 60 looks; backing off to the
    // 1 s sync interval, about 10. (A slow machine only makes fewer.)
    let p0 = polls().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let idle_polls = polls().unwrap() - p0;
    assert!(
        idle_polls < 30.0,
        "{idle_polls} polls in 6 idle seconds: no backoff"
    );
    assert!(idle_polls >= 1.0, "the replicator stopped looking");

    // The first commit after the quiet spell is still found and shipped.
    let t = Instant::now();
    workload(&db, &["--count", "1"]);
    let after = wait_shipped(&url, Some(shipped), Duration::from_secs(30));
    eprintln!(
        "{idle_polls} polls in 6 idle seconds; the next commit was in the replica after {:?}",
        t.elapsed()
    );
    sigterm(&s.0);
    let st = wait_timeout(&mut s.0, Duration::from_secs(90));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{out}");
    let restored = dir.join("restored.db");
    let r = restore(&url, &restored, &["--age-identity", key.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(r.txid, Some(after));
    assert_eq!(offsite::workload::verify(&restored).unwrap(), 6);
    assert_eq!(content_digest(&restored), content_digest(&db));
}

// ---------------------------------------------------------------------------
// A 3-node Garage cluster losing a node
// ---------------------------------------------------------------------------

/// The cluster's S3 URL (fresh prefix) and the script that stops and
/// starts its nodes; `None` (skip) when `scripts/test-servers.sh
/// start-cluster` was not run, unless OFFSITE_TEST_REQUIRE_CLUSTER=1.
fn cluster() -> Option<(String, PathBuf)> {
    let url = std::env::var("OFFSITE_TEST_GARAGE_CLUSTER").ok();
    let ctl = std::env::var("OFFSITE_TEST_GARAGE_CLUSTER_CTL").ok();
    match (url, ctl) {
        (Some(u), Some(c)) if !u.is_empty() => {
            let (base, query) = u.split_once('?').expect("cluster URL has a query");
            Some((
                format!("{base}/{}?{query}", support::unique_prefix()),
                PathBuf::from(c),
            ))
        }
        _ if std::env::var("OFFSITE_TEST_REQUIRE_CLUSTER").as_deref() == Ok("1") => {
            panic!("OFFSITE_TEST_GARAGE_CLUSTER is not set: run scripts/test-servers.sh start-cluster and source its env file")
        }
        _ => {
            eprintln!(
                "WARNING: no Garage cluster (scripts/test-servers.sh start-cluster): skipping"
            );
            None
        }
    }
}

/// Stops (SIGKILL) or restarts cluster nodes; restarts every node it
/// stopped when dropped, so a failing test leaves the cluster whole.
struct Nodes {
    ctl: PathBuf,
    down: Vec<u8>,
}

impl Nodes {
    fn run(&self, what: &str, n: u8) {
        let out = Command::new("bash")
            .arg(&self.ctl)
            .args(["cluster-node", what, &n.to_string()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster-node {what} {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(&mut self, n: u8) {
        self.run("stop", n);
        self.down.push(n);
    }

    fn start(&mut self, n: u8) {
        self.run("start", n);
        self.down.retain(|&d| d != n);
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for n in std::mem::take(&mut self.down) {
            let _ = Command::new("bash")
                .arg(&self.ctl)
                .args(["cluster-node", "start", &n.to_string()])
                .status();
        }
    }
}

/// A digest of everything the application wrote: the workload's table and
/// the second writer's.
fn content_digest(db: &Path) -> String {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut h = Sha256::new();
    for sql in [
        "SELECT id, version, payload FROM t ORDER BY id",
        "SELECT k, v FROM side ORDER BY k",
    ] {
        let Ok(mut stmt) = c.prepare(sql) else {
            h.update(b"no table");
            continue;
        };
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            for i in 0..n {
                use rusqlite::types::ValueRef::*;
                match r.get_ref(i).unwrap() {
                    Null => h.update([0u8]),
                    Integer(v) => h.update(v.to_le_bytes()),
                    Real(v) => h.update(v.to_le_bytes()),
                    Text(b) | Blob(b) => {
                        h.update((b.len() as u64).to_le_bytes());
                        h.update(b);
                    }
                }
            }
        }
    }
    format!("{:x}", h.finalize())
}

/// Rows the second writer committed: 1..=n, each with its own value.
fn side_rows(db: &Path) -> u64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let (n, max, bad): (i64, Option<i64>, i64) = c
        .query_row(
            "SELECT count(*), max(k), sum(v != printf('row-%d', k)) FROM side",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                ))
            },
        )
        .unwrap();
    assert_eq!(bad, 0, "side rows with wrong values");
    assert_eq!(max.unwrap_or(0), n, "side rows are not 1..=n");
    n as u64
}

/// Two application writers on one database, each in its own thread with
/// its own connection: the deterministic workload and a side table. An
/// error in either reaches the application: the thread panics.
struct App {
    stop: Arc<AtomicBool>,
    workload: std::thread::JoinHandle<u64>,
    side: std::thread::JoinHandle<u64>,
}

impl App {
    fn start(db: &Path) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let workload = {
            let (db, stop) = (db.to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut w = support::writer::Writer::new(&db, 97, 300_000);
                w.s = offsite::workload::verify(&db).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    w.commit();
                    std::thread::sleep(Duration::from_millis(15));
                }
                w.s
            })
        };
        let side = {
            let (db, stop) = (db.to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let c = rusqlite::Connection::open(&db).unwrap();
                c.busy_timeout(Duration::from_secs(30)).unwrap();
                c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
                c.execute_batch("CREATE TABLE IF NOT EXISTS side(k INTEGER PRIMARY KEY, v TEXT)")
                    .unwrap();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    c.execute(
                        "INSERT INTO side(k, v) VALUES (?1, printf('row-%d', ?1))",
                        [k as i64],
                    )
                    .unwrap();
                    std::thread::sleep(Duration::from_millis(23));
                }
                k
            })
        };
        App {
            stop,
            workload,
            side,
        }
    }

    /// Stop both writers: (workload commits, side rows), or the error that
    /// reached the application.
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let w = self.workload.join().expect("the workload writer failed");
        let s = self.side.join().expect("the side-table writer failed");
        (w, s)
    }
}

/// Wait until the replica holds a txid above `after` (writers keep going,
/// so it never settles); returns it.
fn wait_past(url: &str, after: Option<u64>, t: Duration) -> u64 {
    let mut got = 0;
    wait_for(&format!("{url} to move past txid {after:?}"), t, || {
        got = latest_txid(url).unwrap_or(0);
        Some(got) > after && got > 0
    });
    got
}

#[test]
fn a_cluster_losing_a_node_while_shipping_and_restoring_loses_nothing() {
    let Some((url, ctl)) = cluster() else {
        return;
    };
    let _shared = support::gate::shared();
    let mut nodes = Nodes { ctl, down: vec![] };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("app.db");
    let (key, rcpt) = keygen(dir);
    let id = key.to_str().unwrap().to_string();
    workload(&db, &["--count", "20"]);
    let app = App::start(&db);
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    let mut shipped = wait_past(&url, None, Duration::from_secs(120));

    // A node other than the one offsite talks to dies: quorum (2 of 3)
    // keeps both writes and reads going.
    nodes.stop(3);
    for _ in 0..3 {
        shipped = wait_past(&url, Some(shipped), Duration::from_secs(120));
    }
    let during_outage = shipped;
    nodes.start(3);
    shipped = wait_past(&url, Some(shipped), Duration::from_secs(120));

    // The node offsite talks to dies: uploads fail and are retried, the
    // commits wait in the WAL, the application notices nothing.
    // Longer than the S3 client's own retries (~3 s), so uploads fail.
    nodes.stop(1);
    std::thread::sleep(Duration::from_secs(8));
    nodes.start(1);
    shipped = wait_past(&url, Some(shipped), Duration::from_secs(180));

    let (commits, rows) = app.stop();
    let (st, out) = s.stop();
    assert!(st.success(), "shipper: {out}");
    assert!(out.contains("all commits shipped"), "{out}");
    let failed = out.matches("upload failed").count();
    eprintln!("uploads that failed while node 1 was down: {failed}");
    assert!(failed > 0, "node 1's outage went unnoticed: {out}");
    assert!(rows > 0 && commits > 20);
    let want = content_digest(&db);

    // No gap: one lineage from the first snapshot to the last commit.
    let l = list_json(&url);
    assert_eq!(l["lineages"].as_array().unwrap().len(), 1, "{l}");
    let latest = l["latest"]["txid"].as_u64().unwrap();
    assert!(latest >= shipped);

    // Restore the newest state while node 2 dies under the restore.
    let out_db = dir.join("latest.db");
    let mut r = offsite()
        .args(["restore", &url, "-o"])
        .arg(&out_db)
        .args(["--age-identity", &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    nodes.stop(2);
    let mut err = String::new();
    r.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = r.wait().unwrap();
    assert!(status.success(), "restore with node 2 down: {err}");
    assert_eq!(offsite::workload::verify(&out_db).unwrap(), commits);
    assert_eq!(side_rows(&out_db), rows);
    assert_eq!(
        content_digest(&out_db),
        want,
        "restore differs from the database"
    );

    // A point inside the first outage, still with node 2 down: consistent.
    let mid = dir.join("mid.db");
    let r = restore(
        &url,
        &mid,
        &["--txid", &during_outage.to_string(), "--age-identity", &id],
    );
    assert!(r.ok(), "restore --txid {during_outage}: {}", r.stderr());
    assert_eq!(r.txid, Some(during_outage));
    let m = offsite::workload::verify(&mid).unwrap();
    assert!(m > 20 && m <= commits, "{m}");
    side_rows(&mid);
    nodes.start(2);

    // And once whole again, the replica verifies end to end.
    let v = offsite()
        .args(["verify", &url, "--age-identity", &id])
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&v.stderr)
    );
}

// ---------------------------------------------------------------------------
// Discovered databases keep offsite's locks
// ---------------------------------------------------------------------------

/// Directory discovery runs every second and must not open the databases
/// it already replicates: closing such a descriptor drops the process's
/// SQLite locks on the file, and an application closing its last
/// connection then checkpoints and deletes the WAL under offsite (a new
/// lineage for every such close).
#[test]
fn discovered_databases_keep_their_wal_when_the_application_closes_its_connections() {
    let _shared = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tenants = dir.join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    // Copies of one database, with no -wal or -shm file when offsite
    // starts (as after a clean shutdown, or a restore).
    let seed = dir.join("seed.db");
    workload(&seed, &["--count", "5"]);
    let c = rusqlite::Connection::open(&seed).unwrap();
    c.execute_batch("CREATE TABLE side(k INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(c);
    let dbs: Vec<PathBuf> = (1..=3).map(|i| tenants.join(format!("t{i}.db"))).collect();
    for db in &dbs {
        std::fs::copy(&seed, db).unwrap();
    }
    let backups = dir.join("backups");
    let addr = free_addr();
    let config = dir.join("offsite.toml");
    std::fs::write(
        &config,
        format!(
            "sync-interval = \"200ms\"\nlisten = \"{addr}\"\n[[database]]\ndir = \"{}\"\npattern = \"*.db\"\n  [[database.replica]]\n  url = \"file://{}\"\n  encryption = \"none\"\n",
            tenants.display(),
            backups.display()
        ),
    )
    .unwrap();
    let log = dir.join("daemon.log");
    let mut d = Daemon(
        offsite()
            .args(["replicate", "--config"])
            .arg(&config)
            .args(["--log-format", "text"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let url = |db: &Path| format!("file://{}", backups.join(db.file_name().unwrap()).display());
    for db in &dbs {
        wait_shipped(&url(db), None, Duration::from_secs(60));
    }
    // The application opens, writes and closes, over several discovery
    // rounds. It is Python's sqlite3 module on the system's SQLite, as in
    // many applications: its last connection's close checkpoints and
    // deletes the WAL whenever it gets the exclusive lock (the bundled
    // SQLite of our own test writers did not show the loss).
    for k in 1..=10i64 {
        for db in &dbs {
            let out = Command::new("python3")
                .arg("-c")
                .arg("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], timeout=30)\nc.execute(\"INSERT INTO side(k, v) VALUES (?, printf('row-%d', ?))\", (int(sys.argv[2]),) * 2)\nc.commit()\nc.close()")
                .arg(db)
                .arg(k.to_string())
                .output()
                .expect("python3 (scripts/test-servers.sh needs it too)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    for db in &dbs {
        assert!(
            db.with_extension("db-wal").exists(),
            "the WAL of {} was deleted under offsite",
            db.display()
        );
    }
    for db in &dbs {
        wait_shipped(&url(db), Some(10), Duration::from_secs(60));
    }
    sigterm(&d.0);
    let st = wait_timeout(&mut d.0, Duration::from_secs(90));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{out}");
    assert!(!out.contains("restarted or truncated"), "{out}");

    for db in &dbs {
        let l = list_json(&url(db));
        assert_eq!(
            l["lineages"].as_array().unwrap().len(),
            1,
            "{}: a new lineage: {l}\n{out}",
            db.display()
        );
        let restored = dir.join(format!(
            "restored-{}",
            db.file_name().unwrap().to_str().unwrap()
        ));
        let r = restore(&url(db), &restored, &[]);
        assert!(r.ok(), "{}", r.stderr());
        assert_eq!(offsite::workload::verify(&restored).unwrap(), 5);
        assert_eq!(side_rows(&restored), 10);
        assert_eq!(content_digest(&restored), content_digest(db));
    }
}
