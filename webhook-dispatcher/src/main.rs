//! `webhook-dispatcher`: delivers every change of an application to its webhook endpoints
//! (`webhook-dispatcher --help`; the dispatcher itself is [`chatcore::webhooks`]).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatcore::webhooks::main_entry().await
}
