//! The bench's settings: each a flag or its `BENCH_*` environment variable (what `scripts/bench`
//! sets), with its default; a value that does not parse stops the bench with an error naming the
//! variable (`bench --help` lists them). The stack's own configuration (service URLs, `CHAT_*`) is
//! read by [`chatcore::Config`].

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Under RabbitMQ's 60 s heartbeat: a stopped worker must not lose its connection.
pub const MAX_STOPPED_SECONDS: u64 = 45;

/// The stack under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stack {
    /// The real services (`scripts/stack up`).
    Services,
    /// The embedded process `scripts/bench` starts.
    Embedded,
}

/// What the bench binary runs besides the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Serves the floor of a `POST`'s own work (the bench starts it as a process of its own):
    /// prints `listening <address>`, then serves until killed.
    PostFloor,
}

/// The phases a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Phases {
    /// Every phase.
    All,
    /// Search at scale alone: a chat of 1,000,000 messages and an application of 1,000 chats,
    /// their documents written straight into the index (the real services only).
    Search,
}

/// Bounded load benchmark of a running chat platform stack against the raw limits of its services.
// The value names are those of the environment variables: an error names the variable.
#[derive(Debug, Parser)]
pub struct Settings {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The stack under test.
    #[arg(
        long,
        env = "BENCH_STACK",
        value_name = "BENCH_STACK",
        value_enum,
        default_value_t = Stack::Services
    )]
    pub stack: Stack,
    /// The phases to run.
    #[arg(
        long,
        env = "BENCH_PHASES",
        value_name = "BENCH_PHASES",
        value_enum,
        default_value_t = Phases::All
    )]
    pub phases: Phases,
    /// The api's base URL.
    #[arg(
        long,
        env = "BENCH_API_URL",
        value_name = "BENCH_API_URL",
        default_value = "http://127.0.0.1:3000/api/v1"
    )]
    pub api_url: String,
    /// Concurrent connections of the `POST` and read phases.
    #[arg(
        long,
        env = "BENCH_CONNECTIONS",
        value_name = "BENCH_CONNECTIONS",
        default_value_t = 64
    )]
    pub connections: usize,
    /// Messages posted in each `POST` phase, at most.
    #[arg(
        long,
        env = "BENCH_MESSAGES",
        value_name = "BENCH_MESSAGES",
        default_value_t = 100_000
    )]
    pub messages: u64,
    /// Seconds each phase may take, at most.
    #[arg(
        long,
        env = "BENCH_MAX_SECONDS",
        value_name = "BENCH_MAX_SECONDS",
        default_value_t = 180
    )]
    pub max_seconds: u64,
    /// Seconds the phase with the workers stopped may take, at most [default: BENCH_MAX_SECONDS,
    /// at most 45].
    #[arg(
        long,
        env = "BENCH_STOPPED_SECONDS",
        value_name = "BENCH_STOPPED_SECONDS"
    )]
    pub stopped_seconds: Option<u64>,
    /// Seconds of each read phase.
    #[arg(
        long,
        env = "BENCH_READ_SECONDS",
        value_name = "BENCH_READ_SECONDS",
        default_value_t = 5
    )]
    pub read_seconds: u64,
    /// Queries of each search phase with concurrent clients (a quarter of them with one client).
    #[arg(
        long,
        env = "BENCH_SEARCHES",
        value_name = "BENCH_SEARCHES",
        default_value_t = 2000
    )]
    pub searches: u64,
    /// The pages of a chat of 1,000,000 messages: 0 skips them.
    #[arg(
        long,
        env = "BENCH_DEEP_PAGES",
        value_name = "BENCH_DEEP_PAGES",
        default_value_t = 1
    )]
    pub deep_pages: i32,
    /// Seconds of each paced `POST` load of the webhook phase (latency, stream fanout).
    #[arg(
        long,
        env = "BENCH_WEBHOOK_SECONDS",
        value_name = "BENCH_WEBHOOK_SECONDS",
        default_value_t = 10
    )]
    pub webhook_seconds: u64,
    /// Messages per second of the paced `POST` loads of the webhook phase.
    #[arg(
        long,
        env = "BENCH_WEBHOOK_RATE",
        value_name = "BENCH_WEBHOOK_RATE",
        default_value_t = 500
    )]
    pub webhook_rate: u64,
    /// Messages posted, then delivered again from the start of the feed (replay), in the
    /// webhook phase's backlog.
    #[arg(
        long,
        env = "BENCH_WEBHOOK_BACKLOG",
        value_name = "BENCH_WEBHOOK_BACKLOG",
        default_value_t = 20_000
    )]
    pub webhook_backlog: u64,
    /// Messages of each leg of the hot-chat phase (all clients on one chat, then spread over as
    /// many chats as connections; workers running): 0 skips it.
    #[arg(
        long,
        env = "BENCH_HOT_CHAT_MESSAGES",
        value_name = "BENCH_HOT_CHAT_MESSAGES",
        default_value_t = 20_000
    )]
    pub hot_chat_messages: u64,
    /// Worker threads of the load generator (at least 1).
    #[arg(
        long,
        env = "BENCH_THREADS",
        value_name = "BENCH_THREADS",
        default_value_t = 1
    )]
    pub threads: usize,
    /// The stack's processes whose CPU and memory are reported, `name=pid,...`.
    #[arg(
        long,
        env = "BENCH_PROCESSES",
        value_name = "BENCH_PROCESSES",
        default_value = ""
    )]
    pub processes: String,
    /// Whether a goal the bench enforces (a ratio to a raw limit, a latency) that the run missed
    /// makes it exit non-zero once the report is printed; `false` only prints (a dev run on a
    /// noisy machine).
    #[arg(
        long,
        env = "BENCH_ENFORCE",
        value_name = "BENCH_ENFORCE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub enforce: bool,
    /// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`).
    #[arg(
        long,
        env = "BENCH_CLK_TCK",
        value_name = "BENCH_CLK_TCK",
        default_value_t = 100
    )]
    pub clk_tck: u64,
}

