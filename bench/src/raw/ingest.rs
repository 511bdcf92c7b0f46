//! The raw ingest leg: a lapin consumer doing the ingest-worker's multi-row `INSERT IGNORE`.

use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use chatcore::Config;
use chatcore::domain::Number;
use chatcore::events::{Event, EventPayload, TraceContext};
use chatcore::queue::envelope;
use futures_util::StreamExt as _;
use futures_util::future::join_all;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use sqlx::{MySql, MySqlPool, QueryBuilder};

use super::{ChatRef, amqp_connect, declare_durable};
use crate::api::body;
use crate::processes::Processes;
use crate::report::Measured;

/// Publishes awaited together while the raw ingest leg's queue is filled.
const PUBLISH_WINDOW: usize = 1000;

/// The raw ingest leg: `count` message.created events (as the api encodes them) are published
/// into a scratch durable queue (not timed), `events_per_message` to an AMQP message as the api's
/// envelopes carried them in the same run, then a lapin consumer with the ingest-worker's prefetch
/// and batch bounds writes them with one multi-row `INSERT IGNORE` per batch (the statement of
/// `chatcore::store::mysql`), in a transaction, into the stack's own `messages` table under `chat`
/// (a chat of its own, whose rows are deleted afterwards: the same table is the same cost per row,
/// which an empty copy of it is not), and acks each batch with one multiple-ack.
pub async fn ingest_leg(
    config: &Config,
    processes: &Processes,
    (chat, chat_id): (ChatRef, u64),
    count: u64,
    events_per_message: usize,
) -> anyhow::Result<Measured> {
    let pool = chatcore::store::mysql::connect(config.require_database_url()?, 2).await?;
    let connection = amqp_connect(config).await?;
    let queue = format!("{}.bench-raw-ingest", config.topology.ingest_queue);
    let measured = ingest_into_messages(
        config,
        processes,
        (&pool, &connection, &queue),
        (chat, chat_id),
        (count, events_per_message),
    )
    .await;
    // Cleanup whatever happened.
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "done".into()).await?;
    sqlx::query("DELETE FROM messages WHERE chat_id = ?")
        .bind(chat_id)
        .execute(&pool)
        .await?;
    pool.close().await;
    measured
}

async fn ingest_into_messages(
    config: &Config,
    processes: &Processes,
    (pool, connection, queue): (&MySqlPool, &lapin::Connection, &str),
    (chat, chat_id): (ChatRef, u64),
    (count, events_per_message): (u64, usize),
) -> anyhow::Result<Measured> {
    let publisher = connection.create_channel().await?;
    publisher
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    declare_durable(&publisher, queue).await?;
    publish_events(&publisher, queue, chat, count, events_per_message).await?;

    let consumer = connection.create_channel().await?;
    let settings = &config.consumer;
    consumer
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = consumer
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let before = processes.sample();
    let started = Instant::now();
    let mut written = 0u64;
    while written < count {
        let first = deliveries
            .next()
            .await
            .context("the raw ingest consumer was cancelled")??;
        let mut events = unpack_events(&first.data)?;
        let mut last_tag = first.delivery_tag;
        let mut batch_deliveries = 1;
        let deadline = tokio::time::Instant::now() + settings.batch_max_wait;
        // The worker's bounds: events per batch, and no more deliveries than the prefetch.
        while events.len() < settings.batch_max_size
            && batch_deliveries < usize::from(settings.prefetch)
        {
            match tokio::time::timeout_at(deadline, deliveries.next()).await {
                Ok(Some(delivery)) => {
                    let delivery = delivery?;
                    events.extend(unpack_events(&delivery.data)?);
                    last_tag = delivery.delivery_tag;
                    batch_deliveries += 1;
                }
                Ok(None) => bail!("the raw ingest consumer was cancelled"),
                Err(_elapsed) => break,
            }
        }
        insert_messages(pool, chat_id, &events).await?;
        consumer
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await?;
        written += events.len() as u64;
    }
    let elapsed = started.elapsed();
    let cpu = processes.cpu_since(&before);
    consumer.close(200, "done".into()).await?;
    Ok(Measured {
        count: written,
        elapsed,
        cpu,
    })
}

