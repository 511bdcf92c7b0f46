//! TLS to the services as a choice of each URL, against the self-signed CA that `scripts/services`
//! makes (MariaDB serves TLS on its port, Redis on `REDIS_TLS_PORT`); and connects to a service
//! that never answers, which fail after `CHAT_CONNECT_TIMEOUT_MS` instead of the OS timeout.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chatcore::Config;
use chatcore::config::{RedisUrl, SecretUrl};
use chatcore::metrics::Metrics;
use chatcore::retry::Transient as _;
use chatcore::state::StateError;
use chatcore::store::StorageError;
use system_tests::{TestEnv, eventually};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};

/// The CA of the local services: `$SERVICES_DIR/tls/ca.pem`, as `scripts/services` makes it.
fn tls_ca_file() -> anyhow::Result<PathBuf> {
    let services_dir = std::env::var_os("SERVICES_DIR")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.services"));
    let ca = services_dir.join("tls/ca.pem");
    anyhow::ensure!(
        ca.is_file(),
        "{} is missing: `scripts/services up` makes it (a MariaDB or Redis started before it: \
         `scripts/services restart mariadb` / `restart redis`)",
        ca.display()
    );
    Ok(ca)
}

fn redis_tls_url() -> String {
    let port = std::env::var("REDIS_TLS_PORT")
        .ok()
        .filter(|port| !port.is_empty())
        .unwrap_or_else(|| "6380".to_owned());
    format!("rediss://127.0.0.1:{port}/0")
}

/// A test environment whose MySQL URL demands TLS with a verified certificate and host name, and
/// whose Redis URL is the TLS port; `with_ca`: trusting the local CA.
async fn tls_env(with_ca: bool) -> anyhow::Result<TestEnv> {
    let ca = tls_ca_file()?;
    let mut env = TestEnv::new().await?;
    let database_url = format!("{}?ssl-mode=VERIFY_IDENTITY", env.settings["DATABASE_URL"]);
    env.set("DATABASE_URL", &database_url);
    env.set("REDIS_URL", &redis_tls_url());
    if with_ca {
        env.set("CHAT_TLS_CA_FILE", &ca.to_string_lossy());
    }
    Ok(env)
}

#[tokio::test]
async fn the_api_works_over_tls_to_mariadb_and_redis() -> anyhow::Result<()> {
    let env = tls_env(true).await?;
    let running = env.running_chat("over tls").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let number = client.create_message(token, chat, "sealed").await?;
    assert_eq!(number, 1);
    eventually("the message is stored", Duration::from_secs(30), || async {
        Ok(env.stored_message_numbers(token, chat).await? == vec![number])
    })
    .await?;
    running.stop().await?;

    // The server's side: a connection made as the api makes its own is encrypted.
    let config = env.config();
    let pem = std::fs::read(tls_ca_file()?)?;
    let pool = chatcore::store::mysql::connect_with(
        config.require_database_url()?,
        1,
        config.connect_timeout,
        Some(&pem),
    )
    .await?;
    let (_, cipher): (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_one(&pool)
        .await?;
    assert!(!cipher.is_empty(), "the MySQL connection is not encrypted");
    pool.close().await;

    // The Redis port the api used speaks nothing but TLS.
    let plain = redis::Client::open(redis_tls_url().replacen("rediss://", "redis://", 1))?;
    let attempt = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let answered = async {
        let mut connection = plain
            .get_multiplexed_async_connection_with_config(&attempt)
            .await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    }
    .await;
    assert!(
        answered.is_err(),
        "the TLS port answered in plain text: {answered:?}"
    );
    Ok(())
}

#[tokio::test]
async fn without_the_ca_the_certificate_is_refused() -> anyhow::Result<()> {
    let env = tls_env(false).await?;
    let config = env.config();
    let metrics = Metrics::new();
    for (service, failure) in [
        (
            "mysql",
            chatcore::adapters::storage(&config, &metrics).await.err(),
        ),
        (
            "redis",
            chatcore::adapters::state(&config, &metrics).await.err(),
        ),
    ] {
        let failure = failure.with_context(|| format!("{service} connected without the CA"))?;
        let message = format!("{failure:#}");
        assert!(
            message.contains("UnknownIssuer"),
            "{service} failed, but not on the certificate: {message}"
        );
    }
    Ok(())
}

/// A TCP port on 127.0.0.1 that accepts connections and never answers; the accepted connections
/// are kept (open) until the test asks whether the client closed them.
struct BlackHole {
    address: String,
    accepted: Arc<Mutex<Vec<TcpStream>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn open() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                kept.lock().expect("not poisoned").push(stream);
            }
        });
        Ok(Self {
            address,
            accepted,
            task,
        })
    }

    /// Waits until the client has closed every connection it opened (at least one), so that no
    /// thread or task of it is left waiting for an answer.
    async fn wait_closed_by_client(&self, within: Duration) -> anyhow::Result<()> {
        let mut streams = std::mem::take(&mut *self.accepted.lock().expect("not poisoned"));
        anyhow::ensure!(!streams.is_empty(), "the client never connected");
        for stream in &mut streams {
            let mut buffer = [0u8; 1024];
            let closed = tokio::time::timeout(within, async {
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        // What the client sent before it gave up (a protocol header).
                        Ok(_) => {}
                    }
                }
            })
            .await;
            anyhow::ensure!(
                closed.is_ok(),
                "the client still holds a connection {within:?} after giving up"
            );
        }
        Ok(())
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Scheduling, and the margin of the connect that fails.
const MARGIN: Duration = Duration::from_millis(1500);

