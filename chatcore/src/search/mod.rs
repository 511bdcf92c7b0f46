//! The message search index: one trait, [`SearchIndex`], with an Elasticsearch adapter (the
//! distributed stack) and a SQLite FTS5 adapter (embedded). Both find the messages of one chat in
//! which every query word matches a word, whole (ranked higher) or as a prefix, and every phrase
//! in double quotes matches its words in a row; the terms are extracted here ([`query_terms`]),
//! so no other character of a query is ever query syntax. Both mark where a hit matched the same
//! way ([`Highlight`]). A search may also keep to one sender and a range of creation times, and
//! order its hits by relevance or by number ([`SearchRequest`]). Relevance is a rank, the number
//! of query words a hit has whole ([`QueryTerms::ranking_words`]), the newest first among equal
//! ranks: both indexes give the same hits in the same order in every sort, and an index sorted by
//! number answers a page of each rank from its first matches.

mod elasticsearch;
mod sqlite;
mod timed;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::domain::{Metadata, Number, SearchRequest, Sender};
use crate::retry::Transient;

pub use self::elasticsearch::ElasticsearchIndex;
pub use self::sqlite::SqliteSearchIndex;
pub use self::timed::TimedSearchIndex;

pub use crate::domain::MAX_QUERY_WORDS;

/// Words of the query shorter than this match whole words only: a one-letter prefix would
/// expand to every word of the index that starts with the letter (the prefix index starts here).
pub const MIN_PREFIX_CHARS: usize = 2;

/// Whether a query word also matches as a prefix.
pub fn matches_as_prefix(word: &str) -> bool {
    word.chars().count() >= MIN_PREFIX_CHARS
}

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
            Self::Database(error) => crate::sql_errors::is_transient(error),
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
    pub sender: Option<Sender>,
    /// Kept and returned, never searched.
    pub metadata: Option<Metadata>,
    /// When the message was first edited; none until then.
    pub edited_at: Option<DateTime<Utc>>,
    /// External version: 1 when created, then the MySQL version of each update.
    pub version: u64,
}

/// Which documents of the same message a write replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacing {
    /// Older versions only: a redelivered or late event never replaces what the index holds.
    OlderVersions,
    /// The same version too: a rebuild from the storage, whose row is the truth of its version,
    /// also fills in the fields an older release did not index (sender, metadata).
    SameOrOlderVersions,
}

/// A search hit, as the API returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageHit {
    pub number: Number,
    pub body: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub sender: Option<Sender>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub edited_at: Option<DateTime<Utc>>,
    /// Where the body matched.
    #[serde(skip)]
    pub highlight: Highlight,
    /// How many of the query's ranking words the hit has whole (0 when sorted by number); with
    /// the number, the next page's cursor.
    #[serde(skip)]
    pub rank: u32,
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

    /// Creates the index when it does not exist yet, and gives an existing one the fields of
    /// this release.
    async fn ensure_index(&self) -> Result<(), SearchError>;

    /// Writes documents unless the index holds a newer version of them (or the same version,
    /// as `replacing` says); one outcome per document, in order.
    async fn bulk_index(
        &self,
        documents: &[MessageDocument],
        replacing: Replacing,
    ) -> Result<Vec<ItemOutcome>, SearchError>;

    /// Removes every document of a deleted application; returns how many went.
    async fn purge_application(&self, application_id: u64) -> Result<u64, SearchError>;

    /// Messages of one chat matching every word of the query as a word or a word prefix and
    /// the filter, in the order of the sort (relevance: the highest rank first, then the
    /// newest).
    /// Returns up to `page.fetch_limit()` hits, from the start of the page: its offset, or after
    /// the hit of its cursor.
    async fn search(
        &self,
        application_id: u64,
        chat_number: Number,
        request: &SearchRequest,
    ) -> Result<Vec<MessageHit>, SearchError>;
}

/// What a query asks for: words that match a word whole or as its prefix, and phrases (in double
/// quotes) whose words must follow each other, whole. An unmatched quote counts as a space.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryTerms {
    pub words: Vec<String>,
    pub phrases: Vec<Vec<String>>,
}

