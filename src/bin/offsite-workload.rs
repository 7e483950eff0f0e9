//! Deterministic SQLite writer for offsite's tests and benchmarks
//! (see `offsite::workload`). Prints nothing but errors; with --log, appends
//! "commit_number started_unix_micros committed_unix_micros" after every commit.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use offsite::workload::{self, Params};

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Mode {
    Passive,
    Full,
    Restart,
    Truncate,
}

#[derive(Parser, Debug)]
#[command(about = "Write a deterministic workload into a SQLite database (WAL mode)")]
struct Args {
    db: PathBuf,
    /// Number of commits to make.
    #[arg(long)]
    count: u64,
    /// Commits per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Every Nth commit writes a big payload (0 = never).
    #[arg(long, default_value_t = 0)]
    big_every: u64,
    #[arg(long, default_value_t = 4 << 20)]
    big_bytes: usize,
    /// Run `PRAGMA wal_checkpoint(MODE)` every N commits (0 = never).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    #[arg(long, value_enum, default_value = "passive")]
    checkpoint_mode: Mode,
    /// Busy timeout for the checkpoints only (ms); writes wait up to 30 s.
    #[arg(long, default_value_t = 30_000)]
    checkpoint_busy_ms: u64,
    /// Fail if a checkpoint reports SQLITE_BUSY instead of completing.
    #[arg(long)]
    checkpoint_must_complete: bool,
    /// Run VACUUM after these commit numbers.
    #[arg(long, value_delimiter = ',')]
    vacuum_at: Vec<u64>,
    /// Disable SQLite's automatic checkpoints.
    #[arg(long)]
    no_autocheckpoint: bool,
    /// Append "commit started_micros committed_micros" lines here.
    #[arg(long)]
    log: Option<PathBuf>,
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros()
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let p = Params {
        big_every: a.big_every,
        big_bytes: a.big_bytes,
    };
    let mut c = workload::open(&a.db, &p)?;
    if a.no_autocheckpoint {
        c.pragma_update(None, "wal_autocheckpoint", 0)?;
    }
    let mut log = match &a.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("open {}", p.display()))?,
        ),
        None => None,
    };
    let start = workload::last_commit(&c)? + 1;
    let t0 = Instant::now();
    for (i, s) in (start..start + a.count).enumerate() {
        if a.rate > 0.0 {
            let due = t0 + Duration::from_secs_f64(i as f64 / a.rate);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        let before = now_us();
        workload::commit(&mut c, &p, s)?;
        if let Some(l) = &mut log {
            writeln!(l, "{s} {before} {}", now_us())?;
        }
        if a.checkpoint_every > 0 && s % a.checkpoint_every == 0 {
            let mode = format!("{:?}", a.checkpoint_mode).to_uppercase();
            c.busy_timeout(Duration::from_millis(a.checkpoint_busy_ms))?;
            let (busy, log, done): (i64, i64, i64) =
                c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            if std::env::var_os("OFFSITE_WORKLOAD_DEBUG").is_some() {
                eprintln!("checkpoint({mode}) after {s}: busy={busy} log={log} done={done}");
            }
            if a.checkpoint_must_complete && busy != 0 {
                anyhow::bail!(
                    "checkpoint({mode}) after commit {s} returned busy (log {log}, checkpointed {done})"
                );
            }
            c.busy_timeout(Duration::from_secs(30))?;
        }
        if a.vacuum_at.contains(&s) {
            c.execute_batch("VACUUM")?;
        }
    }
    Ok(())
}
