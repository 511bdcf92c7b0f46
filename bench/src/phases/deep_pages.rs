//! Pagination at depth: a chat of [`DEEP_CHAT_MESSAGES`] messages written straight into the
//! storage, and the latencies of its first and its last page, one request at a time.

use std::time::{Duration, Instant};

use anyhow::bail;
use chatcore::Config;
use sqlx::Connection as _;

use crate::api::Api;
use crate::load::Latencies;
use crate::raw::SEEDED_SENDERS;
use crate::{Bench, application_digest};

/// The messages of the chat whose first and last page are timed.
pub const DEEP_CHAT_MESSAGES: u64 = 1_000_000;
/// Requests per page.
const PAGE_REQUESTS: usize = 400;

impl Bench {
    /// The chat of 1,000,000 messages and its first and last page; returns the chat, or None
    /// when skipped.
    pub async fn deep_pages(&mut self, token: &str) -> anyhow::Result<Option<u64>> {
        if !self.settings.deep_pages() {
            self.report
                .note("BENCH_DEEP_PAGES=0: the chat of 1,000,000 messages skipped");
            return Ok(None);
        }
        let messages = DEEP_CHAT_MESSAGES;
        eprintln!("bench: seeding a chat of {messages} messages for the pagination phase");
        let chat = self.stored_chat(token).await?;
        seed_deep_chat(&self.config, self.settings.embedded(), token, chat).await?;
        let (first_page, last_page) = page_latencies(&self.api, token, chat).await?;
        self.report.row(
            format!("list messages, page 1 p50 / p99 (chat of {messages})"),
            first_page.p50_p99(),
            "",
        );
        self.report.row(
            format!(
                "list messages, last page (after={}) p50 / p99",
                messages - 25
            ),
            last_page.p50_p99(),
            format!(
                "{:.2} of page 1 (p50)",
                last_page.percentile(0.50).as_secs_f64()
                    / first_page.percentile(0.50).as_secs_f64()
            ),
        );
        Ok(Some(chat))
    }
}

/// Writes [`DEEP_CHAT_MESSAGES`] messages straight into the storage (posting them through the api
/// would be most of the run, and only their reading is measured here), their senders in turn as
/// the index's seeding has them ([`crate::raw::seeded_sender`]).
async fn seed_deep_chat(
    config: &Config,
    embedded: bool,
    token: &str,
    chat: u64,
) -> anyhow::Result<()> {
    // The tables hold the token's digest only.
    let chat_id = "SELECT c.id FROM chats c JOIN application_tokens t \
                   ON t.application_id = c.application_id WHERE t.digest = ? AND c.number = ?";
    let digest = application_digest(token)?;
    if embedded {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(config.data_dir.join("chat.db"))
            .busy_timeout(Duration::from_secs(30));
        let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
        let id: i64 = sqlx::query_scalar(chat_id)
            .bind(&digest)
            .bind(chat as i64)
            .fetch_one(&mut connection)
            .await?;
        sqlx::query(
            "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < ?) \
             INSERT INTO messages (chat_id, number, body, created_at, updated_at, sender) \
             SELECT c.id, n, 'seeded message ' || n, c.created_at, c.created_at, 'sender-' || (n % ?) \
             FROM chats c, seq WHERE c.id = ?",
        )
        .bind(DEEP_CHAT_MESSAGES as i64)
        .bind(SEEDED_SENDERS as i64)
        .bind(id)
        .execute(&mut connection)
        .await?;
        connection.close().await?;
        return Ok(());
    }
    let pool = chatcore::store::mysql::connect(config.require_database_url()?, 1).await?;
    let id: u64 = sqlx::query_scalar(chat_id)
        .bind(&digest)
        .bind(chat as i64)
        .fetch_one(&pool)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO messages (chat_id, number, body, created_at, updated_at, sender) \
         SELECT c.id, s.seq, CONCAT('seeded message ', s.seq), c.created_at, c.created_at, \
         CONCAT('sender-', s.seq % {SEEDED_SENDERS}) \
         FROM chats c JOIN seq_1_to_{DEEP_CHAT_MESSAGES} s WHERE c.id = ?"
    )))
    .bind(id)
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}

/// Latencies of the first page and of the last page (`after`) of the deep chat, alternating, one
/// request at a time.
async fn page_latencies(
    api: &Api,
    token: &str,
    chat: u64,
) -> anyhow::Result<(Latencies, Latencies)> {
    let list = api.url(&format!(
        "/applications/{token}/chats/{chat}/messages?per_page=25"
    ));
    let last = format!("{list}&after={}", DEEP_CHAT_MESSAGES - 25);
    let (mut first_page, mut last_page) = (Vec::new(), Vec::new());
    for _ in 0..PAGE_REQUESTS {
        for (url, latencies, expected_first) in [
            (&list, &mut first_page, 1),
            (&last, &mut last_page, DEEP_CHAT_MESSAGES - 24),
        ] {
            let sent = Instant::now();
            let page = api.get(url).await?;
            latencies.push(sent.elapsed());
            if page["messages"][0]["number"].as_u64() != Some(expected_first) {
                bail!("unexpected page {url}: {page}");
            }
        }
    }
    Ok((Latencies::new(first_page), Latencies::new(last_page)))
}
