//! `offsite pg …`: PostgreSQL's archive_command and restore_command, base
//! backups and streaming (docs/POSTGRES.md).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::trust::{self, KeyArgs, ReaderArgs};
use crate::daemon::ExitStatus;
use crate::engine::postgres::dsn::Dsn;
use crate::engine::postgres::fetch::{self, FetchOptions, Fetched};
use crate::engine::postgres::push::{self, PushOptions};
use crate::engine::postgres::{walname, Reader, Writer};
use crate::keys::Identities;
use crate::storage::ReplicaUrl;

#[derive(Subcommand, Debug)]
pub enum PgCommand {
    /// archive_command: store one WAL file (%p); exit 0 only once it is durable.
    ArchivePush(ArchivePushArgs),
    /// restore_command: fetch WAL file %f to %p; exit 1 if the archive does not hold it.
    WalFetch(WalFetchArgs),
    /// Take a base backup now (BASE_BACKUP through the replication protocol).
    Backup(BackupArgs),
    /// Stream WAL continuously through a replication slot (and take base
    /// backups on a schedule) until SIGINT/SIGTERM.
    Stream(StreamArgs),
}

/// How offsite reaches PostgreSQL.
#[derive(Args, Debug, Clone)]
pub struct PgConnArgs {
    /// Connection string: postgres://USER@HOST:PORT/DB or "host=… user=…"
    /// (or OFFSITE_PG_DSN). Put the password in PGPASSWORD or a passfile,
    /// not here: it would show in the process list.
    #[arg(long, value_name = "DSN", env = "OFFSITE_PG_DSN")]
    pub dsn: String,
}

impl PgConnArgs {
    fn dsn(&self) -> anyhow::Result<Dsn> {
        Dsn::parse(&self.dsn).context("--dsn")
    }
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub conn: PgConnArgs,
    #[command(flatten)]
    pub write: PgWriteArgs,
    /// The backup's label (shown in backup_label).
    #[arg(long, default_value = "offsite")]
    pub label: String,
    /// How long to wait for the WAL up to the backup's end to reach the archive.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub wal_timeout: String,
}

#[derive(Args, Debug)]
pub struct StreamArgs {
    #[command(flatten)]
    pub conn: PgConnArgs,
    #[command(flatten)]
    pub write: PgWriteArgs,
    /// The physical replication slot (created if missing).
    #[arg(long, value_name = "NAME", default_value = "offsite")]
    pub slot: String,
    /// How often received WAL is shipped (default 250ms).
    #[arg(long, value_name = "DURATION")]
    pub sync_interval: Option<String>,
    /// Tell PostgreSQL WAL is flushed once it is in the store ("store",
    /// the default) or once it is fsynced in the local spool ("spool").
    #[arg(long, value_name = "store|spool", default_value = "store")]
    pub flush_after: String,
    /// Ship every commit as it arrives (with offsite's application name in
    /// synchronous_standby_names, a commit returns once it is in the store).
    #[arg(long)]
    pub synchronous: bool,
    /// Directory for the WAL spool (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Take a base backup this often ("off": never; one is taken at start
    /// when the archive holds none).
    #[arg(long, value_name = "DURATION|off", default_value = "24h")]
    pub base_backup_interval: String,
    /// Serve /metrics, /healthz, /readyz and POST /sync on this address (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The name metrics label the cluster with, and `offsite sync NAME` uses.
    #[arg(long, value_name = "NAME", default_value = "postgres")]
    pub name: String,
    /// /readyz fails when WAL waits longer than this to reach the store.
    #[arg(long, value_name = "DURATION", default_value = "1m")]
    pub max_lag: String,
    /// The point-in-time window pruning keeps (default 24h; "off": never
    /// prune). WAL a kept base backup needs is never deleted.
    #[arg(long, value_name = "DURATION|off")]
    pub retention: Option<String>,
    /// Base backups kept besides the window's: the newest N or all that
    /// ended within a duration (default 2).
    #[arg(long, value_name = "N|DURATION")]
    pub backup_retention: Option<String>,
}

