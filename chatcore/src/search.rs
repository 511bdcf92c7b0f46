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

/// Longest word prefix that is indexed; longer query words are cut to it.
const MAX_PREFIX_CHARS: u32 = 20;
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
        let mut parsed = Url::parse(url.expose()).map_err(|error| SearchError::InvalidUrl(error.to_string()))?;
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
    pub async fn bulk_index(&self, documents: &[MessageDocument]) -> Result<Vec<ItemOutcome>, SearchError> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        let mut lines: Vec<elasticsearch::http::request::JsonBody<Value>> = Vec::with_capacity(documents.len() * 2);
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
                body: format!("bulk answered {} items for {} documents", body.items.len(), documents.len()),
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
                "query": {"bool": {
                    "filter": [{"term": {"chat": routing}}],
                    "should": [
                        {"match": {"body": {"query": query.as_str(), "operator": "and", "boost": 2.0}}},
                        {"match": {"body.prefix": {"query": query.as_str(), "operator": "and"}}},
                    ],
                    "minimum_should_match": 1,
                }},
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
            .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[&self.index]))
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

fn index_definition(replicas: u32) -> Value {
    json!({
        "settings": {
            "number_of_shards": 1,
            "number_of_replicas": replicas,
            "analysis": {
                "filter": {
                    "word_prefixes": {"type": "edge_ngram", "min_gram": 1, "max_gram": MAX_PREFIX_CHARS},
                    "longest_prefix": {"type": "truncate", "length": MAX_PREFIX_CHARS},
                },
                "analyzer": {
                    "words": {"tokenizer": "standard", "filter": ["lowercase", "asciifolding"]},
                    "word_prefixes": {"tokenizer": "standard", "filter": ["lowercase", "asciifolding", "word_prefixes"]},
                    "query_prefixes": {"tokenizer": "standard", "filter": ["lowercase", "asciifolding", "longest_prefix"]},
                },
            },
        },
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
                    "analyzer": "words",
                    "fields": {"prefix": {"type": "text", "analyzer": "word_prefixes", "search_analyzer": "query_prefixes"}},
                },
                "created_at": {"type": "date"},
            },
        },
    })
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
        let describe = || format!("{status}: {}", error.as_ref().map(Value::to_string).unwrap_or_default());
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
