//! The state every handler and middleware shares: the use cases (client tokens among them), the
//! settings, the metrics, the limits and the live streams' hub.

use std::sync::Arc;

use chatcore::Config;
use chatcore::adapters::Adapters;
use chatcore::config::{AdminToken, ApiConfig};
use chatcore::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use super::live::LiveHub;
use super::middleware::rate_limit::buckets::RateLimiters;
use crate::app::ChatService;
use crate::app::client_tokens::ClientTokens;
use crate::app::webhooks::WebhookService;

/// The state shared by every handler, behind one `Arc`: axum clones it for every middleware
/// and extractor of every request, and one reference count is what a clone should cost (a
/// struct of nine `Arc`s and a `CancellationToken`, whose clone takes a lock, was a tenth of the
/// api's CPU under a `POST` load).
#[derive(Clone)]
pub(crate) struct AppState(Arc<SharedState>);

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

pub(crate) struct SharedState {
    service: Arc<ChatService>,
    webhooks: Arc<WebhookService>,
    client_tokens: Arc<ClientTokens>,
    settings: Arc<ApiConfig>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) admin_token: Arc<AdminToken>,
    pub(super) rate_limiters: Arc<RateLimiters>,
    pub(super) live: Arc<LiveHub>,
    /// Cancelled at the shutdown signal: `/readyz` answers 503 from then on.
    pub(super) draining: CancellationToken,
}

impl AppState {
    pub(crate) fn new(
        config: &Config,
        adapters: &Adapters,
        metrics: Arc<Metrics>,
        admin_token: AdminToken,
        client_tokens: ClientTokens,
        draining: CancellationToken,
        shutdown: &CancellationToken,
    ) -> Self {
        let rate_limiters = Arc::new(RateLimiters::new(
            config.api.rate_limits,
            config.api.trusted_proxy_hops,
            &metrics,
        ));
        rate_limiters.forget_quiet_clients(shutdown);
        Self(Arc::new(SharedState {
            live: LiveHub::start(
                Arc::clone(&adapters.queue),
                config.api.streams,
                Arc::clone(&metrics),
                shutdown.clone(),
            ),
            service: Arc::new(ChatService::new(config, adapters)),
            webhooks: Arc::new(WebhookService::new(
                Arc::clone(&adapters.storage),
                config.webhooks.clone(),
            )),
            client_tokens: Arc::new(client_tokens),
            settings: Arc::new(config.api.clone()),
            rate_limiters,
            metrics,
            admin_token: Arc::new(admin_token),
            draining,
        }))
    }

    pub(crate) fn service(&self) -> &ChatService {
        &self.service
    }

    /// The service, for work that outlives the request (a live stream).
    pub(crate) fn service_handle(&self) -> Arc<ChatService> {
        Arc::clone(&self.service)
    }

    pub(crate) fn webhooks(&self) -> &WebhookService {
        &self.webhooks
    }

    pub(crate) fn client_tokens(&self) -> &ClientTokens {
        &self.client_tokens
    }

    pub(crate) fn settings(&self) -> &ApiConfig {
        &self.settings
    }
}
