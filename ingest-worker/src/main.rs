//! `ingest-worker` (or `ingest-worker run`): consumes accepted chats and messages and batch-writes them to MySQL.
//! `ingest-worker replay-dead-letters` moves its dead-lettered events back into its queue.

use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = chatcore::telemetry::init("ingest-worker");
    let config = Config::from_env()?;
    let queue = config.topology.ingest_queue.clone();
    match std::env::args().nth(1).as_deref() {
        None | Some("run") => {
            let shutdown = chatcore::shutdown::on_signal();
            ingest_worker::run(config, shutdown).await
        }
        Some("replay-dead-letters") => {
            let moved = chatcore::consumer::replay_dead_letters(&config, &queue).await?;
            println!("moved {moved} dead letters back to {queue}");
            Ok(())
        }
        Some(other) => {
            anyhow::bail!("unknown command {other:?}; expected `run` or `replay-dead-letters`")
        }
    }
}
