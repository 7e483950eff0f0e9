//! Reading a SQLite `-wal` file directly: header, frames, salts and the
//! cumulative checksum chain (docs/SQLITE.md, "What we read").
//!
//! Offsets are u64 everywhere: a WAL can exceed 4 GiB (Litestream #1442).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

pub const WAL_HEADER_SIZE: u64 = 32;
pub const FRAME_HEADER_SIZE: u64 = 24;
const MAGIC_LE: u32 = 0x377f0682;
const MAGIC_BE: u32 = 0x377f0683;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksums are computed over big-endian words (magic 0x377f0683).
    pub big_endian_cksum: bool,
    pub page_size: u32,
    pub ckpt_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    pub cksum1: u32,
    pub cksum2: u32,
}

impl WalHeader {
    /// Parse and validate a 32-byte header. `None` if the magic, version or
    /// header checksum is wrong (a WAL that SQLite would ignore too).
    pub fn parse(buf: &[u8]) -> Option<WalHeader> {
        if buf.len() < WAL_HEADER_SIZE as usize {
            return None;
        }
        let magic = be32(&buf[0..]);
        let big_endian_cksum = match magic {
            MAGIC_LE => false,
            MAGIC_BE => true,
            _ => return None,
        };
        if be32(&buf[4..]) != 3007000 {
            return None;
        }
        let page_size = be32(&buf[8..]);
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return None;
        }
        let (c1, c2) = wal_checksum(big_endian_cksum, &buf[..24], (0, 0));
        let h = WalHeader {
            big_endian_cksum,
            page_size,
            ckpt_seq: be32(&buf[12..]),
            salt1: be32(&buf[16..]),
            salt2: be32(&buf[20..]),
            cksum1: be32(&buf[24..]),
            cksum2: be32(&buf[28..]),
        };
        if (c1, c2) != (h.cksum1, h.cksum2) {
            return None;
        }
        Some(h)
    }

    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE + self.page_size as u64
    }

    /// Byte offset of frame `index` (1-based).
    pub fn frame_offset(&self, index: u32) -> u64 {
        WAL_HEADER_SIZE + (index as u64 - 1) * self.frame_size()
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from `seed`.
pub fn wal_checksum(big_endian: bool, data: &[u8], seed: (u32, u32)) -> (u32, u32) {
    debug_assert!(data.len().is_multiple_of(8));
    let (mut s1, mut s2) = seed;
    for chunk in data.chunks_exact(8) {
        let (x0, x1) = if big_endian {
            (
                u32::from_be_bytes(chunk[0..4].try_into().unwrap()),
                u32::from_be_bytes(chunk[4..8].try_into().unwrap()),
            )
        } else {
            (
                u32::from_le_bytes(chunk[0..4].try_into().unwrap()),
                u32::from_le_bytes(chunk[4..8].try_into().unwrap()),
            )
        };
        s1 = s1.wrapping_add(x0).wrapping_add(s2);
        s2 = s2.wrapping_add(x1).wrapping_add(s1);
    }
    (s1, s2)
}

/// One committed transaction found in the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalCommit {
    /// (frame index, page number) of every frame of the transaction, in WAL order.
    pub frames: Vec<(u32, u32)>,
    /// Database size in pages after the commit.
    pub db_pages: u32,
    /// Index of the commit frame (the last frame).
    pub end_frame: u32,
    /// Cumulative checksum after the commit frame.
    pub end_cksum: (u32, u32),
}

/// Result of scanning forward from a known-valid position.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub commits: Vec<WalCommit>,
}

impl Scan {
    /// Frame count and checksum after the last complete commit, if any.
    pub fn end(&self) -> Option<(u32, (u32, u32))> {
        self.commits.last().map(|c| (c.end_frame, c.end_cksum))
    }
}

