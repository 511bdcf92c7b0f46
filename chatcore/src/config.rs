//! The one place that reads configuration. Every setting is an environment variable with a
//! documented default (see README "Configuration"); connection URLs are kept as [`SecretUrl`]
//! so their passwords never reach a log line.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::events::Consumer;
use crate::retry::Backoff;

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

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {name}={value:?}: {reason}")]
pub struct ConfigError {
    name: &'static str,
    value: String,
    reason: String,
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
            changes_exchange: format!("{prefix}.changes"),
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
/// for RabbitMQ, SQLite FTS5 for Elasticsearch, all under `data_dir`.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: Option<SecretUrl>,
    pub database_max_connections: u32,
    pub redis_url: Option<SecretUrl>,
    /// Prefix of every Redis key this system writes.
    pub redis_key_prefix: String,
    pub amqp_url: Option<SecretUrl>,
    pub topology: Topology,
    pub elasticsearch_url: Option<SecretUrl>,
    pub elasticsearch_index: String,
    /// Replicas of the search index when it is created (0 on a single node).
    pub elasticsearch_replicas: u32,
    /// How many numbers one durable reservation in MySQL covers (see README "Numbering").
    pub number_block_size: u64,
    /// Where the embedded adapters keep their files.
    pub data_dir: PathBuf,
    /// Where traces are exported (OTLP/gRPC); None: no export.
    pub otlp_endpoint: Option<String>,
    /// How long `api migrate` retries while a service is not reachable yet.
    pub migrate_wait: Duration,
    /// Where this binary serves `/livez`, `/readyz` and `/metrics` for the cluster (not the
    /// public port); None: the binary's own default port.
    pub health_addr: Option<SocketAddr>,
    /// The longest wait for a connection to a backing service (TCP, TLS and the protocol's
    /// handshake); a black-holed address fails after this instead of the OS timeout.
    pub connect_timeout: Duration,
    /// The longest wait for one call to a backing service once connected (a query, a publish and
    /// its confirm, a search); a call past it fails as transient.
    pub dependency_timeout: Duration,
    /// Extra certificate authority (PEM) trusted for TLS connections to every backing service
    /// (`mysql://...?ssl-mode=...`, `rediss://`, `amqps://`, `https://`), e.g. a private CA.
    pub tls_ca_file: Option<PathBuf>,
    pub api: ApiConfig,
    pub consumer: ConsumerConfig,
    pub counter_sync: CounterSyncConfig,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen_addr: SocketAddr,
    /// The secret that opens the listing of every application; None: generated on first start
    /// and kept in `data_dir/admin-token`.
    pub admin_token: Option<AdminToken>,
    /// Serve the docs page (`/docs`) and the OpenAPI document on the public port.
    pub docs_enabled: bool,
    pub rate_limits: RateLimits,
    /// How many proxies in front of the api append to `X-Forwarded-For`: the client address is
    /// the one that many entries from the right; 0 trusts no header (the peer address).
    pub trusted_proxy_hops: usize,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Connections served at once per client address (an IPv6 client per /64) when clients
    /// connect directly (`trusted_proxy_hops` 0); one more is closed at once.
    pub max_connections_per_address: usize,
    /// How long a client may take to send the request line and headers.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body.
    pub body_timeout: Duration,
    /// How long a search may run in the search index.
    pub search_timeout: Duration,
    pub request_timeout: Duration,
    pub publish_confirm_timeout: Duration,
    pub max_request_bytes: usize,
    /// How long a just-accepted chat is remembered in Redis so messages can be posted to it
    /// before the ingest-worker has written its row.
    pub pending_chat_ttl: Duration,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl: Duration,
    /// How long a claimed `Idempotency-Key` waits for its request to hand out a number; a request
    /// that died before that blocks the key no longer than this.
    pub idempotency_lease: Duration,
    pub default_page_size: u32,
    pub max_page_size: u32,
    pub streams: StreamLimits,
    /// How long the api keeps serving after SIGTERM with `/readyz` answering 503, before it
    /// drains: the time the cluster takes to stop routing to it (0: drain at once).
    pub shutdown_delay: Duration,
    /// How long an application's older tokens keep working after it rotates its token.
    pub token_rotation_overlap: Duration,
    /// Who may create applications.
    pub application_creation: ApplicationCreation,
    /// Chats an application may have at most (its chat numbers); 0: no limit.
    pub max_chats_per_application: u64,
    /// Messages an application may post per minute (a fixed window shared by every replica);
    /// 0: no limit.
    pub max_messages_per_minute_per_application: u64,
}

