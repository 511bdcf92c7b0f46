//! `indexer`: consumes message events and bulk-indexes them into Elasticsearch.

use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatcore::telemetry::init("indexer");
    let config = Config::from_env()?;
    let shutdown = chatcore::shutdown::on_signal();
    indexer::run(config, shutdown).await
}
