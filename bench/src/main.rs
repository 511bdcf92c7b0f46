//! Bounded benchmark of a running stack, with the raw limits it depends on measured in the same
//! run, so the figures can be read as ratios on a shared, noisy machine. Two stacks:
//! - the real services (`scripts/stack up`): raw limits are Redis INCR and RabbitMQ confirmed
//!   publish;
//! - the embedded process (`BENCH_STACK=embedded`, started by `scripts/bench`): the raw limit is the
//!   rate of durable (`synchronous = FULL`) one-row SQLite commits on the same disk.
//!
//! Settings (environment): BENCH_STACK (services), BENCH_API_URL (http://127.0.0.1:3000/api/v1),
//! BENCH_CONNECTIONS (64), BENCH_MESSAGES (100000), BENCH_MAX_SECONDS (180, bound of each phase),
//! BENCH_SEARCHES (2000), and the configuration of the README (service URLs, CHAT_DATA_DIR).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chatcore::Config;
use futures_util::future::join_all;
use lapin::BasicProperties;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use sqlx::Connection as _;

/// AMQP delivery mode of messages written to disk, as the api publishes them.
const PERSISTENT: u8 = 2;

const RAW_PHASE: Duration = Duration::from_secs(5);
const REDIS_CLIENTS: usize = 50;
const PUBLISHERS: usize = 64;
const VOCABULARY: usize = 2000;

struct Settings {
    api_url: String,
    connections: usize,
    messages: u64,
    max_phase: Duration,
    searches: usize,
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Latencies of one phase.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn percentile(&self, fraction: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 * fraction).ceil() as usize).saturating_sub(1);
        sorted.get(index).copied().unwrap_or_default()
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

/// A deterministic pseudo-random word list, so message bodies and queries share words.
fn word(index: usize) -> String {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "zu", "ri", "mo", "xa", "te",
        "qui",
    ];
    let mut value = index.wrapping_mul(2_654_435_761) % 65_536;
    let mut out = String::new();
    for _ in 0..3 {
        out.push_str(SYLLABLES[value % SYLLABLES.len()]);
        value /= SYLLABLES.len();
    }
    out.push_str(&index.to_string());
    out
}

