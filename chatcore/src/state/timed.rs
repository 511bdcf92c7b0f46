//! [`TimedState`]: every call of a [`SharedState`] adapter inside a client span and timed as
//! `chat_dependency_duration_seconds{dependency=<kind>, operation=<method>}`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Counter, SharedState, StateError};
use crate::metrics::Metrics;

pub struct TimedState {
    inner: Arc<dyn SharedState>,
    metrics: Arc<Metrics>,
    /// The longest wait for one call on the request path (`CHAT_DEPENDENCY_TIMEOUT_MS`).
    limit: Duration,
}

impl TimedState {
    pub fn new(inner: Arc<dyn SharedState>, metrics: Arc<Metrics>, limit: Duration) -> Self {
        Self {
            inner,
            metrics,
            limit,
        }
    }
}

#[async_trait]
impl SharedState for TimedState {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.metrics
            .time_within(self.kind(), "ping", self.limit, self.inner.ping())
            .await
    }

    async fn increment(&self, key: &str) -> Result<Option<Counter>, StateError> {
        let call = self.inner.increment(key);
        self.metrics
            .time_within(self.kind(), "increment", self.limit, call)
            .await
    }

    async fn counter(&self, key: &str) -> Result<Option<Counter>, StateError> {
        let call = self.inner.counter(key);
        self.metrics
            .time_within(self.kind(), "counter", self.limit, call)
            .await
    }

    async fn seed(&self, key: &str, counter: Counter) -> Result<bool, StateError> {
        let call = self.inner.seed(key, counter);
        self.metrics
            .time_within(self.kind(), "seed", self.limit, call)
            .await
    }

    async fn raise_ceiling(&self, key: &str, ceiling: u64, epoch: u64) -> Result<(), StateError> {
        let call = self.inner.raise_ceiling(key, ceiling, epoch);
        self.metrics
            .time_within(self.kind(), "raise_ceiling", self.limit, call)
            .await
    }

    async fn count_in_window(&self, key: &str, ttl: Duration) -> Result<u64, StateError> {
        let call = self.inner.count_in_window(key, ttl);
        self.metrics
            .time_within(self.kind(), "count_in_window", self.limit, call)
            .await
    }

    async fn raise_next(&self, targets: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        let call = self.inner.raise_next(targets);
        self.metrics
            .time_within(self.kind(), "raise_next", self.limit, call)
            .await
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let call = self.inner.set_if_absent(key, value, ttl);
        self.metrics
            .time_within(self.kind(), "set_if_absent", self.limit, call)
            .await
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError> {
        let call = self.inner.set(key, value, ttl);
        self.metrics
            .time_within(self.kind(), "set", self.limit, call)
            .await
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        let call = self.inner.get(key);
        self.metrics
            .time_within(self.kind(), "get", self.limit, call)
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        let call = self.inner.delete(key);
        self.metrics
            .time_within(self.kind(), "delete", self.limit, call)
            .await
    }
}
