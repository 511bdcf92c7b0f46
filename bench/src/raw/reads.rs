//! The raw reads: the storage's SELECTs of one message and of one page.

use anyhow::ensure;
use chatcore::domain::{PagePosition, PageRequest};
use chatcore::store::MessageRow;
use sqlx::MySqlPool;

use super::ChatRef;
use crate::load::{self, Load, Outcome, scatter};

/// The storage's SELECT of one message (`find_message` of `chatcore::store`), over the first
/// `stored` messages of the chat, scattered.
pub async fn message_lookups(
    pool: &MySqlPool,
    chat: ChatRef,
    stored: u64,
    load: Load,
) -> anyhow::Result<Outcome> {
    let pool = pool.clone();
    load::run(load, move |sequence| {
        let pool = pool.clone();
        async move {
            let found: Option<MessageRow> = sqlx::query_as(
                "SELECT m.number, m.body, m.version, m.created_at, m.updated_at, m.sender, m.metadata, m.edited_at \
                 FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? AND m.number = ? AND m.deleted_at IS NULL",
            )
            .bind(chat.application_id as i64)
            .bind(chat.number as i64)
            .bind(scatter(sequence, stored) as i64)
            .fetch_optional(&pool)
            .await?;
            ensure!(found.is_some(), "a stored message was not found");
            Ok(())
        }
    })
    .await
}

/// The storage's SELECT of one page (`list_messages` of `chatcore::store`) of `per_page`
/// messages after a scattered number ([`page_after`]).
pub async fn page_lookups(
    pool: &MySqlPool,
    chat: ChatRef,
    (stored, per_page): (u64, u32),
    load: Load,
) -> anyhow::Result<Outcome> {
    let pool = pool.clone();
    load::run(load, move |sequence| {
        let pool = pool.clone();
        let page = PageRequest {
            per_page,
            position: PagePosition::After(page_after(sequence, stored, per_page)),
        };
        async move {
            let (from, to) = page.key_bounds();
            let rows: Vec<MessageRow> = sqlx::query_as(
                "SELECT m.number, m.body, m.version, m.created_at, m.updated_at, m.sender, m.metadata, m.edited_at \
                 FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? AND m.number BETWEEN ? AND ? \
                 AND m.deleted_at IS NULL ORDER BY m.number ASC LIMIT ? OFFSET ?",
            )
            .bind(chat.application_id as i64)
            .bind(chat.number as i64)
            .bind(from as i64)
            .bind(to as i64)
            .bind(page.fetch_limit() as i64)
            .bind(page.offset() as i64)
            .fetch_all(&pool)
            .await?;
            ensure!(!rows.is_empty(), "a page of stored messages was empty");
            Ok(())
        }
    })
    .await
}

/// The `after` of the `sequence`-th page read: scattered so that a full page follows it.
pub fn page_after(sequence: u64, stored: u64, per_page: u32) -> u64 {
    scatter(sequence, stored.saturating_sub(u64::from(per_page)) + 1) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_page_follows_every_scattered_after() {
        for sequence in 0..500 {
            let after = page_after(sequence, 1000, 100);
            assert!(after <= 900, "{after}");
        }
        assert_eq!(page_after(7, 50, 100), 0, "fewer messages than a page");
    }
}
