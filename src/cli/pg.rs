//! `offsite pg …`: PostgreSQL's archive_command and restore_command, base
//! backups and streaming (docs/POSTGRES.md).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::trust::{self, KeyArgs, ReaderArgs};
use crate::daemon::ExitStatus;
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
    let t = trust::trust(&a.keys, Some(&a.reader), &a.age_identity, None)?;
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
    #[arg(long = "name", value_name = "RESTORE_POINT", help_heading = "PostgreSQL")]
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
    #[arg(long = "tablespace", value_name = "OLD=NEW", help_heading = "PostgreSQL")]
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
    #[arg(long, value_name = "DURATION", default_value = "1h", help_heading = "PostgreSQL")]
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
    let os_user = p.pg_user.clone().or_else(|| root.then(|| "postgres".to_string()));
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
        eprintln!("PostgreSQL recovered to the target and shut down ({})", output.display());
    }
    Ok(())
}

fn describe(t: &crate::engine::postgres::restore::PgTarget, exclusive: bool) -> String {
    use crate::engine::postgres::restore::PgTarget;
    let how = if exclusive { "just before" } else { "just after" };
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
fn restore_command(
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
        .map(|w| if w == "%f" || w == "%p" { w.clone() } else { shell_words::quote(w).into_owned() })
        .collect::<Vec<_>>()
        .join(" "))
}
