//! One test's isolated environment, on either stack: its own MySQL database, RabbitMQ names, Redis
//! key prefix and Elasticsearch index, or its own embedded data directory; and what it starts in
//! it (the api and workers in-process, or the binaries as child processes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use chatcore::Config;
use chatcore::events::Consumer;
use chatcore::pipeline::run_worker;
use sqlx::{Connection as _, MySqlConnection, MySqlPool};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::processes::{ApiHandle, RunningChat, WorkerHandles, binary_path};
use crate::{Client, eventually};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Base URLs of the shared services, from the same variables `scripts/services` uses.
pub struct Services {
    pub mysql_admin_url: String,
    pub redis_url: String,
    /// The sentinels of `scripts/services up --ha` (master `chat-ha`).
    pub redis_sentinel_url: String,
    /// The Redis Cluster of `scripts/services up --ha` (three of its six nodes).
    pub redis_cluster_url: String,
    /// `REDIS_HA_BASE_PORT`: the replicated Redis from here, their sentinels from +10, the
    /// cluster's nodes from +20.
    pub redis_ha_base_port: u16,
    pub amqp_url: String,
    /// RabbitMQ's management API (guest/guest).
    pub amqp_management_url: String,
    /// `AMQP_HA_BASE_PORT`: the RabbitMQ cluster of `scripts/services up --ha`, its nodes' AMQP
    /// ports from here, their management APIs from +10.
    pub amqp_ha_base_port: u16,
    pub elasticsearch_url: String,
    /// The Elasticsearch 7.17 node `scripts/test` starts beside the 8.x one.
    pub elasticsearch_7_url: String,
}

impl Services {
    pub fn from_env() -> Self {
        let mysql_port = env_or("MYSQL_PORT", "3306");
        let redis_port = env_or("REDIS_PORT", "6379");
        let ha_base: u16 = env_or("REDIS_HA_BASE_PORT", "6400")
            .parse()
            .expect("REDIS_HA_BASE_PORT is a port");
        let nodes = |first: u16| {
            (first..first + 3)
                .map(|port| format!("127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let amqp_port = env_or("AMQP_PORT", "5672");
        let amqp_management_port = env_or("AMQP_MANAGEMENT_PORT", "15672");
        let amqp_ha_base_port = env_or("AMQP_HA_BASE_PORT", "5700")
            .parse()
            .expect("AMQP_HA_BASE_PORT is a port");
        let es_port = env_or("ES_PORT", "9200");
        let es7_port = env_or("ES7_PORT", "9201");
        Self {
            mysql_admin_url: format!("mysql://chat:chat@127.0.0.1:{mysql_port}"),
            redis_url: format!("redis://127.0.0.1:{redis_port}/0"),
            redis_sentinel_url: format!("redis+sentinel://{}/chat-ha/0", nodes(ha_base + 10)),
            redis_cluster_url: format!("redis+cluster://{}", nodes(ha_base + 20)),
            redis_ha_base_port: ha_base,
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"),
            amqp_management_url: format!("http://127.0.0.1:{amqp_management_port}/api"),
            amqp_ha_base_port,
            elasticsearch_url: format!("http://127.0.0.1:{es_port}"),
            elasticsearch_7_url: format!("http://127.0.0.1:{es7_port}"),
        }
    }
}

/// Which stack a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// MySQL, Redis, RabbitMQ and Elasticsearch, with separate workers.
    Services,
    /// One process, no service URL: SQLite, in-process counters and queue, FTS5.
    Embedded,
}

/// Runs an `async fn(TestEnv) -> anyhow::Result<()>` once on each stack, as two tests
/// `<name>::on_services` and `<name>::embedded`.
#[macro_export]
macro_rules! both_stacks {
    ($test:ident) => {
        mod $test {
            #[tokio::test]
            async fn on_services() -> anyhow::Result<()> {
                super::$test($crate::TestEnv::new().await?).await
            }

            #[tokio::test]
            async fn embedded() -> anyhow::Result<()> {
                super::$test($crate::TestEnv::embedded().await?).await
            }
        }
    };
}

/// One test's isolated slice of the shared services, or its own embedded data directory.
pub struct TestEnv {
    pub id: String,
    pub settings: HashMap<String, String>,
    pub services: Services,
    pub(crate) database: Database,
}

pub(crate) enum Database {
    MySql(MySqlPool),
    /// The data directory of the embedded process; removed when the test ends.
    Embedded(PathBuf),
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Database::Embedded(data_dir) = &self.database {
            let _ = std::fs::remove_dir_all(data_dir);
        }
    }
}

/// The admin token of every test's api (`Client::get_as_admin` sends it).
pub const TEST_ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// Settings of every test: ephemeral ports, short batch waits and retry delays, quiet logs, a
/// known admin token, and no rate limits (the tests of the limits turn them on).
const TEST_SETTINGS: [(&str, &str); 16] = [
    ("CHAT_HTTP_ADDR", "127.0.0.1:0"),
    ("CHAT_HEALTH_ADDR", "127.0.0.1:0"),
    ("CHAT_ADMIN_TOKEN", TEST_ADMIN_TOKEN),
    // Every test's client is 127.0.0.1: no per-client bound but where a test sets one.
    ("CHAT_RATE_LIMIT_PER_TOKEN", "0"),
    ("CHAT_RATE_LIMIT_PER_ADDRESS", "0"),
    ("CHAT_MAX_CONNECTIONS_PER_ADDRESS", "1024"),
    ("CHAT_BATCH_MAX_WAIT_MS", "10"),
    ("CHAT_RETRY_BASE_DELAY_MS", "20"),
    ("CHAT_RETRY_MAX_DELAY_MS", "500"),
    ("CHAT_DATABASE_MAX_CONNECTIONS", "8"),
    ("RUST_LOG", "warn"),
    // Webhooks go to the tests' receivers on 127.0.0.1 (every other private address stays
    // refused), promptly, and are retried within the tests' patience.
    ("CHAT_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1"),
    ("CHAT_WEBHOOK_POLL_MS", "50"),
    ("CHAT_WEBHOOK_RETRY_FIRST_MS", "200"),
    ("CHAT_WEBHOOK_RETRY_MAX_MS", "1000"),
    ("CHAT_WEBHOOK_TIMEOUT_MS", "3000"),
];

fn new_test_id() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A database as an earlier release left it ([`TestEnv::mysql_database_before`]).
pub struct OlderDatabase {
    pub pool: MySqlPool,
    name: String,
    admin: MySqlConnection,
}

impl OlderDatabase {
    /// Applies the migrations of this release.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        chatcore::store::mysql::MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn drop_database(mut self) -> anyhow::Result<()> {
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {}", self.name)))
            .execute(&mut self.admin)
            .await?;
        Ok(())
    }
}

