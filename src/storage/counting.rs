//! Request counting, for cost accounting.
//!
//! Design: counting lives inside the backends, not in a wrapper. Each
//! backend owns an `Arc<RequestCounter>` and [`Storage::request_counts`]
//! returns a snapshot of it, so counts are exact for what the backend really
//! sends:
//!
//! * **S3** counts every HTTP request the SDK transmits, including retried
//!   attempts, with an SDK interceptor (`S3RequestCounter` in `s3.rs`) that
//!   classifies each request by method and query string. A multipart upload
//!   therefore counts CreateMultipartUpload + one per part +
//!   CompleteMultipartUpload as `put`; a `list` that pages counts one `list`
//!   per ListObjectsV2 page. The classes follow S3 pricing:
//!   - `put`: PUT and POST (PutObject, UploadPart, Create/CompleteMultipartUpload)
//!   - `get`: GET of an object (GetObject, ranged or not)
//!   - `list`: ListObjectsV2 and ListObjectVersions pages
//!   - `head`: HeadObject (also what `retention` sends: HEAD carries the
//!     object's retain-until date)
//!   - `delete`: DeleteObject (with or without a version id), DeleteObjects
//!   - `other`: bucket-configuration probes (GetObjectLockConfiguration,
//!     GetBucketVersioning) and AbortMultipartUpload
//! * **file://** counts each operation as if it were one request of its class
//!   (`put`, `get` for get/get_range/get_to_file, `head` for head/retention,
//!   `list`, `delete`).
//!
//! A wrapper around `dyn Storage` could only count calls, not pages, parts
//! or retries, which is why there is none.

use std::ops::{Add, AddAssign, Sub};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Request counts by class. `Sub` saturates, so `after - before` is the
/// traffic of the work in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub put: u64,
    pub get: u64,
    pub list: u64,
    pub delete: u64,
    pub head: u64,
    pub other: u64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.put + self.get + self.list + self.delete + self.head + self.other
    }
}

impl Add for RequestCounts {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            put: self.put + o.put,
            get: self.get + o.get,
            list: self.list + o.list,
            delete: self.delete + o.delete,
            head: self.head + o.head,
            other: self.other + o.other,
        }
    }
}

impl AddAssign for RequestCounts {
    fn add_assign(&mut self, o: Self) {
        *self = *self + o;
    }
}

impl Sub for RequestCounts {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            put: self.put.saturating_sub(o.put),
            get: self.get.saturating_sub(o.get),
            list: self.list.saturating_sub(o.list),
            delete: self.delete.saturating_sub(o.delete),
            head: self.head.saturating_sub(o.head),
            other: self.other.saturating_sub(o.other),
        }
    }
}

/// Class of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Put,
    Get,
    List,
    Delete,
    Head,
    Other,
}

/// Thread-safe counters, shared (`Arc`) between a backend and its helpers.
#[derive(Debug, Default)]
pub struct RequestCounter {
    put: AtomicU64,
    get: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    head: AtomicU64,
    other: AtomicU64,
}

impl RequestCounter {
    pub fn record(&self, kind: RequestKind) {
        let c = match kind {
            RequestKind::Put => &self.put,
            RequestKind::Get => &self.get,
            RequestKind::List => &self.list,
            RequestKind::Delete => &self.delete,
            RequestKind::Head => &self.head,
            RequestKind::Other => &self.other,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RequestCounts {
        RequestCounts {
            put: self.put.load(Ordering::Relaxed),
            get: self.get.load(Ordering::Relaxed),
            list: self.list.load(Ordering::Relaxed),
            delete: self.delete.load(Ordering::Relaxed),
            head: self.head.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }
}

/// Classify an S3 REST request by HTTP method, path and query string.
/// `path` is the URI path (path-style: `/bucket/key...`, virtual-hosted:
/// `/key...`); only whether a query parameter is present matters.
pub fn classify_s3_request(method: &str, uri: &str) -> RequestKind {
    let query = uri.split_once('?').map(|(_, q)| q).unwrap_or("");
    let has = |name: &str| {
        query
            .split('&')
            .any(|kv| kv.split_once('=').map(|(k, _)| k).unwrap_or(kv) == name)
    };
    match method.to_ascii_uppercase().as_str() {
        "HEAD" => RequestKind::Head,
        "GET" => {
            if has("list-type") || has("versions") || has("uploads") {
                RequestKind::List
            } else if has("object-lock") || has("versioning") || has("location") {
                RequestKind::Other
            } else {
                RequestKind::Get
            }
        }
        "PUT" => RequestKind::Put,
        "POST" if has("delete") => RequestKind::Delete,
        "POST" => RequestKind::Put,
        "DELETE" if has("uploadId") => RequestKind::Other,
        "DELETE" => RequestKind::Delete,
        _ => RequestKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_and_subtract() {
        let c = RequestCounter::default();
        let before = c.snapshot();
        c.record(RequestKind::Put);
        c.record(RequestKind::Put);
        c.record(RequestKind::List);
        let d = c.snapshot() - before;
        assert_eq!(
            d,
            RequestCounts {
                put: 2,
                list: 1,
                ..Default::default()
            }
        );
        assert_eq!((d + d).put, 4);
        assert_eq!((before - d).put, 0, "subtraction saturates");
        assert_eq!(d.total(), 3);
    }

    #[test]
    fn classifies_s3_requests() {
        use RequestKind::*;
        let cases = [
            ("PUT", "/b/k", Put),
            ("PUT", "/b/k?partNumber=1&uploadId=x", Put),
            ("POST", "/b/k?uploads", Put),
            ("POST", "/b/k?uploadId=x", Put),
            ("POST", "/b?delete", Delete),
            ("GET", "/b/k", Get),
            ("GET", "/b/k?retention", Get),
            ("GET", "/b?list-type=2&prefix=p", List),
            ("GET", "/b?versions&prefix=k", List),
            ("GET", "/b?object-lock", Other),
            ("GET", "/b?versioning", Other),
            ("HEAD", "/b/k", Head),
            ("DELETE", "/b/k", Delete),
            ("DELETE", "/b/k?versionId=3", Delete),
            ("DELETE", "/b/k?uploadId=x", Other),
        ];
        for (m, u, want) in cases {
            assert_eq!(classify_s3_request(m, u), want, "{m} {u}");
        }
    }
}
