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
    async fn count(&self, http: &reqwest::Client, chat: u64) -> anyhow::Result<u64> {
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

/// Polls until the chat holds `expected` messages in the storage and in the index.
pub async fn wait_until_persisted(
    api: &Api,
    index: &IndexCount,
    processes: &Processes,
    (token, chat): (&str, u64),
    expected: u64,
    within: Duration,
) -> anyhow::Result<Persisted> {
    let deadline = Instant::now() + within;
    let (mut stored, mut indexed) = (None, None);
    while stored.is_none() || indexed.is_none() {
        if Instant::now() > deadline {
            bail!("the {expected} messages of chat {chat} were not persisted within {within:?}");
        }
        if stored.is_none() && Leg::Storage.count(api, index, (token, chat)).await? == expected {
            stored = Some(reached(processes));
        }
        if indexed.is_none() && Leg::Index.count(api, index, (token, chat)).await? == expected {
            indexed = Some(reached(processes));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Persisted {
        stored: stored.context("storage")?,
        indexed: indexed.context("index")?,
    })
}

/// A downstream leg: where accepted messages end up.
#[derive(Clone, Copy, Debug)]
pub enum Leg {
    Storage,
    Index,
}

impl Leg {
    async fn count(
        self,
        api: &Api,
        index: &IndexCount,
        (token, chat): (&str, u64),
    ) -> anyhow::Result<u64> {
        match self {
            Self::Storage => api.stored_messages(token, chat).await,
            Self::Index => index.count(api.http(), chat).await,
        }
    }

    /// Polls until the chat holds `expected` messages at the end of this leg.
    pub async fn wait_until_done(
        self,
        api: &Api,
        index: &IndexCount,
        processes: &Processes,
        (token, chat): (&str, u64),
        expected: u64,
        within: Duration,
    ) -> anyhow::Result<Reached> {
        let deadline = Instant::now() + within;
        while self.count(api, index, (token, chat)).await? != expected {
            if Instant::now() > deadline {
                bail!("{self:?}: {expected} messages of chat {chat} not there within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(reached(processes))
    }
}

fn reached(processes: &Processes) -> Reached {
    Reached {
        at: Instant::now(),
        cpu: processes.sample(),
    }
}
