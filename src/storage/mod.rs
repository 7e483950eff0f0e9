//! Storage backends: one small async trait, several implementations.
//!
//! The trait speaks objects (keys relative to the replica's root), not S3 or
//! directories. Everything above this module (segment format, replication,
//! restore) only ever sees `dyn Storage`. Every backend passes the same
//! conformance suite (`conformance.rs`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// The backend conformance suite, for tests (feature `testing`).
#[cfg(feature = "testing")]
pub mod conformance;
pub mod counting;
pub mod file;
pub mod s3;
mod s3_client;
mod url;

pub use self::counting::{RequestCounter, RequestCounts, RequestKind};
pub use self::s3_client::S3Clients;
pub use self::url::{
    did_you_mean, parse_file_mode, redact, ReplicaUrl, S3Config, DEFAULT_FILE_MODE,
};

/// Errors a caller can branch on. Everything else is `Other` with a message
/// that already says what failed and what the user can do.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object not found: {key}")]
    NotFound { key: String },
    /// A conditional write found the object already present.
    #[error("object already exists: {key}")]
    AlreadyExists { key: String },
    /// The store is unreachable or answered with a retryable failure after
    /// all retries (connection refused, 5xx, throttling).
    #[error("{0}")]
    Unavailable(String),
    /// The store refused to delete the object because it is protected by S3
    /// Object Lock (a retention period that has not expired, or a legal
    /// hold). The object is still there; pruning skips it and retries later.
    #[error("object is protected by object lock and cannot be deleted yet: {key}")]
    Locked { key: String },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the replica root (no leading slash), e.g. `lineages/x/y.seg`.
    pub key: String,
    pub size: u64,
}

/// S3 Object Lock retention mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` can still delete the object.
    Governance,
    /// Nobody, not even the root account, can delete the object before the
    /// retention expires.
    Compliance,
}

/// Retention to apply to an object written with [`Storage::put_locked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    /// Retain until this time, in microseconds since the Unix epoch.
    pub retain_until_us: i64,
}

/// A bucket's Object Lock configuration, as reported by
/// [`Storage::object_lock_status`] when Object Lock is enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketObjectLock {
    /// The bucket's default retention mode for new objects, if it has one.
    pub default_mode: Option<LockMode>,
}

/// The body of an upload: small objects come from memory, large ones from a
/// (spool) file so memory stays bounded.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Bytes),
    File(PathBuf),
}

impl Body {
    pub async fn len(&self) -> std::io::Result<u64> {
        match self {
            Body::Bytes(b) => Ok(b.len() as u64),
            Body::File(p) => Ok(tokio::fs::metadata(p).await?.len()),
        }
    }
}

