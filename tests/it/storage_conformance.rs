//! The storage conformance suite against every backend: a local directory
//! and each S3 server from `OFFSITE_TEST_S3_TARGETS` (see
//! `scripts/test-servers.sh`). No mocks: these are real servers.

use crate::support;

use offsite::storage::conformance::{self, Conditions};
use offsite::storage::file::FileStorage;
use offsite::storage::s3::S3Storage;
use offsite::storage::Storage;

const MIB: u64 = 1024 * 1024;

/// An S3 store set up so the suite exercises multipart uploads (5 MiB is
/// S3's minimum part size) and ListObjectsV2 pagination.
async fn s3_store(target: &support::S3Target) -> S3Storage {
    S3Storage::new(target.s3_config())
        .await
        .unwrap_or_else(|e| panic!("opening S3 target {} ({}): {e:#}", target.name, target.url))
        .with_multipart(5 * MIB, 5 * MIB)
        .with_list_page_size(7)
}

/// Whether the server enforces `If-None-Match`/`If-Match` on PutObject.
/// Garage ignores them, s3s-fs checks them but not atomically (concurrent
/// creates may all succeed); the lease's read-back covers both. Any other
/// server (AWS, …) must enforce them atomically.
fn conditions(target: &support::S3Target) -> Conditions {
    match target.name.as_str() {
        "garage" => Conditions::IgnoredByServer,
        "s3s" => Conditions::EnforcedNotAtomic,
        _ => Conditions::Enforced,
    }
}

async fn run_s3(target: support::S3Target) {
    eprintln!("conformance: {} = {}", target.name, target.url);
    let store = s3_store(&target).await;
    conformance::run_all(&store, conditions(&target)).await;
    // The suite cleans up after itself: nothing is left under the target's
    // unique prefix.
    let left = store.list("").await.expect("final list");
    assert!(
        left.is_empty(),
        "{}: objects left behind: {left:?}",
        target.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::new(dir.path().join("replica")).unwrap();
    conformance::run_all(&store, Conditions::Enforced).await;
    let left = store.list("").await.unwrap();
    assert!(left.is_empty(), "objects left behind: {left:?}");
    // Directories emptied by deletes were pruned; no temp files remain.
    // Only the conditional writers' lock file stays (it must: a lock file
    // that is deleted and created again does not exclude anyone).
    let entries: Vec<_> = std::fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".tmp-conditional.lock")
        .collect();
    assert!(entries.is_empty(), "replica dir not empty: {entries:?}");
}

/// `s3_target` panics when the server is not configured (only with
/// `OFFSITE_TEST_ALLOW_NO_S3=1` and no servers at all is this skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_garage() {
    if let Some(t) = support::s3_target("garage") {
        run_s3(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_s3s_fs() {
    if let Some(t) = support::s3_target("s3s") {
        run_s3(t).await;
    }
}

/// Any further targets configured in the environment (e.g. real AWS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_other_targets() {
    for t in support::s3_targets() {
        if t.name != "garage" && t.name != "s3s" {
            run_s3(t).await;
        }
    }
}

/// An unreachable endpoint fails with `Unavailable`, naming the endpoint,
/// after the SDK's retries (not a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_endpoint_is_unavailable() {
    // Needs the test credentials from the env file (otherwise the request
    // fails earlier, for lack of credentials).
    if support::s3_targets().is_empty() {
        return;
    }
    // Port 9 (discard) on localhost: nothing listens there.
    let url: offsite::storage::ReplicaUrl =
        "s3://nobucket/p?endpoint=http://127.0.0.1:9&region=garage&force-path-style=true"
            .parse()
            .unwrap();
    let offsite::storage::ReplicaUrl::S3(cfg) = url else {
        unreachable!()
    };
    let store = S3Storage::new(cfg).await.unwrap();
    let start = std::time::Instant::now();
    let err = store.get("x").await.unwrap_err();
    assert!(
        matches!(err, offsite::storage::StorageError::Unavailable(_)),
        "expected Unavailable, got {err:?}"
    );
    let msg = err.to_string();
    eprintln!("unreachable endpoint ({:?}): {msg}", start.elapsed());
    assert!(msg.contains("http://127.0.0.1:9"), "{msg}");
    assert!(msg.contains("attempts"), "{msg}");
    assert!(start.elapsed() < std::time::Duration::from_secs(60));
}

/// A missing bucket is reported as such (not as a missing object, not as
/// "unavailable"), naming the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_missing_bucket_is_reported() {
    for t in support::s3_targets() {
        let mut cfg = t.s3_config();
        cfg.bucket = format!("offsite-missing-{}", support::unique_prefix());
        let store = S3Storage::new(cfg.clone()).await.unwrap();
        let mut errs = vec![store.list("").await.unwrap_err()];
        // s3s-fs answers GetObject in a missing bucket with NoSuchKey.
        match store.get("x").await.unwrap_err() {
            offsite::storage::StorageError::NotFound { .. } if t.name == "s3s" => {}
            e => errs.push(e),
        }
        for err in errs {
            assert!(
                matches!(err, offsite::storage::StorageError::Other(_)),
                "{}: expected Other, got {err:?}",
                t.name
            );
            let msg = err.to_string();
            assert!(msg.contains(&cfg.bucket), "{}: {msg}", t.name);
            assert!(msg.contains("does not exist"), "{}: {msg}", t.name);
        }
    }
}