/// Where and how a PostgreSQL archive is written.
#[derive(Args, Debug, Clone)]
pub struct PgWriteArgs {
    /// file:///absolute/dir or s3://BUCKET/PREFIX[?endpoint=…] (or OFFSITE_REPLICA_URL).
    #[arg(
        long = "replica",
        value_name = "REPLICA_URL",
        env = "OFFSITE_REPLICA_URL"
    )]
    pub replica_url: String,
    /// Encrypt to this age recipient (age1…); repeatable.
    #[arg(long = "age-recipient", value_name = "AGE_PUBLIC_KEY")]
    pub age_recipient: Vec<String>,
    /// File with age recipients, one per line (or OFFSITE_AGE_RECIPIENTS_FILE).
    #[arg(long, value_name = "PATH", env = "OFFSITE_AGE_RECIPIENTS_FILE")]
    pub age_recipients_file: Option<PathBuf>,
    /// Store WAL and backups unencrypted (explicit opt-out; never the default).
    #[arg(long)]
    pub no_encryption: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Args, Debug)]
pub struct ArchivePushArgs {
    /// The WAL file, as PostgreSQL's %p (relative to the data directory).
    pub path: PathBuf,
    #[command(flatten)]
    pub write: PgWriteArgs,
    /// The data directory (default: the current directory, where PostgreSQL
    /// runs archive_command); its pg_control names the cluster.
    #[arg(long, value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    /// Also push up to N other files that archive_status/*.ready lists.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub lookahead: usize,
    /// Local cache of what was pushed (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct WalFetchArgs {
    /// The file PostgreSQL asks for (%f).
    pub name: String,
    /// Where to write it (%p, relative to the data directory).
    pub dest: PathBuf,
    /// The archive (or OFFSITE_REPLICA_URL).
    #[arg(
        long = "replica",
        value_name = "REPLICA_URL",
        env = "OFFSITE_REPLICA_URL"
    )]
    pub replica_url: String,
    /// age identity file; repeatable (or OFFSITE_AGE_IDENTITY_FILE).
    #[arg(
        long = "age-identity",
        value_name = "PATH",
        env = "OFFSITE_AGE_IDENTITY_FILE"
    )]
    pub age_identity: Vec<PathBuf>,
    /// Fetch up to N following segments into the spool, in a detached
    /// process, while PostgreSQL replays this one (0: off).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub prefetch: usize,
    /// Internal: be the detached prefetcher (fetch the segments after NAME
    /// into the spool and exit).
    #[arg(long, hide = true)]
    pub prefetch_only: bool,
    /// Where prefetched segments wait (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub reader: ReaderArgs,
}

pub async fn run(cmd: PgCommand) -> anyhow::Result<()> {
    match cmd {
        PgCommand::ArchivePush(a) => archive_push(a).await,
        PgCommand::WalFetch(a) => wal_fetch(a).await,
        PgCommand::Backup(a) => backup(a).await,
        PgCommand::Stream(a) => stream(a).await,
    }
}

/// Open the archive for writing, for the cluster whose data directory is `pgdata`.
async fn writer(w: &PgWriteArgs, system_id: u64) -> anyhow::Result<Writer> {
    let url: ReplicaUrl = w.replica_url.parse().context("--replica")?;
    let rc = crate::config::replica_from_flags(
        &w.replica_url,
        &w.age_recipient,
        w.age_recipients_file.as_deref(),
        w.no_encryption,
    )?;
    let signer = trust::signer(&w.keys, None)?.context(
        "no signing key: pass --signing-key-file (make one with `offsite keygen --signing -o FILE`) or set OFFSITE_SIGNING_KEY",
    )?;
    let t = trust::trust(&w.keys, None, &[], None)?;
    Writer::open(&url, rc.encryption, signer, t, system_id).await
}

async fn archive_push(a: ArchivePushArgs) -> anyhow::Result<()> {
    let pgdata = a.pgdata.clone().unwrap_or_else(|| PathBuf::from("."));
    let system_id = walname::system_id_of(&pgdata).with_context(|| {
        format!(
            "cannot tell which cluster {} belongs to (run from the data directory, as archive_command does, or pass --pgdata)",
            a.path.display()
        )
    })?;
    let w = writer(&a.write, system_id).await?;
    let spool = a
        .spool_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("offsite-pg-{system_id}")));
    push::archive_push(
        &w,
        &a.path,
        &PushOptions {
            lookahead: a.lookahead,
            spool_dir: spool,
        },
    )
    .await?;
    Ok(())
}

