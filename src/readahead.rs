//! Read-ahead on another thread: a reader built and drained by a worker
//! thread, its bytes handed over in chunks through a bounded channel. Restore
//! uses it to decrypt and decompress an object on one core while the caller
//! applies what was already decoded on another.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

/// Bytes per chunk handed over.
const CHUNK: usize = 1 << 20;
/// Chunks decoded ahead of the reader (memory: `(DEPTH + 2) * CHUNK`).
const DEPTH: usize = 4;

/// The reading end. Dropping it stops the worker at its next chunk.
pub struct ReadAhead {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
    worker: Option<JoinHandle<()>>,
}

/// Run `open` on a worker thread; it returns a value for the caller (an
/// envelope, say) and the reader to drain. Returns that value and the
/// reading end, or `open`'s error.
pub fn spawn<T, F>(open: F) -> anyhow::Result<(T, ReadAhead)>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<(T, Box<dyn Read>)> + Send + 'static,
{
    let (first_tx, first_rx) = sync_channel::<anyhow::Result<T>>(1);
    let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(DEPTH);
    let worker = std::thread::Builder::new()
        .name("offsite-readahead".into())
        .spawn(move || {
            let mut r = match open() {
                Ok((v, r)) => {
                    if first_tx.send(Ok(v)).is_err() {
                        return;
                    }
                    r
                }
                Err(e) => {
                    let _ = first_tx.send(Err(e));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; CHUNK];
                let mut n = 0;
                let res = loop {
                    if n == buf.len() {
                        break Ok(());
                    }
                    match r.read(&mut buf[n..]) {
                        Ok(0) => break Ok(()),
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(n);
                let (last, msg) = match res {
                    // A short chunk (or an empty one) is the end.
                    Ok(()) => (n < CHUNK, Ok(buf)),
                    Err(e) => (true, Err(e)),
                };
                if tx.send(msg).is_err() || last {
                    return;
                }
            }
        })?;
    let v = match first_rx.recv() {
        Ok(v) => v?,
        Err(_) => anyhow::bail!("the read-ahead thread stopped before opening its reader"),
    };
    Ok((
        v,
        ReadAhead {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
            worker: Some(worker),
        },
    ))
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.done = chunk.len() < CHUNK;
                    self.cur = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("the read-ahead thread stopped"));
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Unblock a worker waiting to send, then wait for it: no thread
        // outlives the object it reads.
        let (_, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn delivers_every_byte_in_order() {
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17] {
            let src = data(n);
            let copy = src.clone();
            let (v, mut r) =
                spawn(move || Ok((7u8, Box::new(io::Cursor::new(copy)) as Box<dyn Read>))).unwrap();
            assert_eq!(v, 7);
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert_eq!(out.len(), n);
            assert!(out == src, "bytes differ at size {n}");
        }
    }

    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "damaged"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(1);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn open_and_read_errors_reach_the_reader() {
        let e = spawn(|| -> anyhow::Result<((), Box<dyn Read>)> { anyhow::bail!("no key") })
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "no key");
        let (_, mut r) =
            spawn(|| Ok(((), Box::new(Failing(3 * CHUNK + 5)) as Box<dyn Read>))).unwrap();
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(out.len(), 3 * CHUNK);
    }

    #[test]
    fn dropping_the_reader_stops_the_worker() {
        // An endless source: the drop must not hang.
        let (_, mut r) = spawn(|| Ok(((), Box::new(io::repeat(9)) as Box<dyn Read>))).unwrap();
        let mut b = [0u8; 10];
        r.read_exact(&mut b).unwrap();
        assert_eq!(b, [9; 10]);
        drop(r);
    }
}
