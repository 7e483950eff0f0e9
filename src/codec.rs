//! The codec pipeline: plaintext envelope, then zstd, then age
//! (docs/FORMAT.md, "Object envelope"). Knows nothing about databases: the
//! engine's resume position is an opaque JSON value here.

use std::io::{self, Read, Write};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::keys::{Identities, Recipients};

pub const MAGIC: &[u8; 8] = b"OFFSITE\0";
/// The format version this offsite writes (docs/FORMAT.md).
pub const FORMAT_VERSION: u16 = 2;
/// Format version 1 (SQLite only, written before the engine boundary):
/// still read, never written.
pub const LEGACY_VERSION: u16 = 1;
/// The one engine format 1 knew.
pub const LEGACY_ENGINE: &str = "sqlite";
const ZSTD_LEVEL: i32 = 3;

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
    pub lineage: String,
    pub first_txid: u64,
    pub last_txid: u64,
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
            lineage: self.lineage,
            first_txid: self.first_txid,
            last_txid: self.last_txid,
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

impl Envelope {
    pub fn new(kind: ObjectKind, enc: &Encryption, meta: EnvelopeMeta) -> Envelope {
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

    pub fn blake3_hex(&self) -> String {
        blake3::hash(&self.raw).to_hex().to_string()
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
        if version != FORMAT_VERSION && version != LEGACY_VERSION {
            bail!("object has format version {version}; this offsite reads versions {LEGACY_VERSION} and {FORMAT_VERSION} (upgrade offsite)");
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

enum Inner<W: Write> {
    Plain(zstd::Encoder<'static, W>),
    Age(zstd::Encoder<'static, age::stream::StreamWriter<W>>),
}

/// Writes one object: envelope, then the body through zstd (and age).
pub struct ObjectWriter<W: Write> {
    inner: Inner<W>,
}

impl<W: Write> ObjectWriter<W> {
    pub fn new(mut sink: W, env: &Envelope, enc: &Encryption) -> anyhow::Result<Self> {
        sink.write_all(&env.raw)?;
        let inner = match enc {
            Encryption::None => {
                let mut z = zstd::Encoder::new(sink, ZSTD_LEVEL)?;
                z.include_checksum(true)?;
                Inner::Plain(z)
            }
            Encryption::Age(recipients) => {
                let e = age::Encryptor::with_recipients(recipients.iter())
                    .context("cannot encrypt to the configured age recipients")?;
                let w = e.wrap_output(sink)?;
                let mut z = zstd::Encoder::new(w, ZSTD_LEVEL)?;
                z.include_checksum(true)?;
                Inner::Age(z)
            }
        };
        Ok(ObjectWriter { inner })
    }

    pub fn finish(self) -> io::Result<W> {
        match self.inner {
            Inner::Plain(z) => z.finish(),
            Inner::Age(z) => z.finish()?.finish(),
        }
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
pub fn open_object<'a, R: Read + 'a>(
    mut r: R,
    identities: Option<&Identities>,
) -> anyhow::Result<(Envelope, Box<dyn Read + 'a>)> {
    let env = Envelope::read_from(&mut r)?;
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
        Box::new(zstd::Decoder::new(reader)?)
    } else {
        Box::new(zstd::Decoder::new(r)?)
    };
    Ok((env, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;

    fn meta() -> EnvelopeMeta {
        EnvelopeMeta {
            engine: "sqlite".into(),
            lineage: "0000000000000001-000000aa".into(),
            first_txid: 1,
            last_txid: 2,
            link: "00".repeat(16),
            resume: serde_json::json!({"frames": 0}),
        }
    }

    #[test]
    fn roundtrip_encrypted_and_plain() {
        let (id, rcpt) = keys::generate();
        let ids = keys::Identities::from_x25519(vec![id]);
        let recipients = keys::Recipients::parse_list(std::slice::from_ref(&rcpt)).unwrap();
        for enc in [Encryption::None, Encryption::Age(recipients)] {
            let env = Envelope::new(ObjectKind::Segment, &enc, meta());
            let mut w = ObjectWriter::new(Vec::new(), &env, &enc).unwrap();
            let data: Vec<u8> = (0..100_000u32)
                .flat_map(|i| (i % 7).to_le_bytes())
                .collect();
            w.write_all(&data).unwrap();
            let obj = w.finish().unwrap();
            let (e2, mut body) = open_object(&obj[..], Some(&ids)).unwrap();
            assert_eq!(e2.meta, meta());
            assert_eq!(e2.raw, env.raw);
            let mut out = Vec::new();
            body.read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
            if matches!(enc, Encryption::Age(_)) {
                // Ciphertext must not contain the plaintext run.
                assert!(
                    !obj.windows(16).any(|w| w == &data[..16])
                        || data[..16].iter().all(|b| *b == 0)
                );
                // Wrong identity → clear error.
                let (other, _) = keys::generate();
                let wrong = keys::Identities::from_x25519(vec![other]);
                let err = open_object(&obj[..], Some(&wrong)).err().unwrap();
                assert!(
                    err.to_string().contains("none of the given age identities"),
                    "{err}"
                );
                let err = open_object(&obj[..], None).err().unwrap();
                assert!(err.to_string().contains("--age-identity"), "{err}");
            }
        }
    }
}
