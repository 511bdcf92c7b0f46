//! The use cases of the API, between the handlers and the adapters: handlers parse the request,
//! call one method here and render its answer; this layer resolves tokens, hands out numbers,
//! publishes events and reads the storage and the index, in domain terms only.

use std::sync::Arc;

use chatcore::adapters::Adapters;
use chatcore::changes::MessageChange;
use chatcore::config::{ApiConfig, Config};
use chatcore::domain::{
    ChatTitle, MessageBody, Metadata, Number, PageRequest, SearchRequest, Sender, TokenDigest,
};
use chatcore::events::{Event, EventPayload, TraceContext};
use chatcore::numbering::{NumberAllocator, Scope};
use chatcore::queue::EventQueue;
use chatcore::search::{MessageHit, SearchIndex};
use chatcore::state::SharedState;
use chatcore::store::{
    ApplicationChangeRow, ChangeRow, ChangeSelection, ChatKey, ChatRow, MessageEdit, MessageRow,
    Storage,
};
use quick_cache::sync::Cache;

mod applications;
pub mod client_tokens;
mod error;
mod idempotency;
mod quotas;
mod tokens;
pub mod webhooks;

pub use error::AppError;

use tokens::{CachedGrant, TOKEN_CACHE_ENTRIES};

/// Entries of the cache of chats known to exist (a chat goes only with its application, whose
/// tokens go first: nobody asks for it after that).
const CHAT_CACHE_ENTRIES: usize = 500_000;

/// What a client gives a new chat besides asking for it.
#[derive(Debug, Default)]
pub struct NewChatDetails {
    pub title: Option<ChatTitle>,
    pub metadata: Option<Metadata>,
}

impl NewChatDetails {
    /// What an `Idempotency-Key` is bound to: empty without details, as before they existed, so a
    /// key first used then still matches its retry.
    fn fingerprint(&self) -> Vec<u8> {
        if self.title.is_none() && self.metadata.is_none() {
            return Vec::new();
        }
        let title = self.title.as_ref().map(ChatTitle::as_str);
        let metadata = self.metadata.as_ref().map(Metadata::as_str);
        serde_json::to_vec(&(title, metadata)).expect("strings serialize")
    }
}

/// A message as a client posts it.
#[derive(Debug)]
pub struct NewMessageInput {
    pub body: MessageBody,
    pub sender: Option<Sender>,
    pub metadata: Option<Metadata>,
}

