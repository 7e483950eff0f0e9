//! Throwaway PostgreSQL clusters for tests (docs: /work/shared/POSTGRES.md
//! facts). The server binaries live in Debian's versioned directory
//! (`/usr/lib/postgresql/<major>/bin`); `initdb` and `pg_ctl` refuse to
//! run as root, so as root they run as the `postgres` user and the cluster's
//! temporary directory belongs to it. Client tools (psql) run as we are.
//!
//! Tests that need a server call [`PgCluster::available`] first and return
//! early (with a warning) when there is none, unless
//! `OFFSITE_TEST_REQUIRE_PG=1`, which makes a missing server a failure.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Set to `1` to fail (instead of skip) tests when PostgreSQL is missing.
pub const REQUIRE_PG_ENV: &str = "OFFSITE_TEST_REQUIRE_PG";

/// A running PostgreSQL cluster in a temporary directory, stopped
/// (immediately) and removed on drop.
pub struct PgCluster {
    /// Holds the data directory, the socket directory and the server log.
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
    /// The server binaries' directory.
    pub bin: PathBuf,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Run `cmd` as the `postgres` OS user when we are root (`runuser -u
/// postgres --`), else as ourselves. Returns its output; panics if it
/// cannot be started.
pub fn run_as_postgres(cmd: &mut Command) -> Output {
    let out = if is_root() {
        let mut wrapped = Command::new("runuser");
        wrapped.args(["-u", "postgres", "--"]);
        wrapped.arg(cmd.get_program()).args(cmd.get_args());
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        wrapped.output()
    } else {
        cmd.output()
    };
    out.unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()))
}

