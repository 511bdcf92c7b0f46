//! [`SharedState`] inside the embedded process: counters in memory (a restart loses them, like
//! Redis losing its data, and numbering reseeds above the durable reservations), keys in a SQLite
//! file (`<data dir>/state.db`) so that an idempotent retry after a restart still finds its first
//! answer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::SqlitePool;

use super::{Counter, SharedState, StateError};

pub struct InProcessState {
    counters: Mutex<HashMap<String, Counter>>,
    keys: SqlitePool,
}

fn unix_millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}

fn expiry(ttl: Duration) -> i64 {
    unix_millis(SystemTime::now() + ttl)
}

impl InProcessState {
    /// Opens (creating and migrating) the file of the keys.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let keys = crate::sqlite::open(path, &crate::sqlite::STATE_MIGRATOR, 4).await?;
        Ok(Self {
            counters: Mutex::new(HashMap::new()),
            keys,
        })
    }

    fn with_counters<T>(&self, change: impl FnOnce(&mut HashMap<String, Counter>) -> T) -> T {
        // A panic while holding the lock cannot leave a counter half-written: every change is
        // one assignment. So a poisoned lock is safe to keep using.
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        change(&mut counters)
    }

    /// Deletes expired keys; run now and then so the table does not grow without bound.
    pub async fn purge_expired_keys(&self) -> Result<u64, StateError> {
        Ok(
            sqlx::query("DELETE FROM expiring_keys WHERE expires_at_ms <= ?")
                .bind(unix_millis(SystemTime::now()))
                .execute(&self.keys)
                .await?
                .rows_affected(),
        )
    }
}

#[async_trait]
impl SharedState for InProcessState {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    async fn ping(&self) -> Result<(), StateError> {
        sqlx::query("SELECT 1").execute(&self.keys).await?;
        Ok(())
    }

    async fn increment(&self, key: &str) -> Result<Option<Counter>, StateError> {
        Ok(self.with_counters(|counters| {
            counters.get_mut(key).map(|counter| {
                counter.next += 1;
                *counter
            })
        }))
    }

    async fn counter(&self, key: &str) -> Result<Option<Counter>, StateError> {
        Ok(self.with_counters(|counters| counters.get(key).copied()))
    }

    async fn seed(&self, key: &str, counter: Counter) -> Result<bool, StateError> {
        Ok(self.with_counters(|counters| {
            if counters
                .get(key)
                .is_some_and(|current| current.epoch >= counter.epoch)
            {
                return false;
            }
            counters.insert(key.to_owned(), counter);
            true
        }))
    }

    async fn raise_ceiling(&self, key: &str, ceiling: u64, epoch: u64) -> Result<(), StateError> {
        self.with_counters(|counters| {
            if let Some(counter) = counters.get_mut(key)
                && counter.epoch == epoch
            {
                counter.ceiling = counter.ceiling.max(ceiling);
            }
        });
        Ok(())
    }

    async fn raise_next(&self, targets: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        Ok(self.with_counters(|counters| {
            targets
                .iter()
                .map(|(key, number)| match counters.get_mut(key) {
                    Some(counter) if counter.next < *number => {
                        counter.next = *number;
                        true
                    }
                    _ => false,
                })
                .collect()
        }))
    }

    async fn count_in_window(&self, key: &str, ttl: Duration) -> Result<u64, StateError> {
        // An expired count starts again at 1, with a new end.
        let count: i64 = sqlx::query_scalar(
            "INSERT INTO expiring_keys (key, value, expires_at_ms) VALUES (?1, '1', ?2) \
             ON CONFLICT (key) DO UPDATE SET \
             value = CASE WHEN expires_at_ms <= ?3 THEN '1' \
                     ELSE CAST(CAST(value AS INTEGER) + 1 AS TEXT) END, \
             expires_at_ms = CASE WHEN expires_at_ms <= ?3 THEN ?2 ELSE expires_at_ms END \
             RETURNING CAST(value AS INTEGER)",
        )
        .bind(key)
        .bind(expiry(ttl))
        .bind(unix_millis(SystemTime::now()))
        .fetch_one(&self.keys)
        .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        // An expired key counts as absent and is replaced.
        let set = sqlx::query(
            "INSERT INTO expiring_keys (key, value, expires_at_ms) VALUES (?, ?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at_ms = excluded.expires_at_ms \
             WHERE expires_at_ms <= ?",
        )
        .bind(key)
        .bind(value)
        .bind(expiry(ttl))
        .bind(unix_millis(SystemTime::now()))
        .execute(&self.keys)
        .await?
        .rows_affected();
        Ok(set == 1)
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError> {
        sqlx::query(
            "INSERT INTO expiring_keys (key, value, expires_at_ms) VALUES (?, ?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at_ms = excluded.expires_at_ms",
        )
        .bind(key)
        .bind(value)
        .bind(expiry(ttl))
        .execute(&self.keys)
        .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        Ok(sqlx::query_scalar(
            "SELECT value FROM expiring_keys WHERE key = ? AND expires_at_ms > ?",
        )
        .bind(key)
        .bind(unix_millis(SystemTime::now()))
        .fetch_optional(&self.keys)
        .await?)
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM expiring_keys WHERE key = ?")
            .bind(key)
            .execute(&self.keys)
            .await?;
        Ok(())
    }
}
