//! The native PostgreSQL client (`offsite::engine::postgres::wire`) against
//! real throwaway clusters: queries and errors, authentication (trust,
//! SCRAM-SHA-256, MD5) and its friendly errors, replication slots, WAL
//! streaming compared byte for byte with pg_wal, a timeline switch, and
//! BASE_BACKUP. Skipped (with a warning) without PostgreSQL unless
//! `OFFSITE_TEST_REQUIRE_PG=1`.

use std::time::{Duration, Instant};

use offsite::engine::postgres::dsn::{Dsn, Host};
use offsite::engine::postgres::wire::{
    format_lsn, parse_lsn, BackupChunk, Conn, PgError, WalMsg, WalStream,
};

use crate::support::pgcluster::PgCluster;

const SEG: u64 = 16 * 1024 * 1024;

fn cluster(extra_conf: &[&str]) -> Option<PgCluster> {
    PgCluster::available().then(|| PgCluster::start(extra_conf))
}

/// The cluster's DSN with no password from the environment or a passfile.
fn dsn_of(pg: &PgCluster) -> Dsn {
    Dsn {
        password: None,
        ..Dsn::parse(&pg.dsn()).unwrap()
    }
}

fn dsn_for(pg: &PgCluster, user: &str, password: Option<&str>) -> Dsn {
    Dsn {
        user: user.into(),
        password: password.map(str::to_string),
        ..dsn_of(pg)
    }
}

/// pg_wal's name of the segment holding `lsn` on timeline `tli`.
fn segment_name(tli: u32, lsn: u64) -> String {
    let segno = lsn / SEG;
    format!("{tli:08X}{:08X}{:08X}", segno / 256, segno % 256)
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

#[tokio::test]
async fn pg_wire_queries_and_errors() {
    let Some(pg) = cluster(&[]) else { return };
    let mut c = Conn::connect(&dsn_of(&pg), false).await.unwrap();
    assert_eq!(
        c.simple_query("select 1").await.unwrap(),
        vec![vec![Some("1".to_string())]]
    );
    // All result sets, NULLs, UTF-8.
    assert_eq!(
        c.simple_query("select 1; select 'é', null::text")
            .await
            .unwrap(),
        vec![
            vec![Some("1".to_string())],
            vec![Some("é".to_string()), None]
        ]
    );
    assert!(c.simple_query("").await.unwrap().is_empty());

    let e = c
        .simple_query("select * from no_such_table")
        .await
        .unwrap_err();
    let pe = e.downcast_ref::<PgError>().expect("a PgError inside");
    assert_eq!(pe.code, "42P01");
    let text = err_text(e);
    assert!(
        text.contains("42P01") && text.contains("no_such_table"),
        "{text}"
    );
    // Detail and hint reach the text.
    let e = c
        .simple_query(
            "do $$ begin raise exception 'boom' using detail = 'the detail', hint = 'the hint', errcode = '22012'; end $$",
        )
        .await
        .unwrap_err();
    let text = err_text(e);
    for want in ["22012", "boom", "the detail", "the hint"] {
        assert!(text.contains(want), "{want} in {text}");
    }
    // The session survives errors, and notices are skipped.
    assert_eq!(
        c.simple_query("do $$ begin raise notice 'hello'; end $$; select 2")
            .await
            .unwrap(),
        vec![vec![Some("2".to_string())]]
    );
    c.close().await;

    // Over the Unix socket, normal and replication.
    let unix = Dsn {
        host: Host::Unix(pg.socket_dir.clone()),
        ..dsn_of(&pg)
    };
    let mut c = Conn::connect(&unix, false).await.unwrap();
    assert_eq!(
        c.simple_query("select current_user").await.unwrap(),
        vec![vec![Some("postgres".to_string())]]
    );
    let mut r = Conn::connect(&unix.clone().with_application_name("offsite-test"), true)
        .await
        .unwrap();
    let id = r.identify_system().await.unwrap();
    assert_eq!(id.timeline, 1);
    assert_eq!(
        c.simple_query(
            "select application_name from pg_stat_activity where backend_type = 'walsender'"
        )
        .await
        .unwrap(),
        vec![vec![Some("offsite-test".to_string())]]
    );
    r.close().await;

    // Nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = err_text(
        Conn::connect(
            &Dsn {
                port,
                ..dsn_of(&pg)
            },
            false,
        )
        .await
        .err()
        .unwrap(),
    );
    assert!(
        e.contains(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}"))
            && e.contains("is the server running and listening?"),
        "{e}"
    );
}

