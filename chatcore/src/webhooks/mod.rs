//! The webhook-dispatcher: delivers every change of an application (its feed: messages created,
//! updated and deleted, chats created) to the application's webhook endpoints, signed as the
//! Standard Webhooks specification says, at least once and in order per endpoint, until each is
//! answered 2xx. It reads the durable feed in the database, not the live streams' announcements.
//!
//! A process of its own in a cluster (the `webhook-dispatcher` binary: [`main_entry`]; several may
//! run, they lease the endpoints), or a task of the api process on a laptop ([`spawn_embedded`]),
//! as the ingest and index consumers are ([`crate::pipeline`]). The api registers the endpoints
//! and checks their destinations with the same rules ([`destination`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::store::Storage;

mod delivery;
pub mod destination;
mod dispatcher;
pub mod events;
pub mod secret;
mod signing;

pub use crate::config::AllowedDestinations;
pub use destination::non_public_reason;
pub use dispatcher::Dispatcher;
pub use events::{EventType, EventTypes};
pub use secret::WebhookSecret;

const NAME: &str = "webhook-dispatcher";
/// The health and metrics server's address unless `CHAT_HEALTH_ADDR` says otherwise.
const DEFAULT_HEALTH_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9093);

#[derive(clap::Parser)]
#[command(name = NAME, version, about = "Delivers every change of an application to its webhook endpoints")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Deliver until SIGTERM or SIGINT (the default).
    Run,
}

/// The whole `main` of the binary: its command line, configuration and telemetry, then the run.
pub async fn main_entry() -> anyhow::Result<()> {
    use clap::Parser as _;
    let Cli { command } = Cli::parse();
    let config = Config::from_env()?;
    let _telemetry = crate::telemetry::init(NAME, config.trace_export.as_ref());
    match command.unwrap_or(Command::Run) {
        Command::Run => run_process(config, crate::shutdown::on_signal()).await,
    }
}

/// The dispatcher as a process of its own: its health endpoints and the dispatch loop, until
/// `shutdown`. Only MySQL can be shared between processes.
pub async fn run_process(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.require_database_url()?;
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let storage = crate::adapters::storage(&config, &metrics).await?;
    crate::health::serve(
        config.health_addr.unwrap_or(DEFAULT_HEALTH_ADDR),
        readiness.clone(),
        Arc::clone(&metrics),
        shutdown.clone(),
    )
    .await?;
    tracing::info!("webhook-dispatcher started");
    let dispatcher = Arc::new(Dispatcher::new(
        storage,
        config.webhooks,
        metrics,
        readiness,
    )?);
    dispatcher.run(shutdown).await;
    tracing::info!("webhook-dispatcher stopped");
    Ok(())
}

/// The dispatcher as a task of the embedded api process, on its storage and metrics.
pub fn spawn_embedded(
    config: &Config,
    storage: Arc<dyn Storage>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let dispatcher = Arc::new(Dispatcher::new(
        storage,
        config.webhooks.clone(),
        Arc::clone(metrics),
        Readiness::default(),
    )?);
    Ok(tokio::spawn(dispatcher.run(shutdown.clone())))
}
