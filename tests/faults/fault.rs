//! What a scenario breaks, and when: each fault strikes at several moments of one run of the
//! load ([`Offset`]).

use std::path::Path;
use std::time::Duration;

use sqlx::Row as _;
use system_tests::StatusCode;
use system_tests::own_redis::{OwnRedis, TcpProxy};

use crate::load::{CLIENTS, Load};
use crate::rabbit_ha::RabbitCluster;
use crate::redis_ha::HaFailover;
use crate::stack::Stack;

/// A moment of the load at which a fault strikes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Offset {
    /// A moment after the load starts: the chat's first numbers, its counter just seeded.
    Early,
    /// Just before the api reserves the chat's next block of numbers in MySQL (it does when the
    /// counter reaches half a block before the reserved ceiling, README "Numbering"): the fault
    /// meets the reservation under way.
    BlockChange,
    /// A second after the previous strike's recovery: the load in full flow.
    Mid,
}

/// Every offset, in the order they strike.
pub(crate) const EVERY_OFFSET: &[Offset] = &[Offset::Early, Offset::BlockChange, Offset::Mid];

/// Numbers before the reservation's trigger at which [`Offset::BlockChange`] strikes: about
/// 10 ms of the load, so that the strike lands as the reservation starts.
const BLOCK_CHANGE_LEAD: u64 = 3;

