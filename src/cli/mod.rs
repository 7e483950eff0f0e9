//! Command-line interface: parses arguments and calls into the library.
//! `replicate`'s flags become the config file's structure in `replicate`.

mod pg;
mod pg_maint;
mod replicate;
mod trust;

use replicate::replicate;
pub use trust::{KeyArgs, ReaderArgs};

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{parse_duration, Config};
use crate::keys::Identities;
use crate::layout::{self, Catalog, Target};
use crate::restore::{self, RestoreOptions};
use crate::storage::{self, ReplicaUrl};

#[derive(Parser, Debug)]
#[command(
    name = "offsite",
    version,
    about = "Continuous, encrypted, point-in-time backups of SQLite databases to S3-compatible storage"
)]
pub struct Cli {
    /// Log format: text (default on a terminal) or json.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Replicate a database (or every database in --config) until SIGINT/SIGTERM.
    Replicate(Box<ReplicateArgs>),
    /// Restore a database from a replica, to the latest state or to a txid/time.
    Restore(RestoreArgs),
    /// Show the restore window, lineages and snapshots of a replica.
    List(ListArgs),
    /// Generate an age identity (prints its recipient) or, with --signing, the shipper's signing key (prints its verifying key).
    Keygen(KeygenArgs),
    /// Delete what the retention policy no longer needs (prints what and why).
    Prune(PruneArgs),
    /// Check a replica: continuity, every object's envelope and checksums, and with --deep real restores.
    Verify(VerifyArgs),
    /// Ask the running daemon to ship a database now; with --wait, return once it is durable.
    Sync(SyncArgs),
    /// PostgreSQL: archive_command, restore_command, base backups (docs/POSTGRES.md).
    #[command(subcommand)]
    Pg(pg::PgCommand),
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The database (as the daemon knows it: its path; for PostgreSQL the
    /// `pg stream --name`).
    pub db_path: PathBuf,
    /// Return only once the database's current state is durable in every replica.
    #[arg(long)]
    pub wait: bool,
    /// The daemon's HTTP listener (default: `listen` from --config, else 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Give up (exit 1) after this long.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub timeout: String,
}

#[derive(Args, Debug)]
pub struct ReplicateArgs {
    /// Database file (in WAL mode).
    pub db_path: Option<PathBuf>,
    /// file:///absolute/dir or s3://BUCKET/PREFIX[?endpoint=…&region=…&force-path-style=true]
    pub replica_url: Option<String>,
    /// Encrypt to this age recipient (age1…); repeatable.
    #[arg(long = "age-recipient", value_name = "AGE_PUBLIC_KEY")]
    pub age_recipient: Vec<String>,
    /// File with age recipients, one per line.
    #[arg(long, value_name = "PATH")]
    pub age_recipients_file: Option<PathBuf>,
    /// Store backups unencrypted (explicit opt-out; never the default).
    #[arg(long)]
    pub no_encryption: bool,
    /// How often pending commits are uploaded (default 1s).
    #[arg(long, value_name = "DURATION")]
    pub sync_interval: Option<String>,
    /// Replicate every database in this TOML config file. Flags that are
    /// not per replica apply over the file; per-replica ones are refused.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Directory for staging files (default: the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Checkpoint after this many WAL frames once everything is shipped (default 1000).
    #[arg(long, value_name = "FRAMES")]
    pub checkpoint_frames: Option<u32>,
    /// Point-in-time window kept by pruning (default 24h; "off": never prune).
    #[arg(long, value_name = "DURATION|off")]
    pub retention: Option<String>,
    /// Snapshots kept beyond the window: a count or a duration (default 2).
    #[arg(long, value_name = "N|DURATION")]
    pub snapshot_retention: Option<String>,
    /// Take a new snapshot this often (default 24h; "off": only at lineage start).
    #[arg(long, value_name = "DURATION|off")]
    pub snapshot_interval: Option<String>,
    /// Compaction windows, comma-separated (default 1m,15m,4h; "off": none).
    #[arg(long, value_name = "LIST|off")]
    pub compaction_levels: Option<String>,
    /// Serve /metrics, /healthz, /readyz and POST /sync on this address (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Run the application as a child: signals are forwarded to it, and when
    /// it exits everything is shipped and offsite exits with its status.
    #[arg(long, value_name = "\"CMD ARGS\"")]
    pub exec: Option<String>,
    /// How long shutdown may spend shipping pending commits (default 60s).
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// /readyz fails when a replica is further behind than this (default 1m).
    #[arg(long, value_name = "DURATION")]
    pub max_lag: Option<String>,
    /// While the replica is unreachable, hold the WAL (no gap) up to this
    /// size; beyond it, let it be checkpointed and take a new snapshot later
    /// (default 512MiB).
    #[arg(long, value_name = "SIZE")]
    pub max_wal_size: Option<String>,
    /// Restore a missing database from its replica (latest state) before replicating.
    #[arg(long)]
    pub restore_if_db_not_exists: bool,
    /// age identity for --restore-if-db-not-exists; repeatable (with --config:
    /// default the replica's age-identity-files).
    #[arg(long = "age-identity", value_name = "PATH")]
    pub age_identity: Vec<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// REPLICA_URL, or with --config the DB_PATH whose replica to prune.
    pub source: String,
    /// Print what would be deleted and why; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Point-in-time window to keep (required without --config).
    #[arg(long, value_name = "DURATION")]
    pub retention: Option<String>,
    /// Snapshots kept beyond the window: a count or a duration (default 2).
    #[arg(long, value_name = "N|DURATION")]
    pub snapshot_retention: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// With --config: the replica to prune (default: the first).
    #[arg(long, value_name = "NAME")]
    pub replica: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub reader: ReaderArgs,
    #[command(flatten)]
    pub pg: pg_maint::PgPruneArgs,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// REPLICA_URL, or with --config the DB_PATH whose replica to use.
    pub source: String,
    /// Where to write the restored database (must not exist unless --force).
    #[arg(short = 'o', long = "output", value_name = "OUTPUT")]
    pub output: PathBuf,
    /// Restore the state after the last commit observed at or before this instant (RFC 3339).
    #[arg(long, value_name = "RFC3339", conflicts_with = "txid")]
    pub timestamp: Option<String>,
    /// Restore the state right after offsite's commit number N (SQLite;
    /// for a PostgreSQL transaction id use --xid).
    #[arg(long, value_name = "N")]
    pub txid: Option<u64>,
    /// age identity file; repeatable.
    #[arg(long = "age-identity", value_name = "PATH")]
    pub age_identity: Vec<PathBuf>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// Take the replica from this config file (SOURCE is then the database path).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Skip PRAGMA integrity_check on the result (on by default).
    #[arg(long)]
    pub no_integrity_check: bool,
    /// Objects downloaded in parallel.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// With --config: restore from this replica (default: the first one whose
    /// listing works and holds the target).
    #[arg(long, value_name = "NAME")]
    pub replica: Option<String>,
    /// Do nothing (exit 0) if OUTPUT already exists: for init containers.
    #[arg(long, conflicts_with = "force")]
    pub if_db_not_exists: bool,
    /// Do nothing (exit 0) if the replica holds no backup yet (an unreachable
    /// replica is still an error).
    #[arg(long)]
    pub if_replica_exists: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub reader: ReaderArgs,
    /// Permission bits of the restored database, in octal: owner read-write
    /// (0600, the default), optionally group bits (0640, 0660 for an
    /// application of the same group); never anything for other users.
    #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = parse_mode_arg)]
    pub mode: u32,
    #[command(flatten)]
    pub pg: pg::PgRestoreArgs,
}

fn parse_mode_arg(s: &str) -> Result<u32, String> {
    storage::parse_file_mode(s).map_err(|e| format!("{e:#}"))
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// REPLICA_URL, or with --config the DB_PATH whose replica to list.
    pub source: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// With --config: the replica to list (default: the first).
    #[arg(long, value_name = "NAME")]
    pub replica: Option<String>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub reader: ReaderArgs,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// REPLICA_URL, or with --config the DB_PATH whose replica to verify.
    pub source: String,
    /// age identity file; repeatable. Without it an encrypted replica is
    /// checked by structure and envelopes only.
    #[arg(long = "age-identity", value_name = "PATH")]
    pub age_identity: Vec<PathBuf>,
    /// Also restore sampled points (oldest, newest, random, one time) into a
    /// temp dir and run PRAGMA integrity_check on each.
    #[arg(long)]
    pub deep: bool,
    /// Random restore points per lineage with --deep (besides oldest and newest).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub samples: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Take the replica from this config file (SOURCE is then the database path).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Objects downloaded in parallel.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub reader: ReaderArgs,
    #[command(flatten)]
    pub pg: pg_maint::PgVerifyArgs,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Write the key here (mode 0600) instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "KEY_FILE")]
    pub output: Option<PathBuf>,
    /// Make the shipper's Ed25519 signing key instead of an age identity;
    /// prints its verifying key (offsite-vk1-…), which restores pin.
    #[arg(long)]
    pub signing: bool,
    /// With an age identity: pin this verifying key in the identity file
    /// (`# offsite-verify-key:` line), so restores with it trust that shipper.
    #[arg(long = "pin", value_name = "KEY")]
    pub pin: Vec<String>,
}

