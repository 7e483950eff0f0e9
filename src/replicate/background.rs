//! Work done besides shipping segments: restore drills, pruning,
//! compaction (folding shipped commits into windows, uploading closed
//! windows) and periodic snapshots inside the lineage.

use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;

use super::build::Staged;
use super::retry::{put_object, requests_json};
use super::spool::Spool;
use super::state::{Phase, Shipping};
use super::{blocking, Replicator, SNAPSHOT_PERMITS};
use crate::engine::Compacted;
use crate::layout;

/// What the newest restore drill found.
#[derive(Debug, Clone)]
pub struct DrillRecord {
    pub ran_at_us: i64,
    pub ok: bool,
    pub newest_verified_txid: Option<u64>,
    pub newest_verified_time_us: Option<i64>,
    pub error: Option<String>,
}

impl Replicator {
    /// The newest restore drill's outcome, if one ran.
    pub fn last_drill(&self) -> Option<DrillRecord> {
        self.drill.lock().unwrap().clone()
    }

    /// Start a restore drill in the background when one is due.
    pub(super) fn maybe_drill(&mut self, now: i64) {
        let Some(iv) = self.opts.verify_interval else {
            return;
        };
        if self.drill_task.as_ref().is_some_and(|t| !t.is_finished())
            || now - self.last_drill_us < iv.as_micros() as i64
            || self.phase.shipping().is_none()
        {
            return;
        }
        self.last_drill_us = now;
        let store = self.store.clone();
        let keys = crate::replay::Keys {
            ids: self.opts.drill_identities.clone(),
            trust: self.trust.clone(),
        };
        let out = self.drill.clone();
        let db = self.db();
        let replica = self.opts.replica_name.clone();
        let status = self.opts.status.clone();
        self.drill_task = Some(tokio::spawn(tracing::Instrument::in_current_span(
            async move {
                let r = crate::verify::drill(
                    store.as_ref(),
                    keys.ids.as_ref(),
                    &keys.trust,
                    1,
                    rand::random(),
                )
                .await;
                let rec = match r {
                    Ok(d) => DrillRecord {
                        ran_at_us: now,
                        ok: d.ok,
                        newest_verified_txid: d.newest_verified_txid,
                        newest_verified_time_us: d.newest_verified_time_us,
                        error: d.samples.iter().find_map(|s| s.error.clone()),
                    },
                    Err(e) => DrillRecord {
                        ran_at_us: now,
                        ok: false,
                        newest_verified_txid: None,
                        newest_verified_time_us: None,
                        error: Some(format!("{e:#}")),
                    },
                };
                status.drill_ran_us.store(now, Relaxed);
                if let (true, Some(t), Some(x)) = (
                    rec.ok,
                    rec.newest_verified_time_us,
                    rec.newest_verified_txid,
                ) {
                    status.verified_time_us.store(t, Relaxed);
                    status.verified_txid.store(x, Relaxed);
                }
                if !rec.ok {
                    status.add(&status.drill_failures, 1);
                }
                if rec.ok {
                    tracing::info!(%db, %replica, txid = rec.newest_verified_txid, "restore drill passed: the newest point restores and passes integrity_check");
                } else {
                    tracing::error!(%db, %replica, error = rec.error.as_deref().unwrap_or(""), "restore drill FAILED: the replica does not restore");
                }
                *out.lock().unwrap() = Some(rec);
            },
        )));
    }

    /// A new snapshot inside the current lineage, of the replica's newest
    /// state (everything shipped), so restores start from a recent full copy
    /// and older history can be pruned. Its state checksum must equal the
    /// replicated state's: a mismatch is reported and starts a new lineage.
    pub(super) async fn snapshot_in_lineage(&mut self) -> anyhow::Result<()> {
        self.lease_ok().await?;
        let _permit = SNAPSHOT_PERMITS.acquire().await?;
        let txid = self.stored_txid;
        let floor = self.last_time_us;
        let seal = self.seal.clone();
        let spool_dir = self.opts.spool_dir.clone();
        let clock = self.opts.clock.clone();
        let Some(sh) = self.phase.shipping_mut() else {
            return Ok(());
        };
        let lineage = sh.lineage.clone();
        let link = sh.link;
        let src = &mut sh.source;
        let built = blocking(|| -> anyhow::Result<_> {
            let mut spool = Spool::new(spool_dir);
            let mut now = || clock.now_us().max(floor);
            match src.snapshot_shipped(&lineage, (txid, link), &mut now, &seal, &mut spool) {
                Ok(Some(b)) => Ok(Some(Staged::snapshot(&lineage, spool, b)?)),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            }
        });
        let staged = match built {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(()),
            Err(e) if e.downcast_ref::<crate::engine::Diverged>().is_some() => {
                let e = format!("{e:#}");
                self.enter(Phase::Restarting, &e);
                anyhow::bail!("{e}");
            }
            Err(e) => return Err(e),
        };
        let time_us = staged.built.last_time_us;
        let stored = staged.body.len().await?;
        put_object(&self.store, &staged.key, staged.body.clone(), self.lock())
            .await
            .with_context(|| format!("cannot upload {}", staged.key))?;
        tracing::info!(db = %self.db(), replica = %self.opts.replica_name, key = %staged.key, txid, raw_bytes = staged.raw_bytes, stored_bytes = stored, "periodic snapshot uploaded");
        self.count_snapshot(staged.raw_bytes, stored);
        self.last_snapshot = (txid, time_us);
        self.last_time_us = self.last_time_us.max(time_us);
        self.uploaded_since_prune = true;
        Ok(())
    }

