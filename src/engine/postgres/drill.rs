//! Restore drills of a PostgreSQL archive (`offsite verify --deep`): real
//! restores of sample points into a temporary directory, each checked by
//! `pg_verifybackup` (against the backup's own manifest, before the server
//! starts), then started on a free port until recovery reaches the target,
//! queried with a check query, stopped and removed.
//!
//! The points: the newest backup's end (`immediate`), the end of the
//! archive (`latest`), and random LSNs inside the restore window.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde::Serialize;

use super::dsn::Dsn;
use super::inventory::{windows, Inventory};
use super::restore::{self, PgTarget, RestoreOptions, StartOptions};
use super::walname::{format_lsn, parse_lsn, SEGMENT_SIZE};
use super::wire::Conn;
use super::Reader;

/// How drills run.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The restore_command written into each restored copy (this offsite's
    /// wal-fetch for the same archive).
    pub restore_command: String,
    /// Run on each restored server; it must succeed.
    pub check_query: String,
    /// The database user the check query connects as.
    pub check_user: String,
    /// `--pg-bin`: where pg_ctl, postgres and pg_verifybackup are.
    pub bin: Option<PathBuf>,
    /// The OS user that owns the restored copy and runs the server (root
    /// must name one: PostgreSQL refuses to run as root).
    pub os_user: Option<String>,
    /// Per drill: restore, recovery and the check.
    pub timeout: Duration,
    /// Random LSNs inside the window (besides the backup's end and latest).
    pub random_points: usize,
    /// Where temporary copies go (default: the system temp dir).
    pub temp_dir: Option<PathBuf>,
}

/// One restored point.
#[derive(Debug, Clone, Serialize)]
pub struct DrillResult {
    /// `backup-end`, `latest` or `random`.
    pub kind: String,
    /// What was asked for.
    pub target: String,
    pub backup: Option<String>,
    pub ok: bool,
    /// `pg_last_wal_replay_lsn()` of the recovered server.
    pub replayed_to: Option<String>,
    /// `pg_verifybackup`'s verdict (or why it did not run).
    pub verifybackup: Option<String>,
    /// The check query's first value.
    pub check: Option<String>,
    pub seconds: f64,
    pub error: Option<String>,
}

impl DrillResult {
    /// One line for the human report.
    pub fn describe(&self) -> String {
        if self.ok {
            format!(
                "{:<10} {}: ok, backup {}, replayed to {}, pg_verifybackup {}, check query returned {:?} ({:.1} s)",
                self.kind,
                self.target,
                self.backup.as_deref().unwrap_or("-"),
                self.replayed_to.as_deref().unwrap_or("-"),
                self.verifybackup.as_deref().unwrap_or("-"),
                self.check.as_deref().unwrap_or(""),
                self.seconds
            )
        } else {
            format!(
                "{:<10} {}: FAILED: {}",
                self.kind,
                self.target,
                self.error.as_deref().unwrap_or("?")
            )
        }
    }
}

/// The points to restore: the newest backup's end, the latest, and
/// `random` LSNs inside the restore window, before the segment the archive
/// ends in. A target is reached when a record at or past it is read; at the
/// archive's tail there may be none (the rest of a segment after a switch
/// is padding), while any earlier point is followed by the records of the
/// last segment. A window inside one segment gets no random point.
pub fn points(
    inv: &Inventory,
    random: usize,
    mut rng: impl FnMut() -> u64,
) -> Vec<(String, PgTarget)> {
    let mut out = vec![
        ("backup-end".to_string(), PgTarget::Immediate),
        ("latest".to_string(), PgTarget::Latest),
    ];
    if let Some(w) = windows(inv).into_iter().max_by_key(|w| w.to) {
        let last_segment_start = w.to.saturating_sub(1) / SEGMENT_SIZE * SEGMENT_SIZE;
        let usable = last_segment_start.saturating_sub(w.from);
        if usable >= 8 {
            for _ in 0..random {
                let l = (w.from + rng() % usable) & !7;
                out.push(("random".to_string(), PgTarget::Lsn(l.max(w.from))));
            }
        }
    }
    out
}

fn target_text(t: &PgTarget) -> String {
    match t {
        PgTarget::Immediate => "the newest backup's end".into(),
        PgTarget::Latest => "the end of the archive".into(),
        PgTarget::Lsn(l) => format!("LSN {}", format_lsn(*l)),
        other => format!("{other:?}"),
    }
}

