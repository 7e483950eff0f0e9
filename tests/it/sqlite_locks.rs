//! The locking invariants of docs/SQLITE.md, checked against real SQLite
//! processes: while offsite's source holds its read lock, another process
//! cannot restart or truncate the WAL, whatever the source did before.

use crate::support;

use std::path::{Path, PathBuf};

use offsite::engine::sqlite::SqliteSource;
use support::harness::*;

/// A database with three commits, and a source open on it.
fn setup() -> (tempfile::TempDir, PathBuf, SqliteSource) {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    workload(&db, &["--count", "3"]);
    let src = SqliteSource::open(&db).unwrap();
    (tmp, db, src)
}

/// Another process tries to TRUNCATE-checkpoint the WAL; it must get SQLITE_BUSY.
fn assert_app_cannot_truncate(db: &Path) {
    let out = workload_cmd(db)
        .args([
            "--count",
            "12",
            "--checkpoint-every",
            "4",
            "--checkpoint-mode",
            "truncate",
        ])
        .args(["--checkpoint-busy-ms", "200", "--checkpoint-must-complete"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("returned busy"),
        "the application truncated the WAL under offsite's read lock: {err}"
    );
}

#[test]
fn read_lock_blocks_application_truncate_after_open() {
    let (_tmp, db, _src) = setup();
    assert_app_cannot_truncate(&db);
}

#[test]
fn read_lock_blocks_application_truncate_after_snapshot() {
    let (_tmp, db, mut src) = setup();
    let view = src.snapshot_begin().unwrap();
    let mut pages = 0;
    src.snapshot_read(&view, |_, _| {
        pages += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(pages, view.db_pages);
    assert!(src.wal_unchanged().unwrap());
    assert_app_cannot_truncate(&db);
}

#[test]
fn read_lock_survives_polling() {
    let (_tmp, db, mut src) = setup();
    src.snapshot_begin().unwrap();
    workload(&db, &["--count", "2"]);
    let mut next = 1;
    for _ in 0..3 {
        src.poll(&mut next, || 1).unwrap().unwrap();
    }
    assert_eq!(src.pending().len(), 2);
    assert_app_cannot_truncate(&db);
}

#[test]
fn read_lock_survives_yield_checks() {
    // Probing SQLite's locks must never drop them (POSIX releases all of a
    // process's locks on a file when any descriptor of it is closed).
    let (_tmp, db, mut src) = setup();
    src.snapshot_begin().unwrap();
    for _ in 0..5 {
        assert!(!src.yield_to_checkpointer().unwrap());
    }
    assert_app_cannot_truncate(&db);
}
