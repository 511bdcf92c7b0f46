//! The one place that reads configuration: environment variables, each declared once in
//! [`settings`] (name, default, bounds, meaning; the README's table is rendered from there).
//! Connection URLs are kept as [`SecretUrl`] so their passwords never reach a log line.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::events::Consumer;
use crate::retry::Backoff;

mod amqp;
pub mod destinations;
pub mod origins;
mod reader;
mod redis_url;
pub mod settings;
mod traces;

pub use amqp::{AmqpNode, AmqpNodes};
pub use destinations::AllowedDestinations;
pub use origins::AllowedOrigins;
pub use reader::ConfigError;
use reader::Reader;
pub use redis_url::{RedisTopology, RedisUrl};
use settings::*;
pub use traces::{OtlpProtocol, TraceExport};

/// A connection URL whose password is redacted whenever it is displayed or debug-printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The full URL, for handing to a client library. Never log this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn redacted(&self) -> String {
        // scheme://user:password@host -> scheme://user:***@host
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return self.0.clone();
        };
        let Some((credentials, host)) = rest.rsplit_once('@') else {
            return self.0.clone();
        };
        match credentials.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => self.0.clone(),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Names of the RabbitMQ objects; all derived from one prefix so that tests can isolate themselves.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub dead_letter_exchange: String,
    pub ingest_queue: String,
    pub index_queue: String,
    /// The fanout exchange of [`crate::changes`] announcements; every api replica binds a queue
    /// of its own (exclusive, deleted with its connection).
    pub changes_exchange: String,
    pub queue_type: QueueType,
}

/// How RabbitMQ keeps the queues (`CHAT_AMQP_QUEUE_TYPE`). The type of an existing queue cannot
/// change: switching means new queue names (`CHAT_AMQP_PREFIX`) or deleting the drained queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// On one node: fast, the default for a laptop; lost with that node's disk.
    Classic,
    /// Replicated by Raft over the cluster's nodes (a majority must be up); an event redelivered
    /// `delivery_limit` times (a consumer that keeps crashing on it) is dead-lettered.
    Quorum { delivery_limit: u32 },
}

impl Topology {
    pub fn from_prefix(prefix: &str) -> Self {
        Self {
            exchange: format!("{prefix}.events"),
            dead_letter_exchange: format!("{prefix}.dead-letter"),
            ingest_queue: format!("{prefix}.ingest"),
            index_queue: format!("{prefix}.index"),
            // Not `.changes`: that name was a fanout exchange, whose type cannot change.
            changes_exchange: format!("{prefix}.chat-changes"),
            queue_type: QueueType::Classic,
        }
    }

    /// The queue of one consumer.
    pub fn queue(&self, consumer: Consumer) -> &str {
        match consumer {
            Consumer::Ingest => &self.ingest_queue,
            Consumer::Index => &self.index_queue,
        }
    }

    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead")
    }
}

/// What an event adds around the body of its request: ids, numbers, timestamps, field names.
const EVENT_ENVELOPE_BYTES: usize = 1024;

