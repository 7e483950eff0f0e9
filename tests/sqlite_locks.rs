//! The locking invariants of docs/SQLITE.md, checked against real SQLite
//! processes: while offsite's source holds its read lock, another process
//! cannot restart or truncate the WAL.

mod support;

use offsite::source::sqlite::SqliteSource;
use support::harness::*;

fn app_truncate(db: &std::path::Path) -> std::process::Output {
    workload_cmd(db)
        .args([
            "--count",
            "12",
            "--checkpoint-every",
            "4",
            "--checkpoint-mode",
            "truncate",
            "--checkpoint-busy-ms",
            "200",
            "--checkpoint-must-complete",
        ])
        .env("OFFSITE_WORKLOAD_DEBUG", "1")
        .output()
        .unwrap()
}

#[test]
fn read_lock_blocks_application_truncate_after_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    workload(&db, &["--count", "3"]);
    let mut src = SqliteSource::open(&db).unwrap();
    let view = src.snapshot_begin().unwrap();
    let _ = view;
    let out = app_truncate(&db);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the application truncated the WAL under offsite's read lock: {err}"
    );
    assert!(err.contains("returned busy"), "{err}");
    drop(src);
}

#[test]
fn read_lock_blocks_application_truncate_after_open() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    workload(&db, &["--count", "3"]);
    let src = SqliteSource::open(&db).unwrap();
    let out = app_truncate(&db);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the application truncated the WAL under offsite's read lock: {err}"
    );
    drop(src);
}

#[test]
fn read_lock_survives_polling() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    workload(&db, &["--count", "3"]);
    let mut src = SqliteSource::open(&db).unwrap();
    src.snapshot_begin().unwrap();
    workload(&db, &["--count", "2"]);
    let mut next = 1;
    for _ in 0..3 {
        src.poll(&mut next, || 1).unwrap().unwrap();
    }
    assert_eq!(src.pending().len(), 2);
    let out = app_truncate(&db);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the application truncated the WAL under offsite's read lock: {err}"
    );
    drop(src);
}

#[test]
fn read_lock_survives_snapshot_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    workload(&db, &["--count", "3"]);
    let mut src = SqliteSource::open(&db).unwrap();
    let view = src.snapshot_begin().unwrap();
    let mut n = 0;
    src.snapshot_read(&view, |_, _| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert!(src.wal_unchanged().unwrap());
    let out = app_truncate(&db);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the application truncated the WAL under offsite's read lock: {err}"
    );
}

#[test]
fn read_lock_survives_yield_checks() {
    // Probing SQLite's locks must never drop them (POSIX releases all of a
    // process's locks on a file when any descriptor of it is closed).
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    workload(&db, &["--count", "3"]);
    let mut src = SqliteSource::open(&db).unwrap();
    src.snapshot_begin().unwrap();
    for _ in 0..5 {
        assert!(!src.yield_to_checkpointer().unwrap());
    }
    let out = app_truncate(&db);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the application truncated the WAL under offsite's read lock: {err}"
    );
}
