//! The PostgreSQL streamer as a sidecar: metrics, readiness and
//! `sync --wait` over its HTTP listener, and an invalidated slot (the
//! store was away longer than max_slot_wal_keep_size allows).

use std::time::Duration;

use crate::pg_support::*;
use crate::support::harness::{offsite, sigterm, wait_timeout};
use crate::support::pgcluster::PgCluster;

fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

#[test]
fn metrics_readiness_and_sync_wait() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (_ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    create_markers(&c);
    let addr = free_addr();
    // A long sync interval: only `sync --wait` ships promptly.
    let s = Streamer::start(
        &c.dsn(),
        &url,
        &rcpt,
        tmp.path(),
        &[
            "--listen",
            &addr,
            "--sync-interval",
            "30s",
            "--name",
            "main-db",
        ],
    );
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    crate::support::harness::wait_for("ready", Duration::from_secs(30), || {
        get(&addr, "/readyz").0 == 200
    });
    add_marker(&c, 1);
    let (lsn, _) = current_lsn(&c);
    sync_wait(&addr, "main-db", "20s");
    let b = backups(&url);
    let reach = archive_reach(&url, 1, b.last().unwrap().start_lsn);
    assert!(reach >= lsn - 1, "sync --wait returned before the commit's WAL ({lsn:#x}) was stored (archive reaches {reach:#x})");
    let (code, m) = get(&addr, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "offsite_pg_slot_lag_bytes",
        "offsite_pg_lag_bytes",
        "offsite_pg_last_base_backup_timestamp_seconds",
        "offsite_replication_lag_seconds",
    ] {
        assert!(
            m.contains(&format!("{name}{{db=\"main-db\"")),
            "{name} missing:\n{m}"
        );
    }
    assert!(
        metric(
            &m,
            "offsite_pg_last_base_backup_timestamp_seconds",
            "main-db"
        )
        .is_some_and(|v| v > 1.0e9),
        "{m}"
    );
    assert!(!m.contains("postgres://"), "metrics carry the DSN: {m}");
    s.stop();
}

