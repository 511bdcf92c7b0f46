//! Rate limits per client address and per application token (token buckets, per replica).
//!
//! An answer over a limit is `429` with `Retry-After`; every answer of a limited request carries
//! `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` of the tighter of its limits
//! (draft-ietf-httpapi-ratelimit-headers).

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use chatcore::config::{RateLimit, RateLimits};
use governor::clock::{Clock as _, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::error::ApiError;

/// How often the buckets of clients that went quiet are dropped, so the maps stay bounded.
const FORGET_QUIET_CLIENTS_EVERY: Duration = Duration::from_secs(60);

type KeyedLimiter<K> =
    RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// One limit: a token bucket per key.
struct Limiter<K: Hash + Eq + Clone> {
    buckets: KeyedLimiter<K>,
    limit: RateLimit,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(limit: RateLimit) -> Option<Self> {
        let per_second = NonZeroU32::new(limit.per_second)?;
        let burst = NonZeroU32::new(limit.burst).unwrap_or(per_second);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Some(Self {
            buckets: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            limit: RateLimit {
                per_second: per_second.get(),
                burst: burst.get(),
            },
        })
    }

    fn check(&self, key: &K) -> Verdict {
        match self.buckets.check_key(key) {
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

    fn forget_quiet_clients(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

#[derive(Debug, Clone, Copy)]
struct Remaining {
    limit: RateLimit,
    remaining: u32,
    reset: Duration,
}

enum Verdict {
    Allowed(Remaining),
    Limited {
        limit: RateLimit,
        retry_after: Duration,
    },
}

/// The limits of one api process.
pub struct RateLimiters {
    per_address: Option<Limiter<IpAddr>>,
    per_token: Option<Limiter<String>>,
    trusted_proxy_hops: usize,
}

impl RateLimiters {
    pub fn new(limits: RateLimits, trusted_proxy_hops: usize) -> Self {
        Self {
            per_address: Limiter::new(limits.per_address),
            per_token: Limiter::new(limits.per_token),
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
                        if let Some(limiter) = &limiters.per_token {
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
    fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
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

    fn check(&self, address: IpAddr, token: Option<&str>) -> Result<Option<Remaining>, ApiError> {
        let verdicts = [
            self.per_address
                .as_ref()
                .map(|limiter| limiter.check(&address)),
            self.per_token
                .as_ref()
                .zip(token)
                .map(|(limiter, token)| limiter.check(&token.to_owned())),
        ];
        let mut tightest: Option<Remaining> = None;
        for verdict in verdicts.into_iter().flatten() {
            match verdict {
                Verdict::Limited { limit, retry_after } => {
                    return Err(ApiError::RateLimited {
                        limit: limit.burst,
                        retry_after,
                    });
                }
                Verdict::Allowed(remaining) => {
                    if tightest.is_none_or(|tight| remaining.remaining < tight.remaining) {
                        tightest = Some(remaining);
                    }
                }
            }
        }
        Ok(tightest)
    }
}

/// The application token a path names (`/api/v1/applications/{token}/...`).
fn application_token(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/api/v1/applications/")?;
    let token = rest.split('/').next()?;
    (!token.is_empty()).then_some(token)
}

/// Middleware: counts the request against its address and token; 429 over either limit.
pub async fn limit_rate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limiters = &state.rate_limiters;
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |info| info.0.ip());
    let address = limiters.client_address(peer, request.headers());
    let token = application_token(request.uri().path());
    match limiters.check(address, token) {
        Err(limited) => limited.into_response(),
        Ok(None) => next.run(request).await,
        Ok(Some(remaining)) => {
            let mut response = next.run(request).await;
            set_headers(
                response.headers_mut(),
                remaining.limit.burst,
                remaining.remaining,
                remaining.reset,
            );
            response
        }
    }
}

/// Whole seconds, rounded up (a client waiting the rounded-down figure would be refused again).
pub fn seconds_rounded_up(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`.
pub fn set_headers(headers: &mut HeaderMap, limit: u32, remaining: u32, reset: Duration) {
    for (name, value) in [
        ("ratelimit-limit", u64::from(limit)),
        ("ratelimit-remaining", u64::from(remaining)),
        ("ratelimit-reset", seconds_rounded_up(reset)),
    ] {
        headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiters(hops: usize) -> RateLimiters {
        RateLimiters::new(
            RateLimits {
                per_token: RateLimit {
                    per_second: 1,
                    burst: 2,
                },
                per_address: RateLimit {
                    per_second: 0,
                    burst: 0,
                },
            },
            hops,
        )
    }

    #[test]
    fn the_token_is_read_from_the_path() {
        assert_eq!(
            application_token("/api/v1/applications/abc/chats/1"),
            Some("abc")
        );
        assert_eq!(application_token("/api/v1/applications/abc"), Some("abc"));
        assert_eq!(application_token("/api/v1/applications"), None);
        assert_eq!(application_token("/livez"), None);
    }

    #[test]
    fn a_token_over_its_burst_is_limited_and_others_are_not() {
        let limiters = limiters(0);
        let address = IpAddr::from([127, 0, 0, 1]);
        let first = limiters.check(address, Some("a")).expect("allowed");
        assert_eq!(first.map(|r| r.remaining), Some(1));
        limiters.check(address, Some("a")).expect("allowed");
        let Err(ApiError::RateLimited { limit, retry_after }) = limiters.check(address, Some("a"))
        else {
            panic!("the third request within a second is limited");
        };
        assert_eq!(limit, 2);
        assert!(retry_after <= Duration::from_secs(1));
        assert!(limiters.check(address, Some("b")).is_ok());
        assert!(
            limiters.check(address, None).expect("allowed").is_none(),
            "no limit applies"
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
