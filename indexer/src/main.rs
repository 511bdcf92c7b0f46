//! `indexer` (or `indexer run`): consumes message events and bulk-indexes them into Elasticsearch.
//! `indexer replay-dead-letters` moves its dead-lettered events back into its queue.

use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = chatcore::telemetry::init("indexer");
    let config = Config::from_env()?;
    let queue = config.topology.index_queue.clone();
    match std::env::args().nth(1).as_deref() {
        None | Some("run") => {
            let shutdown = chatcore::shutdown::on_signal();
            indexer::run(config, shutdown).await
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
