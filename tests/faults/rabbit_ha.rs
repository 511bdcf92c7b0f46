//! RabbitMQ as a three-node cluster (`scripts/services up --ha`): the stack's `AMQP_URL` names every
//! node, its queues are quorum queues with a member on each node. Under the careful clients' load,
//! audited like every scenario, the node leading the ingest queue is killed (`kill -9`) at each
//! offset of the load, the load runs on two nodes for [`NODE_DOWN_FOR`], then the node comes back and its
//! queues' members catch up. At the first strike that is node 1: the first of `AMQP_URL`, where
//! every connection of the stack is and the queues were declared (it leads them). A probe message posted right after the kill measures how
//! long the pipeline takes to write again (accepted by the api, stored by the ingest-worker), with
//! [`RESUME_BOUND`] asserted. A second scenario kills node 1 with no traffic at all: the api and the
//! workers reconnect to a surviving node by themselves.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use system_tests::{Services, eventually};
use tokio::time::Instant;

use crate::fault::services;
use crate::{Fault, Stack, Topology, scenario};

/// How long the load runs on the two surviving nodes before the killed one comes back: the
/// clients are on them within a second (a probe measures it), so a few seconds of load there
/// show it holds; the rejoin that follows is waited for in full.
const NODE_DOWN_FOR: Duration = Duration::from_secs(5);
/// A node's boot and the queues' members catching up, on a loaded machine.
const REJOIN: Duration = Duration::from_secs(120);
/// Reconnecting to a surviving node (refused at once by the dead one), a quorum queue electing a
/// new leader, and consuming again.
const RESUME_BOUND: Duration = Duration::from_secs(60);

/// The cluster of `scripts/services up --ha`: node N (1-3) serves AMQP on base+N-1 and its
/// management API on base+10+N-1.
pub(crate) struct RabbitCluster {
    base_port: u16,
    /// `AMQP_URL` naming the three nodes, node 1 first.
    amqp_url: String,
    http: reqwest::Client,
}

impl RabbitCluster {
    fn from_env() -> Self {
        let base_port = Services::from_env().amqp_ha_base_port;
        Self {
            base_port,
            amqp_url: (0..3)
                .map(|node| format!("amqp://guest:guest@127.0.0.1:{}/%2f", base_port + node))
                .collect::<Vec<_>>()
                .join(","),
            http: reqwest::Client::new(),
        }
    }

    /// The settings of a stack on the cluster: its nodes, and quorum queues.
    fn settings(&self) -> [(&str, &str); 2] {
        [
            ("AMQP_URL", self.amqp_url.as_str()),
            ("CHAT_AMQP_QUEUE_TYPE", "quorum"),
        ]
    }

