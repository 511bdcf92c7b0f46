//! The HTTP layer: the server, the router and its middleware, the extractors, the handlers of
//! each resource (parse, call one `ChatService` method, render), the live streams (SSE), the
//! OpenAPI document, and the one mapping of every failure to its answer (`error`).

pub mod admin;
mod demo;
pub mod error;
pub mod extract;
pub mod idempotency_key;
pub mod live;
pub mod middleware;
mod openapi;
pub mod pagination;
mod routes;
pub mod server;
pub mod state;
pub mod tenant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn_with_state, map_response};
use axum::response::Response;
use tower::ServiceExt as _;
use utoipa::{Modify as _, OpenApi as _};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use self::error::ApiError;
use self::openapi::{ApiDoc, OPENAPI_PATH};
use self::routes::{applications, changes, chats, client_tokens, health, messages, webhooks};
use crate::http::state::AppState;

/// The API routes and the OpenAPI document generated from the same handlers, so the two cannot
/// drift apart.
fn api_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::new()
        .merge(applications::router())
        .merge(client_tokens::router())
        .merge(chats::router())
        .merge(messages::router())
        .merge(changes::router())
        .merge(webhooks::router());
    let (router, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api)
        .split_for_parts();
    let router = router.layer(map_response(forbid_storing));
    // On the merged document: `ApiDoc`'s own modifiers run before the routes' paths are in it.
    openapi::LegacyTokenPaths.modify(&mut document);
    // After the legacy twins are copied: they never take a client token.
    openapi::ClientTokenRoutes.modify(&mut document);
    openapi::ResponseConventions.modify(&mut document);
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

/// The public port: the API, `/livez` and `/readyz`, and the docs (`/docs`, and the chat page
/// `/demo`) unless `CHAT_DOCS_ENABLED=false`.
///
/// Layers, outermost first: CORS (a preflight is answered there, before anything asks for a
/// token), the rate limits (a refused client's body is never read), the body is read whole (size
/// and time limits), then per matched route the span, metrics and request timeout.
pub fn router(state: AppState) -> Router {
    let max_request_bytes = state.settings().max_request_bytes;
    let (api, document) = api_routes();
    let mut router = Router::new().merge(api).merge(health::public_router());
    if state.settings().docs_enabled {
        // The docs page ships its assets in the binary (works offline).
        router = router
            .merge(SwaggerUi::new("/docs").url(OPENAPI_PATH, document))
            .merge(demo::router());
    }
    let router = router
        .route_layer(from_fn_with_state(
            state.clone(),
            middleware::observe::observe_request,
        ))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(from_fn_with_state(
            state.clone(),
            middleware::body::read_body,
        ))
        .layer(from_fn_with_state(
            state.clone(),
            middleware::rate_limit::limit_rate,
        ))
        .layer(from_fn_with_state(
            state.clone(),
            middleware::cors::allow_origins,
        ))
        .with_state(state);
    // Before routing: the legacy form's path is rewritten to the bearer form's.
    Router::new().fallback_service(router.map_request(tenant::route_legacy_form))
}

/// The internal port: `/metrics`, `/livez` and `/readyz`, for the cluster only.
pub fn internal_router(state: AppState) -> Router {
    health::internal_router().with_state(state)
}
