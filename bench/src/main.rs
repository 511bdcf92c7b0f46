//! Bounded benchmark of a running stack, with the raw limits it depends on measured in the same
//! run, so the figures can be read as ratios on a shared, noisy machine. Two stacks:
//! - the real services (`scripts/stack up`): raw limits are Redis INCR and RabbitMQ confirmed
//!   publish; then `POST` with the workers stopped (SIGSTOP), the drain of that backlog by each
//!   downstream leg alone (one worker resumed at a time) against its own raw limit (a lapin +
//!   sqlx consumer, a raw `_bulk`), `POST` with the workers running and end to end, the reads
//!   against their raw SELECTs, and search latency (one client, then eight) on the chat of the
//!   running phase, on a chat of 1,000,000 messages and on an application of 1,000 chats (their
//!   documents written straight into the index);
//! - the embedded process (`BENCH_STACK=embedded`, started by `scripts/bench`): the raw limit is the
//!   rate of durable (`synchronous = FULL`) one-row SQLite commits on the same disk; what needs
//!   the services or separate workers is skipped.
//!
//! Every phase also reports the CPU each process spent per message (see [`processes`]).
//!
//! Settings (environment): BENCH_STACK (services), BENCH_API_URL (http://127.0.0.1:3000/api/v1),
//! BENCH_CONNECTIONS (64), BENCH_MESSAGES (100000), BENCH_MAX_SECONDS (180, bound of each phase),
//! BENCH_STOPPED_SECONDS (45 at most, bound of the phase with the workers stopped),
//! BENCH_READ_SECONDS (5, each read phase), BENCH_SEARCHES (2000), BENCH_DEEP_PAGES (1; 0 skips
//! the chat of 1,000,000 messages), BENCH_THREADS (1, worker threads of the load generator),
//! BENCH_PROCESSES and BENCH_CLK_TCK (set by `scripts/bench`), and the configuration of the README
//! (service URLs, CHAT_DATA_DIR, CHAT_CONSUMER_PREFETCH, CHAT_BATCH_MAX_SIZE, CHAT_ES_INDEX...).

mod api;
mod deep;
mod load;
mod persisted;
mod processes;
mod raw;
mod report;

use std::time::{Duration, Instant};

use chatcore::Config;
use serde_json::json;
use sqlx::MySqlPool;

use crate::api::Api;
use crate::load::{Load, Outcome, scatter};
use crate::persisted::{ChatWatch, IndexCount, Leg};
use crate::processes::{CpuUse, PausedWorkers, Processes};
use crate::raw::ChatRef;
use crate::report::{Measured, Report, ratio};

/// The workers held still while the api accepts a backlog.
const WORKERS: [&str; 2] = ["ingest-worker", "indexer"];
/// Under RabbitMQ's 60 s heartbeat: a stopped worker must not lose its connection.
const MAX_STOPPED_SECONDS: u64 = 45;
/// Messages per page of the list phase (the api's largest page).
const LIST_PER_PAGE: u32 = 100;
/// Concurrent clients of the search phase.
const SEARCH_CLIENTS: usize = 8;
/// The application of many chats whose search is measured: its chats, and the messages of each.
const MANY_CHATS: usize = 1_000;
const MANY_CHATS_MESSAGES: u64 = 100;
/// The window of the flatness check: the accept rate of the first and of the last this many.
const FLATNESS_WINDOW: usize = 100_000;

struct Settings {
    embedded: bool,
    api_url: String,
    connections: usize,
    messages: u64,
    max_phase: Duration,
    stopped_phase: Duration,
    read_phase: Duration,
    searches: u64,
    deep_pages: bool,
}

