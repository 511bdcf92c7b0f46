//! End-to-end tests against real MariaDB, Redis, RabbitMQ and Elasticsearch, and against the
//! embedded single process (`scripts/test`).

mod advisories;
mod application_deletion;
mod architecture;
mod changes;
mod chart_platform;
mod client_tokens;
mod configuration;
mod contract;
mod deletion;
mod demo_page;
mod embedded;
mod faults;
mod generated_client;
mod kubernetes;
mod kubernetes_live;
mod live;
mod mysql_pool;
mod observability;
mod pipeline;
mod redis_ha;
mod search;
mod senders;
mod tls;
mod tokens;
mod tool_cache;
mod tour;
mod tracing;
mod trust;
mod webhooks;