/// The longest overlap of a token rotation: a year keeps every expiry a date the databases store.
const MAX_TOKEN_ROTATION_OVERLAP: Duration = Duration::from_secs(365 * 86_400);

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
    /// Streams open at once on this replica; 0 turns streaming off.
    pub per_replica: usize,
    /// Streams open at once per application on this replica.
    pub per_application: usize,
    /// Streams open at once per client address (an IPv6 client per /64) on this replica, over
    /// every application: one client cannot take the streams other tenants need.
    pub per_address: usize,
    /// How long a stream lasts at most; its client resumes with `Last-Event-ID` (what an
    /// EventSource does by itself), so no stream holds a connection slot for ever.
    pub max_lifetime: Duration,
    /// A comment line this often keeps proxies from closing a quiet stream.
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
    /// Attempts for one event that fails with a non-transient error before it is dead-lettered.
    pub max_attempts: u32,
    /// Delays between attempts of a failed batch, and between reconnects to the queue.
    pub retry: Backoff,
}

#[derive(Debug, Clone)]
pub struct CounterSyncConfig {
    /// How far back counter-sync writes updated messages to the index again; longer than the
    /// time between two runs.
    pub reindex_lookback: Duration,
    /// A Prometheus Pushgateway that receives the metrics of each run (a CronJob's pod lives too
    /// briefly to be scraped); None: no push.
    pub pushgateway_url: Option<String>,
    pub lease: LeaseConfig,
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
        let settings = Settings { lookup: &lookup };
        let amqp_prefix = settings.string("CHAT_AMQP_PREFIX", "chat");
        let max_bytes_in_flight: usize =
            settings.parse("CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT", 64 * 1024 * 1024)?;
        // The defaults of the bounds below follow the connections a replica serves.
        let max_connections: usize = settings.parse("CHAT_MAX_CONNECTIONS", 1024)?;
        Ok(Self {
            database_url: settings.url("DATABASE_URL"),
            database_max_connections: settings.parse("CHAT_DATABASE_MAX_CONNECTIONS", 16)?,
            redis_url: settings.url("REDIS_URL"),
            redis_key_prefix: settings.string("CHAT_REDIS_PREFIX", "chat"),
            amqp_url: settings.url("AMQP_URL"),
            topology: Topology {
                queue_type: match settings.string("CHAT_AMQP_QUEUE_TYPE", "classic").as_str() {
                    "classic" => QueueType::Classic,
                    "quorum" => QueueType::Quorum {
                        delivery_limit: settings.parse("CHAT_AMQP_DELIVERY_LIMIT", 20)?,
                    },
                    other => {
                        return Err(ConfigError {
                            name: "CHAT_AMQP_QUEUE_TYPE",
                            value: other.to_owned(),
                            reason: "must be classic or quorum".to_owned(),
                        });
                    }
                },
                ..Topology::from_prefix(&amqp_prefix)
            },
            elasticsearch_url: settings.url("ELASTICSEARCH_URL"),
            elasticsearch_index: settings.string("CHAT_ES_INDEX", "chat-messages"),
            elasticsearch_replicas: settings.parse("CHAT_ES_REPLICAS", 0)?,
            number_block_size: settings.parse("CHAT_NUMBER_BLOCK_SIZE", 1000)?,
            data_dir: PathBuf::from(settings.string("CHAT_DATA_DIR", "data")),
            otlp_endpoint: settings.optional("OTEL_EXPORTER_OTLP_ENDPOINT")?,
            migrate_wait: Duration::from_secs(settings.parse("CHAT_MIGRATE_WAIT_SECONDS", 0)?),
            health_addr: settings.optional("CHAT_HEALTH_ADDR")?,
            connect_timeout: settings.millis("CHAT_CONNECT_TIMEOUT_MS", 3_000)?,
            dependency_timeout: settings.millis("CHAT_DEPENDENCY_TIMEOUT_MS", 5_000)?,
            tls_ca_file: settings.optional("CHAT_TLS_CA_FILE")?,
            api: ApiConfig {
                listen_addr: settings
                    .parse("CHAT_HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 3000)))?,
                admin_token: settings.optional_secret("CHAT_ADMIN_TOKEN")?,
                docs_enabled: settings.parse("CHAT_DOCS_ENABLED", true)?,
                rate_limits: RateLimits {
                    per_token: RateLimit {
                        per_second: settings.parse("CHAT_RATE_LIMIT_PER_TOKEN", 500)?,
                        burst: settings.parse("CHAT_RATE_LIMIT_PER_TOKEN_BURST", 1000)?,
                    },
                    per_address: RateLimit {
                        per_second: settings.parse("CHAT_RATE_LIMIT_PER_ADDRESS", 200)?,
                        burst: settings.parse("CHAT_RATE_LIMIT_PER_ADDRESS_BURST", 400)?,
                    },
                },
                trusted_proxy_hops: settings.parse("CHAT_TRUSTED_PROXY_HOPS", 0)?,
                max_connections,
                max_connections_per_address: settings.parse(
                    "CHAT_MAX_CONNECTIONS_PER_ADDRESS",
                    (max_connections / 4).max(1),
                )?,
                header_read_timeout: settings.millis("CHAT_HEADER_READ_TIMEOUT_MS", 5_000)?,
                body_timeout: settings.millis("CHAT_BODY_TIMEOUT_MS", 5_000)?,
                search_timeout: settings.millis("CHAT_SEARCH_TIMEOUT_MS", 2_000)?,
                request_timeout: settings.millis("CHAT_REQUEST_TIMEOUT_MS", 10_000)?,
                publish_confirm_timeout: settings
                    .millis("CHAT_PUBLISH_CONFIRM_TIMEOUT_MS", 5_000)?,
                max_request_bytes: settings.parse("CHAT_MAX_REQUEST_BYTES", 256 * 1024)?,
                pending_chat_ttl: Duration::from_secs(
                    settings.parse("CHAT_PENDING_CHAT_TTL_SECONDS", 86_400)?,
                ),
                idempotency_ttl: Duration::from_secs(
                    settings.parse("CHAT_IDEMPOTENCY_TTL_SECONDS", 86_400)?,
                ),
                idempotency_lease: Duration::from_secs(
                    settings.parse("CHAT_IDEMPOTENCY_LEASE_SECONDS", 30)?,
                ),
                default_page_size: settings.parse("CHAT_DEFAULT_PAGE_SIZE", 25)?,
                max_page_size: settings.parse("CHAT_MAX_PAGE_SIZE", 100)?,
                streams: StreamLimits {
                    per_replica: settings.parse("CHAT_STREAMS_PER_REPLICA", max_connections / 2)?,
                    per_application: settings.parse("CHAT_STREAMS_PER_APPLICATION", 100)?,
                    per_address: settings.parse("CHAT_STREAMS_PER_ADDRESS", 20)?,
                    max_lifetime: Duration::from_secs(
                        settings.parse("CHAT_STREAM_MAX_LIFETIME_SECONDS", 3600)?,
                    ),
                    heartbeat: settings.millis("CHAT_STREAM_HEARTBEAT_MS", 15_000)?,
                    buffered_changes: settings.parse("CHAT_STREAM_BUFFERED_CHANGES", 256)?,
                },
                shutdown_delay: settings.millis("CHAT_SHUTDOWN_DELAY_MS", 0)?,
                token_rotation_overlap: Duration::from_secs(
                    settings.parse("CHAT_TOKEN_ROTATION_OVERLAP_SECONDS", 86_400)?,
                ),
                application_creation: settings
                    .parse("CHAT_APPLICATION_CREATION", ApplicationCreation::Open)?,
                max_chats_per_application: settings.parse("CHAT_MAX_CHATS_PER_APPLICATION", 0)?,
                max_messages_per_minute_per_application: settings
                    .parse("CHAT_MAX_MESSAGES_PER_MINUTE_PER_APPLICATION", 0)?,
            },
            consumer: ConsumerConfig {
                prefetch: settings.parse("CHAT_CONSUMER_PREFETCH", 1000)?,
                batch_max_size: settings.parse("CHAT_BATCH_MAX_SIZE", 500)?,
                batch_max_wait: settings.millis("CHAT_BATCH_MAX_WAIT_MS", 50)?,
                max_attempts: settings.parse("CHAT_MAX_ATTEMPTS", 3)?,
                retry: Backoff::new(
                    settings.millis("CHAT_RETRY_BASE_DELAY_MS", 100)?,
                    settings.millis("CHAT_RETRY_MAX_DELAY_MS", 10_000)?,
                ),
            },
            counter_sync: CounterSyncConfig {
                reindex_lookback: Duration::from_secs(
                    settings.parse("CHAT_REINDEX_LOOKBACK_SECONDS", 3600)?,
                ),
                pushgateway_url: settings.optional("CHAT_PUSHGATEWAY_URL")?,
                lease: LeaseConfig {
                    namespace: settings.string("POD_NAMESPACE", "default"),
                    name: settings.string("CHAT_LEASE_NAME", "chat-counter-sync"),
                    holder: settings.string("POD_NAME", "counter-sync"),
                    job: settings.optional("JOB_NAME")?,
                    duration: Duration::from_secs(
                        settings.parse("CHAT_LEASE_DURATION_SECONDS", 60)?,
                    ),
                },
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

    fn checked(self) -> Result<Self, ConfigError> {
        let invalid = |name: &'static str, value: String, reason: &str| ConfigError {
            name,
            value,
            reason: reason.to_owned(),
        };
        if self.number_block_size == 0 {
            return Err(invalid(
                "CHAT_NUMBER_BLOCK_SIZE",
                "0".into(),
                "must be at least 1",
            ));
        }
        if self.api.token_rotation_overlap > MAX_TOKEN_ROTATION_OVERLAP {
            return Err(invalid(
                "CHAT_TOKEN_ROTATION_OVERLAP_SECONDS",
                self.api.token_rotation_overlap.as_secs().to_string(),
                "must be at most 31536000 (a year)",
            ));
        }
        if self.consumer.retry.base.is_zero() || self.consumer.retry.max < self.consumer.retry.base
        {
            return Err(invalid(
                "CHAT_RETRY_BASE_DELAY_MS",
                self.consumer.retry.base.as_millis().to_string(),
                "must be at least 1 and at most CHAT_RETRY_MAX_DELAY_MS",
            ));
        }
        if self.api.idempotency_lease <= self.api.request_timeout
            || self.api.idempotency_lease > self.api.idempotency_ttl
        {
            // A shorter lease would let a retry claim a key whose request still runs.
            return Err(invalid(
                "CHAT_IDEMPOTENCY_LEASE_SECONDS",
                self.api.idempotency_lease.as_secs().to_string(),
                "must be longer than CHAT_REQUEST_TIMEOUT_MS and at most CHAT_IDEMPOTENCY_TTL_SECONDS",
            ));
        }
        if self.counter_sync.lease.duration.is_zero() {
            return Err(invalid(
                "CHAT_LEASE_DURATION_SECONDS",
                "0".into(),
                "must be at least 1",
            ));
        }
        if self.consumer.batch_max_size == 0 || self.consumer.prefetch == 0 {
            return Err(invalid(
                "CHAT_BATCH_MAX_SIZE",
                self.consumer.batch_max_size.to_string(),
                "batch size and prefetch must be at least 1",
            ));
        }
        if self.amqp_url.is_some() {
            // Separate workers consume RabbitMQ; they cannot reach this process' embedded files.
            for (name, url) in [
                ("DATABASE_URL", &self.database_url),
                ("ELASTICSEARCH_URL", &self.elasticsearch_url),
            ] {
                if url.is_none() {
                    return Err(invalid(
                        name,
                        String::new(),
                        "must be set when AMQP_URL is (the separate workers write to it)",
                    ));
                }
            }
        }
        for (name, limit) in [
            (
                "CHAT_RATE_LIMIT_PER_TOKEN_BURST",
                self.api.rate_limits.per_token,
            ),
            (
                "CHAT_RATE_LIMIT_PER_ADDRESS_BURST",
                self.api.rate_limits.per_address,
            ),
        ] {
            if limit.per_second > 0 && limit.burst == 0 {
                return Err(invalid(
                    name,
                    "0".into(),
                    "must be at least 1 while the limit is on",
                ));
            }
        }
        for (name, duration) in [
            ("CHAT_CONNECT_TIMEOUT_MS", self.connect_timeout),
            ("CHAT_DEPENDENCY_TIMEOUT_MS", self.dependency_timeout),
            ("CHAT_HEADER_READ_TIMEOUT_MS", self.api.header_read_timeout),
            ("CHAT_BODY_TIMEOUT_MS", self.api.body_timeout),
            ("CHAT_SEARCH_TIMEOUT_MS", self.api.search_timeout),
            ("CHAT_STREAM_HEARTBEAT_MS", self.api.streams.heartbeat),
        ] {
            if duration.is_zero() {
                return Err(invalid(name, "0".into(), "must be at least 1"));
            }
        }
        if self.api.streams.buffered_changes == 0 {
            return Err(invalid(
                "CHAT_STREAM_BUFFERED_CHANGES",
                "0".into(),
                "must be at least 1",
            ));
        }
        if self.api.max_connections == 0 {
            return Err(invalid(
                "CHAT_MAX_CONNECTIONS",
                "0".into(),
                "must be at least 1",
            ));
        }
        // Streams hold their connections: those of every stream together must leave the replica
        // room to answer plain requests.
        if self.api.streams.per_replica > self.api.max_connections / 2 {
            return Err(invalid(
                "CHAT_STREAMS_PER_REPLICA",
                self.api.streams.per_replica.to_string(),
                "must be at most half of CHAT_MAX_CONNECTIONS",
            ));
        }
        if self.api.max_connections_per_address == 0
            || self.api.max_connections_per_address > self.api.max_connections
        {
            return Err(invalid(
                "CHAT_MAX_CONNECTIONS_PER_ADDRESS",
                self.api.max_connections_per_address.to_string(),
                "must be between 1 and CHAT_MAX_CONNECTIONS",
            ));
        }
        if self.api.streams.max_lifetime.is_zero() {
            return Err(invalid(
                "CHAT_STREAM_MAX_LIFETIME_SECONDS",
                "0".into(),
                "must be at least 1",
            ));
        }
        if self.api.default_page_size == 0 || self.api.default_page_size > self.api.max_page_size {
            return Err(invalid(
                "CHAT_DEFAULT_PAGE_SIZE",
                self.api.default_page_size.to_string(),
                "must be between 1 and CHAT_MAX_PAGE_SIZE",
            ));
        }
        Ok(self)
    }

    fn service_urls(&self) -> [&Option<SecretUrl>; 4] {
        [
            &self.database_url,
            &self.redis_url,
            &self.amqp_url,
            &self.elasticsearch_url,
        ]
    }

    /// True when every part runs embedded in this process (no service URL is set).
    pub fn is_fully_embedded(&self) -> bool {
        self.service_urls().iter().all(|url| url.is_none())
    }

    /// True when at least one part runs embedded (and keeps files in `data_dir`).
    pub fn is_partly_embedded(&self) -> bool {
        self.service_urls().iter().any(|url| url.is_none())
    }

    pub fn require_database_url(&self) -> Result<&SecretUrl, ConfigError> {
        required("DATABASE_URL", &self.database_url)
    }

    pub fn require_redis_url(&self) -> Result<&SecretUrl, ConfigError> {
        required("REDIS_URL", &self.redis_url)
    }

    pub fn require_amqp_url(&self) -> Result<&SecretUrl, ConfigError> {
        required("AMQP_URL", &self.amqp_url)
    }

    pub fn require_elasticsearch_url(&self) -> Result<&SecretUrl, ConfigError> {
        required("ELASTICSEARCH_URL", &self.elasticsearch_url)
    }
}

/// For the parts that exist only as real services (the separate workers, counter-sync).
fn required<'a>(
    name: &'static str,
    url: &'a Option<SecretUrl>,
) -> Result<&'a SecretUrl, ConfigError> {
    url.as_ref().ok_or_else(|| ConfigError {
        name,
        value: String::new(),
        reason: "is required by this service".to_owned(),
    })
}

struct Settings<'a, F: Fn(&str) -> Option<String>> {
    lookup: &'a F,
}

