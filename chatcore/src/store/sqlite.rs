//! SQLite: the [`Storage`] adapter of the embedded mode (`<data dir>/chat.db`).
//!
//! SQLite runs in this process, so a statement costs no round trip: batch writes are one
//! transaction of cached prepared statements, row by row, instead of the multi-row statements the
//! MySQL adapter needs to save round trips. Write transactions take the write lock up front
//! ([`crate::sqlite::begin_write`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Sqlite, SqlitePool, Transaction};

use super::{
    APPLICATION_COLUMNS, ApplicationRow, ChangeKind, ChangeRow, ChatRow, CountFigures, CountLevel,
    CreatedSequences, IngestBatch, MessageEdit, MessageRow, MessageToIndex, MetadataEdit,
    NewMessage, ReindexCursor, ReindexScope, Reservation, ScopeBind, StorageError, StoredChat,
    TokenGrant, now, taken_by_other_events, with_storage_errors,
};
use crate::domain::Scope;
use crate::domain::{
    ApplicationName, ApplicationToken, ChatTitle, Metadata, Number, PageRequest, Sender,
    TokenDigest,
};
use crate::sqlite::begin_write;

#[derive(Clone)]
pub struct SqliteStorage {
    pool: SqlitePool,
}

impl SqliteStorage {
    /// Opens (creating and migrating) the database file.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let pool = crate::sqlite::open(path, &crate::sqlite::DATA_MIGRATOR, 8).await?;
        digest_plaintext_tokens(&pool).await?;
        Ok(Self { pool })
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        begin_write(&self.pool).await
    }

    /// Keeps the secret there, or this one when there is none.
    const INSERT_CLIENT_TOKEN_SECRET: &'static str = "INSERT INTO client_token_secret \
         (id, secret, created_at) VALUES (1, ?, ?) ON CONFLICT (id) DO NOTHING";
    // SQLite has no LIMIT on DELETE (unless built with it): the rows are chosen by a subquery.
    const PURGE_CHANGES: &'static str = "DELETE FROM message_changes WHERE (chat_id, sequence) IN \
         (SELECT mc.chat_id, mc.sequence FROM message_changes mc JOIN chats c ON c.id = mc.chat_id \
         WHERE c.application_id = ? LIMIT ?)";
    const PURGE_MESSAGES: &'static str = "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m \
         JOIN chats c ON c.id = m.chat_id WHERE c.application_id = ? LIMIT ?)";
    const PURGE_CHATS: &'static str =
        "DELETE FROM chats WHERE id IN (SELECT id FROM chats WHERE application_id = ? LIMIT ?)";
}

