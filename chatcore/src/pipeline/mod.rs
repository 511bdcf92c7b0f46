//! The consumers of accepted writes, wherever they run: the ingest consumer writes the storage,
//! the index consumer the search index. In the distributed stack each is a worker binary
//! ([`run_worker`]); in the embedded process the api runs both ([`spawn_consumers`]). Either way
//! it is the same handler on the same batching loop ([`consumer::run`]) over the adapters'
//! traits, so nothing here names a technology.

pub mod consumer;
mod index;
mod ingest;
mod reindex;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::adapters::{self, Adapters};
use crate::config::{Config, ConsumerConfig};
use crate::events::Consumer;
use crate::metrics::Metrics;
use crate::numbering::NumberAllocator;
use crate::queue::EventQueue;
use crate::retry;

pub use consumer::{BatchHandler, HandleError, Observers, Received};
pub use index::Indexer;
pub use ingest::IngestWriter;
pub use reindex::{ReindexError, ReindexProgress, reindex};

/// The worker command line: `run` (the default) consumes until SIGTERM,
/// `replay-dead-letters` moves the worker's dead letters back into its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum WorkerCommand {
    /// Consume the queue until SIGTERM or Ctrl-C (the default).
    Run,
    /// Move the dead-lettered events of this worker back into its queue, then exit.
    ReplayDeadLetters,
}

/// Where a worker serves `/livez`, `/readyz` and `/metrics` unless `CHAT_HEALTH_ADDR` says
/// otherwise: one port per worker, so both can run on one machine.
fn default_health_addr(consumer: Consumer) -> SocketAddr {
    let port = match consumer {
        Consumer::Ingest => 9091,
        Consumer::Index => 9092,
    };
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

#[derive(clap::Parser)]
struct WorkerCli {
    #[command(subcommand)]
    command: Option<WorkerCommand>,
}

/// The whole `main` of a worker binary: its command line, configuration and telemetry, then the
/// command.
pub async fn worker_main(consumer: Consumer) -> anyhow::Result<()> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = WorkerCli::command()
        .name(consumer.name())
        .about(consumer.description())
        .version(env!("CARGO_PKG_VERSION"))
        .get_matches();
    let command = WorkerCli::from_arg_matches(&matches)?.command;
    let config = Config::from_env()?;
    let _telemetry = crate::telemetry::init(consumer.name(), config.trace_export.as_ref());
    worker_command(config, consumer, command).await
}

/// Runs one command of a worker binary.
pub async fn worker_command(
    config: Config,
    consumer: Consumer,
    command: Option<WorkerCommand>,
) -> anyhow::Result<()> {
    match command.unwrap_or(WorkerCommand::Run) {
        WorkerCommand::Run => run_worker(config, consumer, crate::shutdown::on_signal()).await,
        WorkerCommand::ReplayDeadLetters => {
            let queue = worker_queue(&config, &Metrics::new()).await?;
            for (name, moved) in replay_dead_letters(queue.as_ref(), &[consumer]).await? {
                println!("moved {moved} dead letters back to {name}");
            }
            Ok(())
        }
    }
}

