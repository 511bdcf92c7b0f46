//! MySQL: connection pool, migrations, and the [`Storage`] adapter of the distributed stack.

mod batch;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{MySql, MySqlPool, QueryBuilder, Transaction};

use self::batch::{
    CreatedChange, InsertedChats, add_counts, chat_ids, created_sequences, insert_chats,
    insert_created_changes, insert_messages, last_change_sequences, stored_event_ids,
};
use super::{
    ApplicationRow, ChangeKind, ChangeRow, ChatRow, CountFigures, CountLevel, CreatedSequences,
    IngestBatch, MessageEdit, MessageRow, MessageToIndex, MetadataEdit, NewMessage, ReindexCursor,
    ReindexScope, Reservation, ScopeBind, StorageError, TokenGrant, now, taken_by_other_events,
    with_storage_errors,
};
use crate::config::SecretUrl;
use crate::domain::Scope;
use crate::domain::{
    ApplicationName, ApplicationToken, Metadata, Number, PageRequest, Sender, TokenDigest,
};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");

/// Upper bound of body bytes in one INSERT statement, well under MariaDB's 16 MiB packet default.
const MAX_STATEMENT_BODY_BYTES: usize = 4 * 1024 * 1024;

/// [`connect_with`] with 5 s to connect and the public roots only (the benchmark, the tests).
pub async fn connect(url: &SecretUrl, max_connections: u32) -> Result<MySqlPool, sqlx::Error> {
    connect_with(url, max_connections, Duration::from_secs(5), None).await
}

/// Opens the pool and its first connection. TLS is the URL's choice (`ssl-mode=VERIFY_IDENTITY`,
/// `VERIFY_CA`, `REQUIRED`; `ssl-ca=<file>`); `tls_ca` (PEM, `CHAT_TLS_CA_FILE`) is trusted beside
/// the public roots when the URL names no CA of its own. A connection (TCP, TLS, handshake) and the
/// wait for a free one take at most `connect_timeout`; past it the pool answers `PoolTimedOut`.
pub async fn connect_with(
    url: &SecretUrl,
    max_connections: u32,
    connect_timeout: Duration,
    tls_ca: Option<&[u8]>,
) -> Result<MySqlPool, sqlx::Error> {
    let mut options = MySqlConnectOptions::from_str(url.expose())?
        .charset("utf8mb4")
        .timezone(Some(String::from("+00:00")));
    if let Some(pem) = tls_ca
        && !names_ssl_ca(url.expose())
    {
        options = options.ssl_ca_from_pem(pem.to_vec());
    }
    // No ping before handing a connection out (sqlx's default would add a round trip to every
    // query): sqlx already pings each connection when it is returned and closes it when that
    // fails, so only a connection broken while idle in the pool (a server restart, a dropped
    // link) reaches a query. That query fails as a transient storage error (a 503 the client
    // retries, a batch the worker retries) and the connection is dropped on its return.
    MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

/// Whether the URL's query sets `ssl-ca` (or `sslca`), as sqlx reads it.
fn names_ssl_ca(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|pair| matches!(pair.split('=').next(), Some("ssl-ca" | "sslca")))
    })
}

#[derive(Clone)]
pub struct MySqlStorage {
    pool: MySqlPool,
}

impl MySqlStorage {
    pub fn new(pool: MySqlPool) -> Self {
        Self { pool }
    }

    async fn begin_write(&self) -> Result<Transaction<'static, MySql>, sqlx::Error> {
        self.pool.begin().await
    }

    /// Keeps the secret there, or this one when there is none.
    const INSERT_CLIENT_TOKEN_SECRET: &'static str =
        "INSERT IGNORE INTO client_token_secret (id, secret, created_at) VALUES (1, ?, ?)";
    const PURGE_CHANGES: &'static str = "DELETE FROM message_changes WHERE chat_id IN (SELECT id FROM chats WHERE application_id = ?) LIMIT ?";
    const PURGE_MESSAGES: &'static str = "DELETE FROM messages WHERE chat_id IN (SELECT id FROM chats WHERE application_id = ?) LIMIT ?";
    const PURGE_CHATS: &'static str = "DELETE FROM chats WHERE application_id = ? LIMIT ?";
}

super::webhooks::webhook_store_impl!(MySqlStorage, MySql);

