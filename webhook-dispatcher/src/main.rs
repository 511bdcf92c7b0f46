//! `webhook-dispatcher`: delivers every change of an application to its webhook endpoints
//! (`webhook-dispatcher --help`; the dispatcher itself is the library, [`webhook_dispatcher`]).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    webhook_dispatcher::main_entry().await
}
