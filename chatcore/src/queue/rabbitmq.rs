//! RabbitMQ: the [`EventQueue`] adapter of the distributed stack.
//!
//! Topology (all durable): a topic exchange for events; one queue per consumer bound to the routing
//! keys it receives; each queue dead-letters into `<queue>.dead` through a direct exchange.
//!
//! Stored changes are announced to a fanout exchange, not durable; each listening api replica
//! consumes them from a queue of its own (server-named, exclusive, bounded, deleted with its
//! connection).
//!
//! Publishing, announcing, depth and replay share one publisher-confirmed channel that is opened on
//! first use and again after the connection is lost; every publish on it goes through its
//! [`Publisher`] (one task publishing, one settling the confirms, in order); each consumer gets a
//! connection of its own.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::Shutdown;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::{AsyncTcpStream, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use super::envelope;
use super::publisher::{Outcome, Publication, Publisher};
use super::{Announcements, Delivery, EventQueue, EventSource, QueueError};
use crate::changes::{self, MessageChange};
use crate::config::{ConsumerConfig, QueueType, SecretUrl, Topology};
use crate::events::{
    Consumer, Event, SCHEMA_VERSION, SCHEMA_VERSION_HEADER, TRACEPARENT_HEADER, TraceContext,
};

/// AMQP delivery mode of messages written to disk.
const PERSISTENT: u8 = 2;
/// AMQP delivery mode of messages kept in memory only.
const TRANSIENT: u8 = 1;
/// Announcements a listener's queue holds at most; beyond it the oldest are dropped (a replica
/// that stopped reading must not grow the broker's memory).
const ANNOUNCEMENTS_QUEUED: u32 = 10_000;

pub struct RabbitMqQueue {
    url: SecretUrl,
    topology: Topology,
    confirm_timeout: Duration,
    connect_timeout: Duration,
    /// PEM of the CA an `amqps://` connection trusts beside the public roots (`CHAT_TLS_CA_FILE`).
    tls_ca: Option<String>,
    /// The largest message the api publishes: one event of the largest request, or several
    /// smaller ones sharing an envelope (so the consumers' memory bound holds either way).
    max_message_bytes: usize,
    link: RwLock<Option<Link>>,
}

/// The publisher-confirmed channel, its publisher and the connection it lives on.
struct Link {
    // Kept so the connection lives as long as its channel.
    _connection: Connection,
    channel: Channel,
    publisher: Publisher,
    generation: u64,
}

/// What a publish needs of the link: the channel (for declares and gets) and its publisher.
#[derive(Clone)]
struct Linked {
    channel: Channel,
    publisher: Publisher,
    generation: u64,
}

impl Link {
    fn linked(&self) -> Linked {
        Linked {
            channel: self.channel.clone(),
            publisher: self.publisher.clone(),
            generation: self.generation,
        }
    }
}

