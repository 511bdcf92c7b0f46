//! End-to-end tests against real MariaDB, Redis, RabbitMQ and Elasticsearch (`scripts/test`).

mod contract;
mod kubernetes;
mod observability;
mod pipeline;
mod search;
mod tracing;
