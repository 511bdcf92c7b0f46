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
//!
//! A chat or a message whose number belongs to another event (stored, or earlier in the batch) was
//! handed out twice: the counter of its application's chats or of its chat's messages went back in
//! time (a key-level restore of Redis). Its event is rejected into the dead-letter queue at once
//! (never merged into the stored chat or message), the rest of the batch is written without it,
//! and that counter is raised above every stored number, as counter-sync would, so the duplicates
//! of a rollback stop with the first batch that meets one.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::consumer::{BatchHandler, HandleError, Received, Rejection, purge_deleted_applications};
use crate::changes::{ChangeKind, MessageChange};
use crate::domain::Number;
use crate::events::EventPayload;
use crate::metrics::Metrics;
use crate::numbering::{NumberAllocator, Scope};
use crate::queue::EventQueue;
use crate::store::{
    CreatedSequences, IngestBatch, NewChat, NewMessage, NumberConflict, Storage, StorageError,
};

/// Writes batches of accepted chats and messages to the storage (MySQL, or SQLite embedded),
/// then announces the messages on `queue`; raises the counter that handed a number out twice
/// with `allocator`.
pub struct IngestWriter {
    storage: Arc<dyn Storage>,
    queue: Arc<dyn EventQueue>,
    allocator: NumberAllocator,
    metrics: Arc<Metrics>,
}

impl IngestWriter {
    pub fn new(
        storage: Arc<dyn Storage>,
        queue: Arc<dyn EventQueue>,
        allocator: NumberAllocator,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            storage,
            queue,
            allocator,
            metrics,
        }
    }

    /// Raises the counter of each scope of `conflicts` (an application's chats, a chat's messages)
    /// above its highest stored number, then rejects their events. A failed raise is logged and
    /// left to the next conflict of the scope: the events are rejected either way.
    async fn reject(&self, conflicts: Vec<NumberConflict>) -> HandleError {
        let mut highest_per_scope: BTreeMap<Scope, u64> = BTreeMap::new();
        for conflict in &conflicts {
            let highest = highest_per_scope.entry(conflict.scope).or_default();
            *highest = (*highest).max(conflict.highest);
        }
        let targets: Vec<(Scope, u64)> = highest_per_scope.into_iter().collect();
        match self.allocator.ensure_beyond(&targets).await {
            Ok(raised) => {
                for scope in &raised {
                    tracing::warn!(scope = %scope.id(), "raised a number counter above the stored numbers after a number was handed out twice");
                }
                self.metrics
                    .number_counter_raises
                    .inc_by(raised.len() as u64);
            }
            Err(error) => {
                tracing::warn!(%error, "could not raise a number counter after a number was handed out twice; the next conflict tries again");
            }
        }
        self.metrics.number_conflicts.inc_by(conflicts.len() as u64);
        HandleError::Rejected(
            conflicts
                .into_iter()
                .map(|conflict| Rejection {
                    event_id: conflict.event_id,
                    reason: conflict.into(),
                })
                .collect(),
        )
    }
}

impl BatchHandler for IngestWriter {
    const OPERATION: &'static str = "ingest batch write";

    async fn handle(&self, batch: &[Received]) -> Result<(), HandleError> {
        // The batch's first event of a number is written, the later ones wait: if the first is
        // the one the storage refuses (a duplicate of a stored row), a later one may be that row's
        // redelivery, judged again in the next round without the first.
        let (ingest, later_of_a_number) = ingest_batch(batch);
        let sequences = match self.storage.write_ingest_batch(&ingest).await {
            Ok(sequences) => sequences,
            Err(StorageError::NumberConflicts(conflicts)) => {
                return Err(self.reject(conflicts).await);
            }
            Err(error) => return Err(HandleError::of(error)),
        };
        if !later_of_a_number.is_empty() {
            // The rest is handled again without them: a redelivery, announced then.
            return Err(self.reject(later_of_a_number).await);
        }
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
/// chats that messages refer to (a message may arrive before its chat), and the messages; and the
/// chats and messages whose number an earlier event of the batch carries (handed out twice).
/// Updates and deletions are written synchronously by the api; only the indexer consumes them.
fn ingest_batch(batch: &[Received]) -> (IngestBatch<'_>, Vec<NumberConflict>) {
    let mut ingest = IngestBatch::default();
    let mut taken = Vec::new();
    for received in batch {
        let event_id = received.event.event_id;
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
                        event_id: None,
                        created_at: *created_at,
                        title: None,
                        metadata: None,
                    });
                match chat.event_id {
                    // The same event twice is a redelivery; two events with one number are not.
                    Some(earlier) if earlier != event_id => {
                        let scope = Scope::ChatsOf {
                            application_id: *application_id,
                        };
                        taken.push(conflict(scope, *chat_number, event_id));
                        continue;
                    }
                    Some(_) => {}
                    // The chat's own event gives what a message that came first could not.
                    None => {
                        chat.event_id = Some(event_id);
                        chat.title = title.as_ref();
                        chat.metadata = metadata.as_ref();
                    }
                }
                chat.created_at = chat.created_at.min(*created_at);
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
                    event_id: None,
                    created_at: *created_at,
                    title: None,
                    metadata: None,
                });
                let message = NewMessage {
                    event_id,
                    number: *message_number,
                    body,
                    sender: sender.as_ref(),
                    metadata: metadata.as_ref(),
                    created_at: *created_at,
                };
                let chat_messages = ingest.messages.entry(key).or_default();
                if let Some(earlier) = chat_messages.get(message_number) {
                    // The same event twice is a redelivery; two events with one number are not.
                    if earlier.event_id != event_id {
                        let scope = Scope::MessagesOf {
                            application_id: key.0,
                            chat_number: key.1,
                        };
                        taken.push(conflict(scope, *message_number, event_id));
                    }
                    continue;
                }
                chat_messages.insert(*message_number, message);
            }
            EventPayload::MessageUpdated { .. }
            | EventPayload::MessageDeleted { .. }
            | EventPayload::ApplicationDeleted { .. } => {}
        }
    }
    // The scope's counter must go above the batch's numbers too: they are stored next.
    for conflict in &mut taken {
        conflict.highest = highest_in_batch(&ingest, conflict.scope);
    }
    (ingest, taken)
}

