//! Webhook endpoints of an application: registered, listed, changed, deleted, their secret
//! rotated, their attempts listed and their deliveries replayed from a cursor of the application's
//! feed. Deliveries are signed as the Standard Webhooks specification says (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature`).
#![allow(
    unused_qualifications,
    reason = "utoipa::path expands IntoParams after tuple params with a qualified path"
)]

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chatcore::domain::{
    FeedCursor, InvalidInput, PageInput, PageRequest, serialize_optional_timestamp,
    serialize_timestamp,
};
use chatcore::store::{AttemptRow, EndpointChanges, EndpointRow};
use chatcore::webhooks::EventTypes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::webhooks::{EndpointRequest, SECRET_OVERLAP};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{JsonBody, PathParams, QueryParams, Tenant};
use crate::http::state::AppState;

/// The longest description.
const MAX_DESCRIPTION_CHARS: usize = 255;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, change, delete))
        .routes(routes!(rotate_secret))
        .routes(routes!(attempts))
        .routes(routes!(replay))
}

/// An endpoint to register.
#[derive(Debug, Deserialize, ToSchema)]
struct EndpointInput {
    /// Where to POST the events: `http` or `https`, to a public address (private, loopback,
    /// link-local and metadata addresses are refused unless the operator allows them).
    #[schema(required = true, max_length = 2048)]
    url: Option<String>,
    /// The event types to deliver (default: all): `message.created`, `message.updated`,
    /// `message.deleted`, `chat.created`.
    events: Option<Vec<String>>,
    #[schema(max_length = 255)]
    description: Option<String>,
}

/// What to change of an endpoint (the fields left out stay).
#[derive(Debug, Deserialize, ToSchema)]
struct EndpointPatch {
    #[schema(max_length = 2048)]
    url: Option<String>,
    events: Option<Vec<String>>,
    #[schema(max_length = 255)]
    description: Option<String>,
    /// `true` stops the deliveries; `false` resumes them where they stopped (also after the
    /// endpoint was disabled for failing).
    disabled: Option<bool>,
}

/// Where to deliver again from.
#[derive(Debug, Deserialize, ToSchema)]
struct ReplayInput {
    /// A `cursor` of the application's feed (of a change, or of an attempt): every change after
    /// it is delivered again, in order. Null or absent: from the feed's first change.
    after: Option<String>,
}

/// A registered endpoint.
#[derive(Debug, Serialize, ToSchema)]
struct EndpointView {
    id: u64,
    url: String,
    description: String,
    /// The event types delivered.
    events: Vec<&'static str>,
    /// True once disabled (by `PATCH`, or for failing longer than the operator allows).
    disabled: bool,
    /// Why it was disabled (`webhook.disabled`).
    disabled_reason: Option<String>,
    #[serde(serialize_with = "serialize_optional_timestamp")]
    #[schema(value_type = Option<String>, format = DateTime)]
    disabled_at: Option<DateTime<Utc>>,
    /// The feed's `cursor` delivered through: every change up to it was answered 2xx (or not
    /// subscribed to).
    cursor: String,
    /// Failed attempts of the delivery now due (0 when none fails).
    failed_attempts: u32,
    #[serde(serialize_with = "serialize_timestamp")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "serialize_timestamp")]
    updated_at: DateTime<Utc>,
}

