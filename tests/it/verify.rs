//! `offsite verify` against real replicas (file:// and the S3 test servers):
//! intact replicas pass (also with --deep), every kind of damage fails and
//! names the object; and the daemon's restore drill.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::harness::*;

/// An encrypted replica with one snapshot and several segments at `url`.
fn build_replica(dir: &Path, url: &str) -> (PathBuf, String) {
    let db = dir.join("app.db");
    let (key, rcpt) = keygen(dir);
    ship_in_rounds(&db, url, &["--age-recipient", &rcpt]);
    (key, rcpt)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.all()))
    }
}

fn verify(url: &str, args: &[&str]) -> Run {
    let o = offsite()
        .arg("verify")
        .arg(url)
        .args(args)
        .output()
        .unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn objects(root: &Path, ext: &str) -> Vec<PathBuf> {
    walk(root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect()
}

/// The object key of a file in a file:// replica.
fn key_of(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap().to_string_lossy().into_owned()
}

/// verify must exit 1, say "verify found", and name `needle` in its output.
fn assert_fails(url: &str, args: &[&str], needle: &str) -> Run {
    let r = verify(url, args);
    assert_eq!(r.code, Some(1), "verify must fail: {}", r.all());
    assert!(
        last_line(&r.stderr).contains("verify found"),
        "{}",
        r.stderr
    );
    assert!(
        r.all().contains(needle),
        "output does not name {needle:?}: {}",
        r.all()
    );
    r
}

#[test]
fn verify_file_replica_intact_and_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("replica");
    let url = format!("file://{}", root.display());
    let (key, rcpt) = build_replica(dir, &url);
    let id = key.to_str().unwrap();
    let idargs = ["--age-identity", id];
    let segs = objects(&root, "seg");
    let snap = objects(&root, "snap").pop().unwrap();
    assert!(segs.len() >= 3, "need several segments, got {segs:?}");
    // The objects (the shipper's lease beside them is not one).
    let n_objects = walk(&root.join("lineages")).len() as u64;

    // Intact, with the identity: every object checked.
    let r = verify(&url, &idargs);
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert!(r.stdout.contains("0 problems"), "{}", r.stdout);
    let j = verify(&url, &["--age-identity", id, "--json"]).json();
    assert_eq!(j["totals"]["objects"].as_u64(), Some(n_objects), "{j}");
    assert_eq!(j["totals"]["checked_objects"].as_u64(), Some(n_objects));
    assert_eq!(j["totals"]["problems"].as_u64(), Some(0));
    assert_eq!(j["contents_checked"], true);
    assert_eq!(j["encrypted"], true);
    let latest = latest_txid(&url).unwrap();
    assert_eq!(j["lineages"][0]["last"]["txid"].as_u64(), Some(latest));

    // --deep: oldest, newest, random points and one time, all restored.
    let r = verify(&url, &["--age-identity", id, "--deep", "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.all());
    let j = r.json();
    let deep = j["deep"].as_array().unwrap();
    assert!(deep.len() >= 4, "{j}");
    assert!(deep.iter().all(|s| s["ok"] == true), "{j}");
    let kinds: Vec<&str> = deep.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    for k in ["oldest", "newest", "random", "time"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    assert!(deep
        .iter()
        .any(|s| s["kind"] == "newest" && s["txid"].as_u64() == Some(latest)));
    assert!(deep.iter().all(|s| s["objects"].as_u64() >= Some(1)));

    // Without the identity: structure and envelopes only, with a notice.
    let r = verify(&url, &[]);
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert!(
        r.stdout
            .contains("contents not checked: pass --age-identity"),
        "{}",
        r.stdout
    );

    // The daemon's drill: newest point plus a random one.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(offsite::storage::open(&url.parse().unwrap()))
        .unwrap();
    let ids = offsite::keys::Identities::read_files(std::slice::from_ref(&key)).unwrap();
    let d = rt
        .block_on(offsite::verify::drill(
            store.as_ref(),
            Some(&ids),
            &test_trust(),
            1,
            42,
        ))
        .unwrap();
    assert!(d.ok, "{d:?}");
    assert_eq!(d.newest_verified_txid, Some(latest));
    assert!(d.newest_verified_time_us.is_some());
    assert_eq!(d.samples.len(), 2);

    // 1. A missing middle segment: a gap, named by the object before it;
    //    found with and without the identity (structure check).
    let victim = &segs[1];
    let vkey = key_of(&root, victim);
    let orig = std::fs::read(victim).unwrap();
    std::fs::remove_file(victim).unwrap();
    let before = key_of(&root, &segs[0]);
    let r = assert_fails(&url, &idargs, "gap");
    assert!(r.stdout.contains(&before), "{}", r.stdout);
    let r = assert_fails(&url, &[], "gap");
    assert!(r.stdout.contains(&before), "{}", r.stdout);
    std::fs::write(victim, &orig).unwrap();

    // 2. Truncated.
    std::fs::write(victim, &orig[..orig.len() - 7]).unwrap();
    assert_fails(&url, &idargs, &vkey);
    // 3. A byte flipped inside the (encrypted) body.
    let mut bad = orig.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x20;
    std::fs::write(victim, &bad).unwrap();
    assert_fails(&url, &idargs, &vkey);
    std::fs::write(victim, &orig).unwrap();
    // A damaged newest segment fails the drill, which names it.
    let newest = segs.last().unwrap();
    let n_orig = std::fs::read(newest).unwrap();
    let mut n_bad = n_orig.clone();
    let at = n_bad.len() - 20;
    n_bad[at] ^= 1;
    std::fs::write(newest, &n_bad).unwrap();
    let d = rt
        .block_on(offsite::verify::drill(
            store.as_ref(),
            Some(&ids),
            &test_trust(),
            1,
            7,
        ))
        .unwrap();
    assert!(!d.ok, "{d:?}");
    let e = d.samples[0].error.clone().unwrap_or_default();
    assert!(e.contains(&key_of(&root, newest)), "{e}");
    assert!(d.newest_verified_txid < Some(latest));
    std::fs::write(newest, &n_orig).unwrap();
    // 4. Two segments swapped (contents under each other's names).
    let other = std::fs::read(&segs[2]).unwrap();
    std::fs::write(victim, &other).unwrap();
    std::fs::write(&segs[2], &orig).unwrap();
    let r = assert_fails(&url, &[], &vkey);
    assert!(r.all().contains(&key_of(&root, &segs[2])));
    std::fs::write(victim, &orig).unwrap();
    std::fs::write(&segs[2], &other).unwrap();

    // 5. Another lineage's snapshot: under this snapshot's name (swapped),
    //    and moved into this lineage under its own name (renamed).
    let dir2 = dir.join("second");
    std::fs::create_dir(&dir2).unwrap();
    let root2 = dir2.join("replica");
    let url2 = format!("file://{}", root2.display());
    let db2 = dir2.join("b.db");
    workload(&db2, &["--count", "3"]);
    let s = Shipper::start(&db2, &url2, &["--age-recipient", &rcpt]);
    wait_for("second replica", Duration::from_secs(30), || {
        latest_txid(&url2).is_some()
    });
    let (st, out) = s.stop();
    assert!(st.success(), "{out}");
    let snap2 = objects(&root2, "snap").pop().unwrap();
    let s_orig = std::fs::read(&snap).unwrap();
    std::fs::write(&snap, std::fs::read(&snap2).unwrap()).unwrap();
    let skey = key_of(&root, &snap);
    assert_fails(&url, &idargs, &skey);
    assert_fails(&url, &[], &skey);
    std::fs::write(&snap, &s_orig).unwrap();
    let renamed = snap.with_file_name(snap2.file_name().unwrap());
    std::fs::copy(&snap2, &renamed).unwrap();
    assert_fails(&url, &idargs, &key_of(&root, &renamed));
    std::fs::remove_file(&renamed).unwrap();
    // A byte flipped in the snapshot.
    let mut s_bad = s_orig.clone();
    let at = s_bad.len() - 40;
    s_bad[at] ^= 1;
    std::fs::write(&snap, &s_bad).unwrap();
    assert_fails(&url, &idargs, &skey);
    std::fs::write(&snap, &s_orig).unwrap();

    // Whole again; a stray file is a warning, not a problem.
    std::fs::write(root.join("lineages").join("README"), b"hi").unwrap();
    let r = verify(&url, &idargs);
    assert_eq!(r.code, Some(0), "{}", r.all());
    assert!(
        r.stdout.contains("warning  lineages/README"),
        "{}",
        r.stdout
    );
}

#[test]
fn verify_s3_replicas() {
    use offsite::storage::Storage;
    let rt = tokio::runtime::Runtime::new().unwrap();
    for target in support::s3_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (key, _) = build_replica(dir, &target.url);
        let id = key.to_str().unwrap();
        let r = verify(&target.url, &["--age-identity", id, "--deep", "--json"]);
        assert_eq!(r.code, Some(0), "{}: {}", target.name, r.all());
        let j = r.json();
        assert_eq!(j["totals"]["problems"].as_u64(), Some(0), "{j}");
        assert!(j["deep"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ok"] == true));
        let store = rt
            .block_on(offsite::storage::s3::S3Storage::new(target.s3_config()))
            .unwrap();
        let objs = rt.block_on(store.list("lineages/")).unwrap();
        assert_eq!(j["totals"]["objects"].as_u64(), Some(objs.len() as u64));
        assert_eq!(
            j["totals"]["checked_objects"].as_u64(),
            Some(objs.len() as u64)
        );
        let segs: Vec<String> = objs
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".seg"))
            .collect();
        assert!(segs.len() >= 3, "{}: {segs:?}", target.name);
        let victim = &segs[1];
        let orig = rt.block_on(store.get(victim)).unwrap();
        // Missing: a gap after the previous segment, also without the identity.
        rt.block_on(store.delete(victim)).unwrap();
        assert_fails(&target.url, &["--age-identity", id], "gap");
        let r = assert_fails(&target.url, &[], "gap");
        assert!(r.stdout.contains(&segs[0]), "{}", r.stdout);
        // Damaged: named.
        let mut bad = orig.to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x01;
        rt.block_on(store.put(victim, offsite::storage::Body::Bytes(bad.into())))
            .unwrap();
        assert_fails(&target.url, &["--age-identity", id], victim);
        // Truncated: named.
        let short = orig.slice(..orig.len() - 5);
        rt.block_on(store.put(victim, offsite::storage::Body::Bytes(short)))
            .unwrap();
        assert_fails(&target.url, &["--age-identity", id], victim);
        rt.block_on(store.put(victim, offsite::storage::Body::Bytes(orig)))
            .unwrap();
        let r = verify(&target.url, &["--age-identity", id]);
        assert_eq!(r.code, Some(0), "{}: {}", target.name, r.all());
    }
}
