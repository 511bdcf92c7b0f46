//! RabbitMQ as a three-node cluster (`scripts/services up --ha`): the stack's `AMQP_URL` names every
//! node, its queues are quorum queues with a member on each node, and node 1 is killed (kill -9),
//! then brought back. Node 1 is the one that matters most: the first of `AMQP_URL`, so every
//! connection of the stack is on it, and the queues were declared there, so it leads them.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use system_tests::eventually;

use super::{Fault, Stack, scenario, services};

/// The node killed; the management API is asked on another one.
const KILLED_NODE: u16 = 1;
const ASKED_NODE: u16 = 2;
/// How long the load runs on the two surviving nodes before the killed one comes back.
const NODE_DOWN_FOR: Duration = Duration::from_secs(15);
/// A node's boot and the queues' members catching up, on a loaded machine.
const REJOIN: Duration = Duration::from_secs(120);
/// Reconnecting to a surviving node (refused at once by the dead one) and consuming again.
const RECONNECT: Duration = Duration::from_secs(60);

/// The cluster of `scripts/services up --ha`, from the same variable (`AMQP_HA_BASE_PORT`): node N
/// serves AMQP on base+N-1 and its management API on base+10+N-1.
pub(super) struct RabbitCluster {
    base_port: u16,
    http: reqwest::Client,
}

impl RabbitCluster {
    fn from_env() -> anyhow::Result<Self> {
        let base_port = match std::env::var("AMQP_HA_BASE_PORT") {
            Ok(port) if !port.is_empty() => port.parse().context("AMQP_HA_BASE_PORT")?,
            _ => 5700,
        };
        Ok(Self {
            base_port,
            http: reqwest::Client::new(),
        })
    }

    /// `AMQP_URL` naming the three nodes, node 1 first.
    fn amqp_url(&self) -> String {
        (0..3)
            .map(|node| format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.base_port + node))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A GET of the management API of `ASKED_NODE`.
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!(
            "http://127.0.0.1:{}/api/{path}",
            self.base_port + 10 + ASKED_NODE - 1
        );
        Ok(self
            .http
            .get(url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The members and the online members of a quorum queue.
    async fn members(&self, queue: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
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
        Ok((names("members"), names("online")))
    }

    /// Every durable queue of the stack has a member on each of the three nodes, all online.
    async fn all_members_online(&self, queues: &[String]) -> anyhow::Result<bool> {
        for queue in queues {
            let (members, online) = self.members(queue).await?;
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
}

fn node_name(node: u16) -> String {
    format!("chat-ha-{node}@localhost")
}

/// The settings of a stack on the cluster.
fn on_the_cluster(cluster: &RabbitCluster) -> [(&'static str, String); 2] {
    [
        ("AMQP_URL", cluster.amqp_url()),
        ("CHAT_AMQP_QUEUE_TYPE", "quorum".to_owned()),
    ]
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

/// The fault: node 1 killed under load, `NODE_DOWN_FOR` on two nodes, node 1 back and every
/// queue's member on it caught up.
pub(super) async fn kill_a_node_and_bring_it_back(
    cluster: &RabbitCluster,
    stack: &Stack,
) -> anyhow::Result<()> {
    let queues = durable_queues(stack);
    for queue in &queues {
        let (members, _) = cluster.members(queue).await?;
        anyhow::ensure!(
            members.len() == 3,
            "{queue} is replicated on {members:?}, not on the three nodes"
        );
    }
    println!(
        "fault rabbitmq node killed: {} quorum queues with 3 members each",
        queues.len()
    );
    services("kill", &format!("rabbitmq-ha-{KILLED_NODE}")).await?;
    tokio::time::sleep(NODE_DOWN_FOR).await;
    services("start", &format!("rabbitmq-ha-{KILLED_NODE}")).await?;
    eventually(
        "every queue has its three members online again",
        REJOIN,
        || cluster.all_members_online(&queues),
    )
    .await
}

#[tokio::test]
async fn rabbitmq_node_killed_under_load() -> anyhow::Result<()> {
    let cluster = RabbitCluster::from_env()?;
    let settings = on_the_cluster(&cluster);
    let overrides: Vec<(&str, &str)> = settings
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let fault = Fault::RabbitMqNodeKill9(&cluster);
    scenario("rabbitmq node kill -9 (cluster)", &overrides, fault).await
}

/// Without any request: after the kill, the workers consume again and the api is ready again,
/// each connected to a surviving node, by themselves.
#[tokio::test]
async fn rabbitmq_node_killed_while_idle() -> anyhow::Result<()> {
    let cluster = RabbitCluster::from_env()?;
    let settings = on_the_cluster(&cluster);
    let overrides: Vec<(&str, &str)> = settings
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let stack = Stack::start(&overrides).await?;
    let topology = stack.env.config().topology;
    // The connections' names: the api's publisher and each worker's queue.
    let connections = [
        format!("{} publisher", topology.exchange),
        topology.ingest_queue.clone(),
        topology.index_queue.clone(),
    ];
    let killed = node_name(KILLED_NODE);
    let on_surviving_nodes = || async {
        for name in &connections {
            let nodes = cluster.nodes_of_connections(name).await?;
            if nodes.is_empty() || nodes.contains(&killed) {
                return Ok(false);
            }
        }
        anyhow::Ok(true)
    };
    anyhow::ensure!(
        !on_surviving_nodes().await?,
        "the stack should start on node 1, the first of AMQP_URL"
    );
    services("kill", &format!("rabbitmq-ha-{KILLED_NODE}")).await?;
    let killed_at = tokio::time::Instant::now();
    eventually(
        "the api and the workers reconnect to a surviving node",
        RECONNECT,
        on_surviving_nodes,
    )
    .await?;
    stack.wait_until_ready().await?;
    println!(
        "fault rabbitmq node killed while idle: the api ready and the workers consuming on the surviving nodes {:?} after the kill",
        killed_at.elapsed()
    );
    services("start", &format!("rabbitmq-ha-{KILLED_NODE}")).await?;
    let queues = durable_queues(&stack);
    eventually(
        "every queue has its three members online again",
        REJOIN,
        || cluster.all_members_online(&queues),
    )
    .await
    // Dropping the stack kills its processes.
}
