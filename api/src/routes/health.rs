//! `/livez`: the process is up. `/readyz`: every dependency answers (503 otherwise).
//! `/metrics`: Prometheus metrics of this process.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/livez", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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
    let checks = state.service().readiness().await;
    let ready = checks.iter().all(|(_, up)| *up);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let checks: serde_json::Map<String, Value> = checks
        .into_iter()
        .map(|(name, up)| (name.to_owned(), Value::Bool(up)))
        .collect();
    (
        status,
        Json(json!({"status": if ready { "ready" } else { "unavailable" }, "checks": checks})),
    )
}
