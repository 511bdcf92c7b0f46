//! Extractors whose rejections are [`ApiError`]s, so malformed input gets the documented JSON error.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use chatcore::domain::{ApplicationToken, Number, Sender};
use chatcore::events::{TRACEPARENT_HEADER, TraceContext};
use serde::de::DeserializeOwned;

use crate::app::client_tokens::{Access, ClientGrant};
use crate::http::error::ApiError;

/// A JSON request body.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// A JSON request body that may be left out: an empty body is `T::default()`.
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        // The body middleware has read it whole already (within the size limit).
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|error| ApiError::Internal(anyhow::anyhow!("reading the body: {error}")))?;
        if bytes.is_empty() {
            return Ok(Self(T::default()));
        }
        let request = Request::from_parts(parts, axum::body::Body::from(bytes));
        let JsonBody(value) = JsonBody::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// Query-string parameters.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// Path parameters.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// The client's address as the rate limits key it (behind trusted proxies the one they saw; an
/// IPv6 client by its /64), set by [`crate::http::middleware::rate_limit::limit_rate`].
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Self>()
            .copied()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no client address on the request")))
    }
}

/// The application a request acts for and with which credential, resolved from its token (in
/// `Authorization: Bearer`, in the path of the legacy form, or a client token in `?access_token=`
/// of a stream) by [`crate::http::middleware::rate_limit::limit_rate`] before the body is read.
/// Handlers reach the application only through a check: [`Tenant::application`] on the
/// application's own routes, [`Tenant::authorize`] (one chat) or [`Tenant::authorize_every_chat`]
/// (the chat list) on the chat routes.
#[derive(Debug, Clone)]
pub struct Tenant {
    application_id: u64,
    credential: Credential,
}

#[derive(Debug, Clone)]
pub enum Credential {
    /// The application's own token: everything of the application. Shown back to whoever
    /// presents it.
    Application(ApplicationToken),
    /// A client token: the chats, scopes and sender of its grant, on the chat routes only.
    Client(ClientGrant),
}

/// The application of a request made with the application's own token.
pub struct ApplicationKey<'a> {
    pub id: u64,
    pub token: &'a ApplicationToken,
}

impl Tenant {
    pub fn new(application_id: u64, credential: Credential) -> Self {
        Self {
            application_id,
            credential,
        }
    }

    /// The application, for its own routes: the application's token only.
    pub fn application(&self) -> Result<ApplicationKey<'_>, ApiError> {
        match &self.credential {
            Credential::Application(token) => Ok(ApplicationKey {
                id: self.application_id,
                token,
            }),
            Credential::Client(_) => Err(ApiError::ApplicationKeyRequired),
        }
    }

    /// The application, if the credential grants `access` to the chat.
    pub fn authorize(&self, access: Access, chat: Number) -> Result<u64, ApiError> {
        self.authorize_within(access, Some(chat))
    }

    /// The application, if the credential grants `access` to its chats as a whole (listing them,
    /// creating one): a client token for every chat (`"*"`).
    pub fn authorize_every_chat(&self, access: Access) -> Result<u64, ApiError> {
        self.authorize_within(access, None)
    }

    fn authorize_within(&self, access: Access, chat: Option<Number>) -> Result<u64, ApiError> {
        match &self.credential {
            Credential::Application(_) => Ok(self.application_id),
            Credential::Client(grant) if grant.allows(access, chat) => Ok(self.application_id),
            Credential::Client(_) => Err(ApiError::NotGranted(match (access, chat) {
                (Access::Read, Some(_)) => "reading this chat",
                (Access::Write, Some(_)) => "writing to this chat",
                (Access::Read, None) => "listing the chats (a token for every chat, \"*\", does)",
                (Access::Write, None) => {
                    "creating a chat (a token for every chat, \"*\", with write does)"
                }
            })),
        }
    }

    /// The sender of a message posted with this credential: a client token's own (a different
    /// one in the body is refused), or what the application's token names.
    pub fn sender_for(&self, requested: Option<Sender>) -> Result<Option<Sender>, ApiError> {
        match (&self.credential, requested) {
            (Credential::Application(_), requested) => Ok(requested),
            (Credential::Client(grant), Some(requested)) if requested != grant.sender => Err(
                ApiError::NotGranted("posting as another sender than the client token's"),
            ),
            (Credential::Client(grant), _) => Ok(Some(grant.sender.clone())),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Self>()
            .cloned()
            .ok_or(ApiError::ApplicationKeyRequired)
    }
}

/// The trace context for the events of this request when tracing is off: the caller's
/// `traceparent` continued, or a new trace (set by the request middleware).
pub struct RequestTrace(pub TraceContext);

impl<S: Send + Sync> FromRequestParts<S> for RequestTrace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let context = parts
            .extensions
            .get::<TraceContext>()
            .cloned()
            .unwrap_or_else(|| {
                let incoming = parts
                    .headers
                    .get(TRACEPARENT_HEADER)
                    .and_then(|value| value.to_str().ok());
                TraceContext::child_of(incoming)
            });
        Ok(Self(context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::client_tokens::ChatSelection;

    fn sender(raw: &str) -> Sender {
        Sender::parse(raw).expect("sender")
    }

    fn client(chats: ChatSelection, scopes: &[Access]) -> Tenant {
        Tenant::new(
            7,
            Credential::Client(ClientGrant {
                application_id: 7,
                sender: sender("u42"),
                chats,
                scopes: scopes.iter().copied().collect(),
                issued_at: chrono::Utc::now(),
                expires_at: chrono::Utc::now(),
            }),
        )
    }

    fn application() -> Tenant {
        Tenant::new(7, Credential::Application(ApplicationToken::generate()))
    }

    #[test]
    fn a_client_token_posts_as_its_own_sender_only() {
        let tenant = client(ChatSelection::Every, &[Access::Write]);
        assert_eq!(
            tenant.sender_for(None).expect("its own"),
            Some(sender("u42"))
        );
        assert_eq!(
            tenant.sender_for(Some(sender("u42"))).expect("the same"),
            Some(sender("u42"))
        );
        let refused = tenant
            .sender_for(Some(sender("u7")))
            .expect_err("another sender");
        assert_eq!(refused.status(), axum::http::StatusCode::FORBIDDEN);
        let application = application();
        assert_eq!(application.sender_for(None).expect("none"), None);
        assert_eq!(
            application.sender_for(Some(sender("u7"))).expect("any"),
            Some(sender("u7"))
        );
    }

    #[test]
    fn a_client_token_opens_its_chats_with_its_scopes_and_never_the_application() {
        let one = Number::new(1).expect("number");
        let two = Number::new(2).expect("number");
        let tenant = client(ChatSelection::listed(&[1]).expect("chats"), &[Access::Read]);
        assert_eq!(tenant.authorize(Access::Read, one).expect("granted"), 7);
        for refused in [
            tenant.authorize(Access::Write, one),
            tenant.authorize(Access::Read, two),
            tenant.authorize_every_chat(Access::Read),
        ] {
            let refused = refused.expect_err("not granted");
            assert_eq!(refused.status(), axum::http::StatusCode::FORBIDDEN);
            assert_eq!(refused.code(), "insufficient_scope");
        }
        let unauthorized = tenant
            .application()
            .err()
            .expect("not the application's token");
        assert_eq!(unauthorized.status(), axum::http::StatusCode::UNAUTHORIZED);
        let application = application();
        assert_eq!(
            application
                .authorize_every_chat(Access::Write)
                .expect("all"),
            7
        );
        assert_eq!(application.application().expect("its own").id, 7);
    }
}
