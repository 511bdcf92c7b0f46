//! The event queue between the api and the consumers: one trait, [`EventQueue`], with a RabbitMQ
//! adapter (the distributed stack) and a SQLite adapter (embedded). Which consumer receives which
//! events is decided by the events ([`crate::events::Consumer`]), the queue names by the
//! configuration ([`crate::config::Topology`]); an adapter only turns them into its objects.
//!
//! Events stay in a consumer's queue until they are acknowledged, so a crash at any point
//! delivers them again; an event that can never be processed moves to the queue's dead-letter
//! queue, from which [`EventQueue::replay_dead_letters`] moves it back.

mod rabbitmq;
mod sqlite;
mod timed;

use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::changes::MessageChange;
use crate::config::ConsumerConfig;
use crate::events::{Consumer, Event, TraceContext};
use crate::retry::Transient;
use crate::store::ChatKey;

pub use rabbitmq::{RabbitMqQueue, envelope, event_properties};
pub use sqlite::SqliteQueue;
pub use timed::TimedQueue;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    TimedOut(#[from] crate::retry::DependencyTimedOut),
    #[error("rabbitmq: {0}")]
    Broker(#[from] lapin::Error),
    #[error("rabbitmq refused the event (nack)")]
    Nacked,
    #[error("no queue is bound for routing key {0}")]
    Unroutable(&'static str),
    #[error("the event was not confirmed durable within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the broker cancelled the consumer")]
    ConsumerCancelled,
    #[error("the rabbitmq publisher stopped with its channel")]
    PublisherStopped,
    #[error("sqlite queue: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the embedded queue could not store the event: {0}")]
    Embedded(String),
}

impl Transient for QueueError {
    fn is_transient(&self) -> bool {
        match self {
            Self::TimedOut(_) => true,
            Self::Database(error) => crate::sql_errors::is_transient(error),
            // A topology that lacks a binding does not fix itself.
            Self::Unroutable(_) => false,
            Self::Broker(_)
            | Self::Nacked
            | Self::ConfirmTimeout(_)
            | Self::ConsumerCancelled
            | Self::PublisherStopped
            | Self::Embedded(_) => true,
        }
    }
}

/// Every call is timed by [`TimedQueue`], which the composition root wraps around the adapter; it
/// also opens the producer span of a publish and gives the event that span's trace context.
#[async_trait]
pub trait EventQueue: Send + Sync {
    /// "rabbitmq" or "sqlite-queue": the dependency label of metrics and readiness.
    fn kind(&self) -> &'static str;

    /// `messaging.system` of the producer and consumer spans.
    fn system(&self) -> &'static str;

    /// The name of the queue of `consumer` (its dead-letter queue is
    /// [`crate::config::Topology::dead_letter_queue`] of it).
    fn queue_name(&self, consumer: Consumer) -> &str;

    /// Creates the exchanges, queues, dead-letter queues and bindings that are missing.
    async fn ensure_topology(&self) -> Result<(), QueueError>;

    /// Returns only once the event is durable (publisher confirm, or committed to disk) in the
    /// queue of every consumer that receives it. The event carries `trace`.
    async fn publish(&self, event: &Event, trace: &TraceContext) -> Result<(), QueueError>;

    /// Whether a publish can be attempted now.
    async fn is_ready(&self) -> bool;

    /// Starts consuming the queue of `consumer`.
    async fn open_source(
        &self,
        consumer: Consumer,
        settings: &ConsumerConfig,
    ) -> Result<Box<dyn EventSource>, QueueError>;

    /// Tells the api replicas that follow these changes' chats that they are stored. Not durable
    /// and queued for nobody who is not listening: the storage is the record.
    async fn announce(&self, changes: &[MessageChange]) -> Result<(), QueueError>;

    /// Hears, from now on, the announcements of the chats the listener follows (none at first:
    /// see [`Listener`]).
    async fn listen(&self) -> Result<Listener, QueueError>;

    /// Events waiting in the queue named `queue` (a consumer's queue or its dead-letter queue).
    async fn depth(&self, queue: &str) -> Result<u64, QueueError>;

    /// Moves the events waiting in the dead-letter queue of `consumer` back into its queue (after
    /// the cause was fixed); returns how many. Only the events present at the start are moved, so
    /// an event that fails again is dead-lettered again instead of looping.
    async fn replay_dead_letters(&self, consumer: Consumer) -> Result<u64, QueueError>;
}

/// The announcements one listener hears, batch by batch; it ends when the listener lost its
/// connection (or fell behind), and whoever relied on it reads the storage for what it missed.
pub type Announcements = futures_util::stream::BoxStream<'static, Vec<MessageChange>>;

/// What one api replica hears of the announcements: those of the chats it follows, so that a
/// replica receives no change of a chat nobody streams from it.
pub struct Listener {
    pub announcements: Announcements,
    pub chats: Box<dyn FollowedChats>,
}

/// The chats a [`Listener`] follows.
#[async_trait]
pub trait FollowedChats: Send + Sync {
    /// The chat's announcements are heard from when this returns.
    async fn follow(&self, chat: ChatKey) -> Result<(), QueueError>;

    /// The chat's announcements are heard no more (those on their way may still arrive).
    async fn unfollow(&self, chat: ChatKey) -> Result<(), QueueError>;
}

/// One event as a consumer receives it. `tag` identifies it for acknowledging and dead-lettering.
#[derive(Debug)]
pub struct Delivery {
    pub tag: u64,
    pub data: Vec<u8>,
    pub trace: Option<TraceContext>,
}

/// The consuming side of one queue.
#[async_trait]
pub trait EventSource: Send {
    /// Waits for the first event, then gathers more until the batch is full or its time is up.
    /// None on shutdown.
    async fn next_batch(
        &mut self,
        settings: &ConsumerConfig,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Delivery>>, QueueError>;

    /// Moves one event of the current batch to the queue's dead-letter queue.
    async fn dead_letter(&mut self, tag: u64) -> Result<(), QueueError>;

    /// Hands one event of the current batch back to the queue, for a later delivery.
    async fn postpone(&mut self, tag: u64) -> Result<(), QueueError>;

    /// Removes these events of the current batch from the queue: they are done.
    async fn acknowledge(&mut self, batch: &[u64]) -> Result<(), QueueError>;

    /// Stops consuming; every delivery not acknowledged goes back to the queue.
    async fn close(self: Box<Self>);
}
