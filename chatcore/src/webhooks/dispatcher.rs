//! The dispatch loop: every poll it leases the endpoints that are due and have changes after
//! their position, and delivers each one's changes in feed order (one delivery at a time per
//! endpoint, so each chat's arrive in order), advancing its position after every 2xx. A failed
//! delivery is due again after a backoff and blocks the endpoint's later ones until it succeeds,
//! is replayed past, or the endpoint is disabled for failing too long.

use std::sync::Arc;
use std::time::Duration;

use super::{EventType, EventTypes};
use crate::config::WebhookConfig;
use crate::feed::FeedChangeView;
use crate::health::Readiness;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::store::{
    ApplicationChangeRow, DeliveryProgress, EndpointRow, NewAttempt, Storage, StorageError,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::delivery::{Attempted, Deliverer};

/// Changes read from the feed at once for one endpoint.
const FEED_PAGE: u32 = 100;
/// How often attempts older than the retention are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

pub struct Dispatcher {
    storage: Arc<dyn Storage>,
    deliverer: Deliverer,
    config: WebhookConfig,
    /// This process's name in the endpoints' leases.
    owner: String,
    /// How long a lease lasts unless renewed: well above one delivery's longest time.
    lease: Duration,
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

impl Dispatcher {
    pub fn new(
        storage: Arc<dyn Storage>,
        config: WebhookConfig,
        metrics: Arc<Metrics>,
        readiness: Readiness,
    ) -> anyhow::Result<Self> {
        let owner = format!(
            "{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "dispatcher".into()),
            rand::rng().random::<u32>()
        );
        Ok(Self {
            deliverer: Deliverer::new(&config)?,
            lease: config.timeout * 3 + Duration::from_secs(5),
            storage,
            config,
            owner,
            metrics,
            readiness,
        })
    }

    /// Delivers until `shutdown`; then lets the deliveries in flight end (each within the
    /// delivery timeout) and records where they stopped.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.config.max_in_flight));
        let mut endpoints = JoinSet::new();
        let mut pruned_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
            while endpoints.try_join_next().is_some() {}
            let free = slots.available_permits();
            if free > 0 {
                match self
                    .storage
                    .webhooks()
                    .claim_due_endpoints(&self.owner, self.lease, free as u32)
                    .await
                {
                    Ok(claimed) => {
                        self.readiness.set(true);
                        for endpoint in claimed {
                            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                                break;
                            };
                            let (dispatcher, shutdown) = (Arc::clone(&self), shutdown.clone());
                            endpoints.spawn(dispatcher.serve_endpoint(endpoint, slot, shutdown));
                        }
                    }
                    Err(error) => {
                        self.readiness.set(false);
                        tracing::warn!(%error, "cannot claim webhook endpoints");
                    }
                }
            }
            if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                pruned_at = Some(tokio::time::Instant::now());
                self.prune_attempts().await;
            }
        }
        while endpoints.join_next().await.is_some() {}
    }

    async fn prune_attempts(&self) {
        let before = Utc::now() - self.config.attempts_retention;
        match self.storage.webhooks().prune_attempts(before).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "forgot old webhook attempts"),
            Err(error) => tracing::warn!(%error, "cannot forget old webhook attempts"),
        }
    }

    /// Delivers one leased endpoint's due changes, page by page, until it is caught up, fails, or
    /// loses its lease.
    async fn serve_endpoint(
        self: Arc<Self>,
        endpoint: EndpointRow,
        _slot: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let endpoint_id = endpoint.id;
        if let Err(error) = self.deliver_due(endpoint, &shutdown).await {
            tracing::warn!(%error, endpoint_id, "webhook delivery interrupted; the endpoint is due again once its lease ends");
        }
    }

    async fn deliver_due(
        &self,
        endpoint: EndpointRow,
        shutdown: &CancellationToken,
    ) -> Result<(), StorageError> {
        let subscribed =
            EventTypes::from_stored(&endpoint.event_types).unwrap_or_else(|_| EventTypes::all());
        let mut progress = DeliveryProgress {
            delivered_through: endpoint.delivered_through,
            failed_attempts: endpoint.failed_attempts,
            failing_since: endpoint.failing_since,
            next_attempt_at: Utc::now(),
            disabled_reason: None,
            keep_lease: Some(self.lease),
        };
        loop {
            let page = self
                .storage
                .list_application_changes(
                    endpoint.application_id,
                    progress.delivered_through,
                    FEED_PAGE,
                )
                .await?;
            let caught_up = page.len() < FEED_PAGE as usize;
            let mut attempts = Vec::new();
            let mut failed = false;
            for change in page {
                if shutdown.is_cancelled() {
                    break;
                }
                let position = change.application_sequence;
                let kind = EventType::from(change.change.kind);
                if !subscribed.contains(kind) {
                    progress.delivered_through = position;
                    continue;
                }
                let occurred_at = change.change.message.updated_at;
                let attempt = self.attempt(&endpoint, change).await;
                self.count(&attempt.outcome, occurred_at);
                let succeeded = attempt.outcome.succeeded();
                attempts.push(attempt.record);
                if succeeded {
                    progress.delivered_through = position;
                    progress.failed_attempts = 0;
                    progress.failing_since = None;
                    continue;
                }
                failed = true;
                break;
            }
            if failed {
                self.schedule_retry(&mut progress, &mut attempts);
                progress.keep_lease = None;
            } else {
                progress.next_attempt_at = Utc::now();
                let more = !caught_up && !shutdown.is_cancelled();
                progress.keep_lease = more.then_some(self.lease);
            }
            let kept = self
                .storage
                .webhooks()
                .record_deliveries(endpoint.id, &self.owner, &progress, &attempts)
                .await?;
            if !kept || progress.keep_lease.is_none() {
                return Ok(());
            }
        }
    }

    /// A failed delivery: its next attempt after the backoff, or the endpoint disabled when it
    /// has failed for longer than allowed.
    fn schedule_retry(&self, progress: &mut DeliveryProgress, attempts: &mut Vec<NewAttempt>) {
        let now = Utc::now();
        progress.failed_attempts = progress.failed_attempts.saturating_add(1);
        let failing_since = *progress.failing_since.get_or_insert(now);
        progress.next_attempt_at = now + retry_delay(&self.config, progress.failed_attempts);
        let failing_for = (now - failing_since).to_std().unwrap_or_default();
        if failing_for >= self.config.disable_after {
            let reason = format!(
                "failing since {} ({} attempts)",
                failing_since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                progress.failed_attempts
            );
            self.metrics
                .webhook_attempts
                .get_or_create(&OutcomeLabels {
                    outcome: "disabled",
                })
                .inc();
            let last = attempts.last().cloned();
            attempts.push(NewAttempt {
                webhook_id: last
                    .as_ref()
                    .map_or_else(String::new, |last| last.webhook_id.clone()),
                event_type: "webhook.disabled",
                feed_position: last.map_or(progress.delivered_through, |last| last.feed_position),
                attempted_at: now,
                status_code: None,
                error: Some(reason.clone()),
                response: None,
                duration_ms: 0,
            });
            progress.disabled_reason = Some(reason);
        }
    }

    /// One signed delivery of one change.
    async fn attempt(&self, endpoint: &EndpointRow, change: ApplicationChangeRow) -> Attempt {
        let position = change.application_sequence;
        let webhook_id = webhook_id(endpoint.application_id, position);
        let kind = EventType::from(change.change.kind);
        let occurred_at = change.change.message.updated_at;
        let body = Bytes::from(
            serde_json::to_vec(&serde_json::json!({
                "type": kind.as_str(),
                "timestamp": occurred_at,
                "data": FeedChangeView::from(change),
            }))
            .expect("a change serializes"),
        );
        let now = Utc::now();
        // An HTTP client span per attempt (semantic conventions); a failed attempt's is an error
        // with the answer's status, or `no_response`, as `error.type`.
        let span = tracing::info_span!(
            "webhook delivery",
            otel.name = "POST",
            otel.kind = "client",
            http.request.method = "POST",
            server.address = reqwest::Url::parse(&endpoint.url).ok().and_then(|url| url.host_str().map(str::to_owned)),
            http.response.status_code = tracing::field::Empty,
            webhook.endpoint_id = endpoint.id,
            webhook.id = %webhook_id,
            otel.status_code = tracing::field::Empty,
            error.r#type = tracing::field::Empty,
        );
        let outcome = self
            .deliverer
            .deliver(
                &endpoint.url,
                &webhook_id,
                now.timestamp(),
                body,
                &endpoint.signing_secrets(now),
            )
            .instrument(span.clone())
            .await;
        if let Some(status) = outcome.status {
            span.record("http.response.status_code", status);
        }
        if !outcome.succeeded() {
            let error_type = outcome
                .status
                .map_or_else(|| "no_response".to_owned(), |status| status.to_string());
            crate::telemetry::record_error(&span, &error_type);
        }
        let record = NewAttempt {
            webhook_id,
            event_type: kind.as_str(),
            feed_position: position,
            attempted_at: now,
            status_code: outcome.status,
            error: outcome.error.clone(),
            response: outcome.response.clone(),
            duration_ms: u32::try_from(outcome.duration.as_millis()).unwrap_or(u32::MAX),
        };
        Attempt { outcome, record }
    }

    fn count(&self, outcome: &Attempted, occurred_at: DateTime<Utc>) {
        let label = if outcome.succeeded() {
            "delivered"
        } else {
            "failed"
        };
        self.metrics
            .webhook_attempts
            .get_or_create(&OutcomeLabels { outcome: label })
            .inc();
        if outcome.succeeded() {
            let lag = (Utc::now() - occurred_at).to_std().unwrap_or_default();
            self.metrics.webhook_delivery_lag.observe(lag.as_secs_f64());
        }
    }
}

