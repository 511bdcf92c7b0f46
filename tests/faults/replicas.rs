//! Many replicas behind one load: three apis (the clients go round robin over them), two
//! ingest-workers and two indexers on the same queues, and the webhook-dispatcher; one replica of
//! each is killed in turn.

use crate::{Fault, Topology, run};

#[tokio::test]
async fn kill_9_of_one_replica_of_each_in_turn() -> anyhow::Result<()> {
    let name = "replicas: kill -9 each in turn";
    let stack = run(name, &[], Topology::REPLICATED, Fault::Kill9InTurn).await?;
    // Each replica did its share: every api answered, every worker processed events.
    let answered = stack.apis.answered();
    let ingested = stack.events_processed_by("ingest-worker").await?;
    let indexed = stack.events_processed_by("indexer").await?;
    println!(
        "fault {name}: answers per api {answered:?}, events per ingest-worker {ingested:?}, \
         per indexer {indexed:?}"
    );
    anyhow::ensure!(
        [answered, ingested, indexed]
            .iter()
            .all(|counts| counts.iter().all(|count| *count > 0)),
        "{name}: a replica did no work"
    );
    stack.stop().await
}
