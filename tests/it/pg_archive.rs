//! PostgreSQL's archive_command and restore_command through offsite
//! (`pg archive-push`, `pg wal-fetch`), synchronous streaming, and wrong
//! inputs, against real clusters.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::pg_support::*;
use crate::support::harness::offsite;
use crate::support::pgcluster::PgCluster;

fn push(url: &str, rcpt: &str, pgdata: &Path, file: &Path, spool: &Path) -> Output {
    offsite()
        .args(["pg", "archive-push"])
        .arg(file)
        .args(["--replica", url, "--age-recipient", rcpt, "--pgdata"])
        .arg(pgdata)
        .arg("--spool-dir")
        .arg(spool)
        .output()
        .unwrap()
}

fn fetch(url: &str, ident: &Path, name: &str, dest: &Path) -> Output {
    offsite()
        .args(["pg", "wal-fetch", name])
        .arg(dest)
        .args(["--replica", url, "--age-identity"])
        .arg(ident)
        .args(["--prefetch", "0"])
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// archive_command mode end to end: PostgreSQL archives through
/// `offsite pg archive-push`, `offsite pg backup` completes once its WAL is
/// archived, and a restore (restore_command = `offsite pg wal-fetch`) gives
/// every row. Then the archive_command contract: identical re-push → 0,
/// different content → non-zero and nothing overwritten (history files
/// too), and restore_command's exit codes.
#[test]
fn archive_command_mode_and_its_contract() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    // archive_command runs as PostgreSQL's OS user: the archive is its.
    let dir = tmp.path().join("archive");
    assert!(std::process::Command::new("chown")
        .args(["-R", "postgres"])
        .arg(&dir)
        .status()
        .unwrap()
        .success());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let exe = env!("CARGO_BIN_EXE_offsite");
    let spool = shared_dir(tmp.path(), "push-spool");
    let archive_command = format!(
        "archive_command = 'OFFSITE_SIGNING_KEY={} {exe} pg archive-push %p --replica \"{url}\" --age-recipient {rcpt} --spool-dir {}'",
        crate::support::harness::TEST_SIGNING_KEY,
        spool.display()
    );
    let c = PgCluster::start(&["archive_mode = on", &archive_command]);
    create_markers(&c);
    for i in 1..=3 {
        add_marker(&c, i);
    }
    let o = offsite()
        .args([
            "pg",
            "backup",
            "--dsn",
            &c.dsn(),
            "--replica",
            &url,
            "--age-recipient",
            &rcpt,
            "--wal-timeout",
            "60s",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "pg backup: {}", text(&o));
    assert!(text(&o).contains("complete"), "{}", text(&o));
    for i in 4..=8 {
        add_marker(&c, i);
    }
    let switched = c.psql("select pg_walfile_name(pg_switch_wal())");
    let seg = offsite::engine::postgres::walname::SegmentName::parse(&switched).unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !wal_pieces(&url)
        .iter()
        .any(|p| p.seg == seg && p.is_whole())
    {
        assert!(
            std::time::Instant::now() < end,
            "segment {seg} never archived; archive holds {:?}; server log:\n{}",
            wal_pieces(&url)
                .iter()
                .map(|p| p.key.clone())
                .collect::<Vec<_>>(),
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = restore_started(&url, &ident, &tmp.path().join("r"), &[]);
    assert_eq!(r.markers(), (8, 8), "{}", r.stderr);
    drop(r);

    // The prefetcher: a wal-fetch returns with its segment and leaves a
    // detached process fetching the next ones into the spool, byte for byte
    // what a direct fetch gives; the next call takes its segment from there.
    let mut whole: Vec<_> = wal_pieces(&url)
        .into_iter()
        .filter(|p| p.is_whole())
        .map(|p| p.seg)
        .collect();
    whole.sort();
    whole.dedup();
    let (first, second) = whole
        .windows(2)
        .map(|w| (w[0], w[1]))
        .find(|(a, b)| a.next() == *b)
        .unwrap_or_else(|| panic!("no two consecutive whole segments: {whole:?}"));
    let pspool = tmp.path().join("prefetch-spool");
    let o = offsite()
        .args(["pg", "wal-fetch", &first.to_string()])
        .arg(tmp.path().join("first"))
        .args(["--replica", &url, "--age-identity"])
        .arg(&ident)
        .args(["--prefetch", "3", "--spool-dir"])
        .arg(&pspool)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let spooled = pspool.join(second.to_string());
    crate::support::harness::wait_for("the prefetched segment", Duration::from_secs(60), || {
        std::fs::metadata(&spooled).is_ok_and(|m| m.len() == 16 << 20)
    });
    let direct = tmp.path().join("second-direct");
    assert!(fetch(&url, &ident, &second.to_string(), &direct)
        .status
        .success());
    assert_eq!(
        std::fs::read(&spooled).unwrap(),
        std::fs::read(&direct).unwrap(),
        "the prefetched segment differs from the archive's"
    );
    let o = offsite()
        .args(["pg", "wal-fetch", &second.to_string()])
        .arg(tmp.path().join("second"))
        .args(["--replica", &url, "--age-identity"])
        .arg(&ident)
        .args(["--prefetch", "0", "--spool-dir"])
        .arg(&pspool)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !spooled.exists(),
        "the spooled segment was not taken from the spool"
    );
    assert_eq!(
        std::fs::read(tmp.path().join("second")).unwrap(),
        std::fs::read(&direct).unwrap()
    );

    // Re-push of identical content: 0, nothing rewritten.
    let name = seg.to_string();
    let fetched = tmp.path().join("fetched");
    let o = fetch(&url, &ident, &name, &fetched);
    assert!(o.status.success(), "{}", text(&o));
    let key = wal_pieces(&url)
        .into_iter()
        .find(|p| p.seg == seg && p.is_whole())
        .unwrap()
        .key;
    let obj = |k: &str| {
        std::fs::read(format!(
            "{}/{k}",
            url.trim_start_matches("file://").split('?').next().unwrap()
        ))
        .unwrap()
    };
    let before = obj(&key);
    let wal = tmp.path().join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let same = wal.join(&name);
    std::fs::copy(&fetched, &same).unwrap();
    let fresh_spool = tmp.path().join("s2");
    let o = push(&url, &rcpt, &c.data, &same, &fresh_spool);
    assert!(
        o.status.success(),
        "identical re-push must succeed: {}",
        text(&o)
    );
    assert_eq!(obj(&key), before, "an identical re-push rewrote the object");
    // Different content under the same name: refused, not overwritten.
    let mut bytes = std::fs::read(&same).unwrap();
    bytes[100_000] ^= 0xff;
    std::fs::write(&same, &bytes).unwrap();
    let o = push(&url, &rcpt, &c.data, &same, &fresh_spool);
    assert!(!o.status.success());
    assert!(text(&o).contains("different content"), "{}", text(&o));
    assert_eq!(obj(&key), before, "a conflicting push overwrote the object");
    // A history file is never overwritten either.
    let h = wal.join("00000002.history");
    std::fs::write(&h, "1\t0/3000000\tno recovery target specified\n").unwrap();
    assert!(push(&url, &rcpt, &c.data, &h, &fresh_spool)
        .status
        .success());
    assert!(push(&url, &rcpt, &c.data, &h, &fresh_spool)
        .status
        .success());
    std::fs::write(&h, "1\t0/4000000\tsomething else\n").unwrap();
    let o = push(&url, &rcpt, &c.data, &h, &fresh_spool);
    assert!(
        !o.status.success() && text(&o).contains("different content"),
        "{}",
        text(&o)
    );
    let o = fetch(&url, &ident, "00000002.history", &tmp.path().join("h"));
    assert!(o.status.success());
    assert!(std::fs::read_to_string(tmp.path().join("h"))
        .unwrap()
        .contains("0/3000000"));
    // Not a WAL file: refused.
    let bogus = wal.join("passwd");
    std::fs::write(&bogus, "x").unwrap();
    assert!(!push(&url, &rcpt, &c.data, &bogus, &fresh_spool)
        .status
        .success());

    // restore_command's exit codes: 1 for what the archive does not hold
    // (a segment past the end, a history probe), never 126/127 or a
    // signal; a damaged object is fatal (126), so PostgreSQL stops instead
    // of ending recovery early.
    for missing in ["00000001000000000000007F", "00000003.history"] {
        let o = fetch(&url, &ident, missing, &tmp.path().join("m"));
        assert_eq!(o.status.code(), Some(1), "{missing}: {}", text(&o));
        assert!(!tmp.path().join("m").exists());
    }
    let path = format!(
        "{}/{key}",
        url.trim_start_matches("file://").split('?').next().unwrap()
    );
    let mut b = std::fs::read(&path).unwrap();
    let n = b.len() / 2;
    b[n] ^= 1;
    std::fs::write(&path, &b).unwrap();
    let o = fetch(&url, &ident, &name, &tmp.path().join("d"));
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
    assert!(
        text(&o).contains(&key),
        "the refusal names the object: {}",
        text(&o)
    );
    assert!(!tmp.path().join("d").exists());
}

/// With `--synchronous` and offsite in synchronous_standby_names, a commit
/// returns only once its WAL is in the store.
#[test]
fn synchronous_streaming_acknowledges_only_stored_commits() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (_ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    c.psql("create table markers(i int primary key, at timestamptz default clock_timestamp())");
    let s = Streamer::start(
        &c.dsn(),
        &url,
        &rcpt,
        tmp.path(),
        &["--synchronous", "--base-backup-interval", "off"],
    );
    s.wait_log("streaming WAL", Duration::from_secs(30));
    c.psql("alter system set synchronous_standby_names = 'offsite'");
    c.psql("select pg_reload_conf()");
    crate::support::harness::wait_for(
        "offsite as the synchronous standby",
        Duration::from_secs(10),
        || {
            c.psql("select sync_state from pg_stat_replication where application_name = 'offsite'")
                == "sync"
        },
    );
    for i in 1..=15 {
        let out = c.psql(&format!(
            "insert into markers(i) values ({i}); select pg_current_wal_insert_lsn()"
        ));
        let lsn =
            offsite::engine::postgres::walname::parse_lsn(out.lines().last().unwrap()).unwrap();
        let seg = offsite::engine::postgres::walname::SegmentName::of_lsn(1, lsn);
        // No waiting: the commit returned, so its WAL is already stored.
        let reach = archive_reach(&url, 1, seg.start_lsn());
        let commit_end = lsn - 1;
        assert!(
            reach >= commit_end.min(seg.end_lsn()),
            "commit {i} returned at {lsn:#x} but the archive holds only up to {reach:#x}"
        );
    }
    s.stop();
}

/// Wrong inputs: each a clear one-line error and a non-zero exit.
#[test]
fn wrong_inputs_are_clear_errors() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let stream = |dsn: &str, extra: &[&str]| -> String {
        let o = offsite()
            .args([
                "pg",
                "stream",
                "--dsn",
                dsn,
                "--replica",
                &url,
                "--age-recipient",
                &rcpt,
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success(), "stream {dsn} succeeded");
        text(&o)
    };
    let e = stream("postgres://nobody@127.0.0.1:1/x?sslmode=disable", &[]);
    assert!(
        e.contains("cannot connect") && e.contains("127.0.0.1:1"),
        "{e}"
    );
    let e = stream("postgres://u@h:notaport/db", &[]);
    assert!(e.contains("--dsn"), "{e}");
    let c = PgCluster::start_with_hba(
        &["password_encryption = 'scram-sha-256'"],
        &[
            "host all secretive 127.0.0.1/32 scram-sha-256",
            "host replication secretive 127.0.0.1/32 scram-sha-256",
        ],
    );
    c.psql("create role secretive login replication password 'right-one'");
    c.psql("create role plain login");
    let e = stream(
        &format!(
            "postgres://secretive:wrong-one@127.0.0.1:{}/postgres",
            c.port
        ),
        &[],
    );
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("wrong-one"), "the password leaked: {e}");
    let e = stream(
        &format!("postgres://plain@127.0.0.1:{}/postgres", c.port),
        &[],
    );
    assert!(e.contains("REPLICATION"), "{e}");
    let minimal = PgCluster::start(&["wal_level = minimal", "max_wal_senders = 0"]);
    let e = stream(&minimal.dsn(), &[]);
    assert!(
        e.contains("max_wal_senders") || e.contains("wal_level") || e.contains("replication"),
        "{e}"
    );
    let full = PgCluster::start(&["max_replication_slots = 1"]);
    full.psql("select pg_create_physical_replication_slot('other')");
    let e = stream(&full.dsn(), &[]);
    assert!(e.contains("replication slot"), "{e}");
    // restore into a non-empty or unwritable DATADIR.
    let s = Streamer::start(&full.dsn(), &url, &rcpt, tmp.path(), &["--slot", "other"]);
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    s.stop();
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("PG_VERSION"), "15").unwrap();
    let o = offsite()
        .args(["restore", &url, "-o"])
        .arg(&busy)
        .arg("--age-identity")
        .arg(&ident)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("not empty"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(busy.join("PG_VERSION")).unwrap(),
        "15"
    );
    let o = offsite()
        .args([
            "restore",
            &url,
            "-o",
            "/proc/offsite-cannot-write-here/data",
            "--age-identity",
        ])
        .arg(&ident)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("cannot create"),
        "{}",
        text(&o)
    );
    let o = offsite()
        .args(["restore", &url, "-o"])
        .arg(tmp.path().join("x"))
        .args(["--txid", "5"])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("--xid"),
        "{}",
        text(&o)
    );
}