impl Offset {
    /// Waits for this moment of the load on the chat whose numbers are reserved under `scope`.
    pub(crate) async fn wait(self, stack: &Stack, load: &Load, scope: &str) -> anyhow::Result<()> {
        match self {
            Self::Early => tokio::time::sleep(Duration::from_millis(300)).await,
            Self::Mid => tokio::time::sleep(Duration::from_secs(1)).await,
            Self::BlockChange => {
                let block = stack.env.config().number_block_size;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    anyhow::ensure!(
                        tokio::time::Instant::now() < deadline,
                        "the chat's numbers never came near a reservation (at {})",
                        load.highest_number()
                    );
                    let Ok(ceiling) = reserved_until(stack, scope).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let trigger = ceiling.saturating_sub(block / 2 + BLOCK_CHANGE_LEAD);
                    if load.highest_number() < trigger {
                        while load.highest_number() < trigger
                            && tokio::time::Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        println!(
                            "fault strikes at number {}: the block after {ceiling} is reserved at {}",
                            load.highest_number(),
                            ceiling - block / 2
                        );
                        return Ok(());
                    }
                    // This block's reservation is done or under way: wait for the next one.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Ok(())
    }
}

/// The highest number MySQL has reserved for `scope`.
async fn reserved_until(stack: &Stack, scope: &str) -> anyhow::Result<u64> {
    let row = sqlx::query("SELECT reserved_until FROM number_reservations WHERE scope = ?")
        .bind(scope)
        .fetch_one(stack.env.mysql())
        .await?;
    Ok(row.try_get(0)?)
}

/// What a scenario breaks, at each of its offsets.
pub(crate) enum Fault<'a> {
    /// `kill -9` of the (first) replica of a service, restarted half a second later.
    Kill9(&'static str),
    /// `kill -9` of one api, then one ingest-worker, then one indexer (of the replicated
    /// topology), each restarted half a second later.
    Kill9InTurn,
    /// The webhook receiver stops answering (connections refused) for 20 s.
    WebhookReceiverDownFor20Seconds,
    Restart(&'static str),
    StopFor30Seconds(&'static str),
    /// A memory alarm: RabbitMQ blocks every publishing connection (`connection.blocked`).
    RabbitMqBlocked,
    /// The node of a RabbitMQ cluster leading the ingest queue killed (`kill -9`), brought back
    /// 15 s later.
    RabbitMqNodeKill9(&'a RabbitCluster),
    RedisFlushAll(&'a OwnRedis),
    RedisRestartEmpty(&'a mut OwnRedis),
    RedisRestartFromBackup(&'a mut OwnRedis),
    RedisFailover(&'a mut RedisFailover),
    /// The master of the HA Redis' sentinels or of its cluster killed (`kill -9`), a replica
    /// promoted.
    RedisHa(HaFailover),
}

/// The replicas killed in turn by [`Fault::Kill9InTurn`].
const KILLED_IN_TURN: [(&str, usize); 3] = [("api", 1), ("ingest-worker", 0), ("indexer", 1)];

impl Fault<'_> {
    /// When it strikes. An outage of 30 s spans every moment of the load (the chat passes
    /// several block reservations meanwhile) and costs about 90 s with Elasticsearch's start:
    /// it strikes once.
    pub(crate) fn offsets(&self) -> &'static [Offset] {
        match self {
            Self::StopFor30Seconds(_) => &[Offset::Early],
            _ => EVERY_OFFSET,
        }
    }

    /// The most messages and chats that may be stored without any client having been given
    /// their number, over `strikes` strikes. Only a fault that loses Redis data loses
    /// idempotency records, and only a record of a request whose client is still waiting for
    /// its answer leads to a second number (its retry); each client waits for one request at a
    /// time, so each strike adds at most one per client. Every other fault: none.
    pub(crate) fn extra_bound(&self, strikes: usize) -> usize {
        let loses_idempotency_records = matches!(
            self,
            Self::RedisFlushAll(_)
                | Self::RedisRestartEmpty(_)
                | Self::RedisRestartFromBackup(_)
                | Self::RedisFailover(_)
                | Self::RedisHa(_)
        );
        if loses_idempotency_records {
            CLIENTS * strikes
        } else {
            0
        }
    }

    /// Strikes the `nth` time (from 0).
    pub(crate) async fn strike(&mut self, stack: &mut Stack, nth: usize) -> anyhow::Result<()> {
        match self {
            Self::Kill9(binary) => stack.kill_and_restart(binary, 0).await,
            Self::Kill9InTurn => {
                let (binary, replica) = KILLED_IN_TURN[nth % KILLED_IN_TURN.len()];
                stack.kill_and_restart(binary, replica).await
            }
            Self::WebhookReceiverDownFor20Seconds => {
                stack.receiver.stop().await?;
                tokio::time::sleep(Duration::from_secs(20)).await;
                stack.receiver.restart().await
            }
            Self::Restart(service) => {
                services(&["restart", service]).await?;
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
                services(&["stop", service]).await?;
                tokio::time::sleep(Duration::from_secs(30)).await;
                services(&["start", service]).await
            }
            Self::RabbitMqBlocked => {
                services(&[
                    "rabbitmqctl",
                    "set_vm_memory_high_watermark",
                    "absolute",
                    "1",
                ])
                .await?;
                let blocked = answers_while_blocked(stack).await;
                services(&["rabbitmqctl", "set_vm_memory_high_watermark", "0.4"]).await?;
                let (status, took) = blocked?;
                println!("fault rabbitmq blocked: a POST answered {status} after {took:?}");
                anyhow::ensure!(
                    status == StatusCode::SERVICE_UNAVAILABLE && took < BLOCKED_ANSWER_BOUND,
                    "a POST while RabbitMQ blocks publishers answered {status} after {took:?}"
                );
                Ok(())
            }
            Self::RabbitMqNodeKill9(cluster) => {
                cluster.kill_the_leader_and_bring_it_back(stack).await
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
            Self::RedisFailover(failover) => failover.fail_over().await,
            Self::RedisHa(failover) => failover.strike(stack).await,
        }
    }
}

/// `scripts/services <arguments>`, with the ports of the environment.
pub(crate) async fn services(arguments: &[&str]) -> anyhow::Result<()> {
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

/// One POST while the broker blocks publishers (after the alarm has had a moment to spread):
/// its status and how long it took.
async fn answers_while_blocked(stack: &Stack) -> anyhow::Result<(StatusCode, Duration)> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = stack.apis.first();
    let token = client.create_application("blocked").await?;
    let started = tokio::time::Instant::now();
    let reply = client
        .post_empty(&format!("/applications/{token}/chats"))
        .await?;
    Ok((reply.status, started.elapsed()))
}

/// A Redis primary with a replica that follows it over a link that can be cut, and one address
/// in front of whichever is the primary: a failover loses what the replica had not received.
pub(crate) struct RedisFailover {
    primary: OwnRedis,
    replica: OwnRedis,
    replication: TcpProxy,
    proxy: TcpProxy,
}

impl RedisFailover {
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let primary = OwnRedis::start().await?;
        let replication = TcpProxy::start(primary.port).await?;
        let replica = OwnRedis::start_replica_of(replication.port).await?;
        let proxy = TcpProxy::start(primary.port).await?;
        Ok(Self {
            primary,
            replica,
            replication,
            proxy,
        })
    }

    /// The one address the api knows.
    pub(crate) fn url(&self) -> String {
        self.proxy.url()
    }

    /// Cuts the replication link, lets the primary acknowledge 2 s of writes the replica never
    /// sees, kills it and promotes the replica; then gives the new primary a replica of its
    /// own for the next failover.
    async fn fail_over(&mut self) -> anyhow::Result<()> {
        self.primary.wait_for_replicas().await?;
        self.replication.cut();
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.primary.kill().await?;
        self.replica.promote().await?;
        self.proxy.switch(self.replica.port);
        self.replication = TcpProxy::start(self.replica.port).await?;
        let next_replica = OwnRedis::start_replica_of(self.replication.port).await?;
        self.primary = std::mem::replace(&mut self.replica, next_replica);
        Ok(())
    }
}
