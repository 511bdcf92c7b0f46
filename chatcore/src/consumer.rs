//! The batching consumer loop shared by ingest-worker and indexer, on RabbitMQ ([`run`]) and on
//! the embedded queue ([`run_embedded`]).
//!
//! Deliveries arrive within a prefetch window and are grouped into batches bounded by size and
//! time. A batch is acknowledged (one multiple-ack) only after its handler succeeded, so a crash at
//! any point redelivers it. Failures are classified by the handler:
//! - transient (a dependency is down): the batch is retried with capped exponential backoff, for as
//!   long as it takes, without acking; nothing is dead-lettered because MySQL is restarting.
//! - permanent (this event cannot be processed): the batch is split and each event retried alone up
//!   to `max_attempts`; an event that still fails is rejected into the dead-letter queue and the
//!   consumer goes on.
//!
//! Events that do not decode are dead-lettered at once: retrying cannot fix them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::broker;
use crate::config::{Config, ConsumerConfig, Topology};
use crate::events::{Event, TraceContext};
use crate::health::Readiness;
use crate::local_queue::LocalQueue;
use crate::metrics::{Metrics, QueueLabels};
use crate::queue::{Delivery, EventSource};

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("transient failure: {0:#}")]
    Transient(anyhow::Error),
    #[error("permanent failure: {0:#}")]
    Permanent(anyhow::Error),
}

impl HandleError {
    /// Transient when a retry later can succeed (a dependency is down), else permanent.
    pub fn classify(error: impl Into<anyhow::Error>, transient: bool) -> Self {
        if transient {
            Self::Transient(error.into())
        } else {
            Self::Permanent(error.into())
        }
    }
}

/// One decoded event with the trace context it travelled with.
#[derive(Debug, Clone)]
pub struct Received {
    pub event: Event,
    pub trace: Option<TraceContext>,
}

/// Processes a batch of events; must be idempotent, since any batch may be delivered again.
pub trait BatchHandler: Send + Sync {
    /// Name of the span of one batch, e.g. "mysql batch write".
    const OPERATION: &'static str;

    fn handle(&self, batch: &[Received]) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// Consumes the RabbitMQ `queue` until `shutdown` is cancelled, reconnecting after broker
/// failures. `observers.readiness` is true while a consumer is attached to the queue.
pub async fn run<H: BatchHandler>(
    config: &Config,
    queue: &str,
    handler: &H,
    shutdown: &CancellationToken,
    observers: &Observers,
) -> anyhow::Result<()> {
    let amqp_url = config.require_amqp_url()?;
    let mut reconnect_delay = config.consumer.retry_base_delay;
    let readiness = &observers.readiness;
    while !shutdown.is_cancelled() {
        let consumed = consume_once(config, amqp_url, queue, handler, shutdown, observers).await;
        readiness.set(false);
        match consumed {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(queue, error = %format!("{error:#}"), delay_ms = reconnect_delay.as_millis() as u64, "consumer lost its broker connection, reconnecting");
                sleep_or_cancel(reconnect_delay, shutdown).await;
                reconnect_delay = (reconnect_delay * 2).min(config.consumer.retry_max_delay);
            }
        }
    }
    tracing::info!(queue, "consumer stopped");
    Ok(())
}

