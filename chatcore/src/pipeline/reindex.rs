//! Rebuilds the search index from the storage: every message, an application's or a chat's, or
//! those updated lately (the reconciliation pass of counter-sync, which repairs a `PUT` whose event
//! never reached the index). Safe while the system runs: every write carries the stored version,
//! so the index keeps whichever is newer. Pages in (chat, number) order from a cursor, so an
//! interrupted run resumes where it stopped. A document of the stored version is written again
//! too, so a rebuild brings every document up to the release's fields (sender, metadata).

use tokio_util::sync::CancellationToken;

use crate::domain::Number;
use crate::retry::{self, Backoff, Stopped, Transient};
use crate::search::{ItemOutcome, MessageDocument, Replacing, SearchIndex};
use crate::store::{MessageToIndex, ReindexCursor, ReindexScope, Storage};

/// Messages read and written per round trip.
const PAGE_SIZE: u32 = 500;

/// How far a reindex got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReindexProgress {
    pub indexed: u64,
    /// Where to resume: the last message written.
    pub cursor: ReindexCursor,
}

#[derive(Debug, thiserror::Error)]
pub enum ReindexError {
    #[error("reading the storage: {0}")]
    Storage(#[from] crate::store::StorageError),
    #[error("writing the index: {0}")]
    Search(#[from] crate::search::SearchError),
    #[error("the index did not take a message yet: {0}")]
    NotTaken(String),
    #[error("the index rejected message {chat_id}:{number}: {reason}")]
    Rejected {
        chat_id: u64,
        number: u64,
        reason: String,
    },
    #[error("interrupted")]
    Interrupted,
}

impl Transient for ReindexError {
    fn is_transient(&self) -> bool {
        match self {
            Self::Storage(error) => error.is_transient(),
            Self::Search(error) => error.is_transient(),
            Self::NotTaken(_) => true,
            Self::Rejected { .. } | Self::Interrupted => false,
        }
    }
}

/// Writes every message of `scope` after `from` to the index, page by page; `report` hears of each
/// page. Waits out an index or a database that is down (with backoff) until `shutdown`.
pub async fn reindex(
    storage: &dyn Storage,
    search: &dyn SearchIndex,
    scope: ReindexScope,
    from: ReindexCursor,
    shutdown: &CancellationToken,
    mut report: impl FnMut(&ReindexProgress),
) -> Result<ReindexProgress, ReindexError> {
    let backoff = Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(10),
    );
    let mut progress = ReindexProgress {
        indexed: 0,
        cursor: from,
    };
    loop {
        let cursor = progress.cursor;
        let page = retry::retry(
            backoff,
            shutdown,
            || async {
                let page = storage
                    .messages_to_index(scope, cursor, PAGE_SIZE)
                    .await?;
                write_page(search, &page).await?;
                Ok::<_, ReindexError>(page)
            },
            |error, attempt, delay| {
                let transient = error.is_transient();
                if transient {
                    tracing::warn!(%error, attempt, delay_ms = delay.as_millis() as u64, "reindex page failed, retrying");
                }
                transient
            },
        )
        .await
        .map_err(|stopped| match stopped {
            Stopped::GaveUp(error) => error,
            Stopped::Interrupted => ReindexError::Interrupted,
        })?;
        let Some(last) = page.last() else {
            return Ok(progress);
        };
        progress.cursor = last.cursor();
        progress.indexed += page.len() as u64;
        report(&progress);
    }
}

async fn write_page(search: &dyn SearchIndex, page: &[MessageToIndex]) -> Result<(), ReindexError> {
    let (messages, documents): (Vec<&MessageToIndex>, Vec<MessageDocument>) = page
        .iter()
        .filter_map(|message| document_of(message).map(|document| (message, document)))
        .unzip();
    // The stored row is the truth of its version: a document of the same version is written
    // again, which fills in fields its indexer did not know (an index older than the release).
    let outcomes = search
        .bulk_index(&documents, Replacing::SameOrOlderVersions)
        .await?;
    for (message, outcome) in messages.into_iter().zip(outcomes) {
        match outcome {
            ItemOutcome::Done => {}
            // The whole page is written again: versions make the rest of it no-ops.
            ItemOutcome::Transient(reason) => return Err(ReindexError::NotTaken(reason)),
            ItemOutcome::Permanent(reason) => {
                return Err(ReindexError::Rejected {
                    chat_id: message.chat_id,
                    number: message.number,
                    reason,
                });
            }
        }
    }
    Ok(())
}

fn document_of(message: &MessageToIndex) -> Option<MessageDocument> {
    Some(MessageDocument {
        application_id: message.application_id,
        chat_number: Number::new(message.chat_number)?,
        number: Number::new(message.number)?,
        body: message.body.clone(),
        created_at: message.created_at,
        sender: message.sender.clone(),
        metadata: message.metadata.clone(),
        edited_at: message.edited_at,
        version: message.version,
    })
}
