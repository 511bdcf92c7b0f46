//! The composition root: every binary gets its adapters here. A part whose service URL is set
//! talks to that service, a part without one runs embedded under `CHAT_DATA_DIR`; either way the
//! adapter is wrapped in its trait's timing wrapper.
//!
//! | part     | URL               | real service   | embedded                         |
//! |----------|-------------------|----------------|----------------------------------|
//! | storage  | DATABASE_URL      | MySQL          | SQLite `chat.db`                 |
//! | counters | REDIS_URL         | Redis          | memory + SQLite `state.db`       |
//! | queue    | AMQP_URL          | RabbitMQ       | SQLite `queue.db`, consumed here |
//! | search   | ELASTICSEARCH_URL | Elasticsearch  | SQLite FTS5 `search.db`          |

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::numbering::NumberAllocator;
use crate::queue::{EventQueue, RabbitMqQueue, SqliteQueue, TimedQueue};
use crate::retry::{self, Backoff};
use crate::search::{ElasticsearchIndex, SearchIndex, SqliteSearchIndex, TimedSearchIndex};
use crate::state::{InProcessState, RedisState, SharedState, TimedState};
use crate::store::{MySqlStorage, SqliteStorage, Storage, TimedStorage};

/// How often expired keys of the in-process state are deleted.
const KEY_PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// The adapters of one api process.
pub struct Adapters {
    pub storage: Arc<dyn Storage>,
    pub state: Arc<dyn SharedState>,
    pub queue: Arc<dyn EventQueue>,
    pub search: Arc<dyn SearchIndex>,
    pub allocator: NumberAllocator,
    /// The queue is embedded: this process also runs its consumers.
    pub consumes_in_process: bool,
    /// Held while the process runs: one process at a time owns the data directory.
    _data_dir_lock: Option<File>,
}

impl Adapters {
    /// Connects to the configured services and opens the embedded files of the other parts.
    pub async fn connect(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        let data_dir_lock = if config.is_partly_embedded() {
            Some(lock_data_dir(config)?)
        } else {
            None
        };
        let storage = storage(config, metrics).await?;
        let state = state(config, metrics).await?;
        let queue = queue(config, metrics).await?;
        // The api refuses to start without its broker: connect now, not at the first POST.
        queue
            .ensure_topology()
            .await
            .with_context(|| format!("connecting to the queue ({})", queue.kind()))?;
        let search = search(config, metrics).await?;
        let consumes_in_process = config.amqp_url.is_none();
        if consumes_in_process {
            // This process indexes, as the indexer binary would: make sure the index exists.
            search
                .ensure_index()
                .await
                .context("creating the search index")?;
        }
        let allocator = NumberAllocator::new(
            Arc::clone(&state),
            Arc::clone(&storage),
            &config.redis_key_prefix,
            config.number_block_size,
        );
        Ok(Self {
            storage,
            state,
            queue,
            search,
            allocator,
            consumes_in_process,
            _data_dir_lock: data_dir_lock,
        })
    }
}

/// How often the api checks its connections.
const CONNECTION_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Adapters {
    /// Keeps every connection of the api alive until `shutdown`, without waiting for a request to
    /// notice a broken one: after a broker restart the queue is opened again (with backoff), and
    /// the storage, the counters and the index are pinged, which makes their clients reconnect
    /// (each with its own backoff). So readiness recovers by itself.
    pub fn keep_connected(&self, shutdown: &CancellationToken) {
        tokio::spawn(keep_queue_connected(
            Arc::clone(&self.queue),
            shutdown.clone(),
        ));
        let (storage, state, search, shutdown) = (
            Arc::clone(&self.storage),
            Arc::clone(&self.state),
            Arc::clone(&self.search),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            while !retry::sleep_or_cancel(CONNECTION_CHECK_INTERVAL, &shutdown).await {
                let (storage, state, search) =
                    tokio::join!(storage.ping(), state.ping(), search.ping());
                for (dependency, failure) in [
                    ("storage", storage.err().map(|error| error.to_string())),
                    ("counters", state.err().map(|error| error.to_string())),
                    ("search", search.err().map(|error| error.to_string())),
                ] {
                    if let Some(error) = failure {
                        tracing::debug!(dependency, %error, "dependency unreachable, its client reconnects");
                    }
                }
            }
        });
    }
}

async fn keep_queue_connected(queue: Arc<dyn EventQueue>, shutdown: CancellationToken) {
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while !retry::sleep_or_cancel(CONNECTION_CHECK_INTERVAL, &shutdown).await {
        if queue.is_ready().await {
            continue;
        }
        let reconnected = retry::retry(
            backoff,
            &shutdown,
            || queue.ensure_topology(),
            |error, attempt, delay| {
                tracing::warn!(%error, attempt, delay_ms = delay.as_millis() as u64, "queue unreachable, reconnecting");
                true
            },
        )
        .await;
        if reconnected.is_ok() {
            tracing::info!(queue = queue.kind(), "queue reconnected");
        }
    }
}

