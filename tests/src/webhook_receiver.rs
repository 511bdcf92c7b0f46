//! The tests' webhook receiver (`tests/webhook_receiver/receiver.py`, a process of its own on
//! 127.0.0.1): it records every delivery and verifies its signature with the Standard Webhooks
//! reference library (PyPI `standardwebhooks`, from `scripts/tools standardwebhooks`), so the
//! tests check the signatures with the specification's own code rather than ours.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::{repo_root, tool_path};

/// How an endpoint of the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 at once.
    Ok,
    /// 500 at once.
    Fail,
    /// Never answers (the dispatcher gives up after its timeout).
    Hang,
    /// 200 after this delay.
    Slow(Duration),
}

impl Mode {
    fn wire(self) -> String {
        match self {
            Self::Ok => "ok".into(),
            Self::Fail => "fail".into(),
            Self::Hang => "hang".into(),
            Self::Slow(delay) => format!("slow:{}", delay.as_millis()),
        }
    }
}

/// One delivery as the receiver recorded it (in arrival order).
#[derive(Debug, Clone, Deserialize)]
pub struct Delivery {
    pub name: String,
    pub webhook_id: String,
    pub timestamp: String,
    /// The `webhook-signature` header as sent.
    pub signature: String,
    /// Whether the reference library verified it with one of the endpoint's secrets.
    pub verified: bool,
    pub verify_error: Option<String>,
    pub body: Value,
    /// The status the receiver answered; None while it hangs.
    pub answered: Option<u16>,
    pub received_at: f64,
}

pub struct WebhookReceiver {
    port: u16,
    process: Child,
    http: reqwest::Client,
    /// Each endpoint's configuration, applied again after a restart.
    endpoints: std::sync::Mutex<BTreeMap<String, Value>>,
    /// What the processes before a restart recorded.
    earlier: Vec<Delivery>,
}

impl WebhookReceiver {
    /// Starts a receiver on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        let (process, port) = spawn(0).await?;
        Ok(Self {
            port,
            process,
            http: reqwest::Client::new(),
            endpoints: std::sync::Mutex::default(),
            earlier: Vec::new(),
        })
    }

    /// The URL of the endpoint `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/hooks/{name}", self.port)
    }

    /// Sets the secrets `name` verifies with and how it answers.
    pub async fn configure(&self, name: &str, secrets: &[&str], mode: Mode) -> anyhow::Result<()> {
        let configuration = json!({"secrets": secrets, "mode": mode.wire()});
        self.endpoints
            .lock()
            .expect("not poisoned")
            .insert(name.to_owned(), configuration.clone());
        self.apply(name, &configuration).await
    }

    async fn apply(&self, name: &str, configuration: &Value) -> anyhow::Result<()> {
        let reply = self
            .http
            .put(self.control(&format!("endpoints/{name}")))
            .json(configuration)
            .send()
            .await?;
        anyhow::ensure!(reply.status().is_success(), "configuring {name}: {reply:?}");
        Ok(())
    }

    /// The deliveries received, of one endpoint or of all, in arrival order (across restarts).
    pub async fn deliveries(&self, name: Option<&str>) -> anyhow::Result<Vec<Delivery>> {
        let mut deliveries: Vec<Delivery> = self
            .earlier
            .iter()
            .filter(|delivery| name.is_none_or(|name| delivery.name == name))
            .cloned()
            .collect();
        deliveries.extend(self.recorded(name).await?);
        Ok(deliveries)
    }

    /// What the running process recorded.
    async fn recorded(&self, name: Option<&str>) -> anyhow::Result<Vec<Delivery>> {
        let mut request = self.http.get(self.control("deliveries"));
        if let Some(name) = name {
            request = request.query(&[("name", name)]);
        }
        let recorded: Recorded = request.send().await?.error_for_status()?.json().await?;
        Ok(recorded.deliveries)
    }

    /// Kills the receiver (SIGKILL), keeping what it recorded: connections to its port are
    /// refused until [`Self::restart`].
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        // Closed first, in one step with the read: a delivery answered 2xx is in what is kept.
        let closed: Recorded = self
            .http
            .post(self.control("close"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        self.earlier.extend(closed.deliveries);
        self.process.kill().await?;
        Ok(())
    }

    /// Starts the receiver again on the same port, with the endpoints' configurations.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.process.try_wait()?.is_none() {
            self.stop().await?;
        }
        let (process, _) = spawn(self.port).await?;
        self.process = process;
        let endpoints = self.endpoints.lock().expect("not poisoned").clone();
        for (name, configuration) in &endpoints {
            self.apply(name, configuration).await?;
        }
        Ok(())
    }

    fn control(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/_control/{path}", self.port)
    }
}

/// What the receiver answers with its records.
#[derive(Deserialize)]
struct Recorded {
    deliveries: Vec<Delivery>,
}

/// Spawns the receiver on `port` (0: any) and reads the port it bound.
async fn spawn(port: u16) -> anyhow::Result<(Child, u16)> {
    let python = tool_path("STANDARDWEBHOOKS_PYTHON", "standardwebhooks")?;
    let mut process = Command::new(python)
        .arg(repo_root().join("tests/webhook_receiver/receiver.py"))
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the webhook receiver")?;
    let stdout = process.stdout.take().context("the receiver's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the webhook receiver did not start within 30 s")??
        .context("the webhook receiver ended before it listened")?;
    let bound = first
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .with_context(|| format!("not a port: {first}"))?;
    Ok((process, bound))
}
