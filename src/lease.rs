//! Fencing: one shipper per replica. Two shippers writing one replica (two
//! pods after a bad deploy) would interleave lineages; instead the first
//! holds a lease object (`lease.json` at the replica root) and any other
//! refuses to write while it is fresh.
//!
//! The lease is taken with a conditional write (`If-None-Match: *`, or
//! `If-Match` on the stale lease it replaces) and read back; it is renewed
//! before uploads once it is older than `renew_every`, and released at a clean
//! shutdown. An idle shipper does not renew (no requests while idle); once
//! its lease has not changed for `ttl`, timed on the waiting shipper's own
//! monotonic clock (never by comparing two hosts' wall clocks), another
//! shipper may take it over, and the idle one finds that out before its next
//! upload and stops writing. A holder that ran in this very container (same
//! host name, boot id and pid namespace) and is gone is taken over at once.
//! On servers that ignore the condition headers (Garage) the read-back and
//! the renewals still detect a second writer; two shippers starting in the
//! same instant may both write once before one of them stops. The lease
//! object comes from the bucket and is not trusted: it is size-capped before
//! parsing, and anything unreadable waits for expiry like a live holder.
//! See docs/FORMAT.md.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::{Storage, StorageError};

pub const LEASE_KEY: &str = "lease.json";

/// A lease object is a few hundred bytes. It comes from the bucket, so it
/// is not trusted: a bigger one is not parsed (it counts as unreadable).
const MAX_LEASE_BYTES: usize = 16 << 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct LeaseDoc {
    shipper: String,
    host: String,
    pid: u32,
    /// The process's start time (clock ticks since boot, /proc/PID/stat),
    /// so a reused pid is not mistaken for the holder.
    #[serde(default)]
    started: u64,
    /// The kernel's boot id (/proc/sys/kernel/random/boot_id): pids and
    /// start times only mean something within one boot. Empty: unknown
    /// (a lease written before this field existed).
    #[serde(default)]
    boot_id: String,
    /// The holder's pid namespace (the inode of /proc/self/ns/pid): pids
    /// only mean something within one namespace, and two containers on one
    /// host can both be pid 1. 0: unknown.
    #[serde(default)]
    pid_ns: u64,
    db: String,
    /// Unix µs of the last renewal; 0 once released at a clean shutdown.
    /// Only "released" is read from it: whether a lease expired is judged
    /// on the reader's own monotonic clock, never by comparing two hosts'
    /// wall clocks.
    renewed_us: i64,
}

/// Another shipper holds the replica's lease.
#[derive(Debug, thiserror::Error)]
#[error("another offsite is shipping to this replica ({holder}; its lease last changed {age_s:.0}s ago as seen from here); refusing to write so the two never interleave. Stop the other one (its lease is released at shutdown), or wait {wait_s:.0}s for its lease to expire if it is gone")]
pub struct Held {
    pub holder: String,
    pub age_s: f64,
    pub wait_s: f64,
}

/// Shipper ids of the leases of replicators alive in this process: a lease
/// held by this very process whose replicator is gone (dropped, restarted
/// by the daemon) is dead; one whose replicator lives (another replica
/// entry writing the same prefix) is not.
static LIVE: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

pub struct Lease {
    me: LeaseDoc,
    ttl: Duration,
    renew_every: Duration,
    /// When we last saw the lease as ours, and its version tag.
    confirmed: Option<(Instant, String)>,
    /// The lease object as last read (body and version tag), and when (on
    /// this process's monotonic clock) it was first seen with that content.
    /// A lease that has not changed for `ttl` is expired.
    observed: Option<(Bytes, String, Instant)>,
}

/// A lease document for logs: fields from the bucket, so shortened and
/// with control characters escaped (no forged log lines).
fn describe(d: &LeaseDoc) -> String {
    format!(
        "shipper {} on host {} pid {}, database {}",
        clean(&d.shipper),
        clean(&d.host),
        d.pid,
        clean(&d.db)
    )
}