fn body(seed: u64) -> String {
    (0..10)
        .map(|i| word((seed as usize).wrapping_mul(31).wrapping_add(i * 7919) % VOCABULARY))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let settings = Settings {
        api_url: setting("BENCH_API_URL", "http://127.0.0.1:3000/api/v1".to_owned()),
        connections: setting("BENCH_CONNECTIONS", 64),
        messages: setting("BENCH_MESSAGES", 100_000),
        max_phase: Duration::from_secs(setting("BENCH_MAX_SECONDS", 180)),
        searches: setting("BENCH_SEARCHES", 2000),
    };
    let embedded = setting("BENCH_STACK", "services".to_owned()) == "embedded";
    let raw_limits = if embedded {
        eprintln!(
            "bench: measuring raw durable sqlite commit rate ({PUBLISHERS} concurrent writers)"
        );
        vec![RawLimit {
            name: format!("sqlite durable one-row commit ({PUBLISHERS} concurrent)"),
            short_name: "durable commit",
            rate: sqlite_commit_rate(&config).await?,
        }]
    } else {
        eprintln!("bench: measuring raw redis INCR rate ({REDIS_CLIENTS} concurrent clients)");
        let redis_rate = redis_incr_rate(&config).await?;
        eprintln!(
            "bench: measuring raw rabbitmq confirmed-publish rate ({PUBLISHERS} concurrent publishers)"
        );
        vec![
            RawLimit {
                name: format!("rabbitmq confirmed publish ({PUBLISHERS} concurrent, persistent)"),
                short_name: "confirmed publish",
                rate: confirmed_publish_rate(&config).await?,
            },
            RawLimit {
                name: format!("redis INCR ({REDIS_CLIENTS} concurrent)"),
                short_name: "INCR",
                rate: redis_rate,
            },
        ]
    };
    let ratios = |rate: f64| {
        raw_limits
            .iter()
            .map(|raw| format!("{:.2} of {}", rate / raw.rate, raw.short_name))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.connections)
        .build()?;
    let token = create_application(&http, &settings.api_url).await?;
    let chat = post_json(
        &http,
        &format!("{}/applications/{token}/chats", settings.api_url),
        None,
    )
    .await?["number"]
        .as_u64()
        .context("chat number")?;
    eprintln!(
        "bench: posting {} messages with {} connections (at most {:?})",
        settings.messages, settings.connections, settings.max_phase
    );
    let started = Instant::now();
    let (posted, post_elapsed, post_latencies) =
        post_messages(&http, &settings, &token, chat).await?;
    let post_rate = posted as f64 / post_elapsed.as_secs_f64();
    eprintln!(
        "bench: {posted} posted at {post_rate:.0} req/s, p50 {} p99 {}",
        ms(post_latencies.percentile(0.50)),
        ms(post_latencies.percentile(0.99))
    );

    eprintln!("bench: waiting until all {posted} messages are stored and in the index");
    let index = if embedded {
        IndexCount::Embedded(config.data_dir.join("search.db"))
    } else {
        IndexCount::Elasticsearch {
            url: config.require_elasticsearch_url()?.expose().to_owned(),
            index: config.elasticsearch_index.clone(),
            application_id: application_id(&config, &token).await?,
        }
    };
    let (mysql_done, index_done) =
        wait_until_persisted(&http, &settings, &index, &token, chat, posted).await?;
    let mysql_rate = posted as f64 / mysql_done.duration_since(started).as_secs_f64();
    let index_rate = posted as f64 / index_done.duration_since(started).as_secs_f64();

    eprintln!(
        "bench: {} searches on the chat of {posted} messages",
        settings.searches
    );
    let search_latencies = search(&http, &settings, &token, chat).await?;

    eprintln!("bench: seeding a chat of {DEEP_CHAT_MESSAGES} messages for the pagination phase");
    let deep_chat = post_json(
        &http,
        &format!("{}/applications/{token}/chats", settings.api_url),
        None,
    )
    .await?["number"]
        .as_u64()
        .context("chat number")?;
    seed_deep_chat(&http, &settings, &config, embedded, &token, deep_chat).await?;
    let (first_page, last_page) = page_latencies(&http, &settings, &token, deep_chat).await?;

    println!();
    println!("| measure | figure | ratio to raw limit |");
    println!("| --- | --- | --- |");
    for raw in &raw_limits {
        println!("| raw: {} | {:.0} /s | 1 |", raw.name, raw.rate);
    }
    println!(
        "| POST message, {} connections | {post_rate:.0} req/s | {} |",
        settings.connections,
        ratios(post_rate)
    );
    println!(
        "| POST message p50 / p99 | {} / {} | |",
        ms(post_latencies.percentile(0.50)),
        ms(post_latencies.percentile(0.99))
    );
    println!(
        "| end-to-end into the storage ({posted} messages) | {mysql_rate:.0} msg/s | {} |",
        ratios(mysql_rate)
    );
    println!(
        "| end-to-end into the index | {index_rate:.0} msg/s | {} |",
        ratios(index_rate)
    );
    println!(
        "| search p50 / p99 ({} queries, chat of {posted}) | {} / {} | |",
        settings.searches,
        ms(search_latencies.percentile(0.50)),
        ms(search_latencies.percentile(0.99))
    );
    println!(
        "| list messages, page 1 p50 / p99 (chat of {DEEP_CHAT_MESSAGES}) | {} / {} | |",
        ms(first_page.percentile(0.50)),
        ms(first_page.percentile(0.99))
    );
    println!(
        "| list messages, last page (after={}) p50 / p99 | {} / {} | {:.2} of page 1 (p50) |",
        DEEP_CHAT_MESSAGES - 25,
        ms(last_page.percentile(0.50)),
        ms(last_page.percentile(0.99)),
        last_page.percentile(0.50).as_secs_f64() / first_page.percentile(0.50).as_secs_f64()
    );
    Ok(())
}