impl<F: Fn(&str) -> Option<String>> Settings<'_, F> {
    fn string(&self, name: &str, default: &str) -> String {
        (self.lookup)(name)
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| default.to_owned())
    }

    fn url(&self, name: &str) -> Option<SecretUrl> {
        (self.lookup)(name)
            .filter(|value| !value.is_empty())
            .map(SecretUrl::new)
    }

    fn parse<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        Ok(self.optional(name)?.unwrap_or(default))
    }

    fn optional<T>(&self, name: &'static str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let Some(value) = (self.lookup)(name).filter(|value| !value.is_empty()) else {
            return Ok(None);
        };
        value
            .parse()
            .map(Some)
            .map_err(|error: T::Err| ConfigError {
                name,
                reason: error.to_string(),
                value,
            })
    }

    /// As [`Self::optional`], for a secret: a refused value is not repeated in the error (start-up
    /// errors end up in logs).
    fn optional_secret<T>(&self, name: &'static str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.optional(name).map_err(|error| ConfigError {
            value: "(a secret, not shown)".to_owned(),
            ..error
        })
    }

    fn millis(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.parse(name, default).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_admin_token_is_not_repeated_in_the_error() {
        let refused = "short-secret";
        let error = Config::from_map(&HashMap::from([(
            "CHAT_ADMIN_TOKEN".to_owned(),
            refused.to_owned(),
        )]))
        .expect_err("too short");
        let shown = format!("{error} {error:?}");
        assert!(shown.contains("CHAT_ADMIN_TOKEN"), "{shown}");
        assert!(!shown.contains(refused), "{shown}");
    }

    #[test]
    fn the_token_settings_parse_and_are_bounded() {
        let config = Config::from_map(&HashMap::from([(
            "CHAT_APPLICATION_CREATION".to_owned(),
            "admin".to_owned(),
        )]))
        .expect("valid");
        assert_eq!(config.api.application_creation, ApplicationCreation::Admin);
        assert_eq!(
            config.api.token_rotation_overlap,
            Duration::from_secs(86_400)
        );
        for (name, value) in [
            ("CHAT_APPLICATION_CREATION", "anyone"),
            ("CHAT_TOKEN_ROTATION_OVERLAP_SECONDS", "31536001"),
        ] {
            let error = Config::from_map(&HashMap::from([(name.to_owned(), value.to_owned())]))
                .expect_err("refused");
            assert!(error.to_string().contains(name), "{error}");
        }
    }

    #[test]
    fn secret_url_redacts_password() {
        let url = SecretUrl::new("mysql://chat:hunter2@db:3306/chat");
        assert_eq!(url.to_string(), "mysql://chat:***@db:3306/chat");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(url.expose(), "mysql://chat:hunter2@db:3306/chat");
    }

    #[test]
    fn defaults_apply_and_overrides_parse() {
        let mut values = HashMap::new();
        values.insert("CHAT_BATCH_MAX_SIZE".to_owned(), "42".to_owned());
        values.insert("CHAT_AMQP_PREFIX".to_owned(), "t1".to_owned());
        let config = Config::from_map(&values).expect("valid config");
        assert_eq!(config.consumer.batch_max_size, 42);
        assert_eq!(config.topology.ingest_queue, "t1.ingest");
        assert_eq!(config.api.max_page_size, 100);
        assert!(config.is_fully_embedded());
        assert_eq!(config.data_dir, PathBuf::from("data"));
    }

    #[test]
    fn separate_workers_need_the_real_database_and_index() {
        let mut values = HashMap::new();
        values.insert("AMQP_URL".to_owned(), "amqp://127.0.0.1".to_owned());
        let error = Config::from_map(&values).expect_err("must fail");
        assert!(error.to_string().contains("DATABASE_URL"));
        values.insert(
            "DATABASE_URL".to_owned(),
            "mysql://127.0.0.1/chat".to_owned(),
        );
        values.insert(
            "ELASTICSEARCH_URL".to_owned(),
            "http://127.0.0.1:9200".to_owned(),
        );
        let config = Config::from_map(&values).expect("valid config");
        assert!(!config.is_fully_embedded());
        assert!(config.require_redis_url().is_err());
    }

    #[test]
    fn invalid_number_names_the_variable() {
        for name in [
            "CHAT_CONSUMER_PREFETCH",
            "CHAT_MIGRATE_WAIT_SECONDS",
            "CHAT_LEASE_DURATION_SECONDS",
            "CHAT_REQUEST_TIMEOUT_MS",
        ] {
            let values = HashMap::from([(name.to_owned(), "lots".to_owned())]);
            let error = Config::from_map(&values).expect_err("must fail");
            assert!(error.to_string().contains(name), "{error}");
        }
    }

    #[test]
    fn deliveries_in_flight_fit_in_the_memory_bound() {
        let config = Config::from_map(&HashMap::new()).expect("valid config");
        // 64 MiB of 257 KiB events.
        assert_eq!(config.consumer.prefetch, 255);
        let values = HashMap::from([
            (
                "CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT".to_owned(),
                "1".to_owned(),
            ),
            ("CHAT_BATCH_MAX_SIZE".to_owned(), "20".to_owned()),
        ]);
        let config = Config::from_map(&values).expect("valid config");
        assert_eq!(config.consumer.prefetch, 1, "at least one");
        let roomy = HashMap::from([(
            "CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT".to_owned(),
            (1u64 << 40).to_string(),
        )]);
        assert_eq!(
            Config::from_map(&roomy).expect("valid").consumer.prefetch,
            1000
        );
    }

    #[test]
    fn every_setting_of_the_other_binaries_is_read_here() {
        let values: HashMap<String, String> = [
            ("CHAT_MIGRATE_WAIT_SECONDS", "30"),
            ("CHAT_PUSHGATEWAY_URL", "http://pushgateway:9091"),
            ("POD_NAMESPACE", "chat"),
            ("POD_NAME", "counter-sync-1"),
            ("CHAT_LEASE_NAME", "lease"),
            ("CHAT_LEASE_DURATION_SECONDS", "15"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
        let config = Config::from_map(&values).expect("valid config");
        assert_eq!(config.migrate_wait, Duration::from_secs(30));
        assert_eq!(
            config.counter_sync.pushgateway_url.as_deref(),
            Some("http://pushgateway:9091")
        );
        assert_eq!(
            config.counter_sync.lease,
            LeaseConfig {
                namespace: "chat".into(),
                name: "lease".into(),
                holder: "counter-sync-1".into(),
                job: None,
                duration: Duration::from_secs(15),
            }
        );
        assert_eq!(
            config.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        let zero_lease =
            HashMap::from([("CHAT_LEASE_DURATION_SECONDS".to_owned(), "0".to_owned())]);
        assert!(Config::from_map(&zero_lease).is_err());
    }
}
