//! The codec pipeline: plaintext envelope, then zstd, then age
//! (docs/FORMAT.md, "Object envelope"). Knows nothing about databases: the
//! engine's resume position is an opaque JSON value here.

use std::io::{self, Read, Write};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::keys::{Identities, Recipients};
use crate::sign::{Binding, PublicKey, Trust};

pub const MAGIC: &[u8; 8] = b"OFFSITE\0";
/// The format version this offsite writes (docs/FORMAT.md).
pub const FORMAT_VERSION: u16 = 3;
/// Format version 2 (unsigned, before "trust nothing in the bucket"): still
/// read (with `--allow-unsigned`), never written.
pub const UNSIGNED_VERSION: u16 = 2;
/// The footer of a format-3 object: the payload's BLAKE3, then the
/// Ed25519 signature over the envelope and that hash.
pub const FOOTER_LEN: usize = 96;
/// Domain separation of object signatures.
const OBJECT_SIG_DOMAIN: &[u8] = b"offsite-object-v3\0";
/// Envelope metadata is refused beyond this size (hostile input).
const MAX_META: usize = 16 << 10;
/// Format version 1 (SQLite only, written before the engine boundary):
/// still read, never written.
pub const LEGACY_VERSION: u16 = 1;
/// The one engine format 1 knew.
pub const LEGACY_ENGINE: &str = "sqlite";
const ZSTD_LEVEL: i32 = 3;
/// Objects whose body is expected to reach this size are compressed by
/// zstd's worker threads (one per core, at most [`MAX_ZSTD_WORKERS`]); smaller
/// ones on the caller's thread, which costs no thread start-up and no job
/// buffers (a sidecar of many small databases ships many small objects).
pub const PARALLEL_MIN_BYTES: u64 = 4 << 20;
const MAX_ZSTD_WORKERS: usize = 4;
/// zstd's job size in parallel mode: its default for level 3 (8 MiB, four
/// windows) would compress a segment of a few MiB on one worker; 1 MiB jobs
/// keep every core busy. The output is one standard frame with the same
/// window (2^21); its size barely changes (docs/BENCHMARKS.md, issue 13).
const ZSTD_JOB_BYTES: u32 = 1 << 20;

/// zstd worker threads for a body of `expected` bytes (below 2: none, the
/// caller's thread compresses).
fn zstd_workers(expected: u64) -> u32 {
    if expected < PARALLEL_MIN_BYTES {
        return 0;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_ZSTD_WORKERS) as u32
}

fn zstd_encoder<W: Write>(w: W, expected: u64) -> io::Result<zstd::Encoder<'static, W>> {
    let mut z = zstd::Encoder::new(w, ZSTD_LEVEL)?;
    z.include_checksum(true)?;
    let workers = zstd_workers(expected);
    if workers > 1 {
        z.multithread(workers)?;
        z.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_BYTES))?;
    }
    Ok(z)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Snapshot = 1,
    Segment = 2,
}

impl ObjectKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(ObjectKind::Snapshot),
            2 => Some(ObjectKind::Segment),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Snapshot => "snapshot",
            ObjectKind::Segment => "segment",
        }
    }
}

/// How objects are protected. There is deliberately no `Default`: callers
/// must choose, so plaintext can never be the result of a missing setting.
#[derive(Clone)]
pub enum Encryption {
    /// Plaintext, explicitly requested (`--no-encryption` / `encryption = "none"`).
    None,
    Age(Recipients),
}

impl Encryption {
    pub fn byte(&self) -> u8 {
        match self {
            Encryption::None => 0,
            Encryption::Age(_) => 1,
        }
    }
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Encryption::None => write!(f, "none"),
            Encryption::Age(r) => write!(f, "age({} recipients)", r.len()),
        }
    }
}

