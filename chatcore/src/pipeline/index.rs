//! The index consumer: bulk-indexes messages (a deleted one as an empty tombstone) into the search
//! index (Elasticsearch in indexer, SQLite FTS5 in the embedded process), and purges the documents
//! of deleted applications. Every write carries a
//! version (1 when created, the stored version after each update), so a redelivered or late event
//! never replaces a newer body: the index skips it and the event counts as done.

use std::sync::Arc;

use anyhow::anyhow;

use super::consumer::{BatchHandler, HandleError, Received, purge_deleted_applications};
use crate::events::EventPayload;
use crate::search::{ItemOutcome, MessageDocument, Replacing, SearchIndex};

/// Writes batches of created and updated messages to the search index.
pub struct Indexer {
    index: Arc<dyn SearchIndex>,
}

impl Indexer {
    pub fn new(index: Arc<dyn SearchIndex>) -> Self {
        Self { index }
    }
}

fn document_of(payload: &EventPayload) -> Option<MessageDocument> {
    match payload {
        EventPayload::MessageCreated {
            application_id,
            chat_number,
            message_number,
            body,
            created_at,
            sender,
            metadata,
        } => Some(MessageDocument {
            application_id: *application_id,
            chat_number: *chat_number,
            number: *message_number,
            body: body.clone(),
            created_at: *created_at,
            sender: sender.clone(),
            metadata: metadata.clone(),
            edited_at: None,
            // A created message is version 1.
            version: 1,
        }),
        EventPayload::MessageUpdated {
            application_id,
            chat_number,
            message_number,
            body,
            version,
            created_at,
            sender,
            metadata,
            edited_at,
            ..
        } => Some(MessageDocument {
            application_id: *application_id,
            chat_number: *chat_number,
            number: *message_number,
            body: body.clone(),
            created_at: *created_at,
            sender: sender.clone(),
            metadata: metadata.clone(),
            edited_at: *edited_at,
            // The version the storage gave the update.
            version: *version,
        }),
        // A tombstone: no word matches its empty body, and its version keeps older writes out.
        EventPayload::MessageDeleted {
            application_id,
            chat_number,
            message_number,
            version,
            created_at,
            ..
        } => Some(MessageDocument {
            application_id: *application_id,
            chat_number: *chat_number,
            number: *message_number,
            body: String::new(),
            created_at: *created_at,
            sender: None,
            metadata: None,
            edited_at: None,
            version: *version,
        }),
        EventPayload::ChatCreated { .. } | EventPayload::ApplicationDeleted { .. } => None,
    }
}

impl BatchHandler for Indexer {
    const OPERATION: &'static str = "index batch write";

    async fn handle(&self, batch: &[Received]) -> Result<(), HandleError> {
        let documents: Vec<MessageDocument> = batch
            .iter()
            .filter_map(|received| document_of(&received.event.payload))
            .collect();
        let outcomes = self
            .index
            .bulk_index(&documents, Replacing::OlderVersions)
            .await
            .map_err(HandleError::of)?;
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
        // After this batch's documents: a late one of a deleted application goes too.
        purge_deleted_applications(batch, "documents", |application_id| {
            self.index.purge_application(application_id)
        })
        .await
    }
}
