//! The HTTP API: validates, resolves, allocates numbers, publishes confirmed events, answers.
//!
//! [`serve`] takes a configuration and a bound listener, so tests can run it on port 0. When the
//! queue is embedded (no `AMQP_URL`), the same process also runs the ingest and index consumers,
//! with the handlers of ingest-worker and indexer: that is the single-process embedded mode.

mod error;
mod extract;
mod idempotency;
mod routes;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use chatcore::Config;
use chatcore::adapters::Adapters;
use chatcore::consumer::Observers;
use chatcore::domain::{ApplicationToken, Number};
use chatcore::local_queue::LocalQueue;
use chatcore::metrics::Metrics;
use chatcore::numbering::{NumberAllocator, Scope};
use chatcore::queue::EventPublisher;
use chatcore::search::SearchIndex;
use chatcore::state::SharedState;
use chatcore::store::Storage;
use quick_cache::sync::Cache;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

/// Entries of the token -> application id cache. Applications are never deleted, so an entry
/// never goes stale.
const APPLICATION_CACHE_ENTRIES: usize = 100_000;
/// Entries of the cache of chats known to exist (chats are never deleted either).
const CHAT_CACHE_ENTRIES: usize = 500_000;

/// Cheap-to-clone state shared by every handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    metrics: Arc<Metrics>,
    store: Arc<dyn Storage>,
    allocator: NumberAllocator,
    publisher: Arc<dyn EventPublisher>,
    search: Arc<dyn SearchIndex>,
    state: Arc<dyn SharedState>,
    application_ids: Cache<String, u64>,
    known_chats: Cache<(u64, Number), ()>,
}

impl AppState {
    fn new(config: Config, adapters: &Adapters, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: Arc::clone(&adapters.storage),
                allocator: adapters.allocator.clone(),
                publisher: Arc::clone(&adapters.publisher),
                search: Arc::clone(&adapters.search),
                state: Arc::clone(&adapters.state),
                application_ids: Cache::new(APPLICATION_CACHE_ENTRIES),
                known_chats: Cache::new(CHAT_CACHE_ENTRIES),
                config,
                metrics,
            }),
        }
    }

    fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Records the latency of a call to a dependency.
    async fn time<T>(
        &self,
        dependency: &'static str,
        operation: &'static str,
        call: impl Future<Output = T>,
    ) -> T {
        self.inner.metrics.time(dependency, operation, call).await
    }

    /// Hands out the next number of the scope (the counter, and the database when a
    /// reservation is due).
    async fn allocate(&self, scope: &Scope) -> Result<Number, ApiError> {
        // The allocator has a span of its own.
        let started = std::time::Instant::now();
        let allocation = self.inner.allocator.allocate(scope).await;
        self.inner
            .metrics
            .record_call(self.inner.state.kind(), "allocate_number", started);
        Ok(allocation?)
    }

    /// Resolves a token to the internal application id (cached), or 404.
    async fn application_id(&self, raw_token: &str) -> Result<u64, ApiError> {
        let Ok(token) = ApplicationToken::parse(raw_token) else {
            return Err(ApiError::NotFound("application"));
        };
        if let Some(id) = self.inner.application_ids.get(token.as_str()) {
            return Ok(id);
        }
        let id = self
            .inner
            .store
            .application_id(&token)
            .await?
            .ok_or(ApiError::NotFound("application"))?;
        self.inner.application_ids.insert(token.to_string(), id);
        Ok(id)
    }

    fn pending_chat_key(&self, application_id: u64, chat_number: Number) -> String {
        format!(
            "{}:pending-chat:{application_id}:{chat_number}",
            self.inner.config.redis_key_prefix
        )
    }

    /// Succeeds when the chat is stored or was accepted (202) recently and is still on its way.
    async fn require_chat(&self, application_id: u64, chat_number: Number) -> Result<(), ApiError> {
        let key = (application_id, chat_number);
        if self.inner.known_chats.get(&key).is_some() {
            return Ok(());
        }
        if self
            .inner
            .store
            .find_chat(application_id, chat_number)
            .await?
            .is_some()
        {
            self.inner.known_chats.insert(key, ());
            return Ok(());
        }
        let pending = self
            .inner
            .state
            .get(&self.pending_chat_key(application_id, chat_number))
            .await?;
        if pending.is_some() {
            return Ok(());
        }
        Err(ApiError::NotFound("chat"))
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
    if adapters.local_queue.is_some() {
        // This process indexes, as the indexer binary would: make sure the index exists.
        adapters
            .search
            .ensure_index()
            .await
            .context("creating the search index")?;
    }
    let consumers = adapters.local_queue.as_ref().map(|local_queue| {
        spawn_embedded_consumers(&config, &adapters, local_queue, &metrics, shutdown.clone())
    });
    let state = AppState::new(config, &adapters, metrics);
    tracing::info!(
        address = %listener.local_addr()?,
        storage = adapters.storage.kind(),
        counters = adapters.state.kind(),
        queue = adapters.publisher.kind(),
        search = adapters.search.kind(),
        "api listening"
    );
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("serving http");
    // The consumers stop at the same signal; an unfinished batch stays queued for the next start.
    shutdown.cancel();
    for consumer in consumers.into_iter().flatten() {
        consumer.await.context("consumer task")??;
    }
    served
}

