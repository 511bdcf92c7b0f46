//! One delivery: a signed POST with bounded time, no redirects followed, and only the start of
//! the answer read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::WebhookSecret;
use crate::config::WebhookConfig;
use bytes::Bytes;
use reqwest::Url;

use super::destination::{GuardedResolver, check_address, literal_address};
use super::signing::signature_header;

/// How much of an answer or an error is kept with the attempt.
const KEPT_CHARS: usize = 500;

/// What one attempt got.
#[derive(Debug)]
pub struct Attempted {
    pub status: Option<u16>,
    pub error: Option<String>,
    /// The start of the answer's body.
    pub response: Option<String>,
    pub duration: Duration,
}

impl Attempted {
    pub fn succeeded(&self) -> bool {
        self.status
            .is_some_and(|status| (200..300).contains(&status))
    }
}

/// The HTTP client of the deliveries (pooled connections, one per endpoint host in use).
pub struct Deliverer {
    client: reqwest::Client,
    allowed: Arc<super::AllowedDestinations>,
    max_response_bytes: usize,
}

impl Deliverer {
    pub fn new(config: &WebhookConfig) -> anyhow::Result<Self> {
        let allowed = Arc::new(config.allowed.clone());
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .dns_resolver(Arc::new(GuardedResolver {
                allowed: Arc::clone(&allowed),
            }))
            .user_agent(concat!("chat-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            allowed,
            max_response_bytes: config.max_response_bytes,
        })
    }

    /// POSTs `body` to `url`, signed with every secret given.
    pub async fn deliver(
        &self,
        url: &str,
        webhook_id: &str,
        timestamp: i64,
        body: Bytes,
        secrets: &[WebhookSecret],
    ) -> Attempted {
        let started = Instant::now();
        let failed = |error: String| Attempted {
            status: None,
            error: Some(kept(&error)),
            response: None,
            duration: started.elapsed(),
        };
        let url = match Url::parse(url) {
            Ok(url) => url,
            Err(error) => return failed(format!("not a URL: {error}")),
        };
        // A literal address is not resolved, so the resolver's check does not see it.
        if let Some(address) = literal_address(&url)
            && let Err(refused) = check_address(address, &self.allowed)
        {
            return failed(refused.0);
        }
        let signature = signature_header(webhook_id, timestamp, &body, secrets);
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => return failed(describe(&error)),
        };
        let status = response.status().as_u16();
        let mut read = Vec::new();
        while read.len() < self.max_response_bytes {
            match response.chunk().await {
                Ok(Some(chunk)) => read.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        read.truncate(self.max_response_bytes);
        Attempted {
            status: Some(status),
            error: None,
            response: (!read.is_empty()).then(|| kept(&String::from_utf8_lossy(&read))),
            duration: started.elapsed(),
        }
    }
}

/// A client error with its causes (reqwest's own text says only "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        String::from("timed out")
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn kept(text: &str) -> String {
    text.chars().take(KEPT_CHARS).collect()
}
