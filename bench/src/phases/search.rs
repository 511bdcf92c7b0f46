//! Search latency: one client, then several, on one chat; then at scale (a chat of 1,000,000
//! messages, an application of 1,000 chats), their documents written straight into the index.

use crate::load::{self, Load, scatter};
use crate::phases::deep_pages::DEEP_CHAT_MESSAGES;
use crate::raw::{self, ChatRef};
use crate::{Bench, Target, api, application_id};

/// Concurrent clients of the search phase.
const SEARCH_CLIENTS: usize = 8;
/// The application of many chats whose search is measured: its chats, and the messages of each.
const MANY_CHATS: usize = 1_000;
const MANY_CHATS_MESSAGES: u64 = 100;

impl Bench {
    /// Search latency over `chats` (a query goes to one of them), one client at a time (the
    /// service time) and with [`SEARCH_CLIENTS`] concurrent (two cores shared with everything).
    pub async fn search(&mut self, token: &str, chats: &[u64], what: &str) -> anyhow::Result<()> {
        for clients in [1, SEARCH_CLIENTS] {
            // One client measures latency, not throughput: a quarter of the queries suffice.
            let queries = if clients == 1 {
                (self.settings.searches / 4).max(1)
            } else {
                self.settings.searches
            };
            let urls: Vec<String> = chats
                .iter()
                .map(|chat| {
                    self.api.url(&format!(
                        "/applications/{token}/chats/{chat}/messages/search"
                    ))
                })
                .collect();
            let api = self.api.clone();
            let searching = load::run(
                Load {
                    clients,
                    max_operations: queries,
                    max_duration: self.settings.max_phase(),
                    per_second: None,
                },
                move |sequence| {
                    let api = api.clone();
                    let url = urls[scatter(sequence, urls.len() as u64) as usize - 1].clone();
                    async move {
                        let response = api
                            .http()
                            .get(&url)
                            .query(&[("query", api::query(sequence as usize))])
                            .send()
                            .await?;
                        anyhow::ensure!(
                            response.status().is_success(),
                            "search answered {}",
                            response.status()
                        );
                        let _: serde_json::Value = response.json().await?;
                        Ok(())
                    }
                },
            );
            let (searched, cost) = self
                .measure(
                    &format!("{queries} searches, {clients} concurrent, on {what}"),
                    searching,
                )
                .await?;
            self.report.row(
                format!(
                    "search p50 / p99 ({} queries, {clients} concurrent, {what})",
                    searched.completed()
                ),
                searched.latencies.p50_p99(),
                "",
            );
            if clients > 1 {
                self.report.cpu(&format!("search, {what}"), &cost);
            }
        }
        Ok(())
    }

    /// Search on the chat of 1,000,000 messages of the pagination phase and on an application of
    /// 1,000 chats, their documents written straight into the index (bodies as the bench posts
    /// them).
    pub async fn search_at_scale(
        &mut self,
        target: &Target,
        deep_chat: Option<u64>,
    ) -> anyhow::Result<()> {
        let Some(storage) = &target.services else {
            self.report.note(
                "embedded stack: search on a chat of 1,000,000 messages and on an application of \
                 1,000 chats skipped (measured on Elasticsearch)",
            );
            return Ok(());
        };
        if let Some(chat) = deep_chat {
            let messages = DEEP_CHAT_MESSAGES;
            eprintln!(
                "bench: indexing the {messages} messages of the chat of the pagination phase"
            );
            raw::seed_index(
                &self.config,
                self.api.http(),
                &[storage.chat(chat)],
                messages,
            )
            .await?;
            self.search(&target.token, &[chat], &format!("chat of {messages}"))
                .await?;
        }
        let token = self.api.create_application().await?;
        let application_id = application_id(&storage.pool, &token).await?;
        eprintln!("bench: an application of {MANY_CHATS} chats of {MANY_CHATS_MESSAGES} messages");
        let mut chats = Vec::with_capacity(MANY_CHATS);
        for _ in 0..MANY_CHATS {
            chats.push(self.api.create_chat(&token).await?);
        }
        for &chat in &chats {
            self.api
                .wait_until_chat_stored(&token, chat, self.settings.max_phase())
                .await?;
        }
        let chat_refs: Vec<ChatRef> = chats
            .iter()
            .map(|&number| ChatRef {
                application_id,
                number,
            })
            .collect();
        raw::seed_index(
            &self.config,
            self.api.http(),
            &chat_refs,
            MANY_CHATS_MESSAGES,
        )
        .await?;
        self.search(
            &token,
            &chats,
            &format!("a chat of an application of {MANY_CHATS} chats of {MANY_CHATS_MESSAGES}"),
        )
        .await
    }
}
