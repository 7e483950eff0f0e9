//! Replaying a chain of objects into a state: one snapshot, then segments in
//! txid order. Restore writes the result to a file; verify only follows the
//! state. Here every object is checked against its name, the envelope, the
//! chain link it continues and the engine's digest after every commit; the
//! engine (behind [`Replay`]) applies the payloads.

use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, ensure};

use crate::codec::{authenticate, open_object, Authenticity, Envelope};
use crate::engine::{Engine, ExactRead, Replay};
use crate::keys::Identities;
use crate::layout::{SegmentEntry, SnapshotEntry};
use crate::segment::{BodyReader, Digest, Header, Link, Payload};
use crate::sign::Trust;
use crate::storage::Storage;

/// What a reader decrypts with and what it trusts.
#[derive(Clone, Default)]
pub struct Keys {
    pub ids: Option<Identities>,
    pub trust: Trust,
}

/// Objects above this size are downloaded to a temp file instead of memory
/// (with 8 downloads in flight, at most 64 MiB of objects are in memory).
const MEMORY_LIMIT: u64 = 8 << 20;

pub(crate) enum Downloaded {
    Mem(bytes::Bytes),
    File(tempfile::NamedTempFile),
}

impl Downloaded {
    pub(crate) fn len(&self) -> anyhow::Result<u64> {
        Ok(match self {
            Downloaded::Mem(b) => b.len() as u64,
            Downloaded::File(f) => f.as_file().metadata()?.len(),
        })
    }

    pub(crate) fn reader(&self) -> anyhow::Result<Box<dyn Read + '_>> {
        Ok(match self {
            Downloaded::Mem(b) => Box::new(&b[..]),
            Downloaded::File(f) => Box::new(BufReader::with_capacity(1 << 20, f.reopen()?)),
        })
    }

    /// A reader that borrows nothing (for another thread).
    fn owned_reader(&self) -> anyhow::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Downloaded::Mem(b) => Box::new(std::io::Cursor::new(b.clone())),
            Downloaded::File(f) => Box::new(BufReader::with_capacity(1 << 20, f.reopen()?)),
        })
    }
}

/// Objects from this size on are decrypted and decompressed on a thread of
/// their own while the caller applies what is already decoded (restore uses
/// two cores); smaller ones on the caller's thread.
const READ_AHEAD_MIN: u64 = 1 << 20;

pub(crate) async fn download(
    store: &dyn Storage,
    key: &str,
    size: u64,
    tmpdir: &Path,
) -> anyhow::Result<Downloaded> {
    let res = if size > MEMORY_LIMIT {
        let tmp = tempfile::NamedTempFile::new_in(tmpdir)?;
        store
            .get_to_file(key, tmp.path())
            .await
            .map(|_| Downloaded::File(tmp))
    } else {
        store.get(key).await.map(Downloaded::Mem)
    };
    res.map_err(|e| match e {
        crate::storage::StorageError::NotFound { .. } => anyhow::anyhow!(
            "object {key} is missing from the replica (it was listed a moment ago: deleted concurrently, or the store is inconsistent)"
        ),
        other => anyhow::Error::new(other).context(format!("cannot download {key}")),
    })
}

/// Where a replay stops: after `txid`, or before the first commit observed after `time_us`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stop {
    pub txid: u64,
    pub time_us: Option<i64>,
}

impl Stop {
    /// Apply everything.
    pub(crate) const NEVER: Stop = Stop {
        txid: u64::MAX,
        time_us: None,
    };
}

impl<R: Read> ExactRead for Payload<'_, R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        Payload::read_exact(self, buf)
    }
    fn remaining(&self) -> u64 {
        Payload::remaining(self)
    }
}

impl<R: Read> ExactRead for BodyReader<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        self.read_data(buf)
    }
    fn remaining(&self) -> u64 {
        u64::MAX
    }
}

/// The state a replay has reached: the engine's state, the chain link, the
/// txid and time, and what every further object must match.
pub(crate) struct Chain {
    pub engine: Engine,
    pub encrypted: bool,
    /// Format 1: the state digest is the link.
    pub legacy: bool,
    /// The format the lineage is written in (its snapshot's).
    pub version: u16,
    pub link: Link,
    pub txid: u64,
    pub time_us: i64,
    pub replay: Box<dyn Replay>,
}

impl Chain {
    /// The engine's digest of the current state.
    pub fn digest(&self) -> Digest {
        self.replay.digest()
    }

    /// A copy that writes nothing.
    pub fn fork(&self) -> Chain {
        Chain {
            engine: self.engine,
            encrypted: self.encrypted,
            legacy: self.legacy,
            version: self.version,
            link: self.link,
            txid: self.txid,
            time_us: self.time_us,
            replay: self.replay.fork(),
        }
    }
}

