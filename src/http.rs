//! The daemon's HTTP listener (`listen = "127.0.0.1:9090"`): Prometheus
//! metrics, liveness, readiness, and `POST /sync` for `offsite sync --wait`.
//! It only reads the status registry (and asks replicators to sync).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{FromRef, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::FutureExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};

use crate::status::{Registry, ReplicaState, ReplicaStatus};

/// At most this many `POST /sync?wait=1` requests wait at once (each holds
/// a connection, so a descriptor); more are answered 503 with Retry-After.
pub const MAX_WAITING_SYNCS: usize = 64;

/// The longest a sync request may wait (`timeout`), and the default.
pub const MAX_SYNC_WAIT: Duration = Duration::from_secs(3600);
const DEFAULT_SYNC_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    /// Permits for waiting sync requests (`max_waiting` of them).
    waiting: Arc<Semaphore>,
    max_waiting: usize,
}

impl AppState {
    fn new(registry: Arc<Registry>, max_waiting: usize) -> AppState {
        AppState {
            registry,
            waiting: Arc::new(Semaphore::new(max_waiting)),
            max_waiting,
        }
    }
}

impl FromRef<AppState> for Arc<Registry> {
    fn from_ref(s: &AppState) -> Arc<Registry> {
        s.registry.clone()
    }
}

/// Bind `addr` and serve until `shutdown` turns true.
pub async fn serve(
    addr: &str,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is another offsite or program using that port? set another with --listen)")
    })?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, "HTTP listener: /metrics /healthz /readyz POST /sync");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/sync", post(sync))
        .with_state(AppState::new(registry, MAX_WAITING_SYNCS));
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    }))
}

async fn metrics(State(reg): State<Arc<Registry>>) -> Response {
    let mut r = prometheus_client::registry::Registry::default();
    r.register_collector(Box::new(Metrics(reg)));
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &r) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(reg): State<Arc<Registry>>) -> Response {
    let bad = reg.not_ready();
    if bad.is_empty() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let mut body = String::from("not ready\n");
    for (s, why) in bad {
        body.push_str(&format!("{} → {}: {why}\n", s.db, s.replica));
    }
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

#[derive(Deserialize)]
struct SyncQuery {
    db: String,
    /// The name the user typed, when it was a bare name (tried when no
    /// database has the path `db`).
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    wait: Option<String>,
    /// Seconds to wait at most (default 60, at most 3600). A string, so a
    /// bad value gets this module's answer rather than a generic one.
    #[serde(default)]
    timeout: Option<String>,
}

/// The `timeout` of a sync request: a finite number of seconds from 0 to
/// [`MAX_SYNC_WAIT`].
fn sync_timeout(v: Option<&str>) -> Result<Duration, String> {
    let Some(v) = v else {
        return Ok(DEFAULT_SYNC_WAIT);
    };
    let max = MAX_SYNC_WAIT.as_secs();
    let secs: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("timeout must be a number of seconds from 0 to {max}"))?;
    if !secs.is_finite() || !(0.0..=max as f64).contains(&secs) {
        return Err(format!(
            "timeout must be a number of seconds from 0 to {max} (finite, not negative)"
        ));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("timeout must be a number of seconds from 0 to {max}"))
}

