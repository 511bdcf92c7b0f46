//! The message search index: one trait, [`SearchIndex`], with an Elasticsearch adapter (the
//! distributed stack) and a SQLite FTS5 adapter (embedded). Both find the messages of one chat in
//! which every query word matches a word, whole (ranked higher) or as a prefix; the query words
//! are extracted here ([`query_words`]), so no character of a query is ever query syntax.

mod elasticsearch;
mod sqlite;
mod timed;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::domain::{Number, PageRequest, SearchQuery};
use crate::retry::Transient;

pub use self::elasticsearch::ElasticsearchIndex;
pub use self::sqlite::SqliteSearchIndex;
pub use self::timed::TimedSearchIndex;

/// Words of a query beyond this many are ignored, which bounds the cost of one search.
pub const MAX_QUERY_WORDS: usize = 16;

/// Words of the query shorter than this match whole words only: a one-letter prefix would
/// expand to every word of the index that starts with the letter (the prefix index starts here).
pub const MIN_PREFIX_CHARS: usize = 2;

/// Whether a query word also matches as a prefix.
pub fn matches_as_prefix(word: &str) -> bool {
    word.chars().count() >= MIN_PREFIX_CHARS
}
/// Elasticsearch's default `index.max_result_window`.
pub const MAX_RESULT_WINDOW: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(transparent)]
    TimedOut(#[from] crate::retry::DependencyTimedOut),
    #[error("elasticsearch is unreachable: {0}")]
    Unavailable(#[from] ::elasticsearch::Error),
    #[error("elasticsearch answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the index answered nonsense: {body}")]
    Rejected { body: String },
    #[error("invalid elasticsearch url: {0}")]
    InvalidUrl(String),
    #[error("sqlite: {0}")]
    Database(#[from] sqlx::Error),
}

impl Transient for SearchError {
    /// Whether retrying later can succeed (a node down, overloaded or restarting, a busy file).
    fn is_transient(&self) -> bool {
        match self {
            Self::TimedOut(_) => true,
            Self::Unavailable(_) => true,
            // 403 cluster_block_exception: a read-only block (disk flood stage), lifted later.
            Self::Status { status, body } => {
                *status == 429
                    || *status >= 500
                    || (*status == 403 && body.contains("cluster_block_exception"))
            }
            Self::Rejected { .. } | Self::InvalidUrl(_) => false,
            Self::Database(error) => crate::store::is_transient(error),
        }
    }
}

/// A message as the index stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageDocument {
    pub application_id: u64,
    pub chat_number: Number,
    pub number: Number,
    pub body: String,
    pub created_at: DateTime<Utc>,
    /// External version: 1 when created, then the MySQL version of each update.
    pub version: u64,
}

/// A search hit, as the API returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageHit {
    pub number: Number,
    pub body: String,
    pub created_at: DateTime<Utc>,
    /// The relevance the hits are ranked by (the index's own measure); the next page's cursor.
    #[serde(skip)]
    pub score: f64,
}

/// What happened to one document of a bulk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Written, or skipped because the index already holds the same or a newer version.
    Done,
    Transient(String),
    Permanent(String),
}

/// Every call is timed by [`TimedSearchIndex`], which the composition root wraps around the
/// adapter.
#[async_trait]
pub trait SearchIndex: Send + Sync {
    /// "elasticsearch" or "sqlite-fts5": the dependency label of metrics and readiness.
    fn kind(&self) -> &'static str;

    async fn ping(&self) -> Result<(), SearchError>;

    /// Creates the index when it does not exist yet.
    async fn ensure_index(&self) -> Result<(), SearchError>;

    /// Writes documents unless the index holds the same or a newer version of them; one outcome
    /// per document, in order.
    async fn bulk_index(
        &self,
        documents: &[MessageDocument],
    ) -> Result<Vec<ItemOutcome>, SearchError>;

    /// Messages of one chat matching every word of the query as a word or a word prefix, best
    /// match first, then by number. Returns up to `page.fetch_limit()` hits, from the start of
    /// the page: its offset, or after the hit of its cursor.
    async fn search(
        &self,
        application_id: u64,
        chat_number: Number,
        query: &SearchQuery,
        page: PageRequest,
    ) -> Result<Vec<MessageHit>, SearchError>;
}

/// Lowercased words as the standard analyzer sees them (letters, digits and `_`, with `'`
/// inside words and `.`/`,` inside numbers kept), at most [`MAX_QUERY_WORDS`].
pub fn query_words(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let is_word_char = |c: char| c.is_alphanumeric() || c == '_';
    let mut words = Vec::new();
    let mut current = String::new();
    for (index, &c) in chars.iter().enumerate() {
        let previous = index.checked_sub(1).map(|i| chars[i]);
        let next = chars.get(index + 1).copied();
        let joins_letters = matches!(c, '\'' | '\u{2019}')
            && previous.is_some_and(char::is_alphabetic)
            && next.is_some_and(char::is_alphabetic);
        let joins_digits = matches!(c, '.' | ',')
            && previous.is_some_and(|p| p.is_ascii_digit())
            && next.is_some_and(|n| n.is_ascii_digit());
        if is_word_char(c) || joins_letters || joins_digits {
            current.extend(c.to_lowercase());
        } else if !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words.dedup();
    words.truncate(MAX_QUERY_WORDS);
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_words_are_lowercased_words_without_syntax() {
        assert_eq!(query_words("Hello, WORLD!"), vec!["hello", "world"]);
        assert_eq!(
            query_words("don't stop 3.14"),
            vec!["don't", "stop", "3.14"]
        );
        assert_eq!(
            query_words("\"quoted\" AND (x OR y*) -z ~2"),
            vec!["quoted", "and", "x", "or", "y", "z", "2"]
        );
        assert!(query_words("*** ?? \\ /").is_empty());
        assert_eq!(query_words("snake_case"), vec!["snake_case"]);
        assert_eq!(query_words(&"w ".repeat(40)).len(), 1);
        assert_eq!(
            query_words(&(0..40).map(|i| format!("w{i} ")).collect::<String>()).len(),
            MAX_QUERY_WORDS
        );
    }
}
