//! Shared core of the chat platform: domain types, event schema, configuration, and the adapters
//! used by the api and the workers. Each adapter is one trait with two implementations: the real
//! service (MySQL, Redis, RabbitMQ, Elasticsearch) and the embedded one (SQLite, in-process
//! counters, a SQLite queue, SQLite FTS5); [`adapters`] picks them from the configuration.

pub mod adapters;
pub mod broker;
pub mod config;
pub mod consumer;
pub mod domain;
pub mod events;
pub mod health;
pub mod local_queue;
pub mod metrics;
pub mod numbering;
pub mod queue;
pub mod search;
pub mod shutdown;
pub mod sqlite;
pub mod state;
pub mod store;
pub mod telemetry;

pub use config::Config;

/// Connects to Redis with a multiplexed, self-reconnecting connection. The response timeout is
/// generous (the client default of 500 ms fails requests on a briefly saturated machine); a dead
/// Redis is still noticed at once through the dropped connection.
pub async fn connect_redis(
    url: &config::SecretUrl,
) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url.expose())?;
    let settings = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(5)))
        .set_connection_timeout(Some(std::time::Duration::from_secs(5)));
    redis::aio::ConnectionManager::new_with_config(client, settings).await
}
