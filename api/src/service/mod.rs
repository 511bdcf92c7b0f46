//! The use cases of the API, between the handlers and the adapters: handlers parse the request,
//! call one method here and render its answer; this layer resolves tokens, hands out numbers,
//! publishes events and reads the storage and the index, in domain terms only.

use std::sync::Arc;

use chatcore::adapters::Adapters;
use chatcore::changes::{ChangeKind, MessageChange};
use chatcore::config::{ApiConfig, Config};
use chatcore::domain::{MessageBody, Number, PageRequest, SearchQuery, TokenDigest};
use chatcore::events::{Event, EventPayload, TraceContext};
use chatcore::numbering::{NumberAllocator, Scope};
use chatcore::queue::EventQueue;
use chatcore::search::{MessageHit, SearchIndex};
use chatcore::state::SharedState;
use chatcore::store::{ChatKey, ChatRow, MessageRow, Storage};
use quick_cache::sync::Cache;
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::idempotency::{IdempotencyKey, Recorded, fingerprint};

mod applications;
mod quotas;
mod tokens;

use tokens::{CachedGrant, TOKEN_CACHE_ENTRIES};

/// Writes of the record of an accepted event before the request fails (see `allocate_and_publish`),
/// with a growing pause between them.
const ACCEPTED_RECORD_ATTEMPTS: u32 = 3;
const ACCEPTED_RECORD_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
/// The share of the idempotency lease the work of a claimed request may take.
const LEASE_SHARE: f64 = 0.9;
/// Entries of the cache of chats known to exist (a chat goes only with its application, whose
/// tokens go first: nobody asks for it after that).
const CHAT_CACHE_ENTRIES: usize = 500_000;

/// One dependency as `/readyz` reports it.
pub struct DependencyCheck {
    pub dependency: &'static str,
    pub up: bool,
    /// Whether the api can serve without it (no: not ready).
    pub required: bool,
}

pub struct ChatService {
    settings: ApiConfig,
    key_prefix: String,
    storage: Arc<dyn Storage>,
    state: Arc<dyn SharedState>,
    queue: Arc<dyn EventQueue>,
    search: Arc<dyn SearchIndex>,
    allocator: NumberAllocator,
    token_grants: Cache<TokenDigest, CachedGrant>,
    known_chats: Cache<(u64, Number), ()>,
}

impl ChatService {
    pub fn new(config: &Config, adapters: &Adapters) -> Self {
        Self {
            settings: config.api.clone(),
            key_prefix: config.redis_key_prefix.clone(),
            storage: Arc::clone(&adapters.storage),
            state: Arc::clone(&adapters.state),
            queue: Arc::clone(&adapters.queue),
            search: Arc::clone(&adapters.search),
            allocator: adapters.allocator.clone(),
            token_grants: Cache::new(TOKEN_CACHE_ENTRIES),
            known_chats: Cache::new(CHAT_CACHE_ENTRIES),
        }
    }

    /// Whether each dependency answers, by its kind, and whether it is needed to serve: search is
    /// needed by the search endpoint alone, so an unreachable index does not take the api out of
    /// service.
    pub async fn readiness(&self) -> [DependencyCheck; 4] {
        let (storage, counters, queue, search) = tokio::join!(
            self.storage.ping(),
            self.state.ping(),
            self.queue.is_ready(),
            self.search.ping(),
        );
        let check = |dependency, up, required| DependencyCheck {
            dependency,
            up,
            required,
        };
        [
            check(self.storage.kind(), storage.is_ok(), true),
            check(self.state.kind(), counters.is_ok(), true),
            check(self.queue.kind(), queue, true),
            check(self.search.kind(), search.is_ok(), false),
        ]
    }

    /// Accepts a chat: its number once the event is durable. Messages may be posted to it at
    /// once, before its row is written.
    pub async fn accept_chat(
        self: Arc<Self>,
        application_id: u64,
        idempotency_key: IdempotencyKey,
        trace: &TraceContext,
    ) -> Result<Number, ApiError> {
        let scope = Scope::ChatsOf { application_id };
        let quota = self.settings.max_chats_per_application;
        // Counted by the numbers handed out (an upper bound of the chats): requests racing at the
        // edge may pass it by as many as run at once.
        if quota > 0 && self.allocator.handed_out_up_to(&scope).await? >= quota {
            return Err(ApiError::ChatQuotaExceeded(quota));
        }
        self.accept_once_per_key(idempotency_key, &scope, b"", trace, move |chat_number| {
            EventPayload::ChatCreated {
                application_id,
                chat_number,
                created_at: chatcore::store::now(),
            }
        })
        .await
    }

