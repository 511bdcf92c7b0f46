//! Writes accepted chats and messages to MySQL in multi-row batches, idempotently.
//!
//! One transaction per batch: chats are inserted (also the chats that messages refer to, which
//! may not have arrived yet), then messages, and the counts grow by exactly the rows that were new,
//! so a redelivered batch changes nothing. The batch is acked only after the commit.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, anyhow};
use chatcore::Config;
use chatcore::consumer::{self, BatchHandler, HandleError, Received};
use chatcore::domain::Number;
use chatcore::events::EventPayload;
use chrono::{DateTime, Utc};
use sqlx::{MySql, MySqlPool, QueryBuilder, Transaction};
use tokio_util::sync::CancellationToken;

/// Upper bound of body bytes in one INSERT statement, well under MariaDB's 16 MiB packet default.
const MAX_STATEMENT_BODY_BYTES: usize = 4 * 1024 * 1024;

/// `/livez` and `/readyz` unless `CHAT_HEALTH_ADDR` says otherwise.
pub const DEFAULT_HEALTH_ADDR: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9091);

/// Consumes the ingest queue until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = chatcore::store::connect(&config.database_url, config.database_max_connections)
        .await
        .with_context(|| format!("connecting to mysql at {}", config.database_url))?;
    let handler = MysqlWriter { pool };
    consumer::run_worker(
        &config,
        &config.topology.ingest_queue,
        &handler,
        &shutdown,
        DEFAULT_HEALTH_ADDR,
    )
    .await
}

pub struct MysqlWriter {
    pool: MySqlPool,
}

type ChatKey = (u64, Number);

struct NewMessage<'a> {
    number: Number,
    body: &'a str,
    created_at: DateTime<Utc>,
}

impl BatchHandler for MysqlWriter {
    const OPERATION: &'static str = "mysql batch write";

    async fn handle(&self, batch: &[Received]) -> Result<(), HandleError> {
        self.write(batch).await.map_err(|error| {
            let transient = error
                .downcast_ref::<sqlx::Error>()
                .is_some_and(chatcore::store::is_transient);
            if transient {
                HandleError::Transient(error)
            } else {
                HandleError::Permanent(error)
            }
        })
    }
}

impl MysqlWriter {
    async fn write(&self, batch: &[Received]) -> anyhow::Result<()> {
        // Sorted maps give every transaction the same lock order, which keeps deadlocks away.
        let mut chats: BTreeMap<ChatKey, DateTime<Utc>> = BTreeMap::new();
        let mut messages: BTreeMap<ChatKey, BTreeMap<Number, NewMessage<'_>>> = BTreeMap::new();
        for received in batch {
            match &received.event.payload {
                EventPayload::ChatCreated {
                    application_id,
                    chat_number,
                    created_at,
                } => {
                    let earliest = chats
                        .entry((*application_id, *chat_number))
                        .or_insert(*created_at);
                    *earliest = (*earliest).min(*created_at);
                }
                EventPayload::MessageCreated {
                    application_id,
                    chat_number,
                    message_number,
                    body,
                    created_at,
                } => {
                    let key = (*application_id, *chat_number);
                    // A message may arrive before its chat: it creates the chat row if needed.
                    chats.entry(key).or_insert(*created_at);
                    messages.entry(key).or_default().insert(
                        *message_number,
                        NewMessage {
                            number: *message_number,
                            body,
                            created_at: *created_at,
                        },
                    );
                }
                // Updates are written synchronously by the api; only the indexer consumes them.
                EventPayload::MessageUpdated { .. } => {}
            }
        }
        if chats.is_empty() {
            return Ok(());
        }
        let mut transaction = self.pool.begin().await?;
        insert_chats(&mut transaction, &chats).await?;
        let chat_ids = chat_ids(&mut transaction, chats.keys()).await?;
        let mut new_messages_per_chat = Vec::new();
        for (key, chat_messages) in &messages {
            let chat_id = *chat_ids
                .get(key)
                .ok_or_else(|| anyhow!("chat {}:{} was not written", key.0, key.1))?;
            let inserted =
                insert_messages(&mut transaction, chat_id, chat_messages.values()).await?;
            if inserted > 0 {
                new_messages_per_chat.push((chat_id, inserted));
            }
        }
        add_counts(
            &mut transaction,
            "chats",
            "messages_count",
            &new_messages_per_chat,
        )
        .await?;
        transaction.commit().await?;
        Ok(())
    }
}

