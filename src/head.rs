//! The signed head record (`head.json`, docs/FORMAT.md "Head record"):
//! the newest state the shipper knows it shipped. Deleting the newest
//! objects of a replica otherwise looks exactly like a shipper that stopped
//! earlier; with the record, `restore` (latest) and `verify` see that a
//! signed, newer state existed and refuse to pass the older one off as the
//! newest. What remains (docs/SECURITY.md): the record is rewritten at most
//! every `HEAD_INTERVAL`, and whoever can write the bucket can put back an
//! older signed record (under Object Lock every version stays, for audit).

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::layout::{fmt_time_us, Plan, Target};
use crate::sign::{Signer, Trust};
use crate::storage::{Body, Storage, StorageError};

pub const HEAD_KEY: &str = "head.json";
const MAX_HEAD_BYTES: u64 = 4096;
const HEAD_SIG_DOMAIN: &[u8] = b"offsite-head-v3\0";

/// How often, at most, a shipper rewrites the head record (one PUT).
pub const HEAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadRecord {
    pub replica: String,
    pub lineage: String,
    pub txid: u64,
    pub time_us: i64,
    pub signer: String,
    pub sig: String,
}

impl HeadRecord {
    pub fn new(
        replica: &str,
        lineage: &str,
        txid: u64,
        time_us: i64,
        signer: &Signer,
    ) -> HeadRecord {
        let mut h = HeadRecord {
            replica: replica.into(),
            lineage: lineage.into(),
            txid,
            time_us,
            signer: signer.public().hex(),
            sig: String::new(),
        };
        h.sig = hex::encode(signer.sign(&h.message()));
        h
    }

    fn message(&self) -> Vec<u8> {
        let mut m = HEAD_SIG_DOMAIN.to_vec();
        for f in [&self.replica, &self.lineage, &self.signer] {
            m.extend_from_slice(&(f.len() as u32).to_le_bytes());
            m.extend_from_slice(f.as_bytes());
        }
        m.extend_from_slice(&self.txid.to_le_bytes());
        m.extend_from_slice(&self.time_us.to_le_bytes());
        m
    }

    fn check(&self, trust: &Trust) -> anyhow::Result<()> {
        crate::sign::check_record(trust, HEAD_KEY, &self.signer, &self.sig, &self.message())?;
        ensure!(
            trust.replica.as_deref() == Some(self.replica.as_str()),
            "{HEAD_KEY} belongs to replica {}, not this one (copied from another replica?)",
            self.replica
        );
        Ok(())
    }
}

/// Write the head record (a shipper, after uploads).
pub async fn write(store: &dyn Storage, rec: &HeadRecord) -> anyhow::Result<()> {
    let body = serde_json::to_vec(rec).expect("head serializes");
    store
        .put(HEAD_KEY, Body::Bytes(body.into()))
        .await
        .with_context(|| format!("cannot write {HEAD_KEY} to {}", store.describe()))
}

/// The head record, if present and proven; a record that does not prove
/// out is an error naming it.
pub async fn read(store: &dyn Storage, trust: &Trust) -> anyhow::Result<Option<HeadRecord>> {
    let bytes = match store.get_range(HEAD_KEY, 0, MAX_HEAD_BYTES + 1).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("cannot read {HEAD_KEY} of {}", store.describe())))
        }
    };
    ensure!(
        bytes.len() as u64 <= MAX_HEAD_BYTES,
        "{HEAD_KEY} of {} is larger than any head record",
        store.describe()
    );
    let rec: HeadRecord = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{HEAD_KEY} of {} is not a valid head record",
            store.describe()
        )
    })?;
    rec.check(trust)
        .with_context(|| format!("replica {}", store.describe()))?;
    Ok(Some(rec))
}

/// The head record a restore to the newest state checks against (read
/// before the listing); `None` for other targets or without a replica id.
pub async fn for_restore(
    store: &dyn Storage,
    target: Target,
    trust: &Trust,
) -> anyhow::Result<Option<HeadRecord>> {
    if !matches!(target, Target::Latest) || trust.replica.is_none() {
        return Ok(None);
    }
    read(store, trust).await
}

/// The rollback check of a restore to the newest state: the signed head
/// record (read before the listing) must not name a newer state than the
/// plan reaches.
pub fn check_restore(head: Option<&HeadRecord>, plan: &Plan) -> anyhow::Result<()> {
    let Some(h) = head else {
        return Ok(());
    };
    if h.txid > plan.stop_txid {
        bail!(
            "the replica's signed head record ({HEAD_KEY}) says txid {} ({}) was shipped, but the newest restorable state is txid {}: newer objects are missing (deleted, or rolled back by someone with write access to the bucket). Restore --txid {} to accept the older state knowingly",
            h.txid,
            fmt_time_us(h.time_us),
            plan.stop_txid,
            plan.stop_txid
        );
    }
    Ok(())
}