/// Plaintext metadata carried in every envelope: generic fields, plus the
/// engine's resume position, which only that engine reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeMeta {
    /// The engine that wrote the object (`"sqlite"`).
    pub engine: String,
    /// Format 3: the replica id (`replica.json`) the object belongs to.
    #[serde(default)]
    pub replica: String,
    /// Format 3: the name of the database the object is of.
    #[serde(default)]
    pub database: String,
    pub lineage: String,
    pub first_txid: u64,
    pub last_txid: u64,
    /// Format 3: the time of the object's last commit (a snapshot's time),
    /// equal to the time in its key.
    #[serde(default)]
    pub time_us: i64,
    /// Format 3: the compaction level (0 for snapshots and shipped segments),
    /// equal to the level in its key.
    #[serde(default)]
    pub level: u8,
    /// Format 3: the hex Ed25519 verifying key that signed the object.
    #[serde(default)]
    pub signer: String,
    /// The chain link after the object's last commit (docs/FORMAT.md,
    /// "Chain link"); empty in format-1 objects.
    pub link: String,
    /// Engine-defined: what a shipper needs to prove, after a restart, that
    /// its source is still at this object's last state. Opaque here.
    pub resume: serde_json::Value,
}

/// Format-1 envelope metadata (SQLite positions in the generic part).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyMeta {
    lineage: String,
    first_txid: u64,
    last_txid: u64,
    resume_at: u64,
    resume_tag: String,
    state_tag: String,
}

