//! CORS for the routes a browser calls with a client token (`/api/v1/chats/...`, the stream
//! included), for the origins of `CHAT_CORS_ALLOWED_ORIGINS` only; no CORS header anywhere else,
//! nor for another origin (the browser then keeps the answer from the page).
//!
//! The outermost layer: a preflight carries no token (a browser sends none with it) and is
//! answered here, before the rate limits and the token's resolution; it costs the replica nothing
//! to remember. Every other answer of those routes, errors and 429s included, gets the headers, so
//! the page can read why it was refused.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};

use crate::http::state::AppState;
use crate::http::tenant;

/// What a page may send: the methods of the chat routes and the headers they read.
const ALLOWED_METHODS: &str = "GET, POST, PUT, DELETE";
const ALLOWED_HEADERS: &str = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID";
/// What a page may read of an answer beyond the simple headers.
const EXPOSED_HEADERS: &str = "Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset";
/// How long a browser may keep a preflight's answer (Chromium keeps it 2 hours at most).
const PREFLIGHT_MAX_AGE_SECONDS: &str = "7200";

/// Middleware: answers the preflights of the chat routes and adds the CORS headers to their
/// answers, for an allowed `Origin`.
pub async fn allow_origins(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let origins = &state.settings().cors_allowed_origins;
    if origins.is_empty() || !tenant::is_browser_route(&request) {
        return next.run(request).await;
    }
    let allowed = request
        .headers()
        .get(header::ORIGIN)
        .filter(|origin| origin.to_str().is_ok_and(|origin| origins.allows(origin)))
        .cloned();
    let is_preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if is_preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    // The answer depends on the Origin: no cache may give one origin's answer to another.
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed {
        allow(headers, origin, is_preflight);
    }
    response
}

fn allow(headers: &mut HeaderMap, origin: HeaderValue, is_preflight: bool) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    let granted = if is_preflight {
        [
            (header::ACCESS_CONTROL_ALLOW_METHODS, ALLOWED_METHODS),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOWED_HEADERS),
            (header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE_SECONDS),
        ]
        .as_slice()
    } else {
        [(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED_HEADERS)].as_slice()
    };
    for (name, value) in granted {
        headers.insert(name.clone(), HeaderValue::from_static(value));
    }
}
