//! The SQLite source: follows one database's WAL, holds the read lock that
//! keeps unshipped frames alive, takes consistent snapshots and checkpoints.
//! The invariants are explained in docs/SQLITE.md; comments below point there.
//!
//! This module knows SQLite and nothing about storage: it hands out commits
//! (page images with boundaries) and snapshots (page streams).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};

use super::checksum::{Checksum, PageState};
use super::wal::{self, WalCommit, WalHeader};

/// A position in the WAL: everything up to and including frame `frames` of
/// the WAL with these salts. `frames == 0`: the database file alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalPos {
    pub page_size: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub ckpt_seq: u32,
    pub frames: u32,
    pub cksum: (u32, u32),
}

impl WalPos {
    fn start_of(hdr: Option<&WalHeader>, page_size: u32) -> WalPos {
        match hdr {
            Some(h) => WalPos {
                page_size,
                salt1: h.salt1,
                salt2: h.salt2,
                ckpt_seq: h.ckpt_seq,
                frames: 0,
                cksum: (h.cksum1, h.cksum2),
            },
            None => WalPos {
                page_size,
                salt1: 0,
                salt2: 0,
                ckpt_seq: 0,
                frames: 0,
                cksum: (0, 0),
            },
        }
    }

    fn after(&self, c: &WalCommit) -> WalPos {
        WalPos {
            frames: c.end_frame,
            cksum: c.end_cksum,
            ..*self
        }
    }

    /// The resume tag (docs/FORMAT.md, "Resume tag").
    pub fn resume_tag(&self, state: &Checksum) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"offsite-resume-v1");
        let z = self.frames == 0;
        for v in [
            self.page_size,
            if z { 0 } else { self.salt1 },
            if z { 0 } else { self.salt2 },
            if z { 0 } else { self.ckpt_seq },
            self.frames,
            if z { 0 } else { self.cksum.0 },
            if z { 0 } else { self.cksum.1 },
        ] {
            h.update(&v.to_le_bytes());
        }
        h.update(&state.0);
        hex::encode(&h.finalize().as_bytes()[..16])
    }
}

/// A commit observed in the WAL and not yet shipped.
#[derive(Debug, Clone)]
pub struct PendingCommit {
    pub commit: WalCommit,
    pub txid: u64,
    pub time_us: i64,
}

impl PendingCommit {
    /// Distinct pages of this commit (newest frame of each), in page order,
    /// excluding pages past the database size after the commit.
    pub fn page_frames(&self) -> Vec<(u32, u32)> {
        let mut latest: HashMap<u32, u32> = HashMap::new();
        for &(idx, pgno) in &self.commit.frames {
            if pgno <= self.commit.db_pages {
                latest.insert(pgno, idx);
            }
        }
        let mut v: Vec<(u32, u32)> = latest.into_iter().collect();
        v.sort_unstable();
        v
    }
}

/// A snapshot fixed by `snapshot_begin`.
pub struct SnapshotView {
    hdr: Option<WalHeader>,
    commits: Vec<WalCommit>,
    pub db_pages: u32,
    pub pos: WalPos,
}

pub use crate::engine::Break;

/// Read `file` at `off` into `buf`; zeros past its end.
fn read_zero_padded(file: &File, off: u64, buf: &mut [u8]) -> anyhow::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            // Past the end of the file: zeros.
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// The pages of a fixed state: the database file, with the pages the WAL
/// holds (`latest`: page → frame) read from there. Only files are read, so
/// several threads may read ranges of it at once.
struct StatePages<'a> {
    db: &'a File,
    page_size: usize,
    wal: Option<(&'a File, WalHeader)>,
    latest: HashMap<u32, u32>,
    db_pages: u32,
}

impl StatePages<'_> {
    /// Hand pages `pgnos` to `each` in order.
    fn read(
        &self,
        pgnos: std::ops::Range<u32>,
        mut each: impl FnMut(u32, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let ps = self.page_size;
        let mut buf = vec![0u8; ps];
        // Pages of the database file, read a MiB at a time (pages come in order).
        let per_block = ((1usize << 20) / ps).max(1) as u32;
        let mut block = Vec::new();
        let (mut block_first, mut block_pages) = (0u32, 0u32);
        let end = pgnos.end;
        for pgno in pgnos {
            match (self.latest.get(&pgno), &self.wal) {
                (Some(&idx), Some((f, h))) => {
                    wal::read_frame_page(f, h, idx, &mut buf)?;
                    each(pgno, &buf)?;
                }
                _ => {
                    if pgno < block_first || pgno >= block_first + block_pages {
                        block_pages = per_block.min(end - pgno);
                        block_first = pgno;
                        block.resize(block_pages as usize * ps, 0);
                        read_zero_padded(self.db, (pgno as u64 - 1) * ps as u64, &mut block)?;
                    }
                    let off = (pgno - block_first) as usize * ps;
                    each(pgno, &block[off..off + ps])?;
                }
            }
        }
        Ok(())
    }
}

