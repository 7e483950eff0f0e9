//! Local-directory backend (`file:///abs/dir`).
//!
//! Each object is one file under the root; `/` in keys becomes directories.
//! Writes are atomic and durable: the body goes to a hidden temp file in the
//! target directory, which is fsynced, renamed over the final name, and then
//! the directory is fsynced (as are any directories created on the way).
//! Temp files are named `.tmp-*`, are never listed, and are removed when a
//! write fails.
//!
//! Object files get mode 0600 (`?file-mode=` asks for another, e.g. 0640 for
//! a group that reads the backups), set on the temp file before any byte is
//! written and whatever the umask; directories created here get the same
//! bits plus `x` where there is `r` (0700, 0750).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;

use super::{
    check_key, Body, ObjectLock, ObjectMeta, RequestCounter, RequestCounts, RequestKind, Result,
    Storage, StorageError, DEFAULT_FILE_MODE,
};

/// Names starting with this are in-flight writes, never objects.
const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct FileStorage {
    root: PathBuf,
    /// Permission bits of object files (see the module's doc).
    mode: u32,
    /// Operations, counted as if each were one request (see `counting`).
    counter: Arc<RequestCounter>,
}

/// The mode of a directory holding files of `mode`: `x` wherever `r` is.
fn dir_mode(mode: u32) -> u32 {
    mode | ((mode & 0o444) >> 2)
}

impl FileStorage {
    /// Use (and create, if needed) the directory `root`; objects get mode 0600.
    pub fn new(root: PathBuf) -> anyhow::Result<Self> {
        Self::with_mode(root, DEFAULT_FILE_MODE)
    }

    /// Like [`FileStorage::new`], with object files of mode `mode` (checked
    /// by [`super::parse_file_mode`] when it comes from a user).
    pub fn with_mode(root: PathBuf, mode: u32) -> anyhow::Result<Self> {
        ensure_dir(Path::new("/"), &root, dir_mode(mode))
            .map_err(|(p, e)| anyhow::anyhow!("creating replica directory {}: {e}", p.display()))?;
        let meta = fs::metadata(&root)
            .with_context(|| format!("reading replica directory {}", root.display()))?;
        if !meta.is_dir() {
            anyhow::bail!(
                "replica path {} exists but is not a directory",
                root.display()
            );
        }
        Ok(Self {
            root,
            mode,
            counter: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_for(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        if key.split('/').any(|seg| seg.starts_with(TMP_PREFIX)) {
            return Err(StorageError::Other(format!(
                "invalid object key {key:?}: path segments starting with `{TMP_PREFIX}` are \
                 reserved for temporary files"
            )));
        }
        Ok(self.root.join(key))
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T> + Send + 'static,
    {
        let root = self.root.clone();
        match tokio::task::spawn_blocking(move || f(&root)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StorageError::Other(format!(
                "file storage task was cancelled: {e}"
            ))),
        }
    }
}

fn io_err(what: &str, path: &Path, e: io::Error) -> StorageError {
    StorageError::Other(format!("{what} {}: {e}", path.display()))
}

/// Is this error "there is no such object" (missing file, missing parent,
/// a parent that is a file, or the key names a directory)?
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory
    )
}

/// Open an existing object file for reading; `NotFound` if it is absent or a directory.
fn open_object(key: &str, path: &Path) -> Result<File> {
    let not_found = || StorageError::NotFound {
        key: key.to_string(),
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if is_missing(&e) => return Err(not_found()),
        Err(e) => return Err(io_err("opening", path, e)),
    };
    let meta = f
        .metadata()
        .map_err(|e| io_err("reading metadata of", path, e))?;
    if !meta.is_file() {
        return Err(not_found());
    }
    Ok(f)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsyncing directory", dir, e))
}

/// Create `dir` (a descendant of `root`) and any missing ancestors with
/// permission bits `mode` (whatever the umask), fsyncing the parent of every
/// directory created so the new entries are durable. Errors carry the
/// failing path.
fn ensure_dir(root: &Path, dir: &Path, mode: u32) -> std::result::Result<(), (PathBuf, io::Error)> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = dir;
    while cur != root && !cur.as_os_str().is_empty() && !cur.is_dir() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match fs::DirBuilder::new().mode(mode).create(d) {
            // The umask may have taken bits away: set the mode exactly,
            // keeping the set-group-id bit a shared parent passed on (a
            // replica directory shared with a group, e.g. PostgreSQL's
            // restore_command reading a file:// archive as `postgres`).
            Ok(()) => {
                let inherited = fs::metadata(d)
                    .map(|m| m.permissions().mode() & 0o2000)
                    .unwrap_or(0);
                fs::set_permissions(d, fs::Permissions::from_mode(mode | inherited))
                    .map_err(|e| (d.clone(), e))?
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => continue,
            // It existed and is gone again: a concurrent delete pruned the
            // emptied directory. NotFound makes the caller try again.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !d.exists() => {
                return Err((d.clone(), io::Error::new(io::ErrorKind::NotFound, e)))
            }
            Err(e) => return Err((d.clone(), e)),
        }
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|f| f.sync_all())
                .map_err(|e| (parent.to_path_buf(), e))?;
        }
    }
    Ok(())
}

