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
