//! PostgreSQL's WAL file names and LSN arithmetic, and the page header
//! fields offsite checks before it trusts a WAL file's name
//! (docs/FORMAT.md, "PostgreSQL archive").

use anyhow::{bail, ensure, Context};

/// PostgreSQL's default WAL segment size (`initdb --wal-segsize`, 16 MiB).
/// Files of another size are refused with a clear error: this build of
/// offsite supports the default only.
pub const SEGMENT_SIZE: u64 = 16 << 20;
/// WAL page size (XLOG_BLCKSZ).
pub const PAGE_SIZE: u64 = 8192;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 15.
pub const PAGE_MAGIC_15: u16 = 0xD110;
/// `XLP_LONG_HEADER`: the first page of a segment carries the long header.
const XLP_LONG_HEADER: u16 = 0x0002;

/// A WAL segment: timeline and segment number (`TTTTTTTTXXXXXXXXYYYYYYYY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    pub timeline: u32,
    pub segno: u64,
}

impl SegmentName {
    const PER_XLOGID: u64 = 0x1_0000_0000 / SEGMENT_SIZE;

    /// The segment holding `lsn` on `timeline`.
    pub fn of_lsn(timeline: u32, lsn: u64) -> SegmentName {
        SegmentName {
            timeline,
            segno: lsn / SEGMENT_SIZE,
        }
    }

    pub fn start_lsn(&self) -> u64 {
        self.segno * SEGMENT_SIZE
    }

    pub fn end_lsn(&self) -> u64 {
        (self.segno + 1) * SEGMENT_SIZE
    }

    pub fn next(&self) -> SegmentName {
        SegmentName {
            timeline: self.timeline,
            segno: self.segno + 1,
        }
    }

    /// Parse a 24-hex-digit segment file name (upper case, as PostgreSQL
    /// writes them). `None` for anything else.
    pub fn parse(name: &str) -> Option<SegmentName> {
        if name.len() != 24 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
            return None;
        }
        let timeline = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        if timeline == 0 || seg >= Self::PER_XLOGID || log > u32::MAX as u64 {
            return None;
        }
        Some(SegmentName {
            timeline,
            segno: log * Self::PER_XLOGID + seg,
        })
    }
}

impl std::fmt::Display for SegmentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.segno / Self::PER_XLOGID,
            self.segno % Self::PER_XLOGID
        )
    }
}

/// What a WAL file name (as PostgreSQL passes it to archive and restore
/// commands) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFile {
    Segment(SegmentName),
    /// `TTTTTTTT.history`
    History(u32),
    /// `TTTTTTTTXXXXXXXXYYYYYYYY.PPPPPPPP.backup`: a backup history file
    /// (informational; archived as is).
    BackupLabel(SegmentName, u32),
    /// `…partial`: the last, incomplete segment of a timeline a promoted
    /// server archives.
    Partial(SegmentName),
}

impl WalFile {
    pub fn parse(name: &str) -> anyhow::Result<WalFile> {
        if let Some(seg) = SegmentName::parse(name) {
            return Ok(WalFile::Segment(seg));
        }
        if let Some(t) = name.strip_suffix(".history") {
            if t.len() == 8 && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
                let tli = u32::from_str_radix(t, 16).unwrap_or(0);
                if tli > 0 {
                    return Ok(WalFile::History(tli));
                }
            }
        }
        if let Some(s) = name.strip_suffix(".partial") {
            if let Some(seg) = SegmentName::parse(s) {
                return Ok(WalFile::Partial(seg));
            }
        }
        if let Some(s) = name.strip_suffix(".backup") {
            if s.len() == 33 && s.as_bytes()[24] == b'.' {
                if let (Some(seg), Ok(off)) = (
                    SegmentName::parse(&s[..24]),
                    u32::from_str_radix(&s[25..], 16),
                ) {
                    return Ok(WalFile::BackupLabel(seg, off));
                }
            }
        }
        bail!("{name:?} is not a PostgreSQL WAL file name (expected a 24-hex-digit segment, TTTTTTTT.history, a .partial or a .backup file)")
    }
}

impl std::fmt::Display for WalFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalFile::Segment(s) => write!(f, "{s}"),
            WalFile::History(t) => write!(f, "{t:08X}.history"),
            WalFile::BackupLabel(s, off) => write!(f, "{s}.{off:08X}.backup"),
            WalFile::Partial(s) => write!(f, "{s}.partial"),
        }
    }
}

/// "16/B374D848" → 0x16B374D848.
pub fn parse_lsn(s: &str) -> anyhow::Result<u64> {
    let (hi, lo) = s
        .trim()
        .split_once('/')
        .with_context(|| format!("{s:?} is not an LSN (expected the form 16/B374D848)"))?;
    let hi = u32::from_str_radix(hi, 16)
        .with_context(|| format!("{s:?} is not an LSN (expected the form 16/B374D848)"))?;
    let lo = u32::from_str_radix(lo, 16)
        .with_context(|| format!("{s:?} is not an LSN (expected the form 16/B374D848)"))?;
    Ok(((hi as u64) << 32) | lo as u64)
}

/// 0x16B374D848 → "16/B374D848".
pub fn format_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l as u32)
}