/// The messages of the chat whose first and last page are timed.
const DEEP_CHAT_MESSAGES: u64 = 1_000_000;
/// Requests per page in the pagination phase.
const PAGE_REQUESTS: usize = 400;

/// Writes [`DEEP_CHAT_MESSAGES`] messages straight into the storage (the api would take minutes
/// to accept them, and only their reading is measured here).
async fn seed_deep_chat(
    http: &reqwest::Client,
    settings: &Settings,
    config: &Config,
    embedded: bool,
    token: &str,
    chat: u64,
) -> anyhow::Result<()> {
    let chat_url = format!("{}/applications/{token}/chats/{chat}", settings.api_url);
    let deadline = Instant::now() + settings.max_phase;
    while !http.get(&chat_url).send().await?.status().is_success() {
        if Instant::now() > deadline {
            bail!("chat {chat} was not stored within {:?}", settings.max_phase);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chat_id = "SELECT c.id FROM chats c JOIN applications a ON a.id = c.application_id \
                   WHERE a.token = ? AND c.number = ?";
    if embedded {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(config.data_dir.join("chat.db"))
            .busy_timeout(Duration::from_secs(30));
        let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
        let id: i64 = sqlx::query_scalar(chat_id)
            .bind(token)
            .bind(chat as i64)
            .fetch_one(&mut connection)
            .await?;
        sqlx::query(
            "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < ?) \
             INSERT INTO messages (chat_id, number, body, created_at, updated_at) \
             SELECT c.id, n, 'seeded message ' || n, c.created_at, c.created_at FROM chats c, seq WHERE c.id = ?",
        )
        .bind(DEEP_CHAT_MESSAGES as i64)
        .bind(id)
        .execute(&mut connection)
        .await?;
        connection.close().await?;
    } else {
        let pool = chatcore::store::mysql::connect(config.require_database_url()?, 1).await?;
        let id: u64 = sqlx::query_scalar(chat_id)
            .bind(token)
            .bind(chat as i64)
            .fetch_one(&pool)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO messages (chat_id, number, body, created_at, updated_at) \
             SELECT c.id, s.seq, CONCAT('seeded message ', s.seq), c.created_at, c.created_at \
             FROM chats c JOIN seq_1_to_{DEEP_CHAT_MESSAGES} s WHERE c.id = ?"
        )))
        .bind(id)
        .execute(&pool)
        .await?;
        pool.close().await;
    }
    Ok(())
}

/// Latencies of the first page and of the last page (`after`) of the deep chat, alternating, one
/// request at a time.
async fn page_latencies(
    http: &reqwest::Client,
    settings: &Settings,
    token: &str,
    chat: u64,
) -> anyhow::Result<(Latencies, Latencies)> {
    let list = format!(
        "{}/applications/{token}/chats/{chat}/messages?per_page=25",
        settings.api_url
    );
    let last = format!("{list}&after={}", DEEP_CHAT_MESSAGES - 25);
    let (mut first_page, mut last_page) = (Vec::new(), Vec::new());
    for _ in 0..PAGE_REQUESTS {
        for (url, latencies, expected_first) in [
            (&list, &mut first_page, 1),
            (&last, &mut last_page, DEEP_CHAT_MESSAGES - 24),
        ] {
            let sent = Instant::now();
            let page: Value = http.get(url).send().await?.json().await?;
            latencies.push(sent.elapsed());
            if page["messages"][0]["number"].as_u64() != Some(expected_first) {
                bail!("unexpected page {url}: {page}");
            }
        }
    }
    Ok((Latencies(first_page), Latencies(last_page)))
}

/// A raw limit measured in the same run.
struct RawLimit {
    name: String,
    short_name: &'static str,
    rate: f64,
}

