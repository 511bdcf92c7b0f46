//! Per-parent sequential numbers: Redis hands them out, MySQL makes sure none is ever reused.
//!
//! Each scope (the chats of one application, the messages of one chat) has one Redis hash with
//! `next` (last number handed out), `ceil` (highest number durably reserved) and `epoch`. A number
//! is handed out only when it is at most a ceiling that MySQL has committed in the
//! `number_reservations` row of the scope, under the same epoch.
//!
//! When Redis loses the hash (FLUSHALL, restart without persistence), the next caller *seeds* it:
//! in one MySQL transaction it bumps the epoch and reserves a fresh block above everything ever
//! reserved, then writes that block into Redis. Bumping the epoch makes every extension still in
//! flight from the old Redis state fail, so the old and the new state can never hand out the same
//! number. Numbers may skip (the rest of a block is lost with Redis); they are never reused.

use std::collections::HashMap;

use redis::Script;
use redis::aio::ConnectionManager;
use sqlx::{MySql, MySqlPool, QueryBuilder};

use crate::domain::Number;

/// The parent whose children are numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    ChatsOf {
        application_id: u64,
    },
    MessagesOf {
        application_id: u64,
        chat_number: Number,
    },
}

impl Scope {
    /// Stable identifier, used as the MySQL row key and in the Redis key.
    pub fn id(&self) -> String {
        match self {
            Self::ChatsOf { application_id } => format!("chats:{application_id}"),
            Self::MessagesOf {
                application_id,
                chat_number,
            } => format!("messages:{application_id}:{chat_number}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AllocationError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("mysql: {0}")]
    Database(#[from] sqlx::Error),
    #[error("number allocation kept racing with a concurrent reseed")]
    Contended,
    #[error("the numbers of this scope are exhausted")]
    Exhausted,
}

const MAX_ROUNDS: usize = 8;
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Returns `{}` when the scope has no Redis state, else `{next, ceil, epoch}` after incrementing.
const ALLOCATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local next = redis.call('HINCRBY', KEYS[1], 'next', 1)
local state = redis.call('HMGET', KEYS[1], 'ceil', 'epoch')
return {next, tonumber(state[1]), tonumber(state[2])}
";

/// Installs a freshly reserved block unless Redis already holds the same or a newer epoch.
const SEED: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and tonumber(epoch) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'next', ARGV[1], 'ceil', ARGV[2], 'epoch', ARGV[3])
return 1
";

/// Raises the ceiling of the current epoch; a stale epoch changes nothing.
const RAISE_CEILING: &str = r"
local state = redis.call('HMGET', KEYS[1], 'ceil', 'epoch')
if not state[2] or tonumber(state[2]) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(state[1]) < tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'ceil', ARGV[1]) end
return 1
";

/// Raises `next` to at least ARGV[1] (used by counter-sync when a counter fell behind). It leaves
/// `ceil` alone: the next allocation then extends the reservation under the epoch check.
const RAISE_NEXT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local next = tonumber(redis.call('HGET', KEYS[1], 'next'))
if next >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'next', ARGV[1])
return 1
";

#[derive(Clone)]
pub struct NumberAllocator {
    redis: ConnectionManager,
    database: MySqlPool,
    key_prefix: String,
    block_size: u64,
    allocate_script: Script,
    seed_script: Script,
    raise_ceiling_script: Script,
    raise_next_script: Script,
    reservation_locks: std::sync::Arc<[tokio::sync::Mutex<()>]>,
}

/// Stripes of the per-scope reservation lock.
const RESERVATION_LOCK_STRIPES: usize = 256;

fn number(value: u64) -> Result<Number, AllocationError> {
    Number::new(value).ok_or(AllocationError::Exhausted)
}

struct Reservation {
    reserved_until: u64,
    epoch: u64,
}

impl NumberAllocator {
    pub fn new(
        redis: ConnectionManager,
        database: MySqlPool,
        key_prefix: &str,
        block_size: u64,
    ) -> Self {
        Self {
            redis,
            database,
            key_prefix: key_prefix.to_owned(),
            block_size,
            allocate_script: Script::new(ALLOCATE),
            seed_script: Script::new(SEED),
            raise_ceiling_script: Script::new(RAISE_CEILING),
            raise_next_script: Script::new(RAISE_NEXT),
            reservation_locks: (0..RESERVATION_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn key(&self, scope: &Scope) -> String {
        format!("{}:numbers:{}", self.key_prefix, scope.id())
    }

    /// Hands out the next number of the scope; never one handed out before.
    #[tracing::instrument(name = "redis allocate number", skip_all, fields(otel.kind = "client", scope = %scope.id()))]
    pub async fn allocate(&self, scope: &Scope) -> Result<Number, AllocationError> {
        let key = self.key(scope);
        for _ in 0..MAX_ROUNDS {
            let state: Vec<u64> = match self
                .allocate_script
                .key(&key)
                .invoke_async(&mut self.redis.clone())
                .await
            {
                Ok(state) => state,
                // The connection manager reconnects in the background after a dropped connection
                // (a Redis restart); give it a moment instead of failing the request.
                Err(error) if error.is_connection_dropped() || error.is_io_error() => {
                    tracing::warn!(%error, "redis connection lost, retrying");
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let outcome = match state[..] {
                [next, ceiling, _] if next <= ceiling => return number(next),
                [next, _, epoch] => self.extend_once(scope, &key, next, epoch).await,
                _ => self.seed_once(scope, &key).await.map(|()| false),
            };
            match outcome {
                Ok(true) => return number(state[0]),
                Ok(false) => {}
                // Another replica's reservation held the row; the next round sees its result.
                Err(AllocationError::Database(error)) if crate::store::is_transient(&error) => {
                    tracing::debug!(%error, scope = %scope.id(), "number reservation raced, retrying");
                }
                Err(error) => return Err(error),
            }
        }
        Err(AllocationError::Contended)
    }

    /// The stripe lock of a scope: reservations of one scope run one at a time in this process,
    /// so a burst of requests on a fresh or exhausted scope makes one reservation, not hundreds.
    fn reservation_lock(&self, scope: &Scope) -> &tokio::sync::Mutex<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(scope, &mut hasher);
        let stripe = std::hash::Hasher::finish(&hasher) as usize % self.reservation_locks.len();
        &self.reservation_locks[stripe]
    }

    async fn seed_once(&self, scope: &Scope, key: &str) -> Result<(), AllocationError> {
        let _serialized = self.reservation_lock(scope).lock().await;
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut self.redis.clone())
            .await?;
        if exists {
            // Seeded by a request that held the lock before us.
            return Ok(());
        }
        self.seed(scope, key).await
    }

    /// Returns true when `number` is now covered by a reservation of `epoch`.
    async fn extend_once(
        &self,
        scope: &Scope,
        key: &str,
        number: u64,
        epoch: u64,
    ) -> Result<bool, AllocationError> {
        let _serialized = self.reservation_lock(scope).lock().await;
        let state: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(key)
            .arg("ceil")
            .arg("epoch")
            .query_async(&mut self.redis.clone())
            .await?;
        if let [Some(ceiling), Some(current_epoch)] = state[..]
            && current_epoch == epoch
            && number <= ceiling
        {
            // Extended by a request that held the lock before us.
            return Ok(true);
        }
        self.extend(scope, key, number, epoch).await
    }

    /// The highest number that may have been handed out in the scope (an upper bound).
    pub async fn handed_out_up_to(&self, scope: &Scope) -> Result<u64, AllocationError> {
        let next: Option<u64> = redis::cmd("HGET")
            .arg(self.key(scope))
            .arg("next")
            .query_async(&mut self.redis.clone())
            .await?;
        if let Some(next) = next {
            return Ok(next);
        }
        let reserved: Option<u64> =
            sqlx::query_scalar("SELECT reserved_until FROM number_reservations WHERE scope = ?")
                .bind(scope.id())
                .fetch_optional(&self.database)
                .await?;
        Ok(reserved.unwrap_or(0))
    }

    /// Makes sure no scope will hand out its number, or anything below it, again: raises the MySQL
    /// reservations and the Redis counters that are behind. Returns the scopes that were behind.
    /// One query, one upsert and one Redis pipeline for the whole slice.
    pub async fn ensure_beyond(
        &self,
        highest: &[(Scope, u64)],
    ) -> Result<Vec<Scope>, AllocationError> {
        if highest.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = highest.iter().map(|(scope, _)| scope.id()).collect();
        let mut query = QueryBuilder::<MySql>::new(
            "SELECT scope, reserved_until FROM number_reservations WHERE scope IN (",
        );
        let mut list = query.separated(", ");
        for id in &ids {
            list.push_bind(id.as_str());
        }
        query.push(")");
        let reserved: HashMap<String, u64> = query
            .build_query_as()
            .fetch_all(&self.database)
            .await?
            .into_iter()
            .collect();
        let behind_in_mysql: Vec<(&String, u64)> = ids
            .iter()
            .zip(highest)
            .filter(|(id, (_, number))| reserved.get(*id).is_none_or(|until| until < number))
            .map(|(id, (_, number))| (id, *number))
            .collect();
        if !behind_in_mysql.is_empty() {
            let mut upsert = QueryBuilder::<MySql>::new(
                "INSERT INTO number_reservations (scope, reserved_until, epoch) ",
            );
            upsert.push_values(&behind_in_mysql, |mut row, (id, number)| {
                row.push_bind(id.as_str())
                    .push_bind(*number)
                    .push_bind(0u64);
            });
            upsert.push(" ON DUPLICATE KEY UPDATE reserved_until = GREATEST(reserved_until, VALUES(reserved_until))");
            upsert.build().execute(&self.database).await?;
        }
        // Pipelines only send EVALSHA: make sure the script is loaded first.
        let _sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(RAISE_NEXT)
            .query_async(&mut self.redis.clone())
            .await?;
        let mut pipeline = redis::pipe();
        for (scope, number) in highest {
            pipeline.invoke_script(self.raise_next_script.key(self.key(scope)).arg(*number));
        }
        let raised: Vec<i64> = pipeline.query_async(&mut self.redis.clone()).await?;
        Ok(highest
            .iter()
            .zip(&ids)
            .zip(raised)
            .filter(|(((_, number), id), raised)| {
                *raised == 1
                    || behind_in_mysql
                        .iter()
                        .any(|(behind, n)| behind == id && n == number)
            })
            .map(|(((scope, _), _), _)| *scope)
            .collect())
    }

    /// Reserves a fresh block above every earlier reservation, under a new epoch. One upsert
    /// statement takes the row lock, so concurrent seeders queue up instead of deadlocking.
    async fn seed(&self, scope: &Scope, key: &str) -> Result<(), AllocationError> {
        let mut transaction = self.database.begin().await?;
        sqlx::query(
            "INSERT INTO number_reservations (scope, reserved_until, epoch) VALUES (?, ?, 1) \
             ON DUPLICATE KEY UPDATE reserved_until = reserved_until + VALUES(reserved_until), epoch = epoch + 1",
        )
        .bind(scope.id())
        .bind(self.block_size)
        .execute(&mut *transaction)
        .await?;
        let reserved = lock_reservation(&mut transaction, scope).await?;
        transaction.commit().await?;
        let start = reserved.reserved_until - self.block_size;
        let _installed: i64 = self
            .seed_script
            .key(key)
            .arg(start)
            .arg(reserved.reserved_until)
            .arg(reserved.epoch)
            .invoke_async(&mut self.redis.clone())
            .await?;
        tracing::info!(scope = %scope.id(), epoch = reserved.epoch, start, "seeded number counter");
        Ok(())
    }

    /// Durably reserves a block that covers `number`, if the epoch is still current.
    async fn extend(
        &self,
        scope: &Scope,
        key: &str,
        number: u64,
        epoch: u64,
    ) -> Result<bool, AllocationError> {
        let mut transaction = self.database.begin().await?;
        let current = lock_reservation(&mut transaction, scope).await?;
        if current.epoch != epoch {
            return Ok(false);
        }
        let ceiling = current.reserved_until.max(number - 1 + self.block_size);
        sqlx::query("UPDATE number_reservations SET reserved_until = ? WHERE scope = ?")
            .bind(ceiling)
            .bind(scope.id())
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        let _raised: i64 = self
            .raise_ceiling_script
            .key(key)
            .arg(ceiling)
            .arg(epoch)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(true)
    }
}

async fn lock_reservation(
    transaction: &mut sqlx::Transaction<'_, MySql>,
    scope: &Scope,
) -> Result<Reservation, sqlx::Error> {
    let (reserved_until, epoch): (u64, u64) = sqlx::query_as(
        "SELECT reserved_until, epoch FROM number_reservations WHERE scope = ? FOR UPDATE",
    )
    .bind(scope.id())
    .fetch_one(&mut **transaction)
    .await?;
    Ok(Reservation {
        reserved_until,
        epoch,
    })
}
