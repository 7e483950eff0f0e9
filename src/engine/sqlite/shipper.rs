//! The SQLite source as the pipeline sees it (`engine::Source`): the WAL
//! follower, the page state the replica holds, and the compaction windows,
//! behind one interface.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::checksum::PageState;
use super::compact::{Closed, Compactor};
use super::ship::{self, Resumed as How};
use super::source::SqliteSource;
use crate::codec::Seal;
use crate::engine::{Break, Built, Compacted, Diverged, Pending, Resumed, Source};
use crate::segment::Link;

pub struct Shipper {
    source: SqliteSource,
    /// The page state the replica holds (`None` until a snapshot or a resume).
    state: Option<PageState>,
    compactor: Compactor,
    /// The segment built last and not settled: its per-commit states and links.
    built: Option<ship::Built>,
}

impl Shipper {
    pub fn open(db: &Path, levels: &[Duration], spool_dir: PathBuf) -> anyhow::Result<Shipper> {
        let source = SqliteSource::open(db)?;
        let ps = source.page_size() as usize;
        Ok(Shipper {
            source,
            state: None,
            compactor: Compactor::new(levels, ps, spool_dir),
            built: None,
        })
    }

    /// Size of the database's `-wal` file (0 if there is none).
    pub fn log_bytes(db: &Path) -> u64 {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0)
    }

    fn state(&mut self) -> anyhow::Result<&mut PageState> {
        self.state
            .as_mut()
            .context("the source has no replicated state (no snapshot or resume yet)")
    }

    fn reset_windows(&mut self) {
        self.compactor.reset();
    }
}

impl Compacted for Closed {
    fn level(&self) -> u8 {
        self.level
    }
    fn first_txid(&self) -> u64 {
        Closed::first_txid(self)
    }
    fn last_txid(&self) -> u64 {
        Closed::last_txid(self)
    }
    fn last_time_us(&self) -> i64 {
        Closed::last_time_us(self)
    }
    fn raw_bytes(&self) -> u64 {
        Closed::raw_bytes(self)
    }
    fn write(&self, lineage: &str, seal: &Seal, sink: &mut dyn Write) -> anyhow::Result<()> {
        ship::build_compacted(self, lineage, seal, sink)?;
        Ok(())
    }
}

fn built(b: &ship::Built) -> Built {
    Built {
        first_txid: b.first_txid,
        last_txid: b.last_txid,
        last_time_us: b.last_time_us,
        raw_bytes: b.raw_bytes,
        end_link: b.end_link(),
    }
}

fn boxed(v: Vec<Closed>) -> Vec<Box<dyn Compacted>> {
    v.into_iter()
        .map(|c| Box::new(c) as Box<dyn Compacted>)
        .collect()
}

impl Source for Shipper {
    fn poll(
        &mut self,
        next_txid: &mut u64,
        now: &mut dyn FnMut() -> i64,
    ) -> anyhow::Result<Result<(), Break>> {
        Ok(self.source.poll(next_txid, now)?.map(|_| ()))
    }

    fn pending(&self) -> Vec<Pending> {
        let ps = self.source.page_size() as u64;
        self.source
            .pending()
            .iter()
            .map(|p| Pending {
                txid: p.txid,
                time_us: p.time_us,
                bytes: p.commit.frames.len() as u64 * ps,
            })
            .collect()
    }

    fn pending_len(&self) -> usize {
        self.source.pending().len()
    }

    fn quiet(&self) -> bool {
        self.source.quiet()
    }

    fn verify_continuation(&mut self) -> anyhow::Result<bool> {
        let Some(state) = self.state.as_ref() else {
            return Ok(false);
        };
        self.source.verify_continuation(state)
    }

    fn resume(&mut self, resume: &serde_json::Value) -> anyhow::Result<Result<Resumed, Break>> {
        Ok(match ship::resume(&mut self.source, resume)? {
            Ok((state, how)) => {
                self.state = Some(state);
                self.reset_windows();
                Ok(Resumed {
                    how: match how {
                        How::AtWal { frames } => format!("at WAL frame {frames}"),
                        How::AtDatabaseFile => {
                            "the database file is the replica's newest state".into()
                        }
                    },
                })
            }
            Err(b) => Err(b),
        })
    }

    fn snapshot(
        &mut self,
        lineage: &str,
        txid: u64,
        now: &mut dyn FnMut() -> i64,
        seal: &Seal,
        sink: &mut dyn Write,
    ) -> anyhow::Result<Built> {
        let view = self.source.snapshot_begin()?;
        // Stamped after the state was fixed: it holds no later commit.
        let time_us = now();
        let (_, b, st) = ship::build_snapshot(
            &mut self.source,
            &view,
            lineage,
            (txid, time_us),
            None,
            seal,
            sink,
        )?;
        self.state = Some(st);
        self.reset_windows();
        Ok(built(&b))
    }

