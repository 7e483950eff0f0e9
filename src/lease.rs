//! Fencing: one shipper per replica. Two shippers writing one replica (two
//! pods after a bad deploy) would interleave lineages; instead the first
//! holds a lease object (`lease.json` at the replica root) and any other
//! refuses to write while it is fresh.
//!
//! The lease is taken with a conditional write (`If-None-Match: *`, or
//! `If-Match` on the stale lease it replaces) and read back; it is renewed
//! before uploads once it is older than `renew_every`, and released at a clean
//! shutdown. An idle shipper does not renew (no requests while idle); after
//! `ttl` without renewal another shipper may take it over, and the idle one
//! finds that out before its next upload and stops writing. On servers that
//! ignore the condition headers (Garage) the read-back and the renewals
//! still detect a second writer; two shippers starting in the same instant
//! may both write once before one of them stops. See docs/FORMAT.md.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::{Storage, StorageError};

pub const LEASE_KEY: &str = "lease.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct LeaseDoc {
    shipper: String,
    host: String,
    pid: u32,
    /// The process's start time (clock ticks since boot, /proc/PID/stat),
    /// so a reused pid is not mistaken for the holder.
    #[serde(default)]
    started: u64,
    db: String,
    /// Unix µs of the last renewal.
    renewed_us: i64,
}

/// Another shipper holds the replica's lease.
#[derive(Debug, thiserror::Error)]
#[error("another offsite is shipping to this replica ({holder}, renewed {age_s:.0}s ago); refusing to write so the two never interleave. Stop the other one (its lease is released at shutdown), or wait {wait_s:.0}s for its lease to expire if it is gone")]
pub struct Held {
    pub holder: String,
    pub age_s: f64,
    pub wait_s: f64,
}

pub struct Lease {
    me: LeaseDoc,
    ttl: Duration,
    renew_every: Duration,
    /// When we last saw the lease as ours, and its version tag.
    confirmed: Option<(Instant, String)>,
}

fn describe(d: &LeaseDoc) -> String {
    format!(
        "shipper {} on host {} pid {}, database {}",
        d.shipper, d.host, d.pid, d.db
    )
}

/// The holder ran on this host (same host name) and is not running any
/// more: its pid is ours (a restarted container reuses pids), or no process
/// has it. Its lease needs no waiting for.
fn holder_is_dead(holder: &LeaseDoc, me: &LeaseDoc) -> bool {
    if holder.host != me.host || holder.host == "unknown" {
        return false;
    }
    if holder.pid == me.pid {
        return true;
    }
    match proc_start(holder.pid) {
        // A process with that pid exists: the holder only if it started then.
        Some(t) => holder.started != 0 && t != holder.started,
        None => {
            // SAFETY: kill with signal 0 only checks that the pid exists.
            let r = unsafe { libc::kill(holder.pid as libc::pid_t, 0) };
            r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        }
    }
}

