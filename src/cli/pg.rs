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
use crate::engine::postgres::{walname, wire, Reader, Writer};
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
    /// How often received WAL is shipped (default 1s).
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub sync_interval: String,
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
    /// Fetch up to N following segments in parallel into the spool.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub prefetch: usize,
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
    match wal_fetch_inner(&a).await {
        Ok(Fetched::Written { .. }) => Ok(()),
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
    fetch::wal_fetch(
        &r,
        &a.name,
        &a.dest,
        &FetchOptions {
            prefetch: a.prefetch,
            spool_dir: spool,
        },
    )
    .await
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

/// The restore_command written into the restored cluster: this offsite's
/// wal-fetch for the same archive, with the same identities and pinned
/// keys (no secret in it: identity files are named, not copied).
pub(super) fn restore_command(
    url: &ReplicaUrl,
    id_files: &[PathBuf],
    r: &Reader,
    reader: &ReaderArgs,
) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find offsite's own executable")?;
    let mut words = vec![
        exe.display().to_string(),
        "pg".into(),
        "wal-fetch".into(),
        "%f".into(),
        "%p".into(),
        "--replica".into(),
        url.to_string(),
    ];
    for f in id_files {
        words.push("--age-identity".into());
        words.push(f.display().to_string());
    }
    for k in &r.trust.keys {
        words.push("--verify-key".into());
        words.push(k.to_string());
    }
    if let Some(id) = &r.trust.replica {
        words.push("--replica-id".into());
        words.push(id.clone());
    }
    if reader.allow_plaintext {
        words.push("--allow-plaintext".into());
    }
    Ok(words
        .iter()
        .map(|w| {
            if w == "%f" || w == "%p" {
                w.clone()
            } else {
                shell_words::quote(w).into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" "))
}

/// The system identifier of the cluster at `dsn` (IDENTIFY_SYSTEM).
async fn system_id(dsn: &Dsn) -> anyhow::Result<u64> {
    let mut c = wire::Conn::connect(dsn, true).await?;
    let sys = c.identify_system().await?;
    c.close().await;
    sys.system_id
        .parse()
        .with_context(|| format!("PostgreSQL sent system identifier {:?}", sys.system_id))
}

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

async fn stream(a: StreamArgs) -> anyhow::Result<()> {
    use crate::engine::postgres::stream::{StreamOptions, Streamer};
    let dsn = a.conn.dsn()?.with_application_name("offsite");
    let system_id = system_id(&dsn).await?;
    let w = writer(&a.write, system_id).await?;
    let mut sync_interval = crate::config::parse_duration(&a.sync_interval, "--sync-interval")?;
    if a.synchronous {
        sync_interval = std::time::Duration::from_millis(5);
    }
    let backup_interval = match a.base_backup_interval.as_str() {
        "off" => None,
        s => Some(crate::config::parse_duration(s, "--base-backup-interval")?),
    };
    let o = StreamOptions {
        slot: a.slot.clone(),
        sync_interval,
        flush_after: a.flush_after.parse()?,
        spool_dir: a
            .spool_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("offsite-pg-{system_id}-spool"))),
        consolidate_after: 8,
        synchronous: a.synchronous,
    };
    let mut lease = crate::lease::Lease::new(
        &crate::engine::postgres::database_name(system_id),
        std::time::Duration::from_secs(300),
        std::time::Duration::from_secs(60),
    );
    lease
        .ensure(w.store.as_ref(), crate::engine::postgres::now_us())
        .await?;
    let lease = std::sync::Arc::new(tokio::sync::Mutex::new(lease));
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            crate::engine::postgres::shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
    }
    let w = std::sync::Arc::new(w);
    let max_lag = crate::config::parse_duration(&a.max_lag, "--max-lag")?;
    let registry = crate::status::Registry::new(crate::clock::Clock::system());
    let status = std::sync::Arc::new(crate::status::ReplicaStatus::new(
        &a.name,
        "replica1",
        &a.write.replica_url.parse::<ReplicaUrl>()?.to_string(),
        max_lag,
        crate::engine::postgres::now_us(),
    ));
    registry.register(status.clone(), w.store.clone());
    let http = match &a.listen {
        Some(addr) => Some(crate::http::serve(addr, registry.clone(), stop.clone()).await?),
        None => None,
    };
    let backups = tokio::spawn(scheduled_backups(
        w.clone(),
        dsn.clone(),
        backup_interval,
        stop.clone(),
        status.clone(),
    ));
    // The lease is renewed while streaming; another shipper holding it
    // stops this one (one shipper per archive).
    let renew = {
        let (lease, store, stop_tx, status) = (
            lease.clone(),
            w.store.clone(),
            stop_tx.clone(),
            status.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(20)).await;
                let r = lease
                    .lock()
                    .await
                    .ensure(store.as_ref(), crate::engine::postgres::now_us())
                    .await;
                match r {
                    Ok(()) => {}
                    Err(e) if crate::lease::is_held(&e) => {
                        tracing::error!("lost the replica's lease, stopping: {e:#}");
                        *status.failed.lock().unwrap() = Some(format!("{e:#}"));
                        let _ = stop_tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!("cannot renew the replica's lease (retrying): {e:#}"),
                }
            }
        })
    };
    let mut streamer = Streamer::new(&w, &o, status.clone());
    let mut delay = std::time::Duration::from_millis(500);
    let result = loop {
        match streamer.run(&dsn, &mut stop).await {
            Ok(()) => break Ok(()),
            Err(e) if *stop.borrow() => break Err(e),
            Err(e) if is_fatal(&e) => {
                *status.failed.lock().unwrap() = Some(format!("{e:#}"));
                break Err(e);
            }
            Err(e) => {
                status
                    .running
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                status.set_state(crate::status::ReplicaState::Restarting);
                tracing::warn!("streaming stopped, reconnecting in {delay:?}: {e:#}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => break Ok(()),
                }
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        }
        if let Err(e) = lease
            .lock()
            .await
            .ensure(w.store.as_ref(), crate::engine::postgres::now_us())
            .await
        {
            break Err(e);
        }
    };
    renew.abort();
    backups.abort();
    status.set_state(crate::status::ReplicaState::Stopped);
    let lost = status.failed.lock().unwrap().clone();
    let result = match (result, lost) {
        (Ok(()), Some(why)) if why.contains("another offsite") => Err(anyhow::anyhow!(why)),
        (r, _) => r,
    };
    if !result
        .as_ref()
        .is_err_and(|e| crate::lease::is_held(e) || format!("{e:#}").contains("another offsite"))
    {
        lease.lock().await.release(w.store.as_ref()).await;
    }
    if let Some(h) = http {
        h.abort();
    }
    result
}

