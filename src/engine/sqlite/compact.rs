//! Compaction (docs/FORMAT.md, "Compaction"): merged segments at several
//! levels, so a restore reads a bounded number of objects.
//!
//! Compaction happens at the source, before encryption: the shipper holds
//! only public age recipients and cannot read its own backups, so it cannot
//! download and merge them. Instead, every commit it ships is also folded
//! into the open window of level 1 (the newest version of each page, kept in
//! a local page file); when a window's time is over, its merged commit is
//! written as a level-1 segment and folded into the open window of level 2,
//! and so on. Windows are aligned to multiples of their length in commit
//! time, and level-0 segments never straddle a level-1 window, so objects of
//! all levels tile the txid line.
//!
//! Disk: one page file per level, each at most the database size (a page
//! rewritten many times keeps one slot). Memory: a slot map per level.
//! A window that was open when offsite stopped is lost; its range is then
//! restored from level-0 segments (slower, never wrong).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use super::checksum::Checksum;
use super::pages::{self, SegmentFields};
use crate::segment::{Link, SegmentHeader, SegmentWriter};

/// Newest version of each page, in a local file with one slot per page.
struct PageStore {
    file: File,
    page_size: usize,
    slots: HashMap<u32, u64>,
    free: Vec<u64>,
    next_slot: u64,
}

impl PageStore {
    fn new(dir: &std::path::Path, page_size: usize) -> io::Result<PageStore> {
        Ok(PageStore {
            file: tempfile::tempfile_in(dir)?,
            page_size,
            slots: HashMap::new(),
            free: Vec::new(),
            next_slot: 0,
        })
    }

    fn put(&mut self, pgno: u32, page: &[u8]) -> io::Result<()> {
        let slot = match self.slots.get(&pgno) {
            Some(&s) => s,
            None => {
                let s = self.free.pop().unwrap_or_else(|| {
                    self.next_slot += 1;
                    self.next_slot - 1
                });
                self.slots.insert(pgno, s);
                s
            }
        };
        self.file.write_all_at(page, slot * self.page_size as u64)
    }

    fn get(&self, pgno: u32, buf: &mut [u8]) -> io::Result<()> {
        let slot = self.slots[&pgno];
        self.file.read_exact_at(buf, slot * self.page_size as u64)
    }

    /// Forget pages past `pages` (the database was truncated).
    fn truncate(&mut self, pages: u32) {
        let gone: Vec<u32> = self.slots.keys().copied().filter(|&p| p > pages).collect();
        for p in gone {
            let s = self.slots.remove(&p).unwrap();
            self.free.push(s);
        }
    }