impl RabbitMqQueue {
    /// Connects on first use, not here. A connection (TCP, TLS for `amqps://`, the AMQP
    /// handshake) takes at most `connect_timeout`; `tls_ca` is PEM. Events published together
    /// share a message of at most `max_message_bytes`.
    pub fn new(
        url: SecretUrl,
        topology: Topology,
        confirm_timeout: Duration,
        connect_timeout: Duration,
        tls_ca: Option<&[u8]>,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            url,
            topology,
            confirm_timeout,
            connect_timeout,
            tls_ca: tls_ca.map(|pem| String::from_utf8_lossy(pem).into_owned()),
            max_message_bytes,
            link: RwLock::new(None),
        }
    }

    /// The open channel, connecting when there is none or `broken_generation` is the current one.
    async fn channel(&self, broken_generation: Option<u64>) -> Result<Linked, QueueError> {
        {
            let link = self.link.read().await;
            if let Some(link) = link.as_ref()
                && Some(link.generation) != broken_generation
                && link.channel.status().connected()
            {
                return Ok(link.linked());
            }
        }
        let mut link = self.link.write().await;
        if let Some(current) = link.as_ref()
            && Some(current.generation) != broken_generation
            && current.channel.status().connected()
        {
            return Ok(current.linked());
        }
        let generation = link.as_ref().map_or(0, |link| link.generation + 1);
        let connection_name = format!("{} publisher", self.topology.exchange);
        let connection = self.connect(&connection_name).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_topology(&channel, &self.topology).await?;
        let opened = Link {
            _connection: connection,
            publisher: Publisher::start(channel.clone(), self.max_message_bytes),
            channel,
            generation,
        };
        let linked = opened.linked();
        *link = Some(opened);
        Ok(linked)
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
    /// is broken (events are idempotent, so a duplicate is harmless).
    async fn publish(&self, event: &Event, trace: &TraceContext) -> Result<(), QueueError> {
        let linked = self.channel(None).await?;
        match self.publish_on(&linked, event, trace).await {
            Err(error @ (QueueError::Broker(_) | QueueError::PublisherStopped)) => {
                tracing::warn!(%error, "publish failed, reconnecting to rabbitmq");
                let linked = self.channel(Some(linked.generation)).await?;
                self.publish_on(&linked, event, trace).await
            }
            outcome => outcome,
        }
    }

    /// True when the channel is open.
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
        let queue = self.topology.queue(consumer);
        let connection = self.connect(queue).await?;
        let channel = connection.create_channel().await?;
        declare_topology(&channel, &self.topology).await?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await?;
        let deliveries = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Events of an envelope that are dead-lettered or handed back alone are published again
        // by themselves, confirmed, before their envelope is acknowledged.
        let republishing = connection.create_channel().await?;
        republishing
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        tracing::info!(queue, prefetch = settings.prefetch, "consumer started");
        Ok(Box::new(RabbitMqSource {
            connection,
            channel,
            deliveries,
            republisher: Publisher::start(republishing, self.max_message_bytes),
            queue: queue.to_owned(),
            dead_letter_exchange: self.topology.dead_letter_exchange.clone(),
            confirm_timeout: self.confirm_timeout,
            parts: HashMap::new(),
            unsettled_events: HashMap::new(),
            outstanding: BTreeSet::new(),
            next_tag: 0,
        }))
    }

    async fn announce(&self, changes: &[MessageChange]) -> Result<(), QueueError> {
        let linked = self.channel(None).await?;
        let publication = Publication {
            exchange: self.topology.changes_exchange.clone(),
            routing_key: String::new(),
            payload: changes::encode(changes),
            properties: BasicProperties::default()
                .with_delivery_mode(TRANSIENT)
                .with_content_type(ShortString::from("application/json")),
            mandatory: false,
            event_trace: None,
        };
        match self.publish_through(&linked, publication).await? {
            Outcome::Stored | Outcome::Returned => Ok(()),
            Outcome::Refused => Err(QueueError::Nacked),
        }
    }

    async fn listen(&self) -> Result<Announcements, QueueError> {
        let connection = self
            .connect(&format!("{} listener", self.topology.changes_exchange))
            .await?;
        let channel = connection.create_channel().await?;
        declare_topology(&channel, &self.topology).await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-max-length".into(),
            AMQPValue::LongUInt(ANNOUNCEMENTS_QUEUED),
        );
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                self.topology.changes_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let deliveries = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        // The connection lives as long as the stream; the stream ends with the connection.
        Ok(Box::pin(futures_util::stream::unfold(
            (connection, deliveries),
            |(connection, mut deliveries)| async move {
                loop {
                    let delivery = deliveries.next().await?.ok()?;
                    match changes::decode(&delivery.data) {
                        Ok(changes) => return Some((changes, (connection, deliveries))),
                        Err(error) => {
                            tracing::warn!(%error, "skipping an announcement that is not valid")
                        }
                    }
                }
            },
        )))
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

