//! Storage of applications, chats and messages, and the durable number reservations: one trait,
//! [`Storage`], with a MySQL adapter (the distributed stack) and a SQLite adapter (embedded).
//!
//! The rules live outside the adapters: what a batch of events writes is decided by the
//! ingest-worker ([`IngestBatch`]), how numbers are handed out by [`crate::numbering`]. An adapter
//! only turns those decisions into its SQL.

pub mod mysql;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound as _, Utc};

use crate::domain::{ApplicationName, ApplicationToken, MessageBody, Number, PageRequest};

pub use mysql::MySqlStorage;
pub use sqlite::SqliteStorage;

pub(crate) const APPLICATION_COLUMNS: &str = "id, token, name, chats_count, created_at, updated_at";
pub(crate) const MESSAGE_COLUMNS: &str = "m.number, m.body, m.version, m.created_at, m.updated_at";

/// Implements [`Storage`] for an adapter with `pool` and `metrics` fields: the reads are the same
/// SQL in MySQL and SQLite and are written here once; the adapter passes its kind (the label of
/// its metrics and readiness check) and the methods whose SQL differs. Integers are bound as i64,
/// which both drivers encode.
macro_rules! storage_impl {
    ($adapter:ty, $kind:literal, { $($dialect_methods:tt)* }) => {
        impl $adapter {
            /// Times a call as `chat_dependency_duration_seconds{dependency=<kind>}`.
            async fn timed<T>(
                &self,
                operation: &'static str,
                call: impl std::future::Future<Output = T>,
            ) -> T {
                self.metrics.time($kind, operation, call).await
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Storage for $adapter {
            fn kind(&self) -> &'static str {
                $kind
            }

            async fn ping(&self) -> Result<(), sqlx::Error> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map(|_| ())
            }

            async fn find_application(
                &self,
                token: &ApplicationToken,
            ) -> Result<Option<ApplicationRow>, sqlx::Error> {
                self.timed("find_application", async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM applications WHERE token = ?",
                        $crate::store::APPLICATION_COLUMNS
                    )))
                    .bind(token.as_str())
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn list_applications(
                &self,
                page: PageRequest,
            ) -> Result<Vec<ApplicationRow>, sqlx::Error> {
                self.timed("list_applications", async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM applications ORDER BY id LIMIT ? OFFSET ?",
                        $crate::store::APPLICATION_COLUMNS
                    )))
                    .bind(page.fetch_limit() as i64)
                    .bind(page.offset() as i64)
                    .fetch_all(&self.pool)
                    .await
                })
                .await
            }

            async fn application_id(&self, token: &ApplicationToken) -> Result<Option<u64>, sqlx::Error> {
                self.timed("application_id", async {
                    sqlx::query_scalar("SELECT id FROM applications WHERE token = ?")
                        .bind(token.as_str())
                        .fetch_optional(&self.pool)
                        .await
                })
                .await
            }

            async fn find_chat(
                &self,
                application_id: u64,
                number: Number,
            ) -> Result<Option<ChatRow>, sqlx::Error> {
                self.timed("find_chat", async {
                    sqlx::query_as(
                        "SELECT number, messages_count, created_at FROM chats \
                         WHERE application_id = ? AND number = ?",
                    )
                    .bind(application_id as i64)
                    .bind(number.get() as i64)
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn list_chats(
                &self,
                application_id: u64,
                page: PageRequest,
            ) -> Result<Vec<ChatRow>, sqlx::Error> {
                self.timed("list_chats", async {
                    sqlx::query_as(
                        "SELECT number, messages_count, created_at FROM chats WHERE application_id = ? \
                         ORDER BY number LIMIT ? OFFSET ?",
                    )
                    .bind(application_id as i64)
                    .bind(page.fetch_limit() as i64)
                    .bind(page.offset() as i64)
                    .fetch_all(&self.pool)
                    .await
                })
                .await
            }

            async fn find_message(
                &self,
                application_id: u64,
                chat_number: Number,
                number: Number,
            ) -> Result<Option<MessageRow>, sqlx::Error> {
                self.timed("find_message", async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM messages m JOIN chats c ON c.id = m.chat_id \
                         WHERE c.application_id = ? AND c.number = ? AND m.number = ?",
                        $crate::store::MESSAGE_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .bind(chat_number.get() as i64)
                    .bind(number.get() as i64)
                    .fetch_optional(&self.pool)
                    .await
                })
                .await
            }

            async fn list_messages(
                &self,
                application_id: u64,
                chat_number: Number,
                page: PageRequest,
            ) -> Result<Vec<MessageRow>, sqlx::Error> {
                self.timed("list_messages", async {
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT {} FROM messages m JOIN chats c ON c.id = m.chat_id \
                         WHERE c.application_id = ? AND c.number = ? ORDER BY m.number LIMIT ? OFFSET ?",
                        $crate::store::MESSAGE_COLUMNS
                    )))
                    .bind(application_id as i64)
                    .bind(chat_number.get() as i64)
                    .bind(page.fetch_limit() as i64)
                    .bind(page.offset() as i64)
                    .fetch_all(&self.pool)
                    .await
                })
                .await
            }

            async fn reserved_until(&self, scope: &str) -> Result<Option<u64>, sqlx::Error> {
                sqlx::query_scalar("SELECT reserved_until FROM number_reservations WHERE scope = ?")
                    .bind(scope)
                    .fetch_optional(&self.pool)
                    .await
            }

            $($dialect_methods)*
        }
    };
}
use storage_impl;

