//! The client side of a live stream (Server-Sent Events).

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// One Server-Sent Event of a live stream.
#[derive(Debug, Clone)]
pub struct ServerSentEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

impl ServerSentEvent {
    /// The sequence of the event's change in the chat's change log (its `id:`).
    pub fn sequence(&self) -> anyhow::Result<u64> {
        self.id
            .as_deref()
            .context("an event without id")?
            .parse()
            .context("a numeric id")
    }

    /// The number of the event's message.
    pub fn number(&self) -> anyhow::Result<u64> {
        self.data["number"]
            .as_u64()
            .with_context(|| format!("a message number in {}", self.data))
    }
}

/// The client side of a live stream (`text/event-stream`), read as it arrives.
pub struct EventStream {
    pub(crate) response: reqwest::Response,
    /// Bytes received and not parsed yet (a chunk may end inside a character).
    pub(crate) buffer: Vec<u8>,
    /// Comment lines seen (the server's heartbeats).
    pub comments: usize,
}

/// How a wait for the next event ended.
#[derive(Debug)]
pub enum Next {
    Event(ServerSentEvent),
    /// The server ended the stream.
    Ended,
    /// Nothing arrived in time.
    Quiet,
}

impl EventStream {
    /// The answer that opened the stream (its headers).
    pub fn response(&self) -> &reqwest::Response {
        &self.response
    }

    /// The next event, the end of the stream, or nothing within `wait`.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Next> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\n\n") {
                let frame: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(event) = self.parse(std::str::from_utf8(&frame)?)? {
                    return Ok(Next::Event(event));
                }
                continue;
            }
            let chunk = match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return Ok(Next::Quiet),
                Ok(chunk) => chunk.context("reading the stream")?,
            };
            let Some(chunk) = chunk else {
                return Ok(Next::Ended);
            };
            self.buffer.extend_from_slice(&chunk);
        }
    }

    /// The next event, failing when the stream ends or stays quiet for `wait`.
    pub async fn expect_event(&mut self, wait: Duration) -> anyhow::Result<ServerSentEvent> {
        match self.next(wait).await? {
            Next::Event(event) => Ok(event),
            other => bail!("expected an event, got {other:?}"),
        }
    }

    fn parse(&mut self, frame: &str) -> anyhow::Result<Option<ServerSentEvent>> {
        let (mut id, mut event, mut data) = (None, "message".to_owned(), String::new());
        for line in frame.lines() {
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_owned()),
                "event" => event = value.to_owned(),
                "data" => data.push_str(value),
                _ => {}
            }
        }
        if data.is_empty() {
            return Ok(None);
        }
        Ok(Some(ServerSentEvent {
            id,
            event,
            data: serde_json::from_str(&data).context("an event whose data is not JSON")?,
        }))
    }
}
