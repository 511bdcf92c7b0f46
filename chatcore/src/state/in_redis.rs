//! [`SharedState`] on Redis: a counter is a hash `{next, ceil, epoch, server}` changed by Lua
//! scripts, so every step is atomic across api replicas; keys are plain strings with a TTL.
//!
//! Every script and command touches exactly one key, so each runs within one hash slot of a
//! Redis Cluster whatever the key's name: the key names need no hash tags (and stay those of
//! earlier versions).

use std::time::Duration;

use async_trait::async_trait;
use futures_util::{StreamExt as _, TryStreamExt as _};
use redis::Script;

use super::redis_connection::RedisConnection;
use super::{Counter, SharedState, StateError};

/// Scripts of one [`SharedState::raise_next`] call in flight at once, on the shared connection.
const RAISES_IN_FLIGHT: usize = 64;

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
    redis: RedisConnection,
    increment: Script,
    read: Script,
    seed: Script,
    raise_ceiling: Script,
    raise_next: Script,
    count_in_window: Script,
}

impl RedisState {
    pub fn new(redis: RedisConnection) -> Self {
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

    fn connection(&self) -> RedisConnection {
        self.redis.clone()
    }
}

/// [`RAISE_NEXT`] of one key: 1 when raised.
async fn raise_one(
    script: &Script,
    mut connection: RedisConnection,
    key: &str,
    number: u64,
) -> redis::RedisResult<i64> {
    script
        .key(key)
        .arg(number)
        .invoke_async(&mut connection)
        .await
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
        // Scripts one by one rather than a pipeline: on a cluster the keys lie in different
        // slots. They share the multiplexed connection, so they still travel together. (Collected
        // first: a stream that borrows the targets in its closure is not `Send` for async_trait.)
        let raises: Vec<_> = targets
            .iter()
            .map(|(key, number)| raise_one(&self.raise_next, self.connection(), key, *number))
            .collect();
        let raised: Vec<i64> = futures_util::stream::iter(raises)
            .buffered(RAISES_IN_FLIGHT)
            .try_collect()
            .await?;
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
