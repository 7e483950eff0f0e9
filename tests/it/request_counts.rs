//! Request counting (`Storage::request_counts`): exact counts for a few
//! operations on file:// and on a real S3 server (Garage).

use crate::support;

use bytes::Bytes;
use offsite::storage::file::FileStorage;
use offsite::storage::s3::S3Storage;
use offsite::storage::{Body, RequestCounts, Storage};

/// 3 puts, 1 list, 2 gets (one ranged), 1 head, 1 delete.
async fn workload(store: &dyn Storage) {
    for k in ["a/1", "a/2", "a/3"] {
        store
            .put(k, Body::Bytes(Bytes::from_static(b"hello")))
            .await
            .unwrap();
    }
    assert_eq!(store.list("a/").await.unwrap().len(), 3);
    assert_eq!(store.get("a/1").await.unwrap(), &b"hello"[..]);
    assert_eq!(store.get_range("a/2", 1, 2).await.unwrap(), &b"el"[..]);
    assert!(store.head("a/3").await.unwrap().is_some());
    store.delete("a/1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_counts_operations() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::new(dir.path().to_path_buf()).unwrap();
    assert_eq!(store.request_counts(), RequestCounts::default());
    workload(&store).await;
    assert_eq!(
        store.request_counts(),
        RequestCounts {
            put: 3,
            get: 2,
            list: 1,
            delete: 1,
            head: 1,
            other: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_counts_http_requests() {
    let Some(t) = support::s3_target("garage") else {
        return;
    };
    let store = S3Storage::new(t.s3_config())
        .await
        .unwrap()
        .with_multipart(5 * 1024 * 1024, 5 * 1024 * 1024)
        .with_list_page_size(2);
    let before = store.request_counts();
    workload(&store).await;
    let d = store.request_counts() - before;
    // The list of 3 keys with 2 per page is 2 ListObjectsV2 requests; the
    // first delete probes the bucket's Object Lock status once (`other`).
    assert_eq!(
        d,
        RequestCounts {
            put: 3,
            get: 2,
            list: 2,
            delete: 1,
            head: 1,
            other: 1
        },
        "{}",
        serde_json::to_string(&d).unwrap()
    );
    // Later deletes are one request each; a multipart upload is
    // create + parts + complete.
    let before = store.request_counts();
    store.delete("a/2").await.unwrap();
    let big = Bytes::from(vec![7u8; 11 * 1024 * 1024]);
    store.put("big", Body::Bytes(big)).await.unwrap();
    let d = store.request_counts() - before;
    assert_eq!(
        d,
        RequestCounts {
            put: 1 + 3 + 1,
            delete: 1,
            ..Default::default()
        }
    );
    store.delete("a/3").await.unwrap();
    store.delete("big").await.unwrap();
}
