//! `max-wal-size`: while the replica is unreachable offsite holds the WAL (no
//! gap), but never past the bound: beyond it the WAL is released and
//! checkpointed, the loss of continuity is recorded, and a new lineage
//! starts once the store is back. The application is never blocked.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use support::harness::{self, offsite, wait_for, wait_timeout, workload, workload_cmd};
use support::private_s3::PrivateS3;

fn scrape(addr: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// A metric's value; `None` before the replicator has published it.
fn metric_opt(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn metric(text: &str, name: &str) -> f64 {
    metric_opt(text, name).unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn past_max_wal_size_the_wal_is_released_and_a_new_lineage_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut s3 = PrivateS3::start(dir);
    let url = s3.url("app");
    let db = dir.join("app.db");
    let wal = dir.join("app.db-wal");
    workload(&db, &["--count", "1"]);
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let log = dir.join("daemon.log");
    let mut d = offsite()
        .args(["replicate", db.to_str().unwrap(), &url, "--no-encryption"])
        .args([
            "--listen",
            &addr,
            "--max-wal-size",
            "4MiB",
            "--sync-interval",
            "200ms",
        ])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the first snapshot", Duration::from_secs(60), || {
        // The listener comes up before the replicator publishes its gauges.
        TcpStream::connect(&addr).is_ok()
            && metric_opt(&scrape(&addr), "offsite_shipped_txid").is_some_and(|v| v >= 1.0)
    });

    // The store goes away while the application writes ~30 MB of WAL
    // (2000 commits of 10 kB rows and their pages, ~1.5 MB/s).
    s3.stop();
    let mut writer = workload_cmd(&db)
        .args([
            "--count",
            "2000",
            "--rate",
            "100",
            "--big-every",
            "1",
            "--big-bytes",
            "10000",
        ])
        .spawn()
        .unwrap();
    let mut max_wal = 0u64;
    while writer.try_wait().unwrap().is_none() {
        max_wal = max_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        writer.wait().unwrap().success(),
        "the application was blocked or failed"
    );
    eprintln!("largest WAL during the outage: {max_wal} bytes");
    // The bound is checked between upload attempts: the WAL may pass it by
    // what the application writes during one attempt (the SDK's retries,
    // ~3 s at most: < 5 MB here).
    assert!(
        max_wal < 10 << 20,
        "the WAL grew to {max_wal} bytes with max-wal-size 4MiB"
    );
    let m = scrape(&addr);
    assert!(metric(&m, "offsite_wal_overflows_total") >= 1.0, "{m}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("Continuity with the replica is LOST"),
        "{text}"
    );

    // The store returns: a new lineage with everything, and no lag.
    s3.resume();
    wait_for("a new lineage, caught up", Duration::from_secs(180), || {
        let m = scrape(&addr);
        metric(&m, "offsite_lineage_breaks_total") >= 1.0
            && metric(&m, "offsite_replication_lag_seconds") == 0.0
    });
    let l = harness::list_json(&url);
    assert_eq!(l["lineages"].as_array().unwrap().len(), 2, "{l}");
    harness::sigterm(&d);
    assert!(wait_timeout(&mut d, Duration::from_secs(90)).success());
    let out = dir.join("restored.db");
    let r = harness::restore(&url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(
        offsite::workload::verify(&out).unwrap(),
        2001,
        "the new snapshot holds every commit"
    );
}