#[tokio::test]
async fn pg_wire_identify_system_and_slots() {
    // Logical, for a logical slot of the same name (extra_conf lines win).
    let Some(pg) = cluster(&["wal_level = logical"]) else {
        return;
    };
    let mut r = Conn::connect(&dsn_of(&pg), true).await.unwrap();
    let id = r.identify_system().await.unwrap();
    assert_eq!(
        id.system_id,
        pg.psql("select system_identifier from pg_control_system()")
    );
    assert_eq!(id.timeline, 1);
    assert_eq!(id.dbname, None);
    assert!(id.xlogpos > 0);

    assert_eq!(r.read_slot("offsite_t").await.unwrap(), None);
    assert!(r.ensure_physical_slot("offsite_t").await.unwrap());
    assert!(!r.ensure_physical_slot("offsite_t").await.unwrap());
    let (lsn, tli) = r.read_slot("offsite_t").await.unwrap().unwrap();
    let lsn = lsn.expect("RESERVE_WAL gives a restart_lsn");
    assert_eq!(tli, Some(1));
    assert_eq!(
        format_lsn(lsn),
        pg.psql("select restart_lsn from pg_replication_slots where slot_name = 'offsite_t'")
    );
    // Bad names never reach the server.
    assert!(r.read_slot("x; drop").await.is_err());
    // A logical slot of the name is refused.
    pg.psql("select pg_create_logical_replication_slot('offsite_l', 'test_decoding')");
    let e = err_text(r.ensure_physical_slot("offsite_l").await.unwrap_err());
    assert!(e.contains("logical"), "{e}");
    // TIMELINE_HISTORY of timeline 1: there is none.
    assert!(r.timeline_history(1).await.is_err());
    r.close().await;
}

/// Read the stream until WAL up to `target` arrived, checking that the
/// pieces are contiguous from `*next`; answers keepalives. Appends to `got`.
async fn read_until(s: &mut WalStream, next: &mut u64, target: u64, got: &mut Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while *next < target {
        assert!(
            Instant::now() < deadline,
            "WAL up to {} did not arrive (at {})",
            format_lsn(target),
            format_lsn(*next)
        );
        let msg = tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("a message within 30 s")
            .unwrap();
        match msg {
            WalMsg::Data { start, data } => {
                assert_eq!(start, *next, "WAL pieces are contiguous");
                *next += data.len() as u64;
                got.extend_from_slice(&data);
            }
            WalMsg::Keepalive { reply, .. } => {
                if reply {
                    s.send_status(*next, 0, 0, false).await.unwrap();
                }
            }
            WalMsg::End { .. } => panic!("the stream ended early"),
        }
    }
}

#[tokio::test]
async fn pg_wire_streams_wal_identical_to_pg_wal() {
    let Some(pg) = cluster(&[]) else { return };
    let mut r = Conn::connect(&dsn_of(&pg), true).await.unwrap();
    assert!(r.ensure_physical_slot("offsite_s").await.unwrap());
    let (restart, _) = r.read_slot("offsite_s").await.unwrap().unwrap();
    let restart = restart.unwrap();
    let seg_start = restart / SEG * SEG;
    let mut s = r
        .start_physical(Some("offsite_s"), seg_start, 1)
        .await
        .unwrap();

    pg.psql("create table t (x int, pad text); insert into t select g, repeat('x', 100) from generate_series(1, 20000) g");
    pg.psql("select pg_switch_wal()");
    pg.psql("insert into t values (0, 'after the switch')");
    let target = parse_lsn(&pg.psql("select pg_current_wal_lsn()")).unwrap();
    assert!(target > seg_start + SEG, "the first segment is complete");

    let mut next = seg_start;
    let mut got = Vec::new();
    read_until(&mut s, &mut next, target, &mut got).await;
    assert!(next >= target);

    // The completed first segment is pg_wal's file, byte for byte.
    let file = pg.data.join("pg_wal").join(segment_name(1, seg_start));
    let on_disk = std::fs::read(&file).unwrap();
    assert_eq!(on_disk.len() as u64, SEG);
    assert!(got.len() as u64 >= SEG);
    assert!(
        got[..SEG as usize] == on_disk[..],
        "streamed segment differs from {}",
        file.display()
    );

    // Reporting a flush moves the slot.
    let slot_lsn = || {
        parse_lsn(
            &pg.psql("select restart_lsn from pg_replication_slots where slot_name = 'offsite_s'"),
        )
        .unwrap()
    };
    assert_eq!(slot_lsn(), restart);
    s.send_status(next, next, 0, false).await.unwrap();
    let t = Instant::now();
    while slot_lsn() != next {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "restart_lsn stays at {}",
            format_lsn(slot_lsn())
        );
        // Keep reading so the walsender processes our reply.
        let _ = tokio::time::timeout(Duration::from_millis(100), s.next()).await;
    }
    assert!(
        pg.psql("select active from pg_replication_slots where slot_name = 'offsite_s'") == "t"
    );
}

