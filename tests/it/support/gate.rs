//! Tests that measure (how fast offsite keeps up, how large the WAL gets)
//! run alone: they take [`alone`], the tests that would disturb them take
//! [`shared`]. All tests are threads of one process, so this is a plain
//! `RwLock`.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static GATE: RwLock<()> = RwLock::new(());

/// Run alongside other `shared` tests, but never beside an `alone` one.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(|e| e.into_inner())
}

/// Run with no `shared` test at the same time.
pub fn alone() -> RwLockWriteGuard<'static, ()> {
    GATE.write().unwrap_or_else(|e| e.into_inner())
}
