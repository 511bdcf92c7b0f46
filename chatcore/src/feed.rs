//! The JSON of logged changes, written once for everyone who hands them out: a chat's change
//! log and the application's feed (the api's replay routes) and the webhooks' `data` (the
//! webhook-dispatcher), and the event type each change is.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{
    ChatTitle, FeedCursor, Metadata, Sender, serialize_optional_timestamp, serialize_timestamp,
};
use crate::store::{ApplicationChangeRow, ChangeKind, ChangeRow, MessageRow};
use crate::webhooks::events::EventType;

impl From<ChangeKind> for EventType {
    fn from(kind: ChangeKind) -> Self {
        match kind {
            ChangeKind::Created => Self::MessageCreated,
            ChangeKind::Updated => Self::MessageUpdated,
            ChangeKind::Deleted => Self::MessageDeleted,
            ChangeKind::ChatCreated => Self::ChatCreated,
        }
    }
}

impl ChangeKind {
    /// The name of the event a change is: its `type` in the feeds and the webhooks.
    pub fn event_type(self) -> &'static str {
        EventType::from(self).as_str()
    }
}

/// One change of a message, as it left the message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeView {
    /// The change's place in the chat's change log: 1, 2, 3, ... (the order the changes were
    /// stored in; the live stream's event id).
    pub sequence: u64,
    #[serde(rename = "type")]
    #[schema(rename = "type", value_type = String, pattern = "^message\\.(created|updated|deleted)$")]
    pub kind: &'static str,
    pub message: ChangedMessageView,
    /// When the change was stored.
    #[serde(serialize_with = "serialize_timestamp")]
    pub occurred_at: DateTime<Utc>,
}

/// The message as a change left it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangedMessageView {
    pub number: u64,
    /// Empty once deleted.
    pub body: String,
    /// 1 when created, one more with each update and the deletion.
    pub version: u64,
    #[serde(serialize_with = "serialize_timestamp")]
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    pub details: MessageDetails,
}

/// What a message carries besides its body, wherever it is shown: who sent it, the integrator's
/// data, and whether it was edited.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MessageDetails {
    /// Who sent it (the `sender` it was posted with, or its client token's); null when not given.
    #[schema(value_type = Option<String>, required = true, pattern = "^[A-Za-z0-9._:@-]{1,128}$")]
    pub sender: Option<Sender>,
    /// The integrator's own data, a JSON object as posted (null when none; removed with the
    /// message).
    #[schema(value_type = Option<Object>, required = true)]
    pub metadata: Option<Metadata>,
    /// When the message was first edited; null until then.
    #[serde(serialize_with = "serialize_optional_timestamp")]
    #[schema(value_type = Option<String>, required = true, format = DateTime)]
    pub edited_at: Option<DateTime<Utc>>,
}

impl MessageDetails {
    pub fn of(message: &MessageRow) -> Self {
        Self {
            sender: message.sender.clone(),
            metadata: message.metadata.clone(),
            edited_at: message.edited_at,
        }
    }
}

impl From<ChangeRow> for ChangeView {
    fn from(change: ChangeRow) -> Self {
        Self {
            sequence: change.sequence,
            kind: change.kind.event_type(),
            occurred_at: change.message.updated_at,
            message: ChangedMessageView {
                details: MessageDetails::of(&change.message),
                number: change.message.number,
                body: change.message.body,
                version: change.message.version,
                created_at: change.message.created_at,
            },
        }
    }
}

/// One change of the application's feed: a message's change (with its `sequence` in its chat's
/// log and the `message`) or a chat's creation (`chat.created`, with the `chat`), and where the
/// feed goes on after it.
#[derive(Debug, Serialize, ToSchema)]
pub struct FeedChangeView {
    /// Pass as `cursor` to read the changes after this one (or as a webhook replay's `after`).
    pub cursor: String,
    pub chat_number: u64,
    #[serde(rename = "type")]
    #[schema(rename = "type", value_type = String, pattern = "^(message\\.(created|updated|deleted)|chat\\.created)$")]
    pub kind: &'static str,
    /// The change's place in its chat's change log (message changes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// The message as the change left it (message changes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChangedMessageView>,
    /// The chat created (`chat.created` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<CreatedChatView>,
    /// When the change was stored.
    #[serde(serialize_with = "serialize_timestamp")]
    pub occurred_at: DateTime<Utc>,
}

/// A chat as it was created.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedChatView {
    pub number: u64,
    #[serde(serialize_with = "serialize_timestamp")]
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    pub details: ChatDetails,
}

/// What a chat carries besides its number, wherever it is shown.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatDetails {
    /// The chat's title; null when none was given.
    #[schema(value_type = Option<String>, required = true, max_length = 255)]
    pub title: Option<ChatTitle>,
    /// The integrator's own data, a JSON object as posted (null when none).
    #[schema(value_type = Option<Object>, required = true)]
    pub metadata: Option<Metadata>,
}

impl From<ApplicationChangeRow> for FeedChangeView {
    fn from(row: ApplicationChangeRow) -> Self {
        let cursor = FeedCursor(row.application_sequence).encode();
        let change = row.change;
        let kind = change.kind.event_type();
        if change.kind == ChangeKind::ChatCreated {
            return Self {
                cursor,
                chat_number: row.chat_number,
                kind,
                sequence: None,
                message: None,
                chat: Some(CreatedChatView {
                    number: row.chat_number,
                    created_at: change.message.created_at,
                    details: ChatDetails {
                        title: row.chat_title,
                        metadata: row.chat_metadata,
                    },
                }),
                occurred_at: change.message.updated_at,
            };
        }
        let view = ChangeView::from(change);
        Self {
            cursor,
            chat_number: row.chat_number,
            kind,
            sequence: Some(view.sequence),
            message: Some(view.message),
            chat: None,
            occurred_at: view.occurred_at,
        }
    }
}
