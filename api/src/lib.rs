//! The HTTP API: validates, resolves, allocates numbers, publishes confirmed events, answers.
//!
//! [`serve`] takes a configuration and a bound listener, so tests can run it on port 0.

mod error;
mod extract;
mod idempotency;
mod routes;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use chatcore::Config;
use chatcore::broker::Publisher;
use chatcore::domain::{ApplicationToken, Number};
use chatcore::metrics::Metrics;
use chatcore::numbering::{NumberAllocator, Scope};
use chatcore::search::SearchIndex;
use chatcore::store::Store;
use quick_cache::sync::Cache;
use redis::aio::ConnectionManager;
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
    store: Store,
    allocator: NumberAllocator,
    publisher: Publisher,
    search: SearchIndex,
    redis: ConnectionManager,
    application_ids: Cache<String, u64>,
    known_chats: Cache<(u64, Number), ()>,
}

impl AppState {
    /// Connects to every dependency; fails fast when one is unreachable.
    pub async fn connect(config: Config) -> anyhow::Result<Self> {
        let pool = chatcore::store::connect(&config.database_url, config.database_max_connections)
            .await
            .with_context(|| format!("connecting to mysql at {}", config.database_url))?;
        let redis = chatcore::connect_redis(&config.redis_url)
            .await
            .with_context(|| format!("connecting to redis at {}", config.redis_url))?;
        let metrics = Metrics::new();
        let publisher = Publisher::connect(
            config.amqp_url.clone(),
            config.topology.clone(),
            config.api.publish_confirm_timeout,
            Arc::clone(&metrics),
        )
        .await
        .with_context(|| format!("connecting to rabbitmq at {}", config.amqp_url))?;
        let search = SearchIndex::connect(&config.elasticsearch_url, &config.elasticsearch_index)?;
        let allocator = NumberAllocator::new(
            redis.clone(),
            pool.clone(),
            &config.redis_key_prefix,
            config.number_block_size,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                store: Store::new(pool, Arc::clone(&metrics)),
                allocator,
                publisher,
                search,
                redis,
                application_ids: Cache::new(APPLICATION_CACHE_ENTRIES),
                known_chats: Cache::new(CHAT_CACHE_ENTRIES),
                config,
                metrics,
            }),
        })
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

    /// Hands out the next number of the scope (Redis, and MySQL when a reservation is due).
    async fn allocate(&self, scope: &Scope) -> Result<Number, ApiError> {
        // The allocator has a span of its own.
        let started = std::time::Instant::now();
        let allocation = self.inner.allocator.allocate(scope).await;
        self.inner
            .metrics
            .record_call("redis", "allocate_number", started);
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

    /// Succeeds when the chat is in MySQL or was accepted (202) recently and is still on its way.
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
        let pending: bool = redis::cmd("EXISTS")
            .arg(self.pending_chat_key(application_id, chat_number))
            .query_async(&mut self.inner.redis.clone())
            .await?;
        if pending {
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
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = AppState::connect(config).await?;
    tracing::info!(address = %listener.local_addr()?, "api listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving http")
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

/// Applies the MySQL migrations and creates the search index and the broker topology.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let pool = chatcore::store::connect(&config.database_url, 2)
        .await
        .with_context(|| format!("connecting to mysql at {}", config.database_url))?;
    chatcore::store::migrate(&pool)
        .await
        .context("applying migrations")?;
    let search = SearchIndex::connect(&config.elasticsearch_url, &config.elasticsearch_index)?;
    search
        .ensure_index(config.elasticsearch_replicas)
        .await
        .context("creating the search index")?;
    let connection = chatcore::broker::connect(&config.amqp_url, "chat-migrate").await?;
    let channel = connection.create_channel().await?;
    chatcore::broker::declare_topology(&channel, &config.topology).await?;
    connection.close(200, "done".into()).await?;
    tracing::info!("migrations applied");
    Ok(())
}