impl TestEnv {
    /// The embedded stack: no service URL, a fresh data directory.
    pub async fn embedded() -> anyhow::Result<Self> {
        let id = new_test_id();
        let data_dir = std::env::temp_dir().join(format!("chat-{id}"));
        let mut settings: HashMap<String, String> = TEST_SETTINGS
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        settings.insert(
            "CHAT_DATA_DIR".to_owned(),
            data_dir.to_string_lossy().into_owned(),
        );
        Ok(Self {
            id,
            settings,
            services: Services::from_env(),
            database: Database::Embedded(data_dir),
        })
    }

    pub fn stack(&self) -> Stack {
        match self.database {
            Database::MySql(_) => Stack::Services,
            Database::Embedded(_) => Stack::Embedded,
        }
    }

    /// The MySQL pool of a test on the real services.
    pub fn mysql(&self) -> &MySqlPool {
        match &self.database {
            Database::MySql(pool) => pool,
            Database::Embedded(_) => panic!("this test runs on the real services only"),
        }
    }

    /// A fresh database (migrated), queue names, key prefix and index.
    pub async fn new() -> anyhow::Result<Self> {
        Self::with_settings(&[]).await
    }

    /// Like [`TestEnv::new`], with the search index on the Elasticsearch 7.17 node.
    pub async fn on_elasticsearch_7() -> anyhow::Result<Self> {
        let url = Services::from_env().elasticsearch_7_url;
        Self::with_settings(&[("ELASTICSEARCH_URL", &url)]).await
    }

