//! The adversary of docs/SECURITY.md: someone with write access to the
//! bucket (another tenant, the storage provider, a leaked bucket key, a
//! second offsite that knows only the public age recipient), without the
//! shipper's signing key. Every attack here restored the attacker's rows
//! with exit 0 before format 3, and `verify --age-identity` called it ok.
//! Now each planted object is refused, named, and never restored from,
//! planned with or deleted.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use offsite::storage::{Body, DynStorage};
use support::harness::*;

fn rows(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("select count(*) from t", [], |r| r.get(0))
        .unwrap()
}

struct Bucket {
    rt: tokio::runtime::Runtime,
    store: DynStorage,
}

impl Bucket {
    fn open(url: &str) -> Bucket {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = rt
            .block_on(offsite::storage::open(&url.parse().unwrap()))
            .unwrap();
        Bucket { rt, store }
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.rt
            .block_on(self.store.list(prefix))
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    }

    fn get(&self, key: &str) -> bytes::Bytes {
        self.rt.block_on(self.store.get(key)).unwrap()
    }

    fn put(&self, key: &str, b: impl Into<bytes::Bytes>) {
        self.rt
            .block_on(self.store.put(key, Body::Bytes(b.into())))
            .unwrap()
    }

    fn delete(&self, key: &str) {
        self.rt.block_on(self.store.delete(key)).unwrap()
    }

    fn lineages(&self) -> std::collections::BTreeSet<String> {
        self.keys("lineages/")
            .iter()
            .filter_map(|k| k.split('/').nth(1).map(str::to_string))
            .collect()
    }

    /// Copy `from`'s objects of the lineages `self` does not have; returns
    /// the keys written.
    fn plant_from(&self, from: &Bucket) -> Vec<String> {
        let have = self.lineages();
        let mut planted = Vec::new();
        for k in from.keys("lineages/") {
            let l = k.split('/').nth(1).unwrap_or_default();
            if !have.contains(l) {
                self.put(&k, from.get(&k));
                planted.push(k);
            }
        }
        assert!(!planted.is_empty(), "nothing to plant");
        planted
    }

    /// Copy every lineage of `from` into `self` (as a starting point for an
    /// attacker: its shipper then continues above the victim's txids).
    fn seed_from(&self, from: &Bucket) {
        for k in from.keys("lineages/") {
            self.put(&k, from.get(&k));
        }
    }
}

/// A signing key that is not the shipper's.
fn attacker_key(dir: &Path) -> PathBuf {
    keygen_with(dir, &["--signing"]).0
}