/// The fields of a WAL segment's first page (its long header) that say what
/// the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongHeader {
    pub magic: u16,
    pub timeline: u32,
    pub pageaddr: u64,
    pub system_id: u64,
    pub seg_size: u32,
    pub block_size: u32,
}

impl LongHeader {
    pub fn read(page: &[u8]) -> anyhow::Result<LongHeader> {
        ensure!(page.len() >= 40, "shorter than a WAL page header");
        let u16_at = |o: usize| u16::from_le_bytes(page[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().unwrap());
        let info = u16_at(2);
        ensure!(
            info & XLP_LONG_HEADER != 0,
            "the first page has no long header (not the start of a WAL segment)"
        );
        Ok(LongHeader {
            magic: u16_at(0),
            timeline: u32_at(4),
            pageaddr: u64_at(8),
            system_id: u64_at(24),
            seg_size: u32_at(32),
            block_size: u32_at(36),
        })
    }

    /// Check that the header belongs to segment `seg` of a cluster with
    /// `system_id` (if known). A timeline lower than the name's is allowed:
    /// at a timeline switch the new timeline's first segment starts as a
    /// copy of the old one's.
    pub fn check(&self, seg: SegmentName, system_id: Option<u64>) -> anyhow::Result<()> {
        ensure!(
            self.magic == PAGE_MAGIC_15,
            "WAL page magic {:#06x} is not PostgreSQL 15's ({PAGE_MAGIC_15:#06x}): this offsite reads PostgreSQL 15 WAL",
            self.magic
        );
        ensure!(
            self.seg_size as u64 == SEGMENT_SIZE && self.block_size as u64 == PAGE_SIZE,
            "WAL segment size {} / block size {}: this offsite supports 16 MiB segments of 8 KiB pages only",
            self.seg_size,
            self.block_size
        );
        ensure!(
            self.pageaddr == seg.start_lsn(),
            "its first page is for LSN {}, not for segment {seg} (a renamed or damaged file)",
            format_lsn(self.pageaddr)
        );
        ensure!(
            self.timeline <= seg.timeline,
            "its first page is of timeline {}, later than the name's {}",
            self.timeline,
            seg.timeline
        );
        if let Some(id) = system_id {
            ensure!(
                self.system_id == id,
                "it belongs to database system {}, not {id} (another cluster's WAL)",
                self.system_id
            );
        }
        Ok(())
    }
}

/// The system identifier of the cluster in `datadir` (first 8 bytes of
/// `global/pg_control`).
pub fn system_id_of(datadir: &std::path::Path) -> anyhow::Result<u64> {
    let p = datadir.join("global/pg_control");
    let b = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    ensure!(b.len() >= 8, "{} is truncated", p.display());
    Ok(u64::from_le_bytes(b[..8].try_into().unwrap()))
}

/// Timeline history file lines: `parent_tli  switch_lsn  reason`.
/// Returns (parent timeline, switch LSN) pairs, checked for order.
pub fn parse_history(text: &str) -> anyhow::Result<Vec<(u32, u64)>> {
    let mut out: Vec<(u32, u64)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(t), Some(l)) = (f.next(), f.next()) else {
            bail!("timeline history line {line:?} is malformed");
        };
        let t: u32 = t
            .parse()
            .with_context(|| format!("timeline history line {line:?}"))?;
        let l = parse_lsn(l).with_context(|| format!("timeline history line {line:?}"))?;
        if let Some(&(pt, pl)) = out.last() {
            ensure!(
                t > pt && l >= pl,
                "timeline history is out of order at {line:?}"
            );
        }
        out.push((t, l));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let s = SegmentName::parse("000000010000000A000000FF").unwrap();
        assert_eq!(s.timeline, 1);
        assert_eq!(s.segno, 0xA * 256 + 0xFF);
        assert_eq!(s.to_string(), "000000010000000A000000FF");
        assert_eq!(s.next().to_string(), "000000010000000B00000000");
        assert_eq!(s.start_lsn(), parse_lsn("A/FF000000").unwrap());
        assert_eq!(format_lsn(s.end_lsn()), "B/0");
        assert_eq!(SegmentName::of_lsn(1, s.start_lsn() + 5), s);
        for bad in [
            "000000010000000A000001FF",
            "000000000000000A000000FF",
            "00000001000000a000000FF",
            "x",
        ] {
            assert!(SegmentName::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(
            WalFile::parse("00000002.history").unwrap(),
            WalFile::History(2)
        );
        assert_eq!(
            WalFile::parse("000000010000000000000003.00000028.backup")
                .unwrap()
                .to_string(),
            "000000010000000000000003.00000028.backup"
        );
        assert!(matches!(
            WalFile::parse("000000010000000000000003.partial").unwrap(),
            WalFile::Partial(_)
        ));
        for bad in [
            "../../etc/passwd",
            "00000000.history",
            "RECOVERYHISTORY",
            "",
        ] {
            assert!(WalFile::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn history_files_parse() {
        let h = parse_history(
            "1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tbefore 2026\n",
        )
        .unwrap();
        assert_eq!(h, vec![(1, 0x3000158), (2, 0x5000000)]);
        assert!(parse_history("2 0/5 x\n1 0/6 y\n").is_err());
        assert!(parse_history("1\n").is_err());
    }
}
