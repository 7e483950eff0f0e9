//! Backend conformance suite: every `Storage` implementation must pass it
//! against a real store (directory, Garage, s3s-fs, AWS ...).
//!
//! Each check works under its own random key prefix (`conformance-<hex>/`),
//! asserts real outcomes (bytes, sizes, sorted listings) and deletes what it
//! created. Checks panic on failure, like test assertions. This module is
//! compiled into the library only with the `testing` feature, so the
//! integration tests (`cargo test --features testing`) can run it; the
//! `offsite` binary of a normal build does not contain it.
//!
//! `large_multipart` uses ~12 MiB objects; for S3 backends build the store
//! with `S3Storage::with_multipart(5 MiB, 5 MiB)` so it actually exercises
//! multipart uploads, and with `with_list_page_size(7)` so `list` exercises
//! pagination.

use std::path::Path;

use bytes::Bytes;

use super::{Body, ObjectMeta, Storage, StorageError};

const MIB: usize = 1024 * 1024;

/// Whether the store enforces the conditions of
/// [`Storage::put_conditional`] (`If-None-Match: *`, `If-Match`). Some
/// S3-compatible servers (Garage) ignore the condition headers and
/// overwrite; the lease then relies on reading back (see `lease.rs`), so
/// such a store is still held to versioned reads that show every write and
/// a tag that changes with every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conditions {
    /// Checked, and atomic: of concurrent creates exactly one succeeds.
    Enforced,
    /// Checked one request at a time, but concurrent creates of one key may
    /// all succeed (s3s-fs checks, then writes).
    EnforcedNotAtomic,
    IgnoredByServer,
}

/// Run every check, in order.
pub async fn run_all(store: &dyn Storage, conditions: Conditions) {
    put_get_roundtrip(store).await;
    overwrite(store).await;
    get_range(store).await;
    get_missing_is_not_found(store).await;
    head(store).await;
    list_sorted_and_prefix_filtered(store).await;
    delete_missing_ok(store).await;
    put_file_body(store).await;
    large_multipart(store).await;
    keys_with_nested_dirs(store).await;
    concurrent_puts(store).await;
    invalid_keys_rejected(store).await;
    versioned_get(store).await;
    conditional_writes(store, conditions).await;
    conditional_create_race(store, conditions).await;
}

fn scope() -> String {
    format!("conformance-{:016x}", rand::random::<u64>())
}

fn random_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    Bytes::from(v)
}

/// Compare without dumping megabytes into the panic message.
#[track_caller]
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first_diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: content differs: got {} bytes, expected {} bytes, first difference at offset {first_diff}",
        got.len(),
        want.len()
    );
}

async fn put_bytes(store: &dyn Storage, key: &str, data: &Bytes) {
    store
        .put(key, Body::Bytes(data.clone()))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{}: put {key:?} ({} bytes): {e}",
                store.describe(),
                data.len()
            )
        });
}

async fn get_ok(store: &dyn Storage, key: &str) -> Bytes {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("{}: get {key:?}: {e}", store.describe()))
}

async fn list_ok(store: &dyn Storage, prefix: &str) -> Vec<ObjectMeta> {
    store
        .list(prefix)
        .await
        .unwrap_or_else(|e| panic!("{}: list {prefix:?}: {e}", store.describe()))
}

async fn head_ok(store: &dyn Storage, key: &str) -> Option<ObjectMeta> {
    store
        .head(key)
        .await
        .unwrap_or_else(|e| panic!("{}: head {key:?}: {e}", store.describe()))
}

