//! Extractors whose rejections are [`ApiError`]s, so malformed input gets the documented JSON error.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use chatcore::domain::ApplicationToken;
use chatcore::events::{TRACEPARENT_HEADER, TraceContext};
use serde::de::DeserializeOwned;

use crate::http::error::ApiError;

/// A JSON request body.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// A JSON request body that may be left out: an empty body is `T::default()`.
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        // The body middleware has read it whole already (within the size limit).
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|error| ApiError::Internal(anyhow::anyhow!("reading the body: {error}")))?;
        if bytes.is_empty() {
            return Ok(Self(T::default()));
        }
        let request = Request::from_parts(parts, axum::body::Body::from(bytes));
        let JsonBody(value) = JsonBody::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// Query-string parameters.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// Path parameters.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// The client's address as the rate limits key it (behind trusted proxies the one they saw; an
/// IPv6 client by its /64), set by [`crate::http::middleware::rate_limit::limit_rate`].
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Self>()
            .copied()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no client address on the request")))
    }
}

/// The application a request acts for, resolved from its token (in `Authorization: Bearer`, or
/// in the path of the legacy form) by [`crate::http::middleware::rate_limit::limit_rate`] before the body is read.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub application_id: u64,
    /// The token the request presented: shown back to whoever presents it.
    pub token: ApplicationToken,
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Self>()
            .cloned()
            .ok_or(ApiError::ApplicationKeyRequired)
    }
}

/// The trace context for the events of this request when tracing is off: the caller's
/// `traceparent` continued, or a new trace (set by the request middleware).
pub struct RequestTrace(pub TraceContext);

impl<S: Send + Sync> FromRequestParts<S> for RequestTrace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let context = parts
            .extensions
            .get::<TraceContext>()
            .cloned()
            .unwrap_or_else(|| {
                let incoming = parts
                    .headers
                    .get(TRACEPARENT_HEADER)
                    .and_then(|value| value.to_str().ok());
                TraceContext::child_of(incoming)
            });
        Ok(Self(context))
    }
}
