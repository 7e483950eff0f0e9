//! The single-database pipeline's hot paths, in-process (not a test;
//! `scripts/bench/hotpath.sh` runs it, natively for time and CPU and under
//! callgrind for instruction counts, and writes docs/benchmarks/hotpath.md).
//!
//! One real SQLite database, written by `offsite::workload` (one ~1 MB row
//! per commit, half random bytes, autocheckpoint off), replicated with age
//! and signing as in production, on a manual clock (so compaction windows
//! and object names are the same every run):
//! * **ship**: `--commits` commits are in the WAL, then one `step(true)` ships
//!   them all (read the WAL, state checksums, zstd + age, spool, upload,
//!   fold into the compaction window);
//! * **snapshot**: a second replicator's `start()` ships the whole database
//!   as its lineage's first snapshot;
//! * **restore**: `restore` of the first replica's latest state (snapshot +
//!   segments), integrity check on, then checked row by row.
//!
//! Each phase runs in a function of its own (`phase_ship`, `phase_snapshot`,
//! `phase_restore`), so `valgrind --tool=callgrind --dump-before=…
//! --dump-after=…` can count each phase's instructions (all threads).
//!
//! ```text
//! cargo bench --bench pipeline -- [--commits N (200)] [--replica-url URL]
//! ```

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context};
use offsite::clock::Clock;
use offsite::codec::Encryption;
use offsite::keys;
use offsite::layout::Target;
use offsite::replicate::{Options, Replicator};
use offsite::restore::{restore, RestoreOptions};
use offsite::storage::{self, DynStorage};
use offsite::workload;

/// CPU seconds of this process, all threads (user + system).
fn cpu_s() -> f64 {
    // SAFETY: getrusage into a zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

struct Measured {
    wall_s: f64,
    cpu_s: f64,
}

fn measure<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Measured)> {
    let (c, t) = (cpu_s(), Instant::now());
    let v = f()?;
    Ok((
        v,
        Measured {
            wall_s: t.elapsed().as_secs_f64(),
            cpu_s: cpu_s() - c,
        },
    ))
}

#[inline(never)]
fn phase_ship(rt: &tokio::runtime::Runtime, rep: &mut Replicator) -> anyhow::Result<()> {
    rt.block_on(rep.step(true))
}

#[inline(never)]
fn phase_snapshot(rt: &tokio::runtime::Runtime, rep: &mut Replicator) -> anyhow::Result<()> {
    rt.block_on(rep.start())
}

#[inline(never)]
fn phase_restore(
    rt: &tokio::runtime::Runtime,
    store: &DynStorage,
    ro: RestoreOptions,
) -> anyhow::Result<u64> {
    Ok(rt.block_on(restore(store.as_ref(), ro))?.txid)
}

fn sub_url(url: &str, name: &str) -> String {
    match url.split_once('?') {
        Some((a, q)) => format!("{}/{name}?{q}", a.trim_end_matches('/')),
        None => format!("{}/{name}", url.trim_end_matches('/')),
    }
}

fn main() -> anyhow::Result<()> {
    let mut commits = 200u64;
    let mut url = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--commits" => commits = it.next().context("--commits N")?.parse()?,
            "--replica-url" => url = Some(it.next().context("--replica-url URL")?),
            // cargo bench passes --bench.
            "--bench" => {}
            other => anyhow::bail!(
                "unknown argument {other}; usage: pipeline [--commits N] [--replica-url URL]"
            ),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tmp = tempfile::tempdir()?;
    let base = url.unwrap_or_else(|| format!("file://{}", tmp.path().join("replicas").display()));
    let run = format!("pipeline-{:08x}", rand_u32());
    let db = tmp.path().join("app.db");
    let spool = tmp.path().join("spool");
    std::fs::create_dir_all(&spool)?;
    let p = workload::Params {
        big_every: 1,
        big_bytes: 1_000_000,
    };
    let mut conn = workload::open(&db, &p)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    workload::commit(&mut conn, &p, 1)?;

    let (id, rcpt) = keys::generate();
    let ids = keys::Identities::from_x25519(vec![id]);
    let enc = Encryption::Age(keys::Recipients::parse_list(&[rcpt])?);
    let signer = std::sync::Arc::new(offsite::sign::Signer::generate());
    let (clock, _hand) = Clock::manual(1_800_000_000_000_000);
    let mk = |name: &str| -> anyhow::Result<(Replicator, DynStorage)> {
        let u = sub_url(&base, &format!("{run}/{name}"));
        let store = rt.block_on(storage::open(&u.parse()?))?;
        let mut o = Options::new(db.clone(), spool.clone());
        o.clock = clock.clone();
        o.replica_name = name.into();
        o.signer = Some(signer.clone());
        // Only the phases below checkpoint (none do: the WAL keeps every commit).
        o.checkpoint_frames = u32::MAX;
        Ok((Replicator::new(o, store.clone(), enc.clone()), store))
    };
    let (mut a, store_a) = mk("shipped")?;
    rt.block_on(a.start())?;

    for s in 2..=commits + 1 {
        workload::commit(&mut conn, &p, s)?;
    }
    let wal = std::fs::metadata(db.with_extension("db-wal"))?.len();
    let ((), ship) = measure(|| phase_ship(&rt, &mut a))?;
    let db_bytes = std::fs::metadata(&db)?.len() + wal;

    let (mut b, _store_b) = mk("snapshot")?;
    let ((), snap) = measure(|| phase_snapshot(&rt, &mut b))?;
    drop(b);
    drop(a);

    let out = tmp.path().join("restored.db");
    let mut ro = RestoreOptions::new(Target::Latest, out.clone());
    ro.identities = Some(ids);
    ro.trust = offsite::sign::Trust::with_keys(vec![signer.public()]);
    let (txid, rest) = measure(|| phase_restore(&rt, &store_a, ro))?;
    ensure!(
        txid == commits + 1,
        "restored txid {txid}, wanted {}",
        commits + 1
    );
    let restored = std::fs::metadata(&out)?.len();
    let commit = workload::verify(&out)?;
    ensure!(
        commit == commits + 1,
        "restored commit {commit}, wanted {}",
        commits + 1
    );
    let stored = dir_bytes(tmp.path().join("replicas").as_path());

    let mb = |b: u64| b as f64 / 1e6;
    let row = |name: &str, bytes: u64, m: &Measured| {
        println!(
            "| {name} | {:.1} | {:.2} | {:.2} | {:.0} | {:.2} |",
            mb(bytes),
            m.wall_s,
            m.cpu_s,
            mb(bytes) / m.wall_s,
            m.cpu_s / (bytes as f64 / (1u64 << 30) as f64)
        )
    };
    println!(
        "cores {}, {commits} commits of ~1 MB, WAL {:.1} MB, database {:.1} MB, replicas {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        mb(wal),
        mb(db_bytes),
        if stored > 0 {
            format!("{:.1} MB", mb(stored))
        } else {
            "on S3".into()
        }
    );
    println!();
    println!("| phase | MB | wall s | CPU s | MB/s | CPU s per GiB |");
    println!("|---|---|---|---|---|---|");
    row("ship (WAL → segments)", wal, &ship);
    row("snapshot (database → snapshot)", db_bytes, &snap);
    row("restore (→ database, integrity check)", restored, &rest);
    Ok(())
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom(&mut b);
    u32::from_le_bytes(b)
}

fn getrandom(b: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(b);
    }
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
