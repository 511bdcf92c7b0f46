//! Applications: created and renamed synchronously; addressed by token.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chatcore::domain::{ApplicationName, ApplicationToken, InvalidInput};
use chatcore::store::ApplicationRow;
use serde::{Deserialize, Serialize};

use super::{PageParams, Pagination, paginate};
use crate::AppState;
use crate::error::ApiError;
use crate::extract::{JsonBody, QueryParams};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/applications", get(list).post(create))
        .route("/applications/{token}", get(show).put(update))
}

#[derive(Debug, Deserialize)]
struct ApplicationInput {
    name: Option<String>,
}

impl ApplicationInput {
    fn name(&self) -> Result<ApplicationName, InvalidInput> {
        let raw = self
            .name
            .as_deref()
            .ok_or_else(|| InvalidInput::new("name", "is required"))?;
        ApplicationName::parse(raw)
    }
}

#[derive(Debug, Serialize)]
struct ApplicationView {
    token: String,
    name: String,
    chats_count: u64,
}

impl From<ApplicationRow> for ApplicationView {
    fn from(row: ApplicationRow) -> Self {
        Self {
            token: row.token,
            name: row.name,
            chats_count: row.chats_count,
        }
    }
}

#[derive(Debug, Serialize)]
struct ApplicationList {
    applications: Vec<ApplicationView>,
    pagination: Pagination,
}

async fn create(
    State(state): State<AppState>,
    JsonBody(input): JsonBody<ApplicationInput>,
) -> Result<(StatusCode, Json<ApplicationView>), ApiError> {
    let name = input.name()?;
    let row = state.inner.store.create_application(&name).await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

async fn list(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<ApplicationList>, ApiError> {
    let page = params.parse(&state)?;
    let rows = state.inner.store.list_applications(page).await?;
    let (rows, pagination) = paginate(rows, page);
    Ok(Json(ApplicationList {
        applications: rows.into_iter().map(ApplicationView::from).collect(),
        pagination,
    }))
}

fn parse_token(raw: &str) -> Result<ApplicationToken, ApiError> {
    ApplicationToken::parse(raw).map_err(|_| ApiError::NotFound("application"))
}

async fn show(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Json<ApplicationView>, ApiError> {
    let token = parse_token(&token)?;
    let row = state
        .inner
        .store
        .find_application(&token)
        .await?
        .ok_or(ApiError::NotFound("application"))?;
    Ok(Json(row.into()))
}

async fn update(
    State(state): State<AppState>,
    Path(token): Path<String>,
    JsonBody(input): JsonBody<ApplicationInput>,
) -> Result<Json<ApplicationView>, ApiError> {
    let token = parse_token(&token)?;
    let name = input.name()?;
    let row = state
        .inner
        .store
        .rename_application(&token, &name)
        .await?
        .ok_or(ApiError::NotFound("application"))?;
    Ok(Json(row.into()))
}
