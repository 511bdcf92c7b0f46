//! RabbitMQ: the [`EventQueue`] adapter of the distributed stack.
//!
//! Topology (all durable): a topic exchange for events; one queue per consumer bound to the routing
//! keys it receives; each queue dead-letters into `<queue>.dead` through a direct exchange.
//!
//! Stored changes are announced to a topic exchange, not durable, by chat; each listening api
//! replica consumes the changes of the chats it streams from a queue of its own (`announcements`).
//!
//! Publishing, announcing, depth and replay share one publisher-confirmed channel that is opened on
//! first use and again after the connection is lost; every publish on it goes through its
//! [`Publisher`] (one task publishing, one settling the confirms, in order); each consumer gets a
//! connection of its own.
//!
//! Here: the queue and its link; `announcements` (announcing and listening), `connect` (a bounded
//! connection), `topology` (the declares),
//! `publisher` (the confirmed publishing task), `envelope` (what a message carries) and `source`
//! (the consuming side).

mod announcements;
mod connect;
pub mod envelope;
mod publisher;
mod source;
mod topology;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::RwLock;

pub use self::envelope::event_properties;
use self::publisher::{Outcome, Publication, Publisher};
use self::source::RabbitMqSource;
use self::topology::declare_topology;
use super::{EventQueue, EventSource, Listener, QueueError};
use crate::changes::MessageChange;
use crate::config::{AmqpNodes, ConsumerConfig, Topology};
use crate::events::{Consumer, Event, TraceContext};
use crate::retry::DependencyTimedOut;

/// AMQP delivery mode of messages kept in memory only.
const TRANSIENT: u8 = 1;

pub struct RabbitMqQueue {
    nodes: AmqpNodes,
    /// The index of the node the last connection was made to: the first one tried next.
    answered_last: AtomicUsize,
    topology: Topology,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    /// PEM of the CA an `amqps://` connection trusts beside the public roots (`CHAT_TLS_CA_FILE`).
    tls_ca: Option<String>,
    /// The largest message the api publishes: one event of the largest request, or several
    /// smaller ones sharing an envelope (so the consumers' memory bound holds either way).
    max_message_bytes: usize,
    link: RwLock<Option<Link>>,
    /// The generation of the next link (a link's generation is never reused).
    next_generation: AtomicU64,
}

/// The publisher-confirmed channel, its publisher and the connection it lives on.
struct Link {
    // Kept so the connection lives as long as its channel.
    connection: Connection,
    channel: Channel,
    publisher: Publisher,
    generation: u64,
    opened_at: Instant,
}

/// What a publish needs of the link: the channel (for declares and gets) and its publisher.
#[derive(Clone)]
struct Linked {
    channel: Channel,
    publisher: Publisher,
    generation: u64,
    opened_at: Instant,
}

impl Link {
    /// Open, and not `broken_generation`, and answering: publications that waited longer than
    /// `confirm_timeout` for any answer mean a connection dead in all but name.
    fn usable(&self, broken_generation: Option<u64>, confirm_timeout: Duration) -> bool {
        Some(self.generation) != broken_generation
            && self.channel.status().connected()
            && !self.publisher.stalled(confirm_timeout)
    }

    fn linked(&self) -> Linked {
        Linked {
            channel: self.channel.clone(),
            publisher: self.publisher.clone(),
            generation: self.generation,
            opened_at: self.opened_at,
        }
    }
}

impl RabbitMqQueue {
    /// Connects on first use, not here, to one of `nodes`. A connection to a node (TCP, TLS for
    /// `amqps://`, the AMQP handshake) takes at most `connect_timeout`; `tls_ca` is PEM. Events published together
    /// share a message of at most `max_message_bytes`.
    pub fn new(
        nodes: AmqpNodes,
        topology: Topology,
        confirm_timeout: Duration,
        connect_timeout: Duration,
        tls_ca: Option<&[u8]>,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            nodes,
            answered_last: AtomicUsize::new(0),
            topology,
            confirm_timeout,
            connect_timeout,
            tls_ca: tls_ca.map(|pem| String::from_utf8_lossy(pem).into_owned()),
            max_message_bytes,
            link: RwLock::new(None),
            next_generation: AtomicU64::new(0),
        }
    }

    /// The open channel, connecting when there is none, or it is not usable (see [`Link::usable`]),
    /// or `broken_generation` is the current one.
    async fn channel(&self, broken_generation: Option<u64>) -> Result<Linked, QueueError> {
        {
            let link = self.link.read().await;
            if let Some(link) = link.as_ref()
                && link.usable(broken_generation, self.confirm_timeout)
            {
                return Ok(link.linked());
            }
        }
        let mut link = self.link.write().await;
        if let Some(current) = link.as_ref()
            && current.usable(broken_generation, self.confirm_timeout)
        {
            return Ok(current.linked());
        }
        if let Some(stale) = link.take()
            && stale.channel.status().connected()
        {
            if stale.publisher.stalled(self.confirm_timeout) {
                tracing::warn!(
                    generation = stale.generation,
                    "rabbitmq: publishes on the open channel went unanswered, opening another"
                );
            }
            // Closed, not only dropped: lapin's IO thread would keep the connection.
            let limit = self.connect_timeout;
            tokio::spawn(async move {
                let close = stale.connection.close(200, "replaced".into());
                let _ = tokio::time::timeout(limit, close).await;
            });
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // Bounded as a whole: the declares of a node that is itself in trouble could hold this
        // lock, and with it every publish of the process, for as long as they wait.
        let limit = self.connect_timeout + self.confirm_timeout;
        let opened = tokio::time::timeout(limit, self.open_link(generation))
            .await
            .map_err(|_| DependencyTimedOut {
                dependency: "rabbitmq",
                operation: "open the publishing channel",
                limit,
            })??;
        let linked = opened.linked();
        *link = Some(opened);
        Ok(linked)
    }

    /// A connection, its confirmed channel with the topology declared, and its publisher.
    async fn open_link(&self, generation: u64) -> Result<Link, QueueError> {
        let connection_name = format!("{} publisher", self.topology.exchange);
        let connection = self.connect(&connection_name).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_topology(&channel, &self.topology).await?;
        Ok(Link {
            connection,
            publisher: Publisher::start(channel.clone(), self.max_message_bytes),
            channel,
            generation,
            opened_at: Instant::now(),
        })
    }

    /// Publishes through the link's publisher; the broker's answer to this publish, within the
    /// confirm timeout.
    async fn publish_through(
        &self,
        linked: &Linked,
        publication: Publication,
    ) -> Result<Outcome, QueueError> {
        tokio::time::timeout(self.confirm_timeout, linked.publisher.publish(publication))
            .await
            .map_err(|_| QueueError::ConfirmTimeout(self.confirm_timeout))?
            .map_err(|_| QueueError::PublisherStopped)?
            .map_err(QueueError::Broker)
    }

    async fn publish_on(
        &self,
        linked: &Linked,
        event: &Event,
        trace: &TraceContext,
    ) -> Result<(), QueueError> {
        let routing_key = event.routing_key();
        let publication = Publication {
            exchange: self.topology.exchange.clone(),
            routing_key: routing_key.to_owned(),
            payload: event.encode(),
            properties: event_properties(event, trace),
            mandatory: true,
            event_trace: Some(trace.as_str().to_owned()),
        };
        match self.publish_through(linked, publication).await? {
            Outcome::Stored => Ok(()),
            Outcome::Returned => Err(QueueError::Unroutable(routing_key)),
            Outcome::Refused => Err(QueueError::Nacked),
        }
    }
}

