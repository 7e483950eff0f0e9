//! Base backups through the replication protocol (BASE_BACKUP with a
//! manifest), streamed into the archive: each tar archive is cut into parts
//! of [`archive::BACKUP_PART_BYTES`] raw bytes, each sealed (zstd, age,
//! signature) and uploaded while the next is received, so nothing larger
//! than two parts is ever held locally. The backup counts as complete, and
//! gets its record (`backup.done`), only once the archive holds the WAL up
//! to its end LSN.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::BytesMut;
use tokio::task::JoinSet;

use super::archive::{self, ArchiveInfo, BackupInfo, PgMeta, TablespaceInfo};
use super::dsn::Dsn;
use super::restore::archive_reach;
use super::walname::format_lsn;
use super::wire::{BackupChunk, Conn};
use super::Writer;

/// Parts sealed and uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

pub struct BackupOptions {
    pub label: String,
    /// How long to wait for the WAL up to the backup's end to reach the
    /// archive (archive_command or the streaming daemon ships it).
    pub wal_timeout: Duration,
}

struct Current {
    name: String,
    tablespace: Option<TablespaceInfo>,
    buf: BytesMut,
    parts: u32,
    bytes: u64,
    hasher: blake3::Hasher,
}

/// Take a base backup of the cluster at `dsn` into the archive `w`.
pub async fn base_backup(w: &Writer, dsn: &Dsn, o: &BackupOptions) -> anyhow::Result<BackupInfo> {
    let mut conn = Conn::connect(dsn, true).await?;
    let sys = conn.identify_system().await?;
    ensure!(
        sys.system_id == w.system_id.to_string(),
        "PostgreSQL at {} is database system {}, but this archive is cluster {}: give each cluster its own replica URL",
        dsn.display(),
        sys.system_id,
        w.system_id
    );
    let pg_version = conn
        .simple_query("SHOW server_version_num")
        .await
        .ok()
        .and_then(|r| r.first().and_then(|row| row.first().cloned().flatten()))
        .and_then(|v| v.parse::<u32>().ok())
        .map(|n| (n / 10000).to_string())
        .unwrap_or_else(|| "15".to_string());
    let start_time_us = super::now_us();
    let start = conn.start_base_backup(&o.label).await?;
    let id = archive::backup_id(start_time_us, start.start_lsn);
    tracing::info!(backup = %id, start_lsn = %format_lsn(start.start_lsn), "base backup started");
    let mut archives: Vec<ArchiveInfo> = Vec::new();
    let mut cur: Option<Current> = None;
    let mut uploads: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let mut raw_total = 0u64;
    let began = Instant::now();
    let tablespace_of = |name: &str, path: Option<String>| -> Option<TablespaceInfo> {
        let oid = name.strip_suffix(".tar")?.parse::<u32>().ok()?;
        let path = path.filter(|p| !p.is_empty()).or_else(|| {
            start
                .tablespaces
                .iter()
                .find(|(o, _)| *o == oid)
                .map(|(_, p)| p.clone())
        })?;
        Some(TablespaceInfo { oid, path })
    };
    while let Some(chunk) = conn.next_backup_chunk().await? {
        match chunk {
            BackupChunk::Archive {
                name,
                tablespace_path,
            } => {
                if let Some(c) = cur.take() {
                    archives.push(finish(w, &id, c, &mut uploads).await?);
                }
                ensure!(
                    name == "base.tar" || name.strip_suffix(".tar").is_some_and(|o| o.parse::<u32>().is_ok()),
                    "BASE_BACKUP sent an archive named {name:?}; this offsite expects base.tar and <oid>.tar (server-side compression must be off)"
                );
                cur = Some(Current {
                    tablespace: tablespace_of(&name, tablespace_path),
                    name,
                    buf: BytesMut::new(),
                    parts: 0,
                    bytes: 0,
                    hasher: blake3::Hasher::new(),
                });
            }
            BackupChunk::Manifest => {
                if let Some(c) = cur.take() {
                    archives.push(finish(w, &id, c, &mut uploads).await?);
                }
                cur = Some(Current {
                    name: "backup_manifest".into(),
                    tablespace: None,
                    buf: BytesMut::new(),
                    parts: 0,
                    bytes: 0,
                    hasher: blake3::Hasher::new(),
                });
            }
            BackupChunk::Data(d) => {
                let c = cur
                    .as_mut()
                    .context("BASE_BACKUP sent data before an archive")?;
                c.hasher.update(&d);
                c.bytes += d.len() as u64;
                raw_total += d.len() as u64;
                c.buf.extend_from_slice(&d);
                while c.buf.len() as u64 >= archive::BACKUP_PART_BYTES {
                    let part = c.buf.split_to(archive::BACKUP_PART_BYTES as usize);
                    upload_part(w, &id, &c.name, c.parts, part, &mut uploads).await?;
                    c.parts += 1;
                }
            }
            BackupChunk::Progress(_) => {}
        }
    }
    if let Some(c) = cur.take() {
        archives.push(finish(w, &id, c, &mut uploads).await?);
    }
    while let Some(r) = uploads.join_next().await {
        r.context("upload task failed")??;
    }
    let end = conn.finish_base_backup().await?;
    conn.close().await;
    let end_time_us = super::now_us();
    ensure!(
        archives.iter().any(|a| a.name == "base.tar"),
        "BASE_BACKUP sent no base.tar"
    );
    tracing::info!(
        backup = %id,
        end_lsn = %format_lsn(end.end_lsn),
        bytes = raw_total,
        secs = began.elapsed().as_secs_f64(),
        "base backup data stored; waiting for its WAL to reach the archive"
    );
    // Complete only with the WAL that makes it consistent.
    let deadline = Instant::now() + o.wal_timeout;
    loop {
        let pieces = archive::list_wal(w.store.as_ref(), None).await?;
        let reach = archive_reach(&pieces, start.timeline, start.start_lsn);
        if reach >= end.end_lsn {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "base backup {id}: the archive holds WAL only up to {} but the backup needs it up to {} (is archive_command or `offsite pg stream` shipping this cluster to the same replica URL?); the backup is not complete",
                format_lsn(reach),
                format_lsn(end.end_lsn)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let info = BackupInfo {
        id: id.clone(),
        label: o.label.clone(),
        system_id: w.system_id.to_string(),
        timeline: start.timeline,
        start_lsn: start.start_lsn,
        end_lsn: end.end_lsn,
        start_time_us,
        end_time_us,
        pg_version,
        manifest: archives.iter().any(|a| a.name == "backup_manifest"),
        archives,
    };
    let meta = PgMeta::Backup(info.clone());
    let key = meta.key()?;
    let body = serde_json::to_vec(&info)?;
    let sealed = archive::seal(&w.seal, &meta, end_time_us, &body)?;
    w.store
        .put(&key, crate::storage::Body::Bytes(sealed.into()))
        .await
        .with_context(|| format!("cannot upload {key}"))?;
    tracing::info!(backup = %id, "base backup complete");
    Ok(info)
}

async fn upload_part(
    w: &Writer,
    id: &str,
    name: &str,
    part: u32,
    data: BytesMut,
    uploads: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    while uploads.len() >= PARTS_IN_FLIGHT {
        if let Some(r) = uploads.join_next().await {
            r.context("upload task failed")??;
        }
    }
    let meta = PgMeta::BackupPart {
        backup: id.to_string(),
        archive: name.to_string(),
        part,
        bytes: data.len() as u64,
    };
    let key = meta.key()?;
    let seal = w.seal.clone();
    let store = w.store.clone();
    uploads.spawn(async move {
        let sealed = tokio::task::spawn_blocking(move || {
            archive::seal(&seal, &meta, super::now_us(), &data)
        })
        .await
        .context("sealing task failed")??;
        store
            .put(&key, crate::storage::Body::Bytes(sealed.into()))
            .await
            .with_context(|| format!("cannot upload {key}"))?;
        Ok(())
    });
    Ok(())
}

async fn finish(
    w: &Writer,
    id: &str,
    mut c: Current,
    uploads: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<ArchiveInfo> {
    if !c.buf.is_empty() || c.parts == 0 {
        let rest = std::mem::take(&mut c.buf);
        upload_part(w, id, &c.name, c.parts, rest, uploads).await?;
        c.parts += 1;
    }
    Ok(ArchiveInfo {
        name: c.name,
        parts: c.parts,
        bytes: c.bytes,
        blake3: c.hasher.finalize().to_hex().to_string(),
        tablespace: c.tablespace,
    })
}
