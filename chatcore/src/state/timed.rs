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
}

impl TimedState {
    pub fn new(inner: Arc<dyn SharedState>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl SharedState for TimedState {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.metrics
            .time(self.kind(), "ping", self.inner.ping())
            .await
    }

    async fn increment(&self, key: &str) -> Result<Option<Counter>, StateError> {
        let call = self.inner.increment(key);
        self.metrics.time(self.kind(), "increment", call).await
    }

    async fn counter(&self, key: &str) -> Result<Option<Counter>, StateError> {
        let call = self.inner.counter(key);
        self.metrics.time(self.kind(), "counter", call).await
    }

    async fn seed(&self, key: &str, counter: Counter) -> Result<bool, StateError> {
        let call = self.inner.seed(key, counter);
        self.metrics.time(self.kind(), "seed", call).await
    }

    async fn raise_ceiling(&self, key: &str, ceiling: u64, epoch: u64) -> Result<(), StateError> {
        let call = self.inner.raise_ceiling(key, ceiling, epoch);
        self.metrics.time(self.kind(), "raise_ceiling", call).await
    }

    async fn raise_next(&self, targets: &[(String, u64)]) -> Result<Vec<bool>, StateError> {
        let call = self.inner.raise_next(targets);
        self.metrics.time(self.kind(), "raise_next", call).await
    }

    async fn set_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let call = self.inner.set_if_absent(key, value, ttl);
        self.metrics.time(self.kind(), "set_if_absent", call).await
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError> {
        let call = self.inner.set(key, value, ttl);
        self.metrics.time(self.kind(), "set", call).await
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        let call = self.inner.get(key);
        self.metrics.time(self.kind(), "get", call).await
    }

    async fn delete(&self, key: &str) -> Result<(), StateError> {
        let call = self.inner.delete(key);
        self.metrics.time(self.kind(), "delete", call).await
    }
}
