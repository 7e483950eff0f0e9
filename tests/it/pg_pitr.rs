//! PostgreSQL end to end, against real clusters: streaming through a slot,
//! base backups, restores to every kind of target (time, LSN, xid, restore
//! point, latest) that start a real server and compare exactly which
//! marker rows are visible; on file:// and on a real S3 server.

use std::time::Duration;

use crate::pg_support::*;
use crate::support::pgcluster::PgCluster;

fn pitr_drill(url: &str) {
    let tmp = tempdir();
    let (ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    create_markers(&c);
    let s = Streamer::start(&c.dsn(), url, &rcpt, tmp.path(), &[]);
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    let mut m = Vec::new();
    for i in 1..=12 {
        m.push(add_marker(&c, i));
        if i == 7 {
            c.psql("select pg_create_restore_point('after_seven')");
        }
    }
    wait_archived(&c, url, Duration::from_secs(30));
    let check = |name: &str, args: &[&str], want: i64| {
        let out = tmp.path().join(format!("r-{name}"));
        let r = restore_started(url, &ident, &out, args);
        assert_eq!(
            r.markers(),
            (want, want),
            "restore {name} {args:?}: {}",
            r.stderr
        );
    };
    check("latest", &[], 12);
    check("time", &["--timestamp", &m[4].time_after], 5);
    check("lsn", &["--lsn", &m[2].lsn_after], 3);
    check("xid", &["--xid", &m[8].xid], 9);
    check("xid-exclusive", &["--xid", &m[8].xid, "--exclusive"], 8);
    check("name", &["--name", "after_seven"], 7);
    s.stop();
}

#[test]
fn pitr_drill_file() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    pitr_drill(&file_archive(tmp.path()));
}

#[test]
fn pitr_drill_s3() {
    if !PgCluster::available() {
        return;
    }
    let Some(t) = crate::support::s3_targets().into_iter().next() else {
        return;
    };
    pitr_drill(&t.url);
}

/// kill -9 of offsite mid-stream, then a restart: the archive continues
/// without a gap and without overlapping pieces, and a restore holds every
/// committed marker.
#[test]
fn kill9_of_offsite_mid_stream_leaves_no_gap() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    create_markers(&c);
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    for i in 1..=20 {
        add_marker(&c, i);
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = s.kill9();
    for i in 21..=40 {
        add_marker(&c, i);
    }
    c.psql("insert into markers select g from generate_series(1000, 60000) g");
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    for i in 41..=50 {
        add_marker(&c, i);
    }
    wait_archived(&c, &url, Duration::from_secs(60));
    let log2 = s.stop();
    let pieces = wal_pieces(&url);
    for w in pieces.windows(2) {
        if w[0].seg == w[1].seg && !w[0].is_whole() && !w[1].is_whole() {
            assert!(
                w[1].start >= w[0].end,
                "overlapping pieces {} and {}:\n{log}\n{log2}",
                w[0].key,
                w[1].key
            );
        }
    }
    let r = restore_started(&url, &ident, &tmp.path().join("r"), &[]);
    assert_eq!(r.markers(), (50 + 59001, 60000));
}

/// PostgreSQL crashes (kill -9) and restarts: the streamer reconnects and
/// the archive holds what was committed before and after.
#[test]
fn postgres_crash_and_restart_is_followed() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    create_markers(&c);
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    for i in 1..=10 {
        add_marker(&c, i);
    }
    c.kill9();
    c.restart();
    for i in 11..=20 {
        add_marker(&c, i);
    }
    wait_archived(&c, &url, Duration::from_secs(60));
    let log = s.stop();
    assert!(log.contains("reconnecting"), "{log}");
    let r = restore_started(&url, &ident, &tmp.path().join("r"), &[]);
    assert_eq!(r.markers(), (20, 20));
}

