//! Restore a PostgreSQL cluster to a point in time: pick the base backup,
//! unpack it into an empty data directory, write the recovery settings
//! (restore_command = offsite's wal-fetch for the same archive, the target,
//! `recovery.signal`) and, with `--start`, start PostgreSQL and wait until
//! recovery has reached the target or failed (docs/POSTGRES.md, "Restore").

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures::StreamExt;

use super::archive::{self, ArchiveInfo, BackupInfo};
use super::walname::{format_lsn, SegmentName};
use super::Reader;

/// Where recovery stops (PostgreSQL's `recovery_target_*`). `--txid` is
/// offsite's own commit counter for SQLite and means nothing here; a
/// PostgreSQL transaction id is `Xid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTarget {
    /// The end of the archive.
    Latest,
    /// The end of the base backup (the earliest consistent point).
    Immediate,
    /// `recovery_target_time`: the text as given (RFC 3339) and its instant.
    Time(String, i64),
    Lsn(u64),
    /// `recovery_target_xid`: a PostgreSQL transaction id.
    Xid(String),
    /// `recovery_target_name`: a restore point made with pg_create_restore_point().
    Name(String),
}

pub struct RestoreOptions {
    pub output: PathBuf,
    pub force: bool,
    pub target: PgTarget,
    /// `recovery_target_inclusive = false`: stop just before the target.
    pub exclusive: bool,
    /// `recovery_target_action`: promote (default), pause or shutdown.
    pub action: String,
    /// Restore from this base backup (an id `offsite list` shows).
    pub backup: Option<String>,
    /// The restore_command written into the recovery settings.
    pub restore_command: String,
    /// Tablespaces moved at restore: original location → new location.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// Operating-system user that owns the restored files (and runs
    /// PostgreSQL with --start); `None`: the current user.
    pub os_user: Option<String>,
    pub parallel: usize,
}

pub struct Restored {
    pub backup: BackupInfo,
    pub output: PathBuf,
    /// The newest LSN the archive holds WAL up to (continuously from the
    /// backup's start).
    pub archive_end: u64,
}

/// The base backup a target needs: the newest that ends at or before it.
pub fn pick_backup<'a>(
    backups: &'a [BackupInfo],
    target: &PgTarget,
    id: Option<&str>,
) -> anyhow::Result<&'a BackupInfo> {
    ensure!(
        !backups.is_empty(),
        "the archive holds no complete base backup (run `offsite pg backup`, or let the streaming daemon take one)"
    );
    if let Some(id) = id {
        return backups.iter().find(|b| b.id == id).with_context(|| {
            format!("no complete base backup {id} in the archive (`offsite list` shows them)")
        });
    }
    let newest = backups.last().unwrap();
    let pick = match target {
        PgTarget::Latest | PgTarget::Immediate | PgTarget::Xid(_) | PgTarget::Name(_) => {
            Some(newest)
        }
        PgTarget::Lsn(l) => backups.iter().rev().find(|b| b.end_lsn <= *l),
        PgTarget::Time(_, t) => backups.iter().rev().find(|b| b.end_time_us <= *t),
    };
    pick.with_context(|| {
        let oldest = &backups[0];
        format!(
            "no base backup ends before the target: the oldest ends at LSN {} ({}); a point before that cannot be restored",
            format_lsn(oldest.end_lsn),
            crate::layout::fmt_time_us(oldest.end_time_us)
        )
    })
}

/// How far the archive holds WAL continuously from `from` (segment
/// pieces without a gap, across segments of one timeline or the timelines
/// that follow it in the listing).
pub fn archive_reach(pieces: &[archive::WalPiece], timeline: u32, from: u64) -> u64 {
    let mut at = from;
    loop {
        let seg = SegmentName::of_lsn(timeline, at);
        // Later timelines continue the same LSNs: take whichever reaches furthest.
        let mut best = at;
        for tli in pieces
            .iter()
            .map(|p| p.seg.timeline)
            .filter(|t| *t >= timeline)
        {
            let of: Vec<_> = pieces
                .iter()
                .filter(|p| p.seg.timeline == tli && p.seg.segno == seg.segno)
                .cloned()
                .collect();
            let (_, reach) = archive::cover(&of, at);
            best = best.max(reach);
        }
        if best == at {
            return at;
        }
        at = best;
    }
}

