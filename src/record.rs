//! The replica record (`replica.json` at the replica root, docs/FORMAT.md,
//! "Bucket layout"): which engine and format wrote the replica, so that
//! `restore`, `list`, `verify` and `prune` work from the URL alone and a
//! shipper of another engine is refused before it writes anything.

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::sign::{PublicKey, Signer, Trust};
use crate::storage::{Body, Storage, StorageError};

pub const RECORD_KEY: &str = "replica.json";

/// Larger than any record offsite writes; a bigger object is not read.
const MAX_RECORD_BYTES: u64 = 64 << 10;

const RECORD_SIG_DOMAIN: &[u8] = b"offsite-replica-v3\0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRecord {
    /// The format version of the replica's newest objects' writer.
    pub format: u16,
    pub engine: String,
    /// Format 3: the replica id (32 hex), made once; every object carries it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
    /// Format 3: the database's name; every object carries it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub database: String,
    /// Format 3: the verifying key (64 hex) that signed the record.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signer: String,
    /// Format 3: Ed25519 signature (128 hex) over the fields above.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sig: String,
}

impl ReplicaRecord {
    /// A new, signed record of a new replica.
    pub fn new(engine: Engine, replica: String, database: &str, signer: &Signer) -> ReplicaRecord {
        let mut r = ReplicaRecord {
            format: crate::codec::FORMAT_VERSION,
            engine: engine.name().to_string(),
            replica,
            database: database.to_string(),
            signer: signer.public().hex(),
            sig: String::new(),
        };
        r.sig = hex::encode(signer.sign(&r.message()));
        r
    }

    fn message(&self) -> Vec<u8> {
        let mut m = RECORD_SIG_DOMAIN.to_vec();
        m.extend_from_slice(&self.format.to_le_bytes());
        for f in [&self.engine, &self.replica, &self.database, &self.signer] {
            m.extend_from_slice(&(f.len() as u32).to_le_bytes());
            m.extend_from_slice(f.as_bytes());
        }
        m
    }

    /// Written before format 3: no replica id, no signature.
    pub fn is_unsigned(&self) -> bool {
        self.format < 3
    }

    /// Check the record's signature against `trust` (format 3).
    pub fn check(&self, trust: &Trust) -> anyhow::Result<PublicKey> {
        ensure!(
            !self.is_unsigned(),
            "{RECORD_KEY} was written before format 3 and is not signed"
        );
        ensure!(
            self.replica.len() == 32 && self.replica.bytes().all(|b| b.is_ascii_hexdigit()),
            "{RECORD_KEY} has an invalid replica id {:?}",
            self.replica
        );
        crate::sign::check_record(trust, RECORD_KEY, &self.signer, &self.sig, &self.message())
    }
}

/// The replica id of the newest snapshot (of the newest lineages, at most a
/// few looked at) that a key in `trust` signed for `database`.
async fn adopt(store: &dyn Storage, trust: &Trust, database: &str) -> Option<String> {
    let catalog = crate::layout::Catalog::load(store).await.ok()?;
    let probe = Trust {
        adopt_replica: true,
        replica: None,
        database: None,
        ..trust.clone()
    };
    let mut snaps: Vec<&crate::layout::SnapshotEntry> = catalog
        .lineages
        .values()
        .flat_map(|l| l.snapshots.iter())
        .collect();
    snaps.sort_by_key(|s| std::cmp::Reverse(s.txid));
    for s in snaps.into_iter().take(3) {
        if let Ok((env, crate::codec::Authenticity::Signed(_))) =
            crate::trusted::envelope(store, &s.key, s.size, &probe).await
        {
            if !env.meta.replica.is_empty() && env.meta.database == database {
                return Some(env.meta.replica);
            }
        }
    }
    None
}

