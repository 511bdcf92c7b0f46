//! What a client token grants: one sender, some chats (or every chat), read and/or write, until
//! it expires; and the request to mint one, checked.

use std::collections::BTreeSet;
use std::time::Duration;

use chatcore::domain::{InvalidInput, Number, Sender};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a request does to a chat: reading (lists, show, search, stream, changes) or writing
/// (creating, updating, deleting messages; creating chats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
}

/// The `"*"` of a token for every chat of the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum EveryChat {
    #[serde(rename = "*")]
    Every,
}

/// The chats a client token opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatSelection {
    /// Every chat, and the application's list of chats (and, with write, creating one).
    Every,
    Listed(BTreeSet<Number>),
}

impl ChatSelection {
    /// The most chats a token may list: its size stays that of a header.
    pub const MAX_LISTED: usize = 100;

    pub fn listed(numbers: &[u64]) -> Result<Self, InvalidInput> {
        let invalid = || {
            InvalidInput::new(
                "chats",
                format!(
                    "must be \"*\" or 1 to {} chat numbers (positive integers)",
                    Self::MAX_LISTED
                ),
            )
        };
        if numbers.is_empty() || numbers.len() > Self::MAX_LISTED {
            return Err(invalid());
        }
        numbers
            .iter()
            .map(|&number| Number::new(number).ok_or_else(invalid))
            .collect::<Result<_, _>>()
            .map(Self::Listed)
    }
}

/// A verified client token's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientGrant {
    pub application_id: u64,
    /// Who the token speaks for: every message posted with it has this sender.
    pub sender: Sender,
    pub chats: ChatSelection,
    pub scopes: BTreeSet<Access>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl ClientGrant {
    /// Whether the grant allows `access` to the chat (None: to the application's chats as a
    /// whole, which only a token for every chat opens).
    pub fn allows(&self, access: Access, chat: Option<Number>) -> bool {
        let chat_granted = match (&self.chats, chat) {
            (ChatSelection::Every, _) => true,
            (ChatSelection::Listed(numbers), Some(chat)) => numbers.contains(&chat),
            (ChatSelection::Listed(_), None) => false,
        };
        chat_granted && self.scopes.contains(&access)
    }
}

/// A request to mint a client token, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTokenRequest {
    pub sender: Sender,
    pub chats: ChatSelection,
    pub scopes: BTreeSet<Access>,
    pub lifetime: Duration,
}

/// A token's lifetime when the request names none (or the longest allowed, if shorter).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

impl ClientTokenRequest {
    /// The scopes given (at least one) and the lifetime (`expires_in` seconds, at most
    /// `max_lifetime`), checked.
    pub fn new(
        sender: Sender,
        chats: ChatSelection,
        scopes: &[Access],
        expires_in: Option<u64>,
        max_lifetime: Duration,
    ) -> Result<Self, InvalidInput> {
        if scopes.is_empty() {
            return Err(InvalidInput::new(
                "scopes",
                "must name at least one of \"read\" and \"write\"",
            ));
        }
        let lifetime = match expires_in {
            None => DEFAULT_LIFETIME.min(max_lifetime),
            Some(0) => return Err(InvalidInput::new("expires_in", "must be at least 1")),
            Some(seconds) if seconds > max_lifetime.as_secs() => {
                return Err(InvalidInput::new(
                    "expires_in",
                    format!(
                        "must be at most {} seconds (CHAT_CLIENT_TOKEN_MAX_LIFETIME_SECONDS)",
                        max_lifetime.as_secs()
                    ),
                ));
            }
            Some(seconds) => Duration::from_secs(seconds),
        };
        Ok(Self {
            sender,
            chats,
            scopes: scopes.iter().copied().collect(),
            lifetime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn sender() -> Sender {
        Sender::parse("u42").expect("sender")
    }

    fn request(expires_in: Option<u64>, max: Duration) -> Result<ClientTokenRequest, InvalidInput> {
        ClientTokenRequest::new(
            sender(),
            ChatSelection::Every,
            &[Access::Read],
            expires_in,
            max,
        )
    }

    #[test]
    fn expires_in_is_bounded_by_the_longest_lifetime() {
        let refused = request(Some(86_401), DAY).expect_err("above the maximum");
        // (Its 422 is the http layer's: tests/it/client_tokens.rs.)
        assert_eq!(refused.field, "expires_in");
        assert_eq!(request(Some(0), DAY).expect_err("zero").field, "expires_in");
        assert_eq!(request(Some(86_400), DAY).expect("max").lifetime, DAY);
        assert_eq!(
            request(None, DAY).expect("default").lifetime,
            DEFAULT_LIFETIME
        );
        let short = Duration::from_secs(60);
        assert_eq!(request(None, short).expect("capped").lifetime, short);
    }

    #[test]
    fn scopes_and_chats_are_required_and_bounded() {
        let no_scope = ClientTokenRequest::new(sender(), ChatSelection::Every, &[], None, DAY);
        assert_eq!(no_scope.expect_err("no scope").field, "scopes");
        assert_eq!(ChatSelection::listed(&[]).expect_err("none").field, "chats");
        assert!(ChatSelection::listed(&[0]).is_err());
        assert!(ChatSelection::listed(&[1; 101]).is_err());
        assert!(ChatSelection::listed(&[1, 2]).is_ok());
    }

    #[test]
    fn a_grant_opens_its_chats_with_its_scopes_only() {
        let one = Number::new(1).expect("number");
        let two = Number::new(2).expect("number");
        let grant = ClientGrant {
            application_id: 1,
            sender: sender(),
            chats: ChatSelection::listed(&[1]).expect("chats"),
            scopes: [Access::Read].into(),
            issued_at: Utc::now(),
            expires_at: Utc::now(),
        };
        assert!(grant.allows(Access::Read, Some(one)));
        assert!(!grant.allows(Access::Write, Some(one)));
        assert!(!grant.allows(Access::Read, Some(two)));
        assert!(
            !grant.allows(Access::Read, None),
            "the chat list needs every chat"
        );
        let every = ClientGrant {
            chats: ChatSelection::Every,
            scopes: [Access::Read, Access::Write].into(),
            ..grant
        };
        assert!(every.allows(Access::Write, Some(two)));
        assert!(every.allows(Access::Write, None));
    }
}
