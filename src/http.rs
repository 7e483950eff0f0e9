//! The daemon's HTTP listener (`listen = "127.0.0.1:9090"`): Prometheus
//! metrics, liveness, readiness, and `POST /sync` for `offsite sync --wait`.
//! It only reads the status registry (and asks replicators to sync).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde::Deserialize;
use tokio::sync::watch;

use crate::status::{Registry, ReplicaStatus};

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
        .with_state(registry);
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
    #[serde(default)]
    wait: Option<String>,
    /// Seconds to wait at most (default 60).
    #[serde(default)]
    timeout: Option<f64>,
}

async fn sync(State(reg): State<Arc<Registry>>, Query(q): Query<SyncQuery>) -> Response {
    let replicas = reg.for_db(&q.db);
    if replicas.is_empty() {
        let known: std::collections::BTreeSet<String> = reg
            .entries()
            .into_iter()
            .map(|e| e.status.db.clone())
            .collect();
        return (
            StatusCode::NOT_FOUND,
            format!(
                "database {} is not replicated by this offsite (it replicates: {})\n",
                q.db,
                known.into_iter().collect::<Vec<_>>().join(", ")
            ),
        )
            .into_response();
    }
    let wait = matches!(q.wait.as_deref(), Some("" | "1" | "true" | "yes"));
    let requests: Vec<(Arc<ReplicaStatus>, u64)> = replicas
        .into_iter()
        .map(|s| {
            let n = s.request_sync();
            (s, n)
        })
        .collect();
    if wait {
        let limit = Duration::from_secs_f64(q.timeout.unwrap_or(60.0).clamp(0.0, 86_400.0));
        let all = futures::future::join_all(requests.iter().map(|(s, n)| s.wait_synced(*n)));
        if tokio::time::timeout(limit, all).await.is_err() {
            let late: Vec<String> = requests
                .iter()
                .filter(|(s, _)| s.pending_since_us.load(Relaxed) != 0 || !s.running.load(Relaxed))
                .map(|(s, _)| s.replica.clone())
                .collect();
            return (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "not durable after {limit:?}: replica(s) {} still shipping or unreachable\n",
                    late.join(", ")
                ),
            )
                .into_response();
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
}
