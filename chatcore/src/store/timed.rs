//! [`TimedStorage`]: every call of a [`Storage`] adapter inside a client span and timed as
//! `chat_dependency_duration_seconds{dependency=<kind>, operation=<method>}`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    ApplicationChangeRow, ApplicationRow, ChangeRow, ChangeSelection, ChatRow, ClientKeyRow,
    CountFigures, CountLevel, CreatedSequences, IngestBatch, MessageEdit, MessageRow,
    MessageToIndex, ReindexCursor, ReindexScope, Reservation, Storage, StorageError, TokenGrant,
};
use crate::domain::{
    ApplicationName, ApplicationToken, ClientKeyId, Number, PageRequest, Sender, TokenDigest,
};
use crate::metrics::Metrics;

pub struct TimedStorage {
    inner: Arc<dyn Storage>,
    metrics: Arc<Metrics>,
    /// The longest wait for one call on the request path (`CHAT_DEPENDENCY_TIMEOUT_MS`).
    limit: Duration,
}

impl TimedStorage {
    pub fn new(inner: Arc<dyn Storage>, metrics: Arc<Metrics>, limit: Duration) -> Self {
        Self {
            inner,
            metrics,
            limit,
        }
    }
}

#[async_trait]
impl Storage for TimedStorage {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn webhooks(&self) -> &dyn super::WebhookStore {
        self.inner.webhooks()
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.metrics
            .time_within(self.kind(), "ping", self.limit, self.inner.ping())
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
        token: &ApplicationToken,
    ) -> Result<ApplicationRow, StorageError> {
        let call = self.inner.create_application(name, token);
        self.metrics
            .time_within(self.kind(), "create_application", self.limit, call)
            .await
    }

    async fn rename_application(
        &self,
        application_id: u64,
        name: &ApplicationName,
    ) -> Result<Option<ApplicationRow>, StorageError> {
        let call = self.inner.rename_application(application_id, name);
        self.metrics
            .time_within(self.kind(), "rename_application", self.limit, call)
            .await
    }

    async fn find_application(
        &self,
        application_id: u64,
    ) -> Result<Option<ApplicationRow>, StorageError> {
        let call = self.inner.find_application(application_id);
        self.metrics
            .time_within(self.kind(), "find_application", self.limit, call)
            .await
    }

    async fn list_applications(
        &self,
        page: PageRequest,
    ) -> Result<Vec<ApplicationRow>, StorageError> {
        let call = self.inner.list_applications(page);
        self.metrics
            .time_within(self.kind(), "list_applications", self.limit, call)
            .await
    }

