//! The statements of an ingest batch: multi-row, one per table and chat, to save round trips.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sqlx::{MySql, QueryBuilder, Transaction};

use super::{MAX_STATEMENT_BODY_BYTES, MySqlStorage};
use crate::domain::Scope;
use crate::domain::{ChatTitle, Metadata, Number, Sender};
use crate::store::{
    ChangeKind, ChatKey, NewChat, NewMessage, NumberConflict, StorageError, StoredChat, now,
};

/// What [`insert_chats`] did: the deleted applications whose chats it left out, the chats it
/// inserted (with their creation time), and the chat events whose number belongs to another event.
pub(super) struct InsertedChats {
    pub(super) deleted_applications: BTreeSet<u64>,
    pub(super) new_chats: Vec<(ChatKey, DateTime<Utc>)>,
    pub(super) conflicts: Vec<NumberConflict>,
}

/// Inserts the chats that do not exist yet; the chats of deleted applications are left out. A chat
/// stored earlier by a message that came first takes its event's id and details.
///
/// The applications' rows are locked first, in id order: every write that logs a change locks its
/// application before its chat (see [`super::lock_application`]), so two batches of one
/// application, or a batch and a `PUT`, wait for each other instead of deadlocking (the chats'
/// foreign key would otherwise take a shared lock on the application that both then upgrade).
pub(super) async fn insert_chats(
    transaction: &mut Transaction<'static, MySql>,
    chats: &BTreeMap<ChatKey, NewChat<'_>>,
) -> Result<InsertedChats, StorageError> {
    let application_ids: BTreeSet<u64> = chats
        .keys()
        .map(|(application_id, _)| *application_id)
        .collect();
    let mut known = QueryBuilder::<MySql>::new(
        "SELECT id, deleted_at IS NOT NULL FROM applications WHERE id IN ",
    );
    push_in_list(&mut known, application_ids.iter().copied());
    known.push(" ORDER BY id FOR UPDATE");
    let known: BTreeMap<u64, i64> = known
        .build_query_as()
        .fetch_all(&mut **transaction)
        .await?
        .into_iter()
        .collect();
    if let Some(unknown) = application_ids.iter().find(|id| !known.contains_key(id)) {
        return Err(StorageError::UnknownApplication(*unknown));
    }
    let deleted: BTreeSet<u64> = known
        .into_iter()
        .filter_map(|(id, deleted)| (deleted != 0).then_some(id))
        .collect();
    let now = now();
    let mut new_chats = Vec::new();
    let mut conflicts = Vec::new();
    for application_id in application_ids.difference(&deleted).copied() {
        let requested: Vec<_> = chats
            .range((application_id, Number::new(1).expect("1 is positive"))..)
            .take_while(|((id, _), _)| *id == application_id)
            .collect();
        // Which are new: exact, since no other write inserts chats of a locked application.
        let mut stored = QueryBuilder::<MySql>::new(
            "SELECT number, event_id FROM chats WHERE application_id = ",
        );
        stored.push_bind(application_id).push(" AND number IN ");
        push_in_list(
            &mut stored,
            requested.iter().map(|((_, number), _)| number.get()),
        );
        let stored: BTreeMap<u64, Option<Vec<u8>>> = stored
            .build_query_as()
            .fetch_all(&mut **transaction)
            .await?
            .into_iter()
            .collect();
        let (existing, rows): (Vec<_>, Vec<_>) = requested
            .into_iter()
            .partition(|((_, number), _)| stored.contains_key(&number.get()));
        let mut taken = Vec::new();
        for (key, chat) in existing {
            let stored_event_id = stored.get(&key.1.get()).and_then(Option::as_deref);
            match chat.against(stored_event_id) {
                StoredChat::Claim(event_id) => {
                    MySqlStorage::claim_chat(transaction, *key, event_id, chat).await?;
                }
                StoredChat::Unchanged => {}
                StoredChat::TakenByAnotherEvent(event_id) => taken.push((key.1, event_id)),
            }
        }
        let scope = Scope::ChatsOf { application_id };
        conflicts.extend(MySqlStorage::number_conflicts(transaction, scope, taken).await?);
        if rows.is_empty() {
            continue;
        }
        new_chats.extend(rows.iter().map(|(key, chat)| (**key, chat.created_at)));
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO chats \
             (application_id, number, messages_count, created_at, updated_at, title, metadata, \
             event_id) ",
        );
        insert.push_values(rows, |mut row, ((application_id, number), chat)| {
            row.push_bind(*application_id)
                .push_bind(number.get())
                .push_bind(0u64)
                .push_bind(chat.created_at)
                .push_bind(now)
                .push_bind(chat.title.map(ChatTitle::as_str))
                .push_bind(chat.metadata.map(Metadata::as_str))
                .push_bind(chat.event_id.map(|id| id.as_bytes().to_vec()));
        });
        insert.build().execute(&mut **transaction).await?;
    }
    Ok(InsertedChats {
        deleted_applications: deleted,
        new_chats,
        conflicts,
    })
}

