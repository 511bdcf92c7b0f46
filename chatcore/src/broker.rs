//! RabbitMQ: the topology, a publisher that reports success only after a publisher confirm, and
//! the consuming side of a queue (the [`crate::queue`] adapters of the distributed stack).
//!
//! Topology (all durable): a topic exchange for events; one queue per consumer bound to the routing
//! keys it needs; each queue dead-letters into `<queue>.dead` through a direct exchange.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicPublishOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::sync::Arc;

use tokio::sync::RwLock;
use tracing::Instrument as _;

use tokio_util::sync::CancellationToken;

use crate::config::{ConsumerConfig, SecretUrl, Topology};
use crate::events::{
    Event, SCHEMA_VERSION, SCHEMA_VERSION_HEADER, TRACEPARENT_HEADER, TraceContext, routing,
};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::queue::{Delivery, EventPublisher, EventSource, PublishError};

pub const PERSISTENT: u8 = 2;

pub async fn connect(url: &SecretUrl, connection_name: &str) -> Result<Connection, lapin::Error> {
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
    Connection::connect(url.expose(), properties).await
}

/// Routing keys each consumer queue receives.
pub fn queue_bindings(topology: &Topology) -> [(&str, &'static [&'static str]); 2] {
    [
        (
            topology.ingest_queue.as_str(),
            &[routing::CHAT_CREATED, routing::MESSAGE_CREATED],
        ),
        (
            topology.index_queue.as_str(),
            &[routing::MESSAGE_CREATED, routing::MESSAGE_UPDATED],
        ),
    ]
}

/// Declares exchanges, queues, dead-letter queues and bindings; idempotent.
pub async fn declare_topology(channel: &Channel, topology: &Topology) -> Result<(), lapin::Error> {
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
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for (queue, routing_keys) in queue_bindings(topology) {
        let dead_letter_queue = Topology::dead_letter_queue(queue);
        let mut arguments = FieldTable::default();
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
        for routing_key in routing_keys {
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
                FieldTable::default(),
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

/// Messages ready in a queue, through a passive declare (which fails if the queue is missing).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok(declared.message_count())
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
pub fn trace_context_of(properties: &BasicProperties) -> Option<TraceContext> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(TRACEPARENT_HEADER)? {
        AMQPValue::LongString(value) => {
            TraceContext::parse(std::str::from_utf8(value.as_bytes()).ok()?)
        }
        _ => None,
    }
}

/// A publisher-confirmed channel that reconnects after the connection is lost.
pub struct Publisher {
    url: SecretUrl,
    topology: Topology,
    confirm_timeout: Duration,
    link: RwLock<Link>,
    metrics: Arc<Metrics>,
}

struct Link {
    // Kept so the connection lives as long as its channel.
    _connection: Connection,
    channel: Channel,
    generation: u64,
}

#[async_trait]
impl EventPublisher for Publisher {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    /// Waits for the broker's confirm. Retries once on a fresh connection when the current one
    /// is broken (events are idempotent, so a duplicate is harmless).
    async fn publish(&self, event: &Event, fallback: &TraceContext) -> Result<(), PublishError> {
        let span = tracing::info_span!(
            "amqp publish",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.destination.name = %self.topology.exchange,
            messaging.rabbitmq.destination.routing_key = event.routing_key(),
            event_id = %event.event_id,
        );
        let trace = crate::telemetry::inject(&span, fallback.clone());
        let started = std::time::Instant::now();
        let outcome = self
            .publish_with_reconnect(event, &trace)
            .instrument(span)
            .await;
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

    /// True when the channel is open.
    async fn is_ready(&self) -> bool {
        self.link.read().await.channel.status().connected()
    }
}

impl Publisher {
    pub async fn connect(
        url: SecretUrl,
        topology: Topology,
        confirm_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, lapin::Error> {
        let link = open_link(&url, &topology, 0).await?;
        Ok(Self {
            url,
            topology,
            confirm_timeout,
            link: RwLock::new(link),
            metrics,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    async fn publish_with_reconnect(
        &self,
        event: &Event,
        trace: &TraceContext,
    ) -> Result<(), PublishError> {
        let (channel, generation) = {
            let link = self.link.read().await;
            (link.channel.clone(), link.generation)
        };
        match self.publish_on(&channel, event, trace).await {
            Err(PublishError::Broker(error)) => {
                tracing::warn!(%error, "publish failed, reconnecting to rabbitmq");
                let channel = self.reconnect(generation).await?;
                self.publish_on(&channel, event, trace).await
            }
            outcome => outcome,
        }
    }

    async fn publish_on(
        &self,
        channel: &Channel,
        event: &Event,
        trace: &TraceContext,
    ) -> Result<(), PublishError> {
        let routing_key = event.routing_key();
        let confirm = channel
            .basic_publish(
                self.topology.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &event.encode(),
                event_properties(event, trace),
            )
            .await?;
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirm)
            .await
            .map_err(|_| PublishError::ConfirmTimeout(self.confirm_timeout))??;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_returned)) => Err(PublishError::Unroutable(routing_key)),
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked),
        }
    }

    async fn reconnect(&self, broken_generation: u64) -> Result<Channel, PublishError> {
        let mut link = self.link.write().await;
        if link.generation == broken_generation {
            *link = open_link(&self.url, &self.topology, broken_generation + 1).await?;
        }
        Ok(link.channel.clone())
    }
}

async fn open_link(
    url: &SecretUrl,
    topology: &Topology,
    generation: u64,
) -> Result<Link, lapin::Error> {
    let connection = connect(url, "chat-api-publisher").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    declare_topology(&channel, topology).await?;
    Ok(Link {
        _connection: connection,
        channel,
        generation,
    })
}

/// The consuming side of one RabbitMQ queue, on a channel with a prefetch window.
pub struct AmqpSource {
    channel: Channel,
    consumer: lapin::Consumer,
}

impl AmqpSource {
    pub fn new(channel: Channel, consumer: lapin::Consumer) -> Self {
        Self { channel, consumer }
    }
}

#[async_trait]
impl EventSource for AmqpSource {
    fn system(&self) -> &'static str {
        "rabbitmq"
    }

    async fn next_batch(
        &mut self,
        settings: &ConsumerConfig,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<Delivery>>> {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            delivery = self.consumer.next() => delivery,
        };
        let Some(first) = first else {
            anyhow::bail!("the broker cancelled the consumer");
        };
        let mut batch = vec![delivery_of(first?)];
        let deadline = tokio::time::Instant::now() + settings.batch_max_wait;
        while batch.len() < settings.batch_max_size {
            match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Ok(Some(delivery)) => batch.push(delivery_of(delivery?)),
                Ok(None) => anyhow::bail!("the broker cancelled the consumer"),
                Err(_elapsed) => break,
            }
        }
        Ok(Some(batch))
    }

    async fn dead_letter(&mut self, tag: u64) -> anyhow::Result<()> {
        self.channel
            .basic_reject(tag, BasicRejectOptions { requeue: false })
            .await?;
        Ok(())
    }

    async fn acknowledge(&mut self, batch: &[u64]) -> anyhow::Result<()> {
        // Delivery tags grow within a channel: one multiple-ack settles the whole batch.
        if let Some(last) = batch.iter().max() {
            self.channel
                .basic_ack(*last, BasicAckOptions { multiple: true })
                .await?;
        }
        Ok(())
    }
}

fn delivery_of(delivery: lapin::message::Delivery) -> Delivery {
    Delivery {
        tag: delivery.delivery_tag,
        trace: trace_context_of(&delivery.properties),
        data: delivery.data,
    }
}
