//! One module per resource, each with its own router, merged here under `/api/v1`.

mod applications;
mod chats;
mod document;
mod health;
mod messages;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use chatcore::domain::{Number, PageInput, PagePosition, PageRequest, SearchCursor};
use chatcore::events::{TRACEPARENT_HEADER, TraceContext};
use chatcore::metrics::HttpLabels;
use serde::{Deserialize, Serialize};
use tower::ServiceExt as _;
use tracing::Instrument as _;
use utoipa::{IntoParams, Modify as _, OpenApi, ToSchema};
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
    // Relative: the paths carry `/api/v1`, so the origin that serves this document serves them.
    servers((url = "/", description = "the origin that serves this document")),
    modifiers(&AccessControl),
    tags(
        (name = "applications", description = "created and renamed synchronously; the routes without a token in the path take it in `Authorization: Bearer` (recommended: a URL is recorded by access logs, proxies and browsers); the `/applications/{token}/...` forms are the reference contract's, kept as legacy; listing applications and revoking tokens need the admin token"),
        (name = "chats", description = "created asynchronously (202)"),
        (name = "messages", description = "created asynchronously (202), updated synchronously, searchable")
    )
)]
struct ApiDoc;

/// The admin token's security scheme.
struct AccessControl;

impl utoipa::Modify for AccessControl {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_SECURITY_SCHEME,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let mut application = Http::new(HttpAuthScheme::Bearer);
        application.description =
            Some("The application's token (`chat_...`), from its creation or rotation.".to_owned());
        components.add_security_scheme(
            APPLICATION_SECURITY_SCHEME,
            SecurityScheme::Http(application),
        );
    }
}

/// The name of the admin token's security scheme in the OpenAPI document (the handlers spell it out: utoipa wants a literal).
pub const ADMIN_SECURITY_SCHEME: &str = "admin_token";
/// The name of the application token's security scheme (spelled out in the handlers too).
pub const APPLICATION_SECURITY_SCHEME: &str = "application_token";

/// The API routes and the OpenAPI document generated from the same handlers, so the two cannot
/// drift apart.
fn api_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::new()
        .merge(applications::router())
        .merge(chats::router())
        .merge(messages::router());
    let (router, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api)
        .split_for_parts();
    let router = router.layer(middleware::map_response(forbid_storing));
    // On the merged document: `ApiDoc`'s own modifiers run before the routes' paths are in it.
    document::LegacyTokenPaths.modify(&mut document);
    document::ResponseConventions.modify(&mut document);
    (router, document)
}

/// `Cache-Control: no-store` on every API answer: an answer may carry an application's token (in
/// its body, or in the URL a shared cache would key it by), which no browser or proxy may keep.
async fn forbid_storing(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// The OpenAPI 3.1 document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().1
}

/// The public port: the API, `/livez` and `/readyz`, and the docs unless `CHAT_DOCS_ENABLED=false`.
///
/// Layers, outermost first: the rate limits (a refused client's body is never read), the body is
/// read whole (size and time limits), then per matched route the span, metrics and request timeout.
pub fn router(state: AppState) -> Router {
    let max_request_bytes = state.settings().max_request_bytes;
    let (api, document) = api_routes();
    let mut router = Router::new().merge(api).merge(health::public_router());
    if state.settings().docs_enabled {
        // The docs page ships its assets in the binary (works offline).
        router = router.merge(SwaggerUi::new("/docs").url(OPENAPI_PATH, document));
    }
    let router = router
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            observe_request,
        ))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::request_body::read_body,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::rate_limit::limit_rate,
        ))
        .with_state(state);
    // Before routing: the legacy form's path is rewritten to the bearer form's.
    Router::new().fallback_service(router.map_request(crate::tenant::route_legacy_form))
}

