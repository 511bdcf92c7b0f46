//! `REDIS_URL`, parsed once at startup into where Redis is: one server, a master the sentinels
//! name, or a cluster. A URL that does not parse is a configuration error, never a failure later.
//!
//! - `redis://[user:password@]host:port[/db]` and `rediss://…` (TLS): one server, as redis-rs reads it.
//! - `redis+sentinel://[user:password@]host:port[,host:port…]/<master name>[/db]` and
//!   `rediss+sentinel://…` (TLS to the sentinels and to Redis): the sentinels (port 26379 unless
//!   given) and the name they monitor the master under.
//! - `redis+cluster://[user:password@]host:port[,host:port…]` and `rediss+cluster://…`: some nodes
//!   of a Redis Cluster (port 6379 unless given); the client learns the others from them.
//!
//! The user and password (percent-encoded) are those of the Redis servers and of the sentinels
//! alike.

use std::fmt;

use redis::{ConnectionInfo, IntoConnectionInfo as _, RedisConnectionInfo};

use super::SecretUrl;

/// A parsed `REDIS_URL`; displayed (and debug-printed) with its password redacted.
#[derive(Clone)]
pub struct RedisUrl {
    url: SecretUrl,
    pub topology: RedisTopology,
}

#[derive(Clone)]
pub enum RedisTopology {
    Single(ConnectionInfo),
    Sentinel {
        sentinels: Vec<(String, u16)>,
        master: String,
        /// The credentials and database of the master.
        redis: RedisConnectionInfo,
        tls: bool,
    },
    Cluster {
        nodes: Vec<(String, u16)>,
        /// The credentials (a cluster has database 0 only).
        redis: RedisConnectionInfo,
        tls: bool,
    },
}

const SENTINEL_PORT: u16 = 26379;
const REDIS_PORT: u16 = 6379;

impl RedisUrl {
    pub fn parse(url: SecretUrl) -> Result<Self, String> {
        let text = url.expose();
        let (scheme, rest) = text
            .split_once("://")
            .ok_or("is not a URL (no scheme://)")?;
        let (tls, sentinel) = match scheme {
            "redis+sentinel" => (false, true),
            "rediss+sentinel" => (true, true),
            "redis+cluster" => (false, false),
            "rediss+cluster" => (true, false),
            _ => {
                let info = text
                    .into_connection_info()
                    .map_err(|error| format!("{error} (schemes: redis, rediss, redis+sentinel, rediss+sentinel, redis+cluster, rediss+cluster)"))?;
                return Ok(Self {
                    topology: RedisTopology::Single(info),
                    url,
                });
            }
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
            None => (String::new(), authority),
        };
        let default_port = if sentinel { SENTINEL_PORT } else { REDIS_PORT };
        let nodes = hosts
            .split(',')
            .map(|node| host_and_port(node, default_port))
            .collect::<Result<Vec<_>, _>>()?;
        let mut segments = path.split('/').filter(|segment| !segment.is_empty());
        let (master, db) = if sentinel {
            let master = segments
                .next()
                .ok_or("names no master: redis+sentinel://host:port,…/<master name>[/db]")?;
            (Some(master.to_owned()), segments.next().unwrap_or("0"))
        } else {
            (None, segments.next().unwrap_or("0"))
        };
        if segments.next().is_some() || (!sentinel && db != "0") {
            return Err("has a path beyond …/<master name>/<db> (sentinel) or any (cluster: database 0 only)".to_owned());
        }
        // The credentials and database, read (and percent-decoded) as redis-rs reads a URL's.
        let redis = format!("redis://{credentials}localhost/{db}")
            .into_connection_info()
            .map_err(|error| error.to_string())?
            .redis_settings()
            .clone();
        let topology = match master {
            Some(master) => RedisTopology::Sentinel {
                sentinels: nodes,
                master,
                redis,
                tls,
            },
            None => RedisTopology::Cluster { nodes, redis, tls },
        };
        Ok(Self { url, topology })
    }

    /// The URL as set, for a client library. Never log this.
    pub fn expose(&self) -> &str {
        self.url.expose()
    }
}

/// `host:port`, `[v6]:port`, or a host alone (the default port).
fn host_and_port(node: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = match node.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port
                .parse()
                .map_err(|_| format!("has a port that is not a number: {node:?}"))?;
            (host, port)
        }
        _ => (node, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("has an empty host in {node:?}"));
    }
    Ok((host.to_owned(), port))
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.url, f)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.url, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<RedisTopology, String> {
        RedisUrl::parse(SecretUrl::new(url)).map(|url| url.topology)
    }

    #[test]
    fn a_single_server_is_read_by_redis_rs() {
        let Ok(RedisTopology::Single(info)) = parse("redis://:pw@127.0.0.1:6390/3") else {
            panic!("not a single server");
        };
        assert_eq!(info.redis_settings().db(), 3);
    }

    #[test]
    fn sentinels_name_the_master_and_the_database() {
        let Ok(RedisTopology::Sentinel {
            sentinels,
            master,
            redis,
            tls,
        }) = parse("rediss+sentinel://chat:p%40ss@s1:26380,[::1],s3/mymaster/2")
        else {
            panic!("not sentinels");
        };
        assert_eq!(
            sentinels,
            [
                ("s1".to_owned(), 26380),
                ("::1".to_owned(), 26379),
                ("s3".to_owned(), 26379)
            ]
        );
        assert_eq!(master, "mymaster");
        assert_eq!(redis.db(), 2);
        assert_eq!(redis.username(), Some("chat"));
        assert_eq!(redis.password(), Some("p@ss"));
        assert!(tls);
    }

    #[test]
    fn a_cluster_lists_some_nodes() {
        let Ok(RedisTopology::Cluster { nodes, tls, .. }) =
            parse("redis+cluster://10.0.0.1:7000,10.0.0.2")
        else {
            panic!("not a cluster");
        };
        assert_eq!(
            nodes,
            [("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 6379)]
        );
        assert!(!tls);
    }

    #[test]
    fn malformed_urls_are_refused_with_the_reason() {
        for (url, reason) in [
            ("redis+sentinel://s1:26379", "names no master"),
            ("redis+sentinel://s1:x/m", "not a number"),
            ("redis+cluster://n1/1", "database 0 only"),
            ("redis+cluster://,n2", "empty host"),
            ("memcached://m1", "schemes"),
            ("127.0.0.1:6379", "no scheme"),
        ] {
            let error = parse(url).err().unwrap_or_default();
            assert!(error.contains(reason), "{url}: {error}");
        }
    }
}
