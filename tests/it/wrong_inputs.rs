//! Wrong inputs: each gets a non-zero exit and one clear line that says what
//! is wrong and what to do, quickly (no retry loop on a mistake that
//! retrying cannot fix). Runs the real binary against real files and the
//! real Garage server.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::harness::*;

/// Run offsite; returns (exit code, the error line, all of stderr).
fn run(mut c: Command) -> (Option<i32>, String, String) {
    let t0 = Instant::now();
    let o: Output = c.output().unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        took < Duration::from_secs(60),
        "a wrong input took {took:?} to be reported: {err}"
    );
    (o.status.code(), last_line(&err), err)
}

/// The command's last stderr line is offsite's one-line error.
fn assert_one_line_error(code: Option<i32>, line: &str, needles: &[&str], all: &str) {
    assert_eq!(code, Some(1), "exit code; stderr: {all}");
    assert!(
        line.starts_with("offsite: error: "),
        "not a one-line error: {line:?}\n{all}"
    );
    for n in needles {
        assert!(line.contains(n), "error line lacks {n:?}: {line}");
    }
}

/// As root, file permissions do not stop reads or writes; run the command
/// without the capabilities that bypass them (as a normal service would).
fn without_dac_override(c: &mut Command) {
    unsafe {
        c.pre_exec(|| {
            if libc::geteuid() == 0 {
                // CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2: dropped from
                // the bounding set, so the exec'd process never gets them.
                for cap in [1, 2] {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
}

fn replicate_cmd(db: &Path, url: &str) -> Command {
    let mut c = offsite();
    c.arg("replicate")
        .arg(db)
        .arg(url)
        .args(["--no-encryption", "--log-format", "json"]);
    c
}

#[test]
fn unreadable_or_bogus_database() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    let db = dir.join("app.db");
    workload(&db, &["--count", "3"]);

    // No read permission.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut c = replicate_cmd(&db, &url);
    without_dac_override(&mut c);
    let (code, line, all) = run(c);
    assert_one_line_error(
        code,
        &line,
        &[db.to_str().unwrap(), "ermission denied"],
        &all,
    );
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Not a SQLite file.
    let junk = dir.join("junk.db");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let (code, line, all) = run(replicate_cmd(&junk, &url));
    assert_one_line_error(
        code,
        &line,
        &[junk.to_str().unwrap(), "not a readable SQLite database"],
        &all,
    );
    // A directory.
    let (code, line, all) = run(replicate_cmd(dir, &url));
    assert_one_line_error(code, &line, &["not a regular file"], &all);
    // Missing, in a directory that does not exist either (a missing file in
    // an existing directory is waited for: the application may create it).
    let gone = dir.join("nowhere").join("gone.db");
    let (code, line, all) = run(replicate_cmd(&gone, &url));
    assert_one_line_error(code, &line, &[gone.to_str().unwrap(), "exist"], &all);
    // Nothing was written anywhere.
    assert!(!dir.join("replica").join("lineages").exists());
}

#[test]
fn not_in_wal_mode_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("file://{}", dir.join("replica").display());
    // Only WAL is a persistent journal mode: a database left in any other
    // mode by its application reads as `delete` on a new connection.
    for mode in ["DELETE", "TRUNCATE", "PERSIST"] {
        let db = dir.join(format!("{mode}.db"));
        {
            let c = rusqlite::Connection::open(&db).unwrap();
            c.execute_batch(&format!(
                "PRAGMA journal_mode={mode}; CREATE TABLE t(x); INSERT INTO t VALUES (1);"
            ))
            .unwrap();
        }
        let (code, line, all) = run(replicate_cmd(&db, &url));
        assert_one_line_error(
            code,
            &line,
            &[db.to_str().unwrap(), "not WAL", "PRAGMA journal_mode=WAL"],
            &all,
        );
        // offsite did not switch the database behind the application's back.
        let c = rusqlite::Connection::open(&db).unwrap();
        let m: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_ne!(m.to_lowercase(), "wal");
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        assert!(!Path::new(&wal).exists());
    }
    // The same through a config file: the replica's task fails, the process exits 1.
    let db = dir.join("DELETE.db");
    let cfg = dir.join("offsite.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[database]]\npath = \"{}\"\n[[database.replica]]\nurl = \"{url}\"\nencryption = \"none\"\n",
            db.display()
        ),
    )
    .unwrap();
    let mut c = offsite();
    c.args(["replicate", "--config", cfg.to_str().unwrap()]);
    let (code, line, all) = run(c);
    assert_one_line_error(code, &line, &["PRAGMA journal_mode=WAL"], &all);
    assert!(!dir.join("replica").join("lineages").exists());
}

/// The database file is replaced (a restore copied over it, a deploy
/// swapped it) while offsite runs: offsite notices, says so, and starts a
/// new lineage from the new file; the latest restore is the new database.
#[test]
fn database_replaced_underneath_a_running_offsite() {
    let (_tmp, dir, url, db, _log, key, rcpt) = file_fixture();
    workload(&db, &["--count", "20"]);
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    wait_for("first snapshot", Duration::from_secs(30), || {
        latest_txid(&url).is_some()
    });
    let first = latest_txid(&url).unwrap();
    workload(&db, &["--count", "10"]);
    let before = first + 10;
    wait_for("commit 30 shipped", Duration::from_secs(30), || {
        latest_txid(&url).is_some_and(|t| t >= before)
    });
    // A different database (commits 1..=5 only), moved over the live one;
    // the old WAL and shared memory go with the old file.
    let new = dir.join("new.db");
    workload(&new, &["--count", "5"]);
    std::fs::rename(&new, &db).unwrap();
    for ext in ["-wal", "-shm"] {
        let mut p = db.clone().into_os_string();
        p.push(ext);
        let _ = std::fs::remove_file(p);
    }
    workload(&db, &["--count", "4"]);
    let l = std::cell::Cell::new(0usize);
    wait_for("a second lineage", Duration::from_secs(30), || {
        l.set(list_json(&url)["lineages"].as_array().unwrap().len());
        l.get() == 2
    });
    let id = key.to_str().unwrap();
    let out = dir.join("latest.db");
    wait_for(
        "the new database's commits shipped",
        Duration::from_secs(30),
        || {
            let r = restore(&url, &out, &["--age-identity", id, "--force"]);
            r.ok() && offsite::workload::verify(&out).unwrap() == 9
        },
    );
    let (st, log) = s.stop();
    assert!(st.success(), "{log}");
    assert!(
        log.contains("the database file was replaced"),
        "the log must say why a new lineage started: {log}"
    );
    // The old lineage still restores the old database's last state.
    let old = dir.join("old.db");
    let r = restore(
        &url,
        &old,
        &["--age-identity", id, "--txid", &before.to_string()],
    );
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(offsite::workload::verify(&old).unwrap(), 30);
}

fn garage() -> Option<support::S3Target> {
    support::s3_target("garage")
}

/// `s3://BUCKET/…` with another bucket name.
fn with_bucket(url: &str, bucket: &str) -> String {
    let rest = url.strip_prefix("s3://").unwrap();
    let slash = rest.find(['/', '?']).unwrap_or(rest.len());
    format!("s3://{bucket}{}", &rest[slash..])
}

#[test]
fn missing_bucket() {
    let Some(t) = garage() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    workload(&db, &["--count", "3"]);
    let url = with_bucket(&t.url, "offsite-no-such-bucket");
    let (code, line, all) = run(replicate_cmd(&db, &url));
    assert_one_line_error(
        code,
        &line,
        &["offsite-no-such-bucket", "does not exist"],
        &all,
    );
    for args in [
        vec!["list", url.as_str()],
        vec!["verify", url.as_str()],
        vec![
            "restore",
            url.as_str(),
            "-o",
            "/tmp/offsite-never-written.db",
        ],
    ] {
        let mut c = offsite();
        c.args(&args);
        let (code, line, all) = run(c);
        assert_one_line_error(
            code,
            &line,
            &["offsite-no-such-bucket", "does not exist"],
            &all,
        );
    }
    assert!(!Path::new("/tmp/offsite-never-written.db").exists());
}

#[test]
fn wrong_credentials_and_region() {
    let Some(t) = garage() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("app.db");
    workload(&db, &["--count", "3"]);
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    let key_id = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
    let mut wrong_secret = secret.clone();
    wrong_secret.replace_range(
        0..4,
        if secret.starts_with("0000") {
            "1111"
        } else {
            "0000"
        },
    );
    for (what, id, sec) in [
        ("wrong secret", key_id.as_str(), wrong_secret.as_str()),
        (
            "unknown key id",
            "GK00000000000000000000dead",
            secret.as_str(),
        ),
    ] {
        let mut c = replicate_cmd(&db, &t.url);
        c.env("AWS_ACCESS_KEY_ID", id)
            .env("AWS_SECRET_ACCESS_KEY", sec);
        let (code, line, all) = run(c);
        eprintln!("{what}: {line}");
        assert_one_line_error(code, &line, &["AWS_ACCESS_KEY_ID", "HTTP 403"], &all);
        // The secret is never echoed.
        assert!(
            !all.contains(sec),
            "{what}: the secret key appears in the output"
        );
    }
    // No credentials at all.
    let mut c = offsite();
    c.args(["list", &t.url])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let (code, line, all) = run(c);
    eprintln!("no credentials: {line}");
    assert_one_line_error(code, &line, &["credentials"], &all);

    // Wrong region (Garage checks the signature's region).
    let url = t.url.replace("region=garage", "region=eu-central-1");
    assert_ne!(url, t.url);
    let (code, line, all) = run(replicate_cmd(&db, &url));
    eprintln!("wrong region: {line}");
    assert_one_line_error(code, &line, &["region", "eu-central-1"], &all);
}

/// Restore with an identity that cannot work: each case one line, no output
/// file. "Expired" covers credentials that stop working: an AWS web identity
/// token that cannot be exchanged.
#[test]
fn restore_with_a_wrong_missing_or_expired_identity() {
    let (_tmp, dir, url, db, _log, key, rcpt) = file_fixture();
    workload(&db, &["--count", "5"]);
    let s = Shipper::start(&db, &url, &["--age-recipient", &rcpt]);
    wait_for("snapshot", Duration::from_secs(30), || {
        latest_txid(&url).is_some()
    });
    let (st, log) = s.stop();
    assert!(st.success(), "{log}");
    let out = dir.join("out.db");
    let restore_with = |id: &Path| {
        let mut c = offsite();
        c.args(["restore", &url, "-o"])
            .arg(&out)
            .arg("--age-identity")
            .arg(id);
        run(c)
    };
    let (other, other_rcpt) = keygen(&dir);
    let (code, line, all) = restore_with(&other);
    assert_one_line_error(code, &line, &["none of the given age identities"], &all);
    let missing = dir.join("missing-key.txt");
    let (code, line, all) = restore_with(&missing);
    assert_one_line_error(code, &line, &[missing.to_str().unwrap()], &all);
    let junk = dir.join("junk-key.txt");
    std::fs::write(&junk, "this is not an age identity\n").unwrap();
    let (code, line, all) = restore_with(&junk);
    assert_one_line_error(code, &line, &[junk.to_str().unwrap()], &all);
    // A recipient (public key) where the identity belongs.
    let public = dir.join("public-key.txt");
    std::fs::write(&public, format!("{other_rcpt}\n")).unwrap();
    let (code, line, all) = restore_with(&public);
    eprintln!("recipient as identity: {line}");
    assert_one_line_error(code, &line, &[public.to_str().unwrap()], &all);
    assert!(!out.exists());
    // The right key still works.
    let (code, _, all) = restore_with(&key);
    assert_eq!(code, Some(0), "{all}");

    // Expired cloud credentials: a web identity token that STS will not take.
    if let Some(t) = garage() {
        let token = dir.join("token");
        std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.expired.signature").unwrap();
        let mut c = offsite();
        c.args(["list", &t.url])
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_WEB_IDENTITY_TOKEN_FILE", &token)
            .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/offsite")
            // STS is unreachable from here; point it at a closed port so the
            // test does not depend on DNS.
            .env("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:1");
        let (code, line, all) = run(c);
        eprintln!("expired web identity: {line}");
        assert_one_line_error(code, &line, &["credentials"], &all);
    }
}

#[test]
fn typos_name_the_mistake_and_suggest_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A misspelt config key: the file, the line, the key, and the right key.
    let cfg = dir.join("offsite.toml");
    std::fs::write(
        &cfg,
        "[[database]]\npath = \"/data/app.db\"\n[[database.replica]]\nurl = \"file:///backups/app\"\nencryption = \"none\"\nretension = \"72h\"\n",
    )
    .unwrap();
    let mut c = offsite();
    c.args(["replicate", "--config", cfg.to_str().unwrap()]);
    let (code, line, all) = run(c);
    eprintln!("config typo: {line}");
    assert_one_line_error(
        code,
        &line,
        &["offsite.toml:6", "retension", "retention"],
        &all,
    );
    // A misspelt URL parameter: named, with the parameter meant.
    let mut c = offsite();
    c.args(["list", "s3://bucket/p?endpoint=http://127.0.0.1:1&regoin=x"]);
    let (code, line, all) = run(c);
    assert_one_line_error(
        code,
        &line,
        &["\"regoin\"", "did you mean \"region\""],
        &all,
    );
    let mut c = offsite();
    c.args(["list", "s3://bucket/p?force_path_style=true"]);
    let (code, line, all) = run(c);
    assert_one_line_error(
        code,
        &line,
        &["\"force_path_style\"", "did you mean \"force-path-style\""],
        &all,
    );
    // A misspelt flag: clap names it and suggests the right one (exit 2).
    let mut c = offsite();
    c.args(["replicate", "/x.db", "file:///x", "--sync-intervall", "1s"]);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--sync-intervall") && err.contains("--sync-interval'"),
        "{err}"
    );
    // A bad duration value.
    let db = dir.join("app.db");
    workload(&db, &["--count", "1"]);
    let mut c = replicate_cmd(&db, "file:///tmp/offsite-never");
    c.args(["--sync-interval", "5 parsecs"]);
    let (code, line, all) = run(c);
    assert_one_line_error(code, &line, &["--sync-interval", "5 parsecs"], &all);
}

