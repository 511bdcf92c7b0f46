//! MySQL: connection pool, migrations, and the reads and synchronous writes of the API.

use std::future::Future;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, MySqlPool, Row as _};

use crate::config::SecretUrl;
use crate::domain::{ApplicationName, ApplicationToken, MessageBody, Number, PageRequest};
use crate::metrics::Metrics;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

pub async fn connect(url: &SecretUrl, max_connections: u32) -> Result<MySqlPool, sqlx::Error> {
    let options = MySqlConnectOptions::from_str(url.expose())?
        .charset("utf8mb4")
        .timezone(Some(String::from("+00:00")));
    MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}

/// Applies pending migrations; run once per deploy (`api migrate`), not by every replica.
pub async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Timestamps are stored with millisecond precision, as the API shows them.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// Whether a database error is worth retrying (connection trouble, deadlock, lock wait timeout).
pub fn is_transient(error: &sqlx::Error) -> bool {
    const DEADLOCK: u16 = 1213;
    const LOCK_WAIT_TIMEOUT: u16 = 1205;
    match error {
        sqlx::Error::Database(database_error) => database_error
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|mysql| matches!(mysql.number(), DEADLOCK | LOCK_WAIT_TIMEOUT)),
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

/// Every call is timed as `chat_dependency_duration_seconds{dependency="mysql"}` in a client span.
#[derive(Clone)]
pub struct Store {
    pool: MySqlPool,
    metrics: Arc<Metrics>,
}

const APPLICATION_COLUMNS: &str = "id, token, name, chats_count, created_at, updated_at";
const MESSAGE_COLUMNS: &str = "m.number, m.body, m.version, m.created_at, m.updated_at";

impl Store {
    pub fn new(pool: MySqlPool, metrics: Arc<Metrics>) -> Self {
        Self { pool, metrics }
    }

    async fn timed<T>(&self, operation: &'static str, call: impl Future<Output = T>) -> T {
        self.metrics.time("mysql", operation, call).await
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    pub async fn create_application(
        &self,
        name: &ApplicationName,
    ) -> Result<ApplicationRow, sqlx::Error> {
        self.timed("create_application", async {
            let token = ApplicationToken::generate();
            let created_at = now();
            let id = sqlx::query("INSERT INTO applications (token, name, chats_count, created_at, updated_at) VALUES (?, ?, 0, ?, ?)")
                .bind(token.as_str())
                .bind(name.as_str())
                .bind(created_at)
                .bind(created_at)
                .execute(&self.pool)
                .await?
                .last_insert_id();
            Ok(ApplicationRow {
                id,
                token: token.to_string(),
                name: name.as_str().to_owned(),
                chats_count: 0,
                created_at,
                updated_at: created_at,
            })
        })
        .await
    }

    pub async fn rename_application(
        &self,
        token: &ApplicationToken,
        name: &ApplicationName,
    ) -> Result<Option<ApplicationRow>, sqlx::Error> {
        self.timed("rename_application", async {
            sqlx::query("UPDATE applications SET name = ?, updated_at = ? WHERE token = ?")
                .bind(name.as_str())
                .bind(now())
                .bind(token.as_str())
                .execute(&self.pool)
                .await?;
            // Zero affected rows means either no such token or an unchanged name: the read decides.
            self.find_application(token).await
        })
        .await
    }

    pub async fn find_application(
        &self,
        token: &ApplicationToken,
    ) -> Result<Option<ApplicationRow>, sqlx::Error> {
        self.timed("find_application", async {
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT {APPLICATION_COLUMNS} FROM applications WHERE token = ?"
            )))
            .bind(token.as_str())
            .fetch_optional(&self.pool)
            .await
        })
        .await
    }

    /// Applications in creation order.
    pub async fn list_applications(
        &self,
        page: PageRequest,
    ) -> Result<Vec<ApplicationRow>, sqlx::Error> {
        self.timed("list_applications", async {
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT {APPLICATION_COLUMNS} FROM applications ORDER BY id LIMIT ? OFFSET ?"
            )))
            .bind(page.fetch_limit())
            .bind(page.offset())
            .fetch_all(&self.pool)
            .await
        })
        .await
    }

    pub async fn application_id(
        &self,
        token: &ApplicationToken,
    ) -> Result<Option<u64>, sqlx::Error> {
        self.timed("application_id", async {
            sqlx::query_scalar("SELECT id FROM applications WHERE token = ?")
                .bind(token.as_str())
                .fetch_optional(&self.pool)
                .await
        })
        .await
    }

    pub async fn find_chat(
        &self,
        application_id: u64,
        number: Number,
    ) -> Result<Option<ChatRow>, sqlx::Error> {
        self.timed("find_chat", async {
            sqlx::query_as(
                "SELECT number, messages_count, created_at FROM chats WHERE application_id = ? AND number = ?",
            )
            .bind(application_id)
            .bind(number.get())
            .fetch_optional(&self.pool)
            .await
        })
        .await
    }

    pub async fn list_chats(
        &self,
        application_id: u64,
        page: PageRequest,
    ) -> Result<Vec<ChatRow>, sqlx::Error> {
        self.timed("list_chats", async {
            sqlx::query_as(
                "SELECT number, messages_count, created_at FROM chats WHERE application_id = ? \
                 ORDER BY number LIMIT ? OFFSET ?",
            )
            .bind(application_id)
            .bind(page.fetch_limit())
            .bind(page.offset())
            .fetch_all(&self.pool)
            .await
        })
        .await
    }

    pub async fn find_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<MessageRow>, sqlx::Error> {
        self.timed("find_message", async {
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? AND m.number = ?"
            )))
            .bind(application_id)
            .bind(chat_number.get())
            .bind(number.get())
            .fetch_optional(&self.pool)
            .await
        })
        .await
    }

    pub async fn list_messages(
        &self,
        application_id: u64,
        chat_number: Number,
        page: PageRequest,
    ) -> Result<Vec<MessageRow>, sqlx::Error> {
        self.timed("list_messages", async {
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? ORDER BY m.number LIMIT ? OFFSET ?"
            )))
            .bind(application_id)
            .bind(chat_number.get())
            .bind(page.fetch_limit())
            .bind(page.offset())
            .fetch_all(&self.pool)
            .await
        })
        .await
    }

    /// Replaces the body and bumps the version; None when the message is not in MySQL.
    pub async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        body: &MessageBody,
    ) -> Result<Option<MessageRow>, sqlx::Error> {
        self.timed("update_message", async {
            let mut transaction = self.pool.begin().await?;
            let Some(row) = sqlx::query(
                "SELECT m.id, m.version, m.created_at FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? AND m.number = ? FOR UPDATE",
            )
            .bind(application_id)
            .bind(chat_number.get())
            .bind(number.get())
            .fetch_optional(&mut *transaction)
            .await?
            else {
                return Ok(None);
            };
            let id: u64 = row.try_get("id")?;
            let version: u64 = row.try_get::<u64, _>("version")? + 1;
            let created_at: DateTime<Utc> = row.try_get("created_at")?;
            let updated_at = now();
            sqlx::query("UPDATE messages SET body = ?, version = ?, updated_at = ? WHERE id = ?")
                .bind(body.as_str())
                .bind(version)
                .bind(updated_at)
                .bind(id)
                .execute(&mut *transaction)
                .await?;
            transaction.commit().await?;
            Ok(Some(MessageRow {
                number: number.get(),
                body: body.as_str().to_owned(),
                version,
                created_at,
                updated_at,
            }))
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}
