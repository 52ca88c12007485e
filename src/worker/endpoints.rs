//! `/metrics`, `/healthz` and `/readyz` of a worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::{Readiness, WorkerContext};

/// Longest a readiness probe waits for each service.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often buffered histogram samples are folded into their buckets. The recorder keeps
/// every sample until then (or until a scrape): without this, an unscraped worker's memory
/// grows with every request.
const METRICS_UPKEEP_PERIOD: Duration = Duration::from_secs(5);
/// Readiness probes running at once; more are answered 503 at once, so a flood of probes
/// can't take the database pool from the batches.
const CONCURRENT_PROBES_MAX: usize = 2;

#[derive(Clone)]
struct AppState {
    context: Arc<WorkerContext>,
    readiness: Arc<Readiness>,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    probes: Arc<tokio::sync::Semaphore>,
}

/// Binds `address` and serves the endpoints until `shutdown`.
pub(super) async fn spawn(
    address: SocketAddr,
    context: Arc<WorkerContext>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let prometheus = crate::telemetry::prometheus()?;
    let upkeep = (prometheus.clone(), shutdown.clone());
    tokio::spawn(async move {
        let (prometheus, shutdown) = upkeep;
        let mut tick = tokio::time::interval(METRICS_UPKEEP_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => prometheus.run_upkeep(),
            }
        }
    });
    let probes = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_PROBES_MAX));
    let state = AppState { context, readiness, prometheus, probes };
    let router = Router::new()
        .route("/metrics", get(|State(s): State<AppState>| async move { s.prometheus.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the metrics address {address}"))?;
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        let served = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(error) = served {
            tracing::warn!(%error, "metrics endpoint stopped");
        }
    });
    Ok(())
}

async fn ready(State(state): State<AppState>) -> (StatusCode, String) {
    let Ok(_probe) = state.probes.try_acquire() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy: too many readiness probes at once".into());
    };
    let mut problems = Vec::new();
    if !state.readiness.broker_connected.load(Ordering::Relaxed) {
        problems.push("rabbitmq: not connected");
    }
    if !state.readiness.membership_ok.load(Ordering::Relaxed) {
        problems.push("membership: last heartbeat failed");
    }
    let redis = tokio::time::timeout(PROBE_TIMEOUT, state.context.locks.locks().ping()).await;
    if !matches!(redis, Ok(Ok(()))) {
        problems.push("redis: unreachable");
    }
    let postgres =
        tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(state.context.ledger.ledger().pool()))
            .await;
    if !matches!(postgres, Ok(Ok(_))) {
        problems.push("postgres: unreachable");
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n"))
    }
}
