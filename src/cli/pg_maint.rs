//! `offsite list`, `prune` and `verify` of a PostgreSQL archive: the flags
//! only PostgreSQL takes, and what each prints (docs/POSTGRES.md).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::trust;
use crate::engine::postgres::inventory::{self, Inventory};
use crate::engine::postgres::retention::{self, BackupRetention, Policy};
use crate::engine::postgres::Reader;
use crate::engine::Engine;
use crate::storage::{self, ReplicaUrl};

/// `offsite prune` flags for PostgreSQL archives.
#[derive(Args, Debug, Default, Clone)]
pub struct PgPruneArgs {
    /// PostgreSQL: base backups kept besides the window's: the newest N (at
    /// least 1) or all that ended within a duration (default 2).
    #[arg(long, value_name = "N|DURATION", help_heading = "PostgreSQL")]
    pub backup_retention: Option<String>,
}

/// `offsite verify` flags for PostgreSQL archives (restore drills, `--deep`).
#[derive(Args, Debug, Default, Clone)]
pub struct PgVerifyArgs {
    /// PostgreSQL with --deep: the query run on each restored server; it
    /// must succeed (default: select 1).
    #[arg(long, value_name = "SQL", help_heading = "PostgreSQL")]
    pub check_query: Option<String>,
    /// PostgreSQL with --deep: the database user the check query runs as
    /// (default: postgres).
    #[arg(long, value_name = "USER", help_heading = "PostgreSQL")]
    pub check_user: Option<String>,
    /// PostgreSQL with --deep: directory of pg_ctl, postgres and
    /// pg_verifybackup (default: OFFSITE_PG_BIN, /usr/lib/postgresql/<major>/bin, PATH).
    #[arg(long, value_name = "DIR", help_heading = "PostgreSQL")]
    pub pg_bin: Option<PathBuf>,
    /// PostgreSQL with --deep: the operating-system user that runs the
    /// restored servers (default when run as root: postgres).
    #[arg(long, value_name = "USER", help_heading = "PostgreSQL")]
    pub pg_user: Option<String>,
    /// PostgreSQL with --deep: give up on one restore drill after this long.
    #[arg(long, value_name = "DURATION", help_heading = "PostgreSQL")]
    pub drill_timeout: Option<String>,
}

impl PgVerifyArgs {
    fn any(&self) -> bool {
        self.check_query.is_some()
            || self.check_user.is_some()
            || self.pg_bin.is_some()
            || self.pg_user.is_some()
            || self.drill_timeout.is_some()
    }
}

/// A SQLite replica given PostgreSQL-only flags: say so.
pub fn refuse_for_sqlite(
    prune: Option<&PgPruneArgs>,
    verify: Option<&PgVerifyArgs>,
) -> anyhow::Result<()> {
    if prune.is_some_and(|p| p.backup_retention.is_some()) {
        bail!("--backup-retention is for PostgreSQL archives; this replica is SQLite (use --snapshot-retention)");
    }
    if verify.is_some_and(|v| v.any()) {
        bail!("--check-query, --check-user, --pg-bin, --pg-user and --drill-timeout are for PostgreSQL archives; this replica is SQLite");
    }
    Ok(())
}

/// The replica URL when `source` names a PostgreSQL archive (a URL, not a
/// database of --config, whose replica record says engine postgres).
pub async fn postgres_url(
    source: &str,
    config: &Option<PathBuf>,
) -> anyhow::Result<Option<ReplicaUrl>> {
    if config.is_some() {
        return Ok(None);
    }
    let Ok(url) = source.parse::<ReplicaUrl>() else {
        return Ok(None);
    };
    let store = storage::open(&url).await?;
    Ok((crate::record::engine(store.as_ref()).await? == Engine::Postgres).then_some(url))
}