async fn wal_fetch(a: WalFetchArgs) -> anyhow::Result<()> {
    // Every failure but "not in the archive" must stop PostgreSQL's
    // recovery, not end it early (see fetch::FATAL_EXIT).
    if a.prefetch_only {
        // Best effort: the calls that need a segment fetch it themselves.
        if let Err(e) = wal_fetch_inner(&a).await {
            tracing::debug!("prefetch after {}: {e:#}", a.name);
        }
        return Ok(());
    }
    match wal_fetch_inner(&a).await {
        Ok(Fetched::Written { .. }) => {
            if a.prefetch > 0 && walname::SegmentName::parse(&a.name).is_some() {
                start_prefetcher();
            }
            Ok(())
        }
        Ok(Fetched::Missing) => {
            eprintln!("offsite: {} is not in the archive", a.name);
            Err(ExitStatus(1).into())
        }
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("offsite: error: cannot fetch {}: {msg}", a.name);
            Err(ExitStatus(fetch::FATAL_EXIT).into())
        }
    }
}

/// Run this same command again, detached, as the prefetcher: it outlives
/// this call, so PostgreSQL replays while the next segments arrive.
fn start_prefetcher() {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let r = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--prefetch-only")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // Its own process group: signals meant for the restore_command
        // call (PostgreSQL's shutdown) do not reach it.
        .process_group(0)
        .spawn();
    if let Err(e) = r {
        tracing::debug!("cannot start the WAL prefetcher: {e}");
    }
}

async fn wal_fetch_inner(a: &WalFetchArgs) -> anyhow::Result<Fetched> {
    let url: ReplicaUrl = a.replica_url.parse().context("--replica")?;
    // A reader: the shipper's signing key file (perhaps set in the
    // environment PostgreSQL inherited) is not needed and not read.
    let keys = KeyArgs {
        signing_key_file: None,
        ..a.keys.clone()
    };
    let t = trust::trust(&keys, Some(&a.reader), &a.age_identity, None)?;
    let ids = if a.age_identity.is_empty() {
        None
    } else {
        Some(Identities::read_files(&a.age_identity)?)
    };
    let r = Reader::open(&url, t, ids).await?;
    let spool = a.spool_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "offsite-prefetch-{}",
            r.trust.replica.as_deref().unwrap_or("unknown")
        ))
    });
    let opts = FetchOptions {
        prefetch: a.prefetch,
        spool_dir: spool,
    };
    if a.prefetch_only {
        fetch::prefetch_after(&r, &a.name, &opts).await?;
        return Ok(Fetched::Missing);
    }
    fetch::wal_fetch(&r, &a.name, &a.dest, &opts).await
}

/// `offsite restore` flags that only a PostgreSQL archive takes.
#[derive(Args, Debug, Default, Clone)]
pub struct PgRestoreArgs {
    /// PostgreSQL: recover up to this LSN (recovery_target_lsn, e.g. 0/3000060).
    #[arg(long, value_name = "LSN", help_heading = "PostgreSQL")]
    pub lsn: Option<String>,
    /// PostgreSQL: recover up to this transaction id (recovery_target_xid;
    /// not offsite's --txid).
    #[arg(long, value_name = "XID", help_heading = "PostgreSQL")]
    pub xid: Option<String>,
    /// PostgreSQL: recover up to this restore point (pg_create_restore_point).
    #[arg(
        long = "name",
        value_name = "RESTORE_POINT",
        help_heading = "PostgreSQL"
    )]
    pub restore_point: Option<String>,
    /// PostgreSQL: stop at the earliest consistent point (the end of the base backup).
    #[arg(long, help_heading = "PostgreSQL")]
    pub immediate: bool,
    /// PostgreSQL: stop just before the target instead of just after it.
    #[arg(long, help_heading = "PostgreSQL")]
    pub exclusive: bool,
    /// PostgreSQL: what the server does at the target: promote, pause or shutdown.
    #[arg(long, value_name = "ACTION", default_value = "promote", value_parser = ["promote", "pause", "shutdown"], help_heading = "PostgreSQL")]
    pub target_action: String,
    /// PostgreSQL: restore this base backup (default: the newest that ends before the target).
    #[arg(long, value_name = "ID", help_heading = "PostgreSQL")]
    pub backup: Option<String>,
    /// PostgreSQL: move a tablespace (original location=new location); repeatable.
    #[arg(
        long = "tablespace",
        value_name = "OLD=NEW",
        help_heading = "PostgreSQL"
    )]
    pub tablespace: Vec<String>,
    /// PostgreSQL: start the server on the restored directory and wait until
    /// recovery has reached the target.
    #[arg(long, help_heading = "PostgreSQL")]
    pub start: bool,
    /// PostgreSQL with --start: the port (default: a free one).
    #[arg(long, value_name = "PORT", help_heading = "PostgreSQL")]
    pub port: Option<u16>,
    /// PostgreSQL: directory of pg_ctl and postgres (default: OFFSITE_PG_BIN,
    /// /usr/lib/postgresql/<major>/bin, PATH).
    #[arg(long, value_name = "DIR", help_heading = "PostgreSQL")]
    pub pg_bin: Option<PathBuf>,
    /// PostgreSQL: the operating-system user that owns the data directory and
    /// runs the server (default when run as root: postgres).
    #[arg(long, value_name = "USER", help_heading = "PostgreSQL")]
    pub pg_user: Option<String>,
    /// PostgreSQL with --start: give up waiting for recovery after this long.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1h",
        help_heading = "PostgreSQL"
    )]
    pub recovery_timeout: String,
}

