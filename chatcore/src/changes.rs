//! Changes to stored messages, as the live streams of the api deliver them: a message created
//! (once the ingest consumer committed it), updated or deleted (once the api committed it), each
//! with its place in the chat's change log (`sequence`).
//!
//! They are announced to every api replica through the queue ([`crate::queue::EventQueue::announce`])
//! and are not durable: the storage is the record, and a stream that missed some reads them from
//! there when its client reconnects.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{Metadata, Number, Sender};
pub use crate::store::ChangeKind;
use crate::store::ChangeRow;

/// One stored change; `sequence` orders the changes of one chat (its change log), `version` those
/// of one message (1 when created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageChange {
    pub sequence: u64,
    pub kind: ChangeKind,
    pub application_id: u64,
    pub chat_number: Number,
    pub number: Number,
    /// Empty for a deleted message.
    pub body: String,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    // Absent from the announcements of replicas before these fields.
    #[serde(default)]
    pub sender: Option<Sender>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub edited_at: Option<DateTime<Utc>>,
}

impl MessageChange {
    /// A change of the chat's log of message `number`, as the storage returned it.
    pub fn logged(
        application_id: u64,
        chat_number: Number,
        number: Number,
        change: &ChangeRow,
    ) -> Self {
        let message = &change.message;
        Self {
            sequence: change.sequence,
            kind: change.kind,
            application_id,
            chat_number,
            number,
            body: message.body.clone(),
            version: message.version,
            created_at: message.created_at,
            updated_at: message.updated_at,
            sender: message.sender.clone(),
            metadata: message.metadata.clone(),
            edited_at: message.edited_at,
        }
    }
}

/// The wire form of one announcement (a batch of changes).
pub fn encode(changes: &[MessageChange]) -> Vec<u8> {
    serde_json::to_vec(changes).expect("changes always serialize")
}

pub fn decode(bytes: &[u8]) -> Result<Vec<MessageChange>, serde_json::Error> {
    serde_json::from_slice(bytes)
}