/// Authenticate a downloaded object (signature, payload hash, replica and
/// database binding) before anything parses its payload, then open its
/// body. A restore given identities refuses plaintext objects unless
/// `--allow-plaintext`: the encryption mode is part of what is signed, so a
/// plaintext object is one the shipper deliberately wrote unencrypted.
pub(crate) fn open_checked<'a>(
    obj: &'a Downloaded,
    keys: &Keys,
) -> anyhow::Result<(Envelope, Box<dyn Read + 'a>)> {
    let len = obj.len()?;
    let (env, auth, _) = authenticate(obj.reader()?, len, &keys.trust)?;
    if auth == Authenticity::Unsigned {
        tracing::warn!(
            lineage = %env.meta.lineage,
            first_txid = env.meta.first_txid,
            "accepting an UNSIGNED object (--allow-unsigned): its authenticity is not proven"
        );
    }
    if keys.ids.is_some() && !env.encrypted && !keys.trust.allow_plaintext {
        bail!("object is plaintext, but this restore was given an age identity and expects an encrypted replica; refusing it (pass --allow-plaintext if the replica was deliberately written with --no-encryption)");
    }
    if len < READ_AHEAD_MIN {
        return open_object(obj.reader()?, len, keys.ids.as_ref());
    }
    // The object is authenticated: only decoding happens over there.
    let r = obj.owned_reader()?;
    let ids = keys.ids.clone();
    let (env, body) = crate::readahead::spawn(move || open_object(r, len, ids.as_ref()))?;
    Ok((env, Box::new(body)))
}

/// Format 3: the signed envelope names the object's time and level, which
/// must equal its key's (a signed object copied under another name is refused).
fn check_name(env: &Envelope, time_us: i64, level: u8) -> anyhow::Result<()> {
    if env.has_footer() {
        ensure!(
            env.meta.time_us == time_us && env.meta.level == level,
            "envelope (time {}, level {}) does not match the object's name (renamed object)",
            env.meta.time_us,
            env.meta.level
        );
    }
    Ok(())
}

fn check_engine(env: &Envelope, engine: Option<Engine>) -> anyhow::Result<Engine> {
    let found = Engine::parse(&env.meta.engine)?;
    if let Some(want) = engine {
        ensure!(
            found == want,
            "object was written by the {found} engine, but this replica is {want}"
        );
    }
    Ok(found)
}

/// Verify a snapshot against its name and stored digest and start a chain
/// from it; `output` receives the restored data (None: check only).
pub(crate) fn apply_snapshot(
    key: &SnapshotEntry,
    obj: &Downloaded,
    keys: &Keys,
    engine: Option<Engine>,
    output: Option<std::fs::File>,
) -> anyhow::Result<Chain> {
    let (env, body) = open_checked(obj, keys)?;
    check_name(&env, key.time_us, 0)?;
    let engine = check_engine(&env, engine)?;
    let (mut br, header) = BodyReader::open(body, &env)?;
    let Header::Snapshot(h) = header else {
        bail!("object is not a snapshot");
    };
    ensure!(
        h.lineage == key.lineage && h.txid == key.txid && h.time_us == key.time_us,
        "snapshot contents (lineage {}, txid {}, time {}) do not match its name (swapped or renamed object)",
        h.lineage,
        h.txid,
        h.time_us
    );
    let mut replay = engine.replay(output)?;
    let computed = replay.snapshot(&h.payload, &mut br)?;
    let stored = br.read_digest()?;
    ensure!(
        stored == computed,
        "state checksum mismatch after applying the snapshot (stored {}, computed {})",
        hex::encode(stored),
        hex::encode(computed)
    );
    let legacy = br.is_legacy();
    br.finish()?;
    let link = if legacy {
        Link(computed)
    } else {
        let link = Link::from_hex(&h.link)?;
        ensure!(
            env.meta.link == h.link,
            "envelope link {} differs from the snapshot's {}",
            env.meta.link,
            h.link
        );
        // A lineage's first snapshot starts its chain.
        if h.txid == crate::layout::lineage_start(&h.lineage) {
            ensure!(
                link == Link::genesis(&h.lineage, h.txid, h.time_us, &computed),
                "snapshot link {link} is not its lineage's genesis link: the snapshot does not start this lineage"
            );
        }
        link
    };
    Ok(Chain {
        engine,
        encrypted: env.encrypted,
        legacy,
        version: env.version,
        link,
        txid: h.txid,
        time_us: h.time_us,
        replay,
    })
}

