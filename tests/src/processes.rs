//! The processes of a test: the api and workers it started, the workspace binaries, and what a
//! test reads of a process.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Client;

/// A memory figure of a process from `/proc/<pid>/status` (`VmRSS`: resident now, `VmHWM`: its
/// peak), in bytes.
pub fn memory_of(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kilobytes = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kilobytes * 1024)
}

/// A port that was free a moment ago (for a process that must know its port before it starts).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn binary_path(binary: &str) -> anyhow::Result<PathBuf> {
    // The test executable lives in target/<profile>/deps; the binaries one level up.
    let executable = std::env::current_exe()?;
    let profile_dir = executable
        .parent()
        .and_then(|deps| deps.parent())
        .context("locating the target directory")?;
    let path = profile_dir.join(binary);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first (`cargo build --bins`, which scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

pub struct ApiHandle {
    pub base_url: String,
    /// The internal port: `/metrics`, `/livez`, `/readyz`.
    pub internal_url: String,
    pub client: Client,
    pub(crate) shutdown: CancellationToken,
    pub(crate) task: JoinHandle<anyhow::Result<()>>,
}

impl ApiHandle {
    /// Where the api answers, without the `/api/v1` of the API's routes.
    pub fn origin(&self) -> &str {
        self.base_url
            .strip_suffix("/api/v1")
            .expect("the base URL ends in /api/v1")
    }

    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.internal_url)
    }

    /// Sends the shutdown signal (SIGTERM's) without waiting for the api to stop.
    pub fn signal_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

pub struct WorkerHandles {
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl WorkerHandles {
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await??;
        }
        Ok(())
    }
}

/// What [`TestEnv::running_chat`](crate::TestEnv::running_chat) starts and creates: the api, the
/// workers, an application's token and the number of its chat. A test that stops the api or the
/// workers in its middle takes them out of it.
pub struct RunningChat {
    pub api: ApiHandle,
    pub workers: WorkerHandles,
    pub token: String,
    pub chat: u64,
}

impl RunningChat {
    /// Stops the workers, then the api; the first error ends it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.workers.stop().await?;
        self.api.stop().await
    }
}

/// Sends SIGKILL and reaps the child.
pub async fn kill_hard(child: &mut Child) -> anyhow::Result<()> {
    child.kill().await?;
    Ok(())
}
