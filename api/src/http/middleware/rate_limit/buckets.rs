//! The token buckets of the rate limits: per client address and per application, each limiter
//! bounded in keys.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use chatcore::config::{RateLimit, RateLimits};
use chatcore::metrics::{LimiterLabels, Metrics};
use governor::clock::{Clock as _, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::http::error::ApiError;

/// How often the buckets of clients that went quiet are dropped.
const FORGET_QUIET_CLIENTS_EVERY: Duration = Duration::from_secs(60);
/// Buckets a limiter keeps at most (about 200 bytes each): past it the quietest are evicted.
pub const MAX_KEYS: usize = 50_000;

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One client's bucket and when it was last used (milliseconds since the limiter started).
struct Bucket {
    limiter: DirectLimiter,
    last_used_ms: AtomicU64,
}

/// One limit: a token bucket per key, at most [`MAX_KEYS`] of them.
struct Limiter<K: Hash + Eq + Clone> {
    buckets: quick_cache::sync::Cache<K, Arc<Bucket>>,
    quota: Quota,
    limit: RateLimit,
    started: Instant,
    size: Gauge,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(limit: RateLimit, size: Gauge) -> Option<Self> {
        let per_second = NonZeroU32::new(limit.per_second)?;
        let burst = NonZeroU32::new(limit.burst).unwrap_or(per_second);
        Some(Self {
            buckets: quick_cache::sync::Cache::new(MAX_KEYS),
            quota: Quota::per_second(per_second).allow_burst(burst),
            limit: RateLimit {
                per_second: per_second.get(),
                burst: burst.get(),
            },
            started: Instant::now(),
            size,
        })
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn check(&self, key: &K) -> Verdict {
        let bucket = self
            .buckets
            .get_or_insert_with(key, || {
                Ok::<_, std::convert::Infallible>(Arc::new(Bucket {
                    limiter: RateLimiter::direct(self.quota)
                        .with_middleware::<StateInformationMiddleware>(),
                    last_used_ms: AtomicU64::new(0),
                }))
            })
            .unwrap_or_else(|never| match never {});
        bucket
            .last_used_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
        match bucket.limiter.check() {
            Ok(snapshot) => Verdict::Allowed(self.remaining(&snapshot)),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Verdict::Limited {
                    limit: self.limit,
                    retry_after: wait,
                }
            }
        }
    }

    fn remaining(&self, snapshot: &StateSnapshot) -> Remaining {
        let remaining = snapshot.remaining_burst_capacity();
        // The bucket is full again after the spent requests are replenished.
        let spent = self.limit.burst.saturating_sub(remaining);
        Remaining {
            limit: self.limit,
            remaining,
            reset: Duration::from_secs_f64(f64::from(spent) / f64::from(self.limit.per_second)),
        }
    }

    /// Drops the buckets unused for longer than a full refill takes (they would be full again, as
    /// a new one is), and sets the size metric (here, not per request: counting reads every shard).
    fn forget_quiet_clients(&self) {
        let refill =
            Duration::from_secs_f64(f64::from(self.limit.burst) / f64::from(self.limit.per_second));
        let quiet_before = self
            .elapsed_ms()
            .saturating_sub(u64::try_from(refill.as_millis()).unwrap_or(u64::MAX));
        self.buckets
            .retain(|_, bucket| bucket.last_used_ms.load(Ordering::Relaxed) >= quiet_before);
        self.size
            .set(i64::try_from(self.buckets.len()).unwrap_or(i64::MAX));
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Remaining {
    pub(super) limit: RateLimit,
    pub(super) remaining: u32,
    pub(super) reset: Duration,
}

pub(super) enum Verdict {
    Allowed(Remaining),
    Limited {
        limit: RateLimit,
        retry_after: Duration,
    },
}

impl Verdict {
    pub(super) fn allowed(self) -> Result<Remaining, ApiError> {
        match self {
            Self::Allowed(remaining) => Ok(remaining),
            Self::Limited { limit, retry_after } => Err(ApiError::RateLimited {
                limit: limit.burst,
                retry_after,
            }),
        }
    }
}

/// The limits of one api process.
pub struct RateLimiters {
    per_address: Option<Limiter<IpAddr>>,
    per_application: Option<Limiter<u64>>,
    trusted_proxy_hops: usize,
}

impl RateLimiters {
    pub fn new(limits: RateLimits, trusted_proxy_hops: usize, metrics: &Metrics) -> Self {
        let size = |limiter| {
            metrics
                .rate_limiter_keys
                .get_or_create(&LimiterLabels { limiter })
                .clone()
        };
        Self {
            per_address: Limiter::new(limits.per_address, size("address")),
            per_application: Limiter::new(limits.per_token, size("application")),
            trusted_proxy_hops,
        }
    }

    /// Drops the buckets of clients that went quiet, every minute until `shutdown`.
    pub fn forget_quiet_clients(self: &Arc<Self>, shutdown: &CancellationToken) {
        let limiters = Arc::clone(self);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(FORGET_QUIET_CLIENTS_EVERY);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => {
                        if let Some(limiter) = &limiters.per_address {
                            limiter.forget_quiet_clients();
                        }
                        if let Some(limiter) = &limiters.per_application {
                            limiter.forget_quiet_clients();
                        }
                    }
                }
            }
        });
    }

    /// The client's address: the peer, or the entry `trusted_proxy_hops` from the right of
    /// `X-Forwarded-For` (the one the outermost trusted proxy saw; entries left of it are
    /// written by the client and prove nothing).
    pub(super) fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.trusted_proxy_hops == 0 {
            return peer;
        }
        let forwarded: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        forwarded
            .len()
            .checked_sub(self.trusted_proxy_hops)
            .and_then(|index| forwarded.get(index))
            .and_then(|entry| entry.parse().ok())
            .unwrap_or(peer)
    }

    pub(super) fn check_address(&self, address: IpAddr) -> Result<Option<Remaining>, ApiError> {
        self.per_address
            .as_ref()
            .map(|limiter| limiter.check(&address_key(address)).allowed())
            .transpose()
    }

    pub(super) fn check_application(
        &self,
        application_id: u64,
    ) -> Result<Option<Remaining>, ApiError> {
        self.per_application
            .as_ref()
            .map(|limiter| limiter.check(&application_id).allowed())
            .transpose()
    }
}

