//! `offsite replicate`: its flags fill the config file's structure and go
//! through the config's own validation (one settings path; the flags that a
//! config file cannot take are refused, docs/OPERATIONS.md).

use super::*;

pub(super) async fn replicate(a: ReplicateArgs) -> anyhow::Result<()> {
    // A connection string, not a path: PostgreSQL streaming.
    if let Some(dsn) = a
        .db_path
        .as_ref()
        .and_then(|p| p.to_str())
        .filter(|s| super::pg::is_dsn(s))
    {
        return super::pg::replicate_dsn(dsn.to_string(), a).await;
    }
    let clock = crate::clock::Clock::from_env()?;
    let plan = replicate_plan(&a)?;
    let signer =
        super::trust::signer(&Default::default(), plan.config.signing_key_file.as_deref())?
            .context(crate::sign::NO_SIGNER)?;
    let verify_keys = plan.config.verify_keys.clone();
    crate::daemon::Daemon {
        signer: Some(signer),
        verify_keys,
        databases: plan.config.databases,
        listen: plan.config.listen,
        exec: plan.config.exec,
        shutdown_timeout: plan.config.shutdown_timeout,
        restore_if_db_not_exists: plan.restore_if_db_not_exists,
        restore_identities: plan.restore_identities,
        spool_base: plan.config.spool_dir,
        clock,
        discover_interval: Duration::from_secs(1),
    }
    .run()
    .await
}

/// What `offsite replicate` runs.
#[derive(Debug)]
pub(crate) struct ReplicatePlan {
    pub config: Config,
    /// `--restore-if-db-not-exists`, with the identities (`--age-identity`) it uses.
    pub restore_if_db_not_exists: bool,
    pub restore_identities: Vec<PathBuf>,
}

