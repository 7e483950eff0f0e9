//! S3-compatible backend (AWS S3, Garage, s3s, MinIO-likes, ...).
//!
//! Credentials come from the standard AWS chain (environment, profiles, web
//! identity, ...), never from the replica URL. With a custom endpoint the
//! SDK's default CRC trailers and response validation are switched to
//! "when required", which self-hosted servers need (Garage rejects streaming
//! trailer checksums). Large bodies go up as multipart uploads streamed part
//! by part from the file, so memory stays bounded.
//!
//! Object Lock: `put_locked` sends the lock mode and retain-until date (and,
//! as S3 requires with Object Lock, a CRC32 checksum, on those requests
//! only), after checking once that the bucket really has Object Lock
//! enabled: Garage accepts lock headers and silently ignores them. A bucket
//! is "enabled" only if GetObjectLockConfiguration says so; servers that do
//! not implement it (501, s3s) or have no configuration count as not
//! enabled. `delete` on a versioned bucket (Object Lock implies versioning)
//! deletes every version of the key by version id, because a plain
//! DeleteObject there only adds a delete marker and keeps the data; a
//! version the server refuses to delete because of its retention or legal
//! hold yields `StorageError::Locked`. Whether the bucket is versioned is
//! probed once (GetBucketVersioning) on the first delete and cached, so on a
//! plain bucket every later delete is still a single request.
//!
//! Every HTTP request (including retries) is counted by an SDK interceptor;
//! see `counting`.
//!
//! Faults (docs/FAULTS.md): every request attempt has a deadline (the SDK
//! sets none but a connect timeout, so a server that never answers would
//! stall the caller forever), failed attempts are retried with backoff, and
//! a multipart upload that fails is aborted; if the abort fails too (the
//! store went away mid-upload) it is retried before the next upload, and
//! `abort_abandoned_uploads` removes what a killed process left behind.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime, Length};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ObjectLockEnabled,
    ObjectLockLegalHoldStatus, ObjectLockMode, ObjectLockRetention, ObjectLockRetentionMode,
};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use super::counting::classify_s3_request;
use super::s3_client::{self, S3Clients, SharedClient};
use super::url::S3Config;
use super::{
    check_key, Body, BucketObjectLock, LockMode, ObjectLock, ObjectMeta, RequestCounter,
    RequestCounts, Result, Storage, StorageError,
};

/// `get_to_file` downloads in ranges of this size, [`RANGES_AT_ONCE`] at a time.
const RANGE_BYTES: u64 = 16 << 20;
const RANGES_AT_ONCE: usize = 4;

/// The object's size from a `Content-Range: bytes a-b/size` header.
fn range_total(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes ")?
        .rsplit_once('/')?
        .1
        .parse()
        .ok()
}

#[cfg(test)]
#[test]
fn content_range_gives_the_size() {
    assert_eq!(range_total("bytes 0-16777215/419430400"), Some(419430400));
    assert_eq!(range_total("bytes 0-9/10"), Some(10));
    assert_eq!(range_total("bytes 0-9/*"), None);
    assert_eq!(range_total("0-9/10"), None);
}

/// Bodies at least this large are uploaded as multipart uploads.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
/// Part size of multipart uploads (S3's minimum is 5 MiB, except the last part).
pub const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;
/// S3 limits a multipart upload to this many parts.
const MAX_PARTS: u64 = 10_000;
/// Parts uploaded concurrently. Parts are streamed from the file, so this
/// does not multiply memory use.
const PART_CONCURRENCY: usize = 4;
const MAX_ATTEMPTS: u32 = 5;
const DEFAULT_LIST_PAGE_SIZE: i32 = 1000;
/// A request attempt without a body to send gets this long for its response
/// (headers; a streamed GET body is guarded by the SDK's stalled-stream
/// protection instead). Without it a server that accepts a request and never
/// answers would stall replication forever: the SDK has no read timeout by
/// default, only a connect timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Uploads get REQUEST_TIMEOUT plus their body at this rate (a slow uplink
/// must still be able to send an 8 MiB part: 94 s for one).
const SLOWEST_UPLOAD_BYTES_PER_SEC: u64 = 128 * 1024;

fn timeouts(attempt: Duration) -> aws_sdk_s3::config::timeout::TimeoutConfig {
    aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(attempt)
        .build()
}

/// Per-request settings for an upload of `len` bytes.
fn upload_config(len: u64) -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default().timeout_config(timeouts(
        REQUEST_TIMEOUT + Duration::from_secs(len / SLOWEST_UPLOAD_BYTES_PER_SEC),
    ))
}

#[derive(Clone)]
pub struct S3Storage {
    /// `shared.client`, possibly used by other stores too (see `s3_client`).
    client: Client,
    shared: Arc<SharedClient>,
    cfg: S3Config,
    /// The endpoint actually used (URL parameter, else AWS_ENDPOINT_URL[_S3] /
    /// profile), for messages; `None` = AWS.
    endpoint: Option<String>,
    region: String,
    multipart_threshold: u64,
    part_size: u64,
    list_page_size: i32,
    /// Every HTTP request this store sent, by class (shared with the
    /// counting interceptor on each of its requests).
    counter: Arc<RequestCounter>,
    /// The bucket's Object Lock status, probed once.
    lock_status: Arc<tokio::sync::OnceCell<Option<BucketObjectLock>>>,
    /// Multipart uploads of this process: in flight, and those whose abort
    /// failed (the store went away mid-upload), retried before the next put.
    uploads: Arc<Uploads>,
}

