//! offsite's integration tests: one test binary, one module per area.
//!
//! Run with `cargo test --features testing` (the S3 tests need the servers of
//! `scripts/test-servers.sh`; see `support`). Everything shared between the
//! modules (running the binaries, S3 targets, waiting on conditions, the
//! deterministic writer, …) lives in `support`, once.
//!
//! Tests run in parallel threads of this one process: a test never changes
//! the process environment (children get theirs with `Command::env`), and a
//! test that measures takes `support::gate::alone()`.

mod support;

mod adversary;
mod deploy_files;
mod e2e_sqlite;
mod faults;
mod fencing;
mod fleet;
mod format1;
mod local_files;
mod mutation_fuzz;
mod object_lock;
mod pg_archive;
mod pg_maintenance;
mod pg_pitr;
mod pg_sidecar;
mod pg_support;
mod pg_wire;
mod request_counts;
mod retention_compaction;
mod sidecar;
mod sqlite_locks;
mod sqlite_quiet;
mod storage_conformance;
mod tamper_and_errors;
mod verify;
mod wal_bound;
mod wrong_inputs;