/// The storage: MySQL when `DATABASE_URL` is set, else the embedded `chat.db`.
pub async fn storage(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<dyn Storage>> {
    let storage: Arc<dyn Storage> = match &config.database_url {
        Some(url) => {
            let pool = crate::store::mysql::connect_with(
                url,
                config.database_max_connections,
                config.connect_timeout,
                tls_ca(config)?.as_deref(),
            )
            .await
            .with_context(|| format!("connecting to mysql at {url}"))?;
            Arc::new(MySqlStorage::new(pool))
        }
        None => Arc::new(SqliteStorage::open(&config.data_dir.join("chat.db")).await?),
    };
    Ok(Arc::new(TimedStorage::new(
        storage,
        Arc::clone(metrics),
        config.dependency_timeout,
    )))
}

/// The counters and keys: Redis when `REDIS_URL` is set, else memory and the embedded
/// `state.db`.
pub async fn state(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<dyn SharedState>> {
    let state: Arc<dyn SharedState> = match &config.redis_url {
        Some(url) => Arc::new(RedisState::new(
            crate::state::connect_redis_with(
                url,
                config.connect_timeout,
                tls_ca(config)?.as_deref(),
            )
            .await
            .with_context(|| format!("connecting to redis at {url}"))?,
        )),
        None => {
            let state = Arc::new(InProcessState::open(&config.data_dir.join("state.db")).await?);
            tokio::spawn(purge_expired_keys(Arc::clone(&state)));
            state
        }
    };
    Ok(Arc::new(TimedState::new(
        state,
        Arc::clone(metrics),
        config.dependency_timeout,
    )))
}

/// The event queue: RabbitMQ when `AMQP_URL` is set (connected on first use), else the embedded
/// `queue.db`.
pub async fn queue(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<dyn EventQueue>> {
    let confirm_timeout = config.api.publish_confirm_timeout;
    let queue: Arc<dyn EventQueue> = match &config.amqp_url {
        Some(url) => Arc::new(RabbitMqQueue::new(
            url.clone(),
            config.topology.clone(),
            confirm_timeout,
            config.connect_timeout,
            tls_ca(config)?.as_deref(),
            config.largest_event_bytes(),
        )),
        None => Arc::new(
            SqliteQueue::open(
                &config.data_dir.join("queue.db"),
                &config.topology,
                confirm_timeout,
            )
            .await?,
        ),
    };
    Ok(Arc::new(TimedQueue::new(
        queue,
        Arc::clone(metrics),
        config.dependency_timeout,
    )))
}

/// The Elasticsearch index of `ELASTICSEARCH_URL` (required), untimed: for what only it answers
/// (its sort, the documents a search visits).
pub fn elasticsearch(config: &Config) -> anyhow::Result<ElasticsearchIndex> {
    Ok(ElasticsearchIndex::connect(
        config.require_elasticsearch_url()?,
        &config.elasticsearch_index,
        config.elasticsearch_replicas,
        tls_ca(config)?.as_deref(),
    )?
    .with_search_timeout(config.api.search_timeout))
}

/// The search index: Elasticsearch when its URL is set, else the embedded FTS5 file.
pub async fn search(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<dyn SearchIndex>> {
    let search: Arc<dyn SearchIndex> = match &config.elasticsearch_url {
        Some(_) => Arc::new(elasticsearch(config)?),
        None => Arc::new(SqliteSearchIndex::open(&config.data_dir.join("search.db")).await?),
    };
    Ok(Arc::new(TimedSearchIndex::new(
        search,
        Arc::clone(metrics),
        config.dependency_timeout,
    )))
}

/// Applies the storage migrations, creates the search index and the broker topology of the
/// configured services (the embedded files migrate themselves when they are opened), retrying
/// for up to `CHAT_MIGRATE_WAIT_SECONDS` while a service is not reachable yet (a fresh cluster).
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + config.migrate_wait;
    let metrics = Metrics::new();
    let migrated = retry::retry(
        Backoff::new(Duration::from_millis(500), Duration::from_secs(5)),
        &CancellationToken::new(),
        || migrate_once(config, &metrics),
        |error, attempt, delay| {
            let retry = tokio::time::Instant::now() + delay < deadline;
            if retry {
                tracing::warn!(error = %format!("{error:#}"), attempt, delay_ms = delay.as_millis() as u64, "migration failed, retrying");
            }
            retry
        },
    )
    .await;
    match migrated {
        Ok(()) => Ok(()),
        Err(retry::Stopped::GaveUp(error)) => Err(error),
        Err(retry::Stopped::Interrupted) => anyhow::bail!("migration interrupted"),
    }
}

async fn migrate_once(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<()> {
    if config.database_url.is_some() {
        storage(config, metrics)
            .await?
            .migrate()
            .await
            .context("applying migrations")?;
    }
    if config.elasticsearch_url.is_some() {
        search(config, metrics)
            .await?
            .ensure_index()
            .await
            .context("creating the search index")?;
    }
    if config.amqp_url.is_some() {
        queue(config, metrics)
            .await?
            .ensure_topology()
            .await
            .context("declaring the broker topology")?;
    }
    tracing::info!("migrations applied");
    Ok(())
}

/// The PEM of `CHAT_TLS_CA_FILE`, which TLS connections to every service trust beside the public
/// roots (TLS itself is the choice of each URL).
fn tls_ca(config: &Config) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(path) = &config.tls_ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path)
        .with_context(|| format!("reading CHAT_TLS_CA_FILE {}", path.display()))?;
    anyhow::ensure!(
        String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----"),
        "CHAT_TLS_CA_FILE {} holds no PEM certificate",
        path.display()
    );
    Ok(Some(pem))
}

/// Two processes on one data directory would each count numbers in memory; the lock makes the
/// second one stop at start instead. The operating system releases it when the process dies,
/// kill -9 included.
fn lock_data_dir(config: &Config) -> anyhow::Result<File> {
    let directory = &config.data_dir;
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating the data directory {}", directory.display()))?;
    let path = directory.join("lock");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another process uses the data directory {} (CHAT_DATA_DIR)",
            directory.display()
        )
    })?;
    Ok(file)
}

async fn purge_expired_keys(state: Arc<InProcessState>) {
    loop {
        match state.purge_expired_keys().await {
            Ok(purged) if purged > 0 => tracing::debug!(purged, "purged expired keys"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not purge expired keys"),
        }
        tokio::time::sleep(KEY_PURGE_INTERVAL).await;
    }
}
