//! The contents check: every object downloaded and checked against its
//! name; with keys (or a plaintext replica) the chain replayed like restore
//! does, without writing a database (`crate::replay`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::ensure;
use futures::StreamExt;

use super::structure::{entry_key, entry_size, Step};
use super::{err_text, problem, LineageReport, Problem};
use crate::codec::{authenticate, Authenticity, Envelope, ObjectKind};
use crate::engine::Engine;
use crate::layout::Entry;
use crate::replay::{
    apply_segment, apply_snapshot, check_lone_segment, download, Chain, Downloaded, Keys, Stop,
};
use crate::segment::{Digest, Link};
use crate::storage::Storage;

pub(super) struct ContentsOutcome {
    /// Encrypted objects that could only be checked by envelope (no identity).
    pub(super) envelope_only: usize,
    pub(super) encrypted: Option<bool>,
    /// Objects accepted without a signature (`--allow-unsigned`).
    pub(super) unsigned: usize,
}

/// Authenticate the object (signature, payload hash, replica binding) and
/// check its envelope against the object's name.
fn check_envelope(
    e: &Entry,
    obj: &Downloaded,
    keys: &Keys,
) -> anyhow::Result<(Envelope, Authenticity)> {
    let (env, auth, _) = authenticate(obj.reader()?, obj.len()?, &keys.trust)?;
    let (kind, lineage, first, last) = match e {
        Entry::Snapshot(s) => (ObjectKind::Snapshot, &s.lineage, s.txid, s.txid),
        Entry::Segment(g) => (ObjectKind::Segment, &g.lineage, g.first_txid, g.last_txid),
    };
    if env.has_footer() {
        let (time_us, level) = match e {
            Entry::Snapshot(s) => (s.time_us, 0),
            Entry::Segment(g) => (g.last_time_us, g.level),
        };
        ensure!(
            env.meta.time_us == time_us && env.meta.level == level,
            "signed envelope (time {}, level {}) does not match the object's name (renamed object)",
            env.meta.time_us,
            env.meta.level
        );
    }
    ensure!(
        env.kind == kind,
        "object is a {} but its name is a {}'s",
        env.kind.name(),
        kind.name()
    );
    ensure!(
        env.meta.lineage == *lineage
            && env.meta.first_txid == first
            && env.meta.last_txid == last,
        "envelope (lineage {}, txids {}..={}) does not match the object's name (swapped, renamed or edited object)",
        env.meta.lineage,
        env.meta.first_txid,
        env.meta.last_txid
    );
    Ok((env, auth))
}

