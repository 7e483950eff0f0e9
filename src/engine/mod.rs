//! The engine boundary. Everything that knows a database engine lives under
//! `engine/<name>/`; the rest of offsite (storage, codec, object naming and
//! the catalog, lineage and txid bookkeeping, lease, retention, retries,
//! spool, metrics, daemon) knows none.
//!
//! What crosses the boundary (docs/ARCHITECTURE.md):
//! - shipping: a [`Source`] hands the pipeline ordered, timestamped commits
//!   whose payload only it can read, consistent snapshots, a resume position
//!   (an opaque JSON value stored in each object's envelope), a 16-byte
//!   digest of its state after each commit (from which it builds the
//!   engine-neutral chain link), compacted windows, and maintenance hooks
//!   (checkpoints, the log-size bound);
//! - restoring: a [`Replay`] applies a snapshot's data and then commits'
//!   payloads to an output, and returns its own digest after each, which the
//!   pipeline compares with the stored one.

pub mod postgres;
pub mod sqlite;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use crate::codec::Seal;
use crate::segment::{Digest, Link};

/// The engines offsite knows. Recorded in every object and at the replica
/// root, so commands that get only a URL know what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    /// PostgreSQL: its own archive layout (docs/FORMAT.md, "PostgreSQL
    /// archive"), shipped by `engine::postgres`, not by the commit pipeline.
    Postgres,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Engine> {
        match s {
            "sqlite" => Ok(Engine::Sqlite),
            "postgres" => Ok(Engine::Postgres),
            other => bail!(
                "unknown database engine {other:?}: the replica was written by another engine or a newer offsite (upgrade offsite, or check the URL)"
            ),
        }
    }

    /// Open the source of the database at `db`, with compaction windows of
    /// `levels` staged in `spool_dir`.
    pub fn open_source(
        self,
        db: &Path,
        levels: &[Duration],
        spool_dir: PathBuf,
    ) -> anyhow::Result<Box<dyn Source>> {
        match self {
            Engine::Sqlite => Ok(Box::new(sqlite::Shipper::open(db, levels, spool_dir)?)),
            Engine::Postgres => bail!(postgres::NOT_A_COMMIT_PIPELINE),
        }
    }

    /// Bytes of the database's change log not yet folded into it (SQLite:
    /// the `-wal` file), which offsite's hold on it keeps from shrinking.
    pub fn log_bytes(self, db: &Path) -> u64 {
        match self {
            Engine::Sqlite => sqlite::Shipper::log_bytes(db),
            Engine::Postgres => 0,
        }
    }

    /// Let the database fold and truncate its change log (called with no
    /// source open, when the log outgrew `max-wal-size`). `Ok(false)`: busy.
    pub fn release_log(self, db: &Path) -> anyhow::Result<bool> {
        match self {
            Engine::Sqlite => sqlite::source::checkpoint_truncate(db),
            Engine::Postgres => bail!(postgres::NOT_A_COMMIT_PIPELINE),
        }
    }

    /// A replay of this engine's objects, writing to `output` if given
    /// (restore) or only checking (verify).
    pub fn replay(self, output: Option<std::fs::File>) -> anyhow::Result<Box<dyn Replay>> {
        match self {
            Engine::Sqlite => Ok(Box::new(sqlite::PageReplay::new(output))),
            Engine::Postgres => bail!(postgres::NOT_A_COMMIT_PIPELINE),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Exact reads of an engine's bytes inside a body (snapshot data or one
/// commit's payload, bounded to its declared length).
pub trait ExactRead {
    fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()>;
    /// Bytes left (of a commit's payload; `u64::MAX` for snapshot data,
    /// whose length the engine's header fields give).
    fn remaining(&self) -> u64;
}

/// What a restorer does with an engine's objects: apply them, in chain
/// order, and say what state they leave.
pub trait Replay: Send {
    /// Start over from a snapshot: `header` is the snapshot header's engine
    /// fields, `data` its data. Returns the state digest.
    fn snapshot(
        &mut self,
        header: &serde_json::Value,
        data: &mut dyn ExactRead,
    ) -> anyhow::Result<Digest>;
    /// A segment follows: check its engine fields against the state (if
    /// any: a segment off the chain is only checked for its shape).
    fn begin_segment(&mut self, header: &serde_json::Value) -> anyhow::Result<()>;
    /// Apply one commit's payload; returns the state digest after it.
    fn commit(&mut self, payload: &mut dyn ExactRead) -> anyhow::Result<Digest>;
    /// Read a commit's payload and check it without applying it.
    fn check_commit(&mut self, payload: &mut dyn ExactRead) -> anyhow::Result<()>;
    /// The current state digest.
    fn digest(&self) -> Digest;
    /// A copy of the state that writes nothing (verify compares branches).
    fn fork(&self) -> Box<dyn Replay>;
    /// Make everything written durable.
    fn sync(&mut self) -> anyhow::Result<()>;
}

/// Why a lineage cannot continue as is (SQLite: docs/SQLITE.md, "Continuity
/// breaks").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub reason: String,
    /// The source restarted its log after everything it saw was shipped,
    /// but cannot tell whether commits were lost in between:
    /// [`Source::verify_continuation`] can decide.
    pub verifiable: bool,
}

impl Break {
    pub fn hard(reason: impl Into<String>) -> Break {
        Break {
            reason: reason.into(),
            verifiable: false,
        }
    }
}

/// The source's state differs from what was shipped: the lineage cannot
/// continue (a bug, or the database was changed behind offsite's back).
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// A commit the source observed and the pipeline has not shipped yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub txid: u64,
    pub time_us: i64,
    /// Payload bytes (for batching and the bound on what is shipped under a lock).
    pub bytes: u64,
}

