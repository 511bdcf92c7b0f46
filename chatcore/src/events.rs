//! The event schema carried by the queue between the api and the consumers, and its routing:
//! which consumer receives which events.
//!
//! Every event has a `schema_version` in its body and in the `x-schema-version` header, and a W3C
//! `traceparent` header so one request can be followed across services.

use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{ChatTitle, Metadata, Number, Sender};

pub const SCHEMA_VERSION: u32 = 1;
pub const SCHEMA_VERSION_HEADER: &str = "x-schema-version";
pub const TRACEPARENT_HEADER: &str = "traceparent";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub schema_version: u32,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    #[serde(flatten)]
    pub payload: EventPayload,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventPayload {
    ChatCreated {
        application_id: u64,
        chat_number: Number,
        created_at: DateTime<Utc>,
        // The optional fields are left out when absent: events of releases before them read the
        // same, and theirs read here as absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<ChatTitle>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Metadata>,
    },
    MessageCreated {
        application_id: u64,
        chat_number: Number,
        message_number: Number,
        body: String,
        created_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sender: Option<Sender>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Metadata>,
    },
    /// A change of body and metadata already committed to the storage; `version` orders it
    /// against other writes of the same message in the search index.
    MessageUpdated {
        application_id: u64,
        chat_number: Number,
        message_number: Number,
        body: String,
        version: u64,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sender: Option<Sender>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Metadata>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        edited_at: Option<DateTime<Utc>>,
    },
    /// A deletion already committed to the storage (the message is a tombstone there);
    /// `version` orders it after every earlier write of the message, so a late create or update
    /// never brings it back into the search index.
    MessageDeleted {
        application_id: u64,
        chat_number: Number,
        message_number: Number,
        version: u64,
        created_at: DateTime<Utc>,
        deleted_at: DateTime<Utc>,
    },
    /// An application deletion already committed to the storage (a tombstone, its tokens gone):
    /// its chats, messages and search documents are to be purged.
    ApplicationDeleted {
        application_id: u64,
        deleted_at: DateTime<Utc>,
    },
}

/// Routing keys; queues bind to the ones they consume.
pub mod routing {
    pub const CHAT_CREATED: &str = "chat.created";
    pub const MESSAGE_CREATED: &str = "message.created";
    pub const MESSAGE_UPDATED: &str = "message.updated";
    pub const MESSAGE_DELETED: &str = "message.deleted";
    pub const APPLICATION_DELETED: &str = "application.deleted";
}

/// The consumers of events, each with a queue of its own (named by
/// [`crate::config::Topology::queue`]) that receives the routing keys it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consumer {
    /// Writes chats and messages to the storage (updates and deletions are written by the api
    /// itself); purges the rows of deleted applications.
    Ingest,
    /// Writes messages, created, updated or deleted, to the search index; purges the documents of
    /// deleted applications.
    Index,
}

impl Consumer {
    pub const ALL: [Self; 2] = [Self::Ingest, Self::Index];

    pub fn routing_keys(self) -> &'static [&'static str] {
        match self {
            Self::Ingest => &[
                routing::CHAT_CREATED,
                routing::MESSAGE_CREATED,
                routing::APPLICATION_DELETED,
            ],
            Self::Index => &[
                routing::MESSAGE_CREATED,
                routing::MESSAGE_UPDATED,
                routing::MESSAGE_DELETED,
                routing::APPLICATION_DELETED,
            ],
        }
    }

    /// Whether this consumer's queue receives events with `routing_key`.
    pub fn receives(self, routing_key: &str) -> bool {
        self.routing_keys().contains(&routing_key)
    }

    /// The name of the worker binary that runs this consumer (its `service.name`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest-worker",
            Self::Index => "indexer",
        }
    }

    /// What the worker binary does, for its `--help`.
    pub fn description(self) -> &'static str {
        match self {
            Self::Ingest => "Consumes accepted chats and messages and batch-writes them to MySQL",
            Self::Index => "Consumes message events and bulk-indexes them into Elasticsearch",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event is not valid json of a known type: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("event schema version {found} is newer than the supported {SCHEMA_VERSION}")]
    UnsupportedVersion { found: u32 },
}