impl LegacyMeta {
    fn into_meta(self) -> EnvelopeMeta {
        EnvelopeMeta {
            engine: LEGACY_ENGINE.to_string(),
            replica: String::new(),
            database: String::new(),
            lineage: self.lineage,
            first_txid: self.first_txid,
            last_txid: self.last_txid,
            time_us: 0,
            level: 0,
            signer: String::new(),
            link: String::new(),
            resume: serde_json::json!({
                "frames": self.resume_at,
                "tag": self.resume_tag,
                "state_tag": self.state_tag,
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Envelope {
    pub version: u16,
    pub kind: ObjectKind,
    pub encrypted: bool,
    pub meta: EnvelopeMeta,
    /// The exact envelope bytes (for `envelope_blake3`).
    pub raw: Vec<u8>,
}

/// How objects are sealed: encrypted (or explicitly not), signed, and bound
/// to their replica and database.
#[derive(Clone)]
pub struct Seal {
    pub enc: Encryption,
    pub binding: Binding,
}

impl Seal {
    /// Unsigned and unbound: only for tests of formats and parsers.
    pub fn unsigned(enc: Encryption) -> Seal {
        Seal {
            enc,
            binding: Binding {
                signer: None,
                replica: String::new(),
                database: String::new(),
            },
        }
    }
}

/// An object that is not this replica's: unsigned (where that is not
/// allowed), signed by a key the reader does not pin, or bound to another
/// replica or database. Planning may go around such an object (it was
/// planted); an object that names a pinned key but fails its signature or
/// hash is damage, and fails whatever needs it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Foreign(pub String);

/// Whether `e` says the object is not this replica's (see [`Foreign`]).
pub fn is_foreign(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Foreign>())
}

/// How an object's authenticity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authenticity {
    /// Signed by this pinned key and bound to the expected replica.
    Signed(PublicKey),
    /// No signature (format 1 or 2): accepted only with `--allow-unsigned`.
    Unsigned,
}

impl Envelope {
    pub fn new(kind: ObjectKind, seal: &Seal, mut meta: EnvelopeMeta) -> Envelope {
        meta.replica = seal.binding.replica.clone();
        meta.database = seal.binding.database.clone();
        meta.signer = seal
            .binding
            .signer
            .as_ref()
            .map(|s| s.public().hex())
            .unwrap_or_default();
        let enc = &seal.enc;
        let json = serde_json::to_vec(&meta).expect("envelope meta serializes");
        let mut raw = Vec::with_capacity(16 + json.len());
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        raw.push(kind as u8);
        raw.push(enc.byte());
        raw.push(1); // zstd
        raw.push(0);
        raw.extend_from_slice(&(json.len() as u16).to_le_bytes());
        raw.extend_from_slice(&json);
        Envelope {
            version: FORMAT_VERSION,
            kind,
            encrypted: enc.byte() == 1,
            meta,
            raw,
        }
    }

    /// Written before the engine boundary (format 1, SQLite only).
    pub fn is_legacy(&self) -> bool {
        self.version == LEGACY_VERSION
    }

    /// Format 3 and later: the object ends with a signed footer.
    pub fn has_footer(&self) -> bool {
        self.version >= 3
    }

    pub fn blake3_hex(&self) -> String {
        blake3::hash(&self.raw).to_hex().to_string()
    }

    /// What the signature covers: the envelope and the payload's hash.
    fn signed_message(&self, payload_hash: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(OBJECT_SIG_DOMAIN.len() + self.raw.len() + 32);
        m.extend_from_slice(OBJECT_SIG_DOMAIN);
        m.extend_from_slice(&self.raw);
        m.extend_from_slice(payload_hash);
        m
    }

    /// Check the envelope against `trust`, given the object's footer: the
    /// signature (by a pinned key), the replica and the database it is bound
    /// to. The payload hash in the footer is checked by [`authenticate`]
    /// (here only the envelope is proven, e.g. from two ranged reads).
    pub fn check(
        &self,
        footer: Option<&[u8; FOOTER_LEN]>,
        trust: &Trust,
    ) -> anyhow::Result<Authenticity> {
        let unsigned = |why: &str| -> anyhow::Result<Authenticity> {
            if trust.allow_unsigned {
                Ok(Authenticity::Unsigned)
            } else {
                Err(Foreign(format!("{why}: it carries no signature, so anyone with write access to the bucket could have written it; refusing it (a replica written before format 3 restores only with --allow-unsigned)")).into())
            }
        };
        if !self.has_footer() {
            return unsigned(&format!("object was written by format {}", self.version));
        }
        let footer = footer.context("object has no footer")?;
        let sig: [u8; 64] = footer[32..].try_into().unwrap();
        if self.meta.signer.is_empty() {
            return unsigned("object is unsigned");
        }
        let msg = self.signed_message(&footer[..32]);
        let Some(key) = trust.pins(&self.meta.signer) else {
            // Foreign only when the named key really signed it: a damaged
            // object of this replica (a flipped bit in `signer`) must fail
            // what needs it, never be planned around as someone else's.
            let theirs = PublicKey::from_hex(&self.meta.signer).is_ok_and(|k| k.verify(&msg, &sig));
            if !theirs {
                bail!("object names signer offsite-vk1-{} but its signature does not verify under it: damaged or forged", self.meta.signer);
            }
            return Err(Foreign(format!(
                "object is signed by offsite-vk1-{}, which is not a key this reader trusts ({}); written by another shipper, or a planted object",
                self.meta.signer,
                trust.describe_keys()
            ))
            .into());
        };
        if !key.verify(&msg, &sig) {
            bail!("object's signature does not verify: it was forged or modified after it was written");
        }
        match &trust.replica {
            Some(r) if *r == self.meta.replica => {}
            Some(r) => {
                return Err(Foreign(format!(
                    "object belongs to replica {}, not to this replica {r} (copied from another replica or tenant?)",
                    self.meta.replica
                ))
                .into())
            }
            None if trust.adopt_replica => {}
            None => bail!(
                "cannot tell which replica this object belongs to: replica.json is missing or unsigned (pass --replica-id {} if this is the right replica)",
                self.meta.replica
            ),
        }
        if let Some(d) = &trust.database {
            if *d != self.meta.database {
                return Err(Foreign(format!(
                    "object is of database {:?}, not {d:?}",
                    self.meta.database
                ))
                .into());
            }
        }
        Ok(Authenticity::Signed(*key))
    }

    /// Read and validate an envelope from the start of an object.
    pub fn read_from<R: Read>(r: &mut R) -> anyhow::Result<Envelope> {
        let mut fixed = [0u8; 16];
        r.read_exact(&mut fixed)
            .context("object is too short to hold an offsite envelope (truncated?)")?;
        if &fixed[..8] != MAGIC {
            bail!("not an offsite object (bad magic)");
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if !(LEGACY_VERSION..=FORMAT_VERSION).contains(&version) {
            bail!("object has format version {version}; this offsite reads versions {LEGACY_VERSION} to {FORMAT_VERSION} (upgrade offsite)");
        }
        let kind = ObjectKind::from_u8(fixed[10])
            .with_context(|| format!("unknown object kind {}", fixed[10]))?;
        let encrypted = match fixed[11] {
            0 => false,
            1 => true,
            b => bail!("unknown encryption mode {b}"),
        };
        if fixed[12] != 1 {
            bail!("unknown compression {}", fixed[12]);
        }
        let meta_len = u16::from_le_bytes([fixed[14], fixed[15]]) as usize;
        ensure!(
            meta_len <= MAX_META,
            "envelope metadata is implausibly large ({meta_len} bytes)"
        );
        let mut json = vec![0u8; meta_len];
        r.read_exact(&mut json)
            .context("object is truncated inside its envelope")?;
        let meta: EnvelopeMeta = if version == LEGACY_VERSION {
            serde_json::from_slice::<LegacyMeta>(&json)
                .context("envelope metadata is not valid")?
                .into_meta()
        } else {
            serde_json::from_slice(&json).context("envelope metadata is not valid")?
        };
        if version < FORMAT_VERSION {
            ensure!(
                meta.replica.is_empty()
                    && meta.database.is_empty()
                    && meta.signer.is_empty()
                    && meta.time_us == 0
                    && meta.level == 0,
                "envelope metadata is not valid for format {version}"
            );
        }
        ensure!(
            meta.first_txid <= meta.last_txid && meta.last_txid <= crate::layout::MAX_TXID,
            "envelope names an impossible txid range {}..={}",
            meta.first_txid,
            meta.last_txid
        );
        let mut raw = fixed.to_vec();
        raw.extend_from_slice(&json);
        Ok(Envelope {
            version,
            kind,
            encrypted,
            meta,
            raw,
        })
    }
}

/// Authenticate a whole object before anything parses its payload: the
/// envelope, the payload's hash against the signed footer, the signature,
/// the replica and database binding. Returns the envelope and where the
/// payload ends (the footer excluded). `len` is the object's size.
pub fn authenticate<R: Read>(
    mut r: R,
    len: u64,
    trust: &Trust,
) -> anyhow::Result<(Envelope, Authenticity, u64)> {
    let env = Envelope::read_from(&mut r)?;
    if !env.has_footer() {
        let a = env.check(None, trust)?;
        return Ok((env, a, len));
    }
    let payload_len = len
        .checked_sub(env.raw.len() as u64 + FOOTER_LEN as u64)
        .context("object is truncated (too short for its envelope and footer)")?;
    let mut h = blake3::Hasher::new();
    let copied = std::io::copy(&mut (&mut r).take(payload_len), &mut HashSink(&mut h))
        .context("cannot read the object")?;
    ensure!(copied == payload_len, "object is truncated");
    let mut footer = [0u8; FOOTER_LEN];
    r.read_exact(&mut footer)
        .context("object is truncated (footer)")?;
    let mut extra = [0u8; 1];
    ensure!(
        r.read(&mut extra).context("cannot read the object")? == 0,
        "object is longer than it was listed (changed while being read?)"
    );
    // The signature first: a bad hash under a valid signature is damage,
    // an unsigned or foreign object is refused as such.
    let a = env.check(Some(&footer), trust)?;
    ensure!(
        h.finalize().as_bytes()[..] == footer[..32],
        "object payload does not match its signed hash (damaged or modified)"
    );
    let end = env.raw.len() as u64 + payload_len;
    Ok((env, a, end))
}

struct HashSink<'a>(&'a mut blake3::Hasher);

impl Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes (BLAKE3) everything on its way to `inner`: the
/// payload after the envelope here, the body in `segment`. Small writes (a
/// 4-byte page number, then a page) are gathered into blocks first: BLAKE3
/// hashes a long input many chunks at a time, a short one a block at a time.
pub(crate) struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
    buf: Vec<u8>,
}

/// Bytes gathered before they are hashed and passed on.
const HASH_BLOCK: usize = 64 << 10;

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: blake3::Hasher::new(),
            buf: Vec::new(),
        }
    }

    fn drain(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.hasher.update(&self.buf);
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Everything written passed on; the writer and the hash of it all.
    pub(crate) fn finish(mut self) -> io::Result<(W, blake3::Hash)> {
        self.drain()?;
        Ok((self.inner, self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.buf.len() + buf.len() > HASH_BLOCK {
            self.drain()?;
        }
        if buf.len() >= HASH_BLOCK {
            self.hasher.update(buf);
            self.inner.write_all(buf)?;
        } else {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(HASH_BLOCK);
            }
            self.buf.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        self.inner.flush()
    }
}

enum Inner<W: Write> {
    Plain(zstd::Encoder<'static, HashingWriter<W>>),
    Age(zstd::Encoder<'static, age::stream::StreamWriter<HashingWriter<W>>>),
}

/// Writes one object: envelope, then the body through zstd (and age), then
/// the footer (the payload's hash and the signature).
pub struct ObjectWriter<W: Write> {
    inner: Inner<W>,
    env: Envelope,
    signer: Option<std::sync::Arc<crate::sign::Signer>>,
}

impl<W: Write> ObjectWriter<W> {
    /// A writer for a small object (compressed on the caller's thread).
    pub fn new(sink: W, env: &Envelope, seal: &Seal) -> anyhow::Result<Self> {
        Self::sized(sink, env, seal, 0)
    }

    /// A writer for an object whose body is expected to be about `expected`
    /// bytes: from [`PARALLEL_MIN_BYTES`] on, zstd compresses on every core
    /// while the caller reads, hashes and encrypts.
    pub fn sized(mut sink: W, env: &Envelope, seal: &Seal, expected: u64) -> anyhow::Result<Self> {
        sink.write_all(&env.raw)?;
        let sink = HashingWriter::new(sink);
        let inner = match &seal.enc {
            Encryption::None => Inner::Plain(zstd_encoder(sink, expected)?),
            Encryption::Age(recipients) => {
                let e = age::Encryptor::with_recipients(recipients.iter())
                    .context("cannot encrypt to the configured age recipients")?;
                let w = e.wrap_output(sink)?;
                Inner::Age(zstd_encoder(w, expected)?)
            }
        };
        Ok(ObjectWriter {
            inner,
            env: env.clone(),
            signer: seal.binding.signer.clone(),
        })
    }

    pub fn finish(self) -> io::Result<W> {
        let hashed = match self.inner {
            Inner::Plain(z) => z.finish()?,
            Inner::Age(z) => z.finish()?.finish()?,
        };
        let (mut sink, hash) = hashed.finish()?;
        let mut footer = [0u8; FOOTER_LEN];
        footer[..32].copy_from_slice(hash.as_bytes());
        if let Some(s) = &self.signer {
            footer[32..].copy_from_slice(&s.sign(&self.env.signed_message(hash.as_bytes())));
        }
        sink.write_all(&footer)?;
        Ok(sink)
    }
}

impl<W: Write> Write for ObjectWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(z) => z.write(buf),
            Inner::Age(z) => z.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Plain(z) => z.flush(),
            Inner::Age(z) => z.flush(),
        }
    }
}

/// Open an object for reading: validates the envelope, decrypts (if
/// encrypted) and returns the decompressed body stream.
/// `len` is the object's size: a format-3 object's footer is not payload.
/// Call [`authenticate`] first; this only decodes.
pub fn open_object<'a, R: Read + 'a>(
    mut r: R,
    len: u64,
    identities: Option<&Identities>,
) -> anyhow::Result<(Envelope, Box<dyn Read + 'a>)> {
    let env = Envelope::read_from(&mut r)?;
    let r = if env.has_footer() {
        let payload = len
            .checked_sub(env.raw.len() as u64 + FOOTER_LEN as u64)
            .context("object is truncated (too short for its envelope and footer)")?;
        r.take(payload)
    } else {
        r.take(u64::MAX)
    };
    let body: Box<dyn Read + 'a> = if env.encrypted {
        let ids = identities.context(
            "the replica is encrypted; pass the identity file with --age-identity PATH \
             (the key printed by `offsite keygen` or age-keygen)",
        )?;
        let dec = age::Decryptor::new(r).context("age header is damaged")?;
        let reader = dec.decrypt(ids.iter()).map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => anyhow::anyhow!(
                "none of the given age identities can decrypt this object (wrong --age-identity?)"
            ),
            other => anyhow::anyhow!("cannot decrypt object: {other}"),
        })?;
        Box::new(decoder(reader)?)
    } else {
        Box::new(decoder(r)?)
    };
    Ok((env, body))
}

