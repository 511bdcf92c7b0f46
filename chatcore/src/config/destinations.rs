//! `CHAT_WEBHOOK_ALLOWED_HOSTS`: the webhook destinations an operator allows although they are
//! not public (the rule itself is `crate::webhooks::destination`'s).

use std::net::IpAddr;
use std::str::FromStr;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