/// Read the header of the WAL file. `Ok(None)`: missing, short, or invalid.
pub fn read_header(file: &File) -> io::Result<Option<WalHeader>> {
    let mut buf = [0u8; WAL_HEADER_SIZE as usize];
    match file.read_exact_at(&mut buf, 0) {
        Ok(()) => Ok(WalHeader::parse(&buf)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Scan frames after frame `start` (0 = from the beginning), whose cumulative
/// checksum is `start_cksum` (the header's checksum when `start` is 0). Stops
/// at the first frame with wrong salts or checksum, or at end of file. Only
/// complete transactions (ending in a commit frame) are returned; trailing
/// frames of an unfinished transaction are ignored.
pub fn scan(file: &File, hdr: &WalHeader, start: u32, start_cksum: (u32, u32)) -> io::Result<Scan> {
    let fsize = hdr.frame_size() as usize;
    // The common case of an idle database: no complete frame after `start`.
    // Return before allocating the read buffer.
    if file.metadata()?.len() < hdr.frame_offset(start + 1) + fsize as u64 {
        return Ok(Scan::default());
    }
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(hdr.frame_offset(start + 1)))?;
    let mut reader = io::BufReader::with_capacity(1 << 20, f);
    let mut buf = vec![0u8; fsize];
    let mut cksum = start_cksum;
    let mut index = start;
    let mut pending: Vec<(u32, u32)> = Vec::new();
    let mut out = Scan::default();
    loop {
        match reader.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let pgno = be32(&buf[0..]);
        let commit = be32(&buf[4..]);
        if be32(&buf[8..]) != hdr.salt1 || be32(&buf[12..]) != hdr.salt2 || pgno == 0 {
            break;
        }
        let c = wal_checksum(hdr.big_endian_cksum, &buf[..8], cksum);
        let c = wal_checksum(hdr.big_endian_cksum, &buf[FRAME_HEADER_SIZE as usize..], c);
        if c != (be32(&buf[16..]), be32(&buf[20..])) {
            break;
        }
        cksum = c;
        index += 1;
        pending.push((index, pgno));
        if commit != 0 {
            out.commits.push(WalCommit {
                frames: std::mem::take(&mut pending),
                db_pages: commit,
                end_frame: index,
                end_cksum: cksum,
            });
        }
    }
    Ok(out)
}

/// The salts and checksum stored in frame `index`'s header, if the file is long enough.
pub fn frame_header_at(file: &File, hdr: &WalHeader, index: u32) -> io::Result<Option<[u8; 24]>> {
    let mut b = [0u8; 24];
    match file.read_exact_at(&mut b, hdr.frame_offset(index)) {
        Ok(()) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Does frame `index` still carry salts of `hdr` and the cumulative checksum `cksum`?
pub fn frame_matches(
    file: &File,
    hdr: &WalHeader,
    index: u32,
    cksum: (u32, u32),
) -> io::Result<bool> {
    Ok(match frame_header_at(file, hdr, index)? {
        Some(b) => {
            be32(&b[8..]) == hdr.salt1
                && be32(&b[12..]) == hdr.salt2
                && (be32(&b[16..]), be32(&b[20..])) == cksum
        }
        None => false,
    })
}

/// Bytes of consecutive frames [`FrameBlocks`] reads at once.
const FRAME_BLOCK_BYTES: usize = 1 << 20;

/// Pages of frames, read a block of consecutive frames at a time: one read
/// per MiB instead of one per page (a commit's frames are consecutive). For
/// one pass over frames of complete commits already found by [`scan`]; it
/// must not outlive that pass, whose caller checks afterwards that the WAL
/// was not restarted meanwhile.
pub struct FrameBlocks<'a> {
    /// None: there is no WAL, so no frame to read.
    wal: Option<(&'a File, &'a WalHeader)>,
    buf: Vec<u8>,
    first: u32,
    count: u32,
}

impl<'a> FrameBlocks<'a> {
    pub fn new(wal: Option<(&'a File, &'a WalHeader)>) -> Self {
        FrameBlocks {
            wal,
            buf: Vec::new(),
            first: 0,
            count: 0,
        }
    }

    /// The page stored in frame `index`.
    pub fn page(&mut self, index: u32) -> io::Result<&[u8]> {
        let Some((file, hdr)) = self.wal else {
            return Err(io::Error::other(format!(
                "frame {index} asked of a database without a WAL"
            )));
        };
        let fs = hdr.frame_size() as usize;
        if index < self.first || index >= self.first + self.count {
            // A block when reading on from the last one (or first); a
            // single frame after a jump, so out-of-order frames (a page
            // written twice in a big transaction) cost no block each.
            let onward = self.count == 0 || index == self.first + self.count;
            let frames = if onward {
                (FRAME_BLOCK_BYTES / fs).max(1)
            } else {
                1
            };
            self.buf.resize(frames * fs, 0);
            let mut n = 0;
            let at = hdr.frame_offset(index);
            while n < self.buf.len() {
                match file.read_at(&mut self.buf[n..], at + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if n < fs {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("WAL frame {index} is past the end of the file"),
                ));
            }
            self.first = index;
            self.count = (n / fs) as u32;
        }
        let off = (index - self.first) as usize * fs + FRAME_HEADER_SIZE as usize;
        Ok(&self.buf[off..off + hdr.page_size as usize])
    }
}

/// Read the page stored in frame `index` into `buf` (page_size bytes).
pub fn read_frame_page(file: &File, hdr: &WalHeader, index: u32, buf: &mut [u8]) -> io::Result<()> {
    file.read_exact_at(buf, hdr.frame_offset(index) + FRAME_HEADER_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn wal_db(dir: &std::path::Path) -> Connection {
        let c = Connection::open(dir.join("t.db")).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        c.execute_batch("CREATE TABLE t(x INTEGER PRIMARY KEY, y BLOB);")
            .unwrap();
        c
    }

    #[test]
    fn parses_real_wal_and_counts_commits() {
        let d = tempfile::tempdir().unwrap();
        let c = wal_db(d.path());
        for i in 0..5 {
            c.execute("INSERT INTO t(y) VALUES (randomblob(3000 + ?1))", [i])
                .unwrap();
        }
        let f = File::open(d.path().join("t.db-wal")).unwrap();
        let h = read_header(&f).unwrap().expect("valid header");
        assert_eq!(h.page_size, 4096);
        let s = scan(&f, &h, 0, (h.cksum1, h.cksum2)).unwrap();
        // CREATE TABLE + 5 inserts = 6 commits.
        assert_eq!(s.commits.len(), 6);
        let (end, ck) = s.end().unwrap();
        let total = (f.metadata().unwrap().len() - WAL_HEADER_SIZE) / h.frame_size();
        assert_eq!(end as u64, total);
        assert!(frame_matches(&f, &h, end, ck).unwrap());
        // Continuing from the end finds nothing; continuing from commit 3 finds the rest.
        assert!(scan(&f, &h, end, ck).unwrap().commits.is_empty());
        let c3 = &s.commits[2];
        let rest = scan(&f, &h, c3.end_frame, c3.end_cksum).unwrap();
        assert_eq!(rest.commits, s.commits[3..].to_vec());
    }

    #[test]
    fn stops_at_corrupt_frame_and_torn_transaction() {
        let d = tempfile::tempdir().unwrap();
        let c = wal_db(d.path());
        for _ in 0..4 {
            c.execute("INSERT INTO t(y) VALUES (randomblob(100))", [])
                .unwrap();
        }
        let wal = d.path().join("t.db-wal");
        let bytes = std::fs::read(&wal).unwrap();
        let h = WalHeader::parse(&bytes).unwrap();
        let all = scan(&File::open(&wal).unwrap(), &h, 0, (h.cksum1, h.cksum2)).unwrap();
        assert_eq!(all.commits.len(), 5);
        // Flip a byte inside the page of the 3rd commit's first frame.
        let target = all.commits[2].frames[0].0;
        let mut bad = bytes.clone();
        let off = h.frame_offset(target) as usize + 24 + 100;
        bad[off] ^= 0xff;
        let p = d.path().join("bad-wal");
        std::fs::write(&p, &bad).unwrap();
        let s = scan(&File::open(&p).unwrap(), &h, 0, (h.cksum1, h.cksum2)).unwrap();
        assert_eq!(
            s.commits.len(),
            2,
            "scan must stop before the corrupt frame"
        );
        // Truncate in the middle of the last transaction: it must not be reported.
        let last = all.commits.last().unwrap();
        let cut = h.frame_offset(last.end_frame) as usize + 10;
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let s = scan(&File::open(&p).unwrap(), &h, 0, (h.cksum1, h.cksum2)).unwrap();
        assert_eq!(s.commits.len(), 4);
        // Wrong salt in the header → frames do not match.
        let mut h2 = h;
        h2.salt2 ^= 1;
        let s = scan(&File::open(&wal).unwrap(), &h2, 0, (h.cksum1, h.cksum2)).unwrap();
        assert!(s.commits.is_empty());
    }

    #[test]
    fn header_rejects_garbage_and_bad_checksum() {
        assert!(WalHeader::parse(&[0u8; 32]).is_none());
        let d = tempfile::tempdir().unwrap();
        let c = wal_db(d.path());
        c.execute("INSERT INTO t(y) VALUES (1)", []).unwrap();
        let mut b = std::fs::read(d.path().join("t.db-wal")).unwrap();
        assert!(WalHeader::parse(&b).is_some());
        b[17] ^= 1; // salt-1 without fixing the header checksum
        assert!(WalHeader::parse(&b).is_none());
    }

    #[test]
    fn restart_changes_salts_and_increments_ckpt_seq() {
        let d = tempfile::tempdir().unwrap();
        let c = wal_db(d.path());
        c.execute("INSERT INTO t(y) VALUES (1)", []).unwrap();
        let wal = d.path().join("t.db-wal");
        let h1 = read_header(&File::open(&wal).unwrap()).unwrap().unwrap();
        let _: (i64, i64, i64) = c
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        c.execute("INSERT INTO t(y) VALUES (2)", []).unwrap();
        let h2 = read_header(&File::open(&wal).unwrap()).unwrap().unwrap();
        assert_eq!(h2.salt1, h1.salt1.wrapping_add(1));
        assert_eq!(h2.ckpt_seq, h1.ckpt_seq.wrapping_add(1));
        assert_ne!(h2.salt2, h1.salt2);
    }
}
