//! S3 Object Lock in the storage layer, against moto's bucket with Object
//! Lock enabled (`OFFSITE_TEST_S3_LOCK_TARGET`), and the lock probe against
//! the real stores (Garage, s3s-fs), which do not implement Object Lock.

use crate::support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use offsite::storage::file::FileStorage;
use offsite::storage::s3::S3Storage;
use offsite::storage::{Body, LockMode, ObjectLock, Storage, StorageError};

const MIB: usize = 1024 * 1024;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn random_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    Bytes::from(v)
}

async fn open(target: &support::S3Target) -> S3Storage {
    S3Storage::new(target.s3_config())
        .await
        .unwrap_or_else(|e| panic!("opening S3 target {} ({}): {e:#}", target.name, target.url))
}

async fn lock_store() -> Option<S3Storage> {
    let t = support::s3_lock_target()?;
    eprintln!("object lock target: {} = {}", t.name, t.url);
    Some(open(&t).await)
}

#[track_caller]
fn assert_locked(r: Result<(), StorageError>, what: &str) {
    match r {
        Err(StorageError::Locked { .. }) => {}
        other => panic!("{what}: expected StorageError::Locked, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_probe_enabled_on_lock_bucket_only() {
    if let Some(store) = lock_store().await {
        let status = store.object_lock_status().await.unwrap();
        assert!(status.is_some(), "moto lock bucket: {status:?}");
    }
    for t in support::s3_targets() {
        let store = open(&t).await;
        let status = store.object_lock_status().await;
        eprintln!("{}: object lock status {status:?}", t.name);
        assert!(
            matches!(status, Ok(None)),
            "{}: expected Ok(None), got {status:?}",
            t.name
        );
        // A locked put refuses rather than storing an unprotected object
        // (Garage would silently ignore the lock headers).
        let lock = ObjectLock {
            mode: LockMode::Governance,
            retain_until_us: now_us() + 3_600_000_000,
        };
        let err = store
            .put_locked("x", Body::Bytes(Bytes::from_static(b"x")), lock)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Object Lock"), "{}: {err}", t.name);
        assert!(store.head("x").await.unwrap().is_none(), "{}", t.name);
        // Plain objects have no retention; missing objects are missing.
        store
            .put("plain", Body::Bytes(Bytes::from_static(b"p")))
            .await
            .unwrap();
        assert_eq!(store.retention("plain").await.unwrap(), None, "{}", t.name);
        store.delete("plain").await.unwrap();
        assert!(matches!(
            store.retention("plain").await,
            Err(StorageError::NotFound { .. })
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_has_no_object_lock() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::new(dir.path().to_path_buf()).unwrap();
    assert_eq!(store.object_lock_status().await.unwrap(), None);
    let lock = ObjectLock {
        mode: LockMode::Compliance,
        retain_until_us: now_us() + 1_000_000,
    };
    let err = store
        .put_locked("k", Body::Bytes(Bytes::from_static(b"k")), lock)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::Other(m) if m.contains("object lock is not supported by file:// replicas")),
        "{err:?}"
    );
    assert!(store.head("k").await.unwrap().is_none());
    store
        .put("k", Body::Bytes(Bytes::from_static(b"k")))
        .await
        .unwrap();
    assert_eq!(store.retention("k").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_lock_blocks_delete_until_expiry() {
    let Some(store) = lock_store().await else {
        return;
    };
    let data = random_bytes(100_000);
    let until = now_us() + 3_600_000_000;
    store
        .put_locked(
            "locked.seg",
            Body::Bytes(data.clone()),
            ObjectLock {
                mode: LockMode::Governance,
                retain_until_us: until,
            },
        )
        .await
        .unwrap();
    let got = store
        .retention("locked.seg")
        .await
        .unwrap()
        .expect("retention");
    assert!(
        (got - until).abs() <= 1_000_000,
        "retention {got} vs {until}"
    );

    assert_locked(
        store.delete("locked.seg").await,
        "delete of a locked object",
    );
    assert_eq!(store.get("locked.seg").await.unwrap(), data);
    assert_eq!(
        store.head("locked.seg").await.unwrap().unwrap().size,
        100_000
    );

    // Unlocked objects in the same (versioned) bucket are really deleted,
    // without leaving versions behind.
    store
        .put("plain.seg", Body::Bytes(random_bytes(10)))
        .await
        .unwrap();
    assert_eq!(store.retention("plain.seg").await.unwrap(), None);
    store.delete("plain.seg").await.unwrap();
    assert!(matches!(
        store.get("plain.seg").await,
        Err(StorageError::NotFound { .. })
    ));
    // Deleting a missing object is still fine.
    store.delete("plain.seg").await.unwrap();
    store.delete("never-existed").await.unwrap();

    // A short retention: deletable once expired, and then gone.
    let short = random_bytes(1000);
    store
        .put_locked(
            "short.seg",
            Body::Bytes(short.clone()),
            ObjectLock {
                mode: LockMode::Governance,
                retain_until_us: now_us() + 2_000_000,
            },
        )
        .await
        .unwrap();
    assert_locked(store.delete("short.seg").await, "delete before expiry");
    assert_eq!(store.get("short.seg").await.unwrap(), short);
    tokio::time::sleep(Duration::from_secs(3)).await;
    store.delete("short.seg").await.unwrap();
    assert!(matches!(
        store.get("short.seg").await,
        Err(StorageError::NotFound { .. })
    ));
    assert!(store.head("short.seg").await.unwrap().is_none());
    let keys: Vec<_> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, vec!["locked.seg".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compliance_lock_blocks_delete() {
    let Some(store) = lock_store().await else {
        return;
    };
    let data = random_bytes(5000);
    let until = now_us() + 3_600_000_000;
    store
        .put_locked(
            "c.seg",
            Body::Bytes(data.clone()),
            ObjectLock {
                mode: LockMode::Compliance,
                retain_until_us: until,
            },
        )
        .await
        .unwrap();
    let got = store.retention("c.seg").await.unwrap().expect("retention");
    assert!(
        (got - until).abs() <= 1_000_000,
        "retention {got} vs {until}"
    );
    assert_locked(
        store.delete("c.seg").await,
        "delete of a compliance-locked object",
    );
    assert_eq!(store.get("c.seg").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_multipart_upload_with_lock() {
    let Some(store) = lock_store().await else {
        return;
    };
    // > 16 MiB: the default multipart threshold; streamed from a file.
    let data = random_bytes(17 * MIB + 12345);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big");
    std::fs::write(&src, &data).unwrap();
    let until = now_us() + 3_600_000_000;
    let before = store.request_counts();
    store
        .put_locked(
            "big.seg",
            Body::File(src),
            ObjectLock {
                mode: LockMode::Governance,
                retain_until_us: until,
            },
        )
        .await
        .unwrap();
    // Create + 3 parts of 8 MiB + complete + PutObjectRetention (moto
    // ignores lock headers on CreateMultipartUpload), plus the lock probe.
    let d = store.request_counts() - before;
    assert_eq!(d.put, 6, "{d:?}");
    assert_eq!(d.other, 1, "{d:?}");
    let got = store
        .retention("big.seg")
        .await
        .unwrap()
        .expect("retention");
    assert!(
        (got - until).abs() <= 1_000_000,
        "retention {got} vs {until}"
    );
    assert_locked(
        store.delete("big.seg").await,
        "delete of a locked multipart object",
    );
    let back = store.get("big.seg").await.unwrap();
    assert!(back == data, "large locked object changed");
}
