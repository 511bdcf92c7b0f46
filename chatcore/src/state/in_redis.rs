//! [`SharedState`] on Redis: a counter is a hash `{next, ceil, epoch, server}` changed by Lua
//! scripts, so every step is atomic across api replicas; keys are plain strings with a TTL.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionManager;

use super::{Counter, SharedState, StateError};
use crate::config::SecretUrl;

/// [`connect_redis_with`] with 5 s to connect and the public roots only (the benchmark).
pub async fn connect_redis(url: &SecretUrl) -> Result<ConnectionManager, redis::RedisError> {
    connect_redis_with(url, Duration::from_secs(5), None).await
}

/// Connects to Redis with a multiplexed, self-reconnecting connection. The response timeout is
/// generous (the client default of 500 ms fails requests on a briefly saturated machine); a dead
/// Redis is still noticed at once through the dropped connection.
///
/// `rediss://` connects with TLS (rustls), trusting the public (webpki) roots and `tls_ca` (PEM,
/// `CHAT_TLS_CA_FILE`). Each connection (TCP, TLS, the handshake's commands) takes at most
/// `connect_timeout`, and so does this first one as a whole: its failure is the error of one
/// attempt (a refused port, an untrusted certificate), not of the manager's retries.
pub async fn connect_redis_with(
    url: &SecretUrl,
    connect_timeout: Duration,
    tls_ca: Option<&[u8]>,
) -> Result<ConnectionManager, redis::RedisError> {
    // Commands of concurrent requests share the multiplexed connection: Nagle's algorithm would
    // hold a command back while an earlier one is unanswered.
    let info = redis::IntoConnectionInfo::into_connection_info(url.expose())?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let mut client = redis::Client::open(info)?;
    if let Some(pem) = tls_ca
        && matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { .. }
        )
    {
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(with_public_roots(pem)),
        };
        client = redis::Client::build_with_tls(client.get_connection_info().clone(), certificates)?;
    }
    // One attempt first, for its own error (the manager makes seven before it reports one).
    let attempt = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(connect_timeout));
    within(connect_timeout, async {
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&attempt)
            .await?;
        redis::cmd("PING").query_async::<()>(&mut connection).await
    })
    .await?;
    let settings = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_connection_timeout(Some(connect_timeout));
    within(
        connect_timeout,
        ConnectionManager::new_with_config(client, settings),
    )
    .await
}

/// `connecting`, failing as an IO error (transient) past `timeout`.
async fn within<T>(
    timeout: Duration,
    connecting: impl Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, redis::RedisError> {
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("redis: no connection within {timeout:?}"),
            )
        })?
}

/// The PEM of `ca` followed by the public roots: given a root certificate, redis-rs trusts that
/// one alone.
fn with_public_roots(ca: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let mut pem = ca.to_vec();
    pem.push(b'\n');
    for root in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(root);
        for line in encoded.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    pem
}

/// Lua that sets `server` to the run id of the Redis server running the script. A counter
/// remembers the server that installed it; on any other server (a restart, even one that reloaded
/// the data from disk, or a replica promoted after a failover) it may have gone back in time and
/// is treated as absent, so numbering reseeds it above every durable reservation.
macro_rules! this_server {
    () => {
        "local server = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')\n"
    };
}

/// Returns `{}` when there is no counter this server installed, else `{next, ceil, epoch}` after
/// incrementing.
const INCREMENT: &str = concat!(
    this_server!(),
    r"
local state = redis.call('HMGET', KEYS[1], 'ceil', 'epoch', 'server')
if not state[1] or state[3] ~= server then return {} end
local next = redis.call('HINCRBY', KEYS[1], 'next', 1)
return {next, tonumber(state[1]), tonumber(state[2])}
"
);

/// `{next, ceil, epoch}` of the counter this server installed, or `{}`.
const READ: &str = concat!(
    this_server!(),
    r"
local state = redis.call('HMGET', KEYS[1], 'next', 'ceil', 'epoch', 'server')
if not state[1] or state[4] ~= server then return {} end
return {tonumber(state[1]), tonumber(state[2]), tonumber(state[3])}
"
);