/// One-row transactions, each committed to disk, from concurrent writers for [`RAW_PHASE`]: what
/// the embedded queue would manage if every request committed on its own (it groups them).
async fn sqlite_commit_rate(config: &Config) -> anyhow::Result<f64> {
    let path = config.data_dir.join("bench-raw.db");
    let pool = chatcore::sqlite::open(&path, &chatcore::sqlite::QUEUE_MIGRATOR, 4).await?;
    let payload = vec![b'x'; 200];
    let deadline = Instant::now() + RAW_PHASE;
    let started = Instant::now();
    let counts = join_all((0..PUBLISHERS).map(|_| {
        let (pool, payload) = (pool.clone(), &payload);
        async move {
            let mut count = 0u64;
            while Instant::now() < deadline {
                sqlx::query("INSERT INTO queued_events (queue, body) VALUES ('raw', ?)")
                    .bind(payload.as_slice())
                    .execute(&pool)
                    .await?;
                count += 1;
            }
            anyhow::Ok(count)
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let total: u64 = counts.into_iter().sum::<anyhow::Result<u64>>()?;
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}

async fn redis_incr_rate(config: &Config) -> anyhow::Result<f64> {
    let connection = chatcore::state::connect_redis(config.require_redis_url()?).await?;
    let key = format!("{}:bench:incr", config.redis_key_prefix);
    let deadline = Instant::now() + RAW_PHASE;
    let started = Instant::now();
    let counts = join_all((0..REDIS_CLIENTS).map(|_| {
        let mut connection = connection.clone();
        let key = key.clone();
        async move {
            let mut count = 0u64;
            while Instant::now() < deadline {
                let _: u64 = redis::cmd("INCR")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await?;
                count += 1;
            }
            anyhow::Ok(count)
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let total: u64 = counts.into_iter().sum::<anyhow::Result<u64>>()?;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut connection.clone())
        .await?;
    Ok(total as f64 / elapsed.as_secs_f64())
}

async fn confirmed_publish_rate(config: &Config) -> anyhow::Result<f64> {
    let connection = lapin::Connection::connect(
        config.require_amqp_url()?.expose(),
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = format!("{}.bench-raw", config.redis_key_prefix);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let payload = vec![b'x'; 200];
    let deadline = Instant::now() + RAW_PHASE;
    let started = Instant::now();
    let counts = join_all((0..PUBLISHERS).map(|_| {
        let channel = channel.clone();
        let queue = queue.clone();
        let payload = &payload;
        async move {
            let mut count = 0u64;
            while Instant::now() < deadline {
                let confirmation = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        payload,
                        BasicProperties::default().with_delivery_mode(PERSISTENT),
                    )
                    .await?
                    .await?;
                if !confirmation.is_ack() {
                    bail!("raw publish was not confirmed");
                }
                count += 1;
            }
            anyhow::Ok(count)
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let total: u64 = counts.into_iter().sum::<anyhow::Result<u64>>()?;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "done".into()).await?;
    Ok(total as f64 / elapsed.as_secs_f64())
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let request = http.post(url);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    let response = request.send().await?;
    let status = response.status();
    let value: Value = response.json().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {value}");
    }
    Ok(value)
}

async fn create_application(http: &reqwest::Client, api_url: &str) -> anyhow::Result<String> {
    let created = post_json(
        http,
        &format!("{api_url}/applications"),
        Some(json!({"name": "bench"})),
    )
    .await?;
    Ok(created["token"].as_str().context("token")?.to_owned())
}

async fn post_messages(
    http: &reqwest::Client,
    settings: &Settings,
    token: &str,
    chat: u64,
) -> anyhow::Result<(u64, Duration, Latencies)> {
    let url = format!(
        "{}/applications/{token}/chats/{chat}/messages",
        settings.api_url
    );
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + settings.max_phase;
    let results = join_all((0..settings.connections).map(|_| {
        let issued = Arc::clone(&issued);
        let url = url.clone();
        async move {
            let mut latencies = Vec::new();
            loop {
                let seed = issued.fetch_add(1, Ordering::Relaxed);
                if seed >= settings.messages || Instant::now() >= deadline {
                    break;
                }
                let sent = Instant::now();
                post_json(http, &url, Some(json!({"body": body(seed)}))).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    for result in results {
        latencies.extend(result?);
    }
    Ok((latencies.len() as u64, elapsed, Latencies(latencies)))
}

async fn application_id(config: &Config, token: &str) -> anyhow::Result<u64> {
    let pool = chatcore::store::mysql::connect(config.require_database_url()?, 1).await?;
    Ok(
        sqlx::query_scalar("SELECT id FROM applications WHERE token = ?")
            .bind(token)
            .fetch_one(&pool)
            .await?,
    )
}

/// Where the bench counts the indexed messages of its chat.
enum IndexCount {
    Elasticsearch {
        url: String,
        index: String,
        application_id: u64,
    },
    /// The embedded FTS5 file (the bench's chat is the only one with messages).
    Embedded(std::path::PathBuf),
}

impl IndexCount {
    async fn count(&self, http: &reqwest::Client, chat: u64) -> anyhow::Result<u64> {
        match self {
            Self::Elasticsearch {
                url,
                index,
                application_id,
            } => {
                let count: Value = http
                    .post(format!(
                        "{url}/{index}/_count?routing={application_id}:{chat}"
                    ))
                    .json(&json!({"query": {"term": {"chat": format!("{application_id}:{chat}")}}}))
                    .send()
                    .await?
                    .json()
                    .await?;
                count["count"].as_u64().context("count")
            }
            Self::Embedded(path) => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true);
                let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM search_documents")
                    .fetch_one(&mut connection)
                    .await?;
                connection.close().await?;
                Ok(u64::try_from(count)?)
            }
        }
    }
}

async fn wait_until_persisted(
    http: &reqwest::Client,
    settings: &Settings,
    index: &IndexCount,
    token: &str,
    chat: u64,
    posted: u64,
) -> anyhow::Result<(Instant, Instant)> {
    let deadline = Instant::now() + settings.max_phase;
    let chat_url = format!("{}/applications/{token}/chats/{chat}", settings.api_url);
    let (mut stored_done, mut index_done) = (None, None);
    while stored_done.is_none() || index_done.is_none() {
        if Instant::now() > deadline {
            bail!(
                "not everything was persisted within {:?}",
                settings.max_phase
            );
        }
        if stored_done.is_none() {
            let chat: Value = http.get(&chat_url).send().await?.json().await?;
            if chat["messages_count"].as_u64() == Some(posted) {
                stored_done = Some(Instant::now());
            }
        }
        if index_done.is_none() && index.count(http, chat).await? == posted {
            index_done = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((
        stored_done.context("storage")?,
        index_done.context("index")?,
    ))
}

async fn search(
    http: &reqwest::Client,
    settings: &Settings,
    token: &str,
    chat: u64,
) -> anyhow::Result<Latencies> {
    let url = format!(
        "{}/applications/{token}/chats/{chat}/messages/search",
        settings.api_url
    );
    let issued = Arc::new(AtomicU64::new(0));
    let results = join_all((0..8).map(|_| {
        let issued = Arc::clone(&issued);
        let url = url.clone();
        async move {
            let mut latencies = Vec::new();
            loop {
                let index = issued.fetch_add(1, Ordering::Relaxed) as usize;
                if index >= settings.searches {
                    break;
                }
                let full = word(index * 13 % VOCABULARY);
                // Half whole words, half prefixes.
                let query = if index.is_multiple_of(2) {
                    full
                } else {
                    full[..4.min(full.len())].to_owned()
                };
                let sent = Instant::now();
                let response = http
                    .get(&url)
                    .query(&[("query", query.as_str())])
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("search answered {}", response.status());
                }
                let _: Value = response.json().await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }
    }))
    .await;
    let mut latencies = Vec::new();
    for result in results {
        latencies.extend(result?);
    }
    Ok(Latencies(latencies))
}
