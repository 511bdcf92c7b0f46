//! Shared core of the chat platform: domain types, event schema, configuration, and the adapters
//! to MySQL, Redis, RabbitMQ and Elasticsearch used by the api and the workers.

pub mod broker;
pub mod config;
pub mod consumer;
pub mod domain;
pub mod events;
pub mod numbering;
pub mod search;
pub mod shutdown;
pub mod store;
pub mod telemetry;

pub use config::Config;

/// Connects to Redis with a multiplexed, self-reconnecting connection.
pub async fn connect_redis(
    url: &config::SecretUrl,
) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url.expose())?;
    redis::aio::ConnectionManager::new(client).await
}
