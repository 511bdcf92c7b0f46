//! The operator's commands of the api binary beside `serve`: the OpenAPI document, the search
//! index rebuilt from the storage, the dead letters replayed.

use anyhow::Context as _;
use chatcore::Config;
use chatcore::domain::{ApplicationToken, Number};
use chatcore::metrics::Metrics;
use chatcore::pipeline::ReindexProgress;
use chatcore::store::{ReindexCursor, ReindexScope};
use tokio_util::sync::CancellationToken;

use crate::http;

/// The OpenAPI 3.1 document, pretty-printed (what `/api/v1/openapi.json` serves).
pub fn openapi_json() -> String {
    http::openapi()
        .to_pretty_json()
        .expect("the document serializes")
}

/// Moves the dead letters of the ingest and index queues back into their queues (after the cause
/// was fixed); returns how many per queue. An event that fails again is dead-lettered again.
pub async fn replay_dead_letters(config: &Config) -> anyhow::Result<Vec<(String, u64)>> {
    let queue = chatcore::adapters::queue(config, &Metrics::new()).await?;
    chatcore::pipeline::replay_dead_letters(queue.as_ref(), &chatcore::events::Consumer::ALL).await
}

/// Rebuilds the search index from the storage: every message, or those of one application (its
/// token) or one of its chats, after `after`; prints the progress and where to resume.
pub async fn reindex(
    config: &Config,
    application: Option<&str>,
    chat: Option<u64>,
    after: ReindexCursor,
    shutdown: CancellationToken,
) -> anyhow::Result<ReindexProgress> {
    let metrics = Metrics::new();
    let storage = chatcore::adapters::storage(config, &metrics).await?;
    let search = chatcore::adapters::search(config, &metrics).await?;
    search
        .ensure_index()
        .await
        .context("creating the search index")?;
    let scope = match application {
        None => ReindexScope::All,
        Some(token) => {
            // The token is a secret: not repeated in the error.
            let unknown = || anyhow::anyhow!("no application has this token (or it expired)");
            let token = ApplicationToken::parse(token).map_err(|_| unknown())?;
            let id = storage
                .resolve_token(&token.digest())
                .await?
                .ok_or_else(unknown)?
                .application_id;
            match chat {
                None => ReindexScope::Application(id),
                Some(number) => ReindexScope::Chat(
                    id,
                    Number::new(number).context("a chat number is at least 1")?,
                ),
            }
        }
    };
    let done = chatcore::pipeline::reindex(
        storage.as_ref(),
        search.as_ref(),
        scope,
        after,
        &shutdown,
        |progress| {
            println!(
                "reindexed {} messages; resume with --after {}",
                progress.indexed, progress.cursor
            );
        },
    )
    .await?;
    Ok(done)
}
