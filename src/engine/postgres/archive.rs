//! The PostgreSQL archive in the bucket (docs/FORMAT.md, "PostgreSQL
//! archive"): object names, what each object's signed envelope says it is,
//! and sealing and authenticated reading through the shared codec. Knows
//! the `Storage` trait, not S3; knows WAL file names, not WAL records.
//!
//! Every object is a format-3 offsite object (envelope, zstd, age unless
//! the user chose plaintext, signed footer). Its envelope's engine fields
//! (`resume`, opaque to the codec) hold a [`PgMeta`], from which the
//! object's key is derived: a reader proves the envelope, then checks that
//! the key it read is the key the envelope names.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use super::walname::{SegmentName, WalFile, SEGMENT_SIZE};
use crate::codec::{self, Envelope, EnvelopeMeta, ObjectKind, ObjectWriter, Seal};
use crate::keys::Identities;
use crate::sign::Trust;
use crate::storage::{Body, Storage, StorageError};

/// Where the PostgreSQL archive lives under the replica root.
pub const WAL_PREFIX: &str = "pg/wal/";
pub const FILES_PREFIX: &str = "pg/files/";
pub const BACKUPS_PREFIX: &str = "pg/backups/";
/// A base backup's tar archives are cut into parts of this many raw bytes,
/// each its own object: bounded staging, parallel downloads.
pub const BACKUP_PART_BYTES: u64 = 32 << 20;
/// The largest object offsite writes to the archive, with room for the
/// envelope and a codec that could not compress: bigger is refused unread.
pub const MAX_OBJECT_BYTES: u64 = BACKUP_PART_BYTES + (4 << 20);

/// What a PostgreSQL archive object is; carried in its signed envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "pg", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PgMeta {
    /// Bytes `[start, end)` (LSNs) of one WAL segment; a whole segment when
    /// `start` and `end` are its bounds.
    Wal {
        segment: String,
        start: u64,
        end: u64,
        /// BLAKE3 of the WAL bytes (plaintext), for idempotent re-pushes.
        blake3: String,
        system_id: String,
    },
    /// A write-once file PostgreSQL archives besides segments: a timeline
    /// history file, a backup history (`.backup`) file, a `.partial` segment.
    File {
        name: String,
        blake3: String,
        system_id: String,
    },
    /// Part `part` of tar archive `archive` of base backup `backup`.
    BackupPart {
        backup: String,
        archive: String,
        part: u32,
        /// Raw (tar) bytes in this part.
        bytes: u64,
    },
    /// A base backup's record, written last: the backup is complete.
    Backup(BackupInfo),
}

