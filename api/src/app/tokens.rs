//! The application tokens: resolving one (cached briefly, so a revocation reaches every replica),
//! rotating an application's token and the operator's revocation.

use std::time::{Duration, Instant};

use chatcore::domain::ApplicationToken;
use chatcore::store::ApplicationRow;
use chrono::{DateTime, Utc};

use super::{AppError, ChatService};

/// Entries of the token -> application cache.
pub(super) const TOKEN_CACHE_ENTRIES: usize = 100_000;
/// How long a replica trusts what it read of a token: a token revoked (or rotated out) on another
/// replica stops working here within this time.
const TOKEN_CACHE_TTL: Duration = Duration::from_millis(500);
/// What a replica read of a token, and when.
#[derive(Clone)]
pub(super) struct CachedGrant {
    application_id: u64,
    expires_at: Option<DateTime<Utc>>,
    fetched: Instant,
}

impl ChatService {
    /// Gives the application a new token; its other tokens stay valid for the overlap
    /// (`CHAT_TOKEN_ROTATION_OVERLAP_SECONDS`). Returns the new token and when the others end.
    pub async fn rotate_token(
        &self,
        application_id: u64,
    ) -> Result<(ApplicationRow, ApplicationToken, DateTime<Utc>), AppError> {
        // At most a year (checked at start), so the sum cannot overflow.
        let overlap = chrono::Duration::from_std(self.settings.token_rotation_overlap)
            .map_err(|error| AppError::Internal(error.into()))?;
        let others_valid_until = chatcore::store::now() + overlap;
        let (row, token) = self
            .replace_tokens(application_id, Some(others_valid_until))
            .await?;
        Ok((row, token, others_valid_until))
    }

    /// The operator's revocation: every token of the application that `token` opens ends now
    /// (on every replica within [`TOKEN_CACHE_TTL`]); the answer carries the one replacing them.
    pub async fn revoke_tokens(
        &self,
        token: &ApplicationToken,
    ) -> Result<(ApplicationRow, ApplicationToken), AppError> {
        let application_id = self
            .resolve_token(token)
            .await?
            .ok_or(AppError::NotFound("application"))?;
        self.replace_tokens(application_id, None).await
    }

    async fn replace_tokens(
        &self,
        application_id: u64,
        others_valid_until: Option<DateTime<Utc>>,
    ) -> Result<(ApplicationRow, ApplicationToken), AppError> {
        let token = ApplicationToken::generate();
        let replaced = self
            .storage
            .replace_tokens(application_id, &token, others_valid_until)
            .await?;
        if !replaced {
            return Err(AppError::NotFound("application"));
        }
        Ok((self.find_application(application_id).await?, token))
    }

    /// The application a token opens, None for an unknown, expired or revoked one. Answers are
    /// kept [`TOKEN_CACHE_TTL`] at most (and never past the token's end), so a revocation made on
    /// another replica takes effect here within that time.
    pub async fn resolve_token(&self, token: &ApplicationToken) -> Result<Option<u64>, AppError> {
        let digest = token.digest();
        if let Some(cached) = self.token_grants.get(&digest)
            && cached.fetched.elapsed() < TOKEN_CACHE_TTL
            && cached
                .expires_at
                .is_none_or(|expires_at| expires_at > Utc::now())
        {
            return Ok(Some(cached.application_id));
        }
        let Some(grant) = self.storage.resolve_token(&digest).await? else {
            self.token_grants.remove(&digest);
            return Ok(None);
        };
        self.token_grants.insert(
            digest,
            CachedGrant {
                application_id: grant.application_id,
                expires_at: grant.expires_at,
                fetched: Instant::now(),
            },
        );
        Ok(Some(grant.application_id))
    }
}