impl RabbitMqQueue {
    /// Opens a connection within `connect_timeout`: TCP, TLS (`amqps://`, trusting the public
    /// roots and `tls_ca`) and the AMQP handshake. lapin runs the handshake on an IO thread of its
    /// own that the timeout does not stop, so past it the socket is shut down under that thread
    /// (a broker that accepts and never answers would otherwise hold it forever).
    async fn connect(&self, connection_name: &str) -> Result<Connection, lapin::Error> {
        let uri: AMQPUri = self
            .url
            .expose()
            .parse()
            .map_err(|error: String| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.tls_ca.clone(),
        };
        let timeout = self.connect_timeout;
        let dialing = Arc::new(Mutex::new(Dialing::Connecting(None)));
        let runtime = lapin::runtime::default_runtime()?;
        let handles = Arc::clone(&dialing);
        let connecting = Connection::connector(
            uri,
            runtime,
            async move |uri, runtime| {
                let host = uri.authority.host.clone();
                let addresses = runtime.to_socket_addrs((host.clone(), uri.authority.port));
                let stream =
                    tokio::time::timeout(timeout, AsyncTcpStream::connect(&runtime, addresses))
                        .await
                        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                if let AsyncTcpStream::Plain(socket) = &stream {
                    // Publishes, acks and confirms are small frames sent while others are
                    // unanswered: Nagle's algorithm would hold them back.
                    socket.get_ref().set_nodelay(true)?;
                    let mut dialing = handles.lock().unwrap_or_else(PoisonError::into_inner);
                    match &mut *dialing {
                        Dialing::Abandoned => {
                            return Err(io::Error::from(io::ErrorKind::TimedOut).into());
                        }
                        Dialing::Connecting(handle) => {
                            *handle = Some(socket_handle(socket.get_ref())?);
                        }
                        Dialing::Connected => {}
                    }
                }
                match uri.scheme {
                    AMQPScheme::AMQP => Ok(stream),
                    AMQPScheme::AMQPS => Ok(stream.into_tls(&host, tls.as_ref()).await?),
                }
            },
            properties,
        );
        let connected = tokio::time::timeout(timeout, connecting).await;
        let succeeded = matches!(connected, Ok(Ok(_)));
        let previous = std::mem::replace(
            &mut *dialing.lock().unwrap_or_else(PoisonError::into_inner),
            if succeeded {
                Dialing::Connected
            } else {
                Dialing::Abandoned
            },
        );
        if let Dialing::Connecting(Some(socket)) = previous
            && !succeeded
        {
            // lapin's IO thread may still wait on it: this ends the wait.
            let _ = socket.shutdown(Shutdown::Both);
        }
        match connected {
            Ok(connection) => connection,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("rabbitmq: no connection within {timeout:?}"),
            )
            .into()),
        }
    }
}

/// Where the connection of one [`RabbitMqQueue::connect`] is.
enum Dialing {
    /// Before the handshake ended: a second handle on the socket once there is one.
    Connecting(Option<std::net::TcpStream>),
    /// Timed out or failed: a late dial gives up.
    Abandoned,
    /// The connection is lapin's alone (a handle kept here would keep its socket open).
    Connected,
}

/// A second handle on a socket, to shut it down from outside lapin's IO thread.
#[cfg(unix)]
fn socket_handle(socket: &tokio::net::TcpStream) -> io::Result<std::net::TcpStream> {
    use std::os::fd::AsFd as _;
    Ok(socket.as_fd().try_clone_to_owned()?.into())
}

#[cfg(windows)]
fn socket_handle(socket: &tokio::net::TcpStream) -> io::Result<std::net::TcpStream> {
    use std::os::windows::io::AsSocket as _;
    Ok(socket.as_socket().try_clone_to_owned()?.into())
}

/// Declares exchanges, queues, dead-letter queues and bindings; idempotent.
async fn declare_topology(channel: &Channel, topology: &Topology) -> Result<(), lapin::Error> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            topology.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            topology.dead_letter_exchange.as_str().into(),
            ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            topology.changes_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut typed = FieldTable::default();
    if let QueueType::Quorum { .. } = topology.queue_type {
        typed.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    for consumer in Consumer::ALL {
        let queue = topology.queue(consumer);
        let dead_letter_queue = Topology::dead_letter_queue(queue);
        let mut arguments = typed.clone();
        if let QueueType::Quorum { delivery_limit } = topology.queue_type {
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongUInt(delivery_limit),
            );
        }
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(topology.dead_letter_exchange.as_str().into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dead_letter_queue.as_str().into()),
        );
        channel
            .queue_declare(queue.into(), durable_queue, arguments)
            .await?;
        for routing_key in consumer.routing_keys() {
            channel
                .queue_bind(
                    queue.into(),
                    topology.exchange.as_str().into(),
                    (*routing_key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        channel
            .queue_declare(
                dead_letter_queue.as_str().into(),
                durable_queue,
                typed.clone(),
            )
            .await?;
        channel
            .queue_bind(
                dead_letter_queue.as_str().into(),
                topology.dead_letter_exchange.as_str().into(),
                dead_letter_queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// AMQP properties of an event: persistent, JSON, with schema version and trace context headers.
pub fn event_properties(event: &Event, trace: &TraceContext) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        TRACEPARENT_HEADER.into(),
        AMQPValue::LongString(trace.as_str().into()),
    );
    headers.insert(
        SCHEMA_VERSION_HEADER.into(),
        AMQPValue::LongUInt(SCHEMA_VERSION),
    );
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(event.event_id.to_string()))
        .with_headers(headers)
}

/// Reads the trace context of a delivery, if it carries a valid one.
fn trace_context_of(properties: &BasicProperties) -> Option<TraceContext> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(TRACEPARENT_HEADER)? {
        AMQPValue::LongString(value) => {
            TraceContext::parse(std::str::from_utf8(value.as_bytes()).ok()?)
        }
        _ => None,
    }
}