fn assert_timed_out_in_time(service: &str, started: Instant) {
    let elapsed = started.elapsed();
    assert!(
        elapsed >= CONNECT_TIMEOUT.mul_f64(0.9) && elapsed <= CONNECT_TIMEOUT + MARGIN,
        "{service}: the connect failed after {elapsed:?}, not after about {CONNECT_TIMEOUT:?}"
    );
}

#[tokio::test]
async fn a_black_holed_broker_fails_the_connect_within_the_connect_timeout() -> anyhow::Result<()> {
    let hole = BlackHole::open().await?;
    let config = Config::from_map(
        &[
            (
                "AMQP_URL",
                format!("amqp://guest:guest@{}/%2f", hole.address),
            ),
            // Required beside AMQP_URL, never contacted here.
            (
                "DATABASE_URL",
                "mysql://chat:chat@127.0.0.1:1/chat".to_owned(),
            ),
            ("ELASTICSEARCH_URL", "http://127.0.0.1:1".to_owned()),
            (
                "CHAT_CONNECT_TIMEOUT_MS",
                CONNECT_TIMEOUT.as_millis().to_string(),
            ),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect(),
    )?;
    let queue = chatcore::adapters::queue(&config, &Metrics::new()).await?;
    let started = Instant::now();
    let failure = queue
        .ensure_topology()
        .await
        .expect_err("a broker that never answers");
    assert_timed_out_in_time("rabbitmq", started);
    assert!(failure.is_transient(), "not transient: {failure}");
    // lapin's IO thread does not linger on the socket.
    hole.wait_closed_by_client(Duration::from_secs(2)).await
}

#[tokio::test]
async fn black_holed_mysql_and_redis_fail_the_connect_within_the_connect_timeout()
-> anyhow::Result<()> {
    let hole = BlackHole::open().await?;
    let started = Instant::now();
    let failure = chatcore::store::mysql::connect_with(
        &SecretUrl::new(format!("mysql://chat:chat@{}/chat", hole.address)),
        1,
        CONNECT_TIMEOUT,
        None,
    )
    .await
    .expect_err("a database that never answers");
    assert_timed_out_in_time("mysql", started);
    let failure = StorageError::from(failure);
    assert!(failure.is_transient(), "not transient: {failure}");
    hole.wait_closed_by_client(Duration::from_secs(2)).await?;

    let started = Instant::now();
    let failure = chatcore::state::connect_redis_with(
        &RedisUrl::parse(SecretUrl::new(format!("redis://{}/0", hole.address)))
            .map_err(anyhow::Error::msg)?,
        CONNECT_TIMEOUT,
        None,
    )
    .await
    .err()
    .context("a redis that never answers connected")?;
    assert_timed_out_in_time("redis", started);
    let failure = StateError::from(failure);
    assert!(failure.is_transient(), "not transient: {failure}");
    hole.wait_closed_by_client(Duration::from_secs(2)).await
}