impl From<EndpointRow> for EndpointView {
    fn from(row: EndpointRow) -> Self {
        let events =
            EventTypes::from_stored(&row.event_types).unwrap_or_else(|_| EventTypes::all());
        Self {
            id: row.id,
            url: row.url,
            description: row.description,
            events: events.names().collect(),
            disabled: row.disabled_at.is_some(),
            disabled_reason: row.disabled_reason,
            disabled_at: row.disabled_at,
            cursor: FeedCursor(row.delivered_through).encode(),
            failed_attempts: row.failed_attempts,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// A registered endpoint with its signing secret (shown at registration and rotation only).
#[derive(Debug, Serialize, ToSchema)]
struct EndpointWithSecret {
    #[serde(flatten)]
    endpoint: EndpointView,
    /// `whsec_` and the base64 of the key: verify each delivery's `webhook-signature` with it.
    secret: String,
}

/// A rotated secret.
#[derive(Debug, Serialize, ToSchema)]
struct RotatedSecret {
    #[serde(flatten)]
    endpoint: EndpointView,
    /// The new secret; deliveries carry a signature with it and one with the previous secret
    /// until `previous_secret_valid_until` (24 hours).
    secret: String,
    #[serde(serialize_with = "serialize_timestamp")]
    previous_secret_valid_until: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
struct EndpointList {
    webhooks: Vec<EndpointView>,
}

/// One delivery attempt, or the `webhook.disabled` record.
#[derive(Debug, Serialize, ToSchema)]
struct AttemptView {
    id: u64,
    /// The delivery's `webhook-id` (the same for each attempt of one change).
    webhook_id: String,
    /// The event type, or `webhook.disabled` for the record of the endpoint being disabled.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    kind: String,
    /// The change's `cursor` in the application's feed.
    cursor: String,
    #[serde(serialize_with = "serialize_timestamp")]
    attempted_at: DateTime<Utc>,
    /// The endpoint's HTTP status; null when there was no answer (see `error`).
    status: Option<u16>,
    error: Option<String>,
    /// The start of the endpoint's answer.
    response: Option<String>,
    duration_ms: u32,
}

impl From<AttemptRow> for AttemptView {
    fn from(row: AttemptRow) -> Self {
        Self {
            id: row.id,
            webhook_id: row.webhook_id,
            kind: row.event_type,
            cursor: FeedCursor(row.feed_position).encode(),
            attempted_at: row.attempted_at,
            status: row.status_code,
            error: row.error,
            response: row.response,
            duration_ms: row.duration_ms,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct AttemptPagination {
    per_page: u32,
    /// `before` of the next (older) page; null on the last.
    next_before: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
struct AttemptList {
    attempts: Vec<AttemptView>,
    pagination: AttemptPagination,
}

/// `?before=&per_page=` of the attempts.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AttemptParams {
    /// The attempts older than this attempt `id` (default: from the newest).
    #[param(value_type = Option<u64>, minimum = 1)]
    before: Option<String>,
    /// Page size (default 25, at most 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    per_page: Option<String>,
}

fn parse_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>().map_err(|_| ApiError::BadRequest {
        message: "id must be a webhook endpoint's id".into(),
        field: Some("id"),
    })
}

fn parse_events(raw: Option<Vec<String>>) -> Result<Option<EventTypes>, InvalidInput> {
    raw.map(|names| EventTypes::parse(names.iter().map(String::as_str)))
        .transpose()
}

fn checked_description(raw: Option<String>) -> Result<Option<String>, InvalidInput> {
    match raw {
        Some(text) if text.chars().count() > MAX_DESCRIPTION_CHARS => Err(InvalidInput::new(
            "description",
            format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
        )),
        other => Ok(other),
    }
}

/// Registers an endpoint: it receives the changes stored from now on (replay for earlier ones).
#[utoipa::path(post, path = "/application/webhooks", tag = "webhooks", operation_id = "create_webhook",
    security(("application_token" = [])),
    request_body = EndpointInput,
    responses((status = 201, body = EndpointWithSecret), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "`quota_exceeded`: the application has as many endpoints as allowed", body = ErrorBody),
        (status = 422, description = "a field breaks a rule (a URL that resolves to a private address, an unknown event type)", body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    JsonBody(input): JsonBody<EndpointInput>,
) -> Result<(StatusCode, Json<EndpointWithSecret>), ApiError> {
    let url = input
        .url
        .ok_or_else(|| InvalidInput::new("url", "is required"))?;
    let request = EndpointRequest {
        url,
        event_types: parse_events(input.events)?.unwrap_or_else(EventTypes::all),
        description: checked_description(input.description)?.unwrap_or_default(),
    };
    let (endpoint, secret) = state
        .webhooks()
        .register(tenant.application()?.id, request)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(EndpointWithSecret {
            endpoint: endpoint.into(),
            secret: secret.expose().to_owned(),
        }),
    ))
}

/// Lists the application's endpoints (at most `CHAT_WEBHOOK_MAX_ENDPOINTS_PER_APPLICATION`).
#[utoipa::path(get, path = "/application/webhooks", tag = "webhooks", operation_id = "list_webhooks",
    security(("application_token" = [])),
    responses((status = 200, body = EndpointList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<EndpointList>, ApiError> {
    let rows = state.webhooks().list(tenant.application()?.id).await?;
    Ok(Json(EndpointList {
        webhooks: rows.into_iter().map(EndpointView::from).collect(),
    }))
}

/// Shows one endpoint.
#[utoipa::path(get, path = "/application/webhooks/{id}", tag = "webhooks", operation_id = "show_webhook",
    security(("application_token" = [])),
    params(("id" = u64, Path, description = "the endpoint's id")),
    responses((status = 200, body = EndpointView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(id): PathParams<String>,
) -> Result<Json<EndpointView>, ApiError> {
    let row = state
        .webhooks()
        .find(tenant.application()?.id, parse_id(&id)?)
        .await?;
    Ok(Json(row.into()))
}

/// Changes an endpoint's URL, event types, description, or stops (`disabled: true`) or resumes
/// (`disabled: false`) its deliveries.
#[utoipa::path(patch, path = "/application/webhooks/{id}", tag = "webhooks", operation_id = "change_webhook",
    security(("application_token" = [])),
    params(("id" = u64, Path, description = "the endpoint's id")),
    request_body = EndpointPatch,
    responses((status = 200, body = EndpointView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn change(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(id): PathParams<String>,
    JsonBody(input): JsonBody<EndpointPatch>,
) -> Result<Json<EndpointView>, ApiError> {
    let id = parse_id(&id)?;
    let changes = EndpointChanges {
        url: input.url,
        description: checked_description(input.description)?,
        event_types: parse_events(input.events)?,
        disabled: input.disabled,
    };
    let row = state
        .webhooks()
        .change(tenant.application()?.id, id, changes)
        .await?;
    Ok(Json(row.into()))
}

/// Deletes an endpoint and its attempts; its deliveries stop.
#[utoipa::path(delete, path = "/application/webhooks/{id}", tag = "webhooks", operation_id = "delete_webhook",
    security(("application_token" = [])),
    params(("id" = u64, Path, description = "the endpoint's id")),
    responses((status = 204, description = "deleted"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    state
        .webhooks()
        .delete(tenant.application()?.id, parse_id(&id)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Gives the endpoint a new secret; the previous one keeps signing beside it for 24 hours, so
/// receivers can switch without missing a delivery.
#[utoipa::path(post, path = "/application/webhooks/{id}/secret/rotate", tag = "webhooks", operation_id = "rotate_webhook_secret",
    security(("application_token" = [])),
    params(("id" = u64, Path, description = "the endpoint's id")),
    responses((status = 200, body = RotatedSecret), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn rotate_secret(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(id): PathParams<String>,
) -> Result<Json<RotatedSecret>, ApiError> {
    let (endpoint, secret) = state
        .webhooks()
        .rotate_secret(tenant.application()?.id, parse_id(&id)?)
        .await?;
    let previous_secret_valid_until = endpoint
        .previous_secret_until
        .unwrap_or_else(|| chatcore::store::now() + SECRET_OVERLAP);
    Ok(Json(RotatedSecret {
        endpoint: endpoint.into(),
        secret: secret.expose().to_owned(),
        previous_secret_valid_until,
    }))
}

/// The endpoint's delivery attempts, newest first (kept for
/// `CHAT_WEBHOOK_ATTEMPTS_RETENTION_HOURS`), with the `webhook.disabled` record when it was
/// disabled for failing.
#[utoipa::path(get, path = "/application/webhooks/{id}/attempts", tag = "webhooks", operation_id = "list_webhook_attempts",
    security(("application_token" = [])),
    params(("id" = u64, Path, description = "the endpoint's id"), AttemptParams),
    responses((status = 200, body = AttemptList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn attempts(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(id): PathParams<String>,
    QueryParams(params): QueryParams<AttemptParams>,
) -> Result<Json<AttemptList>, ApiError> {
    let settings = state.settings();
    let page = PageRequest::parse(
        PageInput {
            page: None,
            per_page: params.per_page.as_deref(),
            after: None,
            before: params.before.as_deref(),
            cursor: None,
        },
        settings.default_page_size,
        settings.max_page_size,
    )
    .map_err(ApiError::bad_parameter)?;
    let before = match page.position {
        chatcore::domain::PagePosition::Before(before) => Some(before),
        _ => None,
    };
    let mut rows = state
        .webhooks()
        .attempts(
            tenant.application()?.id,
            parse_id(&id)?,
            before,
            page.per_page + 1,
        )
        .await?;
    let more = rows.len() > page.per_page as usize;
    rows.truncate(page.per_page as usize);
    let next_before = rows.last().map(|row| row.id).filter(|_| more);
    Ok(Json(AttemptList {
        attempts: rows.into_iter().map(AttemptView::from).collect(),
        pagination: AttemptPagination {
            per_page: page.per_page,
            next_before,
        },
    }))
}

/// Delivers again every change after a cursor of the application's feed, in order (each with its
/// first `webhook-id`), then goes on with the new ones.
#[utoipa::path(post, path = "/application/webhooks/{id}/replay", tag = "webhooks", operation_id = "replay_webhook",
    security(("application_token" = [])),
    params(("id" = u64, Path, description = "the endpoint's id")),
    request_body = ReplayInput,
    responses((status = 202, description = "the deliveries are due", body = EndpointView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn replay(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(id): PathParams<String>,
    JsonBody(input): JsonBody<ReplayInput>,
) -> Result<(StatusCode, Json<EndpointView>), ApiError> {
    let after = match input.after.as_deref() {
        Some(raw) => FeedCursor::parse(raw).map_err(ApiError::bad_parameter)?.0,
        None => 0,
    };
    let row = state
        .webhooks()
        .replay(tenant.application()?.id, parse_id(&id)?, after)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(row.into())))
}
