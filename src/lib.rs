//! offsite: continuous, encrypted, point-in-time backups of SQLite databases
//! to S3-compatible object storage.
//!
//! Data flows one way: `source` → `segment` → `codec` → `storage`;
//! `restore` is the mirror image. See docs/FORMAT.md and docs/SQLITE.md.

pub mod checksum;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod compact;
pub mod config;
pub mod daemon;
pub mod http;
pub mod keys;
pub mod layout;
pub mod replicate;
pub mod restore;
pub mod retention;
pub mod segment;
pub mod source;
pub mod status;
pub mod storage;
pub mod verify;
pub mod workload;
