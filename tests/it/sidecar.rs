//! offsite as a sidecar: the HTTP listener (/metrics, /readyz, /healthz,
//! POST /sync), graceful shutdown, `--exec`, restore for init containers,
//! directory discovery, and logs that never carry a secret. Every test runs
//! the real binary against real SQLite files and a real S3 server.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use support::harness::{self, offsite, sigterm, wait_for, wait_timeout, workload, workload_cmd};
use support::private_s3::PrivateS3;

/// `GET`/`POST` on the daemon's listener: (status, body).
fn http(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(90))).ok()?;
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    let (head, body) = s.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The value of `name{db=…,replica=…}` in a scrape.
fn metric(text: &str, name: &str, db: &Path) -> Option<f64> {
    let want = format!("db=\"{}\"", db.display());
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(&want))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn scrape(addr: &str) -> String {
    let (code, body) = http(addr, "GET", "/metrics").expect("scrape /metrics");
    assert_eq!(code, 200, "{body}");
    body
}

fn ready(addr: &str) -> Option<u16> {
    http(addr, "GET", "/readyz").map(|(c, _)| c)
}

/// `offsite replicate ARGS…` with its log in `log`.
fn daemon(args: &[&str], log: &Path, envs: &[(&str, &str)]) -> Child {
    offsite()
        .arg("replicate")
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn metrics_and_readiness_follow_the_store_going_away_and_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut s3 = PrivateS3::start(dir);
    let url = s3.url("app");
    let db = dir.join("app.db");
    workload(&db, &["--count", "1"]);
    let addr = free_addr();
    let log = dir.join("daemon.log");
    let mut d = daemon(
        &[
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--listen",
            &addr,
            "--max-lag",
            "2s",
            "--sync-interval",
            "200ms",
        ],
        &log,
        &[],
    );
    wait_for("/healthz", Duration::from_secs(30), || {
        http(&addr, "GET", "/healthz").is_some_and(|(c, b)| c == 200 && b == "ok\n")
    });
    wait_for("ready", Duration::from_secs(30), || {
        ready(&addr) == Some(200)
    });
    let mut writer = workload_cmd(&db)
        .args(["--count", "1000000", "--rate", "20"])
        .spawn()
        .unwrap();
    let mut m = String::new();
    wait_for("20 commits shipped", Duration::from_secs(60), || {
        m = scrape(&addr);
        metric(&m, "offsite_shipped_txid", &db).unwrap_or(0.0) >= 20.0
    });
    assert!(
        metric(&m, "offsite_segments_shipped_total", &db).unwrap() >= 2.0,
        "{m}"
    );
    let raw = metric(&m, "offsite_shipped_raw_bytes_total", &db).unwrap();
    let stored = metric(&m, "offsite_shipped_stored_bytes_total", &db).unwrap();
    assert!(raw > 0.0 && stored > 0.0, "{m}");
    assert_eq!(metric(&m, "offsite_snapshots_total", &db), Some(1.0), "{m}");
    assert!(
        metric(&m, "offsite_wal_size_bytes", &db).unwrap() > 0.0,
        "{m}"
    );
    assert!(
        metric(&m, "offsite_last_upload_timestamp_seconds", &db).unwrap() > 1.7e9,
        "{m}"
    );
    assert!(
        metric(&m, "offsite_replication_lag_seconds", &db).unwrap() < 2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "offsite_upload_errors_total", &db),
        Some(0.0),
        "{m}"
    );
    assert!(
        m.contains("offsite_requests_total{") && m.contains("kind=\"put\""),
        "{m}"
    );

    // The store goes away: lag grows past max-lag, readiness flips, errors count.
    s3.stop();
    wait_for("lag above 2 s", Duration::from_secs(60), || {
        m = scrape(&addr);
        metric(&m, "offsite_replication_lag_seconds", &db).unwrap_or(0.0) > 2.0
    });
    wait_for("not ready", Duration::from_secs(30), || {
        ready(&addr) == Some(503)
    });
    let (_, why) = http(&addr, "GET", "/readyz").unwrap();
    assert!(why.contains("behind"), "{why}");
    let lag_during = metric(&m, "offsite_replication_lag_seconds", &db).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    m = scrape(&addr);
    assert!(metric(&m, "offsite_replication_lag_seconds", &db).unwrap() > lag_during);
    assert!(
        metric(&m, "offsite_upload_errors_total", &db).unwrap() >= 1.0,
        "{m}"
    );
    // The application is never blocked while the store is down.
    assert!(writer.try_wait().unwrap().is_none(), "the writer stopped");
    writer.kill().unwrap();
    writer.wait().unwrap();

    // The store returns: everything is shipped, lag is 0, ready again.
    s3.resume();
    wait_for("lag back to 0", Duration::from_secs(120), || {
        m = scrape(&addr);
        metric(&m, "offsite_replication_lag_seconds", &db) == Some(0.0)
    });
    wait_for("ready again", Duration::from_secs(30), || {
        ready(&addr) == Some(200)
    });
    let shipped = metric(&m, "offsite_shipped_txid", &db).unwrap() as u64;
    assert_eq!(harness::latest_txid(&url), Some(shipped));
    // Within max-wal-size the outage left no gap: still one lineage.
    let l = harness::list_json(&url);
    assert_eq!(l["lineages"].as_array().unwrap().len(), 1, "{l}");
    assert_eq!(metric(&m, "offsite_lineage_breaks_total", &db), Some(0.0));
    assert_eq!(metric(&m, "offsite_wal_overflows_total", &db), Some(0.0));
    sigterm(&d);
    assert!(wait_timeout(&mut d, Duration::from_secs(90)).success());
    let want = offsite::workload::verify(&db).unwrap();
    let out = dir.join("restored.db");
    let r = harness::restore(&url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(
        offsite::workload::verify(&out).unwrap(),
        want,
        "every commit made during the outage is in the replica"
    );
}