impl Settings {
    fn from_env() -> Self {
        let max_phase = setting("BENCH_MAX_SECONDS", 180);
        Self {
            embedded: setting("BENCH_STACK", "services".to_owned()) == "embedded",
            api_url: setting("BENCH_API_URL", "http://127.0.0.1:3000/api/v1".to_owned()),
            connections: setting("BENCH_CONNECTIONS", 64),
            messages: setting("BENCH_MESSAGES", 100_000),
            max_phase: Duration::from_secs(max_phase),
            stopped_phase: Duration::from_secs(setting(
                "BENCH_STOPPED_SECONDS",
                max_phase.min(MAX_STOPPED_SECONDS),
            )),
            read_phase: Duration::from_secs(setting("BENCH_READ_SECONDS", 5)),
            searches: setting("BENCH_SEARCHES", 2000),
            deep_pages: setting("BENCH_DEEP_PAGES", 1) != 0,
        }
    }
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A raw limit measured in the same run, which every rate of the accept path is compared with.
struct RawLimit {
    short_name: &'static str,
    rate: f64,
}

/// The raw limits of the accept path.
#[derive(Debug, Clone, Copy)]
enum RawProbe {
    SqliteCommit,
    RedisIncr,
    ConfirmedPublish,
}

impl RawProbe {
    fn name(self) -> String {
        match self {
            Self::SqliteCommit => format!(
                "sqlite durable one-row commit ({} concurrent)",
                raw::PUBLISHERS
            ),
            Self::RedisIncr => format!("redis INCR ({} concurrent)", raw::REDIS_CLIENTS),
            Self::ConfirmedPublish => format!(
                "rabbitmq confirmed publish ({} concurrent, persistent)",
                raw::PUBLISHERS
            ),
        }
    }

    /// How the ratios name it.
    fn short_name(self) -> &'static str {
        match self {
            Self::SqliteCommit => "durable commit",
            Self::RedisIncr => "INCR",
            Self::ConfirmedPublish => "confirmed publish",
        }
    }

    /// Its column of the CPU table.
    fn column(self) -> &'static str {
        match self {
            Self::SqliteCommit => "raw commit",
            Self::RedisIncr => "raw INCR",
            Self::ConfirmedPublish => "raw publish",
        }
    }

    async fn run(self, config: &Config) -> anyhow::Result<Outcome> {
        match self {
            Self::SqliteCommit => raw::sqlite_commits(config).await,
            Self::RedisIncr => raw::redis_incr(config).await,
            Self::ConfirmedPublish => raw::confirmed_publish(config).await,
        }
    }
}

/// What the phases share.
struct Bench {
    config: Config,
    settings: Settings,
    processes: Processes,
    api: Api,
    raw_limits: Vec<RawLimit>,
    report: Report,
}

/// The bench's application and where its messages are counted.
struct Target {
    token: String,
    index: IndexCount,
    /// None: the embedded stack.
    services: Option<ServiceStorage>,
}

/// The MySQL of the services' stack, and the bench's application in it.
struct ServiceStorage {
    pool: MySqlPool,
    application_id: u64,
}

impl ServiceStorage {
    fn chat(&self, number: u64) -> ChatRef {
        ChatRef {
            application_id: self.application_id,
            number,
        }
    }
}

fn main() -> anyhow::Result<()> {
    // A small runtime: the load generator must not take the cores of the stack it measures.
    let threads = setting("BENCH_THREADS", 1usize).max(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?
        .block_on(Box::pin(run()))
}

async fn run() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let settings = Settings::from_env();
    let processes = Processes::from_env(settings.embedded);
    let api = Api::new(&settings.api_url, settings.connections)?;
    let mut bench = Bench {
        config,
        settings,
        processes,
        api,
        raw_limits: Vec::new(),
        report: Report::default(),
    };
    bench.measure_raw_limits().await?;

    let token = bench.api.create_application().await?;
    let target = bench.target(token).await?;
    let backlog_chat = bench.backlog_phases(&target).await?;
    let (running_chat, running_posted) = bench.running_phase(&target).await?;
    let (read_chat, stored) = backlog_chat.unwrap_or((running_chat, running_posted));
    bench.reads(&target, read_chat, stored).await?;
    bench
        .search(
            &target.token,
            &[running_chat],
            &format!("chat of {running_posted}"),
        )
        .await?;
    let deep_chat = bench.deep_pages(&target.token).await?;
    bench.search_at_scale(&target, deep_chat).await?;
    bench.report.print(&bench.processes);
    Ok(())
}

