//! Client tokens: minted by the application (with its own token) for one end user's browser or
//! app, and all revoked at once.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chatcore::domain::{InvalidInput, Sender, serialize_timestamp};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::client_tokens::{Access, ChatSelection, ClientTokenRequest, EveryChat};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{JsonBody, Tenant};
use crate::http::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(mint))
        .routes(routes!(revoke_all))
}

/// What a client token grants.
#[derive(Debug, Deserialize, ToSchema)]
struct ClientTokenInput {
    /// Who the token speaks for: every message posted with it has this sender (1 to 128
    /// characters of `A-Z a-z 0-9 . _ : @ -`).
    #[schema(value_type = String, required = true, min_length = 1, max_length = 128)]
    sender: Option<String>,
    /// `"*"` (every chat, and the chat list; with `write`, creating chats) or up to 100 chat
    /// numbers.
    #[schema(value_type = ChatsInput, required = true)]
    chats: Option<ChatsInput>,
    /// `read` (lists, show, search, stream, changes) and/or `write` (post, edit, delete messages).
    #[schema(value_type = Vec<Access>, required = true, min_items = 1)]
    scopes: Option<Vec<Access>>,
    /// Seconds until the token expires: default 3600, at most `CHAT_CLIENT_TOKEN_MAX_LIFETIME_SECONDS`
    /// (86400 by default).
    #[schema(minimum = 1)]
    expires_in: Option<u64>,
}

/// `"*"`, or 1 to 100 chat numbers.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
enum ChatsInput {
    Every(EveryChat),
    Listed(Vec<u64>),
}

impl ClientTokenInput {
    fn request(self, state: &AppState) -> Result<ClientTokenRequest, InvalidInput> {
        let sender = self
            .sender
            .ok_or_else(|| InvalidInput::new("sender", "is required"))
            .and_then(|raw| Sender::parse(&raw))?;
        let chats = match self.chats {
            None => return Err(InvalidInput::new("chats", "is required")),
            Some(ChatsInput::Every(EveryChat::Every)) => ChatSelection::Every,
            Some(ChatsInput::Listed(numbers)) => ChatSelection::listed(&numbers)?,
        };
        ClientTokenRequest::new(
            sender,
            chats,
            &self.scopes.unwrap_or_default(),
            self.expires_in,
            state.settings().client_tokens.max_lifetime,
        )
    }
}

/// A minted client token.
#[derive(Debug, Serialize, ToSchema)]
struct ClientTokenView {
    /// A JWT (HS256): send it as `Authorization: Bearer <token>` on the chat routes, or as
    /// `?access_token=` on a chat's stream.
    token: String,
    #[serde(serialize_with = "serialize_timestamp")]
    expires_at: DateTime<Utc>,
}

/// Mints a client token for one end user: it opens the chats it names (or every chat) for
/// reading and/or writing as one sender, until it expires or the application revokes all.
/// Hand it to the user's browser or app; the application's own token never leaves the backend.
#[utoipa::path(post, path = "/application/client-tokens", tag = "applications", operation_id = "mint_client_token", request_body = ClientTokenInput,
    security(("application_token" = [])),
    responses((status = 201, description = "minted", body = ClientTokenView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn mint(
    State(state): State<AppState>,
    tenant: Tenant,
    JsonBody(input): JsonBody<ClientTokenInput>,
) -> Result<(StatusCode, Json<ClientTokenView>), ApiError> {
    let application_id = tenant.application()?.id;
    let request = input.request(&state)?;
    let minted = state.client_tokens().mint(application_id, request).await?;
    Ok((
        StatusCode::CREATED,
        Json(ClientTokenView {
            token: minted.token,
            expires_at: minted.expires_at,
        }),
    ))
}

/// Revokes every client token of the application at once: every replica refuses them within a
/// second. Tokens minted afterwards work.
#[utoipa::path(post, path = "/application/client-tokens/revoke-all", tag = "applications", operation_id = "revoke_client_tokens",
    security(("application_token" = [])),
    responses((status = 204, description = "revoked"), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn revoke_all(State(state): State<AppState>, tenant: Tenant) -> Result<StatusCode, ApiError> {
    state
        .client_tokens()
        .revoke_all(tenant.application()?.id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
