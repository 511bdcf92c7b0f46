//! Which application a request acts for.
//!
//! The recommended form carries the application's token in `Authorization: Bearer` on routes
//! without it in the path (`/api/v1/application`, `/api/v1/chats/...`), so that no access log,
//! proxy or browser history records it. The reference contract's form,
//! `/api/v1/applications/{token}/...`, stays (legacy): its path is rewritten to the bearer form
//! before routing with the token kept aside ([`PathToken`]), so both forms run the same handlers,
//! and metrics and traces only ever see the bearer form's route.

use axum::extract::{Query, Request};
use axum::http::{HeaderMap, Uri, header};
use chatcore::domain::ApplicationToken;
use serde::Deserialize;

use crate::http::error::ApiError;
use crate::http::extract::{Credential, Tenant};
use crate::http::state::AppState;

/// Where the legacy form's token segment starts.
const LEGACY_PREFIX: &str = "/api/v1/applications/";

/// The token of a legacy-form request, percent-decoded as a router decodes a path segment (None
/// when that fails: no application has such a token).
#[derive(Debug, Clone)]
struct PathToken(Option<String>);

/// Rewrites `/api/v1/applications/{token}[/rest]` to the bearer form's path (`/api/v1/chats/...`
/// for chats, `/api/v1/application[/rest]` for the rest), keeping the token as a [`PathToken`].
pub fn route_legacy_form(mut request: Request) -> Request {
    let Some(rest) = request.uri().path().strip_prefix(LEGACY_PREFIX) else {
        return request;
    };
    let (segment, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if segment.is_empty() {
        return request;
    }
    let path = if tail == "chats" || tail.starts_with("chats/") {
        format!("/api/v1/{tail}")
    } else if tail.is_empty() {
        "/api/v1/application".to_owned()
    } else {
        format!("/api/v1/application/{tail}")
    };
    let token = PathToken(percent_decoded(segment));
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = request.uri().clone().into_parts();
    let Ok(path_and_query) = path_and_query.parse() else {
        return request;
    };
    parts.path_and_query = Some(path_and_query);
    let Ok(uri) = Uri::from_parts(parts) else {
        return request;
    };
    *request.uri_mut() = uri;
    request.extensions_mut().insert(token);
    request
}

/// Whether the path is one of the routes that act for an application.
fn is_application_route(path: &str) -> bool {
    ["/api/v1/application", CHAT_ROUTES].iter().any(|root| {
        path.strip_prefix(root)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The root of the chat routes, the ones a client token opens (in the bearer form).
const CHAT_ROUTES: &str = "/api/v1/chats";

/// Whether the path (or route template) is a chat route of the bearer form's.
pub fn is_chat_route(path: &str) -> bool {
    path.strip_prefix(CHAT_ROUTES)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Whether the path (or route template) is a chat's live stream, which also takes a client token
/// in `?access_token=`: what a browser's EventSource can send (it sends no header).
pub fn takes_access_token(path: &str) -> bool {
    is_chat_route(path) && path.ends_with("/messages/stream")
}

/// Whether a request (routed, the legacy form rewritten) is for a chat route of the bearer form:
/// the routes a browser calls with a client token, and the only ones with CORS.
pub fn is_browser_route(request: &Request) -> bool {
    request.extensions().get::<PathToken>().is_none() && is_chat_route(request.uri().path())
}

/// The credential of `Authorization: Bearer <credential>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credential)| credential.trim())
}

/// `?access_token=` of a stream.
#[derive(Deserialize)]
struct AccessTokenQuery {
    access_token: Option<String>,
}

/// Which tokens a route takes from where the request presents one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcceptedTokens {
    Application,
    /// The chat routes' `Authorization: Bearer`.
    ApplicationOrClient,
    /// A stream's `?access_token=`: a URL is logged and kept by browsers, so only a short-lived
    /// client token may travel in it.
    Client,
}

/// The token a request presents for an application, what the route accepts, and the refusal if
/// it opens none.
pub struct Presented {
    token: Option<String>,
    accepted: AcceptedTokens,
    refusal: ApiError,
}

/// What the request presents: None on routes that act for no application.
pub fn presented(request: &Request) -> Option<Presented> {
    let path = request.uri().path();
    match request.extensions().get::<PathToken>() {
        // A legacy path naming no valid token: 404, as the reference contract answers.
        Some(PathToken(raw)) => Some(Presented {
            token: raw.clone(),
            accepted: AcceptedTokens::Application,
            refusal: ApiError::NotFound("application"),
        }),
        None if is_application_route(path) => {
            let bearer = bearer(request.headers()).map(str::to_owned);
            let (token, accepted) = match bearer {
                Some(token) if is_chat_route(path) => {
                    (Some(token), AcceptedTokens::ApplicationOrClient)
                }
                None if takes_access_token(path) => (
                    Query::<AccessTokenQuery>::try_from_uri(request.uri())
                        .ok()
                        .and_then(|query| query.0.access_token),
                    AcceptedTokens::Client,
                ),
                token => (token, AcceptedTokens::Application),
            };
            Some(Presented {
                token,
                accepted,
                refusal: ApiError::ApplicationKeyRequired,
            })
        }
        None => None,
    }
}

/// Whether a credential has the shape of a JWT (three dot-separated parts); an application token
/// never holds a dot.
fn is_client_token_shaped(credential: &str) -> bool {
    credential.split('.').count() == 3
}

/// The application the presented token opens (its internal id, the key of its rate limit) and
/// with which credential, or its refusal.
pub async fn resolve(state: &AppState, presented: Presented) -> Result<(u64, Tenant), ApiError> {
    let Presented {
        token,
        accepted,
        refusal,
    } = presented;
    let Some(raw) = token else {
        return Err(refusal);
    };
    if accepted != AcceptedTokens::Application && is_client_token_shaped(&raw) {
        let grant = state
            .client_tokens()
            .verify(&raw)
            .await?
            .ok_or(ApiError::ClientTokenRefused)?;
        let application_id = grant.application_id;
        return Ok((
            application_id,
            Tenant::new(application_id, Credential::Client(grant)),
        ));
    }
    if accepted == AcceptedTokens::Client {
        return Err(refusal);
    }
    let Ok(token) = ApplicationToken::parse(&raw) else {
        return Err(refusal);
    };
    match state.service().resolve_token(&token).await? {
        Some(application_id) => Ok((
            application_id,
            Tenant::new(application_id, Credential::Application(token)),
        )),
        None => Err(refusal),
    }
}

/// `%XX` sequences decoded; `None` for a malformed one or a result that is not UTF-8.
fn percent_decoded(segment: &str) -> Option<String> {
    if !segment.contains('%') {
        return Some(segment.to_owned());
    }
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = segment.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(path: &str) -> (String, Option<Option<String>>) {
        let mut request = Request::new(axum::body::Body::empty());
        *request.uri_mut() = path.parse().expect("uri");
        let request = route_legacy_form(request);
        let token = request
            .extensions()
            .get::<PathToken>()
            .map(|token| token.0.clone());
        (request.uri().to_string(), token)
    }

    #[test]
    fn the_legacy_form_is_routed_as_the_bearer_form_with_its_token_decoded() {
        let some = |token: &str| Some(Some(token.to_owned()));
        assert_eq!(
            routed("/api/v1/applications/abc"),
            ("/api/v1/application".to_owned(), some("abc"))
        );
        assert_eq!(
            routed("/api/v1/applications/a%62c/chats/3/messages?page=2"),
            ("/api/v1/chats/3/messages?page=2".to_owned(), some("abc"))
        );
        assert_eq!(
            routed("/api/v1/applications/abc/token/rotate"),
            ("/api/v1/application/token/rotate".to_owned(), some("abc"))
        );
        assert_eq!(
            routed("/api/v1/applications/%zz/chats"),
            ("/api/v1/chats".to_owned(), Some(None))
        );
        assert_eq!(
            routed("/api/v1/applications?page=1"),
            ("/api/v1/applications?page=1".to_owned(), None)
        );
        assert_eq!(routed("/livez"), ("/livez".to_owned(), None));
    }

    #[test]
    fn application_routes_are_told_apart_from_the_others() {
        assert!(is_application_route("/api/v1/application"));
        assert!(is_application_route("/api/v1/chats/1/messages"));
        assert!(!is_application_route("/api/v1/applications"));
        assert!(!is_application_route("/api/v1/chatsx"));
        assert!(!is_application_route("/readyz"));
    }

    #[test]
    fn client_tokens_go_to_the_chat_routes_and_the_query_to_the_stream_only() {
        assert!(is_chat_route("/api/v1/chats"));
        assert!(is_chat_route("/api/v1/chats/{chat_number}/messages"));
        assert!(!is_chat_route("/api/v1/application/client-tokens"));
        assert!(!is_chat_route("/api/v1/chatsx"));
        assert!(takes_access_token("/api/v1/chats/3/messages/stream"));
        assert!(takes_access_token(
            "/api/v1/chats/{chat_number}/messages/stream"
        ));
        assert!(!takes_access_token("/api/v1/chats/3/messages"));
        assert!(is_client_token_shaped("a.b.c"));
        assert!(!is_client_token_shaped("chat_abc"));
    }
}
