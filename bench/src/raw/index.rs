//! The raw index leg (`_bulk` of the indexer's documents) and the seeding of the index for
//! the search phases.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use chatcore::Config;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};

use super::{ChatRef, batch_size};
use crate::api::body;
use crate::persisted::IndexCount;
use crate::processes::Processes;
use crate::report::Measured;

/// How long written documents may take to become searchable (a refresh is due every second).
const VISIBILITY_BOUND: Duration = Duration::from_secs(60);
/// The chat number of the raw index leg's documents: no chat is ever numbered this high.
const RAW_BULK_CHAT: u64 = i64::MAX as u64;
/// Documents a `_bulk` of the seeding carries.
const SEEDING_BULK: usize = 5_000;
/// The senders of seeded messages, in turn: one sender has one in this many of a chat.
pub const SEEDED_SENDERS: u64 = 10;

/// Who sent the documents of a bulk, and when.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// As the api's messages of the bench: no sender, all at one time.
    Posted(DateTime<Utc>),
    /// Seeded: [`SEEDED_SENDERS`] senders in turn, message `n` created `n` seconds after the
    /// start.
    Seeded(DateTime<Utc>),
}

impl Origin {
    fn sender(self, number: u64) -> Option<String> {
        match self {
            Self::Posted(_) => None,
            Self::Seeded(_) => Some(seeded_sender(number)),
        }
    }

    fn created_at(self, number: u64) -> DateTime<Utc> {
        match self {
            Self::Posted(at) => at,
            Self::Seeded(start) => seeded_created_at(start, number),
        }
    }
}

/// The sender of the seeded message `number`.
pub fn seeded_sender(number: u64) -> String {
    format!("sender-{}", number % SEEDED_SENDERS)
}

/// When the seeded message `number` of a seeding that started at `start` was created.
pub fn seeded_created_at(start: DateTime<Utc>, number: u64) -> DateTime<Utc> {
    start + TimeDelta::seconds(number as i64)
}

/// The raw index leg: the documents the indexer writes for `count` created messages (the same
/// `_id` scheme, routing, external version 1 and source), sent with `_bulk` in bulks of the
/// indexer's batch size (its batches of envelopes of `events_per_message`), one at a time, without refresh, timed until they are searchable, as the
/// index leg is. They go into the stack's own index, under a chat number no chat has
/// ([`RAW_BULK_CHAT`]) of the run's new application, and are deleted afterwards: the same index
/// is the same cost per document (the lookups of external versions and the merges grow with the
/// index, so an empty scratch index would be cheaper). The request bodies are built before the
/// clock starts.
pub async fn bulk_leg(
    config: &Config,
    http: &reqwest::Client,
    processes: &Processes,
    chat: ChatRef,
    (count, events_per_message): (u64, usize),
) -> anyhow::Result<Measured> {
    let index = SearchIndex::new(config, http)?;
    let raw_chat = ChatRef {
        number: RAW_BULK_CHAT,
        ..chat
    };
    let bulk_size = batch_size(config, events_per_message);
    let measured = bulk_into(processes, &index, raw_chat, (count, bulk_size)).await;
    index.delete_chat_documents(raw_chat, count).await?;
    measured
}

/// The timed part of the raw index leg.
async fn bulk_into(
    processes: &Processes,
    index: &SearchIndex<'_>,
    chat: ChatRef,
    (count, bulk_size): (u64, usize),
) -> anyhow::Result<Measured> {
    let origin = Origin::Posted(chatcore::store::now());
    let numbers: Vec<u64> = (1..=count).collect();
    let bulks: Vec<String> = numbers
        .chunks(bulk_size)
        .map(|bulk| bulk_lines(chat, bulk, origin))
        .collect();
    let before = processes.sample();
    let started = Instant::now();
    for lines in bulks {
        index.send_bulk(lines).await?;
    }
    // The index leg is timed until its documents are searchable: so is this one.
    index.wait_until_searchable(chat, count).await?;
    let elapsed = started.elapsed();
    Ok(Measured {
        count,
        elapsed,
        cpu: processes.cpu_since(&before),
    })
}

