//! A fault-injecting HTTP/1.1 proxy to put between offsite and a real S3
//! server (tests only).
//!
//! It listens on `127.0.0.1:0` in a thread of its own (its own tokio
//! runtime, so sync tests and `#[tokio::test]`s can both use it) and
//! forwards every request to the upstream server byte for byte: it
//! understands just enough HTTP/1.1 (request and response heads,
//! `Content-Length` and chunked bodies, `Expect: 100-continue`, keep-alive)
//! to know where each message ends. The fault can be changed at any time
//! with [`FaultProxy::set`]; it applies to requests that start afterwards
//! (optionally only to some kinds of request, see [`Scope`]). Every request
//! is recorded with its kind, time and what the proxy did with it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with the requests a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// The server is down: the listening socket is closed (new connections
    /// get ECONNREFUSED) and open connections are reset at their next request.
    Refuse,
    /// Connections are accepted, and reset at their first request.
    ResetOnRequest,
    /// Answer with this S3 error (a proper XML error body), without
    /// forwarding. See [`S3Error`] for the usual ones.
    Error(S3Error),
    /// Forward the request head and the first `bytes` bytes of its body,
    /// then reset both connections (a connection dying mid-upload).
    ResetAfterBytes(u64),
    /// Forward the whole request, read the server's whole response, and
    /// reset the client connection instead of answering: the request took
    /// effect but the client cannot know (a lost response).
    DropResponse,
    /// Forward, but hold every response this long before passing it on.
    Delay(Duration),
    /// Read the request and never answer (the connection stays open).
    Hang,
    /// Pass until this many UploadPart requests were forwarded, then behave
    /// as [`Fault::Refuse`]: the store dies in the middle of a multipart upload
    /// (the client cannot even abort it).
    CutMultipartAfter(u32),
}

/// An S3 error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Error {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
}

impl S3Error {
    pub const INTERNAL: S3Error = S3Error {
        status: 500,
        code: "InternalError",
        message: "We encountered an internal error. Please try again.",
    };
    pub const UNAVAILABLE: S3Error = S3Error {
        status: 503,
        code: "ServiceUnavailable",
        message: "Service is unable to handle request.",
    };
    pub const SLOW_DOWN: S3Error = S3Error {
        status: 503,
        code: "SlowDown",
        message: "Please reduce your request rate.",
    };
}

/// The S3 operation a request is, from its method and query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    ListObjects,
    ListUploads,
    Get,
    Head,
    PutObject,
    CreateMultipart,
    UploadPart,
    CompleteMultipart,
    AbortMultipart,
    Delete,
    Other,
}

impl Kind {
    pub fn of(method: &str, target: &str) -> Kind {
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let has = |name: &str| {
            query
                .split('&')
                .any(|kv| kv.split_once('=').map(|(k, _)| k).unwrap_or(kv) == name)
        };
        match method {
            "GET" if has("uploads") => Kind::ListUploads,
            "GET" if has("list-type") => Kind::ListObjects,
            "GET" if has("object-lock") || has("versioning") || has("versions") => Kind::Other,
            "GET" => Kind::Get,
            "HEAD" => Kind::Head,
            "PUT" if has("partNumber") && has("uploadId") => Kind::UploadPart,
            "PUT" => Kind::PutObject,
            "POST" if has("uploads") => Kind::CreateMultipart,
            "POST" if has("uploadId") => Kind::CompleteMultipart,
            "POST" if has("delete") => Kind::Delete,
            "DELETE" if has("uploadId") => Kind::AbortMultipart,
            "DELETE" => Kind::Delete,
            _ => Kind::Other,
        }
    }

    /// Requests that store something.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Kind::PutObject | Kind::CreateMultipart | Kind::UploadPart | Kind::CompleteMultipart
        )
    }
}

/// Which requests a fault applies to; the others are forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// PutObject and the multipart upload requests that store data.
    Writes,
    Only(Vec<Kind>),
}

