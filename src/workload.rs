//! A deterministic SQLite workload for tests and benchmarks.
//!
//! Commit number `s` (1, 2, 3, …) inserts row `s`, updates row `s-1` when
//! `s % 3 == 0` and deletes row `s-5` when `s % 10 == 0`. Payloads are a pure
//! function of (row, version), so the exact table content after commit `m`
//! is known (`expected_rows`) and a restored database can be checked row by
//! row. Every `big_every`-th commit writes a `big_bytes` payload; a payload's
//! bytes are determined by (row, version, length).

use std::path::Path;

use anyhow::Context;
use rusqlite::{params, Connection};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub big_every: u64,
    pub big_bytes: usize,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// Length of a new payload for `row` under the writer's parameters.
pub fn payload_len(p: &Params, row: u64, version: u64) -> usize {
    if p.big_every > 0 && row.is_multiple_of(p.big_every) && version == 0 {
        p.big_bytes
    } else {
        50 + (splitmix(row.wrapping_mul(2).wrapping_add(version)) % 1950) as usize
    }
}

/// Payload of `row` at `version` and length `len`: partly compressible, like real data.
pub fn payload(row: u64, version: u64, len: usize) -> Vec<u8> {
    let seed = splitmix(row.wrapping_mul(2).wrapping_add(version));
    let mut out = Vec::with_capacity(len);
    let mut s = seed;
    while out.len() < len {
        s = splitmix(s);
        // Half random bytes, half a repeated word: zstd gets ~2x.
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(b"offsite!");
    }
    out.truncate(len);
    out
}

/// The rows (id, version) present after commit `m`.
pub fn expected_rows(m: u64) -> Vec<(u64, u64)> {
    (1..=m)
        .filter(|r| !((r + 5) % 10 == 0 && r + 5 <= m))
        .map(|r| (r, if (r + 1) % 3 == 0 && r < m { 1 } else { 0 }))
        .collect()
}

pub fn open(db: &Path, p: &Params) -> anyhow::Result<Connection> {
    let c = Connection::open(db).with_context(|| format!("open {}", db.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(30))?;
    c.pragma_update(None, "journal_mode", "wal")?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, version INTEGER NOT NULL, payload BLOB NOT NULL);",
    )?;
    let _ = p;
    Ok(c)
}

/// Commit number `s` (must be last + 1).
pub fn commit(c: &mut Connection, p: &Params, s: u64) -> anyhow::Result<()> {
    let tx = c.transaction()?;
    tx.execute(
        "INSERT INTO t(id, version, payload) VALUES (?1, 0, ?2)",
        params![s as i64, payload(s, 0, payload_len(p, s, 0))],
    )?;
    if s.is_multiple_of(3) && s > 1 {
        tx.execute(
            "UPDATE t SET version = 1, payload = ?2 WHERE id = ?1",
            params![(s - 1) as i64, payload(s - 1, 1, payload_len(p, s - 1, 1))],
        )?;
    }
    if s.is_multiple_of(10) && s > 5 {
        tx.execute("DELETE FROM t WHERE id = ?1", params![(s - 5) as i64])?;
    }
    tx.commit()?;
    Ok(())
}

/// The last commit number applied to the database at `db` (0 if none).
pub fn last_commit(c: &Connection) -> anyhow::Result<u64> {
    let m: Option<i64> = c.query_row("SELECT max(id) FROM t", [], |r| r.get(0))?;
    Ok(m.unwrap_or(0) as u64)
}

/// Check a (restored) database: it must hold exactly the state after some
/// commit `m`, which is returned. Runs `PRAGMA integrity_check` too.
pub fn verify(db: &Path) -> anyhow::Result<u64> {
    let c = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("open {}", db.display()))?;
    let ic: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    anyhow::ensure!(ic == "ok", "integrity_check: {ic}");
    let m = last_commit(&c)?;
    let want = expected_rows(m);
    let mut stmt = c.prepare("SELECT id, version, payload FROM t ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let mut i = 0;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let v: i64 = r.get(1)?;
        let pl: Vec<u8> = r.get(2)?;
        let (wid, wv) = *want
            .get(i)
            .with_context(|| format!("unexpected extra row {id} (state after commit {m})"))?;
        anyhow::ensure!(
            (id as u64, v as u64) == (wid, wv),
            "row {id} v{v}, expected row {wid} v{wv} (state after commit {m})"
        );
        // The length is the writer's choice (big or small); the bytes are not.
        anyhow::ensure!(pl == payload(wid, wv, pl.len()), "row {id} payload differs");
        i += 1;
    }
    anyhow::ensure!(
        i == want.len(),
        "{} rows, expected {} (state after commit {m})",
        i,
        want.len()
    );
    Ok(m)
}
