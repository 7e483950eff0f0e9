//! SQLite: everything offsite knows about it. The source follows a
//! database's WAL under a read lock and takes snapshots and checkpoints
//! (`source`, `wal`); commits and snapshots travel as `sqlite-pages` payloads
//! (`pages`); the page-state checksum is the engine's digest (`checksum`);
//! compaction merges pages before encryption (`compact`); a restore applies
//! pages to a file and checks it with `PRAGMA integrity_check` (`replay`).
//! The invariants are explained in docs/SQLITE.md.

pub mod checksum;
pub mod compact;
pub mod pages;
pub mod replay;
pub mod ship;
pub mod shipper;
pub mod source;
pub mod wal;

pub use replay::{integrity_check, PageReplay};
pub use shipper::Shipper;
pub use source::{configure_process, SnapshotView, SqliteSource, WalPos};
