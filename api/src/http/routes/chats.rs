//! Chats: created asynchronously (202 with the allocated number), read from the storage.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chatcore::domain::{ChatTitle, InvalidInput, Metadata, serialize_timestamp};
use chatcore::feed::ChatDetails;
use chatcore::store::ChatRow;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Accepted, parse_number};
use crate::app::NewChatDetails;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{OptionalJsonBody, PathParams, QueryParams, RequestTrace, Tenant};
use crate::http::idempotency_key::IdempotencyKey;
use crate::http::pagination::{PageParams, Pagination, paginate};
use crate::http::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show))
}

#[derive(Debug, Serialize, ToSchema)]
struct ChatView {
    number: u64,
    messages_count: u64,
    #[serde(serialize_with = "serialize_timestamp")]
    created_at: DateTime<Utc>,
    #[serde(flatten)]
    details: ChatDetails,
}

impl From<ChatRow> for ChatView {
    fn from(row: ChatRow) -> Self {
        Self {
            number: row.number,
            messages_count: row.messages_count,
            created_at: row.created_at,
            details: ChatDetails {
                title: row.title,
                metadata: row.metadata,
            },
        }
    }
}

/// A new chat: the body is optional (an empty one, as the reference contract sends, is a chat
/// without title or metadata).
#[derive(Debug, Default, Deserialize, ToSchema)]
struct ChatInput {
    /// 1 to 255 characters (trimmed).
    #[schema(value_type = Option<String>, min_length = 1, max_length = 255)]
    title: Option<String>,
    /// Your own data: a JSON object of at most 32 keys and 4,096 bytes serialized.
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Value>,
}

impl ChatInput {
    fn parse(self) -> Result<NewChatDetails, InvalidInput> {
        Ok(NewChatDetails {
            title: self.title.as_deref().map(ChatTitle::parse).transpose()?,
            metadata: self
                .metadata
                .filter(|value| !value.is_null())
                .as_ref()
                .map(Metadata::parse)
                .transpose()?,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct ChatList {
    chats: Vec<ChatView>,
    pagination: Pagination,
}

/// Accepts a chat, with an optional title and metadata: 202 with its number once the event is
/// durable; written a moment later.
#[utoipa::path(post, path = "/chats", tag = "chats", operation_id = "create_chat",
    security(("application_token" = [])),
    params(IdempotencyKey), request_body(content = Option<ChatInput>, description = "optional: a chat without title or metadata needs no body"),
    responses((status = 202, description = "accepted", body = Accepted), (status = 400, body = ErrorBody),
        (status = 409, description = "`idempotency_key_in_use`: a request with this `Idempotency-Key` is still running; retry after `Retry-After` seconds", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, description = "`validation_failed`: `title` or `metadata` breaks a rule; or `idempotency_key_reused`: the `Idempotency-Key` was used with another request", body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    RequestTrace(trace): RequestTrace,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    OptionalJsonBody(input): OptionalJsonBody<ChatInput>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let details = input.parse()?;
    let number = state
        .service_handle()
        .accept_chat(tenant.application_id, details, idempotency_key, &trace)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { number })))
}

/// Lists the chats of an application by number.
#[utoipa::path(get, path = "/chats", tag = "chats", operation_id = "list_chats",
    security(("application_token" = [])), params(PageParams),
    responses((status = 200, body = ChatList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<ChatList>, ApiError> {
    let page = params.parse(&state)?;
    let rows = state
        .service()
        .list_chats(tenant.application_id, page)
        .await?;
    let (rows, pagination) = paginate(rows, page, |row| row.number);
    Ok(Json(ChatList {
        chats: rows.into_iter().map(ChatView::from).collect(),
        pagination,
    }))
}

/// Shows one chat.
#[utoipa::path(get, path = "/chats/{number}", tag = "chats", operation_id = "show_chat",
    security(("application_token" = [])), params(("number" = u64, Path, minimum = 1, description = "number within the parent")),
    responses((status = 200, body = ChatView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(number): PathParams<String>,
) -> Result<Json<ChatView>, ApiError> {
    let number = parse_number("number", &number)?;
    let row = state
        .service()
        .find_chat(tenant.application_id, number)
        .await?;
    Ok(Json(row.into()))
}
