//! `ingest-worker`: consumes accepted chats and messages and batch-writes them to MySQL.

use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatcore::telemetry::init("ingest-worker");
    let config = Config::from_env()?;
    let shutdown = chatcore::shutdown::on_signal();
    ingest_worker::run(config, shutdown).await
}
