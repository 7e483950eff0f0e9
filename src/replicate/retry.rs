//! Storage requests: retries while the store is unavailable, the upload
//! backoff, and puts (with or without Object Lock).

use std::time::{Duration, Instant};

use crate::storage::{Body, DynStorage, ObjectLock, StorageError};

pub(super) async fn put_object(
    store: &DynStorage,
    key: &str,
    body: Body,
    lock: Option<ObjectLock>,
) -> Result<(), StorageError> {
    match lock {
        Some(l) => store.put_locked(key, body, l).await,
        None => store.put(key, body).await,
    }
}

/// Requests made to the store since the process started, by kind.
pub(super) fn requests_json(store: &dyn crate::storage::Storage) -> String {
    serde_json::to_string(&store.request_counts()).unwrap_or_default()
}

/// How long to wait before the next upload after `failures` failed ones in
/// a row: 1, 2, 4 … 30 s, so after a long outage the next attempt is never
/// more than 30 s away.
pub(super) fn upload_backoff(failures: u32) -> Duration {
    Duration::from_millis((500 * 2u64.pow(failures.min(6))).min(30_000))
}

pub(super) fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StorageError>(),
            Some(StorageError::Unavailable(_))
        )
    })
}

/// Retry an operation on a store that is unavailable (connection refused,
/// 5xx, throttling) with backoff for up to ~1 minute; other errors fail at once.
pub(super) async fn with_retries<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T, StorageError>>,
{
    let mut wait = Duration::from_millis(250);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(StorageError::Unavailable(m)) if Instant::now() < deadline => {
                tracing::warn!(error = %m, retry_in = ?wait, "cannot {what}; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot {what}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_backoff_doubles_from_one_second_to_a_30_second_cap() {
        let secs: Vec<u64> = (1..=8).map(|f| upload_backoff(f).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(upload_backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn only_an_unavailable_store_is_retried() {
        let e = anyhow::Error::new(StorageError::Unavailable("503".into())).context("cannot put");
        assert!(is_unavailable(&e));
        assert!(!is_unavailable(&anyhow::anyhow!("disk full")));
    }

    #[tokio::test]
    async fn with_retries_fails_at_once_on_other_errors() {
        let mut calls = 0;
        let r: anyhow::Result<()> = with_retries("get x", || {
            calls += 1;
            async { Err(StorageError::NotFound { key: "x".into() }) }
        })
        .await;
        assert_eq!(calls, 1);
        assert!(format!("{:#}", r.unwrap_err()).contains("cannot get x"));
    }
}