/// Run the drills, one after another.
pub async fn drills(r: &Reader, inv: &Inventory, o: &DrillOptions) -> Vec<DrillResult> {
    let pts = points(inv, o.random_points, rand::random::<u64>);
    let mut out = Vec::new();
    let base = match temp_parent(o) {
        Ok(b) => b,
        Err(e) => {
            return vec![DrillResult {
                kind: "setup".into(),
                target: "-".into(),
                backup: None,
                ok: false,
                replayed_to: None,
                verifybackup: None,
                check: None,
                seconds: 0.0,
                error: Some(format!("{e:#}")),
            }]
        }
    };
    for (i, (kind, target)) in pts.into_iter().enumerate() {
        let started = Instant::now();
        let mut res = DrillResult {
            kind: kind.clone(),
            target: target_text(&target),
            backup: restore::pick_backup(&inv.backups, &target, None)
                .ok()
                .map(|b| b.id.clone()),
            ok: false,
            replayed_to: None,
            verifybackup: None,
            check: None,
            seconds: 0.0,
            error: None,
        };
        let dir = base.path().join(format!("drill-{i}-{kind}"));
        let run =
            tokio::time::timeout(o.timeout, drill_one(r, inv, &dir, &target, o, &mut res)).await;
        let err = match run {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                // The copy goes below: keep what PostgreSQL said.
                let log =
                    std::fs::read_to_string(dir.join("offsite-recovery.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                if !tail.is_empty() {
                    tracing::warn!(
                        drill = %kind,
                        "the drilled server's log ended with:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                Some(format!("{e:#}").replace('\n', " "))
            }
            Err(_) => Some(format!(
                "did not finish within {} (--drill-timeout)",
                humantime::format_duration(o.timeout)
            )),
        };
        // Whatever happened, the server goes and the copy with it.
        if dir.join("postmaster.pid").exists() {
            if let Ok(bin) = bin_of(inv, &target, o) {
                let _ = pg_ctl_stop(&bin, &dir, o.os_user.as_deref());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        res.ok = err.is_none();
        res.error = err;
        res.seconds = started.elapsed().as_secs_f64();
        tracing::info!(drill = %res.kind, target = %res.target, ok = res.ok, "restore drill");
        out.push(res);
    }
    out
}

/// A fresh parent for the copies that the server's OS user can traverse.
fn temp_parent(o: &DrillOptions) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let parent = o.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let d = tempfile::Builder::new()
        .prefix(".offsite-drill-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a drill directory in {}", parent.display()))?;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(d)
}

fn bin_of(inv: &Inventory, target: &PgTarget, o: &DrillOptions) -> anyhow::Result<PathBuf> {
    let b = restore::pick_backup(&inv.backups, target, None)?;
    restore::pg_bin(o.bin.as_deref(), &b.pg_version)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// A PostgreSQL program, as `user` when given (`runuser`, for root).
fn pg_cmd(bin: &Path, prog: &str, user: Option<&str>) -> std::process::Command {
    let mut c = match user {
        Some(u) => {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", u, "--"]).arg(bin.join(prog));
            c
        }
        None => std::process::Command::new(bin.join(prog)),
    };
    c.stdin(std::process::Stdio::null());
    c
}

fn pg_ctl_stop(bin: &Path, dir: &Path, user: Option<&str>) -> anyhow::Result<()> {
    let out = pg_cmd(bin, "pg_ctl", user)
        .arg("-D")
        .arg(dir)
        .args(["-m", "fast", "-w", "-t", "60", "stop"])
        .output()
        .context("cannot run pg_ctl stop")?;
    ensure!(
        out.status.success(),
        "pg_ctl stop: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

async fn drill_one(
    r: &Reader,
    inv: &Inventory,
    dir: &Path,
    target: &PgTarget,
    o: &DrillOptions,
    res: &mut DrillResult,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let b = restore::pick_backup(&inv.backups, target, None)?.clone();
    // Tablespaces go into the drill's directory, never their real places.
    let tablespace_map = b
        .archives
        .iter()
        .filter_map(|a| a.tablespace.as_ref())
        .map(|t| {
            (
                t.path.clone(),
                dir.with_file_name(format!(
                    "{}-tablespace-{}",
                    dir.file_name().and_then(|n| n.to_str()).unwrap_or("drill"),
                    t.oid
                )),
            )
        })
        .collect::<Vec<_>>();
    let remapped = !tablespace_map.is_empty();
    let restored = restore::restore(
        r,
        &RestoreOptions {
            output: dir.to_path_buf(),
            force: false,
            target: target.clone(),
            exclusive: false,
            action: "promote".into(),
            backup: Some(b.id.clone()),
            restore_command: o.restore_command.clone(),
            tablespace_map,
            os_user: o.os_user.clone(),
            parallel: 4,
        },
    )
    .await?;
    tracing::debug!(secs = t0.elapsed().as_secs_f64(), "drill: restored");
    let bin = restore::pg_bin(o.bin.as_deref(), &b.pg_version)?;
    // The copy against its own manifest, before the server changes it.
    res.verifybackup = Some(if b.manifest {
        let mut c = std::process::Command::new(bin.join("pg_verifybackup"));
        c.arg("-n");
        if remapped {
            c.args(["-i", "tablespace_map"]);
        }
        let out = c
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", bin.join("pg_verifybackup").display()))?;
        if !out.status.success() {
            bail!(
                "pg_verifybackup -n {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .replace('\n', "; ")
            );
        }
        "ok".into()
    } else {
        "skipped (the backup has no manifest)".into()
    });
    tracing::debug!(
        secs = t0.elapsed().as_secs_f64(),
        "drill: pg_verifybackup done"
    );
    // Only local connections, without a password: the socket is in the
    // copy's own directory (mode 0700), reachable by its owner alone.
    std::fs::write(
        dir.join("pg_hba.conf"),
        "# offsite restore drill: local connections only\nlocal all all trust\n",
    )
    .context("cannot write the drill's pg_hba.conf")?;
    if let Some(u) = &o.os_user {
        let (uid, gid) = restore::os_user_ids(u)?;
        std::os::unix::fs::chown(dir.join("pg_hba.conf"), Some(uid), Some(gid))?;
    }
    let so = StartOptions {
        bin: bin.clone(),
        port: free_port()?,
        os_user: o.os_user.clone(),
        timeout: o.timeout,
        action: "promote".into(),
    };
    let port = so.port;
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || restore::start_and_wait(&d, &so))
        .await
        .context("drill task failed")??;
    tracing::debug!(secs = t0.elapsed().as_secs_f64(), "drill: recovered");
    let dsn = Dsn::parse(&format!(
        "host='{}' port={port} user='{}' dbname=postgres sslmode=disable",
        dir.display().to_string().replace('\'', "\\'"),
        o.check_user.replace('\'', "\\'")
    ))?;
    let mut conn = Conn::connect(&dsn, false)
        .await
        .context("cannot connect to the restored server")?;
    let replayed = conn
        .simple_query("select pg_last_wal_replay_lsn()::text")
        .await?
        .first()
        .and_then(|r| r.first().cloned().flatten());
    res.replayed_to = replayed.clone();
    let rows = conn
        .simple_query(&o.check_query)
        .await
        .with_context(|| format!("the check query {:?} failed", o.check_query))?;
    res.check = Some(
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_default(),
    );
    conn.close().await;
    tracing::debug!(secs = t0.elapsed().as_secs_f64(), "drill: queried");
    let reached = replayed.as_deref().map(parse_lsn).transpose()?.unwrap_or(0);
    let want = match target {
        PgTarget::Lsn(l) => *l,
        _ => b.end_lsn,
    };
    ensure!(
        reached >= want,
        "recovery stopped at {} before {} (the archive from backup {} reaches {})",
        format_lsn(reached),
        format_lsn(want),
        b.id,
        format_lsn(restored.archive_end)
    );
    pg_ctl_stop(&bin, dir, o.os_user.as_deref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::postgres::archive::BackupInfo;
    use crate::engine::postgres::inventory::tests::whole;

    #[test]
    fn random_points_lie_inside_the_window() {
        let s = crate::engine::postgres::walname::SEGMENT_SIZE;
        let mut inv = Inventory {
            wal: whole(1, 1, 5),
            ..Default::default()
        };
        inv.backups.push(BackupInfo {
            id: "0000000000000001-0000000001000028".into(),
            label: String::new(),
            system_id: "1".into(),
            timeline: 1,
            start_lsn: s + 40,
            end_lsn: s + 1000,
            start_time_us: 1,
            end_time_us: 2,
            pg_version: "15".into(),
            archives: vec![],
            manifest: true,
        });
        let mut n = 0u64;
        let pts = points(&inv, 20, || {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            n
        });
        assert_eq!(pts.len(), 22);
        assert_eq!(pts[0].1, PgTarget::Immediate);
        let reach = windows(&inv)[0].to;
        for (_, p) in &pts[2..] {
            let PgTarget::Lsn(l) = p else { panic!() };
            // Before the segment the archive ends in (its tail may be a
            // switch's padding, where no record follows the target).
            assert!(
                *l >= s + 1000 && *l < (reach - 1) / s * s,
                "{l:#x} reach {reach:#x}"
            );
        }
        // A window inside one segment: no random point.
        let mut one = inv.clone();
        one.wal = whole(1, 1, 1);
        assert_eq!(points(&one, 3, || 5).len(), 2);
        // No window: the backup's end and latest only.
        inv.wal.clear();
        assert_eq!(points(&inv, 3, || 5).len(), 2);
    }
}