/// Installs a counter unless this server already holds one of the same or a newer epoch.
const SEED: &str = concat!(
    this_server!(),
    r"
local state = redis.call('HMGET', KEYS[1], 'epoch', 'server')
if state[1] and state[2] == server and tonumber(state[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'next', ARGV[1], 'ceil', ARGV[2], 'epoch', ARGV[3], 'server', server)
return 1
"
);

/// Raises the ceiling of the current epoch; a stale epoch or server changes nothing.
const RAISE_CEILING: &str = concat!(
    this_server!(),
    r"
local state = redis.call('HMGET', KEYS[1], 'ceil', 'epoch', 'server')
if not state[2] or state[3] ~= server or tonumber(state[2]) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(state[1]) < tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'ceil', ARGV[1]) end
return 1
"
);

/// Adds one to the count; a new one expires ARGV[1] milliseconds later.
const COUNT_IN_WINDOW: &str = r"
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return count
";

/// Raises `next` to at least ARGV[1]; leaves `ceil` alone, so the next allocation extends the
/// reservation under the epoch check.
const RAISE_NEXT: &str = concat!(
    this_server!(),
    r"
local state = redis.call('HMGET', KEYS[1], 'next', 'server')
if not state[1] or state[2] ~= server then return 0 end
if tonumber(state[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'next', ARGV[1])
return 1
"
);

#[derive(Clone)]
pub struct RedisState {
    redis: ConnectionManager,
    increment: Script,
    read: Script,
    seed: Script,
    raise_ceiling: Script,
    raise_next: Script,
    count_in_window: Script,
}

impl RedisState {
    pub fn new(redis: ConnectionManager) -> Self {
        Self {
            redis,
            increment: Script::new(INCREMENT),
            read: Script::new(READ),
            seed: Script::new(SEED),
            raise_ceiling: Script::new(RAISE_CEILING),
            raise_next: Script::new(RAISE_NEXT),
            count_in_window: Script::new(COUNT_IN_WINDOW),
        }
    }

    fn connection(&self) -> ConnectionManager {
        self.redis.clone()
    }
}

/// `{next, ceil, epoch}` as the scripts answer it; `{}` is no counter.
fn counter_of(state: &[u64]) -> Option<Counter> {
    match *state {
        [next, ceiling, epoch] => Some(Counter {
            next,
            ceiling,
            epoch,
        }),
        _ => None,
    }
}

fn ttl_seconds(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}

#[async_trait]
impl SharedState for RedisState {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StateError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.connection())
            .await?;
        Ok(())
    }

    async fn increment(&self, key: &str) -> Result<Option<Counter>, StateError> {
        let state: Vec<u64> = self
            .increment
            .key(key)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(counter_of(&state))
    }

    async fn counter(&self, key: &str) -> Result<Option<Counter>, StateError> {
        let state: Vec<u64> = self
            .read
            .key(key)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(counter_of(&state))
    }

    async fn seed(&self, key: &str, counter: Counter) -> Result<bool, StateError> {
        let installed: i64 = self
            .seed
            .key(key)
            .arg(counter.next)
            .arg(counter.ceiling)
            .arg(counter.epoch)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(installed == 1)
    }

    async fn raise_ceiling(&self, key: &str, ceiling: u64, epoch: u64) -> Result<(), StateError> {
        let _raised: i64 = self
            .raise_ceiling
            .key(key)
            .arg(ceiling)
            .arg(epoch)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(())
    }

    async fn raise_next(&self, targets: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        // Pipelines only send EVALSHA: make sure the script is loaded first.
        let _sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(RAISE_NEXT)
            .query_async(&mut self.connection())
            .await?;
        let mut pipeline = redis::pipe();
        for (key, number) in targets {
            pipeline.invoke_script(self.raise_next.key(key).arg(*number));
        }
        let raised: Vec<i64> = pipeline.query_async(&mut self.connection()).await?;
        Ok(raised.into_iter().map(|raised| raised == 1).collect())
    }

    async fn count_in_window(&self, key: &str, ttl: Duration) -> Result<u64, StateError> {
        Ok(self
            .count_in_window
            .key(key)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .invoke_async(&mut self.connection())
            .await?)
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("EX")
            .arg(ttl_seconds(ttl))
            .query_async(&mut self.connection())
            .await?;
        Ok(set.is_some())
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError> {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(ttl_seconds(ttl))
            .query_async(&mut self.connection())
            .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        Ok(redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.connection())
            .await?)
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut self.connection())
            .await?;
        Ok(())
    }
}
