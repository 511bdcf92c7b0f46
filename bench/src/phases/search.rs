//! Search latency: one client, then several, on one chat; then at scale (a chat of 1,000,000
//! messages, an application of 1,000 chats), their documents written straight into the index.
//! On the chat of 1,000,000: the p99 against [`P99_GOALS`], the documents a page visits on the
//! index for a 4-letter prefix and a whole word (the profile API's count: the index is sorted by
//! number, so a page of a rank stops early), and a filtered search too (one sender, a time range,
//! newest first), whose p99 is to stay within [`FILTERED_P99_GOAL`] of the unfiltered one's in the
//! same run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chatcore::domain::{Number, SearchInput, SearchRequest};
use chrono::{DateTime, SecondsFormat, Utc};

use crate::load::{self, Load, ms, scatter};
use crate::phases::deep_pages::DEEP_CHAT_MESSAGES;
use crate::raw::{self, ChatRef, SEEDED_SENDERS, seeded_created_at, seeded_sender};
use crate::report::met;
use crate::{Bench, Target, api, application_id};

/// Concurrent clients of the search phase.
const SEARCH_CLIENTS: usize = 8;
/// The application of many chats whose search is measured: its chats, and the messages of each.
const MANY_CHATS: usize = 1_000;
const MANY_CHATS_MESSAGES: u64 = 100;
/// The most a filtered search's p99 may be of the unfiltered one's on the same chat.
const FILTERED_P99_GOAL: f64 = 1.5;
/// The p99 of a search on the chat of 1,000,000 with each number of concurrent clients, at most.
const P99_GOALS: [(usize, Duration); 2] = [
    (1, Duration::from_millis(25)),
    (SEARCH_CLIENTS, Duration::from_millis(50)),
];
/// The hits of a page whose visited documents are counted (the api's default page).
const VISITED_PAGE: u32 = 25;