/// Download every object of the lineage (in step order, `parallel` at a
/// time) and check it; with keys, replay the state checksum along the chain.
pub(super) async fn check_contents(
    store: &dyn Storage,
    steps: Vec<Step>,
    (engine, keys): (Engine, &Keys),
    parallel: usize,
    dl_dir: &Path,
    lr: &mut LineageReport,
) -> ContentsOutcome {
    let mut out = ContentsOutcome {
        envelope_only: 0,
        encrypted: None,
        unsigned: 0,
    };
    let ids = keys;
    // The replayed state and its txid; `None` after a failure (until the
    // next snapshot restarts the replay).
    let mut chain: Option<Chain> = None;
    // Compacted segments' end digests and links, by last txid.
    let mut pending: BTreeMap<u64, Vec<(String, Digest, Link)>> = BTreeMap::new();
    // Superseded segments: (key, last txid, end digest), checked against
    // the chain's segment that starts where they do.
    let mut superseded: BTreeMap<u64, Vec<(String, u64, Digest)>> = BTreeMap::new();
    let mut stream = futures::stream::iter(steps)
        .map(|step| {
            let dir = dl_dir.to_path_buf();
            async move {
                let e = step.entry();
                let d = download(store, entry_key(&e), entry_size(&e), &dir).await;
                (step, d)
            }
        })
        .buffered(parallel.max(1));
    while let Some((step, d)) = stream.next().await {
        let entry = step.entry();
        let key = entry_key(&entry).to_string();
        let d = match d {
            Ok(d) => d,
            Err(e) => {
                problem(&mut lr.problems, &key, err_text(&e));
                if matches!(step, Step::Base(_) | Step::Segment(_)) {
                    chain = None;
                }
                continue;
            }
        };
        let env = match check_envelope(&entry, &d, keys) {
            Ok((env, auth)) => {
                if auth == Authenticity::Unsigned {
                    out.unsigned += 1;
                }
                env
            }
            Err(e) => {
                problem(&mut lr.problems, &key, err_text(&e));
                if matches!(step, Step::Base(_) | Step::Segment(_)) {
                    chain = None;
                }
                continue;
            }
        };
        match out.encrypted {
            None => out.encrypted = Some(env.encrypted),
            Some(e) if e != env.encrypted => problem(
                &mut lr.problems,
                &key,
                format!(
                    "object is {} but the lineage's first object is {}: a lineage must not mix encrypted and plaintext objects",
                    if env.encrypted { "encrypted" } else { "plaintext" },
                    if e { "encrypted" } else { "plaintext" }
                ),
            ),
            Some(_) => {}
        }
        if env.encrypted && keys.ids.is_none() {
            out.envelope_only += 1;
            chain = None;
            continue;
        }
        let r: anyhow::Result<()> = tokio::task::block_in_place(|| match &step {
            Step::Base(s) => {
                chain = None;
                let c = apply_snapshot(s, &d, ids, Some(engine), None)?;
                let txid = c.txid;
                chain = Some(c);
                settle(&mut pending, chain.as_ref(), txid, &mut lr.problems);
                Ok(())
            }
            Step::Snapshot(s) => {
                let snap = apply_snapshot(s, &d, ids, Some(engine), None)?;
                let txid = snap.txid;
                match &chain {
                    Some(cur) => {
                        ensure!(
                            cur.digest() == snap.digest(),
                            "snapshot state (checksum {}) differs from the state replayed along the chain at txid {txid} ({}): the snapshot does not belong to this lineage's history",
                            hex::encode(snap.digest()),
                            hex::encode(cur.digest())
                        );
                        ensure!(
                            cur.link == snap.link,
                            "snapshot link {} differs from the chain's link at txid {txid} ({}): the snapshot does not belong to this lineage's history",
                            snap.link,
                            cur.link
                        );
                    }
                    None => {
                        // The replay broke earlier: continue from here.
                        chain = Some(snap);
                        settle(&mut pending, chain.as_ref(), txid, &mut lr.problems);
                    }
                }
                Ok(())
            }
            Step::Superseded(o) => match &chain {
                Some(c) => {
                    let mut fork = c.fork();
                    apply_segment(&mut fork, Stop::NEVER, o, &d, ids)?;
                    superseded.entry(o.first_txid).or_default().push((
                        o.key.clone(),
                        o.last_txid,
                        fork.digest(),
                    ));
                    Ok(())
                }
                None => check_lone_segment(o, &d, ids),
            },
            Step::Segment(g) => match chain.as_mut() {
                Some(c) => {
                    for (okey, olast, ock) in superseded.remove(&g.first_txid).unwrap_or_default() {
                        // The chain's state at the shorter segment's end.
                        let mut at_end = c.fork();
                        let stop = Stop {
                            txid: olast,
                            time_us: None,
                        };
                        // A damaged `g` is reported by its own replay below.
                        if apply_segment(&mut at_end, stop, g, &d, ids).is_err() {
                            continue;
                        }
                        if at_end.digest() == ock {
                            problem(
                                &mut lr.warnings,
                                &okey,
                                format!(
                                    "superseded by {}: the same commits (txids {}..={}), left by an upload whose response was lost and which was shipped again with more commits; restores use {}; this object can be deleted",
                                    g.key, g.first_txid, olast, g.key
                                ),
                            );
                        } else {
                            problem(
                                &mut lr.problems,
                                &okey,
                                format!(
                                    "conflicts with {}: a different state at txid {olast} ({} vs {}); two shippers wrote different histories (restores use {})",
                                    g.key,
                                    hex::encode(ock),
                                    hex::encode(at_end.digest()),
                                    g.key
                                ),
                            );
                        }
                    }
                    let r = apply_segment(c, Stop::NEVER, g, &d, ids);
                    if r.is_err() {
                        chain = None;
                    }
                    r?;
                    settle(&mut pending, chain.as_ref(), g.last_txid, &mut lr.problems);
                    Ok(())
                }
                None => {
                    pending.remove(&g.last_txid);
                    check_lone_segment(g, &d, ids)
                }
            },
            Step::Compacted(k) => match &chain {
                Some(c) => {
                    // One fork at a time: applied and dropped right here.
                    let mut fork = c.fork();
                    apply_segment(&mut fork, Stop::NEVER, k, &d, ids)?;
                    pending.entry(k.last_txid).or_default().push((
                        k.key.clone(),
                        fork.digest(),
                        fork.link,
                    ));
                    Ok(())
                }
                None => check_lone_segment(k, &d, ids),
            },
            Step::Lone(Entry::Snapshot(s)) => {
                apply_snapshot(s, &d, ids, Some(engine), None).map(|_| ())
            }
            Step::Lone(Entry::Segment(g)) => check_lone_segment(g, &d, ids),
        });
        match r {
            Ok(()) => lr.checked_objects += 1,
            Err(e) => problem(&mut lr.problems, &key, err_text(&e)),
        }
    }
    out
}

