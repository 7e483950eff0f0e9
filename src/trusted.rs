//! What in the bucket may steer a decision. A listing is only names, and
//! anyone with write access to the bucket can add names: before a name
//! decides what is the newest state, what a restore starts from or what
//! prune deletes, the object's signed envelope is proven (two ranged reads:
//! the envelope and the footer, docs/FORMAT.md "Signatures"). Objects that
//! do not prove out are left alone and reported, never acted upon.

use std::collections::BTreeSet;

use anyhow::Context;
use futures::StreamExt;

use crate::codec::{Authenticity, Envelope, FOOTER_LEN};
use crate::layout::{Catalog, SnapshotEntry};
use crate::sign::Trust;
use crate::storage::Storage;

/// The first read of an object: enough for any envelope offsite writes.
const ENVELOPE_READ: u64 = 4096;

/// Read and prove an object's envelope without downloading its payload.
pub async fn envelope(
    store: &dyn Storage,
    key: &str,
    size: u64,
    trust: &Trust,
) -> anyhow::Result<(Envelope, Authenticity)> {
    let (env, a) = prove_envelope(store, key, size, trust).await?;
    matches_name(&env, key)?;
    Ok((env, a))
}

/// Read and prove an object's envelope (signature, replica and database
/// binding) from two ranged reads; the caller checks that it names what
/// its key names (engines with their own key layout use this directly).
pub async fn prove_envelope(
    store: &dyn Storage,
    key: &str,
    size: u64,
    trust: &Trust,
) -> anyhow::Result<(Envelope, Authenticity)> {
    let head = store
        .get_range(key, 0, ENVELOPE_READ.min(size))
        .await
        .with_context(|| format!("cannot read the envelope of {key}"))?;
    let mut env = Envelope::read_from(&mut &head[..]);
    if env.is_err() && size > ENVELOPE_READ {
        // A larger envelope (up to the metadata cap): read it whole.
        let more = store
            .get_range(key, 0, size.min(16 + (16 << 10)))
            .await
            .with_context(|| format!("cannot read the envelope of {key}"))?;
        env = Envelope::read_from(&mut &more[..]);
    }
    let env = env.with_context(|| format!("object {key}"))?;
    if !env.has_footer() {
        let a = env
            .check(None, trust)
            .with_context(|| format!("object {key}"))?;
        return Ok((env, a));
    }
    let min = env.raw.len() as u64 + FOOTER_LEN as u64;
    anyhow::ensure!(
        size >= min,
        "object {key} is truncated (shorter than its envelope and footer)"
    );
    let tail = store
        .get_range(key, size - FOOTER_LEN as u64, FOOTER_LEN as u64)
        .await
        .with_context(|| format!("cannot read the footer of {key}"))?;
    let footer: [u8; FOOTER_LEN] = tail[..]
        .try_into()
        .map_err(|_| anyhow::anyhow!("object {key}: footer is truncated"))?;
    let a = env
        .check(Some(&footer), trust)
        .with_context(|| format!("object {key}"))?;
    Ok((env, a))
}

/// A proven envelope must name what its key names (kind, lineage, txids,
/// and from format 3 time and level): a genuine object copied under another
/// name is refused.
fn matches_name(env: &Envelope, key: &str) -> anyhow::Result<()> {
    use crate::codec::ObjectKind;
    use crate::layout::{parse_key, Entry};
    let ok = match parse_key(key, 0) {
        Some(Entry::Snapshot(s)) => {
            env.kind == ObjectKind::Snapshot
                && env.meta.lineage == s.lineage
                && env.meta.first_txid == s.txid
                && env.meta.last_txid == s.txid
                && (!env.has_footer() || (env.meta.time_us == s.time_us && env.meta.level == 0))
        }
        Some(Entry::Segment(g)) => {
            env.kind == ObjectKind::Segment
                && env.meta.lineage == g.lineage
                && env.meta.first_txid == g.first_txid
                && env.meta.last_txid == g.last_txid
                && (!env.has_footer()
                    || (env.meta.time_us == g.last_time_us && env.meta.level == g.level))
        }
        None => false,
    };
    anyhow::ensure!(
        ok,
        "object {key}: its signed envelope (lineage {}, txids {}..={}, time {}, level {}) does not match its name (renamed, swapped or copied object)",
        env.meta.lineage,
        env.meta.first_txid,
        env.meta.last_txid,
        env.meta.time_us,
        env.meta.level
    );
    Ok(())
}

/// The catalog with only snapshots whose envelopes prove out; lineages left
/// without a proven snapshot are dropped. Returns the refusals, each naming
/// the object. `cache` remembers snapshots already proven by this process
/// (objects are immutable; a replaced one fails again on download).
pub async fn verified(
    store: &dyn Storage,
    catalog: &Catalog,
    trust: &Trust,
    cache: &mut BTreeSet<String>,
) -> (Catalog, Vec<String>) {
    let todo: Vec<SnapshotEntry> = catalog
        .lineages
        .values()
        .flat_map(|l| l.snapshots.iter())
        .filter(|s| !cache.contains(&s.key))
        .cloned()
        .collect();
    let results: Vec<(SnapshotEntry, anyhow::Result<()>)> =
        futures::stream::iter(todo.into_iter().map(|s| async move {
            let r = envelope(store, &s.key, s.size, trust).await.map(|_| ());
            (s, r)
        }))
        .buffer_unordered(8)
        .collect()
        .await;
    let mut refused = Vec::new();
    let mut bad = BTreeSet::new();
    for (s, r) in results {
        match r {
            Ok(()) => {
                cache.insert(s.key);
            }
            Err(e) => {
                refused.push(format!("{e:#}"));
                bad.insert(s.key);
            }
        }
    }
    let mut out = catalog.clone();
    for l in out.lineages.values_mut() {
        l.snapshots.retain(|s| !bad.contains(&s.key));
    }
    // A lineage without a proven snapshot decides nothing (not even which
    // lineage is the newest); its objects are left alone. One that had
    // snapshots is reported; one without any is a shipper's first upload
    // in progress, or debris.
    let dropped: Vec<(String, bool)> = out
        .lineages
        .values()
        .filter(|l| l.snapshots.is_empty())
        .map(|l| (l.id.clone(), !catalog.lineages[&l.id].snapshots.is_empty()))
        .collect();
    for (id, had) in dropped {
        if had {
            refused.push(format!(
                "lineage {id} has no snapshot that proves out: it is ignored (nothing in it is restored from, planned with or deleted)"
            ));
        }
        out.lineages.remove(&id);
    }
    refused.sort();
    (out, refused)
}