async fn consume_once<H: BatchHandler>(
    config: &Config,
    amqp_url: &crate::config::SecretUrl,
    queue: &str,
    handler: &H,
    shutdown: &CancellationToken,
    observers: &Observers,
) -> anyhow::Result<()> {
    let connection = broker::connect(amqp_url, queue).await?;
    let channel = connection.create_channel().await?;
    broker::declare_topology(&channel, &config.topology).await?;
    channel
        .basic_qos(config.consumer.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(
        queue,
        prefetch = config.consumer.prefetch,
        "consumer started"
    );
    observers.readiness.set(true);
    let sampled_channel = channel.clone();
    let _stop_sampler = AbortOnDrop(tokio::spawn(sample_queue_depth(
        queue.to_owned(),
        Arc::clone(&observers.metrics),
        move |name| {
            let channel = sampled_channel.clone();
            async move { Ok(u64::from(broker::queue_depth(&channel, &name).await?)) }
        },
    )));
    let mut source = broker::AmqpSource::new(channel.clone(), consumer);
    let consumed = consume(
        &mut source,
        queue,
        handler,
        &config.consumer,
        shutdown,
        observers,
    )
    .await;
    if consumed.is_ok() {
        // Closing the channel hands every unacked delivery back to the queue.
        let _ = channel.close(200, "shutting down".into()).await;
        let _ = connection.close(200, "shutting down".into()).await;
    }
    consumed
}

/// Consumes `queue` of the embedded queue until `shutdown` is cancelled: the same batches,
/// retries and dead-lettering as [`run`] on RabbitMQ.
pub async fn run_embedded<H: BatchHandler>(
    local_queue: &LocalQueue,
    queue: &str,
    handler: &H,
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    observers: &Observers,
) -> anyhow::Result<()> {
    let sampled_queue = local_queue.clone();
    let _stop_sampler = AbortOnDrop(tokio::spawn(sample_queue_depth(
        queue.to_owned(),
        Arc::clone(&observers.metrics),
        move |name| {
            let local_queue = sampled_queue.clone();
            async move { Ok(local_queue.depth(&name).await?) }
        },
    )));
    let mut source = local_queue.source(queue);
    let mut delay = settings.retry_base_delay;
    observers.readiness.set(true);
    while let Err(error) = consume(&mut source, queue, handler, settings, shutdown, observers).await
    {
        // The queue file was busy or unreadable; the unacknowledged batch is read again.
        tracing::warn!(queue, error = %format!("{error:#}"), delay_ms = delay.as_millis() as u64, "embedded consumer failed, retrying");
        if sleep_or_cancel(delay, shutdown).await {
            break;
        }
        delay = (delay * 2).min(settings.retry_max_delay);
    }
    observers.readiness.set(false);
    tracing::info!(queue, "consumer stopped");
    Ok(())
}

/// Processes batches from `source` until shutdown (Ok) or a failure of the source (Err).
async fn consume<S: EventSource, H: BatchHandler>(
    source: &mut S,
    queue: &str,
    handler: &H,
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    observers: &Observers,
) -> anyhow::Result<()> {
    let observe = observers.batch(queue);
    loop {
        let Some(deliveries) = source.next_batch(settings, shutdown).await? else {
            return Ok(());
        };
        let settled =
            process_batch(source, deliveries, handler, settings, shutdown, &observe).await?;
        if !settled {
            // Shutdown arrived while a batch was being retried: leave it for redelivery.
            return Ok(());
        }
    }
}

/// Returns false when shutdown interrupted retries and the batch was left unacknowledged.
async fn process_batch<S: EventSource, H: BatchHandler>(
    source: &mut S,
    deliveries: Vec<Delivery>,
    handler: &H,
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    observe: &BatchObserver<'_>,
) -> anyhow::Result<bool> {
    let started = std::time::Instant::now();
    let delivered = deliveries.len() as u64;
    observe
        .metrics
        .batch_size
        .get_or_create(&observe.labels)
        .observe(delivered as f64);
    let mut dead_lettered = 0u64;
    let tags: Vec<u64> = deliveries.iter().map(|delivery| delivery.tag).collect();
    let mut decoded = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match Event::decode(&delivery.data) {
            Ok(event) => decoded.push((
                delivery.tag,
                Received {
                    event,
                    trace: delivery.trace,
                },
            )),
            Err(error) => {
                tracing::error!(delivery_tag = delivery.tag, %error, "dead-lettering an event that does not decode");
                source.dead_letter(delivery.tag).await?;
                dead_lettered += 1;
            }
        }
    }
    // One span per event, continuing the trace of the request that published it; one span per
    // batch, inside the first event's trace and linked to every event it carries.
    let event_spans: Vec<tracing::Span> = decoded
        .iter()
        .map(|(_, received)| event_span(source.system(), &observe.labels.queue, received))
        .collect();
    let batch_span = tracing::info_span!(
        parent: event_spans.first().and_then(tracing::Span::id),
        "batch",
        otel.name = H::OPERATION,
        messaging.batch.message_count = event_spans.len(),
    );
    crate::telemetry::add_links(&batch_span, &event_spans);
    if !decoded.is_empty() {
        let events: Vec<Received> = decoded
            .iter()
            .map(|(_, received)| received.clone())
            .collect();
        let handled = handle_with_retries(handler, &events, settings, shutdown, None, observe)
            .instrument(batch_span.clone())
            .await;
        match handled {
            Outcome::Done => {
                // Inside the first event's span: the line carries its trace id.
                let _in_event = event_spans.first().map(tracing::Span::enter);
                tracing::debug!(events = events.len(), "batch written");
            }
            Outcome::Interrupted => return Ok(false),
            Outcome::Permanent(error) => {
                tracing::warn!(events = events.len(), error = %format!("{error:#}"), "batch failed permanently, retrying its events one by one");
                for (delivery_tag, received) in &decoded {
                    let single = std::slice::from_ref(received);
                    match handle_with_retries(
                        handler,
                        single,
                        settings,
                        shutdown,
                        Some(settings.max_attempts),
                        observe,
                    )
                    .await
                    {
                        Outcome::Done => {}
                        Outcome::Interrupted => return Ok(false),
                        Outcome::Permanent(error) => {
                            tracing::error!(event_id = %received.event.event_id, trace_id = received.trace.as_ref().map(TraceContext::trace_id), error = %format!("{error:#}"), "dead-lettering an event that keeps failing");
                            source.dead_letter(*delivery_tag).await?;
                            dead_lettered += 1;
                        }
                    }
                }
            }
        }
    }
    source.acknowledge(&tags).await?;
    let metrics = observe.metrics;
    metrics
        .batch_duration
        .get_or_create(&observe.labels)
        .observe(started.elapsed().as_secs_f64());
    metrics
        .events_processed
        .get_or_create(&observe.labels)
        .inc_by(delivered - dead_lettered);
    metrics
        .events_dead_lettered
        .get_or_create(&observe.labels)
        .inc_by(dead_lettered);
    Ok(true)
}