/// Documents of `messages` created messages in each of `chats`, written straight into the
/// stack's index (posting them through the api would be most of the run; only searching them is
/// measured), in bulks of [`SEEDING_BULK`] documents, and refreshed. Their senders take turns and
/// their creation times are a second apart ([`seeded_sender`], [`seeded_created_at`] from the
/// start returned), so that filters on them select a known share.
pub async fn seed_index(
    config: &Config,
    http: &reqwest::Client,
    chats: &[ChatRef],
    messages: u64,
) -> anyhow::Result<DateTime<Utc>> {
    let index = SearchIndex::new(config, http)?;
    let start = chatcore::store::now() - TimeDelta::seconds(messages as i64);
    let numbers: Vec<u64> = (1..=messages).collect();
    for &chat in chats {
        for bulk in numbers.chunks(SEEDING_BULK) {
            index
                .send_bulk(bulk_lines(chat, bulk, Origin::Seeded(start)))
                .await?;
        }
    }
    index.refresh().await?;
    Ok(start)
}

/// The `_bulk` lines of the documents the indexer writes for the created messages `numbers` of
/// `chat` (the same `_id`, routing, external version 1 and source; the body the bench posts for
/// the message).
fn bulk_lines(chat: ChatRef, numbers: &[u64], origin: Origin) -> String {
    let routing = chat.search_key();
    let mut lines = String::new();
    for &number in numbers {
        let action = json!({"index": {
            "_id": format!("{routing}:{number}"),
            "routing": routing,
            "version": 1,
            "version_type": "external",
        }});
        let source = json!({
            "application_id": chat.application_id,
            "chat_number": chat.number,
            "chat": routing,
            "number": number,
            "body": body(number - 1),
            "created_at": origin.created_at(number),
            "sender": origin.sender(number),
            "metadata": null,
            "edited_at": null,
        });
        lines.push_str(&format!("{action}\n{source}\n"));
    }
    lines
}

/// The stack's search index (`ELASTICSEARCH_URL`, `CHAT_ES_INDEX`), written straight.
struct SearchIndex<'a> {
    http: &'a reqwest::Client,
    url: String,
    name: &'a str,
    bulk_url: String,
}

impl<'a> SearchIndex<'a> {
    fn new(config: &'a Config, http: &'a reqwest::Client) -> anyhow::Result<Self> {
        let url = config.require_elasticsearch_url()?.expose().to_owned();
        let name = config.elasticsearch_index.as_str();
        Ok(Self {
            http,
            bulk_url: format!("{url}/{name}/_bulk"),
            url,
            name,
        })
    }

    async fn send_bulk(&self, lines: String) -> anyhow::Result<()> {
        let response = self
            .http
            .post(&self.bulk_url)
            .header("content-type", "application/x-ndjson")
            .body(lines)
            .send()
            .await?;
        let status = response.status();
        let answer: Value = response.json().await?;
        if !status.is_success() || answer["errors"] != json!(false) {
            bail!("_bulk answered {status}: {answer}");
        }
        Ok(())
    }

    async fn refresh(&self) -> anyhow::Result<()> {
        let (url, name) = (&self.url, self.name);
        let status = self
            .http
            .post(format!("{url}/{name}/_refresh"))
            .send()
            .await?
            .status();
        ensure!(status.is_success(), "refreshing {name} answered {status}");
        Ok(())
    }

    /// Polls as the index leg is polled, until `count` documents of `chat` are visible to search.
    async fn wait_until_searchable(&self, chat: ChatRef, count: u64) -> anyhow::Result<()> {
        let documents = IndexCount::Elasticsearch {
            url: self.url.clone(),
            index: self.name.to_owned(),
            application_id: chat.application_id,
        };
        let deadline = Instant::now() + VISIBILITY_BOUND;
        loop {
            let visible = documents.count(self.http, chat.number).await?;
            if visible == count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the raw chat showed {visible} of {count} documents after {VISIBILITY_BOUND:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deletes the `count` documents of the raw index leg's `chat` (by `_id`:
    /// `_delete_by_query` is a module the bare Elasticsearch distribution lacks).
    async fn delete_chat_documents(&self, chat: ChatRef, count: u64) -> anyhow::Result<()> {
        let routing = chat.search_key();
        let numbers: Vec<u64> = (1..=count).collect();
        for bulk in numbers.chunks(SEEDING_BULK) {
            let mut lines = String::new();
            for number in bulk {
                let action =
                    json!({"delete": {"_id": format!("{routing}:{number}"), "routing": routing}});
                lines.push_str(&format!("{action}\n"));
            }
            self.send_bulk(lines).await?;
        }
        Ok(())
    }
}
