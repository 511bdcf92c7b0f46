//! [`TimedSearchIndex`]: every call of a [`SearchIndex`] adapter inside a client span and timed
//! as `chat_dependency_duration_seconds{dependency=<kind>, operation=<method>}`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{ItemOutcome, MessageDocument, MessageHit, Replacing, SearchError, SearchIndex};
use crate::domain::{Number, SearchRequest};
use crate::metrics::Metrics;

pub struct TimedSearchIndex {
    inner: Arc<dyn SearchIndex>,
    metrics: Arc<Metrics>,
    /// The longest wait for one call on the request path (`CHAT_DEPENDENCY_TIMEOUT_MS`).
    limit: Duration,
}

impl TimedSearchIndex {
    pub fn new(inner: Arc<dyn SearchIndex>, metrics: Arc<Metrics>, limit: Duration) -> Self {
        Self {
            inner,
            metrics,
            limit,
        }
    }
}

#[async_trait]
impl SearchIndex for TimedSearchIndex {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn ping(&self) -> Result<(), SearchError> {
        self.metrics
            .time_within(self.kind(), "ping", self.limit, self.inner.ping())
            .await
    }

    async fn ensure_index(&self) -> Result<(), SearchError> {
        let call = self.inner.ensure_index();
        self.metrics.time(self.kind(), "ensure_index", call).await
    }

    async fn bulk_index(
        &self,
        documents: &[MessageDocument],
        replacing: Replacing,
    ) -> Result<Vec<ItemOutcome>, SearchError> {
        // Not bounded, as the storage's batch write (see `TimedStorage::write_ingest_batch`).
        let call = self.inner.bulk_index(documents, replacing);
        self.metrics.time(self.kind(), "bulk_index", call).await
    }

    async fn purge_application(&self, application_id: u64) -> Result<u64, SearchError> {
        // Not bounded either: an application's documents take as long as they take.
        let call = self.inner.purge_application(application_id);
        self.metrics
            .time(self.kind(), "purge_application", call)
            .await
    }

    async fn search(
        &self,
        application_id: u64,
        chat_number: Number,
        request: &SearchRequest,
    ) -> Result<Vec<MessageHit>, SearchError> {
        let call = self.inner.search(application_id, chat_number, request);
        self.metrics
            .time_within(self.kind(), "search", self.limit, call)
            .await
    }
}
