//! `indexer` (or `indexer run`): consumes message events and bulk-indexes them into Elasticsearch.
//! `indexer replay-dead-letters` moves its dead-lettered events back into its queue.

use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = chatcore::telemetry::init("indexer");
    let config = Config::from_env()?;
    let queue = config.topology.index_queue.clone();
    chatcore::consumer::worker_command(config, queue, indexer::run).await
}
