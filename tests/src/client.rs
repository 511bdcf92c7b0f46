//! A JSON HTTP client of the API.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{EventStream, StatusCode, TEST_ADMIN_TOKEN};

/// A JSON HTTP client bound to the API base URL.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
}

/// Status and parsed JSON body of a response (Null when the body is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Client {
    pub fn new(base_url: &str) -> Self {
        Self::with_headers(base_url, reqwest::header::HeaderMap::new())
    }

    /// A client at another address, as an api behind one trusted proxy
    /// (`CHAT_TRUSTED_PROXY_HOPS=1`) sees it: every request carries `X-Forwarded-For: address`.
    pub fn forwarded_for(base_url: &str, address: &str) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-forwarded-for", address.parse()?);
        Ok(Self::with_headers(base_url, headers))
    }

    fn with_headers(base_url: &str, headers: reqwest::header::HeaderMap) -> Self {
        Self {
            http: reqwest::Client::builder()
                .default_headers(headers)
                .pool_max_idle_per_host(256)
                // Below the api's CHAT_HEADER_READ_TIMEOUT_MS (5 s), after which it closes a
                // kept-alive connection: reusing one just then fails the request.
                .pool_idle_timeout(Duration::from_secs(2))
                .build()
                .expect("client builds"),
            base_url: base_url.to_owned(),
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.get(self.url(path))).await
    }

    /// A GET with the admin token of the tests.
    pub async fn get_as_admin(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.get(self.url(path)).bearer_auth(TEST_ADMIN_TOKEN))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Reply> {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    pub async fn post_empty(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.post(self.url(path))).await
    }

    pub async fn put(&self, path: &str, body: Value) -> anyhow::Result<Reply> {
        self.send(self.http.put(self.url(path)).json(&body)).await
    }

    pub async fn send_raw(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
        self.send(request).await
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
        let response = request.send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }

    /// Creates an application and returns its token.
    /// Creates an application (201) and returns its token. A 503 of a loaded machine is retried
    /// (for up to a minute): at worst an application too many, which no test counts.
    pub async fn create_application(&self, name: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let reply = self
                .post("/applications", serde_json::json!({ "name": name }))
                .await?;
            if reply.status == StatusCode::SERVICE_UNAVAILABLE
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            anyhow::ensure!(
                reply.status == StatusCode::CREATED,
                "create application: {reply:?}"
            );
            return Ok(reply.body["token"].as_str().context("token")?.to_owned());
        }
    }

    /// Creates a chat (202) and returns its number, as the README tells clients to: with an
    /// `Idempotency-Key` of its own, a 503 of a loaded machine retried with it.
    pub async fn create_chat(&self, token: &str) -> anyhow::Result<u64> {
        self.create_chat_carefully(token, &uuid::Uuid::new_v4().to_string())
            .await
    }

    /// Posts a message as a careful client does: with an `Idempotency-Key`, retrying on 5xx and
    /// 409 (in progress) with the same key until it is accepted; returns its number.
    pub async fn create_message_carefully(
        &self,
        token: &str,
        chat: u64,
        body: &str,
        idempotency_key: &str,
    ) -> anyhow::Result<u64> {
        self.post_carefully(
            &format!("/applications/{token}/chats/{chat}/messages"),
            Some(serde_json::json!({ "body": body })),
            idempotency_key,
        )
        .await
        .context("create message")
    }

    /// Creates a chat as a careful client does (see [`Self::create_message_carefully`]).
    pub async fn create_chat_carefully(
        &self,
        token: &str,
        idempotency_key: &str,
    ) -> anyhow::Result<u64> {
        self.post_carefully(
            &format!("/applications/{token}/chats"),
            None,
            idempotency_key,
        )
        .await
        .context("create chat")
    }

    /// POSTs until a 202, retrying 5xx, 409 and dropped connections with the same
    /// `Idempotency-Key` for up to a minute; returns the number.
    async fn post_carefully(
        &self,
        path: &str,
        body: Option<Value>,
        idempotency_key: &str,
    ) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut request = self
                .request(reqwest::Method::POST, path)
                .header("idempotency-key", idempotency_key);
            if let Some(body) = &body {
                request = request.json(body);
            }
            match self.send(request).await {
                Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                    return reply.body["number"].as_u64().context("number");
                }
                Ok(reply)
                    if !(reply.status.is_server_error()
                        || reply.status == StatusCode::CONFLICT) =>
                {
                    bail!("refused: {reply:?}")
                }
                // A 5xx, a 409 or a dropped connection: the same request again.
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => bail!("kept failing: {other:?}"),
            }
        }
    }

    /// Opens the live stream of a chat (resuming after `last_event_id`); the error reply when
    /// it is refused.
    pub async fn stream(
        &self,
        token: &str,
        chat: u64,
        last_event_id: Option<u64>,
    ) -> anyhow::Result<Result<EventStream, Reply>> {
        let mut request = self
            .request(
                reqwest::Method::GET,
                &format!("/applications/{token}/chats/{chat}/messages/stream"),
            )
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        self.stream_of(request).await
    }

    /// Opens a live stream as `request` asks (a browser's, say); the error reply when it is
    /// refused.
    pub async fn stream_of(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<Result<EventStream, Reply>> {
        let response = request.send().await?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let bytes = response.bytes().await?;
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Ok(Err(Reply { status, body }));
        }
        Ok(Ok(EventStream {
            response,
            buffer: Vec::new(),
            comments: 0,
        }))
    }

    /// [`Client::stream`], failing when the stream is refused.
    pub async fn open_stream(
        &self,
        token: &str,
        chat: u64,
        last_event_id: Option<u64>,
    ) -> anyhow::Result<EventStream> {
        self.stream(token, chat, last_event_id)
            .await?
            .map_err(|reply| anyhow::anyhow!("the stream was refused: {reply:?}"))
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.delete(self.url(path))).await
    }

    /// Posts a message (202) and returns its number, as the README tells clients to: with an
    /// `Idempotency-Key` of its own, a 503 of a loaded machine retried with it.
    pub async fn create_message(&self, token: &str, chat: u64, body: &str) -> anyhow::Result<u64> {
        self.create_message_carefully(token, chat, body, &uuid::Uuid::new_v4().to_string())
            .await
    }
}

/// The hits of a search (its first page), in the relevance order, as the API answers them.
pub async fn search_hits(
    client: &Client,
    token: &str,
    chat: u64,
    query: &str,
) -> anyhow::Result<Vec<Value>> {
    let reply = client
        .send_raw(
            client
                .request(
                    reqwest::Method::GET,
                    &format!("/applications/{token}/chats/{chat}/messages/search"),
                )
                .query(&[("query", query)]),
        )
        .await?;
    anyhow::ensure!(
        reply.status == StatusCode::OK,
        "search {query:?}: {reply:?}"
    );
    Ok(reply.body["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The numbers of the hits of a search (its first page), in the relevance order.
pub async fn search(
    client: &Client,
    token: &str,
    chat: u64,
    query: &str,
) -> anyhow::Result<Vec<u64>> {
    Ok(search_hits(client, token, chat, query)
        .await?
        .iter()
        .filter_map(|hit| hit["number"].as_u64())
        .collect())
}
