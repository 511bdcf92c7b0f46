//! Shared core of the chat platform: domain types, event schema, configuration, the adapters of
//! the backing services and the consumers of accepted writes, used by the api and the workers.
//!
//! Each backing service is one trait with two adapters, the real service and the embedded one,
//! in a folder of its own: [`store`] (MySQL, SQLite), [`state`] (Redis, in-process), [`queue`]
//! (RabbitMQ, SQLite) and [`search`] (Elasticsearch, SQLite FTS5). [`adapters`] is the one place
//! that picks and builds them from the [`Config`]; [`pipeline`] runs the consumers over the traits.
//! See ARCHITECTURE.md for the picture and the rules.

pub mod adapters;
pub mod changes;
mod chunks;
pub mod config;
pub mod domain;
pub mod events;
pub mod feed;
pub mod health;
pub mod metrics;
pub mod numbering;
pub mod pipeline;
pub mod queue;
pub mod retry;
pub mod search;
pub mod shutdown;
mod sql_errors;
pub mod sqlite;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod webhooks;

pub use config::Config;