super::shared_sql::storage_impl!(MySqlStorage, MySql, "mysql", {
    async fn migrate(&self) -> Result<(), StorageError> {
        Ok(MIGRATOR.run(&self.pool).await?)
    }

    async fn create_application(
        &self,
        name: &ApplicationName,
        token: &ApplicationToken,
    ) -> Result<ApplicationRow, StorageError> {
        let created_at = now();
        let mut transaction = self.pool.begin().await?;
        let id = sqlx::query("INSERT INTO applications (token_hint, name, chats_count, created_at, updated_at) VALUES (?, ?, 0, ?, ?)")
            .bind(token.hint())
            .bind(name.as_str())
            .bind(created_at)
            .bind(created_at)
            .execute(&mut *transaction)
            .await?
            .last_insert_id();
        Self::insert_token(&mut transaction, id, token, created_at).await?;
        transaction.commit().await?;
        Ok(ApplicationRow {
            id,
            token_hint: token.hint(),
            name: name.as_str().to_owned(),
            chats_count: 0,
            created_at,
            updated_at: created_at,
        })
    }

    async fn rename_application(
        &self,
        application_id: u64,
        name: &ApplicationName,
    ) -> Result<Option<ApplicationRow>, StorageError> {
        sqlx::query(
            "UPDATE applications SET name = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL",
        )
        .bind(name.as_str())
        .bind(now())
        .bind(application_id)
        .execute(&self.pool)
        .await?;
        // Zero affected rows means either no such application or an unchanged name: the read decides.
        self.find_application(application_id).await
    }

    async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        edit: &MessageEdit,
    ) -> Result<Option<ChangeRow>, StorageError> {
        let mut transaction = self.pool.begin().await?;
        lock_application(&mut transaction, application_id).await?;
        let Some(locked) =
            lock_message(&mut transaction, application_id, chat_number, number).await?
        else {
            return Ok(None);
        };
        let (version, updated_at) = (locked.version + 1, now());
        let edited_at = locked.edited_at.unwrap_or(updated_at);
        let metadata = match &edit.metadata {
            MetadataEdit::Keep => locked.metadata,
            MetadataEdit::Replace(metadata) => Some(metadata.clone()),
            MetadataEdit::Remove => None,
        };
        sqlx::query(
            "UPDATE messages SET body = ?, metadata = ?, version = ?, updated_at = ?, edited_at = ? \
             WHERE id = ?",
        )
        .bind(edit.body.as_str())
        .bind(&metadata)
        .bind(version)
        .bind(updated_at)
        .bind(edited_at)
        .bind(locked.id)
        .execute(&mut *transaction)
        .await?;
        let message = MessageRow {
            number: number.get(),
            body: edit.body.as_str().to_owned(),
            version,
            created_at: locked.created_at,
            updated_at,
            sender: locked.sender,
            metadata,
            edited_at: Some(edited_at),
        };
        let change = Self::log_change(
            &mut transaction,
            (application_id, locked.chat_id),
            ChangeKind::Updated,
            message,
        )
        .await?;
        transaction.commit().await?;
        Ok(Some(change))
    }

    async fn delete_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
    ) -> Result<Option<ChangeRow>, StorageError> {
        let mut transaction = self.pool.begin().await?;
        lock_application(&mut transaction, application_id).await?;
        let Some(locked) =
            lock_message(&mut transaction, application_id, chat_number, number).await?
        else {
            return Ok(None);
        };
        let (version, deleted_at) = (locked.version + 1, now());
        sqlx::query(
            "UPDATE messages SET body = '', metadata = NULL, version = ?, updated_at = ?, deleted_at = ? \
             WHERE id = ?",
        )
        .bind(version)
        .bind(deleted_at)
        .bind(deleted_at)
        .bind(locked.id)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "UPDATE chats SET messages_count = messages_count - 1 WHERE id = ? AND messages_count > 0",
        )
        .bind(locked.chat_id)
        .execute(&mut *transaction)
        .await?;
        let message = MessageRow {
            number: number.get(),
            body: String::new(),
            version,
            created_at: locked.created_at,
            updated_at: deleted_at,
            sender: locked.sender,
            metadata: None,
            edited_at: locked.edited_at,
        };
        let change = Self::log_change(
            &mut transaction,
            (application_id, locked.chat_id),
            ChangeKind::Deleted,
            message,
        )
        .await?;
        transaction.commit().await?;
        Ok(Some(change))
    }

    async fn write_ingest_batch(
        &self,
        batch: &IngestBatch<'_>,
    ) -> Result<CreatedSequences, StorageError> {
        let mut created = CreatedSequences::new();
        if batch.chats.is_empty() {
            return Ok(created);
        }
        let mut transaction = self.pool.begin().await?;
        let InsertedChats {
            deleted_applications,
            new_chats,
            mut conflicts,
        } = insert_chats(&mut transaction, &batch.chats).await?;
        let live_chats = batch
            .chats
            .keys()
            .filter(|(application_id, _)| !deleted_applications.contains(application_id));
        let chat_ids = chat_ids(&mut transaction, live_chats).await?;
        // A new chat's creation comes first in its application's feed, before its messages.
        let mut new_chats_per_application: BTreeMap<u64, u64> = BTreeMap::new();
        for (key, created_at) in &new_chats {
            let chat_id = *chat_ids
                .get(key)
                .ok_or(StorageError::ChatMissing(key.0, key.1))?;
            Self::log_chat_created(&mut transaction, (key.0, chat_id), *created_at).await?;
            *new_chats_per_application.entry(key.0).or_default() += 1;
        }
        let new_chats_per_application: Vec<(u64, u64)> =
            new_chats_per_application.into_iter().collect();
        let mut new_messages_per_chat = Vec::new();
        let mut new_messages = Vec::new();
        for (key, chat_messages) in &batch.messages {
            if deleted_applications.contains(&key.0) {
                continue;
            }
            let chat_id = *chat_ids
                .get(key)
                .ok_or(StorageError::ChatMissing(key.0, key.1))?;
            let messages: Vec<&NewMessage<'_>> = chat_messages.values().collect();
            let inserted = insert_messages(&mut transaction, chat_id, &messages).await?;
            let mut new: Vec<&NewMessage<'_>> = messages;
            if inserted < new.len() as u64 {
                // Some were there already: redeliveries, or numbers handed out twice.
                let stored =
                    stored_event_ids(&mut transaction, chat_id, chat_messages.keys()).await?;
                let scope = Scope::MessagesOf {
                    application_id: key.0,
                    chat_number: key.1,
                };
                let taken = Self::number_conflicts(
                    &mut transaction,
                    scope,
                    taken_by_other_events(chat_messages.values(), &stored),
                )
                .await?;
                if !taken.is_empty() {
                    // Every conflict of the batch is reported; the rollback writes nothing.
                    conflicts.extend(taken);
                    continue;
                }
                let logged =
                    created_sequences(&mut transaction, chat_id, chat_messages.keys()).await?;
                for (&number, &sequence) in &logged {
                    created.insert((*key, number), sequence);
                }
                new.retain(|message| !logged.contains_key(&message.number));
            }
            if !new.is_empty() {
                new_messages_per_chat.push((chat_id, new.len() as u64));
                new_messages.push((chat_id, *key, new));
            }
        }
        if !conflicts.is_empty() {
            return Err(StorageError::NumberConflicts(conflicts));
        }
        // The new messages count in their chats, and take their chats' and their applications'
        // next change sequences (the applications' rows are locked since the batch began).
        add_counts(
            &mut transaction,
            "chats",
            &["messages_count", "last_change_sequence"],
            &new_messages_per_chat,
        )
        .await?;
        let mut new_messages_per_application: BTreeMap<u64, u64> = BTreeMap::new();
        for (_, (application_id, _), messages) in &new_messages {
            *new_messages_per_application
                .entry(*application_id)
                .or_default() += messages.len() as u64;
        }
        let new_messages_per_application: Vec<(u64, u64)> =
            new_messages_per_application.into_iter().collect();
        add_counts(
            &mut transaction,
            "applications",
            &["chats_count"],
            &new_chats_per_application,
        )
        .await?;
        add_counts(
            &mut transaction,
            "applications",
            &["last_change_sequence"],
            &new_messages_per_application,
        )
        .await?;
        let last_of_chats = last_change_sequences(
            &mut transaction,
            "chats",
            new_messages_per_chat.iter().map(|(chat_id, _)| *chat_id),
        )
        .await?;
        let mut next_of_applications = last_change_sequences(
            &mut transaction,
            "applications",
            new_messages_per_application.iter().map(|(id, _)| *id),
        )
        .await?;
        for (application_id, count) in &new_messages_per_application {
            if let Some(last) = next_of_applications.get_mut(application_id) {
                *last = *last + 1 - count;
            }
        }
        let mut changes = Vec::new();
        for (chat_id, key, messages) in new_messages {
            let missing = || StorageError::ChatMissing(key.0, key.1);
            let last = last_of_chats.get(&chat_id).copied().ok_or_else(missing)?;
            let first = last + 1 - messages.len() as u64;
            for (sequence, message) in (first..).zip(messages) {
                let application_sequence =
                    next_of_applications.get_mut(&key.0).ok_or_else(missing)?;
                created.insert((key, message.number), sequence);
                changes.push(CreatedChange {
                    chat_id,
                    sequence,
                    application_id: key.0,
                    application_sequence: *application_sequence,
                    message,
                });
                *application_sequence += 1;
            }
        }
        insert_created_changes(&mut transaction, &changes).await?;
        transaction.commit().await?;
        Ok(created)
    }

    async fn reserve_fresh_block(
        &self,
        scope: &str,
        block_size: u64,
    ) -> Result<Reservation, StorageError> {
        // One upsert statement takes the row lock, so concurrent callers queue up instead of
        // deadlocking.
        let mut transaction = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO number_reservations (scope, reserved_until, epoch) VALUES (?, ?, 1) \
             ON DUPLICATE KEY UPDATE reserved_until = reserved_until + VALUES(reserved_until), epoch = epoch + 1",
        )
        .bind(scope)
        .bind(block_size)
        .execute(&mut *transaction)
        .await?;
        let reserved = lock_reservation(&mut transaction, scope).await?;
        transaction.commit().await?;
        Ok(reserved)
    }

    async fn extend_reservation(
        &self,
        scope: &str,
        number: u64,
        epoch: u64,
        block_size: u64,
    ) -> Result<Option<u64>, StorageError> {
        let mut transaction = self.pool.begin().await?;
        let current = lock_reservation(&mut transaction, scope).await?;
        if current.epoch != epoch {
            return Ok(None);
        }
        let ceiling = current.reserved_until.max(number - 1 + block_size);
        sqlx::query("UPDATE number_reservations SET reserved_until = ? WHERE scope = ?")
            .bind(ceiling)
            .bind(scope)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Some(ceiling))
    }

    async fn raise_reservations(
        &self,
        highest: &[(String, u64)],
    ) -> Result<Vec<String>, StorageError> {
        if highest.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = QueryBuilder::<MySql>::new(
            "SELECT scope, reserved_until FROM number_reservations WHERE scope IN (",
        );
        let mut list = query.separated(", ");
        for (scope, _) in highest {
            list.push_bind(scope.as_str());
        }
        query.push(")");
        let reserved: HashMap<String, u64> = query
            .build_query_as()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .collect();
        let behind: Vec<&(String, u64)> = highest
            .iter()
            .filter(|(scope, number)| reserved.get(scope).is_none_or(|until| until < number))
            .collect();
        if behind.is_empty() {
            return Ok(Vec::new());
        }
        let mut upsert = QueryBuilder::<MySql>::new(
            "INSERT INTO number_reservations (scope, reserved_until, epoch) ",
        );
        upsert.push_values(&behind, |mut row, (scope, number)| {
            row.push_bind(scope.as_str())
                .push_bind(*number)
                .push_bind(0u64);
        });
        upsert.push(" ON DUPLICATE KEY UPDATE reserved_until = GREATEST(reserved_until, VALUES(reserved_until))");
        upsert.build().execute(&self.pool).await?;
        Ok(behind.into_iter().map(|(scope, _)| scope.clone()).collect())
    }
});

