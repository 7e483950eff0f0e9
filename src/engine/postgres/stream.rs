//! Continuous WAL streaming through a physical replication slot
//! (`offsite pg stream`, the sidecar's default for PostgreSQL).
//!
//! Received WAL is written to a local spool file per segment; every sync
//! interval the spool is fsynced and the bytes not yet in the store are
//! shipped as one piece of the segment (`pg/wal/<segment>/<start>-<end>`).
//! The server is told WAL is flushed (which lets it recycle WAL the slot
//! held) only once it is durable where `flush-after` says: in the store
//! (default) or in the fsynced spool. A completed segment that was shipped
//! in many pieces is stored again whole and its pieces deleted, so restores
//! fetch one object per segment. Timeline switches are followed and
//! `.history` files stored. One shipper per replica: the streamer holds the
//! replica's lease; `archive-push` writes only write-once whole segments,
//! which cannot conflict with it (docs/POSTGRES.md, "One shipper").

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use super::archive::{self, PgMeta, PutOutcome};
use super::dsn::Dsn;
use super::walname::{format_lsn, SegmentName, WalFile, SEGMENT_SIZE};
use super::wire::{Conn, WalMsg, WalStream};
use super::Writer;
use crate::status::{ReplicaState, ReplicaStatus};
use std::sync::atomic::Ordering::Relaxed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushAfter {
    /// Report WAL flushed once it is in the store (default: the primary
    /// keeps what offsite has not stored).
    Store,
    /// Report WAL flushed once it is fsynced in the local spool.
    Spool,
}

impl std::str::FromStr for FlushAfter {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<FlushAfter> {
        match s {
            "store" => Ok(FlushAfter::Store),
            "spool" => Ok(FlushAfter::Spool),
            o => bail!("flush-after {o:?}: expected \"store\" or \"spool\""),
        }
    }
}

pub struct StreamOptions {
    pub slot: String,
    pub sync_interval: Duration,
    pub flush_after: FlushAfter,
    pub spool_dir: PathBuf,
    /// A completed segment shipped in more pieces than this is stored again
    /// whole and its pieces deleted.
    pub consolidate_after: usize,
    /// Ship (and report flushed) every piece of WAL as soon as it arrives,
    /// for a synchronous standby: a commit waits for one upload, not a tick.
    pub synchronous: bool,
}

/// What the streamer has done (for logs, metrics and tests).
#[derive(Debug, Default, Clone)]
pub struct Progress {
    pub timeline: u32,
    pub received: u64,
    pub shipped: u64,
    pub flushed: u64,
    pub pieces: u64,
    pub last_ship_us: i64,
}

struct Spool {
    seg: SegmentName,
    path: PathBuf,
    file: std::fs::File,
    /// The segment's bytes from its start, as received.
    data: Vec<u8>,
    synced: usize,
}

impl Spool {
    fn open(dir: &Path, seg: SegmentName) -> anyhow::Result<Spool> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create spool directory {}", dir.display()))?;
        let path = dir.join(seg.to_string());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("cannot create spool file {}", path.display()))?;
        Ok(Spool {
            seg,
            path,
            file,
            data: Vec::with_capacity(SEGMENT_SIZE as usize),
            synced: 0,
        })
    }

    fn end(&self) -> u64 {
        self.seg.start_lsn() + self.data.len() as u64
    }

    fn append(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(bytes, self.data.len() as u64)
            .with_context(|| {
                format!(
                    "cannot write spool file {} (disk full?)",
                    self.path.display()
                )
            })?;
        self.data.extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self) -> anyhow::Result<()> {
        if self.synced < self.data.len() {
            self.file
                .sync_data()
                .with_context(|| format!("cannot fsync spool file {}", self.path.display()))?;
            self.synced = self.data.len();
        }
        Ok(())
    }
}

pub struct Streamer<'a> {
    w: &'a Writer,
    o: &'a StreamOptions,
    status: std::sync::Arc<ReplicaStatus>,
    /// `sync --wait` requests: (request number, the server's end of WAL
    /// when it was made, once a keepalive told us).
    syncs: Vec<(u64, Option<u64>)>,
    spool: Option<Spool>,
    /// Everything before this LSN (on `timeline`) is in the store.
    shipped: u64,
    pieces_in_segment: usize,
    pub progress: Progress,
}

