//! Writes accepted chats and messages in batches, idempotently: MySQL in the distributed stack,
//! and (through the same [`IngestWriter`], run by the api) SQLite in the embedded mode.
//!
//! One transaction per batch: chats are inserted (also the chats that messages refer to, which
//! may not have arrived yet), then messages, and the counts grow by exactly the rows that were new,
//! so a redelivered batch changes nothing. The batch is acked only after the commit.

use std::sync::Arc;

use anyhow::Context as _;
use chatcore::Config;
use chatcore::consumer::{self, BatchHandler, HandleError, Observers, Received};
use chatcore::events::EventPayload;
use chatcore::store::{IngestBatch, MySqlStorage, NewMessage, Storage};
use tokio_util::sync::CancellationToken;

/// `/livez` and `/readyz` unless `CHAT_HEALTH_ADDR` says otherwise.
pub const DEFAULT_HEALTH_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9091);

/// Consumes the RabbitMQ ingest queue into MySQL until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let url = config.require_database_url()?;
    let pool = chatcore::store::mysql::connect(url, config.database_max_connections)
        .await
        .with_context(|| format!("connecting to mysql at {url}"))?;
    let observers = Observers::default();
    let handler = IngestWriter::new(Arc::new(MySqlStorage::new(
        pool,
        Arc::clone(&observers.metrics),
    )));
    consumer::run_worker(
        &config,
        &config.topology.ingest_queue,
        &handler,
        &shutdown,
        observers,
        DEFAULT_HEALTH_ADDR,
    )
    .await
}

/// Writes batches of accepted chats and messages to the storage (MySQL, or SQLite embedded).
pub struct IngestWriter {
    storage: Arc<dyn Storage>,
}

impl IngestWriter {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self { storage }
    }
}

impl BatchHandler for IngestWriter {
    const OPERATION: &'static str = "ingest batch write";

    async fn handle(&self, batch: &[Received]) -> Result<(), HandleError> {
        self.storage
            .write_ingest_batch(&ingest_batch(batch))
            .await
            .map_err(|error| {
                let transient = error.is_transient();
                HandleError::classify(error, transient)
            })
    }
}

/// What a batch of events writes: each chat once (with its earliest creation time), also the
/// chats that messages refer to (a message may arrive before its chat), and the messages.
/// Updates are written synchronously by the api; only the indexer consumes them.
fn ingest_batch(batch: &[Received]) -> IngestBatch<'_> {
    let mut ingest = IngestBatch::default();
    for received in batch {
        match &received.event.payload {
            EventPayload::ChatCreated {
                application_id,
                chat_number,
                created_at,
            } => {
                let earliest = ingest
                    .chats
                    .entry((*application_id, *chat_number))
                    .or_insert(*created_at);
                *earliest = (*earliest).min(*created_at);
            }
            EventPayload::MessageCreated {
                application_id,
                chat_number,
                message_number,
                body,
                created_at,
            } => {
                let key = (*application_id, *chat_number);
                ingest.chats.entry(key).or_insert(*created_at);
                ingest.messages.entry(key).or_default().insert(
                    *message_number,
                    NewMessage {
                        number: *message_number,
                        body,
                        created_at: *created_at,
                    },
                );
            }
            EventPayload::MessageUpdated { .. } => {}
        }
    }
    ingest
}
