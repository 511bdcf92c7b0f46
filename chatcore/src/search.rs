//! Elasticsearch: the message index (mapping, bulk writes with external versions, chat-scoped search).
//!
//! Works with Elasticsearch 8 and 7.17: only typeless index/bulk/search calls are used.

use std::time::Duration;

use chrono::{DateTime, Utc};
use elasticsearch::auth::Credentials;
use elasticsearch::http::response::Response;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{StatusCode, Url};
use elasticsearch::indices::{IndicesCreateParts, IndicesExistsParts};
use elasticsearch::{BulkParts, Elasticsearch, SearchParts};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::SecretUrl;
use crate::domain::{Number, PageRequest, SearchQuery};

/// Word prefixes of these lengths are indexed as their own terms; shorter and longer prefixes
/// still match (by expanding terms), a little slower. Fewer indexed prefixes make indexing cheaper.
const MIN_INDEXED_PREFIX_CHARS: u32 = 2;
const MAX_INDEXED_PREFIX_CHARS: u32 = 8;
/// Words of a query beyond this many are ignored, which bounds the cost of one search.
pub const MAX_QUERY_WORDS: usize = 16;
/// Elasticsearch's default `index.max_result_window`.
pub const MAX_RESULT_WINDOW: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("elasticsearch is unreachable: {0}")]
    Unavailable(#[from] elasticsearch::Error),
    #[error("elasticsearch answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("invalid elasticsearch url: {0}")]
    InvalidUrl(String),
}

impl SearchError {
    /// Whether retrying later can succeed (a node down, overloaded or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::InvalidUrl(_) => false,
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
}

/// What happened to one document of a bulk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Written, or skipped because the index already holds the same or a newer version.
    Done,
    Transient(String),
    Permanent(String),
}

#[derive(Clone)]
pub struct SearchIndex {
    client: Elasticsearch,
    index: String,
}

fn chat_key(application_id: u64, chat_number: Number) -> String {
    format!("{application_id}:{chat_number}")
}

impl SearchIndex {
    pub fn connect(url: &SecretUrl, index: &str) -> Result<Self, SearchError> {
        let mut parsed =
            Url::parse(url.expose()).map_err(|error| SearchError::InvalidUrl(error.to_string()))?;
        let credentials = (!parsed.username().is_empty()).then(|| {
            Credentials::Basic(
                parsed.username().to_owned(),
                parsed.password().unwrap_or_default().to_owned(),
            )
        });
        // Credentials travel in the Authorization header, not in the URL.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        let mut builder = TransportBuilder::new(SingleNodeConnectionPool::new(parsed))
            .disable_proxy()
            .timeout(Duration::from_secs(30));
        if let Some(credentials) = credentials {
            builder = builder.auth(credentials);
        }
        let transport = builder
            .build()
            .map_err(|error| SearchError::InvalidUrl(error.to_string()))?;
        Ok(Self {
            client: Elasticsearch::new(transport),
            index: index.to_owned(),
        })
    }

    pub fn index_name(&self) -> &str {
        &self.index
    }

    /// Creates the index with its mapping when it does not exist yet.
    pub async fn ensure_index(&self, replicas: u32) -> Result<(), SearchError> {
        let exists = self
            .client
            .indices()
            .exists(IndicesExistsParts::Index(&[&self.index]))
            .send()
            .await?;
        if exists.status_code().is_success() {
            return Ok(());
        }
        let response = self
            .client
            .indices()
            .create(IndicesCreateParts::Index(&self.index))
            .body(index_definition(replicas))
            .send()
            .await?;
        let status = response.status_code();
        if status.is_success() {
            tracing::info!(index = %self.index, "created search index");
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        if body.contains("resource_already_exists_exception") {
            return Ok(());
        }
        Err(SearchError::Status {
            status: status.as_u16(),
            body,
        })
    }

    /// Indexes documents with external versions; one outcome per document, in order.
    pub async fn bulk_index(
        &self,
        documents: &[MessageDocument],
    ) -> Result<Vec<ItemOutcome>, SearchError> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        let mut lines: Vec<elasticsearch::http::request::JsonBody<Value>> =
            Vec::with_capacity(documents.len() * 2);
        for document in documents {
            let routing = chat_key(document.application_id, document.chat_number);
            lines.push(
                json!({"index": {
                    "_id": format!("{routing}:{}", document.number),
                    "routing": routing,
                    "version": document.version,
                    "version_type": "external",
                }})
                .into(),
            );
            lines.push(
                json!({
                    "application_id": document.application_id,
                    "chat_number": document.chat_number,
                    "chat": routing,
                    "number": document.number,
                    "body": document.body,
                    "created_at": document.created_at,
                })
                .into(),
            );
        }
        let response = self
            .client
            .bulk(BulkParts::Index(&self.index))
            .body(lines)
            .send()
            .await?;
        let response = success_or_error(response).await?;
        let body: BulkResponse = response.json().await?;
        if body.items.len() != documents.len() {
            return Err(SearchError::Status {
                status: 500,
                body: format!(
                    "bulk answered {} items for {} documents",
                    body.items.len(),
                    documents.len()
                ),
            });
        }
        Ok(body.items.into_iter().map(BulkItem::outcome).collect())
    }

