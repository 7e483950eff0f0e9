//! offsite: continuous, encrypted, point-in-time backups of SQLite databases
//! to S3-compatible object storage.
//!
//! Data flows one way: an engine's source (`engine::sqlite`) → `segment` →
//! `codec` → `storage`; `restore` is the mirror image, through `replay`.
//! See docs/ARCHITECTURE.md, docs/FORMAT.md and docs/SQLITE.md.
//!
//! The public modules are the library's deliberate surface: what the
//! `offsite` binary, the integration tests and the benchmarks use (the
//! command line; storage backends; replicating, restoring, verifying and
//! pruning a replica; keys, clock, object names and restore targets; the
//! deterministic workload writer). Everything else is internal.

pub mod cli;
pub mod clock;
pub mod codec;
pub mod engine;
pub mod keys;
pub mod layout;
pub mod replicate;
pub mod restore;
pub mod retention;
pub mod sign;
pub mod storage;
pub mod verify;
pub mod workload;

pub(crate) mod config;
pub(crate) mod daemon;
pub(crate) mod head;
pub(crate) mod http;
pub(crate) mod lease;
pub(crate) mod readahead;
pub(crate) mod record;
pub(crate) mod replay;
pub(crate) mod segment;
pub(crate) mod status;
pub(crate) mod trusted;

/// Hostile-input property tests of every parser of bucket data (issue 11).
#[cfg(test)]
mod fuzz_tests;

/// `replicate --exec`: the application's exit status, for `main` to exit with.
pub use daemon::ExitStatus;