/// The key of an address: an IPv4 address itself (an IPv4-mapped IPv6 one too), an IPv6 address
/// by its /64 (a host is given a whole /64 and may use any address in it).
pub fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn limiters(hops: usize) -> RateLimiters {
        limits(hops, 0)
    }

    fn limits(hops: usize, per_address: u32) -> RateLimiters {
        RateLimiters::new(
            RateLimits {
                per_token: RateLimit {
                    per_second: 1,
                    burst: 2,
                },
                per_address: RateLimit {
                    per_second: per_address,
                    burst: per_address,
                },
            },
            hops,
            &Metrics::new(),
        )
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64_and_a_limiter_stays_bounded() {
        let limiters = limits(0, 1);
        let host: IpAddr = "2001:db8:1:2::1".parse().expect("address");
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("address");
        let other_64: IpAddr = "2001:db8:1:3::1".parse().expect("address");
        limiters.check_address(host).expect("allowed");
        assert!(limiters.check_address(same_64).is_err(), "the same /64");
        limiters.check_address(other_64).expect("another /64");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("address");
        limiters.check_address(mapped).expect("allowed");
        assert!(
            limiters
                .check_address(IpAddr::from([192, 0, 2, 1]))
                .is_err()
        );

        let address = limiters.per_address.as_ref().expect("on");
        for n in 0..(MAX_KEYS as u32 * 2) {
            address.check(&IpAddr::from(n.to_be_bytes()));
        }
        assert!(
            address.buckets.len() <= MAX_KEYS + MAX_KEYS / 10,
            "{}",
            address.buckets.len()
        );
    }

    #[test]
    fn an_application_over_its_burst_is_limited_and_others_are_not() {
        let limiters = limiters(0);
        let first = limiters.check_application(1).expect("allowed");
        assert_eq!(first.map(|r| r.remaining), Some(1));
        limiters.check_application(1).expect("allowed");
        let Err(ApiError::RateLimited { limit, retry_after }) = limiters.check_application(1)
        else {
            panic!("the third request within a second is limited");
        };
        assert_eq!(limit, 2);
        assert!(retry_after <= Duration::from_secs(1));
        assert!(limiters.check_application(2).is_ok());
        let address = IpAddr::from([127, 0, 0, 1]);
        assert!(
            limiters.check_address(address).expect("allowed").is_none(),
            "no address limit is set"
        );
    }

    #[test]
    fn the_client_address_is_the_one_the_trusted_proxy_saw() {
        let peer = IpAddr::from([127, 0, 0, 9]);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        assert_eq!(limiters(0).client_address(peer, &headers), peer);
        assert_eq!(
            limiters(1).client_address(peer, &headers),
            IpAddr::from([2, 2, 2, 2])
        );
        assert_eq!(
            limiters(2).client_address(peer, &headers),
            IpAddr::from([1, 1, 1, 1])
        );
        assert_eq!(limiters(3).client_address(peer, &headers), peer);
    }
}