fn plain(code: StatusCode, body: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn sync(State(st): State<AppState>, Query(q): Query<SyncQuery>) -> Response {
    let limit = match sync_timeout(q.timeout.as_deref()) {
        Ok(d) => d,
        Err(why) => return plain(StatusCode::BAD_REQUEST, why + "\n"),
    };
    let mut replicas = st.registry.for_db(&q.db);
    if replicas.is_empty() {
        if let Some(n) = &q.name {
            replicas = st.registry.for_db(n);
        }
    }
    if replicas.is_empty() {
        // Nothing about which databases are replicated: the listener may be
        // reachable by more than the operator.
        return plain(
            StatusCode::NOT_FOUND,
            "that database is not replicated by this offsite (give the path the daemon was configured with)\n"
                .into(),
        );
    }
    let wait = matches!(q.wait.as_deref(), Some("" | "1" | "true" | "yes"));
    // A waiting request holds a permit until it is answered.
    let _permit = if wait {
        match st.waiting.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [
                        (header::RETRY_AFTER, "5"),
                        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                    ],
                    format!(
                        "too many sync requests are waiting (at most {}); try again later\n",
                        st.max_waiting
                    ),
                )
                    .into_response()
            }
        }
    } else {
        None
    };
    let requests: Vec<(Arc<ReplicaStatus>, u64)> = replicas
        .into_iter()
        .map(|s| {
            let n = s.request_sync();
            (s, n)
        })
        .collect();
    if wait {
        let all = futures::future::join_all(requests.iter().map(|(s, n)| s.wait_synced(*n)));
        let outcome = tokio::select! {
            r = tokio::time::timeout(limit, all) => r.is_ok(),
            // Nothing more becomes durable once the replicators stopped (a
            // shutdown, whose last ship satisfies the requests it can): answer
            // now rather than hold the connection, and the daemon's
            // shutdown, until the timeout.
            _ = all_stopped(&requests) => {
                let now = requests.iter().map(|(s, n)| s.wait_synced(*n));
                futures::future::join_all(now).now_or_never().is_some()
            }
        };
        let stopped: Vec<String> = requests
            .iter()
            .filter(|(s, _)| s.state() == ReplicaState::Stopped)
            .map(|(s, _)| s.replica.clone())
            .collect();
        if !outcome && !stopped.is_empty() {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not durable: replica(s) {} stopped (offsite is shutting down, or the replicator failed)\n",
                    stopped.join(", ")
                ),
            );
        }
        if !outcome {
            let late: Vec<String> = requests
                .iter()
                .filter(|(s, _)| s.pending_since_us.load(Relaxed) != 0 || !s.running.load(Relaxed))
                .map(|(s, _)| s.replica.clone())
                .collect();
            return plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "not durable after {limit:?}: replica(s) {} still shipping or unreachable\n",
                    late.join(", ")
                ),
            );
        }
    }
    let body = serde_json::json!({
        "db": q.db,
        "durable": wait,
        "replicas": requests.iter().map(|(s, _)| serde_json::json!({
            "name": s.replica,
            "txid": s.shipped_txid.load(Relaxed),
        })).collect::<Vec<_>>(),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string() + "\n",
    )
        .into_response()
}