/// A replicate flag that --config cannot honour is refused (exit 1, one
/// line naming the flag and the config key to set), never silently ignored;
/// one it can honour is applied over the file.
#[test]
fn replicate_flags_with_config_are_applied_or_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = dir.join("offsite.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[database]]\npath = \"{}\"\n[[database.replica]]\nurl = \"file://{}\"\nencryption = \"none\"\n",
            dir.join("app.db").display(),
            dir.join("replica").display()
        ),
    )
    .unwrap();
    for (flag, value, key) in [
        ("--retention", "72h", "retention = \"72h\""),
        ("--snapshot-retention", "7", "snapshot-retention = \"7\""),
        ("--snapshot-interval", "1h", "snapshot-interval = \"1h\""),
        (
            "--compaction-levels",
            "1m,1h",
            "compaction-levels = [\"1m\", \"1h\"]",
        ),
    ] {
        let mut c = offsite();
        c.args(["replicate", "--config", cfg.to_str().unwrap(), flag, value]);
        let (code, line, all) = run(c);
        assert_one_line_error(
            code,
            &line,
            &[flag, "--config", key, "[[database.replica]]"],
            &all,
        );
    }
    // An applied flag is still checked under its own name.
    let mut c = offsite();
    c.args([
        "replicate",
        "--config",
        cfg.to_str().unwrap(),
        "--checkpoint-frames",
        "10",
        "--max-lag",
        "whenever",
    ]);
    let (code, line, all) = run(c);
    assert_one_line_error(code, &line, &["--max-lag", "whenever"], &all);
}
