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
        state.inner.metrics.encode(),
    )
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let inner = &state.inner;
    let mysql = inner.store.ping().await.is_ok();
    let redis = redis::cmd("PING")
        .query_async::<String>(&mut inner.redis.clone())
        .await
        .is_ok();
    let rabbitmq = inner.publisher.is_connected().await;
    let elasticsearch = inner.search.ping().await.is_ok();
    let ready = mysql && redis && rabbitmq && elasticsearch;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let checks = json!({"mysql": mysql, "redis": redis, "rabbitmq": rabbitmq, "elasticsearch": elasticsearch});
    (
        status,
        Json(json!({"status": if ready { "ready" } else { "unavailable" }, "checks": checks})),
    )
}
