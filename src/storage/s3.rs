//! S3-compatible backend (AWS S3, Garage, s3s, MinIO-likes, ...).
//!
//! Credentials come from the standard AWS chain (environment, profiles, web
//! identity, ...), never from the replica URL. With a custom endpoint the
//! SDK's default CRC trailers and response validation are switched to
//! "when required", which self-hosted servers need (Garage rejects streaming
//! trailer checksums). Large bodies go up as multipart uploads streamed part
//! by part from the file, so memory stays bounded.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use super::url::S3Config;
use super::{check_key, Body, ObjectMeta, Result, Storage, StorageError};

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

#[derive(Clone)]
pub struct S3Storage {
    client: Client,
    cfg: S3Config,
    /// The endpoint actually used (URL parameter, else AWS_ENDPOINT_URL[_S3] /
    /// profile), for messages; `None` = AWS.
    endpoint: Option<String>,
    region: String,
    multipart_threshold: u64,
    part_size: u64,
    list_page_size: i32,
}

/// Hand-written so no client internals (which hold credentials providers)
/// ever end up in logs.
impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("bucket", &self.cfg.bucket)
            .field("prefix", &self.cfg.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.cfg.force_path_style)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("list_page_size", &self.list_page_size)
            .finish()
    }
}

impl S3Storage {
    pub async fn new(cfg: S3Config) -> anyhow::Result<Self> {
        if cfg.bucket.is_empty() {
            anyhow::bail!("S3 bucket name is empty");
        }
        let region_chain = RegionProviderChain::first_try(cfg.region.clone().map(Region::new))
            .or_default_provider()
            .or_else(Region::new("us-east-1"));
        let retry = RetryConfig::standard()
            .with_max_attempts(MAX_ATTEMPTS)
            .with_initial_backoff(Duration::from_millis(200))
            .with_max_backoff(Duration::from_secs(5));
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(region_chain)
            .retry_config(retry.clone())
            .load()
            .await;
        let region = sdk
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".to_string());

        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL_S3"))
            .or_else(|| sdk.endpoint_url().map(str::to_string));

        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.force_path_style)
            .retry_config(retry);
        if let Some(e) = &cfg.endpoint {
            b = b.endpoint_url(e);
        }
        if endpoint.is_some() {
            // Self-hosted servers commonly reject the SDK's default
            // streaming CRC trailers (Garage: "Invalid payload signature").
            b = b
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        let client = Client::from_conf(b.build());
        Ok(Self {
            client,
            cfg,
            endpoint,
            region,
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
            list_page_size: DEFAULT_LIST_PAGE_SIZE,
        })
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
            Some(e) => e.clone(),
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
                let detail = chain(&err);
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

    fn stream_err(&self, op: &str, key: &str, e: impl std::error::Error) -> StorageError {
        StorageError::Unavailable(format!(
            "S3 {op} of {key:?} in bucket {:?}: reading the response body from {} failed: {}",
            self.cfg.bucket,
            self.endpoint_desc(),
            chain(&e)
        ))
    }

    async fn put_single(&self, key: &str, full: &str, body: Body) -> Result<()> {
        let stream = match &body {
            Body::Bytes(b) => ByteStream::from(b.clone()),
            Body::File(p) => ByteStream::read_from()
                .path(p)
                .build()
                .await
                .map_err(|e| source_err(p, e))?,
        };
        self.client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(full)
            .body(stream)
            .send()
            .await
            .map_err(|e| self.map_err("PutObject", key, e))?;
        Ok(())
    }

    async fn put_multipart(&self, key: &str, full: &str, body: Body, len: u64) -> Result<()> {
        let part_size = self.part_size.max(len.div_ceil(MAX_PARTS));
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.map_err("CreateMultipartUpload", key, e))?;
        let upload_id = created.upload_id().ok_or_else(|| {
            StorageError::Other(format!(
                "S3 CreateMultipartUpload of {key:?}: {} returned no upload id",
                self.endpoint_desc()
            ))
        })?;
        let mut guard = AbortGuard {
            client: self.client.clone(),
            bucket: self.cfg.bucket.clone(),
            key: full.to_string(),
            upload_id: upload_id.to_string(),
            armed: true,
        };

        let result = self
            .upload_parts(key, full, upload_id, &body, len, part_size)
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
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.map_err("CompleteMultipartUpload", key, e)),
            Err(e) => Err(e),
        };
        guard.armed = false;
        if result.is_err() {
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.cfg.bucket)
                .key(full)
                .upload_id(upload_id)
                .send()
                .await
            {
                tracing::warn!("could not abort multipart upload of {key:?}: {}", chain(&e));
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        body: &Body,
        len: u64,
        part_size: u64,
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
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.cfg.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(part_number)
                    .content_length(this_len as i64)
                    .body(stream)
                    .send()
                    .await
                    .map_err(|e| self.map_err(&format!("UploadPart {part_number}"), key, e))?;
                let etag = out.e_tag().ok_or_else(|| {
                    StorageError::Other(format!(
                        "S3 UploadPart {part_number} of {key:?}: {} returned no ETag",
                        self.endpoint_desc()
                    ))
                })?;
                Ok::<_, StorageError>(
                    CompletedPart::builder()
                        .part_number(part_number)
                        .e_tag(etag)
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
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
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
    bucket: String,
    key: String,
    upload_id: String,
    armed: bool,
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
                .upload_id(&self.upload_id);
            handle.spawn(async move {
                let _ = req.send().await;
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
        let full = self.full_key(key)?;
        let len = match &body {
            Body::Bytes(b) => b.len() as u64,
            Body::File(p) => tokio::fs::metadata(p)
                .await
                .map_err(|e| {
                    StorageError::Other(format!("reading upload source {}: {e}", p.display()))
                })?
                .len(),
        };
        if len >= self.multipart_threshold && len > 0 {
            self.put_multipart(key, &full, body, len).await
        } else {
            self.put_single(key, &full, body).await
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
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
        let full = self.full_key(key)?;
        let mut out = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.map_err("GetObject", key, e))?;
        let expected = out.content_length().map(|l| l as u64);
        let file_err =
            |e: std::io::Error| StorageError::Other(format!("writing {}: {e}", path.display()));
        let mut file = tokio::fs::File::create(path).await.map_err(file_err)?;
        let copied: Result<u64> = async {
            let mut written = 0u64;
            while let Some(chunk) = out
                .body
                .try_next()
                .await
                .map_err(|e| self.stream_err("GetObject", key, e))?
            {
                file.write_all(&chunk).await.map_err(file_err)?;
                written += chunk.len() as u64;
            }
            file.flush().await.map_err(file_err)?;
            if let Some(exp) = expected {
                if exp != written {
                    return Err(StorageError::Unavailable(format!(
                        "S3 GetObject of {key:?} from {}: body ended after {written} of {exp} bytes",
                        self.endpoint_desc()
                    )));
                }
            }
            Ok(written)
        }
        .await;
        if copied.is_err() {
            // Do not leave a truncated object behind.
            drop(file);
            let _ = tokio::fs::remove_file(path).await;
        }
        copied
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
        match self
            .client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(&full)
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