/// A number of `scope` that `event_id` carries although an earlier event of the batch does.
fn conflict(scope: Scope, number: Number, event_id: uuid::Uuid) -> NumberConflict {
    NumberConflict {
        scope,
        number,
        event_id,
        highest: 0,
    }
}

/// The highest number of `scope` that `ingest` writes (0 if none).
fn highest_in_batch(ingest: &IngestBatch<'_>, scope: Scope) -> u64 {
    let highest = match scope {
        Scope::ChatsOf { application_id } => ingest
            .chats
            .keys()
            .filter(|(id, _)| *id == application_id)
            .map(|(_, number)| *number)
            .max(),
        Scope::MessagesOf {
            application_id,
            chat_number,
        } => ingest
            .messages
            .get(&(application_id, chat_number))
            .and_then(|messages| messages.keys().next_back().copied()),
    };
    highest.map_or(0, Number::get)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::ChatTitle;
    use crate::store::StoredChat;

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

    fn number(value: u64) -> Number {
        Number::new(value).expect("positive")
    }

    fn received(payload: EventPayload) -> Received {
        Received {
            event: crate::events::Event::new(payload),
            trace: None,
        }
    }

    fn chat_created(chat_number: u64, title: &str) -> Received {
        received(EventPayload::ChatCreated {
            application_id: 7,
            chat_number: number(chat_number),
            created_at: Utc::now(),
            title: Some(ChatTitle::parse(title).expect("a valid title")),
            metadata: None,
        })
    }

    #[test]
    fn the_second_chat_event_of_a_number_in_a_batch_is_a_conflict_not_merged() {
        let message_first = received(EventPayload::MessageCreated {
            application_id: 7,
            chat_number: number(1),
            message_number: number(1),
            body: "before its chat".to_owned(),
            created_at: Utc::now(),
            sender: None,
            metadata: None,
        });
        let first = chat_created(1, "first");
        let batch = [
            message_first,
            first.clone(),
            chat_created(1, "second"),
            first.clone(),
            chat_created(5, "five"),
        ];
        let (ingest, taken) = ingest_batch(&batch);
        let chat = &ingest.chats[&(7, number(1))];
        assert_eq!(
            chat.event_id,
            Some(first.event.event_id),
            "the first event claims"
        );
        assert_eq!(chat.title.map(ChatTitle::as_str), Some("first"));
        assert_eq!(
            taken,
            [NumberConflict {
                scope: Scope::ChatsOf { application_id: 7 },
                number: number(1),
                event_id: batch[2].event.event_id,
                highest: 5,
            }],
            "only the second event conflicts, the redelivery does not"
        );
        assert_eq!(
            taken[0].to_string(),
            format!(
                "chat number 1 of application 7 already belongs to another event (event {})",
                batch[2].event.event_id
            )
        );
    }

    #[test]
    fn a_stored_chat_is_claimed_by_its_event_and_taken_by_another() {
        let event_id = uuid::Uuid::new_v4();
        let chat = NewChat {
            event_id: Some(event_id),
            created_at: Utc::now(),
            title: None,
            metadata: None,
        };
        let other = uuid::Uuid::new_v4();
        assert_eq!(chat.against(None), StoredChat::Claim(event_id));
        assert_eq!(
            chat.against(Some(event_id.as_bytes())),
            StoredChat::Unchanged
        );
        assert_eq!(
            chat.against(Some(other.as_bytes())),
            StoredChat::TakenByAnotherEvent(event_id)
        );
        let referred_to = NewChat {
            event_id: None,
            ..chat
        };
        assert_eq!(
            referred_to.against(Some(other.as_bytes())),
            StoredChat::Unchanged
        );
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
