//! The fault suite: each scenario runs the four-service stack as processes (api, ingest-worker,
//! indexer, webhook-dispatcher) under a steady load of careful clients (an `Idempotency-Key` per message, retried on
//! 5xx, 409 and dropped connections with the same key), breaks one thing in the middle, and then
//! checks that every accepted message is stored once and indexed once, and that no number was
//! handed out twice. One line per scenario: accepted, stored, indexed, duplicates (a number given
//! to two clients), lost (accepted, but not stored or not indexed), extra (stored, but no client
//! was answered with that number: only when Redis loses idempotency records), 5xx (answers the
//! clients retried). Every scenario also follows the chat with a webhook endpoint at a local
//! receiver: each accepted message must arrive there (`hooked`), in order without a gap, a
//! redelivery with its first `webhook-id`, every signature verified by the Standard Webhooks
//! reference library (`redelivered` counts the repeats).
//!
//! It restarts the shared MariaDB, RabbitMQ and Elasticsearch, so it runs alone and serially:
//! `cargo test --workspace --test faults -- --test-threads=1` (scripts/test does, after the
//! main suite). Redis scenarios use a Redis of their own; the RabbitMQ cluster scenarios
//! (`rabbit_ha`) the cluster of `scripts/services up --ha`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use system_tests::own_redis::{OwnRedis, TcpProxy};
use system_tests::webhook_receiver::{Mode, WebhookReceiver};
use system_tests::{Client, StatusCode, TestEnv, eventually};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

mod rabbit_ha;

/// Time for the pipeline to catch up after a fault.
const DRAIN: Duration = Duration::from_secs(120);
/// Concurrent careful clients; each posts about 40 messages a second.
const CLIENTS: usize = 8;
const PAUSE_BETWEEN_POSTS: Duration = Duration::from_millis(25);

/// The api, ingest-worker, indexer and webhook-dispatcher of one scenario, as processes that can
/// be killed, and the receiver of the webhooks.
struct Stack {
    env: TestEnv,
    api_port: u16,
    api: Child,
    ingest: Child,
    indexer: Child,
    dispatcher: Child,
    receiver: WebhookReceiver,
}

impl Stack {
    async fn start(overrides: &[(&str, &str)]) -> anyhow::Result<Self> {
        let api_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let address = format!("127.0.0.1:{api_port}");
        // Short leases and time limits: a request the api died in blocks its key briefly.
        let mut settings = vec![
            ("CHAT_HTTP_ADDR", address.as_str()),
            ("CHAT_REQUEST_TIMEOUT_MS", "2000"),
            ("CHAT_IDEMPOTENCY_LEASE_SECONDS", "3"),
        ];
        settings.extend_from_slice(overrides);
        let env = TestEnv::with_settings(&settings).await?;
        let stack = Self {
            api: env.spawn_process("api")?,
            ingest: env.spawn_process("ingest-worker")?,
            indexer: env.spawn_process("indexer")?,
            dispatcher: env.spawn_process("webhook-dispatcher")?,
            receiver: WebhookReceiver::start().await?,
            env,
            api_port,
        };
        stack.wait_until_ready().await?;
        Ok(stack)
    }

    fn client(&self) -> Client {
        Client::new(&format!("http://127.0.0.1:{}/api/v1", self.api_port))
    }

    async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let readyz = format!("http://127.0.0.1:{}/readyz", self.api_port);
        eventually("the api is ready", Duration::from_secs(60), || async {
            Ok(reqwest::get(&readyz)
                .await
                .is_ok_and(|reply| reply.status() == StatusCode::OK))
        })
        .await
    }

    async fn kill_and_restart(&mut self, binary: &str) -> anyhow::Result<()> {
        let process = match binary {
            "api" => &mut self.api,
            "ingest-worker" => &mut self.ingest,
            "indexer" => &mut self.indexer,
            "webhook-dispatcher" => &mut self.dispatcher,
            other => anyhow::bail!("no process {other}"),
        };
        process.kill().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        *process = self.env.spawn_process(binary)?;
        Ok(())
    }
}

