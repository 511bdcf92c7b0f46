//! Waiting until accepted messages are in the storage and in the search index: the moments the
//! downstream legs finish, with a CPU sample taken at each.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::api::Api;
use crate::processes::{CpuSample, Processes};

/// Where the bench counts the indexed messages of a chat.
pub enum IndexCount {
    Elasticsearch {
        url: String,
        index: String,
        application_id: u64,
    },
    /// The embedded FTS5 file (the bench's chats are the only ones with messages).
    Embedded(std::path::PathBuf),
}

impl IndexCount {
    /// The documents of `chat` visible to search.
    pub async fn count(&self, http: &reqwest::Client, chat: u64) -> anyhow::Result<u64> {
        match self {
            Self::Elasticsearch {
                url,
                index,
                application_id,
            } => {
                let routing = format!("{application_id}:{chat}");
                let count: Value = http
                    .post(format!("{url}/{index}/_count?routing={routing}"))
                    .json(&json!({"query": {"term": {"chat": routing}}}))
                    .send()
                    .await?
                    .json()
                    .await?;
                count["count"].as_u64().context("count")
            }
            Self::Embedded(path) => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true);
                let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM search_documents")
                    .fetch_one(&mut connection)
                    .await?;
                connection.close().await?;
                Ok(u64::try_from(count)?)
            }
        }
    }
}

/// When a leg was done, with the CPU of every process at that moment.
pub struct Reached {
    pub at: Instant,
    pub cpu: CpuSample,
}

pub struct Persisted {
    pub stored: Reached,
    pub indexed: Reached,
}

/// A chat whose messages the bench waits for: where it asks (the api for the storage, the index
/// directly) and whose CPU it samples when they are there.
pub struct ChatWatch<'a> {
    pub api: &'a Api,
    pub index: &'a IndexCount,
    pub processes: &'a Processes,
    pub token: &'a str,
    pub chat: u64,
}

impl ChatWatch<'_> {
    /// Polls until the chat holds `expected` messages in the storage and in the index.
    pub async fn wait_until_persisted(
        &self,
        expected: u64,
        within: Duration,
    ) -> anyhow::Result<Persisted> {
        let deadline = Instant::now() + within;
        let (mut stored, mut indexed) = (None, None);
        while stored.is_none() || indexed.is_none() {
            if Instant::now() > deadline {
                bail!(
                    "the {expected} messages of chat {} were not persisted within {within:?}",
                    self.chat
                );
            }
            if stored.is_none() && self.count(Leg::Storage).await? == expected {
                stored = Some(self.reached());
            }
            if indexed.is_none() && self.count(Leg::Index).await? == expected {
                indexed = Some(self.reached());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Persisted {
            stored: stored.context("storage")?,
            indexed: indexed.context("index")?,
        })
    }

    /// Polls until the chat holds `expected` messages at the end of `leg`.
    pub async fn wait_until_leg_done(
        &self,
        leg: Leg,
        expected: u64,
        within: Duration,
    ) -> anyhow::Result<Reached> {
        let deadline = Instant::now() + within;
        while self.count(leg).await? != expected {
            if Instant::now() > deadline {
                bail!(
                    "{leg:?}: {expected} messages of chat {} not there within {within:?}",
                    self.chat
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(self.reached())
    }

    async fn count(&self, leg: Leg) -> anyhow::Result<u64> {
        match leg {
            Leg::Storage => self.api.stored_message_count(self.token, self.chat).await,
            Leg::Index => self.index.count(self.api.http(), self.chat).await,
        }
    }

    fn reached(&self) -> Reached {
        Reached {
            at: Instant::now(),
            cpu: self.processes.sample(),
        }
    }
}

/// A downstream leg: where accepted messages end up.
#[derive(Clone, Copy, Debug)]
pub enum Leg {
    Storage,
    Index,
}