impl PgRestoreArgs {
    fn any(&self) -> bool {
        self.lsn.is_some()
            || self.xid.is_some()
            || self.restore_point.is_some()
            || self.immediate
            || self.exclusive
            || self.backup.is_some()
            || !self.tablespace.is_empty()
            || self.start
            || self.port.is_some()
            || self.pg_bin.is_some()
            || self.pg_user.is_some()
    }
}

/// A SQLite restore given PostgreSQL-only flags: say so.
pub fn refuse_pg_flags(a: &PgRestoreArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !a.any(),
        "--lsn, --xid, --name, --immediate, --exclusive, --backup, --tablespace, --start, --port, --pg-bin and --pg-user are for PostgreSQL archives; this replica is SQLite (use --txid or --timestamp)"
    );
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// `offsite restore URL -o DATADIR` of a PostgreSQL archive.
pub async fn restore(a: super::RestoreArgs, url: ReplicaUrl) -> anyhow::Result<()> {
    use crate::engine::postgres::restore::{self as pgr, PgTarget, RestoreOptions, StartOptions};
    let p = &a.pg;
    anyhow::ensure!(
        a.txid.is_none(),
        "--txid is offsite's SQLite commit counter; for PostgreSQL use --lsn, --xid, --name or --timestamp"
    );
    let mut targets = Vec::new();
    if let Some(t) = &a.timestamp {
        targets.push(PgTarget::Time(t.clone(), crate::layout::parse_time(t)?));
    }
    if let Some(l) = &p.lsn {
        targets.push(PgTarget::Lsn(walname::parse_lsn(l).context("--lsn")?));
    }
    if let Some(x) = &p.xid {
        anyhow::ensure!(
            x.parse::<u32>().is_ok(),
            "--xid {x:?} is not a PostgreSQL transaction id (a number, as txid_current() or pg_current_xact_id() shows)"
        );
        targets.push(PgTarget::Xid(x.clone()));
    }
    if let Some(n) = &p.restore_point {
        targets.push(PgTarget::Name(n.clone()));
    }
    if p.immediate {
        targets.push(PgTarget::Immediate);
    }
    anyhow::ensure!(
        targets.len() <= 1,
        "give one recovery target: --timestamp, --lsn, --xid, --name or --immediate"
    );
    let target = targets.pop().unwrap_or(PgTarget::Latest);
    let mut tablespace_map = Vec::new();
    for t in &p.tablespace {
        let (from, to) = t
            .split_once('=')
            .with_context(|| format!("--tablespace {t:?}: expected OLD=NEW"))?;
        tablespace_map.push((from.to_string(), PathBuf::from(to)));
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let os_user = p
        .pg_user
        .clone()
        .or_else(|| root.then(|| "postgres".to_string()));
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
    let output = std::path::absolute(&a.output).context("-o")?;
    let restore_command = restore_command(&url, &id_files, &r, &a.reader)?;
    let started = std::time::Instant::now();
    let rep = pgr::restore(
        &r,
        &RestoreOptions {
            output: output.clone(),
            force: a.force,
            target: target.clone(),
            exclusive: p.exclusive,
            action: p.target_action.clone(),
            backup: p.backup.clone(),
            restore_command,
            tablespace_map,
            os_user: os_user.clone(),
            parallel: a.parallel,
        },
    )
    .await?;
    eprintln!(
        "restored base backup {} (LSN {} to {}, timeline {}) into {} in {:.2?}; the archive holds WAL up to {}; recovery target: {}",
        rep.backup.id,
        walname::format_lsn(rep.backup.start_lsn),
        walname::format_lsn(rep.backup.end_lsn),
        rep.backup.timeline,
        output.display(),
        started.elapsed(),
        walname::format_lsn(rep.archive_end),
        describe(&target, p.exclusive)
    );
    if !p.start {
        eprintln!("start PostgreSQL on it to recover (or pass --start)");
        return Ok(());
    }
    let bin = pgr::pg_bin(p.pg_bin.as_deref(), &rep.backup.pg_version)?;
    let port = match p.port {
        Some(p) => p,
        None => free_port()?,
    };
    let timeout = crate::config::parse_duration(&p.recovery_timeout, "--recovery-timeout")?;
    let so = StartOptions {
        bin,
        port,
        os_user,
        timeout,
        action: p.target_action.clone(),
    };
    let out = output.clone();
    let reached = tokio::task::spawn_blocking(move || pgr::start_and_wait(&out, &so)).await??;
    for l in &reached.lines {
        eprintln!("postgres: {}", l.trim());
    }
    if reached.running {
        eprintln!(
            "PostgreSQL is running on {} (port {}, socket directory {}): recovery reached its target ({})",
            output.display(),
            reached.port,
            output.display(),
            p.target_action
        );
    } else {
        eprintln!(
            "PostgreSQL recovered to the target and shut down ({})",
            output.display()
        );
    }
    Ok(())
}

fn describe(t: &crate::engine::postgres::restore::PgTarget, exclusive: bool) -> String {
    use crate::engine::postgres::restore::PgTarget;
    let how = if exclusive {
        "just before"
    } else {
        "just after"
    };
    match t {
        PgTarget::Latest => "the end of the archive".into(),
        PgTarget::Immediate => "the end of the base backup".into(),
        PgTarget::Time(s, _) => format!("{how} the last commit at or before {s}"),
        PgTarget::Lsn(l) => format!("{how} LSN {}", walname::format_lsn(*l)),
        PgTarget::Xid(x) => format!("{how} the commit of transaction {x}"),
        PgTarget::Name(n) => format!("restore point {n:?}"),
    }
}

/// The restore_command written into the restored cluster (see
/// `restore::restore_command`).
pub(super) fn restore_command(
    url: &ReplicaUrl,
    id_files: &[PathBuf],
    r: &Reader,
    reader: &ReaderArgs,
) -> anyhow::Result<String> {
    crate::engine::postgres::restore::restore_command(
        url,
        id_files,
        &r.trust,
        reader.allow_plaintext,
    )
}

use crate::engine::postgres::sidecar::system_id;

async fn backup(a: BackupArgs) -> anyhow::Result<()> {
    use crate::engine::postgres::backup::{base_backup, BackupOptions};
    let dsn = a.conn.dsn()?;
    let w = writer(&a.write, system_id(&dsn).await?).await?;
    let wal_timeout = crate::config::parse_duration(&a.wal_timeout, "--wal-timeout")?;
    let started = std::time::Instant::now();
    let b = base_backup(
        &w,
        &dsn,
        &BackupOptions {
            label: a.label.clone(),
            wal_timeout,
        },
    )
    .await?;
    let bytes: u64 = b.archives.iter().map(|a| a.bytes).sum();
    eprintln!(
        "base backup {} complete: LSN {} to {}, timeline {}, {} archives, {} bytes, {:.2?}",
        b.id,
        walname::format_lsn(b.start_lsn),
        walname::format_lsn(b.end_lsn),
        b.timeline,
        b.archives.len(),
        bytes,
        started.elapsed()
    );
    Ok(())
}

/// `offsite pg stream`: the flags fill one `[[database]] engine =
/// "postgres"` entry and run the daemon (one settings path with the config
/// file; the defaults are the same).
async fn stream(a: StreamArgs) -> anyhow::Result<()> {
    let (raw, write) = stream_config(&a);
    run_daemon(raw, &write).await
}

/// The config `pg stream`'s flags describe.
fn stream_config(a: &StreamArgs) -> (crate::config::RawConfig, PgWriteArgs) {
    use crate::config::{RawConfig, RawDatabase, RawReplica};
    let raw = RawConfig {
        listen: a.listen.clone(),
        spool_dir: a.spool_dir.as_ref().map(|p| p.display().to_string()),
        database: vec![RawDatabase {
            engine: Some("postgres".into()),
            dsn: Some(a.conn.dsn.clone()),
            name: Some(a.name.clone()),
            slot: Some(a.slot.clone()),
            flush_after: Some(a.flush_after.clone()),
            synchronous: Some(a.synchronous),
            base_backup_interval: Some(a.base_backup_interval.clone()),
            sync_interval: a.sync_interval.clone(),
            max_lag: Some(a.max_lag.clone()),
            replica: vec![RawReplica {
                url: a.write.replica_url.clone(),
                encryption: a.write.no_encryption.then(|| "none".to_string()),
                age_recipients: a.write.age_recipient.clone(),
                age_recipients_file: a
                    .write
                    .age_recipients_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
                retention: a.retention.clone(),
                backup_retention: a.backup_retention.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    (raw, a.write.clone())
}

/// Validate `raw` as the config file is validated, then run the daemon.
async fn run_daemon(raw: crate::config::RawConfig, w: &PgWriteArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::from_raw(&raw, &crate::config::Origin::CommandLine)?;
    let signer = trust::signer(&w.keys, None)?.context(crate::sign::NO_SIGNER)?;
    let verify_keys = w
        .keys
        .verify_key
        .iter()
        .filter(|k| !k.trim().is_empty())
        .map(|k| crate::sign::PublicKey::parse(k).context("--verify-key"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    crate::daemon::Daemon {
        signer: Some(signer),
        verify_keys,
        databases: config.databases,
        listen: config.listen,
        exec: None,
        shutdown_timeout: config.shutdown_timeout,
        restore_if_db_not_exists: false,
        restore_identities: Vec::new(),
        spool_base: config.spool_dir,
        clock: crate::clock::Clock::system(),
        discover_interval: std::time::Duration::from_secs(1),
    }
    .run()
    .await
}

/// A PostgreSQL connection string given where a database path goes.
pub fn is_dsn(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `offsite replicate postgres://… REPLICA_URL [flags]`: `pg stream` with
/// the flags that mean the same for PostgreSQL; SQLite-only flags are refused.
pub async fn replicate_dsn(dsn: String, a: super::ReplicateArgs) -> anyhow::Result<()> {
    let sqlite_only = [
        ("--config", a.config.is_some()),
        ("--checkpoint-frames", a.checkpoint_frames.is_some()),
        ("--snapshot-retention", a.snapshot_retention.is_some()),
        ("--snapshot-interval", a.snapshot_interval.is_some()),
        ("--compaction-levels", a.compaction_levels.is_some()),
        ("--exec", a.exec.is_some()),
        ("--shutdown-timeout", a.shutdown_timeout.is_some()),
        ("--max-wal-size", a.max_wal_size.is_some()),
        ("--restore-if-db-not-exists", a.restore_if_db_not_exists),
        ("--age-identity", !a.age_identity.is_empty()),
    ];
    if let Some((flag, _)) = sqlite_only.iter().find(|(_, set)| *set) {
        anyhow::bail!("{flag} is a SQLite setting; for PostgreSQL see `offsite pg stream --help` (retention: `offsite prune`)");
    }
    let replica_url = a
        .replica_url
        .clone()
        .context("replicate postgres://… needs the REPLICA_URL too")?;
    let (raw, write) = stream_config(&StreamArgs {
        conn: PgConnArgs { dsn },
        write: PgWriteArgs {
            replica_url,
            age_recipient: a.age_recipient.clone(),
            age_recipients_file: a.age_recipients_file.clone(),
            no_encryption: a.no_encryption,
            keys: a.keys.clone(),
        },
        slot: "offsite".into(),
        sync_interval: a.sync_interval.clone(),
        flush_after: "store".into(),
        synchronous: false,
        spool_dir: a.spool_dir.clone(),
        base_backup_interval: "24h".into(),
        listen: a.listen.clone(),
        name: "postgres".into(),
        max_lag: a.max_lag.clone().unwrap_or_else(|| "1m".into()),
        retention: a.retention.clone(),
        backup_retention: None,
    });
    run_daemon(raw, &write).await
}
