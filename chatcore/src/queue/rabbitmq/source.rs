//! The consuming side of one RabbitMQ queue: deliveries (an envelope unpacked into its events),
//! acknowledged, handed back or dead-lettered one event at a time.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;

use super::RabbitMqQueue;
use super::envelope::{self, trace_context_of};
use super::publisher::{Outcome, Publication, Publisher};
use super::topology::declare_topology;
use crate::config::{ConsumerConfig, Topology};
use crate::events::{Consumer, TRACEPARENT_HEADER};
use crate::queue::{Delivery, EventSource, QueueError};

/// The consuming side of one RabbitMQ queue, on a channel with a prefetch window.
pub(super) struct RabbitMqSource {
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
    /// Consumes the consumer's queue on a connection of its own, `settings.prefetch` deliveries
    /// at most in flight.
    pub(super) async fn open(
        rabbitmq: &RabbitMqQueue,
        consumer: Consumer,
        settings: &ConsumerConfig,
    ) -> Result<Self, QueueError> {
        let queue = rabbitmq.topology.queue(consumer);
        let connection = rabbitmq.connect(queue).await?;
        let channel = connection.create_channel().await?;
        declare_topology(&channel, &rabbitmq.topology).await?;
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
        Ok(Self {
            connection,
            channel,
            deliveries,
            republisher: Publisher::start(republishing, rabbitmq.max_message_bytes),
            queue: queue.to_owned(),
            dead_letter_exchange: rabbitmq.topology.dead_letter_exchange.clone(),
            confirm_timeout: rabbitmq.confirm_timeout,
            parts: HashMap::new(),
            unsettled_events: HashMap::new(),
            outstanding: BTreeSet::new(),
            next_tag: 0,
        })
    }

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