    fn sorted_pages(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.slots.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// The merged commits of one window of one level.
struct Window {
    start_us: i64,
    first_txid: u64,
    last_txid: u64,
    last_time_us: i64,
    prev_ck: Checksum,
    end_ck: Checksum,
    /// Chain links before the first and after the last commit.
    prev_link: Link,
    end_link: Link,
    /// Smallest database size seen in the window.
    min_pages: u32,
    db_pages: u32,
    store: PageStore,
    /// Lower-level windows merged into this one (levels 2 and up).
    parts: u32,
}

/// A window whose time is over: ready to be written as a compacted segment.
pub struct Closed {
    pub level: u8,
    w: Window,
}

impl Closed {
    pub fn first_txid(&self) -> u64 {
        self.w.first_txid
    }
    pub fn last_txid(&self) -> u64 {
        self.w.last_txid
    }
    pub fn last_time_us(&self) -> i64 {
        self.w.last_time_us
    }
    pub fn end_checksum(&self) -> Checksum {
        self.w.end_ck
    }
    pub fn end_link(&self) -> Link {
        self.w.end_link
    }
    pub fn raw_bytes(&self) -> u64 {
        (self.w.store.slots.len() * self.w.store.page_size) as u64
    }

    pub fn header(&self, lineage: &str, envelope_blake3: String) -> SegmentHeader {
        pages::segment_header(
            lineage,
            envelope_blake3,
            (self.w.first_txid, self.w.last_txid),
            1,
            self.level,
            self.w.prev_link,
            Some(self.w.end_link),
            SegmentFields::new(self.w.store.page_size as u32, Some(self.w.min_pages)),
        )
    }

    /// Write the body (one merged commit, pages in order).
    pub fn write_body<W: Write>(&self, sink: W, header: &SegmentHeader) -> anyhow::Result<W> {
        let mut sw = SegmentWriter::new(sink, header)?;
        let pages = self.w.store.sorted_pages();
        let ps = self.w.store.page_size;
        pages::begin_commit(
            &mut sw,
            (self.w.last_txid, self.w.last_time_us),
            self.w.db_pages,
            pages.len() as u32,
            ps as u32,
        )?;
        let mut buf = vec![0u8; ps];
        for p in pages {
            self.w.store.get(p, &mut buf)?;
            pages::write_record(&mut sw, self.w.db_pages, p, &buf)?;
        }
        sw.end_commit(&self.w.end_ck.0)?;
        Ok(sw.finish()?)
    }
}

pub struct Compactor {
    lengths: Vec<i64>,
    windows: Vec<Option<Window>>,
    page_size: usize,
    dir: PathBuf,
    /// The commit being added: (txid, time, prev checksum).
    open: Option<(u64, i64)>,
}

fn align(t: i64, len: i64) -> i64 {
    t - t.rem_euclid(len)
}

impl Compactor {
    /// `levels`: window lengths of levels 1.., ascending, each a multiple of
    /// the one before (checked by the config).
    pub fn new(levels: &[Duration], page_size: usize, dir: PathBuf) -> Compactor {
        Compactor {
            lengths: levels.iter().map(|d| d.as_micros() as i64).collect(),
            windows: levels.iter().map(|_| None).collect(),
            page_size,
            dir,
            open: None,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.lengths.is_empty()
    }

    /// Start of the level-1 window holding commit time `t` (level-0 segments
    /// never cross it).
    pub fn l1_window(&self, t: i64) -> Option<i64> {
        self.lengths.first().map(|&len| align(t, len))
    }

    /// Drop every open window (after a continuity break or an error).
    pub fn reset(&mut self) {
        for w in &mut self.windows {
            *w = None;
        }
        self.open = None;
    }

    /// Close every window that ends at or before `t`. Call with the time of
    /// the next commit before adding it, or with a time before which every
    /// commit has been added.
    /// Does any open window end at or before `t`? (No I/O.)
    pub fn any_due(&self, t: i64) -> bool {
        self.windows
            .iter()
            .zip(&self.lengths)
            .any(|(w, len)| w.as_ref().is_some_and(|w| w.start_us + len <= t))
    }

    pub fn close_due(&mut self, t: i64) -> io::Result<Vec<Closed>> {
        let mut out = Vec::new();
        for i in 0..self.lengths.len() {
            let due = self.windows[i]
                .as_ref()
                .is_some_and(|w| w.start_us + self.lengths[i] <= t);
            if !due {
                continue;
            }
            let w = self.windows[i].take().unwrap();
            if i + 1 < self.lengths.len() {
                if let Err(e) = self.merge_up(i + 1, &w) {
                    self.reset();
                    return Err(e);
                }
            }
            // A window that merged a single lower window holds exactly that
            // window's object again (same range, same pages): not written.
            if i > 0 && w.parts <= 1 {
                continue;
            }
            out.push(Closed {
                level: (i + 1) as u8,
                w,
            });
        }
        Ok(out)
    }

    fn merge_up(&mut self, i: usize, w: &Window) -> io::Result<()> {
        if self.windows[i]
            .as_ref()
            .is_some_and(|u| u.last_txid + 1 != w.first_txid)
        {
            self.windows[i] = None;
        }
        if self.windows[i].is_none() {
            self.windows[i] = Some(Window {
                start_us: align(w.start_us, self.lengths[i]),
                first_txid: w.first_txid,
                last_txid: w.first_txid - 1,
                last_time_us: w.last_time_us,
                prev_ck: w.prev_ck,
                end_ck: w.prev_ck,
                prev_link: w.prev_link,
                end_link: w.prev_link,
                min_pages: w.min_pages,
                db_pages: w.db_pages,
                store: PageStore::new(&self.dir, self.page_size)?,
                parts: 0,
            });
        }
        let u = self.windows[i].as_mut().unwrap();
        u.parts += 1;
        u.store.truncate(w.min_pages);
        let mut buf = vec![0u8; self.page_size];
        for p in w.store.sorted_pages() {
            w.store.get(p, &mut buf)?;
            u.store.put(p, &buf)?;
        }
        u.min_pages = u.min_pages.min(w.min_pages);
        u.db_pages = w.db_pages;
        u.last_txid = w.last_txid;
        u.last_time_us = w.last_time_us;
        u.end_ck = w.end_ck;
        u.end_link = w.end_link;
        Ok(())
    }

    /// Start adding commit `txid`; `prev` is the state checksum and chain
    /// link before it.
    pub fn begin_commit(
        &mut self,
        txid: u64,
        time_us: i64,
        (prev, prev_link): (Checksum, Link),
    ) -> io::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let len = self.lengths[0];
        if let Some(w) = &self.windows[0] {
            if w.last_txid + 1 != txid || align(time_us, len) != w.start_us {
                // Not a continuation of the open window: start over.
                self.reset();
            }
        }
        if self.windows[0].is_none() {
            self.windows[0] = Some(Window {
                start_us: align(time_us, len),
                first_txid: txid,
                last_txid: txid - 1,
                last_time_us: time_us,
                prev_ck: prev,
                end_ck: prev,
                prev_link,
                end_link: prev_link,
                min_pages: u32::MAX,
                db_pages: 0,
                store: PageStore::new(&self.dir, self.page_size)?,
                parts: 0,
            });
        }
        self.open = Some((txid, time_us));
        Ok(())
    }

    pub fn put_page(&mut self, pgno: u32, page: &[u8]) -> io::Result<()> {
        match self.windows.first_mut().and_then(|w| w.as_mut()) {
            Some(w) if self.open.is_some() => w.store.put(pgno, page),
            _ => Ok(()),
        }
    }

    pub fn end_commit(&mut self, db_pages: u32, (end, end_link): (Checksum, Link)) {
        let Some((txid, time_us)) = self.open.take() else {
            return;
        };
        if let Some(Some(w)) = self.windows.first_mut() {
            w.store.truncate(db_pages);
            w.min_pages = w.min_pages.min(db_pages);
            w.db_pages = db_pages;
            w.last_txid = txid;
            w.last_time_us = time_us;
            w.end_ck = end;
            w.end_link = end_link;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::checksum::PageState;
    use super::*;
    use crate::codec::{
        open_object, Encryption, Envelope, EnvelopeMeta, ObjectKind, ObjectWriter, Seal,
    };
    use crate::segment::{BodyReader, Header};

    fn page(ps: usize, v: u8) -> Vec<u8> {
        vec![v; ps]
    }

    /// Apply a merged segment to a page vector the way restore does.
    fn apply_closed(c: &Closed, db: &mut Vec<Vec<u8>>, ps: usize) -> Checksum {
        let seal = Seal::unsigned(Encryption::None);
        let env = Envelope::new(
            ObjectKind::Segment,
            &seal,
            EnvelopeMeta {
                engine: "sqlite".into(),
                replica: String::new(),
                database: String::new(),
                lineage: "l".into(),
                first_txid: c.first_txid(),
                last_txid: c.last_txid(),
                time_us: c.last_time_us(),
                level: 1,
                signer: String::new(),
                link: c.end_link().to_hex(),
                resume: serde_json::Value::Null,
            },
        );
        let h = c.header("l", env.blake3_hex());
        let ow = ObjectWriter::new(Vec::new(), &env, &seal).unwrap();
        let bytes = c.write_body(ow, &h).unwrap().finish().unwrap();
        let (env2, body) = open_object(&bytes[..], bytes.len() as u64, None).unwrap();
        let (mut br, hdr) = BodyReader::open(body, &env2).unwrap();
        let Header::Segment(h2) = hdr else { panic!() };
        let f = SegmentFields::parse(&h2.payload).unwrap();
        db.truncate(f.truncate_to.unwrap() as usize);
        br.read_commit_head().unwrap();
        let mut start = [0u8; 8];
        br.payload().read_exact(&mut start).unwrap();
        let db_pages = u32::from_le_bytes(start[..4].try_into().unwrap());
        let records = u32::from_le_bytes(start[4..].try_into().unwrap());
        let mut buf = vec![0u8; ps];
        let mut pgno = [0u8; 4];
        for _ in 0..records {
            br.payload().read_exact(&mut pgno).unwrap();
            br.payload().read_exact(&mut buf).unwrap();
            let p = u32::from_le_bytes(pgno);
            if db.len() < p as usize {
                db.resize(p as usize, vec![0u8; ps]);
            }
            db[p as usize - 1] = buf.clone();
        }
        db.resize(db_pages as usize, vec![0u8; ps]);
        let ck = Checksum(br.read_digest().unwrap());
        br.finish().unwrap();
        ck
    }

    fn state_of(db: &[Vec<u8>], ps: usize) -> Checksum {
        let mut st = PageState::new(ps);
        for (i, p) in db.iter().enumerate() {
            st.set_page(i as u32 + 1, p);
        }
        st.resize(db.len() as u32);
        st.checksum()
    }

    /// Random commits (writes, truncations, regrowth) folded into two
    /// levels. Level-1 objects applied in turn, and the objects a restore
    /// would pick (the one reaching furthest at each step, over both levels),
    /// give exactly the state of applying every commit in turn; a level-2
    /// window holding a single level-1 window is not written again.
    #[test]
    fn merged_windows_equal_sequential_apply() {
        let ps = 512;
        let dir = tempfile::tempdir().unwrap();
        let mut c = Compactor::new(
            &[Duration::from_micros(10), Duration::from_micros(40)],
            ps,
            dir.path().to_path_buf(),
        );
        let mut rng = 12345u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let initial: Vec<Vec<u8>> = vec![page(ps, 1); 5];
        let mut truth = initial.clone();
        let mut truth_ck: std::collections::HashMap<u64, Checksum> = Default::default();
        let mut closed: Vec<Closed> = Vec::new();
        let mut t = 0i64;
        for txid in 1..=400u64 {
            // Bursts and pauses, so some level-2 windows hold one level-1 window.
            t += match next() % 10 {
                0 => 45,
                _ => (next() % 4) as i64,
            };
            closed.extend(c.close_due(t).unwrap());
            let prev = state_of(&truth, ps);
            c.begin_commit(txid, t, (prev, Link(prev.0))).unwrap();
            let new_len = match next() % 10 {
                0 => (truth.len() as u64 / 2).max(1),
                1 => truth.len() as u64 + 3,
                _ => truth.len() as u64,
            } as usize;
            truth.resize(new_len, vec![0u8; ps]);
            for _ in 0..(next() % 4) {
                let p = (next() % new_len as u64) as usize;
                truth[p] = page(ps, (next() % 250) as u8 + 2);
                c.put_page(p as u32 + 1, &truth[p]).unwrap();
            }
            let ck = state_of(&truth, ps);
            truth_ck.insert(txid, ck);
            c.end_commit(new_len as u32, (ck, Link(ck.0)));
        }
        closed.extend(c.close_due(i64::MAX).unwrap());
        let l1: Vec<&Closed> = closed.iter().filter(|w| w.level == 1).collect();
        let l2: Vec<&Closed> = closed.iter().filter(|w| w.level == 2).collect();
        assert!(l1.len() > 20 && l2.len() > 3, "{} {}", l1.len(), l2.len());
        // No level-2 object repeats a level-1 object's range.
        for w in &l2 {
            assert!(
                !l1.iter()
                    .any(|v| (v.first_txid(), v.last_txid()) == (w.first_txid(), w.last_txid())),
                "duplicate range {}..={}",
                w.first_txid(),
                w.last_txid()
            );
        }
        // Level 1 alone, in turn.
        let mut db = initial.clone();
        for w in &l1 {
            let ck = apply_closed(w, &mut db, ps);
            assert_eq!(
                ck,
                truth_ck[&w.last_txid()],
                "level 1 up to {}",
                w.last_txid()
            );
            assert_eq!(state_of(&db, ps), ck);
        }
        assert_eq!(db, truth);
        // The restore planner's route over both levels.
        let mut db = initial.clone();
        let (mut at, mut used_l2) = (0u64, 0);
        while at < 400 {
            let w = closed
                .iter()
                .filter(|w| w.first_txid() == at + 1)
                .max_by_key(|w| w.last_txid())
                .expect("objects tile the txid line");
            used_l2 += (w.level == 2) as usize;
            let ck = apply_closed(w, &mut db, ps);
            assert_eq!(ck, truth_ck[&w.last_txid()]);
            assert_eq!(state_of(&db, ps), ck);
            at = w.last_txid();
        }
        assert!(used_l2 > 0);
        assert_eq!(db, truth);
    }
}
