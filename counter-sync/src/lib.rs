//! One reconciliation pass:
//! - `chats_count` and `messages_count` are recomputed from the rows and repaired where they drifted;
//! - no number counter (Redis) or reservation (MySQL) may be behind the highest number persisted;
//! - the messages updated lately are written to the search index again, which repairs an update
//!   whose event never reached it;
//! - the applications deleted lately (up to a page of them) are purged again, rows and search
//!   documents, which repairs a deletion whose event never reached the consumers.
//!
//! Walks applications and chats in pages by id, with one query per page for the figures, so its
//! cost grows linearly and it never holds long locks.

pub mod lease;

use std::fmt;
use std::sync::Arc;

use anyhow::Context as _;
use chatcore::Config;
use chatcore::domain::Number;
use chatcore::metrics::Metrics;
use chatcore::numbering::{NumberAllocator, Scope};
use chatcore::store::{CountLevel, ReindexCursor, ReindexScope, Storage};
use tokio_util::sync::CancellationToken;

const PAGE_SIZE: u32 = 1000;

/// One thing counter-sync changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    ChatsCount {
        application_id: u64,
        from: u64,
        to: u64,
    },
    MessagesCount {
        application_id: u64,
        chat_number: u64,
        from: u64,
        to: u64,
    },
    Counter {
        scope: String,
        raised_to: u64,
    },
    /// Rows or documents of a deleted application that its event's purge left (the event lost
    /// after the deletion's commit, or a write of it that came late).
    Purge {
        application_id: u64,
        rows: u64,
        documents: u64,
    },
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ChatsCount {
                application_id,
                from,
                to,
            } => {
                write!(
                    f,
                    "application {application_id}: chats_count {from} -> {to}"
                )
            }
            Self::MessagesCount {
                application_id,
                chat_number,
                from,
                to,
            } => write!(
                f,
                "application {application_id} chat {chat_number}: messages_count {from} -> {to}"
            ),
            Self::Counter { scope, raised_to } => {
                write!(f, "counter {scope}: raised to at least {raised_to}")
            }
            Self::Purge {
                application_id,
                rows,
                documents,
            } => write!(
                f,
                "deleted application {application_id}: purged {rows} rows and {documents} search documents"
            ),
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub applications_checked: u64,
    pub chats_checked: u64,
    pub repairs: Vec<Repair>,
    /// Messages edited within `CHAT_REINDEX_LOOKBACK_SECONDS`, written to the index again.
    pub reindexed: u64,
}

/// Runs one pass while holding the Lease when in a Kubernetes cluster; outside a cluster (no service
/// account) it runs without one and says so. Returns None when another run holds the Lease.
pub async fn run_exclusively(config: &Config) -> anyhow::Result<Option<Report>> {
    let kube_config = match kube::Config::incluster() {
        Ok(kube_config) => kube_config,
        Err(reason) => {
            tracing::info!(%reason, "not in a kubernetes cluster: running without a lease");
            return run(config).await.map(Some);
        }
    };
    let lock = lease::LeaseLock::new(
        kube::Client::try_from(kube_config)?,
        config.counter_sync.lease.clone(),
    );
    run_holding(config, &lock).await
}

/// Runs one pass if `lock` can be taken, renewing it meanwhile and recording each repair as an Event.
pub async fn run_holding(
    config: &Config,
    lock: &lease::LeaseLock,
) -> anyhow::Result<Option<Report>> {
    use k8s_openapi::jiff::Timestamp;
    match lock.try_acquire(Timestamp::now()).await? {
        lease::Acquisition::Acquired => tracing::info!("lease acquired"),
        lease::Acquisition::HeldBy(holder) if lock.is_own_predecessor(&holder) => {
            // Exiting 0 would mark the Job complete while nothing ran: fail, so that the Job's
            // next retry comes after the dead pod's Lease expired and does the work.
            anyhow::bail!(
                "the lease is held by {holder}, an earlier pod of this Job that did not finish; \
                 the Job retries once it expires"
            );
        }
        lease::Acquisition::HeldBy(holder) => {
            tracing::info!(%holder, "another counter-sync run holds the lease, nothing to do");
            return Ok(None);
        }
        lease::Acquisition::LostRace => {
            tracing::info!("another counter-sync run took the lease first, nothing to do");
            return Ok(None);
        }
    }
    let renewals = async {
        loop {
            tokio::time::sleep(lock.renew_interval()).await;
            match lock.renew(Timestamp::now()).await {
                Ok(true) => {}
                Ok(false) => return anyhow::anyhow!("the lease was taken over"),
                Err(error) => return anyhow::Error::from(error).context("renewing the lease"),
            }
        }
    };
    let report = tokio::select! {
        report = run(config) => report,
        lost = renewals => return Err(lost.context("stopping: another run may be repairing now")),
    };
    let report = match report {
        Ok(report) => report,
        Err(failure) => {
            // The Job's retry must find the Lease free, not held by a run that gave up (it would
            // do nothing and complete).
            if let Err(error) = lock.release().await {
                tracing::warn!(%error, "could not release the lease after a failed run");
            }
            return Err(failure);
        }
    };
    for repair in &report.repairs {
        if let Err(error) = lock
            .record_repair(Timestamp::now(), &repair.to_string())
            .await
        {
            tracing::warn!(%error, %repair, "could not record the repair as an event");
        }
    }
    lock.release().await?;
    Ok(Some(report))
}

impl Repair {
    /// The `kind` label of the repairs metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ChatsCount { .. } => "chats_count",
            Self::MessagesCount { .. } => "messages_count",
            Self::Counter { .. } => "counter",
            Self::Purge { .. } => "purge",
        }
    }
}