/// The ingest and index consumers of the embedded queue, with the worker binaries' handlers.
fn spawn_embedded_consumers(
    config: &Config,
    adapters: &Adapters,
    local_queue: &LocalQueue,
    metrics: &Arc<Metrics>,
    shutdown: CancellationToken,
) -> [tokio::task::JoinHandle<anyhow::Result<()>>; 2] {
    let observers = Observers {
        readiness: chatcore::health::Readiness::default(),
        metrics: Arc::clone(metrics),
    };
    let ingest = {
        let (config, queue, observers, shutdown) = (
            config.clone(),
            local_queue.clone(),
            observers.clone(),
            shutdown.clone(),
        );
        let writer = ingest_worker::IngestWriter::new(Arc::clone(&adapters.storage));
        tokio::spawn(async move {
            let queue_name = &config.topology.ingest_queue;
            chatcore::consumer::run_embedded(
                &queue,
                queue_name,
                &writer,
                &config.consumer,
                &shutdown,
                &observers,
            )
            .await
        })
    };
    let index = {
        let (config, queue) = (config.clone(), local_queue.clone());
        let indexer = indexer::Indexer::new(Arc::clone(&adapters.search));
        tokio::spawn(async move {
            let queue_name = &config.topology.index_queue;
            chatcore::consumer::run_embedded(
                &queue,
                queue_name,
                &indexer,
                &config.consumer,
                &shutdown,
                &observers,
            )
            .await
        })
    };
    [ingest, index]
}

/// Moves the dead letters of the embedded queue back into the ingest and index queues (after the
/// cause was fixed); returns how many per queue. An event that fails again is dead-lettered again.
pub async fn replay_dead_letters(config: &Config) -> anyhow::Result<Vec<(String, u64)>> {
    if config.amqp_url.is_some() {
        anyhow::bail!(
            "the queue is RabbitMQ: use `ingest-worker replay-dead-letters` and `indexer replay-dead-letters`"
        );
    }
    let local_queue = LocalQueue::open(
        &config.data_dir.join("queue.db"),
        &config.topology,
        config.api.publish_confirm_timeout,
    )
    .await?;
    let mut moved = Vec::new();
    for queue in [&config.topology.ingest_queue, &config.topology.index_queue] {
        moved.push((queue.clone(), local_queue.replay_dead_letters(queue).await?));
    }
    Ok(moved)
}

/// Applies the MySQL migrations and creates the search index and the broker topology, retrying
/// for up to `wait_for_services` while a dependency is not reachable yet (a fresh cluster).
pub async fn migrate_when_ready(
    config: &Config,
    wait_for_services: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait_for_services;
    loop {
        match migrate(config).await {
            Ok(()) => return Ok(()),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %format!("{error:#}"), "migration failed, retrying in 2s");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Applies the MySQL migrations and creates the search index and the broker topology of the
/// configured services. The embedded files migrate themselves when they are opened.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    if let Some(url) = &config.database_url {
        let pool = chatcore::store::mysql::connect(url, 2)
            .await
            .with_context(|| format!("connecting to mysql at {url}"))?;
        chatcore::store::mysql::migrate(&pool)
            .await
            .context("applying migrations")?;
    }
    if config.elasticsearch_url.is_some() {
        chatcore::adapters::connect_search(config)
            .await?
            .ensure_index()
            .await
            .context("creating the search index")?;
    }
    if let Some(url) = &config.amqp_url {
        let connection = chatcore::broker::connect(url, "chat-migrate").await?;
        let channel = connection.create_channel().await?;
        chatcore::broker::declare_topology(&channel, &config.topology).await?;
        connection.close(200, "done".into()).await?;
    }
    tracing::info!("migrations applied");
    Ok(())
}
