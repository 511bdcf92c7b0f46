//! Prometheus metrics of every service, in one registry per process, served as text at `/metrics`
//! (the api's port; the workers' health port). Names follow the Prometheus conventions: a `chat_`
//! prefix, base units (seconds), `_total` on counters.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tracing::Instrument as _;

use crate::retry::DependencyTimedOut;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    pub dependency: &'static str,
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimiterLabels {
    /// `address` (per client address, IPv6 per /64) or `application`.
    pub limiter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamEndLabels {
    /// `client` (it went away), `slow_reader`, `feed_lost`, `storage_error`, `lifetime` or
    /// `shutdown`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    pub kind: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

/// Every metric of the platform; each process registers all and moves the ones it uses.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
    pub publish_confirm_duration: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    pub dependency_duration: Family<DependencyLabels, Histogram, fn() -> Histogram>,
    pub batch_size: Family<QueueLabels, Histogram, fn() -> Histogram>,
    pub batch_duration: Family<QueueLabels, Histogram, fn() -> Histogram>,
    pub events_processed: Family<QueueLabels, Counter>,
    pub events_failed: Family<QueueLabels, Counter>,
    pub events_dead_lettered: Family<QueueLabels, Counter>,
    /// Chats and messages whose number belonged to another event (handed out twice), dead-lettered.
    pub number_conflicts: Counter,
    /// Number counters raised above the stored numbers after such a conflict.
    pub number_counter_raises: Counter,
    pub queue_depth: Family<QueueLabels, Gauge>,
    pub counter_sync_repairs: Family<RepairLabels, Counter>,
    pub live_streams: Gauge,
    pub live_streams_ended: Family<StreamEndLabels, Counter>,
    pub live_changes_received: Counter,
    pub webhook_attempts: Family<OutcomeLabels, Counter>,
    pub webhook_delivery_lag: Histogram,
    pub rate_limiter_keys: Family<LimiterLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("chat");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http_requests.clone(),
        );
        let http_request_duration =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "http_request_duration",
            "HTTP request latency by route, method and status",
            Unit::Seconds,
            http_request_duration.clone(),
        );
        let publish_confirm_duration =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "publish_confirm_duration",
            "Time from publishing an event until RabbitMQ confirmed it, by outcome",
            Unit::Seconds,
            publish_confirm_duration.clone(),
        );
        let dependency_duration =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "dependency_duration",
            "Latency of calls to Redis, MySQL and Elasticsearch by operation",
            Unit::Seconds,
            dependency_duration.clone(),
        );
        let batch_size = Family::new_with_constructor(size_histogram as fn() -> Histogram);
        registry.register(
            "batch_size",
            "Events per consumed batch",
            batch_size.clone(),
        );
        let batch_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "batch_write_duration",
            "Time to write one batch (MySQL transaction or Elasticsearch bulk), retries included",
            Unit::Seconds,
            batch_duration.clone(),
        );
        let events_processed = Family::<QueueLabels, Counter>::default();
        registry.register(
            "events_processed",
            "Events written and acknowledged",
            events_processed.clone(),
        );
        let events_failed = Family::<QueueLabels, Counter>::default();
        registry.register(
            "events_failed",
            "Failed attempts to process a batch or an event",
            events_failed.clone(),
        );
        let events_dead_lettered = Family::<QueueLabels, Counter>::default();
        registry.register(
            "events_dead_lettered",
            "Events rejected into the dead-letter queue",
            events_dead_lettered.clone(),
        );
        let number_conflicts = Counter::default();
        registry.register(
            "number_conflicts",
            "Chats and messages dead-lettered because their number belonged to another event (handed out twice)",
            number_conflicts.clone(),
        );
        let number_counter_raises = Counter::default();
        registry.register(
            "number_counter_raises",
            "Number counters raised above the stored numbers after a number was handed out twice",
            number_counter_raises.clone(),
        );
        let queue_depth = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Events waiting in the queue (consumer lag), sampled",
            queue_depth.clone(),
        );
        let counter_sync_repairs = Family::<RepairLabels, Counter>::default();
        registry.register(
            "counter_sync_repairs",
            "Repairs made by counter-sync by kind",
            counter_sync_repairs.clone(),
        );
        let live_streams = Gauge::default();
        registry.register(
            "live_streams",
            "Live message streams (Server-Sent Events) open on this replica",
            live_streams.clone(),
        );
        let live_streams_ended = Family::<StreamEndLabels, Counter>::default();
        registry.register(
            "live_streams_ended",
            "Live message streams ended, by reason",
            live_streams_ended.clone(),
        );
        let live_changes_received = Counter::default();
        registry.register(
            "live_changes_received",
            "Stored changes this replica received for its live streams (only of the chats it streams)",
            live_changes_received.clone(),
        );
        let webhook_attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by outcome (delivered: a 2xx; failed; disabled: an endpoint \
             disabled after failing too long)",
            webhook_attempts.clone(),
        );
        let webhook_delivery_lag = latency_histogram();
        registry.register_with_unit(
            "webhook_delivery_lag",
            "Time from a change being stored until its webhook was answered 2xx",
            Unit::Seconds,
            webhook_delivery_lag.clone(),
        );
        let rate_limiter_keys = Family::<LimiterLabels, Gauge>::default();
        registry.register(
            "rate_limiter_keys",
            "Clients a rate limiter of this replica keeps a bucket for (bounded)",
            rate_limiter_keys.clone(),
        );
        Arc::new(Self {
            registry,
            http_requests,
            http_request_duration,
            publish_confirm_duration,
            dependency_duration,
            batch_size,
            batch_duration,
            events_processed,
            events_failed,
            events_dead_lettered,
            number_conflicts,
            number_counter_raises,
            queue_depth,
            counter_sync_repairs,
            live_streams,
            live_streams_ended,
            live_changes_received,
            webhook_attempts,
            webhook_delivery_lag,
            rate_limiter_keys,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Runs a call to a dependency inside a client span and records its latency under
    /// `dependency`/`operation`.
    pub async fn time<T>(
        &self,
        dependency: &'static str,
        operation: &'static str,
        call: impl Future<Output = T>,
    ) -> T {
        let span = tracing::info_span!(
            "dependency call",
            otel.name = %format!("{dependency} {operation}"),
            otel.kind = "client",
            db.system = dependency,
        );
        let started = Instant::now();
        let output = call.instrument(span).await;
        self.record_call(dependency, operation, started);
        output
    }

    /// [`Metrics::time`], failing the call with [`DependencyTimedOut`] after `limit`.
    pub async fn time_within<T, E: From<DependencyTimedOut>>(
        &self,
        dependency: &'static str,
        operation: &'static str,
        limit: Duration,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let bounded = async {
            tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
                Err(DependencyTimedOut {
                    dependency,
                    operation,
                    limit,
                }
                .into())
            })
        };
        self.time(dependency, operation, bounded).await
    }

    /// Records the latency of a call that started at `started` (for calls with a span of their own).
    pub fn record_call(&self, dependency: &'static str, operation: &'static str, started: Instant) {
        self.dependency_duration
            .get_or_create(&DependencyLabels {
                dependency,
                operation,
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
