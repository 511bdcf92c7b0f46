//! The processes of a scenario (one or more replicas of each service), the webhook receiver, and
//! the round-robin client over the api replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use system_tests::webhook_receiver::WebhookReceiver;
use system_tests::{Client, Reply, StatusCode, TestEnv, eventually, free_port};
use tokio::process::Child;

/// How many replicas of each service a scenario runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Topology {
    pub(crate) apis: usize,
    pub(crate) ingest_workers: usize,
    pub(crate) indexers: usize,
}

impl Topology {
    /// One process of each service.
    pub(crate) const SINGLE: Self = Self {
        apis: 1,
        ingest_workers: 1,
        indexers: 1,
    };

    /// Three api replicas behind one load, two ingest-workers and two indexers on the same queues.
    pub(crate) const REPLICATED: Self = Self {
        apis: 3,
        ingest_workers: 2,
        indexers: 2,
    };
}

/// One running process of a service, on ports fixed for its whole life (a restart keeps them,
/// as a pod's address stays behind its Service).
pub(crate) struct Replica {
    pub(crate) binary: &'static str,
    process: Child,
    /// The public port (the api's only).
    pub(crate) http_port: Option<u16>,
    /// `/metrics`, `/livez`, `/readyz`.
    pub(crate) health_port: u16,
    /// Events this replica processed in its earlier lives (its counter starts at 0 again after a
    /// restart).
    processed_before_restarts: u64,
}

/// The api, ingest-worker, indexer and webhook-dispatcher of one scenario, as processes that can
/// be killed, and the receiver of the webhooks.
pub(crate) struct Stack {
    pub(crate) env: TestEnv,
    pub(crate) replicas: Vec<Replica>,
    pub(crate) receiver: WebhookReceiver,
    pub(crate) apis: Arc<Apis>,
}

impl Stack {
    pub(crate) async fn start(
        overrides: &[(&str, &str)],
        topology: Topology,
    ) -> anyhow::Result<Self> {
        // Short leases and time limits: a request the api died in blocks its key briefly.
        let mut settings = vec![
            ("CHAT_REQUEST_TIMEOUT_MS", "2000"),
            ("CHAT_IDEMPOTENCY_LEASE_SECONDS", "3"),
        ];
        settings.extend_from_slice(overrides);
        let env = TestEnv::with_settings(&settings).await?;
        let services = std::iter::repeat_n("api", topology.apis)
            .chain(std::iter::repeat_n(
                "ingest-worker",
                topology.ingest_workers,
            ))
            .chain(std::iter::repeat_n("indexer", topology.indexers))
            .chain(["webhook-dispatcher"]);
        let mut replicas = Vec::new();
        for binary in services {
            let http_port = (binary == "api").then(free_port).transpose()?;
            let health_port = free_port()?;
            replicas.push(Replica {
                binary,
                process: spawn(&env, binary, http_port, health_port)?,
                http_port,
                health_port,
                processed_before_restarts: 0,
            });
        }
        let apis = Arc::new(Apis::new(
            replicas.iter().filter_map(|replica| replica.http_port),
        ));
        let stack = Self {
            env,
            replicas,
            receiver: WebhookReceiver::start().await?,
            apis,
        };
        stack.wait_until_ready().await?;
        Ok(stack)
    }

    /// Waits until every api replica answers `/readyz` with 200.
    pub(crate) async fn wait_until_ready(&self) -> anyhow::Result<()> {
        for port in self.replicas.iter().filter_map(|replica| replica.http_port) {
            let readyz = format!("http://127.0.0.1:{port}/readyz");
            eventually("the api is ready", Duration::from_secs(60), || async {
                Ok(reqwest::get(&readyz)
                    .await
                    .is_ok_and(|reply| reply.status() == StatusCode::OK))
            })
            .await?;
        }
        Ok(())
    }

