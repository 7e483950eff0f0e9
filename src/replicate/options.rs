//! Settings for replicating one database to one replica.

use std::path::PathBuf;
use std::time::Duration;

use crate::clock::Clock;

/// Settings for replicating one database.
#[derive(Debug, Clone)]
pub struct Options {
    pub db_path: PathBuf,
    pub sync_interval: Duration,
    /// How often the WAL is read for new commits (commit times have this resolution).
    pub poll_interval: Duration,
    /// Checkpoint once the WAL holds this many frames and everything is shipped.
    pub checkpoint_frames: u32,
    /// Upper bound of page bytes in one segment (a bigger single transaction
    /// still goes into one segment, streamed through a spool file).
    pub max_segment_bytes: u64,
    /// Where segment/snapshot objects are staged before upload.
    pub spool_dir: PathBuf,
    /// How long shutdown may spend shipping what is pending.
    pub shutdown_timeout: Duration,
    /// The clock commit times and schedules read (tests inject one).
    pub clock: Clock,
    /// Window lengths of compaction levels 1.. (empty: no compaction).
    pub compaction_levels: Vec<Duration>,
    /// Take a new snapshot inside the lineage this long after the last one
    /// (if anything was committed since).
    pub snapshot_interval: Option<Duration>,
    /// Pruning after uploads (None: the replica is never pruned by the daemon).
    pub retention: Option<crate::retention::Policy>,
    /// How often pruning may run (it runs only after something was uploaded).
    pub prune_interval: Duration,
    /// Name of the replica, for logs.
    pub replica_name: String,
    /// S3 Object Lock: every upload is retained for the time it may be
    /// needed (retention window + snapshot interval) plus `object_lock_margin`.
    pub object_lock: Option<crate::storage::LockMode>,
    pub object_lock_margin: Duration,
    /// Restore drills: how often, and the identity they decrypt with (None
    /// for a plaintext replica). Drills only run when this is set.
    pub verify_interval: Option<Duration>,
    pub drill_identities: Option<crate::keys::Identities>,
    /// While the replica cannot take commits, offsite holds the WAL (no gap)
    /// up to this size; beyond it, it lets the WAL be checkpointed, records
    /// the loss of continuity and takes a new snapshot once the replica is back.
    pub max_wal_bytes: u64,
    /// Fencing (see `lease`): another shipper's lease blocks writing until it
    /// is this old without renewal; ours is renewed before uploads once
    /// older than `lease_renew`.
    pub lease_ttl: Duration,
    pub lease_renew: Duration,
    /// The signing key every object and the replica record are signed with
    /// (required: `start` refuses to ship without one).
    pub signer: Option<std::sync::Arc<crate::sign::Signer>>,
    /// Further verifying keys trusted when reading the replica back (old
    /// keys during a rotation).
    pub verify_keys: Vec<crate::sign::PublicKey>,
    /// Live counters for metrics, readiness and `sync --wait`.
    pub status: std::sync::Arc<crate::status::ReplicaStatus>,
}

impl Options {
    /// Every setting at its default (`config::defaults`).
    pub fn new(db_path: PathBuf, spool_dir: PathBuf) -> Options {
        use crate::config::defaults;
        Options {
            db_path,
            sync_interval: defaults::SYNC_INTERVAL,
            poll_interval: Duration::from_millis(100),
            checkpoint_frames: defaults::CHECKPOINT_FRAMES,
            max_segment_bytes: 64 << 20,
            spool_dir,
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            clock: Clock::system(),
            compaction_levels: defaults::COMPACTION_LEVELS.to_vec(),
            snapshot_interval: Some(defaults::SNAPSHOT_INTERVAL),
            retention: None,
            prune_interval: defaults::PRUNE_INTERVAL,
            replica_name: String::new(),
            object_lock: None,
            object_lock_margin: defaults::OBJECT_LOCK_MARGIN,
            verify_interval: None,
            drill_identities: None,
            status: crate::status::ReplicaStatus::detached(),
            signer: None,
            verify_keys: Vec::new(),
            max_wal_bytes: defaults::MAX_WAL_BYTES,
            lease_ttl: Duration::from_secs(300),
            lease_renew: Duration::from_secs(60),
        }
    }
}
