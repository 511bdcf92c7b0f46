//! Storage of applications, chats and messages, and the durable number reservations: one trait,
//! [`Storage`], with a MySQL adapter (the distributed stack) and a SQLite adapter (embedded).
//!
//! The rules live outside the adapters: what a batch of events writes is decided by the
//! ingest-worker ([`IngestBatch`]), how numbers are handed out by [`crate::numbering`]. An adapter
//! only turns those decisions into its SQL.

mod change_log;
pub mod mysql;
mod shared_sql;
mod sqlite;
mod timed;
mod webhooks;

use std::collections::BTreeMap;
use std::future::Future;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound as _, Utc};

use crate::domain::Scope;
use crate::domain::{
    ApplicationName, ApplicationToken, ChatTitle, ClientKeyId, MessageBody, Metadata, Number,
    PageRequest, Sender, TokenDigest,
};
use crate::retry::Transient;

pub use change_log::{
    ApplicationChangeRow, ChangeKind, ChangeRow, ChangeSelection, CreatedSequences,
};
pub use mysql::MySqlStorage;
pub use sqlite::SqliteStorage;
pub use timed::TimedStorage;
pub use webhooks::{
    AttemptRow, DeliveryProgress, EndpointChanges, EndpointRow, NewAttempt, NewEndpoint,
    WebhookStore,
};

pub(crate) const APPLICATION_COLUMNS: &str =
    "id, token_hint, name, chats_count, created_at, updated_at";
pub(crate) const MESSAGE_COLUMNS: &str =
    "m.number, m.body, m.version, m.created_at, m.updated_at, m.sender, m.metadata, m.edited_at";
/// A message as a logged change left it, read from `message_changes mc` as a [`MessageRow`].
pub(crate) const CHANGED_MESSAGE_COLUMNS: &str = "mc.number, mc.body, mc.version, \
     mc.message_created_at AS created_at, mc.occurred_at AS updated_at, mc.sender, mc.metadata, \
     mc.edited_at";
pub(crate) const CHAT_COLUMNS: &str =
    "number, messages_count, created_at, last_change_sequence, title, metadata";

/// Rows one statement of a purge removes at most: a bounded lock and undo log per statement.
pub const PURGE_ROWS_PER_STATEMENT: u32 = 5_000;

/// Timestamps are stored with millisecond precision, as the API shows them.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// The migrations of `migrator` older than `version`: a database as an earlier release left it,
/// to test what a newer migration does to its rows.
pub fn migrations_before(
    migrator: &sqlx::migrate::Migrator,
    version: i64,
) -> sqlx::migrate::Migrator {
    sqlx::migrate::Migrator {
        migrations: migrator
            .migrations
            .iter()
            .filter(|migration| migration.version < version)
            .cloned()
            .collect(),
        ..sqlx::migrate::Migrator::DEFAULT
    }
}

/// Runs a block of statements; the driver's errors become [`StorageError`]s.
async fn with_storage_errors<T, E: Into<StorageError>>(
    block: impl Future<Output = Result<T, E>>,
) -> Result<T, StorageError> {
    block.await.map_err(Into::into)
}

/// `ASC`, or `DESC` for a `before` page (the api puts its rows back in ascending order).
pub(crate) fn direction(page: PageRequest) -> &'static str {
    if page.descending() { "DESC" } else { "ASC" }
}

/// What went wrong in the storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    TimedOut(#[from] crate::retry::DependencyTimedOut),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Not transient: the event can never be written.
    #[error("application {0} does not exist")]
    UnknownApplication(u64),
    #[error("chat {0}:{1} was not written")]
    ChatMissing(u64, Number),
    #[error("migrations: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Chats and messages whose number is stored under another event: each was handed out twice.
    /// None of them can ever be written (the batch wrote nothing); they are dead-lettered, not
    /// dropped.
    #[error("{}", joined(.0))]
    NumberConflicts(Vec<NumberConflict>),
}

