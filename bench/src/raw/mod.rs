//! Raw limits measured in the same run: what the services manage when driven straight, without
//! the api or the workers, doing the work the stack does. Each is what one figure of the stack is
//! compared with:
//! - the accept path of `POST`: Redis INCR and RabbitMQ confirmed publish, or durable one-row
//!   SQLite commits (the embedded stack);
//! - the ingest leg: a lapin consumer doing the ingest-worker's multi-row `INSERT IGNORE` with sqlx;
//! - the index leg: `_bulk` of the indexer's documents into the same index, under a chat of its own;
//! - the reads: the storage's SELECT of one message and of one page, with sqlx;
//! - the capacity plan: the numbering script on one chat's counter, and one queue's confirmed
//!   publish of the api's envelopes.

mod accept;
mod capacity;
mod index;
mod ingest;
mod reads;

pub use accept::{PUBLISHERS, REDIS_CLIENTS, confirmed_publish, redis_incr, sqlite_commits};
pub use capacity::{confirmed_envelopes, numbering_increments};
pub use index::{SEEDED_SENDERS, bulk_leg, seed_index, seeded_created_at, seeded_sender};
pub use ingest::{envelope_of, ingest_leg, queue_depth};
pub use reads::{message_lookups, page_after, page_lookups};

use chatcore::Config;
use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

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

/// The size of the workers' batches: at most `CHAT_BATCH_MAX_SIZE`, and at most the prefetch
/// (nothing more arrives before a batch is acknowledged).
pub fn batch_size(config: &Config) -> usize {
    let consumer = &config.consumer;
    consumer
        .batch_max_size
        .min(usize::from(consumer.prefetch))
        .max(1)
}

async fn amqp_connect(config: &Config) -> anyhow::Result<lapin::Connection> {
    Ok(lapin::Connection::connect(
        config.require_amqp_url()?.first().expose(),
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
