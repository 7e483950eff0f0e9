//! Staging of objects before upload: in memory while small, in a spool
//! file when large, and the per-process spool directory.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;

use crate::storage::Body;

/// Objects up to this size are staged in memory, larger ones in a spool file.
const SPOOL_MEMORY_LIMIT: usize = 8 << 20;

/// A staging buffer that starts in memory and moves to a file when large.
pub(super) struct Spool {
    dir: PathBuf,
    mem: Vec<u8>,
    file: Option<(tempfile::NamedTempFile, std::io::BufWriter<std::fs::File>)>,
}

impl Spool {
    pub(super) fn new(dir: PathBuf) -> Spool {
        Spool {
            dir,
            mem: Vec::new(),
            file: None,
        }
    }

    pub(super) fn into_body(self) -> anyhow::Result<(Body, Option<tempfile::NamedTempFile>)> {
        match self.file {
            None => Ok((Body::Bytes(Bytes::from(self.mem)), None)),
            Some((tmp, mut w)) => {
                w.flush()?;
                drop(w);
                Ok((Body::File(tmp.path().to_path_buf()), Some(tmp)))
            }
        }
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some((_, w)) = &mut self.file {
            let dir = &self.dir;
            return w.write(buf).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot write a spool file in {}: {e}", dir.display()),
                )
            });
        }
        if self.mem.len() + buf.len() > SPOOL_MEMORY_LIMIT {
            // The temp file is removed when dropped, on every path (Litestream #784).
            let tmp = tempfile::Builder::new()
                .prefix("offsite-spool-")
                .tempfile_in(&self.dir)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot create a spool file in {}: {e}", self.dir.display()),
                    )
                })?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.reopen()?);
            w.write_all(&self.mem).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot write a spool file in {}: {e}", self.dir.display()),
                )
            })?;
            self.mem = Vec::new();
            self.file = Some((tmp, w));
            return self.write(buf);
        }
        self.mem.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some((_, w)) => w.flush(),
            None => Ok(()),
        }
    }
}

/// Remove spool directories of offsite processes that no longer run (killed
/// with SIGKILL, so their own cleanup never ran: Litestream #784/#927).
fn sweep_stale_spools(base: &std::path::Path) {
    let Ok(rd) = std::fs::read_dir(base) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("offsite-spool-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(dir = %e.path().display(), "removing a stale spool directory");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Keep the replica's spool directory alive for the process.
pub fn spool_dir(base: Option<PathBuf>) -> anyhow::Result<tempfile::TempDir> {
    let base = base.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)
        .with_context(|| format!("cannot create spool directory {}", base.display()))?;
    sweep_stale_spools(&base);
    tempfile::Builder::new()
        .prefix(&format!("offsite-spool-{}-", std::process::id()))
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a spool directory in {}", base.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_objects_stay_in_memory_and_large_ones_move_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::new(dir.path().to_path_buf());
        s.write_all(&vec![1u8; SPOOL_MEMORY_LIMIT]).unwrap();
        let (body, tmp) = s.into_body().unwrap();
        assert!(matches!(&body, Body::Bytes(b) if b.len() == SPOOL_MEMORY_LIMIT));
        assert!(tmp.is_none());

        let mut s = Spool::new(dir.path().to_path_buf());
        s.write_all(&vec![1u8; SPOOL_MEMORY_LIMIT]).unwrap();
        s.write_all(&[2u8]).unwrap();
        s.write_all(&[3u8; 10]).unwrap();
        let (body, tmp) = s.into_body().unwrap();
        let Body::File(path) = body else {
            panic!("one byte over the limit goes to a file")
        };
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), SPOOL_MEMORY_LIMIT + 11);
        assert_eq!(
            &data[SPOOL_MEMORY_LIMIT - 1..SPOOL_MEMORY_LIMIT + 2],
            &[1, 2, 3]
        );
        // The temp file lives as long as its handle, and no longer.
        drop(tmp);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_dropped_spool_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::new(dir.path().to_path_buf());
        s.write_all(&vec![0u8; SPOOL_MEMORY_LIMIT + 1]).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(s);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn stale_spool_dirs_of_dead_processes_are_swept() {
        let base = tempfile::tempdir().unwrap();
        // No process has a pid above the kernel's maximum (2^22).
        let dead = base.path().join("offsite-spool-4194999-abc");
        let own = base
            .path()
            .join(format!("offsite-spool-{}-abc", std::process::id()));
        let live = base.path().join("offsite-spool-1-abc");
        let other = base.path().join("not-offsite-4194999");
        for d in [&dead, &own, &live, &other] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("f"), b"x").unwrap();
        }
        sweep_stale_spools(base.path());
        assert!(!dead.exists());
        assert!(own.exists() && live.exists() && other.exists());
        // spool_dir sweeps too, and makes this process's own directory.
        std::fs::create_dir(&dead).unwrap();
        let mine = spool_dir(Some(base.path().to_path_buf())).unwrap();
        assert!(!dead.exists() && own.exists());
        let name = mine
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with(&format!("offsite-spool-{}-", std::process::id())));
    }
}
