//! Shared pieces of the PostgreSQL tests: an archive PostgreSQL's
//! restore_command can read, keys, the streaming sidecar, marker rows and
//! restores that start a server and count what is visible.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::harness::{offsite, sigterm, wait_timeout};
use crate::support::pgcluster::PgCluster;

/// A directory PostgreSQL's OS user can read (restore_command runs as
/// `postgres`): group postgres, set-group-id, so a file:// archive created
/// in it with `?file-mode=0640` is readable by the group.
pub fn shared_dir(parent: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = parent.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let st = Command::new("chgrp")
        .arg("postgres")
        .arg(&d)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o2750)).unwrap();
    d
}

/// A temp dir the postgres user can traverse.
pub fn tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

/// A file:// archive URL in `dir` readable by postgres.
pub fn file_archive(dir: &Path) -> String {
    let d = shared_dir(dir, "archive");
    format!("file://{}?file-mode=0640", d.display())
}

/// An age identity readable by postgres (tests only) and its recipient.
pub fn pg_keygen(dir: &Path) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let (p, r) = crate::support::harness::keygen(dir);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    (p, r)
}

/// `offsite pg stream` against `cluster`, logging to a file.
pub struct Streamer {
    pub child: Child,
    pub log: PathBuf,
}

impl Streamer {
    pub fn start(dsn: &str, url: &str, recipient: &str, dir: &Path, extra: &[&str]) -> Streamer {
        let log = dir.join(format!("stream-{:08x}.log", rand::random::<u32>()));
        let child = offsite()
            .args([
                "pg",
                "stream",
                "--dsn",
                dsn,
                "--replica",
                url,
                "--age-recipient",
                recipient,
            ])
            .args(if extra.contains(&"--sync-interval") {
                &[][..]
            } else {
                &["--sync-interval", "200ms"][..]
            })
            .args(["--log-format", "text"])
            .arg("--spool-dir")
            .arg(dir.join("spool"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Streamer { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(mut self) -> String {
        sigterm(&self.child);
        let st = wait_timeout(&mut self.child, Duration::from_secs(60));
        let log = self.log_text();
        assert!(st.success(), "offsite pg stream exited with {st}: {log}");
        log
    }

    pub fn kill9(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log_text()
    }

    /// Wait until the log says `what` (panics with the log after `t`).
    pub fn wait_log(&self, what: &str, t: Duration) {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if self.log_text().contains(what) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("streamer log never said {what:?}:\n{}", self.log_text());
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// How far the archive holds WAL continuously from `from` on `timeline`.
pub fn archive_reach(url: &str, timeline: u32, from: u64) -> u64 {
    use offsite::engine::postgres::{archive, restore};
    rt().block_on(async {
        let store = offsite::storage::open(&url.parse().unwrap()).await.unwrap();
        let pieces = archive::list_wal(store.as_ref(), None).await.unwrap();
        restore::archive_reach(&pieces, timeline, from)
    })
}

/// The archive's WAL pieces.
pub fn wal_pieces(url: &str) -> Vec<offsite::engine::postgres::archive::WalPiece> {
    rt().block_on(async {
        let store = offsite::storage::open(&url.parse().unwrap()).await.unwrap();
        offsite::engine::postgres::archive::list_wal(store.as_ref(), None)
            .await
            .unwrap()
    })
}

/// The archive's complete base backups (proven with the test key).
pub fn backups(url: &str) -> Vec<offsite::engine::postgres::archive::BackupInfo> {
    rt().block_on(async {
        let r = offsite::engine::postgres::Reader::open(
            &url.parse().unwrap(),
            crate::support::harness::test_trust(),
            None,
        )
        .await
        .unwrap();
        offsite::engine::postgres::archive::list_backups(r.store.as_ref(), &r.trust)
            .await
            .unwrap()
            .0
    })
}

/// The server's current WAL insert position and timeline.
pub fn current_lsn(c: &PgCluster) -> (u64, u32) {
    let out =
        c.psql("select pg_current_wal_insert_lsn(), timeline_id from pg_control_checkpoint()");
    let (l, t) = out.split_once('|').unwrap();
    (
        offsite::engine::postgres::walname::parse_lsn(l).unwrap(),
        t.parse().unwrap(),
    )
}

/// Wait until the archive holds WAL continuously from the newest backup's
/// start up to the server's current insert position.
pub fn wait_archived(c: &PgCluster, url: &str, t: Duration) -> u64 {
    let (lsn, tli) = current_lsn(c);
    let end = Instant::now() + t;
    loop {
        let b = backups(url);
        if let Some(b) = b.last() {
            let reach = archive_reach(url, tli.min(b.timeline).max(b.timeline), b.start_lsn);
            if reach >= lsn {
                return lsn;
            }
        }
        assert!(Instant::now() < end, "the archive never reached {lsn:#x}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One marker row per transaction, with what identifies the point right
/// after it: its xid, the WAL position and the time after its commit.
#[derive(Debug, Clone)]
pub struct Marker {
    pub xid: String,
    pub lsn_after: String,
    pub time_after: String,
}

pub fn create_markers(c: &PgCluster) {
    c.psql("create table if not exists markers(i int primary key, at timestamptz default clock_timestamp())");
}

pub fn add_marker(c: &PgCluster, i: i32) -> Marker {
    let xid = c.psql(&format!(
        "insert into markers(i) values ({i}) returning pg_current_xact_id()"
    ));
    let after = c.psql(
        "select pg_current_wal_insert_lsn(), to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    let (lsn_after, time_after) = after.split_once('|').unwrap();
    Marker {
        xid,
        lsn_after: lsn_after.to_string(),
        time_after: time_after.to_string(),
    }
}

/// A restored, running server (stopped on drop).
pub struct Restored {
    pub data: PathBuf,
    pub port: u16,
    pub bin: PathBuf,
    pub stderr: String,
}

impl Restored {
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// (rows, highest marker) visible.
    pub fn markers(&self) -> (i64, i64) {
        let out = self.psql("select count(*), coalesce(max(i), 0) from markers");
        let (a, b) = out.split_once('|').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        PgCluster::stop_data_dir(&self.bin, &self.data);
    }
}

/// The shipper's signing key in a file only root can read, as a shipper
/// host would have it in its environment (OFFSITE_SIGNING_KEY_FILE).
fn root_only_signing_key() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let p =
            std::env::temp_dir().join(format!("offsite-test-signing-{}.key", std::process::id()));
        std::fs::write(
            &p,
            format!("{}\n", crate::support::harness::TEST_SIGNING_KEY),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    })
    .clone()
}

/// `offsite restore URL -o OUT --start ARGS…`; panics with its output on
/// failure. Run with the shipper's signing key file in the environment,
/// unreadable by PostgreSQL's user: the started server's restore_command
/// must neither inherit nor need it.
pub fn restore_started(url: &str, identity: &Path, out: &Path, args: &[&str]) -> Restored {
    let o = offsite()
        .env("OFFSITE_SIGNING_KEY_FILE", root_only_signing_key())
        .args(["restore", url, "-o"])
        .arg(out)
        .arg("--age-identity")
        .arg(identity)
        .args(["--start", "--recovery-timeout", "60s"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "restore {args:?} failed: {stderr}");
    let port = stderr
        .split("(port ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no port in {stderr}"));
    Restored {
        data: out.to_path_buf(),
        port,
        bin: PgCluster::bin_dir().unwrap(),
        stderr,
    }
}