pub struct SqliteSource {
    db_path: PathBuf,
    wal_path: PathBuf,
    /// R: holds the long-lived read transaction (docs/SQLITE.md, "The read lock").
    r: Connection,
    /// W: takes the write lock for snapshots and checkpoints.
    w: Connection,
    /// X: runs checkpoints (must not be in a transaction).
    x: Connection,
    db_file: File,
    /// The -shm file, opened once, only to test SQLite's locks with F_GETLK.
    /// Never close a descriptor of the -shm (or the database) while our
    /// connections live: POSIX drops all of a process's locks on a file when
    /// any descriptor of it is closed. Declared after the connections, so it
    /// is dropped after them.
    shm: Option<File>,
    db_ino: (u64, u64),
    wal_file: Option<(File, (u64, u64))>,
    page_size: u32,
    /// Header of the WAL that `shipped`/`pending` refer to (None: no valid WAL).
    hdr: Option<WalHeader>,
    shipped: WalPos,
    pending: Vec<PendingCommit>,
    /// One WAL restart may be accepted as a continuation (docs/SQLITE.md).
    restart_ok: bool,
    /// Valid committed frames seen in the current WAL (for the checkpoint threshold).
    wal_frames: u32,
    /// The files as the last poll that found nothing saw them, if that look
    /// can be trusted to show any later write ([`SqliteSource::quiet`]).
    quiet_since: Option<(FileSigs, std::time::Instant)>,
}

/// What `stat` shows of the database and its WAL: identity, and for the
/// WAL its size and modification time. Any write to the WAL changes the
/// latter (SQLite writes it with `write`, never through a mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileSigs {
    db: (u64, u64),
    wal: Option<((u64, u64), u64, i64, i64)>,
}

/// A WAL modified this recently may be written again within the same tick of
/// the filesystem's clock (a second on some filesystems), leaving its
/// modification time unchanged: such a look is not trusted to be quiet.
const QUIET_MTIME_AGE: Duration = Duration::from_secs(2);
/// Even a trusted quiet look is followed by a full poll at least this often.
const QUIET_MAX: Duration = Duration::from_secs(10);

