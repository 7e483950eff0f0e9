//! A second shipper on the same replica (two pods after a bad deploy) must
//! not interleave its lineage with the first one's: it refuses to write
//! while the first holds the replica's lease, and takes over only once the
//! first has stopped (its lease is released at shutdown).

mod support;

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
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
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
        // The first lineage is intact and restorable to its own end.
        let l = harness::list_json(&url);
        let first = &l["lineages"][0];
        let last = first["last_txid"]
            .as_u64()
            .or_else(|| first["newest_txid"].as_u64());
        if let Some(t) = last {
            let out = d.join("r3.db");
            let r = harness::restore(&url, &out, &["--txid", &t.to_string()]);
            assert!(r.ok() || r.stderr().contains("lineage"), "{}", r.stderr());
        }
    }
}