impl Event {
    pub fn new(payload: EventPayload) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: Uuid::new_v4(),
            occurred_at: Utc::now(),
            payload,
        }
    }

    pub fn routing_key(&self) -> &'static str {
        match self.payload {
            EventPayload::ChatCreated { .. } => routing::CHAT_CREATED,
            EventPayload::MessageCreated { .. } => routing::MESSAGE_CREATED,
            EventPayload::MessageUpdated { .. } => routing::MESSAGE_UPDATED,
            EventPayload::MessageDeleted { .. } => routing::MESSAGE_DELETED,
            EventPayload::ApplicationDeleted { .. } => routing::APPLICATION_DELETED,
        }
    }

    /// The number of the chat or message the event is about; None for an application's.
    pub fn number(&self) -> Option<Number> {
        match self.payload {
            EventPayload::ChatCreated { chat_number, .. } => Some(chat_number),
            EventPayload::MessageCreated { message_number, .. }
            | EventPayload::MessageUpdated { message_number, .. }
            | EventPayload::MessageDeleted { message_number, .. } => Some(message_number),
            EventPayload::ApplicationDeleted { .. } => None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let event: Self = serde_json::from_slice(bytes)?;
        if event.schema_version > SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: event.schema_version,
            });
        }
        Ok(event)
    }
}

/// A W3C trace context (`traceparent`), continued from the caller's header or started here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext(String);

impl TraceContext {
    /// Continues the caller's trace with a new span id, or starts a new trace.
    pub fn child_of(incoming: Option<&str>) -> Self {
        let trace_id = incoming
            .and_then(Self::trace_id_of)
            .map(str::to_owned)
            .unwrap_or_else(random_hex::<16>);
        Self(format!("00-{trace_id}-{}-01", random_hex::<8>()))
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::trace_id_of(raw).map(|_| Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn trace_id(&self) -> &str {
        Self::trace_id_of(&self.0).expect("valid by construction")
    }

    /// The parent span id this context carries.
    pub fn span_id(&self) -> &str {
        self.0.split('-').nth(2).expect("valid by construction")
    }

    fn trace_id_of(traceparent: &str) -> Option<&str> {
        let mut parts = traceparent.split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let valid = hex(version, 2)
            && hex(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && hex(span_id, 16)
            && hex(flags, 2)
            && parts.next().is_none();
        valid.then_some(trace_id)
    }
}

fn random_hex<const BYTES: usize>() -> String {
    let mut bytes = [0u8; BYTES];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(value: u64) -> Number {
        Number::new(value).expect("positive")
    }

    #[test]
    fn events_round_trip_with_type_tag() {
        let event = Event::new(EventPayload::MessageCreated {
            application_id: 3,
            chat_number: number(2),
            message_number: number(9),
            body: "hello".into(),
            created_at: Utc::now(),
            sender: Some(Sender::parse("u42").expect("valid")),
            metadata: Some(Metadata::parse(&serde_json::json!({"k": [1]})).expect("valid")),
        });
        let json: serde_json::Value = serde_json::from_slice(&event.encode()).expect("json");
        assert_eq!(json["type"], "message_created");
        assert_eq!(json["metadata"], serde_json::json!({"k": [1]}));
        assert_eq!(json["schema_version"], SCHEMA_VERSION);
        assert_eq!(Event::decode(&event.encode()).expect("decodes"), event);
        assert_eq!(event.routing_key(), routing::MESSAGE_CREATED);
    }

    #[test]
    fn events_of_earlier_releases_read_without_the_optional_fields() {
        let earlier = r#"{"schema_version":1,"event_id":"6f1c3b8e-3a8c-4d5e-9f00-1b2c3d4e5f60",
            "occurred_at":"2026-12-01T00:00:00Z","type":"message_created","application_id":1,
            "chat_number":2,"message_number":3,"body":"hi","created_at":"2026-12-01T00:00:00Z"}"#;
        let event = Event::decode(earlier.as_bytes()).expect("decodes");
        let EventPayload::MessageCreated {
            sender, metadata, ..
        } = event.payload
        else {
            panic!("a message_created event");
        };
        assert_eq!((sender, metadata), (None, None));
    }

    #[test]
    fn newer_schema_and_garbage_are_refused() {
        let mut event = Event::new(EventPayload::ChatCreated {
            application_id: 1,
            chat_number: number(1),
            created_at: Utc::now(),
            title: None,
            metadata: None,
        });
        event.schema_version = SCHEMA_VERSION + 1;
        assert!(matches!(
            Event::decode(&event.encode()),
            Err(DecodeError::UnsupportedVersion { .. })
        ));
        assert!(matches!(
            Event::decode(b"{not json"),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn trace_context_continues_or_starts_a_trace() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = TraceContext::child_of(Some(incoming));
        assert_eq!(child.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(child.as_str(), incoming);
        let fresh = TraceContext::child_of(Some("garbage"));
        assert_eq!(fresh.trace_id().len(), 32);
        assert!(TraceContext::parse(fresh.as_str()).is_some());
    }
}
