//! `AMQP_URL`: the RabbitMQ node, or the nodes of a cluster, a connection is made to.

use std::fmt;
use std::str::FromStr;

use lapin::uri::AMQPUri;

use super::SecretUrl;

/// The heartbeat a connection asks for unless its URL names one (`?heartbeat=30`): a connection
/// that goes silent without closing (a node lost under load, a partition) is given up after two
/// missed (20 s), where RabbitMQ's default of 60 s takes two minutes.
const HEARTBEAT_SECONDS: u16 = 10;

/// The RabbitMQ nodes of `AMQP_URL`, in the order they are tried: one URL, or one per node of a
/// cluster separated by commas (`amqp://u:p@rabbit-0:5672/%2f,amqp://u:p@rabbit-1:5672/%2f`).
/// Each parsed at start-up, so a URL that cannot work stops the process there; displayed with
/// passwords redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpNodes(Vec<AmqpNode>);

/// One node: its URL as written (for display, redacted) and as lapin connects to it.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpNode {
    url: SecretUrl,
    uri: AMQPUri,
}

impl AmqpNode {
    /// What lapin connects to. Holds the password: never log it.
    pub fn uri(&self) -> &AMQPUri {
        &self.uri
    }

    /// The URL as written, for a client that takes text. Never log this.
    pub fn expose(&self) -> &str {
        self.url.expose()
    }
}

impl AmqpNodes {
    /// Every node, in the order of the setting (at least one).
    pub fn nodes(&self) -> &[AmqpNode] {
        &self.0
    }

    /// The first node: for the tools that talk to one node only.
    pub fn first(&self) -> &AmqpNode {
        &self.0[0]
    }
}

impl FromStr for AmqpNodes {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let nodes = raw
            .split(',')
            .map(str::trim)
            .enumerate()
            .map(|(index, entry)| {
                let url = SecretUrl::new(entry);
                if entry.is_empty() {
                    return Err(format!(
                        "node {} is empty: separate the nodes' URLs with single commas",
                        index + 1
                    ));
                }
                // lapin's errors may quote the whole URL: only the redacted one is shown.
                let mut uri = entry.parse::<AMQPUri>().map_err(|_| {
                    format!(
                        "node {} ({url}) is not an amqp:// or amqps:// URL (amqp://user:password@host:port/vhost)",
                        index + 1
                    )
                })?;
                uri.query.heartbeat.get_or_insert(HEARTBEAT_SECONDS);
                Ok(AmqpNode { url, uri })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(nodes))
    }
}

impl fmt::Display for AmqpNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, node) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", node.url)?;
        }
        Ok(())
    }
}

impl fmt::Debug for AmqpNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl fmt::Display for AmqpNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.url)
    }
}

impl fmt::Debug for AmqpNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.url)
    }
}
