//! The raw limits of the accept path of `POST`: Redis INCR and RabbitMQ confirmed publish, or
//! durable one-row SQLite commits (the embedded stack).

use std::time::Duration;

use anyhow::ensure;
use chatcore::Config;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};

use super::{amqp_connect, declare_durable};
use crate::load::{self, Load, Outcome};

/// AMQP delivery mode of messages written to disk, as the api publishes them.
const PERSISTENT: u8 = 2;
/// How long each raw limit of the accept path is measured.
pub(super) const RAW_PHASE: Duration = Duration::from_secs(5);
/// Concurrent clients of Redis INCR.
pub const REDIS_CLIENTS: usize = 50;
/// Concurrent publishers of RabbitMQ confirmed publish, and writers of SQLite commits.
pub const PUBLISHERS: usize = 64;

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
