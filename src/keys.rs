//! age keys: recipients (public, for the shipper) and identities (secret,
//! only for restore). Standard X25519 keys, interchangeable with age-keygen.

use std::path::Path;

use age::secrecy::ExposeSecret;
use anyhow::{bail, Context};

/// Public keys objects are encrypted to.
#[derive(Clone)]
pub struct Recipients(Vec<age::x25519::Recipient>);

impl Recipients {
    pub fn parse_list(keys: &[String]) -> anyhow::Result<Recipients> {
        let mut v = Vec::new();
        for k in keys {
            v.push(parse_recipient(k.trim())?);
        }
        Ok(Recipients(v))
    }

    /// Lines of `age1…` keys; blank lines and `#` comments are ignored.
    pub fn read_file(path: &Path) -> anyhow::Result<Recipients> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read age recipients file {}", path.display()))?;
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("AGE-SECRET-KEY-") {
                bail!(
                    "{}:{}: this is a secret identity, not a recipient; give the shipper only the public `age1…` key (offsite keygen prints it)",
                    path.display(),
                    i + 1
                );
            }
            v.push(parse_recipient(line).with_context(|| format!("{}:{}", path.display(), i + 1))?);
        }
        if v.is_empty() {
            bail!(
                "age recipients file {} contains no recipient",
                path.display()
            );
        }
        Ok(Recipients(v))
    }

    pub fn extend(&mut self, other: Recipients) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn age::Recipient> {
        self.0.iter().map(|r| r as &dyn age::Recipient)
    }
}

fn parse_recipient(s: &str) -> anyhow::Result<age::x25519::Recipient> {
    if s.starts_with("AGE-SECRET-KEY-") {
        bail!("an age secret key was given where a public recipient (age1…) is expected; never give the shipper the identity");
    }
    s.parse::<age::x25519::Recipient>().map_err(|e| {
        anyhow::anyhow!(
            "invalid age recipient {s:?}: {e} (expected an X25519 public key starting with age1)"
        )
    })
}

/// Secret keys used to decrypt (restore side only). Cloning shares the keys.
#[derive(Clone)]
pub struct Identities(Vec<std::sync::Arc<dyn age::Identity + Send + Sync>>);

impl Identities {
    pub fn from_x25519(ids: Vec<age::x25519::Identity>) -> Identities {
        Identities(
            ids.into_iter()
                .map(|i| std::sync::Arc::new(i) as std::sync::Arc<dyn age::Identity + Send + Sync>)
                .collect(),
        )
    }

    /// Read age identity files (the format age-keygen and `offsite keygen` write).
    pub fn read_files(paths: &[std::path::PathBuf]) -> anyhow::Result<Identities> {
        let mut v: Vec<std::sync::Arc<dyn age::Identity + Send + Sync>> = Vec::new();
        for p in paths {
            // A recipient (public key) where the identity belongs is a common mix-up.
            if let Ok(text) = std::fs::read_to_string(p) {
                let lines: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect();
                if !lines.is_empty() && lines.iter().all(|l| l.starts_with("age1")) {
                    bail!(
                        "{} holds an age recipient (public key, age1…), not an identity; restore needs the secret identity file (AGE-SECRET-KEY-…) that `offsite keygen -o` wrote",
                        p.display()
                    );
                }
            }
            let f = age::IdentityFile::from_file(p.to_string_lossy().into_owned())
                .with_context(|| format!("cannot read age identity file {}", p.display()))?;
            let ids = f
                .into_identities()
                .with_context(|| format!("age identity file {} is not usable", p.display()))?;
            if ids.is_empty() {
                bail!("age identity file {} contains no identity", p.display());
            }
            v.extend(ids.into_iter().map(std::sync::Arc::from));
        }
        Ok(Identities(v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.0.iter().map(|i| i.as_ref() as &dyn age::Identity)
    }
}

/// A new X25519 identity and its recipient string.
pub fn generate() -> (age::x25519::Identity, String) {
    let id = age::x25519::Identity::generate();
    let r = id.to_public().to_string();
    (id, r)
}

/// The identity file text, in age-keygen's layout.
pub fn identity_file_text(id: &age::x25519::Identity, pins: &[crate::sign::PublicKey]) -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let pins: String = pins
        .iter()
        .map(|k| format!("{} {k}\n", crate::sign::PIN_LINE))
        .collect();
    format!(
        "# created: {now}\n# public key: {}\n{pins}{}\n",
        id.to_public(),
        id.to_string().expose_secret()
    )
}

/// Write a new identity to `path` (mode 0600, refusing to overwrite) and return its recipient.
pub fn keygen_to_file(path: &Path, pins: &[crate::sign::PublicKey]) -> anyhow::Result<String> {
    let (id, r) = generate();
    write_secret_file(path, "identity", &identity_file_text(&id, pins))?;
    Ok(r)
}

/// Create `path` with `text`, mode 0600, synced; never overwrites (a key
/// file that exists is refused, naming `what`).
pub fn write_secret_file(path: &Path, what: &str, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {what} file {} (it must not exist yet; offsite never overwrites a key)",
                path.display()
            )
        })?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Never prints key material: only how many identities there are.
impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities(<redacted>)")
    }
}