/// How long a link refused a publish stays in use before a refusal replaces it.
const REFUSED_LINK_KEPT: Duration = Duration::from_secs(1);

/// Whether a failed publish is tried again on a new link: the connection or its publisher broke;
/// or the broker refused it (nack) on a link opened a while ago. A channel that published to a
/// quorum queue whose leader was lost can go on being refused after a new leader is elected
/// (RabbitMQ 3.10, three nodes, one killed under load: every publish refused for over a minute)
/// where a new channel is not. At most once a second per link, so a broker that refuses
/// everything is not reconnected to on every publish.
fn reopens_after(error: &QueueError, linked: &Linked) -> bool {
    match error {
        QueueError::Broker(_) | QueueError::PublisherStopped => true,
        QueueError::Nacked => linked.opened_at.elapsed() >= REFUSED_LINK_KEPT,
        _ => false,
    }
}

#[async_trait]
impl EventQueue for RabbitMqQueue {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    fn queue_name(&self, consumer: Consumer) -> &str {
        self.topology.queue(consumer)
    }

    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn ensure_topology(&self) -> Result<(), QueueError> {
        // Opening the channel declares the topology.
        self.channel(None).await.map(drop)
    }

    /// Waits for the broker's confirm. Retries once on a fresh connection when the current one
    /// is broken or refused it (events are idempotent, so a duplicate is harmless).
    async fn publish(&self, event: &Event, trace: &TraceContext) -> Result<(), QueueError> {
        let linked = self.channel(None).await?;
        match self.publish_on(&linked, event, trace).await {
            Err(error) if reopens_after(&error, &linked) => {
                tracing::warn!(%error, "publish failed, reconnecting to rabbitmq");
                let linked = self.channel(Some(linked.generation)).await?;
                self.publish_on(&linked, event, trace).await
            }
            outcome => outcome,
        }
    }

    /// True when the channel is open. (Not whether it answers: a broker that blocks publishers
    /// for a memory alarm still serves reads, and the next publish replaces a dead link.)
    async fn is_ready(&self) -> bool {
        self.link
            .read()
            .await
            .as_ref()
            .is_some_and(|link| link.channel.status().connected())
    }

    async fn open_source(
        &self,
        consumer: Consumer,
        settings: &ConsumerConfig,
    ) -> Result<Box<dyn EventSource>, QueueError> {
        Ok(Box::new(
            RabbitMqSource::open(self, consumer, settings).await?,
        ))
    }

    async fn announce(&self, changes: &[MessageChange]) -> Result<(), QueueError> {
        self.announce_by_chat(changes).await
    }

    async fn listen(&self) -> Result<Listener, QueueError> {
        self.listen_by_chat().await
    }

    /// Messages ready in a queue, through a passive declare (which fails if the queue is missing).
    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let channel = self.channel(None).await?.channel;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await?;
        Ok(u64::from(declared.message_count()))
    }

    async fn replay_dead_letters(&self, consumer: Consumer) -> Result<u64, QueueError> {
        let queue = self.topology.queue(consumer);
        let dead_letter_queue = Topology::dead_letter_queue(queue);
        let waiting = self.depth(&dead_letter_queue).await?;
        let linked = self.channel(None).await?;
        let channel = &linked.channel;
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
            let publication = Publication {
                exchange: String::new(),
                routing_key: queue.to_owned(),
                payload: delivery.data.clone(),
                properties: delivery.properties.clone(),
                mandatory: true,
                event_trace: None,
            };
            if self.publish_through(&linked, publication).await? != Outcome::Stored {
                return Err(QueueError::Nacked);
            }
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await?;
            moved += 1;
        }
        Ok(moved)
    }
}
