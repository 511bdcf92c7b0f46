//! Raw limits measured in the same run: what the services manage when driven straight, without
//! the api or the workers, doing the work the stack does. Each is what one figure of the stack is
//! compared with:
//! - Redis INCR and RabbitMQ confirmed publish (the accept path of `POST`);
//! - durable one-row SQLite commits (the embedded stack);
//! - the ingest leg: a lapin consumer doing the ingest-worker's multi-row `INSERT IGNORE` with sqlx;
//! - the index leg: `_bulk` of the indexer's documents into the same index, under a chat of its own;
//! - the reads: the storage's SELECT of one message and of one page, with sqlx.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use chatcore::Config;
use chatcore::domain::{Number, PagePosition, PageRequest};
use chatcore::events::{Event, EventPayload, TraceContext};
use chatcore::queue::envelope;
use chatcore::store::MessageRow;
use futures_util::StreamExt as _;
use futures_util::future::join_all;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};
use sqlx::{MySql, MySqlPool, QueryBuilder};

use crate::api::body;
use crate::load::{self, Load, Outcome, scatter};
use crate::persisted::IndexCount;
use crate::processes::Processes;
use crate::report::Measured;

/// AMQP delivery mode of messages written to disk, as the api publishes them.
const PERSISTENT: u8 = 2;
pub const RAW_PHASE: Duration = Duration::from_secs(5);
pub const REDIS_CLIENTS: usize = 50;
pub const PUBLISHERS: usize = 64;
/// Publishes awaited together while the raw ingest leg's queue is filled.
const PUBLISH_WINDOW: usize = 1000;
/// How long written documents may take to become searchable (a refresh is due every second).
const VISIBILITY_BOUND: Duration = Duration::from_secs(60);
/// The chat number of the raw index leg's documents: no chat is ever numbered this high.
const RAW_BULK_CHAT: u64 = i64::MAX as u64;
/// Documents a `_bulk` of the seeding carries.
const SEEDING_BULK: usize = 5_000;

/// The chat whose messages a raw leg or raw read stands in for.
#[derive(Debug, Clone, Copy)]
pub struct ChatRef {
    pub application_id: u64,
    pub number: u64,
}

impl ChatRef {
    /// The routing key and `chat` field of its documents, as the indexer writes them.
    fn search_key(self) -> String {
        format!("{}:{}", self.application_id, self.number)
    }
}

/// One-row transactions, each committed to disk, from concurrent writers for [`RAW_PHASE`]: what
/// the embedded queue would manage if every request committed on its own (it groups them).
pub async fn sqlite_commits(config: &Config) -> anyhow::Result<Outcome> {
    let path = config.data_dir.join("bench-raw.db");
    let pool = chatcore::sqlite::open(&path, &chatcore::sqlite::QUEUE_MIGRATOR, 4).await?;
    let payload = vec![b'x'; 200];
    let writer = pool.clone();
    let outcome = load::run(Load::timed(PUBLISHERS, RAW_PHASE), move |_| {
        let (pool, payload) = (writer.clone(), payload.clone());
        async move {
            sqlx::query("INSERT INTO queued_events (queue, body) VALUES ('raw', ?)")
                .bind(payload)
                .execute(&pool)
                .await?;
            Ok(())
        }
    })
    .await;
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    outcome
}

pub async fn redis_incr(config: &Config) -> anyhow::Result<Outcome> {
    let connection = chatcore::state::connect_redis(config.require_redis_url()?).await?;
    let key = format!("{}:bench:incr", config.redis_key_prefix);
    let (client, client_key) = (connection.clone(), key.clone());
    let outcome = load::run(Load::timed(REDIS_CLIENTS, RAW_PHASE), move |_| {
        let (mut connection, key) = (client.clone(), client_key.clone());
        async move {
            let _: u64 = redis::cmd("INCR")
                .arg(&key)
                .query_async(&mut connection)
                .await?;
            Ok(())
        }
    })
    .await?;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut connection.clone())
        .await?;
    Ok(outcome)
}

