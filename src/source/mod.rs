//! Sources of change records. A source hands the rest of offsite ordered,
//! timestamped commits and consistent snapshots, nothing more.
//! SQLite is the first; PostgreSQL and MySQL follow.

pub mod sqlite;