impl NewMessageInput {
    /// What an `Idempotency-Key` is bound to: the body alone when there is nothing else, as
    /// before senders existed (a body never holds NUL, so the parts cannot run together).
    fn fingerprint(&self) -> Vec<u8> {
        let mut fingerprint = self.body.as_str().as_bytes().to_vec();
        if self.sender.is_some() || self.metadata.is_some() {
            for part in [
                self.sender.as_ref().map_or("", Sender::as_str),
                self.metadata.as_ref().map_or("", Metadata::as_str),
            ] {
                fingerprint.push(0);
                fingerprint.extend_from_slice(part.as_bytes());
            }
        }
        fingerprint
    }
}

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
        details: NewChatDetails,
        idempotency_key: Option<String>,
        trace: &TraceContext,
    ) -> Result<Number, AppError> {
        let scope = Scope::ChatsOf { application_id };
        let quota = self.settings.max_chats_per_application;
        // Counted by the numbers handed out (an upper bound of the chats): requests racing at the
        // edge may pass it by as many as run at once.
        if quota > 0 && self.allocator.handed_out_up_to(&scope).await? >= quota {
            return Err(AppError::ChatQuotaExceeded(quota));
        }
        let fingerprint = details.fingerprint();
        self.accept_once_per_key(
            idempotency_key,
            &scope,
            &fingerprint,
            trace,
            move |chat_number| EventPayload::ChatCreated {
                application_id,
                chat_number,
                created_at: chatcore::store::now(),
                title: details.title,
                metadata: details.metadata,
            },
        )
        .await
    }

    pub async fn list_chats(
        &self,
        application_id: u64,
        page: PageRequest,
    ) -> Result<Vec<ChatRow>, AppError> {
        Ok(self.storage.list_chats(application_id, page).await?)
    }

    pub async fn find_chat(
        &self,
        application_id: u64,
        number: Number,
    ) -> Result<ChatRow, AppError> {
        self.storage
            .find_chat(application_id, number)
            .await?
            .ok_or(AppError::NotFound("chat"))
    }

    /// Accepts a message: its number once the event is durable; written and indexed a moment
    /// later.
    pub async fn accept_message(
        self: Arc<Self>,
        application_id: u64,
        chat_number: Number,
        message: NewMessageInput,
        idempotency_key: Option<String>,
        trace: &TraceContext,
    ) -> Result<Number, AppError> {
        self.require_chat(application_id, chat_number).await?;
        self.count_message_against_quota(application_id).await?;
        let scope = Scope::MessagesOf {
            application_id,
            chat_number,
        };
        let fingerprint = message.fingerprint();
        self.accept_once_per_key(
            idempotency_key,
            &scope,
            &fingerprint,
            trace,
            move |message_number| EventPayload::MessageCreated {
                application_id,
                chat_number,
                message_number,
                body: message.body.into_string(),
                created_at: chatcore::store::now(),
                sender: message.sender,
                metadata: message.metadata,
            },
        )
        .await
    }

    pub async fn list_messages(
        &self,
        application_id: u64,
        chat_number: Number,
        sender: Option<&Sender>,
        page: PageRequest,
    ) -> Result<Vec<MessageRow>, AppError> {
        self.require_chat(application_id, chat_number).await?;
        Ok(self
            .storage
            .list_messages(application_id, chat_number, sender, page)
            .await?)
    }

    /// Up to `limit` changes of a chat's log after the sequence `after`, in sequence order.
    pub async fn list_changes(
        &self,
        application_id: u64,
        chat_number: Number,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ChangeRow>, AppError> {
        self.require_chat(application_id, chat_number).await?;
        self.changes_to_catch_up(
            application_id,
            chat_number,
            ChangeSelection::Every,
            after,
            limit,
        )
        .await
    }

    pub async fn find_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<MessageRow, AppError> {
        self.storage
            .find_message(application_id, chat_number, number)
            .await?
            .ok_or(AppError::NotFound("message"))
    }

    /// Replaces the body (and the metadata as asked) in the storage, then publishes the update for the index. If the event
    /// cannot be confirmed the index would lag, so the client is told (503) and a retried PUT
    /// brings the index up to date. A number handed out but not stored yet is
    /// [`AppError::NotPersistedYet`], so the client retries instead of losing its edit.
    pub async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        edit: &MessageEdit,
        trace: &TraceContext,
    ) -> Result<MessageRow, AppError> {
        let Some(change) = self
            .storage
            .update_message(application_id, chat_number, number, edit)
            .await?
        else {
            return Err(self
                .why_message_is_missing(application_id, chat_number, number)
                .await);
        };
        let row = &change.message;
        let event = Event::new(EventPayload::MessageUpdated {
            application_id,
            chat_number,
            message_number: number,
            body: row.body.clone(),
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
            sender: row.sender.clone(),
            metadata: row.metadata.clone(),
            edited_at: row.edited_at,
        });
        let announced = MessageChange::logged(application_id, chat_number, number, &change);
        self.publish_change(&event, announced, trace).await?;
        Ok(change.message)
    }

    /// Deletes a message: a tombstone in the storage (its number is never reused), then the
    /// event for the index and the live streams. Like an update, a message accepted but not
    /// stored yet is [`AppError::NotPersistedYet`]. If the event cannot be confirmed the client
    /// is told (503) although the deletion is stored, so deleting it again publishes the
    /// tombstone's deletion once more (the same change: its version and sequence) before the
    /// 404: a retried DELETE repairs the index like a retried PUT. Every tombstone's is
    /// republished, however old: the index and the streams skip a version or sequence they
    /// have, and the change log (what webhooks deliver) is not written again.
    pub async fn delete_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        trace: &TraceContext,
    ) -> Result<(), AppError> {
        if let Some(deletion) = self
            .storage
            .delete_message(application_id, chat_number, number)
            .await?
        {
            return self
                .publish_deletion(application_id, chat_number, number, &deletion, trace)
                .await;
        }
        let Some(deletion) = self
            .storage
            .message_deletion(application_id, chat_number, number)
            .await?
        else {
            return Err(self
                .why_message_is_missing(application_id, chat_number, number)
                .await);
        };
        self.publish_deletion(application_id, chat_number, number, &deletion, trace)
            .await?;
        Err(AppError::NotFound("message"))
    }

    /// Publishes a logged deletion: the event for the index, then the live streams' change.
    async fn publish_deletion(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        deletion: &ChangeRow,
        trace: &TraceContext,
    ) -> Result<(), AppError> {
        let row = &deletion.message;
        let event = Event::new(EventPayload::MessageDeleted {
            application_id,
            chat_number,
            message_number: number,
            version: row.version,
            created_at: row.created_at,
            deleted_at: row.updated_at,
        });
        let announced = MessageChange::logged(application_id, chat_number, number, deletion);
        self.publish_change(&event, announced, trace).await
    }

    /// Publishes the event of a change the api committed (for the index), then announces it to
    /// the live streams.
    async fn publish_change(
        &self,
        event: &Event,
        change: MessageChange,
        trace: &TraceContext,
    ) -> Result<(), AppError> {
        self.queue.publish(event, trace).await?;
        self.queue.announce(&[change]).await?;
        Ok(())
    }

    /// The chat a live stream follows: its application resolved, the chat known.
    pub async fn stream_target(
        &self,
        application_id: u64,
        chat_number: Number,
    ) -> Result<ChatKey, AppError> {
        self.require_chat(application_id, chat_number).await?;
        Ok((application_id, chat_number))
    }

    /// Up to `limit` changes of the application's feed (every chat's) after the place `after`.
    pub async fn list_application_changes(
        &self,
        application_id: u64,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ApplicationChangeRow>, AppError> {
        Ok(self
            .storage
            .list_application_changes(application_id, after, limit)
            .await?)
    }

    /// The sequence of a chat's latest logged change (0 for a chat not stored yet).
    pub async fn last_change_sequence(
        &self,
        application_id: u64,
        chat_number: Number,
    ) -> Result<u64, AppError> {
        Ok(self
            .storage
            .find_chat(application_id, chat_number)
            .await?
            .map_or(0, |chat| chat.last_change_sequence))
    }

    /// Changes of a chat's log after `after`, for a live stream catching up (its chat known).
    pub async fn changes_to_catch_up(
        &self,
        application_id: u64,
        chat_number: Number,
        selection: ChangeSelection,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ChangeRow>, AppError> {
        Ok(self
            .storage
            .list_changes(application_id, chat_number, selection, after, limit)
            .await?)
    }

    /// Messages of one chat in which every word of the query matches a word or a word prefix,
    /// kept to the request's filter, in its order.
    pub async fn search(
        &self,
        application_id: u64,
        chat_number: Number,
        request: &SearchRequest,
    ) -> Result<Vec<MessageHit>, AppError> {
        self.require_chat(application_id, chat_number).await?;
        Ok(self
            .search
            .search(application_id, chat_number, request)
            .await?)
    }

    /// Publishes the event of an accepted chat or message and returns its number. A chat is
    /// remembered once its event is durable, so messages can be posted to it before its row is
    /// written; failing to remember only delays that, so it does not fail the request.
    async fn publish_accepted(
        &self,
        event: &Event,
        trace: &TraceContext,
    ) -> Result<Number, AppError> {
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
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("an accepted event has no number")))
    }

    fn pending_chat_key(&self, application_id: u64, chat_number: Number) -> String {
        format!(
            "{}:pending-chat:{application_id}:{chat_number}",
            self.key_prefix
        )
    }

    /// Succeeds when the chat is stored or was accepted (202) recently and is still on its way.
    async fn require_chat(&self, application_id: u64, chat_number: Number) -> Result<(), AppError> {
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
        Err(AppError::NotFound("chat"))
    }

    /// Why a message to change is not in the storage: unknown chat, deleted (404), handed out
    /// but not stored yet (409, retry) or never handed out (404).
    async fn why_message_is_missing(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> AppError {
        if let Err(error) = self.require_chat(application_id, chat_number).await {
            return error;
        }
        match self
            .storage
            .message_deletion(application_id, chat_number, number)
            .await
        {
            Ok(Some(_)) => return AppError::NotFound("message"),
            Ok(None) => {}
            Err(error) => return error.into(),
        }
        let scope = Scope::MessagesOf {
            application_id,
            chat_number,
        };
        match self.allocator.handed_out_up_to(&scope).await {
            Ok(handed_out) if number.get() <= handed_out => AppError::NotPersistedYet(number.get()),
            Ok(_) => AppError::NotFound("message"),
            Err(error) => error.into(),
        }
    }
}
