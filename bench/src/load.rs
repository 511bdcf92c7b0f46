//! The load of every timed phase: a number of concurrent clients, each a task of its own, issue
//! one operation after the other until a count or a deadline is reached, as fast as they can
//! (closed loop) or each operation at its time on a fixed pace (open loop, [`Load::paced`]). The
//! same runner drives the HTTP requests and the raw operations they are compared with, so both
//! see the same concurrency.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The bounds of one phase.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    /// Operations in all (u64::MAX: as many as fit in `max_duration`).
    pub max_operations: u64,
    pub max_duration: Duration,
    /// Operations started per second over all clients (open loop: the n-th starts at n / rate
    /// from the start, however long the earlier ones take); None: each client as fast as it can.
    pub per_second: Option<u64>,
}

impl Load {
    /// As many operations as `clients` complete in `duration`.
    pub fn timed(clients: usize, duration: Duration) -> Self {
        Self {
            clients,
            max_operations: u64::MAX,
            max_duration: duration,
            per_second: None,
        }
    }

    /// `per_second` operations a second for `duration`, started on schedule by `clients`.
    pub fn paced(clients: usize, per_second: u64, duration: Duration) -> Self {
        Self {
            clients,
            max_operations: per_second.saturating_mul(duration.as_secs().max(1)),
            max_duration: duration,
            per_second: Some(per_second.max(1)),
        }
    }

    /// When the operation `sequence` is due: now, or on the pace's schedule (even when the
    /// clients run late: the operations due before the deadline are all issued).
    fn due(&self, started: Instant, sequence: u64) -> Instant {
        self.per_second.map_or_else(Instant::now, |per_second| {
            started + Duration::from_secs_f64(sequence as f64 / per_second as f64)
        })
    }
}

/// What one phase did.
pub struct Outcome {
    pub elapsed: Duration,
    pub latencies: Latencies,
    /// When each operation completed, from the start of the phase, ascending.
    pub completions: Vec<Duration>,
}

impl Outcome {
    pub fn completed(&self) -> u64 {
        self.completions.len() as u64
    }

    pub fn rate(&self) -> f64 {
        self.completed() as f64 / self.elapsed.as_secs_f64()
    }

    /// The completion rates of the first and of the last `window` operations, when there were
    /// at least two windows of them.
    pub fn first_and_last_rates(&self, window: usize) -> Option<(f64, f64)> {
        let count = self.completions.len();
        if window == 0 || count < 2 * window {
            return None;
        }
        let first = self.completions[window - 1];
        let last = self.completions[count - 1] - self.completions[count - window - 1];
        Some((
            window as f64 / first.as_secs_f64(),
            window as f64 / last.as_secs_f64(),
        ))
    }
}

/// Latencies of one phase, sorted.
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(mut latencies: Vec<Duration>) -> Self {
        latencies.sort_unstable();
        Self(latencies)
    }

    pub fn percentile(&self, fraction: f64) -> Duration {
        let index = ((self.0.len() as f64 * fraction).ceil() as usize).saturating_sub(1);
        self.0.get(index).copied().unwrap_or_default()
    }

    /// "p50 / p99".
    pub fn p50_p99(&self) -> String {
        format!(
            "{} / {}",
            ms(self.percentile(0.50)),
            ms(self.percentile(0.99))
        )
    }
}

pub fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

