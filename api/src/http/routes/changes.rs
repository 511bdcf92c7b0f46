//! The change logs: a chat's (every stored change of its messages, created, updated, deleted, in
//! the order of the chat's sequence) and the application's feed (every chat's changes, each
//! chat's in its order), from any point; what a backend reads to follow a chat, or every chat,
//! without missing or repeating a change.
#![allow(
    unused_qualifications,
    reason = "utoipa::path expands IntoParams after tuple params with a qualified path"
)]

use axum::Json;
use axum::extract::State;
use chatcore::domain::{FeedCursor, PageInput, PagePosition, PageRequest};
use chatcore::feed::{ChangeView, FeedChangeView};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::parse_number;
use crate::app::client_tokens::Access;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{PathParams, QueryParams, Tenant};
use crate::http::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(feed))
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
    let (after, per_page) =
        keyed_page(&state, params.after.as_deref(), params.per_page.as_deref())?;
    let mut rows = state
        .service()
        .list_changes(
            tenant.authorize(Access::Read, chat_number)?,
            chat_number,
            after,
            per_page + 1,
        )
        .await?;
    let more = cut_to_page(&mut rows, per_page);
    let next_after = rows.last().map(|row| row.sequence).filter(|_| more);
    Ok(Json(ChangeList {
        changes: rows.into_iter().map(ChangeView::from).collect(),
        pagination: ChangePagination {
            per_page,
            next_after,
        },
    }))
}

/// The page after a key (default 0: from the start) and its size, checked as every list's.
fn keyed_page(
    state: &AppState,
    after: Option<&str>,
    per_page: Option<&str>,
) -> Result<(u64, u32), ApiError> {
    let settings = state.settings();
    let page = PageRequest::parse(
        PageInput {
            page: None,
            per_page,
            after: Some(after.unwrap_or("0")),
            before: None,
            cursor: None,
        },
        settings.default_page_size,
        settings.max_page_size,
    )
    .map_err(ApiError::bad_parameter)?;
    let after = match page.position {
        PagePosition::After(after) => after,
        PagePosition::Page(_) | PagePosition::Before(_) | PagePosition::AfterHit(_) => 0,
    };
    Ok((after, page.per_page))
}

/// Cuts the one extra row fetched to learn whether more follow; true when more do.
fn cut_to_page<T>(rows: &mut Vec<T>, per_page: u32) -> bool {
    let more = rows.len() > per_page as usize;
    rows.truncate(per_page as usize);
    more
}

/// `?cursor=&per_page=` of the application's feed.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FeedParams {
    /// The changes after this place: the `cursor` of the last change you processed (opaque);
    /// without it, from the first change.
    cursor: Option<String>,
    /// Page size (default 25, at most 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    per_page: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
struct FeedPagination {
    per_page: u32,
    /// `cursor` of the next page; null when this page reached the end of the feed (ask again later
    /// with the `cursor` of the last change).
    next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
struct FeedList {
    changes: Vec<FeedChangeView>,
    pagination: FeedPagination,
}

/// The application's feed: every stored change of every chat's messages exactly once, each chat's
/// in the order they were stored (the order of its `sequence`), for a backend that follows every
/// chat.
#[utoipa::path(get, path = "/application/changes", tag = "messages", operation_id = "list_application_changes",
    security(("application_token" = [])),
    params(FeedParams),
    responses((status = 200, body = FeedList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn feed(
    State(state): State<AppState>,
    tenant: Tenant,
    QueryParams(params): QueryParams<FeedParams>,
) -> Result<Json<FeedList>, ApiError> {
    let after = match params.cursor.as_deref() {
        Some(raw) => FeedCursor::parse(raw).map_err(ApiError::bad_parameter)?.0,
        None => 0,
    };
    let (_, per_page) = keyed_page(&state, None, params.per_page.as_deref())?;
    let mut rows = state
        .service()
        .list_application_changes(tenant.application()?.id, after, per_page + 1)
        .await?;
    let more = cut_to_page(&mut rows, per_page);
    let next_cursor = rows
        .last()
        .filter(|_| more)
        .map(|row| FeedCursor(row.application_sequence).encode());
    Ok(Json(FeedList {
        changes: rows.into_iter().map(FeedChangeView::from).collect(),
        pagination: FeedPagination {
            per_page,
            next_cursor,
        },
    }))
}
