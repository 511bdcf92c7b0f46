//! Helpers of the end-to-end tests: an isolated environment per test, on either stack: the real
//! services (own MySQL database, RabbitMQ names, Redis key prefix and Elasticsearch index) or the
//! embedded single process (own data directory); the api and workers in-process or as child
//! processes, and an HTTP client.
//!
//! The services must be running (`scripts/services up`, done by `scripts/test`); a test that cannot
//! reach one fails. [`both_stacks!`] runs one test body on each stack.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chatcore::Config;
use chatcore::events::Consumer;
use chatcore::metrics::Metrics;
use chatcore::pipeline::run_worker;
use serde_json::Value;
use sqlx::{Connection as _, MySqlConnection, MySqlPool, Row as _};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use reqwest::StatusCode;

pub mod kube;
pub mod own_redis;

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
    pub amqp_url: String,
    /// RabbitMQ's management API (guest/guest).
    pub amqp_management_url: String,
    pub elasticsearch_url: String,
    /// The Elasticsearch 7.17 node `scripts/test` starts beside the 8.x one.
    pub elasticsearch_7_url: String,
}

impl Services {
    pub fn from_env() -> Self {
        let mysql_port = env_or("MYSQL_PORT", "3306");
        let redis_port = env_or("REDIS_PORT", "6379");
        let amqp_port = env_or("AMQP_PORT", "5672");
        let amqp_management_port = env_or("AMQP_MANAGEMENT_PORT", "15672");
        let es_port = env_or("ES_PORT", "9200");
        let es7_port = env_or("ES7_PORT", "9201");
        Self {
            mysql_admin_url: format!("mysql://chat:chat@127.0.0.1:{mysql_port}"),
            redis_url: format!("redis://127.0.0.1:{redis_port}/0"),
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"),
            amqp_management_url: format!("http://127.0.0.1:{amqp_management_port}/api"),
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
    database: Database,
}

enum Database {
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
const TEST_SETTINGS: [(&str, &str); 11] = [
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
];

fn new_test_id() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
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

    /// Runs a query that answers one integer column (the SQL must mean the same in MySQL and
    /// SQLite) on the test's database.
    async fn integers(&self, sql: &str, binds: &[&str]) -> anyhow::Result<Vec<i64>> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.database {
            Database::MySql(pool) => {
                let mut query = sqlx::query(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                // Ids and numbers are BIGINT UNSIGNED, counts BIGINT.
                query
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|row| {
                        row.try_get::<i64, _>(0)
                            .or_else(|_| row.try_get::<u64, _>(0).map(|value| value as i64))
                            .context("an integer column")
                    })
                    .collect()
            }
            Database::Embedded(data_dir) => {
                let file = if sql.0.contains("search_documents") {
                    "search.db"
                } else {
                    "chat.db"
                };
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(data_dir.join(file))
                    .read_only(true);
                let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
                let mut query = sqlx::query_scalar::<_, i64>(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                let values = query.fetch_all(&mut connection).await?;
                connection.close().await?;
                Ok(values)
            }
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

    /// Starts ingest-worker and indexer in this process (on the embedded stack the api runs
    /// its consumers itself, and this starts nothing).
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

    pub async fn count(&self, sql: &'static str, binds: &[u64]) -> anyhow::Result<i64> {
        let binds: Vec<String> = binds.iter().map(u64::to_string).collect();
        let binds: Vec<&str> = binds.iter().map(String::as_str).collect();
        self.integers(sql, &binds)
            .await?
            .first()
            .copied()
            .context("the count answered no row")
    }

    /// A count of rows, with text binds.
    pub async fn count_where(&self, sql: &'static str, binds: &[&str]) -> anyhow::Result<i64> {
        self.integers(sql, binds)
            .await?
            .first()
            .copied()
            .context("the count answered no row")
    }

    /// Internal id of an application, for assertions on the tables.
    pub async fn application_id(&self, token: &str) -> anyhow::Result<u64> {
        // The tables hold the token's digest, never the token.
        let digest: String = chatcore::domain::ApplicationToken::parse(token)?
            .digest()
            .as_bytes()
            .iter()
            .map(|byte| format!("{byte:02X}"))
            .collect();
        let ids = self
            .integers(
                "SELECT application_id FROM application_tokens WHERE HEX(digest) = ?",
                &[&digest],
            )
            .await?;
        Ok(u64::try_from(*ids.first().context("no such application")?)?)
    }

    /// Message numbers of one chat as stored, ascending.
    pub async fn stored_message_numbers(
        &self,
        token: &str,
        chat_number: u64,
    ) -> anyhow::Result<Vec<u64>> {
        let application_id = self.application_id(token).await?;
        let numbers = self
            .integers(
                "SELECT m.number FROM messages m JOIN chats c ON c.id = m.chat_id \
                 WHERE c.application_id = ? AND c.number = ? ORDER BY m.number",
                &[&application_id.to_string(), &chat_number.to_string()],
            )
            .await?;
        Ok(numbers.into_iter().map(|n| n as u64).collect())
    }

    /// Documents of one application in the search index (after a refresh).
    pub async fn indexed_documents_of(&self, application_id: u64) -> anyhow::Result<u64> {
        if self.stack() == Stack::Embedded {
            let count = self
                .count(
                    "SELECT COUNT(*) FROM search_documents WHERE application_id = ?",
                    &[application_id],
                )
                .await?;
            return Ok(u64::try_from(count)?);
        }
        let http = reqwest::Client::new();
        let index = format!(
            "{}/{}-messages",
            self.settings["ELASTICSEARCH_URL"], self.id
        );
        http.post(format!("{index}/_refresh"))
            .send()
            .await?
            .error_for_status()?;
        let response: Value = http
            .post(format!("{index}/_count"))
            .json(&serde_json::json!({"query": {"term": {"application_id": application_id}}}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        response["count"].as_u64().context("count")
    }

    /// Message numbers of one chat in the search index, ascending (after a refresh).
    pub async fn indexed_message_numbers(
        &self,
        token: &str,
        chat_number: u64,
    ) -> anyhow::Result<Vec<u64>> {
        let application_id = self.application_id(token).await?;
        if self.stack() == Stack::Embedded {
            let numbers = self
                .integers(
                    "SELECT number FROM search_documents WHERE application_id = ? \
                     AND chat_number = ? ORDER BY number",
                    &[&application_id.to_string(), &chat_number.to_string()],
                )
                .await?;
            return Ok(numbers.into_iter().map(|n| n as u64).collect());
        }
        let http = reqwest::Client::new();
        let index = format!(
            "{}/{}-messages",
            self.settings["ELASTICSEARCH_URL"], self.id
        );
        http.post(format!("{index}/_refresh"))
            .send()
            .await?
            .error_for_status()?;
        // Pages of 10,000 (the result window) after the last number seen.
        let mut numbers: Vec<u64> = Vec::new();
        loop {
            let mut query = serde_json::json!({
                "size": 10_000,
                "_source": ["number"],
                "query": {"term": {"chat": format!("{application_id}:{chat_number}")}},
                "sort": [{"number": "asc"}],
            });
            if let Some(last) = numbers.last() {
                query["search_after"] = serde_json::json!([last]);
            }
            let response: Value = http
                .post(format!("{index}/_search"))
                .json(&query)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let hits = response["hits"]["hits"].as_array().context("hits")?;
            if hits.is_empty() {
                return Ok(numbers);
            }
            numbers.extend(
                hits.iter()
                    .filter_map(|hit| hit["_source"]["number"].as_u64()),
            );
        }
    }

    /// A connection to the test's RabbitMQ, for publishing what the api never would.
    pub async fn amqp_connection(&self) -> anyhow::Result<lapin::Connection> {
        let url = self.config().require_amqp_url()?.clone();
        Ok(
            lapin::Connection::connect(url.expose(), lapin::ConnectionProperties::default())
                .await?,
        )
    }

    /// Closes, from the broker's side, the RabbitMQ connections whose name starts with `prefix`
    /// (as a broker restart or a network cut would); returns how many.
    pub async fn drop_amqp_connections(&self, prefix: &str) -> anyhow::Result<usize> {
        let http = reqwest::Client::new();
        let api = &self.services.amqp_management_url;
        let connections: Vec<Value> = http
            .get(format!("{api}/connections"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let mut closed = 0;
        for connection in connections {
            let named = connection["client_properties"]["connection_name"]
                .as_str()
                .is_some_and(|name| name.starts_with(prefix));
            let Some(name) = connection["name"].as_str().filter(|_| named) else {
                continue;
            };
            let mut url = reqwest::Url::parse(&format!("{api}/connections/"))?;
            url.path_segments_mut()
                .map_err(|()| anyhow::anyhow!("base url"))?
                .pop_if_empty()
                .push(name);
            http.delete(url)
                .basic_auth("guest", Some("guest"))
                .send()
                .await?
                .error_for_status()?;
            closed += 1;
        }
        Ok(closed)
    }

    /// The type of a RabbitMQ queue (`classic`, `quorum`), from the management API.
    pub async fn queue_type(&self, queue: &str) -> anyhow::Result<String> {
        let mut url =
            reqwest::Url::parse(&format!("{}/queues/", self.services.amqp_management_url))?;
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("base url"))?
            .pop_if_empty()
            .push("/")
            .push(queue);
        let described: Value = reqwest::Client::new()
            .get(url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(described["type"].as_str().context("type")?.to_owned())
    }

    /// Depth of a queue (messages ready).
    pub async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        let queue_of = chatcore::adapters::queue(&self.config(), &Metrics::new()).await?;
        Ok(u32::try_from(queue_of.depth(queue).await?)?)
    }
}

/// A memory figure of a process from `/proc/<pid>/status` (`VmRSS`: resident now, `VmHWM`: its
/// peak), in bytes.
pub fn memory_of(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kilobytes = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kilobytes * 1024)
}

/// A port that was free a moment ago (for a process that must know its port before it starts).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A pinned tool's path: from `variable` (`scripts/test` exports it), or what `scripts/tools <tool>`
/// prints (it installs the tool into the machine's tool cache first when the cache lacks it). A
/// missing tool is an error, never a skipped test.
pub fn tool_path(variable: &str, tool: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(variable).filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        anyhow::ensure!(path.exists(), "{variable}: {} not found", path.display());
        return Ok(path);
    }
    let output = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/tools"))
        .arg(tool)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running scripts/tools {tool}"))?;
    anyhow::ensure!(
        output.status.success(),
        "scripts/tools {tool} failed: {}",
        output.status
    );
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn binary_path(binary: &str) -> anyhow::Result<PathBuf> {
    // The test executable lives in target/<profile>/deps; the binaries one level up.
    let executable = std::env::current_exe()?;
    let profile_dir = executable
        .parent()
        .and_then(|deps| deps.parent())
        .context("locating the target directory")?;
    let path = profile_dir.join(binary);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first (`cargo build --bins`, which scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

pub struct ApiHandle {
    pub base_url: String,
    /// The internal port: `/metrics`, `/livez`, `/readyz`.
    pub internal_url: String,
    pub client: Client,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ApiHandle {
    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.internal_url)
    }

    /// Sends the shutdown signal (SIGTERM's) without waiting for the api to stop.
    pub fn signal_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

pub struct WorkerHandles {
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl WorkerHandles {
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}

/// A JSON HTTP client bound to the API base URL.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
}

/// Status and parsed JSON body of a response (Null when the body is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Client {
    pub fn new(base_url: &str) -> Self {
        Self::with_headers(base_url, reqwest::header::HeaderMap::new())
    }

    /// A client at another address, as an api behind one trusted proxy
    /// (`CHAT_TRUSTED_PROXY_HOPS=1`) sees it: every request carries `X-Forwarded-For: address`.
    pub fn forwarded_for(base_url: &str, address: &str) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-forwarded-for", address.parse()?);
        Ok(Self::with_headers(base_url, headers))
    }

    fn with_headers(base_url: &str, headers: reqwest::header::HeaderMap) -> Self {
        Self {
            http: reqwest::Client::builder()
                .default_headers(headers)
                .pool_max_idle_per_host(256)
                // Below the api's CHAT_HEADER_READ_TIMEOUT_MS (5 s), after which it closes a
                // kept-alive connection: reusing one just then fails the request.
                .pool_idle_timeout(Duration::from_secs(2))
                .build()
                .expect("client builds"),
            base_url: base_url.to_owned(),
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.get(self.url(path))).await
    }

    /// A GET with the admin token of the tests.
    pub async fn get_as_admin(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.get(self.url(path)).bearer_auth(TEST_ADMIN_TOKEN))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Reply> {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    pub async fn post_empty(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.post(self.url(path))).await
    }

    pub async fn put(&self, path: &str, body: Value) -> anyhow::Result<Reply> {
        self.send(self.http.put(self.url(path)).json(&body)).await
    }

    pub async fn send_raw(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
        self.send(request).await
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Reply> {
        let response = request.send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }

    /// Creates an application and returns its token.
    /// Creates an application (201) and returns its token. A 503 of a loaded machine is retried
    /// (for up to a minute): at worst an application too many, which no test counts.
    pub async fn create_application(&self, name: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let reply = self
                .post("/applications", serde_json::json!({ "name": name }))
                .await?;
            if reply.status == StatusCode::SERVICE_UNAVAILABLE
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            anyhow::ensure!(
                reply.status == StatusCode::CREATED,
                "create application: {reply:?}"
            );
            return Ok(reply.body["token"].as_str().context("token")?.to_owned());
        }
    }

    /// Creates a chat (202) and returns its number, as the README tells clients to: with an
    /// `Idempotency-Key` of its own, a 503 of a loaded machine retried with it.
    pub async fn create_chat(&self, token: &str) -> anyhow::Result<u64> {
        self.create_chat_carefully(token, &uuid::Uuid::new_v4().to_string())
            .await
    }

    /// Posts a message as a careful client does: with an `Idempotency-Key`, retrying on 5xx and
    /// 409 (in progress) with the same key until it is accepted; returns its number.
    pub async fn create_message_carefully(
        &self,
        token: &str,
        chat: u64,
        body: &str,
        idempotency_key: &str,
    ) -> anyhow::Result<u64> {
        self.post_carefully(
            &format!("/applications/{token}/chats/{chat}/messages"),
            Some(serde_json::json!({ "body": body })),
            idempotency_key,
        )
        .await
        .context("create message")
    }

    /// Creates a chat as a careful client does (see [`Self::create_message_carefully`]).
    pub async fn create_chat_carefully(
        &self,
        token: &str,
        idempotency_key: &str,
    ) -> anyhow::Result<u64> {
        self.post_carefully(
            &format!("/applications/{token}/chats"),
            None,
            idempotency_key,
        )
        .await
        .context("create chat")
    }

    /// POSTs until a 202, retrying 5xx, 409 and dropped connections with the same
    /// `Idempotency-Key` for up to a minute; returns the number.
    async fn post_carefully(
        &self,
        path: &str,
        body: Option<Value>,
        idempotency_key: &str,
    ) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut request = self
                .request(reqwest::Method::POST, path)
                .header("idempotency-key", idempotency_key);
            if let Some(body) = &body {
                request = request.json(body);
            }
            match self.send(request).await {
                Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                    return reply.body["number"].as_u64().context("number");
                }
                Ok(reply)
                    if !(reply.status.is_server_error()
                        || reply.status == StatusCode::CONFLICT) =>
                {
                    bail!("refused: {reply:?}")
                }
                // A 5xx, a 409 or a dropped connection: the same request again.
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => bail!("kept failing: {other:?}"),
            }
        }
    }

    /// Opens the live stream of a chat (resuming after `last_event_id`); the error reply when
    /// it is refused.
    pub async fn stream(
        &self,
        token: &str,
        chat: u64,
        last_event_id: Option<u64>,
    ) -> anyhow::Result<Result<EventStream, Reply>> {
        let mut request = self
            .request(
                reqwest::Method::GET,
                &format!("/applications/{token}/chats/{chat}/messages/stream"),
            )
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let bytes = response.bytes().await?;
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Ok(Err(Reply { status, body }));
        }
        Ok(Ok(EventStream {
            response,
            buffer: Vec::new(),
            comments: 0,
        }))
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Reply> {
        self.send(self.http.delete(self.url(path))).await
    }

    /// Posts a message (202) and returns its number, as the README tells clients to: with an
    /// `Idempotency-Key` of its own, a 503 of a loaded machine retried with it.
    pub async fn create_message(&self, token: &str, chat: u64, body: &str) -> anyhow::Result<u64> {
        self.create_message_carefully(token, chat, body, &uuid::Uuid::new_v4().to_string())
            .await
    }
}

/// One Server-Sent Event of a live stream.
#[derive(Debug, Clone)]
pub struct ServerSentEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

impl ServerSentEvent {
    /// The message number of the event (its `id:`).
    pub fn number(&self) -> anyhow::Result<u64> {
        self.id
            .as_deref()
            .context("an event without id")?
            .parse()
            .context("a numeric id")
    }
}

/// The client side of a live stream (`text/event-stream`), read as it arrives.
pub struct EventStream {
    response: reqwest::Response,
    /// Bytes received and not parsed yet (a chunk may end inside a character).
    buffer: Vec<u8>,
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

/// The numbers of the hits of a search (its first page), best match first.
pub async fn search(
    client: &Client,
    token: &str,
    chat: u64,
    query: &str,
) -> anyhow::Result<Vec<u64>> {
    let reply = client
        .send_raw(
            client
                .request(
                    reqwest::Method::GET,
                    &format!("/applications/{token}/chats/{chat}/messages/search"),
                )
                .query(&[("query", query)]),
        )
        .await?;
    anyhow::ensure!(
        reply.status == StatusCode::OK,
        "search {query:?}: {reply:?}"
    );
    Ok(reply.body["messages"]
        .as_array()
        .map(|hits| {
            hits.iter()
                .filter_map(|hit| hit["number"].as_u64())
                .collect()
        })
        .unwrap_or_default())
}

/// Polls `check` until it returns true, failing after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting until {what} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends SIGKILL and reaps the child.
pub async fn kill_hard(child: &mut Child) -> anyhow::Result<()> {
    child.kill().await?;
    Ok(())
}
