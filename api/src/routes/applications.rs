//! Applications: created and renamed synchronously; addressed by token.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chatcore::domain::{ApplicationName, ApplicationToken, InvalidInput};
use chatcore::store::ApplicationRow;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{PageParams, Pagination, paginate};
use crate::AppState;
use crate::admin::AdminAccess;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{JsonBody, PathParams, QueryParams};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, update))
}

#[derive(Debug, Deserialize, ToSchema)]
struct ApplicationInput {
    /// 1 to 255 characters; surrounding whitespace is trimmed.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 255)]
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

#[derive(Debug, Serialize, ToSchema)]
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

#[derive(Debug, Serialize, ToSchema)]
struct ApplicationList {
    applications: Vec<ApplicationView>,
    pagination: Pagination,
}

/// Creates an application (synchronous).
#[utoipa::path(post, path = "/applications", tag = "applications", operation_id = "create_application", request_body = ApplicationInput,
    responses((status = 201, description = "created", body = ApplicationView),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    JsonBody(input): JsonBody<ApplicationInput>,
) -> Result<(StatusCode, Json<ApplicationView>), ApiError> {
    let name = input.name()?;
    let row = state.service().create_application(&name).await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// Lists applications in creation order, with their tokens: for the operator only
/// (`Authorization: Bearer <admin token>`).
#[utoipa::path(get, path = "/applications", tag = "applications", operation_id = "list_applications", params(PageParams),
    security(("admin_token" = [])),
    responses((status = 200, body = ApplicationList), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn list(
    _admin: AdminAccess,
    State(state): State<AppState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<ApplicationList>, ApiError> {
    let page = params.parse(&state)?;
    let rows = state.service().list_applications(page).await?;
    let (rows, pagination) = paginate(rows, page, |row| row.id);
    Ok(Json(ApplicationList {
        applications: rows.into_iter().map(ApplicationView::from).collect(),
        pagination,
    }))
}

fn parse_token(raw: &str) -> Result<ApplicationToken, ApiError> {
    ApplicationToken::parse(raw).map_err(|_| ApiError::NotFound("application"))
}

/// Shows one application.
#[utoipa::path(get, path = "/applications/{token}", tag = "applications", operation_id = "show_application", params(("token" = String, Path, description = "application token")),
    responses((status = 200, body = ApplicationView), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    PathParams(token): PathParams<String>,
) -> Result<Json<ApplicationView>, ApiError> {
    let token = parse_token(&token)?;
    let row = state.service().find_application(&token).await?;
    Ok(Json(row.into()))
}

/// Renames an application (synchronous).
#[utoipa::path(put, path = "/applications/{token}", tag = "applications", operation_id = "update_application", params(("token" = String, Path, description = "application token")), request_body = ApplicationInput,
    responses((status = 200, body = ApplicationView), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn update(
    State(state): State<AppState>,
    PathParams(token): PathParams<String>,
    JsonBody(input): JsonBody<ApplicationInput>,
) -> Result<Json<ApplicationView>, ApiError> {
    let token = parse_token(&token)?;
    let name = input.name()?;
    let row = state.service().rename_application(&token, &name).await?;
    Ok(Json(row.into()))
}