/// Internal ids of the given chats, looked up per application with the unique key.
pub(super) async fn chat_ids(
    transaction: &mut Transaction<'_, MySql>,
    keys: impl Iterator<Item = &ChatKey>,
) -> Result<BTreeMap<ChatKey, u64>, sqlx::Error> {
    let mut numbers_per_application: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (application_id, number) in keys {
        numbers_per_application
            .entry(*application_id)
            .or_default()
            .push(number.get());
    }
    let mut ids = BTreeMap::new();
    for (application_id, numbers) in numbers_per_application {
        let mut query =
            QueryBuilder::<MySql>::new("SELECT id, number FROM chats WHERE application_id = ");
        query.push_bind(application_id).push(" AND number IN ");
        push_in_list(&mut query, numbers);
        let rows: Vec<(u64, u64)> = query.build_query_as().fetch_all(&mut **transaction).await?;
        for (id, number) in rows {
            if let Some(number) = Number::new(number) {
                ids.insert((application_id, number), id);
            }
        }
    }
    Ok(ids)
}

/// Slices of `items` whose bodies add up to at most [`MAX_STATEMENT_BODY_BYTES`]: one multi-row
/// INSERT each.
pub(super) fn statement_chunks<T>(
    items: &[T],
    body_bytes: impl Fn(&T) -> usize,
) -> impl Iterator<Item = &[T]> {
    crate::chunks::bounded_by_bytes(items, MAX_STATEMENT_BODY_BYTES, body_bytes)
}

/// Inserts the messages of one chat that are not there yet; returns how many were new.
pub(super) async fn insert_messages(
    transaction: &mut Transaction<'_, MySql>,
    chat_id: u64,
    messages: &[&NewMessage<'_>],
) -> Result<u64, sqlx::Error> {
    let now = now();
    let mut inserted = 0;
    for chunk in statement_chunks(messages, |message| message.bytes()) {
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO messages \
             (chat_id, number, body, version, created_at, updated_at, event_id, sender, metadata) ",
        );
        insert.push_values(chunk, |mut row, message| {
            row.push_bind(chat_id)
                .push_bind(message.number.get())
                .push_bind(message.body)
                .push_bind(1u64)
                .push_bind(message.created_at)
                .push_bind(now)
                .push_bind(message.event_id.as_bytes().as_slice())
                .push_bind(message.sender.map(Sender::as_str))
                .push_bind(message.metadata.map(Metadata::as_str));
        });
        inserted += insert
            .build()
            .execute(&mut **transaction)
            .await?
            .rows_affected();
    }
    Ok(inserted)
}

/// The created change of a new message, with its places in its chat's log and its application's
/// feed.
pub(super) struct CreatedChange<'a> {
    pub(super) chat_id: u64,
    pub(super) sequence: u64,
    pub(super) application_id: u64,
    pub(super) application_sequence: u64,
    pub(super) message: &'a NewMessage<'a>,
}