impl Scope {
    fn covers(&self, k: Kind) -> bool {
        match self {
            Scope::All => true,
            Scope::Writes => k.is_write(),
            Scope::Only(v) => v.contains(&k),
        }
    }
}

/// What the proxy did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded(u16),
    Injected(u16),
    Reset,
    ResponseDropped,
    Hung,
}

#[derive(Debug, Clone)]
pub struct Record {
    /// Since the proxy started.
    pub at: Duration,
    pub kind: Kind,
    /// Shown in failure messages (through `Debug`).
    #[allow(dead_code)]
    pub method: String,
    #[allow(dead_code)]
    pub target: String,
    pub outcome: Outcome,
}

struct Shared {
    fault: Mutex<(Scope, Fault)>,
    /// Bumped on every change, so the accept loop notices `Refuse`.
    generation: watch::Sender<u64>,
    records: Mutex<Vec<Record>>,
    connections: AtomicU64,
    parts_forwarded: AtomicU64,
    started: Instant,
    upstream: SocketAddr,
}

impl Shared {
    fn fault_for(&self, k: Kind) -> Fault {
        let (scope, f) = self.fault.lock().unwrap().clone();
        if let Fault::CutMultipartAfter(n) = f {
            if self.parts_forwarded.load(Ordering::SeqCst) >= n as u64 {
                // The store died: from now on this is an outage.
                self.set(Scope::All, Fault::Refuse);
                return Fault::Refuse;
            }
            return Fault::Pass;
        }
        if scope.covers(k) {
            f
        } else {
            Fault::Pass
        }
    }

    fn set(&self, scope: Scope, f: Fault) {
        *self.fault.lock().unwrap() = (scope, f);
        self.generation.send_modify(|g| *g += 1);
    }

    fn refusing(&self) -> bool {
        let g = self.fault.lock().unwrap();
        g.1 == Fault::Refuse && g.0 == Scope::All
    }

    fn record(&self, method: &str, target: &str, kind: Kind, outcome: Outcome) {
        self.records.lock().unwrap().push(Record {
            at: self.started.elapsed(),
            kind,
            method: method.to_string(),
            target: target.to_string(),
            outcome,
        });
    }
}