#[tokio::test]
async fn pg_wire_follows_a_timeline_switch() {
    let Some(pg) = cluster(&[]) else { return };
    let mut r = Conn::connect(&dsn_of(&pg), true).await.unwrap();
    let id = r.identify_system().await.unwrap();
    r.close().await;
    let seg_start = id.xlogpos / SEG * SEG;
    pg.psql("create table t (x int); insert into t values (1)");

    // Make timeline 2: restart as a standby of nothing, then promote.
    pg.stop();
    std::fs::write(pg.data.join("standby.signal"), b"").unwrap();
    pg.restart();
    let out = crate::support::pgcluster::run_as_postgres(
        std::process::Command::new(pg.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&pg.data)
            .args(["-w", "promote"]),
    );
    assert!(
        out.status.success(),
        "promote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.psql("insert into t values (2)");

    let mut r = Conn::connect(&dsn_of(&pg), true).await.unwrap();
    assert_eq!(r.identify_system().await.unwrap().timeline, 2);
    let (name, content) = r.timeline_history(2).await.unwrap();
    assert_eq!(name, "00000002.history");
    assert_eq!(
        content,
        std::fs::read(pg.data.join("pg_wal/00000002.history")).unwrap()
    );
    let text = String::from_utf8(content).unwrap();
    let switch = parse_lsn(text.split('\t').nth(1).unwrap()).unwrap();

    // Timeline 1 streams up to the switch point, then ends with the next timeline.
    let mut s = r.start_physical(None, seg_start, 1).await.unwrap();
    let mut next = seg_start;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("a message within 30 s")
            .unwrap()
        {
            WalMsg::Data { start, data } => {
                assert_eq!(start, next);
                next += data.len() as u64;
            }
            WalMsg::Keepalive { .. } => {}
            WalMsg::End { next_timeline } => break next_timeline,
        }
    };
    assert_eq!(end, Some((2, switch)));
    assert!(
        next >= switch,
        "streamed to {} before the switch at {}",
        format_lsn(next),
        format_lsn(switch)
    );
    assert!(s.next().await.is_err(), "nothing after End");

    // The same connection goes on with timeline 2 from the switch point.
    let r = s.into_conn();
    let mut s = r.start_physical(None, switch, 2).await.unwrap();
    let target = parse_lsn(&pg.psql("select pg_current_wal_flush_lsn()")).unwrap();
    // It sends from the requested position (the switch point, mid-segment).
    let first = loop {
        match s.next().await.unwrap() {
            WalMsg::Data { start, data } => break (start, data.len() as u64),
            _ => continue,
        }
    };
    assert_eq!(
        first.0,
        switch,
        "timeline 2 starts at {}",
        format_lsn(first.0)
    );
    let mut next2 = first.0 + first.1;
    let mut got = Vec::new();
    read_until(&mut s, &mut next2, target, &mut got).await;
}