/// The largest zstd window a reader accepts (2^24 = 16 MiB). offsite's
/// writer (level 3, streaming) uses 2^21; the decoder's default would let a
/// hostile frame make it allocate 128 MiB.
const MAX_WINDOW_LOG: u32 = 24;

fn decoder<'a, R: Read + 'a>(
    r: R,
) -> anyhow::Result<zstd::Decoder<'static, std::io::BufReader<R>>> {
    let mut d = zstd::Decoder::new(r)?;
    d.window_log_max(MAX_WINDOW_LOG)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use crate::sign::Signer;
    use std::sync::Arc;

    fn meta() -> EnvelopeMeta {
        EnvelopeMeta {
            engine: "sqlite".into(),
            replica: String::new(),
            database: String::new(),
            lineage: "0000000000000001-000000aa".into(),
            first_txid: 1,
            last_txid: 2,
            time_us: 5,
            level: 0,
            signer: String::new(),
            link: "00".repeat(16),
            resume: serde_json::json!({"frames": 0}),
        }
    }

    fn seal(enc: Encryption, signer: &Arc<Signer>, replica: &str) -> Seal {
        Seal {
            enc,
            binding: Binding {
                signer: Some(signer.clone()),
                replica: replica.into(),
                database: "app.db".into(),
            },
        }
    }

    fn write(seal: &Seal, data: &[u8]) -> (Envelope, Vec<u8>) {
        let env = Envelope::new(ObjectKind::Segment, seal, meta());
        let mut w = ObjectWriter::new(Vec::new(), &env, seal).unwrap();
        w.write_all(data).unwrap();
        (env, w.finish().unwrap())
    }

    fn trust(signer: &Signer, replica: &str) -> Trust {
        Trust {
            keys: vec![signer.public()],
            replica: Some(replica.into()),
            ..Trust::default()
        }
    }

    #[test]
    fn roundtrip_encrypted_and_plain() {
        let (id, rcpt) = keys::generate();
        let ids = keys::Identities::from_x25519(vec![id]);
        let recipients = keys::Recipients::parse_list(std::slice::from_ref(&rcpt)).unwrap();
        let signer = Arc::new(Signer::generate());
        for enc in [Encryption::None, Encryption::Age(recipients)] {
            let encrypted = matches!(enc, Encryption::Age(_));
            let seal = seal(enc, &signer, "r1");
            let data: Vec<u8> = (0..100_000u32)
                .flat_map(|i| (i % 7).to_le_bytes())
                .collect();
            let (env, obj) = write(&seal, &data);
            let (e1, a, _) =
                authenticate(&obj[..], obj.len() as u64, &trust(&signer, "r1")).unwrap();
            assert_eq!(a, Authenticity::Signed(signer.public()));
            assert_eq!(e1.meta.replica, "r1");
            let (e2, mut body) = open_object(&obj[..], obj.len() as u64, Some(&ids)).unwrap();
            assert_eq!(e2.raw, env.raw);
            let mut out = Vec::new();
            body.read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
            if encrypted {
                // Ciphertext must not contain the plaintext run.
                assert!(
                    !obj.windows(16).any(|w| w == &data[..16])
                        || data[..16].iter().all(|b| *b == 0)
                );
                // Wrong identity → clear error.
                let (other, _) = keys::generate();
                let wrong = keys::Identities::from_x25519(vec![other]);
                let err = open_object(&obj[..], obj.len() as u64, Some(&wrong))
                    .err()
                    .unwrap();
                assert!(
                    err.to_string().contains("none of the given age identities"),
                    "{err}"
                );
                let err = open_object(&obj[..], obj.len() as u64, None).err().unwrap();
                assert!(err.to_string().contains("--age-identity"), "{err}");
            }
        }
    }

    /// A big object is compressed by zstd's workers: still one standard
    /// frame with the window offsite promises (2^21), the same body back.
    #[test]
    fn big_objects_compress_in_parallel_into_one_standard_frame() {
        let signer = Arc::new(Signer::generate());
        let seal = seal(Encryption::None, &signer, "r1");
        // Page-like data: half random-looking, half repeated.
        let data: Vec<u8> = (0..3 * PARALLEL_MIN_BYTES as usize / 2)
            .map(|i| {
                if (i / 2048) % 2 == 0 {
                    (i.wrapping_mul(2654435761) >> 13) as u8
                } else {
                    b"offsite"[i % 7]
                }
            })
            .collect();
        assert!(zstd_workers(data.len() as u64) >= 1);
        let env = Envelope::new(ObjectKind::Segment, &seal, meta());
        let mut w = ObjectWriter::sized(Vec::new(), &env, &seal, data.len() as u64).unwrap();
        for c in data.chunks(4100) {
            w.write_all(c).unwrap();
        }
        let obj = w.finish().unwrap();
        authenticate(&obj[..], obj.len() as u64, &trust(&signer, "r1")).unwrap();
        let (_, mut body) = open_object(&obj[..], obj.len() as u64, None).unwrap();
        let mut out = Vec::new();
        body.read_to_end(&mut out).unwrap();
        assert!(out == data);
        let frame = &obj[env.raw.len()..obj.len() - FOOTER_LEN];
        let mut d = zstd::Decoder::new(frame).unwrap();
        d.window_log_max(21).unwrap();
        let mut again = Vec::new();
        d.read_to_end(&mut again).unwrap();
        assert!(again == data);
    }

    /// Every way to get an object past a reader without the signing key
    /// is refused, each with its own reason.
    #[test]
    fn authenticate_refuses_what_the_pinned_key_did_not_sign_for_this_replica() {
        let signer = Arc::new(Signer::generate());
        let t = trust(&signer, "r1");
        let check = |obj: &[u8], t: &Trust| {
            authenticate(obj, obj.len() as u64, t)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        };
        let (_, good) = write(&seal(Encryption::None, &signer, "r1"), b"data");
        check(&good, &t).unwrap();
        // Another shipper (a key that is not pinned).
        let other = Arc::new(Signer::generate());
        let (_, forged) = write(&seal(Encryption::None, &other, "r1"), b"evil");
        assert!(check(&forged, &t)
            .unwrap_err()
            .contains("not a key this reader trusts"));
        // Another replica of the same shipper.
        let (_, moved) = write(&seal(Encryption::None, &signer, "r2"), b"data");
        assert!(check(&moved, &t)
            .unwrap_err()
            .contains("belongs to replica r2"));
        // Unsigned: refused unless explicitly allowed.
        let (_, unsigned) = write(&Seal::unsigned(Encryption::None), b"data");
        assert!(check(&unsigned, &t).unwrap_err().contains("no signature"));
        let mut lax = t.clone();
        lax.allow_unsigned = true;
        check(&unsigned, &lax).unwrap();
        // A modified envelope byte (the encryption mode) or payload byte.
        let mut flipped = good.clone();
        flipped[11] = 1;
        assert!(check(&flipped, &t)
            .unwrap_err()
            .contains("signature does not verify"));
        let mut body = good.clone();
        let n = body.len() - FOOTER_LEN - 1;
        body[n] ^= 1;
        assert!(check(&body, &t)
            .unwrap_err()
            .contains("does not match its signed hash"));
        // Truncated or extended.
        assert!(check(&good[..good.len() - 1], &t).is_err());
        let mut longer = good.clone();
        longer.push(0);
        assert!(check(&longer, &t).is_err());
        // The wrong database, when the reader names one.
        let mut db = t.clone();
        db.database = Some("other.db".into());
        assert!(check(&good, &db).unwrap_err().contains("not \"other.db\""));
    }
}
