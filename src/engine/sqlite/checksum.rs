//! The state checksum (docs/FORMAT.md, "State checksum"): a digest of a whole
//! page store that can be updated one page at a time.

use std::fmt;

/// A 128-bit state checksum as stored in objects.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Checksum(pub [u8; 16]);

impl Checksum {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// first16(BLAKE3("offsite-state-tag-v1" || checksum)), stored in plaintext
    /// envelopes so a shipper without keys can recognise a state.
    pub fn state_tag(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"offsite-state-tag-v1");
        h.update(&self.0);
        hex::encode(&h.finalize().as_bytes()[..16])
    }

    pub fn from_hex(s: &str) -> anyhow::Result<Self> {
        let v = hex::decode(s).map_err(|e| anyhow::anyhow!("invalid checksum {s:?}: {e}"))?;
        let arr: [u8; 16] = v
            .try_into()
            .map_err(|_| anyhow::anyhow!("invalid checksum {s:?}: expected 32 hex digits"))?;
        Ok(Checksum(arr))
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

/// Hash term of one page: first16(BLAKE3(le32(pgno) || page)).
pub fn page_term(pgno: u32, page: &[u8]) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(&pgno.to_le_bytes());
    h.update(page);
    let out = h.finalize();
    u128::from_le_bytes(out.as_bytes()[..16].try_into().unwrap())
}

/// Pages from which [`terms_parallel`] hashes on more than one thread.
const PARALLEL_MIN_PAGES: usize = 1024;

/// The terms of `n` pages, hashed on every core: `read(range, sink)` hands
/// pages `range` (of `0..n`, in order) to `sink` as (page number, page), and
/// runs on several threads at once, each with its own range. The terms come
/// back in order: the caller applies them to its state one by one.
pub fn terms_parallel<F>(n: usize, read: F) -> anyhow::Result<Vec<u128>>
where
    F: Fn(std::ops::Range<usize>, &mut dyn FnMut(u32, &[u8])) -> anyhow::Result<()> + Sync,
{
    let threads = if n < PARALLEL_MIN_PAGES {
        1
    } else {
        std::thread::available_parallelism()
            .map(|t| t.get())
            .unwrap_or(1)
            .clamp(1, 4)
    };
    let part = n.div_ceil(threads.max(1)).max(1);
    let hash = |range: std::ops::Range<usize>| -> anyhow::Result<Vec<u128>> {
        let mut out = Vec::with_capacity(range.len());
        read(range, &mut |pgno, page| out.push(page_term(pgno, page)))?;
        Ok(out)
    };
    if threads <= 1 {
        return hash(0..n);
    }
    let parts: Vec<anyhow::Result<Vec<u128>>> = std::thread::scope(|s| {
        let hash = &hash;
        let handles: Vec<_> = (0..n)
            .step_by(part)
            .skip(1)
            .map(|a| s.spawn(move || hash(a..(a + part).min(n))))
            .collect();
        let mut all = vec![hash(0..part.min(n))];
        all.extend(handles.into_iter().map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a hashing thread panicked")))
        }));
        all
    });
    let mut terms = Vec::with_capacity(n);
    for p in parts {
        terms.extend(p?);
    }
    anyhow::ensure!(terms.len() == n, "hashed {} pages of {n}", terms.len());
    Ok(terms)
}

/// Incrementally maintained state of a page store: one hash term per page.
///
/// Memory is 16 bytes per page (40 MiB for a 10 GiB database of 4 KiB pages).
#[derive(Clone)]
pub struct PageState {
    page_size: usize,
    terms: Vec<u128>,
    acc: u128,
    zero_page: Vec<u8>,
    journal: Option<Vec<Undo>>,
}

#[derive(Clone)]
enum Undo {
    Set(usize, u128),
    Popped(u128),
    Pushed,
}