impl Bench {
    fn general_ratios(&self, rate: f64) -> String {
        self.raw_limits
            .iter()
            .map(|raw| ratio(rate, raw.rate, raw.short_name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn measure_raw_limits(&mut self) -> anyhow::Result<()> {
        let probes: &[RawProbe] = if self.settings.embedded {
            &[RawProbe::SqliteCommit]
        } else {
            &[RawProbe::RedisIncr, RawProbe::ConfirmedPublish]
        };
        for &probe in probes {
            let name = probe.name();
            eprintln!("bench: measuring raw {name}");
            let before = self.processes.sample();
            let outcome = probe.run(&self.config).await?;
            let measured = measured(&outcome, self.processes.cpu_since(&before));
            self.report.row(
                format!("raw: {name}"),
                format!("{:.0} /s", outcome.rate()),
                "1",
            );
            self.report.cpu(probe.column(), &measured);
            self.raw_limits.push(RawLimit {
                short_name: probe.short_name(),
                rate: outcome.rate(),
            });
        }
        Ok(())
    }

    async fn target(&self, token: String) -> anyhow::Result<Target> {
        if self.settings.embedded {
            return Ok(Target {
                token,
                index: IndexCount::Embedded(self.config.data_dir.join("search.db")),
                services: None,
            });
        }
        let pool = chatcore::store::mysql::connect(
            self.config.require_database_url()?,
            self.config.database_max_connections,
        )
        .await?;
        let application_id =
            sqlx::query_scalar("SELECT application_id FROM application_tokens WHERE digest = ?")
                .bind(application_digest(&token)?)
                .fetch_one(&pool)
                .await?;
        Ok(Target {
            token,
            index: IndexCount::Elasticsearch {
                url: self.config.require_elasticsearch_url()?.expose().to_owned(),
                index: self.config.elasticsearch_index.clone(),
                application_id,
            },
            services: Some(ServiceStorage {
                pool,
                application_id,
            }),
        })
    }

    /// The chat of `target` whose messages the bench waits for.
    fn watch<'a>(&'a self, target: &'a Target, chat: u64) -> ChatWatch<'a> {
        ChatWatch {
            api: &self.api,
            index: &target.index,
            processes: &self.processes,
            token: &target.token,
            chat,
        }
    }

    /// A new chat of the bench's application, once it is stored.
    async fn stored_chat(&self, token: &str) -> anyhow::Result<u64> {
        let chat = self.api.create_chat(token).await?;
        self.api
            .wait_until_chat_stored(token, chat, self.settings.max_phase)
            .await?;
        Ok(chat)
    }

    /// `POST` with the workers stopped, the drain of that backlog by each leg, and the raw legs
    /// with as many messages. Returns the chat and its message count, or None when skipped.
    async fn backlog_phases(&mut self, target: &Target) -> anyhow::Result<Option<(u64, u64)>> {
        let Some(storage) = &target.services else {
            self.report.note(
                "embedded stack: POST with the workers stopped, the downstream legs and their raw \
                 limits skipped (the workers run inside the api process)",
            );
            return Ok(None);
        };
        let worker_pids: Option<Vec<u32>> = WORKERS
            .iter()
            .map(|name| self.processes.pid(name))
            .collect();
        let Some(worker_pids) = worker_pids else {
            self.report.note(
                "no pid of ingest-worker or indexer in BENCH_PROCESSES: POST with the workers \
                 stopped, the downstream legs and their raw limits skipped",
            );
            return Ok(None);
        };
        if self.settings.stopped_phase > Duration::from_secs(MAX_STOPPED_SECONDS) {
            self.report.note(format!(
                "BENCH_STOPPED_SECONDS above {MAX_STOPPED_SECONDS}: the stopped workers may miss \
                 RabbitMQ heartbeats and reconnect, which the legs then include"
            ));
        }
        let chat = self.stored_chat(&target.token).await?;

        eprintln!(
            "bench: workers stopped, posting {} messages with {} connections (at most {:?})",
            self.settings.messages, self.settings.connections, self.settings.stopped_phase
        );
        let mut paused = PausedWorkers::stop(&worker_pids)?;
        let before = self.processes.sample();
        let posted = post_messages(
            &self.api,
            &target.token,
            chat,
            Load {
                clients: self.settings.connections,
                max_operations: self.settings.messages,
                max_duration: self.settings.stopped_phase,
            },
        )
        .await?;
        let cpu = self.processes.cpu_since(&before);
        self.report_post("workers stopped", &posted, cpu);

        let count = posted.completed();
        // The api's envelopes: how many events an AMQP message of the ingest queue carries (the
        // raw ingest leg gets its events packed alike).
        let ingest_queue = &self.config.topology.ingest_queue;
        let queued = raw::queue_depth(&self.config, ingest_queue).await?;
        let events_per_message = (count as f64 / queued.max(1) as f64).round().max(1.0);
        self.report.row(
            "events per AMQP message of the ingest queue (the api's envelopes)",
            format!("{events_per_message:.0} ({count} events in {queued} messages)"),
            "",
        );
        // One leg at a time, as their raw limits are measured: the ingest-worker first, the
        // indexer once the storage holds the whole backlog (both at once would share the cores,
        // and each would measure the other's cost).
        let [ingest_pid, indexer_pid] = [worker_pids[0], worker_pids[1]];
        let ingest = self
            .drain_leg(&mut paused, ingest_pid, Leg::Storage, target, (chat, count))
            .await?;
        let index = self
            .drain_leg(&mut paused, indexer_pid, Leg::Index, target, (chat, count))
            .await?;

        // The raw ingest leg writes into `messages` under a chat of its own (empty, as the backlog's
        // chat was before the backlog).
        let raw_ingest_chat = self.stored_chat(&target.token).await?;
        self.legs_against_raw(
            storage,
            (chat, raw_ingest_chat),
            (ingest, index),
            events_per_message as usize,
        )
        .await?;
        Ok(Some((chat, count)))
    }

    /// Resumes the worker of `leg` and measures it until the chat's backlog of `count` messages
    /// has gone through it.
    async fn drain_leg(
        &self,
        paused: &mut PausedWorkers,
        worker_pid: u32,
        leg: Leg,
        target: &Target,
        (chat, count): (u64, u64),
    ) -> anyhow::Result<Measured> {
        eprintln!("bench: {leg:?} leg resumed, draining the backlog of {count} messages");
        let resumed = self.processes.sample();
        let resumed_at = Instant::now();
        paused.resume(worker_pid)?;
        let done = self
            .watch(target, chat)
            .wait_until_leg_done(leg, count, self.settings.max_phase)
            .await?;
        Ok(Measured {
            count,
            elapsed: done.at - resumed_at,
            cpu: self.processes.cpu_between(&resumed, &done.cpu),
        })
    }

    /// The raw ingest and index legs with the messages of the backlog, and the rows of both legs
    /// against them.
    async fn legs_against_raw(
        &mut self,
        storage: &ServiceStorage,
        (chat, raw_ingest_chat): (u64, u64),
        (ingest, index): (Measured, Measured),
        events_per_message: usize,
    ) -> anyhow::Result<()> {
        let count = ingest.count;
        let chat_ref = storage.chat(chat);
        let raw_ingest_chat_id: u64 =
            sqlx::query_scalar("SELECT id FROM chats WHERE application_id = ? AND number = ?")
                .bind(storage.application_id)
                .bind(raw_ingest_chat)
                .fetch_one(&storage.pool)
                .await?;
        eprintln!("bench: raw ingest leg ({count} events, lapin + sqlx)");
        let raw_ingest = raw::ingest_leg(
            &self.config,
            &self.processes,
            (storage.chat(raw_ingest_chat), raw_ingest_chat_id),
            count,
            events_per_message,
        )
        .await?;
        eprintln!("bench: raw index leg ({count} documents, _bulk)");
        let raw_bulk = raw::bulk_leg(
            &self.config,
            self.api.http(),
            &self.processes,
            chat_ref,
            count,
        )
        .await?;

        let consumer = &self.config.consumer;
        let batches = format!(
            "batches of {} (CHAT_BATCH_MAX_SIZE {}, prefetch {})",
            raw::batch_size(&self.config),
            consumer.batch_max_size,
            consumer.prefetch
        );
        self.report.row(
            format!(
                "raw: ingest, lapin + sqlx multi-row INSERT IGNORE into the same table (a chat of \
                 its own), {events_per_message} events an AMQP message, batches of at most {} events and {} messages",
                consumer.batch_max_size, consumer.prefetch
            ),
            format!("{:.0} msg/s", raw_ingest.rate()),
            "1",
        );
        self.report.row(
            format!("ingest leg: backlog of {count} into the storage, alone after SIGCONT"),
            format!("{:.0} msg/s", ingest.rate()),
            ratio(ingest.rate(), raw_ingest.rate(), "raw ingest"),
        );
        self.report.row(
            format!(
                "raw: `_bulk` into the same index (a chat of its own), one at a time, {batches}, until searchable"
            ),
            format!("{:.0} docs/s", raw_bulk.rate()),
            "1",
        );
        self.report.row(
            format!("index leg: backlog of {count} into the index, alone after SIGCONT"),
            format!("{:.0} msg/s", index.rate()),
            ratio(index.rate(), raw_bulk.rate(), "raw bulk"),
        );
        self.report.cpu("ingest leg", &ingest);
        self.report.cpu("raw ingest", &raw_ingest);
        self.report.cpu("index leg", &index);
        self.report.cpu("raw bulk", &raw_bulk);
        Ok(())
    }

    /// `POST` with the workers running, then the end-to-end rates until everything is stored and
    /// indexed. Returns the chat and its message count.
    async fn running_phase(&mut self, target: &Target) -> anyhow::Result<(u64, u64)> {
        let chat = self.stored_chat(&target.token).await?;
        eprintln!(
            "bench: workers running, posting {} messages with {} connections (at most {:?})",
            self.settings.messages, self.settings.connections, self.settings.max_phase
        );
        let before = self.processes.sample();
        let started = Instant::now();
        let posted = post_messages(
            &self.api,
            &target.token,
            chat,
            Load {
                clients: self.settings.connections,
                max_operations: self.settings.messages,
                max_duration: self.settings.max_phase,
            },
        )
        .await?;
        let cpu = self.processes.cpu_since(&before);
        self.report_post("workers running", &posted, cpu);

        let count = posted.completed();
        eprintln!("bench: waiting until all {count} messages are stored and in the index");
        let persisted = self
            .watch(target, chat)
            .wait_until_persisted(count, self.settings.max_phase)
            .await?;
        let stored_rate = count as f64 / (persisted.stored.at - started).as_secs_f64();
        let end_to_end = Measured {
            count,
            elapsed: persisted.indexed.at - started,
            cpu: self.processes.cpu_between(&before, &persisted.indexed.cpu),
        };
        self.report.row(
            format!("end-to-end into the storage ({count} messages)"),
            format!("{stored_rate:.0} msg/s"),
            self.general_ratios(stored_rate),
        );
        self.report.row(
            "end-to-end into the index",
            format!("{:.0} msg/s", end_to_end.rate()),
            self.general_ratios(end_to_end.rate()),
        );
        self.report.cpu("end-to-end", &end_to_end);
        Ok((chat, count))
    }

    /// The rows of one `POST` phase: rate, latencies and, for long phases, flatness.
    fn report_post(&mut self, workers: &str, posted: &Outcome, cpu: CpuUse) {
        let rate = posted.rate();
        eprintln!(
            "bench: {} posted at {rate:.0} req/s, p50 / p99 {}",
            posted.completed(),
            posted.latencies.p50_p99()
        );
        let ratios = self.general_ratios(rate);
        self.report.row(
            format!(
                "POST message, {workers}, {} connections ({} messages)",
                self.settings.connections,
                posted.completed()
            ),
            format!("{rate:.0} req/s"),
            ratios,
        );
        self.report.row(
            format!("POST message, {workers}: p50 / p99"),
            posted.latencies.p50_p99(),
            "",
        );
        match posted.first_and_last_rates(FLATNESS_WINDOW) {
            Some((first, last)) => self.report.row(
                format!("POST message, {workers}: first / last {FLATNESS_WINDOW} accepted"),
                format!("{first:.0} / {last:.0} req/s"),
                format!("{:.2} last / first", last / first),
            ),
            None => self.report.note(format!(
                "POST message, {workers}: {} messages, fewer than {} for the flatness check \
                 (first / last {FLATNESS_WINDOW}; BENCH_MESSAGES=1000000)",
                posted.completed(),
                2 * FLATNESS_WINDOW
            )),
        }
        self.report
            .cpu(&format!("POST, {workers}"), &measured(posted, cpu));
    }

    /// GET one message and a list page through the api, each against the raw rate of its SELECT,
    /// at the same concurrency.
    async fn reads(&mut self, target: &Target, chat: u64, stored: u64) -> anyhow::Result<()> {
        let load = Load::timed(self.settings.connections, self.settings.read_phase);
        let messages_url = self.api.url(&format!(
            "/applications/{}/chats/{chat}/messages",
            target.token
        ));

        let one_label = format!(
            "GET one message, {} connections (chat of {stored})",
            load.clients
        );
        let page_label = format!(
            "GET a page of {LIST_PER_PAGE} messages (after=), {} connections",
            load.clients
        );
        let bounds = format!("{} connections, {:?}", load.clients, load.max_duration);
        eprintln!("bench: GET one message ({bounds})");
        let (api, url) = (self.api.clone(), messages_url.clone());
        let before = self.processes.sample();
        let one = load::run(load, move |sequence| {
            let (api, url) = (api.clone(), format!("{url}/{}", scatter(sequence, stored)));
            async move { api.get(&url).await.map(drop) }
        })
        .await?;
        let one = measured(&one, self.processes.cpu_since(&before));

        eprintln!("bench: GET a page of {LIST_PER_PAGE} messages ({bounds})");
        let (api, url) = (self.api.clone(), messages_url);
        let before = self.processes.sample();
        let page = load::run(load, move |sequence| {
            let after = raw::page_after(sequence, stored, LIST_PER_PAGE);
            let (api, url) = (
                api.clone(),
                format!("{url}?per_page={LIST_PER_PAGE}&after={after}"),
            );
            async move { api.get(&url).await.map(drop) }
        })
        .await?;
        let page = measured(&page, self.processes.cpu_since(&before));

        let Some(storage) = &target.services else {
            let no_raw = "n/a (raw SELECT: services only)";
            self.report
                .row(one_label, format!("{:.0} req/s", one.rate()), no_raw);
            self.report
                .row(page_label, format!("{:.0} req/s", page.rate()), no_raw);
            self.report.cpu("GET message", &one);
            self.report.cpu("list page", &page);
            return Ok(());
        };
        let (pool, chat_ref) = (&storage.pool, storage.chat(chat));
        eprintln!("bench: raw SELECT of one message ({bounds})");
        let before = self.processes.sample();
        let raw_one = raw::message_lookups(pool, chat_ref, stored, load).await?;
        let raw_one = measured(&raw_one, self.processes.cpu_since(&before));
        eprintln!("bench: raw SELECT of a page ({bounds})");
        let before = self.processes.sample();
        let raw_page = raw::page_lookups(pool, chat_ref, (stored, LIST_PER_PAGE), load).await?;
        let raw_page = measured(&raw_page, self.processes.cpu_since(&before));

        let pool_size = self.config.database_max_connections;
        self.report.row(
            format!(
                "raw: SELECT one message by key, sqlx ({} concurrent, pool of {pool_size})",
                load.clients
            ),
            format!("{:.0} /s", raw_one.rate()),
            "1",
        );
        self.report.row(
            one_label,
            format!("{:.0} req/s", one.rate()),
            ratio(one.rate(), raw_one.rate(), "raw SELECT"),
        );
        self.report.row(
            format!(
                "raw: SELECT a page of {LIST_PER_PAGE} after a key, sqlx ({} concurrent, pool of {pool_size})",
                load.clients
            ),
            format!("{:.0} /s", raw_page.rate()),
            "1",
        );
        self.report.row(
            page_label,
            format!("{:.0} req/s", page.rate()),
            ratio(page.rate(), raw_page.rate(), "raw page SELECT"),
        );
        self.report.cpu("GET message", &one);
        self.report.cpu("raw GET", &raw_one);
        self.report.cpu("list page", &page);
        self.report.cpu("raw list", &raw_page);
        Ok(())
    }

    /// Search latency over `chats` (a query goes to one of them), one client at a time (the
    /// service time) and with [`SEARCH_CLIENTS`] concurrent (two cores shared with everything).
    async fn search(&mut self, token: &str, chats: &[u64], what: &str) -> anyhow::Result<()> {
        for clients in [1, SEARCH_CLIENTS] {
            // One client measures latency, not throughput: a quarter of the queries suffice.
            let searches = if clients == 1 {
                (self.settings.searches / 4).max(1)
            } else {
                self.settings.searches
            };
            eprintln!("bench: {searches} searches, {clients} concurrent, on {what}");
            let urls: Vec<String> = chats
                .iter()
                .map(|chat| {
                    self.api.url(&format!(
                        "/applications/{token}/chats/{chat}/messages/search"
                    ))
                })
                .collect();
            let api = self.api.clone();
            let before = self.processes.sample();
            let searched = load::run(
                Load {
                    clients,
                    max_operations: searches,
                    max_duration: self.settings.max_phase,
                },
                move |sequence| {
                    let api = api.clone();
                    let url = urls[scatter(sequence, urls.len() as u64) as usize - 1].clone();
                    async move {
                        let response = api
                            .http()
                            .get(&url)
                            .query(&[("query", api::query(sequence as usize))])
                            .send()
                            .await?;
                        anyhow::ensure!(
                            response.status().is_success(),
                            "search answered {}",
                            response.status()
                        );
                        let _: serde_json::Value = response.json().await?;
                        Ok(())
                    }
                },
            )
            .await?;
            let cost = measured(&searched, self.processes.cpu_since(&before));
            self.report.row(
                format!(
                    "search p50 / p99 ({} queries, {clients} concurrent, {what})",
                    searched.completed()
                ),
                searched.latencies.p50_p99(),
                "",
            );
            if clients > 1 {
                self.report.cpu(&format!("search, {what}"), &cost);
            }
        }
        Ok(())
    }

    /// Search on the chat of 1,000,000 messages of the pagination phase and on an application of
    /// 1,000 chats, their documents written straight into the index (bodies as the bench posts
    /// them).
    async fn search_at_scale(
        &mut self,
        target: &Target,
        deep_chat: Option<u64>,
    ) -> anyhow::Result<()> {
        let Some(storage) = &target.services else {
            self.report.note(
                "embedded stack: search on a chat of 1,000,000 messages and on an application of \
                 1,000 chats skipped (measured on Elasticsearch)",
            );
            return Ok(());
        };
        if let Some(chat) = deep_chat {
            let messages = deep::DEEP_CHAT_MESSAGES;
            eprintln!(
                "bench: indexing the {messages} messages of the chat of the pagination phase"
            );
            raw::seed_index(
                &self.config,
                self.api.http(),
                &[storage.chat(chat)],
                messages,
            )
            .await?;
            self.search(&target.token, &[chat], &format!("chat of {messages}"))
                .await?;
        }
        let token = self.api.create_application().await?;
        let application_id: u64 =
            sqlx::query_scalar("SELECT application_id FROM application_tokens WHERE digest = ?")
                .bind(application_digest(&token)?)
                .fetch_one(&storage.pool)
                .await?;
        eprintln!("bench: an application of {MANY_CHATS} chats of {MANY_CHATS_MESSAGES} messages");
        let mut chats = Vec::with_capacity(MANY_CHATS);
        for _ in 0..MANY_CHATS {
            chats.push(self.api.create_chat(&token).await?);
        }
        for &chat in &chats {
            self.api
                .wait_until_chat_stored(&token, chat, self.settings.max_phase)
                .await?;
        }
        let chat_refs: Vec<ChatRef> = chats
            .iter()
            .map(|&number| ChatRef {
                application_id,
                number,
            })
            .collect();
        raw::seed_index(
            &self.config,
            self.api.http(),
            &chat_refs,
            MANY_CHATS_MESSAGES,
        )
        .await?;
        self.search(
            &token,
            &chats,
            &format!("a chat of an application of {MANY_CHATS} chats of {MANY_CHATS_MESSAGES}"),
        )
        .await
    }

    /// The chat of 1,000,000 messages and its first and last page; returns the chat, or None
    /// when skipped.
    async fn deep_pages(&mut self, token: &str) -> anyhow::Result<Option<u64>> {
        if !self.settings.deep_pages {
            self.report
                .note("BENCH_DEEP_PAGES=0: the chat of 1,000,000 messages skipped");
            return Ok(None);
        }
        let messages = deep::DEEP_CHAT_MESSAGES;
        eprintln!("bench: seeding a chat of {messages} messages for the pagination phase");
        let chat = self.stored_chat(token).await?;
        deep::seed_deep_chat(&self.config, self.settings.embedded, token, chat).await?;
        let (first_page, last_page) = deep::page_latencies(&self.api, token, chat).await?;
        self.report.row(
            format!("list messages, page 1 p50 / p99 (chat of {messages})"),
            first_page.p50_p99(),
            "",
        );
        self.report.row(
            format!(
                "list messages, last page (after={}) p50 / p99",
                messages - 25
            ),
            last_page.p50_p99(),
            format!(
                "{:.2} of page 1 (p50)",
                last_page.percentile(0.50).as_secs_f64()
                    / first_page.percentile(0.50).as_secs_f64()
            ),
        );
        Ok(Some(chat))
    }
}

fn measured(outcome: &Outcome, cpu: CpuUse) -> Measured {
    Measured {
        count: outcome.completed(),
        elapsed: outcome.elapsed,
        cpu,
    }
}

/// `POST` message into the chat, one body per sequence number.
async fn post_messages(api: &Api, token: &str, chat: u64, load: Load) -> anyhow::Result<Outcome> {
    let url = api.url(&format!("/applications/{token}/chats/{chat}/messages"));
    let api = api.clone();
    load::run(load, move |sequence| {
        let (api, url) = (api.clone(), url.clone());
        async move {
            api.post(&url, Some(json!({"body": api::body(sequence)})))
                .await
                .map(drop)
        }
    })
    .await
}

/// What the database holds of an application token (its SHA-256), to find its application.
fn application_digest(token: &str) -> anyhow::Result<Vec<u8>> {
    Ok(chatcore::domain::ApplicationToken::parse(token)?
        .digest()
        .as_bytes()
        .to_vec())
}