/// The attacker's own shipper: `rows` commits of its database into `url`.
fn ship_evil(dir: &Path, name: &str, url: &str, args: &[&str], n: &str) {
    let d = dir.join(format!("evil-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&d).unwrap();
    let db = d.join(name);
    workload(&db, &["--count", n]);
    let s = Shipper::start(&db, url, args);
    // Its replica is not readable with the test's pins: watch its log.
    let t = std::time::Instant::now();
    while !s.log_text().contains("snapshot uploaded") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the attacker's shipper uploaded no snapshot:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, log) = s.stop();
    assert!(st.success(), "{log}");
}

fn verify_out(url: &str, args: &[&str]) -> (bool, String) {
    let o = offsite().args(["verify", url]).args(args).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The three attacks of issue 11 against one replica: each planted
/// lineage is refused by name, the restore is the victim's own data, and
/// verify (with the identity) reports the planted lineage.
fn three_attacks(dir: &Path, url: &str, attacker_url: impl Fn(&str) -> String) {
    let (id, rcpt) = keygen(dir);
    let db = dir.join("app.db");
    ship_in_rounds(&db, url, &["--age-recipient", &rcpt]);
    let real = rows(&db);
    let victim = Bucket::open(url);
    let idarg = id.to_str().unwrap();
    let evil_key = attacker_key(dir);
    let evil = evil_key.to_str().unwrap();

    let attacks: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "a plaintext lineage made with --no-encryption",
            "app.db".into(),
            // (An attacker's shipper trusts its own key only.)
            vec![
                "--no-encryption",
                "--signing-key-file",
                evil,
                "--verify-key",
                "",
            ],
        ),
        (
            "a validly encrypted lineage of another database of the same shipper",
            "tenant.db".into(),
            vec!["--age-recipient", &rcpt],
        ),
        (
            "a lineage written by a second offsite that knows only the public recipient",
            "app.db".into(),
            vec![
                "--age-recipient",
                &rcpt,
                "--signing-key-file",
                evil,
                "--verify-key",
                "",
            ],
        ),
    ];
    for (i, (what, name, args)) in attacks.iter().enumerate() {
        let aurl = attacker_url(&format!("attacker-{i}"));
        let attacker = Bucket::open(&aurl);
        // Continue above the victim's txids, so "latest" would be the attacker's.
        attacker.seed_from(&victim);
        ship_evil(dir, name, &aurl, args, "200");
        let planted = victim.plant_from(&attacker);
        let snap = planted
            .iter()
            .find(|k| k.ends_with(".snap"))
            .unwrap()
            .clone();

        let out = dir.join(format!("restored-{i}.db"));
        let r = restore(url, &out, &["--age-identity", idarg]);
        assert!(r.ok(), "{what}: {}", r.stderr());
        assert_eq!(rows(&out), real, "{what}: restored the attacker's rows");
        assert!(
            r.stderr().contains(&snap) && r.stderr().contains("refusing"),
            "{what}: the planted snapshot is not named: {}",
            r.stderr()
        );

        let (ok, v) = verify_out(url, &["--age-identity", idarg]);
        assert!(!ok, "{what}: verify passed:\n{v}");
        assert!(
            v.contains(&snap),
            "{what}: verify does not name {snap}:\n{v}"
        );

        let l = offsite().args(["list", url]).output().unwrap();
        let l = String::from_utf8_lossy(&l.stdout).into_owned();
        assert!(
            l.contains("refused") && l.contains(&snap),
            "{what}: list:\n{l}"
        );

        for k in planted {
            victim.delete(&k);
        }
    }
    let (ok, v) = verify_out(url, &["--age-identity", idarg]);
    assert!(ok, "after removing the planted objects:\n{v}");
}

#[test]
fn three_attacks_are_refused_on_file() {
    let _g = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    three_attacks(dir, &url, |name| {
        format!("file://{}", dir.join(name).display())
    });
}

#[test]
fn three_attacks_are_refused_on_s3() {
    let _g = support::gate::shared();
    let Some(t) = support::s3_targets().into_iter().next() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = t.url.clone();
    let prefix_of = |name: &str| {
        // Another prefix in the same bucket: s3://bucket/PREFIX?query
        let (head, query) = base.split_once('?').unwrap();
        format!("{head}-{name}?{query}")
    };
    three_attacks(tmp.path(), &t.url, prefix_of);
}

/// A replica that mixes encryption modes (the same shipper run once with
/// --no-encryption into the same replica): restore with an identity refuses
/// the plaintext objects unless --allow-plaintext, and verify reports it.
#[test]
fn mixed_replica_is_refused_and_reported() {
    let _g = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let (id, rcpt) = keygen(dir);
    let db = dir.join("app.db");
    ship_in_rounds(&db, &url, &["--age-recipient", &rcpt]);
    let victim = Bucket::open(&url);
    // The same shipper key and replica (its record), plaintext, more commits.
    let aurl = format!("file://{}", dir.join("plain").display());
    let plain = Bucket::open(&aurl);
    plain.put("replica.json", victim.get("replica.json"));
    // A name above the victim's txids makes this lineage the newest one.
    let marker =
        "lineages/00000000000000ff-aaaaaaaa/snapshots/00000000000000ff-0000000000000001.snap";
    plain.put(marker, Vec::new());
    ship_evil(dir, "app.db", &aurl, &["--no-encryption"], "30");
    plain.delete(marker);
    let planted = victim.plant_from(&plain);
    let snap = planted.iter().find(|k| k.ends_with(".snap")).unwrap();

    let idarg = id.to_str().unwrap();
    let out = dir.join("restored.db");
    let r = restore(&url, &out, &["--age-identity", idarg]);
    assert!(
        !r.ok(),
        "a plaintext object was restored with an identity: {}",
        r.stderr()
    );
    assert!(
        r.stderr().contains("--allow-plaintext") && r.stderr().contains(snap.as_str()),
        "{}",
        r.stderr()
    );
    assert!(!out.exists());
    let r = restore(&url, &out, &["--age-identity", idarg, "--allow-plaintext"]);
    assert!(r.ok(), "{}", r.stderr());
    let (ok, v) = verify_out(&url, &["--age-identity", idarg, "--allow-plaintext"]);
    assert!(!ok && v.contains("mixed replica"), "{v}");
}

/// A swapped head object (the newest segment replaced by an older one's
/// bytes), and a name with txid u64::MAX: restore names the object; the
/// shipper does not stop but starts a new lineage and keeps shipping.
#[test]
fn bad_head_and_huge_txid_do_not_stop_the_shipper() {
    let _g = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    // Without compaction, restores need the level-0 head.
    let args = ["--no-encryption", "--compaction-levels", "off"];
    ship_in_rounds(&db, &url, &args);
    let b = Bucket::open(&url);
    let mut segs: Vec<String> = b
        .keys("lineages/")
        .into_iter()
        .filter(|k| k.contains("/segments/0/"))
        .collect();
    segs.sort();
    let newest = segs.last().unwrap().clone();
    b.put(&newest, b.get(&segs[0]));
    let lineage = newest.split('/').nth(1).unwrap().to_string();
    let huge = format!(
        "lineages/{lineage}/segments/0/ffffffffffffffff-ffffffffffffffff-0000000000000001.seg"
    );
    b.put(&huge, Vec::new());

    let out = dir.join("r.db");
    let r = restore(&url, &out, &[]);
    assert!(!r.ok() && r.stderr().contains(&newest), "{}", r.stderr());

    let s = Shipper::start(&db, &url, &args);
    workload(&db, &["--count", "7"]);
    wait_for("a new lineage", Duration::from_secs(60), || {
        Bucket::open(&url).lineages().len() == 2
    });
    std::thread::sleep(Duration::from_secs(2));
    let (st, log) = s.stop();
    assert!(st.success(), "{log}");
    assert!(log.contains("does not prove out"), "{log}");
    let r = restore(&url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(rows(&out), rows(&db));
    let l = list_json(&url);
    assert!(
        l["ignored_objects"]
            .to_string()
            .contains("ffffffffffffffff"),
        "{l}"
    );
}

/// A crafted listing against prune: a name-only lineage with a huge start
/// txid and an old snapshot time (which made prune treat the real lineage
/// as ended and delete it), and planted snapshots with future times (which
/// used up snapshot-retention). Nothing real is deleted; nothing planted is
/// acted upon; prune names them.
#[test]
fn crafted_listing_cannot_make_prune_delete_history() {
    let _g = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    ship_in_rounds(&db, &url, &["--no-encryption"]);
    let b = Bucket::open(&url);
    let real = b.keys("lineages/");
    let l = "3000000000000000-deadbeef";
    let mut planted = vec![format!(
        "lineages/{l}/snapshots/3000000000000000-0000000000000001.snap"
    )];
    for i in 1..=4u64 {
        planted.push(format!(
            "lineages/{l}/snapshots/{:016x}-{:016x}.snap",
            0x3000000000000000u64 + i,
            4_000_000_000_000_000u64 + i
        ));
    }
    for k in &planted {
        b.put(k, b"OFFSITE\0garbage".to_vec());
    }
    std::thread::sleep(Duration::from_millis(1100));
    let o = offsite()
        .args([
            "prune",
            &url,
            "--retention",
            "1s",
            "--snapshot-retention",
            "1",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("refused") && out.contains(&planted[0]),
        "{out}"
    );
    let after = b.keys("lineages/");
    for k in &real {
        assert!(after.contains(k), "prune deleted {k}:\n{out}");
    }
    for k in &planted {
        assert!(after.contains(k), "prune acted on the planted {k}:\n{out}");
    }
    // The planted garbage cannot be told from a damaged object of this
    // replica: "latest" is refused, naming it (never an older state with exit
    // 0); the real head restores by txid.
    let r = restore(&url, &dir.join("r.db"), &[]);
    assert!(!r.ok() && r.stderr().contains(l), "{}", r.stderr());
    let head = list_json(&url)["lineages"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|x| x["latest"]["txid"].as_u64())
        .unwrap();
    let r = restore(&url, &dir.join("r.db"), &["--txid", &head.to_string()]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(rows(&dir.join("r.db")), rows(&db));
}

/// Rollback: deleting the newest objects after the shipper wrote its signed
/// head record is detected by restore (latest) and verify; --txid accepts
/// the older state knowingly.
#[test]
fn deleting_the_newest_objects_is_detected() {
    let _g = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    ship_in_rounds(&db, &url, &["--no-encryption"]);
    let b = Bucket::open(&url);
    assert!(b.keys("head.json").len() == 1, "no head record");
    let mut segs: Vec<String> = b
        .keys("lineages/")
        .into_iter()
        .filter(|k| k.contains("/segments/0/"))
        .collect();
    segs.sort();
    let newest = segs.pop().unwrap();
    b.delete(&newest);
    let out = dir.join("r.db");
    let r = restore(&url, &out, &[]);
    assert!(
        !r.ok(),
        "a rolled-back replica restored as the newest state"
    );
    assert!(
        r.stderr().contains("head.json") && r.stderr().contains("--txid"),
        "{}",
        r.stderr()
    );
    let (ok, v) = verify_out(&url, &[]);
    assert!(!ok && v.contains("head.json"), "{v}");
    let prev = segs.last().unwrap();
    let last: u64 = u64::from_str_radix(
        prev.rsplit('/').next().unwrap().split('-').nth(1).unwrap(),
        16,
    )
    .unwrap();
    let r = restore(&url, &out, &["--txid", &last.to_string()]);
    assert!(r.ok(), "{}", r.stderr());
}

/// Without a pinned key nothing restores; a pin in the identity file works;
/// a replica of another database is refused when the restore names one.
#[test]
fn pins_and_database_binding() {
    let _g = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    // An identity that pins the test shipper's key.
    let id = dir.join("pinned.txt");
    let o = offsite()
        .args(["keygen", "-o"])
        .arg(&id)
        .args(["--pin", TEST_VERIFY_KEY])
        .output()
        .unwrap();
    assert!(o.status.success());
    let rcpt = String::from_utf8_lossy(&o.stdout).trim().to_string();
    ship_in_rounds(&db, &url, &["--age-recipient", &rcpt]);
    let out = dir.join("r.db");
    let unpinned = offsite()
        .env_remove("OFFSITE_VERIFY_KEY")
        .env_remove("OFFSITE_SIGNING_KEY")
        .args(["restore", &url, "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&unpinned.stderr);
    assert!(
        !unpinned.status.success() && e.contains("--verify-key"),
        "{e}"
    );
    assert!(!out.exists());
    let pinned = offsite()
        .env_remove("OFFSITE_VERIFY_KEY")
        .env_remove("OFFSITE_SIGNING_KEY")
        .args(["restore", &url, "-o"])
        .arg(&out)
        .arg("--age-identity")
        .arg(&id)
        .output()
        .unwrap();
    assert!(
        pinned.status.success(),
        "{}",
        String::from_utf8_lossy(&pinned.stderr)
    );
    assert_eq!(rows(&out), rows(&db));
    let r = restore(
        &url,
        &dir.join("x.db"),
        &[
            "--age-identity",
            id.to_str().unwrap(),
            "--database",
            "other.db",
        ],
    );
    assert!(!r.ok() && r.stderr().contains("other.db"), "{}", r.stderr());
}

/// A deleted `replica.json` does not cut the history off: the next shipper
/// keeps the replica id of its own newest signed object, so every earlier
/// point still restores; a restore before that shipper runs names the
/// missing record and the id to pass.
#[test]
fn a_deleted_replica_record_keeps_the_replica_id() {
    let _g = support::gate::shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    ship_in_rounds(&db, &url, &["--no-encryption"]);
    let b = Bucket::open(&url);
    let record: serde_json::Value = serde_json::from_slice(&b.get("replica.json")).unwrap();
    let id = record["replica"].as_str().unwrap().to_string();
    b.delete("replica.json");
    let out = dir.join("r.db");
    let r = restore(&url, &out, &[]);
    assert!(!r.ok() && r.stderr().contains(&id), "{}", r.stderr());
    let r = restore(&url, &out, &["--replica-id", &id]);
    assert!(r.ok(), "{}", r.stderr());
    std::fs::remove_file(&out).unwrap();
    ship_in_rounds(&db, &url, &["--no-encryption"]);
    let record: serde_json::Value = serde_json::from_slice(&b.get("replica.json")).unwrap();
    assert_eq!(record["replica"].as_str(), Some(id.as_str()));
    let r = restore(&url, &out, &["--txid", "1"]);
    assert!(r.ok(), "{}", r.stderr());
    let r = restore(&url, &out, &["--force"]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(rows(&out), rows(&db));
}