impl Transient for StorageError {
    fn is_transient(&self) -> bool {
        match self {
            Self::TimedOut(_) => true,
            Self::Database(error) => crate::sql_errors::is_transient(error),
            Self::UnknownApplication(_)
            | Self::ChatMissing(..)
            | Self::Migration(_)
            | Self::NumberConflicts(_) => false,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApplicationRow {
    pub id: u64,
    /// The prefix and last 4 characters of the newest token: all the database knows of it.
    pub token_hint: String,
    pub name: String,
    pub chats_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a valid token grants: its application, until when (None: until it is rotated).
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct TokenGrant {
    pub application_id: u64,
    pub expires_at: Option<DateTime<Utc>>,
}

/// An application's client-token key id, and when it last changed.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ClientKeyRow {
    pub application_id: u64,
    /// None before the application's first client token, and once it is deleted.
    pub key_id: Option<String>,
    pub rotated_at: Option<DateTime<Utc>>,
}

/// The columns of a [`ClientKeyRow`] in `applications`.
pub(crate) const CLIENT_KEY_COLUMNS: &str = "id AS application_id, client_token_key_id AS key_id, \
     client_token_key_rotated_at AS rotated_at";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChatRow {
    pub number: u64,
    pub messages_count: u64,
    pub created_at: DateTime<Utc>,
    /// The sequence of the chat's latest logged change (0 before its first).
    pub last_change_sequence: u64,
    pub title: Option<ChatTitle>,
    pub metadata: Option<Metadata>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub number: u64,
    pub body: String,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sender: Option<Sender>,
    pub metadata: Option<Metadata>,
    /// The moment of the first edit; None until then.
    pub edited_at: Option<DateTime<Utc>>,
}

/// A chat by its application's internal id and its number.
pub type ChatKey = (u64, Number);

pub struct NewMessage<'a> {
    /// The event that accepted the message: tells a redelivery from a number handed out twice.
    pub event_id: uuid::Uuid,
    pub number: Number,
    pub body: &'a str,
    pub sender: Option<&'a Sender>,
    pub metadata: Option<&'a Metadata>,
    pub created_at: DateTime<Utc>,
}

impl NewMessage<'_> {
    /// What the message adds to a statement: its body and metadata.
    pub fn bytes(&self) -> usize {
        self.body.len() + self.metadata.map_or(0, |metadata| metadata.as_str().len())
    }
}

/// A chat an ingest batch writes: from its own event (with what the client gave it), or from a
/// message that arrived before it (nothing but a creation time).
#[derive(Debug, Clone, Copy)]
pub struct NewChat<'a> {
    /// The chat's own event; None for a chat only written because a message of the batch refers
    /// to it (the message may arrive before its chat).
    pub event_id: Option<uuid::Uuid>,
    pub created_at: DateTime<Utc>,
    pub title: Option<&'a ChatTitle>,
    pub metadata: Option<&'a Metadata>,
}

/// What a batch's chat does to the row of its number that was stored already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoredChat {
    /// The row has no event id yet (a message came first): the chat's event gives it its id, and
    /// its title and metadata if it has none.
    Claim(uuid::Uuid),
    /// A redelivery, or a chat only referred to by a message: nothing to write.
    Unchanged,
    /// The number belongs to another chat event: it was handed out twice.
    TakenByAnotherEvent(uuid::Uuid),
}

impl NewChat<'_> {
    /// What this chat does to the stored row of its number, whose event id is `stored` (rows
    /// older than the event id column match anything).
    pub(crate) fn against(&self, stored: Option<&[u8]>) -> StoredChat {
        match (self.event_id, stored) {
            (None, _) => StoredChat::Unchanged,
            (Some(event_id), None) => StoredChat::Claim(event_id),
            (Some(event_id), Some(stored)) if stored != event_id.as_bytes() => {
                StoredChat::TakenByAnotherEvent(event_id)
            }
            (Some(_), Some(_)) => StoredChat::Unchanged,
        }
    }
}