/// Replaces the tokens a database of before digests holds in plaintext by their digests and
/// rebuilds `applications` without the column (SQLite has no SHA-256 for a migration to do it in
/// SQL, and cannot drop a UNIQUE column: the rebuild is its documented way, foreign keys off).
async fn digest_plaintext_tokens(pool: &SqlitePool) -> anyhow::Result<()> {
    let plaintext: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pragma_table_info('applications') WHERE name = 'token'",
    )
    .fetch_one(pool)
    .await?;
    if plaintext == 0 {
        return Ok(());
    }
    let mut connection = pool.acquire().await?;
    // secure_delete: the pages the old table leaves are zeroed, not left with the tokens in them.
    for pragma in ["PRAGMA foreign_keys = OFF", "PRAGMA secure_delete = ON"] {
        sqlx::query(pragma).execute(&mut *connection).await?;
    }
    let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
    let rows: Vec<(i64, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, token, created_at FROM applications")
            .fetch_all(&mut *transaction)
            .await?;
    for (id, raw, created_at) in rows {
        let token = ApplicationToken::parse(&raw)
            .map_err(|error| anyhow::anyhow!("application {id}: stored token {error}"))?;
        sqlx::query(
            "INSERT INTO application_tokens (digest, application_id, created_at) VALUES (?, ?, ?)",
        )
        .bind(token.digest().as_bytes())
        .bind(id)
        .bind(created_at)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("UPDATE applications SET token_hint = ? WHERE id = ?")
            .bind(token.hint())
            .bind(id)
            .execute(&mut *transaction)
            .await?;
    }
    for statement in [
        "CREATE TABLE applications_rebuilt (id INTEGER PRIMARY KEY, token_hint TEXT NOT NULL, \
         name TEXT NOT NULL, chats_count INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL, \
         updated_at TEXT NOT NULL, deleted_at TEXT, \
         last_change_sequence INTEGER NOT NULL DEFAULT 0, client_token_key_id TEXT, \
         client_token_key_rotated_at TEXT)",
        "INSERT INTO applications_rebuilt SELECT id, token_hint, name, chats_count, created_at, \
         updated_at, deleted_at, last_change_sequence, client_token_key_id, \
         client_token_key_rotated_at FROM applications",
        "DROP TABLE applications",
        "ALTER TABLE applications_rebuilt RENAME TO applications",
        "CREATE INDEX applications_deleted_at ON applications (deleted_at)",
        "CREATE INDEX applications_client_token_key_rotated_at \
         ON applications (client_token_key_rotated_at)",
    ] {
        sqlx::query(statement).execute(&mut *transaction).await?;
    }
    transaction.commit().await?;
    // The zeroed pages into the file itself, and the log that still held the old ones emptied.
    for pragma in [
        "PRAGMA wal_checkpoint(TRUNCATE)",
        "PRAGMA foreign_keys = ON",
        "PRAGMA secure_delete = OFF",
    ] {
        sqlx::query(pragma).execute(&mut *connection).await?;
    }
    Ok(())
}

super::webhooks::webhook_store_impl!(SqliteStorage, Sqlite);

