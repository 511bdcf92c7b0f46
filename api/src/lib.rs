//! The HTTP API: validates, resolves, allocates numbers, publishes confirmed events, answers.
//!
//! [`serve`] takes a configuration and a bound listener, so tests can run it on port 0. When the
//! queue is embedded (no `AMQP_URL`), the same process also runs the ingest and index consumers
//! and the webhook-dispatcher
//! ([`chatcore::pipeline`], [`chatcore::webhooks`]): that is the single-process embedded mode.
//!
//! Layers: `http` (the server, middleware, extractors, one module of handlers per resource: parse,
//! call, render; the one mapping of failures to answers) -> `app` ([`app::ChatService`], the use
//! cases, in domain terms, failing with `AppError`) -> the adapters' traits, built by
//! [`chatcore::adapters`].

mod app;
mod http;
mod operator;

use anyhow::Context as _;
use chatcore::Config;
use chatcore::adapters::Adapters;
use chatcore::metrics::Metrics;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use http::error::ApiError;
use http::state::AppState;
pub use operator::{openapi_json, reindex, replay_dead_letters};

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

/// Serves the API on `listener` until `signal` is cancelled and `CHAT_SHUTDOWN_DELAY_MS` has
/// passed (not ready meanwhile), then drains in-flight requests. With the embedded queue it also
/// runs the ingest and index consumers and the webhook-dispatcher until then.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    signal: CancellationToken,
) -> anyhow::Result<()> {
    let shutdown = stop_after_delay(&signal, config.api.shutdown_delay);
    let admin_token = http::admin::load_or_create(&config)?;
    let metrics = Metrics::new();
    let adapters = Adapters::connect(&config, &metrics).await?;
    adapters.keep_connected(&shutdown);
    let mut consumers = Vec::new();
    if adapters.consumes_in_process {
        consumers = chatcore::pipeline::spawn_consumers(&config, &adapters, &metrics, &shutdown);
        consumers.push(chatcore::webhooks::spawn_embedded(
            &config,
            std::sync::Arc::clone(&adapters.storage),
            &metrics,
            &shutdown,
        )?);
    }
    tracing::info!(
        address = %listeners.public.local_addr()?,
        internal_address = %listeners.internal.local_addr()?,
        storage = adapters.storage.kind(),
        counters = adapters.state.kind(),
        queue = adapters.queue.kind(),
        search = adapters.search.kind(),
        "api listening"
    );
    let client_tokens = app::client_tokens::ClientTokens::start(
        &config.api.client_tokens,
        std::sync::Arc::clone(&adapters.storage),
        shutdown.clone(),
    )
    .await
    .context("preparing the client tokens")?;
    let state = AppState::new(
        &config,
        &adapters,
        metrics,
        admin_token,
        client_tokens,
        signal,
        &shutdown,
    );
    let internal = tokio::spawn(
        axum::serve(listeners.internal, http::internal_router(state.clone()))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    http::server::serve(
        listeners.public,
        http::router(state),
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
