//! The fault suite: each scenario runs the four-service stack as processes (api, ingest-worker,
//! indexer, webhook-dispatcher; one of each, or several replicas) under a steady load of careful
//! clients ([`load`]: messages posted with an `Idempotency-Key` and retried on 5xx, 409 and
//! dropped connections with the same key; chats created, messages edited and deleted, each retried
//! until acknowledged), breaks one thing at several moments of that one load ([`fault`]), and
//! then audits what the services hold against what each client was told ([`audit`]): every
//! accepted `(chat, number)` holds the body its client last had acknowledged in MySQL, in the
//! index and in the last webhook (an edited or deleted one also through the API's reads and
//! search), no number was given to two clients, nothing is stored that no client was given beyond
//! what the fault can explain, and both dead-letter queues are empty. One report line per scenario
//! ([`audit::Outcome::report`]; the README's "The fault suite" explains the columns).
//!
//! It restarts the shared MariaDB, RabbitMQ and Elasticsearch, so it runs alone and serially:
//! `cargo test --workspace --test faults -- --test-threads=1` (scripts/test does, after the
//! main suite). Redis scenarios use a Redis of their own; the HA scenarios the HA services of
//! `scripts/services up --ha`: the Redis Sentinel and Redis Cluster failovers ([`redis_ha`]), a
//! RabbitMQ cluster node's loss ([`rabbit_ha`]).
//!
//! A scenario of another module runs through [`scenario`] (or [`run`] for another topology,
//! which hands back the [`Stack`] to inspect and stop).

mod audit;
mod fault;
mod load;
mod rabbit_ha;
mod redis_ha;
mod replicas;
mod rollback;
mod stack;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use system_tests::StatusCode;
use system_tests::own_redis::OwnRedis;
use system_tests::webhook_receiver::Mode;

pub(crate) use fault::{Fault, RedisFailover};
pub(crate) use load::Load;
pub(crate) use stack::{Stack, Topology};

/// Time for the pipeline to catch up after a fault.
pub(crate) const DRAIN: Duration = Duration::from_secs(120);
/// The webhook receiver's endpoint of every scenario: it follows every message change of the
/// scenario's application.
pub(crate) const WEBHOOKS: &str = "chat";
/// How long the load runs on after the last strike's recovery.
const AFTER_THE_LAST_STRIKE: Duration = Duration::from_secs(2);

/// Runs a scenario on one process of each service, audits and prints its outcome.
pub(crate) async fn scenario(
    name: &str,
    overrides: &[(&str, &str)],
    fault: Fault<'_>,
) -> anyhow::Result<()> {
    run(name, overrides, Topology::SINGLE, fault)
        .await?
        .stop()
        .await
}

/// Starts the stack, runs the load with `fault` striking at each of its offsets, waits for the
/// pipeline, audits, prints the report line and fails on any broken promise; the stack, still
/// running, for what the caller checks next.
pub(crate) async fn run(
    name: &str,
    overrides: &[(&str, &str)],
    topology: Topology,
    mut fault: Fault<'_>,
) -> anyhow::Result<Stack> {
    let started = tokio::time::Instant::now();
    let mut stack = Stack::start(overrides, topology).await?;
    let client = stack.apis.first().clone();
    let token = client.create_application(name).await?;
    let endpoint = client
        .post(
            &format!("/applications/{token}/webhooks"),
            serde_json::json!({
                "url": stack.receiver.url(WEBHOOKS),
                "events": ["message.created", "message.updated", "message.deleted"],
            }),
        )
        .await?;
    anyhow::ensure!(endpoint.status == StatusCode::CREATED, "{endpoint:?}");
    let secret = endpoint.body["secret"]
        .as_str()
        .context("secret")?
        .to_owned();
    stack
        .receiver
        .configure(WEBHOOKS, &[&secret], Mode::Ok)
        .await?;
    let chat = client.create_chat(&token).await?;
    let scope = format!(
        "messages:{}:{chat}",
        stack.env.application_id(&token).await?
    );
    let load = Load::start(Arc::clone(&stack.apis), &token, chat, 0);
    let offsets = fault.offsets();
    for (nth, offset) in offsets.iter().enumerate() {
        offset.wait(&stack, &load, &scope).await?;
        fault.strike(&mut stack, nth).await?;
        stack.wait_until_ready().await?;
    }
    tokio::time::sleep(AFTER_THE_LAST_STRIKE).await;
    let (ledger, server_errors) = load.stop().await?;
    let mut outcome = audit::audit(
        &stack.env,
        &stack.apis,
        &stack.receiver,
        &token,
        chat,
        &ledger,
        DRAIN,
    )
    .await?;
    outcome.strikes = offsets.len();
    outcome.extra_bound = fault.extra_bound(offsets.len());
    outcome.server_errors = server_errors;
    outcome.took = started.elapsed();
    println!("{}", outcome.report(name));
    outcome.assert_kept(name)?;
    Ok(stack)
}

