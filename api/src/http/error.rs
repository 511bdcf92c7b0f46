//! The one error type of the API. Every failure maps to a status and the documented JSON body
//! `{"error": {"code": "...", "message": "...", "field": "..."}}` (`field` only when one input is to blame).

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chatcore::domain::InvalidInput;
use chatcore::numbering::AllocationError;
use chatcore::queue::QueueError;
use chatcore::retry::Transient as _;
use chatcore::search::SearchError;
use chatcore::state::StateError;
use chatcore::store::StorageError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is not well-formed (bad JSON, bad query string or path parameter).
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<&'static str>,
    },
    /// 422: well-formed, but a value breaks a rule.
    #[error("{0}")]
    Invalid(InvalidInput),
    /// 404
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409: the message number was accepted but the message is not written yet.
    #[error("message {0} was accepted but is not persisted yet; retry shortly")]
    NotPersistedYet(u64),
    /// 409: another request with this Idempotency-Key is being processed.
    #[error("a request with this Idempotency-Key is in progress; retry shortly")]
    IdempotencyKeyInUse,
    /// 422: the Idempotency-Key was used before with a different request body.
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// 401: the admin routes need `Authorization: Bearer <admin token>`.
    #[error("this needs the admin token: Authorization: Bearer <token>")]
    Unauthorized,
    /// 401: the application routes without a token in the path need the application's token in
    /// `Authorization: Bearer`; it is missing, unknown, expired or revoked.
    #[error(
        "this needs the application's token: Authorization: Bearer <token> (missing, unknown, expired or revoked)"
    )]
    ApplicationKeyRequired,
    /// 401: a client token that is malformed, tampered with, expired or revoked (or whose
    /// application is deleted).
    #[error("the client token is not valid: malformed, altered, expired or revoked")]
    ClientTokenRefused,
    /// 403: the client token does not grant what the request does.
    #[error("the client token does not allow {0}")]
    NotGranted(&'static str),
    /// 403: the application has as many chats as `CHAT_MAX_CHATS_PER_APPLICATION` allows.
    #[error("the application has reached its quota of {0} chats")]
    ChatQuotaExceeded(u64),
    /// 403: the application has as many webhook endpoints as
    /// `CHAT_WEBHOOK_MAX_ENDPOINTS_PER_APPLICATION` allows.
    #[error("the application has reached its quota of {0} webhook endpoints")]
    WebhookQuotaExceeded(u64),
    /// 429: the application posted as many messages this minute as
    /// `CHAT_MAX_MESSAGES_PER_MINUTE_PER_APPLICATION` allows.
    #[error(
        "the application has posted its quota of {quota} messages this minute; retry after the Retry-After seconds"
    )]
    MessageQuotaExceeded { quota: u64, retry_after: Duration },
    /// 403: the bearer token is not the admin token.
    #[error("the bearer token is not the admin token")]
    Forbidden,
    /// 429: over the rate limit of the client address or the application token.
    #[error("too many requests; retry after the Retry-After seconds")]
    RateLimited { limit: u32, retry_after: Duration },
    /// 429: this replica serves as many live streams as it may (of the application, or in all).
    #[error("too many live streams open ({0}); retry later or close one")]
    TooManyStreams(&'static str),
    /// 408: the body did not arrive within `CHAT_BODY_TIMEOUT_MS`.
    #[error("the request body did not arrive within {0} ms")]
    BodyTimedOut(u128),
    /// 413
    #[error("request body exceeds the size limit")]
    PayloadTooLarge,
    /// 415
    #[error("expected a JSON body with Content-Type: application/json")]
    UnsupportedMediaType,
    /// 405
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 503: a dependency did not answer. Retried with the same `Idempotency-Key`, the request
    /// keeps the number it may have been given. What failed goes to the log, not to the client.
    #[error(
        "the service is unavailable for a moment; retry shortly (a POST with the same Idempotency-Key keeps its number)"
    )]
    Unavailable(String),
    /// 503: the request took longer than `CHAT_REQUEST_TIMEOUT_MS`.
    #[error("the request did not finish within {0} ms; retry shortly")]
    TimedOut(u128),
    /// 500: logged in full, answered opaquely.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized | Self::ApplicationKeyRequired | Self::ClientTokenRefused => {
                StatusCode::UNAUTHORIZED
            }
            Self::Forbidden
            | Self::NotGranted(_)
            | Self::ChatQuotaExceeded(_)
            | Self::WebhookQuotaExceeded(_) => StatusCode::FORBIDDEN,
            Self::RateLimited { .. }
            | Self::TooManyStreams(_)
            | Self::MessageQuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BodyTimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            Self::NotPersistedYet(_) | Self::IdempotencyKeyInUse => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) | Self::TimedOut(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::Invalid(_) => "validation_failed",
            Self::NotFound(_) => "not_found",
            Self::Unauthorized => "unauthorized",
            Self::ApplicationKeyRequired => "application_key_required",
            // RFC 6750's error codes of a bearer token.
            Self::ClientTokenRefused => "invalid_token",
            Self::NotGranted(_) => "insufficient_scope",
            Self::Forbidden => "forbidden",
            Self::ChatQuotaExceeded(_)
            | Self::WebhookQuotaExceeded(_)
            | Self::MessageQuotaExceeded { .. } => "quota_exceeded",
            Self::RateLimited { .. } => "rate_limited",
            Self::TooManyStreams(_) => "too_many_streams",
            Self::BodyTimedOut(_) => "body_timed_out",
            Self::NotPersistedYet(_) => "not_persisted_yet",
            Self::IdempotencyKeyInUse => "idempotency_key_in_use",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unavailable(_) => "service_unavailable",
            Self::TimedOut(_) => "timed_out",
            Self::Internal(_) => "internal_error",
        }
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { field, .. } => *field,
            Self::Invalid(invalid) => Some(invalid.field),
            _ => None,
        }
    }

    pub fn bad_parameter(invalid: InvalidInput) -> Self {
        Self::BadRequest {
            message: invalid.to_string(),
            field: Some(invalid.field),
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `validation_failed`.
    code: &'static str,
    /// What went wrong, for people.
    message: String,
    /// The input to blame, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Internal(error) => {
                tracing::error!(error = %format!("{error:#}"), "request failed")
            }
            Self::Unavailable(reason) => tracing::warn!(reason, "dependency unavailable"),
            _ => {}
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                field: self.field(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            Self::NotPersistedYet(_)
            | Self::IdempotencyKeyInUse
            | Self::Unavailable(_)
            | Self::TimedOut(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::RateLimited { limit, retry_after } => {
                let seconds = seconds_rounded_up(retry_after);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                set_rate_limit_headers(headers, limit, 0, retry_after);
            }
            Self::TooManyStreams(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Self::MessageQuotaExceeded { retry_after, .. } => {
                let seconds = seconds_rounded_up(retry_after);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            Self::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"chat admin\""),
                );
            }
            Self::ApplicationKeyRequired => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"chat application\""),
                );
            }
            Self::ClientTokenRefused => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"chat application\", error=\"invalid_token\"",
                    ),
                );
            }
            _ => {}
        }
        response
    }
}

