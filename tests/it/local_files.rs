//! Local files and the environment (issue 11, "trust nothing"): what
//! offsite creates on the local disk (a restored database, the objects of a
//! `file://` replica) is owner-only unless a mode is asked for, and a URL's
//! credentials never reach a message. Runs the real binary on real files;
//! no S3 server needed.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::harness::{self, offsite, workload, Shipper};

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// (relative path, permission bits) of each entry.
type Modes = Vec<(String, u32)>;

/// Every file and every directory under `root` (root included), with its mode.
fn modes_under(root: &Path) -> (Modes, Modes) {
    let (mut files, mut dirs) = (Vec::new(), vec![(".".to_string(), mode_of(root))]);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                dirs.push((rel, mode_of(&p)));
                stack.push(p);
            } else {
                files.push((rel, mode_of(&p)));
            }
        }
    }
    (files, dirs)
}

/// A file replica of 10 + 5 commits at `url` (its directory does not exist
/// before: offsite creates it).
fn ship(db: &Path, url: &str) {
    workload(db, &["--count", "10"]);
    let s = Shipper::start(db, url, &["--no-encryption"]);
    let first = harness::wait_shipped(url, None, Duration::from_secs(60));
    workload(db, &["--count", "5"]);
    harness::wait_shipped(url, Some(first), Duration::from_secs(60));
    let (st, log) = s.stop();
    assert!(st.success(), "{log}");
}

#[test]
fn restored_database_and_file_replica_objects_are_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let replica = dir.join("backups/app");
    let url = format!("file://{}", replica.display());
    let db = dir.join("app.db");
    ship(&db, &url);

    let (files, dirs) = modes_under(&replica);
    assert!(files.len() >= 3, "{files:?}");
    for (f, m) in &files {
        assert_eq!(*m, 0o600, "replica object {f}: {m:o}");
    }
    for (d, m) in &dirs {
        assert_eq!(*m, 0o700, "replica directory {d}: {m:o}");
    }
    assert_eq!(mode_of(&dir.join("backups")), 0o700);

    // The restored database, new or replacing a file of another mode.
    let out = dir.join("restored.db");
    let r = harness::restore(&url, &out, &[]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(offsite::workload::verify(&out).unwrap(), 15);
    assert_eq!(mode_of(&out), 0o600);
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = harness::restore(&url, &out, &["--force"]);
    assert!(r.ok(), "{}", r.stderr());
    assert_eq!(
        mode_of(&out),
        0o600,
        "--force replaces the file, mode included"
    );
    // Nothing else was left beside it (temp output, download directory).
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".") || n.contains("offsite-"))
        .collect();
    left.sort();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_requested_mode_is_honoured_and_other_users_never_get_access() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A file replica asked for group read.
    let replica = dir.join("shared");
    let url = format!("file://{}?file-mode=0640", replica.display());
    let db = dir.join("app.db");
    ship(&db, &url);
    let (files, dirs) = modes_under(&replica);
    assert!(files.len() >= 3, "{files:?}");
    for (f, m) in &files {
        assert_eq!(*m, 0o640, "replica object {f}: {m:o}");
    }
    for (d, m) in &dirs {
        assert_eq!(*m, 0o750, "replica directory {d}: {m:o}");
    }

    // Restores with a mode; 0660 comes out 0660 whatever the umask (the
    // test process's is usually 022, which would make it 0640).
    for (mode, want) in [
        ("0640", 0o640),
        ("0660", 0o660),
        ("600", 0o600),
        ("0o660", 0o660),
    ] {
        let out = dir.join(format!("r-{mode}.db"));
        let r = harness::restore(&url, &out, &["--mode", mode]);
        assert!(r.ok(), "--mode {mode}: {}", r.stderr());
        assert_eq!(mode_of(&out), want, "--mode {mode}");
        assert_eq!(offsite::workload::verify(&out).unwrap(), 15);
    }

    // Refused before anything is read or written: other users' bits,
    // setuid, not octal, no owner access.
    for (mode, why) in [
        ("0644", "other"),
        ("0666", "other"),
        ("0604", "other"),
        ("4600", "setuid"),
        ("0x1a0", "octal"),
        ("rw-r-----", "octal"),
        ("0968", "octal"),
        ("0440", "owner"),
    ] {
        let out = dir.join("refused.db");
        let r = harness::restore(&url, &out, &["--mode", mode]);
        assert!(!r.ok(), "--mode {mode} was accepted");
        assert!(r.stderr().contains(why), "--mode {mode}: {}", r.stderr());
        assert!(!out.exists());
    }
    for bad in ["0644", "0o777", "640x"] {
        let url = format!("file://{}?file-mode={bad}", dir.join("other").display());
        let out = offsite().args(["list", &url]).output().unwrap();
        assert!(!out.status.success(), "file-mode={bad} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("file mode"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!dir.join("other").exists());
    }
}

/// Secret access keys as AWS issues them hold `/` and `+`; others hold
/// anything, percent-escaped or not.
const SECRETS: &[&str] = &[
    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    "Qz7sEcr/Vt9kLx/Mw3",
    "Pl4sQz+Kr8Wn+Tt5",
    "Hq2At@Rz6Ym@Ux1",
    "Es3Pq%2FVb8Lk%2BNc4",
    "Od5Jk?Yw2#Zx7/Fg9",
];

#[test]
fn credentials_in_a_url_never_reach_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("app.db");
    workload(&db, &["--count", "1"]);
    let key = "AKIAIOSFODNN7EXAMPLE";
    for secret in SECRETS {
        let urls = [
            format!("s3://{key}:{secret}@bucket/prefix"),
            format!("s3://{key}:{secret}@bucket/prefix?endpoint=http://127.0.0.1:9&region=r"),
            format!("s3://bucket/prefix?aws-secret-access-key={secret}&access-key-id={key}"),
            format!("s3://bucket/p?endpoint=http://{key}:{secret}@127.0.0.1:9"),
            format!("file://{key}:{secret}@localhost/backups"),
            format!("{key}:{secret}@bucket/prefix"),
        ];
        for url in &urls {
            let cfg = dir.join("offsite.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[[database]]\npath = \"{}\"\n[[database.replica]]\nurl = \"{url}\"\n\
                     encryption = \"none\"\n",
                    db.display()
                ),
            )
            .unwrap();
            let runs = [
                offsite()
                    .args(["restore", url, "-o"])
                    .arg(dir.join("r.db"))
                    .output()
                    .unwrap(),
                offsite().args(["list", url]).output().unwrap(),
                offsite()
                    .args(["replicate", db.to_str().unwrap(), url, "--no-encryption"])
                    .output()
                    .unwrap(),
                offsite()
                    .args(["replicate", "--config", cfg.to_str().unwrap()])
                    .output()
                    .unwrap(),
                offsite()
                    .args(["verify", "--config", cfg.to_str().unwrap()])
                    .arg(&db)
                    .output()
                    .unwrap(),
            ];
            for o in runs {
                let all = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                assert!(!o.status.success(), "{url}: accepted:\n{all}");
                assert!(!all.contains(secret), "{url}: the secret is shown:\n{all}");
                for part in secret.split(['/', '+', '@', '%', '?', '#']) {
                    if part.len() >= 4 {
                        assert!(!all.contains(part), "{url}: {part:?} is shown:\n{all}");
                    }
                }
                assert!(!all.contains(key), "{url}: the key id is shown:\n{all}");
            }
        }
    }
}
