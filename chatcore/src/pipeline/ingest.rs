//! The ingest consumer: writes accepted chats and messages in batches, idempotently, to the
//! storage (MySQL in ingest-worker, SQLite in the embedded process).
//!
//! One transaction per batch: chats are inserted (also the chats that messages refer to, which
//! may not have arrived yet), then messages, and the counts grow by exactly the rows that were new,
//! so a redelivered batch changes nothing. The batch is acked only after the commit.
//!
//! After the commit the batch's messages are announced to the api replicas' live streams
//! ([`crate::changes`]); a failed announcement fails the batch, which is retried (the write is a
//! no-op the second time), so a live stream does not silently miss a message.
//!
//! The chats and messages of a deleted application are left out of a batch; its
//! `application_deleted` event purges the rows it has.

use std::sync::Arc;

use super::consumer::{BatchHandler, HandleError, Received, purge_deleted_applications};
use crate::changes::{ChangeKind, MessageChange};
use crate::events::EventPayload;
use crate::queue::EventQueue;
use crate::store::{
    ChatKey, CreatedSequences, IngestBatch, NewChat, NewMessage, Storage, StorageError,
};

/// Writes batches of accepted chats and messages to the storage (MySQL, or SQLite embedded),
/// then announces the messages on `queue`.
pub struct IngestWriter {
    storage: Arc<dyn Storage>,
    queue: Arc<dyn EventQueue>,
}

impl IngestWriter {
    pub fn new(storage: Arc<dyn Storage>, queue: Arc<dyn EventQueue>) -> Self {
        Self { storage, queue }
    }
}

impl BatchHandler for IngestWriter {
    const OPERATION: &'static str = "ingest batch write";

    async fn handle(&self, batch: &[Received]) -> Result<(), HandleError> {
        let ingest = ingest_batch(batch).map_err(HandleError::of)?;
        let sequences = self
            .storage
            .write_ingest_batch(&ingest)
            .await
            .map_err(HandleError::of)?;
        let created = created_messages(&ingest, &sequences);
        for announcement in announcements(&created) {
            self.queue
                .announce(announcement)
                .await
                .map_err(|error| HandleError::Transient(error.into()))?;
        }
        // After this batch's rows (which left out the deleted applications' own).
        purge_deleted_applications(batch, "rows", |application_id| {
            self.storage.purge_application(application_id)
        })
        .await
    }
}

/// Bodies of one announcement at most (a batch of the largest messages is announced in parts).
const ANNOUNCEMENT_BODY_BYTES: usize = 1024 * 1024;

/// The changes in announcements of at most [`ANNOUNCEMENT_BODY_BYTES`] of bodies (one change
/// each at least).
fn announcements(changes: &[MessageChange]) -> impl Iterator<Item = &[MessageChange]> {
    crate::chunks::bounded_by_bytes(changes, ANNOUNCEMENT_BODY_BYTES, |change| change.body.len())
}

/// The stored messages of a written batch as changes, by chat and number, each with the sequence
/// of its created change. A redelivered batch announces them again, under the sequences they were
/// logged with first; streams skip a sequence they already sent.
fn created_messages(ingest: &IngestBatch<'_>, sequences: &CreatedSequences) -> Vec<MessageChange> {
    ingest
        .messages
        .iter()
        .flat_map(|(&chat, messages)| messages.values().map(move |message| (chat, message)))
        .filter_map(|((application_id, chat_number), message)| {
            let sequence = *sequences.get(&((application_id, chat_number), message.number))?;
            Some(MessageChange {
                sequence,
                kind: ChangeKind::Created,
                application_id,
                chat_number,
                number: message.number,
                body: message.body.to_owned(),
                version: 1,
                created_at: message.created_at,
                updated_at: message.created_at,
                sender: message.sender.cloned(),
                metadata: message.metadata.cloned(),
                edited_at: None,
            })
        })
        .collect()
}

/// What a batch of events writes: each chat once (with its earliest creation time), also the
/// chats that messages refer to (a message may arrive before its chat), and the messages.
/// Updates and deletions are written synchronously by the api; only the indexer consumes them.
fn ingest_batch(batch: &[Received]) -> Result<IngestBatch<'_>, StorageError> {
    let mut ingest = IngestBatch::default();
    for received in batch {
        match &received.event.payload {
            EventPayload::ChatCreated {
                application_id,
                chat_number,
                created_at,
                title,
                metadata,
            } => {
                let chat = ingest
                    .chats
                    .entry((*application_id, *chat_number))
                    .or_insert(NewChat {
                        created_at: *created_at,
                        title: None,
                        metadata: None,
                    });
                chat.created_at = chat.created_at.min(*created_at);
                // The chat's own event gives what a message that came first could not.
                if !chat.has_details() {
                    chat.title = title.as_ref();
                    chat.metadata = metadata.as_ref();
                }
            }
            EventPayload::MessageCreated {
                application_id,
                chat_number,
                message_number,
                body,
                created_at,
                sender,
                metadata,
            } => {
                let key = (*application_id, *chat_number);
                ingest.chats.entry(key).or_insert(NewChat {
                    created_at: *created_at,
                    title: None,
                    metadata: None,
                });
                let message = NewMessage {
                    event_id: received.event.event_id,
                    number: *message_number,
                    body,
                    sender: sender.as_ref(),
                    metadata: metadata.as_ref(),
                    created_at: *created_at,
                };
                let chat_messages = ingest.messages.entry(key).or_default();
                if let Some(earlier) = chat_messages.get(message_number) {
                    // The same event twice is a redelivery; two events with one number are not.
                    first_conflict_in_batch(key, earlier, &message)?;
                    continue;
                }
                chat_messages.insert(*message_number, message);
            }
            EventPayload::MessageUpdated { .. }
            | EventPayload::MessageDeleted { .. }
            | EventPayload::ApplicationDeleted { .. } => {}
        }
    }
    Ok(ingest)
}

fn first_conflict_in_batch(
    chat: ChatKey,
    earlier: &NewMessage<'_>,
    message: &NewMessage<'_>,
) -> Result<(), StorageError> {
    if earlier.event_id == message.event_id {
        return Ok(());
    }
    Err(StorageError::NumberConflict {
        application_id: chat.0,
        chat_number: chat.1,
        number: message.number,
        event_id: message.event_id,
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::Number;

    fn change(body_bytes: usize) -> MessageChange {
        MessageChange {
            sequence: 1,
            kind: ChangeKind::Created,
            application_id: 1,
            chat_number: Number::new(1).expect("positive"),
            number: Number::new(1).expect("positive"),
            body: "x".repeat(body_bytes),
            version: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            sender: None,
            metadata: None,
            edited_at: None,
        }
    }

    #[test]
    fn announcements_are_bounded_by_their_bodies() {
        let half = ANNOUNCEMENT_BODY_BYTES / 2;
        let changes = vec![
            change(half),
            change(half),
            change(half),
            change(3 * half),
            change(1),
        ];
        let sizes: Vec<usize> = announcements(&changes).map(<[_]>::len).collect();
        assert_eq!(sizes, [2, 1, 1, 1], "an oversized change goes alone");
        assert_eq!(announcements(&[]).count(), 0);
    }
}