impl FileSigs {
    fn read(db: &Path, wal: &Path) -> std::io::Result<FileSigs> {
        let d = std::fs::metadata(db)?;
        let wal = match std::fs::metadata(wal) {
            Ok(w) => Some((ino(&w), w.len(), w.mtime(), w.mtime_nsec())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(FileSigs { db: ino(&d), wal })
    }

    /// Old enough that a later write must show as a different mtime.
    fn settled(&self) -> bool {
        let Some((_, _, sec, nsec)) = self.wal else {
            return true;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mtime = Duration::new(sec.max(0) as u64, nsec.clamp(0, 999_999_999) as u32);
        mtime + QUIET_MTIME_AGE <= now
    }
}

fn ino(md: &std::fs::Metadata) -> (u64, u64) {
    (md.dev(), md.ino())
}

fn open_conn(path: &Path, busy: Duration) -> anyhow::Result<Connection> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open database {}", path.display()))?;
    c.busy_timeout(busy)?;
    // Small footprint: offsite reads pages from the files itself, so its
    // connections need no lookaside arena and a small page cache (a sidecar
    // may hold a thousand databases with three connections each).
    // SAFETY: a valid open handle; LOOKASIDE with a null buffer, 0 slots.
    unsafe {
        rusqlite::ffi::sqlite3_db_config(
            c.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        );
    }
    // (This pragma reads the schema: the first place a file that is not a
    // database shows.)
    c.pragma_update(None, "cache_size", -64)
        .with_context(|| format!("{} is not a readable SQLite database", path.display()))?;
    // Our connections never checkpoint on their own and never checkpoint or
    // delete the WAL when they close: the WAL is what proves continuity on restart.
    c.pragma_update(None, "wal_autocheckpoint", 0)?;
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    Ok(c)
}

impl SqliteSource {
    /// Open the database, check it is in WAL mode and start holding the read lock.
    pub fn open(db_path: &Path) -> anyhow::Result<SqliteSource> {
        let db_path = db_path.to_path_buf();
        let md = std::fs::metadata(&db_path).with_context(|| {
            format!(
                "cannot open database {}: does it exist and is it readable?",
                db_path.display()
            )
        })?;
        if !md.is_file() {
            bail!("{} is not a regular file", db_path.display());
        }
        let db_file = File::open(&db_path)
            .with_context(|| format!("cannot read database {}", db_path.display()))?;
        let r = open_conn(&db_path, Duration::from_secs(5))?;
        let mode: String = r
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .with_context(|| format!("{} is not a readable SQLite database", db_path.display()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!(
                "database {} is in journal_mode={mode}, not WAL; offsite replicates WAL databases: switch it once with `sqlite3 {} 'PRAGMA journal_mode=WAL'` (the setting is persistent)",
                db_path.display(),
                db_path.display()
            );
        }
        let w = open_conn(&db_path, Duration::from_secs(5))?;
        let x = open_conn(&db_path, Duration::from_millis(0))?;
        let mut wal_path = db_path.clone().into_os_string();
        wal_path.push("-wal");
        let page_size: u32 = r.query_row("PRAGMA page_size", [], |row| row.get(0))?;
        let mut s = SqliteSource {
            db_ino: ino(&md),
            db_path,
            wal_path: PathBuf::from(wal_path),
            r,
            w,
            x,
            db_file,
            shm: None,
            wal_file: None,
            page_size,
            hdr: None,
            shipped: WalPos::start_of(None, page_size),
            pending: Vec::new(),
            restart_ok: false,
            wal_frames: 0,
            quiet_since: None,
        };
        s.begin_read()?;
        let mut shm = s.db_path.clone().into_os_string();
        shm.push("-shm");
        s.shm = File::open(&shm).ok();
        Ok(s)
    }

    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    pub fn shipped(&self) -> WalPos {
        self.shipped
    }

    pub fn pending(&self) -> &[PendingCommit] {
        &self.pending
    }

    pub fn wal_frames(&self) -> u32 {
        self.wal_frames
    }

    fn begin_read(&mut self) -> anyhow::Result<()> {
        // A read transaction only takes its WAL read mark when it reads.
        self.r
            .execute_batch("BEGIN DEFERRED; SELECT count(*) FROM sqlite_schema;")
            .context("cannot start the read transaction that protects unshipped WAL frames")
    }

    fn end_read(&mut self) -> anyhow::Result<()> {
        self.quiet_since = None;
        if !self.r.is_autocommit() {
            self.r.execute_batch("ROLLBACK")?;
        }
        Ok(())
    }

    fn lock_writer(&mut self, busy: Duration) -> anyhow::Result<bool> {
        self.w.busy_timeout(busy)?;
        match self.w.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => Ok(true),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn unlock_writer(&mut self) -> anyhow::Result<()> {
        if !self.w.is_autocommit() {
            self.w.execute_batch("ROLLBACK")?;
        }
        Ok(())
    }

    /// Open (or re-open, if it was replaced) the WAL file and read its header.
    fn wal_header(&mut self) -> anyhow::Result<Option<WalHeader>> {
        let md = match std::fs::metadata(&self.wal_path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.wal_file = None;
                return Ok(None);
            }
            Err(e) => return Err(e).context("cannot stat the WAL"),
        };
        let id = ino(&md);
        if self.wal_file.as_ref().map(|(_, i)| *i) != Some(id) {
            let f = File::open(&self.wal_path)
                .with_context(|| format!("cannot open {}", self.wal_path.display()))?;
            self.wal_file = Some((f, id));
        }
        let f = &self.wal_file.as_ref().unwrap().0;
        Ok(wal::read_header(f)?)
    }

    fn wal(&self) -> &File {
        &self.wal_file.as_ref().expect("WAL open").0
    }

    /// Database size in pages according to the database file alone.
    fn db_file_pages(&self) -> anyhow::Result<u32> {
        let mut h = [0u8; 100];
        let len = self.db_file.metadata()?.len();
        if len < 100 {
            return Ok(0);
        }
        self.db_file.read_exact_at(&mut h, 0)?;
        let change = u32::from_be_bytes(h[24..28].try_into().unwrap());
        let in_header = u32::from_be_bytes(h[28..32].try_into().unwrap());
        let valid_for = u32::from_be_bytes(h[92..96].try_into().unwrap());
        if in_header > 0 && change == valid_for {
            Ok(in_header)
        } else {
            Ok((len / self.page_size as u64) as u32)
        }
    }

    /// Stream the state "database file + WAL frames 1..=end" page by page.
    /// Correct while R is held at a mark ≤ end (docs/SQLITE.md, "Snapshots", step 5).
    fn read_state(
        &self,
        hdr: Option<&WalHeader>,
        commits: &[WalCommit],
        each: impl FnMut(u32, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<u32> {
        let pages = self.state_pages(hdr, commits)?;
        pages.read(1..pages.db_pages + 1, each)?;
        Ok(pages.db_pages)
    }

    /// Where each page of the state "database file + WAL frames 1..=end" is.
    fn state_pages(
        &self,
        hdr: Option<&WalHeader>,
        commits: &[WalCommit],
    ) -> anyhow::Result<StatePages<'_>> {
        let mut latest: HashMap<u32, u32> = HashMap::new();
        for c in commits {
            for &(idx, pgno) in &c.frames {
                latest.insert(pgno, idx);
            }
        }
        let db_pages = match commits.last() {
            Some(c) => c.db_pages,
            None => self.db_file_pages()?,
        };
        let wal = match hdr {
            Some(h) if !latest.is_empty() => Some((self.wal(), *h)),
            _ => None,
        };
        Ok(StatePages {
            db: &self.db_file,
            page_size: self.page_size as usize,
            wal,
            latest,
            db_pages,
        })
    }

    /// The page-state terms of a snapshot view's pages (1..=db_pages),
    /// hashed on every core.
    pub fn snapshot_terms(&self, view: &SnapshotView) -> anyhow::Result<Vec<u128>> {
        let pages = self.state_pages(view.hdr.as_ref(), &view.commits)?;
        super::checksum::terms_parallel(pages.db_pages as usize, |range, sink| {
            pages.read(
                range.start as u32 + 1..range.end as u32 + 1,
                |pgno, page| {
                    sink(pgno, page);
                    Ok(())
                },
            )
        })
    }

    /// Try to continue after `pos` (the replica's newest position): rebuild
    /// the state at `pos` from the local files and let `matches` compare it
    /// with what the replica says. Returns the page state on success.
    pub fn resume(
        &mut self,
        pos: &WalPos,
        matches: impl Fn(&WalPos, &Checksum) -> bool,
    ) -> anyhow::Result<Result<PageState, Break>> {
        if pos.page_size != self.page_size {
            return Ok(Err(Break::hard(format!(
                "page size changed from {} to {}",
                pos.page_size, self.page_size
            ))));
        }
        let hdr = self.wal_header()?;
        let (commits, at) = if pos.frames == 0 {
            (Vec::new(), WalPos::start_of(hdr.as_ref(), self.page_size))
        } else {
            let Some(h) = hdr else {
                return Ok(Err(Break::hard(
                    "the WAL was removed or reset while offsite was not running",
                )));
            };
            if (h.salt1, h.salt2, h.ckpt_seq) != (pos.salt1, pos.salt2, pos.ckpt_seq) {
                return Ok(Err(Break::hard(
                    "the WAL was checkpointed and restarted while offsite was not running",
                )));
            }
            let scan = wal::scan(self.wal(), &h, 0, (h.cksum1, h.cksum2))?;
            let upto: Vec<WalCommit> = scan
                .commits
                .iter()
                .take_while(|c| c.end_frame <= pos.frames)
                .cloned()
                .collect();
            match upto.last() {
                Some(c) if c.end_frame == pos.frames && c.end_cksum == pos.cksum => {}
                _ => {
                    return Ok(Err(Break::hard(
                        "the WAL no longer contains the shipped position",
                    )))
                }
            }
            (upto, *pos)
        };
        let mut state = PageState::new(self.page_size as usize);
        let pages = self.read_state(hdr.as_ref(), &commits, |pgno, page| {
            state.set_page(pgno, page);
            Ok(())
        })?;
        state.resize(pages);
        if self.wal_header()? != hdr {
            return Ok(Err(Break::hard(
                "the WAL changed while offsite was checking it",
            )));
        }
        if !matches(pos, &state.checksum()) {
            return Ok(Err(Break::hard("the local database differs from the replica's newest state (changed or checkpointed while offsite was not running)"
            )));
        }
        self.hdr = hdr;
        self.shipped = at;
        self.pending.clear();
        // Safe to accept one restart only if nothing past `pos` existed.
        let end = match &self.hdr {
            Some(h) => wal::scan(self.wal(), h, at.frames, at.cksum)?
                .end()
                .is_none(),
            None => true,
        };
        self.restart_ok = end;
        Ok(Ok(state))
    }

    /// Fix a consistent snapshot (docs/SQLITE.md, "Snapshots").
    /// Its pages can then be read, as often as needed, with `snapshot_read`
    /// until the next call that moves the read lock.
    pub fn snapshot_begin(&mut self) -> anyhow::Result<SnapshotView> {
        // R is renewed without the write lock: the state is read from the
        // files up to the WAL end found *after* R began, which is consistent
        // whatever R's mark (docs/SQLITE.md, "Snapshots"). Writers are never
        // blocked by a snapshot.
        self.end_read()?;
        self.begin_read()?;
        self.view_current()
    }

    /// The state "database file + every committed frame of the current WAL",
    /// consistent while R is held, whatever R's mark (docs/SQLITE.md,
    /// "Snapshots"). Records it as the shipped position.
    fn view_current(&mut self) -> anyhow::Result<SnapshotView> {
        let res = (|| {
            let hdr = self.wal_header()?;
            let commits = match &hdr {
                Some(h) => wal::scan(self.wal(), h, 0, (h.cksum1, h.cksum2))?.commits,
                None => Vec::new(),
            };
            Ok::<_, anyhow::Error>((hdr, commits))
        })();
        let (hdr, commits) = res?;
        if let Some(h) = &hdr {
            if h.page_size != self.page_size {
                bail!(
                    "WAL page size {} differs from the database's {}",
                    h.page_size,
                    self.page_size
                );
            }
        }
        let db_pages = match commits.last() {
            Some(c) => c.db_pages,
            None => self.db_file_pages()?,
        };
        let start = WalPos::start_of(hdr.as_ref(), self.page_size);
        let pos = match commits.last() {
            Some(c) => start.after(c),
            None => start,
        };
        self.hdr = hdr;
        self.shipped = pos;
        self.pending.clear();
        self.wal_frames = pos.frames;
        self.restart_ok = true;
        Ok(SnapshotView {
            hdr,
            commits,
            db_pages,
            pos,
        })
    }

    /// The state at the shipped position (the replica's newest state), for
    /// a snapshot inside the current lineage. Nothing moves: R stays where it
    /// is, at a mark at or before the shipped position, so no checkpoint can
    /// have copied a frame past it into the database file, and "database
    /// file + WAL frames up to the shipped position" is exactly that state
    /// (docs/SQLITE.md, "Snapshots"). `None` if the WAL no longer matches
    /// (the next poll deals with that); check `wal_unchanged` after reading.
    pub fn shipped_view(&mut self) -> anyhow::Result<Option<SnapshotView>> {
        let hdr = self.wal_header()?;
        if hdr != self.hdr && self.shipped.frames > 0 {
            return Ok(None);
        }
        let commits = match &hdr {
            Some(h) if self.shipped.frames > 0 => {
                let scan = wal::scan(self.wal(), h, 0, (h.cksum1, h.cksum2))?;
                let upto: Vec<WalCommit> = scan
                    .commits
                    .into_iter()
                    .take_while(|c| c.end_frame <= self.shipped.frames)
                    .collect();
                match upto.last() {
                    Some(c)
                        if c.end_frame == self.shipped.frames
                            && c.end_cksum == self.shipped.cksum => {}
                    _ => return Ok(None),
                }
                upto
            }
            _ => Vec::new(),
        };
        let db_pages = match commits.last() {
            Some(c) => c.db_pages,
            None => self.db_file_pages()?,
        };
        Ok(Some(SnapshotView {
            hdr: if commits.is_empty() { None } else { hdr },
            commits,
            db_pages,
            pos: self.shipped,
        }))
    }

    /// Stream the snapshot's pages 1..=db_pages (step 5). R stays held.
    pub fn snapshot_read(
        &self,
        view: &SnapshotView,
        each: impl FnMut(u32, &[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.read_state(view.hdr.as_ref(), &view.commits, each)?;
        Ok(())
    }

    /// Look for new commits. Each gets the next txid (from `next_txid`) and
    /// the observation time, taken from `now_us` after the WAL was read (a
    /// commit is never stamped earlier than it happened).
    pub fn poll(
        &mut self,
        next_txid: &mut u64,
        now_us: impl FnOnce() -> i64,
    ) -> anyhow::Result<Result<usize, Break>> {
        self.quiet_since = None;
        // Read before the files, so a write during this poll shows next time.
        let sigs = FileSigs::read(&self.db_path, &self.wal_path).ok();
        match std::fs::metadata(&self.db_path) {
            Ok(md) if ino(&md) == self.db_ino => {}
            Ok(_) => return Ok(Err(Break::hard("the database file was replaced"))),
            Err(_) => return Ok(Err(Break::hard("the database file was removed"))),
        }
        let cur = self.wal_header()?;
        let same = match (&cur, &self.hdr) {
            (Some(a), Some(b)) => a == b,
            (None, None) => true,
            _ => false,
        };
        if !same {
            let show = |h: &Option<WalHeader>| match h {
                Some(h) => format!("salt1={:08x} ckpt={}", h.salt1, h.ckpt_seq),
                None => "none".to_string(),
            };
            tracing::debug!(db = %self.db_path.display(), old = %show(&self.hdr), new = %show(&cur), pending = self.pending.len(), shipped = self.shipped.frames, restart_ok = self.restart_ok, "WAL header changed");
            // A header change is acceptable only as the one restart we
            // allowed, with nothing pending (docs/SQLITE.md).
            let one_restart = match (&cur, &self.hdr) {
                (Some(n), Some(o)) => {
                    n.salt1 == o.salt1.wrapping_add(1) && n.ckpt_seq == o.ckpt_seq.wrapping_add(1)
                }
                _ => true,
            };
            if !self.pending.is_empty() {
                return Ok(Err(Break::hard(
                    "the WAL was restarted or truncated before offsite shipped the commits it had read",
                )));
            }
            if !(self.restart_ok && one_restart) {
                return Ok(Err(Break {
                    reason: "the WAL was restarted or truncated by another process".into(),
                    verifiable: true,
                }));
            }
            if let Some(h) = &cur {
                if h.page_size != self.page_size {
                    return Ok(Err(Break::hard("the page size changed")));
                }
            }
            tracing::debug!(db = %self.db_path.display(), "WAL restarted after a full checkpoint; continuing");
            self.hdr = cur;
            self.shipped = WalPos::start_of(cur.as_ref(), self.page_size);
            self.wal_frames = 0;
            if cur.is_some() {
                self.restart_ok = false;
            }
        }
        let Some(h) = self.hdr else {
            if self.pending.is_empty() {
                self.quiet_since = sigs
                    .filter(FileSigs::settled)
                    .map(|s| (s, std::time::Instant::now()));
            }
            return Ok(Ok(0));
        };
        let (from, from_ck) = match self.pending.last() {
            Some(p) => (p.commit.end_frame, p.commit.end_cksum),
            None => (self.shipped.frames, self.shipped.cksum),
        };
        if from > 0 && !wal::frame_matches(self.wal(), &h, from, from_ck)? {
            return Ok(Err(Break::hard(
                "WAL frames offsite already read were truncated or overwritten",
            )));
        }
        let scan = wal::scan(self.wal(), &h, from, from_ck)?;
        let n = scan.commits.len();
        if n == 0 && self.pending.is_empty() {
            self.quiet_since = sigs
                .filter(FileSigs::settled)
                .map(|s| (s, std::time::Instant::now()));
        }
        let now_us = if n > 0 { now_us() } else { 0 };
        for c in scan.commits {
            self.wal_frames = c.end_frame;
            self.pending.push(PendingCommit {
                commit: c,
                txid: *next_txid,
                time_us: now_us,
            });
            *next_txid += 1;
        }
        Ok(Ok(n))
    }

    /// True when a poll would find nothing and no checkpointer waits for
    /// offsite, judged from `stat` and one lock test alone (no read, no
    /// SQLite call): the last poll found nothing, and neither file changed
    /// since. Only a poll whose WAL was at least [`QUIET_MTIME_AGE`] old
    /// counts, and a full poll is due every [`QUIET_MAX`] regardless. An
    /// idle sidecar of many databases thus costs a few system calls per look.
    pub fn quiet(&self) -> bool {
        let Some((sigs, at)) = self.quiet_since else {
            return false;
        };
        self.pending.is_empty()
            && at.elapsed() < QUIET_MAX
            && !self.checkpointer_waiting()
            && FileSigs::read(&self.db_path, &self.wal_path).ok() == Some(sigs)
    }

    /// True if the WAL header is still the one our positions refer to. Pages
    /// read from WAL frames are valid only if this holds *after* reading them:
    /// SQLite rewrites the header before it overwrites any frame of a
    /// restarted WAL, and salt-1 only ever increments.
    pub fn wal_unchanged(&mut self) -> anyhow::Result<bool> {
        if self.hdr.is_none() {
            // No WAL: nothing was read from one.
            return Ok(true);
        }
        let cur = self.wal_header()?;
        Ok(cur == self.hdr)
    }

    /// After a WAL restart offsite did not sanction (`Break::verifiable`):
    /// read the current consistent state (as for a snapshot) and compare the state the
    /// files hold with `state` (the replica's newest state) plus the new WAL's
    /// commits. Equal: nothing was lost, continue at the start of the new WAL
    /// (its commits become pending on the next poll). Costs one read of the
    /// whole database.
    pub fn verify_continuation(&mut self, state: &PageState) -> anyhow::Result<bool> {
        // R is held (it may predate the restart: then it holds mark 0 and no
        // frame of the new WAL can have been checkpointed).
        let view = self.view_current()?;
        let mut files = PageState::new(self.page_size as usize);
        self.snapshot_read(&view, |pgno, page| {
            files.set_page(pgno, page);
            Ok(())
        })?;
        files.resize(view.db_pages);
        let mut ours = state.clone();
        let mut buf = vec![0u8; self.page_size as usize];
        if let Some(h) = &view.hdr {
            for c in &view.commits {
                for &(idx, pgno) in &c.frames {
                    wal::read_frame_page(self.wal(), h, idx, &mut buf)?;
                    ours.set_page(pgno, &buf);
                }
                ours.resize(c.db_pages);
            }
        }
        let unchanged = self.wal_unchanged()?;
        if !unchanged || files.checksum() != ours.checksum() {
            tracing::debug!(db = %self.db_path.display(), unchanged, files_pages = files.pages(), ours_pages = ours.pages(), wal_commits = view.commits.len(), "continuation not proven");
            return Ok(false);
        }
        self.shipped = WalPos::start_of(view.hdr.as_ref(), self.page_size);
        self.pending.clear();
        self.wal_frames = 0;
        // The view's frames are not shipped yet: a restart is not acceptable
        // until they are.
        self.restart_ok = false;
        Ok(true)
    }

    /// Is another process running a FULL/RESTART/TRUNCATE checkpoint, i.e.
    /// holding both the WAL write lock and the checkpoint lock? (SQLite's
    /// unix VFS locks byte 120 + n of the -shm file for lock n.)
    fn checkpointer_waiting(&self) -> bool {
        let Some(f) = &self.shm else {
            return false;
        };
        let held = |byte: i64| -> bool {
            use std::os::fd::AsRawFd;
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as i16;
            fl.l_whence = libc::SEEK_SET as i16;
            fl.l_start = byte;
            fl.l_len = 1;
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
            r == 0 && fl.l_type != libc::F_UNLCK as i16
        };
        held(120) && held(121)
    }

    /// Has every WAL frame been copied into the database? Read from the
    /// wal-index in the -shm (mxFrame at offset 16 of the index header,
    /// nBackfill at offset 96; native byte order), without taking any lock.
    fn shm_fully_backfilled(&self) -> bool {
        let Some(f) = &self.shm else {
            return false;
        };
        let mut b = [0u8; 100];
        if f.read_exact_at(&mut b, 0).is_err() {
            return false;
        }
        let mx = u32::from_ne_bytes(b[16..20].try_into().unwrap());
        let backfilled = u32::from_ne_bytes(b[96..100].try_into().unwrap());
        backfilled >= mx
    }

    /// True if no frame of the current WAL has been copied into the database
    /// (wal-index nBackfill is 0): the database file is then the state the
    /// whole current WAL was written on top of.
    pub fn wal_untouched_by_checkpoints(&self) -> bool {
        let Some(f) = &self.shm else {
            return false;
        };
        let mut b = [0u8; 100];
        if f.read_exact_at(&mut b, 0).is_err() {
            return false;
        }
        u32::from_ne_bytes(b[96..100].try_into().unwrap()) == 0
    }

    /// Let an application's RESTART/TRUNCATE checkpoint finish instead of
    /// waiting for its busy timeout on offsite's read lock (Litestream #724).
    /// Only when everything committed is shipped; the checkpointer holds the
    /// write lock, so nothing new can be committed while R is released. Any
    /// WAL restart seen afterwards is verified (`verify_continuation`).
    pub fn yield_to_checkpointer(&mut self) -> anyhow::Result<bool> {
        if !self.pending.is_empty() || !self.checkpointer_waiting() {
            return Ok(false);
        }
        let hdr = self.wal_header()?;
        if hdr != self.hdr {
            return Ok(false);
        }
        if let Some(h) = &hdr {
            if !wal::scan(self.wal(), h, self.shipped.frames, self.shipped.cksum)?
                .commits
                .is_empty()
            {
                return Ok(false);
            }
        }
        self.restart_ok = false;
        self.end_read()?;
        // Take R back as soon as the checkpointer has copied every frame into
        // the database: R then gets read mark 0, which does not stop the
        // checkpointer from resetting the WAL but does stop any later
        // checkpoint from copying (and a restart from discarding) commits
        // offsite has not read yet. (Or when the WAL already changed, or the
        // checkpointer gave up.)
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < until {
            if self.shm_fully_backfilled()
                || self.wal_header()? != hdr
                || !self.checkpointer_waiting()
            {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.begin_read()?;
        Ok(true)
    }

    /// Every position the local WAL offers (its start and each commit end),
    /// for resuming. Changes nothing.
    pub fn local_positions(&mut self) -> anyhow::Result<Vec<WalPos>> {
        let hdr = self.wal_header()?;
        let start = WalPos::start_of(hdr.as_ref(), self.page_size);
        let mut v = vec![start];
        if let Some(h) = &hdr {
            for c in wal::scan(self.wal(), h, 0, (h.cksum1, h.cksum2))?.commits {
                v.push(start.after(&c));
            }
        }
        Ok(v)
    }

    /// Pages of pending commits' frames, read in blocks (for one pass).
    pub fn frame_blocks(&self) -> wal::FrameBlocks<'_> {
        wal::FrameBlocks::new(self.wal_parts())
    }

    /// The WAL file and its header, if there is a WAL: what a thread needs
    /// to read frames of pending commits ([`wal::FrameBlocks`]).
    pub fn wal_parts(&self) -> Option<(&File, &WalHeader)> {
        match (&self.wal_file, &self.hdr) {
            (Some(f), Some(h)) => Some((&f.0, h)),
            _ => None,
        }
    }

    /// The first `n` pending commits are durable remotely.
    pub fn mark_shipped(&mut self, n: usize) {
        let done: Vec<PendingCommit> = self.pending.drain(..n).collect();
        if let Some(last) = done.last() {
            self.shipped = self.shipped.after(&last.commit);
        }
    }

    /// Position after the first `n` pending commits (for resume tags).
    pub fn position_after(&self, n: usize) -> WalPos {
        if n == 0 {
            self.shipped
        } else {
            self.shipped.after(&self.pending[n - 1].commit)
        }
    }

    /// Checkpoint on the application's behalf (docs/SQLITE.md, "Checkpoints"),
    /// optimistically: gives up (false) if the write lock is busy or a commit
    /// slipped in after the last ship. See `checkpoint_lock` for the path
    /// that cannot be starved by a busy writer.
    pub fn checkpoint(&mut self) -> anyhow::Result<bool> {
        if !self.pending.is_empty() || !self.checkpoint_lock(Duration::from_millis(50))? {
            return Ok(false);
        }
        let res = self.checkpoint_run();
        let unlock = self.checkpoint_unlock();
        let r = res?;
        unlock?;
        Ok(r)
    }

    /// Take the write lock for a checkpoint (W). While it is held nothing can
    /// commit; the caller may poll and ship what slipped in, then call
    /// `checkpoint_run`, and must always call `checkpoint_unlock`.
    pub fn checkpoint_lock(&mut self, busy: Duration) -> anyhow::Result<bool> {
        self.lock_writer(busy)
    }

    pub fn checkpoint_unlock(&mut self) -> anyhow::Result<()> {
        self.unlock_writer()
    }

    /// With W held and everything shipped: end R, run a PASSIVE checkpoint,
    /// begin R again. False if something is still unshipped.
    pub fn checkpoint_run(&mut self) -> anyhow::Result<bool> {
        if !self.pending.is_empty() {
            return Ok(false);
        }
        let hdr = self.wal_header()?;
        if hdr != self.hdr {
            return Ok(false);
        }
        if let Some(h) = &hdr {
            let more = wal::scan(self.wal(), h, self.shipped.frames, self.shipped.cksum)?;
            if !more.commits.is_empty() {
                return Ok(false);
            }
        }
        self.end_read()?;
        let ck: rusqlite::Result<(i64, i64, i64)> =
            self.x.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        // Re-take R before W is released, whatever the checkpoint did.
        self.begin_read()?;
        let (busy, log, done) = ck.context("checkpoint failed")?;
        tracing::debug!(db = %self.db_path.display(), busy, log, done, "checkpoint");
        self.restart_ok = true;
        // Count again from here: no new checkpoint until new commits arrive.
        self.wal_frames = 0;
        Ok(true)
    }
}

/// Checkpoint the whole WAL into the database and truncate it, from a
/// connection of its own (offsite's read lock must already be released).
/// Used when the WAL outgrew `max-wal-size` while the replica was down.
/// Returns whether SQLite completed it (the application's writers or
/// readers may keep it from finishing; its own checkpoints then go on).
pub fn checkpoint_truncate(db: &Path) -> anyhow::Result<bool> {
    let c = open_conn(db, Duration::from_millis(1000))?;
    let (busy, _log, _done): (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .with_context(|| format!("checkpoint of {}", db.display()))?;
    Ok(busy == 0)
}

/// Process-wide SQLite settings for a daemon holding many databases; call
/// before any connection is opened (later calls have no effect). Without
/// it every connection allocates ~87 kB of page cache up front (three per
/// database: 260 MB for a thousand databases).
pub fn configure_process() {
    // SAFETY: sqlite3_config before sqlite3_initialize; PAGECACHE with a null
    // buffer and 0 lines only turns the up-front bulk allocation off.
    unsafe {
        rusqlite::ffi::sqlite3_config(
            rusqlite::ffi::SQLITE_CONFIG_PAGECACHE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        );
    }
}
