//! The replica record (`replica.json` at the replica root, docs/FORMAT.md,
//! "Bucket layout"): which engine and format wrote the replica, so that
//! `restore`, `list`, `verify` and `prune` work from the URL alone and a
//! shipper of another engine is refused before it writes anything.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::storage::{Body, Storage, StorageError};

pub const RECORD_KEY: &str = "replica.json";

/// Larger than any record offsite writes; a bigger object is not read.
const MAX_RECORD_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRecord {
    /// The format version of the replica's newest objects' writer.
    pub format: u16,
    pub engine: String,
}

impl ReplicaRecord {
    pub fn new(engine: Engine) -> ReplicaRecord {
        ReplicaRecord {
            format: crate::codec::FORMAT_VERSION,
            engine: engine.name().to_string(),
        }
    }
}

/// The replica's record; `None` for an empty replica or one written before
/// records existed (format 1: SQLite).
pub async fn read(store: &dyn Storage) -> anyhow::Result<Option<ReplicaRecord>> {
    let bytes = match store.get(RECORD_KEY).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot read {RECORD_KEY} of replica {} (every command reads this small record; with a least-privilege policy allow s3:GetObject on PREFIX/{RECORD_KEY}, see docs/IAM.md)",
                store.describe()
            )))
        }
    };
    if bytes.len() > MAX_RECORD_BYTES {
        bail!(
            "{RECORD_KEY} of replica {} is {} bytes, not a replica record (is the URL right?)",
            store.describe(),
            bytes.len()
        );
    }
    let r: ReplicaRecord = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{RECORD_KEY} of replica {} is not a valid replica record",
            store.describe()
        )
    })?;
    Ok(Some(r))
}

/// The engine that wrote the replica: from its record, or SQLite for a
/// replica without one (format 1 had no other engine). A record naming an
/// engine this offsite does not know is refused with the record's name.
pub async fn engine(store: &dyn Storage) -> anyhow::Result<Engine> {
    match read(store).await? {
        None => Ok(Engine::Sqlite),
        Some(r) => Engine::parse(&r.engine)
            .with_context(|| format!("replica {} ({RECORD_KEY})", store.describe())),
    }
}

/// A shipper's start: check the record, and write it if the replica has
/// none or an older one.
pub async fn claim(store: &dyn Storage, engine: Engine) -> anyhow::Result<()> {
    match read(store).await? {
        Some(r) if r.engine != engine.name() => bail!(
            "replica {} holds a {} replica ({RECORD_KEY}); refusing to ship a {engine} database into it (use another prefix)",
            store.describe(),
            r.engine
        ),
        Some(r) if r.format >= crate::codec::FORMAT_VERSION => Ok(()),
        _ => {
            let body = serde_json::to_vec(&ReplicaRecord::new(engine)).expect("record serializes");
            store
                .put(RECORD_KEY, Body::Bytes(body.into()))
                .await
                .with_context(|| {
                    format!(
                        "cannot write {RECORD_KEY} to {} (a shipper writes this small record once; with a least-privilege policy allow s3:PutObject on PREFIX/{RECORD_KEY}, see docs/IAM.md)",
                        store.describe()
                    )
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::FileStorage;

    #[tokio::test]
    async fn claim_writes_once_and_refuses_another_engine() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStorage::new(tmp.path().to_path_buf()).unwrap();
        // No record: a format-1 (or empty) replica, which is SQLite.
        assert_eq!(read(&store).await.unwrap(), None);
        assert_eq!(engine(&store).await.unwrap(), Engine::Sqlite);
        claim(&store, Engine::Sqlite).await.unwrap();
        assert_eq!(
            read(&store).await.unwrap(),
            Some(ReplicaRecord::new(Engine::Sqlite))
        );
        claim(&store, Engine::Sqlite).await.unwrap();
        // Another engine's record: every command refuses, naming it.
        let other = br#"{"format": 2, "engine": "postgres"}"#;
        store
            .put(RECORD_KEY, Body::Bytes(other[..].into()))
            .await
            .unwrap();
        let e = format!("{:#}", claim(&store, Engine::Sqlite).await.unwrap_err());
        assert!(e.contains("postgres") && e.contains("refusing"), "{e}");
        let e = format!("{:#}", engine(&store).await.unwrap_err());
        assert!(e.contains("postgres") && e.contains(RECORD_KEY), "{e}");
        // Not a record at all.
        store
            .put(RECORD_KEY, Body::Bytes(b"<html>"[..].into()))
            .await
            .unwrap();
        let e = format!("{:#}", read(&store).await.unwrap_err());
        assert!(e.contains("not a valid replica record"), "{e}");
        // Oversized: refused before parsing.
        store
            .put(
                RECORD_KEY,
                Body::Bytes(vec![b' '; MAX_RECORD_BYTES + 1].into()),
            )
            .await
            .unwrap();
        let e = format!("{:#}", read(&store).await.unwrap_err());
        assert!(e.contains("not a replica record"), "{e}");
    }
}