/// A restored copy is promoted (timeline 2) and shipped on into the same
/// archive: the history file is stored, and a restore of the latest state
/// follows the new timeline.
#[test]
fn promoted_copy_is_shipped_on_a_new_timeline() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    create_markers(&c);
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    for i in 1..=5 {
        add_marker(&c, i);
    }
    wait_archived(&c, &url, Duration::from_secs(30));
    s.stop();
    c.stop();
    // The primary is gone; its restored copy takes over.
    let copy = restore_started(&url, &ident, &tmp.path().join("copy"), &[]);
    assert_eq!(copy.markers(), (5, 5));
    let dsn = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        copy.port
    );
    let spool2 = tmp.path().join("two");
    std::fs::create_dir_all(&spool2).unwrap();
    let s2 = Streamer::start(
        &dsn,
        &url,
        &rcpt,
        &spool2,
        &["--base-backup-interval", "off"],
    );
    s2.wait_log("streaming WAL", Duration::from_secs(30));
    for i in 6..=9 {
        copy.psql(&format!("insert into markers(i) values ({i})"));
    }
    let (lsn, tli) = {
        let out = copy
            .psql("select pg_current_wal_insert_lsn(), timeline_id from pg_control_checkpoint()");
        let (l, t) = out.split_once('|').unwrap();
        (
            offsite::engine::postgres::walname::parse_lsn(l).unwrap(),
            t.parse::<u32>().unwrap(),
        )
    };
    assert_eq!(tli, 2);
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while archive_reach(
        &url,
        2,
        offsite::engine::postgres::walname::SegmentName::of_lsn(2, lsn).start_lsn(),
    ) < lsn
    {
        assert!(
            std::time::Instant::now() < end,
            "timeline 2 never reached the archive: {}",
            s2.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = s2.stop();
    assert!(log.contains("stored timeline history"), "{log}");
    drop(copy);
    let r = restore_started(&url, &ident, &tmp.path().join("again"), &[]);
    assert_eq!(r.markers(), (9, 9), "{}", r.stderr);
}

/// The store goes away while streaming: nothing is reported flushed, the
/// slot keeps the WAL on the primary, and once the store is back offsite
/// catches up into one continuous archive.
#[test]
fn store_outage_while_streaming_catches_up() {
    use crate::support::fault_proxy::{Fault, FaultProxy};
    if !PgCluster::available() {
        return;
    }
    let Some(t) = crate::support::s3_targets().into_iter().next() else {
        return;
    };
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    let tmp = tempdir();
    let (ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    create_markers(&c);
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    add_marker(&c, 1);
    wait_archived(&c, &url, Duration::from_secs(30));
    let flushed_before =
        c.psql("select restart_lsn from pg_replication_slots where slot_name = 'offsite'");
    proxy.set(Fault::Refuse);
    for i in 2..=10 {
        add_marker(&c, i);
    }
    std::thread::sleep(Duration::from_secs(2));
    let during = c.psql("select restart_lsn from pg_replication_slots where slot_name = 'offsite'");
    let (cur, _) = current_lsn(&c);
    assert!(
        offsite::engine::postgres::walname::parse_lsn(&during).unwrap() < cur,
        "the slot advanced to {during} (current {cur:#x}, before {flushed_before}) while the store was down"
    );
    // Down until the SDK's own retries (about 3 s, with jitter) are spent
    // and offsite's retry loop says so.
    s.wait_log("upload failed, retrying", Duration::from_secs(60));
    proxy.pass();
    wait_archived(&c, &url, Duration::from_secs(60));
    s.stop();
    let r = restore_started(&t.url, &ident, &tmp.path().join("r"), &[]);
    assert_eq!(r.markers(), (10, 10));
}

/// A table in its own tablespace: the base backup carries the tablespace's
/// archive, and a restore moves it with --tablespace OLD=NEW (the original
/// location is still the running primary's).
#[test]
fn tablespaces_are_backed_up_and_moved_at_restore() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let ts = tmp.path().join("ts");
    std::fs::create_dir_all(&ts).unwrap();
    assert!(std::process::Command::new("chown")
        .arg("postgres")
        .arg(&ts)
        .status()
        .unwrap()
        .success());
    let c = PgCluster::start(&[]);
    c.psql(&format!(
        "create tablespace elsewhere location '{}'",
        ts.display()
    ));
    c.psql("create table far(i int) tablespace elsewhere");
    c.psql("insert into far select generate_series(1, 5000)");
    create_markers(&c);
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    let b = backups(&url);
    assert!(
        b[0].archives.iter().any(|a| a
            .tablespace
            .as_ref()
            .is_some_and(|t| t.path == ts.display().to_string())),
        "the backup has no archive of the tablespace: {:?}",
        b[0].archives
    );
    c.psql("insert into far select generate_series(5001, 6000)");
    add_marker(&c, 1);
    wait_archived(&c, &url, Duration::from_secs(30));
    s.stop();
    let moved = tmp.path().join("ts-restored");
    let r = restore_started(
        &url,
        &ident,
        &tmp.path().join("r"),
        &[
            "--tablespace",
            &format!("{}={}", ts.display(), moved.display()),
        ],
    );
    assert_eq!(
        r.psql("select count(*), max(i) from far"),
        "6000|6000",
        "{}",
        r.stderr
    );
    assert_eq!(
        r.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'elsewhere'"),
        moved.display().to_string()
    );
}