fn event_span(system: &'static str, queue: &str, received: &Received) -> tracing::Span {
    let span = tracing::info_span!(
        "consume event",
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.name = queue,
        event_id = %received.event.event_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if let Some(trace) = &received.trace {
        crate::telemetry::set_remote_parent(&span, trace.as_str());
        crate::telemetry::record_ids(&span, trace);
    }
    span
}

enum Outcome {
    Done,
    Interrupted,
    Permanent(anyhow::Error),
}

/// Transient failures retry until shutdown; permanent ones `permanent_attempts` times (None: once).
async fn handle_with_retries<H: BatchHandler>(
    handler: &H,
    batch: &[Received],
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    permanent_attempts: Option<u32>,
    observe: &BatchObserver<'_>,
) -> Outcome {
    let mut delay = settings.retry_base_delay;
    let mut permanent_failures = 0;
    loop {
        let outcome = handler.handle(batch).await;
        if outcome.is_err() {
            observe
                .metrics
                .events_failed
                .get_or_create(&observe.labels)
                .inc();
        }
        match outcome {
            Ok(()) => return Outcome::Done,
            Err(HandleError::Permanent(error)) => {
                permanent_failures += 1;
                if permanent_failures >= permanent_attempts.unwrap_or(1) {
                    return Outcome::Permanent(error);
                }
                tracing::warn!(attempt = permanent_failures, error = %format!("{error:#}"), "event failed, retrying");
            }
            Err(HandleError::Transient(error)) => {
                tracing::warn!(events = batch.len(), delay_ms = delay.as_millis() as u64, error = %format!("{error:#}"), "batch failed transiently, retrying");
            }
        }
        if sleep_or_cancel(delay, shutdown).await {
            return Outcome::Interrupted;
        }
        delay = (delay * 2).min(settings.retry_max_delay);
    }
}

/// Moves the messages waiting in `<queue>.dead` back into `queue` (after the cause was fixed);
/// returns how many. Only the messages present at the start are moved, so an event that fails
/// again is dead-lettered again instead of looping.
pub async fn replay_dead_letters(config: &Config, queue: &str) -> anyhow::Result<u32> {
    let connection = broker::connect(config.require_amqp_url()?, "replay-dead-letters").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    broker::declare_topology(&channel, &config.topology).await?;
    let dead_letter_queue = Topology::dead_letter_queue(queue);
    let waiting = broker::queue_depth(&channel, &dead_letter_queue).await?;
    let mut moved = 0;
    while moved < waiting {
        let Some(message) = channel
            .basic_get(
                dead_letter_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await?
        else {
            break;
        };
        let delivery = message.delivery;
        let confirmation = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                delivery.properties.clone(),
            )
            .await?
            .await?;
        if !matches!(confirmation, lapin::Confirmation::Ack(None)) {
            anyhow::bail!("rabbitmq did not accept the replayed message into {queue}");
        }
        channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        moved += 1;
    }
    connection.close(200, "done".into()).await?;
    tracing::info!(queue, moved, "replayed dead letters");
    Ok(moved)
}

/// Runs a worker: its health endpoints (on `CHAT_HEALTH_ADDR`, else `default_health_addr`) and
/// the consumer of `queue`, until `shutdown`.
pub async fn run_worker<H: BatchHandler>(
    config: &Config,
    queue: &str,
    handler: &H,
    shutdown: &CancellationToken,
    observers: Observers,
    default_health_addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let health_addr = config.consumer.health_addr.unwrap_or(default_health_addr);
    crate::health::serve(
        health_addr,
        observers.readiness.clone(),
        Arc::clone(&observers.metrics),
        shutdown.clone(),
    )
    .await?;
    run(config, queue, handler, shutdown, &observers).await
}

/// The command line of a worker binary: `run` (the default) consumes until SIGTERM,
/// `replay-dead-letters` moves the queue's dead letters back into it.
pub async fn worker_command<F, Fut>(
    config: Config,
    queue: String,
    run_worker: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    match std::env::args().nth(1).as_deref() {
        None | Some("run") => run_worker(config, crate::shutdown::on_signal()).await,
        Some("replay-dead-letters") => {
            let moved = replay_dead_letters(&config, &queue).await?;
            println!("moved {moved} dead letters back to {queue}");
            Ok(())
        }
        Some(other) => {
            anyhow::bail!("unknown command {other:?}; expected `run` or `replay-dead-letters`")
        }
    }
}

/// What a consumer reports: readiness and metrics.
#[derive(Clone)]
pub struct Observers {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
}

impl Default for Observers {
    fn default() -> Self {
        Self {
            readiness: Readiness::default(),
            metrics: Metrics::new(),
        }
    }
}

impl Observers {
    fn batch<'a>(&'a self, queue: &str) -> BatchObserver<'a> {
        BatchObserver {
            metrics: &self.metrics,
            labels: QueueLabels {
                queue: queue.to_owned(),
            },
        }
    }
}

struct BatchObserver<'a> {
    metrics: &'a Metrics,
    labels: QueueLabels,
}

/// How often the queue depth (consumer lag) is sampled.
const QUEUE_DEPTH_INTERVAL: Duration = Duration::from_secs(5);

/// Samples the depth of the queue (consumer lag) and of its dead-letter queue.
async fn sample_queue_depth<F, Fut>(queue: String, metrics: Arc<Metrics>, depth: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<u64>>,
{
    let sampled = [queue.clone(), Topology::dead_letter_queue(&queue)];
    loop {
        for name in &sampled {
            match depth(name.clone()).await {
                Ok(depth) => {
                    let labels = QueueLabels {
                        queue: name.clone(),
                    };
                    metrics
                        .queue_depth
                        .get_or_create(&labels)
                        .set(i64::try_from(depth).unwrap_or(i64::MAX));
                }
                Err(error) => {
                    tracing::debug!(error = %format!("{error:#}"), queue = %name, "could not sample the queue depth")
                }
            }
        }
        tokio::time::sleep(QUEUE_DEPTH_INTERVAL).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sleeps; returns true when shutdown cut the sleep short.
async fn sleep_or_cancel(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
