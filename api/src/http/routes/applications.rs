//! Applications: created, renamed and deleted synchronously (a deletion's purge runs in the
//! background); addressed by their token (`Authorization: Bearer`, or in the path of the legacy
//! form); their tokens rotated by the tenant and revoked by the operator.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chatcore::config::ApplicationCreation;
use chatcore::domain::{ApplicationName, ApplicationToken, InvalidInput, serialize_timestamp};
use chatcore::store::ApplicationRow;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::admin::AdminAccess;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{JsonBody, QueryParams, RequestTrace, Tenant};
use crate::http::pagination::{PageParams, Pagination, paginate};
use crate::http::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, update, delete))
        .routes(routes!(rotate_token))
        .routes(routes!(revoke_tokens))
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

/// An application as its tenant sees it: with the token the request presented (or, at creation
/// and rotation, the new one: shown once, the database keeps only its digest).
#[derive(Debug, Serialize, ToSchema)]
struct ApplicationView {
    token: String,
    name: String,
    chats_count: u64,
}

impl ApplicationView {
    fn new(row: ApplicationRow, token: &ApplicationToken) -> Self {
        Self {
            token: token.to_string(),
            name: row.name,
            chats_count: row.chats_count,
        }
    }
}

/// An application as the operator's listing shows it: the hint of its newest token, never the
/// token.
#[derive(Debug, Serialize, ToSchema)]
struct ApplicationSummary {
    /// The prefix and last 4 characters of the newest token, e.g. `chat_...x7Qa`.
    token_hint: String,
    name: String,
    chats_count: u64,
}

impl From<ApplicationRow> for ApplicationSummary {
    fn from(row: ApplicationRow) -> Self {
        Self {
            token_hint: row.token_hint,
            name: row.name,
            chats_count: row.chats_count,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct ApplicationList {
    applications: Vec<ApplicationSummary>,
    pagination: Pagination,
}

/// The answer of a rotation: the new token, and until when the older ones still work.
#[derive(Debug, Serialize, ToSchema)]
struct RotatedToken {
    #[serde(flatten)]
    application: ApplicationView,
    /// When the tokens before this one stop working (`CHAT_TOKEN_ROTATION_OVERLAP_SECONDS`).
    #[serde(serialize_with = "serialize_timestamp")]
    previous_tokens_expire_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
struct RevocationInput {
    /// A token of the application (a leaked one, say): every token of the application ends now.
    #[schema(value_type = String, required = true)]
    token: Option<String>,
}

/// Creates an application (synchronous). With `CHAT_APPLICATION_CREATION=admin`, only the
/// operator may (`Authorization: Bearer <admin token>`).
#[utoipa::path(post, path = "/applications", tag = "applications", operation_id = "create_application", request_body = ApplicationInput,
    security((), ("admin_token" = [])),
    responses((status = 201, description = "created; `token` is shown this once", body = ApplicationView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<ApplicationInput>,
) -> Result<(StatusCode, Json<ApplicationView>), ApiError> {
    if state.settings().application_creation == ApplicationCreation::Admin {
        AdminAccess::verify(&headers, &state)?;
    }
    let name = input.name()?;
    let (row, token) = state.service().create_application(&name).await?;
    Ok((StatusCode::CREATED, Json(ApplicationView::new(row, &token))))
}

/// Lists applications in creation order, each with the hint of its token (never the token): for
/// the operator only (`Authorization: Bearer <admin token>`).
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
        applications: rows.into_iter().map(ApplicationSummary::from).collect(),
        pagination,
    }))
}

/// Shows the application of the token.
#[utoipa::path(get, path = "/application", tag = "applications", operation_id = "show_application",
    security(("application_token" = [])),
    responses((status = 200, body = ApplicationView), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn show(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<ApplicationView>, ApiError> {
    let application = tenant.application()?;
    let row = state.service().find_application(application.id).await?;
    Ok(Json(ApplicationView::new(row, application.token)))
}

/// Renames the application of the token (synchronous).
#[utoipa::path(put, path = "/application", tag = "applications", operation_id = "update_application", request_body = ApplicationInput,
    security(("application_token" = [])),
    responses((status = 200, body = ApplicationView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn update(
    State(state): State<AppState>,
    tenant: Tenant,
    JsonBody(input): JsonBody<ApplicationInput>,
) -> Result<Json<ApplicationView>, ApiError> {
    let application = tenant.application()?;
    let name = input.name()?;
    let row = state
        .service()
        .rename_application(application.id, &name)
        .await?;
    Ok(Json(ApplicationView::new(row, application.token)))
}

/// Deletes the application of the token: its tokens stop working at once and it leaves the
/// operator's listing; its chats, messages and search documents are purged in the background.
/// Its id is never given to another application.
#[utoipa::path(delete, path = "/application", tag = "applications", operation_id = "delete_application",
    security(("application_token" = [])),
    responses((status = 202, description = "deleted; the purge of its chats, messages and search documents runs in the background"),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    RequestTrace(trace): RequestTrace,
) -> Result<StatusCode, ApiError> {
    let application = tenant.application()?;
    state
        .service()
        .delete_application(application.id, application.token, &trace)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

/// Gives the application a new token (shown this once); the older tokens keep working for the
/// overlap (`previous_tokens_expire_at`, 24 hours by default), time to roll the new one out.
#[utoipa::path(post, path = "/application/token/rotate", tag = "applications", operation_id = "rotate_application_token",
    security(("application_token" = [])),
    responses((status = 201, description = "the new token", body = RotatedToken), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn rotate_token(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<(StatusCode, Json<RotatedToken>), ApiError> {
    let (row, token, previous_tokens_expire_at) = state
        .service()
        .rotate_token(tenant.application()?.id)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(RotatedToken {
            application: ApplicationView::new(row, &token),
            previous_tokens_expire_at,
        }),
    ))
}

/// Revokes every token of the application a token opens, at once (every replica refuses them
/// within a second), and answers the one replacing them, for the operator to hand to the tenant:
/// for the operator only (`Authorization: Bearer <admin token>`).
#[utoipa::path(post, path = "/admin/token-revocations", tag = "applications", operation_id = "revoke_application_tokens", request_body = RevocationInput,
    security(("admin_token" = [])),
    responses((status = 201, description = "revoked; `token` replaces them", body = ApplicationView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn revoke_tokens(
    _admin: AdminAccess,
    State(state): State<AppState>,
    JsonBody(input): JsonBody<RevocationInput>,
) -> Result<(StatusCode, Json<ApplicationView>), ApiError> {
    let raw = input
        .token
        .ok_or_else(|| InvalidInput::new("token", "is required"))?;
    let token = ApplicationToken::parse(&raw).map_err(|_| ApiError::NotFound("application"))?;
    let (row, replacement) = state.service().revoke_tokens(&token).await?;
    Ok((
        StatusCode::CREATED,
        Json(ApplicationView::new(row, &replacement)),
    ))
}
