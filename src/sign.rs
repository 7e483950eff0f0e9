//! Authenticity (docs/SECURITY.md, docs/FORMAT.md "Signatures"): the
//! shipper's Ed25519 signing key, the verifying keys a reader pins, and the
//! trust a reader applies to what it reads back from storage.
//!
//! Encrypting to a public age recipient gives confidentiality only: anyone
//! who knows the recipient (it is public by design) can write a valid
//! encrypted object. Every object and the replica record are therefore
//! signed with a secret only the shipper holds; readers accept what a
//! pinned key signed, bound to this replica, and nothing else.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

/// The text form of a signing key (secret; shipper only).
pub const SIGNING_PREFIX: &str = "OFFSITE-SIGNING-KEY-1-";
/// The text form of a verifying key (public; pinned by readers).
pub const VERIFY_PREFIX: &str = "offsite-vk1-";
/// An identity-file line that pins a verifying key next to the age identity.
pub const PIN_LINE: &str = "# offsite-verify-key:";

/// Why a shipper without a signing key refuses to start.
pub const NO_SIGNER: &str = "no signing key: every object is signed so that restores can tell your backups from objects planted in the bucket. Make one with `offsite keygen --signing -o /secrets/offsite-signing.key`, pass it with --signing-key-file (or signing-key-file in the config, or the key itself in OFFSITE_SIGNING_KEY), and pin the verifying key it prints where you restore (--verify-key, docs/SECURITY.md)";

/// The shipper's secret: signs every object and the replica record.
pub struct Signer {
    key: SigningKey,
}

impl Signer {
    pub fn generate() -> Signer {
        let seed: [u8; 32] = rand::random();
        Signer {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// `OFFSITE-SIGNING-KEY-1-<64 hex>`, surrounding whitespace and `#`
    /// comment lines ignored.
    pub fn parse(text: &str) -> anyhow::Result<Signer> {
        let mut found = None;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with(VERIFY_PREFIX) {
                bail!("this is a verifying key (public, {VERIFY_PREFIX}…), not a signing key; the shipper needs the secret {SIGNING_PREFIX}… that `offsite keygen --signing` wrote");
            }
            if line.starts_with("AGE-SECRET-KEY-") || line.starts_with("age1") {
                bail!("this is an age key, not a signing key; make one with `offsite keygen --signing -o FILE`");
            }
            let hex = line.strip_prefix(SIGNING_PREFIX).with_context(|| {
                format!("not a signing key (expected a line starting with {SIGNING_PREFIX}; make one with `offsite keygen --signing -o FILE`)")
            })?;
            let bytes: [u8; 32] = hex::decode(hex)
                .ok()
                .and_then(|v| v.try_into().ok())
                .context("signing key is damaged (expected 64 hex digits after the prefix)")?;
            if found.is_some() {
                bail!("more than one signing key given; a shipper signs with exactly one");
            }
            found = Some(Signer {
                key: SigningKey::from_bytes(&bytes),
            });
        }
        found.context("no signing key found (make one with `offsite keygen --signing -o FILE`)")
    }

    pub fn read_file(path: &Path) -> anyhow::Result<Signer> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read signing key file {}", path.display()))?;
        if meta.len() > 4096 {
            bail!(
                "{} is {} bytes, not a signing key file",
                path.display(),
                meta.len()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read signing key file {}", path.display()))?;
        Signer::parse(&text).with_context(|| format!("signing key file {}", path.display()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }

    /// The key file text: comments naming the verifying key, then the key.
    pub fn file_text(&self) -> String {
        format!(
            "# offsite signing key (secret: the shipper's only)\n# verifying key: {}\n{SIGNING_PREFIX}{}\n",
            self.public(),
            hex::encode(self.key.to_bytes())
        )
    }
}

/// Never prints key material.
impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.public())
    }
}

/// A verifying key: public, pinned by whoever reads a replica.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    pub fn parse(s: &str) -> anyhow::Result<PublicKey> {
        let s = s.trim();
        if s.starts_with(SIGNING_PREFIX) {
            bail!("a secret signing key was given where a verifying key ({VERIFY_PREFIX}…) is expected; readers pin only the public key that `offsite keygen --signing` prints");
        }
        let hex = s.strip_prefix(VERIFY_PREFIX).with_context(|| {
            format!("invalid verifying key {s:?}: expected {VERIFY_PREFIX} followed by 64 hex digits (printed by `offsite keygen --signing`)")
        })?;
        PublicKey::from_hex(hex)
            .with_context(|| format!("invalid verifying key {s:?}: damaged key"))
    }

    /// The key's 64 hex digits (as carried in envelopes and records).
    pub fn from_hex(hex: &str) -> anyhow::Result<PublicKey> {
        let bytes: [u8; 32] = hex::decode(hex)
            .ok()
            .and_then(|v| v.try_into().ok())
            .context("expected 64 hex digits")?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| anyhow::anyhow!("not a valid Ed25519 public key"))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// Strict verification (no malleable signatures, no small-order keys).
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        self.0
            .verify_strict(msg, &Signature::from_bytes(sig))
            .is_ok()
    }

    /// `# offsite-verify-key: offsite-vk1-…` lines of an (age identity) file.
    pub fn pins_in(text: &str) -> anyhow::Result<Vec<PublicKey>> {
        let mut v = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix(PIN_LINE) {
                v.push(PublicKey::parse(rest)?);
            }
        }
        Ok(v)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{VERIFY_PREFIX}{}", self.hex())
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// What a reader accepts. Built from the pinned verifying keys (the
/// `--verify-key`s, the pins in the identity file, and a shipper's own key)
/// and the explicit opt-ins; there is no default that accepts everything.
#[derive(Clone, Default)]
pub struct Trust {
    pub keys: Vec<PublicKey>,
    /// Accept objects without a signature (written before format 3, or by
    /// a shipper run with `--unsigned`). Logged loudly where it is used.
    pub allow_unsigned: bool,
    /// Accept plaintext objects in a restore that was given identities.
    pub allow_plaintext: bool,
    /// The database name the replica must be of (`--database`).
    pub database: Option<String>,
    /// The replica id every object must carry: from the verified
    /// `replica.json`, or `--replica-id`. None refuses format-3 objects.
    pub replica: Option<String>,
    /// Only for a shipper whose replica lost its `replica.json`: accept a
    /// pinned signature without knowing the replica id, to adopt the id of
    /// the replica's own newest object instead of minting a new one.
    pub adopt_replica: bool,
}