    /// A GET of the management API of the first node that answers.
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let mut last = None;
        for node in 1..=3 {
            let url = format!(
                "http://127.0.0.1:{}/api/{path}",
                self.base_port + 10 + node - 1
            );
            let asked = async {
                anyhow::Ok(
                    self.http
                        .get(url)
                        .basic_auth("guest", Some("guest"))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?,
                )
            };
            match asked.await {
                Ok(value) => return Ok(value),
                Err(error) => last = Some(error),
            }
        }
        Err(last.context("no node")?)
    }

    /// A quorum queue's members, its online members and its leader.
    async fn members(&self, queue: &str) -> anyhow::Result<(Vec<String>, Vec<String>, String)> {
        let info = self.get(&format!("queues/%2f/{queue}")).await?;
        anyhow::ensure!(
            info["type"] == "quorum",
            "{queue} is not a quorum queue: {info}"
        );
        let names = |field: &str| -> Vec<String> {
            info[field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|name| name.as_str().map(str::to_owned))
                .collect()
        };
        let leader = info["leader"].as_str().unwrap_or_default().to_owned();
        Ok((names("members"), names("online"), leader))
    }

    /// Every durable queue of the stack has a member on each of the three nodes, all online.
    async fn all_members_online(&self, queues: &[String]) -> anyhow::Result<bool> {
        for queue in queues {
            let (members, online, _) = self.members(queue).await?;
            if members.len() != 3 || online.len() != 3 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The nodes of the open AMQP connections named `name`.
    async fn nodes_of_connections(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let connections = self.get("connections").await?;
        Ok(connections
            .as_array()
            .into_iter()
            .flatten()
            .filter(|connection| connection["user_provided_name"] == name)
            .filter_map(|connection| connection["node"].as_str().map(str::to_owned))
            .collect())
    }

    /// Kills the node leading the ingest queue under load, measures how long until a message is
    /// accepted and stored again, and brings the node back after [`NODE_DOWN_FOR`] with every
    /// queue's member on it caught up.
    pub(crate) async fn kill_the_leader_and_bring_it_back(
        &self,
        stack: &Stack,
    ) -> anyhow::Result<()> {
        let queues = durable_queues(stack);
        for queue in &queues {
            let (members, _, _) = self.members(queue).await?;
            anyhow::ensure!(
                members.len() == 3,
                "{queue} is replicated on {members:?}, not on the three nodes"
            );
        }
        // The leader of the ingest queue (the management API of RabbitMQ 3.10 stops listing a
        // restarted node's connections: its statistics agent crashes, so the queue's leader it is).
        let (_, _, killed_node) = self
            .members(&stack.env.config().topology.ingest_queue)
            .await?;
        let node = node_number(&killed_node)?;
        let client = stack.apis.first();
        let token = client.create_application("probe").await?;
        let chat = client.create_chat(&token).await?;
        services(&["kill", &format!("rabbitmq-ha-{node}")]).await?;
        let killed = Instant::now();
        // The node comes back whatever the probe found, so that the next scenario has three.
        let resumed = probe(stack, &token, chat, killed).await;
        tokio::time::sleep(NODE_DOWN_FOR.saturating_sub(killed.elapsed())).await;
        services(&["start", &format!("rabbitmq-ha-{node}")]).await?;
        let rejoined = eventually(
            "every queue has its three members online again",
            REJOIN,
            || self.all_members_online(&queues),
        )
        .await;
        let (accepted, stored) = resumed?;
        println!(
            "fault rabbitmq node kill -9 (cluster): {killed_node} (the ingest queue's leader) \
             killed; a message accepted {accepted:?} and stored {stored:?} after the kill (bound: \
             {RESUME_BOUND:?})"
        );
        anyhow::ensure!(
            stored <= RESUME_BOUND,
            "writes resumed {stored:?} after the kill of {killed_node}"
        );
        rejoined
    }
}

/// Posts a message into the probe chat: how long after `killed` it was accepted, and stored.
async fn probe(
    stack: &Stack,
    token: &str,
    chat: u64,
    killed: Instant,
) -> anyhow::Result<(Duration, Duration)> {
    let number = stack
        .apis
        .first()
        .create_message_carefully(token, chat, "after", "probe-after")
        .await?;
    let accepted = killed.elapsed();
    eventually("the probe message is stored", RESUME_BOUND, || async {
        Ok(stack
            .env
            .stored_message_numbers(token, chat)
            .await?
            .contains(&number))
    })
    .await?;
    Ok((accepted, killed.elapsed()))
}

fn node_name(node: u16) -> String {
    format!("chat-ha-{node}@localhost")
}

/// The number N of node `chat-ha-N@localhost`.
fn node_number(name: &str) -> anyhow::Result<u16> {
    let number = name
        .strip_prefix("chat-ha-")
        .and_then(|rest| rest.strip_suffix("@localhost"))
        .with_context(|| format!("{name:?} is no node of the cluster"))?;
    Ok(number.parse()?)
}

/// The ingest and index queues and their dead-letter queues.
fn durable_queues(stack: &Stack) -> Vec<String> {
    let topology = stack.env.config().topology;
    [&topology.ingest_queue, &topology.index_queue]
        .into_iter()
        .flat_map(|queue| {
            [
                queue.clone(),
                chatcore::config::Topology::dead_letter_queue(queue),
            ]
        })
        .collect()
}

/// Under the full load, each strike kills the node leading the ingest queue and starts it again
/// 15 s later: a probe posted right after the kill is accepted and stored within the bound.
#[tokio::test]
async fn rabbitmq_node_killed_under_load() -> anyhow::Result<()> {
    let cluster = RabbitCluster::from_env();
    let fault = Fault::RabbitMqNodeKill9(&cluster);
    scenario(
        "rabbitmq node kill -9 (cluster)",
        &cluster.settings(),
        fault,
    )
    .await
}

/// Without any request: after the kill of node 1 (the first of `AMQP_URL`, where the stack
/// connects first), the workers consume again and the api is ready
/// again, each connected to a surviving node, by themselves.
#[tokio::test]
async fn rabbitmq_node_killed_while_idle() -> anyhow::Result<()> {
    const KILLED_NODE: u16 = 1;
    let cluster = RabbitCluster::from_env();
    let stack = Stack::start(&cluster.settings(), Topology::SINGLE).await?;
    let topology = stack.env.config().topology;
    // The connections' names: the api's publisher and each worker's queue.
    let connections = [
        format!("{} publisher", topology.exchange),
        topology.ingest_queue.clone(),
        topology.index_queue.clone(),
    ];
    let killed = node_name(KILLED_NODE);
    // Each connection's nodes, once listed by the management API.
    let nodes_of_each = || async {
        let mut each = Vec::new();
        for name in &connections {
            each.push(cluster.nodes_of_connections(name).await?);
        }
        anyhow::Ok(each)
    };
    services(&["kill", &format!("rabbitmq-ha-{KILLED_NODE}")]).await?;
    let killed_at = Instant::now();
    eventually(
        "the api and the workers reconnect to a surviving node",
        RESUME_BOUND,
        || async {
            Ok(nodes_of_each()
                .await?
                .iter()
                .all(|nodes| !nodes.is_empty() && !nodes.contains(&killed)))
        },
    )
    .await?;
    stack.wait_until_ready().await?;
    println!(
        "fault rabbitmq node killed while idle: the api ready and the workers consuming on the \
         surviving nodes {:?} after the kill",
        killed_at.elapsed()
    );
    services(&["start", &format!("rabbitmq-ha-{KILLED_NODE}")]).await?;
    let queues = durable_queues(&stack);
    eventually(
        "every queue has its three members online again",
        REJOIN,
        || cluster.all_members_online(&queues),
    )
    .await?;
    stack.stop().await
}