/// The consuming side of one RabbitMQ queue, on a channel with a prefetch window.
struct RabbitMqSource {
    connection: Connection,
    channel: Channel,
    deliveries: lapin::Consumer,
    /// Publishes single events of an envelope again: into the dead-letter exchange, or back into
    /// this queue.
    republisher: Publisher,
    queue: String,
    dead_letter_exchange: String,
    confirm_timeout: Duration,
    /// What each tag handed to the consumer stands for (tags are this source's own: an envelope
    /// is one AMQP delivery but several events).
    parts: HashMap<u64, Part>,
    /// Per AMQP delivery of an envelope: its events not settled yet.
    unsettled_events: HashMap<u64, usize>,
    /// AMQP deliveries not acknowledged, rejected or handed back yet.
    outstanding: BTreeSet<u64>,
    next_tag: u64,
}

/// A delivery as the consumer sees it.
enum Part {
    /// An AMQP delivery of one event.
    Whole { delivery_tag: u64 },
    /// One event of an envelope, kept for publishing it again alone.
    OfEnvelope {
        delivery_tag: u64,
        /// The envelope's, shared by its events.
        properties: Arc<BasicProperties>,
        event: envelope::Enveloped,
    },
}

impl RabbitMqSource {
    /// The events of one AMQP delivery, each under a tag of this source.
    fn unpack_delivery(&mut self, delivery: lapin::message::Delivery, batch: &mut Vec<Delivery>) {
        let delivery_tag = delivery.delivery_tag;
        self.outstanding.insert(delivery_tag);
        let is_envelope = delivery
            .properties
            .content_type()
            .as_ref()
            .is_some_and(|content_type| content_type.as_str() == envelope::CONTENT_TYPE);
        let events = if is_envelope {
            envelope::unpack(&delivery.data)
                .inspect_err(|error| tracing::error!(delivery_tag, %error, "an envelope that does not unpack is handed on whole, to be dead-lettered"))
                .ok()
        } else {
            None
        };
        let Some(events) = events else {
            self.next_tag += 1;
            self.parts
                .insert(self.next_tag, Part::Whole { delivery_tag });
            batch.push(Delivery {
                tag: self.next_tag,
                trace: trace_context_of(&delivery.properties),
                data: delivery.data,
            });
            return;
        };
        self.unsettled_events.insert(delivery_tag, events.len());
        let properties = Arc::new(
            delivery
                .properties
                .with_content_type(ShortString::from("application/json")),
        );
        for event in events {
            self.next_tag += 1;
            batch.push(Delivery {
                tag: self.next_tag,
                trace: event.trace.clone(),
                data: event.data.clone(),
            });
            self.parts.insert(
                self.next_tag,
                Part::OfEnvelope {
                    delivery_tag,
                    properties: Arc::clone(&properties),
                    event,
                },
            );
        }
        if self.unsettled_events.get(&delivery_tag) == Some(&0) {
            // An empty envelope: nothing to process.
            self.unsettled_events.remove(&delivery_tag);
            self.parts
                .insert(self.next_tag + 1, Part::Whole { delivery_tag });
            self.next_tag += 1;
            batch.push(Delivery {
                tag: self.next_tag,
                trace: None,
                data: Vec::new(),
            });
        }
    }

