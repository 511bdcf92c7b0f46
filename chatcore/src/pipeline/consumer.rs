//! The batching consumer loop of every consumer (ingest, index), on any [`EventQueue`].
//!
//! Deliveries arrive within a prefetch window and are grouped into batches bounded by size and
//! time. A batch is acknowledged only after its handler succeeded, so a crash at any point
//! redelivers it. Failures are classified by the handler:
//! - transient (a dependency is down): the batch is retried with capped exponential backoff, for as
//!   long as it takes, without acking; nothing is dead-lettered because MySQL is restarting.
//! - permanent (this event cannot be processed): the batch is split and each event retried alone up
//!   to `max_attempts`; an event that still fails is rejected into the dead-letter queue and the
//!   consumer goes on.
//!
//! Events that do not decode are dead-lettered at once: retrying cannot fix them. Events of a newer
//! schema version than this consumer knows are handed back to the queue for an upgraded consumer
//! (during a rolling upgrade), with a growing pause. When the queue itself fails (the broker
//! connection is lost), the consumer opens it again with backoff.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::{ConsumerConfig, Topology};
use crate::events::{Consumer, DecodeError, Event, TraceContext};
use crate::health::Readiness;
use crate::metrics::{Metrics, QueueLabels};
use crate::queue::{Delivery, EventQueue, EventSource, QueueError};
use crate::retry::{self, Stopped, Transient};

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("transient failure: {0:#}")]
    Transient(anyhow::Error),
    #[error("permanent failure: {0:#}")]
    Permanent(anyhow::Error),
}

impl HandleError {
    /// Transient when the adapter says a retry later can succeed, else permanent.
    pub fn of<E>(error: E) -> Self
    where
        E: Transient + std::error::Error + Send + Sync + 'static,
    {
        if error.is_transient() {
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

/// Purges what a consumer keeps of each application the batch announces deleted (`purge` returns
/// how many rows or documents went), after the batch's own writes.
pub(crate) async fn purge_deleted_applications<Purge, Purged, E>(
    batch: &[Received],
    what: &str,
    purge: Purge,
) -> Result<(), HandleError>
where
    Purge: Fn(u64) -> Purged,
    Purged: Future<Output = Result<u64, E>>,
    E: Transient + std::error::Error + Send + Sync + 'static,
{
    for received in batch {
        if let crate::events::EventPayload::ApplicationDeleted { application_id, .. } =
            received.event.payload
        {
            let purged = purge(application_id).await.map_err(HandleError::of)?;
            tracing::info!(application_id, purged, what, "purged a deleted application");
        }
    }
    Ok(())
}

/// Processes a batch of events; must be idempotent, since any batch may be delivered again.
pub trait BatchHandler: Send + Sync {
    /// Name of the span of one batch, e.g. "ingest batch write".
    const OPERATION: &'static str;

    fn handle(&self, batch: &[Received]) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// Consumes the queue of `consumer` until `shutdown` is cancelled, opening it again after the
/// queue failed. `observers.readiness` is true while the queue is open.
pub async fn run<H: BatchHandler>(
    queue: &Arc<dyn EventQueue>,
    consumer: Consumer,
    handler: &H,
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    observers: &Observers,
) {
    let name = queue.queue_name(consumer).to_owned();
    let _stop_sampler = AbortOnDrop(tokio::spawn(sample_queue_depth(
        Arc::clone(queue),
        name.clone(),
        Arc::clone(&observers.metrics),
    )));
    let backoff = settings.retry;
    loop {
        let opened = retry::retry(
            backoff,
            shutdown,
            || queue.open_source(consumer, settings),
            |error, attempt, delay| {
                tracing::warn!(queue = %name, attempt, delay_ms = delay.as_millis() as u64, error = %error, "could not open the queue, retrying");
                true
            },
        )
        .await;
        let Ok(mut source) = opened else {
            break;
        };
        observers.readiness.set(true);
        let consumed = consume(
            source.as_mut(),
            queue.system(),
            &name,
            handler,
            settings,
            shutdown,
            observers,
        )
        .await;
        observers.readiness.set(false);
        source.close().await;
        match consumed {
            Ok(()) => break,
            // The unacknowledged batch is delivered again once the queue is open again.
            Err(error) => {
                tracing::warn!(queue = %name, error = %error, "consumer lost its queue, reopening")
            }
        }
    }
    tracing::info!(queue = %name, "consumer stopped");
}

/// Processes batches from `source` until shutdown (Ok) or a failure of the source (Err).
async fn consume<H: BatchHandler>(
    source: &mut dyn EventSource,
    system: &'static str,
    queue: &str,
    handler: &H,
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    observers: &Observers,
) -> Result<(), QueueError> {
    let observe = observers.batch(queue);
    let mut batches_with_postponed_events = 0;
    loop {
        let Some(deliveries) = source.next_batch(settings, shutdown).await? else {
            return Ok(());
        };
        let settled = process_batch(
            source, system, deliveries, handler, settings, shutdown, &observe,
        )
        .await?;
        let Some(postponed) = settled else {
            // Shutdown arrived while a batch was being retried: leave it for redelivery.
            return Ok(());
        };
        if postponed == 0 {
            batches_with_postponed_events = 0;
            continue;
        }
        // They come straight back: wait a little longer each time instead of spinning on them.
        batches_with_postponed_events += 1;
        let delay = settings.retry.delay(batches_with_postponed_events);
        if retry::sleep_or_cancel(delay, shutdown).await {
            return Ok(());
        }
    }
}

/// Returns how many events were postponed (handed back to the queue for a later consumer), or
/// None when shutdown interrupted retries and the batch was left unacknowledged.
async fn process_batch<H: BatchHandler>(
    source: &mut dyn EventSource,
    system: &'static str,
    deliveries: Vec<Delivery>,
    handler: &H,
    settings: &ConsumerConfig,
    shutdown: &CancellationToken,
    observe: &BatchObserver<'_>,
) -> Result<Option<usize>, QueueError> {
    let started = std::time::Instant::now();
    let delivered = deliveries.len() as u64;
    observe
        .metrics
        .batch_size
        .get_or_create(&observe.labels)
        .observe(delivered as f64);
    let mut tags: Vec<u64> = deliveries.iter().map(|delivery| delivery.tag).collect();
    let mut dead_tags = Vec::new();
    let mut postponed_tags = Vec::new();
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
            // During a rolling upgrade a new api may publish before every consumer is new.
            Err(error @ DecodeError::UnsupportedVersion { .. }) => {
                tracing::warn!(delivery_tag = delivery.tag, %error, "an event of a newer schema waits for an upgraded consumer");
                source.postpone(delivery.tag).await?;
                postponed_tags.push(delivery.tag);
            }
            Err(error) => {
                let span = event_span(system, &observe.labels.queue, delivery.trace.as_ref());
                crate::telemetry::record_error(&span, "undecodable");
                let _in_event = span.enter();
                tracing::error!(delivery_tag = delivery.tag, %error, "dead-lettering an event that does not decode");
                source.dead_letter(delivery.tag).await?;
                dead_tags.push(delivery.tag);
            }
        }
    }
    // One span per event, continuing the trace of the request that published it; one span per
    // batch, inside the first event's trace and linked to every event it carries.
    let event_spans: Vec<tracing::Span> = decoded
        .iter()
        .map(|(_, received)| {
            let span = event_span(system, &observe.labels.queue, received.trace.as_ref());
            span.record("event_id", tracing::field::display(received.event.event_id));
            span
        })
        .collect();
    let batch_span = tracing::info_span!(
        parent: event_spans.first().and_then(tracing::Span::id),
        "batch",
        otel.name = H::OPERATION,
        messaging.batch.message_count = event_spans.len(),
        otel.status_code = tracing::field::Empty,
        error.r#type = tracing::field::Empty,
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
            Outcome::Interrupted => return Ok(None),
            Outcome::Permanent(error) => {
                // The batch's write failed; each event's span tells how it ended on its own.
                crate::telemetry::record_error(&batch_span, "permanent");
                tracing::warn!(events = events.len(), error = %format!("{error:#}"), "batch failed permanently, retrying its events one by one");
                for ((delivery_tag, received), event_span) in decoded.iter().zip(&event_spans) {
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
                        Outcome::Interrupted => return Ok(None),
                        Outcome::Permanent(error) => {
                            crate::telemetry::record_error(event_span, "permanent");
                            tracing::error!(event_id = %received.event.event_id, trace_id = received.trace.as_ref().map(TraceContext::trace_id), error = %format!("{error:#}"), "dead-lettering an event that keeps failing");
                            source.dead_letter(*delivery_tag).await?;
                            dead_tags.push(*delivery_tag);
                        }
                    }
                }
            }
        }
    }
    // A delivery that was dead-lettered is settled: the ack must not name it (an ack of an
    // unknown tag closes a RabbitMQ channel).
    tags.retain(|tag| !dead_tags.contains(tag) && !postponed_tags.contains(tag));
    source.acknowledge(&tags).await?;
    let dead_lettered = dead_tags.len() as u64;
    let metrics = observe.metrics;
    metrics
        .batch_duration
        .get_or_create(&observe.labels)
        .observe(started.elapsed().as_secs_f64());
    metrics
        .events_processed
        .get_or_create(&observe.labels)
        .inc_by(delivered - dead_lettered - postponed_tags.len() as u64);
    metrics
        .events_dead_lettered
        .get_or_create(&observe.labels)
        .inc_by(dead_lettered);
    Ok(Some(postponed_tags.len()))
}