    /// Work done when everything is shipped: close compaction windows that
    /// are over, upload compacted segments, take a periodic snapshot, prune.
    /// Failures here never stop shipping; they are logged and retried.
    pub(super) async fn after_ship(&mut self, t0: i64) {
        if let Some(Shipping {
            source, lineage, ..
        }) = self.phase.shipping_mut()
        {
            // Checked first: an idle look must not leave its worker thread.
            if source.any_due(t0) {
                let v = blocking(|| source.close_due(t0));
                self.closed
                    .extend(v.into_iter().map(|w| (lineage.clone(), w)));
            }
        }
        while let Some((lineage, w)) = self.closed.pop_front() {
            match self.upload_closed(&lineage, w.as_ref()).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(db = %self.db(), replica = %self.opts.replica_name, error = format!("{e:#}"), "compacted segment upload failed; will retry");
                    self.closed.push_front((lineage, w));
                    // Bounded: the oldest windows are given up first.
                    while self.closed.len() > 32 {
                        self.closed.pop_front();
                    }
                    break;
                }
            }
        }
        let now = self.now_us();
        if let Some(iv) = self.opts.snapshot_interval {
            let due = now - self.last_snapshot.1 >= iv.as_micros() as i64;
            if due && self.stored_txid > self.last_snapshot.0 && self.phase.shipping().is_some() {
                if let Err(e) = self.snapshot_in_lineage().await {
                    tracing::error!(db = %self.db(), replica = %self.opts.replica_name, error = format!("{e:#}"), "periodic snapshot failed; will retry");
                    // Retry after a tenth of the interval, not on every step.
                    self.last_snapshot.1 = now - (iv.as_micros() as i64) * 9 / 10;
                }
            }
        }
        self.maybe_prune(now);
    }

    /// At shutdown: write the open compaction windows as they are (a
    /// compacted segment may cover part of a window; restore plans only
    /// need objects to tile the txid line), so they are not lost.
    pub(super) async fn flush_compaction(&mut self) {
        if let Some(Shipping {
            source, lineage, ..
        }) = self.phase.shipping_mut()
        {
            let v = blocking(|| source.close_due(i64::MAX));
            self.closed
                .extend(v.into_iter().map(|w| (lineage.clone(), w)));
        }
        while let Some((lineage, w)) = self.closed.pop_front() {
            if let Err(e) = self.upload_closed(&lineage, w.as_ref()).await {
                tracing::warn!(db = %self.db(), replica = %self.opts.replica_name, error = format!("{e:#}"), "compacted segment not uploaded at shutdown; restores of that range read level-0 segments");
                break;
            }
        }
    }

    async fn upload_closed(&mut self, lineage: &str, w: &dyn Compacted) -> anyhow::Result<()> {
        self.lease_ok().await?;
        let seal = self.seal.clone();
        let spool = Spool::new(self.opts.spool_dir.clone());
        let key = layout::segment_key(
            lineage,
            w.level(),
            w.first_txid(),
            w.last_txid(),
            w.last_time_us(),
        );
        let (body, _tmp) = blocking(|| {
            let mut spool = spool;
            w.write(lineage, &seal, &mut spool)?;
            spool.into_body()
        })?;
        put_object(&self.store, &key, body, self.lock())
            .await
            .with_context(|| format!("cannot upload {key}"))?;
        tracing::debug!(db = %self.db(), %key, level = w.level(), raw_bytes = w.raw_bytes(), "compacted segment uploaded");
        self.uploaded_since_prune = true;
        Ok(())
    }

    /// Wait for a background prune or drill to finish (tests and shutdown).
    pub async fn wait_maintenance(&mut self) {
        if let Some(t) = self.prune_task.take() {
            let _ = t.await;
        }
        if let Some(t) = self.drill_task.take() {
            let _ = t.await;
        }
    }

    /// Prune in the background, at most once per `prune_interval`, and only
    /// after something was uploaded (an idle replica costs no request).
    pub(super) fn maybe_prune(&mut self, now: i64) {
        let Some(policy) = self.opts.retention.clone() else {
            return;
        };
        if self.prune_task.as_ref().is_some_and(|t| !t.is_finished()) || !self.lease.held() {
            return;
        }
        if !self.uploaded_since_prune
            || now - self.last_prune_us < self.opts.prune_interval.as_micros() as i64
        {
            return;
        }
        self.uploaded_since_prune = false;
        self.last_prune_us = now;
        let store = self.store.clone();
        let db = self.db();
        let replica = self.opts.replica_name.clone();
        let trust = self.trust.clone();
        let proven = self.proven.clone();
        let status = self.opts.status.clone();
        self.prune_task = Some(tokio::spawn(tracing::Instrument::in_current_span(
            async move {
                // Snapshots proven by an earlier prune are not read again.
                let mut cache = std::mem::take(&mut *proven.lock().unwrap());
                let r = crate::retention::prune(
                    store.as_ref(),
                    &policy,
                    now,
                    false,
                    &trust,
                    &mut cache,
                )
                .await;
                *proven.lock().unwrap() = cache;
                if let Ok(r) = &r {
                    let refused = r
                        .warnings
                        .iter()
                        .filter(|w| w.starts_with("refused"))
                        .count();
                    if refused > 0 {
                        status.add(&status.refused_objects, refused as u64);
                        tracing::error!(%db, %replica, refused, warnings = ?r.warnings, "objects in the replica do not prove out; they are left untouched and not planned with");
                    }
                }
                match r {
                    Ok(r) => {
                        tracing::info!(%db, %replica, deleted = r.deleted.len(), kept = r.kept, locked = r.locked.len(), bytes_freed = r.bytes_deleted, requests = %requests_json(store.as_ref()), "pruned the replica")
                    }
                    Err(e) => {
                        tracing::error!(%db, %replica, error = format!("{e:#}"), "pruning failed; will retry after the next upload")
                    }
                }
            },
        )));
    }
}
