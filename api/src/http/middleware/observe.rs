//! The span, the metrics and the time limit of every routed request.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use chatcore::events::{TRACEPARENT_HEADER, TraceContext};
use chatcore::metrics::HttpLabels;
use tracing::Instrument as _;

use crate::http::error::ApiError;
use crate::http::state::AppState;

/// Runs every routed request inside a server span (continuing the caller's `traceparent`), within
/// `CHAT_REQUEST_TIMEOUT_MS`, and counts it and its latency by route template (never the raw path,
/// which would make one series per token).
pub async fn observe_request(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = matched.map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let incoming = request
        .headers()
        .get(TRACEPARENT_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    // The host the client addressed (semantic conventions: `server.address` of a server span).
    let server_address = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .and_then(|host| host.parse::<axum::http::uri::Authority>().ok())
        .map(|authority| authority.host().to_owned());
    let span = tracing::info_span!(
        "http request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        error.r#type = tracing::field::Empty,
        server.address = server_address,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if let Some(incoming) = &incoming {
        chatcore::telemetry::set_remote_parent(&span, incoming);
    }
    let fallback = TraceContext::child_of(incoming.as_deref());
    chatcore::telemetry::record_ids(&span, &fallback);
    let mut request = request;
    request.extensions_mut().insert(fallback);
    let timeout = state.settings().request_timeout;
    let response = tokio::time::timeout(timeout, next.run(request).instrument(span.clone()))
        .await
        .unwrap_or_else(|_| ApiError::TimedOut(timeout.as_millis()).into_response());
    span.record("http.response.status_code", response.status().as_u16());
    // A server's span is an error when it answered 5xx (a 4xx is the client's).
    if response.status().is_server_error() {
        chatcore::telemetry::record_error(&span, response.status().as_str());
    }
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    let metrics = &state.metrics;
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_request_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}
