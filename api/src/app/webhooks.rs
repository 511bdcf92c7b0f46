//! The webhook endpoints an application registers: their destinations checked (public unless the
//! operator allows them), their secrets generated and rotated, their attempts listed and their
//! deliveries replayed. The webhook-dispatcher delivers.

use std::sync::Arc;
use std::time::Duration;

use chatcore::config::WebhookConfig;
use chatcore::domain::InvalidInput;
use chatcore::store::{AttemptRow, EndpointChanges, EndpointRow, NewEndpoint, Storage};
use chatcore::webhooks::destination;
use chatcore::webhooks::{EventTypes, WebhookSecret};

use super::error::AppError;

/// How long a rotated secret keeps signing beside the new one.
pub const SECRET_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// An endpoint to register, as the request gave it (parsed).
pub struct EndpointRequest {
    pub url: String,
    pub event_types: EventTypes,
    pub description: String,
}

pub struct WebhookService {
    storage: Arc<dyn Storage>,
    config: WebhookConfig,
}

impl WebhookService {
    pub fn new(storage: Arc<dyn Storage>, config: WebhookConfig) -> Self {
        Self { storage, config }
    }

    /// Registers an endpoint; it receives the changes stored from now on. Returns it with its
    /// secret (shown this once).
    pub async fn register(
        &self,
        application_id: u64,
        request: EndpointRequest,
    ) -> Result<(EndpointRow, WebhookSecret), AppError> {
        let url = self.checked_url(&request.url).await?;
        let secret = WebhookSecret::generate();
        let endpoint = NewEndpoint {
            url: &url,
            description: &request.description,
            event_types: &request.event_types,
            secret: &secret,
        };
        let limit = self.config.max_endpoints_per_application;
        let created = self
            .storage
            .webhooks()
            .create_endpoint(application_id, endpoint, limit)
            .await?
            .ok_or(AppError::WebhookQuotaExceeded(limit))?;
        Ok((created, secret))
    }

    pub async fn list(&self, application_id: u64) -> Result<Vec<EndpointRow>, AppError> {
        Ok(self
            .storage
            .webhooks()
            .list_endpoints(application_id)
            .await?)
    }

    pub async fn find(&self, application_id: u64, id: u64) -> Result<EndpointRow, AppError> {
        self.storage
            .webhooks()
            .find_endpoint(application_id, id)
            .await?
            .ok_or(AppError::NotFound("webhook endpoint"))
    }

    pub async fn change(
        &self,
        application_id: u64,
        id: u64,
        mut changes: EndpointChanges,
    ) -> Result<EndpointRow, AppError> {
        if let Some(url) = changes.url.take() {
            changes.url = Some(self.checked_url(&url).await?);
        }
        self.storage
            .webhooks()
            .change_endpoint(application_id, id, &changes)
            .await?
            .ok_or(AppError::NotFound("webhook endpoint"))
    }

    pub async fn delete(&self, application_id: u64, id: u64) -> Result<(), AppError> {
        if self
            .storage
            .webhooks()
            .delete_endpoint(application_id, id)
            .await?
        {
            return Ok(());
        }
        Err(AppError::NotFound("webhook endpoint"))
    }

    /// A new secret; the one it replaces keeps signing for [`SECRET_OVERLAP`].
    pub async fn rotate_secret(
        &self,
        application_id: u64,
        id: u64,
    ) -> Result<(EndpointRow, WebhookSecret), AppError> {
        let secret = WebhookSecret::generate();
        let previous_until = chatcore::store::now() + SECRET_OVERLAP;
        let endpoint = self
            .storage
            .webhooks()
            .rotate_endpoint_secret(application_id, id, &secret, previous_until)
            .await?
            .ok_or(AppError::NotFound("webhook endpoint"))?;
        Ok((endpoint, secret))
    }

    pub async fn replay(
        &self,
        application_id: u64,
        id: u64,
        after: u64,
    ) -> Result<EndpointRow, AppError> {
        self.storage
            .webhooks()
            .replay_endpoint(application_id, id, after)
            .await?
            .ok_or(AppError::NotFound("webhook endpoint"))
    }

    pub async fn attempts(
        &self,
        application_id: u64,
        id: u64,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AttemptRow>, AppError> {
        self.storage
            .webhooks()
            .list_attempts(application_id, id, before, limit)
            .await?
            .ok_or(AppError::NotFound("webhook endpoint"))
    }

    async fn checked_url(&self, raw: &str) -> Result<String, AppError> {
        destination::check_url(raw, &self.config.allowed)
            .await
            .map(String::from)
            .map_err(|refused| AppError::Invalid(InvalidInput::new("url", refused.0)))
    }
}