fn clean(s: &str) -> String {
    const MAX: usize = 200;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// The lease's bytes as a document, if they are one (bounded, never panics).
fn parse(body: &[u8]) -> Option<LeaseDoc> {
    if body.len() > MAX_LEASE_BYTES {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// The holder ran in this very pid namespace of this boot of this host,
/// and is not running any more: no process has its pid, or the process with
/// its pid started at another time (a reused pid). Its lease needs no
/// waiting for.
///
/// Anything less certain is not dead: a holder in another pid namespace
/// (another container with the same host name, maybe also pid 1), another
/// boot, or a lease without these fields (an older offsite) is waited for
/// until its lease expires.
fn holder_is_dead(holder: &LeaseDoc, me: &LeaseDoc) -> bool {
    let same_place = !me.host.is_empty()
        && me.host != "unknown"
        && holder.host == me.host
        && !me.boot_id.is_empty()
        && holder.boot_id == me.boot_id
        && me.pid_ns != 0
        && holder.pid_ns == me.pid_ns;
    if !same_place {
        return false;
    }
    // Only a real pid: 0 and "negative" pids name process groups for kill().
    let Ok(pid) = libc::pid_t::try_from(holder.pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    if holder.pid == me.pid && holder.started != 0 && holder.started == me.started {
        // This very process: dead unless one of its replicators holds it.
        return !LIVE.lock().unwrap().contains(&holder.shipper);
    }
    match proc_start(holder.pid) {
        // A process with that pid exists: the holder only if it started
        // then (an unknown start time proves nothing).
        Some(t) => holder.started != 0 && t != holder.started,
        None => {
            // SAFETY: kill with signal 0 only checks that the pid exists.
            let r = unsafe { libc::kill(pid, 0) };
            r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        }
    }
}

/// Start time of process `pid` (field 22 of /proc/PID/stat), if readable.
fn proc_start(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields resume after ')'.
    let rest = s.get(s.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// This boot's id, or "" if the kernel does not say.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// This process's pid namespace (`pid:[4026531836]` → 4026531836), or 0.
fn pid_ns() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| parse_ns_link(&l.to_string_lossy()))
        .unwrap_or(0)
}

fn parse_ns_link(l: &str) -> Option<u64> {
    l.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

impl Drop for Lease {
    fn drop(&mut self) {
        LIVE.lock().unwrap().remove(&self.me.shipper);
    }
}

impl Lease {
    pub fn new(db: &str, ttl: Duration, renew_every: Duration) -> Lease {
        let shipper = format!("{:016x}", rand::random::<u64>());
        LIVE.lock().unwrap().insert(shipper.clone());
        Lease {
            me: LeaseDoc {
                shipper,
                host: hostname(),
                pid: std::process::id(),
                started: proc_start(std::process::id()).unwrap_or(0),
                boot_id: boot_id(),
                pid_ns: pid_ns(),
                db: db.to_string(),
                renewed_us: 0,
            },
            ttl,
            renew_every,
            confirmed: None,
            observed: None,
        }
    }

    pub fn held(&self) -> bool {
        self.confirmed.is_some()
    }

    /// Record the lease as read at `now`; returns how long it has been
    /// unchanged as seen from here (zero when it just changed or is seen
    /// for the first time).
    fn observe(&mut self, body: &Bytes, tag: &str, now: Instant) -> Duration {
        match &self.observed {
            Some((b, t, since)) if b == body && t == tag => now.saturating_duration_since(*since),
            _ => {
                self.observed = Some((body.clone(), tag.to_string(), now));
                Duration::ZERO
            }
        }
    }

    /// Take the lease, or renew it when older than `renew_every`. Fails with
    /// [`Held`] when another live shipper holds it. `now_us` is only written
    /// into the lease (for people reading it); expiry is timed on this
    /// process's monotonic clock.
    pub async fn ensure(&mut self, store: &dyn Storage, now_us: i64) -> anyhow::Result<()> {
        self.ensure_at(store, now_us, Instant::now()).await
    }

    async fn ensure_at(
        &mut self,
        store: &dyn Storage,
        now_us: i64,
        now: Instant,
    ) -> anyhow::Result<()> {
        if self
            .confirmed
            .as_ref()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) < self.renew_every)
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
                self.observed = None;
                None
            }
            Some((body, tag)) => {
                let unchanged = self.observe(body, tag, now);
                let doc = parse(body);
                if doc.as_ref().is_some_and(|d| d.shipper == self.me.shipper) {
                    Some(tag.clone())
                } else {
                    let holder = doc
                        .as_ref()
                        .map(describe)
                        .unwrap_or_else(|| "an unreadable lease object".into());
                    let lost = self.confirmed.take().is_some();
                    let released = doc.as_ref().is_some_and(|d| d.renewed_us == 0);
                    let dead = doc.as_ref().is_some_and(|d| holder_is_dead(d, &self.me));
                    let expired = unchanged >= self.ttl;
                    if lost {
                        tracing::error!(%holder, "another offsite took this replica's lease; this one stops writing to it");
                    }
                    if lost || !(released || dead || expired) {
                        return Err(Held {
                            holder,
                            age_s: unchanged.as_secs_f64(),
                            wait_s: self.ttl.saturating_sub(unchanged).as_secs_f64(),
                        }
                        .into());
                    }
                    if released {
                        tracing::info!(%holder, "taking over a lease its shipper released");
                    } else if dead {
                        tracing::warn!(%holder, "the lease's holder ran in this container (same host, boot and pid namespace) and is gone (killed?); taking the lease over");
                    } else {
                        tracing::warn!(%holder, unchanged_s = unchanged.as_secs_f64(), "taking over an expired lease (it has not changed for longer than the lease time)");
                    }
                    Some(tag.clone())
                }
            }
        };
        let mut doc = self.me.clone();
        doc.renewed_us = now_us.max(1);
        let body = Bytes::from(serde_json::to_vec(&doc)?);
        let renewal = self.confirmed.is_some() && expect.is_some();
        match store
            .put_conditional(LEASE_KEY, body, expect.as_deref())
            .await
        {
            Ok(()) if renewal => {
                // Our lease, rewritten at the version we just read: the
                // conditional write did the check (one GET + one PUT a minute).
                self.confirmed = Some((now, String::new()));
                return Ok(());
            }
            Ok(()) => {}
            Err(StorageError::AlreadyExists { .. }) => {
                self.confirmed = None;
                // Someone wrote the lease between our read and our write.
                let holder = match store.get_versioned(LEASE_KEY).await {
                    Ok(Some((b, _))) => parse(&b)
                        .map(|d| describe(&d))
                        .unwrap_or_else(|| "unknown".into()),
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
            Some((b, tag)) => {
                self.observe(&b, &tag, now);
                match parse(&b) {
                    Some(d) if d.shipper == self.me.shipper => {
                        if self.confirmed.is_none() {
                            tracing::info!(shipper = %self.me.shipper, "holding the replica's lease");
                        }
                        self.confirmed = Some((now, tag));
                        Ok(())
                    }
                    Some(d) => {
                        self.confirmed = None;
                        Err(Held {
                            holder: describe(&d),
                            age_s: 0.0,
                            wait_s: self.ttl.as_secs_f64(),
                        }
                        .into())
                    }
                    None => Err(anyhow::anyhow!(
                        "the replica's lease reads back damaged ({} bytes)",
                        b.len()
                    )),
                }
            }
            None => Err(anyhow::anyhow!(
                "the replica's lease vanished right after it was written; is another process deleting objects?"
            )),
        }
    }

    /// At a clean shutdown: if the lease is still ours, overwrite it as
    /// released (renewed at time 0), so a successor can take it at once. An
    /// overwrite, not a delete: a shipper without delete permission can
    /// release too. Best effort.
    pub async fn release(&mut self, store: &dyn Storage) {
        if self.confirmed.take().is_none() {
            return;
        }
        if let Ok(Some((b, tag))) = store.get_versioned(LEASE_KEY).await {
            if parse(&b).is_some_and(|d| d.shipper == self.me.shipper) {
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
    use crate::storage::Body;

    const TTL: Duration = Duration::from_secs(300);

    fn new_store() -> (tempfile::TempDir, FileStorage) {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStorage::new(tmp.path().to_path_buf()).unwrap();
        (tmp, store)
    }

    /// Write `lease.json` as another shipper (or anybody) would.
    async fn write_lease(store: &FileStorage, body: Vec<u8>) {
        store
            .put(LEASE_KEY, Body::Bytes(body.into()))
            .await
            .unwrap();
    }

    fn doc_bytes(d: &LeaseDoc) -> Vec<u8> {
        serde_json::to_vec(d).unwrap()
    }

    /// A lease of another shipper in this container (host, boot, pid
    /// namespace as ours), renewed "now" by the wall clock.
    fn neighbour(pid: u32, started: u64) -> LeaseDoc {
        let mut d = Lease::new("/n.db", TTL, Duration::ZERO).me.clone();
        d.pid = pid;
        d.started = started;
        d.renewed_us = 1_000_000_000_000;
        d
    }

    #[tokio::test]
    async fn one_holder_at_a_time_stale_leases_are_taken_over() {
        let (_tmp, store) = new_store();
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        // All leases here share this process's host and pid; A pretends to be
        // another live process (pid 1 always exists).
        let mut a = Lease::new("/a.db", TTL, Duration::ZERO);
        a.me.pid = 1;
        a.me.started = proc_start(1).unwrap_or(0);
        let mut b = Lease::new("/b.db", TTL, Duration::ZERO);
        let t0 = 1_000_000_000_000;
        a.ensure_at(&store, t0, s(0)).await.unwrap();
        a.ensure_at(&store, t0 + 1, s(1)).await.unwrap();
        let e = b.ensure_at(&store, t0, s(10)).await.unwrap_err();
        assert!(is_held(&e), "{e:#}");
        assert!(format!("{e:#}").contains("/a.db"), "{e:#}");
        // A's lease goes stale (unchanged for longer than the TTL, as B's
        // clock measures it): B takes over.
        let e = b.ensure_at(&store, t0, s(309)).await.unwrap_err();
        assert!(is_held(&e), "{e:#}");
        b.ensure_at(&store, t0, s(311)).await.unwrap();
        // A finds out before its next upload and stops.
        let e = a.ensure_at(&store, t0, s(312)).await.unwrap_err();
        assert!(is_held(&e));
        assert!(!a.held());
        // A holder that ran in this container and is gone (kill -9) is
        // taken over at once.
        let mut dead = Lease::new("/d.db", TTL, Duration::ZERO);
        dead.me.pid = 0x7fff_fff0; // no such process
        let mut e2 = Lease::new("/e.db", TTL, Duration::ZERO);
        b.release(&store).await;
        dead.ensure_at(&store, t0, s(400)).await.unwrap();
        e2.ensure_at(&store, t0, s(401)).await.unwrap();
        // A holder on another host is waited for.
        let mut other = Lease::new("/o.db", TTL, Duration::ZERO);
        other.me.host = "elsewhere".into();
        e2.release(&store).await;
        other.ensure_at(&store, t0, s(402)).await.unwrap();
        let mut f = Lease::new("/f.db", TTL, Duration::ZERO);
        assert!(is_held(&f.ensure_at(&store, t0, s(403)).await.unwrap_err()));
        other.release(&store).await;
        // A clean shutdown releases the lease for a successor, at once.
        let mut c = Lease::new("/c.db", TTL, Duration::ZERO);
        c.ensure_at(&store, t0, s(404)).await.unwrap();
    }

    /// Two containers with the same host name (a StatefulSet pod and its
    /// replacement, or `hostname:` in compose), each offsite at pid 1: the
    /// other one's pid is either not visible here or is someone else. Not
    /// dead, so its lease is waited for until it expires.
    #[tokio::test]
    async fn a_holder_in_another_pid_namespace_is_waited_for() {
        let me = Lease::new("/me.db", TTL, Duration::ZERO).me.clone();
        assert_ne!(me.pid_ns, 0, "this test needs /proc/self/ns/pid");
        assert!(!me.boot_id.is_empty(), "this test needs a boot id");
        let mut twin = neighbour(1, 12345);
        twin.pid_ns = me.pid_ns + 1;
        assert!(!holder_is_dead(&twin, &me));
        // Its pid is not even visible here (ESRCH): still not dead.
        twin.pid = 0x7fff_fff0;
        assert!(!holder_is_dead(&twin, &me));
        // The same in this namespace would be dead (proof the test is sharp).
        let mut here = twin.clone();
        here.pid_ns = me.pid_ns;
        assert!(holder_is_dead(&here, &me));
        // Another boot, or unknown fields (an older offsite's lease): not dead.
        let changes: [fn(&mut LeaseDoc); 4] = [
            |d: &mut LeaseDoc| d.boot_id = "other-boot".into(),
            |d: &mut LeaseDoc| d.boot_id.clear(),
            |d: &mut LeaseDoc| d.pid_ns = 0,
            |d: &mut LeaseDoc| d.host = "elsewhere".into(),
        ];
        for f in changes {
            let mut d = here.clone();
            f(&mut d);
            assert!(!holder_is_dead(&d, &me), "{d:?}");
        }

        // End to end: the twin's lease (pid 1, same host) is not taken
        // until it has been unchanged for the TTL.
        let (_tmp, store) = new_store();
        let mut twin = neighbour(1, 12345);
        twin.pid_ns = me.pid_ns + 1;
        write_lease(&store, doc_bytes(&twin)).await;
        let t = Instant::now();
        let mut l = Lease::new("/me.db", TTL, Duration::ZERO);
        l.me.pid = 1; // we are pid 1 too
        for secs in [0, 100, 299] {
            let e = l
                .ensure_at(&store, 0, t + Duration::from_secs(secs))
                .await
                .unwrap_err();
            assert!(is_held(&e), "{e:#}");
        }
        l.ensure_at(&store, 2_000_000_000_000, t + Duration::from_secs(300))
            .await
            .unwrap();
        assert!(l.held());
    }

    #[test]
    fn an_equal_pid_is_the_holder_only_with_its_start_time() {
        let me = Lease::new("/me.db", TTL, Duration::ZERO).me.clone();
        assert_ne!(me.started, 0);
        // Our pid, another start time: a previous process (a restarted
        // container reuses pids) that is gone.
        assert!(holder_is_dead(&neighbour(me.pid, me.started + 1), &me));
        // Our pid and our start time: this very process. Alive while the
        // replicator holding it lives (another replica entry writing the
        // same prefix); dead once it is gone (a replicator the daemon, or
        // a test, dropped and started again).
        let other = Lease::new("/other.db", TTL, Duration::ZERO);
        let doc = other.me.clone();
        assert!(!holder_is_dead(&doc, &me));
        drop(other);
        assert!(holder_is_dead(&doc, &me));
        // Start time unknown: cannot tell, so not dead.
        assert!(!holder_is_dead(&neighbour(me.pid, 0), &me));
        // Another pid that exists with another start time: reused, dead.
        assert!(holder_is_dead(&neighbour(1, 1), &me));
        // Pids kill() would read as process groups: never "dead".
        for pid in [0, u32::MAX, 1 << 31] {
            assert!(!holder_is_dead(&neighbour(pid, 7), &me), "{pid}");
        }
    }

    /// Expiry is judged on this process's clock, from when the lease last
    /// changed, not from the wall-clock time written in it.
    #[tokio::test]
    async fn expiry_is_timed_locally_from_the_last_change() {
        let (_tmp, store) = new_store();
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        // A holder elsewhere whose clock is decades behind: by the wall
        // clock its lease expired long ago, but it keeps renewing.
        let mut holder = neighbour(4242, 1);
        holder.host = "elsewhere".into();
        holder.renewed_us = 1;
        let mut l = Lease::new("/me.db", TTL, Duration::ZERO);
        let now_us = 1_800_000_000_000_000;
        for i in 0..20u64 {
            holder.renewed_us += 60_000_000;
            write_lease(&store, doc_bytes(&holder)).await;
            let e = l.ensure_at(&store, now_us, s(i * 100)).await.unwrap_err();
            assert!(is_held(&e), "at {}s: {e:#}", i * 100);
        }
        // It stops renewing: waited for the TTL from the last change seen
        // (at 1900 s), then taken over.
        let e = l.ensure_at(&store, now_us, s(2199)).await.unwrap_err();
        assert!(is_held(&e));
        assert!(format!("{e:#}").contains("wait 1s"), "{e:#}");
        l.ensure_at(&store, now_us, s(2200)).await.unwrap();

        // The other way round: a lease whose wall-clock time is in the
        // future is still taken once it stopped changing for the TTL.
        let (_tmp, store) = new_store();
        holder.renewed_us = i64::MAX;
        write_lease(&store, doc_bytes(&holder)).await;
        let mut l = Lease::new("/me.db", TTL, Duration::ZERO);
        assert!(l.ensure_at(&store, now_us, s(0)).await.is_err());
        l.ensure_at(&store, now_us, s(300)).await.unwrap();
    }

    /// A lease written before boot id and pid namespace were recorded reads
    /// fine, and falls back to expiry even on this host with its pid gone.
    #[tokio::test]
    async fn an_old_lease_is_readable_and_waited_for() {
        let (_tmp, store) = new_store();
        let me = Lease::new("/me.db", TTL, Duration::ZERO).me.clone();
        let old = format!(
            r#"{{"shipper":"0123456789abcdef","host":"{}","pid":{},"started":5,"db":"/old.db","renewed_us":1700000000000000}}"#,
            me.host, 0x7fff_fff0u32
        );
        let d = parse(old.as_bytes()).expect("an old lease parses");
        assert_eq!((d.boot_id.as_str(), d.pid_ns), ("", 0));
        write_lease(&store, old.into_bytes()).await;
        let t = Instant::now();
        let mut l = Lease::new("/me.db", TTL, Duration::ZERO);
        let e = l.ensure_at(&store, 1, t).await.unwrap_err();
        assert!(format!("{e:#}").contains("/old.db"), "{e:#}");
        l.ensure_at(&store, 1, t + TTL).await.unwrap();
        // An older offsite's released lease (renewed at 0) is free at once.
        let (_tmp, store) = new_store();
        write_lease(
            &store,
            br#"{"shipper":"x","host":"h","pid":3,"db":"/x.db","renewed_us":0}"#.to_vec(),
        )
        .await;
        Lease::new("/me.db", TTL, Duration::ZERO)
            .ensure_at(&store, 1, t)
            .await
            .unwrap();
    }

    /// Whatever the bucket holds in `lease.json`: no panic, and nothing
    /// unreadable is taken over before it has been unchanged for the TTL.
    #[tokio::test]
    async fn hostile_lease_bytes_never_panic_and_wait_for_expiry() {
        let me = Lease::new("/me.db", TTL, Duration::ZERO).me.clone();
        let mut huge = doc_bytes(&neighbour(1, 1));
        huge.truncate(huge.len() - 1);
        huge.extend(b",\"pad\":\"");
        huge.extend(std::iter::repeat_n(b'x', MAX_LEASE_BYTES));
        huge.extend(b"\"}");
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"null".to_vec(),
            b"{}".to_vec(),
            b"[1,2,3]".to_vec(),
            vec![0xff; 100],
            b"{\"shipper\":1}".to_vec(),
            format!(
                r#"{{"shipper":"s","host":"{}","pid":4294967295,"started":18446744073709551615,"boot_id":"{}","pid_ns":{},"db":"\u0000\n\u001b[31m","renewed_us":-9223372036854775808}}"#,
                me.host, me.boot_id, me.pid_ns
            )
            .into_bytes(),
            format!(
                r#"{{"shipper":"s","host":"{}","pid":0,"boot_id":"{}","pid_ns":{},"db":"d","renewed_us":9223372036854775807}}"#,
                me.host, me.boot_id, me.pid_ns
            )
            .into_bytes(),
            huge,
        ];
        for body in cases {
            let (_tmp, store) = new_store();
            let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
            write_lease(&store, body).await;
            let t = Instant::now();
            let mut l = Lease::new("/me.db", TTL, Duration::ZERO);
            let e = l.ensure_at(&store, 1, t).await.unwrap_err();
            assert!(is_held(&e), "{shown}: {e:#}");
            assert!(!format!("{e:#}").contains('\n'), "{shown}: {e:#}");
            assert!(l.ensure_at(&store, 1, t + TTL / 2).await.is_err());
            l.ensure_at(&store, 1, t + TTL).await.unwrap();
            assert!(l.held(), "{shown}");
        }
    }

    #[test]
    fn the_pid_namespace_link_parses() {
        assert_eq!(parse_ns_link("pid:[4026531836]"), Some(4026531836));
        assert_eq!(parse_ns_link("net:[4026531836]"), None);
        assert_eq!(parse_ns_link("pid:[x]"), None);
        assert_eq!(parse_ns_link(""), None);
    }
}