    pub async fn with_settings(overrides: &[(&str, &str)]) -> anyhow::Result<Self> {
        let services = Services::from_env();
        let id = new_test_id();
        let database = format!("chat_{id}");
        let mut admin = MySqlConnection::connect(&services.mysql_admin_url)
            .await
            .context("connecting to mysql (is `scripts/services up` running?)")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {database} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        )))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        let mut settings: HashMap<String, String> = [
            (
                "DATABASE_URL",
                format!("{}/{database}", services.mysql_admin_url),
            ),
            ("REDIS_URL", services.redis_url.clone()),
            ("AMQP_URL", services.amqp_url.clone()),
            ("ELASTICSEARCH_URL", services.elasticsearch_url.clone()),
            ("CHAT_AMQP_PREFIX", id.clone()),
            ("CHAT_REDIS_PREFIX", id.clone()),
            ("CHAT_ES_INDEX", format!("{id}-messages")),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .chain(
            TEST_SETTINGS
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
        )
        .collect();
        for (name, value) in overrides {
            settings.insert((*name).to_owned(), (*value).to_owned());
        }
        let config = Config::from_map(&settings)?;
        chatcore::adapters::migrate(&config).await?;
        let pool = chatcore::store::mysql::connect(config.require_database_url()?, 4).await?;
        Ok(Self {
            id,
            settings,
            services,
            database: Database::MySql(pool),
        })
    }

    pub fn config(&self) -> Config {
        Config::from_map(&self.settings).expect("test settings are valid")
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.settings.insert(name.to_owned(), value.to_owned());
    }

    /// A MySQL database of its own with the migrations older than `version` applied: what an
    /// earlier release left, to test what the newer migrations do to its rows.
    pub async fn mysql_database_before(&self, version: i64) -> anyhow::Result<OlderDatabase> {
        let name = format!("chat_{}_before_{version}", self.id);
        let admin_url = &self.services.mysql_admin_url;
        let mut admin = MySqlConnection::connect(admin_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        let pool = MySqlPool::connect(&format!("{admin_url}/{name}")).await?;
        chatcore::store::migrations_before(&chatcore::store::mysql::MIGRATOR, version)
            .run(&pool)
            .await?;
        Ok(OlderDatabase { pool, name, admin })
    }

    /// The start of most tests: the api and the workers running, one application (named
    /// `application`) with one chat; [`RunningChat::stop`] stops them at the test's end.
    pub async fn running_chat(&self, application: &str) -> anyhow::Result<RunningChat> {
        let api = self.spawn_api().await?;
        let workers = self.spawn_workers();
        let token = api.client.create_application(application).await?;
        let chat = api.client.create_chat(&token).await?;
        Ok(RunningChat {
            api,
            workers,
            token,
            chat,
        })
    }

    /// Starts the api in this process on an ephemeral port.
    pub async fn spawn_api(&self) -> anyhow::Result<ApiHandle> {
        let listeners = api::Listeners {
            public: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            internal: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        };
        let base_url = format!("http://{}/api/v1", listeners.public.local_addr()?);
        let internal_url = format!("http://{}", listeners.internal.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(api::serve(self.config(), listeners, shutdown.clone()));
        let handle = ApiHandle {
            client: Client::new(&base_url),
            base_url,
            internal_url,
            shutdown,
            task,
        };
        eventually("api answers /livez", Duration::from_secs(20), || async {
            let url = handle.base_url.replace("/api/v1", "/livez");
            Ok(reqwest::get(url)
                .await
                .is_ok_and(|r| r.status().is_success()))
        })
        .await?;
        Ok(handle)
    }

    /// Starts ingest-worker, indexer and webhook-dispatcher in this process (on the embedded
    /// stack the api runs them itself, and this starts nothing).
    pub fn spawn_workers(&self) -> WorkerHandles {
        let shutdown = CancellationToken::new();
        let tasks = match self.stack() {
            Stack::Services => vec![
                tokio::spawn(run_worker(
                    self.config(),
                    Consumer::Ingest,
                    shutdown.clone(),
                )),
                tokio::spawn(run_worker(self.config(), Consumer::Index, shutdown.clone())),
                tokio::spawn(chatcore::webhooks::run_process(
                    self.config(),
                    shutdown.clone(),
                )),
            ],
            Stack::Embedded => Vec::new(),
        };
        WorkerHandles { shutdown, tasks }
    }

    /// Starts one of the workspace binaries as a child process with this environment.
    pub fn spawn_process(&self, binary: &str) -> anyhow::Result<Child> {
        self.spawn_process_logging_to(binary, Stdio::null())
    }

    /// Like [`TestEnv::spawn_process`], with the process' log lines (stdout) going to `logs`.
    pub fn spawn_process_logging_to(
        &self,
        binary: &str,
        logs: impl Into<Stdio>,
    ) -> anyhow::Result<Child> {
        self.command(binary)?
            .stdout(logs)
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {binary}"))
    }

    /// The command line of one of the workspace binaries with this environment.
    pub fn command(&self, binary: &str) -> anyhow::Result<Command> {
        let mut command = Command::new(binary_path(binary)?);
        command.envs(&self.settings).kill_on_drop(true);
        Ok(command)
    }
}