/// Resolves once every replica of a request has stopped.
async fn all_stopped(requests: &[(Arc<ReplicaStatus>, u64)]) {
    while !requests
        .iter()
        .all(|(s, _)| s.state() == ReplicaState::Stopped)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Renders the registry at scrape time.
struct Metrics(Arc<Registry>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

type Get = fn(&ReplicaStatus, i64) -> f64;

/// Gauges per database and replica.
const GAUGES: &[(&str, &str, Get)] = &[
    (
        "offsite_replication_lag_seconds",
        "Age of the oldest commit not yet durable in the replica (0 when caught up)",
        |s, now| s.lag_seconds(now),
    ),
    (
        "offsite_shipped_txid",
        "Newest transaction id durable in the replica",
        |s, _| s.shipped_txid.load(Relaxed) as f64,
    ),
    (
        "offsite_last_upload_timestamp_seconds",
        "Unix time of the last successful upload (0: none yet)",
        |s, _| s.last_upload_us.load(Relaxed) as f64 / 1e6,
    ),
    (
        "offsite_wal_size_bytes",
        "Size of the database's WAL file",
        |s, _| s.wal_bytes.load(Relaxed) as f64,
    ),
    (
        "offsite_unshipped_bytes",
        "Bytes of committed WAL frames not yet shipped, as the last look at the WAL found them (frames × page size)",
        |s, _| s.unshipped_bytes.load(Relaxed) as f64,
    ),
    (
        "offsite_write_rate_bytes",
        "Bytes of commits the database wrote per second, over the last 10 s window",
        |s, _| s.write_rate_bps.load(Relaxed) as f64,
    ),
    (
        "offsite_ship_rate_bytes",
        "Bytes of commits shipped per second, over the last 10 s window",
        |s, _| s.ship_rate_bps.load(Relaxed) as f64,
    ),
    (
        "offsite_shipping_behind",
        "1 while the backlog of unshipped commits has grown for 20 s or more with uploads succeeding: the writer outruns the shipper (max-wal-size will end the lineage)",
        |s, _| s.shipping_behind.load(Relaxed) as u8 as f64,
    ),
    (
        "offsite_replica_up",
        "1 when the replica was reached and shipping runs, else 0",
        |s, _| {
            let stopped = s.failed.lock().unwrap().is_some();
            (s.running.load(Relaxed) && !stopped) as u8 as f64
        },
    ),
    (
        "offsite_ready",
        "1 when the replica is within its allowed lag (what /readyz checks)",
        |s, now| s.not_ready(now).is_none() as u8 as f64,
    ),
    (
        "offsite_verified_restore_point_timestamp_seconds",
        "Commit time of the newest point a restore drill restored and checked (0: none)",
        |s, _| s.verified_time_us.load(Relaxed) as f64 / 1e6,
    ),
    (
        "offsite_verified_txid",
        "Newest transaction id a restore drill restored and checked (0: none)",
        |s, _| s.verified_txid.load(Relaxed) as f64,
    ),
    (
        "offsite_last_drill_timestamp_seconds",
        "Unix time of the newest restore drill (0: none)",
        |s, _| s.drill_ran_us.load(Relaxed) as f64 / 1e6,
    ),
    (
        "offsite_pg_lag_bytes",
        "PostgreSQL: WAL received and not yet durable in the replica",
        |s, _| s.pg_lag_bytes.load(Relaxed) as f64,
    ),
    (
        "offsite_pg_slot_lag_bytes",
        "PostgreSQL: WAL the replication slot keeps on the primary (its end of WAL minus what offsite reported flushed); alert well below max_slot_wal_keep_size",
        |s, _| s.pg_slot_lag_bytes.load(Relaxed) as f64,
    ),
    (
        "offsite_pg_last_base_backup_timestamp_seconds",
        "PostgreSQL: Unix time the newest complete base backup ended (0: none)",
        |s, _| s.pg_last_base_backup_us.load(Relaxed) as f64 / 1e6,
    ),
];

type Count = fn(&ReplicaStatus) -> u64;

/// Counters per database and replica (exposed with a `_total` suffix).
const COUNTERS: &[(&str, &str, Count)] = &[
    (
        "offsite_shipped_raw_bytes",
        "Bytes of pages shipped, before compression",
        |s| s.raw_bytes.load(Relaxed),
    ),
    (
        "offsite_shipped_stored_bytes",
        "Bytes uploaded (compressed and encrypted)",
        |s| s.stored_bytes.load(Relaxed),
    ),
    ("offsite_segments_shipped", "Segments uploaded", |s| {
        s.segments.load(Relaxed)
    }),
    (
        "offsite_upload_errors",
        "Failed uploads and failed attempts to reach the replica",
        |s| s.upload_errors.load(Relaxed),
    ),
    ("offsite_checkpoints", "WAL checkpoints offsite ran", |s| {
        s.checkpoints.load(Relaxed)
    }),
    (
        "offsite_polls",
        "Looks at the database for new commits (every poll interval while written, backing off to the sync interval while idle)",
        |s| s.polls.load(Relaxed),
    ),
    ("offsite_snapshots", "Snapshots uploaded", |s| {
        s.snapshots.load(Relaxed)
    }),
    (
        "offsite_lineage_breaks",
        "Times continuity was lost and a new lineage started",
        |s| s.lineage_breaks.load(Relaxed),
    ),
    (
        "offsite_refused_objects",
        "Objects read back from the replica that did not prove out (unsigned, foreign or forged): alert on any",
        |s| s.refused_objects.load(Relaxed),
    ),
    (
        "offsite_wal_overflows",
        "Times the WAL outgrew max-wal-size while the replica was unreachable and was released (continuity lost, a new snapshot follows)",
        |s| s.wal_overflows.load(Relaxed),
    ),
    (
        "offsite_drill_failures",
        "Restore drills that failed",
        |s| s.drill_failures.load(Relaxed),
    ),
];

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let entries = self.0.entries();
        let now = self.0.clock.now_us();
        let labels = |s: &ReplicaStatus| [("db", s.db.clone()), ("replica", s.replica.clone())];
        for (name, help, f) in GAUGES {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for e in &entries {
                let l = labels(&e.status);
                ConstGauge::new(f(&e.status, now)).encode(m.encode_family(&l)?)?;
            }
        }
        for (name, help, f) in COUNTERS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for e in &entries {
                let l = labels(&e.status);
                ConstCounter::new(f(&e.status)).encode(m.encode_family(&l)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "offsite_replica_state",
            "What the replicator is doing: 1 for its current state, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for e in &entries {
            for (state, v) in e.status.state_series() {
                let l = [
                    ("db", e.status.db.clone()),
                    ("replica", e.status.replica.clone()),
                    ("state", state.to_string()),
                ];
                ConstGauge::new(v).encode(m.encode_family(&l)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "offsite_requests",
            "Requests made to the replica's store, by kind",
            None,
            MetricType::Counter,
        )?;
        for e in &entries {
            let c = e.store.request_counts();
            for (kind, n) in [
                ("put", c.put),
                ("get", c.get),
                ("list", c.list),
                ("delete", c.delete),
                ("head", c.head),
                ("other", c.other),
            ] {
                let l = [
                    ("db", e.status.db.clone()),
                    ("replica", e.status.replica.clone()),
                    ("kind", kind.to_string()),
                ];
                ConstCounter::new(n).encode(m.encode_family(&l)?)?;
            }
        }
        let dbs: std::collections::BTreeSet<&str> =
            entries.iter().map(|e| e.status.db.as_str()).collect();
        let m = enc.encode_descriptor(
            "offsite_databases",
            "Databases being replicated",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(dbs.len() as i64).encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ReplicaState;

    #[test]
    fn the_replica_state_is_exported_one_series_per_state() {
        let dir = tempfile::tempdir().unwrap();
        let store: crate::storage::DynStorage =
            Arc::new(crate::storage::file::FileStorage::new(dir.path().to_path_buf()).unwrap());
        let reg = Registry::new(crate::clock::Clock::system());
        let st = Arc::new(ReplicaStatus::new(
            "/d.db",
            "r",
            "file:///x",
            Duration::from_secs(10),
            0,
        ));
        st.set_state(ReplicaState::Fenced);
        reg.register(st, store);
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(Metrics(reg)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("offsite_replica_state{"))
            .collect();
        assert_eq!(lines.len(), ReplicaState::ALL.len(), "{out}");
        assert!(
            lines.contains(&r#"offsite_replica_state{db="/d.db",replica="r",state="fenced"} 1"#),
            "{out}"
        );
        assert_eq!(
            lines.iter().filter(|l| l.ends_with(" 1")).count(),
            1,
            "{out}"
        );
    }

    /// A registry with one database nobody ships (its syncs never finish).
    fn one_db() -> (tempfile::TempDir, Arc<Registry>, Arc<ReplicaStatus>) {
        let dir = tempfile::tempdir().unwrap();
        let store: crate::storage::DynStorage =
            Arc::new(crate::storage::file::FileStorage::new(dir.path().to_path_buf()).unwrap());
        let reg = Registry::new(crate::clock::Clock::system());
        let st = Arc::new(ReplicaStatus::new(
            "/srv/secret-name/app.db",
            "r",
            "file:///x",
            Duration::from_secs(10),
            0,
        ));
        reg.register(st.clone(), store);
        (dir, reg, st)
    }

    fn query(db: &str, wait: bool, timeout: Option<&str>) -> Query<SyncQuery> {
        Query(SyncQuery {
            db: db.into(),
            name: None,
            wait: wait.then(|| "1".into()),
            timeout: timeout.map(str::to_string),
        })
    }

    async fn text(r: Response) -> (StatusCode, String) {
        let code = r.status();
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (code, String::from_utf8_lossy(&b).into_owned())
    }

    #[tokio::test]
    async fn sync_timeouts_that_are_not_a_sane_number_of_seconds_are_refused() {
        let (_d, reg, st) = one_db();
        let app = AppState::new(reg, 4);
        for bad in [
            "NaN", "nan", "inf", "-inf", "infinity", "-1", "-0.5", "3601", "1e300", "abc", "",
            "0x10",
        ] {
            let r = sync(State(app.clone()), query(&st.db, true, Some(bad))).await;
            let (code, body) = text(r).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
            assert!(body.contains("timeout must be"), "{bad:?}: {body}");
        }
        // Nothing was asked of the replicator, and good values still work.
        assert_eq!(*st.sync_requests().borrow(), 0);
        for good in ["0", "0.05", "3600"] {
            assert!(sync_timeout(Some(good)).is_ok(), "{good}");
        }
        let r = sync(State(app.clone()), query(&st.db, true, Some("0.05"))).await;
        assert_eq!(text(r).await.0, StatusCode::GATEWAY_TIMEOUT);
        let r = sync(State(app), query(&st.db, false, None)).await;
        assert_eq!(text(r).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn an_unknown_database_is_not_told_the_known_ones() {
        let (_d, reg, st) = one_db();
        let r = sync(
            State(AppState::new(reg, 4)),
            query("/etc/passwd", true, None),
        )
        .await;
        let (code, body) = text(r).await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(body.contains("not replicated by this offsite"), "{body}");
        assert!(
            !body.contains(&st.db) && !body.contains("secret-name"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn waiting_sync_requests_are_capped() {
        let (_d, reg, st) = one_db();
        let app = AppState::new(reg, 2);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (app, db) = (app.clone(), st.db.clone());
                tokio::spawn(async move {
                    text(sync(State(app), query(&db, true, Some("30"))).await).await
                })
            })
            .collect();
        while app.waiting.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = sync(State(app.clone()), query(&st.db, true, Some("30"))).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        // A request that does not wait is not held back.
        let r = sync(State(app.clone()), query(&st.db, false, None)).await;
        assert_eq!(r.status(), StatusCode::OK);
        // The replicator catches up: both waiters answer, the permits return.
        st.sync_satisfied(*st.sync_requests().borrow());
        for w in waiters {
            let (code, body) = w.await.unwrap();
            assert_eq!(code, StatusCode::OK, "{body}");
        }
        assert_eq!(app.waiting.available_permits(), 2);
        let r = sync(State(app), query(&st.db, true, Some("0"))).await;
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    /// A waiting request ends when its replicator stops (a shutdown): it
    /// neither holds the connection nor delays the daemon's exit until its
    /// timeout.
    #[tokio::test]
    async fn waiting_requests_end_when_the_replicator_stops() {
        let (_d, reg, st) = one_db();
        let app = AppState::new(reg, 4);
        let w = {
            let (app, db) = (app.clone(), st.db.clone());
            tokio::spawn(async move {
                text(sync(State(app), query(&db, true, Some("3600"))).await).await
            })
        };
        while app.waiting.available_permits() == 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        st.set_state(ReplicaState::Stopped);
        let (code, body) = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("answered once the replicator stopped")
            .unwrap();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("stopped"), "{body}");
        assert_eq!(app.waiting.available_permits(), 4);
    }
}