async fn delete_ok(store: &dyn Storage, key: &str) {
    store
        .delete(key)
        .await
        .unwrap_or_else(|e| panic!("{}: delete {key:?}: {e}", store.describe()));
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(what: &str, r: Result<T, StorageError>) {
    match r {
        Err(StorageError::NotFound { .. }) => {}
        other => panic!("{what}: expected StorageError::NotFound, got {other:?}"),
    }
}

/// Delete everything under `scope/` and check that it is gone.
async fn cleanup(store: &dyn Storage, scope: &str) {
    let prefix = format!("{scope}/");
    for m in list_ok(store, &prefix).await {
        delete_ok(store, &m.key).await;
    }
    let left = list_ok(store, &prefix).await;
    assert!(
        left.is_empty(),
        "{}: objects left under {prefix:?} after deleting them all: {left:?}",
        store.describe()
    );
}

pub async fn put_get_roundtrip(store: &dyn Storage) {
    let s = scope();
    for (i, n) in [0usize, 1, 1000, 100 * 1024 + 7].into_iter().enumerate() {
        let key = format!("{s}/obj-{i}");
        let data = random_bytes(n);
        put_bytes(store, &key, &data).await;
        let got = get_ok(store, &key).await;
        assert_same(&format!("get {key:?} after put"), &got, &data);
        let meta = head_ok(store, &key).await;
        assert_eq!(
            meta,
            Some(ObjectMeta {
                key: key.clone(),
                size: n as u64
            }),
            "head {key:?}"
        );
    }
    cleanup(store, &s).await;
}

pub async fn overwrite(store: &dyn Storage) {
    let s = scope();
    let key = format!("{s}/same-key");
    let first = random_bytes(5000);
    let second = random_bytes(1234);
    put_bytes(store, &key, &first).await;
    put_bytes(store, &key, &second).await;
    assert_same("get after overwrite", &get_ok(store, &key).await, &second);
    assert_eq!(
        head_ok(store, &key).await.map(|m| m.size),
        Some(1234),
        "head size after overwrite with a shorter body"
    );
    let listed = list_ok(store, &format!("{s}/")).await;
    assert_eq!(
        listed,
        vec![ObjectMeta {
            key: key.clone(),
            size: 1234
        }],
        "overwriting must leave exactly one object"
    );
    cleanup(store, &s).await;
}

pub async fn get_range(store: &dyn Storage) {
    let s = scope();
    let key = format!("{s}/ranged");
    let data = random_bytes(10_000);
    put_bytes(store, &key, &data).await;
    let cases: &[(u64, u64, std::ops::Range<usize>)] = &[
        (0, 10, 0..10),
        (100, 1000, 100..1100),
        (9_999, 1, 9_999..10_000),
        (9_990, 100, 9_990..10_000), // runs past the end: shortened
        (0, 10_000, 0..10_000),
        (5, 1 << 40, 5..10_000),
        (10_000, 5, 0..0), // starts at the end
        (20_000, 1, 0..0), // starts past the end
        (42, 0, 0..0),     // empty range
    ];
    for (start, len, want) in cases {
        let got = store
            .get_range(&key, *start, *len)
            .await
            .unwrap_or_else(|e| panic!("{}: get_range({start}, {len}): {e}", store.describe()));
        assert_same(
            &format!("get_range({start}, {len})"),
            &got,
            &data[want.clone()],
        );
    }
    assert_not_found(
        "get_range of a missing key",
        store.get_range(&format!("{s}/missing"), 0, 10).await,
    );
    cleanup(store, &s).await;
}

pub async fn get_missing_is_not_found(store: &dyn Storage) {
    let s = scope();
    let key = format!("{s}/does-not-exist");
    assert_not_found("get of a missing key", store.get(&key).await);
    assert_not_found(
        "get of a key below a missing directory",
        store.get(&format!("{s}/no/such/dir/x")).await,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("out");
    assert_not_found(
        "get_to_file of a missing key",
        store.get_to_file(&key, &dest).await,
    );
    assert!(
        !dest.exists(),
        "get_to_file of a missing key must not create the destination file"
    );
    cleanup(store, &s).await;
}

pub async fn head(store: &dyn Storage) {
    let s = scope();
    let key = format!("{s}/headed");
    assert_eq!(head_ok(store, &key).await, None, "head of a missing key");
    put_bytes(store, &key, &random_bytes(777)).await;
    assert_eq!(
        head_ok(store, &key).await,
        Some(ObjectMeta {
            key: key.clone(),
            size: 777
        })
    );
    // A prefix of an existing key is not an object.
    assert_eq!(
        head_ok(store, &format!("{s}/head")).await,
        None,
        "head of a key prefix"
    );
    cleanup(store, &s).await;
    assert_eq!(head_ok(store, &key).await, None, "head after delete");
}

pub async fn list_sorted_and_prefix_filtered(store: &dyn Storage) {
    let s = scope();
    // Names chosen so byte order matters: '-' < '.' < '/' < digits < letters.
    let mut names: Vec<String> = vec![
        "a-b".into(),
        "a.b".into(),
        "ab".into(),
        "b".into(),
        "a/x".into(),
        "a/y/z".into(),
        "Z".into(),
    ];
    for i in (0..23).rev() {
        names.push(format!("a/n{i:02}"));
    }
    // Upload in a scrambled order, with distinct sizes.
    let mut expected = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let key = format!("{s}/l/{name}");
        put_bytes(store, &key, &random_bytes(i + 1)).await;
        expected.push(ObjectMeta {
            key,
            size: (i + 1) as u64,
        });
    }
    expected.sort_by(|a, b| a.key.cmp(&b.key));
    // Something next door that must not show up.
    put_bytes(store, &format!("{s}/l2/other"), &random_bytes(3)).await;

    let all = list_ok(store, &format!("{s}/l/")).await;
    assert_eq!(all.len(), 30, "list {s}/l/ count: {all:?}");
    assert_eq!(all, expected, "list must be complete and sorted by key");

    let filter = |p: &str| -> Vec<ObjectMeta> {
        expected
            .iter()
            .filter(|m| m.key.starts_with(p))
            .cloned()
            .collect()
    };
    for p in [
        format!("{s}/l/a/"),
        format!("{s}/l/a"),
        format!("{s}/l/a/n1"),
        format!("{s}/l/a/y/"),
        format!("{s}/l/b"),
        format!("{s}/l/Z"),
    ] {
        let got = list_ok(store, &p).await;
        let want = filter(&p);
        assert!(!want.is_empty(), "test bug: empty expectation for {p}");
        assert_eq!(got, want, "list {p:?}");
    }
    assert_eq!(list_ok(store, &format!("{s}/l/a/n1")).await.len(), 10);
    assert_eq!(list_ok(store, &format!("{s}/l/a")).await.len(), 28);
    assert!(
        list_ok(store, &format!("{s}/l/nothing-here"))
            .await
            .is_empty(),
        "list of an unused prefix"
    );
    assert!(
        list_ok(store, &format!("{s}-unused/")).await.is_empty(),
        "list of an unused top-level prefix"
    );
    assert_eq!(
        list_ok(store, &format!("{s}/")).await.len(),
        31,
        "list {s}/ must include {s}/l2/other"
    );
    cleanup(store, &s).await;
}

pub async fn delete_missing_ok(store: &dyn Storage) {
    let s = scope();
    let key = format!("{s}/to-delete");
    delete_ok(store, &key).await;
    delete_ok(store, &format!("{s}/no/such/dir/x")).await;
    put_bytes(store, &key, &random_bytes(10)).await;
    let keep = format!("{s}/keep");
    put_bytes(store, &keep, &random_bytes(11)).await;
    delete_ok(store, &key).await;
    assert_eq!(head_ok(store, &key).await, None, "head after delete");
    assert_not_found("get after delete", store.get(&key).await);
    delete_ok(store, &key).await;
    assert_eq!(
        head_ok(store, &keep).await.map(|m| m.size),
        Some(11),
        "deleting one key must not touch another"
    );
    cleanup(store, &s).await;
}

async fn write_file(path: &Path, data: &[u8]) {
    tokio::fs::write(path, data)
        .await
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

async fn read_file(path: &Path) -> Vec<u8> {
    tokio::fs::read(path)
        .await
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub async fn put_file_body(store: &dyn Storage) {
    let s = scope();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let data = random_bytes(300 * 1024 + 3);
    write_file(&src, &data).await;
    let key = format!("{s}/from-file");
    store
        .put(&key, Body::File(src.clone()))
        .await
        .unwrap_or_else(|e| panic!("{}: put {key:?} from file: {e}", store.describe()));
    assert_same(
        "get of a file-body upload",
        &get_ok(store, &key).await,
        &data,
    );

    // get_to_file truncates an existing, longer destination.
    let dest = dir.path().join("dest");
    write_file(&dest, &vec![0xAA; 1024 * 1024]).await;
    let n = store
        .get_to_file(&key, &dest)
        .await
        .unwrap_or_else(|e| panic!("{}: get_to_file {key:?}: {e}", store.describe()));
    assert_eq!(n, data.len() as u64, "get_to_file return value");
    assert_same("get_to_file content", &read_file(&dest).await, &data);

    // An empty file body.
    let empty = dir.path().join("empty");
    write_file(&empty, b"").await;
    let ekey = format!("{s}/empty-file");
    store
        .put(&ekey, Body::File(empty))
        .await
        .unwrap_or_else(|e| panic!("{}: put empty file: {e}", store.describe()));
    assert_eq!(head_ok(store, &ekey).await.map(|m| m.size), Some(0));
    assert_eq!(
        store.get_to_file(&ekey, &dest).await.expect("get_to_file"),
        0
    );
    assert_eq!(read_file(&dest).await.len(), 0);

    // A missing source file is an error, and nothing gets stored.
    let mkey = format!("{s}/missing-source");
    assert!(
        store
            .put(&mkey, Body::File(dir.path().join("nope")))
            .await
            .is_err(),
        "put from a missing file must fail"
    );
    assert_eq!(head_ok(store, &mkey).await, None);
    cleanup(store, &s).await;
}

pub async fn large_multipart(store: &dyn Storage) {
    let s = scope();
    let dir = tempfile::tempdir().expect("tempdir");

    // From a file: 12 MiB + a bit, i.e. parts of 5 + 5 + 2.x MiB.
    let n = 12 * MIB + 12_345;
    let data = random_bytes(n);
    let src = dir.path().join("big");
    write_file(&src, &data).await;
    let key = format!("{s}/big-file");
    store
        .put(&key, Body::File(src))
        .await
        .unwrap_or_else(|e| panic!("{}: put {n}-byte file: {e}", store.describe()));
    assert_eq!(head_ok(store, &key).await.map(|m| m.size), Some(n as u64));
    let dest = dir.path().join("big-back");
    let got_n = store
        .get_to_file(&key, &dest)
        .await
        .unwrap_or_else(|e| panic!("{}: get_to_file big: {e}", store.describe()));
    assert_eq!(got_n, n as u64);
    assert_same(
        "large object via get_to_file",
        &read_file(&dest).await,
        &data,
    );
    // Ranges straddling the (5 MiB) part boundaries.
    for start in [5 * MIB - 10, 10 * MIB - 1, n - 100] {
        let got = store
            .get_range(&key, start as u64, 200)
            .await
            .unwrap_or_else(|e| panic!("{}: get_range big: {e}", store.describe()));
        let end = (start + 200).min(n);
        assert_same(
            &format!("large object range at {start}"),
            &got,
            &data[start..end],
        );
    }

    // Big enough for S3's ranged download (16 MiB ranges, several at a
    // time): three ranges, the last of one byte; and exactly one range.
    for n3 in [32 * MIB + 1, 16 * MIB] {
        let data3 = random_bytes(n3);
        let src3 = dir.path().join("bigger");
        write_file(&src3, &data3).await;
        let key3 = format!("{s}/bigger-{n3}");
        store
            .put(&key3, Body::File(src3))
            .await
            .unwrap_or_else(|e| panic!("{}: put {n3}-byte file: {e}", store.describe()));
        let got_n = store
            .get_to_file(&key3, &dest)
            .await
            .unwrap_or_else(|e| panic!("{}: get_to_file {n3} bytes: {e}", store.describe()));
        assert_eq!(got_n, n3 as u64);
        assert_same(
            &format!("{n3}-byte object via get_to_file"),
            &read_file(&dest).await,
            &data3,
        );
        delete_ok(store, &key3).await;
    }

    // From memory, an exact multiple of the part size.
    let data2 = random_bytes(10 * MIB);
    let key2 = format!("{s}/big-bytes");
    put_bytes(store, &key2, &data2).await;
    assert_same(
        "large in-memory object via get",
        &get_ok(store, &key2).await,
        &data2,
    );

    let listed = list_ok(store, &format!("{s}/")).await;
    assert_eq!(
        listed,
        vec![
            ObjectMeta {
                key: key2.clone(),
                size: (10 * MIB) as u64
            },
            ObjectMeta {
                key: key.clone(),
                size: n as u64
            },
        ]
    );
    cleanup(store, &s).await;
}

pub async fn keys_with_nested_dirs(store: &dyn Storage) {
    let s = scope();
    let deep = format!("{s}/n/a/b/c/d.txt");
    let mid = format!("{s}/n/a/b/e");
    let top = format!("{s}/n/a/f");
    for (k, n) in [(&deep, 1), (&mid, 2), (&top, 3)] {
        put_bytes(store, k, &random_bytes(n)).await;
    }
    let keys = |v: Vec<ObjectMeta>| v.into_iter().map(|m| m.key).collect::<Vec<_>>();
    assert_eq!(
        keys(list_ok(store, &format!("{s}/n/")).await),
        vec![deep.clone(), mid.clone(), top.clone()]
    );
    delete_ok(store, &deep).await;
    assert_eq!(
        keys(list_ok(store, &format!("{s}/n/")).await),
        vec![mid.clone(), top.clone()],
        "deleting the deepest key must leave the others"
    );
    // Writing again below a (possibly pruned) directory works.
    put_bytes(store, &deep, &random_bytes(4)).await;
    assert_eq!(head_ok(store, &deep).await.map(|m| m.size), Some(4));
    delete_ok(store, &mid).await;
    delete_ok(store, &top).await;
    assert_eq!(
        keys(list_ok(store, &format!("{s}/n/")).await),
        vec![deep.clone()]
    );
    cleanup(store, &s).await;
}

pub async fn concurrent_puts(store: &dyn Storage) {
    let s = scope();
    let items: Vec<(String, Bytes)> = (0..16)
        .map(|i| (format!("{s}/c/{}/{i:02}", i % 3), random_bytes(1000 + i)))
        .collect();
    futures::future::join_all(
        items
            .iter()
            .map(|(k, d)| async move { put_bytes(store, k, d).await }),
    )
    .await;
    let mut want: Vec<ObjectMeta> = items
        .iter()
        .map(|(k, d)| ObjectMeta {
            key: k.clone(),
            size: d.len() as u64,
        })
        .collect();
    want.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(list_ok(store, &format!("{s}/")).await, want);
    // Concurrent deletes (which may prune directories) and puts in the
    // same directories.
    let more: Vec<(String, Bytes)> = (0..6)
        .map(|i| (format!("{s}/c/{}/new-{i}", i % 3), random_bytes(50)))
        .collect();
    let deletes = items
        .iter()
        .map(|(k, _)| async move { delete_ok(store, k).await });
    let puts = more
        .iter()
        .map(|(k, d)| async move { put_bytes(store, k, d).await });
    futures::future::join(
        futures::future::join_all(deletes),
        futures::future::join_all(puts),
    )
    .await;
    for (k, d) in &more {
        assert_same(&format!("get {k:?}"), &get_ok(store, k).await, d);
    }
    assert_eq!(list_ok(store, &format!("{s}/")).await.len(), more.len());
    cleanup(store, &s).await;
}

pub async fn invalid_keys_rejected(store: &dyn Storage) {
    for key in ["", "/abs", "a/../b", "../x", "a//b", "dir/"] {
        let r = store.put(key, Body::Bytes(Bytes::from_static(b"x"))).await;
        assert!(
            matches!(r, Err(StorageError::Other(_))),
            "{}: put of invalid key {key:?} must fail with Other, got {r:?}",
            store.describe()
        );
        assert!(store.get(key).await.is_err(), "get of invalid key {key:?}");
    }
}

async fn get_versioned_ok(store: &dyn Storage, key: &str) -> Option<(Bytes, String)> {
    store
        .get_versioned(key)
        .await
        .unwrap_or_else(|e| panic!("{}: get_versioned {key:?}: {e}", store.describe()))
}

/// `get_versioned`: `None` for a missing key, else the bytes of the last
/// write and a non-empty tag that changes with every write (also a plain
/// `put`) and stays while nothing is written. What the lease reads.
pub async fn versioned_get(store: &dyn Storage) {
    let s = scope();
    let key = format!("{s}/v/lease.json");
    assert_eq!(
        get_versioned_ok(store, &key).await,
        None,
        "{}: get_versioned of a missing key",
        store.describe()
    );
    let mut tags: Vec<String> = Vec::new();
    for (i, n) in [300usize, 300, 17, 0].into_iter().enumerate() {
        let data = random_bytes(n);
        put_bytes(store, &key, &data).await;
        let (got, tag) = get_versioned_ok(store, &key)
            .await
            .unwrap_or_else(|| panic!("{}: get_versioned after put: None", store.describe()));
        assert_same(&format!("get_versioned after put #{i}"), &got, &data);
        assert!(!tag.is_empty(), "{}: empty version tag", store.describe());
        let (_, again) = get_versioned_ok(store, &key).await.expect("still there");
        assert_eq!(
            again,
            tag,
            "{}: the version tag changed without a write",
            store.describe()
        );
        assert!(
            !tags.contains(&tag),
            "{}: write #{i} (same-size rewrite or not) kept an earlier version tag {tag:?}: {tags:?}",
            store.describe()
        );
        tags.push(tag);
    }
    delete_ok(store, &key).await;
    assert_eq!(
        get_versioned_ok(store, &key).await,
        None,
        "{}: get_versioned after delete",
        store.describe()
    );
    cleanup(store, &s).await;
}

/// `put_conditional` with the outcome the store promises: the write is
/// refused with `AlreadyExists` when the condition fails and nothing
/// changes (`Enforced`); or, for a server that ignores the conditions, the
/// write goes through and a read shows it (so the lease's read-back sees
/// who won).
async fn expect_refused(
    store: &dyn Storage,
    conditions: Conditions,
    key: &str,
    body: &Bytes,
    expect: Option<&str>,
    before: &Bytes,
    what: &str,
) {
    let r = store.put_conditional(key, body.clone(), expect).await;
    let (now, _) = get_versioned_ok(store, key)
        .await
        .unwrap_or_else(|| panic!("{}: {what}: the object is gone", store.describe()));
    match (conditions, r) {
        (_, Err(StorageError::AlreadyExists { .. })) => {
            assert_same(&format!("{what}: after a refused write"), &now, before);
        }
        (Conditions::IgnoredByServer, Ok(())) => {
            assert_same(&format!("{what}: read back after an overwrite"), &now, body);
        }
        (Conditions::Enforced | Conditions::EnforcedNotAtomic, Ok(())) => panic!(
            "{}: {what}: the write went through; expected StorageError::AlreadyExists",
            store.describe()
        ),
        (_, Err(e)) => panic!(
            "{}: {what}: expected StorageError::AlreadyExists, got {e:?}",
            store.describe()
        ),
    }
}

/// Create-if-absent, replace-if-unchanged, and the refusals: what the lease
/// does to take, renew and release itself.
pub async fn conditional_writes(store: &dyn Storage, conditions: Conditions) {
    let s = scope();
    let key = format!("{s}/c/lease.json");
    let put_cond = |body: Bytes, expect: Option<String>| {
        let key = key.clone();
        async move {
            store
                .put_conditional(&key, body, expect.as_deref())
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{}: put_conditional {key:?} (expect {expect:?}): {e}",
                        store.describe()
                    )
                })
        }
    };
    // Create when absent.
    let a = random_bytes(200);
    put_cond(a.clone(), None).await;
    let (got, tag_a) = get_versioned_ok(store, &key).await.expect("created");
    assert_same("get_versioned after a conditional create", &got, &a);
    assert_same(
        "get after a conditional create",
        &get_ok(store, &key).await,
        &a,
    );
    assert_eq!(
        list_ok(store, &format!("{s}/")).await,
        vec![ObjectMeta {
            key: key.clone(),
            size: 200
        }],
        "a conditional write stores a plain object"
    );

    // Create again: it exists.
    let b = random_bytes(210);
    expect_refused(
        store,
        conditions,
        &key,
        &b,
        None,
        &a,
        "create over an existing object",
    )
    .await;
    let (cur, tag) = get_versioned_ok(store, &key).await.expect("exists");
    // Replace at a version that never was.
    let c = random_bytes(220);
    expect_refused(
        store,
        conditions,
        &key,
        &c,
        Some("\"no-such-version\""),
        &cur,
        "replace at a made-up version",
    )
    .await;
    let tag = match conditions {
        Conditions::Enforced | Conditions::EnforcedNotAtomic => {
            assert_eq!(
                tag,
                tag_a,
                "{}: a refused write changed the tag",
                store.describe()
            );
            tag
        }
        Conditions::IgnoredByServer => get_versioned_ok(store, &key).await.expect("exists").1,
    };

    // Replace at the current version: goes through, new tag.
    let d = random_bytes(200);
    put_cond(d.clone(), Some(tag.clone())).await;
    let (got, tag_d) = get_versioned_ok(store, &key).await.expect("replaced");
    assert_same("get_versioned after a conditional replace", &got, &d);
    assert_ne!(
        tag_d,
        tag,
        "{}: a replace kept the version tag",
        store.describe()
    );

    // Replace at the old (stale) version: refused.
    let e = random_bytes(200);
    expect_refused(
        store,
        conditions,
        &key,
        &e,
        Some(&tag),
        &d,
        "replace at a stale version",
    )
    .await;

    // A plain put in between makes the version stale too.
    let (_, tag) = get_versioned_ok(store, &key).await.expect("exists");
    let f = random_bytes(200);
    put_bytes(store, &key, &f).await;
    expect_refused(
        store,
        conditions,
        &key,
        &random_bytes(200),
        Some(&tag),
        &f,
        "replace at the version before a plain put",
    )
    .await;

    // Release and take again, as a successor does.
    let (_, tag) = get_versioned_ok(store, &key).await.expect("exists");
    let g = random_bytes(50);
    put_cond(g.clone(), Some(tag)).await;
    assert_same("after release", &get_ok(store, &key).await, &g);
    delete_ok(store, &key).await;
    let h = random_bytes(60);
    put_cond(h.clone(), None).await;
    assert_same(
        "create after delete",
        &get_versioned_ok(store, &key).await.expect("created").0,
        &h,
    );

    // Conditional writes check keys like every other call.
    for bad in ["", "/abs", "a//b"] {
        let r = store
            .put_conditional(bad, Bytes::from_static(b"x"), None)
            .await;
        assert!(
            matches!(r, Err(StorageError::Other(_))),
            "{}: put_conditional of invalid key {bad:?} must fail with Other, got {r:?}",
            store.describe()
        );
        assert!(
            store.get_versioned(bad).await.is_err(),
            "{}: get_versioned of invalid key {bad:?}",
            store.describe()
        );
    }
    cleanup(store, &s).await;
}

