//! The batching consumer loop of every consumer (ingest, index), on any [`EventQueue`].
//!
//! Deliveries arrive within a prefetch window and are grouped into batches bounded by size and
//! time. A batch is acknowledged only after its handler succeeded, so a crash at any point
//! redelivers it. Failures are classified by the handler:
//! - transient (a dependency is down): the batch is retried with capped exponential backoff, for as
//!   long as it takes, without acking; nothing is dead-lettered because MySQL is restarting.
//! - rejected (the handler names the events that can never be processed, e.g. a message number
//!   handed out twice): those are dead-lettered at once and the rest of the batch is handled again
//!   without them, with no pause.
//! - permanent (some event cannot be processed, the handler does not know which): each event is
//!   handled alone, once; one that fails permanently is dead-lettered at once. A permanent failure
//!   is deterministic, so it is never retried: a storm of them (a rollback of a counter) must not
//!   hold the consumer. Events that fail transiently alone are retried together after the
//!   backoff, once the others of the batch are acknowledged: a retried event holds the rest of
//!   its batch no longer than one pass.
//!
//! Events that do not decode are dead-lettered at once as well. Events of a newer
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
use crate::retry::{self, Transient};

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// A dependency failed: the same events may succeed in a moment.
    #[error("transient failure: {0:#}")]
    Transient(anyhow::Error),
    /// Some event of the batch can never be processed; which one is not known.
    #[error("permanent failure: {0:#}")]
    Permanent(anyhow::Error),
    /// These events of the batch can never be processed (nothing of the batch was written): they
    /// are dead-lettered and the others handled again without them.
    #[error("{} events rejected", .0.len())]
    Rejected(Vec<Rejection>),
}