pub async fn restore(r: &Reader, o: &RestoreOptions) -> anyhow::Result<Restored> {
    let (backups, refused) = archive::list_backups(r.store.as_ref(), &r.trust).await?;
    for (key, why) in &refused {
        tracing::warn!(object = %key, "base backup record refused: {why}");
    }
    let b = pick_backup(&backups, &o.target, o.backup.as_deref())?.clone();
    let pieces = archive::list_wal(r.store.as_ref(), None).await?;
    let reach = archive_reach(&pieces, b.timeline, b.start_lsn);
    ensure!(
        reach >= b.end_lsn,
        "base backup {} needs WAL from {} to {}, but the archive holds it only up to {}: it cannot be restored (damaged or pruned archive)",
        b.id,
        format_lsn(b.start_lsn),
        format_lsn(b.end_lsn),
        format_lsn(reach)
    );
    if let PgTarget::Lsn(l) = o.target {
        ensure!(
            l <= reach,
            "the archive holds WAL only up to {} (continuously from backup {}); LSN {} is beyond it",
            format_lsn(reach),
            b.id,
            format_lsn(l)
        );
    }
    prepare_output(&o.output, o.force)?;
    let tmp = staging_dir(&o.output)?;
    let result = unpack_all(r, &b, &tmp, o).await;
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    write_recovery_settings(&tmp, o)?;
    if let Some(u) = &o.os_user {
        chown_tree(&tmp, u)?;
    }
    // The restored directory appears whole or not at all.
    if o.output.exists() {
        std::fs::remove_dir(&o.output)
            .with_context(|| format!("cannot replace {}", o.output.display()))?;
    }
    std::fs::rename(&tmp, &o.output).with_context(|| {
        format!(
            "cannot move the restored data directory to {}",
            o.output.display()
        )
    })?;
    sync_dir(o.output.parent().unwrap_or(Path::new(".")));
    Ok(Restored {
        backup: b,
        output: o.output.clone(),
        archive_end: reach,
    })
}

/// DATADIR must be absent or empty; `--force` empties it, unless a
/// PostgreSQL server is running on it.
fn prepare_output(out: &Path, force: bool) -> anyhow::Result<()> {
    let Ok(rd) = std::fs::read_dir(out) else {
        if out.exists() {
            bail!(
                "{} exists and is not a directory; refusing to touch it",
                out.display()
            );
        }
        return Ok(());
    };
    let entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
    if entries.is_empty() {
        return Ok(());
    }
    ensure!(
        force,
        "{} is not empty; refusing to overwrite it (restore into an empty or new directory, or pass --force to replace its contents)",
        out.display()
    );
    if let Ok(pid) = std::fs::read_to_string(out.join("postmaster.pid")) {
        if let Some(pid) = pid
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } == 0 {
                bail!("{} belongs to a running PostgreSQL server (pid {pid}); stop it before restoring over it", out.display());
            }
        }
    }
    for e in entries {
        let p = e.path();
        let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.with_context(|| format!("--force: cannot remove {}", p.display()))?;
    }
    Ok(())
}