/// Apply one segment to `chain`, verifying it against its name, the chain
/// link it continues and every stored digest. Returns the last applied
/// (txid, time), if any, and whether the target was reached.
pub(crate) fn apply_segment(
    chain: &mut Chain,
    stop: Stop,
    seg: &SegmentEntry,
    obj: &Downloaded,
    keys: &Keys,
) -> anyhow::Result<(Option<(u64, i64)>, bool)> {
    let (env, body) = open_checked(obj, keys)?;
    check_name(&env, seg.last_time_us, seg.level)?;
    ensure!(
        env.encrypted == chain.encrypted,
        "object is {} but the snapshot is {}: refusing to mix encrypted and plaintext objects",
        if env.encrypted {
            "encrypted"
        } else {
            "plaintext"
        },
        if chain.encrypted {
            "encrypted"
        } else {
            "plaintext"
        }
    );
    check_engine(&env, Some(chain.engine))?;
    ensure!(
        env.version == chain.version,
        "object is format {} but its lineage's snapshot is format {}: a lineage is written in one format",
        env.version,
        chain.version
    );
    let (mut br, header) = BodyReader::open(body, &env)?;
    let Header::Segment(h) = header else {
        bail!("object is not a segment");
    };
    ensure!(
        h.lineage == seg.lineage && h.first_txid == seg.first_txid && h.last_txid == seg.last_txid,
        "segment contents (lineage {}, txids {}..={}) do not match its name (swapped or renamed object)",
        h.lineage,
        h.first_txid,
        h.last_txid
    );
    ensure!(
        h.level == seg.level,
        "segment level {} differs from its name's level {}",
        h.level,
        seg.level
    );
    ensure!(
        Some(h.first_txid) == chain.txid.checked_add(1),
        "segment does not continue txid {}",
        chain.txid
    );
    ensure!(
        h.prev_link == chain.link.to_hex(),
        "segment does not continue the restored state (link {} vs {}): an object was replaced or is out of order",
        h.prev_link,
        chain.link
    );
    chain.replay.begin_segment(&h.payload)?;
    let mut last = None;
    let mut done = false;
    for i in 0..h.commit_count {
        let head = br.read_commit_head()?;
        ensure!(
            head.txid == h.commit_txid(i),
            "commit txids are not consecutive"
        );
        if i + 1 == h.commit_count {
            ensure!(
                head.time_us == seg.last_time_us,
                "last commit time differs from the object name"
            );
        }
        if stop.time_us.is_some_and(|t| head.time_us > t) {
            // The target lies before this commit: stop applying here.
            done = true;
        }
        if done {
            // Past the target: read (and hash) the rest without applying it,
            // so damage anywhere in an object a restore uses is detected.
            br.skip_payload()?;
            br.read_digest()?;
            continue;
        }
        let computed = chain.replay.commit(&mut br.payload())?;
        let stored = br.read_digest()?;
        ensure!(
            stored == computed,
            "state checksum mismatch after txid {} (stored {}, computed {})",
            head.txid,
            hex::encode(stored),
            hex::encode(computed)
        );
        chain.link = if chain.legacy {
            Link(computed)
        } else if let Some(end) = &h.end_link {
            Link::from_hex(end)?
        } else {
            chain.link.next(head.txid, head.time_us, &computed)
        };
        chain.txid = head.txid;
        chain.time_us = head.time_us;
        last = Some((head.txid, head.time_us));
        if head.txid >= stop.txid {
            done = true;
        }
    }
    br.finish()?;
    if !chain.legacy && chain.txid == h.last_txid {
        ensure!(
            env.meta.link == chain.link.to_hex(),
            "envelope link {} differs from the chain's link after txid {} ({})",
            env.meta.link,
            h.last_txid,
            chain.link
        );
    }
    Ok((last, done))
}

/// Read a segment that is not on the chain: everything but the digests.
pub(crate) fn check_lone_segment(
    g: &SegmentEntry,
    obj: &Downloaded,
    keys: &Keys,
) -> anyhow::Result<()> {
    let (env, body) = open_checked(obj, keys)?;
    check_name(&env, g.last_time_us, g.level)?;
    let engine = check_engine(&env, None)?;
    let (mut br, header) = BodyReader::open(body, &env)?;
    let Header::Segment(h) = header else {
        bail!("object is not a segment");
    };
    ensure!(
        h.lineage == g.lineage
            && h.first_txid == g.first_txid
            && h.last_txid == g.last_txid
            && h.level == g.level,
        "segment contents (lineage {}, txids {}..={}, level {}) do not match its name (swapped or renamed object)",
        h.lineage,
        h.first_txid,
        h.last_txid,
        h.level
    );
    // An engine state that holds nothing: only the payloads' shapes are
    // checked.
    let mut replay = engine.replay(None)?;
    replay.begin_segment(&h.payload)?;
    for i in 0..h.commit_count {
        let head = br.read_commit_head()?;
        ensure!(
            head.txid == h.commit_txid(i),
            "commit txids are not consecutive"
        );
        replay.check_commit(&mut br.payload())?;
        br.read_digest()?;
    }
    br.finish()
}
