//! [`TimedQueue`]: every call of an [`EventQueue`] adapter timed. A publish runs in the producer
//! span (its trace context travels with the event) and is timed by outcome as
//! `chat_publish_confirm_duration_seconds`; the other calls run in client spans timed as
//! `chat_dependency_duration_seconds{dependency=<kind>, operation=<method>}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tracing::Instrument as _;

use tokio_util::sync::CancellationToken;

use super::{Delivery, EventQueue, EventSource, Listener, QueueError};
use crate::changes::MessageChange;
use crate::config::ConsumerConfig;
use crate::events::{Consumer, Event, TraceContext};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::retry::DependencyTimedOut;

pub struct TimedQueue {
    inner: Arc<dyn EventQueue>,
    metrics: Arc<Metrics>,
    /// The longest wait for one call on the request path (`CHAT_DEPENDENCY_TIMEOUT_MS`).
    limit: Duration,
}

impl TimedQueue {
    pub fn new(inner: Arc<dyn EventQueue>, metrics: Arc<Metrics>, limit: Duration) -> Self {
        Self {
            inner,
            metrics,
            limit,
        }
    }
}

#[async_trait]
impl EventQueue for TimedQueue {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn system(&self) -> &'static str {
        self.inner.system()
    }

    fn queue_name(&self, consumer: Consumer) -> &str {
        self.inner.queue_name(consumer)
    }

    async fn ensure_topology(&self) -> Result<(), QueueError> {
        let call = self.inner.ensure_topology();
        self.metrics
            .time(self.kind(), "ensure_topology", call)
            .await
    }

    /// `trace` is the request's context, used when tracing is off; with tracing on the event
    /// carries the producer span's context instead.
    async fn publish(&self, event: &Event, trace: &TraceContext) -> Result<(), QueueError> {
        let span = tracing::info_span!(
            "queue publish",
            otel.kind = "producer",
            messaging.system = self.system(),
            messaging.destination.name = event.routing_key(),
            event_id = %event.event_id,
        );
        let trace = crate::telemetry::inject(&span, trace.clone());
        let started = Instant::now();
        // Bounded as a whole: a blocked connection (a broker memory or disk alarm) holds the
        // publish itself, not only its confirm.
        let outcome = tokio::time::timeout(self.limit, self.inner.publish(event, &trace))
            .instrument(span)
            .await
            .unwrap_or_else(|_| {
                Err(DependencyTimedOut {
                    dependency: self.kind(),
                    operation: "publish",
                    limit: self.limit,
                }
                .into())
            });
        let labels = OutcomeLabels {
            outcome: if outcome.is_ok() {
                "confirmed"
            } else {
                "failed"
            },
        };
        self.metrics
            .publish_confirm_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    async fn is_ready(&self) -> bool {
        self.metrics
            .time(self.kind(), "is_ready", async {
                tokio::time::timeout(self.limit, self.inner.is_ready())
                    .await
                    .unwrap_or(false)
            })
            .await
    }

    async fn open_source(
        &self,
        consumer: Consumer,
        settings: &ConsumerConfig,
    ) -> Result<Box<dyn EventSource>, QueueError> {
        let call = self.inner.open_source(consumer, settings);
        let source = self.metrics.time(self.kind(), "open_source", call).await?;
        Ok(Box::new(TimedSource {
            inner: source,
            kind: self.kind(),
            metrics: Arc::clone(&self.metrics),
        }))
    }

    async fn announce(&self, changes: &[MessageChange]) -> Result<(), QueueError> {
        let call = self.inner.announce(changes);
        self.metrics
            .time_within(self.kind(), "announce", self.limit, call)
            .await
    }

    async fn listen(&self) -> Result<Listener, QueueError> {
        let call = self.inner.listen();
        self.metrics
            .time_within(self.kind(), "listen", self.limit, call)
            .await
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let call = self.inner.depth(queue);
        self.metrics
            .time_within(self.kind(), "depth", self.limit, call)
            .await
    }

    async fn replay_dead_letters(&self, consumer: Consumer) -> Result<u64, QueueError> {
        let call = self.inner.replay_dead_letters(consumer);
        self.metrics
            .time(self.kind(), "replay_dead_letters", call)
            .await
    }
}

/// The consuming side, timed the same way. Waiting for the next batch is not a call's latency
/// (it lasts until events arrive), so only settling them is timed.
struct TimedSource {
    inner: Box<dyn EventSource>,
    kind: &'static str,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl EventSource for TimedSource {
    async fn next_batch(
        &mut self,
        settings: &ConsumerConfig,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Delivery>>, QueueError> {
        self.inner.next_batch(settings, shutdown).await
    }

    async fn dead_letter(&mut self, tag: u64) -> Result<(), QueueError> {
        let call = self.inner.dead_letter(tag);
        self.metrics.time(self.kind, "dead_letter", call).await
    }

    async fn postpone(&mut self, tag: u64) -> Result<(), QueueError> {
        let call = self.inner.postpone(tag);
        self.metrics.time(self.kind, "postpone", call).await
    }

    async fn acknowledge(&mut self, batch: &[u64]) -> Result<(), QueueError> {
        let call = self.inner.acknowledge(batch);
        self.metrics.time(self.kind, "acknowledge", call).await
    }

    async fn close(self: Box<Self>) {
        self.inner.close().await;
    }
}