/// A message's edit: a new body, and its metadata replaced, removed or kept.
#[derive(Debug, Clone)]
pub struct MessageEdit {
    pub body: MessageBody,
    pub metadata: MetadataEdit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataEdit {
    Keep,
    Replace(Metadata),
    Remove,
}

/// What one batch of accepted events writes: the chats that must exist (each with its earliest
/// creation time) and the messages to insert. Sorted maps give every transaction the same lock
/// order. Writing it is idempotent: rows that exist are skipped, and the counts grow by exactly
/// the rows that were new.
#[derive(Default)]
pub struct IngestBatch<'a> {
    pub chats: BTreeMap<ChatKey, NewChat<'a>>,
    pub messages: BTreeMap<ChatKey, BTreeMap<Number, NewMessage<'a>>>,
}

/// The two levels whose children are counted and numbered (what counter-sync reconciles):
/// applications (their chats) and chats (their messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountLevel {
    Applications,
    Chats,
}

impl CountLevel {
    /// One page of [`CountFigures`] by id; binds the last id seen and the page size. The casts
    /// give MySQL's unsigned types (SQLite reads them as integers).
    fn figures_query(self) -> &'static str {
        match self {
            Self::Applications => {
                "SELECT a.id, a.id AS application_id, CAST(0 AS UNSIGNED) AS number, a.chats_count AS stored, \
                   (SELECT COUNT(*) FROM chats c WHERE c.application_id = a.id) AS actual, \
                   (SELECT CAST(COALESCE(MAX(number), 0) AS UNSIGNED) FROM chats c WHERE c.application_id = a.id) AS highest \
                 FROM applications a WHERE a.id > ? ORDER BY a.id LIMIT ?"
            }
            Self::Chats => {
                "SELECT c.id, c.application_id, c.number, c.messages_count AS stored, \
                   (SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.id AND m.deleted_at IS NULL) AS actual, \
                   (SELECT CAST(COALESCE(MAX(number), 0) AS UNSIGNED) FROM messages m WHERE m.chat_id = c.id) AS highest \
                 FROM chats c WHERE c.id > ? ORDER BY c.id LIMIT ?"
            }
        }
    }

    /// The recount statement (binds the id twice; the count is read under the row lock) and the
    /// read of the recounted value.
    fn recount_queries(self) -> (&'static str, &'static str) {
        match self {
            Self::Applications => (
                "UPDATE applications SET chats_count = (SELECT COUNT(*) FROM chats WHERE application_id = ?) WHERE id = ?",
                "SELECT chats_count FROM applications WHERE id = ?",
            ),
            Self::Chats => (
                "UPDATE chats SET messages_count = (SELECT COUNT(*) FROM messages WHERE chat_id = ? AND deleted_at IS NULL) WHERE id = ?",
                "SELECT messages_count FROM chats WHERE id = ?",
            ),
        }
    }
}

/// Which messages a reindex rebuilds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReindexScope {
    All,
    Application(u64),
    Chat(u64, Number),
    /// Messages edited (updated or deleted) at or after this moment: the reconciliation of
    /// counter-sync, where a `PUT` or `DELETE` whose event never reached the index is repaired by
    /// the next pass. Not the messages only created then (version 1): their events are durable in
    /// the queue, and rewriting every new message made each run after a large burst of writes
    /// re-read and re-index all of it.
    EditedSince(DateTime<Utc>),
}

enum ScopeBind {
    Id(u64),
    Time(DateTime<Utc>),
}