/// Runs `operation(sequence)` from `load.clients` tasks until `load.max_operations` were issued or
/// `load.max_duration` passed; the sequence numbers 0, 1, 2... are handed out in order. The first
/// failure stops every client and is returned.
pub async fn run<F, Fut>(load: Load, operation: F) -> anyhow::Result<Outcome>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let operation = Arc::new(operation);
    let issued = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + load.max_duration;
    let clients: Vec<_> = (0..load.clients)
        .map(|_| {
            let (operation, issued, failed) = (
                Arc::clone(&operation),
                Arc::clone(&issued),
                Arc::clone(&failed),
            );
            tokio::spawn(async move {
                let mut timings = Vec::new();
                loop {
                    let sequence = issued.fetch_add(1, Ordering::Relaxed);
                    let due = load.due(started, sequence);
                    let stop = sequence >= load.max_operations
                        || failed.load(Ordering::Relaxed)
                        || due >= deadline;
                    if stop {
                        return Ok(timings);
                    }
                    tokio::time::sleep_until(due.into()).await;
                    let sent = Instant::now();
                    if let Err(error) = operation(sequence).await {
                        failed.store(true, Ordering::Relaxed);
                        return Err(error);
                    }
                    let done = Instant::now();
                    timings.push((done - sent, done - started));
                }
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut completions = Vec::new();
    let mut first_failure = None;
    for client in clients {
        match client.await? {
            Ok(timings) => {
                for (latency, completion) in timings {
                    latencies.push(latency);
                    completions.push(completion);
                }
            }
            Err(error) => {
                first_failure.get_or_insert(error);
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some(error) = first_failure {
        return Err(error);
    }
    completions.sort_unstable();
    Ok(Outcome {
        elapsed,
        latencies: Latencies::new(latencies),
        completions,
    })
}

/// Spreads sequence numbers over `1..=count` (a multiplicative hash), so that concurrent reads
/// hit different rows.
pub fn scatter(sequence: u64, count: u64) -> u64 {
    1 + sequence.wrapping_mul(2_654_435_761) % count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(completions: Vec<Duration>) -> Outcome {
        Outcome {
            elapsed: completions.last().copied().unwrap_or_default(),
            latencies: Latencies::new(Vec::new()),
            completions,
        }
    }

    #[test]
    fn first_and_last_rates_need_two_windows() {
        // 10 per second for 4 s, then 5 per second for 4 s.
        let completions: Vec<Duration> = (1..=40)
            .map(|i| Duration::from_millis(i * 100))
            .chain((1..=20).map(|i| Duration::from_millis(4000 + i * 200)))
            .collect();
        let (first, last) = outcome(completions.clone())
            .first_and_last_rates(20)
            .expect("three windows");
        assert!((first - 10.0).abs() < 1e-9, "{first}");
        assert!((last - 5.0).abs() < 1e-9, "{last}");
        assert!(outcome(completions).first_and_last_rates(31).is_none());
    }

    #[test]
    fn scatter_stays_within_the_stored_numbers() {
        let numbers: Vec<u64> = (0..1000).map(|sequence| scatter(sequence, 37)).collect();
        assert!(numbers.iter().all(|number| (1..=37).contains(number)));
        assert!(numbers.contains(&1) && numbers.contains(&37));
        assert_eq!(scatter(5, 0), 1);
    }

    #[tokio::test]
    async fn run_stops_at_the_count_and_at_the_first_failure() {
        let counted = run(
            Load {
                clients: 4,
                max_operations: 10,
                max_duration: Duration::from_secs(10),
                per_second: None,
            },
            |_| async { Ok(()) },
        )
        .await
        .expect("no failure");
        assert_eq!(counted.completed(), 10);
        let failed = run(
            Load::timed(4, Duration::from_secs(10)),
            |sequence| async move {
                anyhow::ensure!(sequence < 3, "failed at {sequence}");
                Ok(())
            },
        )
        .await;
        assert!(failed.is_err());
    }

    #[tokio::test]
    async fn a_paced_run_starts_each_operation_on_schedule() {
        let paced = run(Load::paced(4, 100, Duration::from_millis(200)), |_| async {
            Ok(())
        })
        .await
        .expect("no failure");
        // 100 a second for 200 ms (counted in whole seconds, at least one): operations 0..=19
        // start before the deadline, the last at 190 ms.
        assert_eq!(paced.completed(), 20);
        assert!(
            paced.elapsed >= Duration::from_millis(190),
            "{:?}",
            paced.elapsed
        );
    }
}
