//! A replica written by the last format-1 release (before the engine
//! boundary; tests/fixtures/format1, made once by its make.sh) keeps
//! restoring: every txid to exactly the bytes that release restored, it
//! verifies, and a shipper of today starts a format-2 lineage beside it
//! instead of continuing it.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest as _;
use support::harness::{list_json, restore, wait_for, Shipper};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1")
}

/// The fixture replica, copied (a test never writes to a fixture).
fn replica_copy(dir: &Path) -> String {
    let to = dir.join("replica");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(fixture().join("replica"))
        .arg(&to)
        .status()
        .unwrap();
    assert!(st.success());
    format!("file://{}", to.display())
}

fn sha256(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

fn rows(p: &Path) -> i64 {
    rusqlite::Connection::open(p)
        .unwrap()
        .query_row("select count(*) from t", [], |r| r.get(0))
        .unwrap()
}

/// `offsite verify URL --age-identity ID` finds no problem.
fn verify_ok(url: &str, id: &str) {
    let v = support::harness::offsite()
        .args(["verify", url, "--age-identity", id, "--allow-unsigned"])
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture().join("expected.json")).unwrap()).unwrap()
}

fn identity() -> String {
    fixture().join("identity.txt").display().to_string()
}

#[test]
fn every_txid_of_a_format1_replica_restores_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let url = replica_copy(tmp.path());
    let exp = expected();
    let txids = exp["txids"].as_object().unwrap();
    assert!(txids.len() >= 20, "the fixture covers many commits");
    assert!(exp["lineages"].as_u64().unwrap() >= 2);
    let id = identity();
    // Format 1 carries no signatures: restoring it is an explicit opt-in.
    let out = tmp.path().join("refused.db");
    let r = restore(&url, &out, &["--age-identity", &id]);
    assert!(
        !r.ok() && r.stderr().contains("--allow-unsigned"),
        "{}",
        r.stderr()
    );
    assert!(!out.exists());
    for (txid, want) in txids {
        let out = tmp.path().join(format!("r-{txid}.db"));
        let r = restore(
            &url,
            &out,
            &["--txid", txid, "--age-identity", &id, "--allow-unsigned"],
        );
        assert!(r.ok(), "txid {txid}: {}", r.stderr());
        assert_eq!(
            sha256(&out),
            want["sha256"].as_str().unwrap(),
            "txid {txid}: restored bytes differ from the format-1 release's"
        );
        assert_eq!(rows(&out), want["rows"].as_i64().unwrap(), "txid {txid}");
        std::fs::remove_file(&out).unwrap();
    }
    // The latest state, by default.
    let out = tmp.path().join("latest.db");
    let r = restore(&url, &out, &["--age-identity", &id, "--allow-unsigned"]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(r.txid, exp["latest_txid"].as_u64());
    let latest = exp["latest_txid"].as_u64().unwrap().to_string();
    assert_eq!(
        sha256(&out),
        exp["txids"][&latest]["sha256"].as_str().unwrap()
    );
    // It lists as SQLite, and verifies with its identity (contents replayed).
    let l = list_json(&url);
    assert_eq!(l["engine"], "sqlite");
    verify_ok(&url, &id);
}

