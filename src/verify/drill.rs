//! Restore drills for a running daemon.

use anyhow::Context;
use serde::Serialize;

use super::deep::{sample, Rng};
use super::DeepSample;
use crate::layout::{Catalog, Target};
use crate::replay::Keys;
use crate::storage::Storage;

/// Result of a restore drill (see [`drill`]).
#[derive(Debug, Clone, Serialize)]
pub struct DrillResult {
    /// The newest txid that was restored and passed `integrity_check`.
    pub newest_verified_txid: Option<u64>,
    pub newest_verified_time_us: Option<i64>,
    /// Every sampled point restored and passed.
    pub ok: bool,
    pub samples: Vec<DeepSample>,
}
/// A restore drill for a running daemon: restores the newest lineage's
/// newest point and `samples` random points of it (at least one), each with
/// `integrity_check`. Fails only when the replica cannot be listed.
pub async fn drill(
    store: &dyn Storage,
    identities: Option<&crate::keys::Identities>,
    trust: &crate::sign::Trust,
    samples: usize,
    rng_seed: u64,
) -> anyhow::Result<DrillResult> {
    // The drill trusts what a restore would: the replica's proven snapshots.
    let mut keys = Keys {
        ids: identities.cloned(),
        trust: trust.clone(),
    };
    crate::record::open(store, &mut keys.trust).await?;
    let listed = Catalog::load(store).await?;
    let (catalog, refused) =
        crate::trusted::verified(store, &listed, &keys.trust, &mut Default::default()).await;
    for r in refused {
        tracing::error!(refused = %r, "restore drill: an object of the replica does not prove out");
    }
    let mut out = DrillResult {
        newest_verified_txid: None,
        newest_verified_time_us: None,
        ok: false,
        samples: Vec::new(),
    };
    let Some(l) = catalog.newest_lineage() else {
        return Ok(out);
    };
    let Some(first) = l.snapshots.first() else {
        return Ok(out);
    };
    let hi = l.max_txid().unwrap_or(first.txid);
    let first = l.continuous_from().unwrap_or(first);
    let mut rng = Rng(rng_seed);
    let tmp = tempfile::Builder::new()
        .prefix(".offsite-drill-")
        .tempdir()
        .context("cannot create a temporary directory for the drill")?;
    let mut points = vec![("newest", hi)];
    for _ in 0..samples.max(1) {
        points.push(("random", rng.range(first.txid, hi)));
    }
    for (kind, t) in points {
        let s = sample(store, &keys, tmp.path(), kind, Target::Txid(t)).await;
        if s.ok && s.txid > out.newest_verified_txid {
            out.newest_verified_txid = s.txid;
            out.newest_verified_time_us = s.time_us;
        }
        out.samples.push(s);
    }
    out.ok = out.samples.iter().all(|s| s.ok);
    Ok(out)
}
