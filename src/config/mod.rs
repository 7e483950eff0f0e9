//! Settings: the validated `Config` that `replicate` runs and `restore`,
//! `list`, `verify` and `prune` read, built on one path from either source.
//! The TOML file is strict (unknown keys are errors, `${VAR}` expands from
//! the environment); the command line (`replicate DB_PATH REPLICA_URL
//! [flags]`, or `--config` with flags over the file) fills the same raw
//! structure. `Config::from_raw` validates both and says what to fix, naming
//! the file's key or the flag. Every default is in `defaults`.

pub mod defaults;
mod discover;
mod units;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::codec::Encryption;
use crate::keys::Recipients;
use crate::storage::ReplicaUrl;

pub use discover::{DirScan, Discover};
pub(crate) use units::split_levels;
pub use units::{expand_env, parse_duration, parse_size};

/// The settings as given (strings, unset = default), before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawConfig {
    pub(crate) sync_interval: Option<String>,
    pub(crate) spool_dir: Option<String>,
    pub(crate) listen: Option<String>,
    pub(crate) exec: Option<String>,
    pub(crate) shutdown_timeout: Option<String>,
    pub(crate) max_lag: Option<String>,
    pub(crate) max_wal_size: Option<String>,
    /// The shipper's Ed25519 signing key file (`offsite keygen --signing`).
    pub(crate) signing_key_file: Option<String>,
    /// Further verifying keys trusted (old keys during a rotation).
    #[serde(default)]
    pub(crate) verify_keys: Vec<String>,
    #[serde(default)]
    pub(crate) database: Vec<RawDatabase>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawDatabase {
    pub(crate) path: Option<String>,
    pub(crate) dir: Option<String>,
    pub(crate) pattern: Option<String>,
    pub(crate) recursive: Option<bool>,
    pub(crate) max_lag: Option<String>,
    pub(crate) max_wal_size: Option<String>,
    pub(crate) sync_interval: Option<String>,
    pub(crate) checkpoint_frames: Option<u32>,
    /// `sqlite` (default) or `postgres`.
    pub(crate) engine: Option<String>,
    /// PostgreSQL: the connection string (`postgres://user@host:port/db`).
    pub(crate) dsn: Option<String>,
    /// PostgreSQL: the name in metrics, logs and `offsite sync NAME`.
    pub(crate) name: Option<String>,
    pub(crate) slot: Option<String>,
    pub(crate) flush_after: Option<String>,
    pub(crate) synchronous: Option<bool>,
    pub(crate) base_backup_interval: Option<String>,
    /// PostgreSQL restore drills: the query each restored server must answer.
    pub(crate) check_query: Option<String>,
    pub(crate) check_user: Option<String>,
    pub(crate) pg_bin: Option<String>,
    pub(crate) pg_user: Option<String>,
    pub(crate) drill_timeout: Option<String>,
    #[serde(default)]
    pub(crate) replica: Vec<RawReplica>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawReplica {
    pub(crate) name: Option<String>,
    pub(crate) url: String,
    pub(crate) retention: Option<String>,
    pub(crate) snapshot_interval: Option<String>,
    pub(crate) snapshot_retention: Option<String>,
    /// PostgreSQL: base backups kept besides the window's (N or a duration).
    pub(crate) backup_retention: Option<String>,
    pub(crate) compaction_levels: Option<Vec<String>>,
    pub(crate) prune_interval: Option<String>,
    pub(crate) object_lock: Option<String>,
    pub(crate) object_lock_margin: Option<String>,
    pub(crate) verify_interval: Option<String>,
    pub(crate) verify_identity_file: Option<String>,
    pub(crate) encryption: Option<String>,
    #[serde(default)]
    pub(crate) age_recipients: Vec<String>,
    pub(crate) age_recipients_file: Option<String>,
    #[serde(default)]
    pub(crate) age_identity_files: Vec<String>,
}

impl RawConfig {
    /// Read and parse a TOML file (not yet validated).
    pub(crate) fn load(path: &Path) -> anyhow::Result<RawConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse TOML text; errors name `file`, the line and the closest key.
    pub(crate) fn parse(text: &str, file: &str) -> anyhow::Result<RawConfig> {
        toml::from_str(text).map_err(|e| {
            let mut msg = e.message().to_string();
            // "unknown field `x`, expected one of `a`, `b`": suggest the closest.
            if let Some(rest) = msg.strip_prefix("unknown field `") {
                if let Some((word, tail)) = rest.split_once('`') {
                    let cands: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
                    if let Some(m) = crate::storage::did_you_mean(word, &cands) {
                        msg = format!("unknown key `{word}` (did you mean `{m}`?); {msg}");
                    }
                }
            }
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => anyhow::anyhow!("{file}:{l}: {msg}"),
                None => anyhow::anyhow!("{file}: {msg}"),
            }
        })
    }
}

/// Where settings come from, so errors name what the user typed.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// A config file: errors name the file and the key; `${VAR}` expands.
    File(String),
    /// `replicate DB_PATH REPLICA_URL [flags]`: errors name the flag; the
    /// shell has already expanded variables.
    CommandLine,
}

impl Origin {
    /// What prefixes an error about `what` (a database or replica).
    fn label(&self) -> &str {
        match self {
            Origin::File(f) => f,
            Origin::CommandLine => "command line",
        }
    }