/// The events of one AMQP message of the scratch queue (an envelope, as the api publishes them).
fn unpack_events(body: &[u8]) -> anyhow::Result<Vec<Event>> {
    envelope::unpack(body)?
        .iter()
        .map(|enveloped| Ok(Event::decode(&enveloped.data)?))
        .collect()
}

/// Publishes `count` created events, `events_per_message` to an envelope (the api's framing and
/// properties), with confirms.
async fn publish_events(
    channel: &Channel,
    queue: &str,
    chat: ChatRef,
    count: u64,
    events_per_message: usize,
) -> anyhow::Result<()> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let sequences: Vec<u64> = (0..count).collect();
    for window in sequences.chunks(PUBLISH_WINDOW * events_per_message) {
        let mut confirms = Vec::with_capacity(PUBLISH_WINDOW);
        for envelope_sequences in window.chunks(events_per_message) {
            let (envelope_body, properties) = envelope_of(chat, envelope_sequences)?;
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &envelope_body,
                        properties,
                    )
                    .await?,
            );
        }
        for confirmation in join_all(confirms).await {
            ensure!(confirmation?.is_ack(), "an event was not confirmed");
        }
    }
    Ok(())
}

/// One AMQP message as the api publishes it: the created events of `sequences` in an envelope (its
/// framing, a trace context each), with the properties of its first event.
pub fn envelope_of(chat: ChatRef, sequences: &[u64]) -> anyhow::Result<(Vec<u8>, BasicProperties)> {
    let chat_number = Number::new(chat.number).context("chat number")?;
    let mut envelope_body = Vec::new();
    let mut properties = None;
    for &sequence in sequences {
        let event = Event::new(EventPayload::MessageCreated {
            application_id: chat.application_id,
            chat_number,
            message_number: Number::new(sequence + 1).context("message number")?,
            body: body(sequence),
            created_at: chatcore::store::now(),
            sender: None,
            metadata: None,
        });
        let trace = TraceContext::child_of(None);
        envelope::push(&mut envelope_body, Some(trace.as_str()), &event.encode());
        properties.get_or_insert_with(|| {
            chatcore::queue::event_properties(&event, &trace)
                .with_content_type(envelope::CONTENT_TYPE.into())
        });
    }
    Ok((
        envelope_body,
        properties.context("an envelope holds an event")?,
    ))
}

/// The ingest-worker's statement for the messages of one chat (`insert_messages` of
/// `chatcore::store::mysql`), in one transaction.
async fn insert_messages(pool: &MySqlPool, chat_id: u64, events: &[Event]) -> anyhow::Result<()> {
    let now = chatcore::store::now();
    let mut insert = QueryBuilder::<MySql>::new(
        "INSERT IGNORE INTO messages \
         (chat_id, number, body, version, created_at, updated_at, event_id) ",
    );
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        let EventPayload::MessageCreated {
            message_number,
            body,
            created_at,
            ..
        } = &event.payload
        else {
            bail!("the raw ingest queue holds a {} event", event.routing_key());
        };
        rows.push((event.event_id, *message_number, body.as_str(), *created_at));
    }
    insert.push_values(rows, |mut row, (event_id, number, body, created_at)| {
        row.push_bind(chat_id)
            .push_bind(number.get())
            .push_bind(body)
            .push_bind(1u64)
            .push_bind(created_at)
            .push_bind(now)
            .push_bind(event_id.as_bytes().to_vec());
    });
    let mut transaction = pool.begin().await?;
    insert.build().execute(&mut *transaction).await?;
    transaction.commit().await?;
    Ok(())
}

/// Messages ready in a queue, as the stack's own queue adapter counts them.
pub async fn queue_depth(config: &Config, queue: &str) -> anyhow::Result<u64> {
    let events = chatcore::adapters::queue(config, &chatcore::metrics::Metrics::new()).await?;
    Ok(events.depth(queue).await?)
}