/// The streamer was away while more WAL than max_slot_wal_keep_size was
/// written: the slot is invalidated. offsite says so, recreates the slot
/// and takes a new base backup, so the latest state restores again.
#[test]
fn invalidated_slot_gets_a_new_slot_and_backup() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[
        "max_slot_wal_keep_size = 32MB",
        "max_wal_size = 64MB",
        "min_wal_size = 32MB",
    ]);
    create_markers(&c);
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    s.wait_log("scheduled base backup complete", Duration::from_secs(60));
    add_marker(&c, 1);
    wait_archived(&c, &url, Duration::from_secs(30));
    s.kill9();
    for k in 1..=4 {
        c.psql(&format!(
            "insert into markers select g from generate_series({0}, {0} + 300000) g",
            k * 1_000_000
        ));
        c.psql("select pg_switch_wal()");
        c.psql("checkpoint");
    }
    assert_eq!(
        c.psql("select wal_status from pg_replication_slots where slot_name = 'offsite'"),
        "lost"
    );
    add_marker(&c, 2);
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    s.wait_log("invalidated", Duration::from_secs(30));
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while s
        .log_text()
        .matches("scheduled base backup complete")
        .count()
        < 1
    {
        assert!(
            std::time::Instant::now() < end,
            "no new base backup after the gap:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(backups(&url).len(), 2);
    add_marker(&c, 3);
    wait_archived(&c, &url, Duration::from_secs(30));
    s.stop();
    let want = c
        .psql("select count(*) from markers")
        .parse::<i64>()
        .unwrap();
    let r = restore_started(&url, &ident, &tmp.path().join("r"), &[]);
    assert_eq!(r.markers().0, want, "{}", r.stderr);
}

/// One streamer per archive: a second one (another slot, same archive) is
/// refused by the lease and writes nothing.
#[test]
fn a_second_streamer_on_the_same_archive_is_refused() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let url = file_archive(tmp.path());
    let (_ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    let s = Streamer::start(&c.dsn(), &url, &rcpt, tmp.path(), &[]);
    s.wait_log("streaming WAL", Duration::from_secs(30));
    let o = offsite()
        .args([
            "pg",
            "stream",
            "--dsn",
            &c.dsn(),
            "--replica",
            &url,
            "--age-recipient",
            &rcpt,
            "--slot",
            "second",
        ])
        .arg("--spool-dir")
        .arg(tmp.path().join("spool2"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a second streamer ran: {e}");
    assert!(e.contains("another offsite is shipping"), "{e}");
    assert_eq!(
        c.psql("select count(*) from pg_replication_slots where slot_name = 'second'"),
        "0"
    );
    s.stop();
}

/// `offsite sync WHAT --wait` against the daemon at `addr`; it must succeed.
fn sync_wait(addr: &str, what: &str, timeout: &str) {
    let o = offsite()
        .args([
            "sync",
            what,
            "--wait",
            "--listen",
            addr,
            "--timeout",
            timeout,
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "sync {what} --wait: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A loopback address nothing listens on.
fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// `offsite replicate --config CFG`, logging to a file beside it.
fn start_daemon(cfg: &std::path::Path) -> (std::process::Child, std::path::PathBuf) {
    let log = cfg.with_extension("log");
    let d = offsite()
        .args(["replicate", "--config"])
        .arg(cfg)
        .args(["--log-format", "text"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (d, log)
}

/// The value of metric `name` for database `db` in a /metrics page.
fn metric(m: &str, name: &str, db: &str) -> Option<f64> {
    m.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("db=\"{db}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One daemon, one config file, both engines: a SQLite database and a
/// PostgreSQL cluster (`engine = "postgres"`) on one listener. The cluster
/// is streamed, backed up, pruned by its window and drilled on schedule (a
/// real restore started and queried), and publishes the verified point;
/// both restore exactly.
#[test]
fn a_config_file_runs_sqlite_and_postgres_in_one_daemon() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let pg_url = file_archive(tmp.path());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    create_markers(&c);
    for i in 1..=5 {
        add_marker(&c, i);
    }
    let db = tmp.path().join("app.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.execute_batch("create table t(i integer primary key, v text)")
        .unwrap();
    let sq_url = format!("file://{}", tmp.path().join("sqlite-replica").display());
    let addr = free_addr();
    let cfg = tmp.path().join("offsite.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = "{addr}"
spool-dir = "{spool}"

[[database]]
path = "{db}"
sync-interval = "200ms"
[[database.replica]]
url = "{sq_url}"
age-recipients = ["{rcpt}"]

[[database]]
engine = "postgres"
name = "pgmain"
dsn = "{dsn}"
sync-interval = "200ms"
check-query = "select count(*) from markers"
[[database.replica]]
url = "{pg_url}"
age-recipients = ["{rcpt}"]
retention = "1h"
backup-retention = "1"
verify-interval = "2s"
verify-identity-file = "{ident}"
"#,
            spool = tmp.path().join("spool").display(),
            db = db.display(),
            dsn = c.dsn(),
            ident = ident.display(),
        ),
    )
    .unwrap();
    let (mut d, log) = start_daemon(&cfg);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    for i in 0..100 {
        conn.execute("insert into t(v) values (?1)", [format!("row {i}")])
            .unwrap();
    }
    // The drill ran, passed, and published the point it verified.
    crate::support::harness::wait_for("a passed restore drill", Duration::from_secs(180), || {
        if std::net::TcpStream::connect(&addr).is_err() {
            return false;
        }
        let (_, m) = get(&addr, "/metrics");
        assert_eq!(
            metric(&m, "offsite_drill_failures_total", "pgmain"),
            Some(0.0),
            "a drill failed:\n{}",
            log_text()
        );
        metric(
            &m,
            "offsite_verified_restore_point_timestamp_seconds",
            "pgmain",
        )
        .is_some_and(|v| v > 1.0e9)
    });
    let (_, m) = get(&addr, "/metrics");
    assert!(
        metric(
            &m,
            "offsite_pg_last_base_backup_timestamp_seconds",
            "pgmain"
        )
        .is_some_and(|v| v > 1.0e9),
        "{m}"
    );
    assert!(
        metric(&m, "offsite_last_drill_timestamp_seconds", "pgmain").is_some_and(|v| v > 1.0e9),
        "{m}"
    );
    assert!(!m.contains("postgres://"), "metrics carry the DSN: {m}");
    // `offsite sync NAME --wait` reaches the cluster's sidecar.
    add_marker(&c, 6);
    let (lsn, _) = current_lsn(&c);
    sync_wait(&addr, "pgmain", "30s");
    let b = backups(&pg_url);
    assert!(archive_reach(&pg_url, 1, b.last().unwrap().start_lsn) >= lsn - 1);
    sync_wait(&addr, db.to_str().unwrap(), "30s");
    sigterm(&d);
    let st = wait_timeout(&mut d, Duration::from_secs(60));
    assert!(st.success(), "daemon exited with {st}: {}", log_text());
    let text = log_text();
    assert!(text.contains("restore drill passed"), "{text}");

    // Both restore exactly.
    let out = tmp.path().join("restored.db");
    let r = crate::support::harness::restore(
        &sq_url,
        &out,
        &["--age-identity", &ident.display().to_string()],
    );
    assert!(r.ok(), "{}", r.stderr());
    let n: i64 = rusqlite::Connection::open(&out)
        .unwrap()
        .query_row("select count(*) from t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 100);
    let r = restore_started(&pg_url, &ident, &tmp.path().join("pgdata"), &[]);
    assert_eq!(r.markers().0, 6, "{}", r.stderr);
}

/// A drill whose check query fails is counted as failed, logged, and
/// publishes no verified point.
#[test]
fn a_failing_restore_drill_is_reported() {
    if !PgCluster::available() {
        return;
    }
    let tmp = tempdir();
    let pg_url = file_archive(tmp.path());
    let (ident, rcpt) = pg_keygen(tmp.path());
    let c = PgCluster::start(&[]);
    create_markers(&c);
    add_marker(&c, 1);
    let addr = free_addr();
    let cfg = tmp.path().join("offsite.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = "{addr}"
spool-dir = "{spool}"
[[database]]
engine = "postgres"
name = "pgfail"
dsn = "{dsn}"
check-query = "select * from no_such_table"
[[database.replica]]
url = "{pg_url}"
age-recipients = ["{rcpt}"]
verify-interval = "1s"
verify-identity-file = "{ident}"
"#,
            spool = tmp.path().join("spool").display(),
            dsn = c.dsn(),
            ident = ident.display(),
        ),
    )
    .unwrap();
    let (mut d, log) = start_daemon(&cfg);
    crate::support::harness::wait_for("a failed restore drill", Duration::from_secs(180), || {
        std::net::TcpStream::connect(&addr).is_ok()
            && metric(
                &get(&addr, "/metrics").1,
                "offsite_drill_failures_total",
                "pgfail",
            )
            .is_some_and(|v| v >= 1.0)
    });
    let (_, m) = get(&addr, "/metrics");
    assert_eq!(
        metric(
            &m,
            "offsite_verified_restore_point_timestamp_seconds",
            "pgfail"
        ),
        Some(0.0),
        "{m}"
    );
    sigterm(&d);
    let st = wait_timeout(&mut d, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{text}");
    assert!(
        text.contains("restore drill FAILED") && text.contains("no_such_table"),
        "{text}"
    );
}
