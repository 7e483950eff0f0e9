//! Bit rot and tampering in the bucket: seeded random mutations of a
//! pristine replica (several lineages, periodic snapshots, compacted
//! segments), one at a time, each undone before the next. Every mutation must
//! be detected by `verify` with the object named, and by restore of every
//! sampled target whose plan uses the object; no restore may ever succeed
//! with bytes other than the pristine restore's (zero silent wrong restores).
//!
//! Mutations: bit flips at random offsets (and in the plaintext envelope),
//! truncation, appended bytes, objects swapped between lineages, an object
//! replaced by an older object of its slot (same lineage, kind and level), a
//! level-0 segment deleted in the middle of its lineage.
//!
//! The bulk runs in-process on `file://` (1000 mutations: half on an
//! age-encrypted replica, half on a plaintext one, where only offsite's own
//! hashes protect the data); a smaller sample runs on Garage.

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use offsite::clock::Clock;
use offsite::codec::Encryption;
use offsite::keys::{Identities, Recipients};
use offsite::layout::{Catalog, Target};
use offsite::replicate::{Options, Replicator};
use offsite::restore::{restore, RestoreOptions};
use offsite::storage::{self, Body, DynStorage, ObjectMeta};
use offsite::verify::{verify, VerifyOptions};
use support::writer::Writer;

