//! `/livez`: the process is up. `/readyz`: every dependency the api needs to serve answers (503
//! otherwise, and from the shutdown signal on); the search index is reported but not required
//! (only search needs it).
//! `/metrics`: Prometheus metrics of this process, on the internal port only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;

/// `/livez` and `/readyz`, served on both ports (load balancers probe the public one).
pub fn public_router() -> Router<AppState> {
    Router::new()
        .route("/livez", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
}

/// The probes and `/metrics`.
pub fn internal_router() -> Router<AppState> {
    public_router().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            chatcore::metrics::CONTENT_TYPE,
        )],
        state.metrics.encode(),
    )
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        );
    }
    let checks = state.service().readiness().await;
    let ready = checks.iter().all(|check| check.up || !check.required);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let checks: serde_json::Map<String, Value> = checks
        .into_iter()
        .map(|check| (check.dependency.to_owned(), Value::Bool(check.up)))
        .collect();
    (
        status,
        Json(json!({"status": if ready { "ready" } else { "unavailable" }, "checks": checks})),
    )
}
