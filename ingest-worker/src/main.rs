//! `ingest-worker` (or `ingest-worker run`): consumes accepted chats and messages and batch-writes them to MySQL.
//! `ingest-worker replay-dead-letters` moves its dead-lettered events back into its queue.

use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = chatcore::telemetry::init("ingest-worker");
    let config = Config::from_env()?;
    let queue = config.topology.ingest_queue.clone();
    chatcore::consumer::worker_command(config, queue, ingest_worker::run).await
}
