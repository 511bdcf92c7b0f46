//! Every setting, declared once: its environment variable, its default, its bounds and what it
//! means. [`super::Config`] reads through these declarations, the README's configuration table is
//! rendered from them (a test keeps the two equal) and the chart's defaults are checked against
//! them (`tests/it/configuration.rs`).

/// One environment variable.
#[derive(Debug)]
pub struct Setting {
    pub name: &'static str,
    pub when_unset: WhenUnset,
    /// Values below or above are refused at start (numbers only).
    pub bounds: Bounds,
    pub meaning: &'static str,
}

impl Setting {
    /// The value that applies while the variable is unset, if the declaration has one.
    pub fn default_value(&self) -> Option<&'static str> {
        match self.when_unset {
            Value(value) => Some(value),
            Nothing(_) | Derived(_) => None,
        }
    }
}

/// What applies while a variable is unset or empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenUnset {
    /// This value, parsed as if it were set.
    Value(&'static str),
    /// Nothing; the words say what that selects.
    Nothing(&'static str),
    /// A value computed from other settings, as the words say.
    Derived(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u64,
    pub max: u64,
}

/// Any number of the setting's type.
const ANY: Bounds = Bounds {
    min: 0,
    max: u64::MAX,
};
/// At least 1: a zero would stall or divide.
const POSITIVE: Bounds = Bounds {
    min: 1,
    max: u64::MAX,
};

const fn setting(name: &'static str, when_unset: WhenUnset, meaning: &'static str) -> Setting {
    Setting {
        name,
        when_unset,
        bounds: ANY,
        meaning,
    }
}

const fn positive(name: &'static str, default: &'static str, meaning: &'static str) -> Setting {
    Setting {
        name,
        when_unset: Value(default),
        bounds: POSITIVE,
        meaning,
    }
}

use WhenUnset::{Derived, Nothing, Value};

pub const DATABASE_URL: Setting = setting(
    "DATABASE_URL",
    Nothing("embedded SQLite"),
    "MySQL / MariaDB 10.11+, e.g. `mysql://chat:chat@127.0.0.1:3306/chat`",
);
pub const REDIS_URL: Setting = setting(
    "REDIS_URL",
    Nothing("in-process counters"),
    "Redis, e.g. `redis://127.0.0.1:6379/0`; behind sentinels \
     `redis+sentinel://host:26379,host2:26379/<master name>[/db]`; a cluster \
     `redis+cluster://host:6379,host2:6379`; `rediss…` for TLS (README \"Redis Sentinel and Redis Cluster\")",
);
pub const AMQP_URL: Setting = setting(
    "AMQP_URL",
    Nothing("embedded queue, consumed in the api"),
    "RabbitMQ, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`; a cluster: each node's URL, \
     comma-separated (`amqp://u:p@rabbit-0:5672/%2f,amqp://u:p@rabbit-1:5672/%2f`), tried in turn \
     from the last that worked when a connection is made or lost; a 10 s heartbeat unless a URL \
     names one (`?heartbeat=30`); needs `DATABASE_URL` and `ELASTICSEARCH_URL`",
);
pub const ELASTICSEARCH_URL: Setting = setting(
    "ELASTICSEARCH_URL",
    Nothing("embedded FTS5"),
    "Elasticsearch, e.g. `http://127.0.0.1:9200` (user and password in the URL become basic auth)",
);
pub const DATA_DIR: Setting = setting(
    "CHAT_DATA_DIR",
    Value("data"),
    "where the embedded parts keep their SQLite files (relative to the working directory)",
);
pub const HTTP_ADDR: Setting = setting(
    "CHAT_HTTP_ADDR",
    Value("127.0.0.1:3000"),
    "api listen address",
);
pub const DATABASE_MAX_CONNECTIONS: Setting = positive(
    "CHAT_DATABASE_MAX_CONNECTIONS",
    "16",
    "MySQL pool size per process",
);
pub const REDIS_PREFIX: Setting = setting(
    "CHAT_REDIS_PREFIX",
    Value("chat"),
    "prefix of every Redis key",
);
pub const AMQP_PREFIX: Setting = setting(
    "CHAT_AMQP_PREFIX",
    Value("chat"),
    "prefix of the exchanges and queues (`chat.events`, `chat.ingest`, `chat.index`, `*.dead`, \
     `chat.chat-changes`)",
);
pub const ES_INDEX: Setting = setting("CHAT_ES_INDEX", Value("chat-messages"), "index name");
pub const ES_REPLICAS: Setting = setting(
    "CHAT_ES_REPLICAS",
    Value("0"),
    "replicas of the index when it is created",
);
pub const NUMBER_BLOCK_SIZE: Setting = positive(
    "CHAT_NUMBER_BLOCK_SIZE",
    "1000",
    "numbers reserved in the database at a time (see \"Numbering\")",
);
pub const PUBLISH_CONFIRM_TIMEOUT_MS: Setting = setting(
    "CHAT_PUBLISH_CONFIRM_TIMEOUT_MS",
    Value("5000"),
    "wait for a RabbitMQ confirm (or the embedded queue's commit) before answering 503",
);
pub const MAX_REQUEST_BYTES: Setting =
    positive("CHAT_MAX_REQUEST_BYTES", "262144", "request body limit");
pub const REQUEST_TIMEOUT_MS: Setting = positive(
    "CHAT_REQUEST_TIMEOUT_MS",
    "10000",
    "longest an API request may take before it is answered `503 timed_out`",
);
pub const PENDING_CHAT_TTL_SECONDS: Setting = positive(
    "CHAT_PENDING_CHAT_TTL_SECONDS",
    "86400",
    "how long an accepted chat is remembered in Redis before its row exists, so that messages can \
     be posted to it at once",
);
pub const IDEMPOTENCY_TTL_SECONDS: Setting = positive(
    "CHAT_IDEMPOTENCY_TTL_SECONDS",
    "86400",
    "how long an `Idempotency-Key` is remembered",
);
pub const IDEMPOTENCY_LEASE_SECONDS: Setting = positive(
    "CHAT_IDEMPOTENCY_LEASE_SECONDS",
    "30",
    "how long a claimed key waits for its request to take a number: a request that died blocks \
     its key no longer (longer than `CHAT_REQUEST_TIMEOUT_MS`, at most \
     `CHAT_IDEMPOTENCY_TTL_SECONDS`)",
);
pub const DEFAULT_PAGE_SIZE: Setting = positive(
    "CHAT_DEFAULT_PAGE_SIZE",
    "25",
    "page size of a list without `per_page` (at most `CHAT_MAX_PAGE_SIZE`)",
);
pub const MAX_PAGE_SIZE: Setting = positive(
    "CHAT_MAX_PAGE_SIZE",
    "100",
    "the largest `per_page` accepted",
);
pub const HEALTH_ADDR: Setting = setting(
    "CHAT_HEALTH_ADDR",
    Derived("`127.0.0.1:9090` (api), `127.0.0.1:9091` (ingest-worker), `127.0.0.1:9092` (indexer)"),
    "the internal port: `/livez`, `/readyz` (a worker's is `503` while not consuming) and \
     `/metrics`",
);
pub const ADMIN_TOKEN: Setting = setting(
    "CHAT_ADMIN_TOKEN",
    Nothing("generated into `CHAT_DATA_DIR/admin-token` (mode 600) on first start"),
    "the operator's secret (at least 22 printable characters) that lists all applications",
);
pub const DOCS_ENABLED: Setting = setting(
    "CHAT_DOCS_ENABLED",
    Value("true"),
    "serve `/docs` and `/api/v1/openapi.json` on the public port",
);
pub const RATE_LIMIT_PER_TOKEN: Setting = setting(
    "CHAT_RATE_LIMIT_PER_TOKEN",
    Value("500"),
    "requests per second per application token, per api process; 0 turns it off",
);
pub const RATE_LIMIT_PER_TOKEN_BURST: Setting = setting(
    "CHAT_RATE_LIMIT_PER_TOKEN_BURST",
    Value("1000"),
    "burst of `CHAT_RATE_LIMIT_PER_TOKEN` (at least 1 while the limit is on)",
);
pub const RATE_LIMIT_PER_ADDRESS: Setting = setting(
    "CHAT_RATE_LIMIT_PER_ADDRESS",
    Value("200"),
    "requests per second per client address, per api process; 0 turns it off",
);
pub const RATE_LIMIT_PER_ADDRESS_BURST: Setting = setting(
    "CHAT_RATE_LIMIT_PER_ADDRESS_BURST",
    Value("400"),
    "burst of `CHAT_RATE_LIMIT_PER_ADDRESS` (at least 1 while the limit is on)",
);
pub const TRUSTED_PROXY_HOPS: Setting = setting(
    "CHAT_TRUSTED_PROXY_HOPS",
    Value("0"),
    "proxies in front of the api that append to `X-Forwarded-For`; the client address is that \
     many entries from the right (0: the peer address)",
);
pub const MAX_CONNECTIONS: Setting = positive(
    "CHAT_MAX_CONNECTIONS",
    "1024",
    "connections one api process serves at once; more wait in the listen backlog",
);
pub const MAX_CONNECTIONS_PER_ADDRESS: Setting = Setting {
    name: "CHAT_MAX_CONNECTIONS_PER_ADDRESS",
    when_unset: Derived("a quarter of `CHAT_MAX_CONNECTIONS`"),
    bounds: POSITIVE,
    meaning: "connections of one client address (an IPv6 client per /64) served at once while \
              `CHAT_TRUSTED_PROXY_HOPS` is 0; one more is closed at once; at most \
              `CHAT_MAX_CONNECTIONS`",
};
pub const HEADER_READ_TIMEOUT_MS: Setting = positive(
    "CHAT_HEADER_READ_TIMEOUT_MS",
    "5000",
    "a client must send its request line and headers (also of the next request on a kept-alive \
     connection) within this, or is disconnected",
);
pub const BODY_TIMEOUT_MS: Setting = positive(
    "CHAT_BODY_TIMEOUT_MS",
    "5000",
    "a client must send its request body within this, or gets `408`",
);
pub const CONNECT_TIMEOUT_MS: Setting = positive(
    "CHAT_CONNECT_TIMEOUT_MS",
    "3000",
    "longest connect (TCP, TLS, handshake) to a backing service: a black-holed address fails \
     after this instead of the OS timeout",
);
pub const DEPENDENCY_TIMEOUT_MS: Setting = positive(
    "CHAT_DEPENDENCY_TIMEOUT_MS",
    "5000",
    "longest call to a backing service on the request path (query, counter, publish with its \
     confirm, search); past it the call fails as transient. The workers' batch writes are not \
     bounded by it (a batch of the largest events legitimately takes longer; the consumer \
     retries failures)",
);
pub const SEARCH_TIMEOUT_MS: Setting = positive(
    "CHAT_SEARCH_TIMEOUT_MS",
    "2000",
    "server-side time limit of a search in Elasticsearch",
);
pub const STREAMS_PER_REPLICA: Setting = setting(
    "CHAT_STREAMS_PER_REPLICA",
    Derived("half of `CHAT_MAX_CONNECTIONS`"),
    "live message streams one api process serves at once (at most half of \
     `CHAT_MAX_CONNECTIONS`: streams hold their connections; 0 turns streaming off)",
);
pub const STREAMS_PER_APPLICATION: Setting = setting(
    "CHAT_STREAMS_PER_APPLICATION",
    Value("100"),
    "live message streams of one application one api process serves at once",
);
pub const STREAMS_PER_ADDRESS: Setting = setting(
    "CHAT_STREAMS_PER_ADDRESS",
    Value("20"),
    "live message streams of one client address (over every application) one api process \
     serves at once",
);
pub const STREAM_MAX_LIFETIME_SECONDS: Setting = positive(
    "CHAT_STREAM_MAX_LIFETIME_SECONDS",
    "3600",
    "a stream ends after this long; its client resumes with `Last-Event-ID`",
);
pub const STREAM_HEARTBEAT_MS: Setting = positive(
    "CHAT_STREAM_HEARTBEAT_MS",
    "15000",
    "a comment line this often keeps a quiet stream (and the proxies on its way) open",
);
pub const STREAM_BUFFERED_CHANGES: Setting = positive(
    "CHAT_STREAM_BUFFERED_CHANGES",
    "256",
    "changes a stream's reader may fall behind by before it is disconnected (it resumes with \
     `Last-Event-ID`)",
);
pub const APPLICATION_CREATION: Setting = setting(
    "CHAT_APPLICATION_CREATION",
    Value("open"),
    "who may create applications: `open` (anyone, the reference contract) or `admin` (only with \
     `Authorization: Bearer <admin token>`; what a public deployment wants, and the chart's \
     production values)",
);
pub const TOKEN_ROTATION_OVERLAP_SECONDS: Setting = Setting {
    name: "CHAT_TOKEN_ROTATION_OVERLAP_SECONDS",
    when_unset: Value("86400"),
    // A year keeps every expiry a date the databases store.
    bounds: Bounds {
        min: 0,
        max: 365 * 86_400,
    },
    meaning: "after `POST .../token/rotate`, how long the application's older tokens keep working",
};
pub const CLIENT_TOKEN_SECRET: Setting = setting(
    "CHAT_CLIENT_TOKEN_SECRET",
    Nothing(
        "generated once into the database (every replica shares it); a dump of the database can \
         then forge client tokens, so set it in production",
    ),
    "the operator's secret (at least 32 printable characters) from which each application's \
     client-token signing key is derived (HMAC-SHA256 of the application's key id); changing it \
     ends every client token",
);
pub const CLIENT_TOKEN_MAX_LIFETIME_SECONDS: Setting = Setting {
    name: "CHAT_CLIENT_TOKEN_MAX_LIFETIME_SECONDS",
    when_unset: Value("86400"),
    // A year keeps every expiry a date the clients can represent.
    bounds: Bounds {
        min: 1,
        max: 365 * 86_400,
    },
    meaning: "the longest `expires_in` a client token may be minted with (a longer one is `422`); \
              the default `expires_in` is 3600 or this, whichever is shorter",
};
pub const CLIENT_TOKEN_REVOCATION_POLL_MS: Setting = positive(
    "CHAT_CLIENT_TOKEN_REVOCATION_POLL_MS",
    "250",
    "how often each api replica reads the client-token revocations (`revoke-all`) of every \
     replica; while its reads fail for 4 times this long it checks every client token in the \
     database instead, so a revoked token is refused within that time",
);
pub const CORS_ALLOWED_ORIGINS: Setting = setting(
    "CHAT_CORS_ALLOWED_ORIGINS",
    Nothing("none (no CORS headers)"),
    "origins (`scheme://host[:port]`, comma-separated) whose pages may call the chat routes \
     (`/api/v1/chats/...`, the stream included) from a browser, with a client token",
);
pub const MAX_CHATS_PER_APPLICATION: Setting = setting(
    "CHAT_MAX_CHATS_PER_APPLICATION",
    Value("0"),
    "chats an application may have (counted by chat numbers handed out; requests racing at the \
     edge may pass it by as many as run at once); past it `403 quota_exceeded`; 0: no limit",
);
pub const MAX_MESSAGES_PER_MINUTE_PER_APPLICATION: Setting = setting(
    "CHAT_MAX_MESSAGES_PER_MINUTE_PER_APPLICATION",
    Value("0"),
    "messages an application may post per wall-clock minute, counted in Redis over every replica \
     (one more round trip per message while set); past it `429 quota_exceeded` with \
     `Retry-After` until the next minute; 0: no limit",
);
pub const SHUTDOWN_DELAY_MS: Setting = setting(
    "CHAT_SHUTDOWN_DELAY_MS",
    Value("0"),
    "after SIGTERM the api keeps serving this long with `/readyz` answering 503 `draining`, then \
     drains: the time a cluster takes to stop routing to it (the chart sets it where the cluster \
     has no native `preStop` sleep)",
);
pub const TLS_CA_FILE: Setting = setting(
    "CHAT_TLS_CA_FILE",
    Nothing("the system's roots only"),
    "a PEM CA trusted (besides the system's) for TLS to every backing service; TLS itself is \
     chosen by the URL (see \"Security\")",
);
pub const CONSUMER_PREFETCH: Setting = Setting {
    name: "CHAT_CONSUMER_PREFETCH",
    when_unset: Value("1000"),
    // RabbitMQ's prefetch count is 16 bits.
    bounds: Bounds {
        min: 1,
        max: u16::MAX as u64,
    },
    meaning: "deliveries in flight per consumer, lowered so that this many of the largest events \
              fit in `CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT` (255 with the defaults)",
};
pub const CONSUMER_MAX_BYTES_IN_FLIGHT: Setting = setting(
    "CHAT_CONSUMER_MAX_BYTES_IN_FLIGHT",
    Value("67108864"),
    "bytes of deliveries a consumer may hold (64 MiB); the largest event is about \
     `CHAT_MAX_REQUEST_BYTES`, so a worker behind 1,000 of them stays at about 150 MiB (tested)",
);
pub const AMQP_QUEUE_TYPE: Setting = setting(
    "CHAT_AMQP_QUEUE_TYPE",
    Value("classic"),
    "`classic` (one node, fastest: the laptop) or `quorum` (replicated over a RabbitMQ cluster, \
     survives the loss of a minority of nodes: production); the type of an existing queue cannot \
     change, so switching means a new `CHAT_AMQP_PREFIX` or draining and deleting the queues",
);
pub const AMQP_DELIVERY_LIMIT: Setting = setting(
    "CHAT_AMQP_DELIVERY_LIMIT",
    Value("20"),
    "quorum queues: deliveries of one event (a worker that keeps crashing on it) before RabbitMQ \
     dead-letters it",
);
pub const BATCH_MAX_SIZE: Setting = positive(
    "CHAT_BATCH_MAX_SIZE",
    "500",
    "a batch closes at this size (the indexer sends a batch in `_bulk` requests of at most 8 MiB \
     each: Elasticsearch rejects a request above its indexing pressure limit, 10% of its heap, \
     every time)",
);
pub const BATCH_MAX_WAIT_MS: Setting = setting(
    "CHAT_BATCH_MAX_WAIT_MS",
    Value("50"),
    "a batch closes after this wait",
);
pub const RETRY_BASE_DELAY_MS: Setting = positive(
    "CHAT_RETRY_BASE_DELAY_MS",
    "100",
    "first delay of the retries of a failed batch and of reconnects (at most \
     `CHAT_RETRY_MAX_DELAY_MS`)",
);
pub const RETRY_MAX_DELAY_MS: Setting = positive(
    "CHAT_RETRY_MAX_DELAY_MS",
    "10000",
    "longest delay between retries (the delays double up to it)",
);
pub const LOG_FILTER: Setting = setting(
    "RUST_LOG",
    Value("info"),
    "log filter (`tracing-subscriber`'s syntax); logs are JSON lines on stdout",
);
pub const OTLP_ENDPOINT: Setting = setting(
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    Nothing("tracing off (unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set)"),
    "base URL of a collector's OTLP receiver: used as is over `grpc`, `/v1/traces` appended over \
     `http/protobuf`; see \"Following one message\"",
);
pub const OTLP_TRACES_ENDPOINT: Setting = setting(
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    Derived("from `OTEL_EXPORTER_OTLP_ENDPOINT`"),
    "the full URL traces are sent to, used as is (wins over `OTEL_EXPORTER_OTLP_ENDPOINT`)",
);
pub const OTLP_PROTOCOL: Setting = setting(
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    Value("grpc"),
    "`grpc` or `http/protobuf` (OTLP's transports); any other value is refused at start",
);
pub const OTLP_TIMEOUT_MS: Setting = positive(
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "10000",
    "milliseconds one export of spans to the collector may take",
);
pub const TRACES_SAMPLER: Setting = setting(
    "OTEL_TRACES_SAMPLER",
    Value("parentbased_always_on"),
    "which traces are recorded: `always_on`, `always_off`, `traceidratio`, \
     `parentbased_always_on`, `parentbased_always_off` or `parentbased_traceidratio` (`parentbased_` \
     follows the caller's sampled flag); any other value is refused at start",
);
pub const TRACES_SAMPLER_ARG: Setting = setting(
    "OTEL_TRACES_SAMPLER_ARG",
    Value("1"),
    "the share of traces the `traceidratio` samplers record, 0 to 1",
);
pub const PUSHGATEWAY_URL: Setting = setting(
    "CHAT_PUSHGATEWAY_URL",
    Nothing("no push"),
    "counter-sync pushes the metrics of each run there (a CronJob's pod lives too briefly to be \
     scraped)",
);
pub const LEASE_NAME: Setting = setting(
    "CHAT_LEASE_NAME",
    Value("chat-counter-sync"),
    "the Lease counter-sync holds while it runs in a cluster",
);
pub const LEASE_DURATION_SECONDS: Setting = positive(
    "CHAT_LEASE_DURATION_SECONDS",
    "60",
    "how long the Lease lasts without renewal",
);
pub const POD_NAMESPACE: Setting = setting(
    "POD_NAMESPACE",
    Value("default"),
    "where the Lease lives (the chart sets it from the pod)",
);
pub const POD_NAME: Setting = setting(
    "POD_NAME",
    Value("counter-sync"),
    "who holds the Lease (the chart sets it from the pod)",
);
pub const JOB_NAME: Setting = setting(
    "JOB_NAME",
    Nothing("no Job"),
    "counter-sync's Job (the chart sets it from the pod's job-name label): a Lease held by an \
     earlier pod of the same Job is a dead predecessor's, and the run fails so that the Job \
     retries once it expired",
);
pub const MIGRATE_WAIT_SECONDS: Setting = setting(
    "CHAT_MIGRATE_WAIT_SECONDS",
    Value("0"),
    "`api migrate` retries this long while a dependency is unreachable",
);
pub const REINDEX_LOOKBACK_SECONDS: Setting = setting(
    "CHAT_REINDEX_LOOKBACK_SECONDS",
    Value("3600"),
    "counter-sync writes the messages edited (`PUT`, `DELETE`) this far back to the index again, \
     and purges the applications deleted this far back again (repairs a lost event; longer than \
     the time between two runs)",
);

pub const WEBHOOK_ALLOWED_HOSTS: Setting = setting(
    "CHAT_WEBHOOK_ALLOWED_HOSTS",
    Nothing("none"),
    "webhook destinations allowed although they are loopback, private, link-local, unique-local or \
     a metadata address (refused otherwise, at registration and at connect time): host names, \
     addresses or CIDRs, comma-separated (e.g. `127.0.0.1,hooks.internal,10.20.0.0/16`)",
);
pub const WEBHOOK_POLL_MS: Setting = positive(
    "CHAT_WEBHOOK_POLL_MS",
    "200",
    "how often the webhook-dispatcher looks for endpoints with changes to deliver",
);
pub const WEBHOOK_CONNECT_TIMEOUT_MS: Setting = positive(
    "CHAT_WEBHOOK_CONNECT_TIMEOUT_MS",
    "3000",
    "a webhook delivery's connect timeout",
);
pub const WEBHOOK_TIMEOUT_MS: Setting = positive(
    "CHAT_WEBHOOK_TIMEOUT_MS",
    "10000",
    "a webhook delivery's whole time (connect, send, answer); longer counts as a failed attempt",
);
pub const WEBHOOK_MAX_RESPONSE_BYTES: Setting = setting(
    "CHAT_WEBHOOK_MAX_RESPONSE_BYTES",
    Value("4096"),
    "bytes of an endpoint's answer read (the start is kept with the attempt); the rest is not \
     read",
);
pub const WEBHOOK_MAX_IN_FLIGHT: Setting = positive(
    "CHAT_WEBHOOK_MAX_IN_FLIGHT",
    "64",
    "endpoints a webhook-dispatcher delivers to at once (each endpoint gets one delivery at a \
     time: its changes arrive in order)",
);
pub const WEBHOOK_RETRY_FIRST_MS: Setting = positive(
    "CHAT_WEBHOOK_RETRY_FIRST_MS",
    "5000",
    "the first retry of a failed webhook delivery; each next one waits twice as long (plus or \
     minus a fifth, at random), up to `CHAT_WEBHOOK_RETRY_MAX_MS`",
);
pub const WEBHOOK_RETRY_MAX_MS: Setting = positive(
    "CHAT_WEBHOOK_RETRY_MAX_MS",
    "3600000",
    "the longest wait between two attempts of a webhook delivery",
);
pub const WEBHOOK_DISABLE_AFTER_SECONDS: Setting = positive(
    "CHAT_WEBHOOK_DISABLE_AFTER_SECONDS",
    "86400",
    "an endpoint whose delivery has failed for this long is disabled (a `webhook.disabled` \
     attempt says so; `PATCH` with `\"disabled\": false` resumes where it stopped)",
);
pub const WEBHOOK_MAX_ENDPOINTS_PER_APPLICATION: Setting = positive(
    "CHAT_WEBHOOK_MAX_ENDPOINTS_PER_APPLICATION",
    "20",
    "webhook endpoints one application may register",
);
pub const WEBHOOK_ATTEMPTS_RETENTION_HOURS: Setting = positive(
    "CHAT_WEBHOOK_ATTEMPTS_RETENTION_HOURS",
    "72",
    "how long the webhook-dispatcher keeps the record of an attempt",
);

/// Every setting, in the order of the README's table.
pub const ALL: &[&Setting] = &[
    &DATABASE_URL,
    &REDIS_URL,
    &AMQP_URL,
    &ELASTICSEARCH_URL,
    &DATA_DIR,
    &HTTP_ADDR,
    &DATABASE_MAX_CONNECTIONS,
    &REDIS_PREFIX,
    &AMQP_PREFIX,
    &ES_INDEX,
    &ES_REPLICAS,
    &NUMBER_BLOCK_SIZE,
    &PUBLISH_CONFIRM_TIMEOUT_MS,
    &MAX_REQUEST_BYTES,
    &REQUEST_TIMEOUT_MS,
    &PENDING_CHAT_TTL_SECONDS,
    &IDEMPOTENCY_TTL_SECONDS,
    &IDEMPOTENCY_LEASE_SECONDS,
    &DEFAULT_PAGE_SIZE,
    &MAX_PAGE_SIZE,
    &HEALTH_ADDR,
    &ADMIN_TOKEN,
    &DOCS_ENABLED,
    &RATE_LIMIT_PER_TOKEN,
    &RATE_LIMIT_PER_TOKEN_BURST,
    &RATE_LIMIT_PER_ADDRESS,
    &RATE_LIMIT_PER_ADDRESS_BURST,
    &TRUSTED_PROXY_HOPS,
    &MAX_CONNECTIONS,
    &MAX_CONNECTIONS_PER_ADDRESS,
    &HEADER_READ_TIMEOUT_MS,
    &BODY_TIMEOUT_MS,
    &CONNECT_TIMEOUT_MS,
    &DEPENDENCY_TIMEOUT_MS,
    &SEARCH_TIMEOUT_MS,
    &STREAMS_PER_REPLICA,
    &STREAMS_PER_APPLICATION,
    &STREAMS_PER_ADDRESS,
    &STREAM_MAX_LIFETIME_SECONDS,
    &STREAM_HEARTBEAT_MS,
    &STREAM_BUFFERED_CHANGES,
    &APPLICATION_CREATION,
    &TOKEN_ROTATION_OVERLAP_SECONDS,
    &CLIENT_TOKEN_SECRET,
    &CLIENT_TOKEN_MAX_LIFETIME_SECONDS,
    &CLIENT_TOKEN_REVOCATION_POLL_MS,
    &CORS_ALLOWED_ORIGINS,
    &MAX_CHATS_PER_APPLICATION,
    &MAX_MESSAGES_PER_MINUTE_PER_APPLICATION,
    &SHUTDOWN_DELAY_MS,
    &TLS_CA_FILE,
    &CONSUMER_PREFETCH,
    &CONSUMER_MAX_BYTES_IN_FLIGHT,
    &AMQP_QUEUE_TYPE,
    &AMQP_DELIVERY_LIMIT,
    &BATCH_MAX_SIZE,
    &BATCH_MAX_WAIT_MS,
    &RETRY_BASE_DELAY_MS,
    &RETRY_MAX_DELAY_MS,
    &LOG_FILTER,
    &OTLP_ENDPOINT,
    &OTLP_TRACES_ENDPOINT,
    &OTLP_PROTOCOL,
    &OTLP_TIMEOUT_MS,
    &TRACES_SAMPLER,
    &TRACES_SAMPLER_ARG,
    &PUSHGATEWAY_URL,
    &LEASE_NAME,
    &LEASE_DURATION_SECONDS,
    &POD_NAMESPACE,
    &POD_NAME,
    &JOB_NAME,
    &MIGRATE_WAIT_SECONDS,
    &REINDEX_LOOKBACK_SECONDS,
    &WEBHOOK_ALLOWED_HOSTS,
    &WEBHOOK_POLL_MS,
    &WEBHOOK_CONNECT_TIMEOUT_MS,
    &WEBHOOK_TIMEOUT_MS,
    &WEBHOOK_MAX_RESPONSE_BYTES,
    &WEBHOOK_MAX_IN_FLIGHT,
    &WEBHOOK_RETRY_FIRST_MS,
    &WEBHOOK_RETRY_MAX_MS,
    &WEBHOOK_DISABLE_AFTER_SECONDS,
    &WEBHOOK_MAX_ENDPOINTS_PER_APPLICATION,
    &WEBHOOK_ATTEMPTS_RETENTION_HOURS,
];

/// The README's configuration table.
#[cfg(test)]
pub(super) fn markdown_table() -> String {
    let mut table = String::from("| variable | default | meaning |\n| --- | --- | --- |\n");
    for setting in ALL {
        let default = match setting.when_unset {
            Value(value) => format!("`{value}`"),
            Nothing(meaning) => format!("unset: {meaning}"),
            Derived(meaning) => meaning.to_owned(),
        };
        let bounds = match setting.bounds {
            ANY => String::new(),
            POSITIVE => "; at least 1".to_owned(),
            Bounds { min: 0, max } => format!("; at most {max}"),
            Bounds { min, max } => format!("; {min} to {max}"),
        };
        table.push_str(&format!(
            "| `{}` | {default} | {}{bounds} |\n",
            setting.name, setting.meaning
        ));
    }
    table
}
