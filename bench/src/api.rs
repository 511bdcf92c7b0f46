//! The HTTP calls of the bench to the api, and the message bodies it posts (the raw legs write the
//! same bodies).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

const VOCABULARY: usize = 2000;

/// A client of the api under test.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base_url: String,
}

impl Api {
    pub fn new(base_url: &str, connections: usize) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            // The api closes a kept-alive connection that sends no request within
            // CHAT_HEADER_READ_TIMEOUT_MS (5 s): a connection idle for longer may be closed just
            // as it is reused ("connection closed before message completed").
            .pool_idle_timeout(Duration::from_secs(2))
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.to_owned(),
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A new application; its token.
    pub async fn create_application(&self) -> anyhow::Result<String> {
        let created = self
            .post(&self.url("/applications"), Some(json!({"name": "bench"})))
            .await?;
        Ok(created["token"].as_str().context("token")?.to_owned())
    }

    /// A new chat; its number.
    pub async fn create_chat(&self, token: &str) -> anyhow::Result<u64> {
        let created = self
            .post(&self.url(&format!("/applications/{token}/chats")), None)
            .await?;
        created["number"].as_u64().context("chat number")
    }

    /// Waits until the chat is in the storage (its creation goes through the ingest-worker).
    pub async fn wait_until_chat_stored(
        &self,
        token: &str,
        chat: u64,
        within: Duration,
    ) -> anyhow::Result<()> {
        let chat_url = self.url(&format!("/applications/{token}/chats/{chat}"));
        let deadline = Instant::now() + within;
        while !self.http.get(&chat_url).send().await?.status().is_success() {
            if Instant::now() > deadline {
                bail!("chat {chat} was not stored within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The messages the storage holds for the chat (its `messages_count`).
    pub async fn stored_message_count(&self, token: &str, chat: u64) -> anyhow::Result<u64> {
        let chat = self
            .get(&self.url(&format!("/applications/{token}/chats/{chat}")))
            .await?;
        chat["messages_count"].as_u64().context("messages_count")
    }

    pub async fn post(&self, url: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let request = self.http.post(url);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        answer(url, request.send().await?).await
    }

    pub async fn get(&self, url: &str) -> anyhow::Result<Value> {
        answer(url, self.http.get(url).send().await?).await
    }

    /// A `GET` with `credential` in `Authorization: Bearer`.
    pub async fn get_as(&self, url: &str, credential: &str) -> anyhow::Result<Value> {
        answer(
            url,
            self.http.get(url).bearer_auth(credential).send().await?,
        )
        .await
    }

    /// A client token of the application `token` that reads `chat`, for an hour.
    pub async fn mint_client_token(&self, token: &str, chat: u64) -> anyhow::Result<String> {
        let url = self.url("/application/client-tokens");
        let grant =
            json!({"sender": "bench", "chats": [chat], "scopes": ["read"], "expires_in": 3600});
        let request = self.http.post(&url).bearer_auth(token).json(&grant);
        let minted = answer(&url, request.send().await?).await?;
        Ok(minted["token"].as_str().context("client token")?.to_owned())
    }
}

async fn answer(url: &str, response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let value: Value = response.json().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {value}");
    }
    Ok(value)
}

/// A deterministic pseudo-random word list, so message bodies and queries share words.
pub fn word(index: usize) -> String {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "zu", "ri", "mo", "xa", "te",
        "qui",
    ];
    let mut value = index.wrapping_mul(2_654_435_761) % 65_536;
    let mut out = String::new();
    for _ in 0..3 {
        out.push_str(SYLLABLES[value % SYLLABLES.len()]);
        value /= SYLLABLES.len();
    }
    out.push_str(&index.to_string());
    out
}

/// The body of the message posted `seed`-th.
pub fn body(seed: u64) -> String {
    (0..10)
        .map(|i| word((seed as usize).wrapping_mul(31).wrapping_add(i * 7919) % VOCABULARY))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A search query: half whole words, half prefixes of them.
pub fn query(index: usize) -> String {
    let full = word(index * 13 % VOCABULARY);
    if index.is_multiple_of(2) {
        return full;
    }
    full[..4.min(full.len())].to_owned()
}