/// Settings shared by every binary. Service-specific settings sit in the sub-structs.
///
/// A service URL that is not set selects the embedded adapter of that part (see README
/// "Embedded or real services"): SQLite for MySQL, in-process counters for Redis, a SQLite queue
/// for RabbitMQ, SQLite FTS5 for Elasticsearch, all under `data_dir`. What each field means is
/// said once, in the declaration of the setting it is read from (`from_lookup`).
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: Option<SecretUrl>,
    pub database_max_connections: u32,
    pub redis_url: Option<RedisUrl>,
    pub redis_key_prefix: String,
    pub amqp_url: Option<AmqpNodes>,
    pub topology: Topology,
    pub elasticsearch_url: Option<SecretUrl>,
    pub elasticsearch_index: String,
    pub elasticsearch_replicas: u32,
    pub number_block_size: u64,
    pub data_dir: PathBuf,
    /// Set when an OTLP endpoint is: traces are exported.
    pub trace_export: Option<TraceExport>,
    pub migrate_wait: Duration,
    pub health_addr: Option<SocketAddr>,
    pub connect_timeout: Duration,
    pub dependency_timeout: Duration,
    pub tls_ca_file: Option<PathBuf>,
    pub api: ApiConfig,
    pub consumer: ConsumerConfig,
    pub counter_sync: CounterSyncConfig,
    pub webhooks: WebhookConfig,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen_addr: SocketAddr,
    pub admin_token: Option<AdminToken>,
    pub docs_enabled: bool,
    pub rate_limits: RateLimits,
    pub trusted_proxy_hops: usize,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub header_read_timeout: Duration,
    pub body_timeout: Duration,
    pub search_timeout: Duration,
    pub request_timeout: Duration,
    pub publish_confirm_timeout: Duration,
    pub max_request_bytes: usize,
    pub pending_chat_ttl: Duration,
    pub idempotency_ttl: Duration,
    pub idempotency_lease: Duration,
    pub default_page_size: u32,
    pub max_page_size: u32,
    pub streams: StreamLimits,
    pub shutdown_delay: Duration,
    pub token_rotation_overlap: Duration,
    pub client_tokens: ClientTokenConfig,
    pub cors_allowed_origins: AllowedOrigins,
    pub application_creation: ApplicationCreation,
    pub max_chats_per_application: u64,
    pub max_messages_per_minute_per_application: u64,
}

/// `CHAT_APPLICATION_CREATION`: `open` (anyone, as the reference contract; fine on a laptop) or
/// `admin` (only with the admin token: what a public deployment wants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplicationCreation {
    Open,
    Admin,
}

impl FromStr for ApplicationCreation {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "open" => Ok(Self::Open),
            "admin" => Ok(Self::Admin),
            other => Err(format!("{other:?} is neither open nor admin")),
        }
    }
}

/// The bounds of the live message streams (`GET .../messages/stream`) of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub per_replica: usize,
    pub per_application: usize,
    /// Streams open at once per client address (an IPv6 client per /64) on this replica, over
    /// every application: one client cannot take the streams other tenants need.
    pub per_address: usize,
    /// How long a stream lasts at most; its client resumes with `Last-Event-ID` (what an
    /// EventSource does by itself), so no stream holds a connection slot for ever.
    pub max_lifetime: Duration,
    pub heartbeat: Duration,
    /// Changes a stream may fall behind by; a reader slower than that is disconnected (it
    /// resumes with `Last-Event-ID`) instead of being buffered for without end.
    pub buffered_changes: usize,
}

/// The secret of the operator: `Authorization: Bearer <token>` on the admin routes.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// The shortest admin token accepted: 128 bits of a random alphanumeric string.
    pub const MIN_LENGTH: usize = 22;

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for AdminToken {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let token = raw.trim();
        if token.len() < Self::MIN_LENGTH || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(format!(
                "must be at least {} printable ASCII characters without spaces",
                Self::MIN_LENGTH
            ));
        }
        Ok(Self(token.to_owned()))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// The client tokens an application mints for its end users' browsers and apps.
#[derive(Debug, Clone)]
pub struct ClientTokenConfig {
    /// None: a secret generated into the database is used.
    pub secret: Option<ClientTokenSecret>,
    pub max_lifetime: Duration,
    /// How often a replica reads the revocations; past 4 times this without a successful read it
    /// checks each token in the database.
    pub revocation_poll: Duration,
}

/// The operator's secret the client tokens' signing keys derive from.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTokenSecret(String);

impl ClientTokenSecret {
    /// The shortest secret accepted: 32 printable characters hold the 128 bits and more a key wants.
    pub const MIN_LENGTH: usize = 32;

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl FromStr for ClientTokenSecret {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let secret = raw.trim();
        if secret.len() < Self::MIN_LENGTH || !secret.chars().all(|c| c.is_ascii_graphic()) {
            return Err(format!(
                "must be at least {} printable ASCII characters without spaces",
                Self::MIN_LENGTH
            ));
        }
        Ok(Self(secret.to_owned()))
    }
}

