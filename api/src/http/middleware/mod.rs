//! What runs around the handlers: the rate limits, the body read whole, the span and metrics.

pub mod body;
pub mod observe;
pub mod rate_limit;