/// Persistent 200-byte messages, each published and confirmed on its own, from concurrent
/// publishers on one channel.
pub async fn confirmed_publish(config: &Config) -> anyhow::Result<Outcome> {
    let connection = amqp_connect(config).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = format!("{}.bench-raw-publish", config.topology.ingest_queue);
    declare_durable(&channel, &queue).await?;
    let payload = vec![b'x'; 200];
    let (publisher, target) = (channel.clone(), queue.clone());
    let outcome = load::run(Load::timed(PUBLISHERS, RAW_PHASE), move |_| {
        let (channel, queue, payload) = (publisher.clone(), target.clone(), payload.clone());
        async move {
            let confirmation = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(PERSISTENT),
                )
                .await?
                .await?;
            ensure!(confirmation.is_ack(), "raw publish was not confirmed");
            Ok(())
        }
    })
    .await;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "done".into()).await?;
    outcome
}

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
    let chat_number = Number::new(chat.number).context("chat number")?;
    let sequences: Vec<u64> = (0..count).collect();
    for window in sequences.chunks(PUBLISH_WINDOW * events_per_message) {
        let mut confirms = Vec::with_capacity(PUBLISH_WINDOW);
        for envelope_sequences in window.chunks(events_per_message) {
            let mut envelope_body = Vec::new();
            let mut properties = None;
            for &sequence in envelope_sequences {
                let event = Event::new(EventPayload::MessageCreated {
                    application_id: chat.application_id,
                    chat_number,
                    message_number: Number::new(sequence + 1).context("message number")?,
                    body: body(sequence),
                    created_at: chatcore::store::now(),
                });
                let trace = TraceContext::child_of(None);
                envelope::push(&mut envelope_body, Some(trace.as_str()), &event.encode());
                properties.get_or_insert_with(|| {
                    chatcore::queue::event_properties(&event, &trace)
                        .with_content_type(envelope::CONTENT_TYPE.into())
                });
            }
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &envelope_body,
                        properties.context("an envelope holds an event")?,
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

/// The raw index leg: the documents the indexer writes for `count` created messages (the same
/// `_id` scheme, routing, external version 1 and source), sent with `_bulk` in bulks of the
/// indexer's batch size, one at a time, without refresh, timed until they are searchable, as the
/// index leg is. They go into the stack's own index, under a chat number no chat has
/// ([`RAW_BULK_CHAT`]) of the run's new application, and are deleted afterwards: the same index is the same cost per document
/// (the lookups of external versions and the merges grow with the index; an empty scratch index
/// made the raw leg about twice as cheap for Elasticsearch). The request bodies are built before
/// the clock starts.
pub async fn bulk_leg(
    config: &Config,
    http: &reqwest::Client,
    processes: &Processes,
    chat: ChatRef,
    count: u64,
) -> anyhow::Result<Measured> {
    let url = config.require_elasticsearch_url()?.expose().to_owned();
    let index = &config.elasticsearch_index;
    let raw_chat = ChatRef {
        number: RAW_BULK_CHAT,
        ..chat
    };
    let measured = bulk_into(config, http, processes, (&url, index), raw_chat, count).await;
    delete_chat_documents(http, (&url, index), raw_chat, count).await?;
    measured
}

async fn bulk_into(
    config: &Config,
    http: &reqwest::Client,
    processes: &Processes,
    (url, index): (&str, &str),
    chat: ChatRef,
    count: u64,
) -> anyhow::Result<Measured> {
    let created_at = json!(chatcore::store::now());
    let numbers: Vec<u64> = (1..=count).collect();
    let bulks: Vec<String> = numbers
        .chunks(batch_size(config))
        .map(|bulk| bulk_lines(chat, bulk, &created_at))
        .collect();
    let bulk_url = format!("{url}/{index}/_bulk");
    let before = processes.sample();
    let started = Instant::now();
    for lines in bulks {
        send_bulk(http, &bulk_url, lines).await?;
    }
    // The index leg is timed until its documents are searchable: so is this one.
    wait_until_searchable(http, (url, index), chat, count).await?;
    let elapsed = started.elapsed();
    Ok(Measured {
        count,
        elapsed,
        cpu: processes.cpu_since(&before),
    })
}

/// The `_bulk` lines of the documents the indexer writes for the created messages `numbers` of
/// `chat` (the same `_id`, routing, external version 1 and source; the body the bench posts for
/// the message).
fn bulk_lines(chat: ChatRef, numbers: &[u64], created_at: &Value) -> String {
    let routing = chat.search_key();
    let mut lines = String::new();
    for &number in numbers {
        let action = json!({"index": {
            "_id": format!("{routing}:{number}"),
            "routing": routing,
            "version": 1,
            "version_type": "external",
        }});
        let source = json!({
            "application_id": chat.application_id,
            "chat_number": chat.number,
            "chat": routing,
            "number": number,
            "body": body(number - 1),
            "created_at": created_at,
        });
        lines.push_str(&format!("{action}\n{source}\n"));
    }
    lines
}

async fn send_bulk(http: &reqwest::Client, bulk_url: &str, lines: String) -> anyhow::Result<()> {
    let response = http
        .post(bulk_url)
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    if !status.is_success() || answer["errors"] != json!(false) {
        bail!("_bulk answered {status}: {answer}");
    }
    Ok(())
}

/// Documents of `messages` created messages in each of `chats`, written straight into the
/// stack's index (the api would take minutes to accept them; only searching them is measured),
/// in bulks of [`SEEDING_BULK`] documents, and refreshed.
pub async fn seed_index(
    config: &Config,
    http: &reqwest::Client,
    chats: &[ChatRef],
    messages: u64,
) -> anyhow::Result<()> {
    let url = config.require_elasticsearch_url()?.expose().to_owned();
    let index = &config.elasticsearch_index;
    let bulk_url = format!("{url}/{index}/_bulk");
    let created_at = json!(chatcore::store::now());
    let numbers: Vec<u64> = (1..=messages).collect();
    for &chat in chats {
        for bulk in numbers.chunks(SEEDING_BULK) {
            send_bulk(http, &bulk_url, bulk_lines(chat, bulk, &created_at)).await?;
        }
    }
    let status = http
        .post(format!("{url}/{index}/_refresh"))
        .send()
        .await?
        .status();
    ensure!(status.is_success(), "refreshing {index} answered {status}");
    Ok(())
}

/// Polls as the index leg is polled, until `count` documents of `chat` are visible to search.
async fn wait_until_searchable(
    http: &reqwest::Client,
    (url, index): (&str, &str),
    chat: ChatRef,
    count: u64,
) -> anyhow::Result<()> {
    let documents = IndexCount::Elasticsearch {
        url: url.to_owned(),
        index: index.to_owned(),
        application_id: chat.application_id,
    };
    let deadline = Instant::now() + VISIBILITY_BOUND;
    loop {
        let visible = documents.count(http, chat.number).await?;
        if visible == count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the raw chat showed {visible} of {count} documents after {VISIBILITY_BOUND:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deletes the `count` documents of the raw index leg's `chat` (by `_id`: `_delete_by_query` is
/// a module the bare Elasticsearch distribution lacks).
async fn delete_chat_documents(
    http: &reqwest::Client,
    (url, index): (&str, &str),
    chat: ChatRef,
    count: u64,
) -> anyhow::Result<()> {
    let routing = chat.search_key();
    let bulk_url = format!("{url}/{index}/_bulk");
    let numbers: Vec<u64> = (1..=count).collect();
    for bulk in numbers.chunks(SEEDING_BULK) {
        let mut lines = String::new();
        for number in bulk {
            let action =
                json!({"delete": {"_id": format!("{routing}:{number}"), "routing": routing}});
            lines.push_str(&format!("{action}\n"));
        }
        send_bulk(http, &bulk_url, lines).await?;
    }
    Ok(())
}

/// The storage's SELECT of one message (`find_message` of `chatcore::store`), over the first
/// `stored` messages of the chat, scattered.
pub async fn message_lookups(
    pool: &MySqlPool,
    chat: ChatRef,
    stored: u64,
    load: Load,
) -> anyhow::Result<Outcome> {
    let pool = pool.clone();
    load::run(load, move |sequence| {
        let pool = pool.clone();
        async move {
            let found: Option<MessageRow> = sqlx::query_as(
                "SELECT m.number, m.body, m.version, m.created_at, m.updated_at \
                 FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? AND m.number = ? AND m.deleted_at IS NULL",
            )
            .bind(chat.application_id as i64)
            .bind(chat.number as i64)
            .bind(scatter(sequence, stored) as i64)
            .fetch_optional(&pool)
            .await?;
            ensure!(found.is_some(), "a stored message was not found");
            Ok(())
        }
    })
    .await
}

/// The storage's SELECT of one page (`list_messages` of `chatcore::store`) of `per_page`
/// messages after a scattered number ([`page_after`]).
pub async fn page_lookups(
    pool: &MySqlPool,
    chat: ChatRef,
    (stored, per_page): (u64, u32),
    load: Load,
) -> anyhow::Result<Outcome> {
    let pool = pool.clone();
    load::run(load, move |sequence| {
        let pool = pool.clone();
        let page = PageRequest {
            per_page,
            position: PagePosition::After(page_after(sequence, stored, per_page)),
        };
        async move {
            let (from, to) = page.key_bounds();
            let rows: Vec<MessageRow> = sqlx::query_as(
                "SELECT m.number, m.body, m.version, m.created_at, m.updated_at \
                 FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? AND m.number BETWEEN ? AND ? \
                 AND m.deleted_at IS NULL ORDER BY m.number ASC LIMIT ? OFFSET ?",
            )
            .bind(chat.application_id as i64)
            .bind(chat.number as i64)
            .bind(from as i64)
            .bind(to as i64)
            .bind(page.fetch_limit() as i64)
            .bind(page.offset() as i64)
            .fetch_all(&pool)
            .await?;
            ensure!(!rows.is_empty(), "a page of stored messages was empty");
            Ok(())
        }
    })
    .await
}

/// The `after` of the `sequence`-th page read: scattered so that a full page follows it.
pub fn page_after(sequence: u64, stored: u64, per_page: u32) -> u64 {
    scatter(sequence, stored.saturating_sub(u64::from(per_page)) + 1) - 1
}

/// The size of the workers' batches: at most `CHAT_BATCH_MAX_SIZE`, and at most the prefetch
/// (nothing more arrives before a batch is acknowledged).
pub fn batch_size(config: &Config) -> usize {
    let consumer = &config.consumer;
    consumer
        .batch_max_size
        .min(usize::from(consumer.prefetch))
        .max(1)
}

/// Messages ready in a queue, as the stack's own queue adapter counts them.
pub async fn queue_depth(config: &Config, queue: &str) -> anyhow::Result<u64> {
    let events = chatcore::adapters::queue(config, &chatcore::metrics::Metrics::new()).await?;
    Ok(events.depth(queue).await?)
}

async fn amqp_connect(config: &Config) -> anyhow::Result<lapin::Connection> {
    Ok(lapin::Connection::connect(
        config.require_amqp_url()?.expose(),
        lapin::ConnectionProperties::default(),
    )
    .await?)
}

async fn declare_durable(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_page_follows_every_scattered_after() {
        for sequence in 0..500 {
            let after = page_after(sequence, 1000, 100);
            assert!(after <= 900, "{after}");
        }
        assert_eq!(page_after(7, 50, 100), 0, "fewer messages than a page");
    }
}