    async fn resolve_token(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<TokenGrant>, StorageError> {
        let call = self.inner.resolve_token(digest);
        self.metrics
            .time_within(self.kind(), "resolve_token", self.limit, call)
            .await
    }

    async fn replace_tokens(
        &self,
        application_id: u64,
        token: &ApplicationToken,
        others_valid_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError> {
        let call = self
            .inner
            .replace_tokens(application_id, token, others_valid_until);
        self.metrics
            .time_within(self.kind(), "replace_tokens", self.limit, call)
            .await
    }

    async fn client_key(&self, application_id: u64) -> Result<Option<ClientKeyRow>, StorageError> {
        let call = self.inner.client_key(application_id);
        self.metrics
            .time_within(self.kind(), "client_key", self.limit, call)
            .await
    }

    async fn ensure_client_key(
        &self,
        application_id: u64,
        first: &ClientKeyId,
    ) -> Result<Option<ClientKeyRow>, StorageError> {
        let call = self.inner.ensure_client_key(application_id, first);
        self.metrics
            .time_within(self.kind(), "ensure_client_key", self.limit, call)
            .await
    }

    async fn rotate_client_key(
        &self,
        application_id: u64,
        key_id: &ClientKeyId,
    ) -> Result<bool, StorageError> {
        let call = self.inner.rotate_client_key(application_id, key_id);
        self.metrics
            .time_within(self.kind(), "rotate_client_key", self.limit, call)
            .await
    }

    async fn client_keys_changed_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<ClientKeyRow>, StorageError> {
        let call = self.inner.client_keys_changed_since(since);
        self.metrics
            .time_within(self.kind(), "client_keys_changed_since", self.limit, call)
            .await
    }

    async fn client_token_secret(&self, candidate: &str) -> Result<String, StorageError> {
        let call = self.inner.client_token_secret(candidate);
        self.metrics
            .time_within(self.kind(), "client_token_secret", self.limit, call)
            .await
    }

    async fn find_chat(
        &self,
        application_id: u64,
        number: Number,
    ) -> Result<Option<ChatRow>, StorageError> {
        let call = self.inner.find_chat(application_id, number);
        self.metrics
            .time_within(self.kind(), "find_chat", self.limit, call)
            .await
    }

    async fn list_chats(
        &self,
        application_id: u64,
        page: PageRequest,
    ) -> Result<Vec<ChatRow>, StorageError> {
        let call = self.inner.list_chats(application_id, page);
        self.metrics
            .time_within(self.kind(), "list_chats", self.limit, call)
            .await
    }

    async fn find_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<MessageRow>, StorageError> {
        let call = self.inner.find_message(application_id, chat_number, number);
        self.metrics
            .time_within(self.kind(), "find_message", self.limit, call)
            .await
    }

    async fn list_messages(
        &self,
        application_id: u64,
        chat_number: Number,
        sender: Option<&Sender>,
        page: PageRequest,
    ) -> Result<Vec<MessageRow>, StorageError> {
        let call = self
            .inner
            .list_messages(application_id, chat_number, sender, page);
        self.metrics
            .time_within(self.kind(), "list_messages", self.limit, call)
            .await
    }

    async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        edit: &MessageEdit,
    ) -> Result<Option<ChangeRow>, StorageError> {
        let call = self
            .inner
            .update_message(application_id, chat_number, number, edit);
        self.metrics
            .time_within(self.kind(), "update_message", self.limit, call)
            .await
    }

    async fn message_deletion(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<ChangeRow>, StorageError> {
        let call = self
            .inner
            .message_deletion(application_id, chat_number, number);
        self.metrics
            .time_within(self.kind(), "message_deletion", self.limit, call)
            .await
    }

    async fn delete_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<ChangeRow>, StorageError> {
        let call = self
            .inner
            .delete_message(application_id, chat_number, number);
        self.metrics
            .time_within(self.kind(), "delete_message", self.limit, call)
            .await
    }

    async fn list_changes(
        &self,
        application_id: u64,
        chat_number: Number,
        selection: ChangeSelection,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ChangeRow>, StorageError> {
        let call = self
            .inner
            .list_changes(application_id, chat_number, selection, after, limit);
        self.metrics
            .time_within(self.kind(), "list_changes", self.limit, call)
            .await
    }

    async fn list_application_changes(
        &self,
        application_id: u64,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ApplicationChangeRow>, StorageError> {
        let call = self
            .inner
            .list_application_changes(application_id, after, limit);
        self.metrics
            .time_within(self.kind(), "list_application_changes", self.limit, call)
            .await
    }

    async fn delete_application(&self, application_id: u64) -> Result<bool, StorageError> {
        let call = self.inner.delete_application(application_id);
        self.metrics
            .time_within(self.kind(), "delete_application", self.limit, call)
            .await
    }

    /// Not bounded by the dependency timeout, like a batch write: an application's rows take as
    /// long as they take, in bounded statements.
    async fn purge_application(&self, application_id: u64) -> Result<u64, StorageError> {
        let call = self.inner.purge_application(application_id);
        self.metrics
            .time(self.kind(), "purge_application", call)
            .await
    }

    async fn applications_deleted_since(
        &self,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<u64>, StorageError> {
        let call = self.inner.applications_deleted_since(since, limit);
        self.metrics
            .time_within(self.kind(), "applications_deleted_since", self.limit, call)
            .await
    }

    /// Not bounded by the dependency timeout: a batch of the largest events legitimately takes
    /// longer, and a bound would retry it forever. The consumer retries its failures.
    async fn write_ingest_batch(
        &self,
        batch: &IngestBatch<'_>,
    ) -> Result<CreatedSequences, StorageError> {
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
            .time_within(self.kind(), "reserve_fresh_block", self.limit, call)
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
            .time_within(self.kind(), "extend_reservation", self.limit, call)
            .await
    }

    async fn reserved_until(&self, scope: &str) -> Result<Option<u64>, StorageError> {
        let call = self.inner.reserved_until(scope);
        self.metrics
            .time_within(self.kind(), "reserved_until", self.limit, call)
            .await
    }

    async fn raise_reservations(
        &self,
        highest: &[(String, u64)],
    ) -> Result<Vec<String>, StorageError> {
        let call = self.inner.raise_reservations(highest);
        self.metrics
            .time_within(self.kind(), "raise_reservations", self.limit, call)
            .await
    }
}