impl fmt::Debug for ClientTokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientTokenSecret(***)")
    }
}

/// Requests per second and burst of one client; `per_second == 0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// The rate limits of the api, per replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Per application token (every request naming it).
    pub per_token: RateLimit,
    /// Per client address (every request).
    pub per_address: RateLimit,
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Deliveries in flight: `CHAT_CONSUMER_PREFETCH`, lowered so that as many of the largest
    /// events the api can accept fit in `CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT` (RabbitMQ bounds a
    /// consumer by count only).
    pub prefetch: u16,
    /// A RabbitMQ batch is also at most `prefetch` (no more deliveries come unacknowledged).
    pub batch_max_size: usize,
    pub batch_max_wait: Duration,
    pub retry: Backoff,
}

#[derive(Debug, Clone)]
pub struct CounterSyncConfig {
    pub reindex_lookback: Duration,
    pub pushgateway_url: Option<String>,
    pub lease: LeaseConfig,
}

/// The webhook-dispatcher's bounds and schedule, and the endpoints' limits.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub allowed: AllowedDestinations,
    pub poll_interval: Duration,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_response_bytes: usize,
    pub max_in_flight: usize,
    pub retry_first: Duration,
    pub retry_max: Duration,
    pub disable_after: Duration,
    pub max_endpoints_per_application: u64,
    pub attempts_retention: Duration,
}

