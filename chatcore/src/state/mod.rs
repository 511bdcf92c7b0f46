//! State shared by the api replicas that does not belong in the database: the number counters,
//! idempotency keys and the marks of just-accepted chats. One trait, [`SharedState`], with a Redis
//! adapter (the distributed stack) and an in-process adapter (embedded).
//!
//! Counters are fast, not durable: a counter may vanish at any time (Redis loses its data, the
//! embedded process restarts) and [`crate::numbering`] then reseeds it above every durable
//! reservation. Keys expire after their TTL.

mod in_process;
mod in_redis;
mod redis_connection;
mod timed;

use std::time::Duration;

use async_trait::async_trait;

pub use in_process::InProcessState;
pub use in_redis::RedisState;
pub use redis_connection::{RedisConnection, connect_redis, connect_redis_with};
pub use timed::TimedState;

use crate::retry::Transient;

/// One scope's counter: `next` is the last number handed out, `ceiling` the highest durably
/// reserved one, `epoch` the reservation generation it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub next: u64,
    pub ceiling: u64,
    pub epoch: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    TimedOut(#[from] crate::retry::DependencyTimedOut),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("sqlite: {0}")]
    Database(#[from] sqlx::Error),
}

impl Transient for StateError {
    /// The connection dropped and is being re-established, Redis is failing over (a demoted
    /// master, a cluster without a master for a slot) or loading, or the file is busy: worth a
    /// retry in a moment.
    fn is_transient(&self) -> bool {
        use redis::{ErrorKind, RetryMethod, ServerErrorKind};
        match self {
            Self::TimedOut(_) => true,
            Self::Redis(error) => {
                error.is_connection_dropped()
                    || error.is_io_error()
                    || matches!(error.retry_method(), RetryMethod::WaitAndRetry)
                    || matches!(
                        error.kind(),
                        ErrorKind::Server(ServerErrorKind::ReadOnly)
                            | ErrorKind::ClusterConnectionNotFound
                    )
            }
            Self::Database(error) => crate::sql_errors::is_transient(error),
        }
    }
}

/// Every call is timed by [`TimedState`], which the composition root wraps around the adapter.
#[async_trait]
pub trait SharedState: Send + Sync {
    /// "redis" or "in-process": the dependency label of metrics and readiness.
    fn kind(&self) -> &'static str;

    async fn ping(&self) -> Result<(), StateError>;

    /// Increments `next` of an existing counter and returns it; None when there is no counter.
    async fn increment(&self, key: &str) -> Result<Option<Counter>, StateError>;

    /// The counter as it is, without incrementing.
    async fn counter(&self, key: &str) -> Result<Option<Counter>, StateError>;

    /// Installs a counter unless one of the same or a newer epoch is there; true when installed.
    async fn seed(&self, key: &str, counter: Counter) -> Result<bool, StateError>;

    /// Raises the ceiling of the counter if it is still at `epoch`.
    async fn raise_ceiling(&self, key: &str, ceiling: u64, epoch: u64) -> Result<(), StateError>;

    /// Raises `next` of each existing counter to at least its number; true for those raised.
    async fn raise_next(&self, targets: &[(String, u64)]) -> Result<Vec<bool>, StateError>;

    /// Adds one to the count kept under `key` and returns it; a new count (or one past its `ttl`)
    /// starts at 1 and ends `ttl` later. Fixed windows of a rate, shared by every replica.
    async fn count_in_window(&self, key: &str, ttl: Duration) -> Result<u64, StateError>;

    /// Sets the key unless it exists; true when set.
    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError>;

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError>;

    async fn get(&self, key: &str) -> Result<Option<String>, StateError>;

    async fn delete(&self, key: &str) -> Result<(), StateError>;
}