struct Attempt {
    outcome: Attempted,
    record: NewAttempt,
}

/// The delay before attempt `failed + 1`: the first retry delay doubled with each failure, at
/// most the longest, plus or minus a fifth at random (so that endpoints that failed together are
/// not retried together).
fn retry_delay(config: &WebhookConfig, failed: u32) -> Duration {
    let doubled = config
        .retry_first
        .saturating_mul(1u32 << failed.saturating_sub(1).min(20));
    let delay = doubled.min(config.retry_max);
    delay.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// A change's `webhook-id`: the same for every attempt and replay of it, different for every
/// change of every application, and not revealing the application's internal id.
fn webhook_id(application_id: u64, position: u64) -> String {
    let digest = Sha256::digest(format!("{application_id}:{position}"));
    let hex: String = digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("msg_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_the_first_delay_up_to_the_longest() {
        let mut config = crate::config::Config::from_map(&Default::default())
            .expect("defaults")
            .webhooks;
        config.retry_first = Duration::from_secs(5);
        config.retry_max = Duration::from_secs(3600);
        let within = |failed: u32, expected: u64| {
            let delay = retry_delay(&config, failed).as_secs_f64();
            let expected = expected as f64;
            assert!(
                (expected * 0.8..=expected * 1.2).contains(&delay),
                "attempt {failed}: {delay} s, not about {expected} s"
            );
        };
        within(1, 5);
        within(2, 10);
        within(5, 80);
        within(12, 3600);
        within(40, 3600);
    }

    #[test]
    fn webhook_ids_are_stable_and_differ_between_changes() {
        assert_eq!(webhook_id(1, 7), webhook_id(1, 7));
        assert_ne!(webhook_id(1, 7), webhook_id(2, 7));
        assert_ne!(webhook_id(1, 7), webhook_id(1, 8));
        assert!(webhook_id(1, 7).starts_with("msg_"));
    }
}