/// A fresh directory beside the output (same filesystem, so the final
/// rename is atomic), mode 0700 as PostgreSQL requires.
fn staging_dir(out: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("pgdata");
    let tmp = parent.join(format!(
        ".{name}.offsite-restore-{:08x}",
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .with_context(|| {
            format!(
                "cannot create a directory in {} (is it writable?)",
                parent.display()
            )
        })?;
    Ok(tmp)
}

async fn unpack_all(
    r: &Reader,
    b: &BackupInfo,
    tmp: &Path,
    o: &RestoreOptions,
) -> anyhow::Result<()> {
    for a in &b.archives {
        let dest = match &a.tablespace {
            None => tmp.to_path_buf(),
            Some(ts) => {
                let to = o
                    .tablespace_map
                    .iter()
                    .find(|(from, _)| *from == ts.path)
                    .map(|(_, to)| to.clone())
                    .unwrap_or_else(|| PathBuf::from(&ts.path));
                prepare_output(&to, o.force)
                    .with_context(|| format!("tablespace {} ({})", ts.oid, ts.path))?;
                std::fs::create_dir_all(&to).with_context(|| {
                    format!("cannot create tablespace directory {}", to.display())
                })?;
                to
            }
        };
        unpack_archive(r, b, a, &dest, o.parallel).await?;
        // The tablespace's files, unpacked, belong to PostgreSQL's user
        // (the data directory is given to it as a whole later).
        if let (Some(_), Some(u)) = (&a.tablespace, &o.os_user) {
            chown_tree(&dest, u)?;
        }
    }
    if !o.tablespace_map.is_empty() {
        remap_tablespaces(tmp, b, &o.tablespace_map)?;
    }
    Ok(())
}

/// Stream one archive's parts, in order, into `dest` (a tar archive is
/// unpacked; the manifest is written as `backup_manifest`), checking the
/// archive's length and hash.
async fn unpack_archive(
    r: &Reader,
    b: &BackupInfo,
    a: &ArchiveInfo,
    dest: &Path,
    parallel: usize,
) -> anyhow::Result<()> {
    let keys = (0..a.parts)
        .map(|i| archive::part_key(&b.id, &a.name, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    let name = a.name.clone();
    let dest = dest.to_path_buf();
    let want = (a.bytes, a.blake3.clone());
    let sink = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut reader = ChannelReader {
            rx: &mut rx,
            buf: Vec::new(),
            pos: 0,
            hasher: blake3::Hasher::new(),
            total: 0,
        };
        if name == "backup_manifest" {
            let mut m = Vec::new();
            reader.read_to_end(&mut m)?;
            std::fs::write(dest.join("backup_manifest"), &m)?;
        } else {
            let mut t = tar::Archive::new(&mut reader);
            t.set_preserve_permissions(true);
            t.set_overwrite(false);
            t.unpack(&dest)
                .with_context(|| format!("cannot unpack {name} into {}", dest.display()))?;
            std::io::copy(&mut reader, &mut std::io::sink())?;
        }
        let (bytes, hash) = (reader.total, reader.hasher.finalize().to_hex().to_string());
        ensure!(
            bytes == want.0 && hash == want.1,
            "archive {name} does not match its backup record ({bytes} bytes, expected {}): damaged or incomplete",
            want.0
        );
        Ok(())
    });
    let mut parts = futures::stream::iter(keys.into_iter().map(|k| {
        let store = r.store.clone();
        let trust = r.trust.clone();
        let ids = r.ids.clone();
        async move {
            let (meta, data) = archive::read(store.as_ref(), &k, &trust, ids.as_ref()).await?;
            anyhow::Ok((k, meta, data))
        }
    }))
    .buffered(parallel.max(1));
    let mut i = 0u32;
    while let Some(p) = parts.next().await {
        let (k, meta, data) = match p {
            Ok(x) => x,
            Err(e) => {
                drop(tx);
                let _ = sink.await;
                return Err(e);
            }
        };
        match meta {
            archive::PgMeta::BackupPart {
                ref backup,
                ref archive,
                part,
                ..
            } if *backup == b.id && *archive == a.name && part == i => {}
            _ => bail!(
                "object {k} is not part {i} of {} of backup {}",
                a.name,
                b.id
            ),
        }
        i += 1;
        if tx.send(data).await.is_err() {
            break;
        }
    }
    drop(tx);
    sink.await.context("unpacking task failed")??;
    Ok(())
}

struct ChannelReader<'a> {
    rx: &'a mut tokio::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    hasher: blake3::Hasher,
    total: u64,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.hasher.update(&out[..n]);
        self.total += n as u64;
        self.pos += n;
        Ok(n)
    }
}

