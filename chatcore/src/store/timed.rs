//! [`TimedStorage`]: every call of a [`Storage`] adapter inside a client span and timed as
//! `chat_dependency_duration_seconds{dependency=<kind>, operation=<method>}`.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    ApplicationRow, ChatRow, CountFigures, CountLevel, IngestBatch, MessageRow, MessageToIndex,
    ReindexCursor, ReindexScope, Reservation, Storage, StorageError,
};
use crate::domain::{ApplicationName, ApplicationToken, MessageBody, Number, PageRequest};
use crate::metrics::Metrics;

pub struct TimedStorage {
    inner: Arc<dyn Storage>,
    metrics: Arc<Metrics>,
}

impl TimedStorage {
    pub fn new(inner: Arc<dyn Storage>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl Storage for TimedStorage {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.metrics
            .time(self.kind(), "ping", self.inner.ping())
            .await
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        self.metrics
            .time(self.kind(), "migrate", self.inner.migrate())
            .await
    }

    async fn create_application(
        &self,
        name: &ApplicationName,
    ) -> Result<ApplicationRow, StorageError> {
        let call = self.inner.create_application(name);
        self.metrics
            .time(self.kind(), "create_application", call)
            .await
    }

    async fn rename_application(
        &self,
        token: &ApplicationToken,
        name: &ApplicationName,
    ) -> Result<Option<ApplicationRow>, StorageError> {
        let call = self.inner.rename_application(token, name);
        self.metrics
            .time(self.kind(), "rename_application", call)
            .await
    }

    async fn find_application(
        &self,
        token: &ApplicationToken,
    ) -> Result<Option<ApplicationRow>, StorageError> {
        let call = self.inner.find_application(token);
        self.metrics
            .time(self.kind(), "find_application", call)
            .await
    }

    async fn list_applications(
        &self,
        page: PageRequest,
    ) -> Result<Vec<ApplicationRow>, StorageError> {
        let call = self.inner.list_applications(page);
        self.metrics
            .time(self.kind(), "list_applications", call)
            .await
    }

    async fn application_id(&self, token: &ApplicationToken) -> Result<Option<u64>, StorageError> {
        let call = self.inner.application_id(token);
        self.metrics.time(self.kind(), "application_id", call).await
    }

    async fn find_chat(
        &self,
        application_id: u64,
        number: Number,
    ) -> Result<Option<ChatRow>, StorageError> {
        let call = self.inner.find_chat(application_id, number);
        self.metrics.time(self.kind(), "find_chat", call).await
    }

    async fn list_chats(
        &self,
        application_id: u64,
        page: PageRequest,
    ) -> Result<Vec<ChatRow>, StorageError> {
        let call = self.inner.list_chats(application_id, page);
        self.metrics.time(self.kind(), "list_chats", call).await
    }

    async fn find_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<MessageRow>, StorageError> {
        let call = self.inner.find_message(application_id, chat_number, number);
        self.metrics.time(self.kind(), "find_message", call).await
    }

    async fn list_messages(
        &self,
        application_id: u64,
        chat_number: Number,
        page: PageRequest,
    ) -> Result<Vec<MessageRow>, StorageError> {
        let call = self.inner.list_messages(application_id, chat_number, page);
        self.metrics.time(self.kind(), "list_messages", call).await
    }

    async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        body: &MessageBody,
    ) -> Result<Option<MessageRow>, StorageError> {
        let call = self
            .inner
            .update_message(application_id, chat_number, number, body);
        self.metrics.time(self.kind(), "update_message", call).await
    }

    async fn write_ingest_batch(&self, batch: &IngestBatch<'_>) -> Result<(), StorageError> {
        let call = self.inner.write_ingest_batch(batch);
        self.metrics
            .time(self.kind(), "write_ingest_batch", call)
            .await
    }

    async fn count_figures(
        &self,
        level: CountLevel,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<CountFigures>, StorageError> {
        let call = self.inner.count_figures(level, after_id, limit);
        self.metrics.time(self.kind(), "count_figures", call).await
    }

    async fn messages_to_index(
        &self,
        scope: ReindexScope,
        after: ReindexCursor,
        limit: u32,
    ) -> Result<Vec<MessageToIndex>, StorageError> {
        let call = self.inner.messages_to_index(scope, after, limit);
        self.metrics
            .time(self.kind(), "messages_to_index", call)
            .await
    }

    async fn recount(&self, level: CountLevel, id: u64) -> Result<u64, StorageError> {
        let call = self.inner.recount(level, id);
        self.metrics.time(self.kind(), "recount", call).await
    }

    async fn reserve_fresh_block(
        &self,
        scope: &str,
        block_size: u64,
    ) -> Result<Reservation, StorageError> {
        let call = self.inner.reserve_fresh_block(scope, block_size);
        self.metrics
            .time(self.kind(), "reserve_fresh_block", call)
            .await
    }

    async fn extend_reservation(
        &self,
        scope: &str,
        number: u64,
        epoch: u64,
        block_size: u64,
    ) -> Result<Option<u64>, StorageError> {
        let call = self
            .inner
            .extend_reservation(scope, number, epoch, block_size);
        self.metrics
            .time(self.kind(), "extend_reservation", call)
            .await
    }

    async fn reserved_until(&self, scope: &str) -> Result<Option<u64>, StorageError> {
        let call = self.inner.reserved_until(scope);
        self.metrics.time(self.kind(), "reserved_until", call).await
    }

    async fn raise_reservations(
        &self,
        highest: &[(String, u64)],
    ) -> Result<Vec<String>, StorageError> {
        let call = self.inner.raise_reservations(highest);
        self.metrics
            .time(self.kind(), "raise_reservations", call)
            .await
    }
}