/// Inserts the chats that do not exist yet and grows `chats_count` by the new ones.
async fn insert_chats(
    transaction: &mut Transaction<'_, MySql>,
    chats: &BTreeMap<ChatKey, DateTime<Utc>>,
) -> anyhow::Result<()> {
    let application_ids: BTreeSet<u64> = chats
        .keys()
        .map(|(application_id, _)| *application_id)
        .collect();
    let mut known = QueryBuilder::<MySql>::new("SELECT id FROM applications WHERE id IN ");
    push_in_list(&mut known, application_ids.iter().copied());
    let known: BTreeSet<u64> = known
        .build_query_scalar()
        .fetch_all(&mut **transaction)
        .await?
        .into_iter()
        .collect();
    if let Some(unknown) = application_ids.difference(&known).next() {
        // Not transient: the application does not exist, so the event can never be written.
        return Err(anyhow!("application {unknown} does not exist"));
    }
    let now = chatcore::store::now();
    let mut new_chats_per_application = Vec::new();
    for application_id in application_ids {
        let rows: Vec<_> = chats
            .range((application_id, Number::new(1).expect("1 is positive"))..)
            .take_while(|((id, _), _)| *id == application_id)
            .collect();
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO chats (application_id, number, messages_count, created_at, updated_at) ",
        );
        insert.push_values(rows, |mut row, ((application_id, number), created_at)| {
            row.push_bind(*application_id)
                .push_bind(number.get())
                .push_bind(0u64)
                .push_bind(*created_at)
                .push_bind(now);
        });
        let inserted = insert
            .build()
            .execute(&mut **transaction)
            .await?
            .rows_affected();
        if inserted > 0 {
            new_chats_per_application.push((application_id, inserted));
        }
    }
    add_counts(
        transaction,
        "applications",
        "chats_count",
        &new_chats_per_application,
    )
    .await
}

/// Internal ids of the given chats, looked up per application with the unique key.
async fn chat_ids(
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

/// Inserts the messages of one chat that are not there yet; returns how many were new.
async fn insert_messages<'a>(
    transaction: &mut Transaction<'_, MySql>,
    chat_id: u64,
    messages: impl Iterator<Item = &'a NewMessage<'a>>,
) -> Result<u64, sqlx::Error> {
    let now = chatcore::store::now();
    let mut inserted = 0;
    let mut chunk: Vec<&NewMessage<'_>> = Vec::new();
    let mut chunk_bytes = 0;
    let mut messages = messages.peekable();
    while let Some(message) = messages.next() {
        chunk_bytes += message.body.len();
        chunk.push(message);
        let full = chunk_bytes >= MAX_STATEMENT_BODY_BYTES;
        if !full && messages.peek().is_some() {
            continue;
        }
        let mut insert = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO messages (chat_id, number, body, version, created_at, updated_at) ",
        );
        insert.push_values(chunk.drain(..), |mut row, message| {
            row.push_bind(chat_id)
                .push_bind(message.number.get())
                .push_bind(message.body)
                .push_bind(1u64)
                .push_bind(message.created_at)
                .push_bind(now);
        });
        inserted += insert
            .build()
            .execute(&mut **transaction)
            .await?
            .rows_affected();
        chunk_bytes = 0;
    }
    Ok(inserted)
}

/// `UPDATE <table> SET <column> = <column> + CASE id ... END` for all rows in one statement.
async fn add_counts(
    transaction: &mut Transaction<'_, MySql>,
    table: &'static str,
    column: &'static str,
    increments: &[(u64, u64)],
) -> anyhow::Result<()> {
    if increments.is_empty() {
        return Ok(());
    }
    let mut update =
        QueryBuilder::<MySql>::new(format!("UPDATE {table} SET {column} = {column} + CASE id"));
    for (id, increment) in increments {
        update
            .push(" WHEN ")
            .push_bind(*id)
            .push(" THEN ")
            .push_bind(*increment);
    }
    update.push(" ELSE 0 END WHERE id IN ");
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