/// Careful clients posting into one chat until stopped.
struct Load {
    accepted: Arc<Mutex<Vec<u64>>>,
    server_errors: Arc<AtomicU64>,
    stop: CancellationToken,
    clients: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    fn start(client: &Client, token: &str, chat: u64, round: usize) -> Self {
        let accepted: Arc<Mutex<Vec<u64>>> = Arc::default();
        let server_errors: Arc<AtomicU64> = Arc::default();
        let stop = CancellationToken::new();
        let clients = (0..CLIENTS)
            .map(|client_index| {
                let (client, token) = (client.clone(), token.to_owned());
                let (accepted, server_errors, stop) = (
                    Arc::clone(&accepted),
                    Arc::clone(&server_errors),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let mut sequence = 0;
                    while !stop.is_cancelled() {
                        let key = format!("r{round}-c{client_index}-{sequence}");
                        let number =
                            post_carefully(&client, &token, chat, &key, &server_errors).await?;
                        accepted.lock().expect("not poisoned").push(number);
                        sequence += 1;
                        tokio::time::sleep(PAUSE_BETWEEN_POSTS).await;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        Self {
            accepted,
            server_errors,
            stop,
            clients,
        }
    }

    /// Stops posting (each client finishes the message at hand); the numbers accepted and the
    /// 5xx answers met on the way.
    async fn stop(self) -> anyhow::Result<(Vec<u64>, u64)> {
        self.stop.cancel();
        for client in self.clients {
            client.await??;
        }
        let accepted = self.accepted.lock().expect("not poisoned").clone();
        Ok((accepted, self.server_errors.load(Ordering::Relaxed)))
    }
}

/// One message with its key until it is accepted: 5xx, 409 and dropped connections are retried.
async fn post_carefully(
    client: &Client,
    token: &str,
    chat: u64,
    key: &str,
    server_errors: &AtomicU64,
) -> anyhow::Result<u64> {
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let deadline = tokio::time::Instant::now() + DRAIN;
    loop {
        let request = client
            .request(reqwest::Method::POST, &path)
            .header("idempotency-key", key)
            .json(&serde_json::json!({ "body": key }));
        match client.send_raw(request).await {
            Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                return reply.body["number"].as_u64().context("number");
            }
            Ok(reply) if reply.status.is_server_error() => {
                server_errors.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) if reply.status == StatusCode::CONFLICT => {}
            Ok(reply) => anyhow::bail!("{key}: {reply:?}"),
            // The api is down or restarting.
            Err(_) => {}
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{key} was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the load around `fault`, waits for the pipeline, checks and prints the outcome.
async fn scenario(name: &str, overrides: &[(&str, &str)], fault: Fault<'_>) -> anyhow::Result<()> {
    let mut stack = Stack::start(overrides).await?;
    let client = stack.client();
    let token = client.create_application(name).await?;
    let endpoint = client
        .post(
            &format!("/applications/{token}/webhooks"),
            serde_json::json!({"url": stack.receiver.url("chat"), "events": ["message.created"]}),
        )
        .await?;
    anyhow::ensure!(endpoint.status == StatusCode::CREATED, "{endpoint:?}");
    let secret = endpoint.body["secret"]
        .as_str()
        .context("secret")?
        .to_owned();
    stack
        .receiver
        .configure("chat", &[&secret], Mode::Ok)
        .await?;
    let chat = client.create_chat(&token).await?;
    let load = Load::start(&client, &token, chat, 0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loses_redis_data = fault.loses_redis_data();
    fault.strike(&mut stack).await?;
    stack.wait_until_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (accepted, server_errors) = load.stop().await?;

    let unique: BTreeSet<u64> = accepted.iter().copied().collect();
    let duplicates = accepted.len() - unique.len();
    let env = &stack.env;
    let all_in = |numbers: &[u64]| {
        unique
            .iter()
            .all(|number| numbers.binary_search(number).is_ok())
    };
    let settled = eventually(
        "every accepted message is stored and indexed",
        DRAIN,
        || async {
            let stored = env.stored_message_numbers(&token, chat).await?;
            let indexed = env.indexed_message_numbers(&token, chat).await?;
            Ok(all_in(&stored) && stored == indexed)
        },
    )
    .await;
    let hooked = eventually(
        "every accepted message reached the webhook",
        DRAIN,
        || async {
            let delivered = WebhookCheck::of(&stack.receiver, "chat").await?.numbers;
            Ok(unique.iter().all(|number| delivered.contains(number)))
        },
    )
    .await;
    let webhooks = WebhookCheck::of(&stack.receiver, "chat").await?;
    let stored = env.stored_message_numbers(&token, chat).await?;
    let indexed = env.indexed_message_numbers(&token, chat).await?;
    let lost = unique
        .iter()
        .filter(|number| {
            stored.binary_search(number).is_err() || indexed.binary_search(number).is_err()
        })
        .count();
    // Stored under a number no client was given: a retry whose idempotency record Redis lost.
    let extra = stored
        .iter()
        .filter(|number| !unique.contains(number))
        .count();
    println!(
        "fault {name:<34} accepted {:>5}  stored {:>5}  indexed {:>5}  hooked {:>5}  duplicates {duplicates}  lost {lost}  extra {extra}  5xx {server_errors}  redelivered {}",
        accepted.len(),
        stored.len(),
        indexed.len(),
        webhooks.delivered,
        webhooks.redelivered,
    );
    assert_eq!(duplicates, 0, "{name}: a number was handed out twice");
    settled.with_context(|| format!("{name}: lost {lost}"))?;
    hooked.with_context(|| format!("{name}: a webhook was lost"))?;
    webhooks
        .problems
        .is_empty()
        .then_some(())
        .with_context(|| {
            format!(
                "{name}: the webhooks broke a promise: {:?}",
                webhooks.problems
            )
        })?;
    assert!(
        extra == 0 || loses_redis_data,
        "{name}: {extra} messages stored that no client was answered for"
    );
    for process in [
        &mut stack.api,
        &mut stack.ingest,
        &mut stack.indexer,
        &mut stack.dispatcher,
    ] {
        process.kill().await?;
    }
    Ok(())
}

/// What the webhook receiver got for one endpoint, and which promises the deliveries broke.
struct WebhookCheck {
    /// The message numbers delivered (answered 2xx).
    numbers: BTreeSet<u64>,
    delivered: usize,
    /// Deliveries of a change delivered before.
    redelivered: usize,
    problems: Vec<String>,
}

impl WebhookCheck {
    /// Reads the deliveries in arrival order: each must verify, carry the next change sequence of
    /// the chat or repeat an earlier one (a redelivery) with that one's `webhook-id`.
    async fn of(receiver: &WebhookReceiver, name: &str) -> anyhow::Result<Self> {
        let mut check = Self {
            numbers: BTreeSet::new(),
            delivered: 0,
            redelivered: 0,
            problems: Vec::new(),
        };
        let mut ids: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
        let mut highest = 0;
        for delivery in receiver.deliveries(Some(name)).await? {
            if delivery.answered.is_none_or(|status| status >= 300) {
                continue;
            }
            check.delivered += 1;
            let data = &delivery.body["data"];
            let sequence = data["sequence"].as_u64().unwrap_or_default();
            if !delivery.verified {
                check
                    .problems
                    .push(format!("{} did not verify", delivery.webhook_id));
            }
            let first_id = ids
                .entry(sequence)
                .or_insert_with(|| delivery.webhook_id.clone());
            if *first_id != delivery.webhook_id {
                check
                    .problems
                    .push(format!("sequence {sequence} came with two ids"));
            }
            if sequence <= highest {
                check.redelivered += 1;
            } else if sequence == highest + 1 {
                highest = sequence;
            } else {
                check
                    .problems
                    .push(format!("sequence {sequence} came after {highest}"));
                highest = sequence;
            }
            check.numbers.extend(data["message"]["number"].as_u64());
        }
        Ok(check)
    }
}

/// `scripts/services <action> <service>`, with the ports of the environment.
async fn services(action: &str, service: &str) -> anyhow::Result<()> {
    services_command(&[action, service]).await
}

async fn services_command(arguments: &[&str]) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services");
    let status = tokio::process::Command::new(script)
        .args(arguments)
        .status()
        .await?;
    anyhow::ensure!(status.success(), "scripts/services {arguments:?} failed");
    Ok(())
}

/// The longest a POST may take while RabbitMQ blocks publishers: the request timeout of the
/// scenario (2 s) and a margin.
const BLOCKED_ANSWER_BOUND: Duration = Duration::from_secs(4);

/// What a scenario breaks in the middle of the load.
enum Fault<'a> {
    Kill9(&'static str),
    /// The webhook receiver stops answering (connections refused) for a minute.
    WebhookReceiverDownFor60Seconds,
    Restart(&'static str),
    StopFor30Seconds(&'static str),
    /// A memory alarm: RabbitMQ blocks every publishing connection (`connection.blocked`).
    RabbitMqBlocked,
    /// One node of a RabbitMQ cluster killed, then brought back.
    RabbitMqNodeKill9(&'a rabbit_ha::RabbitCluster),
    RedisFlushAll(&'a OwnRedis),
    RedisRestartEmpty(&'a mut OwnRedis),
    RedisRestartFromBackup(&'a mut OwnRedis),
    RedisFailover {
        primary: &'a mut OwnRedis,
        replica: &'a mut OwnRedis,
        replication: &'a TcpProxy,
        proxy: &'a TcpProxy,
    },
}

impl Fault<'_> {
    /// Redis comes back without some of its recent writes, idempotency records included: a retry
    /// whose record was lost gets a new number, and its first attempt's message stays too
    /// (README, "Idempotent retries").
    fn loses_redis_data(&self) -> bool {
        matches!(
            self,
            Self::RedisFlushAll(_)
                | Self::RedisRestartEmpty(_)
                | Self::RedisRestartFromBackup(_)
                | Self::RedisFailover { .. }
        )
    }

    async fn strike(self, stack: &mut Stack) -> anyhow::Result<()> {
        match self {
            Self::Kill9(binary) => stack.kill_and_restart(binary).await,
            Self::WebhookReceiverDownFor60Seconds => {
                stack.receiver.stop().await?;
                tokio::time::sleep(Duration::from_secs(60)).await;
                stack.receiver.restart().await
            }
            Self::Restart(service) => {
                services("restart", service).await?;
                // Readiness comes back by itself, well before any client would give up.
                let started = tokio::time::Instant::now();
                stack.wait_until_ready().await?;
                println!(
                    "fault {service} restart: the api was ready {:?} after the service",
                    started.elapsed()
                );
                Ok(())
            }
            Self::StopFor30Seconds(service) => {
                services("stop", service).await?;
                tokio::time::sleep(Duration::from_secs(30)).await;
                services("start", service).await
            }
            Self::RabbitMqBlocked => {
                services_command(&[
                    "rabbitmqctl",
                    "set_vm_memory_high_watermark",
                    "absolute",
                    "1",
                ])
                .await?;
                let blocked = answers_while_blocked(stack).await;
                services_command(&["rabbitmqctl", "set_vm_memory_high_watermark", "0.4"]).await?;
                let (status, took) = blocked?;
                println!("fault rabbitmq blocked: a POST answered {status} after {took:?}");
                anyhow::ensure!(
                    status == StatusCode::SERVICE_UNAVAILABLE && took < BLOCKED_ANSWER_BOUND,
                    "a POST while RabbitMQ blocks publishers answered {status} after {took:?}"
                );
                Ok(())
            }
            Self::RabbitMqNodeKill9(cluster) => {
                rabbit_ha::kill_a_node_and_bring_it_back(cluster, stack).await
            }
            Self::RedisFlushAll(redis) => {
                let _: () = redis::cmd("FLUSHALL")
                    .query_async(&mut redis.connection().await?)
                    .await?;
                Ok(())
            }
            Self::RedisRestartEmpty(redis) => redis.restart_empty().await,
            Self::RedisRestartFromBackup(redis) => {
                redis.back_up().await?;
                tokio::time::sleep(Duration::from_secs(2)).await;
                redis.restart_from_backup().await
            }
            Self::RedisFailover {
                primary,
                replica,
                replication,
                proxy,
            } => {
                primary.wait_for_replicas().await?;
                // From now on the primary acknowledges writes the replica never sees.
                replication.cut();
                tokio::time::sleep(Duration::from_secs(2)).await;
                primary.kill().await?;
                replica.promote().await?;
                proxy.switch(replica.port);
                Ok(())
            }
        }
    }
}

/// One POST while the broker blocks publishers (after the alarm has had a moment to spread):
/// its status and how long it took.
async fn answers_while_blocked(stack: &Stack) -> anyhow::Result<(StatusCode, Duration)> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = stack.client();
    let token = client.create_application("blocked").await?;
    let started = tokio::time::Instant::now();
    let reply = client
        .post_empty(&format!("/applications/{token}/chats"))
        .await?;
    Ok((reply.status, started.elapsed()))
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
async fn webhook_receiver_down_for_60_seconds() -> anyhow::Result<()> {
    let fault = Fault::WebhookReceiverDownFor60Seconds;
    scenario("webhook receiver down 60 s", &[], fault).await
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
    scenario(
        "redis restart empty",
        &settings,
        Fault::RedisRestartEmpty(&mut redis),
    )
    .await
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
    let mut primary = OwnRedis::start().await?;
    // The replica follows the primary over a link the scenario cuts.
    let replication = TcpProxy::start(primary.port).await?;
    let mut replica = OwnRedis::start_replica_of(replication.port).await?;
    // The api knows one address; behind it the primary, after the failover the replica.
    let proxy = TcpProxy::start(primary.port).await?;
    let url = proxy.url();
    let settings = [("REDIS_URL", url.as_str()), SMALL_BLOCKS];
    let fault = Fault::RedisFailover {
        primary: &mut primary,
        replica: &mut replica,
        replication: &replication,
        proxy: &proxy,
    };
    scenario("redis failover to lagging replica", &settings, fault).await
}
