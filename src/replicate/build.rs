//! Staging objects the engine built.

use super::spool::Spool;
use crate::engine::Built;
use crate::layout;
use crate::storage::Body;

/// A finished object ready for upload.
pub(super) struct Staged {
    pub(super) key: String,
    pub(super) body: Body,
    _tmp: Option<tempfile::NamedTempFile>,
    pub(super) raw_bytes: u64,
    /// What the engine built: txids, the digests and links along it.
    pub(super) built: Built,
}

impl Staged {
    pub(super) fn snapshot(lineage: &str, spool: Spool, built: Built) -> anyhow::Result<Staged> {
        let (body, tmp) = spool.into_body()?;
        Ok(Staged {
            key: layout::snapshot_key(lineage, built.last_txid, built.last_time_us),
            body,
            _tmp: tmp,
            raw_bytes: built.raw_bytes,
            built,
        })
    }

    pub(super) fn segment(lineage: &str, spool: Spool, built: Built) -> anyhow::Result<Staged> {
        let (body, tmp) = spool.into_body()?;
        Ok(Staged {
            key: layout::segment_key(
                lineage,
                0,
                built.first_txid,
                built.last_txid,
                built.last_time_us,
            ),
            body,
            _tmp: tmp,
            raw_bytes: built.raw_bytes,
            built,
        })
    }
}
