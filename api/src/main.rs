//! `api` (or `api serve`) serves the HTTP API; `api migrate` applies schema migrations and exits
//! (retrying for `CHAT_MIGRATE_WAIT_SECONDS`, default 0, while a dependency is unreachable);
//! `api openapi` prints the OpenAPI document; `api replay-dead-letters` moves the dead letters of
//! the embedded queue back into their queues.

use anyhow::Context as _;
use chatcore::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("openapi") {
        // Only the document on stdout, no log lines.
        println!("{}", api::openapi_json());
        return Ok(());
    }
    let _telemetry = chatcore::telemetry::init("api");
    let config = Config::from_env()?;
    match std::env::args().nth(1).as_deref() {
        None | Some("serve") => {
            let listener = tokio::net::TcpListener::bind(config.api.listen_addr)
                .await
                .with_context(|| format!("binding {}", config.api.listen_addr))?;
            let shutdown = chatcore::shutdown::on_signal();
            api::serve(config, listener, shutdown).await
        }
        Some("migrate") => {
            let wait_seconds: u64 = std::env::var("CHAT_MIGRATE_WAIT_SECONDS")
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            api::migrate_when_ready(&config, std::time::Duration::from_secs(wait_seconds)).await
        }
        Some("replay-dead-letters") => {
            for (queue, moved) in api::replay_dead_letters(&config).await? {
                println!("moved {moved} dead letters back to {queue}");
            }
            Ok(())
        }
        Some(other) => anyhow::bail!(
            "unknown command {other:?}; expected `serve`, `migrate`, `openapi` or `replay-dead-letters`"
        ),
    }
}