/// The settings `replicate` runs with, on the same path as a config file:
/// `replicate DB_PATH REPLICA_URL [flags]` describes one database with one
/// replica, `replicate --config FILE [flags]` lays the flags that are not
/// per replica over every database of the file (command line over file) and
/// refuses the per-replica ones; either way `Config::from_raw` validates and
/// applies the defaults.
pub(crate) fn replicate_plan(a: &ReplicateArgs) -> anyhow::Result<ReplicatePlan> {
    use crate::config::{Origin, RawConfig, RawDatabase, RawReplica};
    if !a.age_identity.is_empty() && !a.restore_if_db_not_exists {
        bail!("--age-identity is only used by --restore-if-db-not-exists (to restore a missing database before replicating); add that flag or drop --age-identity");
    }
    let utf8 = |p: &Option<PathBuf>, flag: &str| -> anyhow::Result<Option<String>> {
        p.as_deref()
            .map(|p| {
                p.to_str()
                    .map(str::to_string)
                    .with_context(|| format!("{flag}: path {} is not UTF-8", p.display()))
            })
            .transpose()
    };
    let config = match &a.config {
        Some(path) => {
            let f = path.display();
            let per_replica: [(&str, Option<String>, &str); 9] = [
                (
                    "DB_PATH",
                    a.db_path.as_ref().map(|p| p.display().to_string()),
                    "path",
                ),
                ("REPLICA_URL", a.replica_url.clone(), "url"),
                (
                    "--age-recipient",
                    a.age_recipient.first().cloned(),
                    "age-recipients",
                ),
                (
                    "--age-recipients-file",
                    a.age_recipients_file
                        .as_ref()
                        .map(|p| p.display().to_string()),
                    "age-recipients-file",
                ),
                (
                    "--no-encryption",
                    a.no_encryption.then(|| "none".to_string()),
                    "encryption",
                ),
                ("--retention", a.retention.clone(), "retention"),
                (
                    "--snapshot-retention",
                    a.snapshot_retention.clone(),
                    "snapshot-retention",
                ),
                (
                    "--snapshot-interval",
                    a.snapshot_interval.clone(),
                    "snapshot-interval",
                ),
                (
                    "--compaction-levels",
                    a.compaction_levels.clone(),
                    "compaction-levels",
                ),
            ];
            for (flag, given, key) in per_replica {
                let Some(v) = given else { continue };
                let fix = match key {
                    "path" => format!("set `path = \"{v}\"` in a [[database]] of {f}"),
                    "url" => {
                        format!("set `url = \"{v}\"` in the database's [[database.replica]] in {f}")
                    }
                    "age-recipients" => format!(
                        "set `age-recipients = [\"{v}\"]` in each [[database.replica]] of {f}"
                    ),
                    "compaction-levels" => format!(
                        "set `compaction-levels = [{}]` in each [[database.replica]] of {f}",
                        crate::config::split_levels(&v)
                            .iter()
                            .map(|l| format!("\"{l}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    k => format!("set `{k} = \"{v}\"` in each [[database.replica]] of {f}"),
                };
                bail!("{flag} cannot be used with --config: each replica takes it from the config file; {fix}, or run without --config");
            }
            // Command line over file: each value is checked under its
            // flag's name, then replaces the file's value in every database
            // (`$` doubled so the file's `${VAR}` expansion leaves it as typed).
            let lit = |v: &str| v.replace('$', "$$");
            let mut raw = RawConfig::load(path)?;
            if let Some(v) = &a.sync_interval {
                parse_duration(v, "--sync-interval")?;
                raw.database
                    .iter_mut()
                    .for_each(|d| d.sync_interval = Some(lit(v)));
            }
            if let Some(v) = &a.max_lag {
                parse_duration(v, "--max-lag")?;
                raw.database
                    .iter_mut()
                    .for_each(|d| d.max_lag = Some(lit(v)));
            }
            // SQLite's WAL settings go to the SQLite databases only.
            let is_sqlite = |d: &&mut crate::config::RawDatabase| {
                d.engine.as_deref().is_none_or(|e| e == "sqlite")
            };
            if let Some(v) = &a.max_wal_size {
                crate::config::parse_size(v, "--max-wal-size")?;
                raw.database
                    .iter_mut()
                    .filter(is_sqlite)
                    .for_each(|d| d.max_wal_size = Some(lit(v)));
            }
            if let Some(v) = a.checkpoint_frames {
                raw.database
                    .iter_mut()
                    .filter(is_sqlite)
                    .for_each(|d| d.checkpoint_frames = Some(v));
            }
            if let Some(v) = &a.shutdown_timeout {
                parse_duration(v, "--shutdown-timeout")?;
                raw.shutdown_timeout = Some(lit(v));
            }
            if let Some(v) = &a.listen {
                crate::config::check_listen(v, "--listen")?;
                raw.listen = Some(lit(v));
            }
            if let Some(v) = &a.exec {
                raw.exec = Some(lit(v));
            }
            if let Some(v) = utf8(&a.spool_dir, "--spool-dir")? {
                raw.spool_dir = Some(lit(&v));
            }
            if let Some(v) = utf8(&a.keys.signing_key_file, "--signing-key-file")? {
                raw.signing_key_file = Some(lit(&v));
            }
            raw.verify_keys.extend(
                a.keys
                    .verify_key
                    .iter()
                    .filter(|k| !k.trim().is_empty())
                    .map(|k| lit(k)),
            );
            Config::from_raw(&raw, &Origin::File(f.to_string()))?
        }
        None => {
            let (Some(db), Some(url)) = (&a.db_path, &a.replica_url) else {
                bail!("usage: offsite replicate DB_PATH REPLICA_URL [--age-recipient KEY | --no-encryption], or offsite replicate --config PATH");
            };
            let db = std::path::absolute(db).unwrap_or_else(|_| db.clone());
            let raw = RawConfig {
                signing_key_file: utf8(&a.keys.signing_key_file, "--signing-key-file")?,
                verify_keys: a
                    .keys
                    .verify_key
                    .iter()
                    .filter(|k| !k.trim().is_empty())
                    .cloned()
                    .collect(),
                spool_dir: utf8(&a.spool_dir, "--spool-dir")?,
                listen: a.listen.clone(),
                exec: a.exec.clone(),
                shutdown_timeout: a.shutdown_timeout.clone(),
                database: vec![RawDatabase {
                    path: utf8(&Some(db), "DB_PATH")?,
                    max_lag: a.max_lag.clone(),
                    max_wal_size: a.max_wal_size.clone(),
                    sync_interval: a.sync_interval.clone(),
                    checkpoint_frames: a.checkpoint_frames,
                    replica: vec![RawReplica {
                        url: url.clone(),
                        retention: a.retention.clone(),
                        snapshot_interval: a.snapshot_interval.clone(),
                        snapshot_retention: a.snapshot_retention.clone(),
                        compaction_levels: a
                            .compaction_levels
                            .as_deref()
                            .map(crate::config::split_levels),
                        encryption: a.no_encryption.then(|| "none".to_string()),
                        age_recipients: a.age_recipient.clone(),
                        age_recipients_file: utf8(&a.age_recipients_file, "--age-recipients-file")?,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            Config::from_raw(&raw, &Origin::CommandLine)?
        }
    };
    Ok(ReplicatePlan {
        config,
        restore_if_db_not_exists: a.restore_if_db_not_exists,
        restore_identities: a.age_identity.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::codec::Encryption;
    use clap::CommandFactory;

    /// What a flag must do: be applied (the check holds on the result) or
    /// be refused (the error names it).
    enum Want {
        Applied(fn(&ReplicatePlan) -> bool),
        Refused(&'static str),
    }

    struct Case {
        id: &'static str,
        args: Vec<String>,
        without_config: Want,
        with_config: Want,
    }

    const FILE: &str = r#"
sync-interval = "3s"
listen = "127.0.0.1:9999"
exec = "/bin/true"
shutdown-timeout = "5s"
spool-dir = "/var/spool/from-file"
max-lag = "5m"
max-wal-size = "64MiB"
[[database]]
path = "/data/a.db"
checkpoint-frames = 7
sync-interval = "4s"
[[database.replica]]
url = "file:///backups/a"
encryption = "none"
retention = "48h"
[[database]]
path = "/data/b.db"
[[database.replica]]
url = "file:///backups/b"
encryption = "none"
"#;

    fn plan(args: &[String]) -> anyhow::Result<ReplicatePlan> {
        let cli = Cli::try_parse_from(args).map_err(|e| anyhow::anyhow!("clap: {e}"))?;
        let Command::Replicate(a) = cli.command else {
            unreachable!()
        };
        replicate_plan(&a)
    }

    fn all_dbs(p: &ReplicatePlan, f: impl Fn(&crate::config::DatabaseConfig) -> bool) -> bool {
        !p.config.databases.is_empty() && p.config.databases.iter().all(f)
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// Every `replicate` flag, with and without --config: applied (command
    /// line over file) or refused with an error naming it.
    #[test]
    fn every_replicate_flag_is_applied_or_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("offsite.toml");
        std::fs::write(&cfg, FILE).unwrap();
        let rcpt = crate::keys::generate().1;
        let rfile = tmp.path().join("recipients.txt");
        std::fs::write(&rfile, format!("{rcpt}\n")).unwrap();
        let rf = rfile.to_str().unwrap();
        use Want::*;
        let cases = vec![
            Case {
                id: "db_path",
                args: s(&["/data/a.db", "file:///backups/a"]),
                without_config: Applied(|p| p.config.databases[0].path == Path::new("/data/a.db")),
                with_config: Refused("DB_PATH"),
            },
            Case {
                id: "replica_url",
                args: s(&["/data/a.db", "file:///elsewhere"]),
                without_config: Applied(|p| {
                    p.config.databases[0].replicas[0].url.to_string() == "file:///elsewhere"
                }),
                with_config: Refused("cannot be used with --config"),
            },
            Case {
                id: "config",
                args: vec![],
                without_config: Applied(|p| p.config.databases.len() == 1),
                with_config: Applied(|p| p.config.databases.len() == 2),
            },
            Case {
                id: "age_recipient",
                args: s(&["--age-recipient", &rcpt]),
                without_config: Applied(|p| {
                    matches!(
                        p.config.databases[0].replicas[0].encryption,
                        Encryption::Age(_)
                    )
                }),
                with_config: Refused("--age-recipient cannot be used with --config"),
            },
            Case {
                id: "age_recipients_file",
                args: s(&["--age-recipients-file", rf]),
                without_config: Applied(|p| {
                    matches!(
                        p.config.databases[0].replicas[0].encryption,
                        Encryption::Age(_)
                    )
                }),
                with_config: Refused("--age-recipients-file cannot be used with --config"),
            },
            Case {
                id: "no_encryption",
                args: s(&["--no-encryption"]),
                without_config: Applied(|p| {
                    matches!(
                        p.config.databases[0].replicas[0].encryption,
                        Encryption::None
                    )
                }),
                with_config: Refused("--no-encryption cannot be used with --config"),
            },
            Case {
                id: "sync_interval",
                args: s(&["--sync-interval", "9s"]),
                without_config: Applied(|p| {
                    all_dbs(p, |d| d.sync_interval == Duration::from_secs(9))
                }),
                with_config: Applied(|p| all_dbs(p, |d| d.sync_interval == Duration::from_secs(9))),
            },
            Case {
                id: "spool_dir",
                args: s(&["--spool-dir", "/tmp/$spool"]),
                without_config: Applied(|p| {
                    p.config.spool_dir.as_deref() == Some(Path::new("/tmp/$spool"))
                }),
                with_config: Applied(|p| {
                    p.config.spool_dir.as_deref() == Some(Path::new("/tmp/$spool"))
                }),
            },
            Case {
                id: "checkpoint_frames",
                args: s(&["--checkpoint-frames", "5"]),
                without_config: Applied(|p| all_dbs(p, |d| d.checkpoint_frames == 5)),
                with_config: Applied(|p| all_dbs(p, |d| d.checkpoint_frames == 5)),
            },
            Case {
                id: "retention",
                args: s(&["--retention", "72h"]),
                without_config: Applied(|p| {
                    p.config.databases[0].replicas[0]
                        .retention
                        .as_ref()
                        .is_some_and(|r| r.retention == Duration::from_secs(72 * 3600))
                }),
                with_config: Refused("--retention cannot be used with --config"),
            },
            Case {
                id: "snapshot_retention",
                args: s(&["--snapshot-retention", "7"]),
                without_config: Applied(|p| {
                    p.config.databases[0].replicas[0]
                        .retention
                        .as_ref()
                        .is_some_and(|r| {
                            r.snapshot_retention == crate::retention::SnapshotRetention::Count(7)
                        })
                }),
                with_config: Refused("--snapshot-retention cannot be used with --config"),
            },
            Case {
                id: "snapshot_interval",
                args: s(&["--snapshot-interval", "1h"]),
                without_config: Applied(|p| {
                    p.config.databases[0].replicas[0].snapshot_interval
                        == Some(Duration::from_secs(3600))
                }),
                with_config: Refused("--snapshot-interval cannot be used with --config"),
            },
            Case {
                id: "compaction_levels",
                args: s(&["--compaction-levels", "1m,1h"]),
                without_config: Applied(|p| {
                    p.config.databases[0].replicas[0].compaction_levels
                        == [Duration::from_secs(60), Duration::from_secs(3600)]
                }),
                with_config: Refused("--compaction-levels cannot be used with --config"),
            },
            Case {
                id: "listen",
                args: s(&["--listen", "127.0.0.1:1234"]),
                without_config: Applied(|p| p.config.listen.as_deref() == Some("127.0.0.1:1234")),
                with_config: Applied(|p| p.config.listen.as_deref() == Some("127.0.0.1:1234")),
            },
            Case {
                id: "exec",
                args: s(&["--exec", "app --home $HOME ${X}"]),
                without_config: Applied(|p| {
                    p.config.exec.as_deref() == Some("app --home $HOME ${X}")
                }),
                with_config: Applied(|p| p.config.exec.as_deref() == Some("app --home $HOME ${X}")),
            },
            Case {
                id: "shutdown_timeout",
                args: s(&["--shutdown-timeout", "9s"]),
                without_config: Applied(|p| p.config.shutdown_timeout == Duration::from_secs(9)),
                with_config: Applied(|p| p.config.shutdown_timeout == Duration::from_secs(9)),
            },
            Case {
                id: "max_lag",
                args: s(&["--max-lag", "9m"]),
                without_config: Applied(|p| all_dbs(p, |d| d.max_lag == Duration::from_secs(540))),
                with_config: Applied(|p| all_dbs(p, |d| d.max_lag == Duration::from_secs(540))),
            },
            Case {
                id: "max_wal_size",
                args: s(&["--max-wal-size", "2GiB"]),
                without_config: Applied(|p| all_dbs(p, |d| d.max_wal_bytes == 2 << 30)),
                with_config: Applied(|p| all_dbs(p, |d| d.max_wal_bytes == 2 << 30)),
            },
            Case {
                id: "restore_if_db_not_exists",
                args: s(&["--restore-if-db-not-exists"]),
                without_config: Applied(|p| p.restore_if_db_not_exists),
                with_config: Applied(|p| p.restore_if_db_not_exists),
            },
            Case {
                id: "signing_key_file",
                args: s(&["--signing-key-file", "/s.key"]),
                without_config: Applied(|p| {
                    p.config.signing_key_file.as_deref() == Some(Path::new("/s.key"))
                }),
                with_config: Applied(|p| {
                    p.config.signing_key_file.as_deref() == Some(Path::new("/s.key"))
                }),
            },
            Case {
                id: "verify_key",
                args: s(&[
                    "--verify-key",
                    "offsite-vk1-be017f807e29b24ee8abeec3c41a7dfc3a97ce63f68ce7321c56a6556e61f42c",
                ]),
                without_config: Applied(|p| p.config.verify_keys.len() == 1),
                with_config: Applied(|p| p.config.verify_keys.len() == 1),
            },
            Case {
                id: "age_identity",
                args: s(&["--restore-if-db-not-exists", "--age-identity", "/k.txt"]),
                without_config: Applied(|p| p.restore_identities == [PathBuf::from("/k.txt")]),
                with_config: Applied(|p| p.restore_identities == [PathBuf::from("/k.txt")]),
            },
        ];

        // A new flag must get a case here.
        let cmd = Cli::command();
        let sub = cmd.find_subcommand("replicate").unwrap();
        for arg in sub.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "log_format" {
                continue;
            }
            assert!(
                cases.iter().any(|c| c.id == id),
                "replicate flag {id} has no case in this test"
            );
        }

        let enc = [
            "--age-recipient",
            "--age-recipients-file",
            "--no-encryption",
        ];
        for c in &cases {
            // Without --config: DB_PATH REPLICA_URL, then the flag.
            let mut args = s(&["offsite", "replicate"]);
            if !c.args.first().is_some_and(|a| a.starts_with('/')) {
                args.extend(s(&["/data/a.db", "file:///backups/a"]));
            }
            args.extend(c.args.iter().cloned());
            if !c.args.iter().any(|a| enc.contains(&a.as_str())) {
                args.push("--no-encryption".into());
            }
            check(c.id, "without --config", &c.without_config, plan(&args));
            // With --config.
            let mut args = s(&["offsite", "replicate", "--config", cfg.to_str().unwrap()]);
            args.extend(c.args.iter().cloned());
            check(c.id, "with --config", &c.with_config, plan(&args));
        }
    }

    fn check(id: &str, how: &str, want: &Want, got: anyhow::Result<ReplicatePlan>) {
        match (want, got) {
            (Want::Applied(f), Ok(p)) => assert!(f(&p), "{id} {how}: not applied: {p:#?}"),
            (Want::Applied(_), Err(e)) => panic!("{id} {how}: refused: {e:#}"),
            (Want::Refused(_), Ok(p)) => panic!("{id} {how}: accepted: {p:#?}"),
            (Want::Refused(needle), Err(e)) => {
                let e = format!("{e:#}");
                assert!(
                    e.contains(needle),
                    "{id} {how}: error lacks {needle:?}: {e}"
                );
                assert!(
                    e.contains("set `") && e.contains("or run without --config"),
                    "{id} {how}: the error does not say what to do: {e}"
                );
            }
        }
    }

    /// Not given is not the default: without flags the file's values stay,
    /// and without a file every value is the default.
    #[test]
    fn unset_flags_keep_the_file_or_the_defaults() {
        use crate::config::defaults;
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("offsite.toml");
        std::fs::write(&cfg, FILE).unwrap();
        let p = plan(&s(&[
            "offsite",
            "replicate",
            "--config",
            cfg.to_str().unwrap(),
        ]))
        .unwrap();
        let (a, b) = (&p.config.databases[0], &p.config.databases[1]);
        assert_eq!(a.checkpoint_frames, 7);
        assert_eq!(b.checkpoint_frames, defaults::CHECKPOINT_FRAMES);
        assert_eq!(a.sync_interval, Duration::from_secs(4));
        assert_eq!(b.sync_interval, Duration::from_secs(3));
        assert_eq!(a.max_lag, Duration::from_secs(300));
        assert_eq!(a.max_wal_bytes, 64 << 20);
        assert_eq!(p.config.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(p.config.listen.as_deref(), Some("127.0.0.1:9999"));
        assert_eq!(
            a.replicas[0].retention.as_ref().unwrap().retention,
            Duration::from_secs(48 * 3600)
        );

        let p = plan(&s(&[
            "offsite",
            "replicate",
            "/a.db",
            "file:///r",
            "--no-encryption",
        ]))
        .unwrap();
        let d = &p.config.databases[0];
        let r = &d.replicas[0];
        assert_eq!(d.sync_interval, defaults::SYNC_INTERVAL);
        assert_eq!(d.checkpoint_frames, defaults::CHECKPOINT_FRAMES);
        assert_eq!(d.max_lag, defaults::MAX_LAG);
        assert_eq!(d.max_wal_bytes, defaults::MAX_WAL_BYTES);
        assert_eq!(p.config.shutdown_timeout, defaults::SHUTDOWN_TIMEOUT);
        assert_eq!(r.name, "replica1");
        assert_eq!(r.retention, Some(crate::retention::Policy::default()));
        assert_eq!(r.snapshot_interval, Some(defaults::SNAPSHOT_INTERVAL));
        assert_eq!(r.compaction_levels, defaults::COMPACTION_LEVELS.to_vec());
        assert_eq!(r.prune_interval, defaults::PRUNE_INTERVAL);
        assert_eq!(r.object_lock_margin, defaults::OBJECT_LOCK_MARGIN);
        assert!(p.config.listen.is_none() && p.config.exec.is_none());
        // The replicator's own defaults are the same ones.
        let o = crate::replicate::Options::new(d.path.clone(), PathBuf::new());
        assert_eq!(o.sync_interval, d.sync_interval);
        assert_eq!(o.checkpoint_frames, d.checkpoint_frames);
        assert_eq!(o.max_wal_bytes, d.max_wal_bytes);
        assert_eq!(o.shutdown_timeout, p.config.shutdown_timeout);
        assert_eq!(o.snapshot_interval, r.snapshot_interval);
        assert_eq!(o.compaction_levels, r.compaction_levels);
        assert_eq!(o.prune_interval, r.prune_interval);
        assert_eq!(o.object_lock_margin, r.object_lock_margin);
    }

    /// Wrong values name the flag they came from, with or without a file.
    #[test]
    fn bad_flag_values_name_the_flag() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("offsite.toml");
        std::fs::write(&cfg, FILE).unwrap();
        let c = cfg.to_str().unwrap();
        let bad = |args: &[&str]| format!("{:#}", plan(&s(args)).unwrap_err());
        let base = [
            "offsite",
            "replicate",
            "/a.db",
            "file:///r",
            "--no-encryption",
        ];
        for (flag, v) in [
            ("--sync-interval", "5 parsecs"),
            ("--max-lag", "soon"),
            ("--max-wal-size", "big"),
            ("--shutdown-timeout", "later"),
            ("--listen", "localhost"),
        ] {
            let e = bad(&[&base[..], &[flag, v]].concat());
            assert!(e.contains(flag) && e.contains(v), "{e}");
            let e = bad(&["offsite", "replicate", "--config", c, flag, v]);
            assert!(e.contains(flag) && e.contains(v), "{e}");
        }
        for (flag, v, needle) in [
            ("--retention", "a while", "--retention"),
            ("--snapshot-retention", "lots", "--snapshot-retention"),
            ("--snapshot-interval", "often", "--snapshot-interval"),
            ("--compaction-levels", "15m,1m", "--compaction-levels"),
            ("--age-recipient", "age1nope", "--age-recipient"),
        ] {
            let e = bad(&[&base[..], &[flag, v]].concat());
            assert!(e.contains(needle), "{e}");
        }
        let e = bad(&["offsite", "replicate", "/a.db", "file:///r"]);
        assert!(e.contains("pass --age-recipient"), "{e}");
        let e = bad(&[
            &base[..],
            &["--retention", "off", "--snapshot-retention", "3"],
        ]
        .concat());
        assert!(
            e.contains("--snapshot-retention") && e.contains("--retention"),
            "{e}"
        );
        let e = bad(&[&base[..], &["--age-identity", "/k.txt"]].concat());
        assert!(e.contains("--restore-if-db-not-exists"), "{e}");
        let e = bad(&["offsite", "replicate", "/a.db"]);
        assert!(e.contains("usage"), "{e}");
    }
}