/// Give `path` (recursively) to the `postgres` user when we are root.
fn chown_to_postgres(path: &Path) {
    if !is_root() {
        return;
    }
    let out = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .output()
        .expect("run chown");
    assert!(
        out.status.success(),
        "chown -R postgres {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

fn stderr_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl PgCluster {
    /// The highest-versioned `/usr/lib/postgresql/<major>/bin` with initdb.
    pub fn bin_dir() -> Option<PathBuf> {
        let mut best: Option<(u32, PathBuf)> = None;
        for entry in std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
            let Some(major) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let bin = entry.path().join("bin");
            if bin.join("initdb").is_file()
                && bin.join("pg_ctl").is_file()
                && best.as_ref().is_none_or(|(m, _)| major > *m)
            {
                best = Some((major, bin));
            }
        }
        best.map(|(_, b)| b)
    }

    /// Whether clusters can be started here. When not: warns and returns
    /// false, or panics with `OFFSITE_TEST_REQUIRE_PG=1`.
    pub fn available() -> bool {
        let why = match Self::bin_dir() {
            None => Some("no /usr/lib/postgresql/*/bin with initdb (apt-get install postgresql)"),
            Some(_)
                if is_root()
                    && !Command::new("id")
                        .arg("postgres")
                        .output()
                        .is_ok_and(|o| o.status.success()) =>
            {
                Some("running as root and there is no postgres OS user to run initdb as")
            }
            Some(_) => None,
        };
        match why {
            None => true,
            Some(why) if std::env::var(REQUIRE_PG_ENV).as_deref() == Ok("1") => {
                panic!("{REQUIRE_PG_ENV}=1 but PostgreSQL cannot run here: {why}")
            }
            Some(why) => {
                eprintln!(
                    "WARNING: skipping a PostgreSQL test: {why} (set {REQUIRE_PG_ENV}=1 to fail instead)"
                );
                false
            }
        }
    }

    /// initdb (trust authentication, superuser `postgres`) and start a
    /// cluster on a free port, listening on 127.0.0.1 and a socket in its
    /// own directory, ready for physical replication; `extra_conf` lines are
    /// appended to postgresql.conf.
    pub fn start(extra_conf: &[&str]) -> PgCluster {
        Self::start_with_hba(extra_conf, &[])
    }

    /// [`PgCluster::start`] with `hba_lines` put first in pg_hba.conf (so
    /// they win over the trust lines initdb writes).
    pub fn start_with_hba(extra_conf: &[&str], hba_lines: &[&str]) -> PgCluster {
        let bin = Self::bin_dir().expect("PostgreSQL binaries (check PgCluster::available first)");
        let dir = tempfile::Builder::new()
            .prefix("offsite-pg-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).unwrap();
        chown_to_postgres(dir.path());

        let out = run_as_postgres(Command::new(bin.join("initdb")).arg("-D").arg(&data).args([
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]));
        assert!(out.status.success(), "initdb failed: {}", stderr_of(&out));

        if !hba_lines.is_empty() {
            let hba = data.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba).unwrap();
            std::fs::write(&hba, format!("{}\n{old}", hba_lines.join("\n"))).unwrap();
        }

        let mut cluster = PgCluster {
            dir,
            data,
            port: 0,
            socket_dir,
            bin,
        };
        // A free port can be taken by a parallel test before the server binds it: retry.
        for attempt in 0.. {
            cluster.port = free_port();
            let mut conf = vec![
                format!("port = {}", cluster.port),
                "listen_addresses = '127.0.0.1'".to_string(),
                format!(
                    "unix_socket_directories = '{}'",
                    cluster.socket_dir.display()
                ),
                "wal_level = replica".into(),
                "max_wal_senders = 10".into(),
                "max_replication_slots = 10".into(),
                "max_slot_wal_keep_size = '1GB'".into(),
                // Durability is under test: fsync stays on.
                "fsync = on".into(),
            ];
            conf.extend(extra_conf.iter().map(|s| s.to_string()));
            // Appended on each attempt: the last port line wins.
            let conf_path = cluster.data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf_path).unwrap();
            text.push_str(&format!(
                "\n# Added by the offsite test harness.\n{}\n",
                conf.join("\n")
            ));
            std::fs::write(&conf_path, text).unwrap();
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                Err(log) if attempt < 3 && log.contains("could not bind") => continue,
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
        cluster
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// `pg_ctl -w start`; `Err(log tail)` on failure.
    fn pg_ctl_start(&self) -> Result<(), String> {
        let out = run_as_postgres(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "start"]),
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}\n{}", stderr_of(&out), self.log_tail()))
        }
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable`
    pub fn dsn(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    fn psql_path(&self) -> PathBuf {
        let p = self.bin.join("psql");
        if p.is_file() {
            p
        } else {
            PathBuf::from("psql")
        }
    }

    /// Run `sql` with psql as the superuser (unaligned, tuples only, stop on
    /// error); the trimmed output. Panics with psql's stderr on failure.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.psql_path())
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
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stop the server (fast shutdown: a clean checkpoint).
    pub fn stop(&self) {
        let out = run_as_postgres(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-m", "fast", "stop"]),
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}\n{}",
            stderr_of(&out),
            self.log_tail()
        );
    }

    /// SIGKILL the postmaster (a crash: its backends notice and exit; the
    /// next start runs crash recovery).
    pub fn kill9(&self) {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .expect("postmaster.pid (is the server running?)");
        let pid: i32 = pid_file
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid in postmaster.pid");
        // SAFETY: kill(2) on a pid we read; no memory involved.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
        // Wait until it is gone, not just dead: while its zombie exists, pg_ctl
        // and a new postmaster take the lock file's pid for a running server.
        // Orphans are reaped by init, which on some machines (firecracker's)
        // takes a couple of seconds.
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the killed postmaster {pid} was not reaped within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start the server again (after `stop` or `kill9`; stops it first if
    /// it runs). After a crash the old backends may hold the shared memory
    /// a few moments: retried for up to 20 s.
    pub fn restart(&self) {
        let status = run_as_postgres(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("status"),
        );
        if status.status.success() {
            self.stop();
        }
        let t = Instant::now();
        loop {
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err(log) if t.elapsed() < Duration::from_secs(20) => {
                    let _ = log;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(log) => panic!("PostgreSQL did not restart:\n{log}"),
            }
        }
    }

    /// Start a cluster in another data directory (e.g. a restored one,
    /// owned by `postgres`, mode 0700) on `port`, with its socket in
    /// `socket_dir` and its log in `socket_dir/postgres.log`, whatever its
    /// postgresql.conf says about those. Waits until it accepts connections
    /// (not until recovery ends). Stop it with [`PgCluster::stop_data_dir`].
    pub fn start_existing(data: &Path, port: u16, socket_dir: &Path, bin: &Path) {
        chown_to_postgres(socket_dir);
        let log = socket_dir.join("postgres.log");
        let out = run_as_postgres(
            Command::new(bin.join("pg_ctl"))
                .arg("-D")
                .arg(data)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1",
                    socket_dir.display()
                ))
                .args(["-w", "-t", "60", "start"]),
        );
        assert!(
            out.status.success(),
            "pg_ctl start -D {}: {}\n{}",
            data.display(),
            stderr_of(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stop the server of `data` at once (`-m immediate`), ignoring errors.
    pub fn stop_data_dir(bin: &Path, data: &Path) {
        let _ = run_as_postgres(Command::new(bin.join("pg_ctl")).arg("-D").arg(data).args([
            "-w",
            "-m",
            "immediate",
            "stop",
        ]));
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        Self::stop_data_dir(&self.bin, &self.data);
    }
}