#[derive(Debug, Default)]
struct Uploads {
    /// Upload ids created by this process and not finished yet.
    in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
    /// (full key, upload id) whose AbortMultipartUpload failed.
    to_abort: std::sync::Mutex<Vec<(String, String)>>,
}

/// Counts every HTTP request the SDK transmits (each retry attempt too).
#[derive(Debug, Clone)]
struct CountingInterceptor {
    counter: Arc<RequestCounter>,
}

impl Intercept for CountingInterceptor {
    fn name(&self) -> &'static str {
        "offsite::CountingInterceptor"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let req = context.request();
        self.counter
            .record(classify_s3_request(req.method(), req.uri()));
        Ok(())
    }
}

/// Hand-written so no client internals (which hold credentials providers)
/// ever end up in logs.
impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("bucket", &self.cfg.bucket)
            .field("prefix", &self.cfg.prefix)
            .field("endpoint", &self.endpoint.as_deref().map(super::redact))
            .field("region", &self.region)
            .field("force_path_style", &self.cfg.force_path_style)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("list_page_size", &self.list_page_size)
            .finish()
    }
}

impl S3Storage {
    /// A store with an SDK client of its own (commands that open one replica).
    pub async fn new(cfg: S3Config) -> anyhow::Result<Self> {
        check_bucket(&cfg)?;
        let shared = s3_client::own_client(&cfg, MAX_ATTEMPTS, timeouts(REQUEST_TIMEOUT)).await;
        Ok(Self::with_client(cfg, shared))
    }

    /// A store that uses `clients`' client for its endpoint, region and
    /// addressing style (the daemon: one client for every replica), while
    /// counting its own requests.
    pub async fn shared(cfg: S3Config, clients: &S3Clients) -> anyhow::Result<Self> {
        check_bucket(&cfg)?;
        let shared = clients
            .get(&cfg, MAX_ATTEMPTS, timeouts(REQUEST_TIMEOUT))
            .await;
        Ok(Self::with_client(cfg, shared))
    }

    fn with_client(cfg: S3Config, shared: Arc<SharedClient>) -> Self {
        Self {
            client: shared.client.clone(),
            endpoint: shared.endpoint.clone(),
            region: shared.region.clone(),
            shared,
            cfg,
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
            list_page_size: DEFAULT_LIST_PAGE_SIZE,
            counter: Arc::default(),
            lock_status: Arc::default(),
            uploads: Arc::default(),
        }
    }

    /// Whether both stores send their requests through the same SDK client.
    pub fn shares_client_with(&self, other: &S3Storage) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The interceptor that counts this store's requests; added to every
    /// request, since the client itself may be shared by other stores.
    fn counting(&self) -> CountingInterceptor {
        CountingInterceptor {
            counter: self.counter.clone(),
        }
    }

    /// Bodies of at least `threshold` bytes are sent as multipart uploads
    /// with parts of `part_size` bytes (S3 requires at least 5 MiB).
    pub fn with_multipart(mut self, threshold: u64, part_size: u64) -> Self {
        self.multipart_threshold = threshold.max(1);
        self.part_size = part_size.max(1);
        self
    }