    /// Publishes one event of an envelope alone (into `exchange` with `routing_key`), confirmed.
    async fn republish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
        event: &envelope::Enveloped,
    ) -> Result<(), QueueError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        if let Some(trace) = &event.trace {
            headers.insert(
                TRACEPARENT_HEADER.into(),
                AMQPValue::LongString(trace.as_str().into()),
            );
        }
        let publication = Publication {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            payload: event.data.clone(),
            properties: BasicProperties::clone(properties).with_headers(headers),
            mandatory: true,
            event_trace: None,
        };
        let answered =
            tokio::time::timeout(self.confirm_timeout, self.republisher.publish(publication))
                .await
                .map_err(|_| QueueError::ConfirmTimeout(self.confirm_timeout))?
                .map_err(|_| QueueError::PublisherStopped)?;
        match answered? {
            Outcome::Stored => Ok(()),
            Outcome::Returned => Err(QueueError::Unroutable("dead letter or requeue")),
            Outcome::Refused => Err(QueueError::Nacked),
        }
    }

    /// One event of an envelope is settled; returns the AMQP delivery once all of its are.
    fn settle_event(&mut self, delivery_tag: u64) -> Option<u64> {
        let unsettled = self.unsettled_events.get_mut(&delivery_tag)?;
        *unsettled -= 1;
        if *unsettled > 0 {
            return None;
        }
        self.unsettled_events.remove(&delivery_tag);
        Some(delivery_tag)
    }

    /// Acknowledges these AMQP deliveries: one multiple-ack when no other delivery below the
    /// highest is still outstanding, else one ack each.
    async fn acknowledge_deliveries(&mut self, delivery_tags: &[u64]) -> Result<(), QueueError> {
        let Some(highest) = delivery_tags.iter().max().copied() else {
            return Ok(());
        };
        for tag in delivery_tags {
            self.outstanding.remove(tag);
        }
        if self.outstanding.range(..highest).next().is_none() {
            self.channel
                .basic_ack(highest, BasicAckOptions { multiple: true })
                .await?;
            return Ok(());
        }
        for tag in delivery_tags {
            self.channel
                .basic_ack(*tag, BasicAckOptions { multiple: false })
                .await?;
        }
        Ok(())
    }

    /// Settles one handed-out event apart from the batch: a whole delivery by `whole` (reject or
    /// nack), an event of an envelope by publishing it again alone into `exchange`/`routing_key`.
    async fn settle_alone(
        &mut self,
        tag: u64,
        exchange: &str,
        routing_key: &str,
        whole: impl AsyncFnOnce(&Channel, u64) -> Result<(), lapin::Error>,
    ) -> Result<(), QueueError> {
        match self.parts.remove(&tag) {
            Some(Part::Whole { delivery_tag }) => {
                whole(&self.channel, delivery_tag).await?;
                self.outstanding.remove(&delivery_tag);
                Ok(())
            }
            Some(Part::OfEnvelope {
                delivery_tag,
                properties,
                event,
            }) => {
                self.republish(exchange, routing_key, &properties, &event)
                    .await?;
                if let Some(done) = self.settle_event(delivery_tag) {
                    self.acknowledge_deliveries(&[done]).await?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl EventSource for RabbitMqSource {
    async fn next_batch(
        &mut self,
        settings: &ConsumerConfig,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Delivery>>, QueueError> {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            delivery = self.deliveries.next() => delivery,
        };
        let Some(first) = first else {
            return Err(QueueError::ConsumerCancelled);
        };
        let mut batch = Vec::new();
        let mut deliveries = 1;
        self.unpack_delivery(first?, &mut batch);
        let deadline = tokio::time::Instant::now() + settings.batch_max_wait;
        // Beyond the prefetch nothing more arrives before the batch is acknowledged.
        while batch.len() < settings.batch_max_size && deliveries < usize::from(settings.prefetch) {
            match tokio::time::timeout_at(deadline, self.deliveries.next()).await {
                Ok(Some(delivery)) => {
                    self.unpack_delivery(delivery?, &mut batch);
                    deliveries += 1;
                }
                Ok(None) => return Err(QueueError::ConsumerCancelled),
                Err(_elapsed) => break,
            }
        }
        Ok(Some(batch))
    }

    async fn dead_letter(&mut self, tag: u64) -> Result<(), QueueError> {
        let routing_key = Topology::dead_letter_queue(&self.queue);
        let exchange = self.dead_letter_exchange.clone();
        self.settle_alone(
            tag,
            &exchange,
            &routing_key,
            async |channel, delivery_tag| {
                channel
                    .basic_reject(delivery_tag, BasicRejectOptions { requeue: false })
                    .await
            },
        )
        .await
    }

    async fn postpone(&mut self, tag: u64) -> Result<(), QueueError> {
        let queue = self.queue.clone();
        self.settle_alone(tag, "", &queue, async |channel, delivery_tag| {
            channel
                .basic_nack(
                    delivery_tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
        })
        .await
    }

    async fn acknowledge(&mut self, batch: &[u64]) -> Result<(), QueueError> {
        let mut done = Vec::new();
        for tag in batch {
            match self.parts.remove(tag) {
                Some(Part::Whole { delivery_tag }) => done.push(delivery_tag),
                Some(Part::OfEnvelope { delivery_tag, .. }) => {
                    done.extend(self.settle_event(delivery_tag));
                }
                None => {}
            }
        }
        self.acknowledge_deliveries(&done).await
    }

    async fn close(self: Box<Self>) {
        // Closing the channel hands every unacked delivery back to the queue.
        let _ = self.channel.close(200, "shutting down".into()).await;
        let _ = self.connection.close(200, "shutting down".into()).await;
    }
}