/// The consumer span of one delivery, continuing the trace it travelled with; status error when
/// the event is dead-lettered ([`crate::telemetry::record_error`]).
fn event_span(system: &'static str, queue: &str, trace: Option<&TraceContext>) -> tracing::Span {
    let span = tracing::info_span!(
        "consume event",
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.name = queue,
        event_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.r#type = tracing::field::Empty,
    );
    if let Some(trace) = trace {
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
    let mut permanent_failures = 0;
    let handled = retry::retry(
        settings.retry,
        shutdown,
        || handler.handle(batch),
        |failure, _, delay| {
            observe
                .metrics
                .events_failed
                .get_or_create(&observe.labels)
                .inc();
            match failure {
                HandleError::Permanent(error) => {
                    permanent_failures += 1;
                    let retry = permanent_failures < permanent_attempts.unwrap_or(1);
                    if retry {
                        tracing::warn!(attempt = permanent_failures, error = %format!("{error:#}"), "event failed, retrying");
                    }
                    retry
                }
                HandleError::Transient(error) => {
                    tracing::warn!(events = batch.len(), delay_ms = delay.as_millis() as u64, error = %format!("{error:#}"), "batch failed transiently, retrying");
                    true
                }
            }
        },
    )
    .await;
    match handled {
        Ok(()) => Outcome::Done,
        Err(Stopped::Interrupted) => Outcome::Interrupted,
        Err(Stopped::GaveUp(HandleError::Permanent(error) | HandleError::Transient(error))) => {
            Outcome::Permanent(error)
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
async fn sample_queue_depth(queue: Arc<dyn EventQueue>, name: String, metrics: Arc<Metrics>) {
    let sampled = [name.clone(), Topology::dead_letter_queue(&name)];
    loop {
        for name in &sampled {
            match queue.depth(name).await {
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