/// Rewrite `tablespace_map` for moved tablespaces.
fn remap_tablespaces(dir: &Path, b: &BackupInfo, map: &[(String, PathBuf)]) -> anyhow::Result<()> {
    let p = dir.join("tablespace_map");
    let text = std::fs::read_to_string(&p).unwrap_or_default();
    let mut out = String::new();
    for line in text.lines() {
        let (oid, path) = line.split_once(' ').unwrap_or((line, ""));
        match map.iter().find(|(from, _)| from == path) {
            Some((_, to)) => out.push_str(&format!("{oid} {}\n", to.display())),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (from, _) in map {
        ensure!(
            b.archives
                .iter()
                .any(|a| a.tablespace.as_ref().is_some_and(|t| t.path == *from)),
            "--tablespace {from}=…: backup {} has no tablespace at {from}",
            b.id
        );
    }
    std::fs::write(&p, out).with_context(|| format!("cannot write {}", p.display()))
}

/// An instant as PostgreSQL's recovery_target_time accepts it (it refuses
/// RFC 3339's `T` and `Z`): `2026-11-30 14:05:02.031248+00`.
pub fn pg_time(us: i64) -> String {
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// A PostgreSQL configuration string literal.
pub fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn write_recovery_settings(dir: &Path, o: &RestoreOptions) -> anyhow::Result<()> {
    use std::io::Write;
    let mut s = format!(
        "\n# Added by offsite restore at {}: point-in-time recovery from the offsite archive.\n",
        crate::layout::fmt_time_us(super::now_us())
    );
    s += &format!("restore_command = {}\n", conf_quote(&o.restore_command));
    match &o.target {
        PgTarget::Latest => {}
        PgTarget::Immediate => s += "recovery_target = 'immediate'\n",
        PgTarget::Time(_, us) => {
            s += &format!("recovery_target_time = {}\n", conf_quote(&pg_time(*us)))
        }
        PgTarget::Lsn(l) => {
            s += &format!("recovery_target_lsn = {}\n", conf_quote(&format_lsn(*l)))
        }
        PgTarget::Xid(x) => s += &format!("recovery_target_xid = {}\n", conf_quote(x)),
        PgTarget::Name(n) => s += &format!("recovery_target_name = {}\n", conf_quote(n)),
    }
    if o.exclusive {
        s += "recovery_target_inclusive = off\n";
    }
    s += &format!("recovery_target_action = {}\n", conf_quote(&o.action));
    s += "recovery_target_timeline = 'latest'\n";
    // A restored copy must not archive its new timeline into the archive it
    // came from (the user turns archiving back on for a new primary).
    s += "archive_mode = off\n";
    let p = dir.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .with_context(|| format!("cannot write {}", p.display()))?;
    f.write_all(s.as_bytes())?;
    f.sync_all()?;
    std::fs::File::create(dir.join("recovery.signal"))?.sync_all()?;
    // Not the primary's: a restored server must not find them.
    for stale in ["postmaster.pid", "postmaster.opts", "standby.signal"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    Ok(())
}

fn chown_tree(dir: &Path, user: &str) -> anyhow::Result<()> {
    let (uid, gid) = os_user_ids(user)?;
    fn walk(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
        let md = std::fs::symlink_metadata(p)?;
        if md.is_dir() {
            for e in std::fs::read_dir(p)? {
                walk(&e?.path(), uid, gid)?;
            }
        }
        Ok(())
    }
    walk(dir, uid, gid).with_context(|| format!("cannot give {} to user {user}", dir.display()))
}

/// uid and gid of an operating-system user.
pub fn os_user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let c = std::ffi::CString::new(user)?;
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy
    // the two fields out at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    ensure!(!pw.is_null(), "no operating-system user {user:?}");
    // SAFETY: non-null pointer from getpwnam.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn sync_dir(d: &Path) {
    if let Ok(f) = std::fs::File::open(d) {
        let _ = f.sync_all();
    }
}

/// PostgreSQL's server programs of `major` (pg_ctl, postgres): `--pg-bin`,
/// then `OFFSITE_PG_BIN`, then Debian's `/usr/lib/postgresql/<major>/bin`,
/// then `PATH`.
pub fn pg_bin(explicit: Option<&Path>, major: &str) -> anyhow::Result<PathBuf> {
    let cands: Vec<PathBuf> = explicit
        .map(Path::to_path_buf)
        .into_iter()
        .chain(std::env::var_os("OFFSITE_PG_BIN").map(PathBuf::from))
        .chain(std::iter::once(PathBuf::from(format!(
            "/usr/lib/postgresql/{major}/bin"
        ))))
        .chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .collect::<Vec<_>>(),
        )
        .collect();
    cands
        .into_iter()
        .find(|d| d.join("pg_ctl").is_file() && d.join("postgres").is_file())
        .with_context(|| format!("PostgreSQL {major} server programs (pg_ctl, postgres) not found: install them (Debian: postgresql-{major}) or pass --pg-bin DIR"))
}

/// What a started restore reached.
#[derive(Debug, Clone)]
pub struct Reached {
    /// PostgreSQL's own words: "recovery stopping …", "redo done at …",
    /// "last completed transaction was at log time …".
    pub lines: Vec<String>,
    /// The server is running (promoted or paused) rather than shut down.
    pub running: bool,
    pub port: u16,
}

pub struct StartOptions {
    pub bin: PathBuf,
    pub port: u16,
    pub os_user: Option<String>,
    pub timeout: Duration,
    pub action: String,
}

fn run_pg(
    bin: &Path,
    prog: &str,
    user: Option<&str>,
    args: &[String],
) -> anyhow::Result<std::process::Output> {
    let mut cmd = match user {
        Some(u) => {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", u, "--"]).arg(bin.join(prog));
            c
        }
        None => std::process::Command::new(bin.join(prog)),
    };
    // The restored server runs restore_command with this environment: the
    // shipper's signing key is none of its business (and may not be
    // readable by PostgreSQL's user).
    cmd.env_remove("OFFSITE_SIGNING_KEY")
        .env_remove("OFFSITE_SIGNING_KEY_FILE");
    cmd.args(args).stdin(std::process::Stdio::null());
    cmd.output()
        .with_context(|| format!("cannot run {}", bin.join(prog).display()))
}

/// Start PostgreSQL on the restored directory and wait until recovery has
/// reached its target (promoted, paused, or shut down as asked) — not just
/// until pg_ctl returns, which happens as soon as connections are accepted.
pub fn start_and_wait(dir: &Path, s: &StartOptions) -> anyhow::Result<Reached> {
    let log = dir.join("offsite-recovery.log");
    let opts = format!(
        "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
        s.port,
        conf_quote(&dir.display().to_string())
    );
    let out = run_pg(
        &s.bin,
        "pg_ctl",
        s.os_user.as_deref(),
        &[
            "-D".into(),
            dir.display().to_string(),
            "-l".into(),
            log.display().to_string(),
            "-o".into(),
            opts,
            "-t".into(),
            s.timeout.as_secs().max(1).to_string(),
            "-w".into(),
            "start".into(),
        ],
    )?;
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| {
                l.contains("recovery stopping")
                    || l.contains("redo done at")
                    || l.contains("last completed transaction")
                    || l.contains("consistent recovery state reached")
                    || l.contains("selected new timeline")
            })
            .map(|l| l.to_string())
            .collect();
        if let Some(f) = text
            .lines()
            .find(|l| l.contains("FATAL:") || l.contains("PANIC:"))
        {
            bail!(
                "PostgreSQL stopped during recovery: {} (log: {})",
                f.trim(),
                log.display()
            );
        }
        let promoted = text.contains("database system is ready to accept connections");
        let paused =
            text.contains("pausing at the end of recovery") || text.contains("recovery has paused");
        let shut = text.contains("shutdown at recovery target")
            || text.contains("database system is shut down");
        match s.action.as_str() {
            "promote" if promoted => {
                return Ok(Reached {
                    lines,
                    running: true,
                    port: s.port,
                })
            }
            "pause" if paused => {
                return Ok(Reached {
                    lines,
                    running: true,
                    port: s.port,
                })
            }
            "shutdown" if shut => {
                return Ok(Reached {
                    lines,
                    running: false,
                    port: s.port,
                })
            }
            _ => {}
        }
        if !out.status.success() && !dir.join("postmaster.pid").exists() {
            bail!(
                "pg_ctl could not start PostgreSQL on {}: {} (log: {})",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim(),
                log.display()
            );
        }
        if started.elapsed() > s.timeout {
            bail!(
                "recovery did not reach its target within {:?} (still replaying? see {})",
                s.timeout,
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The restore_command written into a restored cluster: this offsite's
/// wal-fetch for the same archive, with the same identities and pinned
/// keys (no secret in it: identity files are named, not copied).
pub fn restore_command(
    url: &crate::storage::ReplicaUrl,
    id_files: &[PathBuf],
    trust: &crate::sign::Trust,
    allow_plaintext: bool,
) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find offsite's own executable")?;
    let mut words = vec![
        exe.display().to_string(),
        "pg".into(),
        "wal-fetch".into(),
        "%f".into(),
        "%p".into(),
        "--replica".into(),
        url.to_string(),
    ];
    for f in id_files {
        words.push("--age-identity".into());
        words.push(f.display().to_string());
    }
    for k in &trust.keys {
        words.push("--verify-key".into());
        words.push(k.to_string());
    }
    if let Some(id) = &trust.replica {
        words.push("--replica-id".into());
        words.push(id.clone());
    }
    if allow_plaintext {
        words.push("--allow-plaintext".into());
    }
    Ok(words
        .iter()
        .map(|w| {
            if w == "%f" || w == "%p" {
                w.clone()
            } else {
                shell_words::quote(w).into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: u64, end: u64, t: i64) -> BackupInfo {
        BackupInfo {
            id: archive::backup_id(t, id),
            label: String::new(),
            system_id: "1".into(),
            timeline: 1,
            start_lsn: id,
            end_lsn: end,
            start_time_us: t,
            end_time_us: t + 10,
            pg_version: "15".into(),
            archives: vec![],
            manifest: true,
        }
    }

    #[test]
    fn targets_pick_the_newest_backup_that_ends_before_them() {
        let bs = vec![b(0x100, 0x200, 1000), b(0x300, 0x400, 2000)];
        assert_eq!(
            pick_backup(&bs, &PgTarget::Latest, None).unwrap().start_lsn,
            0x300
        );
        assert_eq!(
            pick_backup(&bs, &PgTarget::Lsn(0x3ff), None)
                .unwrap()
                .start_lsn,
            0x100
        );
        assert_eq!(
            pick_backup(&bs, &PgTarget::Lsn(0x400), None)
                .unwrap()
                .start_lsn,
            0x300
        );
        assert_eq!(
            pick_backup(&bs, &PgTarget::Time("x".into(), 1500), None)
                .unwrap()
                .start_lsn,
            0x100
        );
        let e = format!(
            "{:#}",
            pick_backup(&bs, &PgTarget::Lsn(0x1ff), None).unwrap_err()
        );
        assert!(e.contains("no base backup ends before the target"), "{e}");
        assert!(pick_backup(&[], &PgTarget::Latest, None).is_err());
        assert_eq!(conf_quote("a'b %f"), "'a''b %f'");
        let t = crate::layout::parse_time("2026-11-30T14:05:02.031248Z").unwrap();
        assert_eq!(pg_time(t), "2026-11-30 14:05:02.031248+00");
    }
}
