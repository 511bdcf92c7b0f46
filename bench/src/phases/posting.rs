//! The `POST` load of the phases with the workers stopped and running: messages posted into one
//! chat, then the phase's rows (rate, latencies and, for long phases, flatness) and its CPU.

use serde_json::json;

use crate::Bench;
use crate::api::{self, Api};
use crate::load::{self, Load, Outcome};
use crate::report::Measured;

/// What the workers do while messages are posted.
#[derive(Clone, Copy)]
pub enum Workers {
    /// Held with SIGSTOP: the api accepts a backlog.
    Stopped,
    Running,
}

impl Workers {
    /// How the phase's rows name it.
    fn name(self) -> &'static str {
        match self {
            Self::Stopped => "workers stopped",
            Self::Running => "workers running",
        }
    }
}

/// The window of the flatness check: the accept rate of the first and of the last this many.
const FLATNESS_WINDOW: usize = 100_000;

impl Bench {
    /// Posts up to `BENCH_MESSAGES` messages into `chat` for as long as the phase may take, and
    /// reports the phase.
    pub async fn post_phase(
        &mut self,
        token: &str,
        chat: u64,
        workers: Workers,
    ) -> anyhow::Result<Outcome> {
        let max_duration = match workers {
            Workers::Stopped => self.settings.stopped_phase(),
            Workers::Running => self.settings.max_phase(),
        };
        let workers = workers.name();
        let load = Load {
            clients: self.settings.connections,
            max_operations: self.settings.messages,
            max_duration,
            per_second: None,
        };
        let what = format!(
            "{workers}, posting {} messages with {} connections (at most {max_duration:?})",
            load.max_operations, load.clients
        );
        let (posted, measured) = self
            .measure(&what, post_messages(&self.api, token, chat, load))
            .await?;
        self.report_post(workers, &posted, &measured);
        Ok(posted)
    }

    /// The rows of one `POST` phase: rate, latencies and, for long phases, flatness.
    fn report_post(&mut self, workers: &str, posted: &Outcome, measured: &Measured) {
        let rate = posted.rate();
        eprintln!(
            "bench: {} posted at {rate:.0} req/s, p50 / p99 {}",
            posted.completed(),
            posted.latencies.p50_p99()
        );
        let ratios = self.general_ratios(rate);
        self.report.row(
            format!(
                "POST message, {workers}, {} connections ({} messages)",
                self.settings.connections,
                posted.completed()
            ),
            format!("{rate:.0} req/s"),
            ratios,
        );
        self.report.row(
            format!("POST message, {workers}: p50 / p99"),
            posted.latencies.p50_p99(),
            "",
        );
        match posted.first_and_last_rates(FLATNESS_WINDOW) {
            Some((first, last)) => self.report.row(
                format!("POST message, {workers}: first / last {FLATNESS_WINDOW} accepted"),
                format!("{first:.0} / {last:.0} req/s"),
                format!("{:.2} last / first", last / first),
            ),
            None => self.report.note(format!(
                "POST message, {workers}: {} messages, fewer than {} for the flatness check \
                 (first / last {FLATNESS_WINDOW}; BENCH_MESSAGES=1000000)",
                posted.completed(),
                2 * FLATNESS_WINDOW
            )),
        }
        self.report.cpu(&format!("POST, {workers}"), measured);
    }
}

/// `POST` message into the chat, one body per sequence number.
pub async fn post_messages(
    api: &Api,
    token: &str,
    chat: u64,
    load: Load,
) -> anyhow::Result<Outcome> {
    post_messages_into(api, token, &[chat], load).await
}

/// `POST` message, one body per sequence number, the n-th into the n-th chat of `chats` in turn.
pub async fn post_messages_into(
    api: &Api,
    token: &str,
    chats: &[u64],
    load: Load,
) -> anyhow::Result<Outcome> {
    let urls: Vec<String> = chats
        .iter()
        .map(|chat| api.url(&format!("/applications/{token}/chats/{chat}/messages")))
        .collect();
    let api = api.clone();
    load::run(load, move |sequence| {
        let api = api.clone();
        let url = urls[(sequence % urls.len() as u64) as usize].clone();
        async move {
            api.post(&url, Some(json!({"body": api::body(sequence)})))
                .await
                .map(drop)
        }
    })
    .await
}
