//! Failovers of the HA Redis of `scripts/services up --ha`, under the careful clients' load and
//! audited like every scenario: at each offset of the load the master the api uses is killed with
//! `kill -9`, and a replica takes over (elected by the sentinels, or by the cluster's other
//! masters). The promoted replica has a run id of its own, so the counters it holds count as
//! foreign and are reseeded above every durable reservation: no number twice. What the dead master
//! acknowledged and never replicated (idempotency records) is lost, as with any loss of Redis data:
//! the audit's bound on extra messages. Writes resume within the failover's own time plus
//! [`RESUME_BOUND`]; a probe (a chat of its own whose counter the killed master held) measures
//! both. The dead node is started again after each strike (`scripts/services start redis-ha`): it
//! rejoins as a replica, for the next strike.

use std::time::Duration;

use anyhow::Context as _;
use system_tests::{Services, eventually};
use tokio::time::Instant;

use crate::fault::services;
use crate::{Fault, SMALL_BLOCKS, Stack, scenario};

/// The longest the api may take, once the new master is in place, to accept writes again: it
/// reconnects at its next request (sentinels) or on its refresh of the slots (cluster).
const RESUME_BOUND: Duration = Duration::from_secs(10);
/// The longest a failover may take: the sentinels' down-after (1 s) or the cluster's node
/// timeout (2 s), an election, and the promotion, on a loaded machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
pub(crate) enum HaFailover {
    Sentinel,
    Cluster,
}

impl HaFailover {
    /// Kills the master, measures the failover and the writes' resumption, and brings the dead
    /// node back as a replica.
    pub(crate) async fn strike(self, stack: &Stack) -> anyhow::Result<()> {
        let client = stack.apis.first();
        let token = client.create_application("probe").await?;
        let chat = client.create_chat(&token).await?;
        client
            .create_message_carefully(&token, chat, "before", "probe-before")
            .await?;
        let application_id = stack.env.application_id(&token).await?;
        let counter = format!("{}:numbers:messages:{application_id}:{chat}", stack.env.id);

        let master = match self {
            Self::Sentinel => sentinel_master().await?,
            Self::Cluster => cluster_master_of(&counter).await?,
        };
        kill_9(master).await?;
        let killed = Instant::now();
        let counter = counter.as_str();
        eventually("a replica took over", FAILOVER_BOUND, move || async move {
            let now = match self {
                Self::Sentinel => sentinel_master().await,
                Self::Cluster => cluster_master_of(counter).await,
            };
            Ok(now.is_ok_and(|now| now != master))
        })
        .await?;
        let failover = killed.elapsed();
        let number = client
            .create_message_carefully(&token, chat, "after", "probe-after")
            .await?;
        let resumed = killed.elapsed();
        println!(
            "fault redis {} master kill -9: failover {failover:?}, writes resumed {resumed:?} after the kill (bound: failover + {RESUME_BOUND:?}), probe's next number {number}",
            self.name()
        );
        anyhow::ensure!(
            number > 1,
            "the probe's number after the failover repeats one"
        );
        anyhow::ensure!(
            resumed <= failover + RESUME_BOUND,
            "writes resumed {resumed:?} after the kill, the failover took {failover:?}"
        );
        services(&["start", "redis-ha"]).await
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sentinel => "sentinel",
            Self::Cluster => "cluster",
        }
    }
}

fn ha_base_port() -> u16 {
    Services::from_env().redis_ha_base_port
}

async fn node(port: u16) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// The port of the master the first sentinel that answers names.
async fn sentinel_master() -> anyhow::Result<u16> {
    let mut last = None;
    for sentinel in 0..3 {
        let asked = async {
            let (_host, port): (String, u16) = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg("chat-ha")
                .query_async(&mut node(ha_base_port() + 10 + sentinel).await?)
                .await?;
            anyhow::Ok(port)
        };
        match asked.await {
            Ok(port) => return Ok(port),
            Err(error) => last = Some(error),
        }
    }
    Err(last.context("no sentinel")?)
}

/// The port of the healthy master that serves `key`'s slot, as the first node that answers sees it.
async fn cluster_master_of(key: &str) -> anyhow::Result<u16> {
    for index in 0..6 {
        let Ok(mut connection) = node(ha_base_port() + 20 + index).await else {
            continue;
        };
        let Ok(slot) = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async::<u16>(&mut connection)
            .await
        else {
            continue;
        };
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut connection)
            .await?;
        // <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot ranges…>
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            if !flags.contains("master") || flags.contains("fail") {
                continue;
            }
            let serves = fields.iter().skip(8).any(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                first.parse::<u16>().is_ok_and(|first| first <= slot)
                    && last.parse::<u16>().is_ok_and(|last| slot <= last)
            });
            if serves {
                let port = address.split(['@', ':']).nth(1).context("a node's port")?;
                return Ok(port.parse()?);
            }
        }
        anyhow::bail!("no healthy master serves slot {slot}");
    }
    anyhow::bail!("no cluster node answers")
}

/// `kill -9` of the Redis on `port` (its pid from `INFO server`).
async fn kill_9(port: u16) -> anyhow::Result<()> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut node(port).await?)
        .await?;
    let pid = info
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .context("process_id")?
        .trim()
        .to_owned();
    let status = tokio::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -9 {pid}");
    Ok(())
}

#[tokio::test]
async fn redis_sentinel_master_killed() -> anyhow::Result<()> {
    let url = Services::from_env().redis_sentinel_url;
    let settings = [("REDIS_URL", url.as_str()), SMALL_BLOCKS];
    let fault = Fault::RedisHa(HaFailover::Sentinel);
    scenario("redis sentinel master kill -9", &settings, fault).await
}

#[tokio::test]
async fn redis_cluster_master_killed() -> anyhow::Result<()> {
    let url = Services::from_env().redis_cluster_url;
    let settings = [("REDIS_URL", url.as_str()), SMALL_BLOCKS];
    let fault = Fault::RedisHa(HaFailover::Cluster);
    scenario("redis cluster master kill -9", &settings, fault).await
}
