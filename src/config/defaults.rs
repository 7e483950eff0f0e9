//! Every setting's default, defined once. The TOML file, the command line
//! (both go through `Config`'s validation) and `replicate::Options::new`
//! take them from here.

use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

/// `sync-interval`: how often pending commits are uploaded.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// `checkpoint-frames`: checkpoint once the WAL holds this many frames and
/// everything is shipped.
pub const CHECKPOINT_FRAMES: u32 = 1000;
/// `max-lag`: `/readyz` fails when a replica is further behind than this.
pub const MAX_LAG: Duration = Duration::from_secs(60);
/// `max-wal-size`: the WAL is held for unshipped commits up to this size.
pub const MAX_WAL_BYTES: u64 = 512 << 20;
/// `shutdown-timeout`: how long shutdown may spend shipping what is pending.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// `retention`: the point-in-time window kept by pruning.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// `snapshot-retention`: this many newest snapshots kept beyond the window.
pub const SNAPSHOT_RETENTION_COUNT: usize = 2;
/// PostgreSQL `backup-retention`: this many newest base backups kept
/// beyond the window.
pub const BACKUP_RETENTION_COUNT: usize = 2;
/// PostgreSQL `base-backup-interval`: a base backup this often.
pub const BASE_BACKUP_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// PostgreSQL `sync-interval`: received WAL is shipped this often. Shorter
/// than SQLite's: the data-loss window's p99 is about this plus one upload
/// (docs/BENCHMARKS-postgres.md), and requests are made only while WAL
/// arrives (docs/COSTS.md).
pub const PG_SYNC_INTERVAL: Duration = Duration::from_millis(250);
/// PostgreSQL `slot`: the replication slot's name.
pub const PG_SLOT: &str = "offsite";
/// PostgreSQL `name`: the cluster's label in metrics and `offsite sync`.
pub const PG_NAME: &str = "postgres";
/// PostgreSQL `drill-timeout`: one restore drill gives up after this long.
pub const DRILL_TIMEOUT: Duration = Duration::from_secs(600);
/// `snapshot-interval`: a fresh snapshot inside the lineage this often.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// `compaction-levels`: window lengths of compaction levels 1, 2, 3.
pub const COMPACTION_LEVELS: [Duration; 3] = [
    Duration::from_secs(60),
    Duration::from_secs(15 * 60),
    Duration::from_secs(4 * 3600),
];
/// `prune-interval`: pruning runs at most this often (after uploads).
pub const PRUNE_INTERVAL: Duration = HOUR;
/// `object-lock-margin`: kept locked this long beyond what retention needs.
pub const OBJECT_LOCK_MARGIN: Duration = Duration::from_secs(24 * 3600);
/// The daemon's HTTP listener `offsite sync` talks to without `--listen`
/// or a config `listen`.
pub const SYNC_LISTEN: &str = "127.0.0.1:9090";
/// A replica named by its position (`replica1`, `replica2`, …).
pub fn replica_name(index: usize) -> String {
    format!("replica{}", index + 1)
}