/// The query parameters of a search beside its words.
type SearchParameters = Vec<(&'static str, String)>;

/// The p99 of a search with each number of concurrent clients.
type P99s = Vec<(usize, Duration)>;

impl Bench {
    /// Search latency over `chats` (a query goes to one of them, with `parameters`), one client
    /// at a time (the service time) and with [`SEARCH_CLIENTS`] concurrent (two cores shared with
    /// everything); returns the p99 of each.
    pub async fn search(
        &mut self,
        token: &str,
        chats: &[u64],
        what: &str,
        parameters: SearchParameters,
    ) -> anyhow::Result<P99s> {
        let parameters = Arc::new(parameters);
        let mut p99s = Vec::new();
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
            let parameters = Arc::clone(&parameters);
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
                    let parameters = Arc::clone(&parameters);
                    async move {
                        let response = api
                            .http()
                            .get(&url)
                            .query(&[("query", api::query(sequence as usize))])
                            .query(parameters.as_slice())
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
            p99s.push((clients, searched.latencies.percentile(0.99)));
        }
        Ok(p99s)
    }

    /// The rows of the filtered search's p99 against the unfiltered one's, with the goal.
    fn filter_cost(&mut self, what: &str, unfiltered: &P99s, filtered: &P99s) {
        for ((clients, plain), (_, filtered)) in unfiltered.iter().zip(filtered) {
            let ratio = filtered.as_secs_f64() / plain.as_secs_f64();
            eprintln!(
                "bench: filtered search p99 {} against {} unfiltered ({clients} concurrent)",
                ms(*filtered),
                ms(*plain)
            );
            self.report.row(
                format!("filtered / unfiltered search p99 ({clients} concurrent, {what})"),
                format!("{} / {}", ms(*filtered), ms(*plain)),
                format!(
                    "{ratio:.2}; goal ≤ {FILTERED_P99_GOAL}: {}",
                    met(ratio <= FILTERED_P99_GOAL)
                ),
            );
        }
    }

    /// The rows of the p99s against [`P99_GOALS`].
    fn p99_goals(&mut self, what: &str, p99s: &P99s) {
        for (clients, p99) in p99s {
            let Some((_, goal)) = P99_GOALS
                .iter()
                .find(|(goal_clients, _)| goal_clients == clients)
            else {
                continue;
            };
            self.report.row(
                format!("search p99 ({clients} concurrent, {what})"),
                ms(*p99),
                format!("goal ≤ {}: {}", ms(*goal), met(p99 <= goal)),
            );
        }
    }

    /// The rows of the documents a relevance page of [`VISITED_PAGE`] hits visits on the index,
    /// for a 4-letter prefix and a whole word of the bench's queries, against those a search in
    /// the order against the index's (oldest first) visits.
    async fn visited_documents(&mut self, chat: ChatRef, what: &str) -> anyhow::Result<()> {
        let index = chatcore::adapters::elasticsearch(&self.config)?;
        let chat_number = Number::new(chat.number).context("a chat number is at least 1")?;
        // The bench's odd queries are 4-letter prefixes, its even ones whole words.
        for (kind, query) in [("4-letter prefix", api::query(1)), ("word", api::query(0))] {
            let request = |sort: &str| {
                SearchRequest::parse(
                    SearchInput {
                        query: Some(&query),
                        sort: Some(sort),
                        ..SearchInput::default()
                    },
                    VISITED_PAGE,
                    VISITED_PAGE,
                )
            };
            let visited = index
                .visited_documents(chat.application_id, chat_number, &request("relevance")?)
                .await?;
            let oldest_first = index
                .visited_documents(chat.application_id, chat_number, &request("oldest")?)
                .await?;
            eprintln!(
                "bench: a page of \"{query}\" visited {visited} documents ({oldest_first} oldest first)"
            );
            self.report.row(
                format!(
                    "documents visited by a page of {VISITED_PAGE}, {kind} \"{query}\" ({what})"
                ),
                format!("{visited}"),
                format!("{oldest_first} visited oldest first"),
            );
        }
        Ok(())
    }

    /// Search on a chat of 1,000,000 messages (`deep_chat`: the pagination phase's, or a new chat
    /// when only the search runs) and on an application of 1,000 chats, their documents written
    /// straight into the index (bodies as the bench posts them).
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
            let start = raw::seed_index(
                &self.config,
                self.api.http(),
                &[storage.chat(chat)],
                messages,
            )
            .await?;
            let what = format!("chat of {messages}");
            let unfiltered = self
                .search(&target.token, &[chat], &what, Vec::new())
                .await?;
            self.p99_goals(&what, &unfiltered);
            self.visited_documents(storage.chat(chat), &what).await?;
            let filtered = self
                .search(
                    &target.token,
                    &[chat],
                    &format!(
                        "{what}, filtered: 1 sender of {SEEDED_SENDERS}, half the time, newest first"
                    ),
                    filtered_search(start, messages),
                )
                .await?;
            self.filter_cost(&what, &unfiltered, &filtered);
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
            Vec::new(),
        )
        .await?;
        Ok(())
    }
}

/// The filter of the filtered search on a seeded chat of `messages` whose seeding started at
/// `start`: one sender of [`SEEDED_SENDERS`], the middle half of the chat's time, newest first
/// (a twentieth of the chat).
fn filtered_search(start: DateTime<Utc>, messages: u64) -> SearchParameters {
    let time =
        |number: u64| seeded_created_at(start, number).to_rfc3339_opts(SecondsFormat::Millis, true);
    vec![
        ("sender", seeded_sender(3)),
        ("created_after", time(messages / 4)),
        ("created_before", time(messages / 4 * 3)),
        ("sort", "newest".to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filtered_search_keeps_a_twentieth_of_the_seeded_chat() {
        let (start, messages) = (chatcore::store::now(), 1_000);
        let filter = filtered_search(start, messages);
        let value = |name: &str| {
            filter
                .iter()
                .find(|(parameter, _)| *parameter == name)
                .map(|(_, value)| value.as_str())
        };
        let request = SearchRequest::parse(
            SearchInput {
                query: Some("word"),
                sender: value("sender"),
                created_after: value("created_after"),
                created_before: value("created_before"),
                sort: value("sort"),
                ..SearchInput::default()
            },
            25,
            100,
        )
        .expect("the api takes the filter");
        let created = request.filter.created;
        let kept = (1..=messages)
            .filter(|&number| {
                let at = seeded_created_at(start, number);
                Some(seeded_sender(number).as_str())
                    == request.filter.sender.as_ref().map(|s| s.as_str())
                    && created.after.is_none_or(|after| at >= after)
                    && created.before.is_none_or(|before| at < before)
            })
            .count();
        assert_eq!(kept as u64, messages / (2 * SEEDED_SENDERS));
    }
}