/// Pushes the run's metrics (repairs by kind) to a Prometheus Pushgateway: a one-shot job lives too
/// briefly to be scraped. `url` is the gateway's base URL, e.g. http://pushgateway:9091.
pub async fn push_metrics(url: &str, report: &Report) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    for kind in ["chats_count", "messages_count", "counter", "purge"] {
        let repairs = report
            .repairs
            .iter()
            .filter(|repair| repair.kind() == kind)
            .count() as u64;
        metrics
            .counter_sync_repairs
            .get_or_create(&chatcore::metrics::RepairLabels { kind })
            .inc_by(repairs);
    }
    let target = format!("{}/metrics/job/counter-sync", url.trim_end_matches('/'));
    reqwest::Client::new()
        .put(&target)
        .header("content-type", "text/plain; version=0.0.4")
        .body(metrics.encode().replace("# EOF\n", ""))
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("pushing metrics to {target}"))?;
    Ok(())
}

/// Runs one pass against the configured MySQL, Redis and Elasticsearch.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    config.require_database_url()?;
    config.require_redis_url()?;
    config.require_elasticsearch_url()?;
    let metrics = Metrics::new();
    let storage = chatcore::adapters::storage(config, &metrics).await?;
    let allocator = NumberAllocator::new(
        chatcore::adapters::state(config, &metrics).await?,
        Arc::clone(&storage),
        &config.redis_key_prefix,
        config.number_block_size,
    );
    let mut report = Report::default();
    for level in [CountLevel::Applications, CountLevel::Chats] {
        sync_level(storage.as_ref(), &allocator, &mut report, level).await?;
    }
    // A PUT or DELETE whose event never reached the index (the api answered 503 after the row
    // changed) is repaired here: the edits of the last while are written again, and the index
    // keeps whichever version is newer.
    let search = chatcore::adapters::search(config, &metrics).await?;
    let since = chatcore::store::now() - config.counter_sync.reindex_lookback;
    let reindexed = chatcore::pipeline::reindex(
        storage.as_ref(),
        search.as_ref(),
        ReindexScope::EditedSince(since),
        ReindexCursor::default(),
        &CancellationToken::new(),
        |_| {},
    )
    .await
    .context("re-indexing the recent updates")?;
    report.reindexed = reindexed.indexed;
    // Likewise an application deleted lately is purged once more: its event lost after the
    // deletion's commit, or a chat or message of it written (or indexed) after its purge.
    for application_id in storage.applications_deleted_since(since, PAGE_SIZE).await? {
        let rows = storage.purge_application(application_id).await?;
        let documents = search.purge_application(application_id).await?;
        if rows + documents > 0 {
            report.repairs.push(Repair::Purge {
                application_id,
                rows,
                documents,
            });
        }
    }
    Ok(report)
}

/// What one level's figures mean for the report.
fn repair(level: CountLevel, application_id: u64, number: u64, from: u64, to: u64) -> Repair {
    match level {
        CountLevel::Applications => Repair::ChatsCount {
            application_id,
            from,
            to,
        },
        CountLevel::Chats => Repair::MessagesCount {
            application_id,
            chat_number: number,
            from,
            to,
        },
    }
}

/// The scope whose numbers the children of an application or chat get.
fn scope(level: CountLevel, application_id: u64, number: u64) -> Option<Scope> {
    match level {
        CountLevel::Applications => Some(Scope::ChatsOf { application_id }),
        CountLevel::Chats => Number::new(number).map(|chat_number| Scope::MessagesOf {
            application_id,
            chat_number,
        }),
    }
}

fn count_checked(level: CountLevel, report: &mut Report) {
    match level {
        CountLevel::Applications => report.applications_checked += 1,
        CountLevel::Chats => report.chats_checked += 1,
    }
}

/// Walks one level in pages by id: repairs drifted counts, then raises counters that are behind.
async fn sync_level(
    storage: &dyn Storage,
    allocator: &NumberAllocator,
    report: &mut Report,
    level: CountLevel,
) -> anyhow::Result<()> {
    let mut after_id = 0u64;
    loop {
        let page = storage
            .count_figures(level, after_id, PAGE_SIZE)
            .await
            .context("reading counts")?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after_id = last.id;
        let mut highest_per_scope = Vec::with_capacity(page.len());
        for figures in &page {
            count_checked(level, report);
            if figures.stored != figures.actual as u64 {
                let to = storage
                    .recount(level, figures.id)
                    .await
                    .context("recounting")?;
                report.repairs.push(repair(
                    level,
                    figures.application_id,
                    figures.number,
                    figures.stored,
                    to,
                ));
            }
            if let Some(scope) = scope(level, figures.application_id, figures.number) {
                highest_per_scope.push((scope, figures.highest));
            }
        }
        ensure_counters(allocator, &highest_per_scope, report).await?;
    }
}

async fn ensure_counters(
    allocator: &NumberAllocator,
    highest_per_scope: &[(Scope, u64)],
    report: &mut Report,
) -> anyhow::Result<()> {
    let with_numbers: Vec<(Scope, u64)> = highest_per_scope
        .iter()
        .filter(|(_, highest)| *highest > 0)
        .copied()
        .collect();
    for scope in allocator.ensure_beyond(&with_numbers).await? {
        let raised_to = with_numbers
            .iter()
            .find(|(candidate, _)| *candidate == scope)
            .map_or(0, |(_, highest)| *highest);
        report.repairs.push(Repair::Counter {
            scope: scope.id(),
            raised_to,
        });
    }
    Ok(())
}