/// The running proxy. Dropping it stops it (and resets its connections).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Start a proxy in front of `upstream`, passing everything.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let (gen_tx, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            fault: Mutex::new((Scope::All, Fault::Pass)),
            generation: gen_tx,
            records: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            parts_forwarded: AtomicU64::new(0),
            started: Instant::now(),
            upstream,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
                    addr_tx.send(l.local_addr().unwrap()).unwrap();
                    tokio::select! {
                        _ = accept_loop(l, sh) => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime here cancels every connection task.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawn proxy thread");
        let addr = addr_rx.recv().expect("proxy address");
        FaultProxy {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// A proxy in front of the endpoint of the `s3://…?endpoint=http://HOST:PORT…`
    /// URL `url`, and `url` rewritten to go through it.
    pub fn in_front_of(url: &str) -> (FaultProxy, String) {
        let (upstream, host) = endpoint_of(url);
        let p = FaultProxy::start(upstream);
        let proxied = url.replacen(&host, &p.addr.to_string(), 1);
        assert_ne!(proxied, url, "could not rewrite the endpoint of {url}");
        (p, proxied)
    }

    #[allow(dead_code)]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[allow(dead_code)]
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Apply `f` to every request from now on.
    pub fn set(&self, f: Fault) {
        self.set_scoped(Scope::All, f);
    }

    /// Apply `f` only to the requests `scope` covers; others pass.
    pub fn set_scoped(&self, scope: Scope, f: Fault) {
        if matches!(f, Fault::CutMultipartAfter(_)) {
            self.shared.parts_forwarded.store(0, Ordering::SeqCst);
        }
        self.shared.set(scope, f);
    }

    pub fn pass(&self) {
        self.set(Fault::Pass);
    }

    /// The fault in force (a `CutMultipartAfter` turns into `Refuse` once it fires).
    pub fn fault(&self) -> Fault {
        self.shared.fault.lock().unwrap().1.clone()
    }

    /// Every request seen so far.
    pub fn records(&self) -> Vec<Record> {
        self.shared.records.lock().unwrap().clone()
    }

    /// Time since the proxy started (the clock of [`Record::at`]).
    pub fn now(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// TCP connections accepted so far.
    #[allow(dead_code)]
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (address, "host:port" text) of the `endpoint=` of an s3:// URL.
fn endpoint_of(url: &str) -> (SocketAddr, String) {
    let q = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let ep = q
        .split('&')
        .find_map(|kv| kv.strip_prefix("endpoint="))
        .unwrap_or_else(|| panic!("{url} has no endpoint= parameter"));
    let hostport = ep
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("fault proxy needs a plain http:// endpoint, got {ep}"))
        .trim_end_matches('/');
    let addr: SocketAddr = hostport
        .parse()
        .unwrap_or_else(|e| panic!("endpoint {hostport} is not IP:PORT: {e}"));
    (addr, hostport.to_string())
}

async fn accept_loop(first: TcpListener, sh: Arc<Shared>) {
    let addr = first.local_addr().unwrap();
    let mut listener = Some(first);
    let mut gen = sh.generation.subscribe();
    loop {
        if sh.refusing() {
            // Closed listening socket: connection refused.
            listener = None;
            let _ = gen.changed().await;
            continue;
        }
        if listener.is_none() {
            match TcpListener::bind(addr).await {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let l = listener.as_ref().unwrap();
        tokio::select! {
            r = l.accept() => {
                if let Ok((s, _)) = r {
                    sh.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve(s, sh.clone()));
                }
            }
            _ = gen.changed() => {}
        }
    }
}

/// One side of a connection with a read buffer.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

struct Head {
    raw: Vec<u8>,
    /// Request: method, target. Response: status.
    first: Vec<String>,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn body_framing(&self) -> Framing {
        if self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked
        } else if let Some(n) = self.header("content-length") {
            Framing::Length(n.trim().parse().unwrap_or(0))
        } else {
            Framing::None
        }
    }
}

impl Conn {
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut tmp = [0u8; 64 * 1024];
        let n = self.s.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    /// Read up to and including the blank line; `None` on a clean EOF.
    async fn read_head(&mut self) -> std::io::Result<Option<Head>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..i + 4).collect();
                let text = String::from_utf8_lossy(&raw).into_owned();
                let mut lines = text.split("\r\n");
                let first = lines
                    .next()
                    .unwrap_or("")
                    .split(' ')
                    .map(str::to_string)
                    .collect();
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                return Ok(Some(Head {
                    raw,
                    first,
                    headers,
                }));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// Read one line (with its CRLF) into `out`.
    async fn read_line(&mut self, out: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                out.extend_from_slice(&line);
                return Ok(line);
            }
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Move up to `n` bytes of the stream to `out` (a connection or a sink).
    async fn copy_exact(&mut self, mut n: u64, out: &mut Sink<'_>) -> std::io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() && !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let k = (self.buf.len() as u64).min(n) as usize;
            let chunk: Vec<u8> = self.buf.drain(..k).collect();
            out.write(&chunk).await?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Move one whole body to `out`. With `limit`, stop after that many
    /// bytes and return `false` (the caller then resets the connection).
    async fn copy_body(
        &mut self,
        framing: Framing,
        out: &mut Sink<'_>,
        limit: Option<u64>,
    ) -> std::io::Result<bool> {
        match framing {
            Framing::None => Ok(true),
            Framing::Length(n) => match limit {
                Some(l) if l < n => {
                    self.copy_exact(l, out).await?;
                    Ok(false)
                }
                _ => {
                    self.copy_exact(n, out).await?;
                    Ok(true)
                }
            },
            Framing::Chunked => {
                let mut sent = 0u64;
                loop {
                    let mut line = Vec::new();
                    let l = self.read_line(&mut line).await?;
                    let size_text = String::from_utf8_lossy(&l);
                    let size = u64::from_str_radix(
                        size_text.trim().split(';').next().unwrap_or("0").trim(),
                        16,
                    )
                    .unwrap_or(0);
                    out.write(&line).await?;
                    if size == 0 {
                        // Trailers, then the final blank line.
                        loop {
                            let mut t = Vec::new();
                            let l = self.read_line(&mut t).await?;
                            out.write(&t).await?;
                            if l == b"\r\n" {
                                return Ok(true);
                            }
                        }
                    }
                    if let Some(lim) = limit {
                        if sent + size > lim {
                            self.copy_exact(lim - sent, out).await?;
                            return Ok(false);
                        }
                    }
                    self.copy_exact(size + 2, out).await?;
                    sent += size;
                }
            }
            Framing::UntilClose => {
                let mut sent = 0u64;
                loop {
                    if self.buf.is_empty() && !self.fill().await? {
                        return Ok(true);
                    }
                    let mut chunk: Vec<u8> = std::mem::take(&mut self.buf);
                    if let Some(lim) = limit {
                        if sent + chunk.len() as u64 > lim {
                            chunk.truncate((lim - sent) as usize);
                            out.write(&chunk).await?;
                            return Ok(false);
                        }
                    }
                    sent += chunk.len() as u64;
                    out.write(&chunk).await?;
                }
            }
        }
    }

    fn reset(self) {
        let _ = self.s.set_zero_linger();
        drop(self.s);
    }
}

/// Where a copied body goes.
enum Sink<'a> {
    To(&'a mut TcpStream),
    Discard,
}

impl Sink<'_> {
    async fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::To(s) => s.write_all(b).await,
            Sink::Discard => Ok(()),
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn error_reply(e: &S3Error, target: &str, head_request: bool, id: u64) -> Vec<u8> {
    let resource = target.split('?').next().unwrap_or("/");
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message><Resource>{}</Resource><RequestId>fault-proxy-{id}</RequestId></Error>",
        e.code, e.message, resource
    );
    let reason = match e.status {
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/xml\r\nx-amz-request-id: fault-proxy-{id}\r\nContent-Length: {}\r\n\r\n",
        e.status,
        if head_request { 0 } else { body.len() }
    )
    .into_bytes();
    if !head_request {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn response_framing(req_method: &str, h: &Head) -> Framing {
    let status: u16 = h.first.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    if req_method == "HEAD" || status / 100 == 1 || status == 204 || status == 304 {
        return Framing::None;
    }
    match h.body_framing() {
        Framing::None => Framing::UntilClose,
        f => f,
    }
}

/// Serve one client connection: one request at a time, each forwarded over
/// one upstream connection kept for the client connection's lifetime.
async fn serve(client: TcpStream, sh: Arc<Shared>) {
    let mut client = Conn {
        s: client,
        buf: Vec::new(),
    };
    let mut upstream: Option<Conn> = None;
    loop {
        let Ok(Some(req)) = client.read_head().await else {
            return;
        };
        let method = req.first.first().cloned().unwrap_or_default();
        let target = req.first.get(1).cloned().unwrap_or_default();
        let kind = Kind::of(&method, &target);
        let fault = sh.fault_for(kind);
        let framing = req.body_framing();
        match fault {
            Fault::Refuse | Fault::ResetOnRequest => {
                sh.record(&method, &target, kind, Outcome::Reset);
                client.reset();
                return;
            }
            Fault::Error(e) => {
                if client
                    .copy_body(framing, &mut Sink::Discard, None)
                    .await
                    .is_err()
                {
                    return;
                }
                let id = sh.records.lock().unwrap().len() as u64;
                sh.record(&method, &target, kind, Outcome::Injected(e.status));
                let reply = error_reply(&e, &target, method == "HEAD", id);
                if client.s.write_all(&reply).await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Hang => {
                let _ = client.copy_body(framing, &mut Sink::Discard, None).await;
                sh.record(&method, &target, kind, Outcome::Hung);
                // Until the client gives up.
                while let Ok(true) = client.fill().await {}
                return;
            }
            _ => {}
        }
        // Forward the request.
        if upstream.is_none() {
            match TcpStream::connect(sh.upstream).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    upstream = Some(Conn { s, buf: Vec::new() })
                }
                Err(_) => {
                    sh.record(&method, &target, kind, Outcome::Reset);
                    client.reset();
                    return;
                }
            }
        }
        let up = upstream.as_mut().unwrap();
        if up.s.write_all(&req.raw).await.is_err() {
            client.reset();
            return;
        }
        let expect_continue = req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        let mut early: Option<Head> = None;
        if expect_continue {
            // The server answers 100 (send the body) or a final status.
            let Ok(Some(h)) = up.read_head().await else {
                client.reset();
                return;
            };
            if h.first.get(1).map(String::as_str) == Some("100") {
                if client.s.write_all(&h.raw).await.is_err() {
                    return;
                }
            } else {
                early = Some(h);
            }
        }
        if early.is_none() {
            let limit = match &fault {
                Fault::ResetAfterBytes(n) => Some(*n),
                _ => None,
            };
            match client
                .copy_body(framing, &mut Sink::To(&mut up.s), limit)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // Cut mid-body: both sides see the connection die.
                    sh.record(&method, &target, kind, Outcome::Reset);
                    upstream.take().unwrap().reset();
                    client.reset();
                    return;
                }
                Err(_) => return,
            }
            if kind == Kind::UploadPart {
                sh.parts_forwarded.fetch_add(1, Ordering::SeqCst);
            }
        }
        let up = upstream.as_mut().unwrap();
        let resp = match early {
            Some(h) => h,
            None => match up.read_head().await {
                Ok(Some(h)) => h,
                _ => {
                    client.reset();
                    return;
                }
            },
        };
        let status: u16 = resp.first.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let rframing = response_framing(&method, &resp);
        let upstream_closes = resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || matches!(rframing, Framing::UntilClose);
        if fault == Fault::DropResponse {
            let _ = up.copy_body(rframing, &mut Sink::Discard, None).await;
            sh.record(&method, &target, kind, Outcome::ResponseDropped);
            client.reset();
            return;
        }
        if let Fault::Delay(d) = fault {
            tokio::time::sleep(d).await;
        }
        if client.s.write_all(&resp.raw).await.is_err() {
            return;
        }
        if up
            .copy_body(rframing, &mut Sink::To(&mut client.s), None)
            .await
            .is_err()
        {
            client.reset();
            return;
        }
        sh.record(&method, &target, kind, Outcome::Forwarded(status));
        if upstream_closes {
            // The client sees the same close the server made.
            return;
        }
    }
}

#[test]
fn kinds_of_s3_requests() {
    assert_eq!(
        Kind::of("GET", "/b?list-type=2&prefix=x"),
        Kind::ListObjects
    );
    assert_eq!(Kind::of("GET", "/b?uploads&prefix=x"), Kind::ListUploads);
    assert_eq!(
        Kind::of("PUT", "/b/k?partNumber=2&uploadId=u"),
        Kind::UploadPart
    );
    assert_eq!(Kind::of("POST", "/b/k?uploads"), Kind::CreateMultipart);
    assert_eq!(Kind::of("POST", "/b/k?uploadId=u"), Kind::CompleteMultipart);
    assert_eq!(Kind::of("DELETE", "/b/k?uploadId=u"), Kind::AbortMultipart);
    assert_eq!(Kind::of("PUT", "/b/k?x-id=PutObject"), Kind::PutObject);
    assert!(Kind::PutObject.is_write() && !Kind::Get.is_write());
    let (a, h) = endpoint_of("s3://b/p?endpoint=http://127.0.0.1:39000&region=garage");
    assert_eq!((a.port(), h.as_str()), (39000, "127.0.0.1:39000"));
}