impl ReindexScope {
    /// The SQL condition (over `m` messages and `c` chats) and its binds.
    fn filter(self) -> (&'static str, Vec<ScopeBind>) {
        match self {
            Self::All => ("1 = 1", Vec::new()),
            Self::Application(id) => ("c.application_id = ?", vec![ScopeBind::Id(id)]),
            Self::Chat(id, number) => (
                "c.application_id = ? AND c.number = ?",
                vec![ScopeBind::Id(id), ScopeBind::Id(number.get())],
            ),
            Self::EditedSince(at) => (
                "m.updated_at >= ? AND m.version > 1",
                vec![ScopeBind::Time(at)],
            ),
        }
    }
}

/// Where a reindex goes on from: the last message written (internal chat id, number). Printed
/// with the progress, so an interrupted reindex resumes where it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReindexCursor {
    pub chat_id: u64,
    pub number: u64,
}

impl std::fmt::Display for ReindexCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.chat_id, self.number)
    }
}

impl std::str::FromStr for ReindexCursor {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (chat_id, number) = raw
            .split_once(':')
            .ok_or_else(|| format!("{raw:?} is not CHAT_ID:NUMBER"))?;
        let parse = |part: &str| {
            part.parse::<u64>()
                .map_err(|error| format!("{raw:?}: {error}"))
        };
        Ok(Self {
            chat_id: parse(chat_id)?,
            number: parse(number)?,
        })
    }
}

/// A stored message as the search index needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageToIndex {
    pub chat_id: u64,
    pub application_id: u64,
    pub chat_number: u64,
    pub number: u64,
    pub body: String,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub sender: Option<Sender>,
    pub metadata: Option<Metadata>,
    pub edited_at: Option<DateTime<Utc>>,
}

impl MessageToIndex {
    pub fn cursor(&self) -> ReindexCursor {
        ReindexCursor {
            chat_id: self.chat_id,
            number: self.number,
        }
    }
}

/// One application or chat as counter-sync checks it: the stored count of its children, the
/// actual count, and the highest child number persisted. `number` is 0 for an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct CountFigures {
    pub id: u64,
    pub application_id: u64,
    pub number: u64,
    pub stored: u64,
    pub actual: i64,
    pub highest: u64,
}

/// An event (a chat's or a message's) whose number belongs to another event: the number was
/// handed out twice (only possible if the counter of its scope went back in time past the
/// numbering guard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberConflict {
    /// Where the number was handed out: the chats of an application, or the messages of a chat.
    pub scope: Scope,
    pub number: Number,
    pub event_id: uuid::Uuid,
    /// The highest number of the scope stored (or, for two events of one batch, written with the
    /// batch): its counter must go above it to stop handing out taken numbers.
    pub highest: u64,
}

impl std::fmt::Display for NumberConflict {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            number, event_id, ..
        } = self;
        match self.scope {
            Scope::ChatsOf { application_id } => write!(
                formatter,
                "chat number {number} of application {application_id} already belongs to another event (event {event_id})"
            ),
            Scope::MessagesOf {
                application_id,
                chat_number,
            } => write!(
                formatter,
                "message number {number} of chat {application_id}:{chat_number} already belongs to another event (event {event_id})"
            ),
        }
    }
}

impl std::error::Error for NumberConflict {}

fn joined(conflicts: &[NumberConflict]) -> String {
    let each: Vec<String> = conflicts.iter().map(ToString::to_string).collect();
    each.join("; ")
}

/// The number and event id of each message among `messages` whose number is stored with another
/// event id (`stored`: the number and event id of rows that were there already; rows older than
/// the event id column match anything).
pub(crate) fn taken_by_other_events<'a>(
    messages: impl IntoIterator<Item = &'a NewMessage<'a>>,
    stored: &[(u64, Option<Vec<u8>>)],
) -> Vec<(Number, uuid::Uuid)> {
    messages
        .into_iter()
        .filter(|message| {
            stored.iter().any(|(number, event_id)| {
                *number == message.number.get()
                    && event_id
                        .as_deref()
                        .is_some_and(|event_id| event_id != message.event_id.as_bytes())
            })
        })
        .map(|message| (message.number, message.event_id))
        .collect()
}