    /// Objects per ListObjectsV2 page (S3 caps this at 1000). Small values
    /// exercise pagination in tests.
    pub fn with_list_page_size(mut self, n: u32) -> Self {
        self.list_page_size = n.clamp(1, 1000) as i32;
        self
    }

    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    fn full_key(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(if self.cfg.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.cfg.prefix, key)
        })
    }

    /// The bucket-level prefix that every full key starts with.
    fn root_prefix(&self) -> String {
        if self.cfg.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.cfg.prefix)
        }
    }

    fn endpoint_desc(&self) -> String {
        match &self.endpoint {
            // AWS_ENDPOINT_URL may hold `user:password@`.
            Some(e) => super::redact(e),
            None => format!("AWS S3 (region {})", self.region),
        }
    }

    /// Turn an SDK error into a `StorageError` whose message says what was
    /// attempted, where, and what to check.
    fn map_err<E>(&self, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let what = if key.is_empty() {
            format!("S3 {op} in bucket {:?}", self.cfg.bucket)
        } else {
            format!("S3 {op} of {key:?} in bucket {:?}", self.cfg.bucket)
        };
        let endpoint = self.endpoint_desc();
        let unavailable = |detail: String| {
            StorageError::Unavailable(format!(
                "{what} failed after {MAX_ATTEMPTS} attempts: {detail}. Check that the endpoint \
                 {endpoint} is correct, the server is running and reachable from this machine \
                 (network, firewall, proxy, TLS), and not overloaded"
            ))
        };
        tracing::debug!("{what} failed: {}", DisplayErrorContext(&err));
        match &err {
            SdkError::ServiceError(ctx) => {
                let status = ctx.raw().status().as_u16();
                let code = ctx.err().code().unwrap_or("");
                let detail = match (code, ctx.err().message()) {
                    ("", _) => format!("HTTP {status} with no error code"),
                    (c, Some(m)) if !m.is_empty() => format!("{c}: {m}"),
                    (c, _) => c.to_string(),
                };
                if code == "NoSuchBucket" {
                    return StorageError::Other(format!(
                        "{what}: bucket {:?} does not exist at {endpoint}. Create it, or fix the \
                         bucket name in the replica URL",
                        self.cfg.bucket
                    ));
                }
                if code == "NoSuchKey" || code == "NotFound" || status == 404 {
                    return StorageError::NotFound {
                        key: key.to_string(),
                    };
                }
                if status == 403 || code == "AccessDenied" {
                    return StorageError::Other(format!(
                        "{what}: access denied by {endpoint} (HTTP {status}). Check the \
                         credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web \
                         identity), that their key has read/write access to bucket {:?}, the \
                         bucket policy, and the region. Details: {detail}",
                        self.cfg.bucket
                    ));
                }
                if status >= 500
                    || status == 429
                    || matches!(
                        code,
                        "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout"
                    )
                {
                    return unavailable(format!("server answered HTTP {status}: {detail}"));
                }
                let hint = if code == "AuthorizationHeaderMalformed"
                    || code == "InvalidRegion"
                    || code == "PermanentRedirect"
                {
                    format!(
                        ". The region is probably wrong (using {:?}); set region= in the replica \
                         URL or AWS_REGION",
                        self.region
                    )
                } else if code == "InvalidAccessKeyId" || code == "SignatureDoesNotMatch" {
                    ". Check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the AWS profile)"
                        .to_string()
                } else {
                    String::new()
                };
                StorageError::Other(format!(
                    "{what} at {endpoint} failed with HTTP {status}: {detail}{hint}"
                ))
            }
            SdkError::TimeoutError(_) => unavailable(format!("timed out ({})", chain(&err))),
            SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => unavailable(format!(
                "could not connect or the connection broke ({})",
                chain(&err)
            )),
            SdkError::ResponseError(_) => {
                unavailable(format!("the response could not be read ({})", chain(&err)))
            }
            _ => {
                let mut detail = chain(&err);
                if let Some(i) = detail.find("no credentials found in chain") {
                    // The SDK lists every provider it tried on many lines;
                    // the hint below says what to set.
                    detail = format!(
                        "{}no credentials found (tried the environment, profiles, web identity, ECS and EC2 instance metadata)",
                        &detail[..i]
                    );
                }
                let hint = if detail.to_ascii_lowercase().contains("credential") {
                    ". No usable AWS credentials were found: set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or configure web identity"
                } else {
                    ""
                };
                StorageError::Other(format!("{what} at {endpoint} failed: {detail}{hint}"))
            }
        }
    }

    /// `get_to_file`: the object in ranges of [`RANGE_BYTES`], up to
    /// [`RANGES_AT_ONCE`] at a time, each written at its offset. One stream
    /// from one server is slower than several (about 2× on Garage here; AWS
    /// advises ranged GETs for big objects). The first range's answer gives
    /// the size and the ETag; every other range must carry the same ETag (the
    /// object did not change meanwhile). A server that ignores Range sends
    /// the whole object in the first answer, which is then taken as is.
    async fn get_ranges_to_file(&self, key: &str, path: &Path) -> Result<u64> {
        let full = self.full_key(key)?;
        let file_err =
            |e: std::io::Error| StorageError::Other(format!("writing {}: {e}", path.display()));
        let res = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .range(format!("bytes=0-{}", RANGE_BYTES - 1))
            .customize()
            .interceptor(self.counting())
            .send()
            .await;
        let first = match res {
            Ok(out) => out,
            // An empty object has no byte 0.
            Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 416 => {
                tokio::fs::File::create(path).await.map_err(file_err)?;
                return Ok(0);
            }
            Err(e) => return Err(self.map_err("GetObject", key, e)),
        };
        tokio::fs::File::create(path).await.map_err(file_err)?;
        let total = match first.content_range() {
            Some(v) => range_total(v).ok_or_else(|| {
                StorageError::Other(format!(
                    "S3 GetObject of {key:?} from {}: no object size in Content-Range {v:?}",
                    self.endpoint_desc()
                ))
            })?,
            None => {
                // The whole object (the server ignored Range).
                let expect = first.content_length().map(|l| l as u64);
                return self.body_to_file(key, first.body, path, 0, expect).await;
            }
        };
        let etag = first.e_tag().map(str::to_string);
        let first_len = total.min(RANGE_BYTES);
        // Ranges are started as others finish (never a list of them all: the
        // size is the server's word), at most RANGES_AT_ONCE at a time.
        let mut running = futures::stream::FuturesUnordered::new();
        running.push(
            self.body_to_file(key, first.body, path, 0, Some(first_len))
                .boxed(),
        );
        let (mut next, mut written) = (first_len, 0u64);
        loop {
            while running.len() < RANGES_AT_ONCE && next < total {
                let end = next.saturating_add(RANGE_BYTES).min(total) - 1;
                running.push(
                    self.range_to_file(key, &full, etag.as_deref(), path, next, end)
                        .boxed(),
                );
                next = end + 1;
            }
            match running.next().await {
                Some(r) => written += r?,
                None => break,
            }
        }
        Ok(written)
    }

    /// Bytes `start..=end` of the object `full` into `path` at `start`; the
    /// object must still carry `etag`.
    async fn range_to_file(
        &self,
        key: &str,
        full: &str,
        etag: Option<&str>,
        path: &Path,
        start: u64,
        end: u64,
    ) -> Result<u64> {
        let out = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(full)
            .range(format!("bytes={start}-{end}"))
            .customize()
            .interceptor(self.counting())
            .send()
            .await
            .map_err(|e| self.map_err("GetObject (range)", key, e))?;
        if out.e_tag() != etag {
            return Err(StorageError::Unavailable(format!(
                "S3 GetObject of {key:?} from {}: the object changed during the download (ETag {etag:?}, then {:?})",
                self.endpoint_desc(),
                out.e_tag()
            )));
        }
        self.body_to_file(key, out.body, path, start, Some(end + 1 - start))
            .await
    }

    /// Write `body` into `path` at `offset`; it must be `expect` bytes.
    async fn body_to_file(
        &self,
        key: &str,
        mut body: ByteStream,
        path: &Path,
        offset: u64,
        expect: Option<u64>,
    ) -> Result<u64> {
        use tokio::io::AsyncSeekExt;
        let file_err =
            |e: std::io::Error| StorageError::Other(format!("writing {}: {e}", path.display()));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .map_err(file_err)?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(file_err)?;
        let mut written = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| self.stream_err("GetObject", key, e))?
        {
            written += chunk.len() as u64;
            if expect.is_some_and(|e| written > e) {
                break;
            }
            file.write_all(&chunk).await.map_err(file_err)?;
        }
        file.flush().await.map_err(file_err)?;
        if let Some(exp) = expect {
            if exp != written {
                return Err(StorageError::Unavailable(format!(
                    "S3 GetObject of {key:?} from {}: body at offset {offset} was {written} bytes, expected {exp}",
                    self.endpoint_desc()
                )));
            }
        }
        Ok(written)
    }

    fn stream_err(&self, op: &str, key: &str, e: impl std::error::Error) -> StorageError {
        StorageError::Unavailable(format!(
            "S3 {op} of {key:?} in bucket {:?}: reading the response body from {} failed: {}",
            self.cfg.bucket,
            self.endpoint_desc(),
            chain(&e)
        ))
    }

    async fn put_single(
        &self,
        key: &str,
        full: &str,
        body: Body,
        lock: Option<ObjectLock>,
    ) -> Result<()> {
        let len = Self::body_len(&body).await?;
        let stream = match &body {
            Body::Bytes(b) => ByteStream::from(b.clone()),
            Body::File(p) => ByteStream::read_from()
                .path(p)
                .build()
                .await
                .map_err(|e| source_err(p, e))?,
        };
        let mut req = self
            .client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(full)
            .body(stream);
        if let Some(lock) = lock {
            // S3 requires Content-MD5 or an SDK checksum with Object Lock.
            req = req
                .object_lock_mode(sdk_mode(lock.mode))
                .object_lock_retain_until_date(datetime_from_us(lock.retain_until_us))
                .checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        req.customize()
            .config_override(upload_config(len))
            .interceptor(self.counting())
            .send()
            .await
            .map_err(|e| self.map_err("PutObject", key, e))?;
        Ok(())
    }

    /// AbortMultipartUpload; on failure the upload is remembered and the
    /// abort retried before the next put (a store that died mid-upload
    /// cannot take the abort either).
    async fn abort_upload(&self, key: &str, full: &str, upload_id: &str) {
        let r = self
            .client
            .abort_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(full)
            .upload_id(upload_id)
            .customize()
            .interceptor(self.counting())
            .send()
            .await;
        self.uploads.in_flight.lock().unwrap().remove(upload_id);
        match r {
            Ok(_) => {}
            // Already gone (completed or aborted): nothing left behind.
            Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 404 => {}
            Err(e) => {
                tracing::warn!(
                    "could not abort multipart upload of {key:?}: {}; will retry before the next upload",
                    chain(&e)
                );
                self.uploads
                    .to_abort
                    .lock()
                    .unwrap()
                    .push((full.to_string(), upload_id.to_string()));
            }
        }
    }

    /// Retry the aborts that failed earlier (no request when there are none).
    async fn retry_failed_aborts(&self) {
        let pending: Vec<(String, String)> =
            std::mem::take(&mut *self.uploads.to_abort.lock().unwrap());
        let mut it = pending.into_iter();
        while let Some((full, id)) = it.next() {
            let key = full
                .strip_prefix(&self.root_prefix())
                .unwrap_or(&full)
                .to_string();
            let before = self.uploads.to_abort.lock().unwrap().len();
            self.abort_upload(&key, &full, &id).await;
            let mut left = self.uploads.to_abort.lock().unwrap();
            if left.len() > before {
                // Still unreachable: keep the rest for later, untried.
                left.extend(it);
                break;
            }
        }
    }

    /// Multipart uploads under the replica's `lineages/` that are not in
    /// flight in this process: (full key, upload id).
    async fn stray_uploads(&self) -> Result<Vec<(String, String)>> {
        let prefix = format!("{}lineages/", self.root_prefix());
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.cfg.bucket)
                .prefix(&prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .customize()
                .interceptor(self.counting())
                .send()
                .await
                .map_err(|e| self.map_err("ListMultipartUploads", "", e))?;
            let mine = self.uploads.in_flight.lock().unwrap().clone();
            for u in page.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    if k.starts_with(&prefix) && !mine.contains(id) {
                        out.push((k.to_string(), id.to_string()));
                    }
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    async fn put_multipart(
        &self,
        key: &str,
        full: &str,
        body: Body,
        len: u64,
        lock: Option<ObjectLock>,
    ) -> Result<()> {
        let part_size = self.part_size.max(len.div_ceil(MAX_PARTS));
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(full);
        if let Some(lock) = lock {
            create = create
                .object_lock_mode(sdk_mode(lock.mode))
                .object_lock_retain_until_date(datetime_from_us(lock.retain_until_us))
                .checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        let created = create
            .customize()
            .interceptor(self.counting())
            .send()
            .await
            .map_err(|e| self.map_err("CreateMultipartUpload", key, e))?;
        let upload_id = created.upload_id().ok_or_else(|| {
            StorageError::Other(format!(
                "S3 CreateMultipartUpload of {key:?}: {} returned no upload id",
                self.endpoint_desc()
            ))
        })?;
        self.uploads
            .in_flight
            .lock()
            .unwrap()
            .insert(upload_id.to_string());
        let mut guard = AbortGuard {
            client: self.client.clone(),
            counting: self.counting(),
            bucket: self.cfg.bucket.clone(),
            key: full.to_string(),
            upload_id: upload_id.to_string(),
            armed: true,
            uploads: self.uploads.clone(),
        };

        let result = self
            .upload_parts(key, full, upload_id, &body, len, part_size, lock.is_some())
            .await;
        let result = match result {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.cfg.bucket)
                .key(full)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .customize()
                .interceptor(self.counting())
                .send()
                .await
                .map(|out| out.version_id().map(str::to_string))
                .map_err(|e| self.map_err("CompleteMultipartUpload", key, e)),
            Err(e) => Err(e),
        };
        guard.armed = false;
        let result = match (result, lock) {
            // Set the retention on the completed version explicitly too: some
            // servers (moto) ignore lock headers on CreateMultipartUpload.
            // On AWS this repeats the same retention and changes nothing.
            (Ok(version), Some(lock)) => self
                .client
                .put_object_retention()
                .bucket(&self.cfg.bucket)
                .key(full)
                .set_version_id(version)
                .retention(
                    ObjectLockRetention::builder()
                        .mode(match lock.mode {
                            LockMode::Governance => ObjectLockRetentionMode::Governance,
                            LockMode::Compliance => ObjectLockRetentionMode::Compliance,
                        })
                        .retain_until_date(datetime_from_us(lock.retain_until_us))
                        .build(),
                )
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .customize()
                .interceptor(self.counting())
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.map_err("PutObjectRetention", key, e)),
            (r, _) => r.map(|_| ()),
        };
        if result.is_err() {
            self.abort_upload(key, full, upload_id).await;
        } else {
            self.uploads.in_flight.lock().unwrap().remove(upload_id);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        body: &Body,
        len: u64,
        part_size: u64,
        with_checksum: bool,
    ) -> Result<Vec<CompletedPart>> {
        let n_parts = len.div_ceil(part_size).max(1);
        let uploads = (0..n_parts).map(|i| {
            let offset = i * part_size;
            let this_len = part_size.min(len - offset);
            let part_number = (i + 1) as i32;
            async move {
                let stream = match body {
                    Body::Bytes(b) => {
                        ByteStream::from(b.slice(offset as usize..(offset + this_len) as usize))
                    }
                    Body::File(p) => ByteStream::read_from()
                        .path(p)
                        .offset(offset)
                        .length(Length::Exact(this_len))
                        .build()
                        .await
                        .map_err(|e| source_err(p, e))?,
                };
                let mut req = self
                    .client
                    .upload_part()
                    .bucket(&self.cfg.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(part_number)
                    .content_length(this_len as i64)
                    .body(stream);
                if with_checksum {
                    req = req.checksum_algorithm(ChecksumAlgorithm::Crc32);
                }
                let out = req
                    .customize()
                    .config_override(upload_config(this_len))
                    .interceptor(self.counting())
                    .send()
                    .await
                    .map_err(|e| self.map_err(&format!("UploadPart {part_number}"), key, e))?;
                let etag = out.e_tag().ok_or_else(|| {
                    StorageError::Other(format!(
                        "S3 UploadPart {part_number} of {key:?}: {} returned no ETag",
                        self.endpoint_desc()
                    ))
                })?;
                // An upload created with a checksum algorithm must list
                // each part's checksum on completion.
                Ok::<_, StorageError>(
                    CompletedPart::builder()
                        .part_number(part_number)
                        .e_tag(etag)
                        .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                        .build(),
                )
            }
        });
        let mut parts: Vec<CompletedPart> = futures::stream::iter(uploads)
            .buffer_unordered(PART_CONCURRENCY)
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    async fn body_len(body: &Body) -> Result<u64> {
        match body {
            Body::Bytes(b) => Ok(b.len() as u64),
            Body::File(p) => Ok(tokio::fs::metadata(p)
                .await
                .map_err(|e| {
                    StorageError::Other(format!("reading upload source {}: {e}", p.display()))
                })?
                .len()),
        }
    }

    async fn put_with(&self, key: &str, body: Body, lock: Option<ObjectLock>) -> Result<()> {
        let full = self.full_key(key)?;
        self.retry_failed_aborts().await;
        let len = Self::body_len(&body).await?;
        if len >= self.multipart_threshold && len > 0 {
            self.put_multipart(key, &full, body, len, lock).await
        } else {
            self.put_single(key, &full, body, lock).await
        }
    }

    /// GetObjectLockConfiguration. Anything that does not positively say
    /// "enabled" is `None`: no configuration, a server that does not
    /// implement the API (501 NotImplemented, s3s), or one that answers with
    /// something that is not a lock configuration.
    async fn probe_object_lock(&self) -> Result<Option<BucketObjectLock>> {
        let res = self
            .client
            .get_object_lock_configuration()
            .bucket(&self.cfg.bucket)
            .customize()
            .interceptor(self.counting())
            .send()
            .await;
        let out = match res {
            Ok(out) => out,
            Err(e) => {
                if let SdkError::ServiceError(ctx) = &e {
                    let status = ctx.raw().status().as_u16();
                    let code = ctx.err().code().unwrap_or("");
                    let not_configured = code == "ObjectLockConfigurationNotFoundError"
                        || code == "NotImplemented"
                        || status == 501
                        || (status == 404 && code != "NoSuchBucket")
                        || (status == 400 && code != "AuthorizationHeaderMalformed");
                    if not_configured {
                        tracing::debug!(
                            "{}: no object lock (GetObjectLockConfiguration: HTTP {status} {code})",
                            self.cfg
                        );
                        return Ok(None);
                    }
                }
                return Err(self.map_err("GetObjectLockConfiguration", "", e));
            }
        };
        let Some(cfg) = out.object_lock_configuration() else {
            return Ok(None);
        };
        if cfg.object_lock_enabled() != Some(&ObjectLockEnabled::Enabled) {
            return Ok(None);
        }
        let default_mode = cfg
            .rule()
            .and_then(|r| r.default_retention())
            .and_then(|d| d.mode())
            .and_then(|m| match m {
                ObjectLockRetentionMode::Governance => Some(LockMode::Governance),
                ObjectLockRetentionMode::Compliance => Some(LockMode::Compliance),
                _ => None,
            });
        Ok(Some(BucketObjectLock { default_mode }))
    }

    /// Whether deletes must remove versions by id: only on buckets with
    /// Object Lock (which implies versioning). A versioned bucket without
    /// Object Lock keeps plain deletes (a delete marker): its owner chose
    /// versioning as a safety net, and lifecycle rules expire old versions.
    async fn deletes_versions(&self) -> Result<bool> {
        Ok(self.object_lock_status().await?.is_some())
    }

    /// Every version and delete marker of exactly `full`: (version id, is delete marker).
    async fn list_versions(&self, key: &str, full: &str) -> Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut version_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.cfg.bucket)
                .prefix(full)
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .customize()
                .interceptor(self.counting())
                .send()
                .await
                .map_err(|e| self.map_err("ListObjectVersions", key, e))?;
            let mut past = false;
            for v in page.versions() {
                match v.key() {
                    Some(k) if k == full => {
                        out.push((v.version_id().unwrap_or("null").to_string(), false))
                    }
                    Some(k) if k > full => past = true,
                    _ => {}
                }
            }
            for m in page.delete_markers() {
                match m.key() {
                    Some(k) if k == full => {
                        out.push((m.version_id().unwrap_or("null").to_string(), true))
                    }
                    Some(k) if k > full => past = true,
                    _ => {}
                }
            }
            if past || page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            version_marker = page.next_version_id_marker().map(str::to_string);
            if key_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Delete every version of `full` by version id. Data versions go first;
    /// delete markers only once no data version is left, so an object that a
    /// lock keeps does not reappear from under someone else's delete marker.
    async fn delete_versions(&self, key: &str, full: &str) -> Result<()> {
        let versions = self.list_versions(key, full).await?;
        let mut locked = false;
        for (vid, _) in versions.iter().filter(|(_, marker)| !marker) {
            match self.delete_version(key, full, vid).await {
                Ok(()) => {}
                Err(StorageError::Locked { .. }) => locked = true,
                Err(e) => return Err(e),
            }
        }
        if locked {
            return Err(StorageError::Locked {
                key: key.to_string(),
            });
        }
        for (vid, _) in versions.iter().filter(|(_, marker)| *marker) {
            self.delete_version(key, full, vid).await?;
        }
        Ok(())
    }

    async fn delete_version(&self, key: &str, full: &str, vid: &str) -> Result<()> {
        let res = self
            .client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(full)
            .version_id(vid)
            .customize()
            .interceptor(self.counting())
            .send()
            .await;
        let e = match res {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if let SdkError::ServiceError(ctx) = &e {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().unwrap_or("");
            if status == 403 || code == "AccessDenied" {
                let msg = ctx.err().message().unwrap_or("").to_ascii_lowercase();
                if msg.contains("lock") || msg.contains("retention") || msg.contains("legal hold") {
                    return Err(StorageError::Locked {
                        key: key.to_string(),
                    });
                }
                // Some servers (moto) just say "Access Denied": find out
                // whether the version is protected, or the key lacks rights.
                if self.version_is_protected(full, vid).await {
                    return Err(StorageError::Locked {
                        key: key.to_string(),
                    });
                }
            }
        }
        match self.map_err("DeleteObject (version)", key, e) {
            StorageError::NotFound { .. } => Ok(()),
            other => Err(other),
        }
    }

    /// Does this version have an unexpired retention or a legal hold?
    /// (HeadObject reports both to callers allowed to read them.)
    async fn version_is_protected(&self, full: &str, vid: &str) -> bool {
        match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(full)
            .version_id(vid)
            .customize()
            .interceptor(self.counting())
            .send()
            .await
        {
            Ok(out) => {
                out.object_lock_legal_hold_status() == Some(&ObjectLockLegalHoldStatus::On)
                    || out
                        .object_lock_retain_until_date()
                        // The server enforces the lock by its own clock, which
                        // an injected test clock is not: compare with real time.
                        .is_some_and(|until| datetime_to_us(until) > crate::clock::system_now_us())
            }
            Err(_) => false,
        }
    }

    async fn delete_plain(&self, key: &str, full: &str) -> Result<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(full)
            .customize()
            .interceptor(self.counting())
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.map_err("DeleteObject", key, e) {
                StorageError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

fn sdk_mode(m: LockMode) -> ObjectLockMode {
    match m {
        LockMode::Governance => ObjectLockMode::Governance,
        LockMode::Compliance => ObjectLockMode::Compliance,
    }
}

fn datetime_from_us(us: i64) -> DateTime {
    DateTime::from_secs_and_nanos(
        us.div_euclid(1_000_000),
        (us.rem_euclid(1_000_000) * 1000) as u32,
    )
}

fn datetime_to_us(dt: &DateTime) -> i64 {
    dt.secs()
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(dt.subsec_nanos() / 1000))
}

fn check_bucket(cfg: &S3Config) -> anyhow::Result<()> {
    if cfg.bucket.is_empty() {
        anyhow::bail!("S3 bucket name is empty");
    }
    Ok(())
}

fn source_err(p: &Path, e: impl std::error::Error) -> StorageError {
    StorageError::Other(format!(
        "reading upload source {}: {}",
        p.display(),
        chain(&e)
    ))
}

/// An error and all its causes, `a: b: c`. (`DisplayErrorContext` prints the
/// same chain followed by a `Debug` dump of the raw HTTP response; that dump
/// only goes to the debug log.)
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = c.source();
    }
    out
}

/// Aborts a multipart upload if the upload future is dropped midway, so no
/// orphaned parts keep using storage.
struct AbortGuard {
    client: Client,
    counting: CountingInterceptor,
    bucket: String,
    key: String,
    upload_id: String,
    armed: bool,
    uploads: Arc<Uploads>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let req = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .customize()
                .interceptor(self.counting.clone());
            let uploads = self.uploads.clone();
            let (key, id) = (self.key.clone(), self.upload_id.clone());
            handle.spawn(async move {
                uploads.in_flight.lock().unwrap().remove(&id);
                if req.send().await.is_err() {
                    uploads.to_abort.lock().unwrap().push((key, id));
                }
            });
        }
    }
}

