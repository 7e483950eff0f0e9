//! `offsite list`, `prune` and `verify` (with restore drills) of a
//! PostgreSQL archive, against a real throwaway cluster streamed by
//! `offsite pg stream`: two base backups with writes between, the window
//! list shows, pruning to one backup (and only the WAL before it), a planted
//! name that is reported and never deleted, a restore of the pruned archive
//! that still holds every row, a flipped byte verify names, and drills that
//! pass on a healthy archive. Skipped (with a warning) without PostgreSQL
//! unless `OFFSITE_TEST_REQUIRE_PG=1`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::support::harness::{keygen, offsite, sigterm, wait_for};
use crate::support::pgcluster::PgCluster;

fn run(args: &[&str]) -> Output {
    offsite().args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "offsite {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn chgrp_postgres(p: &Path, mode: u32) {
    let st = Command::new("chgrp")
        .arg("postgres")
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Keys of every object under the archive's `pg/`.
fn objects(arch: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut v = Vec::new();
    if arch.join("pg").exists() {
        walk(arch, &arch.join("pg"), &mut v);
    }
    v.retain(|k| !k.contains("/.") && !k.ends_with(".tmp"));
    v.sort();
    v
}

struct Stream(Child);

impl Drop for Stream {
    fn drop(&mut self) {
        sigterm(&self.0);
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while self.0.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > end {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The whole life of an archive: stream, back up twice, list, verify with
/// drills, prune with a planted object beside, restore, and damage.
#[test]
fn pg_list_prune_verify_and_drills() {
    if !PgCluster::available() {
        return;
    }
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_offsite"));
    // Restored servers run offsite's wal-fetch as the postgres user.
    let reachable = Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(&exe)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        reachable || unsafe { libc::geteuid() } != 0,
        "the postgres user cannot run {} (make target/ traversable: chmod 755)",
        exe.display()
    );
    let pg = PgCluster::start(&[]);
    let tmp = tempfile::Builder::new()
        .prefix("offsite-pgm-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // An archive the postgres user can read (restore_command runs as it),
    // and an identity it can read (tests only).
    let arch = tmp.path().join("arch");
    std::fs::create_dir(&arch).unwrap();
    chgrp_postgres(&arch, 0o2750);
    let url = format!("file://{}?file-mode=0640", arch.display());
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let (id, rcpt) = keygen(&keys);
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o644)).unwrap();
    let id = id.display().to_string();
    let dsn = pg.dsn();
    pg.psql("create table t (i int primary key); insert into t select generate_series(1, 1000)");

    let log = std::fs::File::create(tmp.path().join("stream.log")).unwrap();
    let spool = tmp.path().join("spool");
    let stream = Stream(
        offsite()
            .args(["pg", "stream", "--dsn", &dsn, "--replica", &url])
            .args(["--age-recipient", &rcpt, "--slot", "offsite_maint"])
            .args(["--sync-interval", "200ms", "--base-backup-interval", "off"])
            .arg("--spool-dir")
            .arg(&spool)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The streamer takes the first backup itself (the archive holds none).
    wait_for(
        "the streamer's first base backup",
        Duration::from_secs(60),
        || objects(&arch).iter().any(|k| k.ends_with("/backup.done")),
    );
    pg.psql("insert into t select generate_series(1001, 2000)");
    ok(&[
        "pg",
        "backup",
        "--dsn",
        &dsn,
        "--replica",
        &url,
        "--age-recipient",
        &rcpt,
    ]);
    pg.psql("insert into t select generate_series(2001, 3000)");
    let end = lsn(&pg.psql("select pg_current_wal_lsn()"));
    wait_for(
        "the newest WAL in the archive",
        Duration::from_secs(30),
        || {
            let v = json(&["list", &url, "--json"]);
            v["window"]["to_lsn"]
                .as_str()
                .is_some_and(|l| lsn(l) >= end)
        },
    );

    // list: two restorable backups, one continuous window from the older.
    let v = json(&["list", &url, "--json"]);
    let backups = v["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{v:#}");
    assert!(backups.iter().all(|b| b["restorable"] == true), "{v:#}");
    let (old, new) = (backups[0].clone(), backups[1].clone());
    assert!(lsn(old["start_lsn"].as_str().unwrap()) < lsn(new["start_lsn"].as_str().unwrap()));
    assert_eq!(v["windows"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["window"]["from_lsn"], old["end_lsn"], "{v:#}");
    let wal = v["wal"].as_array().unwrap();
    assert_eq!(wal.len(), 1, "one timeline: {v:#}");
    assert!(wal[0]["gaps"].as_array().unwrap().is_empty(), "{v:#}");
    assert!(v["refused"].as_array().unwrap().is_empty(), "{v:#}");
    let human = ok(&["list", &url]);
    eprintln!("$ offsite list\n{human}");
    assert!(
        human.contains("window   ") && human.contains(old["id"].as_str().unwrap()),
        "{human}"
    );

    // verify --deep on a healthy archive: every check and three drills pass.
    let out = ok(&["verify", &url, "--age-identity", &id, "--deep"]);
    eprintln!("$ offsite verify --age-identity --deep\n{out}");
    assert!(
        out.contains("contents checked") && out.contains(": continuous"),
        "{out}"
    );
    assert_eq!(out.matches("drill    ").count(), 3, "{out}");
    assert_eq!(out.matches("pg_verifybackup ok").count(), 3, "{out}");
    assert!(out.contains(" 0 problems"), "{out}");
    let v = json(&["verify", &url, "--age-identity", &id, "--json"]);
    assert!(v["pages_checked"].as_u64().unwrap() > 0, "{v:#}");
    assert_eq!(
        v["backups"][0]["manifest"]
            .as_str()
            .map(|m| m.contains(" on timeline 1")),
        Some(true),
        "{v:#}"
    );
    drop(stream);

    // A planted name: a valid WAL key below every backup, not signed.
    let planted = "pg/wal/000000010000000000000001/0000000001000008-0000000001000010";
    std::fs::create_dir_all(arch.join("pg/wal/000000010000000000000001")).unwrap();
    std::fs::write(arch.join(planted), b"not an offsite object").unwrap();

    let before = objects(&arch);
    let dry = ok(&[
        "prune",
        &url,
        "--retention",
        "1s",
        "--backup-retention",
        "1",
        "--dry-run",
    ]);
    assert_eq!(objects(&arch), before, "a dry run deletes nothing");
    eprintln!("$ offsite prune --retention 1s --backup-retention 1 --dry-run\n{dry}");
    assert!(
        dry.contains("would delete") && dry.contains(&format!("refused  {planted}")),
        "{dry}"
    );

    let v = json(&[
        "prune",
        &url,
        "--retention",
        "1s",
        "--backup-retention",
        "1",
        "--json",
    ]);
    let deleted: Vec<String> = v["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"].as_str().unwrap().to_string())
        .collect();
    let old_id = old["id"].as_str().unwrap();
    let new_start = lsn(new["start_lsn"].as_str().unwrap());
    let cut = new_start / (16 << 20);
    // Exactly: the older backup's objects, the WAL of segments before the
    // kept one's start, and pieces a whole segment covers (if the streamer
    // left any).
    let segno = |k: &str| {
        u64::from_str_radix(&k[15..23], 16).unwrap() * 256
            + u64::from_str_radix(&k[23..31], 16).unwrap()
    };
    let whole = |k: &str| {
        let (s, e) = k[32..].split_once('-').unwrap();
        u64::from_str_radix(e, 16).unwrap() - u64::from_str_radix(s, 16).unwrap() == 16 << 20
    };
    let wal: Vec<&String> = before
        .iter()
        .filter(|k| k.starts_with("pg/wal/") && k.as_str() != planted)
        .collect();
    let expected: Vec<String> = before
        .iter()
        .filter(|k| {
            k.starts_with(&format!("pg/backups/{old_id}/"))
                || (wal.contains(k)
                    && (segno(k) < cut
                        || (!whole(k) && wal.iter().any(|w| w[..31] == k[..31] && whole(w)))))
        })
        .cloned()
        .collect();
    let mut got = deleted.clone();
    got.sort();
    assert_eq!(got, expected, "{v:#}");
    assert!(!expected.is_empty());
    assert_eq!(
        deleted[0],
        format!("pg/backups/{old_id}/backup.done"),
        "the record goes first"
    );
    assert_eq!(v["refused"][0]["key"], planted, "{v:#}");
    let after = objects(&arch);
    assert!(
        after.iter().any(|k| k == planted),
        "the planted object is never deleted"
    );
    assert_eq!(after.len(), before.len() - expected.len());

    // What is left lists one backup and reports the planted object.
    let v = json(&["list", &url, "--json"]);
    assert_eq!(v["backups"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["backups"][0]["id"], new["id"]);
    assert_eq!(v["refused"][0]["key"], planted, "{v:#}");
    assert_eq!(
        v["wal"][0]["ranges"][0]["start"].as_u64().unwrap(),
        cut * (16 << 20)
    );

    // A restore of the pruned archive still holds every row.
    let out_dir = tmp.path().join("restored");
    let o = run(&[
        "restore",
        &url,
        "-o",
        out_dir.to_str().unwrap(),
        "--age-identity",
        &id,
        "--start",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let port: u16 = text(&o)
        .split("(port ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {}", text(&o)));
    let count = Command::new(pg.bin.join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .arg("-p")
        .arg(port.to_string())
        .args(["-c", "select count(*), max(i) from t"])
        .output()
        .unwrap();
    PgCluster::stop_data_dir(&pg.bin, &out_dir);
    assert_eq!(
        String::from_utf8_lossy(&count.stdout).trim(),
        "3000|3000",
        "{count:?}"
    );

    // The planted object fails verify, named; without it verify passes.
    let o = run(&["verify", &url]);
    assert!(
        !o.status.success() && text(&o).contains(planted),
        "{}",
        text(&o)
    );
    std::fs::remove_file(arch.join(planted)).unwrap();
    ok(&["verify", &url, "--age-identity", &id]);

    // A flipped byte in a WAL object: verify names it.
    let victim = after
        .iter()
        .filter(|k| k.starts_with("pg/wal/") && k.as_str() != planted)
        .max_by_key(|k| std::fs::metadata(arch.join(k)).unwrap().len())
        .unwrap()
        .clone();
    let p = arch.join(&victim);
    let mut b = std::fs::read(&p).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&p, &b).unwrap();
    let o = run(&["verify", &url, "--age-identity", &id]);
    let t = text(&o);
    eprintln!("$ offsite verify --age-identity (a flipped byte)\n{t}");
    assert!(!o.status.success(), "{t}");
    assert!(t.contains(&format!("PROBLEM  {victim}: ")), "{t}");
    assert!(t.contains("verify found 1 problems"), "{t}");
}