/// The durable upper bound of the numbers handed out in one scope (see [`crate::numbering`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub reserved_until: u64,
    pub epoch: u64,
}

/// Every call is timed by [`TimedStorage`], which the composition root wraps around the adapter.
#[async_trait]
pub trait Storage: Send + Sync {
    /// "mysql" or "sqlite": the dependency label of metrics and readiness.
    fn kind(&self) -> &'static str;

    /// The webhook endpoints and attempts, in the same database.
    fn webhooks(&self) -> &dyn WebhookStore;

    async fn ping(&self) -> Result<(), StorageError>;

    /// Applies the schema migrations that are missing (once per deploy, not by every replica).
    async fn migrate(&self) -> Result<(), StorageError>;

    /// Creates an application whose key is `token` (only its digest is stored).
    async fn create_application(
        &self,
        name: &ApplicationName,
        token: &ApplicationToken,
    ) -> Result<ApplicationRow, StorageError>;

    /// None when there is no such application.
    async fn rename_application(
        &self,
        application_id: u64,
        name: &ApplicationName,
    ) -> Result<Option<ApplicationRow>, StorageError>;

    async fn find_application(
        &self,
        application_id: u64,
    ) -> Result<Option<ApplicationRow>, StorageError>;

    /// Applications in creation order (keyed by id); up to `page.fetch_limit()` rows, descending
    /// for a `before` page.
    async fn list_applications(
        &self,
        page: PageRequest,
    ) -> Result<Vec<ApplicationRow>, StorageError>;

    /// The application a token of this digest opens, unless the token expired or is unknown.
    async fn resolve_token(&self, digest: &TokenDigest)
    -> Result<Option<TokenGrant>, StorageError>;

    /// Adds `token` to the application; its other tokens stay valid until `others_valid_until`
    /// (a rotation's overlap), or end now when None (a revocation). False for no such application.
    async fn replace_tokens(
        &self,
        application_id: u64,
        token: &ApplicationToken,
        others_valid_until: Option<DateTime<Utc>>,
    ) -> Result<bool, StorageError>;

    /// The application's client-token key id; None for an unknown application.
    async fn client_key(&self, application_id: u64) -> Result<Option<ClientKeyRow>, StorageError>;

    /// The application's client-token key id, `first` if it had none; None for an unknown or
    /// deleted application.
    async fn ensure_client_key(
        &self,
        application_id: u64,
        first: &ClientKeyId,
    ) -> Result<Option<ClientKeyRow>, StorageError>;

    /// Replaces the application's client-token key id (every token of the old one ends). False
    /// for an unknown or deleted application.
    async fn rotate_client_key(
        &self,
        application_id: u64,
        key_id: &ClientKeyId,
    ) -> Result<bool, StorageError>;

    /// The client-token key ids that changed at or after `since` (a deletion clears one).
    async fn client_keys_changed_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<ClientKeyRow>, StorageError>;

    /// The secret the client-token keys derive from when the operator sets none: `candidate`,
    /// unless a secret was stored before (by any replica), which is then returned.
    async fn client_token_secret(&self, candidate: &str) -> Result<String, StorageError>;

    async fn find_chat(
        &self,
        application_id: u64,
        number: Number,
    ) -> Result<Option<ChatRow>, StorageError>;

    /// Chats by number; up to `page.fetch_limit()` rows, descending for a `before` page.
    async fn list_chats(
        &self,
        application_id: u64,
        page: PageRequest,
    ) -> Result<Vec<ChatRow>, StorageError>;

    async fn find_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<MessageRow>, StorageError>;

