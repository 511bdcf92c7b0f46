//! Bulk-indexes messages: into Elasticsearch in the distributed stack, and (through the same
//! [`Indexer`], run by the api) into SQLite FTS5 in the embedded mode. Every write carries a
//! version (1 when created, the stored version after each update), so a redelivered or late event
//! never replaces a newer body: the index skips it and the event counts as done.

use std::sync::Arc;

use anyhow::anyhow;
use chatcore::Config;
use chatcore::consumer::{self, BatchHandler, HandleError, Observers, Received};
use chatcore::events::EventPayload;
use chatcore::search::{ElasticsearchIndex, ItemOutcome, MessageDocument, SearchIndex};
use tokio_util::sync::CancellationToken;

/// `/livez` and `/readyz` unless `CHAT_HEALTH_ADDR` says otherwise.
pub const DEFAULT_HEALTH_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9092);

/// Consumes the RabbitMQ index queue into Elasticsearch until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let index = ElasticsearchIndex::connect(
        config.require_elasticsearch_url()?,
        &config.elasticsearch_index,
        config.elasticsearch_replicas,
    )?;
    let mut delay = config.consumer.retry_base_delay;
    while let Err(error) = index.ensure_index().await {
        tracing::warn!(%error, delay_ms = delay.as_millis() as u64, "search index not ready, retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(config.consumer.retry_max_delay);
    }
    let handler = Indexer::new(Arc::new(index));
    consumer::run_worker(
        &config,
        &config.topology.index_queue,
        &handler,
        &shutdown,
        Observers::default(),
        DEFAULT_HEALTH_ADDR,
    )
    .await
}

pub struct Indexer {
    index: Arc<dyn SearchIndex>,
}

impl Indexer {
    pub fn new(index: Arc<dyn SearchIndex>) -> Self {
        Self { index }
    }
}

fn document_of(payload: &EventPayload) -> Option<MessageDocument> {
    // A created message is version 1; an update carries the version MySQL gave it.
    let (application_id, chat_number, number, body, created_at, version) = match payload {
        EventPayload::MessageCreated {
            application_id,
            chat_number,
            message_number,
            body,
            created_at,
        } => (
            application_id,
            chat_number,
            message_number,
            body,
            created_at,
            1,
        ),
        EventPayload::MessageUpdated {
            application_id,
            chat_number,
            message_number,
            body,
            version,
            created_at,
            ..
        } => (
            application_id,
            chat_number,
            message_number,
            body,
            created_at,
            *version,
        ),
        EventPayload::ChatCreated { .. } => return None,
    };
    Some(MessageDocument {
        application_id: *application_id,
        chat_number: *chat_number,
        number: *number,
        body: body.clone(),
        created_at: *created_at,
        version,
    })
}

impl BatchHandler for Indexer {
    const OPERATION: &'static str = "index batch write";

    async fn handle(&self, batch: &[Received]) -> Result<(), HandleError> {
        let documents: Vec<MessageDocument> = batch
            .iter()
            .filter_map(|received| document_of(&received.event.payload))
            .collect();
        let outcomes = self.index.bulk_index(&documents).await.map_err(|error| {
            let transient = error.is_transient();
            HandleError::classify(error, transient)
        })?;
        // Retrying the whole batch is safe: versions make the writes that succeeded no-ops.
        if let Some(ItemOutcome::Transient(reason)) = outcomes
            .iter()
            .find(|o| matches!(o, ItemOutcome::Transient(_)))
        {
            return Err(HandleError::Transient(anyhow!(
                "document not indexed: {reason}"
            )));
        }
        if let Some(ItemOutcome::Permanent(reason)) = outcomes
            .iter()
            .find(|o| matches!(o, ItemOutcome::Permanent(_)))
        {
            return Err(HandleError::Permanent(anyhow!(
                "document rejected: {reason}"
            )));
        }
        Ok(())
    }
}