/// A stored, not deleted message, locked for the rest of the transaction.
#[derive(sqlx::FromRow)]
struct LockedMessage {
    id: u64,
    chat_id: u64,
    version: u64,
    created_at: DateTime<Utc>,
    sender: Option<Sender>,
    metadata: Option<Metadata>,
    edited_at: Option<DateTime<Utc>>,
}

/// Locks the application's row: the first lock of every write that logs a change, so that such
/// writes of one application take their locks in one order (application, chat, message) and wait
/// for each other rather than deadlock.
async fn lock_application(
    transaction: &mut Transaction<'_, MySql>,
    application_id: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT id FROM applications WHERE id = ? FOR UPDATE")
        .bind(application_id)
        .fetch_optional(&mut **transaction)
        .await?;
    Ok(())
}

async fn lock_message(
    transaction: &mut Transaction<'_, MySql>,
    application_id: u64,
    chat_number: Number,
    number: Number,
) -> Result<Option<LockedMessage>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT m.id, m.chat_id, m.version, m.created_at, m.sender, m.metadata, m.edited_at \
         FROM messages m JOIN chats c ON c.id = m.chat_id \
         WHERE c.application_id = ? AND c.number = ? AND m.number = ? AND m.deleted_at IS NULL \
         FOR UPDATE",
    )
    .bind(application_id)
    .bind(chat_number.get())
    .bind(number.get())
    .fetch_optional(&mut **transaction)
    .await?)
}

async fn lock_reservation(
    transaction: &mut Transaction<'_, MySql>,
    scope: &str,
) -> Result<Reservation, sqlx::Error> {
    let (reserved_until, epoch): (u64, u64) = sqlx::query_as(
        "SELECT reserved_until, epoch FROM number_reservations WHERE scope = ? FOR UPDATE",
    )
    .bind(scope)
    .fetch_one(&mut **transaction)
    .await?;
    Ok(Reservation {
        reserved_until,
        epoch,
    })
}