/// The internal port: `/metrics`, `/livez` and `/readyz`, for the cluster only.
pub fn internal_router(state: AppState) -> Router {
    health::internal_router().with_state(state)
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

/// `?page=&per_page=&after=&before=` of every list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page, 1-based (default 1), only as deep as row 1,000 (`page * per_page`); continue with
    /// `after`. Cannot be combined with `after` or `before`.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    page: Option<String>,
    /// Page size (default 25, at most 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    per_page: Option<String>,
    /// The page after this key (a number; for applications the `next_after` of a page): its
    /// cost does not depend on how deep the page is.
    #[param(value_type = Option<u64>, minimum = 0)]
    after: Option<String>,
    /// The page right before this key.
    #[param(value_type = Option<u64>, minimum = 0)]
    before: Option<String>,
}

impl PageParams {
    fn parse(&self, state: &AppState) -> Result<PageRequest, ApiError> {
        let api = state.settings();
        PageRequest::parse(
            PageInput {
                page: self.page.as_deref(),
                per_page: self.per_page.as_deref(),
                after: self.after.as_deref(),
                before: self.before.as_deref(),
                cursor: None,
            },
            api.default_page_size,
            api.max_page_size,
        )
        .map_err(ApiError::bad_parameter)
    }
}

/// Pagination block of every list response: where the neighbouring pages start. Pass
/// `next_after` as `after` for the next page, `previous_before` as `before` for the previous one,
/// and in a search `next_cursor` as `cursor`; walking `next_after` (or `next_cursor`) returns every
/// item exactly once.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pagination {
    /// The page number, for a `page` request.
    #[serde(skip_serializing_if = "Option::is_none")]
    page: Option<u32>,
    /// The page size used (the `per_page` asked for, or the default).
    per_page: u32,
    /// The next page number, while it is within the page-number depth; null otherwise.
    next_page: Option<u32>,
    /// `after` of the next page; null on the last page.
    next_after: Option<u64>,
    /// `before` of the previous page; null on the first page.
    previous_before: Option<u64>,
    /// Search only: `cursor` of the next page (opaque); null on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<Option<String>>,
}

/// Cuts the extra row fetched to detect more rows, puts a `before` page back in ascending order,
/// and tells where the neighbouring pages start (`key` is the key the list is ordered by).
fn paginate<T>(
    mut rows: Vec<T>,
    page: PageRequest,
    key: impl Fn(&T) -> u64,
) -> (Vec<T>, Pagination) {
    let has_more = rows.len() > page.per_page as usize;
    rows.truncate(page.per_page as usize);
    if page.descending() {
        rows.reverse();
    }
    let first = rows.first().map(&key);
    let last = rows.last().map(&key);
    let (next_after, previous_before) = match page.position {
        PagePosition::Page(number) => (last.filter(|_| has_more), first.filter(|_| number > 1)),
        PagePosition::After(after) => (last.filter(|_| has_more), first.filter(|_| after > 0)),
        // The key the page was asked before is itself after it.
        PagePosition::Before(_) => (last, first.filter(|_| has_more)),
        PagePosition::AfterHit(_) => (last.filter(|_| has_more), None),
    };
    let (page_number, next_page) = match page.position {
        PagePosition::Page(number) => {
            let next = number + 1;
            let within = u64::from(next) * u64::from(page.per_page) <= PageRequest::MAX_PAGE_DEPTH;
            (Some(number), (has_more && within).then_some(next))
        }
        PagePosition::After(_) | PagePosition::Before(_) | PagePosition::AfterHit(_) => {
            (None, None)
        }
    };
    let pagination = Pagination {
        page: page_number,
        per_page: page.per_page,
        next_page,
        next_after,
        previous_before,
        next_cursor: None,
    };
    (rows, pagination)
}

impl Pagination {
    /// Adds the cursor of the next search page: after the last hit, when there are more.
    fn with_next_cursor(mut self, last_hit: Option<SearchCursor>) -> Self {
        let more = self.next_after.is_some();
        self.next_cursor = Some(last_hit.filter(|_| more).map(SearchCursor::encode));
        self
    }
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
