//! `ingest-worker`: consumes accepted chats and messages and batch-writes them to MySQL
//! (`ingest-worker --help`; the consumer itself is [`chatcore::pipeline`]).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatcore::pipeline::worker_main(chatcore::events::Consumer::Ingest).await
}