/// A new random replica id.
pub fn new_replica_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The replica's record; `None` for an empty replica or one written before
/// records existed (format 1: SQLite).
pub async fn read(store: &dyn Storage) -> anyhow::Result<Option<ReplicaRecord>> {
    let denied = |e: StorageError| {
        anyhow::Error::new(e).context(format!(
            "cannot read {RECORD_KEY} of replica {} (every command reads this small record; with a least-privilege policy allow s3:GetObject on PREFIX/{RECORD_KEY}, see docs/IAM.md)",
            store.describe()
        ))
    };
    // One ranged read: a hostile record is never downloaded whole.
    let bytes = match store.get_range(RECORD_KEY, 0, MAX_RECORD_BYTES + 1).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(denied(e)),
    };
    if bytes.len() as u64 > MAX_RECORD_BYTES {
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

/// A reader's start: the engine, and `trust` completed with the replica id
/// of a record whose signature proves out (unless `--replica-id` already
/// named one). A record that does not prove out is an error naming it;
/// an unsigned (format 1 or 2) record leaves the replica id unknown, which
/// refuses every format-3 object.
pub async fn open(store: &dyn Storage, trust: &mut Trust) -> anyhow::Result<Engine> {
    let Some(r) = read(store).await? else {
        return Ok(Engine::Sqlite);
    };
    let engine = Engine::parse(&r.engine)
        .with_context(|| format!("replica {} ({RECORD_KEY})", store.describe()))?;
    if r.is_unsigned() {
        return Ok(engine);
    }
    if trust.replica.is_some() {
        // Pinned by the caller: the record is not needed to know it.
        return Ok(engine);
    }
    r.check(trust)
        .with_context(|| format!("replica {}", store.describe()))?;
    if let Some(d) = &trust.database {
        ensure!(
            *d == r.database,
            "replica {} holds database {:?}, not {d:?} ({RECORD_KEY})",
            store.describe(),
            r.database
        );
    }
    // Every object of the replica names the record's database.
    trust.database = Some(r.database);
    trust.replica = Some(r.replica);
    Ok(engine)
}

/// A shipper's start: check the record and return the replica id and the
/// database name every object is bound to. A replica without a record, or
/// with an unsigned one (written before format 3), gets a new replica id
/// and a signed record naming `database`; a record signed by a key in
/// `trust` (this shipper's, or an old one during a rotation) keeps its id
/// and database name (a database restored under another file name and
/// shipped on continues the same replica) and is re-signed with `signer` if
/// needed. A record of another engine, or one no trusted key signed, is
/// refused before anything is written.
pub async fn claim(
    store: &dyn Storage,
    engine: Engine,
    database: &str,
    signer: &Signer,
    trust: &Trust,
) -> anyhow::Result<(String, String)> {
    let existing = read(store).await?;
    let mut database = database.to_string();
    let replica = match &existing {
        Some(r) if r.engine != engine.name() => bail!(
            "replica {} holds a {} replica ({RECORD_KEY}); refusing to ship a {engine} database into it (use another prefix)",
            store.describe(),
            r.engine
        ),
        Some(r) if !r.is_unsigned() => {
            r.check(trust).with_context(|| format!(
                "replica {}: refusing to ship into it (if you rotated the signing key, add the old verifying key to verify-keys; if the record was tampered with, investigate before deleting {RECORD_KEY})",
                store.describe()
            ))?;
            if r.database != database {
                tracing::warn!(replica = %store.describe(), record = %r.database, local = %database, "shipping a database file of another name into this replica: it continues the replica of {:?} (a restored copy?); if this is another database, stop and give it its own prefix", r.database);
                database = r.database.clone();
            }
            if r.signer == signer.public().hex() && r.format == crate::codec::FORMAT_VERSION {
                return Ok((r.replica.clone(), database));
            }
            r.replica.clone()
        }
        // No signed record: the replica id of this shipper's own newest
        // signed object, if there is one (a deleted record must not cut the
        // history off under a new id), else a new one.
        _ => match adopt(store, trust, &database).await {
            Some(id) => {
                tracing::warn!(replica = %store.describe(), id = %id, "{RECORD_KEY} is missing or unsigned but the replica holds objects this shipper signed: keeping their replica id");
                id
            }
            None => new_replica_id(),
        },
    };
    let rec = ReplicaRecord::new(engine, replica.clone(), &database, signer);
    let body = serde_json::to_vec(&rec).expect("record serializes");
    store
        .put(RECORD_KEY, Body::Bytes(body.into()))
        .await
        .with_context(|| {
            format!(
                "cannot write {RECORD_KEY} to {} (a shipper writes this small record once; with a least-privilege policy allow s3:PutObject on PREFIX/{RECORD_KEY}, see docs/IAM.md)",
                store.describe()
            )
        })?;
    Ok((replica, database))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::FileStorage;

    #[tokio::test]
    async fn claim_writes_once_and_refuses_another_engine_database_or_key() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStorage::new(tmp.path().to_path_buf()).unwrap();
        let signer = Signer::generate();
        let trust = Trust::with_keys(vec![signer.public()]);
        // No record: a format-1 (or empty) replica, which is SQLite.
        assert_eq!(read(&store).await.unwrap(), None);
        assert_eq!(engine(&store).await.unwrap(), Engine::Sqlite);
        let (id, db) = claim(&store, Engine::Sqlite, "app.db", &signer, &trust)
            .await
            .unwrap();
        assert_eq!(db, "app.db");
        let rec = read(&store).await.unwrap().unwrap();
        assert_eq!(rec.replica, id);
        assert_eq!(rec.check(&trust).unwrap(), signer.public());
        // Claimed again: the same id.
        assert_eq!(
            claim(&store, Engine::Sqlite, "app.db", &signer, &trust)
                .await
                .unwrap()
                .0,
            id
        );
        // A reader learns the id from the verified record.
        let mut t = trust.clone();
        open(&store, &mut t).await.unwrap();
        assert_eq!(t.replica.as_deref(), Some(id.as_str()));
        // A restored copy under another file name continues the replica
        // (and its database name).
        assert_eq!(
            claim(&store, Engine::Sqlite, "restored.db", &signer, &trust)
                .await
                .unwrap(),
            (id.clone(), "app.db".to_string())
        );
        // Rotation: a new key that trusts the old one keeps the id and re-signs.
        let new = Signer::generate();
        let both = Trust::with_keys(vec![new.public(), signer.public()]);
        assert_eq!(
            claim(&store, Engine::Sqlite, "app.db", &new, &both)
                .await
                .unwrap()
                .0,
            id
        );
        assert_eq!(
            read(&store).await.unwrap().unwrap().signer,
            new.public().hex()
        );
        // A shipper that does not trust the record's key refuses.
        let stranger = Signer::generate();
        let e = format!(
            "{:#}",
            claim(
                &store,
                Engine::Sqlite,
                "app.db",
                &stranger,
                &Trust::with_keys(vec![stranger.public()])
            )
            .await
            .unwrap_err()
        );
        assert!(e.contains("not a key this reader trusts"), "{e}");
        // A forged record (another key's signature over this id) is refused by readers.
        let forged = ReplicaRecord::new(Engine::Sqlite, id.clone(), "app.db", &stranger);
        store
            .put(
                RECORD_KEY,
                Body::Bytes(serde_json::to_vec(&forged).unwrap().into()),
            )
            .await
            .unwrap();
        let mut t = both.clone();
        let e = format!("{:#}", open(&store, &mut t).await.unwrap_err());
        assert!(e.contains("not a key this reader trusts"), "{e}");
        // An edited field under a valid signature.
        let mut edited = ReplicaRecord::new(Engine::Sqlite, id.clone(), "app.db", &new);
        edited.database = "b.db".into();
        store
            .put(
                RECORD_KEY,
                Body::Bytes(serde_json::to_vec(&edited).unwrap().into()),
            )
            .await
            .unwrap();
        let e = format!("{:#}", open(&store, &mut both.clone()).await.unwrap_err());
        assert!(e.contains("does not verify"), "{e}");
        // Another engine's record: every command refuses, naming it.
        let other = br#"{"format": 2, "engine": "postgres"}"#;
        store
            .put(RECORD_KEY, Body::Bytes(other[..].into()))
            .await
            .unwrap();
        let e = format!(
            "{:#}",
            claim(&store, Engine::Sqlite, "app.db", &new, &both)
                .await
                .unwrap_err()
        );
        assert!(e.contains("postgres") && e.contains("refusing"), "{e}");
        assert_eq!(engine(&store).await.unwrap(), Engine::Postgres);
        // An engine this offsite does not know: every command refuses, naming it.
        let other = br#"{"format": 3, "engine": "mysql"}"#;
        store
            .put(RECORD_KEY, Body::Bytes(other[..].into()))
            .await
            .unwrap();
        let e = format!("{:#}", engine(&store).await.unwrap_err());
        assert!(e.contains("mysql") && e.contains(RECORD_KEY), "{e}");
        // Not a record at all.
        store
            .put(RECORD_KEY, Body::Bytes(b"<html>"[..].into()))
            .await
            .unwrap();
        let e = format!("{:#}", read(&store).await.unwrap_err());
        assert!(e.contains("not a valid replica record"), "{e}");
        // Oversized: refused before it is downloaded.
        store
            .put(
                RECORD_KEY,
                Body::Bytes(vec![b' '; MAX_RECORD_BYTES as usize + 1].into()),
            )
            .await
            .unwrap();
        let e = format!("{:#}", read(&store).await.unwrap_err());
        assert!(e.contains("not a replica record"), "{e}");
    }
}
