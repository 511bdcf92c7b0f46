//! Picks the adapter of each part from the configuration: a part whose service URL is set talks
//! to that service, a part without one runs embedded under `CHAT_DATA_DIR`.
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

use crate::broker::Publisher;
use crate::config::Config;
use crate::local_queue::LocalQueue;
use crate::metrics::Metrics;
use crate::numbering::NumberAllocator;
use crate::queue::EventPublisher;
use crate::search::{ElasticsearchIndex, SearchIndex, SqliteSearchIndex};
use crate::state::{InProcessState, RedisState, SharedState};
use crate::store::{MySqlStorage, SqliteStorage, Storage};

/// How often expired keys of the in-process state are deleted.
const KEY_PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// The adapters of one api process.
pub struct Adapters {
    pub storage: Arc<dyn Storage>,
    pub state: Arc<dyn SharedState>,
    pub publisher: Arc<dyn EventPublisher>,
    pub search: Arc<dyn SearchIndex>,
    pub allocator: NumberAllocator,
    /// Set when the queue is embedded: then this process also runs the consumers.
    pub local_queue: Option<LocalQueue>,
    /// Held while the process runs: one process at a time owns the data directory.
    _data_dir_lock: Option<File>,
}

impl Adapters {
    /// Connects to the configured services and opens the embedded files of the other parts.
    pub async fn connect(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Self> {
        let data_dir_lock = if config.database_url.is_none()
            || config.redis_url.is_none()
            || config.amqp_url.is_none()
            || config.elasticsearch_url.is_none()
        {
            Some(lock_data_dir(config)?)
        } else {
            None
        };
        let data_file = |name: &str| config.data_dir.join(name);
        let storage: Arc<dyn Storage> = match &config.database_url {
            Some(url) => {
                let pool = crate::store::mysql::connect(url, config.database_max_connections)
                    .await
                    .with_context(|| format!("connecting to mysql at {url}"))?;
                Arc::new(MySqlStorage::new(pool, Arc::clone(metrics)))
            }
            None => {
                Arc::new(SqliteStorage::open(&data_file("chat.db"), Arc::clone(metrics)).await?)
            }
        };
        let state: Arc<dyn SharedState> = match &config.redis_url {
            Some(url) => Arc::new(RedisState::new(
                crate::connect_redis(url)
                    .await
                    .with_context(|| format!("connecting to redis at {url}"))?,
            )),
            None => {
                let state = Arc::new(InProcessState::open(&data_file("state.db")).await?);
                tokio::spawn(purge_expired_keys(Arc::clone(&state)));
                state
            }
        };
        let (publisher, local_queue): (Arc<dyn EventPublisher>, _) = match &config.amqp_url {
            Some(url) => (
                Arc::new(
                    Publisher::connect(
                        url.clone(),
                        config.topology.clone(),
                        config.api.publish_confirm_timeout,
                        Arc::clone(metrics),
                    )
                    .await
                    .with_context(|| format!("connecting to rabbitmq at {url}"))?,
                ),
                None,
            ),
            None => {
                let queue = LocalQueue::open(
                    &data_file("queue.db"),
                    &config.topology,
                    config.api.publish_confirm_timeout,
                )
                .await?;
                (Arc::new(queue.clone()), Some(queue))
            }
        };
        let search = connect_search(config).await?;
        let allocator = NumberAllocator::new(
            Arc::clone(&state),
            Arc::clone(&storage),
            &config.redis_key_prefix,
            config.number_block_size,
        );
        Ok(Self {
            storage,
            state,
            publisher,
            search,
            allocator,
            local_queue,
            _data_dir_lock: data_dir_lock,
        })
    }
}

/// The search index: Elasticsearch when its URL is set, else the embedded FTS5 file.
pub async fn connect_search(config: &Config) -> anyhow::Result<Arc<dyn SearchIndex>> {
    Ok(match &config.elasticsearch_url {
        Some(url) => Arc::new(ElasticsearchIndex::connect(
            url,
            &config.elasticsearch_index,
            config.elasticsearch_replicas,
        )?),
        None => Arc::new(SqliteSearchIndex::open(&config.data_dir.join("search.db")).await?),
    })
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