super::shared_sql::storage_impl!(SqliteStorage, Sqlite, "sqlite", {
    async fn migrate(&self) -> Result<(), StorageError> {
        // Applied when the file is opened.
        Ok(())
    }

    async fn create_application(
        &self,
        name: &ApplicationName,
        token: &ApplicationToken,
    ) -> Result<ApplicationRow, StorageError> {
        let created_at = now();
        let mut transaction = begin_write(&self.pool).await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO applications (token_hint, name, chats_count, created_at, updated_at) \
             VALUES (?, ?, 0, ?, ?) RETURNING id",
        )
        .bind(token.hint())
        .bind(name.as_str())
        .bind(created_at)
        .bind(created_at)
        .fetch_one(&mut *transaction)
        .await?;
        Self::insert_token(&mut transaction, id as u64, token, created_at).await?;
        transaction.commit().await?;
        Ok(ApplicationRow {
            id: id as u64,
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
        Ok(sqlx::query_as(AssertSqlSafe(format!(
            "UPDATE applications SET name = ?, updated_at = ? WHERE id = ? AND deleted_at IS NULL \
             RETURNING {APPLICATION_COLUMNS}"
        )))
        .bind(name.as_str())
        .bind(now())
        .bind(application_id as i64)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn update_message(
        &self,
        application_id: u64,
        chat_number: Number,
        number: Number,
        edit: &MessageEdit,
    ) -> Result<Option<ChangeRow>, StorageError> {
        let mut transaction = begin_write(&self.pool).await?;
        let (keep_metadata, metadata) = match &edit.metadata {
            MetadataEdit::Keep => (true, None),
            MetadataEdit::Replace(metadata) => (false, Some(metadata.as_str())),
            MetadataEdit::Remove => (false, None),
        };
        // One statement: the write lock makes the version bump atomic.
        let updated = sqlx::query_as::<_, ChangedMessage>(AssertSqlSafe(format!(
            "UPDATE messages SET body = ?1, version = version + 1, updated_at = ?2, \
             edited_at = COALESCE(edited_at, ?2), \
             metadata = CASE WHEN ?6 THEN metadata ELSE ?7 END \
             WHERE chat_id = (SELECT id FROM chats WHERE application_id = ?3 AND number = ?4) \
             AND number = ?5 AND deleted_at IS NULL \
             RETURNING chat_id, {CHANGED_COLUMNS}"
        )))
        .bind(edit.body.as_str())
        .bind(now())
        .bind(application_id as i64)
        .bind(chat_number.get() as i64)
        .bind(number.get() as i64)
        .bind(keep_metadata)
        .bind(metadata)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(updated) = updated else {
            return Ok(None);
        };
        let change = Self::log_change(
            &mut transaction,
            (application_id, updated.chat_id),
            ChangeKind::Updated,
            updated.message,
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
        let mut transaction = begin_write(&self.pool).await?;
        let deleted = sqlx::query_as::<_, ChangedMessage>(AssertSqlSafe(format!(
            "UPDATE messages SET body = '', metadata = NULL, version = version + 1, \
             updated_at = ?1, deleted_at = ?1 \
             WHERE chat_id = (SELECT id FROM chats WHERE application_id = ?2 AND number = ?3) \
             AND number = ?4 AND deleted_at IS NULL \
             RETURNING chat_id, {CHANGED_COLUMNS}"
        )))
        .bind(now())
        .bind(application_id as i64)
        .bind(chat_number.get() as i64)
        .bind(number.get() as i64)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(deleted) = deleted else {
            return Ok(None);
        };
        sqlx::query(
            "UPDATE chats SET messages_count = messages_count - 1 WHERE id = ? AND messages_count > 0",
        )
        .bind(deleted.chat_id as i64)
        .execute(&mut *transaction)
        .await?;
        let change = Self::log_change(
            &mut transaction,
            (application_id, deleted.chat_id),
            ChangeKind::Deleted,
            deleted.message,
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
        let mut transaction = begin_write(&self.pool).await?;
        let now = now();
        let mut new_chats_per_application: BTreeMap<u64, i64> = BTreeMap::new();
        let mut deleted_applications = BTreeSet::new();
        let mut conflicts = Vec::new();
        for (&(application_id, chat_number), chat) in &batch.chats {
            if deleted_applications.contains(&application_id) {
                continue;
            }
            if !new_chats_per_application.contains_key(&application_id) {
                let deleted: Option<i64> = sqlx::query_scalar(
                    "SELECT deleted_at IS NOT NULL FROM applications WHERE id = ?",
                )
                .bind(application_id as i64)
                .fetch_optional(&mut *transaction)
                .await?;
                match deleted {
                    None => return Err(StorageError::UnknownApplication(application_id)),
                    Some(0) => {}
                    Some(_) => {
                        deleted_applications.insert(application_id);
                        continue;
                    }
                }
            }
            let inserted: Option<i64> = sqlx::query_scalar(
                "INSERT INTO chats \
                 (application_id, number, messages_count, created_at, updated_at, title, metadata, \
                 event_id) \
                 VALUES (?, ?, 0, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
            )
            .bind(application_id as i64)
            .bind(chat_number.get() as i64)
            .bind(chat.created_at)
            .bind(now)
            .bind(chat.title.map(ChatTitle::as_str))
            .bind(chat.metadata.map(Metadata::as_str))
            .bind(chat.event_id.as_ref().map(|id| id.as_bytes().as_slice()))
            .fetch_optional(&mut *transaction)
            .await?;
            let new_chats = new_chats_per_application.entry(application_id).or_default();
            if let Some(chat_id) = inserted {
                *new_chats += 1;
                Self::log_chat_created(
                    &mut transaction,
                    (application_id, chat_id as u64),
                    chat.created_at,
                )
                .await?;
                continue;
            }
            if chat.event_id.is_none() {
                // Only referred to by a message: the stored row is the chat.
                continue;
            }
            let stored: Option<Vec<u8>> = sqlx::query_scalar(
                "SELECT event_id FROM chats WHERE application_id = ? AND number = ?",
            )
            .bind(application_id as i64)
            .bind(chat_number.get() as i64)
            .fetch_one(&mut *transaction)
            .await?;
            match chat.against(stored.as_deref()) {
                StoredChat::Claim(event_id) => {
                    let key = (application_id, chat_number);
                    Self::claim_chat(&mut transaction, key, event_id, chat).await?;
                }
                StoredChat::Unchanged => {}
                StoredChat::TakenByAnotherEvent(event_id) => {
                    let scope = Scope::ChatsOf { application_id };
                    let taken = vec![(chat_number, event_id)];
                    conflicts.extend(Self::number_conflicts(&mut transaction, scope, taken).await?);
                }
            }
        }
        for (application_id, new_chats) in new_chats_per_application {
            add_count(
                &mut transaction,
                "applications",
                "chats_count",
                application_id,
                new_chats,
            )
            .await?;
        }
        for (&(application_id, chat_number), messages) in &batch.messages {
            if deleted_applications.contains(&application_id) {
                continue;
            }
            let chat_id: i64 =
                sqlx::query_scalar("SELECT id FROM chats WHERE application_id = ? AND number = ?")
                    .bind(application_id as i64)
                    .bind(chat_number.get() as i64)
                    .fetch_optional(&mut *transaction)
                    .await?
                    .ok_or(StorageError::ChatMissing(application_id, chat_number))?;
            let mut new_messages: Vec<&NewMessage<'_>> = Vec::new();
            let mut stored_before = Vec::new();
            for message in messages.values() {
                let inserted = sqlx::query(
                    "INSERT INTO messages \
                     (chat_id, number, body, version, created_at, updated_at, event_id, sender, metadata) \
                     VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(chat_id)
                .bind(message.number.get() as i64)
                .bind(message.body)
                .bind(message.created_at)
                .bind(now)
                .bind(message.event_id.as_bytes().as_slice())
                .bind(message.sender.map(Sender::as_str))
                .bind(message.metadata.map(Metadata::as_str))
                .execute(&mut *transaction)
                .await?
                .rows_affected();
                if inserted > 0 {
                    new_messages.push(message);
                    continue;
                }
                // There already: a redelivery, or a number handed out twice.
                let stored: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT event_id FROM messages WHERE chat_id = ? AND number = ?",
                )
                .bind(chat_id)
                .bind(message.number.get() as i64)
                .fetch_one(&mut *transaction)
                .await?;
                stored_before.push((message.number.get(), stored));
                let logged: Option<i64> = sqlx::query_scalar(
                    "SELECT MIN(sequence) FROM message_changes WHERE chat_id = ? AND number = ?",
                )
                .bind(chat_id)
                .bind(message.number.get() as i64)
                .fetch_one(&mut *transaction)
                .await?;
                if let Some(sequence) = logged {
                    created.insert(
                        ((application_id, chat_number), message.number),
                        sequence as u64,
                    );
                }
            }
            let scope = Scope::MessagesOf {
                application_id,
                chat_number,
            };
            let taken = Self::number_conflicts(
                &mut transaction,
                scope,
                taken_by_other_events(messages.values(), &stored_before),
            )
            .await?;
            if !taken.is_empty() {
                // Every conflict of the batch is reported; the rollback writes nothing.
                conflicts.extend(taken);
                continue;
            }
            if new_messages.is_empty() {
                continue;
            }
            // The new messages count in their chat, and take its and its application's next
            // change sequences.
            let count = new_messages.len() as i64;
            let last: i64 = sqlx::query_scalar(
                "UPDATE chats SET messages_count = messages_count + ?1, \
                 last_change_sequence = last_change_sequence + ?1 WHERE id = ?2 \
                 RETURNING last_change_sequence",
            )
            .bind(count)
            .bind(chat_id)
            .fetch_one(&mut *transaction)
            .await?;
            let last_of_application: i64 = sqlx::query_scalar(
                "UPDATE applications SET last_change_sequence = last_change_sequence + ?1 \
                 WHERE id = ?2 RETURNING last_change_sequence",
            )
            .bind(count)
            .bind(application_id as i64)
            .fetch_one(&mut *transaction)
            .await?;
            let sequences = (last + 1 - count..).zip(last_of_application + 1 - count..);
            for ((sequence, application_sequence), message) in sequences.zip(new_messages) {
                sqlx::query(
                    "INSERT INTO message_changes \
                     (chat_id, sequence, application_id, application_sequence, number, version, \
                     kind, body, message_created_at, occurred_at, sender, metadata) \
                     VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
                )
                .bind(chat_id)
                .bind(sequence)
                .bind(application_id as i64)
                .bind(application_sequence)
                .bind(message.number.get() as i64)
                .bind(ChangeKind::Created.as_str())
                .bind(message.body)
                .bind(message.created_at)
                .bind(now)
                .bind(message.sender.map(Sender::as_str))
                .bind(message.metadata.map(Metadata::as_str))
                .execute(&mut *transaction)
                .await?;
                created.insert(
                    ((application_id, chat_number), message.number),
                    sequence as u64,
                );
            }
        }
        if !conflicts.is_empty() {
            return Err(StorageError::NumberConflicts(conflicts));
        }
        transaction.commit().await?;
        Ok(created)
    }

    async fn reserve_fresh_block(
        &self,
        scope: &str,
        block_size: u64,
    ) -> Result<Reservation, StorageError> {
        sqlx::query_as(
            "INSERT INTO number_reservations (scope, reserved_until, epoch) VALUES (?, ?, 1) \
             ON CONFLICT (scope) DO UPDATE SET reserved_until = reserved_until + excluded.reserved_until, \
             epoch = epoch + 1 RETURNING reserved_until, epoch",
        )
        .bind(scope)
        .bind(block_size as i64)
        .fetch_one(&self.pool)
        .await
        .map(|(reserved_until, epoch): (u64, u64)| Reservation {
            reserved_until,
            epoch,
        })
        .map_err(StorageError::from)
    }

    async fn extend_reservation(
        &self,
        scope: &str,
        number: u64,
        epoch: u64,
        block_size: u64,
    ) -> Result<Option<u64>, StorageError> {
        Ok(sqlx::query_scalar(
            "UPDATE number_reservations SET reserved_until = MAX(reserved_until, ?) \
             WHERE scope = ? AND epoch = ? RETURNING reserved_until",
        )
        .bind((number - 1 + block_size) as i64)
        .bind(scope)
        .bind(epoch as i64)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn raise_reservations(
        &self,
        highest: &[(String, u64)],
    ) -> Result<Vec<String>, StorageError> {
        let mut transaction = begin_write(&self.pool).await?;
        let mut behind = Vec::new();
        for (scope, number) in highest {
            let raised = sqlx::query(
                "INSERT INTO number_reservations (scope, reserved_until, epoch) VALUES (?, ?, 0) \
                 ON CONFLICT (scope) DO UPDATE SET reserved_until = excluded.reserved_until \
                 WHERE reserved_until < excluded.reserved_until",
            )
            .bind(scope)
            .bind(*number as i64)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            if raised > 0 {
                behind.push(scope.clone());
            }
        }
        transaction.commit().await?;
        Ok(behind)
    }
});

/// The columns of a [`ChangedMessage`] an `UPDATE ... RETURNING` gives back.
const CHANGED_COLUMNS: &str =
    "number, body, version, created_at, updated_at, sender, metadata, edited_at";

/// A message an update or a deletion left, and its chat.
#[derive(sqlx::FromRow)]
struct ChangedMessage {
    chat_id: u64,
    #[sqlx(flatten)]
    message: MessageRow,
}

async fn add_count(
    transaction: &mut Transaction<'_, Sqlite>,
    table: &'static str,
    column: &'static str,
    id: u64,
    increment: i64,
) -> Result<(), sqlx::Error> {
    if increment == 0 {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET {column} = {column} + ? WHERE id = ?"
    )))
    .bind(increment)
    .bind(id as i64)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}