impl PageState {
    pub fn new(page_size: usize) -> Self {
        PageState {
            page_size,
            terms: Vec::new(),
            acc: 0,
            zero_page: vec![0u8; page_size],
            journal: None,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn pages(&self) -> u32 {
        self.terms.len() as u32
    }

    fn zero_term(&self, pgno: u32) -> u128 {
        // Pages past the old end of a growing file read as zeros.
        page_term(pgno, &self.zero_page)
    }

    /// Set page `pgno` (1-based) to `page`, growing the store with zero pages if needed.
    pub fn set_page(&mut self, pgno: u32, page: &[u8]) {
        debug_assert_eq!(page.len(), self.page_size);
        self.set_term(pgno, page_term(pgno, page));
    }

    /// [`set_page`](Self::set_page) with the page's term computed already
    /// (`page_term(pgno, page)`).
    pub fn set_term(&mut self, pgno: u32, new: u128) {
        assert!(pgno >= 1, "page numbers start at 1");
        if pgno as usize > self.terms.len() {
            // Pages before it read as zeros; the page itself is `new` (no
            // zero-page term hashed only to be replaced: appending pages,
            // the common case, costs one hash per page, not two).
            self.resize(pgno - 1);
            self.acc ^= new;
            self.terms.push(new);
            if let Some(j) = &mut self.journal {
                j.push(Undo::Pushed);
            }
            return;
        }
        let idx = pgno as usize - 1;
        if let Some(j) = &mut self.journal {
            j.push(Undo::Set(idx, self.terms[idx]));
        }
        self.acc ^= self.terms[idx] ^ new;
        self.terms[idx] = new;
    }

    /// Truncate or extend (with zero pages) to `pages` pages.
    pub fn resize(&mut self, pages: u32) {
        let pages = pages as usize;
        while self.terms.len() > pages {
            let t = self.terms.pop().unwrap();
            self.acc ^= t;
            if let Some(j) = &mut self.journal {
                j.push(Undo::Popped(t));
            }
        }
        while self.terms.len() < pages {
            let pgno = self.terms.len() as u32 + 1;
            let t = self.zero_term(pgno);
            self.acc ^= t;
            self.terms.push(t);
            if let Some(j) = &mut self.journal {
                j.push(Undo::Pushed);
            }
        }
    }

    /// Start recording changes so they can be undone (a segment whose upload fails).
    pub fn begin(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// Keep the changes made since `begin`.
    pub fn commit(&mut self) {
        self.journal = None;
    }

    /// Undo every change made since `begin`.
    pub fn rollback(&mut self) {
        if let Some(j) = self.journal.take() {
            for u in j.into_iter().rev() {
                match u {
                    Undo::Set(idx, old) => {
                        self.acc ^= self.terms[idx] ^ old;
                        self.terms[idx] = old;
                    }
                    Undo::Popped(t) => {
                        self.acc ^= t;
                        self.terms.push(t);
                    }
                    Undo::Pushed => {
                        let t = self.terms.pop().unwrap();
                        self.acc ^= t;
                    }
                }
            }
        }
    }

    pub fn checksum(&self) -> Checksum {
        let mut h = blake3::Hasher::new();
        h.update(b"offsite-state-v1");
        h.update(&(self.terms.len() as u32).to_le_bytes());
        h.update(&self.acc.to_le_bytes());
        let out = h.finalize();
        Checksum(out.as_bytes()[..16].try_into().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_equals_from_scratch() {
        let ps = 512;
        let mut a = PageState::new(ps);
        for i in 1..=10u32 {
            a.set_page(i, &vec![i as u8; ps]);
        }
        a.set_page(3, &vec![99; ps]);
        a.resize(8);
        let mut b = PageState::new(ps);
        for i in 1..=8u32 {
            let v = if i == 3 { 99 } else { i as u8 };
            b.set_page(i, &vec![v; ps]);
        }
        assert_eq!(a.checksum(), b.checksum());
        // Different content or size → different checksum.
        b.set_page(8, &vec![7; ps]);
        assert_ne!(a.checksum(), b.checksum());
        let mut c = a.clone();
        c.resize(9);
        assert_ne!(a.checksum(), c.checksum());
    }

    #[test]
    fn rollback_restores_exact_state() {
        let ps = 128;
        let mut a = PageState::new(ps);
        for i in 1..=5u32 {
            a.set_page(i, &vec![i as u8; ps]);
        }
        let before = a.checksum();
        a.begin();
        a.set_page(2, &vec![9; ps]);
        a.resize(3);
        a.set_page(7, &vec![1; ps]);
        assert_ne!(a.checksum(), before);
        a.rollback();
        assert_eq!(a.checksum(), before);
        assert_eq!(a.pages(), 5);
    }

    #[test]
    fn parallel_terms_equal_sequential_ones() {
        let ps = 512;
        let page = |i: usize| vec![(i % 251) as u8; ps];
        for n in [0, 1, 5, PARALLEL_MIN_PAGES - 1, PARALLEL_MIN_PAGES * 3 + 7] {
            let terms = terms_parallel(n, |range, sink| {
                for i in range {
                    sink(i as u32 + 1, &page(i));
                }
                Ok(())
            })
            .unwrap();
            let want: Vec<u128> = (0..n).map(|i| page_term(i as u32 + 1, &page(i))).collect();
            assert!(terms == want, "{n} pages");
        }
        let e = terms_parallel(PARALLEL_MIN_PAGES * 2, |range, _| {
            anyhow::ensure!(range.start == 0, "read error");
            Ok(())
        });
        assert!(e.is_err());
    }

    #[test]
    fn growth_fills_zero_pages() {
        let ps = 256;
        let mut a = PageState::new(ps);
        a.set_page(4, &vec![1; ps]);
        let mut b = PageState::new(ps);
        for i in 1..=3 {
            b.set_page(i, &vec![0; ps]);
        }
        b.set_page(4, &vec![1; ps]);
        assert_eq!(a.checksum(), b.checksum());
    }
}