/// Small blocks, so that the reservations move on during a Redis scenario.
const SMALL_BLOCKS: (&str, &str) = ("CHAT_NUMBER_BLOCK_SIZE", "50");

#[tokio::test]
async fn kill_9_of_the_api() -> anyhow::Result<()> {
    scenario("kill -9 api", &[], Fault::Kill9("api")).await
}

#[tokio::test]
async fn kill_9_of_the_ingest_worker() -> anyhow::Result<()> {
    scenario("kill -9 ingest-worker", &[], Fault::Kill9("ingest-worker")).await
}

#[tokio::test]
async fn kill_9_of_the_indexer() -> anyhow::Result<()> {
    scenario("kill -9 indexer", &[], Fault::Kill9("indexer")).await
}

#[tokio::test]
async fn kill_9_of_the_webhook_dispatcher() -> anyhow::Result<()> {
    let fault = Fault::Kill9("webhook-dispatcher");
    scenario("kill -9 webhook-dispatcher", &[], fault).await
}

#[tokio::test]
async fn webhook_receiver_down_for_20_seconds() -> anyhow::Result<()> {
    let fault = Fault::WebhookReceiverDownFor20Seconds;
    scenario("webhook receiver down 20 s", &[], fault).await
}

#[tokio::test]
async fn rabbitmq_restart() -> anyhow::Result<()> {
    scenario("rabbitmq restart", &[], Fault::Restart("rabbitmq")).await
}

#[tokio::test]
async fn rabbitmq_blocks_publishers() -> anyhow::Result<()> {
    scenario("rabbitmq blocks publishers", &[], Fault::RabbitMqBlocked).await
}

#[tokio::test]
async fn mariadb_restart() -> anyhow::Result<()> {
    scenario("mariadb restart", &[], Fault::Restart("mariadb")).await
}

#[tokio::test]
async fn elasticsearch_stopped_for_30_seconds() -> anyhow::Result<()> {
    let fault = Fault::StopFor30Seconds("elasticsearch");
    scenario("elasticsearch stopped 30 s", &[], fault).await
}

#[tokio::test]
async fn redis_flushall() -> anyhow::Result<()> {
    let redis = OwnRedis::start().await?;
    let url = redis.url();
    let settings = [("REDIS_URL", url.as_str()), SMALL_BLOCKS];
    scenario("redis FLUSHALL", &settings, Fault::RedisFlushAll(&redis)).await
}

#[tokio::test]
async fn redis_restart_empty() -> anyhow::Result<()> {
    let mut redis = OwnRedis::start().await?;
    let url = redis.url();
    let settings = [("REDIS_URL", url.as_str()), SMALL_BLOCKS];
    let fault = Fault::RedisRestartEmpty(&mut redis);
    scenario("redis restart empty", &settings, fault).await
}

#[tokio::test]
async fn redis_restart_from_a_backup_seconds_old() -> anyhow::Result<()> {
    let mut redis = OwnRedis::start().await?;
    let url = redis.url();
    let settings = [("REDIS_URL", url.as_str()), SMALL_BLOCKS];
    let fault = Fault::RedisRestartFromBackup(&mut redis);
    scenario("redis restart from older backup", &settings, fault).await
}

#[tokio::test]
async fn redis_failover_to_a_lagging_replica() -> anyhow::Result<()> {
    let mut failover = RedisFailover::start().await?;
    let url = failover.url();
    let settings = [("REDIS_URL", url.as_str()), SMALL_BLOCKS];
    let fault = Fault::RedisFailover(&mut failover);
    scenario("redis failover to lagging replica", &settings, fault).await
}
