//! The HTTP API: validates, resolves, allocates numbers, publishes confirmed events, answers.
//!
//! [`serve`] takes a configuration and a bound listener, so tests can run it on port 0. When the
//! queue is embedded (no `AMQP_URL`), the same process also runs the ingest and index consumers
//! ([`chatcore::pipeline`]): that is the single-process embedded mode.
//!
//! Layers: `routes` (one module per resource: parse, call, render) -> [`service::ChatService`]
//! (the use cases) -> the adapters' traits, built by [`chatcore::adapters`].

mod error;
mod extract;
mod idempotency;
mod routes;
mod service;

use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use chatcore::Config;
use chatcore::adapters::Adapters;
use chatcore::config::ApiConfig;
use chatcore::domain::{ApplicationToken, Number};
use chatcore::metrics::Metrics;
use chatcore::pipeline::ReindexProgress;
use chatcore::store::{ReindexCursor, ReindexScope};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
use service::ChatService;

/// Cheap-to-clone state shared by every handler.
#[derive(Clone)]
pub struct AppState {
    service: Arc<ChatService>,
    settings: Arc<ApiConfig>,
    metrics: Arc<Metrics>,
}

impl AppState {
    fn new(config: &Config, adapters: &Adapters, metrics: Arc<Metrics>) -> Self {
        Self {
            service: Arc::new(ChatService::new(config, adapters)),
            settings: Arc::new(config.api.clone()),
            metrics,
        }
    }

    fn service(&self) -> &ChatService {
        &self.service
    }

    fn settings(&self) -> &ApiConfig {
        &self.settings
    }
}

pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// The OpenAPI 3.1 document, pretty-printed (what `/api/v1/openapi.json` serves).
pub fn openapi_json() -> String {
    routes::openapi()
        .to_pretty_json()
        .expect("the document serializes")
}

/// Serves the API on `listener` until `shutdown` is cancelled, then drains in-flight requests.
/// With the embedded queue it also runs the ingest and index consumers until then.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let adapters = Adapters::connect(&config, &metrics).await?;
    adapters.keep_connected(&shutdown);
    let consumers = if adapters.consumes_in_process {
        chatcore::pipeline::spawn_consumers(&config, &adapters, &metrics, &shutdown)
    } else {
        Vec::new()
    };
    tracing::info!(
        address = %listener.local_addr()?,
        storage = adapters.storage.kind(),
        counters = adapters.state.kind(),
        queue = adapters.queue.kind(),
        search = adapters.search.kind(),
        "api listening"
    );
    let state = AppState::new(&config, &adapters, metrics);
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("serving http");
    // The consumers stop at the same signal; an unfinished batch stays queued for the next start.
    shutdown.cancel();
    for consumer in consumers {
        consumer.await.context("consumer task")?;
    }
    served
}

/// Moves the dead letters of the ingest and index queues back into their queues (after the cause
/// was fixed); returns how many per queue. An event that fails again is dead-lettered again.
pub async fn replay_dead_letters(config: &Config) -> anyhow::Result<Vec<(String, u64)>> {
    let queue = chatcore::adapters::queue(config, &Metrics::new()).await?;
    chatcore::pipeline::replay_dead_letters(queue.as_ref(), &chatcore::events::Consumer::ALL).await
}

/// Rebuilds the search index from the storage: every message, or those of one application (its
/// token) or one of its chats, after `after`; prints the progress and where to resume.
pub async fn reindex(
    config: &Config,
    application: Option<&str>,
    chat: Option<u64>,
    after: ReindexCursor,
    shutdown: CancellationToken,
) -> anyhow::Result<ReindexProgress> {
    let metrics = Metrics::new();
    let storage = chatcore::adapters::storage(config, &metrics).await?;
    let search = chatcore::adapters::search(config, &metrics).await?;
    search
        .ensure_index()
        .await
        .context("creating the search index")?;
    let scope = match application {
        None => ReindexScope::All,
        Some(token) => {
            let unknown = || anyhow::anyhow!("no application with the token {token:?}");
            let token = ApplicationToken::parse(token).map_err(|_| unknown())?;
            let id = storage.application_id(&token).await?.ok_or_else(unknown)?;
            match chat {
                None => ReindexScope::Application(id),
                Some(number) => ReindexScope::Chat(
                    id,
                    Number::new(number).context("a chat number is at least 1")?,
                ),
            }
        }
    };
    let done = chatcore::pipeline::reindex(
        storage.as_ref(),
        search.as_ref(),
        scope,
        after,
        &shutdown,
        |progress| {
            println!(
                "reindexed {} messages; resume with --after {}",
                progress.indexed, progress.cursor
            );
        },
    )
    .await?;
    Ok(done)
}