    /// `kill -9` of the `nth` replica of `binary` (counted from 0), restarted on the same ports
    /// half a second later.
    pub(crate) async fn kill_and_restart(
        &mut self,
        binary: &str,
        nth: usize,
    ) -> anyhow::Result<()> {
        let replica = self
            .replicas
            .iter_mut()
            .filter(|replica| replica.binary == binary)
            .nth(nth)
            .ok_or_else(|| anyhow::anyhow!("no replica {nth} of {binary}"))?;
        // What it did so far: its counter dies with it.
        replica.processed_before_restarts += events_processed(replica.health_port)
            .await
            .unwrap_or_default();
        replica.process.kill().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        replica.process = spawn(
            &self.env,
            replica.binary,
            replica.http_port,
            replica.health_port,
        )?;
        Ok(())
    }

    /// Events each replica of `binary` processed over all its lives, in replica order.
    pub(crate) async fn events_processed_by(&self, binary: &str) -> anyhow::Result<Vec<u64>> {
        let mut processed = Vec::new();
        for replica in self
            .replicas
            .iter()
            .filter(|replica| replica.binary == binary)
        {
            processed.push(
                replica.processed_before_restarts + events_processed(replica.health_port).await?,
            );
        }
        Ok(processed)
    }

    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        for replica in &mut self.replicas {
            replica.process.kill().await?;
        }
        Ok(())
    }
}

/// Starts `binary` with the scenario's settings on the given ports.
fn spawn(
    env: &TestEnv,
    binary: &'static str,
    http_port: Option<u16>,
    health_port: u16,
) -> anyhow::Result<Child> {
    let mut command = env.command(binary)?;
    command
        .env("CHAT_HEALTH_ADDR", format!("127.0.0.1:{health_port}"))
        .stdout(match std::env::var_os("FAULTS_LOG_DIR") {
            Some(dir) => std::fs::File::create(
                std::path::Path::new(&dir).join(format!("{binary}-{health_port}.log")),
            )?
            .into(),
            None => std::process::Stdio::null(),
        });
    if let Some(port) = http_port {
        command.env("CHAT_HTTP_ADDR", format!("127.0.0.1:{port}"));
    }
    Ok(command.spawn()?)
}

/// `chat_events_processed_total` of a process (summed over its queues; 0 before its first event).
async fn events_processed(health_port: u16) -> anyhow::Result<u64> {
    let metrics = reqwest::get(format!("http://127.0.0.1:{health_port}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(metrics
        .lines()
        .filter(|line| line.starts_with("chat_events_processed_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// How long a read of the audit is tried again on 5xx answers.
const READ_PATIENCE: Duration = Duration::from_secs(30);

/// The clients' view of the api replicas: each attempt goes to the next one (round robin, as a
/// Service's load balancing does), and each replica's answers are counted.
pub(crate) struct Apis {
    clients: Vec<Client>,
    next: AtomicUsize,
    answered: Vec<AtomicU64>,
}

impl Apis {
    fn new(ports: impl Iterator<Item = u16>) -> Self {
        let clients: Vec<Client> = ports
            .map(|port| Client::new(&format!("http://127.0.0.1:{port}/api/v1")))
            .collect();
        let answered = clients.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            clients,
            next: AtomicUsize::new(0),
            answered,
        }
    }

    /// A client of the first replica, for the setup of a scenario.
    pub(crate) fn first(&self) -> &Client {
        &self.clients[0]
    }

    /// Sends one attempt of a request to the next replica; `build` makes it on that replica's
    /// client.
    pub(crate) async fn send(
        &self,
        build: impl FnOnce(&Client) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<Reply> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let client = &self.clients[index];
        let reply = client.send_raw(build(client)).await?;
        self.answered[index].fetch_add(1, Ordering::Relaxed);
        Ok(reply)
    }

    /// A read (it changes nothing, so it may be sent again): tried on the next replica while
    /// the connection fails or the answer is a 5xx (a search past its time limit on a loaded
    /// machine says nothing of what is stored), for up to [`READ_PATIENCE`].
    pub(crate) async fn read(
        &self,
        build: impl Fn(&Client) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<Reply> {
        let deadline = tokio::time::Instant::now() + READ_PATIENCE;
        loop {
            let reply = self.send(&build).await;
            let again = reply
                .as_ref()
                .map_or(true, |reply| reply.status.is_server_error());
            if !again || tokio::time::Instant::now() >= deadline {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// HTTP answers each replica gave, in replica order.
    pub(crate) fn answered(&self) -> Vec<u64> {
        self.answered
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }
}