    /// Messages of one chat matching every word of the query as a word or a word prefix,
    /// best match first. Returns up to `page.fetch_limit()` hits.
    pub async fn search(
        &self,
        application_id: u64,
        chat_number: Number,
        query: &SearchQuery,
        page: PageRequest,
    ) -> Result<Vec<MessageHit>, SearchError> {
        let routing = chat_key(application_id, chat_number);
        let response = self
            .client
            .search(SearchParts::Index(&[&self.index]))
            .routing(&[&routing])
            .body(json!({
                "from": page.offset(),
                "size": page.fetch_limit(),
                "track_total_hits": false,
                "_source": ["number", "body", "created_at"],
                "query": query_definition(&routing, query),
                "sort": ["_score", {"number": "asc"}],
            }))
            .send()
            .await?;
        if response.status_code() == StatusCode::NOT_FOUND {
            // No message was ever indexed.
            return Ok(Vec::new());
        }
        let response = success_or_error(response).await?;
        let body: SearchResponse = response.json().await?;
        Ok(body.hits.hits.into_iter().map(|hit| hit.source).collect())
    }

    /// Makes every write so far visible to search (for tests and benchmarks).
    pub async fn refresh(&self) -> Result<(), SearchError> {
        let response = self
            .client
            .indices()
            .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[
                &self.index
            ]))
            .send()
            .await?;
        success_or_error(response).await.map(|_| ())
    }

    pub async fn ping(&self) -> Result<(), SearchError> {
        let response = self
            .client
            .cluster()
            .health(elasticsearch::cluster::ClusterHealthParts::None)
            .send()
            .await?;
        success_or_error(response).await.map(|_| ())
    }
}

async fn success_or_error(response: Response) -> Result<Response, SearchError> {
    let status = response.status_code();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(SearchError::Status {
        status: status.as_u16(),
        body,
    })
}

/// The index uses only what every Elasticsearch node has (no analysis plugins): the standard
/// analyzer (lowercases, splits on word boundaries) and `index_prefixes`, which indexes word
/// prefixes so that prefix queries are single term lookups.
fn index_definition(replicas: u32) -> Value {
    json!({
        "settings": {"number_of_shards": 1, "number_of_replicas": replicas},
        "mappings": {
            "dynamic": "strict",
            "_routing": {"required": true},
            "properties": {
                "application_id": {"type": "long"},
                "chat_number": {"type": "long"},
                "chat": {"type": "keyword"},
                "number": {"type": "long"},
                "body": {
                    "type": "text",
                    "analyzer": "standard",
                    "index_prefixes": {"min_chars": MIN_INDEXED_PREFIX_CHARS, "max_chars": MAX_INDEXED_PREFIX_CHARS},
                },
                "created_at": {"type": "date"},
            },
        },
    })
}

/// Every word of the query must match a word of the body, whole (scored higher) or as a prefix.
/// Words are extracted here, so no character of the query is ever parsed as query syntax.
fn query_definition(routing: &str, query: &SearchQuery) -> Value {
    let words: Vec<Value> = query_words(query.as_str())
        .into_iter()
        .map(|word| {
            json!({"bool": {"should": [
                {"term": {"body": {"value": word, "boost": 2.0}}},
                // An explicit rewrite: Elasticsearch 7.17 fails on a prefix shorter than
                // index_prefixes.min_chars without one.
                {"prefix": {"body": {"value": word, "rewrite": "constant_score"}}},
            ]}})
        })
        .collect();
    json!({"bool": {
        "filter": [{"term": {"chat": routing}}],
        "must": if words.is_empty() { vec![json!({"match_none": {}})] } else { words },
    }})
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

#[derive(Deserialize)]
struct BulkResponse {
    items: Vec<BulkItem>,
}

#[derive(Deserialize)]
struct BulkItem {
    index: BulkItemResult,
}

#[derive(Deserialize)]
struct BulkItemResult {
    status: u16,
    #[serde(default)]
    error: Option<Value>,
}

impl BulkItem {
    fn outcome(self) -> ItemOutcome {
        let BulkItemResult { status, error } = self.index;
        let describe = || {
            format!(
                "{status}: {}",
                error.as_ref().map(Value::to_string).unwrap_or_default()
            )
        };
        match status {
            200..=299 | 409 => ItemOutcome::Done,
            429 | 500.. => ItemOutcome::Transient(describe()),
            _ => ItemOutcome::Permanent(describe()),
        }
    }
}

#[derive(Deserialize)]
struct SearchResponse {
    hits: SearchHits,
}

#[derive(Deserialize)]
struct SearchHits {
    hits: Vec<SearchHit>,
}

#[derive(Deserialize)]
struct SearchHit {
    #[serde(rename = "_source")]
    source: MessageHit,
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

    #[test]
    fn a_query_without_words_matches_nothing() {
        let query = SearchQuery::parse("!!!").expect("non-blank");
        let definition = query_definition("1:1", &query);
        assert_eq!(definition["bool"]["must"][0], json!({"match_none": {}}));
    }
}