    /// The setting `key` of `what` ("" at the top level), as the user gave it.
    fn key(&self, what: &str, key: &str) -> String {
        match self {
            Origin::File(f) if what.is_empty() => format!("{f}: {key}"),
            Origin::File(f) => format!("{f}: {what}: {key}"),
            Origin::CommandLine => flag_of(key),
        }
    }

    /// `${VAR}` expansion (config files only).
    fn expand(&self, s: &str, what: &str) -> anyhow::Result<String> {
        match self {
            Origin::File(f) => expand_env(s, &format!("{f}: {what}")),
            Origin::CommandLine => Ok(s.to_string()),
        }
    }
}

/// `listen`: an address the HTTP listener can bind; `name` is how the
/// user gave it (`x.toml: listen =`, `--listen`).
pub(crate) fn check_listen(l: &str, name: &str) -> anyhow::Result<()> {
    l.parse::<std::net::SocketAddr>().map_err(|e| {
        anyhow::anyhow!("{name} {l:?} is not an address: {e} (example: \"127.0.0.1:9090\")")
    })?;
    Ok(())
}

/// The `replicate` command line's name for config key `key`.
pub(crate) fn flag_of(key: &str) -> String {
    match key {
        "path" => "DB_PATH".into(),
        "url" => "REPLICA_URL".into(),
        "age-recipients" => "--age-recipient".into(),
        "encryption" => "--no-encryption".into(),
        k => format!("--{k}"),
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub spool_dir: Option<PathBuf>,
    /// Address of the HTTP listener (/metrics, /healthz, /readyz, /sync).
    pub listen: Option<String>,
    /// Application to run as a child (`--exec`).
    pub exec: Option<String>,
    pub shutdown_timeout: Duration,
    /// The shipper's signing key file; readers pin its verifying key too.
    pub signing_key_file: Option<PathBuf>,
    /// Further verifying keys (`offsite-vk1-…`) trusted.
    pub verify_keys: Vec<crate::sign::PublicKey>,
    pub databases: Vec<DatabaseConfig>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// The database file, or with `discover` the directory searched.
    pub path: PathBuf,
    /// `dir` + `pattern`: every matching SQLite database under `path`.
    pub discover: Option<Discover>,
    /// `/readyz` fails when a replica is further behind than this.
    pub max_lag: Duration,
    /// The WAL is held for unshipped commits up to this size (see
    /// `replicate::Options::max_wal_bytes`).
    pub max_wal_bytes: u64,
    pub sync_interval: Duration,
    pub checkpoint_frames: u32,
    /// One or more replicas, each shipped independently.
    pub replicas: Vec<ReplicaConfig>,
    /// `engine = "postgres"`: the cluster streamed (then `path` is its
    /// `name`, a label, not a file).
    pub postgres: Option<PgDatabase>,
}

/// A PostgreSQL cluster's settings (`[[database]] engine = "postgres"`).
#[derive(Debug, Clone)]
pub struct PgDatabase {
    pub dsn: crate::engine::postgres::dsn::Dsn,
    pub name: String,
    /// The first replica's slot; further replicas add `_<replica name>`.
    pub slot: String,
    pub flush_after: crate::engine::postgres::stream::FlushAfter,
    pub synchronous: bool,
    /// `None`: `base-backup-interval = "off"`.
    pub base_backup_interval: Option<Duration>,
    pub check_query: String,
    pub check_user: String,
    pub pg_bin: Option<PathBuf>,
    pub pg_user: Option<String>,
    pub drill_timeout: Duration,
}

impl PgDatabase {
    /// The replication slot replica number `index` streams through (one
    /// slot per replica: each holds the WAL its replica has not stored).
    pub fn slot_for(&self, index: usize, replica: &str) -> String {
        if index == 0 {
            self.slot.clone()
        } else {
            let r: String = replica
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("{}_{r}", self.slot)
        }
    }
}

impl DatabaseConfig {
    /// The replica named `name`, or the first one.
    pub fn replica(&self, name: Option<&str>) -> anyhow::Result<&ReplicaConfig> {
        match name {
            None => Ok(&self.replicas[0]),
            Some(n) => self.replicas.iter().find(|r| r.name == n).with_context(|| {
                format!(
                    "database {} has no replica named {n:?} (it has: {})",
                    self.path.display(),
                    self.replicas
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Unique per database (default: replica1, replica2, …).
    pub name: String,
    /// None: `retention = "off"`, the replica is never pruned.
    pub retention: Option<crate::retention::Policy>,
    pub snapshot_interval: Option<Duration>,
    pub compaction_levels: Vec<Duration>,
    pub prune_interval: Duration,
    pub object_lock: Option<crate::storage::LockMode>,
    pub object_lock_margin: Duration,
    /// Restore drills in the daemon (with their own identity file).
    pub verify_interval: Option<Duration>,
    pub verify_identity_file: Option<PathBuf>,
    /// PostgreSQL: base backups kept besides the window's (default 2).
    pub backup_retention: crate::engine::postgres::retention::BackupRetention,
    pub url: ReplicaUrl,
    pub encryption: Encryption,
    pub age_identity_files: Vec<PathBuf>,
}

impl ReplicaConfig {
    /// A replica given by its URL alone (`restore`, `list`, `verify` and
    /// `prune` without --config): every setting at its default, no
    /// encryption (reading needs identities, not recipients).
    pub fn from_url(url: ReplicaUrl) -> ReplicaConfig {
        ReplicaConfig {
            name: defaults::replica_name(0),
            retention: Some(crate::retention::Policy::default()),
            snapshot_interval: Some(defaults::SNAPSHOT_INTERVAL),
            compaction_levels: defaults::COMPACTION_LEVELS.to_vec(),
            prune_interval: defaults::PRUNE_INTERVAL,
            object_lock: None,
            object_lock_margin: defaults::OBJECT_LOCK_MARGIN,
            verify_interval: None,
            verify_identity_file: None,
            backup_retention: crate::engine::postgres::retention::BackupRetention::Count(
                defaults::BACKUP_RETENTION_COUNT,
            ),
            url,
            encryption: Encryption::None,
            age_identity_files: Vec::new(),
        }
    }
}

/// A replica from command-line flags alone (`offsite pg archive-push` and
/// the other PostgreSQL commands): the URL and the encryption flags, checked
/// exactly as `replicate`'s are.
pub(crate) fn replica_from_flags(
    url: &str,
    age_recipients: &[String],
    age_recipients_file: Option<&Path>,
    no_encryption: bool,
) -> anyhow::Result<ReplicaConfig> {
    let raw = RawReplica {
        url: url.to_string(),
        encryption: no_encryption.then(|| "none".to_string()),
        age_recipients: age_recipients.to_vec(),
        age_recipients_file: age_recipients_file.map(|p| p.display().to_string()),
        ..Default::default()
    };
    replica_config(
        &raw,
        defaults::replica_name(0),
        "replica",
        &Origin::CommandLine,
    )
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let raw = RawConfig::load(path)?;
        Self::from_raw(&raw, &Origin::File(path.display().to_string()))
    }

    /// A config file's text (tests; the daemon reads files with `load`).
    #[cfg(test)]
    pub fn parse(text: &str, file: &str) -> anyhow::Result<Config> {
        let raw = RawConfig::parse(text, file)?;
        Self::from_raw(&raw, &Origin::File(file.to_string()))
    }

    /// Validate settings from a file or the command line; the one place
    /// defaults are applied.
    pub(crate) fn from_raw(raw: &RawConfig, origin: &Origin) -> anyhow::Result<Config> {
        let file = origin.label();
        let x = |s: &str, what: &str| origin.expand(s, what);
        let dur = |v: &Option<String>, what: &str, key: &str| -> anyhow::Result<Option<Duration>> {
            v.as_deref()
                .map(|s| {
                    parse_duration(
                        &x(s, if what.is_empty() { key } else { what })?,
                        &origin.key(what, key),
                    )
                })
                .transpose()
        };
        let size = |v: &Option<String>, what: &str, key: &str| -> anyhow::Result<Option<u64>> {
            v.as_deref()
                .map(|s| {
                    parse_size(
                        &x(s, if what.is_empty() { key } else { what })?,
                        &origin.key(what, key),
                    )
                })
                .transpose()
        };
        let top_sync = dur(&raw.sync_interval, "", "sync-interval")?;
        let default_sync = top_sync.unwrap_or(defaults::SYNC_INTERVAL);
        let default_max_lag = dur(&raw.max_lag, "", "max-lag")?.unwrap_or(defaults::MAX_LAG);
        let default_max_wal =
            size(&raw.max_wal_size, "", "max-wal-size")?.unwrap_or(defaults::MAX_WAL_BYTES);
        if raw.database.is_empty() {
            bail!("{file}: no [[database]] section; add one with `path = \"/data/app.db\"` and a [[database.replica]] with `url = ...`");
        }
        let mut dbs = Vec::new();
        for (i, d) in raw.database.iter().enumerate() {
            let engine = d.engine.as_deref().map(|e| x(e, "engine")).transpose()?;
            match engine.as_deref() {
                None | Some("sqlite") => refuse_pg_keys(d, i, file)?,
                Some("postgres" | "postgresql") => {
                    let pg = pg_database(d, i, origin, top_sync, default_max_lag)?;
                    if dbs.iter().any(|o: &DatabaseConfig| o.path == pg.path) {
                        bail!("{file}: database #{}: two PostgreSQL databases are named {:?}; give each its own `name`", i + 1, pg.path.display());
                    }
                    dbs.push(pg);
                    continue;
                }
                Some(o) => bail!("{file}: database #{}: engine = {o:?} is not known; use \"sqlite\" (the default) or \"postgres\"", i + 1),
            }
            let (raw_path, discover) = match (&d.path, &d.dir) {
                (Some(p), None) => {
                    if d.pattern.is_some() || d.recursive.is_some() {
                        bail!("{file}: database #{}: `pattern` and `recursive` go with `dir`, not `path`", i + 1);
                    }
                    (p, None)
                }
                (None, Some(dir)) => {
                    let Some(pat) = &d.pattern else {
                        bail!("{file}: database #{} (dir {dir}): `dir` needs a `pattern`, e.g. pattern = \"*.db\"", i + 1);
                    };
                    let pat = x(pat, "pattern")?;
                    let pattern = glob::Pattern::new(&pat).map_err(|e| {
                        anyhow::anyhow!("{file}: database #{} (dir {dir}): pattern {pat:?} is not a valid glob: {e}", i + 1)
                    })?;
                    (
                        dir,
                        Some(Discover {
                            pattern,
                            recursive: d.recursive.unwrap_or(false),
                        }),
                    )
                }
                (Some(_), Some(_)) => bail!("{file}: database #{}: give either `path` (one database) or `dir` + `pattern` (every matching database), not both", i + 1),
                (None, None) => bail!("{file}: database #{}: missing `path = \"/data/app.db\"` (or `dir` + `pattern`)", i + 1),
            };
            let what = format!("database #{} ({})", i + 1, raw_path);
            let path = PathBuf::from(x(raw_path, &what)?);
            if !path.is_absolute() {
                bail!("{file}: {what}: path must be absolute");
            }
            if dbs.iter().any(|o: &DatabaseConfig| o.path == path) {
                bail!("{file}: {what}: the same database is listed twice");
            }
            let max_lag = dur(&d.max_lag, &what, "max-lag")?.unwrap_or(default_max_lag);
            let max_wal_bytes =
                size(&d.max_wal_size, &what, "max-wal-size")?.unwrap_or(default_max_wal);
            let sync_interval =
                dur(&d.sync_interval, &what, "sync-interval")?.unwrap_or(default_sync);
            for r in &d.replica {
                if r.backup_retention.is_some() {
                    bail!("{file}: {what}: `backup-retention` is for PostgreSQL databases (engine = \"postgres\"); SQLite replicas keep snapshots by `snapshot-retention`");
                }
            }
            let replicas = replicas_of(d, &what, origin)?;
            dbs.push(DatabaseConfig {
                path,
                discover,
                max_lag,
                max_wal_bytes,
                sync_interval,
                checkpoint_frames: d.checkpoint_frames.unwrap_or(defaults::CHECKPOINT_FRAMES),
                replicas,
                postgres: None,
            });
        }
        let listen = raw.listen.as_deref().map(|s| x(s, "listen")).transpose()?;
        if let Some(l) = &listen {
            let name = match origin {
                Origin::File(f) => format!("{f}: listen ="),
                Origin::CommandLine => "--listen".into(),
            };
            check_listen(l, &name)?;
        }
        let exec = raw.exec.as_deref().map(|s| x(s, "exec")).transpose()?;
        Ok(Config {
            listen,
            exec,
            shutdown_timeout: dur(&raw.shutdown_timeout, "", "shutdown-timeout")?
                .unwrap_or(defaults::SHUTDOWN_TIMEOUT),
            spool_dir: raw
                .spool_dir
                .as_deref()
                .map(|s| x(s, "spool-dir").map(PathBuf::from))
                .transpose()?,
            signing_key_file: raw
                .signing_key_file
                .as_deref()
                .map(|s| x(s, "signing-key-file").map(PathBuf::from))
                .transpose()?,
            verify_keys: raw
                .verify_keys
                .iter()
                .map(|k| {
                    crate::sign::PublicKey::parse(&x(k, "verify-keys")?)
                        .with_context(|| format!("{file}: verify-keys"))
                })
                .collect::<anyhow::Result<_>>()?,
            databases: dbs,
        })
    }
}

/// A database's `[[database.replica]]` entries: named, unique, checked.
fn replicas_of(d: &RawDatabase, what: &str, origin: &Origin) -> anyhow::Result<Vec<ReplicaConfig>> {
    let file = origin.label();
    let x = |s: &str| origin.expand(s, what);
    if d.replica.is_empty() {
        bail!("{file}: {what}: no [[database.replica]]; add one with `url = \"s3://bucket/prefix\"` or `url = \"file:///backups/app\"`");
    }
    let mut replicas: Vec<ReplicaConfig> = Vec::new();
    for (j, r) in d.replica.iter().enumerate() {
        let name = match &r.name {
            Some(n) => x(n)?,
            None => defaults::replica_name(j),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!("{file}: {what}: replica name {name:?} must be non-empty and use only letters, digits, `-`, `_` and `.`");
        }
        if replicas.iter().any(|o| o.name == name) {
            bail!("{file}: {what}: two replicas are named {name:?}; give each a unique `name`");
        }
        let rwhat = format!("{what}, replica {name}");
        replicas.push(replica_config(r, name, &rwhat, origin)?);
    }
    for (a, ra) in replicas.iter().enumerate() {
        if replicas[..a].iter().any(|rb| rb.url.same_location(&ra.url)) {
            bail!("{file}: {what}: two replicas use the same URL {}; each replica needs its own location", ra.url);
        }
    }
    Ok(replicas)
}

/// A SQLite database given PostgreSQL settings: say which and why.
fn refuse_pg_keys(d: &RawDatabase, i: usize, file: &str) -> anyhow::Result<()> {
    let given = [
        ("dsn", d.dsn.is_some()),
        ("name", d.name.is_some()),
        ("slot", d.slot.is_some()),
        ("flush-after", d.flush_after.is_some()),
        ("synchronous", d.synchronous.is_some()),
        ("base-backup-interval", d.base_backup_interval.is_some()),
        ("check-query", d.check_query.is_some()),
        ("check-user", d.check_user.is_some()),
        ("pg-bin", d.pg_bin.is_some()),
        ("pg-user", d.pg_user.is_some()),
        ("drill-timeout", d.drill_timeout.is_some()),
    ];
    if let Some((k, _)) = given.iter().find(|(_, set)| *set) {
        bail!("{file}: database #{}: `{k}` is a PostgreSQL setting; add `engine = \"postgres\"` to this [[database]] (with `dsn = \"postgres://…\"`), or remove it", i + 1);
    }
    Ok(())
}

/// A `[[database]] engine = "postgres"` entry.
fn pg_database(
    d: &RawDatabase,
    i: usize,
    origin: &Origin,
    top_sync: Option<Duration>,
    default_max_lag: Duration,
) -> anyhow::Result<DatabaseConfig> {
    use crate::engine::postgres::dsn::Dsn;
    let file = origin.label();
    let sqlite_only = [
        ("path", d.path.is_some()),
        ("dir", d.dir.is_some()),
        ("pattern", d.pattern.is_some()),
        ("recursive", d.recursive.is_some()),
        ("max-wal-size", d.max_wal_size.is_some()),
        ("checkpoint-frames", d.checkpoint_frames.is_some()),
    ];
    if let Some((k, _)) = sqlite_only.iter().find(|(_, set)| *set) {
        let fix = if *k == "path" {
            "give the cluster's connection string as `dsn = \"postgres://user@host:5432/postgres\"` instead"
        } else {
            "remove it (PostgreSQL keeps its own WAL; see docs/POSTGRES.md)"
        };
        bail!(
            "{file}: database #{} (engine = \"postgres\"): `{k}` is a SQLite setting; {fix}",
            i + 1
        );
    }
    let name = match &d.name {
        Some(n) => origin.expand(n, "name")?,
        None => defaults::PG_NAME.to_string(),
    };
    let what = format!("database #{} ({name})", i + 1);
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("{file}: {what}: name {name:?} must be non-empty and use only letters, digits, `-`, `_` and `.`");
    }
    let x = |s: &str| origin.expand(s, &what);
    let key = |k: &str| origin.key(&what, k);
    let Some(raw_dsn) = &d.dsn else {
        bail!("{file}: {what}: missing `dsn = \"postgres://user@host:5432/postgres\"` (the password goes in PGPASSWORD or a passfile, not here)");
    };
    let dsn = Dsn::parse(&x(raw_dsn)?).with_context(|| key("dsn"))?;
    let dur = |v: &Option<String>, k: &str| -> anyhow::Result<Option<Duration>> {
        v.as_deref()
            .map(|s| parse_duration(&x(s)?, &key(k)))
            .transpose()
    };
    let slot = match &d.slot {
        Some(s) => x(s)?,
        None => defaults::PG_SLOT.to_string(),
    };
    if slot.is_empty()
        || slot.len() > 50
        || !slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        bail!("{}: slot {slot:?}: PostgreSQL slot names use lower-case letters, digits and `_` (up to 63 characters; offsite keeps 50 for per-replica suffixes)", key("slot"));
    }
    let flush_after = match &d.flush_after {
        Some(f) => x(f)?.parse().with_context(|| key("flush-after"))?,
        None => crate::engine::postgres::stream::FlushAfter::Store,
    };
    let base_backup_interval = match d.base_backup_interval.as_deref().map(str::trim) {
        Some("off") => None,
        _ => Some(
            dur(&d.base_backup_interval, "base-backup-interval")?
                .unwrap_or(defaults::BASE_BACKUP_INTERVAL),
        ),
    };
    let replicas = replicas_of(d, &what, origin)?;
    for r in &d.replica {
        let sqlite_only = [
            ("snapshot-interval", r.snapshot_interval.is_some()),
            ("snapshot-retention", r.snapshot_retention.is_some()),
            ("compaction-levels", r.compaction_levels.is_some()),
            ("object-lock", r.object_lock.is_some()),
            ("object-lock-margin", r.object_lock_margin.is_some()),
        ];
        if let Some((k, _)) = sqlite_only.iter().find(|(_, set)| *set) {
            let fix = if *k == "snapshot-retention" {
                "keep base backups with `backup-retention = N` (or a duration)"
            } else if *k == "snapshot-interval" {
                "set `base-backup-interval` on the [[database]]"
            } else {
                "remove it"
            };
            bail!("{file}: {what}: replica setting `{k}` is for SQLite replicas; {fix}");
        }
    }
    let drill_timeout = dur(&d.drill_timeout, "drill-timeout")?.unwrap_or(defaults::DRILL_TIMEOUT);
    if replicas.iter().all(|r| r.verify_interval.is_none())
        && (d.check_query.is_some() || d.check_user.is_some() || d.drill_timeout.is_some())
    {
        bail!("{file}: {what}: check-query, check-user and drill-timeout are for restore drills; set `verify-interval` on a replica, or remove them");
    }
    Ok(DatabaseConfig {
        path: PathBuf::from(&name),
        discover: None,
        max_lag: dur(&d.max_lag, "max-lag")?.unwrap_or(default_max_lag),
        max_wal_bytes: defaults::MAX_WAL_BYTES,
        sync_interval: dur(&d.sync_interval, "sync-interval")?
            .or(top_sync)
            .unwrap_or(defaults::PG_SYNC_INTERVAL),
        checkpoint_frames: defaults::CHECKPOINT_FRAMES,
        replicas,
        postgres: Some(PgDatabase {
            dsn,
            name,
            slot,
            flush_after,
            synchronous: d.synchronous.unwrap_or(false),
            base_backup_interval,
            check_query: d
                .check_query
                .as_deref()
                .map(x)
                .transpose()?
                .unwrap_or_else(|| "select 1".into()),
            check_user: d
                .check_user
                .as_deref()
                .map(x)
                .transpose()?
                .unwrap_or_else(|| "postgres".into()),
            pg_bin: d
                .pg_bin
                .as_deref()
                .map(|s| x(s).map(PathBuf::from))
                .transpose()?,
            pg_user: d.pg_user.as_deref().map(x).transpose()?,
            drill_timeout,
        }),
    })
}

fn replica_config(
    r: &RawReplica,
    name: String,
    what: &str,
    origin: &Origin,
) -> anyhow::Result<ReplicaConfig> {
    let file = origin.label();
    let x = |s: &str| origin.expand(s, what);
    let key = |k: &str| origin.key(what, k);
    let url: ReplicaUrl = x(&r.url)?.parse().with_context(|| key("url"))?;
    let mut recipients = Recipients::parse_list(
        &r.age_recipients
            .iter()
            .map(|s| x(s))
            .collect::<anyhow::Result<Vec<_>>>()?,
    )
    .with_context(|| key("age-recipients"))?;
    if let Some(f) = &r.age_recipients_file {
        recipients.extend(
            Recipients::read_file(Path::new(&x(f)?)).with_context(|| key("age-recipients-file"))?,
        );
    }
    let cli = matches!(origin, Origin::CommandLine);
    let encryption = match r.encryption.as_deref().map(x).transpose()?.as_deref() {
        None | Some("age") => {
            if recipients.is_empty() {
                if cli {
                    bail!("no encryption recipient: pass --age-recipient age1… (create a key with `offsite keygen -o key.txt`), or --no-encryption to store plaintext backups");
                }
                bail!("{file}: {what}: no age recipient; add `age-recipients = [\"age1…\"]` (see `offsite keygen`) or set `encryption = \"none\"` to store plaintext backups");
            }
            Encryption::Age(recipients)
        }
        Some("none") => {
            if !recipients.is_empty() {
                if cli {
                    bail!("--no-encryption contradicts the age recipients given; use one or the other");
                }
                bail!("{file}: {what}: `encryption = \"none\"` contradicts the age recipients given; remove one of them");
            }
            Encryption::None
        }
        Some(other) => {
            bail!("{file}: {what}: encryption = {other:?} is not valid; use \"age\" or \"none\"")
        }
    };
    let age_identity_files = r
        .age_identity_files
        .iter()
        .map(|s| x(s).map(PathBuf::from))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dur = |v: &Option<String>, k: &str| -> anyhow::Result<Option<Duration>> {
        v.as_deref()
            .map(|s| parse_duration(&x(s)?, &key(k)))
            .transpose()
    };
    let off = |v: &Option<String>| v.as_deref().map(str::trim) == Some("off");
    let retention = if off(&r.retention) {
        if r.snapshot_retention.is_some() {
            bail!(
                "{}: has no effect with {} off (the replica is never pruned); remove one of them",
                key("snapshot-retention"),
                if cli { "--retention" } else { "retention =" }
            );
        }
        None
    } else {
        let mut p = crate::retention::Policy::default();
        if let Some(d) = dur(&r.retention, "retention")? {
            p.retention = d;
        }
        if let Some(s) = &r.snapshot_retention {
            p.snapshot_retention = crate::retention::SnapshotRetention::parse(&x(s)?)
                .with_context(|| key("snapshot-retention"))?;
        }
        Some(p)
    };
    let snapshot_interval = if off(&r.snapshot_interval) {
        None
    } else {
        Some(dur(&r.snapshot_interval, "snapshot-interval")?.unwrap_or(defaults::SNAPSHOT_INTERVAL))
    };
    let compaction_levels = match &r.compaction_levels {
        None => defaults::COMPACTION_LEVELS.to_vec(),
        Some(v) => {
            let v = v.iter().map(|s| x(s)).collect::<anyhow::Result<Vec<_>>>()?;
            units::check_levels(&v).with_context(|| key("compaction-levels"))?
        }
    };
    let prune_interval =
        dur(&r.prune_interval, "prune-interval")?.unwrap_or(defaults::PRUNE_INTERVAL);
    let object_lock = match r.object_lock.as_deref().map(x).transpose()?.as_deref() {
        None | Some("off") => None,
        Some("governance") => Some(crate::storage::LockMode::Governance),
        Some("compliance") => Some(crate::storage::LockMode::Compliance),
        Some(o) => bail!("{file}: {what}: object-lock = {o:?} is not valid; use \"governance\", \"compliance\" or \"off\""),
    };
    if object_lock.is_some() && retention.is_none() {
        bail!("{file}: {what}: object-lock needs a retention window (with retention = \"off\" nothing would ever be deleted)");
    }
    let object_lock_margin =
        dur(&r.object_lock_margin, "object-lock-margin")?.unwrap_or(defaults::OBJECT_LOCK_MARGIN);
    let verify_interval = dur(&r.verify_interval, "verify-interval")?;
    let verify_identity_file = r
        .verify_identity_file
        .as_deref()
        .map(|s| x(s).map(PathBuf::from))
        .transpose()?;
    if verify_interval.is_some()
        && verify_identity_file.is_none()
        && matches!(encryption, Encryption::Age(_))
    {
        bail!("{file}: {what}: verify-interval needs verify-identity-file (an identity that can decrypt this replica, used only for restore drills) because the replica is encrypted");
    }
    let backup_retention = match &r.backup_retention {
        Some(b) => crate::engine::postgres::retention::BackupRetention::parse(&x(b)?)
            .with_context(|| key("backup-retention"))?,
        None => crate::engine::postgres::retention::BackupRetention::Count(
            defaults::BACKUP_RETENTION_COUNT,
        ),
    };
    Ok(ReplicaConfig {
        verify_interval,
        verify_identity_file,
        backup_retention,
        object_lock_margin,
        name,
        retention,
        snapshot_interval,
        compaction_levels,
        prune_interval,
        object_lock,
        url,
        encryption,
        age_identity_files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> String {
        crate::keys::generate().1
    }

    #[test]
    fn unknown_key_is_an_error_naming_it_and_the_file() {
        let t = "[[database]]\npath = \"/a.db\"\nsync-intervall = \"1s\"\n";
        let e = Config::parse(t, "x.toml").unwrap_err().to_string();
        assert!(
            e.contains("x.toml:3") && e.contains("sync-intervall"),
            "{e}"
        );
        assert!(e.contains("did you mean `sync-interval`?"), "{e}");
    }

    #[test]
    fn env_expansion_and_defaults() {
        let t = format!(
            "[[database]]\npath = \"/a.db\"\n[[database.replica]]\nurl = \"s3://${{OFFSITE_TEST_BUCKET}}/p\"\nage-recipients = [\"{}\"]\n",
            r()
        );
        let c = units::with_vars(&[("OFFSITE_TEST_BUCKET", "bkt")], || {
            Config::parse(&t, "x.toml")
        })
        .unwrap();
        assert_eq!(c.databases[0].sync_interval, Duration::from_secs(1));
        assert!(c.databases[0].replicas[0]
            .url
            .to_string()
            .starts_with("s3://bkt/p"));
        assert!(matches!(
            c.databases[0].replicas[0].encryption,
            Encryption::Age(_)
        ));
        let e = units::with_vars(&[], || expand_env("${OFFSITE_TEST_BUCKET}", "f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("OFFSITE_TEST_BUCKET is not set"), "{e}");
        assert_eq!(expand_env("a$$b", "f").unwrap(), "a$b");
    }

    #[test]
    fn encryption_must_be_explicit() {
        let base =
            "[[database]]\npath = \"/a.db\"\n[[database.replica]]\nurl = \"file:///tmp/x\"\n";
        let e = Config::parse(base, "x.toml").unwrap_err().to_string();
        assert!(e.contains("no age recipient"), "{e}");
        let c = Config::parse(&format!("{base}encryption = \"none\"\n"), "x.toml").unwrap();
        assert!(matches!(
            c.databases[0].replicas[0].encryption,
            Encryption::None
        ));
        let e = Config::parse(&format!("{base}encryption = \"nope\"\n"), "x.toml").unwrap_err();
        assert!(e.to_string().contains("not valid"));
        let e = Config::parse(
            &format!(
                "{base}encryption = \"none\"\nage-recipients = [\"{}\"]\n",
                r()
            ),
            "x.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("contradicts"));
    }

    #[test]
    fn shipped_postgres_example_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/offsite-postgres.toml");
        let rcpt = r();
        let vars = [
            ("OFFSITE_BUCKET", "backups"),
            ("OFFSITE_S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("OFFSITE_AGE_RECIPIENT", rcpt.as_str()),
            ("OFFSITE_PG_HOST", "db"),
        ];
        let c = units::with_vars(&vars, || Config::load(&p)).unwrap();
        let d = &c.databases[0];
        let pg = d.postgres.as_ref().unwrap();
        assert_eq!(pg.name, "main");
        assert_eq!(d.path, PathBuf::from("main"));
        assert_eq!(pg.dsn.display(), "offsite@db:5432/postgres");
        assert_eq!(
            pg.base_backup_interval,
            Some(Duration::from_secs(24 * 3600))
        );
        let rc = &d.replicas[0];
        assert_eq!(
            rc.backup_retention,
            crate::engine::postgres::retention::BackupRetention::Count(2)
        );
        assert_eq!(rc.verify_interval, Some(Duration::from_secs(24 * 3600)));
        assert_eq!(pg.slot_for(0, &rc.name), "offsite");
        assert_eq!(pg.slot_for(1, "Off-site.2"), "offsite_off_site_2");
    }

    #[test]
    fn postgres_and_sqlite_settings_stay_with_their_engine() {
        let rcpt = r();
        let rep =
            format!("[[database.replica]]\nurl = \"file:///b\"\nage-recipients = [\"{rcpt}\"]\n");
        let err = |body: &str| {
            format!(
                "{:#}",
                Config::parse(&format!("{body}\n{rep}"), "f.toml").unwrap_err()
            )
        };
        let e = err("[[database]]\npath = \"/d/a.db\"\ndsn = \"postgres://u@h/db\"");
        assert!(
            e.contains("`dsn` is a PostgreSQL setting") && e.contains("engine = \"postgres\""),
            "{e}"
        );
        let e = err("[[database]]\nengine = \"postgres\"\npath = \"/d/a.db\"");
        assert!(
            e.contains("`path` is a SQLite setting") && e.contains("dsn ="),
            "{e}"
        );
        let e = err("[[database]]\nengine = \"postgres\"");
        assert!(e.contains("missing `dsn"), "{e}");
        let e = err("[[database]]\nengine = \"mysql\"\npath = \"/d/a.db\"");
        assert!(e.contains("engine = \"mysql\" is not known"), "{e}");
        let e = err(
            "[[database]]\nengine = \"postgres\"\ndsn = \"postgres://u@h/db\"\nslot = \"Bad-Slot\"",
        );
        assert!(e.contains("slot \"Bad-Slot\""), "{e}");
        let e = err("[[database]]\nengine = \"postgres\"\ndsn = \"postgres://u@h/db\"\nflush-after = \"disk\"");
        assert!(e.contains("flush-after"), "{e}");
        let e = err("[[database]]\nengine = \"postgres\"\ndsn = \"postgres://u@h/db\"\ncheck-query = \"select 1\"");
        assert!(e.contains("verify-interval"), "{e}");
        // Replica settings of the other engine.
        let e = format!("{:#}", Config::parse(&format!("[[database]]\nengine = \"postgres\"\ndsn = \"postgres://u@h/db\"\n{rep}snapshot-retention = \"3\"\n"), "f.toml").unwrap_err());
        assert!(e.contains("backup-retention"), "{e}");
        let e = format!(
            "{:#}",
            Config::parse(
                &format!("[[database]]\npath = \"/d/a.db\"\n{rep}backup-retention = \"3\"\n"),
                "f.toml"
            )
            .unwrap_err()
        );
        assert!(e.contains("snapshot-retention"), "{e}");
        let e = format!("{:#}", Config::parse(&format!("[[database]]\nengine = \"postgres\"\ndsn = \"postgres://u@h/db\"\n{rep}backup-retention = \"0\"\n"), "f.toml").unwrap_err());
        assert!(e.contains("backup-retention"), "{e}");
        // Two clusters under one name.
        let two = format!("[[database]]\nengine = \"postgres\"\ndsn = \"postgres://u@h/db\"\n{rep}[[database]]\nengine = \"postgres\"\ndsn = \"postgres://u@h2/db\"\n[[database.replica]]\nurl = \"file:///c\"\nage-recipients = [\"{rcpt}\"]\n");
        let e = format!("{:#}", Config::parse(&two, "f.toml").unwrap_err());
        assert!(e.contains("give each its own `name`"), "{e}");
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/offsite.toml");
        let rcpt = r();
        let vars = [
            ("OFFSITE_BUCKET", "backups"),
            ("OFFSITE_S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("OFFSITE_AGE_RECIPIENT", rcpt.as_str()),
        ];
        let c = units::with_vars(&vars, || Config::load(&p)).unwrap();
        assert_eq!(c.databases.len(), 2);
        let d = &c.databases[0];
        assert_eq!(d.replicas.len(), 2);
        assert_eq!(d.replica(Some("local")).unwrap().name, "local");
        let r = d.replica(None).unwrap();
        assert_eq!(r.name, "s3");
        let p = r.retention.as_ref().unwrap();
        assert_eq!(p.retention, Duration::from_secs(72 * 3600));
        assert_eq!(
            p.snapshot_retention,
            crate::retention::SnapshotRetention::Count(7)
        );
        assert_eq!(r.compaction_levels, defaults::COMPACTION_LEVELS.to_vec());
        assert_eq!(c.databases[1].sync_interval, Duration::from_millis(250));
    }

    #[test]
    fn replica_settings_are_checked() {
        let base = "[[database]]\npath = \"/a.db\"\n[[database.replica]]\nurl = \"file:///tmp/x\"\nencryption = \"none\"\n";
        let bad = |extra: &str| {
            format!(
                "{:#}",
                Config::parse(&format!("{base}{extra}"), "x.toml").unwrap_err()
            )
        };
        assert!(bad("compaction-levels = [\"15m\", \"1m\"]\n").contains("must grow"));
        assert!(bad("compaction-levels = [\"1m\", \"90s\"]\n").contains("multiple"));
        assert!(bad("object-lock = \"strict\"\n").contains("governance"));
        assert!(bad("object-lock = \"governance\"\nretention = \"off\"\n").contains("retention"));
        assert!(bad("snapshot-retention = \"lots\"\n").contains("snapshot-retention"));
        let two =
            format!("{base}[[database.replica]]\nurl = \"file:///tmp/x\"\nencryption = \"none\"\n");
        assert!(Config::parse(&two, "x.toml")
            .unwrap_err()
            .to_string()
            .contains("same URL"));
        let c = Config::parse(
            &format!("{base}retention = \"off\"\ncompaction-levels = []\n"),
            "x.toml",
        )
        .unwrap();
        let r = &c.databases[0].replicas[0];
        assert!(r.retention.is_none() && r.compaction_levels.is_empty());
        assert_eq!(r.name, "replica1");
        let enc = "[[database]]\npath = \"/a.db\"\n[[database.replica]]\nurl = \"file:///tmp/x\"\nage-recipients = [\"RCPT\"]\nverify-interval = \"1h\"\n"
            .replace("RCPT", &r_());
        assert!(Config::parse(&enc, "x.toml")
            .unwrap_err()
            .to_string()
            .contains("verify-identity-file"));
    }

    fn r_() -> String {
        r()
    }

    #[test]
    fn bad_duration_and_relative_path() {
        let t = "sync-interval = \"soon\"\n[[database]]\npath = \"/a.db\"\n";
        assert!(Config::parse(t, "x.toml")
            .unwrap_err()
            .to_string()
            .contains("invalid duration"));
        let t = "[[database]]\npath = \"a.db\"\n[[database.replica]]\nurl = \"file:///x\"\nencryption = \"none\"\n";
        assert!(Config::parse(t, "x.toml")
            .unwrap_err()
            .to_string()
            .contains("absolute"));
    }
}
