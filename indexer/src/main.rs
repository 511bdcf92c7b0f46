//! `indexer`: consumes message events and bulk-indexes them into Elasticsearch
//! (`indexer --help`; the consumer itself is [`chatcore::pipeline`]).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatcore::pipeline::worker_main(chatcore::events::Consumer::Index).await
}