/// Two shippers take a free lease in the same instant: with enforced
/// conditions exactly one create wins and the object holds its body; with
/// ignored ones both may go through, and a read shows one of them (the
/// lease's read-back then stops the other).
pub async fn conditional_create_race(store: &dyn Storage, conditions: Conditions) {
    let s = scope();
    for round in 0..5 {
        let key = format!("{s}/race/{round}");
        let bodies: Vec<Bytes> = (0..4).map(|_| random_bytes(100)).collect();
        let results = futures::future::join_all(
            bodies
                .iter()
                .map(|b| store.put_conditional(&key, b.clone(), None)),
        )
        .await;
        let (now, _) = get_versioned_ok(store, &key)
            .await
            .unwrap_or_else(|| panic!("{}: race {round}: nothing stored", store.describe()));
        let mut won = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(()) => won.push(i),
                Err(StorageError::AlreadyExists { .. }) => {}
                Err(e) => panic!(
                    "{}: race {round}: writer {i}: expected Ok or AlreadyExists, got {e:?}",
                    store.describe()
                ),
            }
        }
        assert!(
            !won.is_empty(),
            "{}: race {round}: every create was refused on a free key",
            store.describe()
        );
        if conditions == Conditions::Enforced {
            assert_eq!(
                won.len(),
                1,
                "{}: race {round}: {} creates of one key went through",
                store.describe(),
                won.len()
            );
            assert_same(
                &format!("race {round}: the winner's body"),
                &now,
                &bodies[won[0]],
            );
        } else {
            assert!(
                won.iter().any(|&i| now == bodies[i]),
                "{}: race {round}: the stored body is none of the successful writes'",
                store.describe()
            );
        }
    }
    cleanup(store, &s).await;
}
