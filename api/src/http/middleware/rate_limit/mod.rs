//! Rate limits per client address and per application (token buckets, per replica).
//!
//! An answer over a limit is `429` with `Retry-After`; every answer of a limited request carries
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` of the tighter of its limits
//! (draft-ietf-httpapi-ratelimit-headers).
//!
//! What an anonymous client can make a replica remember is bounded: the address limit runs first
//! and a refusal stops there (its token is not even looked up); the application limit is keyed by
//! the application the token resolved to, never by raw input (so every spelling of a token, and
//! every token of one application, share one bucket); IPv6 clients are keyed by their /64 (one
//! host holds a whole /64); each limiter keeps at most [`buckets::MAX_KEYS`] buckets, the quietest evicted
//! first, and its size is the `chat_rate_limiter_keys` metric.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};

use crate::http::error::set_rate_limit_headers;
use crate::http::extract::ClientAddress;
use crate::http::state::AppState;

pub mod buckets;

use buckets::{Remaining, address_key};
/// Middleware: counts the request against its address, then resolves its application token
/// ([`Tenant`]) and counts it against the application; 429 over either limit. Runs before the
/// body is read.
pub async fn limit_rate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limiters = &state.rate_limiters;
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |info| info.0.ip());
    let address = limiters.client_address(peer, request.headers());
    let mut request = request;
    request
        .extensions_mut()
        .insert(ClientAddress(address_key(address)));
    let by_address = match limiters.check_address(address) {
        Ok(remaining) => remaining,
        Err(limited) => return limited.into_response(),
    };
    let mut by_application = None;
    let response = 'answered: {
        if let Some(presented) = crate::http::tenant::presented(&request) {
            let (application_id, tenant) =
                match crate::http::tenant::resolve(&state, presented).await {
                    Ok(resolved) => resolved,
                    Err(refused) => break 'answered refused.into_response(),
                };
            by_application = match limiters.check_application(application_id) {
                Ok(remaining) => remaining,
                Err(limited) => return limited.into_response(),
            };
            request.extensions_mut().insert(tenant);
        }
        next.run(request).await
    };
    with_headers(response, by_address, by_application)
}

/// The headers of the tighter of the two limits (the one with fewer requests left).
fn with_headers(
    mut response: Response,
    by_address: Option<Remaining>,
    by_application: Option<Remaining>,
) -> Response {
    let tighter = [by_address, by_application]
        .into_iter()
        .flatten()
        .min_by_key(|remaining| remaining.remaining);
    if let Some(remaining) = tighter {
        set_rate_limit_headers(
            response.headers_mut(),
            remaining.limit.burst,
            remaining.remaining,
            remaining.reset,
        );
    }
    response
}