/// A file's version for conditional writes: size, modification time and
/// inode (a rename-into-place always changes the inode). None if missing.
fn version_tag(path: &Path) -> Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(m) => Ok(Some(format!(
            "{}-{}.{}-{}",
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading metadata of", path, e)),
    }
}

/// Removes the temp file on drop unless disarmed (error or panic mid-write).
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn put_sync(root: &Path, mode: u32, key: &str, path: &Path, body: Body) -> Result<()> {
    let dir = path
        .parent()
        .expect("object path has a parent")
        .to_path_buf();

    // Open the source first so a missing spool file fails before we touch the store.
    let mut src = match &body {
        Body::File(p) => Some(File::open(p).map_err(|e| io_err("opening upload source", p, e))?),
        Body::Bytes(_) => None,
    };

    // A concurrent delete may prune the (then empty) directories between
    // ensure_dir and creating the temp file; retry a few times.
    let mut attempt = 0;
    let (mut tmp_file, guard) = loop {
        attempt += 1;
        match ensure_dir(root, &dir, dir_mode(mode)) {
            Ok(()) => {}
            Err((_, e)) if e.kind() == io::ErrorKind::NotFound && attempt < 5 => continue,
            Err((p, e)) => return Err(io_err("creating directory", &p, e)),
        }
        let tmp = dir.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => {
                let guard = TempGuard {
                    path: tmp,
                    armed: true,
                };
                // The umask may have taken bits away (0660 under 022): set
                // exactly `mode`, before the first byte is written.
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| io_err("setting the mode of", &guard.path, e))?;
                break (f, guard);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 5 => continue,
            Err(e) => return Err(io_err("creating temporary file", &tmp, e)),
        }
    };
    let tmp = guard.path.clone();

    match (&body, src.as_mut()) {
        (Body::Bytes(b), _) => tmp_file
            .write_all(b)
            .map_err(|e| io_err(&format!("writing {key:?} to"), &tmp, e))?,
        (Body::File(p), Some(src)) => {
            io::copy(src, &mut tmp_file).map_err(|e| {
                StorageError::Other(format!("copying {} to {}: {e}", p.display(), tmp.display()))
            })?;
        }
        (Body::File(_), None) => unreachable!("source opened above"),
    }
    tmp_file
        .sync_all()
        .map_err(|e| io_err("fsyncing", &tmp, e))?;
    drop(tmp_file);

    fs::rename(&tmp, path).map_err(|e| {
        StorageError::Other(format!(
            "renaming {} to {}: {e}",
            tmp.display(),
            path.display()
        ))
    })?;
    let mut guard = guard;
    guard.armed = false;
    fsync_dir(&dir)
}