#[tokio::test]
async fn pg_wire_base_backup() {
    let Some(pg) = cluster(&[]) else { return };
    pg.psql("create table t as select g from generate_series(1, 1000) g");
    let mut r = Conn::connect(&dsn_of(&pg), true).await.unwrap();
    let start = r.start_base_backup("offsite 'test' backup").await.unwrap();
    assert_eq!(start.timeline, 1);
    assert!(start.tablespaces.is_empty());
    assert!(
        r.simple_query("select 1").await.is_err(),
        "busy during the backup"
    );

    let mut archives: Vec<(String, Vec<u8>)> = Vec::new();
    let mut manifest: Option<Vec<u8>> = None;
    while let Some(chunk) = r.next_backup_chunk().await.unwrap() {
        match chunk {
            BackupChunk::Archive {
                name,
                tablespace_path,
            } => {
                assert_eq!(tablespace_path, None);
                assert!(manifest.is_none());
                archives.push((name, Vec::new()));
            }
            BackupChunk::Manifest => manifest = Some(Vec::new()),
            BackupChunk::Data(d) => match &mut manifest {
                Some(m) => m.extend_from_slice(&d),
                None => archives
                    .last_mut()
                    .expect("an archive first")
                    .1
                    .extend_from_slice(&d),
            },
            // Sent even with PROGRESS false.
            BackupChunk::Progress(_) => {}
        }
    }
    assert!(r.next_backup_chunk().await.unwrap().is_none());
    let end = r.finish_base_backup().await.unwrap();
    assert_eq!(end.timeline, 1);
    assert!(end.end_lsn >= start.start_lsn);

    assert_eq!(
        archives.len(),
        1,
        "{:?}",
        archives.iter().map(|a| &a.0).collect::<Vec<_>>()
    );
    assert_eq!(archives[0].0, "base.tar");
    let files = tar_entries(&archives[0].1);
    let get = |n: &str| {
        files
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, d)| d.clone())
    };
    assert_eq!(
        String::from_utf8(get("PG_VERSION").expect("PG_VERSION"))
            .unwrap()
            .trim(),
        pg.psql("show server_version_num")[..2].to_string()
    );
    let label = String::from_utf8(get("backup_label").expect("backup_label")).unwrap();
    assert!(
        label.contains(&format!(
            "START WAL LOCATION: {}",
            format_lsn(start.start_lsn)
        )),
        "{label}"
    );
    assert!(label.contains("LABEL: offsite 'test' backup"), "{label}");
    assert!(files.iter().any(|(n, _)| n == "global/pg_control"));

    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest.expect("a manifest")).unwrap();
    let ranges = manifest["WAL-Ranges"].as_array().expect("WAL-Ranges");
    assert_eq!(ranges[0]["Start-LSN"], format_lsn(start.start_lsn));
    assert_eq!(ranges[0]["End-LSN"], format_lsn(end.end_lsn));
    assert!(manifest["Files"].as_array().unwrap().len() > 100);

    // The connection is usable again.
    assert_eq!(r.identify_system().await.unwrap().timeline, 1);
    r.close().await;
}

/// (name, content) of the regular files in a tar archive, checking headers.
fn tar_entries(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    let field = |h: &[u8], a: usize, b: usize| {
        let f = &h[a..b];
        let end = f.iter().position(|&c| c == 0).unwrap_or(f.len());
        String::from_utf8_lossy(&f[..end]).trim().to_string()
    };
    let mut ended = false;
    while pos + 512 <= tar.len() {
        let h = &tar[pos..pos + 512];
        if h.iter().all(|&b| b == 0) {
            ended = true;
            break;
        }
        let sum: u32 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        let stored = u32::from_str_radix(&field(h, 148, 156), 8).expect("checksum field");
        assert_eq!(sum, stored, "tar header checksum at {pos}");
        let size = u64::from_str_radix(&field(h, 124, 136), 8).expect("size field") as usize;
        let mut name = field(h, 0, 100);
        let prefix = field(h, 345, 500);
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
        let data_start = pos + 512;
        assert!(data_start + size <= tar.len(), "tar entry {name} truncated");
        if h[156] == b'0' || h[156] == 0 {
            out.push((name, tar[data_start..data_start + size].to_vec()));
        }
        pos = data_start + size.div_ceil(512) * 512;
    }
    assert!(ended, "the tar archive has its end-of-archive blocks");
    out
}

