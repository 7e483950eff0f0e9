//! The TOML configuration file. Strict: unknown keys are errors, `${VAR}`
//! expands from the environment, validation says what to fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::codec::Encryption;
use crate::keys::Recipients;
use crate::storage::ReplicaUrl;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    sync_interval: Option<String>,
    spool_dir: Option<String>,
    listen: Option<String>,
    exec: Option<String>,
    shutdown_timeout: Option<String>,
    max_lag: Option<String>,
    max_wal_size: Option<String>,
    #[serde(default)]
    database: Vec<RawDatabase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDatabase {
    path: Option<String>,
    dir: Option<String>,
    pattern: Option<String>,
    recursive: Option<bool>,
    max_lag: Option<String>,
    max_wal_size: Option<String>,
    sync_interval: Option<String>,
    checkpoint_frames: Option<u32>,
    #[serde(default)]
    replica: Vec<RawReplica>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawReplica {
    name: Option<String>,
    url: String,
    retention: Option<String>,
    snapshot_interval: Option<String>,
    snapshot_retention: Option<String>,
    compaction_levels: Option<Vec<String>>,
    prune_interval: Option<String>,
    object_lock: Option<String>,
    object_lock_margin: Option<String>,
    verify_interval: Option<String>,
    verify_identity_file: Option<String>,
    encryption: Option<String>,
    #[serde(default)]
    age_recipients: Vec<String>,
    age_recipients_file: Option<String>,
    #[serde(default)]
    age_identity_files: Vec<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub spool_dir: Option<PathBuf>,
    /// Address of the HTTP listener (/metrics, /healthz, /readyz, /sync).
    pub listen: Option<String>,
    /// Application to run as a child (`--exec`).
    pub exec: Option<String>,
    pub shutdown_timeout: Option<Duration>,
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
}

/// Databases found by a pattern in a directory.
#[derive(Debug, Clone)]
pub struct Discover {
    pub pattern: glob::Pattern,
    pub recursive: bool,
}

impl DatabaseConfig {
    /// Whether `file` is a database this (directory) entry covers.
    pub fn covers(&self, file: &Path) -> bool {
        let Some(d) = &self.discover else {
            return false;
        };
        let Ok(rel) = file.strip_prefix(&self.path) else {
            return false;
        };
        let parts: Vec<_> = rel.components().collect();
        if parts.is_empty() || (!d.recursive && parts.len() != 1) {
            return false;
        }
        rel.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| d.pattern.matches(n))
    }

    /// The database files a directory entry covers now (SQLite files only,
    /// sorted). Unreadable directories are skipped with a warning.
    pub fn discover_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Some(d) = &self.discover else {
            return out;
        };
        let mut dirs = vec![self.path.clone()];
        while let Some(dir) = dirs.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the database directory");
                    continue;
                }
            };
            for ent in rd.flatten() {
                let p = ent.path();
                let Ok(ft) = ent.file_type() else { continue };
                if ft.is_dir() {
                    if d.recursive {
                        dirs.push(p);
                    }
                } else if ft.is_file() && self.covers(&p) && is_sqlite_file(&p) {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    /// The configuration of one database found under a directory entry:
    /// each replica's location gets the database's relative path appended
    /// (`s3://b/tenants` → `s3://b/tenants/a.db`), so every database has
    /// its own replica.
    pub fn for_file(&self, file: &Path) -> anyhow::Result<DatabaseConfig> {
        if self.discover.is_none() {
            return Ok(self.clone());
        }
        let rel = file
            .strip_prefix(&self.path)
            .with_context(|| format!("{} is not under {}", file.display(), self.path.display()))?;
        let rel = rel
            .to_str()
            .with_context(|| format!("database path {} is not UTF-8", file.display()))?;
        let mut d = self.clone();
        d.path = file.to_path_buf();
        d.discover = None;
        for r in &mut d.replicas {
            r.url = match &r.url {
                ReplicaUrl::File { path } => ReplicaUrl::File {
                    path: path.join(rel),
                },
                ReplicaUrl::S3(c) => {
                    let mut c = c.clone();
                    c.prefix = if c.prefix.is_empty() {
                        rel.to_string()
                    } else {
                        format!("{}/{rel}", c.prefix)
                    };
                    ReplicaUrl::S3(c)
                }
            };
        }
        Ok(d)
    }

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
    pub url: ReplicaUrl,
    pub encryption: Encryption,
    pub age_identity_files: Vec<PathBuf>,
}

/// Expand `${VAR}` from the environment; `$$` is a literal `$`.
pub fn expand_env(s: &str, what: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('{') {
            let end = a
                .find('}')
                .with_context(|| format!("{what}: unterminated ${{ in {s:?}"))?;
            let name = &a[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("{what}: invalid variable name {name:?} in {s:?}");
            }
            let v = std::env::var(name).map_err(|_| {
                anyhow::anyhow!(
                    "{what}: environment variable {name} is not set (used as ${{{name}}})"
                )
            })?;
            out.push_str(&v);
            rest = &a[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `512MiB`, `1GiB`, `64MB`, `1048576`: a size in bytes (at least 1 MiB).
pub fn parse_size(s: &str, what: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{what}: invalid size {s:?} (examples: 512MiB, 2GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => bail!("{what}: unknown size unit {u:?} in {s:?} (use KiB, MiB, GiB, KB, MB or GB)"),
    };
    let v = n
        .checked_mul(mult)
        .with_context(|| format!("{what}: {s:?} is too large"))?;
    if v < 1 << 20 {
        bail!("{what}: {s:?} is below the minimum of 1MiB");
    }
    Ok(v)
}

pub fn parse_duration(s: &str, what: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        anyhow::anyhow!("{what}: invalid duration {s:?}: {e} (examples: 1s, 250ms, 5m)")
    })?;
    if d.is_zero() {
        bail!("{what}: duration must be greater than zero");
    }
    Ok(d)
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, file: &str) -> anyhow::Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
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
        })?;
        let x = |s: &str, what: &str| expand_env(s, &format!("{file}: {what}"));
        let default_sync = match &raw.sync_interval {
            Some(s) => parse_duration(&x(s, "sync-interval")?, &format!("{file}: sync-interval"))?,
            None => Duration::from_secs(1),
        };
        let top_dur = |v: &Option<String>, key: &str| -> anyhow::Result<Option<Duration>> {
            v.as_deref()
                .map(|s| parse_duration(&x(s, key)?, &format!("{file}: {key}")))
                .transpose()
        };
        let default_max_lag = top_dur(&raw.max_lag, "max-lag")?.unwrap_or(Duration::from_secs(60));
        let default_max_wal = match &raw.max_wal_size {
            Some(v) => parse_size(&x(v, "max-wal-size")?, &format!("{file}: max-wal-size"))?,
            None => crate::replicate::DEFAULT_MAX_WAL_BYTES,
        };
        if raw.database.is_empty() {
            bail!("{file}: no [[database]] section; add one with `path = \"/data/app.db\"` and a [[database.replica]] with `url = ...`");
        }
        let mut dbs = Vec::new();
        for (i, d) in raw.database.iter().enumerate() {
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
            let max_lag = match &d.max_lag {
                Some(s) => parse_duration(&x(s, &what)?, &format!("{file}: {what}: max-lag"))?,
                None => default_max_lag,
            };
            let max_wal_bytes = match &d.max_wal_size {
                Some(v) => parse_size(&x(v, &what)?, &format!("{file}: {what}: max-wal-size"))?,
                None => default_max_wal,
            };
            let sync_interval = match &d.sync_interval {
                Some(s) => {
                    parse_duration(&x(s, &what)?, &format!("{file}: {what}: sync-interval"))?
                }
                None => default_sync,
            };
            if d.replica.is_empty() {
                bail!("{file}: {what}: no [[database.replica]]; add one with `url = \"s3://bucket/prefix\"` or `url = \"file:///backups/app\"`");
            }
            let mut replicas: Vec<ReplicaConfig> = Vec::new();
            for (j, r) in d.replica.iter().enumerate() {
                let name = match &r.name {
                    Some(n) => x(n, &what)?,
                    None => format!("replica{}", j + 1),
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
                replicas.push(replica_config(r, name, &rwhat, file, &x)?);
            }
            for (a, ra) in replicas.iter().enumerate() {
                if replicas[..a]
                    .iter()
                    .any(|rb| rb.url.to_string() == ra.url.to_string())
                {
                    bail!("{file}: {what}: two replicas use the same URL {}; each replica needs its own location", ra.url);
                }
            }
            dbs.push(DatabaseConfig {
                path,
                discover,
                max_lag,
                max_wal_bytes,
                sync_interval,
                checkpoint_frames: d.checkpoint_frames.unwrap_or(1000),
                replicas,
            });
        }
        let listen = raw.listen.as_deref().map(|s| x(s, "listen")).transpose()?;
        if let Some(l) = &listen {
            l.parse::<std::net::SocketAddr>().map_err(|e| {
                anyhow::anyhow!(
                    "{file}: listen = {l:?} is not an address: {e} (example: \"127.0.0.1:9090\")"
                )
            })?;
        }
        let exec = raw.exec.as_deref().map(|s| x(s, "exec")).transpose()?;
        Ok(Config {
            listen,
            exec,
            shutdown_timeout: top_dur(&raw.shutdown_timeout, "shutdown-timeout")?,
            spool_dir: raw
                .spool_dir
                .as_deref()
                .map(|s| x(s, "spool-dir").map(PathBuf::from))
                .transpose()?,
            databases: dbs,
        })
    }

    /// The configuration of database `path`: a `path` entry, or a database
    /// under a `dir` entry (with its own replica locations).
    pub fn database(&self, path: &Path) -> anyhow::Result<DatabaseConfig> {
        let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(d) = self.databases.iter().find(|d| {
            d.discover.is_none()
                && (d.path == path || std::fs::canonicalize(&d.path).ok().as_deref() == Some(&want))
        }) {
            return Ok(d.clone());
        }
        for d in self.databases.iter().filter(|d| d.discover.is_some()) {
            let base = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
            if d.covers(path) {
                return d.for_file(path);
            }
            if let Ok(rel) = want.strip_prefix(&base) {
                let p = d.path.join(rel);
                if d.covers(&p) {
                    return d.for_file(&p);
                }
            }
        }
        bail!(
            "database {} is not in the config file (it lists: {})",
            path.display(),
            self.databases
                .iter()
                .map(|d| match &d.discover {
                    None => d.path.display().to_string(),
                    Some(x) => format!("{}/{}", d.path.display(), x.pattern),
                })
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Whether `p` starts with the SQLite header (a file being created, or
/// another kind of file matching the pattern, is skipped).
pub fn is_sqlite_file(p: &Path) -> bool {
    use std::io::Read;
    let mut h = [0u8; 16];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut h))
        .is_ok()
        && &h == b"SQLite format 3\0"
}

/// Compaction windows: whole seconds, growing, each a multiple of the one before.
fn check_levels(v: &[String]) -> anyhow::Result<Vec<Duration>> {
    let mut out: Vec<Duration> = Vec::new();
    for s in v {
        let d = parse_duration(s, "compaction level")?;
        if d.as_micros() % 1_000_000 != 0 {
            bail!("{s:?} must be whole seconds");
        }
        if let Some(prev) = out.last() {
            if d <= *prev || d.as_micros() % prev.as_micros() != 0 {
                bail!(
                    "levels must grow and each must be a multiple of the one before ({s:?} after {})",
                    humantime::format_duration(*prev)
                );
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// `--compaction-levels 1m,15m,4h` or `off`.
pub fn parse_levels(s: &str) -> anyhow::Result<Vec<Duration>> {
    if s.trim() == "off" {
        return Ok(Vec::new());
    }
    check_levels(
        &s.split(',')
            .map(|p| p.trim().to_string())
            .collect::<Vec<_>>(),
    )
}

fn replica_config(
    r: &RawReplica,
    name: String,
    what: &str,
    file: &str,
    x: &dyn Fn(&str, &str) -> anyhow::Result<String>,
) -> anyhow::Result<ReplicaConfig> {
    let what = what.to_string();
    let url: ReplicaUrl = x(&r.url, &format!("{what}: url"))?
        .parse()
        .with_context(|| format!("{file}: {what}: url"))?;
    let mut recipients = Recipients::parse_list(
        &r.age_recipients
            .iter()
            .map(|s| x(s, &format!("{what}: age-recipients")))
            .collect::<anyhow::Result<Vec<_>>>()?,
    )
    .with_context(|| format!("{file}: {what}: age-recipients"))?;
    if let Some(f) = &r.age_recipients_file {
        recipients.extend(
            Recipients::read_file(Path::new(&x(f, &what)?))
                .with_context(|| format!("{file}: {what}: age-recipients-file"))?,
        );
    }
    let encryption = match r
        .encryption
        .as_deref()
        .map(|s| x(s, &what))
        .transpose()?
        .as_deref()
    {
        None | Some("age") => {
            if recipients.is_empty() {
                bail!("{file}: {what}: no age recipient; add `age-recipients = [\"age1…\"]` (see `offsite keygen`) or set `encryption = \"none\"` to store plaintext backups");
            }
            Encryption::Age(recipients)
        }
        Some("none") => {
            if !recipients.is_empty() {
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
        .map(|s| x(s, &what).map(PathBuf::from))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dur = |v: &Option<String>, key: &str| -> anyhow::Result<Option<Duration>> {
        v.as_deref()
            .map(|s| parse_duration(&x(s, &what)?, &format!("{file}: {what}: {key}")))
            .transpose()
    };
    let off = |v: &Option<String>| v.as_deref().map(str::trim) == Some("off");
    let retention = if off(&r.retention) {
        None
    } else {
        let mut p = crate::retention::Policy::default();
        if let Some(d) = dur(&r.retention, "retention")? {
            p.retention = d;
        }
        if let Some(s) = &r.snapshot_retention {
            p.snapshot_retention = crate::retention::SnapshotRetention::parse(&x(s, &what)?)
                .with_context(|| format!("{file}: {what}"))?;
        }
        Some(p)
    };
    let snapshot_interval = if off(&r.snapshot_interval) {
        None
    } else {
        Some(
            dur(&r.snapshot_interval, "snapshot-interval")?
                .unwrap_or(Duration::from_secs(24 * 3600)),
        )
    };
    let compaction_levels = match &r.compaction_levels {
        None => crate::engine::sqlite::compact::DEFAULT_LEVELS.to_vec(),
        Some(v) => {
            let v = v
                .iter()
                .map(|s| x(s, &what))
                .collect::<anyhow::Result<Vec<_>>>()?;
            check_levels(&v).with_context(|| format!("{file}: {what}: compaction-levels"))?
        }
    };
    let prune_interval =
        dur(&r.prune_interval, "prune-interval")?.unwrap_or(Duration::from_secs(3600));
    let object_lock = match r.object_lock.as_deref().map(|s| x(s, &what)).transpose()?.as_deref() {
        None | Some("off") => None,
        Some("governance") => Some(crate::storage::LockMode::Governance),
        Some("compliance") => Some(crate::storage::LockMode::Compliance),
        Some(o) => bail!("{file}: {what}: object-lock = {o:?} is not valid; use \"governance\", \"compliance\" or \"off\""),
    };
    if object_lock.is_some() && retention.is_none() {
        bail!("{file}: {what}: object-lock needs a retention window (with retention = \"off\" nothing would ever be deleted)");
    }
    let object_lock_margin =
        dur(&r.object_lock_margin, "object-lock-margin")?.unwrap_or(Duration::from_secs(24 * 3600));
    let verify_interval = dur(&r.verify_interval, "verify-interval")?;
    let verify_identity_file = r
        .verify_identity_file
        .as_deref()
        .map(|s| x(s, &what).map(PathBuf::from))
        .transpose()?;
    if verify_interval.is_some()
        && verify_identity_file.is_none()
        && matches!(encryption, Encryption::Age(_))
    {
        bail!("{file}: {what}: verify-interval needs verify-identity-file (an identity that can decrypt this replica, used only for restore drills) because the replica is encrypted");
    }
    Ok(ReplicaConfig {
        verify_interval,
        verify_identity_file,
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
    fn directory_entries_give_each_database_its_own_replica() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        for f in ["a.db", "b.db", "sub/c.db"] {
            std::fs::write(d.join(f), b"SQLite format 3\0rest").unwrap();
        }
        std::fs::write(d.join("x.db"), b"not sqlite").unwrap();
        std::fs::write(d.join("a.db-wal"), b"").unwrap();
        let t = format!(
            "listen = \"127.0.0.1:9090\"\nmax-lag = \"30s\"\n[[database]]\ndir = \"{}\"\npattern = \"*.db\"\n[[database.replica]]\nurl = \"s3://bkt/tenants?endpoint=http://h:1\"\nencryption = \"none\"\n[[database.replica]]\nurl = \"file:///backups\"\nencryption = \"none\"\n",
            d.display()
        );
        let c = Config::parse(&t, "x.toml").unwrap();
        assert_eq!(c.listen.as_deref(), Some("127.0.0.1:9090"));
        let e = &c.databases[0];
        assert_eq!(e.max_lag, Duration::from_secs(30));
        assert_eq!(e.discover_files(), vec![d.join("a.db"), d.join("b.db")]);
        let a = c.database(&d.join("a.db")).unwrap();
        assert_eq!(a.path, d.join("a.db"));
        assert!(
            a.replicas[0]
                .url
                .to_string()
                .starts_with("s3://bkt/tenants/a.db"),
            "{}",
            a.replicas[0].url
        );
        assert_eq!(a.replicas[1].url.to_string(), "file:///backups/a.db");
        assert!(c.database(&d.join("sub/c.db")).is_err(), "not recursive");
        assert!(c.database(&d.join("a.txt")).is_err());
        let t2 = t.replace("pattern = \"*.db\"", "pattern = \"*.db\"\nrecursive = true");
        let c2 = Config::parse(&t2, "x.toml").unwrap();
        assert_eq!(c2.databases[0].discover_files().len(), 3);
        let sc = c2.database(&d.join("sub/c.db")).unwrap();
        assert_eq!(sc.replicas[1].url.to_string(), "file:///backups/sub/c.db");

        let both = t.replace("pattern = \"*.db\"", "pattern = \"*.db\"\npath = \"/a.db\"");
        assert!(Config::parse(&both, "x.toml")
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let nopat = t.replace("pattern = \"*.db\"\n", "");
        assert!(Config::parse(&nopat, "x.toml")
            .unwrap_err()
            .to_string()
            .contains("needs a `pattern`"));
        let badlisten = t.replace("127.0.0.1:9090", "localhost");
        assert!(Config::parse(&badlisten, "x.toml")
            .unwrap_err()
            .to_string()
            .contains("not an address"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB", "x").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB", "x").unwrap(), 2 << 30);
        assert_eq!(parse_size("64 MB", "x").unwrap(), 64_000_000);
        assert_eq!(parse_size("1048576", "x").unwrap(), 1 << 20);
        assert!(parse_size("12", "x")
            .unwrap_err()
            .to_string()
            .contains("minimum"));
        assert!(parse_size("5 furlongs", "x")
            .unwrap_err()
            .to_string()
            .contains("unit"));
        assert!(parse_size("big", "x").is_err());
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
        std::env::set_var("OFFSITE_TEST_BUCKET", "bkt");
        let t = format!(
            "[[database]]\npath = \"/a.db\"\n[[database.replica]]\nurl = \"s3://${{OFFSITE_TEST_BUCKET}}/p\"\nage-recipients = [\"{}\"]\n",
            r()
        );
        let c = Config::parse(&t, "x.toml").unwrap();
        assert_eq!(c.databases[0].sync_interval, Duration::from_secs(1));
        assert!(c.databases[0].replicas[0]
            .url
            .to_string()
            .starts_with("s3://bkt/p"));
        assert!(matches!(
            c.databases[0].replicas[0].encryption,
            Encryption::Age(_)
        ));
        let e = expand_env("${OFFSITE_SURELY_UNSET_VAR}", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("OFFSITE_SURELY_UNSET_VAR is not set"), "{e}");
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
    fn shipped_example_config_is_valid() {
        std::env::set_var("OFFSITE_BUCKET", "backups");
        std::env::set_var("OFFSITE_S3_ENDPOINT", "http://127.0.0.1:9000");
        std::env::set_var("OFFSITE_AGE_RECIPIENT", r());
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/offsite.toml");
        let c = Config::load(&p).unwrap();
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
        assert_eq!(
            r.compaction_levels,
            crate::engine::sqlite::compact::DEFAULT_LEVELS.to_vec()
        );
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
