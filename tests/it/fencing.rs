//! A second shipper on the same replica (two pods after a bad deploy) must
//! not interleave its lineage with the first one's: it refuses to write
//! while the first holds the replica's lease, and takes over only once the
//! first has stopped (its lease is released at shutdown).

use crate::support;

use std::process::{Child, Stdio};
use std::time::Duration;

use support::harness::{self, offsite, wait_for, wait_timeout, workload};

fn start(db: &std::path::Path, url: &str, log: &std::path::Path) -> Child {
    offsite()
        .args([
            "replicate",
            db.to_str().unwrap(),
            url,
            "--no-encryption",
            "--sync-interval",
            "200ms",
        ])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn stop(mut c: Child, log: &std::path::Path) {
    harness::sigterm(&c);
    let st = wait_timeout(&mut c, Duration::from_secs(90));
    assert!(st.success(), "{}", std::fs::read_to_string(log).unwrap());
}

fn lineages(url: &str) -> usize {
    harness::list_json(url)["lineages"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0)
}

#[test]
fn a_second_shipper_refuses_to_write_until_the_first_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut urls = vec![(
        "file".to_string(),
        format!("file://{}", dir.join("replica").display()),
    )];
    for t in support::s3_targets() {
        urls.push((t.name.clone(), t.url.clone()));
    }
    for (name, url) in urls {
        let d = dir.join(&name);
        std::fs::create_dir_all(&d).unwrap();
        let (db1, db2) = (d.join("one.db"), d.join("two.db"));
        workload(&db1, &["--count", "3"]);
        workload(&db2, &["--count", "5"]);
        let (log1, log2) = (d.join("one.log"), d.join("two.log"));
        let a = start(&db1, &url, &log1);
        wait_for(
            "the first shipper's snapshot",
            Duration::from_secs(60),
            || harness::latest_txid(&url).is_some(),
        );
        // The second shipper, on another database, same replica: refused.
        let b = start(&db2, &url, &log2);
        wait_for("the refusal", Duration::from_secs(60), || {
            std::fs::read_to_string(&log2)
                .unwrap()
                .contains("another offsite is shipping to this replica")
        });
        workload(&db2, &["--count", "3"]);
        workload(&db1, &["--count", "2"]);
        wait_for("the first shipper goes on", Duration::from_secs(60), || {
            harness::latest_txid(&url) == Some(3)
        });
        assert_eq!(
            lineages(&url),
            1,
            "{name}: the second shipper wrote to the replica"
        );
        let out = d.join("r1.db");
        let r = harness::restore(&url, &out, &[]);
        assert!(r.ok(), "{}", r.stderr());
        assert_eq!(offsite::workload::verify(&out).unwrap(), 5, "{name}");

        // The first stops cleanly (lease released): the second takes over
        // with a lineage of its own.
        stop(a, &log1);
        wait_for(
            "the second shipper's lineage",
            Duration::from_secs(60),
            || lineages(&url) == 2,
        );
        stop(b, &log2);
        let out = d.join("r2.db");
        let r = harness::restore(&url, &out, &["--force"]);
        assert!(r.ok(), "{}", r.stderr());
        assert_eq!(offsite::workload::verify(&out).unwrap(), 8, "{name}");
        // The first lineage is intact and restorable to its own end: its
        // latest txid (per-lineage "latest" of `list --json`) restores the
        // first database's last state (3 + 2 commits), and the second
        // lineage's txids come after it (lineages sort by their first txid).
        let l = harness::list_json(&url);
        let ls = l["lineages"].as_array().expect("list --json: lineages");
        assert_eq!(ls.len(), 2, "{name}: {l}");
        let first_end = ls[0]["latest"]["txid"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: no latest txid of the first lineage: {l}"));
        assert_eq!(first_end, 3, "{name}: the first lineage's end: {l}");
        let second_start = ls[1]["earliest"]["txid"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: no earliest txid of the second lineage: {l}"));
        assert!(
            second_start > first_end,
            "{name}: the second lineage's txids overlap the first's: {l}"
        );
        let out = d.join("r3.db");
        let r = harness::restore(&url, &out, &["--txid", &first_end.to_string()]);
        assert!(r.ok(), "{name}: restore --txid {first_end}: {}", r.stderr());
        assert_eq!(r.txid, Some(first_end), "{name}: {}", r.stderr());
        assert_eq!(offsite::workload::verify(&out).unwrap(), 5, "{name}");
    }
}

#[test]
fn a_shipper_that_lost_its_lease_stops_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("replica");
    let url = format!("file://{}", root.display());
    let db = dir.join("app.db");
    workload(&db, &["--count", "3"]);
    let log = dir.join("a.log");
    let mut a = offsite()
        .args([
            "replicate",
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--sync-interval",
            "200ms",
        ])
        .env("OFFSITE_TEST_LEASE_RENEW", "1s")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("the snapshot", Duration::from_secs(60), || {
        harness::latest_txid(&url).is_some()
    });
    workload(&db, &["--count", "2"]);
    wait_for("two commits shipped", Duration::from_secs(60), || {
        harness::latest_txid(&url) == Some(3)
    });
    // Another shipper (on a server that ignores conditional writes, say)
    // overwrites the lease.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    std::fs::write(
        root.join("lease.json"),
        format!(r#"{{"shipper":"intruder","host":"elsewhere","pid":1,"db":"/other.db","renewed_us":{now_us}}}"#),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    workload(&db, &["--count", "4"]);
    wait_for("the loss noticed", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("another offsite took this replica's lease")
    });
    // At shutdown it says its last commits were not shipped, and exits 1.
    harness::sigterm(&a);
    let st = wait_timeout(&mut a, Duration::from_secs(90));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(st.code(), Some(1), "{text}");
    assert!(text.contains("were not shipped"), "{text}");
    // Nothing was written after the lease was lost, until its very end.
    assert_eq!(
        harness::latest_txid(&url),
        Some(3),
        "it went on writing after losing the lease"
    );
    assert_eq!(lineages(&url), 1);
}
