//! The replicator's loop and `sync` requests: requests coalesce, and a
//! pending one never resets the upload backoff.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use super::{Options, Replicator};
use crate::codec::Encryption;
use crate::status::ReplicaStatus;
use crate::storage::file::FileStorage;
use crate::storage::{Body, ObjectMeta, Result, Storage, StorageError};
use crate::workload;

/// A file store that can be taken down: every request then fails as
/// unavailable (as S3 does in an outage). Counts the write attempts.
#[derive(Debug)]
struct Outage {
    inner: FileStorage,
    down: AtomicBool,
    writes: AtomicU64,
}

impl Outage {
    fn gate(&self, write: bool) -> Result<()> {
        if write {
            self.writes.fetch_add(1, SeqCst);
        }
        if self.down.load(SeqCst) {
            return Err(StorageError::Unavailable(
                "connection refused (test outage)".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for Outage {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn put(&self, key: &str, body: Body) -> Result<()> {
        self.gate(true)?;
        self.inner.put(key, body).await
    }
    async fn get(&self, key: &str) -> Result<Bytes> {
        self.gate(false)?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes> {
        self.gate(false)?;
        self.inner.get_range(key, start, len).await
    }
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64> {
        self.gate(false)?;
        self.inner.get_to_file(key, path).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.gate(false)?;
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.gate(false)?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.gate(true)?;
        self.inner.delete(key).await
    }
    async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, String)>> {
        self.gate(false)?;
        self.inner.get_versioned(key).await
    }
    async fn put_conditional(&self, key: &str, body: Bytes, expect: Option<&str>) -> Result<()> {
        self.gate(true)?;
        self.inner.put_conditional(key, body, expect).await
    }
}

async fn wait_until(what: &str, limit: Duration, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_sync_during_an_outage_does_not_reset_the_upload_backoff() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    let p = workload::Params {
        big_every: 0,
        big_bytes: 0,
    };
    let mut c = workload::open(&db, &p).unwrap();
    workload::commit(&mut c, &p, 1).unwrap();
    let store = Arc::new(Outage {
        inner: FileStorage::new(tmp.path().join("replica")).unwrap(),
        down: AtomicBool::new(false),
        writes: AtomicU64::new(0),
    });
    let mut o = Options::new(db.clone(), tmp.path().join("spool"));
    o.signer = Some(Arc::new(crate::sign::Signer::generate()));
    // Nothing ships by itself within the test: only sync requests do.
    o.sync_interval = Duration::from_secs(3600);
    o.snapshot_interval = None;
    o.compaction_levels = Vec::new();
    o.status = Arc::new(ReplicaStatus::new(
        &db.display().to_string(),
        "r",
        "file:///x",
        Duration::from_secs(60),
        0,
    ));
    let status = o.status.clone();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(Replicator::new(o, store.clone(), Encryption::None).run(stopped));
    wait_until("the first snapshot", Duration::from_secs(30), || {
        status.running.load(SeqCst)
    })
    .await;

    // Healthy: a burst of requests is one wake-up and ships at once.
    workload::commit(&mut c, &p, 2).unwrap();
    let before = store.writes.load(SeqCst);
    let mut last = 0;
    for _ in 0..50 {
        last = status.request_sync();
    }
    tokio::time::timeout(Duration::from_secs(5), status.wait_synced(last))
        .await
        .expect("a sync request ships at once while the replica is healthy");
    let burst = store.writes.load(SeqCst) - before;
    assert!(
        (1..=2).contains(&burst),
        "{burst} writes for one burst of requests"
    );
    let shipped = status.shipped_txid.load(SeqCst);

    // An outage; commits; callers ask for a sync again and again for 3.5 s.
    store.down.store(true, SeqCst);
    workload::commit(&mut c, &p, 3).unwrap();
    let before = store.writes.load(SeqCst);
    let t0 = Instant::now();
    let mut last = 0;
    while t0.elapsed() < Duration::from_millis(3500) {
        last = status.request_sync();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Attempts at about 0, 1 and 3 s (backoff 1 s, 2 s, then 4 s), not one
    // per poll (35) or per request (175).
    let attempts = store.writes.load(SeqCst) - before;
    assert!(
        (2..=4).contains(&attempts),
        "{attempts} upload attempts in 3.5 s of outage with a pending sync"
    );
    // The callers gave up; the backoff goes on at its own pace.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let attempts = store.writes.load(SeqCst) - before;
    assert!(
        (2..=5).contains(&attempts),
        "{attempts} attempts after 5.5 s"
    );
    assert!(
        tokio::time::timeout(Duration::ZERO, status.wait_synced(last))
            .await
            .is_err(),
        "satisfied during the outage?"
    );

    // The store is back: the next attempt of the backoff ships, and the
    // pending request is satisfied.
    store.down.store(false, SeqCst);
    tokio::time::timeout(Duration::from_secs(40), status.wait_synced(last))
        .await
        .expect("the pending sync is satisfied once the store is back");
    assert!(status.shipped_txid.load(SeqCst) > shipped);
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}
