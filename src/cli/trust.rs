//! The signing key and what readers trust, from flags, the environment,
//! identity files and the config file (docs/SECURITY.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::sign::{PublicKey, Signer, Trust};

/// The environment variable that may hold the signing key itself (for
/// orchestrators that hand secrets over as variables).
pub const SIGNING_KEY_ENV: &str = "OFFSITE_SIGNING_KEY";

#[derive(Args, Debug, Default, Clone)]
pub struct KeyArgs {
    /// The shipper's signing key file (`offsite keygen --signing`); or the
    /// key itself in OFFSITE_SIGNING_KEY. Readers pin its verifying key.
    #[arg(long, value_name = "PATH", env = "OFFSITE_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// A verifying key (offsite-vk1-…) to trust; repeatable, or
    /// comma-separated in OFFSITE_VERIFY_KEY. Identity files may pin keys
    /// too (`# offsite-verify-key: …` lines).
    #[arg(
        long = "verify-key",
        value_name = "KEY",
        env = "OFFSITE_VERIFY_KEY",
        value_delimiter = ','
    )]
    pub verify_key: Vec<String>,
}

#[derive(Args, Debug, Default, Clone)]
pub struct ReaderArgs {
    /// Accept objects that carry no signature (replicas written before
    /// format 3). Every such object is logged as unsigned.
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Accept plaintext objects although an age identity was given (a
    /// replica deliberately written with --no-encryption).
    #[arg(long)]
    pub allow_plaintext: bool,
    /// The database the replica must hold (its file name, as the shipper
    /// records it in replica.json): refuses another tenant's replica.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// The replica id objects must carry (when replica.json is missing).
    #[arg(long, value_name = "ID")]
    pub replica_id: Option<String>,
}

/// The signing key: the flag, the file named in the config, or the key in
/// OFFSITE_SIGNING_KEY.
pub fn signer(keys: &KeyArgs, config_file: Option<&Path>) -> anyhow::Result<Option<Arc<Signer>>> {
    if let Some(p) = keys.signing_key_file.as_deref().or(config_file) {
        return Ok(Some(Arc::new(Signer::read_file(p)?)));
    }
    match std::env::var(SIGNING_KEY_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            Ok(Some(Arc::new(Signer::parse(&v).context(SIGNING_KEY_ENV)?)))
        }
        _ => Ok(None),
    }
}

/// What a reader trusts: the verifying keys of the flags, the config, the
/// signing key (if this host has it) and the pins in the identity files,
/// plus the opt-ins.
pub fn trust(
    keys: &KeyArgs,
    reader: Option<&ReaderArgs>,
    identity_files: &[PathBuf],
    config: Option<&crate::config::Config>,
) -> anyhow::Result<Trust> {
    let mut t = Trust::default();
    for k in &keys.verify_key {
        if !k.trim().is_empty() {
            t.keys.push(PublicKey::parse(k).context("--verify-key")?);
        }
    }
    if let Some(c) = config {
        t.keys.extend(c.verify_keys.iter().copied());
    }
    if let Some(s) = signer(keys, config.and_then(|c| c.signing_key_file.as_deref()))? {
        t.keys.push(s.public());
    }
    for f in identity_files {
        if let Ok(text) = std::fs::read_to_string(f) {
            t.keys.extend(
                PublicKey::pins_in(&text)
                    .with_context(|| format!("identity file {}", f.display()))?,
            );
        }
    }
    t.keys.dedup();
    if let Some(r) = reader {
        t.allow_unsigned = r.allow_unsigned;
        t.allow_plaintext = r.allow_plaintext;
        t.database = r.database.clone();
        t.replica = r.replica_id.clone();
        if r.allow_unsigned {
            tracing::warn!("--allow-unsigned: objects without a signature are accepted; their authenticity is not proven");
        }
    }
    Ok(t)
}