    pub async fn list_chats(
        &self,
        application_id: u64,
        page: PageRequest,
    ) -> Result<Vec<ChatRow>, ApiError> {
        Ok(self.storage.list_chats(application_id, page).await?)
    }

    pub async fn find_chat(
        &self,
        application_id: u64,
        number: Number,
    ) -> Result<ChatRow, ApiError> {
        self.storage
            .find_chat(application_id, number)
            .await?
            .ok_or(ApiError::NotFound("chat"))
    }

    /// Accepts a message: its number once the event is durable; written and indexed a moment
    /// later.
    pub async fn accept_message(
        self: Arc<Self>,
        application_id: u64,
        chat_number: Number,
        body: MessageBody,
        idempotency_key: IdempotencyKey,
        trace: &TraceContext,
    ) -> Result<Number, ApiError> {
        self.require_chat(application_id, chat_number).await?;
        self.count_message_against_quota(application_id).await?;
        let scope = Scope::MessagesOf {
            application_id,
            chat_number,
        };
        let fingerprint = body.as_str().as_bytes().to_vec();
        self.accept_once_per_key(
            idempotency_key,
            &scope,
            &fingerprint,
            trace,
            move |message_number| EventPayload::MessageCreated {
                application_id,
                chat_number,
                message_number,
                body: body.into_string(),
                created_at: chatcore::store::now(),
            },
        )
        .await
    }

    pub async fn list_messages(
        &self,
        application_id: u64,
        chat_number: Number,
        page: PageRequest,
    ) -> Result<Vec<MessageRow>, ApiError> {
        self.require_chat(application_id, chat_number).await?;
        self.messages_to_catch_up(application_id, chat_number, page)
            .await
    }

    pub async fn find_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<MessageRow, ApiError> {
        self.storage
            .find_message(application_id, chat_number, number)
            .await?
            .ok_or(ApiError::NotFound("message"))
    }