impl QueryTerms {
    pub fn is_empty(&self) -> bool {
        self.words.is_empty() && self.phrases.is_empty()
    }

    /// The words whose whole-word matches rank a hit: those that also match as a prefix (every
    /// hit has a shorter word, and a phrase, whole). A hit's rank is how many of them it has
    /// whole, from 0 (prefixes only) to their count.
    pub fn ranking_words(&self) -> Vec<&str> {
        self.words
            .iter()
            .map(String::as_str)
            .filter(|word| matches_as_prefix(word))
            .collect()
    }
}

/// The terms of a query, at most [`MAX_QUERY_WORDS`] words in all.
pub fn query_terms(text: &str) -> QueryTerms {
    let quoted_parts = text.matches('"').count() / 2 * 2;
    let mut terms = QueryTerms::default();
    let mut budget = MAX_QUERY_WORDS;
    let mut outside_quotes = String::new();
    // Every second part between quotes is a phrase, up to the last matched quote.
    for (index, part) in text.splitn(quoted_parts + 1, '"').enumerate() {
        if index % 2 == 0 {
            outside_quotes.push(' ');
            outside_quotes.push_str(&part.replace('"', " "));
            continue;
        }
        let mut phrase = query_words(part);
        phrase.truncate(budget);
        budget -= phrase.len();
        if !phrase.is_empty() {
            terms.phrases.push(phrase);
        }
    }
    let mut words = query_words(&outside_quotes);
    words.truncate(budget);
    terms.words = words;
    terms
}

/// Marks the engines put around the matched words: private-use characters, which
/// [`Highlight::from_marked`] turns into the escaped HTML the API returns.
pub const MATCH_START: char = '\u{E000}';
pub const MATCH_END: char = '\u{E001}';

/// A fragment of a hit's body with the matched words in `<mark>`...`</mark>`, HTML-escaped
/// otherwise (safe to insert into a page as it is); an ellipsis where the body was cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Highlight(String);

impl Highlight {
    /// From an engine's fragment marked with [`MATCH_START`] and [`MATCH_END`]. Stray marks (the
    /// body may hold those characters itself) are dropped, so every `<mark>` is closed.
    pub fn from_marked(fragment: &str) -> Self {
        let mut html = String::with_capacity(fragment.len() + 16);
        let mut open = false;
        for c in fragment.chars() {
            match c {
                MATCH_START if !open => {
                    html.push_str("<mark>");
                    open = true;
                }
                MATCH_END if open => {
                    html.push_str("</mark>");
                    open = false;
                }
                MATCH_START | MATCH_END => {}
                '&' => html.push_str("&amp;"),
                '<' => html.push_str("&lt;"),
                '>' => html.push_str("&gt;"),
                '"' => html.push_str("&quot;"),
                '\'' => html.push_str("&#39;"),
                c => html.push(c),
            }
        }
        if open {
            html.push_str("</mark>");
        }
        Self(html)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
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
    fn quoted_words_are_phrases_and_the_rest_are_words() {
        let terms = query_terms("hello \"Big  World\" a \"one\" \"unclosed words");
        assert_eq!(terms.words, vec!["hello", "a", "unclosed", "words"]);
        assert_eq!(
            terms.phrases,
            vec![
                vec!["big".to_owned(), "world".to_owned()],
                vec!["one".to_owned()]
            ]
        );
        assert!(query_terms("\"\" \"!!\"").is_empty());
        let many = (0..40)
            .map(|i| format!("\"w{i} x{i}\" "))
            .collect::<String>();
        let terms = query_terms(&many);
        assert_eq!(
            terms.phrases.iter().map(Vec::len).sum::<usize>(),
            MAX_QUERY_WORDS
        );
    }

    #[test]
    fn highlights_are_escaped_html_with_balanced_marks() {
        let marked =
            format!("a {MATCH_START}<b>&{MATCH_END} {MATCH_END}\"x'{MATCH_START}{MATCH_START}y");
        assert_eq!(
            Highlight::from_marked(&marked).as_str(),
            "a <mark>&lt;b&gt;&amp;</mark> &quot;x&#39;<mark>y</mark>"
        );
    }

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