#[async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Human-readable location for messages, e.g. `s3://bucket/prefix`.
    fn describe(&self) -> String;

    /// Store `body` under `key`, replacing any existing object. Returns only
    /// once the object is durable in the store.
    async fn put(&self, key: &str, body: Body) -> Result<()>;

    /// Whole object into memory.
    async fn get(&self, key: &str) -> Result<Bytes>;

    /// Bytes `[start, start+len)` of the object (fewer if the object is shorter).
    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes>;

    /// Stream the object into a local file (created/truncated), returning its size.
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64>;

    /// `None` if the object does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;

    /// Every object whose key starts with `prefix` ("" = everything), sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Delete; deleting a missing object is not an error. On a versioned
    /// bucket this removes every version of the key (not just hides it behind
    /// a delete marker); an object protected by Object Lock is left intact
    /// and the call fails with [`StorageError::Locked`].
    async fn delete(&self, key: &str) -> Result<()>;

    /// Like `put`, but the object gets an Object Lock retention. Fails (and
    /// stores nothing) on backends or buckets without Object Lock, rather
    /// than storing an unprotected object.
    async fn put_locked(&self, key: &str, body: Body, lock: ObjectLock) -> Result<()> {
        let _ = (key, body, lock);
        Err(StorageError::Other(format!(
            "object lock is not supported by {}",
            self.describe()
        )))
    }

    /// `Some` if the bucket has Object Lock enabled. A store that does not
    /// implement Object Lock (or the probe request) reports `None`: servers
    /// such as Garage accept lock headers on uploads and silently ignore
    /// them, so only a positive answer from the lock-configuration API counts
    /// as "enabled".
    async fn object_lock_status(&self) -> Result<Option<BucketObjectLock>> {
        Ok(None)
    }

    /// The object's retain-until time (microseconds since the Unix epoch),
    /// `None` if it has no retention (or the store has no Object Lock).
    /// A missing object is `NotFound`.
    async fn retention(&self, key: &str) -> Result<Option<i64>> {
        let _ = key;
        Ok(None)
    }

    /// The object and a version tag for [`Storage::put_conditional`]
    /// (S3: the ETag); `None` if it does not exist.
    async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, String)>> {
        let _ = key;
        Err(StorageError::Other(format!(
            "conditional writes are not supported by {}",
            self.describe()
        )))
    }

    /// Store `body` only if the object is absent (`expect` = None: S3
    /// `If-None-Match: *`) or still at version `expect` (`If-Match`). A failed
    /// condition is `AlreadyExists`. Servers that ignore the condition
    /// headers (Garage) overwrite: callers that fence read back.
    async fn put_conditional(&self, key: &str, body: Bytes, expect: Option<&str>) -> Result<()> {
        let _ = (key, body, expect);
        Err(StorageError::Other(format!(
            "conditional writes are not supported by {}",
            self.describe()
        )))
    }

    /// Abort multipart uploads under the replica's `lineages/` that no
    /// upload of this process is using: left behind by a process that was
    /// killed mid-upload, or whose abort failed because the store was gone.
    /// Meant for a shipper's start-up (one shipper per replica). Returns how
    /// many were aborted. Backends without multipart uploads do nothing.
    async fn abort_abandoned_uploads(&self) -> Result<usize> {
        Ok(0)
    }

    /// Requests made through this store so far (see `counting`). Backends
    /// that do not count report zeros.
    fn request_counts(&self) -> RequestCounts {
        RequestCounts::default()
    }
}

pub type DynStorage = Arc<dyn Storage>;

/// Reject keys that are not plain relative object names: empty keys, a
/// leading or trailing `/`, empty segments (`a//b`), `.`/`..` segments,
/// backslashes and control characters. Every backend calls this, so a key
/// that works on one backend works on all of them.
pub fn check_key(key: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(StorageError::Other(format!(
            "invalid object key {key:?}: {why} (keys are relative names like `dir/file.ext`)"
        )))
    };
    if key.is_empty() {
        return bad("the key is empty");
    }
    if key.starts_with('/') {
        return bad("keys must not start with `/`");
    }
    if key.len() > 900 {
        return bad("the key is longer than 900 bytes");
    }
    if key.chars().any(|c| c.is_control() || c == '\\') {
        return bad("keys must not contain control characters or `\\`");
    }
    for seg in key.split('/') {
        match seg {
            "" => return bad("keys must not contain empty segments (`//`) or end with `/`"),
            "." | ".." => return bad("keys must not contain `.` or `..` segments"),
            _ => {}
        }
    }
    Ok(())
}

/// Open the backend a replica URL names.
pub async fn open(url: &ReplicaUrl) -> anyhow::Result<DynStorage> {
    match url {
        ReplicaUrl::File { path, mode } => Ok(Arc::new(file::FileStorage::with_mode(
            path.clone(),
            mode.unwrap_or(DEFAULT_FILE_MODE),
        )?)),
        ReplicaUrl::S3(cfg) => Ok(Arc::new(s3::S3Storage::new(cfg.clone()).await?)),
    }
}

/// Like [`open`], but an S3 replica uses `clients`' client for its
/// endpoint, region and addressing style (the daemon's replicas share them).
pub async fn open_shared(url: &ReplicaUrl, clients: &S3Clients) -> anyhow::Result<DynStorage> {
    match url {
        ReplicaUrl::S3(cfg) => Ok(Arc::new(s3::S3Storage::shared(cfg.clone(), clients).await?)),
        other => open(other).await,
    }
}
