//! Damaged replicas and bad inputs: every one must fail loudly, name what is
//! wrong, exit non-zero and leave no output behind.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::harness::*;

/// A replica with a snapshot and several segments in `dir/replica`.
fn build_replica(dir: &Path, encrypt: bool) -> (String, Option<(PathBuf, String)>) {
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    let key = if encrypt { Some(keygen(dir)) } else { None };
    let args: Vec<&str> = match &key {
        Some((_, r)) => vec!["--age-recipient", r.as_str()],
        None => vec!["--no-encryption"],
    };
    ship_in_rounds(&db, &url, &args);
    (url, key)
}

fn objects(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walk(&dir.join("replica"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
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
    out
}

/// (first, last) txid from a segment's file name.
fn txids(p: &Path) -> (u64, u64) {
    let n = p.file_name().unwrap().to_string_lossy().into_owned();
    let f: Vec<&str> = n.trim_end_matches(".seg").split('-').collect();
    (
        u64::from_str_radix(f[0], 16).unwrap(),
        u64::from_str_radix(f[1], 16).unwrap(),
    )
}

fn key_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Restore must fail, mention `needle` (and the object), leave no output.
fn assert_restore_fails(
    url: &str,
    dir: &Path,
    key: &Option<(PathBuf, String)>,
    needle: &str,
    extra: &[&str],
) {
    let out = dir.join(format!("out-{:08x}.db", rand::random::<u32>()));
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if let Some((k, _)) = key {
        args.extend([
            "--age-identity".to_string(),
            k.to_string_lossy().into_owned(),
        ]);
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = restore(url, &out, &a);
    assert!(
        !r.ok(),
        "restore {extra:?} of a damaged replica succeeded (expected an error naming {needle}): {}",
        r.stderr()
    );
    let line = last_line(&r.stderr());
    assert!(
        line.contains(needle),
        "error does not mention {needle:?}: {line}"
    );
    assert!(
        !out.exists(),
        "a failed restore left {} behind",
        out.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("offsite-restore") || n.contains("offsite-download"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn tampered_objects_are_detected_and_named() {
    for encrypt in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (url, key) = build_replica(dir, encrypt);
        // Level-0 segments of more than one commit. Restores below go to the
        // victim's first txid: a state only the victim holds (compacted
        // segments end on level-0 boundaries, so none can stand in for it).
        let segs: Vec<PathBuf> = objects(dir, "seg")
            .into_iter()
            .filter(|p| p.parent().unwrap().ends_with("segments/0"))
            .collect();
        assert!(segs.len() >= 3, "need several segments, got {segs:?}");
        let victim_i = (1..segs.len() - 1)
            .find(|&i| {
                let (a, b) = txids(&segs[i]);
                a < b
            })
            .expect("a segment with several commits");
        let inside = txids(&segs[victim_i]).0.to_string();
        let at_txid: &[&str] = &["--txid", inside.as_str()];
        let snap = objects(dir, "snap").pop().unwrap();
        let ok = dir.join("ok.db");
        let id: Vec<String> = key.iter().map(|(k, _)| k.display().to_string()).collect();
        let idargs: Vec<&str> = if id.is_empty() {
            vec![]
        } else {
            vec!["--age-identity", id[0].as_str()]
        };
        assert!(
            restore(&url, &ok, &idargs).ok(),
            "intact replica must restore"
        );

        // 1. A flipped byte in the middle of a segment.
        let victim = &segs[victim_i];
        let next = &segs[victim_i + 1];
        let orig = std::fs::read(victim).unwrap();
        let mut bad = orig.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x20;
        std::fs::write(victim, &bad).unwrap();
        assert_restore_fails(&url, dir, &key, &key_of(victim), at_txid);
        // 2. Truncated.
        std::fs::write(victim, &orig[..orig.len() - 7]).unwrap();
        assert_restore_fails(&url, dir, &key, &key_of(victim), at_txid);
        // 3. Deleted: a gap.
        std::fs::remove_file(victim).unwrap();
        assert_restore_fails(&url, dir, &key, "gap", at_txid);
        std::fs::write(victim, &orig).unwrap();
        // 4. Two segments swapped (contents under each other's names).
        let other = std::fs::read(next).unwrap();
        std::fs::write(next, &orig).unwrap();
        std::fs::write(victim, &other).unwrap();
        assert_restore_fails(&url, dir, &key, &key_of(victim), at_txid);
        std::fs::write(victim, &orig).unwrap();
        std::fs::write(next, &other).unwrap();
        // 5. A flipped byte in the snapshot.
        let s_orig = std::fs::read(&snap).unwrap();
        let mut s_bad = s_orig.clone();
        let at = s_bad.len() - 40;
        s_bad[at] ^= 1;
        std::fs::write(&snap, &s_bad).unwrap();
        assert_restore_fails(&url, dir, &key, &key_of(&snap), &[]);
        std::fs::write(&snap, &s_orig).unwrap();
        // 6. Envelope metadata edited (plaintext part of the object).
        let mut e_bad = orig.clone();
        let pos = e_bad.windows(9).position(|w| w == b"last_txid").unwrap();
        e_bad[pos + 11] = if e_bad[pos + 11] == b'9' { b'8' } else { b'9' };
        std::fs::write(victim, &e_bad).unwrap();
        assert_restore_fails(&url, dir, &key, &key_of(victim), at_txid);
        std::fs::write(victim, &orig).unwrap();
        // Restored intact again.
        let again = dir.join("again.db");
        assert!(restore(&url, &again, &idargs).ok());
        assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&ok).unwrap());
    }
}

#[test]
fn encryption_is_never_silently_off() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("app.db");
    workload(&db, &["--count", "3"]);
    let url = format!("file://{}", dir.join("replica").display());
    // No recipient and no --no-encryption: refuse.
    let out = offsite()
        .args(["replicate"])
        .arg(&db)
        .arg(&url)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(last_line(&err).contains("--no-encryption"), "{err}");
    assert!(!dir.join("replica").exists(), "nothing may be written");
    // A secret key where a recipient belongs: refuse, without echoing it.
    let (k, _) = keygen(dir);
    let secret = std::fs::read_to_string(&k).unwrap();
    let secret = secret
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    let out = offsite()
        .args(["replicate"])
        .arg(&db)
        .arg(&url)
        .args(["--age-recipient", secret])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("secret key") && !err.contains(secret), "{err}");

    // Encrypted replica: no plaintext page content in any object.
    let (ident, rcpt) = keygen(dir);
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    workload(&db, &["--count", "5"]);
    std::thread::sleep(Duration::from_millis(600));
    let (st, _) = s.stop();
    assert!(st.success());
    for p in walk(&dir.join("replica")) {
        let b = std::fs::read(&p).unwrap();
        assert!(
            !b.windows(15).any(|w| w == b"SQLite format 3"),
            "{} holds plaintext",
            p.display()
        );
    }
    // Mixing plaintext into an encrypted replica is refused.
    let out = offsite()
        .args(["replicate"])
        .arg(&db)
        .arg(&url)
        .arg("--no-encryption")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(last_line(&String::from_utf8_lossy(&out.stderr)).contains("refusing to mix"));
    // Restore without identity / with the wrong one: clear errors, no output.
    let o = dir.join("o.db");
    let r = restore(&url, &o, &[]);
    assert!(
        !r.ok() && last_line(&r.stderr()).contains("--age-identity"),
        "{}",
        r.stderr()
    );
    assert!(!o.exists());
    let (wrong, _) = keygen(dir);
    let r = restore(&url, &o, &["--age-identity", wrong.to_str().unwrap()]);
    assert!(
        !r.ok() && last_line(&r.stderr()).contains("none of the given age identities"),
        "{}",
        r.stderr()
    );
    assert!(!o.exists());
    let r = restore(&url, &o, &["--age-identity", ident.to_str().unwrap()]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(offsite::workload::verify(&o).unwrap(), 8);

    // A plaintext replica (explicitly requested) is readable without keys, and
    // its objects are marked plaintext: control for the check above.
    let url2 = format!("file://{}", dir.join("plain").display());
    let s = Shipper::start(&db, &url2, &["--no-encryption"]);
    wait_for("plaintext snapshot", Duration::from_secs(30), || {
        latest_txid(&url2).is_some()
    });
    let (st, _) = s.stop();
    assert!(st.success());
    let snap = walk(&dir.join("plain"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "snap"))
        .unwrap();
    let b = std::fs::read(&snap).unwrap();
    assert_eq!(&b[..8], b"OFFSITE\0");
    assert_eq!(b[11], 0, "plaintext objects carry encryption byte 0");
    // Encrypted replica objects carry 1.
    let enc = walk(&dir.join("replica").join("lineages"))
        .into_iter()
        .next()
        .unwrap();
    assert_eq!(std::fs::read(&enc).unwrap()[11], 1);
}

#[test]
fn restore_never_overwrites_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (url, _) = build_replica(dir, false);
    let out = dir.join("existing.db");
    std::fs::write(&out, b"precious").unwrap();
    let r = restore(&url, &out, &[]);
    assert!(
        !r.ok() && last_line(&r.stderr()).contains("--force"),
        "{}",
        r.stderr()
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    // A stale -wal next to the output would corrupt the restored file: refuse too.
    let out2 = dir.join("fresh.db");
    std::fs::write(dir.join("fresh.db-wal"), b"stale").unwrap();
    let r = restore(&url, &out2, &[]);
    assert!(
        !r.ok() && r.stderr().contains("fresh.db-wal"),
        "{}",
        r.stderr()
    );
    // --force replaces the file and removes the stale -wal.
    let r = restore(&url, &out, &["--force"]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(offsite::workload::verify(&out).unwrap(), 30);
    let r = restore(&url, &out2, &["--force"]);
    assert!(r.ok(), "{}", r.stderr());
    assert!(!dir.join("fresh.db-wal").exists());
    assert_eq!(offsite::workload::verify(&out2).unwrap(), 30);
    // Out-of-range targets are explained.
    let r = restore(&url, &dir.join("x.db"), &["--txid", "999999"]);
    assert!(
        !r.ok() && last_line(&r.stderr()).contains("not restorable"),
        "{}",
        r.stderr()
    );
    let r = restore(
        &url,
        &dir.join("x.db"),
        &["--timestamp", "2001-01-01T00:00:00Z"],
    );
    assert!(
        !r.ok() && last_line(&r.stderr()).contains("no restore point"),
        "{}",
        r.stderr()
    );
    let r = restore(&url, &dir.join("x.db"), &["--timestamp", "yesterday"]);
    assert!(
        !r.ok() && last_line(&r.stderr()).contains("RFC 3339"),
        "{}",
        r.stderr()
    );
}

#[test]
fn bad_inputs_get_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = |args: &[&str]| {
        let o = offsite().args(args).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Not in WAL mode: refuse with the command that fixes it.
    let db = dir.join("rollback.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("PRAGMA journal_mode=DELETE; CREATE TABLE t(x);")
            .unwrap();
    }
    let url = format!("file://{}", dir.join("r").display());
    let (code, err) = run(&["replicate", db.to_str().unwrap(), &url, "--no-encryption"]);
    assert_eq!(code, Some(1));
    assert!(last_line(&err).contains("journal_mode=WAL"), "{err}");
    // Missing database.
    let (code, err) = run(&["replicate", "/nonexistent/x.db", &url, "--no-encryption"]);
    assert_eq!(code, Some(1));
    assert!(last_line(&err).contains("/nonexistent/x.db"), "{err}");
    // Bad URLs.
    for (u, needle) in [
        ("file://relative/path", "file:///"),
        ("ftp://x/y", "s3://"),
        ("s3://bucket/p?bogus=1", "bogus"),
    ] {
        let (code, err) = run(&["list", u]);
        assert_eq!(code, Some(1), "{u}");
        assert!(last_line(&err).contains(needle), "{u}: {err}");
    }
    // Unreachable S3 endpoint: a clear error, not a hang.
    let start = std::time::Instant::now();
    let (code, err) = run(&[
        "list",
        "s3://b/p?endpoint=http://127.0.0.1:1&region=x&force-path-style=true",
    ]);
    assert_eq!(code, Some(1));
    assert!(last_line(&err).contains("127.0.0.1:1"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(60));
    // Config typos name the key and the file.
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "[[database]]\npath = \"/x.db\"\nreplicas = []\n").unwrap();
    let (code, err) = run(&["replicate", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    let l = last_line(&err);
    assert!(l.contains("c.toml:3") && l.contains("replicas"), "{err}");
    // Restoring from an empty replica.
    let (code, err) = run(&["restore", &url, "-o", dir.join("o.db").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(last_line(&err).contains("nothing to restore"), "{err}");
    // keygen refuses to overwrite an identity.
    let (k, _) = keygen(dir);
    let (code, err) = run(&["keygen", "-o", k.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(last_line(&err).contains("never overwrites"), "{err}");
}

#[test]
fn keys_are_standard_age_keys() {
    // offsite keygen writes an age-keygen style identity; the age crate (the
    // reference Rust implementation) reads it back and its public key matches.
    let tmp = tempfile::tempdir().unwrap();
    let (k, r) = keygen(tmp.path());
    let text = std::fs::read_to_string(&k).unwrap();
    assert!(text.starts_with("# created: "));
    assert!(text.contains(&format!("# public key: {r}")));
    let line = text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .unwrap();
    let id: age::x25519::Identity = line.parse().unwrap();
    assert_eq!(id.to_public().to_string(), r);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Without -o the identity goes to stdout and the recipient to stderr.
    let o = offsite().arg("keygen").output().unwrap();
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("AGE-SECRET-KEY-1"));
    assert!(String::from_utf8(o.stderr)
        .unwrap()
        .contains("Public key: age1"));
}

#[test]
fn damaged_objects_in_s3_are_detected() {
    use offsite::storage::Storage;
    let rt = tokio::runtime::Runtime::new().unwrap();
    for target in support::s3_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let db = dir.join("app.db");
        let (key, rcpt) = keygen(dir);
        ship_in_rounds(&db, &target.url, &["--age-recipient", &rcpt]);
        let store = rt
            .block_on(offsite::storage::s3::S3Storage::new(target.s3_config()))
            .unwrap();
        let segs: Vec<String> = rt
            .block_on(store.list("lineages/"))
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".seg") && k.contains("/segments/0/"))
            .collect();
        // A segment in the middle (deleting the newest one is indistinguishable
        // from a shipper that stopped earlier; see the closing note of issue 2).
        assert!(segs.len() >= 3, "{}: {segs:?}", target.name);
        // Restore to the victim's first txid: only the victim holds that state.
        let victim = (1..segs.len() - 1)
            .map(|i| &segs[i])
            .find(|k| {
                let (a, b) = txids(Path::new(k));
                a < b
            })
            .unwrap_or(&segs[1]);
        let first = txids(Path::new(victim)).0.to_string();
        let orig = rt.block_on(store.get(victim)).unwrap();
        let id = key.to_str().unwrap();
        let out_db = dir.join("out.db");
        // Missing → gap; damaged → named; restored → fine.
        rt.block_on(store.delete(victim)).unwrap();
        let r = restore(
            &target.url,
            &out_db,
            &["--age-identity", id, "--txid", &first],
        );
        assert!(
            !r.ok() && last_line(&r.stderr()).contains("gap"),
            "{}: {}",
            target.name,
            r.stderr()
        );
        let mut bad = orig.to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x01;
        rt.block_on(store.put(victim, offsite::storage::Body::Bytes(bad.into())))
            .unwrap();
        let r = restore(
            &target.url,
            &out_db,
            &["--age-identity", id, "--txid", &first],
        );
        let name = victim.rsplit('/').next().unwrap();
        assert!(
            !r.ok() && last_line(&r.stderr()).contains(name),
            "{}: {}",
            target.name,
            r.stderr()
        );
        assert!(!out_db.exists());
        rt.block_on(store.put(victim, offsite::storage::Body::Bytes(orig)))
            .unwrap();
        let r = restore(&target.url, &out_db, &["--age-identity", id]);
        assert!(r.ok(), "{}: {}", target.name, r.stderr());
        assert_eq!(offsite::workload::verify(&out_db).unwrap(), 30);
    }
}