/// `offsite list URL` of a PostgreSQL archive (`trust` already bound to
/// the replica by its record).
pub async fn list(
    url: &ReplicaUrl,
    store: &dyn storage::Storage,
    trust: &crate::sign::Trust,
    json: bool,
) -> anyhow::Result<()> {
    let inv = Inventory::load(store, trust).await?;
    let system_id = trust
        .database
        .as_deref()
        .and_then(|d| d.strip_prefix("pg-"))
        .and_then(|s| s.parse().ok());
    let rep = inventory::describe(&inv, system_id);
    if json {
        let mut v = serde_json::to_value(&rep)?;
        v["replica"] = url.to_string().into();
        v["requests"] = serde_json::to_value(store.request_counts())?;
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    println!("replica  {url}");
    println!(
        "engine   postgres (system {}, {}), {} objects, {} bytes",
        rep.system_id.as_deref().unwrap_or("?"),
        match rep.encrypted {
            Some(true) => "encrypted",
            Some(false) => "plaintext",
            None => "empty",
        },
        rep.objects,
        rep.bytes
    );
    if rep.backups.is_empty() {
        println!(
            "backups  none complete (run `offsite pg backup`, or let `offsite pg stream` take one)"
        );
    }
    for b in &rep.backups {
        println!(
            "backup   {}  timeline {}  LSN {} .. {}  ended {}  {} bytes in {} archives  label {:?}{}",
            b.id,
            b.timeline,
            b.start_lsn,
            b.end_lsn,
            b.end_time,
            b.bytes,
            b.archives,
            b.label,
            if b.restorable {
                String::new()
            } else {
                format!("  NOT RESTORABLE: its WAL reaches only {}", b.wal_reach_lsn)
            }
        );
    }
    for i in &rep.incomplete {
        println!(
            "incomplete backup {}: {} parts ({} bytes), last written {}{}",
            i.id,
            i.parts,
            i.bytes,
            i.last_written.as_deref().unwrap_or("-"),
            if i.record_refused {
                "; its record does not prove out"
            } else {
                ""
            }
        );
    }
    for t in &rep.wal {
        for r in &t.ranges {
            println!(
                "wal      timeline {}  {} .. {}  ({} objects, {} bytes)",
                t.timeline, r.start_lsn, r.end_lsn, r.objects, r.bytes
            );
        }
        for g in &t.gaps {
            println!("gap      timeline {}  {}", t.timeline, g.describe());
        }
    }
    for h in &rep.history {
        println!("history  {h}");
    }
    for f in &rep.files {
        println!("file     {f}");
    }
    match &rep.window {
        Some(w) => println!(
            "window   {} ({}) .. {}{}  from backup {}",
            w.from_lsn,
            w.from_time,
            w.to_lsn,
            w.to_time
                .as_deref()
                .map(|t| format!(" (shipped {t})"))
                .unwrap_or_default(),
            w.backup
        ),
        None => println!("window   none: no backup has the WAL it needs"),
    }
    for w in rep
        .windows
        .iter()
        .filter(|w| Some(*w) != rep.window.as_ref())
    {
        println!(
            "also     {} .. {} from backup {} (a gap separates it from the window)",
            w.from_lsn, w.to_lsn, w.backup
        );
    }
    for r in &rep.refused {
        println!("refused  {}: {}", r.key, r.reason);
    }
    for k in &rep.ignored {
        println!("ignored  {k}: not a name offsite writes");
    }
    Ok(())
}

/// `offsite prune URL --retention D --backup-retention N|D` of a PostgreSQL archive.
pub async fn prune(a: super::PruneArgs, url: ReplicaUrl) -> anyhow::Result<()> {
    if a.snapshot_retention.is_some() {
        bail!("--snapshot-retention is for SQLite replicas; for a PostgreSQL archive use --backup-retention N|DURATION");
    }
    if a.replica.is_some() {
        bail!("--replica needs --config (with a URL, the URL is the replica)");
    }
    let Some(ret) = &a.retention else {
        bail!("give the point-in-time window to keep with --retention DURATION (e.g. 7d); base backups are kept by --backup-retention N|DURATION (default 2)");
    };
    let policy = Policy {
        retention: crate::config::parse_duration(ret, "--retention")?,
        backup_retention: BackupRetention::parse(a.pg.backup_retention.as_deref().unwrap_or("2"))
            .context("--backup-retention")?,
    };
    let t = trust::trust(&a.keys, Some(&a.reader), &[], None)?;
    let r = Reader::open(&url, t, None).await?;
    let now = crate::clock::Clock::from_env()?.now_us();
    let rep = retention::prune(r.store.as_ref(), &r.trust, &policy, now, a.dry_run).await?;
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
        return Ok(());
    }
    for k in &rep.kept {
        println!(
            "keep     backup {} (ended {}, LSN {}): {}",
            k.id,
            k.end_time,
            k.end_lsn,
            k.reasons.join("; ")
        );
    }
    let verb = if a.dry_run { "would delete" } else { "deleted" };
    for d in &rep.deleted {
        println!("{verb} {} ({} bytes): {}", d.key, d.size, d.reason);
    }
    for r in &rep.refused {
        println!(
            "refused  {} (does not prove out; left untouched): {}",
            r.key, r.reason
        );
    }
    for k in &rep.ignored {
        println!("ignored  {k}: not a name offsite writes; left untouched");
    }
    for k in &rep.locked {
        println!("locked   {k}: Object Lock retention not expired; a later prune deletes it");
    }
    for w in &rep.warnings {
        println!("warning  {w}");
    }
    println!(
        "{verb} {} objects ({} bytes); kept {} backups; WAL kept from {}; window starts {}",
        rep.deleted.len(),
        rep.bytes_deleted,
        rep.kept.len(),
        rep.wal_kept_from.as_deref().unwrap_or("-"),
        rep.window_start
    );
    Ok(())
}

