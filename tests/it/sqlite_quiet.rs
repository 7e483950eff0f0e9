//! The idle fast path (`SqliteSource::quiet`): a look that `stat` shows to
//! be idle may skip the poll, so it must never hide a commit.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use offsite::engine::sqlite::SqliteSource;
use support::harness::*;

/// A database with three commits, a source past them (snapshot) and its WAL.
fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, SqliteSource) {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("a.db");
    workload(&db, &["--count", "3"]);
    let mut src = SqliteSource::open(&db).unwrap();
    src.snapshot_begin().unwrap();
    let wal = tmp.path().join("a.db-wal");
    (tmp, db, wal, src)
}

/// Set the WAL's modification time, as a filesystem with coarse timestamps
/// (or a long idle spell) would leave it.
fn set_mtime(wal: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(wal)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn poll(src: &mut SqliteSource, next: &mut u64) -> usize {
    src.poll(next, || 1).unwrap().unwrap()
}

#[test]
fn a_recently_written_wal_is_never_quiet() {
    let (_tmp, _db, _wal, mut src) = setup();
    let mut next = 1;
    assert!(!src.quiet(), "quiet before any poll");
    assert_eq!(poll(&mut src, &mut next), 0);
    // The WAL was written just now: the same mtime tick could hold another write.
    assert!(!src.quiet());
}

#[test]
fn quiet_after_an_empty_poll_of_an_old_wal_until_a_commit_lands() {
    let (_tmp, db, wal, mut src) = setup();
    let mut next = 1;
    let old = SystemTime::now() - Duration::from_secs(3600);
    set_mtime(&wal, old);
    assert_eq!(poll(&mut src, &mut next), 0);
    assert!(src.quiet(), "an unchanged, settled WAL after an empty poll");
    assert!(src.quiet(), "looking does not change it");

    workload(&db, &["--count", "1"]);
    assert!(!src.quiet(), "a commit was made after the last poll");
    assert_eq!(poll(&mut src, &mut next), 1);
    assert!(!src.quiet(), "commits pending");
}

#[test]
fn a_commit_within_the_same_mtime_tick_still_shows() {
    // A filesystem with one-second timestamps can give a write the mtime the
    // last poll saw: the size (or, for a restarted WAL, the age rule) tells.
    let (_tmp, db, wal, mut src) = setup();
    let mut next = 1;
    let old = SystemTime::now() - Duration::from_secs(3600);
    set_mtime(&wal, old);
    assert_eq!(poll(&mut src, &mut next), 0);
    assert!(src.quiet());
    workload(&db, &["--count", "1"]);
    set_mtime(&wal, old);
    assert!(!src.quiet(), "the commit is hidden by the fast path");
    assert_eq!(poll(&mut src, &mut next), 1);
}

#[test]
fn a_replaced_database_is_not_quiet() {
    let (tmp, db, wal, mut src) = setup();
    let mut next = 1;
    set_mtime(&wal, SystemTime::now() - Duration::from_secs(3600));
    assert_eq!(poll(&mut src, &mut next), 0);
    assert!(src.quiet());
    let other = tmp.path().join("b.db");
    std::fs::copy(&db, &other).unwrap();
    std::fs::rename(&other, &db).unwrap();
    assert!(!src.quiet(), "the database file was replaced");
    assert!(
        src.poll(&mut next, || 1).unwrap().is_err(),
        "the poll sees the replacement"
    );
}
