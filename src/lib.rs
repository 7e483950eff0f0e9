//! offsite: continuous, encrypted, point-in-time backups of SQLite databases
//! to S3-compatible object storage.
//!
//! Data flows one way: an engine's source (`engine::sqlite`) → `segment` →
//! `codec` → `storage`; `restore` is the mirror image, through `replay`.
//! See docs/ARCHITECTURE.md, docs/FORMAT.md and docs/SQLITE.md.

pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod http;
pub mod keys;
pub mod layout;
pub mod lease;
pub mod record;
pub mod replay;
pub mod replicate;
pub mod restore;
pub mod retention;
pub mod segment;
pub mod status;
pub mod storage;
pub mod verify;
pub mod workload;
