//! Restoring SQLite: pages applied to a file, the page-state checksum kept
//! along, and `PRAGMA integrity_check` on the result.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};

use super::checksum::{page_term, PageState};
use super::pages::{SegmentFields, SnapshotFields};
use crate::engine::{ExactRead, Replay};
use crate::segment::Digest;

/// Pages a commit may add beyond the pages it writes. SQLite writes every
/// page it adds to a database except the lock-byte page (at 1 GiB), so a
/// real commit adds at most one unwritten page; a declared size far beyond
/// what a commit carries is hostile or damaged and would make the restore
/// extend the file with zeros and hash every added page.
const MAX_UNWRITTEN_GROWTH: u64 = 64;

/// Bytes of page state kept per page (a hash per page, see `PageState`).
const STATE_BYTES_PER_PAGE: u64 = 16;

/// Free bytes on the filesystem holding `f`.
fn free_bytes(f: &File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatvfs on a valid descriptor into a zeroed struct.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::fstatvfs(f.as_raw_fd(), &mut st) == 0 {
            Some(st.f_bavail as u64 * st.f_frsize as u64)
        } else {
            None
        }
    }
}

/// Memory available to this process (Linux: MemAvailable), if known.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The page state of the database being restored (or verified), and the
/// file it is written to.
pub struct PageReplay {
    state: Option<PageState>,
    out: Option<File>,
    segment: Option<SegmentFields>,
    buf: Vec<u8>,
}

impl PageReplay {
    pub fn new(out: Option<File>) -> PageReplay {
        PageReplay {
            state: None,
            out,
            segment: None,
            buf: Vec::new(),
        }
    }

    /// Before a state grows to `db_pages` pages: the output must have room
    /// for it, and the page state must fit in memory. Checked before any
    /// byte is written or allocated, so a hostile declared size fails fast
    /// with a clear error instead of filling the disk or the memory.
    fn check_capacity(&self, db_pages: u32, page_size: usize) -> anyhow::Result<()> {
        let bytes = db_pages as u64 * page_size as u64;
        if let Some(f) = self.out.as_ref() {
            let have = f.metadata().map(|m| m.len()).unwrap_or(0);
            if let Some(free) = free_bytes(f) {
                ensure!(
                    bytes.saturating_sub(have) <= free,
                    "the database would grow to {bytes} bytes ({db_pages} pages), but the output filesystem has {free} bytes free: free space or restore elsewhere (if the replica's database is not that large, the object is damaged or hostile)"
                );
            }
        }
        let state = db_pages as u64 * STATE_BYTES_PER_PAGE;
        if let Some(mem) = available_memory() {
            ensure!(
                state <= mem / 2,
                "the database would have {db_pages} pages, whose page state needs {state} bytes of memory, more than half of what is available ({mem}); refusing (a damaged or hostile size?)"
            );
        }
        Ok(())
    }

    fn state(&mut self) -> anyhow::Result<&mut PageState> {
        self.state
            .as_mut()
            .context("a segment was applied before any snapshot")
    }
}

impl Replay for PageReplay {
    fn snapshot(
        &mut self,
        header: &serde_json::Value,
        data: &mut dyn ExactRead,
    ) -> anyhow::Result<Digest> {
        let f = SnapshotFields::parse(header)?;
        let ps = f.page_size as usize;
        self.check_capacity(f.db_pages, ps)?;
        let mut state = PageState::new(ps);
        self.buf.resize(ps, 0);
        let mut w = match self.out.as_mut() {
            Some(file) => {
                file.set_len(0)?;
                file.seek(SeekFrom::Start(0))?;
                Some(BufWriter::with_capacity(1 << 20, file))
            }
            None => None,
        };
        for pgno in 1..=f.db_pages {
            data.read_exact(&mut self.buf)?;
            state.set_page(pgno, &self.buf);
            if let Some(w) = w.as_mut() {
                w.write_all(&self.buf)?;
            }
        }
        if let Some(mut w) = w {
            w.flush()?;
        }
        state.resize(f.db_pages);
        let d = state.checksum().0;
        self.state = Some(state);
        self.segment = None;
        Ok(d)
    }

    fn begin_segment(&mut self, header: &serde_json::Value) -> anyhow::Result<()> {
        let f = SegmentFields::parse(header)?;
        // (No state: a segment checked on its own, off the chain.)
        if let Some(have) = self.state.as_ref().map(|s| s.page_size()) {
            ensure!(
                f.page_size as usize == have,
                "page size {} differs from the snapshot's {have}",
                f.page_size
            );
        }
        self.buf.resize(f.page_size as usize, 0);
        self.segment = Some(f);
        Ok(())
    }