#[tokio::test]
async fn pg_wire_authentication_errors() {
    if !PgCluster::available() {
        return;
    }
    let pg = PgCluster::start_with_hba(
        &["password_encryption = 'scram-sha-256'"],
        &[
            "host all,replication alice 127.0.0.1/32 scram-sha-256",
            "host all,replication bob 127.0.0.1/32 md5",
            "host all,replication carol 127.0.0.1/32 password",
        ],
    );
    let secret = "Corr3ct-Horse-pw";
    pg.psql(&format!("create role alice login password '{secret}'"));
    pg.psql(&format!(
        "set password_encryption = 'md5'; create role bob login replication password '{secret}'"
    ));
    pg.psql(&format!("create role carol login password '{secret}'"));

    // SCRAM-SHA-256, right password.
    let mut c = Conn::connect(&dsn_for(&pg, "alice", Some(secret)), false)
        .await
        .unwrap();
    assert_eq!(
        c.simple_query("select current_user").await.unwrap(),
        vec![vec![Some("alice".to_string())]]
    );
    c.close().await;

    // Wrong password: friendly, and the password appears nowhere.
    let wrong = "Wr0ng-Passw0rd-xyz";
    let e = err_text(
        Conn::connect(&dsn_for(&pg, "alice", Some(wrong)), false)
            .await
            .err()
            .unwrap(),
    );
    assert!(
        e.contains(
            "password authentication failed for user alice (check PGPASSWORD or the passfile)"
        ),
        "{e}"
    );
    assert!(!e.contains(wrong) && !e.contains(secret), "{e}");

    // No password at all.
    let e = err_text(
        Conn::connect(&dsn_for(&pg, "alice", None), false)
            .await
            .err()
            .unwrap(),
    );
    assert!(
        e.contains("asks for a password") && e.contains("SCRAM-SHA-256"),
        "{e}"
    );

    // A role without REPLICATION asking for a replication connection.
    let e = err_text(
        Conn::connect(&dsn_for(&pg, "alice", Some(secret)), true)
            .await
            .err()
            .unwrap(),
    );
    assert!(
        e.contains("grant it: ALTER ROLE alice REPLICATION") && e.contains("42501"),
        "{e}"
    );
    assert!(!e.contains(secret), "{e}");

    // MD5 (bob's password is stored as MD5) and cleartext, replication too.
    let mut c = Conn::connect(&dsn_for(&pg, "bob", Some(secret)), true)
        .await
        .unwrap();
    assert_eq!(c.identify_system().await.unwrap().timeline, 1);
    c.close().await;
    let e = err_text(
        Conn::connect(&dsn_for(&pg, "bob", Some(wrong)), false)
            .await
            .err()
            .unwrap(),
    );
    assert!(
        e.contains("password authentication failed for user bob"),
        "{e}"
    );
    assert!(!e.contains(wrong), "{e}");
    let mut c = Conn::connect(&dsn_for(&pg, "carol", Some(secret)), false)
        .await
        .unwrap();
    assert_eq!(
        c.simple_query("select current_user").await.unwrap(),
        vec![vec![Some("carol".to_string())]]
    );
    c.close().await;

    // Unknown role and database: the server's words.
    let e = err_text(
        Conn::connect(
            &Dsn {
                dbname: Some("nodb".into()),
                ..dsn_of(&pg)
            },
            false,
        )
        .await
        .err()
        .unwrap(),
    );
    assert!(e.contains("3D000") && e.contains("nodb"), "{e}");

    // TLS modes are refused before connecting.
    let e = err_text(
        Conn::connect(
            &Dsn {
                sslmode: "require".into(),
                ..dsn_of(&pg)
            },
            false,
        )
        .await
        .err()
        .unwrap(),
    );
    assert!(e.contains("TLS to PostgreSQL is not supported yet"), "{e}");
}

#[tokio::test]
async fn pg_wire_harness_crash_and_restart() {
    let Some(pg) = cluster(&[]) else { return };
    pg.psql("create table t (x int); insert into t select generate_series(1, 100)");
    pg.kill9();
    pg.restart();
    assert_eq!(pg.psql("select count(*) from t"), "100");
    pg.stop();
    pg.restart();
    assert_eq!(pg.psql("select sum(x) from t"), "5050");
    let mut c = Conn::connect(&dsn_of(&pg), false).await.unwrap();
    assert_eq!(
        c.simple_query("select count(*) from t").await.unwrap(),
        vec![vec![Some("100".to_string())]]
    );
}
