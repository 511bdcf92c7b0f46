//! A chat's change log: every stored change of its messages (created, updated, deleted), in the
//! order of its sequence, from any point; what a backend reads to follow a chat without missing
//! or repeating a change.
#![allow(
    unused_qualifications,
    reason = "utoipa::path expands IntoParams after tuple params with a qualified path"
)]

use axum::Json;
use axum::extract::State;
use chatcore::domain::{PageInput, PagePosition, PageRequest, serialize_timestamp};
use chatcore::store::ChangeRow;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::parse_number;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{PathParams, QueryParams, Tenant};
use crate::http::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

/// `?after=&per_page=` of the change log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ChangeParams {
    /// The changes after this sequence (default 0: from the first); pass the `sequence` of the
    /// last change you processed. Its cost does not depend on how far the log goes.
    #[param(value_type = Option<u64>, minimum = 0)]
    after: Option<String>,
    /// Page size (default 25, at most 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    per_page: Option<String>,
}

/// One change of a message, as it left the message.
#[derive(Debug, Serialize, ToSchema)]
struct ChangeView {
    /// The change's place in the chat's change log: 1, 2, 3, ... (the order the changes were
    /// stored in; the live stream's event id).
    sequence: u64,
    #[serde(rename = "type")]
    #[schema(rename = "type", value_type = String, pattern = "^message\\.(created|updated|deleted)$")]
    kind: &'static str,
    message: ChangedMessageView,
    /// When the change was stored.
    #[serde(serialize_with = "serialize_timestamp")]
    occurred_at: DateTime<Utc>,
}

/// The message as a change left it.
#[derive(Debug, Serialize, ToSchema)]
struct ChangedMessageView {
    number: u64,
    /// Empty once deleted.
    body: String,
    /// 1 when created, one more with each update and the deletion.
    version: u64,
    #[serde(serialize_with = "serialize_timestamp")]
    created_at: DateTime<Utc>,
}

impl From<ChangeRow> for ChangeView {
    fn from(change: ChangeRow) -> Self {
        let kind = match change.kind {
            chatcore::store::ChangeKind::Created => "message.created",
            chatcore::store::ChangeKind::Updated => "message.updated",
            chatcore::store::ChangeKind::Deleted => "message.deleted",
        };
        Self {
            sequence: change.sequence,
            kind,
            occurred_at: change.message.updated_at,
            message: ChangedMessageView {
                number: change.message.number,
                body: change.message.body,
                version: change.message.version,
                created_at: change.message.created_at,
            },
        }
    }
}

/// Where the next page starts.
#[derive(Debug, Serialize, ToSchema)]
struct ChangePagination {
    per_page: u32,
    /// `after` of the next page; null when this page reached the end of the log (ask again later
    /// with the `sequence` of the last change).
    next_after: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
struct ChangeList {
    changes: Vec<ChangeView>,
    pagination: ChangePagination,
}

/// The chat's change log after a sequence: every stored change of its messages exactly once, in
/// the order they were stored (an edit or a deletion of an older message included).
#[utoipa::path(get, path = "/chats/{chat_number}/changes", tag = "messages", operation_id = "list_changes",
    security(("application_token" = [])),
    params(("chat_number" = u64, Path, minimum = 1, description = "chat number within the application"), ChangeParams),
    responses((status = 200, body = ChangeList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    PathParams(chat_number): PathParams<String>,
    QueryParams(params): QueryParams<ChangeParams>,
) -> Result<Json<ChangeList>, ApiError> {
    let chat_number = parse_number("chat_number", &chat_number)?;
    let settings = state.settings();
    let page = PageRequest::parse(
        PageInput {
            page: None,
            per_page: params.per_page.as_deref(),
            after: Some(params.after.as_deref().unwrap_or("0")),
            before: None,
            cursor: None,
        },
        settings.default_page_size,
        settings.max_page_size,
    )
    .map_err(ApiError::bad_parameter)?;
    let PagePosition::After(after) = page.position else {
        unreachable!("an after page");
    };
    let mut rows = state
        .service()
        .list_changes(tenant.application_id, chat_number, after, page.per_page + 1)
        .await?;
    let more = rows.len() > page.per_page as usize;
    rows.truncate(page.per_page as usize);
    let next_after = rows.last().map(|row| row.sequence).filter(|_| more);
    Ok(Json(ChangeList {
        changes: rows.into_iter().map(ChangeView::from).collect(),
        pagination: ChangePagination {
            per_page: page.per_page,
            next_after,
        },
    }))
}