/// The replay reached `txid`: compacted segments ending there must agree.
fn settle(
    pending: &mut BTreeMap<u64, Vec<(String, Digest, Link)>>,
    chain: Option<&Chain>,
    txid: u64,
    problems: &mut Vec<Problem>,
) {
    let (Some(c), Some(v)) = (chain, pending.remove(&txid)) else {
        return;
    };
    let cur = c.digest();
    for (key, ck, link) in v {
        if ck != cur {
            problem(
                problems,
                &key,
                format!(
                    "compacted segment ends in state {} but the level-0 chain reaches state {} at txid {txid}: the merged commit is wrong",
                    hex::encode(ck),
                    hex::encode(cur)
                ),
            );
        } else if link != c.link {
            problem(
                problems,
                &key,
                format!(
                    "compacted segment ends at chain link {link} but the level-0 chain reaches link {} at txid {txid}: its end link is wrong",
                    c.link
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    mod replay {
        use std::io::Write;

        use super::super::*;
        use crate::codec::{Encryption, EnvelopeMeta, ObjectWriter, Seal};
        use crate::engine::sqlite::checksum::PageState;
        use crate::engine::sqlite::pages::{self, SegmentFields, SnapshotFields};
        use crate::layout::{segment_key, snapshot_key};
        use crate::segment::{SegmentWriter, SnapshotWriter};
        use crate::storage::{file::FileStorage, Body};
        use crate::verify::{verify, VerifyOptions};

        const PS: usize = 512;
        const L: &str = "0000000000000001-000000aa";

        /// Unsigned objects (this tests the replay, not the signatures):
        /// verified with `--allow-unsigned`.
        fn env(
            kind: ObjectKind,
            (first, last): (u64, u64),
            (t, level): (i64, u8),
            link: Link,
        ) -> Envelope {
            Envelope::new(
                kind,
                &Seal::unsigned(Encryption::None),
                EnvelopeMeta {
                    engine: "sqlite".into(),
                    replica: String::new(),
                    database: String::new(),
                    lineage: L.into(),
                    first_txid: first,
                    last_txid: last,
                    time_us: t,
                    level,
                    signer: String::new(),
                    link: link.to_hex(),
                    resume: serde_json::Value::Null,
                },
            )
        }

        fn seal(e: &Envelope, body: &[u8]) -> bytes::Bytes {
            let mut w =
                ObjectWriter::new(Vec::new(), e, &Seal::unsigned(Encryption::None)).unwrap();
            w.write_all(body).unwrap();
            w.finish().unwrap().into()
        }

        fn page(b: u8) -> Vec<u8> {
            vec![b; PS]
        }

        fn state(pages: &[Vec<u8>]) -> PageState {
            let mut st = PageState::new(PS);
            for (i, p) in pages.iter().enumerate() {
                st.set_page(i as u32 + 1, p);
            }
            st
        }

        /// One segment object holding one commit (level 0) or one merged
        /// commit (whose end link is `end_link`).
        #[allow(clippy::too_many_arguments)]
        fn segment(
            level: u8,
            (first, last, t): (u64, u64, i64),
            (prev, prev_link): (&PageState, Link),
            truncate_to: Option<u32>,
            records: &[(u32, Vec<u8>)],
            db_pages: u32,
            end: &PageState,
            end_link: Link,
        ) -> (String, bytes::Bytes) {
            let _ = prev;
            let e = env(ObjectKind::Segment, (first, last), (t, level), end_link);
            let h = pages::segment_header(
                L,
                e.blake3_hex(),
                (first, last),
                1,
                level,
                prev_link,
                (level > 0).then_some(end_link),
                SegmentFields::new(PS as u32, truncate_to),
            );
            let mut w = SegmentWriter::new(Vec::new(), &h).unwrap();
            pages::begin_commit(&mut w, (last, t), db_pages, records.len() as u32, PS as u32)
                .unwrap();
            for (p, b) in records {
                pages::write_record(&mut w, db_pages, *p, b).unwrap();
            }
            w.end_commit(&end.checksum().0).unwrap();
            let body = w.finish().unwrap();
            (segment_key(L, level, first, last, t), seal(&e, &body))
        }

        /// Snapshot [A,B] at txid 1; txid 2 writes page 1 = C; txid 3 grows
        /// to 3 pages and writes page 2 = D; a level-1 segment merges 2..=3.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn compacted_segments_are_replayed_against_the_chain() {
            let tmp = tempfile::tempdir().unwrap();
            let store = FileStorage::new(tmp.path().to_path_buf()).unwrap();
            let s0 = state(&[page(1), page(2)]);
            let g = Link::genesis(L, 1, 100, &s0.checksum().0);
            let e = env(ObjectKind::Snapshot, (1, 1), (100, 0), g);
            let mut w = SnapshotWriter::new(
                Vec::new(),
                &pages::snapshot_header(
                    L,
                    e.blake3_hex(),
                    (1, 100),
                    g,
                    SnapshotFields::new(PS as u32, 2),
                ),
            )
            .unwrap();
            w.write_data(&page(1)).unwrap();
            w.write_data(&page(2)).unwrap();
            let body = w.finish(&s0.checksum().0).unwrap();
            store
                .put(&snapshot_key(L, 1, 100), Body::Bytes(seal(&e, &body)))
                .await
                .unwrap();
            let s1 = state(&[page(3), page(2)]);
            let mut s2 = state(&[page(3), page(4)]);
            s2.resize(3);
            let l1 = g.next(2, 200, &s1.checksum().0);
            let l2 = l1.next(3, 300, &s2.checksum().0);
            let objs = [
                segment(0, (2, 2, 200), (&s0, g), None, &[(1, page(3))], 2, &s1, l1),
                segment(0, (3, 3, 300), (&s1, l1), None, &[(2, page(4))], 3, &s2, l2),
                segment(
                    1,
                    (2, 3, 300),
                    (&s0, g),
                    Some(2),
                    &[(1, page(3)), (2, page(4))],
                    3,
                    &s2,
                    l2,
                ),
            ];
            for (k, b) in &objs {
                store.put(k, Body::Bytes(b.clone())).await.unwrap();
            }
            let mut opts = VerifyOptions::default();
            opts.trust.allow_unsigned = true;
            let r = verify(&store, &opts).await.unwrap();
            assert!(r.ok(), "{}", r.human());
            assert_eq!(r.totals.checked_objects, 4);

            // A merged commit that is consistent in itself but not with the
            // chain (page 2 = E instead of D): named by the end-state check.
            let mut bad_end = state(&[page(3), page(5)]);
            bad_end.resize(3);
            let (k, b) = segment(
                1,
                (2, 3, 300),
                (&s0, g),
                Some(2),
                &[(1, page(3)), (2, page(5))],
                3,
                &bad_end,
                l2,
            );
            store.put(&k, Body::Bytes(b)).await.unwrap();
            let r = verify(&store, &opts).await.unwrap();
            assert_eq!(r.problem_count(), 1, "{}", r.human());
            let p = &r.lineages[0].problems[0];
            assert!(p.key == k && p.problem.contains("merged commit"), "{p:?}");

            // A merged commit whose stored checksum is wrong: caught on the clone.
            let (k, b) = segment(
                1,
                (2, 3, 300),
                (&s0, g),
                Some(2),
                &[(1, page(3)), (2, page(5))],
                3,
                &s2,
                l2,
            );
            store.put(&k, Body::Bytes(b)).await.unwrap();
            let r = verify(&store, &opts).await.unwrap();
            assert_eq!(r.problem_count(), 1, "{}", r.human());
            let p = &r.lineages[0].problems[0];
            assert!(
                p.key == k && p.problem.contains("checksum mismatch"),
                "{p:?}"
            );
            // The level-0 chain and snapshot were still fully checked.
            assert_eq!(r.totals.checked_objects, 3);

            // A merged commit with the right pages but a wrong end link:
            // named by the end-link check.
            let (k, b) = segment(
                1,
                (2, 3, 300),
                (&s0, g),
                Some(2),
                &[(1, page(3)), (2, page(4))],
                3,
                &s2,
                l1,
            );
            store.put(&k, Body::Bytes(b)).await.unwrap();
            let r = verify(&store, &opts).await.unwrap();
            assert_eq!(r.problem_count(), 1, "{}", r.human());
            let p = &r.lineages[0].problems[0];
            assert!(p.key == k && p.problem.contains("end link"), "{p:?}");
        }
    }
}
