//! Changes to stored messages, as the live streams of the api deliver them: a message created
//! (once the ingest consumer committed it), updated or deleted (once the api committed it).
//!
//! They are announced to every api replica through the queue ([`crate::queue::EventQueue::announce`])
//! and are not durable: the storage is the record, and a stream that missed some reads them from
//! there when its client reconnects.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::Number;
use crate::store::MessageRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
        }
    }
}

/// One stored change; `version` orders the changes of one message (1 when created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageChange {
    pub kind: ChangeKind,
    pub application_id: u64,
    pub chat_number: Number,
    pub number: Number,
    /// Empty for a deleted message.
    pub body: String,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl MessageChange {
    /// The change an update or a deletion committed, from the row the storage returned.
    pub fn of_row(
        kind: ChangeKind,
        application_id: u64,
        chat_number: Number,
        number: Number,
        row: &MessageRow,
    ) -> Self {
        Self {
            kind,
            application_id,
            chat_number,
            number,
            body: row.body.clone(),
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
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
