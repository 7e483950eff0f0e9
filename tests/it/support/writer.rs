//! The deterministic in-process writer: the workload's commits (so a
//! restored state can be checked with `offsite::workload::verify`), plus a
//! side table that grows and is dropped and vacuumed, so the database also
//! shrinks (truncation inside compaction windows).

use std::path::Path;

use offsite::workload;

pub struct Writer {
    pub c: rusqlite::Connection,
    p: workload::Params,
    /// Commits made so far (the workload's commit number of the last one).
    pub s: u64,
}

impl Writer {
    /// Every `big_every`-th commit carries a `big_bytes` payload. The
    /// application never checkpoints (offsite's checkpoints are the only ones).
    pub fn new(db: &Path, big_every: u64, big_bytes: usize) -> Writer {
        let p = workload::Params {
            big_every,
            big_bytes,
        };
        let c = workload::open(db, &p).unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        Writer { c, p, s: 0 }
    }

    /// The next workload commit.
    pub fn commit(&mut self) {
        self.s += 1;
        workload::commit(&mut self.c, &self.p, self.s).unwrap();
    }

    /// Grow the side table by `rows` blobs of `blob_bytes` (one transaction).
    pub fn grow(&mut self, rows: u32, blob_bytes: u32) {
        self.c
            .execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS junk(b BLOB); INSERT INTO junk SELECT randomblob({blob_bytes}) FROM (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {rows}) SELECT i FROM n);"
            ))
            .unwrap();
    }

    /// Drop the side table and VACUUM: the database file shrinks.
    pub fn shrink(&mut self) {
        self.c
            .execute_batch("DROP TABLE IF EXISTS junk; VACUUM;")
            .unwrap();
    }
}
