//! Helpers of the end-to-end tests: an isolated environment per test, on either stack: the real
//! services (own MySQL database, RabbitMQ names, Redis key prefix and Elasticsearch index) or the
//! embedded single process (own data directory); the api and workers in-process or as child
//! processes, and an HTTP client.
//!
//! The services must be running (`scripts/services up`, done by `scripts/test`); a test that cannot
//! reach one fails. [`both_stacks!`] runs one test body on each stack.
//!
//! By role: [`env`] (the environment and what it starts), [`inspect`] (what a test reads of the
//! services), [`processes`], [`client`] (HTTP), [`sse`] (live streams) and [`tools`].

use std::future::Future;
use std::time::Duration;

use anyhow::bail;

pub use reqwest::StatusCode;

pub mod client;
pub mod env;
mod inspect;
pub mod kube;
pub mod own_redis;
pub mod processes;
pub mod sse;
pub mod tools;
pub mod webhook_receiver;

pub use client::{Client, Reply, search, search_hits};
pub use env::{OlderDatabase, Services, Stack, TEST_ADMIN_TOKEN, TestEnv};
pub use processes::{ApiHandle, RunningChat, WorkerHandles, free_port, kill_hard, memory_of};
pub use sse::{EventStream, Next, ServerSentEvent};
pub use tools::{Scratch, repo_root, run_to_end, tool_path};

/// Polls `check` until it returns true, failing after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting until {what} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
