//! The floor of a `POST`'s own work ([`raw::post_floor`]) as the raw limit of `POST` with the
//! workers stopped: the same load (connections, messages, bodies, URLs) against the minimal
//! server, then the api's rate and p99 read against it, both enforced.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::api::Api;
use crate::load::{self, Load, Outcome};
use crate::phases::posting::post_messages;
use crate::phases::raw_limits::RawLimit;
use crate::raw;
use crate::report::{Measured, RAW_POST_FLOOR, ratio};
use crate::{Bench, Target};

/// How long the floor's process may take to connect and listen.
const STARTUP: Duration = Duration::from_secs(30);
/// The least share of the floor's rate `POST` with the workers stopped must reach (issue #32).
pub const FLOOR_RATIO_GOAL: f64 = 0.8;
/// The most `POST` with the workers stopped may take at its 99th percentile (issue #32).
pub const STOPPED_P99_GOAL: Duration = Duration::from_millis(25);
/// How the ratios name the floor.
const FLOOR: &str = "POST floor";

/// The floor's server, a process of its own (`bench post-floor`): killed when dropped, and it
/// exits by itself when the bench's end of its stdin closes (a bench killed meanwhile).
pub struct PostFloorProcess {
    child: Child,
    pid: u32,
    /// Its base URL, shaped like the api's (it reads no path).
    url: String,
}

impl PostFloorProcess {
    pub async fn start() -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("post-floor")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the post floor's process")?;
        let pid = child
            .id()
            .context("the post floor's process exited at once")?;
        let stdout = child.stdout.take().context("the post floor's stdout")?;
        let line = tokio::time::timeout(STARTUP, BufReader::new(stdout).lines().next_line())
            .await
            .context("the post floor did not listen in time")??
            .context("the post floor exited before listening")?;
        let address = line
            .strip_prefix("listening ")
            .with_context(|| format!("the post floor printed {line:?}"))?;
        Ok(Self {
            url: format!("http://{address}/api/v1"),
            child,
            pid,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for PostFloorProcess {
    fn drop(&mut self) {
        // kill_on_drop kills it; this reaps it when it can without blocking.
        let _ = self.child.try_wait();
    }
}

impl Bench {
    /// `POST`s against the floor, under the load of the phase with the workers stopped, into
    /// `chat`'s URL; its row and CPU column, and its rate as a raw limit of the accept path.
    pub async fn post_floor(&mut self, target: &Target, chat: u64) -> anyhow::Result<()> {
        let Some(floor) = &self.post_floor else {
            return Ok(());
        };
        let load = Load {
            clients: self.settings.connections,
            max_operations: self.settings.messages,
            max_duration: self.settings.stopped_phase(),
            per_second: None,
        };
        let floor_api = Api::new(&floor.url, load.clients)?;
        let what = format!(
            "post floor (HTTP, JSON, INCR, the api's confirmed envelope publishing), posting {} \
             messages with {} connections",
            load.max_operations, load.clients
        );
        let posted = self
            .measure(&what, post_messages(&floor_api, &target.token, chat, load))
            .await;
        // Its queues hold what it published: gone before the api's backlog fills its own.
        raw::post_floor::delete_topology(&self.config).await?;
        let (posted, measured) = posted?;
        self.report_floor(&posted, &measured, load.clients);
        Ok(())
    }

    fn report_floor(&mut self, posted: &Outcome, measured: &Measured, connections: usize) {
        let rate = posted.rate();
        eprintln!(
            "bench: post floor: {} at {rate:.0} req/s, p50 / p99 {}",
            posted.completed(),
            posted.latencies.p50_p99()
        );
        let label = format!(
            "raw: POST floor, a minimal hyper server: JSON body parsed, one Redis INCR, the event \
             published with chatcore's confirmed envelope publishing ({connections} connections, \
             {} messages; p50 / p99 {})",
            posted.completed(),
            posted.latencies.p50_p99()
        );
        self.report
            .figure(measured.figure(label, "req/s", RAW_POST_FLOOR), "1");
        self.raw_limits.push(RawLimit {
            short_name: FLOOR,
            rate,
        });
        self.floor_rate = Some(rate);
    }

    /// The goal rows of `POST` with the workers stopped against the floor: its rate as a share
    /// of the floor's, and its p99.
    pub fn post_against_floor(&mut self, posted: &Outcome) {
        let Some(floor_rate) = self.floor_rate else {
            return;
        };
        let share = posted.rate() / floor_rate;
        let reached = self.report.goal(
            format!("POST, workers stopped: ≥ {FLOOR_RATIO_GOAL} of the POST floor"),
            share >= FLOOR_RATIO_GOAL,
        );
        self.report.row(
            "POST message, workers stopped, against the floor of its own work",
            format!("{:.0} req/s", posted.rate()),
            format!(
                "{} (goal ≥ {FLOOR_RATIO_GOAL}): {reached}",
                ratio(posted.rate(), floor_rate, FLOOR)
            ),
        );
        let p99 = posted.latencies.percentile(0.99);
        let reached = self.report.goal(
            format!(
                "POST, workers stopped: p99 ≤ {}",
                load::ms(STOPPED_P99_GOAL)
            ),
            p99 <= STOPPED_P99_GOAL,
        );
        self.report.row(
            "POST message, workers stopped: p99",
            load::ms(p99),
            format!("goal ≤ {}: {reached}", load::ms(STOPPED_P99_GOAL)),
        );
    }
}
