//! The engine boundary. Everything that knows a database engine lives under
//! `engine/<name>/`; the rest of offsite (storage, codec, object naming and
//! the catalog, lineage and txid bookkeeping, lease, retention, retries,
//! spool, metrics, daemon) knows none.
//!
//! What crosses the boundary (docs/ARCHITECTURE.md):
//! - shipping: a source hands the pipeline ordered, timestamped commits
//!   whose payload only it can read, consistent snapshots, a resume position
//!   (an opaque JSON value stored in each object's envelope) and a 16-byte
//!   digest of its state after each commit, from which the pipeline builds
//!   the engine-neutral chain link;
//! - restoring: a [`Replay`] applies a snapshot's data and then commits'
//!   payloads to an output, and returns its own digest after each, which the
//!   pipeline compares with the stored one.

pub mod sqlite;

use anyhow::bail;

use crate::segment::Digest;

/// The engines offsite knows. Recorded in every object and at the replica
/// root, so commands that get only a URL know what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Engine> {
        match s {
            "sqlite" => Ok(Engine::Sqlite),
            other => bail!(
                "unknown database engine {other:?}: the replica was written by another engine or a newer offsite (upgrade offsite, or check the URL)"
            ),
        }
    }

    /// A replay of this engine's objects, writing to `output` if given
    /// (restore) or only checking (verify).
    pub fn replay(self, output: Option<std::fs::File>) -> Box<dyn Replay> {
        match self {
            Engine::Sqlite => Box::new(sqlite::PageReplay::new(output)),
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
