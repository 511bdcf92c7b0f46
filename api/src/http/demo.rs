//! `/demo`: a chat page (plain HTML, CSS and one script bundled from `api/demo/demo.ts` and the
//! TypeScript client), shipped in the binary and served with the docs. Its token comes in the
//! URL's fragment, which never reaches a server; the page talks to this origin only, and its
//! Content-Security-Policy says so.

use std::sync::LazyLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest as _, Sha256};

use crate::http::state::AppState;

/// Scripts, styles and connections of this origin only (and the empty `data:` icon, which spares
/// the browser a `/favicon.ico` that does not exist); no inline script or style, no plugin,
/// no frame, no form posted elsewhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One file of the page: its bytes, content type and ETag.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: String,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Self {
        let digest = Sha256::digest(body.as_bytes());
        let hex: String = digest[..12]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let etag = format!("\"{hex}\"");
        Self {
            body,
            content_type,
            etag,
        }
    }

    /// The file, or `304` when the browser's copy is current. `no-cache`: a browser keeps it but
    /// asks each time (a new release's page never runs last release's script).
    fn serve(&self, request: &HeaderMap) -> Response {
        let headers = [
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::ETAG,
                HeaderValue::from_str(&self.etag).expect("hex digits are a header value"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ];
        let current = request
            .get(header::IF_NONE_MATCH)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == self.etag));
        if current {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        (
            headers,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

static PAGE: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../demo/index.html"),
        "text/html; charset=utf-8",
    )
});
static STYLE: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../demo/demo.css"),
        "text/css; charset=utf-8",
    )
});
/// `api/demo/demo.js`: bundled by `scripts/demo-bundle` (checked in, so building needs no Node).
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_str!("../../demo/demo.js"),
        "text/javascript; charset=utf-8",
    )
});

/// The page and its two files (not in the OpenAPI document, like `/docs`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/demo",
            get(|headers: HeaderMap| async move { PAGE.serve(&headers) }),
        )
        .route(
            "/demo/demo.css",
            get(|headers: HeaderMap| async move { STYLE.serve(&headers) }),
        )
        .route(
            "/demo/demo.js",
            get(|headers: HeaderMap| async move { SCRIPT.serve(&headers) }),
        )
}
