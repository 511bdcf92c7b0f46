//! The one retry loop of the platform: capped exponential backoff with jitter, cut short by the
//! shutdown signal. Callers decide per failure whether another attempt is worth it (a dependency
//! that is down: yes; an event that can never be written: only a few times) and log it there.

use std::future::Future;
use std::time::Duration;

use rand::Rng as _;
use tokio_util::sync::CancellationToken;

/// Whether a failure may pass by itself (a dependency restarting, a connection dropped, a busy
/// file) or can never succeed (bad data, a missing row). Every adapter error answers it.
/// A call to a backing service that did not answer within `CHAT_DEPENDENCY_TIMEOUT_MS`; always
/// transient (the service may answer again in a moment).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{dependency} {operation} did not answer within {limit:?}")]
pub struct DependencyTimedOut {
    pub dependency: &'static str,
    pub operation: &'static str,
    pub limit: Duration,
}

pub trait Transient {
    fn is_transient(&self) -> bool;
}

/// Delays between attempts: `base`, doubling up to `max`, each with up to a quarter of jitter so
/// that replicas that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The delay before attempt `attempt + 1` (attempt counts from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doubled = self
            .base
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(31)));
        let capped = doubled.min(self.max);
        let jitter = rand::rng().random_range(0.0..=0.25);
        capped.mul_f64(1.0 - jitter)
    }
}

/// How a retried operation ended without success.
#[derive(Debug)]
pub enum Stopped<E> {
    /// `should_retry` said no: the last failure.
    GaveUp(E),
    /// Shutdown arrived while waiting for the next attempt.
    Interrupted,
}

/// Runs `operation` until it succeeds, `should_retry(&failure, attempt)` answers false, or
/// `shutdown` is cancelled while waiting. An attempt that has started is never cut short.
pub async fn retry<T, E, Fut>(
    backoff: Backoff,
    shutdown: &CancellationToken,
    mut operation: impl FnMut() -> Fut,
    mut should_retry: impl FnMut(&E, u32, Duration) -> bool,
) -> Result<T, Stopped<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let failure = match operation().await {
            Ok(value) => return Ok(value),
            Err(failure) => failure,
        };
        let delay = backoff.delay(attempt);
        if !should_retry(&failure, attempt, delay) {
            return Err(Stopped::GaveUp(failure));
        }
        if sleep_or_cancel(delay, shutdown).await {
            return Err(Stopped::Interrupted);
        }
    }
}

/// Sleeps; returns true when shutdown cut the sleep short.
pub async fn sleep_or_cancel(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const BACKOFF: Backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(4));

    #[test]
    fn delays_double_up_to_the_cap_with_bounded_jitter() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        for (attempt, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let delay = backoff.delay(attempt).as_millis() as u64;
            assert!(
                (full * 3 / 4..=full).contains(&delay),
                "attempt {attempt}: {delay} ms"
            );
        }
    }

    #[tokio::test]
    async fn retries_until_success_and_counts_attempts() {
        let calls = Cell::new(0);
        let mut seen = Vec::new();
        let outcome: Result<u32, Stopped<&str>> = retry(
            BACKOFF,
            &CancellationToken::new(),
            || {
                calls.set(calls.get() + 1);
                let call = calls.get();
                async move { if call < 3 { Err("down") } else { Ok(call) } }
            },
            |_, attempt, _| {
                seen.push(attempt);
                true
            },
        )
        .await;
        assert!(matches!(outcome, Ok(3)));
        assert_eq!(seen, vec![1, 2]);
    }

    #[tokio::test]
    async fn gives_up_when_told_and_stops_on_shutdown() {
        let gave_up: Result<(), Stopped<&str>> = retry(
            BACKOFF,
            &CancellationToken::new(),
            || async { Err("bad") },
            |_, attempt, _| attempt < 2,
        )
        .await;
        assert!(matches!(gave_up, Err(Stopped::GaveUp("bad"))));

        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let interrupted: Result<(), Stopped<&str>> =
            retry(BACKOFF, &shutdown, || async { Err("down") }, |_, _, _| true).await;
        assert!(matches!(interrupted, Err(Stopped::Interrupted)));
    }
}