/// The Kubernetes Lease that keeps two counter-sync runs from overlapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Who holds it: the pod's name.
    pub holder: String,
    /// The Job the pod belongs to (`JOB_NAME`): a Lease still held by an earlier pod of the same
    /// Job is a predecessor that died, not a run in progress.
    pub job: Option<String>,
    pub duration: Duration,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads from a map, for tests that isolate themselves with their own settings.
    pub fn from_map(values: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(|name| values.get(name).cloned())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let settings = Reader { lookup };
        let max_bytes_in_flight: usize = settings.number(&CONSUMER_MAX_BYTES_IN_FLIGHT)?;
        let max_connections: usize = settings.number(&MAX_CONNECTIONS)?;
        let queue_type = match settings.text(&AMQP_QUEUE_TYPE)?.as_str() {
            "classic" => QueueType::Classic,
            "quorum" => QueueType::Quorum {
                delivery_limit: settings.number(&AMQP_DELIVERY_LIMIT)?,
            },
            other => {
                return Err(ConfigError::new(
                    &AMQP_QUEUE_TYPE,
                    other,
                    "must be classic or quorum",
                ));
            }
        };
        Ok(Self {
            database_url: settings.url(&DATABASE_URL),
            database_max_connections: settings.number(&DATABASE_MAX_CONNECTIONS)?,
            redis_url: settings
                .url(&REDIS_URL)
                .map(|url| {
                    RedisUrl::parse(url.clone())
                        .map_err(|reason| ConfigError::new(&REDIS_URL, url, &reason))
                })
                .transpose()?,
            redis_key_prefix: settings.text(&REDIS_PREFIX)?,
            // A refused value is not repeated: the reason names the node, its password redacted.
            amqp_url: settings.secret(&AMQP_URL)?,
            topology: Topology {
                queue_type,
                ..Topology::from_prefix(&settings.text(&AMQP_PREFIX)?)
            },
            elasticsearch_url: settings.url(&ELASTICSEARCH_URL),
            elasticsearch_index: settings.text(&ES_INDEX)?,
            elasticsearch_replicas: settings.number(&ES_REPLICAS)?,
            number_block_size: settings.number(&NUMBER_BLOCK_SIZE)?,
            data_dir: PathBuf::from(settings.text(&DATA_DIR)?),
            trace_export: traces::trace_export(&settings)?,
            migrate_wait: settings.seconds(&MIGRATE_WAIT_SECONDS)?,
            health_addr: settings.optional(&HEALTH_ADDR)?,
            connect_timeout: settings.millis(&CONNECT_TIMEOUT_MS)?,
            dependency_timeout: settings.millis(&DEPENDENCY_TIMEOUT_MS)?,
            tls_ca_file: settings.optional(&TLS_CA_FILE)?,
            api: ApiConfig {
                listen_addr: settings.parse(&HTTP_ADDR)?,
                admin_token: settings.secret(&ADMIN_TOKEN)?,
                docs_enabled: settings.parse(&DOCS_ENABLED)?,
                rate_limits: RateLimits {
                    per_token: RateLimit {
                        per_second: settings.number(&RATE_LIMIT_PER_TOKEN)?,
                        burst: settings.number(&RATE_LIMIT_PER_TOKEN_BURST)?,
                    },
                    per_address: RateLimit {
                        per_second: settings.number(&RATE_LIMIT_PER_ADDRESS)?,
                        burst: settings.number(&RATE_LIMIT_PER_ADDRESS_BURST)?,
                    },
                },
                trusted_proxy_hops: settings.number(&TRUSTED_PROXY_HOPS)?,
                max_connections,
                max_connections_per_address: settings.number_or(
                    &MAX_CONNECTIONS_PER_ADDRESS,
                    (max_connections / 4).max(1) as u64,
                )?,
                header_read_timeout: settings.millis(&HEADER_READ_TIMEOUT_MS)?,
                body_timeout: settings.millis(&BODY_TIMEOUT_MS)?,
                search_timeout: settings.millis(&SEARCH_TIMEOUT_MS)?,
                request_timeout: settings.millis(&REQUEST_TIMEOUT_MS)?,
                publish_confirm_timeout: settings.millis(&PUBLISH_CONFIRM_TIMEOUT_MS)?,
                max_request_bytes: settings.number(&MAX_REQUEST_BYTES)?,
                pending_chat_ttl: settings.seconds(&PENDING_CHAT_TTL_SECONDS)?,
                idempotency_ttl: settings.seconds(&IDEMPOTENCY_TTL_SECONDS)?,
                idempotency_lease: settings.seconds(&IDEMPOTENCY_LEASE_SECONDS)?,
                default_page_size: settings.number(&DEFAULT_PAGE_SIZE)?,
                max_page_size: settings.number(&MAX_PAGE_SIZE)?,
                streams: StreamLimits {
                    per_replica: settings
                        .number_or(&STREAMS_PER_REPLICA, (max_connections / 2) as u64)?,
                    per_application: settings.number(&STREAMS_PER_APPLICATION)?,
                    per_address: settings.number(&STREAMS_PER_ADDRESS)?,
                    max_lifetime: settings.seconds(&STREAM_MAX_LIFETIME_SECONDS)?,
                    heartbeat: settings.millis(&STREAM_HEARTBEAT_MS)?,
                    buffered_changes: settings.number(&STREAM_BUFFERED_CHANGES)?,
                },
                shutdown_delay: settings.millis(&SHUTDOWN_DELAY_MS)?,
                token_rotation_overlap: settings.seconds(&TOKEN_ROTATION_OVERLAP_SECONDS)?,
                client_tokens: ClientTokenConfig {
                    secret: settings.secret(&CLIENT_TOKEN_SECRET)?,
                    max_lifetime: settings.seconds(&CLIENT_TOKEN_MAX_LIFETIME_SECONDS)?,
                    revocation_poll: settings.millis(&CLIENT_TOKEN_REVOCATION_POLL_MS)?,
                },
                cors_allowed_origins: settings
                    .optional(&CORS_ALLOWED_ORIGINS)?
                    .unwrap_or_default(),
                application_creation: settings.parse(&APPLICATION_CREATION)?,
                max_chats_per_application: settings.number(&MAX_CHATS_PER_APPLICATION)?,
                max_messages_per_minute_per_application: settings
                    .number(&MAX_MESSAGES_PER_MINUTE_PER_APPLICATION)?,
            },
            consumer: ConsumerConfig {
                prefetch: settings.number(&CONSUMER_PREFETCH)?,
                batch_max_size: settings.number(&BATCH_MAX_SIZE)?,
                batch_max_wait: settings.millis(&BATCH_MAX_WAIT_MS)?,
                retry: Backoff::new(
                    settings.millis(&RETRY_BASE_DELAY_MS)?,
                    settings.millis(&RETRY_MAX_DELAY_MS)?,
                ),
            },
            counter_sync: CounterSyncConfig {
                reindex_lookback: settings.seconds(&REINDEX_LOOKBACK_SECONDS)?,
                pushgateway_url: settings.optional(&PUSHGATEWAY_URL)?,
                lease: LeaseConfig {
                    namespace: settings.text(&POD_NAMESPACE)?,
                    name: settings.text(&LEASE_NAME)?,
                    holder: settings.text(&POD_NAME)?,
                    job: settings.optional(&JOB_NAME)?,
                    duration: settings.seconds(&LEASE_DURATION_SECONDS)?,
                },
            },
            webhooks: WebhookConfig {
                allowed: settings
                    .optional(&WEBHOOK_ALLOWED_HOSTS)?
                    .unwrap_or_default(),
                poll_interval: settings.millis(&WEBHOOK_POLL_MS)?,
                connect_timeout: settings.millis(&WEBHOOK_CONNECT_TIMEOUT_MS)?,
                timeout: settings.millis(&WEBHOOK_TIMEOUT_MS)?,
                max_response_bytes: settings.number(&WEBHOOK_MAX_RESPONSE_BYTES)?,
                max_in_flight: settings.number(&WEBHOOK_MAX_IN_FLIGHT)?,
                retry_first: settings.millis(&WEBHOOK_RETRY_FIRST_MS)?,
                retry_max: settings.millis(&WEBHOOK_RETRY_MAX_MS)?,
                disable_after: settings.seconds(&WEBHOOK_DISABLE_AFTER_SECONDS)?,
                max_endpoints_per_application: settings
                    .number(&WEBHOOK_MAX_ENDPOINTS_PER_APPLICATION)?,
                attempts_retention: settings.seconds(&WEBHOOK_ATTEMPTS_RETENTION_HOURS)? * 3600,
            },
        })
        .and_then(Self::checked)
        .map(|config| config.with_prefetch_fitting_memory(max_bytes_in_flight))
    }

    /// The largest event a request can make, and so the largest message the api publishes (events
    /// published together share one of at most this size).
    pub fn largest_event_bytes(&self) -> usize {
        self.api.max_request_bytes + EVENT_ENVELOPE_BYTES
    }

    /// Lowers the prefetch so that `max_bytes_in_flight` holds that many of
    /// the largest events: a request body of `CHAT_MAX_REQUEST_BYTES` makes an event of about the
    /// same size (JSON in, JSON out).
    fn with_prefetch_fitting_memory(mut self, max_bytes_in_flight: usize) -> Self {
        let largest_event = self.largest_event_bytes();
        let fitting = (max_bytes_in_flight / largest_event).clamp(1, usize::from(u16::MAX));
        self.consumer.prefetch = self.consumer.prefetch.min(fitting as u16);
        self
    }

    /// The rules between settings; each setting's own bounds are in its declaration.
    fn checked(self) -> Result<Self, ConfigError> {
        let api = &self.api;
        if self.consumer.retry.max < self.consumer.retry.base {
            return Err(ConfigError::new(
                &RETRY_BASE_DELAY_MS,
                self.consumer.retry.base.as_millis(),
                "must be at most CHAT_RETRY_MAX_DELAY_MS",
            ));
        }
        if api.idempotency_lease <= api.request_timeout
            || api.idempotency_lease > api.idempotency_ttl
        {
            // A shorter lease would let a retry claim a key whose request still runs.
            return Err(ConfigError::new(
                &IDEMPOTENCY_LEASE_SECONDS,
                api.idempotency_lease.as_secs(),
                "must be longer than CHAT_REQUEST_TIMEOUT_MS and at most CHAT_IDEMPOTENCY_TTL_SECONDS",
            ));
        }
        if self.amqp_url.is_some() {
            // Separate workers consume RabbitMQ; they cannot reach this process' embedded files.
            for (setting, url) in [
                (&DATABASE_URL, &self.database_url),
                (&ELASTICSEARCH_URL, &self.elasticsearch_url),
            ] {
                if url.is_none() {
                    return Err(ConfigError::new(
                        setting,
                        "",
                        "must be set when AMQP_URL is (the separate workers write to it)",
                    ));
                }
            }
        }
        for (setting, limit) in [
            (&RATE_LIMIT_PER_TOKEN_BURST, api.rate_limits.per_token),
            (&RATE_LIMIT_PER_ADDRESS_BURST, api.rate_limits.per_address),
        ] {
            if limit.per_second > 0 && limit.burst == 0 {
                return Err(ConfigError::new(
                    setting,
                    0,
                    "must be at least 1 while the limit is on",
                ));
            }
        }
        // Streams hold their connections: those of every stream together must leave the replica
        // room to answer plain requests.
        if api.streams.per_replica > api.max_connections / 2 {
            return Err(ConfigError::new(
                &STREAMS_PER_REPLICA,
                api.streams.per_replica,
                "must be at most half of CHAT_MAX_CONNECTIONS",
            ));
        }
        if api.max_connections_per_address > api.max_connections {
            return Err(ConfigError::new(
                &MAX_CONNECTIONS_PER_ADDRESS,
                api.max_connections_per_address,
                "must be at most CHAT_MAX_CONNECTIONS",
            ));
        }
        if api.default_page_size > api.max_page_size {
            return Err(ConfigError::new(
                &DEFAULT_PAGE_SIZE,
                api.default_page_size,
                "must be at most CHAT_MAX_PAGE_SIZE",
            ));
        }
        Ok(self)
    }

    /// Whether each service's URL is set.
    fn service_urls_set(&self) -> [bool; 4] {
        [
            self.database_url.is_some(),
            self.redis_url.is_some(),
            self.amqp_url.is_some(),
            self.elasticsearch_url.is_some(),
        ]
    }

    /// True when every part runs embedded in this process (no service URL is set).
    pub fn is_fully_embedded(&self) -> bool {
        self.service_urls_set().iter().all(|set| !set)
    }

    /// True when at least one part runs embedded (and keeps files in `data_dir`).
    pub fn is_partly_embedded(&self) -> bool {
        self.service_urls_set().iter().any(|set| !set)
    }

    pub fn require_database_url(&self) -> Result<&SecretUrl, ConfigError> {
        required(&DATABASE_URL, &self.database_url)
    }

    pub fn require_redis_url(&self) -> Result<&RedisUrl, ConfigError> {
        required(&REDIS_URL, &self.redis_url)
    }

    pub fn require_amqp_url(&self) -> Result<&AmqpNodes, ConfigError> {
        required(&AMQP_URL, &self.amqp_url)
    }

    pub fn require_elasticsearch_url(&self) -> Result<&SecretUrl, ConfigError> {
        required(&ELASTICSEARCH_URL, &self.elasticsearch_url)
    }
}

/// For the parts that exist only as real services (the separate workers, counter-sync).
fn required<'a, Url>(setting: &Setting, url: &'a Option<Url>) -> Result<&'a Url, ConfigError> {
    url.as_ref()
        .ok_or_else(|| ConfigError::new(setting, "", "is required by this service"))
}

#[cfg(test)]
mod tests;