/// Errors no reconnect fixes: the user must act.
fn is_fatal(e: &anyhow::Error) -> bool {
    let t = format!("{e:#}");
    [
        "give each cluster its own replica URL",
        "password authentication failed",
        "REPLICATION",
        "different content",
        "wal_level",
        "replication slots",
    ]
    .iter()
    .any(|k| t.contains(k))
}

/// Base backups in the daemon: one at start when the archive holds none,
/// then every `interval`.
async fn scheduled_backups(
    w: std::sync::Arc<Writer>,
    dsn: Dsn,
    interval: Option<std::time::Duration>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    status: std::sync::Arc<crate::status::ReplicaStatus>,
) {
    use crate::engine::postgres::{archive, backup};
    let mut last: Option<i64> = match archive::list_backups(w.store.as_ref(), &w.trust).await {
        Ok((b, _)) => b.last().map(|b| b.end_time_us),
        Err(_) => None,
    };
    let publish = |t: Option<i64>| {
        status
            .pg_last_base_backup_us
            .store(t.unwrap_or(0), std::sync::atomic::Ordering::Relaxed)
    };
    publish(last);
    let mut seen_breaks = status
        .lineage_breaks
        .load(std::sync::atomic::Ordering::Relaxed);
    loop {
        // A gap in the WAL (an invalidated slot) needs a new backup now.
        let breaks = status
            .lineage_breaks
            .load(std::sync::atomic::Ordering::Relaxed);
        let due = match (last, interval) {
            _ if breaks != seen_breaks => true,
            (None, _) => true,
            (Some(t), Some(i)) => crate::engine::postgres::now_us() - t >= i.as_micros() as i64,
            (Some(_), None) => false,
        };
        if due {
            let o = backup::BackupOptions {
                label: "offsite scheduled".into(),
                wal_timeout: std::time::Duration::from_secs(600),
            };
            match backup::base_backup(&w, &dsn, &o).await {
                Ok(b) => {
                    seen_breaks = breaks;
                    tracing::info!(backup = %b.id, "scheduled base backup complete");
                    last = Some(b.end_time_us);
                    publish(last);
                }
                Err(e) => tracing::error!("scheduled base backup failed (retried in 1 min): {e:#}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(if due { 60 } else { 5 })) => {}
            _ = stop.changed() => return,
        }
    }
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
        ("--retention", a.retention.is_some()),
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
    stream(StreamArgs {
        conn: PgConnArgs { dsn },
        write: PgWriteArgs {
            replica_url,
            age_recipient: a.age_recipient.clone(),
            age_recipients_file: a.age_recipients_file.clone(),
            no_encryption: a.no_encryption,
            keys: a.keys.clone(),
        },
        slot: "offsite".into(),
        sync_interval: a.sync_interval.clone().unwrap_or_else(|| "1s".into()),
        flush_after: "store".into(),
        synchronous: false,
        spool_dir: a.spool_dir.clone(),
        base_backup_interval: "24h".into(),
        listen: a.listen.clone(),
        name: "postgres".into(),
        max_lag: a.max_lag.clone().unwrap_or_else(|| "1m".into()),
    })
    .await
}
