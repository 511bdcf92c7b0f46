//! One module per resource, each with its own router, merged here under `/api/v1`.

mod applications;
mod chats;
mod health;
mod messages;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use chatcore::domain::{Number, PageRequest};
use chatcore::events::{TRACEPARENT_HEADER, TraceContext};
use chatcore::metrics::HttpLabels;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::AppState;
use crate::error::ApiError;

/// Where the OpenAPI document is served; the docs page at `/docs` reads it.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Chat platform API",
        description = "Applications, chats and messages with per-parent sequential numbers; writes are accepted (202) and persisted asynchronously; messages are searchable. Every error has the body `{\"error\": {\"code\", \"message\", \"field\"}}`."
    ),
    tags(
        (name = "applications", description = "created and renamed synchronously"),
        (name = "chats", description = "created asynchronously (202)"),
        (name = "messages", description = "created asynchronously (202), updated synchronously, searchable")
    )
)]
struct ApiDoc;

/// The API routes and the OpenAPI document generated from the same handlers, so the two cannot
/// drift apart.
fn api_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::new()
        .merge(applications::router())
        .merge(chats::router())
        .merge(messages::router());
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api)
        .split_for_parts()
}

/// The OpenAPI 3.1 document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().1
}

pub fn router(state: AppState) -> Router {
    let max_request_bytes = state.settings().max_request_bytes;
    let (api, document) = api_routes();
    // The docs page ships its assets in the binary (works offline).
    let docs = SwaggerUi::new("/docs").url(OPENAPI_PATH, document);
    Router::new()
        .merge(api)
        .merge(docs)
        .merge(health::router())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            observe_request,
        ))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .with_state(state)
}

/// Runs every routed request inside a server span (continuing the caller's `traceparent`), within
/// `CHAT_REQUEST_TIMEOUT_MS`, and counts it and its latency by route template (never the raw path,
/// which would make one series per token).
async fn observe_request(
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
    let span = tracing::info_span!(
        "http request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
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

/// `?page=&per_page=` of every list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page, 1-based (default 1, at most 10,000).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 10000)]
    page: Option<String>,
    /// Page size (default 25, at most 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    per_page: Option<String>,
}

impl PageParams {
    fn parse(&self, state: &AppState) -> Result<PageRequest, ApiError> {
        let api = state.settings();
        PageRequest::parse(
            self.page.as_deref(),
            self.per_page.as_deref(),
            api.default_page_size,
            api.max_page_size,
        )
        .map_err(ApiError::bad_parameter)
    }
}

/// Pagination block of every list response.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pagination {
    page: u32,
    per_page: u32,
    next_page: Option<u32>,
}

/// Cuts the extra row fetched to detect a next page.
fn paginate<T>(mut rows: Vec<T>, page: PageRequest) -> (Vec<T>, Pagination) {
    let has_next = rows.len() > page.per_page as usize;
    rows.truncate(page.per_page as usize);
    let pagination = Pagination {
        page: page.page,
        per_page: page.per_page,
        next_page: has_next.then_some(page.page + 1),
    };
    (rows, pagination)
}

fn parse_number(field: &'static str, raw: &str) -> Result<Number, ApiError> {
    Number::parse(field, raw).map_err(ApiError::bad_parameter)
}

/// `{"number": n}` of a 202.
#[derive(Debug, Serialize, ToSchema)]
struct Accepted {
    /// The number the chat or message will have.
    #[schema(value_type = u64, minimum = 1)]
    number: Number,
}