    fn snapshot_shipped(
        &mut self,
        lineage: &str,
        (txid, link): (u64, Link),
        now: &mut dyn FnMut() -> i64,
        seal: &Seal,
        sink: &mut dyn Write,
    ) -> anyhow::Result<Option<Built>> {
        let want = self.state()?.checksum();
        let Some(view) = self.source.shipped_view()? else {
            return Ok(None);
        };
        let time_us = now();
        let (_, b, st) = ship::build_snapshot(
            &mut self.source,
            &view,
            lineage,
            (txid, time_us),
            Some(link),
            seal,
            sink,
        )?;
        let got = st.checksum();
        if got != want {
            return Err(Diverged(format!("the database state at txid {txid} (checksum {got}) differs from the replicated state ({want}); this is a bug, please report it")).into());
        }
        Ok(Some(built(&b)))
    }

    fn batch_len(&self, max_bytes: u64) -> usize {
        let ps = self.source.page_size() as u64;
        let pending = self.source.pending();
        let window = |t| self.compactor.l1_window(t);
        let first_window = pending.first().and_then(|p| window(p.time_us));
        let (mut bytes, mut n) = (0u64, 0usize);
        for p in pending {
            let b = p.commit.frames.len() as u64 * ps;
            if n > 0 && (bytes + b > max_bytes || n >= 100_000) {
                break;
            }
            // A level-0 segment never straddles a level-1 compaction window.
            if n > 0 && window(p.time_us) != first_window {
                break;
            }
            bytes += b;
            n += 1;
        }
        n
    }

    fn build_segment(
        &mut self,
        n: usize,
        link: Link,
        lineage: &str,
        seal: &Seal,
        sink: &mut dyn Write,
    ) -> anyhow::Result<Built> {
        // An earlier build that was never settled goes back first.
        if self.built.take().is_some() {
            self.state()?.rollback();
        }
        let Shipper { source, state, .. } = self;
        let state = state
            .as_mut()
            .context("the source has no replicated state (no snapshot or resume yet)")?;
        state.begin();
        match ship::build_segment(source, n, state, link, lineage, seal, sink) {
            Ok((_, b)) => {
                let out = built(&b);
                self.built = Some(b);
                Ok(out)
            }
            Err(e) => {
                state.rollback();
                Err(e)
            }
        }
    }

    fn settle(&mut self, n: usize, landed: bool) -> Vec<Box<dyn Compacted>> {
        let Some(b) = self.built.take() else {
            return Vec::new();
        };
        let Some(state) = self.state.as_mut() else {
            return Vec::new();
        };
        if !landed {
            state.rollback();
            return Vec::new();
        }
        state.commit();
        let mut closed = Vec::new();
        if self.compactor.enabled() {
            if let Err(e) = ship::fold(&mut self.compactor, &self.source, n, &b, &mut closed) {
                // Compaction only speeds restores up: on a local error the
                // windows are dropped and restores of that range read
                // level-0 segments.
                tracing::warn!(db = %self.source.db_path().display(), error = format!("{e:#}"), "compaction window dropped after a local error; restores of that range read level-0 segments");
                self.compactor.reset();
            }
        }
        self.source.mark_shipped(n);
        boxed(closed)
    }

    fn any_due(&self, t: i64) -> bool {
        self.compactor.any_due(t)
    }

    fn close_due(&mut self, t: i64) -> Vec<Box<dyn Compacted>> {
        match self.compactor.close_due(t) {
            Ok(v) => boxed(v),
            Err(e) => {
                tracing::warn!(db = %self.source.db_path().display(), error = %e, "compaction window dropped after a local error");
                self.compactor.reset();
                Vec::new()
            }
        }
    }

    fn log_frames(&self) -> u32 {
        self.source.wal_frames()
    }

    fn checkpoint(&mut self) -> anyhow::Result<bool> {
        self.source.checkpoint()
    }

    fn checkpoint_lock(&mut self, busy: Duration) -> anyhow::Result<bool> {
        self.source.checkpoint_lock(busy)
    }

    fn checkpoint_run(&mut self) -> anyhow::Result<bool> {
        self.source.checkpoint_run()
    }

    fn checkpoint_unlock(&mut self) -> anyhow::Result<()> {
        self.source.checkpoint_unlock()
    }

    fn yield_to_checkpointer(&mut self) -> anyhow::Result<bool> {
        self.source.yield_to_checkpointer()
    }
}