/// Timestamps are stored with millisecond precision, as the API shows them.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// Whether a database error is worth retrying (connection trouble, deadlock, lock wait timeout,
/// a busy SQLite file).
pub fn is_transient(error: &sqlx::Error) -> bool {
    const MYSQL_DEADLOCK: u16 = 1213;
    const MYSQL_LOCK_WAIT_TIMEOUT: u16 = 1205;
    match error {
        sqlx::Error::Database(database_error) => {
            if let Some(mysql) =
                database_error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            {
                return matches!(mysql.number(), MYSQL_DEADLOCK | MYSQL_LOCK_WAIT_TIMEOUT);
            }
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
            database_error
                .code()
                .and_then(|code| code.parse::<u32>().ok())
                .is_some_and(|code| matches!(code & 0xff, 5 | 6))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApplicationRow {
    pub id: u64,
    pub token: String,
    pub name: String,
    pub chats_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChatRow {
    pub number: u64,
    pub messages_count: u64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub number: u64,
    pub body: String,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A chat by its application's internal id and its number.
pub type ChatKey = (u64, Number);

pub struct NewMessage<'a> {
    pub number: Number,
    pub body: &'a str,
    pub created_at: DateTime<Utc>,
}

/// What one batch of accepted events writes: the chats that must exist (each with its earliest
/// creation time) and the messages to insert. Sorted maps give every transaction the same lock
/// order. Writing it is idempotent: rows that exist are skipped, and the counts grow by exactly
/// the rows that were new.
#[derive(Default)]
pub struct IngestBatch<'a> {
    pub chats: BTreeMap<ChatKey, DateTime<Utc>>,
    pub messages: BTreeMap<ChatKey, BTreeMap<Number, NewMessage<'a>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Not transient: the event can never be written.
    #[error("application {0} does not exist")]
    UnknownApplication(u64),
    #[error("chat {0}:{1} was not written")]
    ChatMissing(u64, Number),
}

impl IngestError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(error) => is_transient(error),
            Self::UnknownApplication(_) | Self::ChatMissing(..) => false,
        }
    }
}

/// The durable upper bound of the numbers handed out in one scope (see [`crate::numbering`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub reserved_until: u64,
    pub epoch: u64,
}

/// Every call is timed as `chat_dependency_duration_seconds{dependency=<kind>}` in a client span.
#[async_trait]
pub trait Storage: Send + Sync {
    /// "mysql" or "sqlite": the dependency label of metrics and readiness.
    fn kind(&self) -> &'static str;

    async fn ping(&self) -> Result<(), sqlx::Error>;

    async fn create_application(
        &self,
        name: &ApplicationName,
    ) -> Result<ApplicationRow, sqlx::Error>;

    /// None when there is no such application.
    async fn rename_application(
        &self,
        token: &ApplicationToken,
        name: &ApplicationName,
    ) -> Result<Option<ApplicationRow>, sqlx::Error>;

    async fn find_application(
        &self,
        token: &ApplicationToken,
    ) -> Result<Option<ApplicationRow>, sqlx::Error>;

    /// Applications in creation order; up to `page.fetch_limit()` rows.
    async fn list_applications(
        &self,
        page: PageRequest,
    ) -> Result<Vec<ApplicationRow>, sqlx::Error>;

    async fn application_id(&self, token: &ApplicationToken) -> Result<Option<u64>, sqlx::Error>;

    async fn find_chat(
        &self,
        application_id: u64,
        number: Number,
    ) -> Result<Option<ChatRow>, sqlx::Error>;

    /// Chats by number; up to `page.fetch_limit()` rows.
    async fn list_chats(
        &self,
        application_id: u64,
        page: PageRequest,
    ) -> Result<Vec<ChatRow>, sqlx::Error>;

    async fn find_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<MessageRow>, sqlx::Error>;

    /// Messages by number; up to `page.fetch_limit()` rows.
    async fn list_messages(
        &self,
        application_id: u64,
        chat_number: Number,
        page: PageRequest,
    ) -> Result<Vec<MessageRow>, sqlx::Error>;

    /// Replaces the body and bumps the version; None when the message is not stored.
    async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        body: &MessageBody,
    ) -> Result<Option<MessageRow>, sqlx::Error>;

    /// Writes a batch in one transaction (see [`IngestBatch`]).
    async fn write_ingest_batch(&self, batch: &IngestBatch<'_>) -> Result<(), IngestError>;

    /// Reserves a fresh block of `block_size` numbers above every earlier reservation of the
    /// scope, under a new epoch.
    async fn reserve_fresh_block(
        &self,
        scope: &str,
        block_size: u64,
    ) -> Result<Reservation, sqlx::Error>;

    /// Raises the reservation so that it covers `number` (and the rest of a block), provided the
    /// scope is still at `epoch`. Returns the new ceiling, or None when the epoch moved on.
    async fn extend_reservation(
        &self,
        scope: &str,
        number: u64,
        epoch: u64,
        block_size: u64,
    ) -> Result<Option<u64>, sqlx::Error>;

    async fn reserved_until(&self, scope: &str) -> Result<Option<u64>, sqlx::Error>;

    /// Raises each reservation to at least its number; returns the scopes that were behind.
    async fn raise_reservations(
        &self,
        highest: &[(String, u64)],
    ) -> Result<Vec<String>, sqlx::Error>;
}
