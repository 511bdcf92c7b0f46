//! `/livez`: the process is up. `/readyz`: every dependency the api needs to serve answers (503
//! otherwise, and from the shutdown signal on); the search index is reported but not required
//! (only search needs it). The public port's `/readyz` says only ready or not (which services sit
//! behind the api is nobody's business outside the cluster); the internal port's names each check.
//! `/metrics`: Prometheus metrics of this process, on the internal port only.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::http::state::AppState;

/// `/livez` and `/readyz` without its checks, on the public port (load balancers probe it).
pub fn public_router() -> Router<AppState> {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(public_readyz))
}

/// The probes with each check, and `/metrics`.
pub fn internal_router() -> Router<AppState> {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn public_readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (status, Json(mut body)) = readyz(State(state)).await;
    if let Some(body) = body.as_object_mut() {
        body.remove("checks");
    }
    (status, Json(body))
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