    /// The logged change that deleted the message (its tombstone's version and deletion time);
    /// None when the message is not deleted.
    async fn message_deletion(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<ChangeRow>, StorageError>;

    /// Messages by number, of one sender when `sender` is given; up to `page.fetch_limit()` rows,
    /// descending for a `before` page.
    async fn list_messages(
        &self,
        application_id: u64,
        chat_number: Number,
        sender: Option<&Sender>,
        page: PageRequest,
    ) -> Result<Vec<MessageRow>, StorageError>;

    /// Replaces the body (and the metadata as the edit says), bumps the version and sets
    /// `edited_at` unless an earlier edit did; None when the message is not stored (or deleted).
    async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        edit: &MessageEdit,
    ) -> Result<Option<ChangeRow>, StorageError>;

    /// Deletes the message: it stays as a tombstone (body cleared, version bumped, `updated_at`
    /// the moment of deletion) so its number is never reused and a late event of it is skipped;
    /// its chat's count drops by one. None when it is not stored or already deleted.
    async fn delete_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<ChangeRow>, StorageError>;

    /// Up to `limit` changes of a chat's log after the sequence `after`, in sequence order.
    async fn list_changes(
        &self,
        application_id: u64,
        chat_number: Number,
        selection: ChangeSelection,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ChangeRow>, StorageError>;

    /// Up to `limit` changes of an application's feed (every chat's changes, each with its chat)
    /// after the application sequence `after`, in that sequence's order.
    async fn list_application_changes(
        &self,
        application_id: u64,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ApplicationChangeRow>, StorageError>;

    /// Deletes the application: it stays as a tombstone (name cleared, `deleted_at` set), so its
    /// id is never handed out again and a late event of it is dropped; its tokens end now. Its
    /// chats and messages stay until [`Storage::purge_application`]. False when there is no such
    /// application, or it is deleted already.
    async fn delete_application(&self, application_id: u64) -> Result<bool, StorageError>;

    /// Removes the chats, messages and number reservations of a deleted application, in
    /// statements of [`PURGE_ROWS_PER_STATEMENT`] rows; returns how many chats and messages went.
    /// Nothing for an application that is not deleted.
    async fn purge_application(&self, application_id: u64) -> Result<u64, StorageError>;

    /// Up to `limit` applications deleted at or after `since`, oldest deletion first.
    async fn applications_deleted_since(
        &self,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<u64>, StorageError>;

    /// Writes a batch in one transaction (see [`IngestBatch`]), logging each new message's
    /// created change with its chat's next sequence; the chats and messages of deleted
    /// applications are left out.
    async fn write_ingest_batch(
        &self,
        batch: &IngestBatch<'_>,
    ) -> Result<CreatedSequences, StorageError>;

    /// Up to `limit` applications or chats with an id above `after_id`, by id.
    async fn count_figures(
        &self,
        level: CountLevel,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<CountFigures>, StorageError>;

    /// Up to `limit` messages of `scope` after `after`, in (chat, number) order.
    async fn messages_to_index(
        &self,
        scope: ReindexScope,
        after: ReindexCursor,
        limit: u32,
    ) -> Result<Vec<MessageToIndex>, StorageError>;

    /// Recomputes the stored count of one application or chat; returns it.
    async fn recount(&self, level: CountLevel, id: u64) -> Result<u64, StorageError>;

    /// Reserves a fresh block of `block_size` numbers above every earlier reservation of the
    /// scope, under a new epoch.
    async fn reserve_fresh_block(
        &self,
        scope: &str,
        block_size: u64,
    ) -> Result<Reservation, StorageError>;

    /// Raises the reservation so that it covers `number` (and the rest of a block), provided the
    /// scope is still at `epoch`. Returns the new ceiling, or None when the epoch moved on.
    async fn extend_reservation(
        &self,
        scope: &str,
        number: u64,
        epoch: u64,
        block_size: u64,
    ) -> Result<Option<u64>, StorageError>;

    async fn reserved_until(&self, scope: &str) -> Result<Option<u64>, StorageError>;

    /// Raises each reservation to at least its number; returns the scopes that were behind.
    async fn raise_reservations(
        &self,
        highest: &[(String, u64)],
    ) -> Result<Vec<String>, StorageError>;
}