#[test]
fn a_shipper_starts_a_format2_lineage_beside_format1() {
    let tmp = tempfile::tempdir().unwrap();
    let url = replica_copy(tmp.path());
    let exp = expected();
    let id = identity();
    let max = exp["latest_txid"].as_u64().unwrap();
    // The application's database: the format-1 replica's latest state.
    let db = tmp.path().join("app.db");
    let r = restore(&url, &db, &["--age-identity", &id, "--allow-unsigned"]);
    assert!(r.ok(), "{}", r.stderr());
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
    }
    let rcpt = std::fs::read_to_string(fixture().join("identity.txt"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_string))
        .unwrap();
    let shipper = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    wait_for("a new lineage", Duration::from_secs(60), || {
        list_json(&url)["latest"]["txid"].as_u64() > Some(max)
    });
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute("insert into t(v) values ('format 2')", [])
            .unwrap();
    }
    let (st, log) = shipper.stop();
    assert!(st.success(), "{log}");
    assert!(log.contains("format 1"), "{log}");
    // The record names the engine and the new format.
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("replica/replica.json")).unwrap())
            .unwrap();
    assert_eq!(rec["format"], 3, "{rec}");
    assert_eq!(rec["engine"], "sqlite", "{rec}");
    assert_eq!(rec["database"], "app.db", "{rec}");
    assert_eq!(rec["replica"].as_str().unwrap().len(), 32, "{rec}");
    // The new lineage restores the application's state; the old txids still
    // restore exactly.
    let out = tmp.path().join("new.db");
    let r = restore(&url, &out, &["--age-identity", &id]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(rows(&out), rows(&db));
    assert_eq!(
        exp["txids"][max.to_string()]["rows"].as_i64().unwrap() + 1,
        rows(&out)
    );
    let first = exp["txids"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let out = tmp.path().join("old.db");
    let r = restore(
        &url,
        &out,
        &["--txid", &first, "--age-identity", &id, "--allow-unsigned"],
    );
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(
        sha256(&out),
        exp["txids"][&first]["sha256"].as_str().unwrap()
    );
    verify_ok(&url, &id);
}

#[test]
fn an_engine_the_replica_record_names_otherwise_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let url = replica_copy(tmp.path());
    std::fs::write(
        tmp.path().join("replica/replica.json"),
        r#"{"format": 2, "engine": "mysql"}"#,
    )
    .unwrap();
    let id = identity();
    let out = tmp.path().join("x.db");
    let r = restore(&url, &out, &["--age-identity", &id]);
    assert!(!r.ok());
    assert!(
        r.stderr().contains("mysql") && r.stderr().contains("replica.json"),
        "{}",
        r.stderr()
    );
    assert!(!out.exists());
    for args in [vec!["list", &url], vec!["verify", &url]] {
        let o = support::harness::offsite().args(&args).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("mysql"), "{args:?}: {e}");
    }
    let o = support::harness::offsite()
        .args(["prune", &url, "--retention", "1s"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("mysql"), "prune: {e}");
    // A shipper refuses to write into it, and writes nothing.
    let db = tmp.path().join("app.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.execute("create table t(v)", []).unwrap();
    }
    let before = list_json_raw(tmp.path());
    let o = support::harness::offsite()
        .args(["replicate"])
        .arg(&db)
        .arg(&url)
        .args(["--no-encryption"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("mysql") && e.contains("refusing"),
        "{e}"
    );
    assert_eq!(before, list_json_raw(tmp.path()), "nothing was written");
}

/// Every file under the replica's lineages/.
fn list_json_raw(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![dir.join("replica/lineages")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                v.push(e.path().display().to_string());
            }
        }
    }
    v.sort();
    v
}

/// A replica's newest object naming another engine (or carrying no valid
/// chain link) is not continued: the shipper starts a new lineage beside it
/// instead of stopping.
#[test]
fn a_head_of_another_engine_starts_a_new_lineage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("app.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.execute_batch("create table t(v); insert into t values ('a');")
            .unwrap();
    }
    let url = format!("file://{}", dir.join("replica").display());
    let shipper = Shipper::start(&db, &url, &["--no-encryption"]);
    wait_for("the first snapshot", Duration::from_secs(60), || {
        list_json(&url)["latest"]["txid"].as_u64().is_some()
    });
    let (st, log) = shipper.stop();
    assert!(st.success(), "{log}");
    // The newest object's plaintext envelope now names another engine (the
    // same length, so the envelope still parses).
    // Nothing was written after the start: the snapshot is the head.
    let files = list_json_raw(dir);
    assert!(
        !files.iter().any(|p| p.contains("/segments/0/")),
        "{files:?}"
    );
    let newest = files
        .into_iter()
        .filter(|p| p.contains("/snapshots/"))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == b"\"sqlite\"")
        .expect("the envelope names its engine");
    bytes[at + 1..at + 7].copy_from_slice(b"sqlitx");
    std::fs::write(&newest, &bytes).unwrap();
    let before = list_json(&url)["lineages"].as_array().unwrap().len();
    let shipper = Shipper::start(&db, &url, &["--no-encryption"]);
    wait_for("a new lineage", Duration::from_secs(60), || {
        list_json(&url)["lineages"].as_array().unwrap().len() > before
    });
    let (st, log) = shipper.stop();
    assert!(st.success(), "{log}");
    // The edited envelope no longer matches its signature.
    assert!(
        log.contains("does not prove out") && log.contains("starting a new lineage"),
        "{log}"
    );
    // The new lineage restores the database.
    let out = dir.join("out.db");
    let r = restore(&url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(rows(&out), 1);
}