/// A complete base backup (`pg/backups/<id>/backup.done`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupInfo {
    pub id: String,
    pub label: String,
    pub system_id: String,
    pub timeline: u32,
    pub start_lsn: u64,
    pub end_lsn: u64,
    pub start_time_us: i64,
    pub end_time_us: i64,
    /// PostgreSQL's major version (`PG_VERSION`).
    pub pg_version: String,
    /// Tar archives: name (`base.tar`, `<oid>.tar`), parts, raw bytes, the
    /// BLAKE3 of the whole archive, and for tablespaces the original path.
    pub archives: Vec<ArchiveInfo>,
    /// The backup manifest is stored as archive `backup_manifest`.
    pub manifest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveInfo {
    pub name: String,
    pub parts: u32,
    pub bytes: u64,
    pub blake3: String,
    pub tablespace: Option<TablespaceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablespaceInfo {
    pub oid: u32,
    pub path: String,
}

impl PgMeta {
    /// The key the object must have (its name is derived from what it says
    /// it is, so a renamed object is refused).
    pub fn key(&self) -> anyhow::Result<String> {
        Ok(match self {
            PgMeta::Wal {
                segment,
                start,
                end,
                ..
            } => {
                let seg = SegmentName::parse(segment)
                    .with_context(|| format!("{segment:?} is not a WAL segment name"))?;
                ensure!(
                    seg.start_lsn() <= *start && start < end && *end <= seg.end_lsn(),
                    "WAL range {start:#x}..{end:#x} is not inside segment {segment}"
                );
                wal_key(seg, *start, *end)
            }
            PgMeta::File { name, .. } => file_key(&WalFile::parse(name)?)?,
            PgMeta::BackupPart {
                backup,
                archive,
                part,
                ..
            } => part_key(backup, archive, *part)?,
            PgMeta::Backup(b) => done_key(&b.id)?,
        })
    }

    fn kind(&self) -> ObjectKind {
        match self {
            PgMeta::Backup(_) | PgMeta::BackupPart { .. } => ObjectKind::Snapshot,
            _ => ObjectKind::Segment,
        }
    }

    fn lineage(&self) -> String {
        match self {
            PgMeta::Wal { segment, .. } => segment[..8].to_string(),
            PgMeta::File { name, .. } => name.clone(),
            PgMeta::BackupPart { backup, .. } => backup.clone(),
            PgMeta::Backup(b) => b.id.clone(),
        }
    }
}

/// `pg/wal/<segment>/<start:016x>-<end:016x>`
pub fn wal_key(seg: SegmentName, start: u64, end: u64) -> String {
    format!("{WAL_PREFIX}{seg}/{start:016x}-{end:016x}")
}

/// `pg/files/<name>` (history, .backup, .partial files).
pub fn file_key(f: &WalFile) -> anyhow::Result<String> {
    match f {
        WalFile::Segment(_) => bail!("a WAL segment is not a file object"),
        other => Ok(format!("{FILES_PREFIX}{other}")),
    }
}

fn check_id(id: &str) -> anyhow::Result<()> {
    ensure!(
        id.len() == 33
            && id.as_bytes()[16] == b'-'
            && id
                .bytes()
                .enumerate()
                .all(|(i, b)| i == 16 || matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{id:?} is not a base backup id"
    );
    Ok(())
}

fn check_archive_name(a: &str) -> anyhow::Result<()> {
    let ok = a == "backup_manifest"
        || a == "base.tar"
        || a.strip_suffix(".tar").is_some_and(|o| {
            !o.is_empty() && o.len() <= 10 && o.bytes().all(|b| b.is_ascii_digit())
        });
    ensure!(ok, "{a:?} is not a base backup archive name");
    Ok(())
}

/// A backup id: `<start time_us:016x>-<start lsn:016x>` (sorts by age).
pub fn backup_id(start_time_us: i64, start_lsn: u64) -> String {
    format!("{:016x}-{start_lsn:016x}", start_time_us.max(0))
}

pub fn part_key(id: &str, archive: &str, part: u32) -> anyhow::Result<String> {
    check_id(id)?;
    check_archive_name(archive)?;
    Ok(format!("{BACKUPS_PREFIX}{id}/{archive}.{part:05}"))
}

pub fn done_key(id: &str) -> anyhow::Result<String> {
    check_id(id)?;
    Ok(format!("{BACKUPS_PREFIX}{id}/backup.done"))
}

/// One WAL object found in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalPiece {
    pub seg: SegmentName,
    pub start: u64,
    pub end: u64,
    pub key: String,
    pub size: u64,
}

impl WalPiece {
    pub fn is_whole(&self) -> bool {
        self.start == self.seg.start_lsn() && self.end == self.seg.end_lsn()
    }
}

/// Parse a WAL object key; `None` for names offsite does not write (a
/// planted name is ignored, never acted upon).
pub fn parse_wal_key(key: &str, size: u64) -> Option<WalPiece> {
    let rest = key.strip_prefix(WAL_PREFIX)?;
    let (seg, range) = rest.split_once('/')?;
    let seg = SegmentName::parse(seg)?;
    let (s, e) = range.split_once('-')?;
    if s.len() != 16 || e.len() != 16 {
        return None;
    }
    let start = u64::from_str_radix(s, 16).ok()?;
    let end = u64::from_str_radix(e, 16).ok()?;
    if !(seg.start_lsn() <= start && start < end && end <= seg.end_lsn()) {
        return None;
    }
    if wal_key(seg, start, end) != key {
        return None;
    }
    Some(WalPiece {
        seg,
        start,
        end,
        key: key.to_string(),
        size,
    })
}

/// Every WAL object (of one segment, or all), sorted by segment and start.
pub async fn list_wal(
    store: &dyn Storage,
    seg: Option<SegmentName>,
) -> anyhow::Result<Vec<WalPiece>> {
    let prefix = match seg {
        Some(s) => format!("{WAL_PREFIX}{s}/"),
        None => WAL_PREFIX.to_string(),
    };
    let mut out: Vec<WalPiece> = store
        .list(&prefix)
        .await
        .with_context(|| format!("cannot list {prefix} in {}", store.describe()))?
        .into_iter()
        .filter_map(|m| parse_wal_key(&m.key, m.size))
        .collect();
    out.sort_by_key(|p| (p.seg, p.start, std::cmp::Reverse(p.end)));
    Ok(out)
}

/// The pieces that cover `[from, to)` of one segment, fewest first: whole
/// segments win; otherwise a chain of contiguous pieces from `from`.
/// `None` if the pieces leave a gap before `to`; returns how far they reach.
pub fn cover(pieces: &[WalPiece], from: u64) -> (Vec<WalPiece>, u64) {
    let mut at = from;
    let mut chosen = Vec::new();
    loop {
        // The piece starting at or before `at` that reaches furthest.
        let best = pieces
            .iter()
            .filter(|p| p.start <= at && p.end > at)
            .max_by_key(|p| p.end);
        match best {
            Some(p) => {
                at = p.end;
                chosen.push(p.clone());
            }
            None => return (chosen, at),
        }
    }
}

/// Seal `data` as one archive object.
pub fn seal(seal: &Seal, meta: &PgMeta, time_us: i64, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    // Whole segments and backup parts (16–32 MiB) compress on every core.
    let mut w = ObjectWriter::sized(
        &mut out,
        &envelope(seal, meta, time_us)?,
        seal,
        data.len() as u64,
    )?;
    w.write_all(data)?;
    w.finish()?;
    Ok(out)
}

/// The envelope of an archive object.
pub fn envelope(seal: &Seal, meta: &PgMeta, time_us: i64) -> anyhow::Result<Envelope> {
    Ok(Envelope::new(
        meta.kind(),
        seal,
        EnvelopeMeta {
            engine: crate::engine::Engine::Postgres.name().to_string(),
            replica: String::new(),
            database: String::new(),
            lineage: meta.lineage(),
            first_txid: 0,
            last_txid: 0,
            time_us,
            level: 0,
            signer: String::new(),
            link: String::new(),
            resume: serde_json::to_value(meta)?,
        },
    ))
}

/// The archive metadata of a proven envelope, checked against its key.
pub fn meta_of(env: &Envelope, key: &str) -> anyhow::Result<PgMeta> {
    ensure!(
        env.meta.engine == crate::engine::Engine::Postgres.name(),
        "object {key} was written by the {} engine, not by PostgreSQL's",
        env.meta.engine
    );
    let meta: PgMeta = serde_json::from_value(env.meta.resume.clone()).with_context(|| {
        format!("object {key}: its envelope does not describe a PostgreSQL archive object")
    })?;
    let want = meta.key().with_context(|| format!("object {key}"))?;
    ensure!(
        want == key && env.kind == meta.kind() && env.meta.lineage == meta.lineage(),
        "object {key} says it is {want} (a renamed or swapped object)"
    );
    Ok(meta)
}

/// Prove an object's envelope from two ranged reads (no payload download).
pub async fn prove(
    store: &dyn Storage,
    key: &str,
    size: u64,
    trust: &Trust,
) -> anyhow::Result<(Envelope, PgMeta)> {
    let (env, _) = crate::trusted::prove_envelope(store, key, size, trust).await?;
    let meta = meta_of(&env, key)?;
    Ok((env, meta))
}

/// An object the archive does not hold.
#[derive(Debug, thiserror::Error)]
#[error("object {0} is not in the archive")]
pub struct Missing(pub String);

/// Download, authenticate (hash, signature, binding, name) and decode one
/// object. Objects larger than any offsite writes are refused unread.
pub async fn read(
    store: &dyn Storage,
    key: &str,
    trust: &Trust,
    ids: Option<&Identities>,
) -> anyhow::Result<(PgMeta, Vec<u8>)> {
    // One ranged read capped just past the largest object offsite writes:
    // a hostile, huge object is refused without being downloaded.
    let bytes = store
        .get_range(key, 0, MAX_OBJECT_BYTES + 1)
        .await
        .map_err(|e| match e {
            StorageError::NotFound { .. } => anyhow::Error::new(Missing(key.to_string())),
            e => anyhow::Error::new(e).context(format!("cannot download {key}")),
        })?;
    ensure!(
        bytes.len() as u64 <= MAX_OBJECT_BYTES,
        "object {key} is {} bytes, larger than any object offsite writes: refused",
        bytes.len()
    );
    decode(&bytes, key, trust, ids)
}

/// Authenticate and decode an object's bytes (see [`read`]).
pub fn decode(
    bytes: &[u8],
    key: &str,
    trust: &Trust,
    ids: Option<&Identities>,
) -> anyhow::Result<(PgMeta, Vec<u8>)> {
    let len = bytes.len() as u64;
    let (env, auth, _) =
        codec::authenticate(bytes, len, trust).with_context(|| format!("object {key}"))?;
    if let codec::Authenticity::Unsigned = auth {
        bail!("object {key} is unsigned: a PostgreSQL archive is always signed");
    }
    let meta = meta_of(&env, key)?;
    if env.encrypted {
        ensure!(
            ids.is_some(),
            "object {key} is encrypted: pass --age-identity"
        );
    } else if ids.is_some() && !trust.allow_plaintext {
        bail!("object {key} is plaintext although an identity was given (a replica written with --no-encryption restores with --allow-plaintext)");
    }
    let (_, mut body) =
        codec::open_object(bytes, len, ids).with_context(|| format!("object {key}"))?;
    let cap = match &meta {
        PgMeta::Wal { start, end, .. } => end - start,
        PgMeta::BackupPart { bytes, .. } => (*bytes).min(BACKUP_PART_BYTES),
        _ => SEGMENT_SIZE,
    };
    let mut out = Vec::with_capacity(cap as usize);
    (&mut body)
        .take(cap + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("object {key}: cannot decode its body"))?;
    ensure!(
        out.len() as u64 <= cap,
        "object {key} holds more bytes than its envelope says"
    );
    match &meta {
        PgMeta::Wal {
            start, end, blake3, ..
        } => {
            ensure!(
                out.len() as u64 == end - start,
                "object {key} holds {} WAL bytes, not {}",
                out.len(),
                end - start
            );
            ensure!(
                *blake3 == blake3::hash(&out).to_hex().as_str(),
                "object {key}: WAL bytes do not match their hash"
            );
        }
        PgMeta::File { blake3, .. } => {
            ensure!(
                *blake3 == blake3::hash(&out).to_hex().as_str(),
                "object {key}: file bytes do not match their hash"
            );
        }
        PgMeta::BackupPart { bytes, .. } => {
            ensure!(
                out.len() as u64 == *bytes,
                "object {key} holds {} bytes, not {bytes}",
                out.len()
            );
        }
        PgMeta::Backup(_) => {}
    }
    Ok((meta, out))
}

/// Store an object only if no object of that name exists. An existing
/// object with the same content (per its proven envelope's hash) is
/// success; different content is an error naming the object: a WAL file
/// is never overwritten.
pub async fn put_once(
    store: &dyn Storage,
    key: &str,
    sealed: Vec<u8>,
    content_blake3: &str,
    trust: &Trust,
) -> anyhow::Result<PutOutcome> {
    if let Some(m) = store
        .head(key)
        .await
        .with_context(|| format!("cannot check {key}"))?
    {
        let (_, meta) = prove(store, key, m.size, trust)
            .await
            .with_context(|| format!("{key} already exists in {} and does not prove out; refusing to overwrite it (investigate, then delete it by hand)", store.describe()))?;
        let theirs = match &meta {
            PgMeta::Wal { blake3, .. } | PgMeta::File { blake3, .. } => blake3.as_str(),
            _ => "",
        };
        ensure!(
            theirs == content_blake3,
            "{key} already exists in {} with different content; refusing to overwrite it (two clusters or timelines writing one archive? give each its own replica URL)",
            store.describe()
        );
        return Ok(PutOutcome::AlreadyThere);
    }
    store
        .put(key, Body::Bytes(sealed.into()))
        .await
        .with_context(|| format!("cannot upload {key} to {}", store.describe()))?;
    Ok(PutOutcome::Stored)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    AlreadyThere,
}

/// Complete base backups, newest last, each proven (signed by a pinned
/// key, bound to this replica, named as it says). Unproven records are
/// returned apart, by key, with the reason.
pub async fn list_backups(
    store: &dyn Storage,
    trust: &Trust,
) -> anyhow::Result<(Vec<BackupInfo>, Vec<(String, String)>)> {
    let listing = store
        .list(BACKUPS_PREFIX)
        .await
        .with_context(|| format!("cannot list {BACKUPS_PREFIX} in {}", store.describe()))?;
    let mut found = BTreeMap::new();
    let mut refused = Vec::new();
    for m in listing.iter().filter(|m| m.key.ends_with("/backup.done")) {
        match prove(store, &m.key, m.size, trust).await {
            Ok((_, PgMeta::Backup(b))) => {
                found.insert(b.id.clone(), b);
            }
            Ok(_) => refused.push((m.key.clone(), "not a backup record".to_string())),
            Err(e) => refused.push((m.key.clone(), format!("{e:#}"))),
        }
    }
    Ok((found.into_values().collect(), refused))
}

/// The content hash recorded for WAL and file objects.
pub fn content_hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(seg: SegmentName, s: u64, e: u64) -> WalPiece {
        WalPiece {
            seg,
            start: s,
            end: e,
            key: wal_key(seg, s, e),
            size: 1,
        }
    }

    #[test]
    fn keys_parse_strictly_and_cover_prefers_long_pieces() {
        let seg = SegmentName::parse("000000010000000000000003").unwrap();
        let k = wal_key(seg, seg.start_lsn(), seg.end_lsn());
        assert_eq!(
            k,
            "pg/wal/000000010000000000000003/0000000003000000-0000000004000000"
        );
        assert!(parse_wal_key(&k, 5).unwrap().is_whole());
        for bad in [
            "pg/wal/000000010000000000000003/0000000002000000-0000000004000000",
            "pg/wal/000000010000000000000003/0000000004000000-0000000003000000",
            "pg/wal/000000010000000000000003/0000000003000000-0000000004000000.x",
            "pg/wal/00000001000000000000003/0000000003000000-0000000004000000",
            "pg/wal/000000010000000000000003/../x",
        ] {
            assert!(parse_wal_key(bad, 5).is_none(), "{bad}");
        }
        let s0 = seg.start_lsn();
        let pieces = vec![
            piece(seg, s0, s0 + 100),
            piece(seg, s0 + 100, s0 + 300),
            piece(seg, s0 + 50, s0 + 200),
            piece(seg, s0 + 400, s0 + 500),
        ];
        let (c, reach) = cover(&pieces, s0);
        assert_eq!(reach, s0 + 300);
        assert_eq!(c.len(), 2);
        assert!(part_key("0000000000000001-0000000003000000", "../x", 0).is_err());
        assert!(part_key("0000000000000001-0000000003000000", "16384.tar", 0).is_ok());
        assert!(done_key("../../etc").is_err());
    }

    #[test]
    fn sealed_objects_read_back_only_under_their_own_name() {
        let signer = std::sync::Arc::new(crate::sign::Signer::generate());
        let sl = Seal {
            enc: codec::Encryption::None,
            binding: crate::sign::Binding {
                signer: Some(signer.clone()),
                replica: "r".repeat(32),
                database: "pg-1".into(),
            },
        };
        let mut trust = Trust::with_keys(vec![signer.public()]);
        trust.replica = Some("r".repeat(32));
        let seg = SegmentName::parse("000000010000000000000003").unwrap();
        let data = vec![7u8; 1000];
        let meta = PgMeta::Wal {
            segment: seg.to_string(),
            start: seg.start_lsn(),
            end: seg.start_lsn() + 1000,
            blake3: content_hash(&data),
            system_id: "1".into(),
        };
        let key = meta.key().unwrap();
        let obj = seal(&sl, &meta, 5, &data).unwrap();
        let (m, back) = decode(&obj, &key, &trust, None).unwrap();
        assert_eq!((m, back), (meta, data));
        let other = wal_key(seg, seg.start_lsn(), seg.start_lsn() + 999);
        let e = format!("{:#}", decode(&obj, &other, &trust, None).unwrap_err());
        assert!(e.contains("renamed or swapped"), "{e}");
        let mut bad = obj.clone();
        let n = bad.len() - 200;
        bad[n] ^= 1;
        assert!(decode(&bad, &key, &trust, None).is_err());
    }
}
