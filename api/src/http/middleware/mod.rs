//! What runs around the handlers: CORS, the rate limits, the body read whole, the span and
//! metrics.

pub mod body;
pub mod cors;
pub mod observe;
pub mod rate_limit;
