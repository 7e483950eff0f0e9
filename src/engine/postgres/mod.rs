//! PostgreSQL: WAL archiving (`archive_command` / `restore_command`
//! compatible), streaming through a replication slot, base backups, and
//! restores to any point (docs/POSTGRES.md, docs/FORMAT.md "PostgreSQL
//! archive").
//!
//! PostgreSQL is not shipped through the commit pipeline (`replicate/`)
//! that SQLite uses. Its WAL already is an ordered, checksummed,
//! LSN-addressed log that PostgreSQL itself replays; what offsite adds is
//! the archive: WAL addressable by the segment names PostgreSQL asks for,
//! sealed by the shared codec (zstd, age, signatures) into the shared
//! storage, and base backups beside it. Shared with SQLite: storage,
//! codec, signing and trust, the replica record, the lease.

pub mod archive;
pub mod backup;
pub mod drill;
pub mod dsn;
pub mod fetch;
pub mod inventory;
pub mod push;
pub mod restore;
pub mod retention;
pub mod sidecar;
pub mod stream;
pub mod verify;
pub mod walname;
pub mod wire;

use anyhow::{ensure, Context};

use crate::codec::{Encryption, Seal};
use crate::engine::Engine;
use crate::keys::Identities;
use crate::sign::{Binding, Signer, Trust};
use crate::storage::{DynStorage, ReplicaUrl};

/// Why the SQLite commit pipeline does not take a PostgreSQL replica.
pub const NOT_A_COMMIT_PIPELINE: &str = "this is a PostgreSQL replica: use `offsite pg …` (archive-push, wal-fetch, backup, stream) and `offsite restore URL -o DATADIR`";

/// The database name a PostgreSQL cluster's objects are bound to.
pub fn database_name(system_id: u64) -> String {
    format!("pg-{system_id}")
}

/// What writes to a PostgreSQL archive: the store, the seal (encryption,
/// signature, replica and cluster binding) and what it trusts when it
/// reads back what exists (idempotent re-pushes).
pub struct Writer {
    pub store: DynStorage,
    pub seal: Seal,
    pub trust: Trust,
    pub system_id: u64,
}

impl Writer {
    /// Open the archive at `url` for cluster `system_id`: claim (or check)
    /// the replica record, so a replica of another engine, another cluster
    /// or an untrusted key is refused before anything is written.
    pub async fn open(
        url: &ReplicaUrl,
        enc: Encryption,
        signer: std::sync::Arc<Signer>,
        mut trust: Trust,
        system_id: u64,
    ) -> anyhow::Result<Writer> {
        let store = crate::storage::open(url).await?;
        trust.keys.push(signer.public());
        trust.keys.dedup();
        let want = database_name(system_id);
        let (replica, database) =
            crate::record::claim(store.as_ref(), Engine::Postgres, &want, &signer, &trust).await?;
        ensure!(
            database == want,
            "replica {} archives PostgreSQL cluster {database}, not this cluster ({want}); give each cluster its own replica URL",
            store.describe()
        );
        trust.replica = Some(replica.clone());
        trust.database = Some(database.clone());
        Ok(Writer {
            store,
            seal: Seal {
                enc,
                binding: Binding {
                    signer: Some(signer),
                    replica,
                    database,
                },
            },
            trust,
            system_id,
        })
    }
}

/// What reads a PostgreSQL archive.
pub struct Reader {
    pub store: DynStorage,
    pub trust: Trust,
    pub ids: Option<Identities>,
    /// The archived cluster's system identifier (from the replica record).
    pub system_id: Option<u64>,
}

impl Reader {
    pub async fn open(
        url: &ReplicaUrl,
        mut trust: Trust,
        ids: Option<Identities>,
    ) -> anyhow::Result<Reader> {
        let store = crate::storage::open(url).await?;
        let engine = crate::record::open(store.as_ref(), &mut trust).await?;
        ensure!(
            engine == Engine::Postgres,
            "replica {} holds a {engine} replica, not a PostgreSQL archive",
            store.describe()
        );
        let system_id = trust
            .database
            .as_deref()
            .and_then(|d| d.strip_prefix("pg-"))
            .map(|s| s.parse::<u64>())
            .transpose()
            .context("the replica record names no PostgreSQL cluster")?;
        Ok(Reader {
            store,
            trust,
            ids,
            system_id,
        })
    }
}

/// Microseconds since the Unix epoch, now.
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
