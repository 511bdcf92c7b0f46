//! The durable objects: the events' topic exchange, a queue per consumer bound to the routing keys
//! it receives, and each queue's dead-letter queue behind a direct exchange.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::{QueueType, Topology};
use crate::events::Consumer;

/// Declares exchanges, queues, dead-letter queues and bindings; idempotent.
pub(super) async fn declare_topology(
    channel: &Channel,
    topology: &Topology,
) -> Result<(), lapin::Error> {
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
            ExchangeKind::Topic,
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