/// Start time of process `pid` (field 22 of /proc/PID/stat), if readable.
fn proc_start(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after ')'.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

impl Lease {
    pub fn new(db: &str, ttl: Duration, renew_every: Duration) -> Lease {
        Lease {
            me: LeaseDoc {
                shipper: format!("{:016x}", rand::random::<u64>()),
                host: hostname(),
                pid: std::process::id(),
                started: proc_start(std::process::id()).unwrap_or(0),
                db: db.to_string(),
                renewed_us: 0,
            },
            ttl,
            renew_every,
            confirmed: None,
        }
    }

    pub fn held(&self) -> bool {
        self.confirmed.is_some()
    }

    /// Take the lease, or renew it when older than `renew_every`. Fails with
    /// [`Held`] when another live shipper holds it.
    pub async fn ensure(&mut self, store: &dyn Storage, now_us: i64) -> anyhow::Result<()> {
        if self
            .confirmed
            .as_ref()
            .is_some_and(|(t, _)| t.elapsed() < self.renew_every)
        {
            return Ok(());
        }
        let cur = store
            .get_versioned(LEASE_KEY)
            .await
            .context("cannot read the replica's lease")?;
        let expect = match &cur {
            None => {
                if self.confirmed.is_some() {
                    tracing::warn!(
                        "the replica's lease disappeared (deleted by hand?); taking it again"
                    );
                }
                None
            }
            Some((body, tag)) => {
                let doc: Option<LeaseDoc> = serde_json::from_slice(body).ok();
                match doc {
                    Some(d) if d.shipper == self.me.shipper => Some(tag.clone()),
                    Some(d) => {
                        // Saturating: `renewed_us` comes from the bucket.
                        let age = now_us.saturating_sub(d.renewed_us) as f64 / 1e6;
                        let lost = self.confirmed.take().is_some();
                        let dead = !lost && holder_is_dead(&d, &self.me);
                        if dead {
                            tracing::warn!(holder = %describe(&d), "the lease's holder ran on this host and is gone (killed?); taking the lease over");
                        }
                        if (age < self.ttl.as_secs_f64() && !dead) || lost {
                            if lost {
                                tracing::error!(holder = %describe(&d), "another offsite took this replica's lease; this one stops writing to it");
                            }
                            return Err(Held {
                                holder: describe(&d),
                                age_s: age,
                                wait_s: (self.ttl.as_secs_f64() - age).max(0.0),
                            }
                            .into());
                        }
                        tracing::warn!(holder = %describe(&d), age_s = age, "taking over a stale lease (its shipper has not renewed it within the lease time)");
                        Some(tag.clone())
                    }
                    None => {
                        tracing::warn!("the replica's lease object is unreadable; replacing it");
                        Some(tag.clone())
                    }
                }
            }
        };
        let mut doc = self.me.clone();
        doc.renewed_us = now_us;
        let body = Bytes::from(serde_json::to_vec(&doc)?);
        let renewal = self.confirmed.is_some() && expect.is_some();
        match store
            .put_conditional(LEASE_KEY, body, expect.as_deref())
            .await
        {
            Ok(()) if renewal => {
                // Our lease, rewritten at the version we just read: the
                // conditional write did the check (one GET + one PUT a minute).
                self.confirmed = Some((Instant::now(), String::new()));
                return Ok(());
            }
            Ok(()) => {}
            Err(StorageError::AlreadyExists { .. }) => {
                self.confirmed = None;
                // Someone wrote the lease between our read and our write.
                let holder = match store.get_versioned(LEASE_KEY).await {
                    Ok(Some((b, _))) => serde_json::from_slice::<LeaseDoc>(&b)
                        .map(|d| describe(&d))
                        .unwrap_or_else(|_| "unknown".into()),
                    _ => "unknown".into(),
                };
                return Err(Held {
                    holder,
                    age_s: 0.0,
                    wait_s: self.ttl.as_secs_f64(),
                }
                .into());
            }
            Err(e) => return Err(anyhow::Error::new(e).context("cannot write the replica's lease")),
        }
        // Read back: a server that ignores conditional headers shows here
        // whether our write or a concurrent one won.
        let back = store
            .get_versioned(LEASE_KEY)
            .await
            .context("cannot read the replica's lease back")?;
        match back {
            Some((b, tag)) => match serde_json::from_slice::<LeaseDoc>(&b) {
                Ok(d) if d.shipper == self.me.shipper => {
                    if self.confirmed.is_none() {
                        tracing::info!(shipper = %self.me.shipper, "holding the replica's lease");
                    }
                    self.confirmed = Some((Instant::now(), tag));
                    Ok(())
                }
                Ok(d) => {
                    self.confirmed = None;
                    Err(Held {
                        holder: describe(&d),
                        age_s: 0.0,
                        wait_s: self.ttl.as_secs_f64(),
                    }
                    .into())
                }
                Err(e) => Err(anyhow::anyhow!("the replica's lease reads back damaged: {e}")),
            },
            None => Err(anyhow::anyhow!(
                "the replica's lease vanished right after it was written; is another process deleting objects?"
            )),
        }
    }

    /// At a clean shutdown: if the lease is still ours, overwrite it as
    /// expired (renewed at time 0), so a successor can take it at once. An
    /// overwrite, not a delete: a shipper without delete permission can
    /// release too. Best effort.
    pub async fn release(&mut self, store: &dyn Storage) {
        if self.confirmed.take().is_none() {
            return;
        }
        if let Ok(Some((b, tag))) = store.get_versioned(LEASE_KEY).await {
            if serde_json::from_slice::<LeaseDoc>(&b).is_ok_and(|d| d.shipper == self.me.shipper) {
                let mut doc = self.me.clone();
                doc.renewed_us = 0;
                let body = match serde_json::to_vec(&doc) {
                    Ok(v) => Bytes::from(v),
                    Err(_) => return,
                };
                if let Err(e) = store.put_conditional(LEASE_KEY, body, Some(&tag)).await {
                    tracing::warn!(error = %e, "could not release the replica's lease; a successor waits for it to expire");
                }
            }
        }
    }
}

/// Whether `e` is (caused by) another shipper holding the lease.
pub fn is_held(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Held>().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::FileStorage;

    #[tokio::test]
    async fn one_holder_at_a_time_stale_leases_are_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStorage::new(tmp.path().to_path_buf()).unwrap();
        let ttl = Duration::from_secs(300);
        // All leases here share this process's host and pid; A pretends to be
        // another live process (pid 1 always exists).
        let mut a = Lease::new("/a.db", ttl, Duration::ZERO);
        a.me.pid = 1;
        a.me.started = proc_start(1).unwrap_or(0);
        let mut b = Lease::new("/b.db", ttl, Duration::ZERO);
        let t0 = 1_000_000_000_000;
        a.ensure(&store, t0).await.unwrap();
        a.ensure(&store, t0 + 1).await.unwrap();
        let e = b.ensure(&store, t0 + 10_000_000).await.unwrap_err();
        assert!(is_held(&e), "{e:#}");
        assert!(format!("{e:#}").contains("/a.db"), "{e:#}");
        // A's lease goes stale (no renewal for longer than the TTL): B takes over.
        b.ensure(&store, t0 + 301_000_000).await.unwrap();
        // A finds out before its next upload and stops.
        let e = a.ensure(&store, t0 + 302_000_000).await.unwrap_err();
        assert!(is_held(&e));
        assert!(!a.held());
        // A holder that ran on this host and is gone (kill -9) is taken over at once.
        // A reused pid (same pid, other start time) is not the holder either.
        let mut reused = Lease::new("/r.db", ttl, Duration::ZERO);
        reused.me.pid = 1;
        reused.me.started = 1;
        assert!(holder_is_dead(&reused.me, &b.me));
        let mut dead = Lease::new("/d.db", ttl, Duration::ZERO);
        dead.me.pid = 0x7fff_fff0; // no such process
        let mut e2 = Lease::new("/e.db", ttl, Duration::ZERO);
        let fresh = t0 + 400_000_000;
        b.release(&store).await;
        dead.ensure(&store, fresh).await.unwrap();
        e2.ensure(&store, fresh + 1_000_000).await.unwrap();
        // A holder on another host is waited for.
        let mut other = Lease::new("/o.db", ttl, Duration::ZERO);
        other.me.host = "elsewhere".into();
        e2.release(&store).await;
        other.ensure(&store, fresh + 2_000_000).await.unwrap();
        let mut f = Lease::new("/f.db", ttl, Duration::ZERO);
        assert!(is_held(
            &f.ensure(&store, fresh + 3_000_000).await.unwrap_err()
        ));
        other.release(&store).await;
        // A clean shutdown releases the lease for a successor.
        let mut c = Lease::new("/c.db", ttl, Duration::ZERO);
        c.ensure(&store, fresh + 4_000_000).await.unwrap();
    }
}