/// The log filter unless OFFSITE_LOG or RUST_LOG sets one: offsite's own
/// messages from info up, other crates' (the AWS SDK's credential chain and
/// HTTP stack: multi-line dumps of IMDS responses and the like) only when
/// they are errors. offsite reports what failed itself, in one clear line;
/// `OFFSITE_LOG=info,aws_config=debug` shows the SDK's side.
pub const DEFAULT_LOG_FILTER: &str = "error,offsite=info,offsite_workload=info";

pub fn init_logging(format: Option<LogFormat>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("OFFSITE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let json = match format {
        Some(f) => f == LogFormat::Json,
        None => !std::io::stderr().is_terminal(),
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        let _ = b.json().try_init();
    } else {
        let _ = b.try_init();
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Replicate(a) => replicate(*a).await,
        Command::Restore(a) => restore_cmd(a).await,
        Command::List(a) => list(a).await,
        Command::Keygen(a) => keygen(a),
        Command::Prune(a) => prune_cmd(a).await,
        Command::Verify(a) => verify_cmd(a).await,
        Command::Sync(a) => sync_cmd(a).await,
        Command::Pg(c) => pg::run(c).await,
    }
}

fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
    if a.signing {
        if !a.pin.is_empty() {
            bail!("--pin belongs in an age identity file (offsite keygen -o identity.txt --pin offsite-vk1-…), not in a signing key");
        }
        match a.output {
            Some(p) => {
                let vk = crate::sign::keygen_to_file(&p)?;
                eprintln!(
                    "wrote the signing key to {} (the shipper's secret: give it only to the shipper); its verifying key, which restores pin:",
                    p.display()
                );
                println!("{vk}");
            }
            None => {
                let s = crate::sign::Signer::generate();
                print!("{}", s.file_text());
                eprintln!("Verifying key: {}", s.public());
            }
        }
        return Ok(());
    }
    let pins = a
        .pin
        .iter()
        .map(|k| crate::sign::PublicKey::parse(k).context("--pin"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    match a.output {
        Some(p) => {
            let r = crate::keys::keygen_to_file(&p, &pins)?;
            eprintln!(
                "wrote identity to {} (keep it secret and off the database host); its recipient:",
                p.display()
            );
            println!("{r}");
        }
        None => {
            let (id, r) = crate::keys::generate();
            print!("{}", crate::keys::identity_file_text(&id, &pins));
            eprintln!("Public key: {r}");
        }
    }
    Ok(())
}

async fn sync_cmd(a: SyncArgs) -> anyhow::Result<()> {
    let timeout = parse_duration(&a.timeout, "--timeout")?;
    let addr = match (&a.listen, &a.config) {
        (Some(l), _) => l.clone(),
        (None, Some(c)) => Config::load(c)?.listen.with_context(|| {
            format!("{} has no `listen` address; the daemon needs one for `offsite sync` (or pass --listen)", c.display())
        })?,
        (None, None) => crate::config::defaults::SYNC_LISTEN.to_string(),
    };
    let body = crate::daemon::sync_via_http(&addr, &a.db_path, a.wait, timeout).await?;
    println!("{body}");
    Ok(())
}

/// The config file, if one is given (for its keys).
fn config_of(config: &Option<PathBuf>) -> anyhow::Result<Option<Config>> {
    config.as_deref().map(Config::load).transpose()
}

/// With --config, the database is known: its replica must be of it.
fn with_database(mut reader: ReaderArgs, config: &Option<PathBuf>, source: &str) -> ReaderArgs {
    if config.is_some() && reader.database.is_none() {
        reader.database = std::path::Path::new(source)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
    }
    reader
}

/// The replica URL and identities for restore/list, from args or config.
fn resolve_source(
    source: &str,
    config: &Option<PathBuf>,
    identities: &[PathBuf],
) -> anyhow::Result<(ReplicaUrl, Vec<PathBuf>)> {
    let (mut v, ids) = resolve_replicas(source, config, identities, None)?;
    Ok((v.remove(0).url, ids))
}

/// The replicas to read from (with --config: the named one, or all of them
/// in order) and the identity files to use.
fn resolve_replicas(
    source: &str,
    config: &Option<PathBuf>,
    identities: &[PathBuf],
    name: Option<&str>,
) -> anyhow::Result<(Vec<crate::config::ReplicaConfig>, Vec<PathBuf>)> {
    match config {
        Some(p) => {
            let cfg = Config::load(p)?;
            let d = cfg.database(std::path::Path::new(source))?;
            let chosen = match name {
                Some(_) => vec![d.replica(name)?.clone()],
                None => d.replicas.clone(),
            };
            let ids = if identities.is_empty() {
                chosen[0].age_identity_files.clone()
            } else {
                identities.to_vec()
            };
            Ok((chosen, ids))
        }
        None => {
            if name.is_some() {
                bail!("--replica needs --config (with a URL, the URL is the replica)");
            }
            let url: ReplicaUrl = source.parse()?;
            Ok((
                vec![crate::config::ReplicaConfig::from_url(url)],
                identities.to_vec(),
            ))
        }
    }
}

/// The first replica whose listing works and can restore `target`.
async fn pick_replica(
    replicas: &[crate::config::ReplicaConfig],
    target: Target,
) -> anyhow::Result<(crate::config::ReplicaConfig, storage::DynStorage)> {
    let mut errors = Vec::new();
    for r in replicas {
        let res = async {
            let store = storage::open(&r.url).await?;
            let catalog = Catalog::load(store.as_ref()).await?;
            catalog.plan(target)?;
            Ok::<_, anyhow::Error>(store)
        }
        .await;
        match res {
            Ok(store) => {
                if replicas.len() > 1 {
                    tracing::info!(replica = %r.name, url = %r.url, "restoring from this replica");
                }
                return Ok((r.clone(), store));
            }
            Err(e) if replicas.len() > 1 => {
                tracing::warn!(replica = %r.name, error = format!("{e:#}"), "replica unusable; trying the next one");
                errors.push(format!("{}: {e:#}", r.name));
            }
            Err(e) => return Err(e),
        }
    }
    bail!("no replica can restore this target: {}", errors.join("; "))
}

/// Whether any of `replicas` holds a lineage. A replica that cannot be
/// listed is an error: "no backup" must not be confused with "unreachable".
///
/// Names anyone with write access could have added do not count: a lineage
/// whose every snapshot is proven foreign (another key's, another
/// replica's) is not a backup. A damaged snapshot of this replica does
/// count (the restore then fails naming it): "no backup" must never be
/// concluded from damage, or the app would start on an empty database.
async fn any_backup(
    replicas: &[crate::config::ReplicaConfig],
    trust: &crate::sign::Trust,
) -> anyhow::Result<bool> {
    for r in replicas {
        let store = storage::open(&r.url).await?;
        let catalog = Catalog::load(store.as_ref())
            .await
            .with_context(|| format!("checking whether replica {} holds a backup", r.name))?;
        let mut t = trust.clone();
        crate::record::open(store.as_ref(), &mut t).await?;
        for l in catalog.lineages.values() {
            if l.snapshots.is_empty() {
                return Ok(true);
            }
            for s in &l.snapshots {
                match crate::trusted::envelope(store.as_ref(), &s.key, s.size, &t).await {
                    Err(e) if crate::codec::is_foreign(&e) => {
                        tracing::error!(object = %s.key, error = %format!("{e:#}"), "not a backup of this replica (planted?); ignored");
                    }
                    _ => return Ok(true),
                }
            }
        }
    }
    Ok(false)
}

async fn restore_cmd(a: RestoreArgs) -> anyhow::Result<()> {
    if a.config.is_none() {
        if let Ok(url) = a.source.parse::<ReplicaUrl>() {
            let store = storage::open(&url).await?;
            if crate::record::engine(store.as_ref()).await? == crate::engine::Engine::Postgres {
                return pg::restore(a, url).await;
            }
        }
    }
    pg::refuse_pg_flags(&a.pg)?;
    let (replicas, id_files) =
        resolve_replicas(&a.source, &a.config, &a.age_identity, a.replica.as_deref())?;
    if a.if_db_not_exists && std::fs::symlink_metadata(&a.output).is_ok() {
        eprintln!(
            "{} exists; nothing restored (--if-db-not-exists)",
            a.output.display()
        );
        return Ok(());
    }
    let cfg = config_of(&a.config)?;
    let reader = with_database(a.reader.clone(), &a.config, &a.source);
    let trust = trust::trust(&a.keys, Some(&reader), &id_files, cfg.as_ref())?;
    if a.if_replica_exists && !any_backup(&replicas, &trust).await? {
        eprintln!("the replica holds no backup yet; nothing restored (--if-replica-exists)");
        return Ok(());
    }
    let target = match (&a.timestamp, a.txid) {
        (Some(t), None) => Target::Time(layout::parse_time(t)?),
        (None, Some(n)) => Target::Txid(n),
        (None, None) => Target::Latest,
        (Some(_), Some(_)) => bail!("give either --timestamp or --txid, not both"),
    };
    let identities = if id_files.is_empty() {
        None
    } else {
        Some(Identities::read_files(&id_files)?)
    };
    let (_, store) = pick_replica(&replicas, target).await?;
    let started = std::time::Instant::now();
    let rep = restore::restore(
        store.as_ref(),
        RestoreOptions {
            target,
            output: a.output.clone(),
            force: a.force,
            identities,
            trust,
            integrity_check: !a.no_integrity_check,
            parallel: a.parallel,
            progress: std::io::stderr().is_terminal(),
            mode: a.mode,
        },
    )
    .await?;
    eprintln!(
        "restored {} to txid {} ({}) from lineage {}: {} objects, {} bytes, {:.2?}",
        a.output.display(),
        rep.txid,
        layout::fmt_time_us(rep.time_us),
        rep.lineage,
        rep.objects,
        rep.bytes_downloaded,
        started.elapsed()
    );
    Ok(())
}

async fn list(a: ListArgs) -> anyhow::Result<()> {
    let (mut rs, _) = resolve_replicas(&a.source, &a.config, &[], a.replica.as_deref())?;
    let url = rs.remove(0).url;
    let store = storage::open(&url).await?;
    let cfg = config_of(&a.config)?;
    let reader = with_database(a.reader.clone(), &a.config, &a.source);
    let mut trust = trust::trust(&a.keys, Some(&reader), &[], cfg.as_ref())?;
    let engine = crate::record::open(store.as_ref(), &mut trust).await?;
    if engine == crate::engine::Engine::Postgres {
        return pg_maint::list(&url, store.as_ref(), &trust, a.json).await;
    }
    let listed = Catalog::load(store.as_ref()).await?;
    // Only snapshots whose signed envelopes prove out make a restore point.
    let (catalog, refused) =
        crate::trusted::verified(store.as_ref(), &listed, &trust, &mut Default::default()).await;
    let mut v = restore::describe(&catalog);
    v["engine"] = engine.name().into();
    v["refused"] = serde_json::to_value(&refused)?;
    // What this listing cost (one LIST per 1000 objects on S3).
    v["requests"] = serde_json::to_value(store.request_counts())?;
    if a.json {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    if catalog.is_empty() {
        println!("{url}: no backups");
        for r in &refused {
            println!("refused  {r}");
        }
        return Ok(());
    }
    let w = catalog.window().unwrap();
    println!("replica  {url}");
    println!("engine   {engine}");
    println!(
        "window   txid {} ({}) .. txid {} ({})",
        w.0 .0,
        layout::fmt_time_us(w.0 .1),
        w.1 .0,
        layout::fmt_time_us(w.1 .1)
    );
    for l in catalog.lineages.values() {
        println!(
            "lineage  {}  objects {}  bytes {}",
            l.id,
            l.object_count(),
            l.bytes()
        );
        println!(
            "  objects  {} snapshots, {} level-0 segments, {} compacted segments",
            l.snapshots.len(),
            l.segments.values().map(|v| v.len()).sum::<usize>(),
            l.compacted.values().map(|v| v.len()).sum::<usize>()
        );
        for s in &l.snapshots {
            println!(
                "  snapshot txid {} at {}",
                s.txid,
                layout::fmt_time_us(s.time_us)
            );
        }
        if let Some(b) = l.continuous_from() {
            println!(
                "  every commit restorable from txid {} ({})",
                b.txid,
                layout::fmt_time_us(b.time_us)
            );
        }
        if let Some(h) = l.head() {
            println!(
                "  latest   txid {} at {}",
                h.last_txid(),
                layout::fmt_time_us(h.last_time_us())
            );
        }
    }
    if !catalog.ignored.is_empty() {
        println!("ignored {} unrecognised objects", catalog.ignored.len());
    }
    for r in &refused {
        println!("refused  {r}");
    }
    Ok(())
}

async fn prune_cmd(a: PruneArgs) -> anyhow::Result<()> {
    if let Some(url) = pg_maint::postgres_url(&a.source, &a.config).await? {
        return pg_maint::prune(a, url).await;
    }
    pg_maint::refuse_for_sqlite(Some(&a.pg), None)?;
    let (mut rs, _) = resolve_replicas(&a.source, &a.config, &[], a.replica.as_deref())?;
    let r = rs.remove(0);
    let mut policy = match (&a.config, &r.retention) {
        (Some(_), Some(p)) => p.clone(),
        (Some(_), None) => bail!(
            "replica {} has retention = \"off\": nothing to prune",
            r.name
        ),
        (None, _) => {
            let Some(ret) = &a.retention else {
                bail!("give the point-in-time window to keep with --retention DURATION (e.g. 72h), or use --config so the replica's own policy applies");
            };
            crate::retention::Policy {
                retention: parse_duration(ret, "--retention")?,
                ..Default::default()
            }
        }
    };
    if a.config.is_some() {
        if let Some(ret) = &a.retention {
            policy.retention = parse_duration(ret, "--retention")?;
        }
    }
    if let Some(s) = &a.snapshot_retention {
        policy.snapshot_retention =
            crate::retention::SnapshotRetention::parse(s).context("--snapshot-retention")?;
    }
    let store = storage::open(&r.url).await?;
    // Deleting needs the replica understood: a replica of an engine this
    // offsite does not know is refused, and only objects signed for this
    // replica steer what is deleted.
    let cfg = config_of(&a.config)?;
    let reader = with_database(a.reader.clone(), &a.config, &a.source);
    let mut trust = trust::trust(&a.keys, Some(&reader), &[], cfg.as_ref())?;
    crate::record::open(store.as_ref(), &mut trust).await?;
    let now = crate::clock::Clock::from_env()?.now_us();
    let rep = crate::retention::prune(
        store.as_ref(),
        &policy,
        now,
        a.dry_run,
        &trust,
        &mut Default::default(),
    )
    .await?;
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
        return Ok(());
    }
    let verb = if a.dry_run { "would delete" } else { "deleted" };
    for d in &rep.deleted {
        println!("{verb} {} ({} bytes): {}", d.key, d.size, d.reason);
    }
    for k in &rep.locked {
        println!("locked {k}: Object Lock retention not expired; will be deleted by a later prune");
    }
    for w in &rep.warnings {
        println!("warning: {w}");
    }
    println!(
        "{verb} {} objects ({} bytes); kept {}; window starts {}",
        rep.deleted.len(),
        rep.bytes_deleted,
        rep.kept,
        rep.window_start
    );
    Ok(())
}

async fn verify_cmd(a: VerifyArgs) -> anyhow::Result<()> {
    if let Some(url) = pg_maint::postgres_url(&a.source, &a.config).await? {
        return pg_maint::verify(a, url).await;
    }
    pg_maint::refuse_for_sqlite(None, Some(&a.pg))?;
    let (url, id_files) = resolve_source(&a.source, &a.config, &a.age_identity)?;
    let identities = if id_files.is_empty() {
        None
    } else {
        Some(Identities::read_files(&id_files)?)
    };
    let store = storage::open(&url).await?;
    let cfg = config_of(&a.config)?;
    let reader = with_database(a.reader.clone(), &a.config, &a.source);
    let trust = trust::trust(&a.keys, Some(&reader), &id_files, cfg.as_ref())?;
    let report = crate::verify::verify(
        store.as_ref(),
        &crate::verify::VerifyOptions {
            identities,
            trust,
            deep: a.deep,
            samples: a.samples,
            rng_seed: None,
            parallel: a.parallel,
        },
    )
    .await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    if !report.ok() {
        let keys: Vec<&str> = report
            .lineages
            .iter()
            .flat_map(|l| l.problems.iter())
            .chain(report.problems.iter())
            .map(|p| p.key.as_str())
            .take(5)
            .collect();
        bail!(
            "verify found {} problems (in {})",
            report.problem_count(),
            keys.join(", ")
        );
    }
    Ok(())
}
