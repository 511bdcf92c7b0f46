//! The api binary: serves the HTTP API (and, with no service URL, the whole embedded system).

use chatcore::Config;
use chatcore::store::ReindexCursor;
use clap::{Parser, Subcommand};

// glibc's malloc (its arenas and consolidation) took a fifth of the api's CPU samples under load,
// mimalloc 6% (perf, same load). Not for the workers: their allocation costs little, and
// mimalloc's caches doubled their resident memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "api", version, about = "HTTP API of the chat platform")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API on CHAT_HTTP_ADDR until SIGTERM or Ctrl-C (the default).
    Serve,
    /// Apply the schema migrations, create the search index and the broker topology, then exit
    /// (retrying for CHAT_MIGRATE_WAIT_SECONDS while a service is unreachable).
    Migrate,
    /// Print the OpenAPI document.
    Openapi,
    /// Move the dead letters of the ingest and index queues back into their queues, then exit.
    ReplayDeadLetters,
    /// Rebuild the search index from the storage (all of it, one application or one chat), while
    /// the system runs; prints its progress and where to resume.
    Reindex(ReindexArgs),
}

#[derive(clap::Args)]
struct ReindexArgs {
    /// Only the messages of this application (its token).
    #[arg(long)]
    application: Option<String>,
    /// Only the messages of this chat of the application.
    #[arg(long, requires = "application")]
    chat: Option<u64>,
    /// Resume after this position, as an earlier run printed it (CHAT_ID:NUMBER).
    #[arg(long, default_value = "0:0")]
    after: ReindexCursor,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let (config, _telemetry) = start()?;
            let listeners = api::Listeners::bind(&config).await?;
            api::serve(config, listeners, chatcore::shutdown::on_signal()).await
        }
        Command::Migrate => {
            let (config, _telemetry) = start()?;
            chatcore::adapters::migrate(&config).await
        }
        Command::Openapi => {
            // Only the document on stdout, no log lines.
            println!("{}", api::openapi_json());
            Ok(())
        }
        Command::Reindex(args) => {
            let (config, _telemetry) = start()?;
            let done = api::reindex(
                &config,
                args.application.as_deref(),
                args.chat,
                args.after,
                chatcore::shutdown::on_signal(),
            )
            .await?;
            println!("reindexed {} messages", done.indexed);
            Ok(())
        }
        Command::ReplayDeadLetters => {
            let (config, _telemetry) = start()?;
            for (queue, moved) in api::replay_dead_letters(&config).await? {
                println!("moved {moved} dead letters back to {queue}");
            }
            Ok(())
        }
    }
}

/// The configuration, and logging (and tracing) set up from it.
fn start() -> anyhow::Result<(Config, chatcore::telemetry::TelemetryGuard)> {
    let config = Config::from_env()?;
    let telemetry = chatcore::telemetry::init("api", config.trace_export.as_ref());
    Ok((config, telemetry))
}