    fn commit(&mut self, payload: &mut dyn ExactRead) -> anyhow::Result<Digest> {
        let seg = self.segment.clone().context("commit outside a segment")?;
        let ps = seg.page_size as usize;
        let (db_pages, records) = read_start(payload, seg.page_size)?;
        let before = match seg.truncate_to {
            Some(t) => t.min(self.state()?.pages()),
            None => self.state()?.pages(),
        };
        ensure!(
            db_pages as u64 <= before as u64 + records as u64 + MAX_UNWRITTEN_GROWTH,
            "commit grows the database from {before} to {db_pages} pages but carries only {records} pages (SQLite writes the pages it adds): refusing a declared size that is damaged or hostile"
        );
        if db_pages > before {
            self.check_capacity(db_pages, ps)?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        // The state grows only once every record was read: `records` is
        // declared, so growth bounded by it is not bounded by the input
        // until the records are there. Until then, the terms of pages past
        // the current end wait here (bounded by the records read).
        let mut past_end: Vec<(u32, u128)> = Vec::new();
        let r = (|| {
            if let Some(t) = seg.truncate_to {
                ensure!(
                    t <= db_pages,
                    "compacted segment truncation size {t} is invalid"
                );
                if let Some(f) = self.out.as_ref() {
                    f.set_len(t as u64 * ps as u64)?;
                }
                // Shrink now; growing to `t` (zero pages) is part of growing
                // to `db_pages >= t` below, with the same result.
                let st = self.state()?;
                st.resize(t.min(st.pages()));
            }
            for _ in 0..records {
                let pgno = read_record(payload, &mut buf, db_pages)?;
                if let Some(f) = self.out.as_ref() {
                    f.write_all_at(&buf, (pgno as u64 - 1) * ps as u64)?;
                }
                let st = self.state()?;
                if pgno > st.pages() {
                    past_end.push((pgno, page_term(pgno, &buf)));
                } else {
                    st.set_page(pgno, &buf);
                }
            }
            if let Some(f) = self.out.as_ref() {
                f.set_len(db_pages as u64 * ps as u64)?;
            }
            let st = self.state()?;
            st.resize(db_pages);
            // In record order, as if applied as read (a page number occurs
            // at most once per commit anyway).
            for (pgno, term) in past_end {
                st.set_term(pgno, term);
            }
            Ok(st.checksum().0)
        })();
        self.buf = buf;
        r
    }

    fn check_commit(&mut self, payload: &mut dyn ExactRead) -> anyhow::Result<()> {
        let seg = self.segment.clone().context("commit outside a segment")?;
        let (db_pages, records) = read_start(payload, seg.page_size)?;
        let mut buf = vec![0u8; seg.page_size as usize];
        for _ in 0..records {
            read_record(payload, &mut buf, db_pages)?;
        }
        Ok(())
    }

    fn digest(&self) -> Digest {
        self.state
            .as_ref()
            .map(|s| s.checksum().0)
            .unwrap_or_default()
    }

    fn fork(&self) -> Box<dyn Replay> {
        Box::new(PageReplay {
            state: self.state.clone(),
            out: None,
            segment: self.segment.clone(),
            buf: Vec::new(),
        })
    }

    fn sync(&mut self) -> anyhow::Result<()> {
        if let Some(f) = self.out.as_ref() {
            f.sync_all()?;
        }
        Ok(())
    }
}

/// A commit payload's start: database size and record count, checked
/// against the payload's length.
fn read_start(payload: &mut dyn ExactRead, page_size: u32) -> anyhow::Result<(u32, u32)> {
    let mut b = [0u8; 8];
    payload.read_exact(&mut b)?;
    let db_pages = u32::from_le_bytes(b[..4].try_into().unwrap());
    let records = u32::from_le_bytes(b[4..].try_into().unwrap());
    ensure!(
        records <= db_pages,
        "commit carries {records} page records for a database of {db_pages} pages (each page at most once)"
    );
    ensure!(
        super::pages::commit_len(records, page_size) - 8 == payload.remaining(),
        "commit payload length does not match its {records} page records"
    );
    Ok((db_pages, records))
}

/// One page record into `page`; its page number, checked to lie inside a
/// database of `db_pages` pages.
fn read_record(payload: &mut dyn ExactRead, page: &mut [u8], db_pages: u32) -> anyhow::Result<u32> {
    let mut b = [0u8; 4];
    payload.read_exact(&mut b)?;
    payload.read_exact(page)?;
    let pgno = u32::from_le_bytes(b);
    ensure!(
        pgno >= 1 && pgno <= db_pages,
        "record for page {pgno} outside the database"
    );
    Ok(pgno)
}

/// The files a restored database occupies: the database and its WAL and
/// shared-memory files (a stale `-wal` beside a restored database would be
/// replayed over it by SQLite).
pub fn files_of(path: &Path) -> Vec<PathBuf> {
    let with = |suffix: &str| {
        let mut s = path.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    vec![path.to_path_buf(), with("-wal"), with("-shm")]
}

/// `PRAGMA integrity_check` on the restored file; anything but "ok" fails.
pub fn integrity_check(path: &Path) -> anyhow::Result<()> {
    let c = rusqlite::Connection::open(path)
        .with_context(|| format!("cannot open restored database {}", path.display()))?;
    let mut stmt = c.prepare("PRAGMA integrity_check")?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()
        .context("integrity_check failed to run on the restored database")?;
    drop(stmt);
    c.close().map_err(|(_, e)| e)?;
    if rows != ["ok"] {
        bail!(
            "restored database fails PRAGMA integrity_check: {}",
            rows.into_iter().take(5).collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ExactRead;

    /// Bytes handed out as a payload (or endless zeros: a decompression bomb).
    struct Bytes {
        data: Vec<u8>,
        at: usize,
        zeros_forever: bool,
    }

    impl ExactRead for Bytes {
        fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
            if self.zeros_forever {
                buf.fill(0);
                self.at += buf.len();
                return Ok(());
            }
            ensure!(self.at + buf.len() <= self.data.len(), "short");
            buf.copy_from_slice(&self.data[self.at..self.at + buf.len()]);
            self.at += buf.len();
            Ok(())
        }
        fn remaining(&self) -> u64 {
            if self.zeros_forever {
                u64::MAX
            } else {
                (self.data.len() - self.at) as u64
            }
        }
    }

    fn snapshot(r: &mut PageReplay, pages: u32) {
        let mut data = Bytes {
            data: vec![7u8; 512 * pages as usize],
            at: 0,
            zeros_forever: false,
        };
        r.snapshot(&SnapshotFields::new(512, pages).to_value(), &mut data)
            .unwrap();
    }

    fn commit(r: &mut PageReplay, db_pages: u32, records: &[u32]) -> anyhow::Result<Digest> {
        r.begin_segment(&SegmentFields::new(512, None).to_value())?;
        let mut p = Vec::new();
        p.extend_from_slice(&db_pages.to_le_bytes());
        p.extend_from_slice(&(records.len() as u32).to_le_bytes());
        for pg in records {
            p.extend_from_slice(&pg.to_le_bytes());
            p.extend_from_slice(&[1u8; 512]);
        }
        r.commit(&mut Bytes {
            data: p,
            at: 0,
            zeros_forever: false,
        })
    }

    /// A tiny commit declaring `db_pages = 0xFFFFFFFF` made restore extend
    /// the output to ~2 TiB and verify allocate ~64 GiB of page state.
    #[test]
    fn a_declared_size_beyond_the_written_pages_is_refused_before_anything_grows() {
        let tmp = tempfile::tempdir().unwrap();
        let out = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp.path().join("out.db"))
            .unwrap();
        for file in [Some(out), None] {
            let with_file = file.is_some();
            let mut r = PageReplay::new(file);
            snapshot(&mut r, 4);
            let e = format!("{:#}", commit(&mut r, u32::MAX, &[1]).unwrap_err());
            assert!(e.contains("grows the database"), "{e}");
            assert_eq!(r.state.as_ref().unwrap().pages(), 4);
            if with_file {
                let len = r.out.as_ref().unwrap().metadata().unwrap().len();
                assert_eq!(len, 4 * 512, "the output grew");
            }
            // A real growth (pages written, plus the lock-byte page) applies.
            commit(&mut r, 7, &[5, 6]).unwrap();
            assert_eq!(r.state.as_ref().unwrap().pages(), 7);
            // More records than pages: refused.
            let e = format!("{:#}", commit(&mut r, 1, &[1, 1]).unwrap_err());
            assert!(e.contains("each page at most once"), "{e}");
        }
    }

    /// A snapshot whose zstd stream is endless zeros (RLE blocks) declaring a
    /// huge database: refused before a byte is written, because the output
    /// filesystem cannot hold it (and its page state would not fit in memory).
    #[test]
    fn a_decompression_bomb_cannot_fill_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("out.db");
        let out = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mut r = PageReplay::new(Some(out));
        let mut bomb = Bytes {
            data: Vec::new(),
            at: 0,
            zeros_forever: true,
        };
        let e = r
            .snapshot(&SnapshotFields::new(65536, u32::MAX).to_value(), &mut bomb)
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("bytes free") || e.contains("memory"), "{e}");
        assert_eq!(bomb.at, 0, "bytes were read before the size was checked");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Without an output (verify, drills): the page state must fit in
        // memory (64 GiB here; a machine with more would read the bomb).
        if available_memory().is_none_or(|m| m / 2 >= u32::MAX as u64 * STATE_BYTES_PER_PAGE) {
            return;
        }
        let mut r = PageReplay::new(None);
        let e = r
            .snapshot(&SnapshotFields::new(512, u32::MAX).to_value(), &mut bomb)
            .unwrap_err();
        assert!(format!("{e:#}").contains("memory"), "{e:#}");
    }
}
