//! The change log's rows: each stored change of a message, with its place in its chat's log and
//! in its application's feed.

use std::collections::BTreeMap;

use super::{ChatKey, MessageRow};
use crate::domain::{ChatTitle, Metadata, Number};

/// What a logged change did: to its message, or, in the application's feed only, to its chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
    /// The chat was stored (its row has sequence 0 in the chat's log, message number 0: only
    /// the application's feed reads it).
    ChatCreated,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
            Self::ChatCreated => "chat_created",
        }
    }
}

impl TryFrom<String> for ChangeKind {
    type Error = String;

    fn try_from(stored: String) -> Result<Self, Self::Error> {
        match stored.as_str() {
            "created" => Ok(Self::Created),
            "updated" => Ok(Self::Updated),
            "deleted" => Ok(Self::Deleted),
            "chat_created" => Ok(Self::ChatCreated),
            other => Err(format!("unknown change kind {other:?}")),
        }
    }
}

/// One change of a chat's change log: its sequence (the chat's order of changes), what it did,
/// and the message as it left it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChangeRow {
    pub sequence: u64,
    #[sqlx(try_from = "String")]
    pub kind: ChangeKind,
    #[sqlx(flatten)]
    pub message: MessageRow,
}

/// One change of an application's feed: its place in the feed, its chat, and the change.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApplicationChangeRow {
    pub application_sequence: u64,
    pub chat_number: u64,
    /// The chat's title and metadata now (a `chat_created` change shows them).
    pub chat_title: Option<ChatTitle>,
    pub chat_metadata: Option<Metadata>,
    #[sqlx(flatten)]
    pub change: ChangeRow,
}

/// Which changes of a chat's log a read returns, in sequence order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSelection {
    /// Every change.
    Every,
    /// The chat as it was at the sequence given: of each message not deleted by then, its latest
    /// change up to that sequence.
    StateAt(u64),
}

/// The sequence of the created change of every message of a written batch (the one logged when
/// the message was first stored, for a redelivered message).
pub type CreatedSequences = BTreeMap<(ChatKey, Number), u64>;
