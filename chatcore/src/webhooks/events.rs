//! The event types an endpoint subscribes to.

use std::str::FromStr;

use crate::domain::InvalidInput;

/// The kinds of event an endpoint can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    MessageCreated,
    MessageUpdated,
    MessageDeleted,
    ChatCreated,
}

impl EventType {
    pub const ALL: [Self; 4] = [
        Self::MessageCreated,
        Self::MessageUpdated,
        Self::MessageDeleted,
        Self::ChatCreated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MessageCreated => "message.created",
            Self::MessageUpdated => "message.updated",
            Self::MessageDeleted => "message.deleted",
            Self::ChatCreated => "chat.created",
        }
    }
}

impl FromStr for EventType {
    type Err = InvalidInput;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == raw)
            .ok_or_else(|| {
                InvalidInput::new(
                    "events",
                    "lists an unknown event type (message.created, message.updated, \
                     message.deleted, chat.created)",
                )
            })
    }
}

/// The event types an endpoint subscribes to: at least one, each once, stored as a
/// comma-separated list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTypes(Vec<EventType>);

impl EventTypes {
    pub fn all() -> Self {
        Self(EventType::ALL.to_vec())
    }

    pub fn parse<'a>(raw: impl IntoIterator<Item = &'a str>) -> Result<Self, InvalidInput> {
        let mut kinds = raw
            .into_iter()
            .map(str::parse)
            .collect::<Result<Vec<EventType>, _>>()?;
        kinds.sort_unstable();
        kinds.dedup();
        if kinds.is_empty() {
            return Err(InvalidInput::new(
                "events",
                "must list at least one event type",
            ));
        }
        Ok(Self(kinds))
    }

    /// The stored form, as [`Self::to_stored`] wrote it.
    pub fn from_stored(stored: &str) -> Result<Self, InvalidInput> {
        Self::parse(stored.split(',').filter(|kind| !kind.is_empty()))
    }

    pub fn to_stored(&self) -> String {
        self.names().collect::<Vec<_>>().join(",")
    }

    pub fn contains(&self, kind: EventType) -> bool {
        self.0.contains(&kind)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|kind| kind.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_parse_sorted_once_and_refuse_unknown_or_none() {
        let kinds =
            EventTypes::parse(["chat.created", "message.created", "chat.created"]).expect("valid");
        assert_eq!(kinds.to_stored(), "message.created,chat.created");
        assert_eq!(EventTypes::from_stored(&kinds.to_stored()), Ok(kinds));
        assert!(EventTypes::parse(["message.exploded"]).is_err());
        assert!(EventTypes::parse([]).is_err());
    }
}
