//! `api` serves the HTTP API; `api migrate` applies schema migrations and exits.

use anyhow::Context as _;
use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chatcore::telemetry::init("api");
    let config = Config::from_env()?;
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {
            let listener = tokio::net::TcpListener::bind(config.api.listen_addr)
                .await
                .with_context(|| format!("binding {}", config.api.listen_addr))?;
            let shutdown = chatcore::shutdown::on_signal();
            api::serve(config, listener, shutdown).await
        }
        Some("migrate") => api::migrate(&config).await,
        Some(other) => anyhow::bail!("unknown command {other:?}; expected `serve` or `migrate`"),
    }
}