#[async_trait]
impl Storage for S3Storage {
    fn describe(&self) -> String {
        self.cfg.to_string()
    }

    async fn put(&self, key: &str, body: Body) -> Result<()> {
        self.put_with(key, body, None).await
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, String)>> {
        let full = self.full_key(key)?;
        let out = match self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .customize()
            .interceptor(self.counting())
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                return match self.map_err("GetObject", key, e) {
                    StorageError::NotFound { .. } => Ok(None),
                    e => Err(e),
                }
            }
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| self.stream_err("GetObject", key, e))?;
        Ok(Some((data.into_bytes(), etag)))
    }

    async fn put_conditional(&self, key: &str, body: Bytes, expect: Option<&str>) -> Result<()> {
        let full = self.full_key(key)?;
        let req = self
            .client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .body(ByteStream::from(body));
        let req = match expect {
            None => req.if_none_match("*"),
            Some(tag) => req.if_match(tag),
        };
        match req.customize().interceptor(self.counting()).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                if let SdkError::ServiceError(ctx) = &e {
                    // 412 Precondition Failed; 409 for a concurrent
                    // conditional write (AWS ConditionalRequestConflict).
                    if matches!(ctx.raw().status().as_u16(), 412 | 409) {
                        return Err(StorageError::AlreadyExists {
                            key: key.to_string(),
                        });
                    }
                }
                Err(self.map_err("PutObject", key, e))
            }
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .customize()
            .interceptor(self.counting())
            .send()
            .await
            .map_err(|e| self.map_err("GetObject", key, e))?;
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| self.stream_err("GetObject", key, e))?;
        Ok(data.into_bytes())
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes> {
        let full = self.full_key(key)?;
        if len == 0 {
            // Still report a missing object as missing.
            return match self.head(key).await? {
                Some(_) => Ok(Bytes::new()),
                None => Err(StorageError::NotFound {
                    key: key.to_string(),
                }),
            };
        }
        let end = start.saturating_add(len - 1);
        let res = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .range(format!("bytes={start}-{end}"))
            .customize()
            .interceptor(self.counting())
            .send()
            .await;
        let out = match res {
            Ok(out) => out,
            // Range starts at or past the end of the object.
            Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 416 => {
                return Ok(Bytes::new())
            }
            Err(e) => return Err(self.map_err("GetObject (range)", key, e)),
        };
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| self.stream_err("GetObject (range)", key, e))?
            .into_bytes();
        // A server that ignores Range would send the whole object.
        if data.len() as u64 > len {
            return Err(StorageError::Other(format!(
                "S3 GetObject (range) of {key:?}: {} returned {} bytes for a {len}-byte range; \
                 the server does not seem to support Range requests",
                self.endpoint_desc(),
                data.len()
            )));
        }
        Ok(data)
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64> {
        let res = self.get_ranges_to_file(key, path).await;
        if res.is_err() {
            // Do not leave a truncated object behind.
            let _ = tokio::fs::remove_file(path).await;
        }
        res
    }

    // HeadObject responses have no body, so a missing bucket (404) looks
    // like a missing object here; list/get/put report it properly.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .customize()
            .interceptor(self.counting())
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
            })),
            Err(e) => match self.map_err("HeadObject", key, e) {
                StorageError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let root = self.root_prefix();
        let full_prefix = format!("{root}{prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.cfg.bucket)
                .prefix(&full_prefix)
                .max_keys(self.list_page_size)
                .set_continuation_token(token.take())
                .customize()
                .interceptor(self.counting())
                .send()
                .await
                .map_err(|e| self.map_err("ListObjectsV2", prefix, e))?;
            for obj in page.contents() {
                let Some(k) = obj.key() else { continue };
                let Some(rel) = k.strip_prefix(&root) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: rel.to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) && !t.is_empty() => {
                    token = Some(t.to_string())
                }
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.dedup_by(|a, b| a.key == b.key);
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key)?;
        if self.deletes_versions().await? {
            self.delete_versions(key, &full).await
        } else {
            self.delete_plain(key, &full).await
        }
    }

    async fn put_locked(&self, key: &str, body: Body, lock: ObjectLock) -> Result<()> {
        self.full_key(key)?;
        if self.object_lock_status().await?.is_none() {
            return Err(StorageError::Other(format!(
                "cannot store {key:?} with object lock: bucket {:?} at {} does not have S3 \
                 Object Lock enabled (or the server does not implement it; Garage and s3s do \
                 not). Create the bucket with Object Lock enabled",
                self.cfg.bucket,
                self.endpoint_desc()
            )));
        }
        self.put_with(key, body, Some(lock)).await
    }

    async fn object_lock_status(&self) -> Result<Option<BucketObjectLock>> {
        self.lock_status
            .get_or_try_init(|| self.probe_object_lock())
            .await
            .copied()
    }

    async fn retention(&self, key: &str) -> Result<Option<i64>> {
        let full = self.full_key(key)?;
        // Without Object Lock on the bucket nothing has a retention, whatever
        // headers a server echoes back.
        let enabled = self.object_lock_status().await?.is_some();
        // HeadObject carries the retention (x-amz-object-lock-retain-until-date)
        // for callers allowed s3:GetObjectRetention, so one request answers
        // both "is it there" and "until when"; moto does not implement
        // GetObjectRetention at all (it answers with the object).
        match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .customize()
            .interceptor(self.counting())
            .send()
            .await
        {
            Ok(out) if enabled => Ok(out.object_lock_retain_until_date().map(datetime_to_us)),
            Ok(_) => Ok(None),
            Err(e) => Err(self.map_err("HeadObject (retention)", key, e)),
        }
    }

    fn request_counts(&self) -> RequestCounts {
        self.counter.snapshot()
    }

    async fn abort_abandoned_uploads(&self) -> Result<usize> {
        self.retry_failed_aborts().await;
        let stray = self.stray_uploads().await?;
        let n = stray.len();
        for (full, id) in stray {
            let key = full
                .strip_prefix(&self.root_prefix())
                .unwrap_or(&full)
                .to_string();
            tracing::info!(key, upload_id = %id, "aborting a multipart upload left behind by an earlier run");
            self.abort_upload(&key, &full, &id).await;
        }
        Ok(n)
    }
}