fn list_sync(root: &Path, prefix: &str) -> Result<Vec<ObjectMeta>> {
    if prefix.starts_with('/') || prefix.split('/').any(|s| s == "..") {
        return Err(StorageError::Other(format!(
            "invalid list prefix {prefix:?}: must be relative and must not contain `..`"
        )));
    }
    // Only walk the deepest directory the prefix fully names.
    let (start_rel, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    let start = if start_rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(start_rel)
    };
    let mut out = Vec::new();
    let mut stack = vec![(start, start_rel.to_string())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if is_missing(&e) => continue,
            Err(e) => return Err(io_err("listing directory", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err("listing directory", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(
                    "ignoring non-UTF-8 file name {:?} in {}",
                    name,
                    dir.display()
                );
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            let key = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let path = entry.path();
            let ft = entry
                .file_type()
                .map_err(|e| io_err("reading file type of", &path, e))?;
            if ft.is_dir() {
                // Descend only if keys below can still match the prefix.
                let dir_key = format!("{key}/");
                if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                    stack.push((path, key));
                }
                continue;
            }
            if !key.starts_with(prefix) {
                continue;
            }
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                // Deleted concurrently, or a dangling symlink.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("reading metadata of", &path, e)),
            };
            if meta.is_file() {
                out.push(ObjectMeta {
                    key,
                    size: meta.len(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

#[async_trait]
impl Storage for FileStorage {
    fn describe(&self) -> String {
        match ::url::Url::from_file_path(&self.root) {
            Ok(u) => u.to_string(),
            Err(()) => format!("file://{}", self.root.display()),
        }
    }

    async fn put(&self, key: &str, body: Body) -> Result<()> {
        self.counter.record(RequestKind::Put);
        let path = self.path_for(key)?;
        let key = key.to_string();
        let mode = self.mode;
        self.blocking(move |root| put_sync(root, mode, &key, &path, body))
            .await
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, String)>> {
        self.counter.record(RequestKind::Get);
        let path = self.path_for(key)?;
        self.blocking(move |_| match fs::read(&path) {
            Ok(b) => Ok(Some((
                Bytes::from(b),
                version_tag(&path)?.unwrap_or_default(),
            ))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path, e)),
        })
        .await
    }

    async fn put_conditional(&self, key: &str, body: Bytes, expect: Option<&str>) -> Result<()> {
        self.counter.record(RequestKind::Put);
        let path = self.path_for(key)?;
        let key = key.to_string();
        let expect = expect.map(str::to_string);
        let mode = self.mode;
        self.blocking(move |root| {
            // One conditional writer at a time on this directory tree
            // (processes on one host, or a filesystem with working flock).
            let lock_path = root.join(format!("{TMP_PREFIX}conditional.lock"));
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(mode)
                .open(&lock_path)
                .map_err(|e| io_err("opening", &lock_path, e))?;
            // SAFETY: flock on a descriptor we own; released when `lock` closes.
            if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
                return Err(io_err("locking", &lock_path, io::Error::last_os_error()));
            }
            let cur = version_tag(&path)?;
            if cur.as_deref() != expect.as_deref() {
                return Err(StorageError::AlreadyExists { key });
            }
            let r = put_sync(root, mode, &key, &path, Body::Bytes(body));
            drop(lock);
            r
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.counter.record(RequestKind::Get);
        let path = self.path_for(key)?;
        let key = key.to_string();
        self.blocking(move |_| {
            let mut f = open_object(&key, &path)?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)
                .map_err(|e| io_err("reading", &path, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes> {
        self.counter.record(RequestKind::Get);
        let path = self.path_for(key)?;
        let key = key.to_string();
        self.blocking(move |_| {
            let mut f = open_object(&key, &path)?;
            let size = f
                .metadata()
                .map_err(|e| io_err("reading metadata of", &path, e))?
                .len();
            if start >= size || len == 0 {
                return Ok(Bytes::new());
            }
            let want = len.min(size - start);
            f.seek(SeekFrom::Start(start))
                .map_err(|e| io_err("seeking in", &path, e))?;
            let mut buf = Vec::with_capacity(want as usize);
            f.take(want)
                .read_to_end(&mut buf)
                .map_err(|e| io_err("reading", &path, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64> {
        self.counter.record(RequestKind::Get);
        let path = self.path_for(key)?;
        let key = key.to_string();
        let dest = dest.to_path_buf();
        self.blocking(move |_| {
            let mut src = open_object(&key, &path)?;
            let mut out = File::create(&dest).map_err(|e| io_err("creating", &dest, e))?;
            io::copy(&mut src, &mut out).map_err(|e| {
                // Do not leave a truncated copy behind.
                drop(out);
                let _ = fs::remove_file(&dest);
                StorageError::Other(format!(
                    "copying {} to {}: {e}",
                    path.display(),
                    dest.display()
                ))
            })
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.counter.record(RequestKind::Head);
        let path = self.path_for(key)?;
        let key = key.to_string();
        self.blocking(move |_| match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta { key, size: m.len() })),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(io_err("reading metadata of", &path, e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.counter.record(RequestKind::List);
        let prefix = prefix.to_string();
        self.blocking(move |root| list_sync(root, &prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.counter.record(RequestKind::Delete);
        let path = self.path_for(key)?;
        self.blocking(move |root| {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => return Ok(()),
                Err(e) => return Err(io_err("deleting", &path, e)),
            }
            // Tidy up directories this delete emptied (never the root). Fails
            // harmlessly when a directory is not empty; put() copes with a
            // directory vanishing under it.
            let mut dir = path.parent();
            while let Some(d) = dir {
                if d == root || !d.starts_with(root) || fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        })
        .await
    }

    async fn put_locked(&self, _key: &str, _body: Body, _lock: ObjectLock) -> Result<()> {
        Err(StorageError::Other(
            "object lock is not supported by file:// replicas; use an S3 bucket with Object Lock \
             enabled"
                .to_string(),
        ))
    }

    // object_lock_status: the default (`None`, not enabled) is right here.

    /// Files have no retention; a missing object is still `NotFound`.
    async fn retention(&self, key: &str) -> Result<Option<i64>> {
        self.counter.record(RequestKind::Head);
        let path = self.path_for(key)?;
        let key = key.to_string();
        self.blocking(move |_| match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(None),
            Ok(_) => Err(StorageError::NotFound { key }),
            Err(e) if is_missing(&e) => Err(StorageError::NotFound { key }),
            Err(e) => Err(io_err("reading metadata of", &path, e)),
        })
        .await
    }

    fn request_counts(&self) -> RequestCounts {
        self.counter.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, FileStorage) {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path().join("replica")).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn rejects_bad_keys() {
        let (_d, s) = store();
        for key in [
            "",
            "/abs",
            "../escape",
            "a/../../b",
            "a//b",
            "a/",
            ".",
            "a/./b",
            ".tmp-123",
            "d/.tmp-x",
        ] {
            let e = s
                .put(key, Body::Bytes(Bytes::from_static(b"x")))
                .await
                .expect_err(key);
            assert!(
                matches!(e, StorageError::Other(ref m) if m.contains("invalid object key")),
                "{key}: {e}"
            );
            assert!(s.get(key).await.is_err(), "{key}");
        }
        assert!(s.list("").await.unwrap().is_empty());
        assert!(s.list("../").await.is_err());
    }

    #[tokio::test]
    async fn temp_files_are_not_listed_and_failed_puts_leave_nothing() {
        let (d, s) = store();
        s.put("a/b", Body::Bytes(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        // A stray temp file (e.g. from a crash) is invisible.
        fs::write(s.root().join("a/.tmp-deadbeef"), b"partial").unwrap();
        fs::write(s.root().join(".tmp-top"), b"partial").unwrap();
        let keys: Vec<_> = s
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, vec!["a/b".to_string()]);

        // Upload from a missing spool file fails and leaves no temp file.
        let e = s
            .put("a/c", Body::File(d.path().join("nope")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        // Upload from a directory (read fails mid-copy) removes its temp file.
        let e = s
            .put("a/c", Body::File(d.path().to_path_buf()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("copying"), "{e}");
        let mut names: Vec<_> = fs::read_dir(s.root().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec![".tmp-deadbeef".to_string(), "b".to_string()]);
    }

    #[tokio::test]
    async fn delete_prunes_empty_dirs_but_not_root() {
        let (_d, s) = store();
        s.put("x/y/z", Body::Bytes(Bytes::from_static(b"1")))
            .await
            .unwrap();
        s.put("x/w", Body::Bytes(Bytes::from_static(b"2")))
            .await
            .unwrap();
        s.delete("x/y/z").await.unwrap();
        assert!(!s.root().join("x/y").exists());
        assert!(s.root().join("x").is_dir());
        s.delete("x/w").await.unwrap();
        assert!(!s.root().join("x").exists());
        assert!(s.root().is_dir());
        // The store still works after its directories were pruned.
        s.put("x/y/z", Body::Bytes(Bytes::from_static(b"3")))
            .await
            .unwrap();
        assert_eq!(&s.get("x/y/z").await.unwrap()[..], b"3");
    }

    #[tokio::test]
    async fn directories_are_not_objects() {
        let (_d, s) = store();
        s.put("dir/obj", Body::Bytes(Bytes::from_static(b"1")))
            .await
            .unwrap();
        assert!(matches!(
            s.get("dir").await,
            Err(StorageError::NotFound { .. })
        ));
        assert!(s.head("dir").await.unwrap().is_none());
        assert!(s.head("dir/obj/more").await.unwrap().is_none());
        s.delete("dir").await.unwrap();
        assert!(s.head("dir/obj").await.unwrap().is_some());
    }

    #[test]
    fn new_rejects_a_file_as_root() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("file");
        fs::write(&f, b"x").unwrap();
        assert!(FileStorage::new(f).is_err());
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn objects_are_owner_only_by_default() {
        let (_d, s) = store();
        assert_eq!(mode_of(s.root()), 0o700, "the replica directory it created");
        s.put("lineages/l1/a", Body::Bytes(Bytes::from_static(b"1")))
            .await
            .unwrap();
        s.put_conditional("replica.json", Bytes::from_static(b"{}"), None)
            .await
            .unwrap();
        let spool = tempfile::NamedTempFile::new().unwrap();
        fs::write(spool.path(), b"from a file").unwrap();
        fs::set_permissions(spool.path(), fs::Permissions::from_mode(0o644)).unwrap();
        s.put("lineages/l1/b", Body::File(spool.path().to_path_buf()))
            .await
            .unwrap();
        for f in ["lineages/l1/a", "lineages/l1/b", "replica.json"] {
            assert_eq!(mode_of(&s.root().join(f)), 0o600, "{f}");
        }
        for d in ["lineages", "lineages/l1"] {
            assert_eq!(mode_of(&s.root().join(d)), 0o700, "{d}");
        }
    }

    #[tokio::test]
    async fn a_requested_mode_is_honoured_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        // 0660 and 0770 under the usual umask 022 would come out 0640/0750.
        let s = FileStorage::with_mode(d.path().join("a/replica"), 0o660).unwrap();
        assert_eq!(mode_of(&d.path().join("a")), 0o770);
        assert_eq!(mode_of(s.root()), 0o770);
        s.put("x/y", Body::Bytes(Bytes::from_static(b"1")))
            .await
            .unwrap();
        assert_eq!(mode_of(&s.root().join("x/y")), 0o660);
        assert_eq!(mode_of(&s.root().join("x")), 0o770);
        // Through the URL.
        let url: crate::storage::ReplicaUrl =
            format!("file://{}?file-mode=0640", d.path().join("b").display())
                .parse()
                .unwrap();
        let s = crate::storage::open(&url).await.unwrap();
        s.put("k", Body::Bytes(Bytes::from_static(b"1")))
            .await
            .unwrap();
        assert_eq!(mode_of(&d.path().join("b/k")), 0o640);
        assert_eq!(mode_of(&d.path().join("b")), 0o750);
        // An existing root keeps its mode.
        fs::set_permissions(d.path().join("b"), fs::Permissions::from_mode(0o755)).unwrap();
        FileStorage::with_mode(d.path().join("b"), 0o600).unwrap();
        assert_eq!(mode_of(&d.path().join("b")), 0o755);
    }
}