/// The queue of a separate worker: only a real broker can be shared between processes.
async fn worker_queue(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<dyn EventQueue>> {
    config.require_amqp_url()?;
    adapters::queue(config, metrics).await
}

/// A worker process: its health endpoints and the consumer of its queue, until `shutdown`.
pub async fn run_worker(
    config: Config,
    consumer: Consumer,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let observers = Observers::default();
    let metrics = &observers.metrics;
    let queue = worker_queue(&config, metrics).await?;
    let health_addr = config
        .health_addr
        .unwrap_or_else(|| default_health_addr(consumer));
    crate::health::serve(
        health_addr,
        observers.readiness.clone(),
        Arc::clone(metrics),
        shutdown.clone(),
    )
    .await?;
    let settings = &config.consumer;
    match consumer {
        Consumer::Ingest => {
            config.require_database_url()?;
            // The counters: a number handed out twice makes the worker raise its counter.
            config.require_redis_url()?;
            let storage = adapters::storage(&config, metrics).await?;
            let Some(counters) = until_ready(settings, &shutdown, "redis", || {
                adapters::state(&config, metrics)
            })
            .await
            else {
                return Ok(());
            };
            let allocator = NumberAllocator::new(
                counters,
                Arc::clone(&storage),
                &config.redis_key_prefix,
                config.number_block_size,
            );
            let handler =
                IngestWriter::new(storage, Arc::clone(&queue), allocator, Arc::clone(metrics));
            consumer::run(&queue, consumer, &handler, settings, &shutdown, &observers).await;
        }
        Consumer::Index => {
            config.require_elasticsearch_url()?;
            let search = adapters::search(&config, metrics).await?;
            let ready = until_ready(settings, &shutdown, "search index", || async {
                search.ensure_index().await.map_err(anyhow::Error::from)
            })
            .await;
            if ready.is_none() {
                return Ok(());
            }
            let handler = Indexer::new(search);
            consumer::run(&queue, consumer, &handler, settings, &shutdown, &observers).await;
        }
    }
    Ok(())
}

/// Runs `attempt` until it succeeds (a dependency not up yet when the worker starts), retrying
/// with the consumer's backoff; None when shutdown came first.
async fn until_ready<T, Attempt>(
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    dependency: &str,
    attempt: impl FnMut() -> Attempt,
) -> Option<T>
where
    Attempt: Future<Output = anyhow::Result<T>>,
{
    let ready = retry::retry(settings.retry, shutdown, attempt, |error, attempt, delay| {
        tracing::warn!(dependency, error = %format!("{error:#}"), attempt, delay_ms = delay.as_millis() as u64, "dependency not ready, retrying");
        true
    })
    .await;
    ready.ok()
}

/// The ingest and index consumers of an embedded queue, run by the api process itself, until
/// `shutdown`. An unfinished batch stays queued for the next start.
pub fn spawn_consumers(
    config: &Config,
    adapters: &Adapters,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let observers = Observers {
        readiness: crate::health::Readiness::default(),
        metrics: Arc::clone(metrics),
    };
    let settings = &config.consumer;
    let writer = IngestWriter::new(
        Arc::clone(&adapters.storage),
        Arc::clone(&adapters.queue),
        adapters.allocator.clone(),
        Arc::clone(metrics),
    );
    let indexer = Indexer::new(Arc::clone(&adapters.search));
    vec![
        spawn_consumer(
            &adapters.queue,
            Consumer::Ingest,
            writer,
            settings,
            shutdown,
            &observers,
        ),
        spawn_consumer(
            &adapters.queue,
            Consumer::Index,
            indexer,
            settings,
            shutdown,
            &observers,
        ),
    ]
}

fn spawn_consumer<H: BatchHandler + 'static>(
    queue: &Arc<dyn EventQueue>,
    consumer: Consumer,
    handler: H,
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    observers: &Observers,
) -> JoinHandle<()> {
    let (queue, settings, shutdown, observers) = (
        Arc::clone(queue),
        settings.clone(),
        shutdown.clone(),
        observers.clone(),
    );
    tokio::spawn(async move {
        consumer::run(&queue, consumer, &handler, &settings, &shutdown, &observers).await;
    })
}

/// Moves the dead letters of `consumers` back into their queues (after the cause was fixed);
/// returns how many per queue.
pub async fn replay_dead_letters(
    queue: &dyn EventQueue,
    consumers: &[Consumer],
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut moved = Vec::with_capacity(consumers.len());
    for consumer in consumers {
        let name = queue.queue_name(*consumer).to_owned();
        let count = queue
            .replay_dead_letters(*consumer)
            .await
            .with_context(|| format!("replaying the dead letters of {name}"))?;
        tracing::info!(queue = %name, moved = count, "replayed dead letters");
        moved.push((name, count));
    }
    Ok(moved)
}
