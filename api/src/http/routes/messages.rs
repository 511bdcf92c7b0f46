//! Messages: created asynchronously (202), updated and deleted synchronously, read from the
//! storage, searched in the search index, followed live (Server-Sent Events).
#![allow(
    unused_qualifications,
    reason = "utoipa::path expands IntoParams after tuple params with a qualified path"
)]

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use chatcore::domain::{
    InvalidInput, MessageBody, Metadata, PageInput, SearchCursor, SearchInput, SearchRequest,
    SearchSort, Sender, serialize_timestamp,
};
use chatcore::feed::MessageDetails;
use chatcore::search::MessageHit;
use chatcore::store::{MessageEdit, MessageRow, MetadataEdit};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Accepted, parse_number};
use crate::app::NewMessageInput;
use crate::app::client_tokens::Access;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{
    ClientAddress, JsonBody, PathParams, QueryParams, RequestTrace, Tenant,
};
use crate::http::idempotency_key::IdempotencyKey;
use crate::http::pagination::{PageParams, Pagination, paginate};
use crate::http::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(search))
        .routes(routes!(stream))
        .routes(routes!(show, update, delete))
}

/// A new message.
#[derive(Debug, Deserialize, ToSchema)]
struct MessageInput {
    /// 1 to 65,536 bytes of UTF-8.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 65536)]
    body: Option<String>,
    /// Who sends it: an id of your choosing, 1 to 128 characters of `A-Z a-z 0-9 . _ : @ -`.
    /// With a client token it is the token's sender (a different one is 403).
    #[schema(value_type = Option<String>, pattern = "^[A-Za-z0-9._:@-]{1,128}$")]
    sender: Option<String>,
    /// Your own data: a JSON object of at most 32 keys and 4,096 bytes serialized.
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Value>,
}

impl MessageInput {
    fn parse(self) -> Result<NewMessageInput, InvalidInput> {
        let raw = self
            .body
            .ok_or_else(|| InvalidInput::new("body", "is required"))?;
        Ok(NewMessageInput {
            body: MessageBody::parse(raw)?,
            sender: self.sender.as_deref().map(Sender::parse).transpose()?,
            metadata: parse_metadata(self.metadata.as_ref())?,
        })
    }
}

/// `metadata` as given: absent and `null` both mean none.
fn parse_metadata(raw: Option<&serde_json::Value>) -> Result<Option<Metadata>, InvalidInput> {
    raw.filter(|value| !value.is_null())
        .map(Metadata::parse)
        .transpose()
}

/// An edit of a message: the new body, and its metadata replaced (an object), removed (`null`)
/// or kept (absent). The sender never changes.
#[derive(Debug, Deserialize, ToSchema)]
struct MessageEditInput {
    /// 1 to 65,536 bytes of UTF-8.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 65536)]
    body: Option<String>,
    /// A JSON object (at most 32 keys, 4,096 bytes) replaces the metadata, `null` removes it,
    /// leaving it out keeps it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Value>,
    /// Not allowed: a message keeps its sender (422).
    #[schema(value_type = Option<String>)]
    sender: Option<serde_json::Value>,
}

/// A field that is present, `null` included (`Some(Value::Null)`), as told apart from an absent
/// one (`None`, by `#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(deserializer).map(Some)
}

