//! The event queue between the api and the consumers: one publishing trait and one consuming
//! trait, each with a RabbitMQ adapter ([`crate::broker`]) and an embedded SQLite adapter
//! ([`crate::local_queue`]). The batching consumer loop ([`crate::consumer`]) and the publishing
//! code of the api are the same for both.

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::events::{Event, TraceContext};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("rabbitmq: {0}")]
    Broker(#[from] lapin::Error),
    #[error("rabbitmq refused the event (nack)")]
    Nacked,
    #[error("no queue is bound for routing key {0}")]
    Unroutable(&'static str),
    #[error("the event was not confirmed durable within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    #[error("the embedded queue could not store the event: {0}")]
    Embedded(String),
}

/// Makes an event durable for every consumer queue bound to its routing key.
#[async_trait]
pub trait EventPublisher: Send + Sync {
    /// "rabbitmq" or "sqlite-queue": the label of readiness checks.
    fn kind(&self) -> &'static str;

    /// Returns only once the event is durable (publisher confirm, or committed to disk). The
    /// event carries the context of the publish span (or `fallback` when tracing is off).
    async fn publish(&self, event: &Event, fallback: &TraceContext) -> Result<(), PublishError>;

    async fn is_ready(&self) -> bool;
}

/// One event as a consumer receives it. `tag` identifies it for acknowledging and dead-lettering.
#[derive(Debug)]
pub struct Delivery {
    pub tag: u64,
    pub data: Vec<u8>,
    pub trace: Option<TraceContext>,
}

/// The consuming side of one queue. Events stay in the queue until acknowledged, so a crash at
/// any point delivers them again.
#[async_trait]
pub trait EventSource: Send {
    /// `messaging.system` of the consumer spans.
    fn system(&self) -> &'static str;

    /// Waits for the first event, then gathers more until the batch is full or its time is up.
    /// None on shutdown.
    async fn next_batch(
        &mut self,
        settings: &ConsumerConfig,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<Delivery>>>;

    /// Moves one event of the current batch to the queue's dead-letter queue.
    async fn dead_letter(&mut self, tag: u64) -> anyhow::Result<()>;

    /// Removes the batch from the queue: every event of it that was not dead-lettered is done.
    async fn acknowledge(&mut self, batch: &[u64]) -> anyhow::Result<()>;
}