impl Trust {
    pub fn with_keys(keys: Vec<PublicKey>) -> Trust {
        Trust {
            keys,
            ..Trust::default()
        }
    }

    pub fn pins(&self, signer_hex: &str) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.hex() == signer_hex)
    }

    pub fn describe_keys(&self) -> String {
        if self.keys.is_empty() {
            "no verifying key is pinned (pass --verify-key, or pin it in the identity file)".into()
        } else {
            format!(
                "pinned: {}",
                self.keys
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

/// What the pipeline signs with, and binds every object to.
#[derive(Clone)]
pub struct Binding {
    pub signer: Option<Arc<Signer>>,
    /// The replica id from `replica.json`.
    pub replica: String,
    /// The database's name.
    pub database: String,
}

/// Write a new signing key to `path` (mode 0600, refusing to overwrite)
/// and return its verifying key.
pub fn keygen_to_file(path: &Path) -> anyhow::Result<PublicKey> {
    let s = Signer::generate();
    crate::keys::write_secret_file(path, "signing key", &s.file_text())?;
    Ok(s.public())
}

/// Check a record's hex signature (`sig_hex`) over `msg` by the pinned key
/// named `signer_hex`; `what` names the record in every refusal.
pub fn check_record(
    trust: &Trust,
    what: &str,
    signer_hex: &str,
    sig_hex: &str,
    msg: &[u8],
) -> anyhow::Result<PublicKey> {
    let Some(key) = trust.pins(signer_hex) else {
        bail!(
            "{what} is signed by {VERIFY_PREFIX}{signer_hex}, which is not a key this reader trusts ({})",
            trust.describe_keys()
        );
    };
    let sig: [u8; 64] = hex::decode(sig_hex)
        .ok()
        .and_then(|v| v.try_into().ok())
        .with_context(|| format!("{what} has a damaged signature"))?;
    anyhow::ensure!(
        key.verify(msg, &sig),
        "the signature of {what} does not verify: it was forged or modified"
    );
    Ok(*key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_mixups() {
        let s = Signer::generate();
        let text = s.file_text();
        let s2 = Signer::parse(&text).unwrap();
        assert_eq!(s.public(), s2.public());
        let vk = s.public().to_string();
        assert_eq!(PublicKey::parse(&vk).unwrap(), s.public());
        let sig = s.sign(b"hello");
        assert!(s.public().verify(b"hello", &sig));
        assert!(!s.public().verify(b"hellp", &sig));
        assert!(!Signer::generate().public().verify(b"hello", &sig));
        // Mix-ups name what was given.
        let e = format!("{:#}", Signer::parse(&vk).unwrap_err());
        assert!(e.contains("verifying key"), "{e}");
        let e = format!(
            "{:#}",
            PublicKey::parse(text.lines().last().unwrap()).unwrap_err()
        );
        assert!(e.contains("secret signing key"), "{e}");
        assert!(PublicKey::parse("offsite-vk1-zz").is_err());
        assert!(Signer::parse("OFFSITE-SIGNING-KEY-1-00").is_err());
        // Pins in an identity file.
        let id = format!("# created: x\n{PIN_LINE} {vk}\nAGE-SECRET-KEY-1XYZ\n");
        assert_eq!(PublicKey::pins_in(&id).unwrap(), vec![s.public()]);
    }
}