/// Logs the created change of each new message.
pub(super) async fn insert_created_changes(
    transaction: &mut Transaction<'_, MySql>,
    changes: &[CreatedChange<'_>],
) -> Result<(), sqlx::Error> {
    let now = now();
    for chunk in statement_chunks(changes, |change| change.message.bytes()) {
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT INTO message_changes \
             (chat_id, sequence, application_id, application_sequence, number, version, kind, \
             body, message_created_at, occurred_at, sender, metadata) ",
        );
        insert.push_values(chunk, |mut row, change| {
            row.push_bind(change.chat_id)
                .push_bind(change.sequence)
                .push_bind(change.application_id)
                .push_bind(change.application_sequence)
                .push_bind(change.message.number.get())
                .push_bind(1u64)
                .push_bind(ChangeKind::Created.as_str())
                .push_bind(change.message.body)
                .push_bind(change.message.created_at)
                .push_bind(now)
                .push_bind(change.message.sender.map(Sender::as_str))
                .push_bind(change.message.metadata.map(Metadata::as_str));
        });
        insert.build().execute(&mut **transaction).await?;
    }
    Ok(())
}

/// The sequence of the created change of the messages of one chat among `numbers` that have one
/// (were stored before).
pub(super) async fn created_sequences(
    transaction: &mut Transaction<'_, MySql>,
    chat_id: u64,
    numbers: impl Iterator<Item = &Number>,
) -> Result<BTreeMap<Number, u64>, sqlx::Error> {
    let mut query = QueryBuilder::<MySql>::new(
        "SELECT number, MIN(sequence) FROM message_changes WHERE chat_id = ",
    );
    query.push_bind(chat_id).push(" AND number IN ");
    push_in_list(&mut query, numbers.map(|number| number.get()));
    query.push(" GROUP BY number");
    let rows: Vec<(u64, u64)> = query.build_query_as().fetch_all(&mut **transaction).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(number, sequence)| Some((Number::new(number)?, sequence)))
        .collect())
}

/// The last change sequence of each of `ids` in `table` (`chats` or `applications`).
pub(super) async fn last_change_sequences(
    transaction: &mut Transaction<'_, MySql>,
    table: &'static str,
    ids: impl ExactSizeIterator<Item = u64>,
) -> Result<BTreeMap<u64, u64>, sqlx::Error> {
    if ids.len() == 0 {
        return Ok(BTreeMap::new());
    }
    let mut query = QueryBuilder::<MySql>::new(format!(
        "SELECT id, last_change_sequence FROM {table} WHERE id IN "
    ));
    push_in_list(&mut query, ids);
    let rows: Vec<(u64, u64)> = query.build_query_as().fetch_all(&mut **transaction).await?;
    Ok(rows.into_iter().collect())
}

/// Number and event id of the stored messages of one chat among `numbers`.
pub(super) async fn stored_event_ids(
    transaction: &mut Transaction<'_, MySql>,
    chat_id: u64,
    numbers: impl Iterator<Item = &Number>,
) -> Result<Vec<(u64, Option<Vec<u8>>)>, sqlx::Error> {
    let mut query =
        QueryBuilder::<MySql>::new("SELECT number, event_id FROM messages WHERE chat_id = ");
    query.push_bind(chat_id).push(" AND number IN ");
    push_in_list(&mut query, numbers.map(|number| number.get()));
    query.build_query_as().fetch_all(&mut **transaction).await
}

/// `UPDATE <table> SET <column> = <column> + CASE id ... END, ...` for all rows and columns in one
/// statement (each column grows by the row's increment).
pub(super) async fn add_counts(
    transaction: &mut Transaction<'_, MySql>,
    table: &'static str,
    columns: &[&'static str],
    increments: &[(u64, u64)],
) -> Result<(), sqlx::Error> {
    if increments.is_empty() {
        return Ok(());
    }
    let mut update = QueryBuilder::<MySql>::new(format!("UPDATE {table} SET "));
    for (index, column) in columns.iter().enumerate() {
        if index > 0 {
            update.push(", ");
        }
        update.push(format!("{column} = {column} + CASE id"));
        for (id, increment) in increments {
            update
                .push(" WHEN ")
                .push_bind(*id)
                .push(" THEN ")
                .push_bind(*increment);
        }
        update.push(" ELSE 0 END");
    }
    update.push(" WHERE id IN ");
    push_in_list(&mut update, increments.iter().map(|(id, _)| *id));
    update.build().execute(&mut **transaction).await?;
    Ok(())
}

/// Appends `(?, ?, ...)` binding every value.
fn push_in_list(query: &mut QueryBuilder<MySql>, values: impl IntoIterator<Item = u64>) {
    query.push("(");
    let mut list = query.separated(", ");
    for value in values {
        list.push_bind(value);
    }
    query.push(")");
}
