//! Running the real `offsite` and `offsite-workload` binaries in tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The shipper signing key every test's `offsite` runs with (a test key,
/// public here on purpose), and its verifying key, pinned by every test's
/// readers. Adversary tests use other keys explicitly.
pub const TEST_SIGNING_KEY: &str =
    "OFFSITE-SIGNING-KEY-1-1fe68baae7dc8c3de994e764a0e7e2136d195ce5137edca43bd2f9f1cf71b73d";
pub const TEST_VERIFY_KEY: &str =
    "offsite-vk1-be017f807e29b24ee8abeec3c41a7dfc3a97ce63f68ce7321c56a6556e61f42c";

pub fn offsite() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_offsite"));
    c.env("OFFSITE_LOG", "info,offsite=debug");
    c.env("OFFSITE_SIGNING_KEY", TEST_SIGNING_KEY);
    c.env("OFFSITE_VERIFY_KEY", TEST_VERIFY_KEY);
    c
}

/// The test shipper's signing key (for tests that run a `Replicator` in-process).
pub fn test_signer() -> std::sync::Arc<offsite::sign::Signer> {
    std::sync::Arc::new(offsite::sign::Signer::parse(TEST_SIGNING_KEY).unwrap())
}

/// A reader's trust in the test key (for tests that call the library).
pub fn test_trust() -> offsite::sign::Trust {
    offsite::sign::Trust::with_keys(vec![
        offsite::sign::PublicKey::parse(TEST_VERIFY_KEY).unwrap()
    ])
}

pub fn workload_cmd(db: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_offsite-workload"));
    c.arg(db);
    c
}

/// Run the workload to completion; panics on failure.
pub fn workload(db: &Path, args: &[&str]) {
    let out = workload_cmd(db).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "workload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where a test replicates to.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub url: String,
}

/// A `file://` replica in `dir` plus every configured S3 server (each with a
/// fresh prefix).
pub fn targets(dir: &Path) -> Vec<Target> {
    let mut v = vec![Target {
        name: "file".into(),
        url: format!("file://{}", dir.join("replica").display()),
    }];
    for t in super::s3_targets() {
        v.push(Target {
            name: t.name.clone(),
            url: t.url.clone(),
        });
    }
    v
}

/// The usual test setup: a temp dir holding `app.db`, a `file://` replica,
/// a writer log and an age key pair. Returns (guard, dir, url, db, log,
/// identity file, recipient).
pub fn file_fixture() -> (
    tempfile::TempDir,
    PathBuf,
    String,
    PathBuf,
    PathBuf,
    PathBuf,
    String,
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let url = format!("file://{}", dir.join("replica").display());
    let (key, rcpt) = keygen(&dir);
    (
        tmp,
        dir.clone(),
        url,
        dir.join("app.db"),
        dir.join("commits.log"),
        key,
        rcpt,
    )
}

/// A new identity; returns (identity file, recipient).
pub fn keygen(dir: &Path) -> (PathBuf, String) {
    let (p, r) = keygen_with(dir, &[]);
    assert!(r.starts_with("age1"), "recipient {r}");
    (p, r)
}

/// `offsite keygen -o DIR/key-….txt EXTRA…` (`--signing`, `--pin KEY`);
/// returns (key file, what it printed: the recipient or verifying key).
pub fn keygen_with(dir: &Path, extra: &[&str]) -> (PathBuf, String) {
    let p = dir.join(format!("key-{:08x}.txt", rand::random::<u32>()));
    let out = offsite()
        .arg("keygen")
        .arg("-o")
        .arg(&p)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (p, String::from_utf8(out.stdout).unwrap().trim().to_string())
}

pub struct Shipper {
    pub child: Child,
    pub log: PathBuf,
}

impl Shipper {
    pub fn start(db: &Path, url: &str, args: &[&str]) -> Shipper {
        let log = db.with_extension(format!("shipper-{:08x}.log", rand::random::<u32>()));
        let f = std::fs::File::create(&log).unwrap();
        let child = offsite()
            .arg("replicate")
            .arg(db)
            .arg(url)
            .args(["--sync-interval", "200ms", "--log-format", "text"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Shipper { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (at most 90 s; offsite's own shutdown timeout is 60 s).
    pub fn stop(mut self) -> (ExitStatus, String) {
        sigterm(&self.child);
        let st = wait_timeout(&mut self.child, Duration::from_secs(90));
        (st, self.log_text())
    }

    pub fn kill9(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log_text()
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send SIGTERM to `child` (offsite's graceful shutdown); does not wait.
pub fn sigterm(child: &Child) {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

pub fn wait_timeout(child: &mut Child, t: Duration) -> ExitStatus {
    let end = Instant::now() + t;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("process did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn list_json(url: &str) -> serde_json::Value {
    let out = offsite().args(["list", url, "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn latest_txid(url: &str) -> Option<u64> {
    list_json(url)["latest"]["txid"].as_u64()
}

/// Wait until `f` holds (polling every 100 ms), or panic after `t`. The
/// deadline is generous: a test waits for a condition, never for a time.
pub fn wait_for(what: &str, t: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + t;
    while !f() {
        if Instant::now() > end {
            panic!("timed out after {t:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait until the replica at `url` holds a txid above `after` and has stopped
/// moving (two listings in a row agree), i.e. the shipper has caught up with
/// what was committed so far. Returns the replica's latest txid.
pub fn wait_shipped(url: &str, after: Option<u64>, t: Duration) -> u64 {
    let mut last = None;
    let mut got = 0;
    wait_for(
        &format!("the replica {url} to move past txid {after:?} and settle"),
        t,
        || {
            let now = latest_txid(url);
            let settled = now.is_some() && now > after && now == last;
            last = now;
            got = now.unwrap_or(0);
            if !settled {
                std::thread::sleep(Duration::from_millis(150));
            }
            settled
        },
    );
    got
}

/// The ship-in-rounds fixture: a replica with one snapshot and several
/// segments. Writes 10 commits to `db`, starts a shipper to `url` with
/// `args`, then 4 times: 5 more commits and a wait until they are shipped
/// (each round its own segment); stops the shipper (exit 0). Returns the
/// shipper's log.
pub fn ship_in_rounds(db: &Path, url: &str, args: &[&str]) -> String {
    workload(db, &["--count", "10"]);
    let s = Shipper::start(db, url, args);
    let mut shipped = wait_shipped(url, None, Duration::from_secs(60));
    for _ in 0..4 {
        workload(db, &["--count", "5"]);
        shipped = wait_shipped(url, Some(shipped), Duration::from_secs(60));
    }
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    out
}

pub struct Restored {
    pub output: Output,
    pub txid: Option<u64>,
    pub time: Option<String>,
}

impl Restored {
    pub fn ok(&self) -> bool {
        self.output.status.success()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

/// `offsite restore URL -o OUT ARGS…`; parses "to txid N (TIME)" from stderr.
pub fn restore(url: &str, out: &Path, args: &[&str]) -> Restored {
    let output = offsite()
        .args(["restore", url, "-o"])
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    let mut txid = None;
    let mut time = None;
    if let Some(i) = err.find(" to txid ") {
        let rest = &err[i + 9..];
        let n: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        txid = n.parse().ok();
        if let (Some(a), Some(b)) = (rest.find('('), rest.find(')')) {
            time = Some(rest[a + 1..b].to_string());
        }
    }
    Restored { output, txid, time }
}

/// The last line of stderr (the one-line error of a failed command).
pub fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or("").to_string()
}