impl MessageEditInput {
    fn parse(self) -> Result<MessageEdit, InvalidInput> {
        if self.sender.is_some() {
            return Err(InvalidInput::new(
                "sender",
                "cannot be changed: a message keeps its sender",
            ));
        }
        let raw = self
            .body
            .ok_or_else(|| InvalidInput::new("body", "is required"))?;
        let metadata = match self.metadata {
            None => MetadataEdit::Keep,
            Some(serde_json::Value::Null) => MetadataEdit::Remove,
            Some(value) => MetadataEdit::Replace(Metadata::parse(&value)?),
        };
        Ok(MessageEdit {
            body: MessageBody::parse(raw)?,
            metadata,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct MessageView {
    number: u64,
    body: String,
    #[serde(serialize_with = "serialize_timestamp")]
    created_at: DateTime<Utc>,
    #[serde(flatten)]
    details: MessageDetails,
}

impl From<MessageRow> for MessageView {
    fn from(row: MessageRow) -> Self {
        Self {
            details: MessageDetails::of(&row),
            number: row.number,
            body: row.body,
            created_at: row.created_at,
        }
    }
}

/// `?sender=` of a list of messages.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct MessageFilter {
    /// Only the messages of this sender.
    #[param(value_type = Option<String>, pattern = "^[A-Za-z0-9._:@-]{1,128}$")]
    sender: Option<String>,
}

/// A search hit: the message, and where it matched.
#[derive(Debug, Serialize, ToSchema)]
struct MessageHitView {
    number: u64,
    body: String,
    #[serde(serialize_with = "serialize_timestamp")]
    created_at: DateTime<Utc>,
    #[serde(flatten)]
    details: MessageDetails,
    /// A fragment of the body (about 24 words) with each match in `<mark>`...`</mark>`, `…` where
    /// the body was cut; HTML-escaped otherwise, so it can be put into a page as it is.
    highlight: String,
}

impl From<MessageHit> for MessageHitView {
    fn from(hit: MessageHit) -> Self {
        Self {
            number: hit.number.get(),
            body: hit.body,
            created_at: hit.created_at,
            details: MessageDetails {
                sender: hit.sender,
                metadata: hit.metadata,
                edited_at: hit.edited_at,
            },
            highlight: hit.highlight.into_string(),
        }
    }
}

/// A page of search hits in the order asked for (by default: the most query words whole first,
/// then the newest).
#[derive(Debug, Serialize, ToSchema)]
struct SearchResults {
    messages: Vec<MessageHitView>,
    pagination: Pagination,
}

#[derive(Debug, Serialize, ToSchema)]
struct UpdatedMessageView {
    number: u64,
    body: String,
    #[serde(serialize_with = "serialize_timestamp")]
    updated_at: DateTime<Utc>,
    #[serde(flatten)]
    details: MessageDetails,
}

#[derive(Debug, Serialize, ToSchema)]
struct MessageList {
    messages: Vec<MessageView>,
    pagination: Pagination,
}

/// `?query=&sender=&created_after=&created_before=&sort=&page=&per_page=&cursor=` of a search.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SearchParams {
    /// Words to find (1..256 characters), each matching a word or the start of one; `"a phrase"`
    /// in double quotes matches those whole words in a row. Other symbols are plain text.
    #[param(value_type = String, required = true, min_length = 1, max_length = 256)]
    query: Option<String>,
    /// Only the messages of this sender (exactly).
    #[param(value_type = Option<String>, min_length = 1, max_length = 128, pattern = "^[A-Za-z0-9._:@-]+$")]
    sender: Option<String>,
    /// Only the messages created at or after this time (RFC 3339, e.g. `2025-11-15T09:30:00Z`;
    /// to the millisecond).
    #[param(value_type = Option<String>, format = DateTime)]
    created_after: Option<String>,
    /// Only the messages created before this time (RFC 3339, to the millisecond; later than
    /// `created_after`).
    #[param(value_type = Option<String>, format = DateTime)]
    created_before: Option<String>,
    /// The order of the hits: `relevance` (the default: the hits with the most query words whole
    /// first, a whole-word match above a prefix-only one; the newest first among equals),
    /// `newest` (the highest number first) or `oldest` (the lowest first).
    #[param(value_type = Option<SearchSort>, inline)]
    sort: Option<String>,
    /// Page, 1-based (default 1), as deep as result 1,000 (`page * per_page`).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    page: Option<String>,
    /// Page size (default 25, at most 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    per_page: Option<String>,
    /// The `next_cursor` of the previous page (opaque): the next page, at a cost that does not
    /// depend on how deep it is. Only with the `sort` it was handed out for; cannot be combined
    /// with `page`.
    cursor: Option<String>,
}

impl SearchParams {
    fn parse(&self, state: &AppState) -> Result<SearchRequest, ApiError> {
        let settings = state.settings();
        SearchRequest::parse(
            SearchInput {
                query: self.query.as_deref(),
                sender: self.sender.as_deref(),
                created_after: self.created_after.as_deref(),
                created_before: self.created_before.as_deref(),
                sort: self.sort.as_deref(),
                page: PageInput {
                    page: self.page.as_deref(),
                    per_page: self.per_page.as_deref(),
                    cursor: self.cursor.as_deref(),
                    ..PageInput::default()
                },
            },
            settings.default_page_size,
            settings.max_page_size,
        )
        .map_err(ApiError::bad_parameter)
    }
}

/// Accepts a message: 202 with its number once the event is durable; written and indexed a moment later.
#[utoipa::path(post, path = "/chats/{chat_number}/messages", tag = "messages", operation_id = "create_message",
    security(("application_token" = [])),
    params(("chat_number" = u64, Path, minimum = 1, description = "chat number within the application"), IdempotencyKey),
    request_body = MessageInput,
    responses((status = 202, description = "accepted", body = Accepted), (status = 400, body = ErrorBody),
        (status = 409, description = "`idempotency_key_in_use`: a request with this `Idempotency-Key` is still running; retry after `Retry-After` seconds", body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, description = "`validation_failed`: `body` breaks a rule; or `idempotency_key_reused`: the `Idempotency-Key` was used with another body", body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(chat_number): PathParams<String>,
    RequestTrace(trace): RequestTrace,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    JsonBody(input): JsonBody<MessageInput>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let chat_number = parse_number("chat_number", &chat_number)?;
    let application_id = tenant.authorize(Access::Write, chat_number)?;
    let mut message = input.parse()?;
    message.sender = tenant.sender_for(message.sender)?;
    let number = state
        .service_handle()
        .accept_message(
            application_id,
            chat_number,
            message,
            idempotency_key,
            &trace,
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { number })))
}

/// Lists the messages of a chat by number, of one sender with `?sender=`.
#[utoipa::path(get, path = "/chats/{chat_number}/messages", tag = "messages", operation_id = "list_messages",
    security(("application_token" = [])),
    params(("chat_number" = u64, Path, minimum = 1, description = "chat number within the application"), PageParams, MessageFilter),
    responses((status = 200, body = MessageList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(chat_number): PathParams<String>,
    QueryParams(params): QueryParams<PageParams>,
    QueryParams(filter): QueryParams<MessageFilter>,
) -> Result<Json<MessageList>, ApiError> {
    let chat_number = parse_number("chat_number", &chat_number)?;
    let page = params.parse(&state)?;
    let sender = filter
        .sender
        .as_deref()
        .map(Sender::parse)
        .transpose()
        .map_err(ApiError::bad_parameter)?;
    let rows = state
        .service()
        .list_messages(
            tenant.authorize(Access::Read, chat_number)?,
            chat_number,
            sender.as_ref(),
            page,
        )
        .await?;
    let (rows, pagination) = paginate(rows, page, |row| row.number);
    Ok(Json(MessageList {
        messages: rows.into_iter().map(MessageView::from).collect(),
        pagination,
    }))
}

/// Shows one message.
#[utoipa::path(get, path = "/chats/{chat_number}/messages/{number}", tag = "messages", operation_id = "show_message",
    security(("application_token" = [])),
    params(("chat_number" = u64, Path, minimum = 1, description = "chat number within the application"), ("number" = u64, Path, minimum = 1, description = "number within the parent")),
    responses((status = 200, body = MessageView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams((chat_number, number)): PathParams<(String, String)>,
) -> Result<Json<MessageView>, ApiError> {
    let chat_number = parse_number("chat_number", &chat_number)?;
    let number = parse_number("number", &number)?;
    let row = state
        .service()
        .find_message(
            tenant.authorize(Access::Read, chat_number)?,
            chat_number,
            number,
        )
        .await?;
    Ok(Json(row.into()))
}

/// Synchronous update of the body and the metadata (`edited_at` is set by the first). A number that was handed out but whose message is not stored yet gets
/// 409 `not_persisted_yet` (with Retry-After), so the client retries instead of losing its edit.
#[utoipa::path(put, path = "/chats/{chat_number}/messages/{number}", tag = "messages", operation_id = "update_message",
    security(("application_token" = [])),
    params(("chat_number" = u64, Path, minimum = 1, description = "chat number within the application"), ("number" = u64, Path, minimum = 1, description = "number within the parent")), request_body = MessageEditInput,
    responses((status = 200, body = UpdatedMessageView),
        (status = 409, description = "`not_persisted_yet`: the number was accepted but the message is not written yet; retry after `Retry-After` seconds", body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn update(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams((chat_number, number)): PathParams<(String, String)>,
    RequestTrace(trace): RequestTrace,
    JsonBody(input): JsonBody<MessageEditInput>,
) -> Result<Json<UpdatedMessageView>, ApiError> {
    let chat_number = parse_number("chat_number", &chat_number)?;
    let number = parse_number("number", &number)?;
    let edit = input.parse()?;
    let row = state
        .service()
        .update_message(
            tenant.authorize(Access::Write, chat_number)?,
            chat_number,
            number,
            &edit,
            &trace,
        )
        .await?;
    Ok(Json(UpdatedMessageView {
        details: MessageDetails::of(&row),
        number: row.number,
        body: row.body,
        updated_at: row.updated_at,
    }))
}

/// Searches the messages of one chat: every word must match a word or a word prefix, and every
/// phrase in double quotes its words in a row; optionally only one sender's messages, or those
/// created in a time range. Hits come by relevance (the most query words whole first, then the
/// newest), or newest or oldest first (`sort`). Each hit carries a highlighted fragment.
#[utoipa::path(get, path = "/chats/{chat_number}/messages/search", tag = "messages", operation_id = "search_messages",
    security(("application_token" = [])),
    params(("chat_number" = u64, Path, minimum = 1, description = "chat number within the application"), SearchParams),
    responses((status = 200, body = SearchResults), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn search(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(chat_number): PathParams<String>,
    QueryParams(params): QueryParams<SearchParams>,
) -> Result<Json<SearchResults>, ApiError> {
    let chat_number = parse_number("chat_number", &chat_number)?;
    let request = params.parse(&state)?;
    let hits = state
        .service()
        .search(
            tenant.authorize(Access::Read, chat_number)?,
            chat_number,
            &request,
        )
        .await?;
    let (page, sort) = (request.page, request.sort);
    let last_hit = hits
        .get(page.per_page as usize - 1)
        .map(|hit| SearchCursor::new(sort, hit.rank, hit.number.get()));
    let (hits, pagination) = paginate(hits, page, |hit| hit.number.get());
    let pagination = pagination.with_next_cursor(last_hit);
    Ok(Json(SearchResults {
        messages: hits.into_iter().map(MessageHitView::from).collect(),
        pagination,
    }))
}

/// Deletes a message: 204. It leaves GET, lists, search and counts, its number is never reused,
/// and live streams get a `deleted` event. Deleting it again is 404, once its deletion is
/// published again (a 503 may come after the deletion was stored: the retry's 404 means the
/// search index has it too); a message accepted but not stored yet is 409 `not_persisted_yet`
/// (retry).
#[utoipa::path(delete, path = "/chats/{chat_number}/messages/{number}", tag = "messages", operation_id = "delete_message",
    security(("application_token" = [])),
    params(("chat_number" = u64, Path, minimum = 1, description = "chat number within the application"), ("number" = u64, Path, minimum = 1, description = "number within the parent")),
    responses((status = 204, description = "deleted"),
        (status = 409, description = "accepted but not persisted yet; retry", body = ErrorBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, description = "unknown application, chat or message, or a message deleted already", body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams((chat_number, number)): PathParams<(String, String)>,
    RequestTrace(trace): RequestTrace,
) -> Result<StatusCode, ApiError> {
    let chat_number = parse_number("chat_number", &chat_number)?;
    let number = parse_number("number", &number)?;
    state
        .service()
        .delete_message(
            tenant.authorize(Access::Write, chat_number)?,
            chat_number,
            number,
            &trace,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The header a reconnecting Server-Sent Events client sends: the id (change sequence) of the
/// last event it received.
const LAST_EVENT_ID: &str = "last-event-id";

/// `?last_event_id=` of a stream: what a browser's `EventSource` cannot send as a header on its
/// first request (it sends `Last-Event-ID` itself only when it reconnects).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StreamParams {
    /// `Last-Event-ID` as a query parameter, with the same meaning (0: the chat as it is now, then
    /// live); the header wins when both are given, so a reconnecting EventSource resumes where it
    /// was.
    #[param(value_type = Option<u64>, minimum = 0)]
    last_event_id: Option<String>,
}

/// A change sequence given as `Last-Event-ID` or `?last_event_id=` (`field` names which).
fn parse_last_event_id(raw: &str, field: &'static str) -> Result<u64, ApiError> {
    raw.trim().parse::<u64>().map_err(|_| ApiError::BadRequest {
        message: format!("{field} must be a change sequence (0 or more)"),
        field: Some(field),
    })
}

/// Follows a chat live (Server-Sent Events): an event for every message created, updated or
/// deleted once it is stored (`event:` created, updated or deleted; `id:` the change's sequence
/// in the chat's change log, see `/chats/{chat_number}/changes`; `data:` the message as JSON),
/// and a comment line as heartbeat. Without `Last-Event-ID` the stream sends the changes after
/// the chat's latest one. With `Last-Event-ID` (what an EventSource sends when it reconnects)
/// every change after that sequence is sent first, from the change log, in sequence order (edits
/// and deletions of older messages included), then the stream goes live without a gap or a
/// duplicate; `Last-Event-ID: 0` sends the chat as it is now (each message that is not deleted,
/// as `created`, with the sequence of its latest change) first. A reader that falls behind is
/// disconnected and resumes the same way. Clients that stored a message number as the last id
/// (before change sequences) resume with 0 once. `?last_event_id=` means the same as the header,
/// for a browser's EventSource (it sends the header only when it reconnects, which then wins).
#[utoipa::path(get, path = "/chats/{chat_number}/messages/stream", tag = "messages", operation_id = "stream_messages",
    security(("application_token" = [])),
    params(("chat_number" = u64, Path, minimum = 1, description = "chat number within the application"),
        ("Last-Event-ID" = Option<u64>, Header, description = "resume after this change sequence (0: the chat as it is now, then live); wins over `?last_event_id=`"),
        StreamParams),
    responses((status = 200, description = "a stream of Server-Sent Events (it ends after `CHAT_STREAM_MAX_LIFETIME_SECONDS`); each `data:` is a StreamedMessage", content_type = "text/event-stream", body = crate::http::openapi::EventStreamBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, description = "a dependency did not answer, or this replica does not hear stored changes right now; retry", body = ErrorBody)))]
async fn stream(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(chat_number): PathParams<String>,
    client: ClientAddress,
    QueryParams(params): QueryParams<StreamParams>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let chat_number = parse_number("chat_number", &chat_number)?;
    let last_event_id = match (headers.get(LAST_EVENT_ID), params.last_event_id) {
        (Some(header), _) => Some(parse_last_event_id(
            header.to_str().unwrap_or_default(),
            "Last-Event-ID",
        )?),
        (None, Some(query)) => Some(parse_last_event_id(&query, "last_event_id")?),
        (None, None) => None,
    };
    let chat = state
        .service()
        .stream_target(tenant.authorize(Access::Read, chat_number)?, chat_number)
        .await?;
    let subscription = state.live.open(chat, client.0).await?;
    Ok(state
        .live
        .serve(subscription, state.service_handle(), last_event_id))
}