/// `offsite verify URL [--age-identity F] [--deep]` of a PostgreSQL archive.
pub async fn verify(a: super::VerifyArgs, url: ReplicaUrl) -> anyhow::Result<()> {
    use crate::engine::postgres::drill::DrillOptions;
    use crate::engine::postgres::verify::{self as pgv, VerifyOptions};
    use crate::keys::Identities;
    if !a.deep && a.pg.any() {
        bail!("--check-query, --check-user, --pg-bin, --pg-user and --drill-timeout are for restore drills: add --deep");
    }
    // Absolute: the restored servers' restore_command names them.
    let id_files: Vec<PathBuf> = a
        .age_identity
        .iter()
        .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let t = trust::trust(&a.keys, Some(&a.reader), &id_files, None)?;
    let ids = if id_files.is_empty() {
        None
    } else {
        Some(Identities::read_files(&id_files)?)
    };
    let r = Reader::open(&url, t, ids).await?;
    let drill = if a.deep {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        Some(DrillOptions {
            restore_command: super::pg::restore_command(&url, &id_files, &r, &a.reader)?,
            check_query: a
                .pg
                .check_query
                .clone()
                .unwrap_or_else(|| "select 1".into()),
            check_user: a.pg.check_user.clone().unwrap_or_else(|| "postgres".into()),
            bin: a.pg.pg_bin.clone(),
            os_user: a
                .pg
                .pg_user
                .clone()
                .or_else(|| root.then(|| "postgres".to_string())),
            timeout: crate::config::parse_duration(
                a.pg.drill_timeout.as_deref().unwrap_or("10m"),
                "--drill-timeout",
            )?,
            random_points: a.samples.min(1),
            temp_dir: None,
        })
    } else {
        None
    };
    let rep = pgv::verify(
        &r,
        &VerifyOptions {
            parallel: a.parallel,
            drill,
        },
    )
    .await?;
    if a.json {
        let mut v = serde_json::to_value(&rep)?;
        v["replica"] = url.to_string().into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        print!("{}", rep.human());
    }
    if !rep.ok() {
        let keys: Vec<&str> = rep
            .problems
            .iter()
            .map(|p| p.key.as_str())
            .take(5)
            .collect();
        bail!(
            "verify found {} problems (in {})",
            rep.problems.len(),
            keys.join(", ")
        );
    }
    Ok(())
}
