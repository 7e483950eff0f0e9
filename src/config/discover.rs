//! Directory entries (`dir` + `pattern`): which databases one entry covers,
//! and the configuration of each database found.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};

use super::{Config, DatabaseConfig};
use crate::storage::ReplicaUrl;

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
    #[cfg(test)]
    pub fn discover_files(&self) -> Vec<PathBuf> {
        self.search(|_| false).0
    }

    /// The files found, and whether a file matching the pattern had no
    /// SQLite header (yet). Files for which `known` holds are not opened
    /// to check their header: they are databases this process already
    /// replicates. Opening and closing a database file releases every
    /// POSIX lock the process holds on it (fcntl locks belong to the
    /// process and the file, not to the descriptor), among them the shared
    /// lock of offsite's own read transaction; without it, an application
    /// closing its last connection checkpoints and deletes the WAL under
    /// offsite.
    fn search(&self, known: impl Fn(&Path) -> bool) -> (Vec<PathBuf>, bool) {
        let mut out = Vec::new();
        let mut unfinished = false;
        let Some(d) = &self.discover else {
            return (out, unfinished);
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
                } else if ft.is_file() && self.covers(&p) {
                    if known(&p) || is_sqlite_file(&p) {
                        out.push(p);
                    } else {
                        unfinished = true;
                    }
                }
            }
        }
        out.sort();
        (out, unfinished)
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
                ReplicaUrl::File { path, mode } => ReplicaUrl::File {
                    path: path.join(rel),
                    mode: *mode,
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
}

impl Config {
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

/// When a directory entry must be searched again. Searching a directory of
/// a thousand databases every second costs more CPU than replicating them
/// while they are idle (path comparisons, pattern matching), so a search is
/// skipped while the directory is provably unchanged: its modification
/// time, which every file created, removed or renamed in it moves, is the
/// one read before the last search and was then at least 2 s old (so even
/// a coarse timestamp moves on the next change); the last search found no
/// file still being created (matching the pattern without an SQLite header
/// yet); and it ran less than a minute ago. Recursive entries (whose
/// subdirectories change without their parent) are always searched.
#[derive(Debug, Default)]
pub struct DirScan {
    /// Directory mtime before the last search, when that search began.
    last: Option<(SystemTime, SystemTime, Instant)>,
}

impl DirScan {
    pub fn unchanged(&self, d: &DatabaseConfig) -> bool {
        let Some((mtime, began, at)) = self.last else {
            return false;
        };
        if d.discover.as_ref().is_none_or(|x| x.recursive) {
            return false;
        }
        at.elapsed() < Duration::from_secs(60)
            && mtime + Duration::from_secs(2) <= began
            && dir_mtime(&d.path) == Some(mtime)
    }

    /// The SQLite files `d` covers now, sorted (see `DatabaseConfig::search`
    /// for `known`), remembering what tells whether the next search can be
    /// skipped. Unreadable directories are skipped with a warning.
    pub fn search(&mut self, d: &DatabaseConfig, known: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
        let began = SystemTime::now();
        let mtime = dir_mtime(&d.path);
        let (files, unfinished) = d.search(known);
        self.last = match mtime {
            Some(m) if !unfinished => Some((m, began, Instant::now())),
            _ => None,
        };
        files
    }
}

fn dir_mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_directory_is_searched_again_only_when_it_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("a.db"), b"SQLite format 3\0rest").unwrap();
        let t = format!(
            "[[database]]\ndir = \"{}\"\npattern = \"*.db\"\n[[database.replica]]\nurl = \"file:///backups\"\nencryption = \"none\"\n",
            d.display()
        );
        let c = Config::parse(&t, "x.toml").unwrap();
        let e = &c.databases[0];
        let age = |secs| {
            let dir = std::fs::File::open(d).unwrap();
            dir.set_modified(SystemTime::now() - Duration::from_secs(secs))
                .unwrap();
        };
        let mut scan = DirScan::default();
        assert!(!scan.unchanged(e), "never searched");
        age(10);
        assert_eq!(scan.search(e, |_| false), vec![d.join("a.db")]);
        assert!(scan.unchanged(e));
        // A new database moves the directory's mtime.
        std::fs::write(d.join("b.db"), b"SQLite format 3\0rest").unwrap();
        assert!(!scan.unchanged(e));
        assert_eq!(scan.search(e, |_| false).len(), 2);
        assert!(!scan.unchanged(e), "mtime too recent to trust");
        age(10);
        scan.search(e, |_| false);
        assert!(scan.unchanged(e));
        // A file still being created is looked at again, changed or not.
        std::fs::write(d.join("c.db"), b"").unwrap();
        age(10);
        assert_eq!(scan.search(e, |_| false).len(), 2);
        assert!(!scan.unchanged(e));
        std::fs::write(d.join("c.db"), b"SQLite format 3\0rest").unwrap();
        age(10);
        assert_eq!(scan.search(e, |_| false).len(), 3);
        assert!(scan.unchanged(e));
        // A removed database too.
        std::fs::remove_file(d.join("a.db")).unwrap();
        assert!(!scan.unchanged(e));
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
}