#[test]
fn sigterm_ships_the_last_commit_and_sync_wait_returns_once_durable() {
    let s3 = support::s3_target("garage");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = match &s3 {
        Some(t) => t.url.clone(),
        None => format!("file://{}", dir.join("replica").display()),
    };
    let db = dir.join("app.db");
    workload(&db, &["--count", "5"]);
    let addr = free_addr();
    let log = dir.join("daemon.log");
    // An hour between uploads: only `sync` and shutdown ship.
    let mut d = daemon(
        &[
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--listen",
            &addr,
            "--sync-interval",
            "1h",
        ],
        &log,
        &[],
    );
    wait_for("the first snapshot", Duration::from_secs(60), || {
        harness::list_json(&url)["latest"]["txid"]
            .as_u64()
            .is_some()
    });
    let before = harness::latest_txid(&url).unwrap();
    workload(&db, &["--count", "7"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        harness::latest_txid(&url),
        Some(before),
        "nothing ships by itself within the hour"
    );
    let out = offsite()
        .args(["sync", db.to_str().unwrap(), "--wait", "--listen", &addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // On return the objects are in the bucket: a listing sees the commits.
    let after = harness::latest_txid(&url).unwrap();
    assert_eq!(
        after,
        before + 7,
        "sync --wait returned before the commits were durable"
    );
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        reply["replicas"][0]["txid"].as_u64(),
        Some(after),
        "{reply}"
    );

    // A database the daemon does not replicate: a clear error.
    let out = offsite()
        .args(["sync", "/nonexistent/x.db", "--wait", "--listen", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not replicated by this offsite"));

    // SIGTERM right after a commit: it is shipped before exit 0.
    workload(&db, &["--count", "3"]);
    sigterm(&d);
    let st = wait_timeout(&mut d, Duration::from_secs(90));
    assert!(st.success(), "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(harness::latest_txid(&url), Some(after + 3));
    let restored = dir.join("r.db");
    let r = harness::restore(&url, &restored, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(offsite::workload::verify(&restored).unwrap(), 15);

    // No daemon listening: sync says where it looked.
    let out = offsite()
        .args(["sync", db.to_str().unwrap(), "--wait", "--listen", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the offsite daemon"));
}

/// `POST /sync` takes nothing on trust: a timeout that is not a sane
/// number of seconds is a 400 (not a panicked handler), an unknown database
/// a 404 that lists no configured path, and waiting requests beyond the cap
/// a 503 with Retry-After. The listener serves on after each.
#[test]
fn sync_requests_are_checked_and_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The database does not exist yet: the replicator waits for it, so a
    // waiting sync request waits until its timeout.
    let db = dir.join("secret-app-name.db");
    let url = format!("file://{}", dir.join("replica").display());
    let addr = free_addr();
    let log = dir.join("daemon.log");
    let mut d = daemon(
        &[
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--listen",
            &addr,
        ],
        &log,
        &[],
    );
    wait_for("/healthz", Duration::from_secs(30), || {
        http(&addr, "GET", "/healthz").is_some_and(|(c, _)| c == 200)
    });
    let q: String = url::form_urlencoded::byte_serialize(db.to_str().unwrap().as_bytes()).collect();
    let sync = |rest: &str| format!("/sync?db={q}&{rest}");

    for t in ["NaN", "inf", "-inf", "-1", "1e400", "86400", "soon"] {
        let (code, body) = http(&addr, "POST", &sync(&format!("wait=1&timeout={t}")))
            .unwrap_or_else(|| panic!("timeout={t}: no answer (handler died?)"));
        assert_eq!(code, 400, "timeout={t}: {body}");
        assert!(body.contains("timeout must be"), "timeout={t}: {body}");
        let (code, _) = http(&addr, "GET", "/healthz").expect("still serving");
        assert_eq!(code, 200, "after timeout={t}");
    }

    let (code, body) = http(&addr, "POST", "/sync?db=%2Fnonexistent%2Fx.db&wait=1").unwrap();
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("not replicated by this offsite"), "{body}");
    assert!(
        !body.contains("secret-app-name") && !body.contains(dir.to_str().unwrap()),
        "the 404 tells a stranger which databases exist: {body}"
    );

    // 64 requests wait (each on a connection of its own); the next is refused.
    let open = |waiting: &mut Vec<TcpStream>| {
        let mut c = TcpStream::connect(&addr).unwrap();
        write!(
            c,
            "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            sync("wait=1&timeout=120")
        )
        .unwrap();
        c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        waiting.push(c);
    };
    let mut waiting = Vec::new();
    let mut refused = None;
    wait_for(
        "a request beyond the cap refused",
        Duration::from_secs(60),
        || {
            // The server takes the connections in any order: one of the 64 may
            // have been refused while a probe below held a place. Replace it.
            waiting.retain_mut(|c: &mut TcpStream| c.read(&mut [0u8; 64]).is_err());
            while waiting.len() < 64 {
                open(&mut waiting);
            }
            // (Until all 64 hold their place, the probe just times out.)
            let r = http(&addr, "POST", &sync("wait=1&timeout=0.2")).unwrap();
            let done = r.0 == 503;
            refused = Some(r);
            done
        },
    );
    let (_, body) = refused.unwrap();
    assert!(
        body.contains("too many sync requests are waiting"),
        "{body}"
    );
    // A sync that does not wait, and the other endpoints, still answer.
    let (code, body) = http(&addr, "POST", &sync("wait=0")).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(http(&addr, "GET", "/healthz").unwrap().0, 200);

    // Shutdown with requests waiting: prompt, clean.
    sigterm(&d);
    let st = wait_timeout(&mut d, Duration::from_secs(60));
    assert!(st.success(), "{}", std::fs::read_to_string(&log).unwrap());
    drop(waiting);
}

#[test]
fn exec_runs_the_application_and_exits_with_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    workload(&db, &["--count", "1"]);
    let wl = env!("CARGO_BIN_EXE_offsite-workload");
    // The application commits 20 times and exits 7: offsite ships the last
    // commits and exits 7 too.
    let cmd = format!("sh -c '{wl} {} --count 20 && exit 7'", db.display());
    let log = dir.join("daemon.log");
    let mut d = daemon(
        &[
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--sync-interval",
            "1h",
            "--exec",
            &cmd,
        ],
        &log,
        &[],
    );
    let st = wait_timeout(&mut d, Duration::from_secs(90));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(st.code(), Some(7), "{text}");
    let out = dir.join("r.db");
    let r = harness::restore(&url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(
        offsite::workload::verify(&out).unwrap(),
        21,
        "the application's last commits were shipped"
    );

    // Signals go to the application; its death by SIGTERM is 128+15.
    let log2 = dir.join("daemon2.log");
    let mut d = daemon(
        &[
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--exec",
            "sleep 60",
        ],
        &log2,
        &[],
    );
    wait_for("the application to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&log2)
            .unwrap()
            .contains("started the application")
    });
    sigterm(&d);
    let st = wait_timeout(&mut d, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(st.code(), Some(143), "{text}");
    assert!(text.contains("forwarding the signal"), "{text}");

    // A command that cannot start: a clear error, non-zero.
    let out = offsite()
        .args([
            "replicate",
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--exec",
            "/nonexistent/app",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot start \"/nonexistent/app\""));
}

#[test]
fn exec_child_gets_no_aws_or_offsite_variables_and_its_command_line_is_not_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    workload(&db, &["--count", "1"]);
    let env_file = dir.join("child.env");
    // The application writes its environment out; its command line carries
    // a (pretend) secret argument.
    let cmd = format!(
        "sh -c 'env > \"$0\"' {} --db-password=Xk4PretendArgSecret",
        env_file.display()
    );
    let log = dir.join("daemon.log");
    let mut d = daemon(
        &[
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--sync-interval",
            "1h",
            "--exec",
            &cmd,
        ],
        &log,
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAEXECTESTKEY"),
            ("AWS_SECRET_ACCESS_KEY", "exec/test+Secret"),
            ("AWS_SESSION_TOKEN", "exec-session-token"),
            ("AWS_REGION", "eu-west-1"),
            ("aws_secret_access_key", "lower-case-too"),
            ("OFFSITE_TEST_MARKER", "offsite-only"),
            ("APP_SETTING", "kept-value"),
            ("MY_AWS_THING", "kept-too"),
        ],
    );
    let st = wait_timeout(&mut d, Duration::from_secs(90));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{text}");
    let env = std::fs::read_to_string(&env_file).unwrap();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    for n in &names {
        let up = n.to_ascii_uppercase();
        assert!(
            !up.starts_with("AWS_") && !up.starts_with("OFFSITE_"),
            "the application inherited {n}:\n{env}"
        );
    }
    for v in [
        "AKIAEXECTESTKEY",
        "exec/test+Secret",
        "exec-session-token",
        "offsite-only",
    ] {
        assert!(!env.contains(v), "{v} reached the application:\n{env}");
    }
    assert!(env.lines().any(|l| l == "APP_SETTING=kept-value"), "{env}");
    assert!(env.lines().any(|l| l == "MY_AWS_THING=kept-too"), "{env}");
    assert!(names.contains(&"PATH"), "{env}");
    // The log names the program, never the command line.
    let started = text
        .lines()
        .find(|l| l.contains("started the application"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(started.contains("sh"), "{started}");
    assert!(!text.contains("Xk4PretendArgSecret"), "{text}");
    assert!(!text.contains("env >"), "{text}");

    // A command that cannot be split is refused without echoing it.
    let out = offsite()
        .args([
            "replicate",
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--exec",
            "app --password='Xk4Unterminated",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("quotes"), "{err}");
    assert!(!err.contains("Xk4Unterminated"), "{err}");
}

#[test]
fn init_container_restore_then_replication_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let (key, rcpt) = harness::keygen(dir);
    let db = dir.join("app.db");
    let fresh = dir.join("pod2").join("app.db");
    std::fs::create_dir_all(fresh.parent().unwrap()).unwrap();

    // No backup yet: --if-replica-exists does nothing, successfully.
    let r = harness::restore(
        &url,
        &fresh,
        &[
            "--if-replica-exists",
            "--age-identity",
            key.to_str().unwrap(),
        ],
    );
    assert!(r.ok(), "{}", r.stderr());
    assert!(r.stderr().contains("holds no backup"));
    assert!(!fresh.exists());
    // An unreachable replica is not "no backup".
    let bad = "s3://b/x?endpoint=http://127.0.0.1:9&region=r&force-path-style=true";
    let r = harness::restore(bad, &fresh, &["--if-replica-exists"]);
    assert!(
        !r.ok(),
        "an unreachable replica must fail the init container"
    );

    workload(&db, &["--count", "10"]);
    let s = harness::Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    wait_for(
        "the first snapshot (txid 1: the 10 commits made before)",
        Duration::from_secs(60),
        || harness::latest_txid(&url).is_some(),
    );
    let (st, _) = s.stop();
    assert!(st.success());

    // A new pod: the init container restores; a second run leaves it alone.
    let r = harness::restore(
        &url,
        &fresh,
        &[
            "--if-db-not-exists",
            "--if-replica-exists",
            "--age-identity",
            key.to_str().unwrap(),
        ],
    );
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(offsite::workload::verify(&fresh).unwrap(), 10);
    let before = std::fs::read(&fresh).unwrap();
    let r = harness::restore(
        &url,
        &fresh,
        &[
            "--if-db-not-exists",
            "--age-identity",
            key.to_str().unwrap(),
        ],
    );
    assert!(r.ok(), "{}", r.stderr());
    assert!(r.stderr().contains("exists; nothing restored"));
    assert_eq!(
        std::fs::read(&fresh).unwrap(),
        before,
        "an existing database is never overwritten"
    );

    // replicate --restore-if-db-not-exists on a third pod: restores, then
    // carries the lineage forward (new commits land in the same replica).
    let third = dir.join("pod3").join("app.db");
    std::fs::create_dir_all(third.parent().unwrap()).unwrap();
    let log = dir.join("pod3.log");
    let mut d = daemon(
        &[
            third.to_str().unwrap(),
            &url,
            "--age-recipient",
            &rcpt,
            "--restore-if-db-not-exists",
            "--age-identity",
            key.to_str().unwrap(),
            "--sync-interval",
            "200ms",
        ],
        &log,
        &[],
    );
    wait_for("the restore", Duration::from_secs(60), || {
        third.exists()
            && std::fs::read_to_string(&log)
                .unwrap()
                .contains("restored the missing database")
    });
    workload(&third, &["--count", "5"]);
    wait_for("the new commits shipped", Duration::from_secs(60), || {
        harness::latest_txid(&url).is_some_and(|t| t >= 6)
    });
    sigterm(&d);
    assert!(wait_timeout(&mut d, Duration::from_secs(90)).success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lineages = harness::list_json(&url)["lineages"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        lineages, 1,
        "replication continued the restored lineage: {text}"
    );
    let out = dir.join("final.db");
    let r = harness::restore(&url, &out, &["--age-identity", key.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(offsite::workload::verify(&out).unwrap(), 15);
}

#[test]
fn directory_discovery_follows_databases_that_come_and_go() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tenants = dir.join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    let backups = dir.join("backups");
    workload(&tenants.join("a.db"), &["--count", "3"]);
    std::fs::write(tenants.join("notes.txt"), "not a database").unwrap();
    std::fs::write(tenants.join("fake.db"), "not a database either").unwrap();
    let addr = free_addr();
    let cfg = dir.join("offsite.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = "{addr}"
sync-interval = "200ms"

[[database]]
dir = "{}"
pattern = "*.db"

  [[database.replica]]
  url = "file://{}"
  encryption = "none"
"#,
            tenants.display(),
            backups.display()
        ),
    )
    .unwrap();
    let log = dir.join("daemon.log");
    let mut d = daemon(&["--config", cfg.to_str().unwrap()], &log, &[]);
    let url_of = |n: &str| format!("file://{}", backups.join(n).display());
    wait_for("a.db replicated", Duration::from_secs(60), || {
        backups.join("a.db").exists() && harness::latest_txid(&url_of("a.db")).is_some()
    });
    // A database that appears later is picked up.
    workload(&tenants.join("b.db"), &["--count", "4"]);
    let b_url = url_of("b.db");
    let b_out = dir.join("b-first.db");
    wait_for(
        "b.db replicated with its 4 commits",
        Duration::from_secs(60),
        || {
            backups.join("b.db").exists()
                && harness::latest_txid(&b_url).is_some()
                && harness::restore(&b_url, &b_out, &["--force"]).ok()
                && offsite::workload::verify(&b_out).ok() == Some(4)
        },
    );
    let b_txid = harness::latest_txid(&b_url).unwrap();
    let m = scrape(&addr);
    assert!(m.contains("offsite_databases 2"), "{m}");
    assert!(
        !backups.join("fake.db").exists(),
        "a file that is not SQLite is skipped"
    );
    // A deleted database stops cleanly; the others go on.
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", tenants.join("a.db").display()));
    }
    wait_for("a.db dropped", Duration::from_secs(30), || {
        scrape(&addr).contains("offsite_databases 1")
    });
    workload(&tenants.join("b.db"), &["--count", "2"]);
    wait_for("b.db goes on", Duration::from_secs(60), || {
        harness::latest_txid(&b_url).is_some_and(|t| t >= b_txid + 2)
    });
    assert_eq!(ready(&addr), Some(200));
    // `restore --config` finds a discovered database's own replica.
    let out = dir.join("b-restored.db");
    let o = offsite()
        .args(["restore", "--config", cfg.to_str().unwrap()])
        .arg(tenants.join("b.db"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(offsite::workload::verify(&out).unwrap(), 6);
    sigterm(&d);
    let st = wait_timeout(&mut d, Duration::from_secs(90));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "{text}");
    assert!(text.contains("database removed"), "{text}");
}

#[test]
fn no_secret_appears_in_logs_or_metrics() {
    let Some(s3) = support::s3_target("garage") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (key, rcpt) = harness::keygen(dir);
    let (drill_key, drill_rcpt) = harness::keygen(dir);
    let identity = std::fs::read_to_string(&key).unwrap();
    let drill_identity = std::fs::read_to_string(&drill_key).unwrap();
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    let db = dir.join("app.db");
    workload(&db, &["--count", "5"]);
    let addr = free_addr();
    let cfg = dir.join("offsite.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = "{addr}"
sync-interval = "200ms"

[[database]]
path = "{}"

  [[database.replica]]
  url = "{}"
  age-recipients = ["{rcpt}", "{drill_rcpt}"]
  age-identity-files = ["{}"]
  verify-interval = "1s"
  verify-identity-file = "{}"
"#,
            db.display(),
            s3.url,
            key.display(),
            drill_key.display()
        ),
    )
    .unwrap();
    let log = dir.join("daemon.log");
    // Everything at debug, the SDK included, in JSON.
    let mut d = offsite()
        .args([
            "replicate",
            "--config",
            cfg.to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .env("OFFSITE_LOG", "debug")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("a restore drill", Duration::from_secs(90), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("restore drill passed")
    });
    workload(&db, &["--count", "5"]);
    let out = offsite()
        .args([
            "sync",
            db.to_str().unwrap(),
            "--wait",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = scrape(&addr);
    assert!(
        metric(&m, "offsite_verified_txid", &db).unwrap() >= 1.0,
        "{m}"
    );
    let (_, ready_text) = http(&addr, "GET", "/readyz").unwrap();
    sigterm(&d);
    assert!(wait_timeout(&mut d, Duration::from_secs(90)).success());
    // A restore at debug level, which reads the identity.
    let r = offsite()
        .args([
            "restore",
            "--config",
            cfg.to_str().unwrap(),
            db.to_str().unwrap(),
            "-o",
        ])
        .arg(dir.join("r.db"))
        .env("OFFSITE_LOG", "debug")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = std::fs::read_to_string(&log).unwrap();
    let all = format!(
        "{text}\n{m}\n{ready_text}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let secret_key_lines: Vec<&str> = identity
        .lines()
        .chain(drill_identity.lines())
        .filter(|l| l.starts_with("AGE-SECRET-KEY-"))
        .collect();
    assert_eq!(secret_key_lines.len(), 2);
    for s in secret_key_lines.iter().copied().chain([secret.as_str()]) {
        assert!(!all.contains(s), "a secret leaked into the logs or metrics");
    }
    assert!(!all.contains("AGE-SECRET-KEY"), "an identity leaked");
    // JSON lines, with database and replica fields on the replicator's lines.
    let mut with_fields = 0;
    for l in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        let has = |k: &str| {
            v.get(k).is_some() || v["span"].get(k).is_some() || v["fields"].get(k).is_some()
        };
        if has("db") && has("replica") {
            with_fields += 1;
        }
    }
    assert!(with_fields > 5, "{text}");
}

#[test]
fn waits_for_a_database_the_application_has_not_created_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("later.db");
    let addr = free_addr();
    let log = dir.join("daemon.log");
    let mut d = daemon(
        &[
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--listen",
            &addr,
            "--max-lag",
            "1s",
        ],
        &log,
        &[],
    );
    wait_for("the waiting line", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("waiting for the database to be created")
    });
    // A database that does not appear within max-lag makes the sidecar not
    // ready (a wrong path must not look healthy).
    wait_for("not ready while waiting", Duration::from_secs(30), || {
        http(&addr, "GET", "/readyz")
            .is_some_and(|(c, b)| c == 503 && b.contains("does not exist yet"))
    });
    workload(&db, &["--count", "3"]);
    let out = dir.join("r.db");
    wait_for(
        "the new database replicated",
        Duration::from_secs(60),
        || {
            harness::restore(&url, &out, &["--force"]).ok()
                && offsite::workload::verify(&out).ok() == Some(3)
        },
    );
    sigterm(&d);
    assert!(wait_timeout(&mut d, Duration::from_secs(60)).success());
}

/// A writer that outruns the shipper is reported before `max-wal-size`
/// would end the lineage (issue 13): a metric, and a log line with both
/// rates. Shipping is made slow on purpose: 1 MB segments (a test knob)
/// through a proxy that holds every upload's answer for 400 ms, so offsite
/// ships under ~2.5 MB/s while the writer commits ~4 MB/s. Once the writer
/// stops and the store is fast again it catches up, says so, and every
/// commit restores.
#[test]
fn a_writer_outrunning_the_shipper_is_reported_with_both_rates() {
    use support::fault_proxy::{Fault, FaultProxy, Scope};
    let Some(t) = support::s3_target("garage") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("app.db");
    workload(&db, &["--count", "1"]);
    let (proxy, url) = FaultProxy::in_front_of(&t.url);
    let addr = free_addr();
    let log = dir.join("daemon.log");
    let mut d = daemon(
        &[
            db.to_str().unwrap(),
            &url,
            "--no-encryption",
            "--listen",
            &addr,
            "--sync-interval",
            "100ms",
            "--log-format",
            "text",
        ],
        &log,
        &[("OFFSITE_TEST_MAX_SEGMENT_BYTES", "1000000")],
    );
    wait_for("the snapshot", Duration::from_secs(60), || {
        http(&addr, "GET", "/metrics")
            .is_some_and(|(_, m)| metric(&m, "offsite_snapshots_total", &db) == Some(1.0))
    });
    proxy.set_scoped(Scope::Writes, Fault::Delay(Duration::from_millis(400)));
    // 4 commits of ~1 MB a second for 40 s.
    let mut writer = workload_cmd(&db)
        .args(["--count", "160", "--rate", "4", "--big-every", "1"])
        .args(["--big-bytes", "1000000"])
        .spawn()
        .unwrap();
    let mut m = String::new();
    wait_for("offsite_shipping_behind 1", Duration::from_secs(60), || {
        m = scrape(&addr);
        metric(&m, "offsite_shipping_behind", &db) == Some(1.0)
    });
    let write = metric(&m, "offsite_write_rate_bytes", &db).unwrap();
    let ship = metric(&m, "offsite_ship_rate_bytes", &db).unwrap();
    let backlog = metric(&m, "offsite_unshipped_bytes", &db).unwrap();
    eprintln!("behind: write {write:.0} B/s, ship {ship:.0} B/s, unshipped {backlog:.0} B");
    assert!(write > ship && ship > 0.0, "{m}");
    assert!(write > 2e6 && write < 8e6, "the writer's ~4 MB/s: {m}");
    assert!(backlog >= 8.0 * 1024.0 * 1024.0, "{m}");
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("shipping cannot keep up with the writer"))
        .unwrap_or_else(|| panic!("no warning in the log:\n{text}"));
    assert!(
        line.contains("write_mb_s=")
            && line.contains("ship_mb_s=")
            && line.contains("max-wal-size in"),
        "{line}"
    );
    assert_eq!(
        metric(&m, "offsite_upload_errors_total", &db),
        Some(0.0),
        "slow is not failing: {m}"
    );

    assert!(writer.wait().unwrap().success());
    proxy.pass();
    wait_for("caught up", Duration::from_secs(120), || {
        m = scrape(&addr);
        metric(&m, "offsite_shipping_behind", &db) == Some(0.0)
            && metric(&m, "offsite_unshipped_bytes", &db) == Some(0.0)
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("shipping caught up with the writer"),
        "{text}"
    );
    sigterm(&d);
    assert!(wait_timeout(&mut d, Duration::from_secs(60)).success());
    let out = dir.join("restored.db");
    let r = harness::restore(&url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(offsite::workload::verify(&out).unwrap(), 161);
}