impl From<InvalidInput> for ApiError {
    fn from(invalid: InvalidInput) -> Self {
        Self::Invalid(invalid)
    }
}

/// Every failure of a use case, as its answer.
impl From<AppError> for ApiError {
    fn from(error: AppError) -> Self {
        match error {
            AppError::NotFound(what) => Self::NotFound(what),
            AppError::NotPersistedYet(number) => Self::NotPersistedYet(number),
            AppError::IdempotencyKeyInUse => Self::IdempotencyKeyInUse,
            AppError::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            AppError::ChatQuotaExceeded(quota) => Self::ChatQuotaExceeded(quota),
            AppError::WebhookQuotaExceeded(quota) => Self::WebhookQuotaExceeded(quota),
            AppError::Invalid(invalid) => Self::Invalid(invalid),
            AppError::MessageQuotaExceeded { quota, retry_after } => {
                Self::MessageQuotaExceeded { quota, retry_after }
            }
            AppError::TimedOut(milliseconds) => Self::TimedOut(milliseconds),
            AppError::Storage(error) => error.into(),
            AppError::Allocation(error) => error.into(),
            AppError::Queue(error) => error.into(),
            AppError::State(error) => error.into(),
            AppError::Search(error) => error.into(),
            AppError::Internal(error) => Self::Internal(error),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        if error.is_transient() {
            return Self::Unavailable(format!("database unavailable: {error}"));
        }
        Self::Internal(error.into())
    }
}

impl From<AllocationError> for ApiError {
    fn from(error: AllocationError) -> Self {
        Self::Unavailable(format!("could not allocate a number: {error}"))
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        Self::Unavailable(format!(
            "the event was not confirmed durable ({error}); retry with the same Idempotency-Key"
        ))
    }
}

impl From<StateError> for ApiError {
    fn from(error: StateError) -> Self {
        Self::Unavailable(format!("shared state unavailable: {error}"))
    }
}

impl From<SearchError> for ApiError {
    fn from(error: SearchError) -> Self {
        if error.is_transient() {
            return Self::Unavailable(format!("search unavailable: {error}"));
        }
        Self::Internal(error.into())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            StatusCode::UNPROCESSABLE_ENTITY => Self::BadRequest {
                message: format!("invalid JSON body: {}", rejection.body_text()),
                field: None,
            },
            _ => Self::BadRequest {
                message: format!("malformed JSON body: {}", rejection.body_text()),
                field: None,
            },
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest {
            message: format!("invalid query string: {}", rejection.body_text()),
            field: None,
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::BadRequest {
            message: format!("invalid path parameter: {}", rejection.body_text()),
            field: None,
        }
    }
}

/// Whole seconds, rounded up (a client waiting the rounded-down figure would be refused again).
pub fn seconds_rounded_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`.
pub fn set_rate_limit_headers(
    headers: &mut HeaderMap,
    limit: u32,
    remaining: u32,
    reset: Duration,
) {
    for (name, value) in [
        ("ratelimit-limit", u64::from(limit)),
        ("ratelimit-remaining", u64::from(remaining)),
        ("ratelimit-reset", seconds_rounded_up(reset)),
    ] {
        headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
    }
}
