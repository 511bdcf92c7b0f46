//! Bounded benchmark of a running stack, with the raw limits it depends on measured in the same
//! run, so the figures can be read as ratios on a shared, noisy machine. Two stacks:
//! - the real services (`scripts/stack up`): raw limits are Redis INCR and RabbitMQ confirmed
//!   publish; then `POST` with the workers stopped (SIGSTOP), the drain of that backlog by each
//!   downstream leg alone (one worker resumed at a time) against its own raw limit (a lapin +
//!   sqlx consumer, a raw `_bulk`), `POST` with the workers running and end to end, the reads
//!   against their raw SELECTs, and search latency (one client, then eight) on the chat of the
//!   running phase, on a chat of 1,000,000 messages and on an application of 1,000 chats (their
//!   documents written straight into the index); and the webhooks: the latency of a delivery
//!   to a receiver in the bench, the delivery of a backlog against the ingest leg, and the api's
//!   CPU per message with live streams open on other chats; and the limits of the capacity plan
//!   (the numbering script on one chat's counter, one queue's publish of the api's envelopes, one
//!   hot chat against many);
//! - the embedded process (`BENCH_STACK=embedded`, started by `scripts/bench`): the raw limit is the
//!   rate of durable (`synchronous = FULL`) one-row SQLite commits on the same disk; what needs
//!   the services or separate workers is skipped.
//!
//! Every phase also reports the CPU each process spent per message (see [`processes`]).
//!
//! The phases are in [`phases`], the raw limits they are read against in [`raw`]; the settings
//! (`BENCH_*`, or `bench --help`) in [`settings`]; the stack's own configuration (service URLs,
//! `CHAT_*`) is read by [`chatcore::Config`].

mod api;
mod load;
mod persisted;
mod phases;
mod processes;
mod raw;
mod report;
mod settings;

use std::future::Future;

use chatcore::Config;
use clap::Parser as _;
use sqlx::MySqlPool;

use crate::api::Api;
use crate::load::Outcome;
use crate::persisted::{ChatWatch, IndexCount};
use crate::phases::post_floor::PostFloorProcess;
use crate::phases::raw_limits::RawLimit;
use crate::processes::Processes;
use crate::raw::ChatRef;
use crate::report::{Measured, Report, ratio};
use crate::settings::{Command, Phases, Settings};

/// What the phases share.
struct Bench {
    config: Config,
    settings: Settings,
    processes: Processes,
    api: Api,
    raw_limits: Vec<RawLimit>,
    report: Report,
    /// The floor of a `POST`'s own work, served by a process of its own (services only).
    post_floor: Option<PostFloorProcess>,
    /// Its rate in this run, once measured.
    floor_rate: Option<f64>,
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
    let settings = Settings::parse();
    if settings.command == Some(Command::PostFloor) {
        // As the api's runtime: a worker thread per core.
        return tokio::runtime::Runtime::new()?
            .block_on(raw::post_floor::serve(Config::from_env()?));
    }
    // A small runtime: the load generator must not take the cores of the stack it measures.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads())
        .enable_all()
        .build()?
        .block_on(Box::pin(run(settings)))
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let post_floor = if settings.embedded() {
        None
    } else {
        Some(PostFloorProcess::start().await?)
    };
    let listed = match &post_floor {
        Some(floor) => format!("{},post-floor={}", settings.processes, floor.pid()),
        None => settings.processes.clone(),
    };
    let processes = Processes::new(&listed, settings.embedded(), settings.clk_tck);
    let api = Api::new(&settings.api_url, settings.connections)?;
    let mut bench = Bench {
        config,
        settings,
        processes,
        api,
        raw_limits: Vec::new(),
        report: Report::default(),
        post_floor,
        floor_rate: None,
    };
    if bench.settings.phases == Phases::Search {
        let token = bench.api.create_application().await?;
        let target = bench.target(token).await?;
        let chat = bench.stored_chat(&target.token).await?;
        bench.search_at_scale(&target, Some(chat)).await?;
        bench.report.print(&bench.processes);
        return Ok(());
    }
    bench.measure_raw_limits().await?;

    let token = bench.api.create_application().await?;
    let target = bench.target(token).await?;
    let backlog = bench.stopped_workers(&target).await?;
    let (running_chat, running_posted) = bench.running_workers(&target).await?;
    if let Some(backlog) = &backlog {
        bench
            .capacity_limits(&target, backlog.events_per_message)
            .await?;
    }
    bench
        .webhooks(backlog.as_ref().map(|backlog| backlog.ingest_rate))
        .await?;
    let (read_chat, stored) = backlog.map_or((running_chat, running_posted), |backlog| {
        (backlog.chat, backlog.count)
    });
    bench.reads(&target, read_chat, stored).await?;
    bench
        .search(
            &target.token,
            &[running_chat],
            &format!("chat of {running_posted}"),
            Vec::new(),
        )
        .await?;
    let deep_chat = bench.deep_pages(&target.token).await?;
    bench.search_at_scale(&target, deep_chat).await?;
    bench.report.cpu_efficiency(&bench.processes);
    bench.report.print(&bench.processes);
    let missed = bench.report.missed_goals();
    anyhow::ensure!(
        missed.is_empty() || !bench.settings.enforce,
        "{} enforced goal(s) missed (BENCH_ENFORCE=false only prints them): {}",
        missed.len(),
        missed.join("; ")
    );
    Ok(())
}

impl Bench {
    /// The ratios of `rate` to every raw limit of the accept path.
    fn general_ratios(&self, rate: f64) -> String {
        self.raw_limits
            .iter()
            .map(|raw| ratio(rate, raw.rate, raw.short_name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Announces `what`, runs `work` and returns its outcome with the CPU every process spent
    /// meanwhile.
    async fn measure(
        &self,
        what: &str,
        work: impl Future<Output = anyhow::Result<Outcome>>,
    ) -> anyhow::Result<(Outcome, Measured)> {
        eprintln!("bench: {what}");
        let before = self.processes.sample();
        let outcome = work.await?;
        let measured = Measured {
            count: outcome.completed(),
            elapsed: outcome.elapsed,
            cpu: self.processes.cpu_since(&before),
        };
        Ok((outcome, measured))
    }

    async fn target(&self, token: String) -> anyhow::Result<Target> {
        if self.settings.embedded() {
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
        let application_id = application_id(&pool, &token).await?;
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
            .wait_until_chat_stored(token, chat, self.settings.max_phase())
            .await?;
        Ok(chat)
    }
}

/// What the database holds of an application token (its SHA-256), to find its application.
fn application_digest(token: &str) -> anyhow::Result<Vec<u8>> {
    Ok(chatcore::domain::ApplicationToken::parse(token)?
        .digest()
        .as_bytes()
        .to_vec())
}

/// The application of a token, in the services' MySQL.
async fn application_id(pool: &MySqlPool, token: &str) -> anyhow::Result<u64> {
    Ok(
        sqlx::query_scalar("SELECT application_id FROM application_tokens WHERE digest = ?")
            .bind(application_digest(token)?)
            .fetch_one(pool)
            .await?,
    )
}