    /// Replaces the body in the storage, then publishes the update for the index. If the event
    /// cannot be confirmed the index would lag, so the client is told (503) and a retried PUT
    /// brings the index up to date. A number handed out but not stored yet is
    /// [`ApiError::NotPersistedYet`], so the client retries instead of losing its edit.
    pub async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        body: &MessageBody,
        trace: &TraceContext,
    ) -> Result<MessageRow, ApiError> {
        let Some(row) = self
            .storage
            .update_message(application_id, chat_number, number, body)
            .await?
        else {
            return Err(self
                .why_message_is_missing(application_id, chat_number, number)
                .await);
        };
        let event = Event::new(EventPayload::MessageUpdated {
            application_id,
            chat_number,
            message_number: number,
            body: row.body.clone(),
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        });
        let change = MessageChange::of_row(
            ChangeKind::Updated,
            application_id,
            chat_number,
            number,
            &row,
        );
        self.publish_change(&event, change, trace).await?;
        Ok(row)
    }

    /// Deletes a message: a tombstone in the storage (its number is never reused), then the
    /// event for the index and the live streams. Like an update, a message accepted but not
    /// stored yet is [`ApiError::NotPersistedYet`]; deleting it again is 404. If the event cannot
    /// be confirmed the client is told (503): the deletion is stored, and the counter-sync pass
    /// re-indexes it (the messages updated lately include the deleted ones).
    pub async fn delete_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        trace: &TraceContext,
    ) -> Result<(), ApiError> {
        let Some(row) = self
            .storage
            .delete_message(application_id, chat_number, number)
            .await?
        else {
            return Err(self
                .why_message_is_missing(application_id, chat_number, number)
                .await);
        };
        let event = Event::new(EventPayload::MessageDeleted {
            application_id,
            chat_number,
            message_number: number,
            version: row.version,
            created_at: row.created_at,
            deleted_at: row.updated_at,
        });
        let change = MessageChange::of_row(
            ChangeKind::Deleted,
            application_id,
            chat_number,
            number,
            &row,
        );
        self.publish_change(&event, change, trace).await
    }

    /// Publishes the event of a change the api committed (for the index), then announces it to
    /// the live streams.
    async fn publish_change(
        &self,
        event: &Event,
        change: MessageChange,
        trace: &TraceContext,
    ) -> Result<(), ApiError> {
        self.queue.publish(event, trace).await?;
        self.queue.announce(&[change]).await?;
        Ok(())
    }

    /// The chat a live stream follows: its application resolved, the chat known.
    pub async fn stream_target(
        &self,
        application_id: u64,
        chat_number: Number,
    ) -> Result<ChatKey, ApiError> {
        self.require_chat(application_id, chat_number).await?;
        Ok((application_id, chat_number))
    }

    /// Stored messages of a chat by its internal key (a live stream catching up).
    pub async fn messages_to_catch_up(
        &self,
        application_id: u64,
        chat_number: Number,
        page: PageRequest,
    ) -> Result<Vec<MessageRow>, ApiError> {
        Ok(self
            .storage
            .list_messages(application_id, chat_number, page)
            .await?)
    }

    /// Messages of one chat in which every word of the query matches a word or a word prefix.
    pub async fn search(
        &self,
        application_id: u64,
        chat_number: Number,
        query: &SearchQuery,
        page: PageRequest,
    ) -> Result<Vec<MessageHit>, ApiError> {
        self.require_chat(application_id, chat_number).await?;
        Ok(self
            .search
            .search(application_id, chat_number, query, page)
            .await?)
    }

    /// Hands out the next number of the scope and publishes the event that carries it, once per
    /// idempotency key (see [`crate::idempotency`]).
    async fn accept_once_per_key(
        self: Arc<Self>,
        idempotency_key: IdempotencyKey,
        scope: &Scope,
        body: &[u8],
        trace: &TraceContext,
        payload: impl FnOnce(Number) -> EventPayload + Send + 'static,
    ) -> Result<Number, ApiError> {
        let Some(key) = idempotency_key.0 else {
            let number = self.allocator.allocate(scope).await?;
            return self
                .publish_accepted(&Event::new(payload(number)), trace)
                .await;
        };
        let record_key = format!("{}:idempotency:{}:{key}", self.key_prefix, scope.id());
        let fingerprint = fingerprint(body);
        let claim = Recorded::Claimed {
            fingerprint: fingerprint.clone(),
        };
        let claimed = self
            .state
            .set_if_absent(
                &record_key,
                &claim.encode(),
                self.settings.idempotency_lease,
            )
            .await?;
        if !claimed {
            let recorded = self.state.get(&record_key).await?;
            return match recorded.as_deref().and_then(Recorded::parse) {
                Some(recorded) if recorded.fingerprint() != fingerprint => {
                    Err(ApiError::IdempotencyKeyReused)
                }
                Some(Recorded::Done { number, .. }) => Ok(number),
                // Maybe durable, maybe not: the same event again.
                Some(Recorded::Accepted { event, .. }) => {
                    self.publish_recorded(&record_key, fingerprint, &event, trace)
                        .await
                }
                // Claimed by a request still running (or one that died: the lease runs out), or
                // expired between the claim and the read.
                Some(Recorded::Claimed { .. }) | None => Err(ApiError::IdempotencyKeyInUse),
            };
        }
        // The claim is ours: the rest runs to its end in a task of its own, even when the request
        // is cancelled meanwhile (its timeout, a dropped connection). Cut off between the
        // allocation and the record of the event, the number would be lost, and the client's
        // retry with the same key would get the next one: a number skipped.
        let (service, scope, trace) = (Arc::clone(&self), *scope, trace.clone());
        let completion = async move {
            service
                .allocate_and_publish(&record_key, fingerprint, &scope, &trace, payload)
                .await
        };
        // Bounded by the claim's lease: past it, a retry may claim the key anew and must not
        // race with this one.
        let lease = self.settings.idempotency_lease;
        let completion = tokio::time::timeout(lease.mul_f64(LEASE_SHARE), completion);
        tokio::spawn(completion.in_current_span())
            .await
            .map_err(|error| ApiError::Internal(error.into()))?
            .map_err(|_elapsed| ApiError::TimedOut(lease.as_millis()))?
    }

    /// For a claimed idempotency key: allocates the number, records the event under the key, then
    /// publishes it (see [`Self::publish_recorded`]).
    async fn allocate_and_publish(
        &self,
        record_key: &str,
        fingerprint: String,
        scope: &Scope,
        trace: &TraceContext,
        payload: impl FnOnce(Number) -> EventPayload,
    ) -> Result<Number, ApiError> {
        let number = match self.allocator.allocate(scope).await {
            Ok(number) => number,
            Err(error) => {
                // Nothing was handed out: the client may retry with the same key at once.
                if let Err(release) = self.state.delete(record_key).await {
                    tracing::warn!(error = %release, "could not release an idempotency key");
                }
                return Err(error.into());
            }
        };
        let event = Event::new(payload(number));
        let accepted = Recorded::Accepted {
            fingerprint: fingerprint.clone(),
            event: event.clone(),
        }
        .encode();
        // The number is handed out: without its record the client's retry would get another one,
        // so a failed write (a timeout of an overloaded Redis) is tried again.
        let mut attempt = 1;
        while let Err(error) = self
            .state
            .set(record_key, &accepted, self.settings.idempotency_ttl)
            .await
        {
            if attempt == ACCEPTED_RECORD_ATTEMPTS {
                return Err(error.into());
            }
            tracing::warn!(%error, attempt, "could not record an accepted event, retrying");
            tokio::time::sleep(ACCEPTED_RECORD_RETRY_PAUSE * attempt).await;
            attempt += 1;
        }
        self.publish_recorded(record_key, fingerprint, &event, trace)
            .await
    }

    /// Publishes an event recorded for an idempotency key, then records its number as done. A
    /// failed publish leaves the record as it is, for the retry.
    async fn publish_recorded(
        &self,
        record_key: &str,
        fingerprint: String,
        event: &Event,
        trace: &TraceContext,
    ) -> Result<Number, ApiError> {
        let number = self.publish_accepted(event, trace).await?;
        let done = Recorded::Done {
            fingerprint,
            number,
        };
        self.state
            .set(record_key, &done.encode(), self.settings.idempotency_ttl)
            .await?;
        Ok(number)
    }

    /// Publishes the event of an accepted chat or message and returns its number. A chat is
    /// remembered once its event is durable, so messages can be posted to it before its row is
    /// written; failing to remember only delays that, so it does not fail the request.
    async fn publish_accepted(
        &self,
        event: &Event,
        trace: &TraceContext,
    ) -> Result<Number, ApiError> {
        self.queue.publish(event, trace).await?;
        if let EventPayload::ChatCreated {
            application_id,
            chat_number,
            ..
        } = event.payload
        {
            let remembered = self
                .state
                .set(
                    &self.pending_chat_key(application_id, chat_number),
                    "1",
                    self.settings.pending_chat_ttl,
                )
                .await;
            if let Err(error) = remembered {
                tracing::warn!(%error, application_id, %chat_number, "could not mark the accepted chat as pending");
            }
        }
        event
            .number()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("an accepted event has no number")))
    }

    fn pending_chat_key(&self, application_id: u64, chat_number: Number) -> String {
        format!(
            "{}:pending-chat:{application_id}:{chat_number}",
            self.key_prefix
        )
    }

    /// Succeeds when the chat is stored or was accepted (202) recently and is still on its way.
    async fn require_chat(&self, application_id: u64, chat_number: Number) -> Result<(), ApiError> {
        let key = (application_id, chat_number);
        if self.known_chats.get(&key).is_some() {
            return Ok(());
        }
        if self
            .storage
            .find_chat(application_id, chat_number)
            .await?
            .is_some()
        {
            self.known_chats.insert(key, ());
            return Ok(());
        }
        let pending = self
            .state
            .get(&self.pending_chat_key(application_id, chat_number))
            .await?;
        if pending.is_some() {
            return Ok(());
        }
        Err(ApiError::NotFound("chat"))
    }

    /// Why a message to change is not in the storage: unknown chat, deleted (404), handed out
    /// but not stored yet (409, retry) or never handed out (404).
    async fn why_message_is_missing(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> ApiError {
        if let Err(error) = self.require_chat(application_id, chat_number).await {
            return error;
        }
        match self
            .storage
            .message_deleted(application_id, chat_number, number)
            .await
        {
            Ok(true) => return ApiError::NotFound("message"),
            Ok(false) => {}
            Err(error) => return error.into(),
        }
        let scope = Scope::MessagesOf {
            application_id,
            chat_number,
        };
        match self.allocator.handed_out_up_to(&scope).await {
            Ok(handed_out) if number.get() <= handed_out => ApiError::NotPersistedYet(number.get()),
            Ok(_) => ApiError::NotFound("message"),
            Err(error) => error.into(),
        }
    }
}
