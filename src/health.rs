//! The operations endpoints: `/healthz`, `/readyz` and `/metrics` (README "Operations").

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::liveness::Liveness;

/// What readiness is made of; each flag is set by the part that knows.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Connected to the broker.
    pub connected: AtomicBool,
    /// A consumer is registered on the jobs queue.
    pub consuming: AtomicBool,
    /// Paused by a systemic failure (credentials, permissions).
    pub paused: AtomicBool,
}

impl Readiness {
    /// Ready: connected, consuming and not paused.
    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
            && self.consuming.load(Ordering::Relaxed)
            && !self.paused.load(Ordering::Relaxed)
    }

    /// What is missing, for the `/readyz` body.
    pub fn describe(&self) -> String {
        if self.is_ready() {
            return "ready\n".to_owned();
        }
        let mut missing = Vec::new();
        if !self.connected.load(Ordering::Relaxed) {
            missing.push("not connected to the broker");
        }
        if !self.consuming.load(Ordering::Relaxed) {
            missing.push("not consuming");
        }
        if self.paused.load(Ordering::Relaxed) {
            missing.push("paused by a systemic failure (see logs)");
        }
        format!("not ready: {}\n", missing.join(", "))
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    liveness: Arc<Liveness>,
    metrics: PrometheusHandle,
}

/// Binds `addr` (port 0 allowed) and serves until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    liveness: Arc<Liveness>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            readiness,
            liveness,
            metrics,
        });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
    Ok(bound)
}

/// The watchdog's verdict (`crate::liveness`): 503 with the reason while the worker looks
/// wedged. Not readiness: a worker waiting for the broker or paused by a failure is alive.
async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.liveness.verdict() {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("wedged: {reason}\n"),
        ),
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let status = if state.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, state.readiness.describe())
}

async fn render_metrics(State(state): State<AppState>) -> String {
    crate::metrics::process::render_with(state.metrics.render())
}