impl<'a> Streamer<'a> {
    pub fn new(
        w: &'a Writer,
        o: &'a StreamOptions,
        status: std::sync::Arc<ReplicaStatus>,
    ) -> Streamer<'a> {
        Streamer {
            w,
            o,
            status,
            syncs: Vec::new(),
            spool: None,
            shipped: 0,
            pieces_in_segment: 0,
            progress: Progress::default(),
        }
    }

    /// Connect, make sure the slot exists, and stream until `stop` says so
    /// or the connection fails (the caller reconnects with backoff).
    pub async fn run(
        &mut self,
        dsn: &Dsn,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut conn = Conn::connect(dsn, true).await?;
        let sys = conn.identify_system().await?;
        ensure!(
            sys.system_id == self.w.system_id.to_string(),
            "PostgreSQL at {} is database system {}, but this archive is cluster {}: give each cluster its own replica URL",
            dsn.display(),
            sys.system_id,
            self.w.system_id
        );
        if conn.ensure_physical_slot(&self.o.slot).await? {
            tracing::info!(slot = %self.o.slot, "created replication slot");
        }
        let (mut restart, mut slot_tli) =
            conn.read_slot(&self.o.slot).await?.unwrap_or((None, None));
        if restart.is_none() {
            // The slot lost its WAL (max_slot_wal_keep_size): what it held
            // is gone from the primary. Say so, start over from now, and
            // have a base backup taken so the archive is restorable past
            // the gap.
            tracing::error!(slot = %self.o.slot, "the replication slot was invalidated (it held more WAL than max_slot_wal_keep_size while offsite could not ship): the archive has a gap; recreating the slot and taking a new base backup");
            conn.simple_query(&format!("DROP_REPLICATION_SLOT {}", self.o.slot))
                .await
                .context("cannot drop the invalidated replication slot")?;
            conn.ensure_physical_slot(&self.o.slot).await?;
            (restart, slot_tli) = conn.read_slot(&self.o.slot).await?.unwrap_or((None, None));
            self.status.add(&self.status.lineage_breaks, 1);
        }
        let mut timeline = slot_tli.unwrap_or(sys.timeline);
        let from = restart.unwrap_or(sys.xlogpos);
        if sys.timeline > 1 {
            self.store_history(&mut conn, sys.timeline).await?;
        }
        self.recover_spool().await?;
        let mut start = SegmentName::of_lsn(timeline, from).start_lsn();
        loop {
            self.begin(timeline, start).await?;
            tracing::info!(timeline, start = %format_lsn(start), shipped = %format_lsn(self.shipped), "streaming WAL");
            let stream = conn
                .start_physical(Some(&self.o.slot), start, timeline)
                .await?;
            match self.pump(stream, stop).await? {
                Ended::Stopped => return Ok(()),
                Ended::ServerGone => bail!("PostgreSQL ended the replication stream (shut down?)"),
                Ended::Timeline(next, at, c) => {
                    conn = c;
                    self.store_history(&mut conn, next).await?;
                    // The new timeline's segment starts as a copy of the old one's.
                    let carried = self
                        .spool
                        .take()
                        .filter(|s| s.seg.segno == SegmentName::of_lsn(next, at).segno);
                    timeline = next;
                    let Some(old) = carried else {
                        start = SegmentName::of_lsn(next, at).start_lsn();
                        continue;
                    };
                    {
                        let seg = SegmentName::of_lsn(next, at);
                        let mut sp = Spool::open(&self.o.spool_dir, seg)?;
                        let keep = (at - seg.start_lsn()) as usize;
                        sp.append(&old.data[..keep.min(old.data.len())])?;
                        let _ = std::fs::remove_file(&old.path);
                        self.spool = Some(sp);
                        self.shipped = seg.start_lsn();
                        self.pieces_in_segment = 0;
                        self.progress.timeline = next;
                        self.progress.received = at;
                        start = at;
                        tracing::info!(timeline = next, at = %format_lsn(at), "following the timeline switch");
                        continue;
                    }
                }
            }
        }
    }

    /// Ship what an earlier run left in the spool and the store does not
    /// hold (with `flush-after = "spool"` the server may already have
    /// recycled it).
    async fn recover_spool(&mut self) -> anyhow::Result<()> {
        let Ok(rd) = std::fs::read_dir(&self.o.spool_dir) else {
            return Ok(());
        };
        let mut left: Vec<(SegmentName, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_str().and_then(SegmentName::parse)?;
                Some((n, e.path()))
            })
            .collect();
        left.sort();
        for (seg, path) in left {
            let data = std::fs::read(&path)
                .with_context(|| format!("cannot read spool file {}", path.display()))?;
            if data.len() as u64 > SEGMENT_SIZE || data.is_empty() {
                continue;
            }
            if let Err(e) = super::walname::LongHeader::read(&data)
                .and_then(|h| h.check(seg, Some(self.w.system_id)))
            {
                tracing::warn!(file = %path.display(), "spool file is not WAL of this cluster, left alone: {e:#}");
                continue;
            }
            let pieces = archive::list_wal(self.w.store.as_ref(), Some(seg)).await?;
            let (_, reach) = archive::cover(&pieces, seg.start_lsn());
            let end = seg.start_lsn() + data.len() as u64;
            if end > reach.max(seg.start_lsn()) {
                let from = reach.max(seg.start_lsn());
                let bytes = data[(from - seg.start_lsn()) as usize..].to_vec();
                self.put_piece(seg, from, end, bytes).await?;
                tracing::info!(segment = %seg, from = %format_lsn(from), to = %format_lsn(end), "shipped WAL left in the spool by an earlier run");
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }

    /// Position at `start` on `timeline`: what the store already holds of
    /// that segment is not shipped again.
    async fn begin(&mut self, timeline: u32, start: u64) -> anyhow::Result<()> {
        if self
            .spool
            .as_ref()
            .is_some_and(|s| s.seg.timeline == timeline && s.end() == start)
        {
            return Ok(());
        }
        let seg = SegmentName::of_lsn(timeline, start);
        let pieces = archive::list_wal(self.w.store.as_ref(), Some(seg)).await?;
        let (cover, reach) = archive::cover(&pieces, seg.start_lsn());
        self.shipped = reach.max(seg.start_lsn());
        self.pieces_in_segment = cover.len();
        self.spool = Some(Spool::open(&self.o.spool_dir, seg)?);
        self.progress.timeline = timeline;
        self.progress.received = seg.start_lsn();
        self.progress.shipped = self.shipped;
        ensure!(
            start == seg.start_lsn(),
            "internal: streaming must start at a segment boundary"
        );
        Ok(())
    }

    async fn pump(
        &mut self,
        mut stream: WalStream,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let mut tick = tokio::time::interval(self.o.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        let mut sync_rx = self.status.sync_requests();
        self.status.running.store(true, Relaxed);
        self.status.set_state(ReplicaState::Shipping);
        loop {
            tokio::select! {
                m = stream.next() => match m? {
                    WalMsg::Data { start, data } => {
                        self.receive(start, &data).await?;
                        if self.o.synchronous {
                            self.ship().await?;
                            self.status(&mut stream, false).await?;
                            last_status = Instant::now();
                        }
                    }
                    WalMsg::Keepalive { reply, wal_end } => {
                        self.status.pg_slot_lag_bytes.store(wal_end.saturating_sub(self.progress.flushed), Relaxed);
                        for s in self.syncs.iter_mut().filter(|s| s.1.is_none()) {
                            s.1 = Some(wal_end);
                        }
                        if reply {
                            self.status(&mut stream, true).await?;
                            last_status = Instant::now();
                        }
                        self.settle_syncs();
                    }
                    WalMsg::End { next_timeline } => {
                        self.ship().await?;
                        return Ok(match next_timeline {
                            Some((t, at)) => Ended::Timeline(t, at, stream.into_conn()),
                            None => Ended::ServerGone,
                        });
                    }
                },
                r = sync_rx.changed() => {
                    if r.is_ok() {
                        // Where the server's WAL ends now: ask it (a
                        // keepalive answers), then ship up to there.
                        let n = *sync_rx.borrow_and_update();
                        self.syncs.push((n, None));
                        self.ship().await?;
                        self.status(&mut stream, true).await?;
                        last_status = Instant::now();
                    }
                }
                _ = tick.tick() => {
                    let before = self.progress.flushed;
                    self.ship().await?;
                    self.settle_syncs();
                    if self.progress.flushed != before || last_status.elapsed() >= Duration::from_secs(10) {
                        self.status(&mut stream, false).await?;
                        last_status = Instant::now();
                    }
                }
                _ = stop.changed() => {
                    self.ship().await?;
                    self.status(&mut stream, false).await?;
                    return Ok(Ended::Stopped);
                }
            }
        }
    }

    /// Satisfy the `sync --wait` requests whose WAL is all in the store.
    fn settle_syncs(&mut self) {
        let shipped = self.shipped;
        let mut done: Option<u64> = None;
        self.syncs.retain(|(n, end)| match end {
            Some(e) if *e <= shipped => {
                done = Some(done.map_or(*n, |d| d.max(*n)));
                false
            }
            _ => true,
        });
        if let Some(n) = done {
            self.status.sync_satisfied(n);
        }
    }

    async fn status(&mut self, stream: &mut WalStream, reply: bool) -> anyhow::Result<()> {
        let p = &self.progress;
        stream
            .send_status(p.received, p.flushed, p.flushed, reply)
            .await
    }

    /// Append received WAL to the spool, segment by segment.
    async fn receive(&mut self, start: u64, data: &[u8]) -> anyhow::Result<()> {
        let mut at = start;
        let mut data = data;
        while !data.is_empty() {
            let sp = self.spool.as_mut().context("internal: no spool")?;
            let end = sp.end();
            if at < end {
                // Sent again (a restart from the segment start): skip.
                let skip = ((end - at) as usize).min(data.len());
                data = &data[skip..];
                at += skip as u64;
                continue;
            }
            ensure!(
                at == end,
                "the server sent WAL from {} but offsite has it only up to {}: a gap",
                format_lsn(at),
                format_lsn(end)
            );
            let room = (sp.seg.end_lsn() - end) as usize;
            let n = room.min(data.len());
            sp.append(&data[..n])?;
            if self.status.pending_since_us.load(Relaxed) == 0 {
                self.status.pending_since_us.store(super::now_us(), Relaxed);
            }
            data = &data[n..];
            at += n as u64;
            self.progress.received = at;
            if at == sp.seg.end_lsn() {
                self.complete_segment().await?;
            }
        }
        Ok(())
    }

    /// fsync the spool and ship what the store does not hold yet.
    async fn ship(&mut self) -> anyhow::Result<()> {
        let Some(sp) = self.spool.as_mut() else {
            return Ok(());
        };
        sp.sync()?;
        if self.o.flush_after == FlushAfter::Spool {
            self.progress.flushed = self.progress.flushed.max(sp.end());
        }
        let end = sp.end();
        if end <= self.shipped {
            return Ok(());
        }
        let seg = sp.seg;
        let from = (self.shipped - seg.start_lsn()) as usize;
        let bytes = sp.data[from..].to_vec();
        let raw = bytes.len() as u64;
        self.put_piece(seg, self.shipped, end, bytes).await?;
        self.shipped = end;
        self.pieces_in_segment += 1;
        self.status.add(&self.status.raw_bytes, raw);
        self.status.add(&self.status.segments, 1);
        self.status.last_upload_us.store(super::now_us(), Relaxed);
        self.status.pending_since_us.store(0, Relaxed);
        self.status.pg_lag_bytes.store(0, Relaxed);
        self.progress.shipped = end;
        self.progress.pieces += 1;
        self.progress.last_ship_us = super::now_us();
        if self.o.flush_after == FlushAfter::Store {
            self.progress.flushed = self.progress.flushed.max(end);
        }
        Ok(())
    }

    async fn put_piece(
        &self,
        seg: SegmentName,
        start: u64,
        end: u64,
        bytes: Vec<u8>,
    ) -> anyhow::Result<()> {
        let hash = archive::content_hash(&bytes);
        let meta = PgMeta::Wal {
            segment: seg.to_string(),
            start,
            end,
            blake3: hash.clone(),
            system_id: self.w.system_id.to_string(),
        };
        let key = meta.key()?;
        let seal = self.w.seal.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            archive::seal(&seal, &meta, super::now_us(), &bytes)
        })
        .await
        .context("sealing task failed")??;
        let mut delay = Duration::from_millis(200);
        let stored = sealed.len() as u64;
        loop {
            match archive::put_once(
                self.w.store.as_ref(),
                &key,
                sealed.clone(),
                &hash,
                &self.w.trust,
            )
            .await
            {
                Ok(_) => {
                    self.status.add(&self.status.stored_bytes, stored);
                    return Ok(());
                }
                Err(e) if format!("{e:#}").contains("different content") => return Err(e),
                Err(e) => {
                    self.status.add(&self.status.upload_errors, 1);
                    self.status
                        .pg_lag_bytes
                        .store(self.progress.received.saturating_sub(self.shipped), Relaxed);
                    // The store is down: the slot keeps the WAL on the
                    // primary meanwhile (nothing is reported flushed).
                    tracing::warn!(key = %key, "upload failed, retrying in {delay:?}: {e:#}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// A segment is complete: ship its tail, store it whole if it was
    /// shipped in many pieces (then delete the pieces), drop its spool.
    async fn complete_segment(&mut self) -> anyhow::Result<()> {
        self.ship().await?;
        let sp = self.spool.take().context("internal: no spool")?;
        let seg = sp.seg;
        if self.pieces_in_segment > self.o.consolidate_after {
            self.consolidate(seg, &sp.data).await?;
        }
        let _ = std::fs::remove_file(&sp.path);
        self.spool = Some(Spool::open(&self.o.spool_dir, seg.next())?);
        self.pieces_in_segment = 0;
        self.shipped = seg.end_lsn();
        Ok(())
    }

    async fn consolidate(&self, seg: SegmentName, data: &[u8]) -> anyhow::Result<()> {
        self.put_piece(seg, seg.start_lsn(), seg.end_lsn(), data.to_vec())
            .await?;
        let whole = archive::wal_key(seg, seg.start_lsn(), seg.end_lsn());
        // Delete pieces only once the whole segment proves out (a name
        // alone never decides a deletion).
        let pieces = archive::list_wal(self.w.store.as_ref(), Some(seg)).await?;
        let Some(w) = pieces.iter().find(|p| p.key == whole) else {
            return Ok(());
        };
        let (_, meta) =
            archive::prove(self.w.store.as_ref(), &w.key, w.size, &self.w.trust).await?;
        let ok =
            matches!(&meta, PgMeta::Wal { blake3, .. } if *blake3 == archive::content_hash(data));
        if !ok {
            return Ok(());
        }
        for p in pieces.iter().filter(|p| !p.is_whole()) {
            if let Err(e) = self.w.store.delete(&p.key).await {
                tracing::warn!(key = %p.key, "cannot delete a piece the whole segment replaces: {e}");
            }
        }
        Ok(())
    }

    async fn store_history(&self, conn: &mut Conn, tli: u32) -> anyhow::Result<()> {
        let (name, content) = conn.timeline_history(tli).await?;
        let wf = WalFile::parse(&name)?;
        ensure!(
            wf == WalFile::History(tli),
            "the server sent history file {name} for timeline {tli}"
        );
        let hash = archive::content_hash(&content);
        let meta = PgMeta::File {
            name: name.clone(),
            blake3: hash.clone(),
            system_id: self.w.system_id.to_string(),
        };
        let key = meta.key()?;
        let sealed = archive::seal(&self.w.seal, &meta, super::now_us(), &content)?;
        if archive::put_once(self.w.store.as_ref(), &key, sealed, &hash, &self.w.trust).await?
            == PutOutcome::Stored
        {
            tracing::info!(file = %name, "stored timeline history");
        }
        Ok(())
    }
}

enum Ended {
    Stopped,
    ServerGone,
    Timeline(u32, u64, Conn),
}
