//! The HTTP API: validates, resolves, allocates numbers, publishes confirmed events, answers.
//!
//! [`serve`] takes a configuration and a bound listener, so tests can run it on port 0. When the
//! queue is embedded (no `AMQP_URL`), the same process also runs the ingest and index consumers
//! ([`chatcore::pipeline`]): that is the single-process embedded mode.
//!
//! Layers: `routes` (one module per resource: parse, call, render) -> [`service::ChatService`]
//! (the use cases) -> the adapters' traits, built by [`chatcore::adapters`].

mod admin;
mod error;
mod extract;
mod idempotency;
mod live;
mod rate_limit;
mod request_body;
mod routes;
mod server;
mod service;
mod tenant;

use std::sync::Arc;

use anyhow::Context as _;
use chatcore::Config;
use chatcore::adapters::Adapters;
use chatcore::config::{AdminToken, ApiConfig};
use chatcore::domain::{ApplicationToken, Number};
use chatcore::metrics::Metrics;
use chatcore::pipeline::ReindexProgress;
use chatcore::store::{ReindexCursor, ReindexScope};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
use live::LiveHub;
use rate_limit::RateLimiters;
use service::ChatService;

/// Cheap-to-clone state shared by every handler.
#[derive(Clone)]
pub struct AppState {
    service: Arc<ChatService>,
    settings: Arc<ApiConfig>,
    metrics: Arc<Metrics>,
    admin_token: Arc<AdminToken>,
    rate_limiters: Arc<RateLimiters>,
    live: Arc<LiveHub>,
    /// Cancelled at the shutdown signal: `/readyz` answers 503 from then on.
    draining: CancellationToken,
}

impl AppState {
    fn new(
        config: &Config,
        adapters: &Adapters,
        metrics: Arc<Metrics>,
        admin_token: AdminToken,
        draining: CancellationToken,
        shutdown: &CancellationToken,
    ) -> Self {
        Self {
            live: LiveHub::start(
                Arc::clone(&adapters.queue),
                config.api.streams,
                Arc::clone(&metrics),
                shutdown.clone(),
            ),
            service: Arc::new(ChatService::new(config, adapters)),
            settings: Arc::new(config.api.clone()),
            rate_limiters: Arc::new(RateLimiters::new(
                config.api.rate_limits,
                config.api.trusted_proxy_hops,
                &metrics,
            )),
            metrics,
            admin_token: Arc::new(admin_token),
            draining,
        }
    }

    fn service(&self) -> &ChatService {
        &self.service
    }

    /// The service, for work that outlives the request (a live stream).
    fn service_handle(&self) -> Arc<ChatService> {
        Arc::clone(&self.service)
    }

    fn settings(&self) -> &ApiConfig {
        &self.settings
    }
}

/// Where the api listens: the public API, and the internal port of `/metrics`, `/livez` and
/// `/readyz` for the cluster (`CHAT_HEALTH_ADDR`).
pub struct Listeners {
    pub public: TcpListener,
    pub internal: TcpListener,
}

impl Listeners {
    /// Binds the addresses of the configuration.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let internal_addr = config.health_addr.unwrap_or(DEFAULT_HEALTH_ADDR);
        Ok(Self {
            public: TcpListener::bind(config.api.listen_addr)
                .await
                .with_context(|| format!("binding {}", config.api.listen_addr))?,
            internal: TcpListener::bind(internal_addr)
                .await
                .with_context(|| format!("binding {internal_addr}"))?,
        })
    }
}

/// The api's internal port when `CHAT_HEALTH_ADDR` is not set.
const DEFAULT_HEALTH_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);

/// The OpenAPI 3.1 document, pretty-printed (what `/api/v1/openapi.json` serves).
pub fn openapi_json() -> String {
    routes::openapi()
        .to_pretty_json()
        .expect("the document serializes")
}

/// Serves the API on `listener` until `signal` is cancelled and `CHAT_SHUTDOWN_DELAY_MS` has
/// passed (not ready meanwhile), then drains in-flight requests. With the embedded queue it also
/// runs the ingest and index consumers until then.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    signal: CancellationToken,
) -> anyhow::Result<()> {
    let shutdown = stop_after_delay(&signal, config.api.shutdown_delay);
    let admin_token = admin::load_or_create(&config)?;
    let metrics = Metrics::new();
    let adapters = Adapters::connect(&config, &metrics).await?;
    adapters.keep_connected(&shutdown);
    let consumers = if adapters.consumes_in_process {
        chatcore::pipeline::spawn_consumers(&config, &adapters, &metrics, &shutdown)
    } else {
        Vec::new()
    };
    tracing::info!(
        address = %listeners.public.local_addr()?,
        internal_address = %listeners.internal.local_addr()?,
        storage = adapters.storage.kind(),
        counters = adapters.state.kind(),
        queue = adapters.queue.kind(),
        search = adapters.search.kind(),
        "api listening"
    );
    let state = AppState::new(&config, &adapters, metrics, admin_token, signal, &shutdown);
    state.rate_limiters.forget_quiet_clients(&shutdown);
    let internal = tokio::spawn(
        axum::serve(listeners.internal, routes::internal_router(state.clone()))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    server::serve(
        listeners.public,
        routes::router(state),
        &config.api,
        shutdown.clone(),
    )
    .await;
    // The consumers stop at the same signal; an unfinished batch stays queued for the next start.
    shutdown.cancel();
    for consumer in consumers {
        consumer.await.context("consumer task")?;
    }
    internal
        .await
        .context("internal port task")?
        .context("serving the internal port")
}

/// A token cancelled `delay` after `signal`: while a cluster removes a terminating replica from
/// its endpoints (asynchronously), requests still routed to it are served rather than refused.
fn stop_after_delay(signal: &CancellationToken, delay: std::time::Duration) -> CancellationToken {
    if delay.is_zero() {
        return signal.clone();
    }
    let stop = CancellationToken::new();
    let (signal, cancel) = (signal.clone(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = signal.cancelled() => {}
            () = cancel.cancelled() => return,
        }
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "draining: not ready, serving until the delay ends"
        );
        tokio::time::sleep(delay).await;
        cancel.cancel();
    });
    stop
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
            // The token is a secret: not repeated in the error.
            let unknown = || anyhow::anyhow!("no application has this token (or it expired)");
            let token = ApplicationToken::parse(token).map_err(|_| unknown())?;
            let id = storage
                .resolve_token(&token.digest())
                .await?
                .ok_or_else(unknown)?
                .application_id;
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
