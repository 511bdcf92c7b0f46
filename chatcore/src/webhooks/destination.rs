//! Where a webhook may go: public addresses only, unless the operator allows a host, an address or
//! a network (`CHAT_WEBHOOK_ALLOWED_HOSTS`). Checked when an endpoint is registered or changed
//! (the api answers 422) and again for every connection, on the addresses the name resolves to
//! then ([`GuardedResolver`]), so a name that later resolves to a private address (DNS rebinding)
//! is refused too.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;

use crate::config::AllowedDestinations;
use crate::config::destinations::canonical;

/// The longest URL an endpoint may have.
pub const MAX_URL_BYTES: usize = 2048;
/// How long a registration waits for the name to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a destination is refused (said to the client as is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Parses an endpoint's URL and checks where it goes; the registration's check.
pub async fn check_url(raw: &str, allowed: &AllowedDestinations) -> Result<Url, Refused> {
    let url = parse_url(raw)?;
    let host = url
        .host_str()
        .ok_or_else(|| Refused("must name a host".into()))?
        .to_owned();
    if allowed.allows_host(&host) {
        return Ok(url);
    }
    if let Some(address) = literal_address(&url) {
        check_address(address, allowed)?;
        return Ok(url);
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let resolved = tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .map_err(|_| Refused(format!("host {host} did not resolve in time")))?
    .map_err(|_| Refused(format!("host {host} does not resolve")))?;
    let mut any = false;
    for address in resolved {
        any = true;
        check_address(address.ip(), allowed)?;
    }
    if !any {
        return Err(Refused(format!("host {host} does not resolve")));
    }
    Ok(url)
}

/// The URL's form: absolute, `http` or `https`, no credentials, not too long.
fn parse_url(raw: &str) -> Result<Url, Refused> {
    if raw.len() > MAX_URL_BYTES {
        return Err(Refused(format!("must be at most {MAX_URL_BYTES} bytes")));
    }
    let url = Url::parse(raw).map_err(|error| Refused(format!("is not a URL ({error})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refused("must be http or https".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refused("must not carry credentials".into()));
    }
    Ok(url)
}

/// The address a URL names literally (`http://127.0.0.1/`, `http://[::1]/`), if it does.
pub fn literal_address(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// A public address, or one the operator allows.
pub fn check_address(address: IpAddr, allowed: &AllowedDestinations) -> Result<(), Refused> {
    match non_public_reason(address) {
        Some(reason) if !allowed.allows_address(address) => Err(Refused(format!(
            "resolves to {address}, a {reason} address (not allowed for webhooks)"
        ))),
        _ => Ok(()),
    }
}

/// The delivery client's resolver: the system's, keeping only the addresses a webhook may reach.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    pub allowed: Arc<AllowedDestinations>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allowed = Arc::clone(&self.allowed);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            if allowed.allows_host(&host) {
                let addresses: Vec<SocketAddr> = resolved.collect();
                return Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs);
            }
            let addresses: Vec<SocketAddr> = resolved
                .filter(|address| check_address(address.ip(), &allowed).is_ok())
                .collect();
            if addresses.is_empty() {
                return Err(Box::new(Refused(format!(
                    "host {host} resolves to no address allowed for webhooks"
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
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

    fn allowing(raw: &str) -> AllowedDestinations {
        raw.parse().expect("valid")
    }

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

    #[tokio::test]
    async fn private_loopback_and_metadata_urls_are_refused_unless_allowed() {
        let none = AllowedDestinations::default();
        for refused in [
            "http://10.1.2.3/hook",
            "http://192.168.0.10:8080/",
            "http://169.254.169.254/latest/meta-data",
            "http://127.0.0.1:9/",
            "http://[::1]/",
            "http://[fd00:ec2::254]/",
            "http://localhost:9/",
        ] {
            assert!(
                check_url(refused, &none).await.is_err(),
                "{refused} is refused"
            );
        }
        let loopback = allowing("127.0.0.1");
        assert!(
            check_url("http://127.0.0.1:9/hook", &loopback)
                .await
                .is_ok()
        );
        assert!(check_url("http://10.1.2.3/hook", &loopback).await.is_err());
    }

    #[tokio::test]
    async fn only_absolute_http_urls_without_credentials_are_taken() {
        let allowed = allowing("127.0.0.1");
        for refused in [
            "ftp://127.0.0.1/",
            "/relative",
            "http://user:pass@127.0.0.1/",
            "not a url",
        ] {
            assert!(
                check_url(refused, &allowed).await.is_err(),
                "{refused} is refused"
            );
        }
        let long = format!("http://127.0.0.1/{}", "a".repeat(MAX_URL_BYTES));
        assert!(check_url(&long, &allowed).await.is_err());
    }
}
