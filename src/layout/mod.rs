//! Bucket layout (docs/FORMAT.md, "Bucket layout"): object names, the
//! catalog of restore points built from one listing, and restore planning.

mod catalog;
mod naming;
mod plan;

pub use catalog::{Catalog, HeadObject, Lineage};
pub use naming::{
    fmt_time_us, lineage_start, new_lineage_id, parse_key, parse_time, segment_key, snapshot_key,
    Entry, SegmentEntry, SnapshotEntry, LINEAGES, MAX_TXID,
};
pub use plan::{Plan, Target};
