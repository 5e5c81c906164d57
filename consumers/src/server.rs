//! The worker's HTTP endpoints: Prometheus metrics and Kubernetes probes.
//!
//! - `GET /metrics`: every metric in the OpenMetrics text format.
//! - `GET /healthz`: 200 while the poll loop runs (liveness), else 503.
//! - `GET /readyz`: 200 once the member has an assignment and reaches Kafka
//!   and Redis (readiness), else 503 with the reasons.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use pipeline::telemetry::health::Health;
use pipeline::telemetry::metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn render_metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        endpoints.metrics.render(),
    )
}

async fn healthz(State(endpoints): State<Endpoints>) -> (StatusCode, String) {
    match endpoints.health.live() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: {reason}\n"),
        ),
    }
}

async fn readyz(State(endpoints): State<Endpoints>) -> (StatusCode, String) {
    match endpoints.health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        ),
    }
}

/// Binds `listen` and serves until `shutdown` fires. Returns the bound
/// address (useful with port 0).
pub async fn serve(
    listen: &str,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("failed to listen on server.listen {listen:?}; choose a free host:port")
        })?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { metrics, health });
    info!(%address, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        let stopped = shutdown.cancelled_owned();
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(%error, "the metrics and health server failed");
        }
    });
    Ok(address)
}