/// What a built object is, for the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Built {
    pub first_txid: u64,
    pub last_txid: u64,
    pub last_time_us: i64,
    pub raw_bytes: u64,
    /// The chain link after the object.
    pub end_link: Link,
}

/// How a source proved that it stands where the replica's head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    /// For the log: how it was proven.
    pub how: String,
}

/// A closed compaction window: one merged commit, ready to be written as a
/// compacted segment.
pub trait Compacted: Send + Sync {
    fn level(&self) -> u8;
    fn first_txid(&self) -> u64;
    fn last_txid(&self) -> u64;
    fn last_time_us(&self) -> i64;
    fn raw_bytes(&self) -> u64;
    /// Write the whole object (envelope, encrypted body) into `sink`.
    fn write(&self, lineage: &str, seal: &Seal, sink: &mut dyn Write) -> anyhow::Result<()>;
}

/// What a source hands the pipeline, and the maintenance it needs. Every
/// object is written into a `sink` the pipeline provides (a spool); nothing
/// here knows storage. Calls may block (the pipeline runs them off the
/// async workers).
pub trait Source: Send {
    /// Look for new commits; each gets the next txid from `next_txid` and
    /// the time `now()` gives after the log was read. `Err(Break)`: the
    /// lineage cannot continue (pending commits are dropped).
    fn poll(
        &mut self,
        next_txid: &mut u64,
        now: &mut dyn FnMut() -> i64,
    ) -> anyhow::Result<Result<(), Break>>;
    /// Commits observed and not shipped, oldest first.
    fn pending(&self) -> Vec<Pending>;
    fn pending_len(&self) -> usize;
    /// Cheap and non-blocking (a few system calls, no reads): `true` when
    /// nothing changed since a poll that found nothing, so this look may skip
    /// `poll` and `yield_to_checkpointer`. `false` is always safe.
    fn quiet(&self) -> bool {
        false
    }
    /// After a verifiable [`Break`]: does the database provably still
    /// continue what was shipped?
    fn verify_continuation(&mut self) -> anyhow::Result<bool>;
    /// Prove that the database stands at the replica head's `resume`
    /// position; on success the source continues from there.
    fn resume(&mut self, resume: &serde_json::Value) -> anyhow::Result<Result<Resumed, Break>>;
    /// The first snapshot of a new lineage, at txid `txid`, stamped with
    /// `now()` once the state is fixed.
    fn snapshot(
        &mut self,
        lineage: &str,
        txid: u64,
        now: &mut dyn FnMut() -> i64,
        seal: &Seal,
        sink: &mut dyn Write,
    ) -> anyhow::Result<Built>;
    /// A snapshot inside the lineage of the shipped state (txid `txid`,
    /// chain link `link`); `None` when there is nothing to read it from. A
    /// state that differs from the shipped one is an error.
    fn snapshot_shipped(
        &mut self,
        lineage: &str,
        at: (u64, Link),
        now: &mut dyn FnMut() -> i64,
        seal: &Seal,
        sink: &mut dyn Write,
    ) -> anyhow::Result<Option<Built>>;
    /// How many pending commits go into the next segment (at most
    /// `max_bytes` of payload unless one commit is larger; never across a
    /// level-1 compaction window).
    fn batch_len(&self, max_bytes: u64) -> usize;
    /// Write a segment of the first `n` pending commits continuing `link`.
    /// The source's state moves provisionally until [`Source::settle`].
    fn build_segment(
        &mut self,
        n: usize,
        link: Link,
        lineage: &str,
        seal: &Seal,
        sink: &mut dyn Write,
    ) -> anyhow::Result<Built>;
    /// The last built segment's upload landed (`true`: its commits are
    /// shipped and folded into the compaction windows, whose closed windows
    /// are returned) or not (`false`: the state goes back).
    fn settle(&mut self, n: usize, landed: bool) -> Vec<Box<dyn Compacted>>;
    /// Close the compaction windows that end at or before `t`.
    fn close_due(&mut self, t: i64) -> Vec<Box<dyn Compacted>>;
    /// Cheap and non-blocking: might `close_due(t)` close anything?
    /// `true` is always safe.
    fn any_due(&self, t: i64) -> bool {
        let _ = t;
        true
    }
    /// Committed log frames (SQLite) in the current log: the checkpoint threshold.
    fn log_frames(&self) -> u32;
    /// A checkpoint that never waits for the application. `Ok(false)`: not now.
    fn checkpoint(&mut self) -> anyhow::Result<bool>;
    /// Take the application's write lock (waiting at most `busy`) for a
    /// checkpoint; the pipeline ships what is pending, then calls
    /// `checkpoint_run` and always `checkpoint_unlock`.
    fn checkpoint_lock(&mut self, busy: Duration) -> anyhow::Result<bool>;
    fn checkpoint_run(&mut self) -> anyhow::Result<bool>;
    fn checkpoint_unlock(&mut self) -> anyhow::Result<()>;
    /// Step aside while the application wants to checkpoint (everything is
    /// shipped). `Ok(true)`: it did.
    fn yield_to_checkpointer(&mut self) -> anyhow::Result<bool>;
}
