//! One reconciliation pass:
//! - `chats_count` and `messages_count` are recomputed from the rows and repaired where they drifted;
//! - no number counter (Redis) or reservation (MySQL) may be behind the highest number persisted.
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
use chatcore::state::RedisState;
use chatcore::store::MySqlStorage;
use sqlx::{MySqlPool, Row as _};

const PAGE_SIZE: i64 = 1000;

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
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub applications_checked: u64,
    pub chats_checked: u64,
    pub repairs: Vec<Repair>,
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
        lease::LeaseSettings::from_env(),
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
        report = run(config) => report?,
        lost = renewals => return Err(lost.context("stopping: another run may be repairing now")),
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
        }
    }
}

/// Pushes the run's metrics (repairs by kind) to a Prometheus Pushgateway: a one-shot job lives too
/// briefly to be scraped. `url` is the gateway's base URL, e.g. http://pushgateway:9091.
pub async fn push_metrics(url: &str, report: &Report) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    for kind in ["chats_count", "messages_count", "counter"] {
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

/// Runs one pass against the configured MySQL and Redis.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    let mysql_url = config.require_database_url()?;
    let pool = chatcore::store::mysql::connect(mysql_url, 4)
        .await
        .with_context(|| format!("connecting to mysql at {mysql_url}"))?;
    let redis_url = config.require_redis_url()?;
    let redis = chatcore::connect_redis(redis_url)
        .await
        .with_context(|| format!("connecting to redis at {redis_url}"))?;
    let allocator = NumberAllocator::new(
        Arc::new(RedisState::new(redis)),
        Arc::new(MySqlStorage::new(pool.clone(), Metrics::new())),
        &config.redis_key_prefix,
        config.number_block_size,
    );
    let mut report = Report::default();
    sync_level(&pool, &allocator, &mut report, Level::Applications).await?;
    sync_level(&pool, &allocator, &mut report, Level::Chats).await?;
    Ok(report)
}

/// The two levels whose children are counted and numbered: applications (chats) and chats
/// (messages). Their page queries answer the same columns, so one walk serves both.
#[derive(Clone, Copy)]
enum Level {
    Applications,
    Chats,
}

impl Level {
    /// Columns: id, application_id, number, stored, actual, highest.
    fn page_query(self) -> &'static str {
        match self {
            Self::Applications => {
                "SELECT a.id, a.id AS application_id, CAST(0 AS UNSIGNED) AS number, a.chats_count AS stored, \
                   (SELECT COUNT(*) FROM chats c WHERE c.application_id = a.id) AS actual, \
                   (SELECT CAST(COALESCE(MAX(number), 0) AS UNSIGNED) FROM chats c WHERE c.application_id = a.id) AS highest \
                 FROM applications a WHERE a.id > ? ORDER BY a.id LIMIT ?"
            }
            Self::Chats => {
                "SELECT c.id, c.application_id, c.number, c.messages_count AS stored, \
                   (SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.id) AS actual, \
                   (SELECT CAST(COALESCE(MAX(number), 0) AS UNSIGNED) FROM messages m WHERE m.chat_id = c.id) AS highest \
                 FROM chats c WHERE c.id > ? ORDER BY c.id LIMIT ?"
            }
        }
    }

    /// Recount statement (binds id twice) and the read of the recounted value.
    fn recount_queries(self) -> (&'static str, &'static str) {
        match self {
            Self::Applications => (
                "UPDATE applications SET chats_count = (SELECT COUNT(*) FROM chats WHERE application_id = ?) WHERE id = ?",
                "SELECT chats_count FROM applications WHERE id = ?",
            ),
            Self::Chats => (
                "UPDATE chats SET messages_count = (SELECT COUNT(*) FROM messages WHERE chat_id = ?) WHERE id = ?",
                "SELECT messages_count FROM chats WHERE id = ?",
            ),
        }
    }

    fn repair(self, application_id: u64, number: u64, from: u64, to: u64) -> Repair {
        match self {
            Self::Applications => Repair::ChatsCount {
                application_id,
                from,
                to,
            },
            Self::Chats => Repair::MessagesCount {
                application_id,
                chat_number: number,
                from,
                to,
            },
        }
    }

    fn scope(self, application_id: u64, number: u64) -> Option<Scope> {
        match self {
            Self::Applications => Some(Scope::ChatsOf { application_id }),
            Self::Chats => Number::new(number).map(|chat_number| Scope::MessagesOf {
                application_id,
                chat_number,
            }),
        }
    }

    fn count_checked(self, report: &mut Report) {
        match self {
            Self::Applications => report.applications_checked += 1,
            Self::Chats => report.chats_checked += 1,
        }
    }
}

/// Walks one level in pages by id: repairs drifted counts, then raises counters that are behind.
async fn sync_level(
    pool: &MySqlPool,
    allocator: &NumberAllocator,
    report: &mut Report,
    level: Level,
) -> anyhow::Result<()> {
    let mut after_id = 0u64;
    loop {
        let rows = sqlx::query(level.page_query())
            .bind(after_id)
            .bind(PAGE_SIZE)
            .fetch_all(pool)
            .await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after_id = last.try_get("id")?;
        let mut highest_per_scope = Vec::with_capacity(rows.len());
        for row in &rows {
            level.count_checked(report);
            let id: u64 = row.try_get("id")?;
            let application_id: u64 = row.try_get("application_id")?;
            let number: u64 = row.try_get("number")?;
            let stored: u64 = row.try_get("stored")?;
            let actual: i64 = row.try_get("actual")?;
            let highest: u64 = row.try_get("highest")?;
            if stored != actual as u64 {
                let (update, select) = level.recount_queries();
                let to = recount(pool, update, select, id).await?;
                report
                    .repairs
                    .push(level.repair(application_id, number, stored, to));
            }
            if let Some(scope) = level.scope(application_id, number) {
                highest_per_scope.push((scope, highest));
            }
        }
        ensure_counters(allocator, &highest_per_scope, report).await?;
    }
}

/// Recomputes a count inside one statement (the count is read under the row lock), then reads it.
async fn recount(
    pool: &MySqlPool,
    update: &'static str,
    select: &'static str,
    id: u64,
) -> anyhow::Result<u64> {
    let mut transaction = pool.begin().await?;
    sqlx::query(update)
        .bind(id)
        .bind(id)
        .execute(&mut *transaction)
        .await?;
    let count: u64 = sqlx::query_scalar(select)
        .bind(id)
        .fetch_one(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(count)
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
