//! What the api and the webhook-dispatcher share about webhooks: the event types an endpoint
//! subscribes to, its signing secret, and the destinations the operator allows although they are
//! not public.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore as _;

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

impl From<crate::store::ChangeKind> for EventType {
    fn from(kind: crate::store::ChangeKind) -> Self {
        use crate::store::ChangeKind;
        match kind {
            ChangeKind::Created => Self::MessageCreated,
            ChangeKind::Updated => Self::MessageUpdated,
            ChangeKind::Deleted => Self::MessageDeleted,
            ChangeKind::ChatCreated => Self::ChatCreated,
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

/// An endpoint's signing secret, `whsec_` and the base64 of 24 random bytes (the Standard
/// Webhooks form: the key is the decoded bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    const PREFIX: &'static str = "whsec_";
    const KEY_BYTES: usize = 24;

    pub fn generate() -> Self {
        let mut key = [0u8; Self::KEY_BYTES];
        rand::rng().fill_bytes(&mut key);
        Self(format!("{}{}", Self::PREFIX, STANDARD.encode(key)))
    }

    /// A secret as stored (written by [`Self::generate`]).
    pub fn from_stored(stored: String) -> Self {
        Self(stored)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The HMAC key: the decoded bytes after the prefix.
    pub fn key(&self) -> Vec<u8> {
        let encoded = self.0.strip_prefix(Self::PREFIX).unwrap_or(&self.0);
        STANDARD
            .decode(encoded)
            .unwrap_or_else(|_| encoded.as_bytes().to_vec())
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("WebhookSecret(..)")
    }
}

/// `CHAT_WEBHOOK_ALLOWED_HOSTS`: the destinations allowed although they are not public.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedDestinations {
    hosts: Vec<String>,
    networks: Vec<(IpAddr, u8)>,
}

impl AllowedDestinations {
    /// Whether a URL's host (a name as written, lower case) is allowed by name.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// Whether an address lies in an allowed network (an address is a network of one).
    pub fn allows_address(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.networks
            .iter()
            .any(|(network, prefix)| contains(*network, *prefix, address))
    }
}

impl FromStr for AllowedDestinations {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let mut allowed = Self::default();
        for entry in raw
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            if let Some((address, prefix)) = entry.split_once('/') {
                let address: IpAddr = address
                    .parse()
                    .map_err(|_| format!("{entry:?} is not a CIDR"))?;
                let prefix: u8 = prefix
                    .parse()
                    .map_err(|_| format!("{entry:?} is not a CIDR"))?;
                let bits = if address.is_ipv4() { 32 } else { 128 };
                if prefix > bits {
                    return Err(format!("{entry:?} has a prefix longer than its address"));
                }
                allowed.networks.push((canonical(address), prefix));
            } else if let Ok(address) = entry.trim_matches(['[', ']']).parse::<IpAddr>() {
                let bits = if address.is_ipv4() { 32 } else { 128 };
                allowed.networks.push((canonical(address), bits));
            } else {
                allowed
                    .hosts
                    .push(entry.trim_end_matches('.').to_ascii_lowercase());
            }
        }
        Ok(allowed)
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is the IPv4 address.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn contains(network: IpAddr, prefix: u8, address: IpAddr) -> bool {
    match (network, address) {
        (IpAddr::V4(network), IpAddr::V4(address)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(network) & mask == u32::from(address) & mask
        }
        (IpAddr::V6(network), IpAddr::V6(address)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(network) & mask == u128::from(address) & mask
        }
        _ => false,
    }
}

/// Why an address is not public (the rule webhook destinations follow), or None for a public
/// one: loopback, private, link-local (cloud metadata at 169.254.169.254 among them), unique-local,
/// shared (carrier-grade NAT), unspecified, multicast, broadcast, or documentation ranges.
pub fn non_public_reason(address: IpAddr) -> Option<&'static str> {
    match canonical(address) {
        IpAddr::V4(v4) => {
            let [first, second, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local (cloud metadata)")
            } else if first == 100 && (64..128).contains(&second) {
                Some("shared address space")
            } else if first == 0 || v4.is_unspecified() {
                Some("unspecified")
            } else if v4.is_multicast() || v4.is_broadcast() || first >= 240 {
                Some("multicast or reserved")
            } else if v4.is_documentation() {
                Some("documentation")
            } else if first == 192 && second == 0 && v4.octets()[2] == 0 {
                Some("protocol assignments")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xfe00 == 0xfc00 {
                Some("unique-local (cloud metadata among them)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if first == 0x2001 && v6.segments()[1] == 0x0db8 {
                Some("documentation")
            } else if first == 0x0064 && v6.segments()[1] == 0xff9b {
                Some("NAT64 (may reach a private address)")
            } else if v6.segments()[..6] == [0, 0, 0, 0, 0, 0] {
                Some("IPv4-compatible")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_named() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
        ] {
            let address: IpAddr = refused.parse().expect("an address");
            assert!(non_public_reason(address).is_some(), "{refused} is refused");
        }
        for public in [
            "93.184.216.34",
            "2606:2800:220:1:248:1893:25c8:1946",
            "8.8.8.8",
        ] {
            let address: IpAddr = public.parse().expect("an address");
            assert_eq!(non_public_reason(address), None, "{public} is public");
        }
    }

    #[test]
    fn allowed_destinations_parse_hosts_addresses_and_networks() {
        let allowed: AllowedDestinations = "127.0.0.1, Hooks.Internal., 10.20.0.0/16,[::1]"
            .parse()
            .expect("valid");
        assert!(allowed.allows_address("127.0.0.1".parse().expect("an address")));
        assert!(!allowed.allows_address("127.0.0.2".parse().expect("an address")));
        assert!(allowed.allows_address("10.20.9.9".parse().expect("an address")));
        assert!(!allowed.allows_address("10.21.0.1".parse().expect("an address")));
        assert!(allowed.allows_address("::1".parse().expect("an address")));
        assert!(allowed.allows_host("hooks.internal"));
        assert!(!allowed.allows_host("other.internal"));
        assert!("10.0.0.0/33".parse::<AllowedDestinations>().is_err());
    }

    #[test]
    fn event_types_parse_sorted_once_and_refuse_unknown_or_none() {
        let kinds =
            EventTypes::parse(["chat.created", "message.created", "chat.created"]).expect("valid");
        assert_eq!(kinds.to_stored(), "message.created,chat.created");
        assert_eq!(EventTypes::from_stored(&kinds.to_stored()), Ok(kinds));
        assert!(EventTypes::parse(["message.exploded"]).is_err());
        assert!(EventTypes::parse([]).is_err());
    }

    #[test]
    fn a_secret_signs_with_its_decoded_key() {
        let secret = WebhookSecret::generate();
        assert!(secret.expose().starts_with("whsec_"));
        assert_eq!(secret.key().len(), 24);
        assert_eq!(format!("{secret:?}"), "WebhookSecret(..)");
    }
}