const SEED: u64 = 0x0ff5_17e5_eed5;
/// Mutations per file:// replica (two replicas: encrypted and plaintext).
const FILE_MUTATIONS: usize = 500;
/// Mutations on the Garage copy of the encrypted replica.
const S3_MUTATIONS: usize = 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// One replica and everything known about it while intact.
struct Pristine {
    name: String,
    store: DynStorage,
    ids: Option<Identities>,
    objects: Vec<ObjectMeta>,
    catalog: Catalog,
    /// Every restore target sampled, with the BLAKE3 of its pristine restore.
    expected: Vec<(Target, [u8; 32])>,
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

async fn open_store(url: &str) -> DynStorage {
    storage::open(&url.parse().unwrap()).await.unwrap()
}

/// Build two replicas of one database history (encrypted and plaintext):
/// three lineages (continuity broken twice while offsite was stopped), each
/// with periodic snapshots and level-1/level-2 compacted segments.
async fn build(dir: &Path) -> (DynStorage, DynStorage, Identities) {
    let db = dir.join("app.db");
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let (id, rcpt) = offsite::keys::generate();
    let ids = Identities::from_x25519(vec![id]);
    let enc = Encryption::Age(Recipients::parse_list(&[rcpt]).unwrap());
    let s_enc = open_store(&file_url(&dir.join("enc"))).await;
    let s_plain = open_store(&file_url(&dir.join("plain"))).await;
    let start = 1_800_000_000 * 1_000_000i64;
    let (clock, hand) = Clock::manual(start);
    let mut w = Writer::new(&db, 9, 30_000);
    w.commit();
    let mut rng = Rng(SEED ^ 1);
    for lineage in 0..3 {
        let opts = |spool: &Path| {
            let mut o = Options::new(db.clone(), spool.to_path_buf());
            o.signer = Some(crate::support::harness::test_signer());
            o.clock = clock.clone();
            o.retention = None;
            o.compaction_levels = vec![Duration::from_secs(60), Duration::from_secs(300)];
            o.snapshot_interval = Some(Duration::from_secs(4 * 60));
            o
        };
        let mut ra = Replicator::new(opts(&spool), s_enc.clone(), enc.clone());
        let mut rb = Replicator::new(opts(&spool), s_plain.clone(), Encryption::None);
        ra.start().await.unwrap();
        rb.start().await.unwrap();
        for step in 0..16u64 {
            for _ in 0..1 + rng.below(3) {
                w.commit();
            }
            if step % 6 == 5 {
                if step % 12 == 5 {
                    w.grow(12, 2500);
                } else {
                    w.shrink();
                }
            }
            hand.advance(Duration::from_secs(10 + rng.below(40) as u64));
            ra.step(true).await.unwrap();
            rb.step(true).await.unwrap();
        }
        // Close every compaction window.
        hand.advance(Duration::from_secs(900));
        ra.step(true).await.unwrap();
        rb.step(true).await.unwrap();
        drop(ra);
        drop(rb);
        if lineage < 2 {
            // Commits made and checkpointed away while offsite is stopped:
            // the next start cannot continue the lineage.
            w.commit();
            w.commit();
            w.c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
            w.commit();
            hand.advance(Duration::from_secs(30));
        }
    }
    (s_enc, s_plain, ids)
}

async fn restore_hash(
    store: &DynStorage,
    ids: Option<&Identities>,
    target: Target,
    out: &Path,
) -> anyhow::Result<[u8; 32]> {
    let mut o = RestoreOptions::new(target, out.to_path_buf());
    o.identities = ids.cloned();
    o.trust = crate::support::harness::test_trust();
    o.parallel = 4;
    let r = restore(store.as_ref(), o).await;
    let res = r.map(|_| *blake3::hash(&std::fs::read(out).unwrap()).as_bytes());
    let _ = std::fs::remove_file(out);
    res
}

/// List the replica and restore every txid (and a few times) once.
async fn survey(name: &str, store: DynStorage, ids: Option<Identities>, tmp: &Path) -> Pristine {
    let objects = store.list("lineages/").await.unwrap();
    let catalog = Catalog::from_list(&objects);
    assert_eq!(catalog.lineages.len(), 3, "{name}: three lineages");
    for l in catalog.lineages.values() {
        assert!(
            l.snapshots.len() >= 2 && l.compacted.values().flatten().any(|c| c.level == 2),
            "{name}: lineage {} lacks periodic snapshots or level-2 segments",
            l.id
        );
    }
    let mut targets = vec![Target::Latest];
    for l in catalog.lineages.values() {
        let lo = l.snapshots[0].txid;
        let hi = l.max_txid().unwrap();
        targets.extend((lo..=hi).map(Target::Txid));
        // Times: the end of every third level-0 segment, and just before it.
        for g in l.segments.values().flatten().step_by(3) {
            targets.push(Target::Time(g.last_time_us));
            targets.push(Target::Time(g.last_time_us - 1));
        }
    }
    let out = tmp.join(format!("{name}-survey.db"));
    let mut expected = Vec::new();
    for t in targets {
        match restore_hash(&store, ids.as_ref(), t, &out).await {
            Ok(h) => expected.push((t, h)),
            // A time before the lineage's first snapshot.
            Err(e) if matches!(t, Target::Time(_)) && format!("{e:#}").contains("no ") => {}
            Err(e) => panic!("{name}: pristine restore of {t:?} failed: {e:#}"),
        }
    }
    let rep = verify(store.as_ref(), &verify_opts(ids.as_ref()))
        .await
        .unwrap();
    assert!(rep.ok(), "{name}: pristine replica: {}", rep.human());
    Pristine {
        name: name.to_string(),
        store,
        ids,
        objects,
        catalog,
        expected,
    }
}

fn verify_opts(ids: Option<&Identities>) -> VerifyOptions {
    VerifyOptions {
        identities: ids.cloned(),
        trust: crate::support::harness::test_trust(),
        parallel: 4,
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    BitFlip {
        key: String,
        offset: usize,
        bit: u8,
    },
    Truncate {
        key: String,
        len: usize,
    },
    /// Bytes appended after the end of the object.
    Append {
        key: String,
        bytes: Vec<u8>,
    },
    /// Two objects of different lineages exchange contents.
    SwapLineages {
        a: String,
        b: String,
    },
    /// The object's contents replaced by an older object of the same kind
    /// and level in the same lineage (a rolled-back write).
    OlderInSlot {
        key: String,
        older: String,
    },
    /// A level-0 segment in the middle of its lineage disappears.
    DeleteMiddle {
        key: String,
    },
}

impl Mutation {
    fn keys(&self) -> Vec<&str> {
        match self {
            Mutation::BitFlip { key, .. }
            | Mutation::Truncate { key, .. }
            | Mutation::Append { key, .. }
            | Mutation::OlderInSlot { key, .. }
            | Mutation::DeleteMiddle { key } => vec![key],
            Mutation::SwapLineages { a, b } => vec![a, b],
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Mutation::BitFlip { .. } => "bit flip",
            Mutation::Truncate { .. } => "truncation",
            Mutation::Append { .. } => "appended bytes",
            Mutation::SwapLineages { .. } => "swap between lineages",
            Mutation::OlderInSlot { .. } => "older object in its slot",
            Mutation::DeleteMiddle { .. } => "deleted middle segment",
        }
    }
}

/// (kind, level) of a key: `snap`, or the segment level.
fn slot(key: &str) -> (bool, Option<u8>) {
    match offsite::layout::parse_key(key, 0) {
        Some(offsite::layout::Entry::Snapshot(_)) => (true, None),
        Some(offsite::layout::Entry::Segment(g)) => (false, Some(g.level)),
        None => panic!("not an offsite key: {key}"),
    }
}

fn lineage_of(key: &str) -> &str {
    key.split('/').nth(1).unwrap()
}

fn generate(p: &Pristine, rng: &mut Rng, sizes: &HashMap<String, u64>) -> Mutation {
    let keys: Vec<&str> = p.objects.iter().map(|o| o.key.as_str()).collect();
    loop {
        let key = rng.pick(&keys).to_string();
        let size = sizes[&key] as usize;
        match rng.below(100) {
            0..=29 => {
                return Mutation::BitFlip {
                    offset: rng.below(size),
                    bit: rng.below(8) as u8,
                    key,
                }
            }
            30..=34 => {
                // Inside the plaintext envelope (magic, version, kind,
                // encryption, metadata JSON).
                return Mutation::BitFlip {
                    offset: rng.below(size.min(300)),
                    bit: rng.below(8) as u8,
                    key,
                };
            }
            35..=39 => {
                let n = 1 + rng.below(64);
                return Mutation::Append {
                    bytes: (0..n).map(|_| rng.next() as u8).collect(),
                    key,
                };
            }
            40..=59 => {
                return Mutation::Truncate {
                    len: rng.below(size),
                    key,
                }
            }
            60..=74 => {
                let others: Vec<&str> = keys
                    .iter()
                    .copied()
                    .filter(|k| lineage_of(k) != lineage_of(&key) && slot(k) == slot(&key))
                    .collect();
                if others.is_empty() {
                    continue;
                }
                return Mutation::SwapLineages {
                    b: rng.pick(&others).to_string(),
                    a: key,
                };
            }
            75..=89 => {
                // Keys sort by txid within a lineage and slot.
                let older: Vec<&str> = keys
                    .iter()
                    .copied()
                    .filter(|k| {
                        lineage_of(k) == lineage_of(&key)
                            && slot(k) == slot(&key)
                            && *k < key.as_str()
                    })
                    .collect();
                if older.is_empty() {
                    continue;
                }
                return Mutation::OlderInSlot {
                    older: rng.pick(&older).to_string(),
                    key,
                };
            }
            _ => {
                // A level-0 segment that is neither the first nor the last of its lineage.
                let l = &p.catalog.lineages[lineage_of(&key)];
                let segs: Vec<&str> = l
                    .segments
                    .values()
                    .flatten()
                    .map(|g| g.key.as_str())
                    .collect();
                if segs.len() < 3 {
                    continue;
                }
                let k = segs[1 + rng.below(segs.len() - 2)];
                return Mutation::DeleteMiddle { key: k.to_string() };
            }
        }
    }
}

async fn apply(store: &DynStorage, m: &Mutation) -> Vec<(String, bytes::Bytes)> {
    let get = |k: String| async move { (k.clone(), store.get(&k).await.unwrap()) };
    let put = |k: String, b: Vec<u8>| async move {
        store.put(&k, Body::Bytes(b.into())).await.unwrap();
    };
    match m {
        Mutation::BitFlip { key, offset, bit } => {
            let o = get(key.clone()).await;
            let mut b = o.1.to_vec();
            b[*offset] ^= 1 << bit;
            put(key.clone(), b).await;
            vec![o]
        }
        Mutation::Truncate { key, len } => {
            let o = get(key.clone()).await;
            put(key.clone(), o.1[..*len].to_vec()).await;
            vec![o]
        }
        Mutation::Append { key, bytes } => {
            let o = get(key.clone()).await;
            let mut b = o.1.to_vec();
            b.extend_from_slice(bytes);
            put(key.clone(), b).await;
            vec![o]
        }
        Mutation::SwapLineages { a, b } => {
            let oa = get(a.clone()).await;
            let ob = get(b.clone()).await;
            put(a.clone(), ob.1.to_vec()).await;
            put(b.clone(), oa.1.to_vec()).await;
            vec![oa, ob]
        }
        Mutation::OlderInSlot { key, older } => {
            let o = get(key.clone()).await;
            let old = store.get(older).await.unwrap();
            put(key.clone(), old.to_vec()).await;
            vec![o]
        }
        Mutation::DeleteMiddle { key } => {
            let o = get(key.clone()).await;
            store.delete(key).await.unwrap();
            vec![o]
        }
    }
}

async fn undo(store: &DynStorage, saved: Vec<(String, bytes::Bytes)>) {
    for (k, b) in saved {
        store.put(&k, Body::Bytes(b)).await.unwrap();
    }
}

#[derive(Default, Debug)]
struct Tally {
    tried: usize,
    verify_detected: usize,
    verify_named: usize,
    /// Mutations some sampled restore target depended on…
    restore_affected: usize,
    /// …and restore refused at least one of them.
    restore_detected: usize,
    restore_named: usize,
    /// Restores of affected targets that still gave the pristine bytes
    /// (a deleted segment a compacted segment stands in for).
    restore_exact_anyway: usize,
    /// Mutations no sampled target's restore reads (objects only verify needs).
    restore_unaffected: usize,
    by_kind: BTreeMap<&'static str, usize>,
    failures: Vec<String>,
}

/// Apply `n` mutations to `p`, one at a time, and check each.
async fn fuzz(p: &Pristine, n: usize, seed: u64, tmp: &Path, t: &mut Tally) {
    let mut rng = Rng(seed);
    let sizes: HashMap<String, u64> = p.objects.iter().map(|o| (o.key.clone(), o.size)).collect();
    let out = tmp.join(format!("{}-fuzz.db", p.name));
    for i in 0..n {
        let m = generate(p, &mut rng, &sizes);
        let saved = apply(&p.store, &m).await;
        t.tried += 1;
        *t.by_kind.entry(m.kind()).or_default() += 1;
        let keys = m.keys();
        let what = format!("{} #{i} {m:?}", p.name);

        // verify: must find a problem, naming the object (a deleted object
        // is named by the gap it leaves: the txid after the object before it).
        let rep = verify(p.store.as_ref(), &verify_opts(p.ids.as_ref()))
            .await
            .unwrap();
        let problems: Vec<String> = rep
            .lineages
            .iter()
            .flat_map(|l| l.problems.iter())
            .chain(rep.problems.iter())
            .map(|p| format!("{}: {}", p.key, p.problem))
            .collect();
        if !rep.ok() {
            t.verify_detected += 1;
            let named = match &m {
                Mutation::DeleteMiddle { key } => {
                    let g = match offsite::layout::parse_key(key, 0) {
                        Some(offsite::layout::Entry::Segment(g)) => g,
                        _ => unreachable!(),
                    };
                    let needle = format!("txid {}", g.first_txid);
                    problems
                        .iter()
                        .any(|s| s.contains("gap") && s.contains(&needle))
                }
                _ => problems.iter().any(|s| keys.iter().any(|k| s.contains(k))),
            };
            if named {
                t.verify_named += 1;
            } else {
                t.failures.push(format!(
                    "{what}: verify does not name the object: {problems:?}"
                ));
            }
        } else {
            t.failures.push(format!("{what}: verify found nothing"));
        }

        // restore: targets whose pristine plan reads a mutated object.
        let affected: Vec<&(Target, [u8; 32])> = p
            .expected
            .iter()
            .filter(|(tg, _)| {
                let plan = p.catalog.plan(*tg).unwrap();
                std::iter::once(&plan.snapshot.key)
                    .chain(plan.segments.iter().map(|s| &s.key))
                    .any(|k| keys.contains(&k.as_str()))
            })
            .collect();
        if affected.is_empty() {
            t.restore_unaffected += 1;
        } else {
            t.restore_affected += 1;
            // Up to three affected targets: the first, the last, one at random.
            let mut sample = vec![affected[0], affected[affected.len() - 1]];
            sample.push(affected[rng.below(affected.len())]);
            sample.dedup_by_key(|x| format!("{:?}", x.0));
            let (mut refused, mut named, mut exact) = (false, false, false);
            for (tg, want) in sample {
                match restore_hash(&p.store, p.ids.as_ref(), *tg, &out).await {
                    Ok(h) if h == *want => exact = true,
                    Ok(_) => t
                        .failures
                        .push(format!("{what}: SILENT WRONG RESTORE of {tg:?}")),
                    Err(e) => {
                        refused = true;
                        let msg = format!("{e:#}");
                        let ok = match &m {
                            Mutation::DeleteMiddle { .. } => msg.contains("gap"),
                            _ => keys.iter().any(|k| msg.contains(k)),
                        };
                        if ok {
                            named = true;
                        } else {
                            t.failures.push(format!(
                                "{what}: restore of {tg:?} fails without naming the object: {msg}"
                            ));
                        }
                    }
                }
            }
            if refused {
                t.restore_detected += 1;
                if named {
                    t.restore_named += 1;
                }
            }
            if exact {
                t.restore_exact_anyway += 1;
                if !matches!(m, Mutation::DeleteMiddle { .. }) {
                    t.failures.push(format!(
                        "{what}: a restore read the damaged object and did not notice"
                    ));
                }
            }
            if !refused && !matches!(m, Mutation::DeleteMiddle { .. }) {
                t.failures
                    .push(format!("{what}: no affected restore was refused"));
            }
        }
        // Every tenth mutation: an unaffected target still restores exactly
        // (damage elsewhere does not break what does not depend on it).
        if i % 10 == 0 {
            let unaffected: Vec<&(Target, [u8; 32])> = p
                .expected
                .iter()
                .filter(|x| !affected.iter().any(|a| a.0 == x.0))
                .filter(|(tg, _)| {
                    // Still plannable without the deleted object.
                    !matches!(m, Mutation::DeleteMiddle { .. }) || matches!(tg, Target::Txid(_))
                })
                .collect();
            if !unaffected.is_empty() {
                let (tg, want) = unaffected[rng.below(unaffected.len())];
                match restore_hash(&p.store, p.ids.as_ref(), *tg, &out).await {
                    Ok(h) if h == *want => {}
                    Ok(_) => t
                        .failures
                        .push(format!("{what}: SILENT WRONG RESTORE of unaffected {tg:?}")),
                    Err(e) => t
                        .failures
                        .push(format!("{what}: unaffected target {tg:?} fails: {e:#}")),
                }
            }
        }
        undo(&p.store, saved).await;
    }
}

fn report(name: &str, t: &Tally, took: Duration) {
    eprintln!(
        "{name}: {} mutations {:?} in {took:.1?}: verify detected {} (named {}); restore: {} affected, {} refused (named {}), {} still exact (deleted segment bypassed by a compacted one), {} used by no restore target",
        t.tried,
        t.by_kind,
        t.verify_detected,
        t.verify_named,
        t.restore_affected,
        t.restore_detected,
        t.restore_named,
        t.restore_exact_anyway,
        t.restore_unaffected
    );
}

fn assert_clean(name: &str, t: &Tally) {
    assert!(
        t.failures.is_empty(),
        "{name}: {} of {} mutations went wrong:\n{}",
        t.failures.len(),
        t.tried,
        t.failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(t.verify_detected, t.tried, "{name}: verify");
    assert_eq!(t.verify_named, t.tried, "{name}: verify names");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutation_is_detected_file_and_garage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let t0 = Instant::now();
    let (s_enc, s_plain, ids) = build(dir).await;
    let enc = survey("file-age", s_enc.clone(), Some(ids.clone()), dir).await;
    let plain = survey("file-plain", s_plain, None, dir).await;
    eprintln!(
        "built: {} + {} objects, {} + {} restore targets, {:.1?}",
        enc.objects.len(),
        plain.objects.len(),
        enc.expected.len(),
        plain.expected.len(),
        t0.elapsed()
    );
    let mut total = Tally::default();
    for (p, seed) in [(&enc, SEED), (&plain, SEED ^ 0xabc)] {
        let t1 = Instant::now();
        let mut t = Tally::default();
        fuzz(p, FILE_MUTATIONS, seed, dir, &mut t).await;
        report(&p.name, &t, t1.elapsed());
        assert_clean(&p.name, &t);
        total.tried += t.tried;
    }
    assert_eq!(total.tried, 2 * FILE_MUTATIONS);

    // The same encrypted replica on Garage: a smaller sample through S3.
    let Some(target) = support::s3_target("garage") else {
        return;
    };
    let s3 = open_store(&target.url).await;
    for o in &enc.objects {
        let b = enc.store.get(&o.key).await.unwrap();
        s3.put(&o.key, Body::Bytes(b)).await.unwrap();
    }
    // The signed replica record (the replica id every object is bound to)
    // and head record travel with the objects.
    for k in ["replica.json", "head.json"] {
        let b = enc.store.get(k).await.unwrap();
        s3.put(k, Body::Bytes(b)).await.unwrap();
    }
    let garage = survey("garage-age", s3, Some(ids), dir).await;
    let t1 = Instant::now();
    let mut t = Tally::default();
    fuzz(&garage, S3_MUTATIONS, SEED ^ 0x53, dir, &mut t).await;
    report(&garage.name, &t, t1.elapsed());
    assert_clean(&garage.name, &t);
}
