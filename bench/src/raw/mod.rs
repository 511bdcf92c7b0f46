//! Raw limits measured in the same run: what the services manage when driven straight, without
//! the api or the workers, doing the work the stack does. Each is what one figure of the stack is
//! compared with:
//! - the accept path of `POST`: Redis INCR and RabbitMQ confirmed publish, or durable one-row
//!   SQLite commits (the embedded stack); and the floor of a `POST`'s own work, a minimal server
//!   ([`post_floor`]);
//! - the ingest leg: a lapin consumer doing the ingest-worker's multi-row `INSERT IGNORE` with sqlx;
//! - the index leg: `_bulk` of the indexer's documents into the same index, under a chat of its own;
//! - the reads: the storage's SELECT of one message and of one page, with sqlx;
//! - the capacity plan: the numbering script on one chat's counter, and one queue's confirmed
//!   publish of the api's envelopes.

mod accept;
mod capacity;
mod index;
mod ingest;
pub mod post_floor;
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

/// The events of the workers' batches when each AMQP message carries `events_per_message` (the
/// api's envelopes): a consumer takes whole messages until its batch holds `CHAT_BATCH_MAX_SIZE`
/// events, and at most the prefetch of messages (nothing more arrives before a batch is
/// acknowledged).
pub fn batch_size(config: &Config, events_per_message: usize) -> usize {
    let consumer = &config.consumer;
    let events_per_message = events_per_message.max(1);
    let messages = consumer
        .batch_max_size
        .div_ceil(events_per_message)
        .min(usize::from(consumer.prefetch))
        .max(1);
    messages * events_per_message
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_batch_holds_the_events_of_whole_envelopes_up_to_the_batch_size_and_the_prefetch() {
        let config = |prefetch: &str| {
            let values = HashMap::from([
                ("CHAT_BATCH_MAX_SIZE".to_owned(), "500".to_owned()),
                ("CHAT_CONSUMER_PREFETCH".to_owned(), prefetch.to_owned()),
            ]);
            Config::from_map(&values).expect("valid settings")
        };
        assert_eq!(batch_size(&config("255"), 1), 255, "the prefetch bounds");
        assert_eq!(batch_size(&config("255"), 10), 500, "50 envelopes of 10");
        assert_eq!(
            batch_size(&config("255"), 7),
            504,
            "72 whole envelopes of 7"
        );
        assert_eq!(batch_size(&config("20"), 10), 200, "20 envelopes at most");
    }
}