impl Settings {
    pub fn embedded(&self) -> bool {
        self.stack == Stack::Embedded
    }

    pub fn max_phase(&self) -> Duration {
        Duration::from_secs(self.max_seconds)
    }

    pub fn stopped_phase(&self) -> Duration {
        Duration::from_secs(
            self.stopped_seconds
                .unwrap_or(self.max_seconds.min(MAX_STOPPED_SECONDS)),
        )
    }

    pub fn read_phase(&self) -> Duration {
        Duration::from_secs(self.read_seconds)
    }

    pub fn webhook_phase(&self) -> Duration {
        Duration::from_secs(self.webhook_seconds)
    }

    pub fn deep_pages(&self) -> bool {
        self.deep_pages != 0
    }

    /// Worker threads of the load generator's runtime.
    pub fn threads(&self) -> usize {
        self.threads.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_does_not_parse_is_an_error_naming_its_variable() {
        let error =
            Settings::try_parse_from(["bench", "--connections", "lots"]).expect_err("not a number");
        assert!(error.to_string().contains("BENCH_CONNECTIONS"), "{error}");
        let error =
            Settings::try_parse_from(["bench", "--stack", "cluster"]).expect_err("no such stack");
        assert!(error.to_string().contains("BENCH_STACK"), "{error}");
    }

    #[test]
    fn the_stopped_phase_is_bounded_by_the_heartbeat_unless_set() {
        let settings = |args: &[&str]| {
            Settings::try_parse_from(["bench"].iter().chain(args)).expect("valid flags")
        };
        let stopped = |args: &[&str]| settings(args).stopped_phase().as_secs();
        assert_eq!(stopped(&["--max-seconds", "180"]), MAX_STOPPED_SECONDS);
        assert_eq!(stopped(&["--max-seconds", "20"]), 20);
        assert_eq!(
            stopped(&["--max-seconds", "20", "--stopped-seconds", "60"]),
            60
        );
    }

    #[test]
    fn goals_are_enforced_unless_switched_off() {
        let settings = |args: &[&str]| {
            Settings::try_parse_from(["bench"].iter().chain(args)).expect("valid flags")
        };
        assert!(settings(&[]).enforce);
        assert!(!settings(&["--enforce", "false"]).enforce);
        assert_eq!(settings(&["post-floor"]).command, Some(Command::PostFloor));
    }
}
