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
    /// handshake) takes at most `connect_timeout`; `tls_ca` is PEM.
    pub fn new(
        url: SecretUrl,
        topology: Topology,
        confirm_timeout: Duration,
        connect_timeout: Duration,
        tls_ca: Option<&[u8]>,
    ) -> Self {
        Self {
            url,
            topology,
            confirm_timeout,
            connect_timeout,
            tls_ca: tls_ca.map(|pem| String::from_utf8_lossy(pem).into_owned()),
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
            publisher: Publisher::start(channel.clone()),
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
        tracing::info!(queue, prefetch = settings.prefetch, "consumer started");
        Ok(Box::new(RabbitMqSource {
            connection,
            channel,
            deliveries,
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
        let mut batch = vec![delivery_of(first?)];
        let deadline = tokio::time::Instant::now() + settings.batch_max_wait;
        // Beyond the prefetch nothing more arrives before the batch is acknowledged.
        let limit = settings.batch_max_size.min(usize::from(settings.prefetch));
        while batch.len() < limit {
            match tokio::time::timeout_at(deadline, self.deliveries.next()).await {
                Ok(Some(delivery)) => batch.push(delivery_of(delivery?)),
                Ok(None) => return Err(QueueError::ConsumerCancelled),
                Err(_elapsed) => break,
            }
        }
        Ok(Some(batch))
    }

    async fn dead_letter(&mut self, tag: u64) -> Result<(), QueueError> {
        self.channel
            .basic_reject(tag, BasicRejectOptions { requeue: false })
            .await?;
        Ok(())
    }

    async fn postpone(&mut self, tag: u64) -> Result<(), QueueError> {
        self.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await?;
        Ok(())
    }

    async fn acknowledge(&mut self, batch: &[u64]) -> Result<(), QueueError> {
        // Delivery tags grow within a channel: one multiple-ack up to the highest tag settles them
        // all (a dead-lettered or postponed tag below it is no longer outstanding: skipped).
        if let Some(last) = batch.iter().max() {
            self.channel
                .basic_ack(*last, BasicAckOptions { multiple: true })
                .await?;
        }
        Ok(())
    }

    async fn close(self: Box<Self>) {
        // Closing the channel hands every unacked delivery back to the queue.
        let _ = self.channel.close(200, "shutting down".into()).await;
        let _ = self.connection.close(200, "shutting down".into()).await;
    }
}

fn delivery_of(delivery: lapin::message::Delivery) -> Delivery {
    Delivery {
        tag: delivery.delivery_tag,
        trace: trace_context_of(&delivery.properties),
        data: delivery.data,
    }
}