/// One event a handler can never process, and why.
#[derive(Debug)]
pub struct Rejection {
    pub event_id: uuid::Uuid,
    pub reason: anyhow::Error,
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
    observe
        .metrics
        .batch_size
        .get_or_create(&observe.labels)
        .observe(deliveries.len() as f64);
    let mut settled = Settled::default();
    let mut postponed = 0;
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
                postponed += 1;
            }
            Err(error) => {
                let span = event_span(system, &observe.labels.queue, delivery.trace.as_ref());
                crate::telemetry::record_error(&span, "undecodable");
                let _in_event = span.enter();
                tracing::error!(delivery_tag = delivery.tag, %error, "dead-lettering an event that does not decode");
                source.dead_letter(delivery.tag).await?;
                settled.dead_lettered += 1;
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
    let mut pending: Vec<Pending> = decoded
        .into_iter()
        .zip(event_spans)
        .map(|((tag, received), span)| Pending {
            tag,
            received,
            span,
        })
        .collect();
    let mut transient_rounds = 0;
    while !pending.is_empty() {
        let events: Vec<Received> = pending.iter().map(|p| p.received.clone()).collect();
        let handled = handler.handle(&events).instrument(batch_span.clone()).await;
        let failure = match handled {
            Ok(()) => {
                if let Some(first) = pending.first() {
                    // Inside the first event's span: the line carries its trace id.
                    let _in_event = first.span.enter();
                    tracing::debug!(events = events.len(), "batch written");
                }
                settled.done(pending);
                break;
            }
            Err(failure) => failure,
        };
        observe.failed();
        match failure {
            HandleError::Transient(error) => {
                transient_rounds += 1;
                let delay = settings.retry.delay(transient_rounds);
                tracing::warn!(events = events.len(), delay_ms = delay.as_millis() as u64, error = %format!("{error:#}"), "batch failed transiently, retrying");
                if retry::sleep_or_cancel(delay, shutdown).await {
                    return Ok(None);
                }
            }
            HandleError::Rejected(rejections) if names_any(&rejections, &pending) => {
                // The others are handled again at once, without them.
                let (rejected, rest): (Vec<Pending>, Vec<Pending>) =
                    pending.into_iter().partition(|p| {
                        rejections
                            .iter()
                            .any(|r| r.event_id == p.received.event.event_id)
                    });
                for event in rejected {
                    let reason = rejection_of(&rejections, &event);
                    settled.dead_letter(source, event, &reason).await?;
                }
                pending = rest;
            }
            HandleError::Permanent(error) if pending.len() == 1 => {
                crate::telemetry::record_error(&batch_span, "permanent");
                settled
                    .dead_letter(source, pending.remove(0), &error)
                    .await?;
            }
            HandleError::Permanent(_) | HandleError::Rejected(_) => {
                crate::telemetry::record_error(&batch_span, "permanent");
                tracing::warn!(events = events.len(), error = %failure, "batch failed permanently, trying its events one by one");
                pending = one_by_one(source, handler, pending, &mut settled, observe).await?;
                if pending.is_empty() {
                    break;
                }
                // Only those that failed transiently wait for another round; the others are
                // settled now.
                settled.acknowledge(source).await?;
                transient_rounds += 1;
                if retry::sleep_or_cancel(settings.retry.delay(transient_rounds), shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
    settled.acknowledge(source).await?;
    let metrics = observe.metrics;
    metrics
        .batch_duration
        .get_or_create(&observe.labels)
        .observe(started.elapsed().as_secs_f64());
    metrics
        .events_processed
        .get_or_create(&observe.labels)
        .inc_by(settled.acknowledged);
    metrics
        .events_dead_lettered
        .get_or_create(&observe.labels)
        .inc_by(settled.dead_lettered);
    Ok(Some(postponed))
}

/// A decoded delivery of the batch at hand, not settled yet, with the span of its event.
struct Pending {
    tag: u64,
    received: Received,
    span: tracing::Span,
}

/// What became of the events of a batch so far.
#[derive(Default)]
struct Settled {
    /// Done, to be acknowledged.
    done: Vec<u64>,
    acknowledged: u64,
    dead_lettered: u64,
}

impl Settled {
    fn done(&mut self, events: Vec<Pending>) {
        self.done.extend(events.into_iter().map(|p| p.tag));
    }

    async fn acknowledge(&mut self, source: &mut dyn EventSource) -> Result<(), QueueError> {
        source.acknowledge(&self.done).await?;
        self.acknowledged += self.done.len() as u64;
        self.done.clear();
        Ok(())
    }

    /// Rejects the event into the dead-letter queue at once: it can never be processed, and
    /// retrying it would only hold the events behind it.
    async fn dead_letter(
        &mut self,
        source: &mut dyn EventSource,
        event: Pending,
        reason: &anyhow::Error,
    ) -> Result<(), QueueError> {
        crate::telemetry::record_error(&event.span, "permanent");
        let _in_event = event.span.enter();
        let received = &event.received;
        tracing::error!(event_id = %received.event.event_id, trace_id = received.trace.as_ref().map(TraceContext::trace_id), error = %format!("{reason:#}"), "dead-lettering an event that cannot be processed");
        source.dead_letter(event.tag).await?;
        self.dead_lettered += 1;
        Ok(())
    }
}

/// Whether the handler's rejections name any of the pending events (else the failure is not
/// attributed and the events are tried one by one).
fn names_any(rejections: &[Rejection], pending: &[Pending]) -> bool {
    pending.iter().any(|p| {
        rejections
            .iter()
            .any(|r| r.event_id == p.received.event.event_id)
    })
}

/// Why the handler rejected `event` (the first reason it gave for it).
fn rejection_of(rejections: &[Rejection], event: &Pending) -> anyhow::Error {
    rejections
        .iter()
        .find(|r| r.event_id == event.received.event.event_id)
        .map_or_else(
            || anyhow::anyhow!("rejected"),
            |r| anyhow::anyhow!("{:#}", r.reason),
        )
}

/// Handles each event alone, once: done, or dead-lettered at once when it fails permanently.
/// Returns the events that failed transiently, for another round after the backoff.
async fn one_by_one<H: BatchHandler>(
    source: &mut dyn EventSource,
    handler: &H,
    events: Vec<Pending>,
    settled: &mut Settled,
    observe: &BatchObserver<'_>,
) -> Result<Vec<Pending>, QueueError> {
    let mut again = Vec::new();
    for event in events {
        let handled = handler
            .handle(std::slice::from_ref(&event.received))
            .instrument(event.span.clone())
            .await;
        match handled {
            Ok(()) => settled.done(vec![event]),
            Err(HandleError::Transient(error)) => {
                observe.failed();
                tracing::warn!(event_id = %event.received.event.event_id, error = %format!("{error:#}"), "event failed transiently, retrying it after the others");
                again.push(event);
            }
            Err(HandleError::Permanent(reason)) => {
                observe.failed();
                settled.dead_letter(source, event, &reason).await?;
            }
            Err(HandleError::Rejected(rejections)) => {
                observe.failed();
                let reason = rejection_of(&rejections, &event);
                settled.dead_letter(source, event, &reason).await?;
            }
        }
    }
    Ok(again)
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

impl BatchObserver<'_> {
    /// Counts a failed attempt (of a batch or a single event).
    fn failed(&self) {
        self.metrics.events_failed.get_or_create(&self.labels).inc();
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
