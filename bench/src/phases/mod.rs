//! The phases of the bench, in the order they run, each an `impl Bench` of its own:
//! - [`raw_limits`]: the raw limits of the accept path (Redis INCR and a confirmed RabbitMQ
//!   publish, or durable SQLite commits embedded), every rate of the accept path is read against;
//! - [`post_floor`]: the floor of a `POST`'s own work (a minimal server of the bench's), the raw
//!   limit of `POST` with the workers stopped, measured first in that phase;
//! - [`stopped_workers`]: `POST` with the workers stopped, the drain of that backlog by each
//!   downstream leg alone, and each leg against its own raw limit (services only);
//! - [`running_workers`]: `POST` with the workers running, and end to end into the storage and the
//!   index;
//! - [`capacity`]: the limits of the capacity plan: the numbering script on one chat's counter,
//!   one queue's confirmed publish of the api's envelopes, one hot chat against many (services);
//! - [`webhooks`]: the latency of webhook deliveries, the delivery of a backlog against the
//!   ingest leg, and the api's CPU per message with live streams open on other chats;
//! - [`reads`]: `GET` one message and a page of messages, against their raw SELECTs;
//! - [`search`]: search latency on one chat, one client then several, and at scale;
//! - [`deep_pages`]: the first and the last page of a chat of 1,000,000 messages.
//!
//! [`posting`] is the `POST` load of the two phases with the workers stopped and running.

pub mod capacity;
pub mod deep_pages;
pub mod post_floor;
pub mod posting;
pub mod raw_limits;
pub mod reads;
pub mod running_workers;
pub mod search;
pub mod stopped_workers;
pub mod webhooks;
