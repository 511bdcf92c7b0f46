//! Elasticsearch: the [`SearchIndex`] adapter of the distributed stack (mapping, bulk writes with
//! external versions, chat-scoped search).
//!
//! Works with Elasticsearch 8 and 7.17: only typeless index/bulk/search calls are used.

use std::time::Duration;

use async_trait::async_trait;
use elasticsearch::auth::Credentials;
use elasticsearch::cert::{Certificate, CertificateValidation};
use elasticsearch::http::response::Response;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::{StatusCode, Url};
use elasticsearch::indices::{
    IndicesCreateParts, IndicesExistsParts, IndicesGetSettingsParts, IndicesPutMappingParts,
};
use elasticsearch::{BulkParts, Elasticsearch, SearchParts};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Highlight, ItemOutcome, MessageDocument, MessageHit, QueryTerms, Replacing, SearchError,
    SearchIndex, query_terms,
};
mod dsl;

use crate::config::SecretUrl;
use crate::domain::{Number, PagePosition, SearchRequest, SearchSort};
use dsl::{
    INDEX_SORT, fragment_around_first_match, highlight_definition, index_definition,
    mapping_properties, query_definition, sort_definition,
};

/// The server-side time limit of a search unless set otherwise (the api's default).
const DEFAULT_SEARCH_TIMEOUT: Duration = Duration::from_secs(2);
/// The most a `_bulk` request carries (estimated, see [`bulk_requests`]). Elasticsearch rejects a
/// request above its indexing pressure limit (10% of the heap: 51 MiB of a 512 MiB heap) with 429
/// every time, so a batch of the largest events (255 of 258 KB) sent whole was retried forever;
/// Elasticsearch advises bulks of a few megabytes.
const MAX_BULK_REQUEST_BYTES: usize = 8 * 1024 * 1024;
/// What a document's `_bulk` lines take beside its body and metadata (action, ids, numbers,
/// dates, sender).
const BULK_DOCUMENT_OVERHEAD_BYTES: usize = 512;
/// Documents one page of a purge finds and deletes (one search, one bulk request).
const PURGE_PAGE_DOCUMENTS: u32 = 1_000;

#[derive(Clone)]
pub struct ElasticsearchIndex {
    client: Elasticsearch,
    index: String,
    /// Replicas of the index when it is created (0 on a single node).
    replicas: u32,
    /// How long a search may run on the nodes before they answer with what they found.
    search_timeout: Duration,
}

fn chat_key(application_id: u64, chat_number: Number) -> String {
    format!("{application_id}:{chat_number}")
}

impl ElasticsearchIndex {
    /// Builds the client; it connects on the first request. `https://` trusts the public roots
    /// and `tls_ca` (PEM, `CHAT_TLS_CA_FILE`).
    pub fn connect(
        url: &SecretUrl,
        index: &str,
        replicas: u32,
        tls_ca: Option<&[u8]>,
    ) -> Result<Self, SearchError> {
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
        if let Some(pem) = tls_ca {
            let ca = Certificate::from_pem(pem)
                .map_err(|error| SearchError::InvalidUrl(format!("CHAT_TLS_CA_FILE: {error}")))?;
            builder = builder.cert_validation(CertificateValidation::Full(ca));
        }
        let transport = builder
            .build()
            .map_err(|error| SearchError::InvalidUrl(error.to_string()))?;
        Ok(Self {
            client: Elasticsearch::new(transport),
            index: index.to_owned(),
            replicas,
            search_timeout: DEFAULT_SEARCH_TIMEOUT,
        })
    }

    /// Sets the server-side time limit of a search (`CHAT_SEARCH_TIMEOUT_MS`).
    pub fn with_search_timeout(mut self, search_timeout: Duration) -> Self {
        self.search_timeout = search_timeout;
        self
    }

    /// One `_bulk` request of `documents`; an outcome per document, in order.
    async fn bulk_request(
        &self,
        documents: &[MessageDocument],
        replacing: Replacing,
    ) -> Result<Vec<ItemOutcome>, SearchError> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        let version_type = match replacing {
            Replacing::OlderVersions => "external",
            Replacing::SameOrOlderVersions => "external_gte",
        };
        let mut lines: Vec<elasticsearch::http::request::JsonBody<Value>> =
            Vec::with_capacity(documents.len() * 2);
        for document in documents {
            let routing = chat_key(document.application_id, document.chat_number);
            lines.push(
                json!({"index": {
                    "_id": format!("{routing}:{}", document.number),
                    "routing": routing,
                    "version": document.version,
                    "version_type": version_type,
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
                    "sender": document.sender,
                    "metadata": document.metadata,
                    "edited_at": document.edited_at,
                })
                .into(),
            );
        }
        self.bulk(lines, documents.len()).await
    }

    /// One `_bulk` request of `lines` for `operations` operations; an outcome per operation, in
    /// order.
    async fn bulk(
        &self,
        lines: Vec<elasticsearch::http::request::JsonBody<Value>>,
        operations: usize,
    ) -> Result<Vec<ItemOutcome>, SearchError> {
        let response = self
            .client
            .bulk(BulkParts::Index(&self.index))
            .body(lines)
            .send()
            .await?;
        let response = success_or_error(response).await?;
        let body: BulkResponse = response.json().await?;
        if body.items.len() != operations {
            return Err(SearchError::Rejected {
                body: format!(
                    "bulk answered {} items for {operations} operations",
                    body.items.len(),
                ),
            });
        }
        Ok(body.items.into_iter().map(BulkItem::outcome).collect())
    }

    /// Whether the index keeps its documents in [`INDEX_SORT`] order (an index created by an
    /// earlier release does not, and cannot be given it).
    pub async fn sorted_by_number(&self) -> Result<bool, SearchError> {
        let response = self
            .client
            .indices()
            .get_settings(IndicesGetSettingsParts::Index(&[&self.index]))
            .flat_settings(true)
            .send()
            .await?;
        let settings: Value = success_or_error(response).await?.json().await?;
        // Keyed by the index's own name (the configured one may be an alias).
        Ok(settings.as_object().is_some_and(|indices| {
            indices.values().all(|index| {
                let settings = &index["settings"];
                settings["index.sort.field"] == INDEX_SORT.0
                    && settings["index.sort.order"] == INDEX_SORT.1
            })
        }))
    }

    pub fn index_name(&self) -> &str {
        &self.index
    }

    /// Makes every write so far visible to search (for tests and benchmarks).
    pub async fn refresh(&self) -> Result<(), SearchError> {
        success_or_error(self.refresh_request().await?)
            .await
            .map(|_| ())
    }

    async fn refresh_request(&self) -> Result<Response, SearchError> {
        Ok(self
            .client
            .indices()
            .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[
                &self.index
            ]))
            .send()
            .await?)
    }
}

/// Whether a search asks Elasticsearch to profile its queries (to count the documents visited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profiling {
    Off,
    On,
}

/// The hits of a search and, when profiled, how many documents its queries visited.
struct Found {
    hits: Vec<MessageHit>,
    visited: u64,
}

/// Where a query of a search starts and how many hits it needs.
struct Window {
    /// Hits of the query skipped before the first one returned (a page number's offset).
    skip: u64,
    wanted: u64,
    /// After this number, in the query's order (a cursor).
    after: Option<u64>,
}

impl ElasticsearchIndex {
    /// How many documents the queries of `request` visit on the nodes (the sum of the profiled
    /// `next_doc` and `advance` calls of each query): with the index sorted by number, a page
    /// of a rank visits about as many documents as it returns, however many match.
    pub async fn visited_documents(
        &self,
        application_id: u64,
        chat_number: Number,
        request: &SearchRequest,
    ) -> Result<u64, SearchError> {
        Ok(self
            .find(application_id, chat_number, request, Profiling::On)
            .await?
            .visited)
    }

    /// Sorted by number, one query. By relevance, one query per rank, from the highest (or the
    /// cursor's) down, each newest first (the index's own order, so each stops at the page's
    /// hits), until the page is full: a page number's offset is skipped across ranks (each query
    /// counts its hits up to the offset and the page).
    async fn find(
        &self,
        application_id: u64,
        chat_number: Number,
        request: &SearchRequest,
        profiling: Profiling,
    ) -> Result<Found, SearchError> {
        let routing = chat_key(application_id, chat_number);
        let terms = query_terms(request.query.as_str());
        let page = request.page;
        let cursor = match page.position {
            PagePosition::AfterHit(cursor) => Some(cursor),
            _ => None,
        };
        let mut window = Window {
            skip: page.offset(),
            wanted: page.fetch_limit(),
            after: cursor.map(|cursor| cursor.number),
        };
        if request.sort != SearchSort::Relevance {
            let query = query_definition(&routing, &terms, &request.filter, None);
            let answer = self
                .query(&routing, &terms, request.sort, query, &window, profiling)
                .await?;
            return Ok(answer.found(0));
        }
        let top = terms.ranking_words().len() as u32;
        // A cursor's rank above the query's (another query's cursor) comes before every hit.
        let first = match cursor {
            Some(cursor) if cursor.rank <= top => cursor.rank,
            _ => {
                window.after = None;
                top
            }
        };
        let mut found = Found {
            hits: Vec::new(),
            visited: 0,
        };
        for rank in (0..=first).rev() {
            let query = query_definition(&routing, &terms, &request.filter, Some(rank));
            let answer = self
                .query(&routing, &terms, request.sort, query, &window, profiling)
                .await?;
            let matched = answer.total;
            let ranked = answer.found(rank);
            found.visited += ranked.visited;
            found.hits.extend(ranked.hits);
            let still_wanted = page.fetch_limit().saturating_sub(found.hits.len() as u64);
            if still_wanted == 0 {
                break;
            }
            window = Window {
                skip: window.skip.saturating_sub(matched),
                wanted: still_wanted,
                after: None,
            };
        }
        Ok(found)
    }

    /// One query of a search: its hits in the window, counted up to the window's end.
    async fn query(
        &self,
        routing: &str,
        terms: &QueryTerms,
        sort: SearchSort,
        query: Value,
        window: &Window,
        profiling: Profiling,
    ) -> Result<Answer, SearchError> {
        let mut body = json!({
            "from": window.skip,
            "size": window.wanted,
            "track_total_hits": window.skip + window.wanted,
            "_source": ["number", "body", "created_at", "sender", "metadata", "edited_at"],
            "query": query,
            "sort": sort_definition(sort),
            "timeout": format!("{}ms", self.search_timeout.as_millis()),
            "highlight": highlight_definition(terms),
        });
        if let Some(after) = window.after {
            body["search_after"] = json!([after]);
        }
        if profiling == Profiling::On {
            body["profile"] = json!(true);
        }
        let response = self
            .client
            .search(SearchParts::Index(&[&self.index]))
            .routing(&[routing])
            .body(body)
            .send()
            .await?;
        if response.status_code() == StatusCode::NOT_FOUND {
            // No message was ever indexed.
            return Ok(Answer::default());
        }
        let body: SearchResponse = success_or_error(response).await?.json().await?;
        let visited = body.profile.map_or(0, |profile| profile.visited());
        Ok(Answer {
            total: body.hits.total.map_or(0, |total| total.value),
            hits: body.hits.hits,
            visited,
        })
    }
}

/// What one query answered.
#[derive(Default)]
struct Answer {
    /// The query's hits, counted up to the end of its window (all of them when fewer).
    total: u64,
    hits: Vec<SearchHit>,
    visited: u64,
}

impl Answer {
    /// The hits, of `rank`, as the api returns them.
    fn found(self, rank: u32) -> Found {
        let hits = self
            .hits
            .into_iter()
            .map(|hit| {
                // No highlight when nothing could be marked: the start of the body then.
                let marked = hit
                    .highlight
                    .and_then(|mut fields| fields.body.pop())
                    .unwrap_or_else(|| hit.source.body.clone());
                let highlight = Highlight::from_marked(&fragment_around_first_match(&marked));
                MessageHit {
                    rank,
                    highlight,
                    ..hit.source
                }
            })
            .collect();
        Found {
            hits,
            visited: self.visited,
        }
    }
}

#[async_trait]
impl SearchIndex for ElasticsearchIndex {
    fn kind(&self) -> &'static str {
        "elasticsearch"
    }

    async fn ensure_index(&self) -> Result<(), SearchError> {
        let exists = self
            .client
            .indices()
            .exists(IndicesExistsParts::Index(&[&self.index]))
            .send()
            .await?;
        if !exists.status_code().is_success() {
            let response = self
                .client
                .indices()
                .create(IndicesCreateParts::Index(&self.index))
                .body(index_definition(self.replicas))
                .send()
                .await?;
            let status = response.status_code();
            if status.is_success() {
                tracing::info!(index = %self.index, "created search index");
                return Ok(());
            }
            let body = response.text().await.unwrap_or_default();
            // Another process created it meanwhile, maybe an older release: mapped below.
            if !body.contains("resource_already_exists_exception") {
                return Err(SearchError::Status {
                    status: status.as_u16(),
                    body,
                });
            }
        }
        // An index of an earlier release gets the fields added since (a no-op when it has them),
        // before any document of this release, which has them, is written to it.
        let response = self
            .client
            .indices()
            .put_mapping(IndicesPutMappingParts::Index(&[&self.index]))
            .body(json!({"properties": mapping_properties()}))
            .send()
            .await?;
        success_or_error(response).await?;
        tracing::info!(index = %self.index, "search index mapping up to date");
        if !self.sorted_by_number().await? {
            // Still correct, only slower: each search visits every match of its words.
            tracing::warn!(
                index = %self.index,
                "search index is not sorted by number (created by an earlier release): rebuild it into a new index, see the readme's rebuilding the search index"
            );
        }
        Ok(())
    }

    /// One `_bulk` request per [`bulk_requests`] chunk, one after the other.
    async fn bulk_index(
        &self,
        documents: &[MessageDocument],
        replacing: Replacing,
    ) -> Result<Vec<ItemOutcome>, SearchError> {
        let mut outcomes = Vec::with_capacity(documents.len());
        for chunk in bulk_requests(documents) {
            outcomes.extend(self.bulk_request(chunk, replacing).await?);
        }
        Ok(outcomes)
    }

    /// Pages of the application's documents found on every shard (documents are routed by
    /// chat), each deleted by one `_bulk` request, until none is left. (Not `_delete_by_query`:
    /// that comes with the reindex module, which not every distribution has.) A document written
    /// meanwhile may be missed; counter-sync purges again.
    async fn purge_application(&self, application_id: u64) -> Result<u64, SearchError> {
        let mut purged = 0;
        loop {
            let refreshed = self.refresh_request().await?;
            if refreshed.status_code() == StatusCode::NOT_FOUND {
                // No message was ever indexed.
                return Ok(purged);
            }
            success_or_error(refreshed).await?;
            let response = self
                .client
                .search(SearchParts::Index(&[&self.index]))
                .body(json!({
                    "size": PURGE_PAGE_DOCUMENTS,
                    "_source": false,
                    "query": {"term": {"application_id": application_id}},
                }))
                .send()
                .await?;
            let found: DocumentIds = success_or_error(response).await?.json().await?;
            if found.hits.hits.is_empty() {
                return Ok(purged);
            }
            let lines: Vec<elasticsearch::http::request::JsonBody<Value>> = found
                .hits
                .hits
                .iter()
                .map(|hit| json!({"delete": {"_id": hit.id, "routing": hit.routing}}).into())
                .collect();
            for outcome in self.bulk(lines, found.hits.hits.len()).await? {
                match outcome {
                    ItemOutcome::Done => purged += 1,
                    ItemOutcome::Transient(reason) | ItemOutcome::Permanent(reason) => {
                        return Err(SearchError::Rejected {
                            body: format!("document not deleted: {reason}"),
                        });
                    }
                }
            }
        }
    }

    async fn search(
        &self,
        application_id: u64,
        chat_number: Number,
        request: &SearchRequest,
    ) -> Result<Vec<MessageHit>, SearchError> {
        Ok(self
            .find(application_id, chat_number, request, Profiling::Off)
            .await?
            .hits)
    }

    async fn ping(&self) -> Result<(), SearchError> {
        let response = self
            .client
            .cluster()
            .health(elasticsearch::cluster::ClusterHealthParts::None)
            .send()
            .await?;
        success_or_error(response).await.map(|_| ())
    }
}

/// `documents` cut into consecutive chunks of at most [`MAX_BULK_REQUEST_BYTES`] each (at least one
/// document each), estimating a body at its worst JSON escaping (6 bytes a character).
fn bulk_requests(documents: &[MessageDocument]) -> impl Iterator<Item = &[MessageDocument]> {
    crate::chunks::bounded_by_bytes(documents, MAX_BULK_REQUEST_BYTES, |document| {
        document.body.len() * 6
            + document
                .metadata
                .as_ref()
                .map_or(0, |metadata| metadata.as_str().len())
            + BULK_DOCUMENT_OVERHEAD_BYTES
    })
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

#[derive(Deserialize)]
struct BulkResponse {
    items: Vec<BulkItem>,
}

#[derive(Deserialize)]
struct BulkItem {
    #[serde(alias = "delete")]
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
        let blocked = error
            .as_ref()
            .is_some_and(|error| error["type"] == "cluster_block_exception");
        match status {
            200..=299 | 409 => ItemOutcome::Done,
            // A delete of a document gone already.
            404 if error.is_none() => ItemOutcome::Done,
            429 | 500.. => ItemOutcome::Transient(describe()),
            // A read-only block (disk flood stage, maintenance) is lifted, not fixed by the event.
            403 if blocked => ItemOutcome::Transient(describe()),
            _ => ItemOutcome::Permanent(describe()),
        }
    }
}

/// The ids (and routings) of a search's hits.
#[derive(Deserialize)]
struct DocumentIds {
    hits: DocumentIdHits,
}

#[derive(Deserialize)]
struct DocumentIdHits {
    hits: Vec<DocumentId>,
}

#[derive(Deserialize)]
struct DocumentId {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "_routing")]
    routing: Option<String>,
}

#[derive(Deserialize)]
struct SearchResponse {
    hits: SearchHits,
    #[serde(default)]
    profile: Option<SearchProfile>,
}

#[derive(Deserialize)]
struct SearchHits {
    #[serde(default)]
    total: Option<TotalHits>,
    hits: Vec<SearchHit>,
}

/// Exact up to `track_total_hits`, a lower bound above.
#[derive(Deserialize)]
struct TotalHits {
    value: u64,
}

#[derive(Deserialize)]
struct SearchHit {
    #[serde(rename = "_source")]
    source: MessageHit,
    #[serde(default)]
    highlight: Option<HighlightedFields>,
}

/// The `profile` of a search: per shard, per search, the top queries with their counts.
#[derive(Deserialize)]
struct SearchProfile {
    shards: Vec<ShardProfile>,
}

#[derive(Deserialize)]
struct ShardProfile {
    searches: Vec<QueriesProfile>,
}

#[derive(Deserialize)]
struct QueriesProfile {
    query: Vec<QueryProfile>,
}

#[derive(Deserialize)]
struct QueryProfile {
    breakdown: QueryBreakdown,
}

/// How often the query's iterator was moved to its next document or advanced to a target.
#[derive(Deserialize)]
struct QueryBreakdown {
    #[serde(default)]
    next_doc_count: u64,
    #[serde(default)]
    advance_count: u64,
}

impl SearchProfile {
    /// The documents the top queries of every shard visited.
    fn visited(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|shard| &shard.searches)
            .flat_map(|search| &search.query)
            .map(|query| query.breakdown.next_doc_count + query.breakdown.advance_count)
            .sum()
    }
}

#[derive(Deserialize)]
struct HighlightedFields {
    #[serde(default)]
    body: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn documents(count: u64, body_chars: usize) -> Vec<MessageDocument> {
        (1..=count)
            .map(|number| MessageDocument {
                application_id: 1,
                chat_number: Number::new(1).expect("positive"),
                number: Number::new(number).expect("positive"),
                body: "\u{1}".repeat(body_chars),
                created_at: crate::store::now(),
                sender: None,
                metadata: None,
                edited_at: None,
                version: 1,
            })
            .collect()
    }

    #[test]
    fn a_batch_of_the_largest_events_goes_in_bulks_under_the_limit_in_order() {
        // 255 events of 43,000 control characters (258 KB of JSON each): 66 MB in one request.
        let batch = documents(255, 43_000);
        let chunks: Vec<&[MessageDocument]> = bulk_requests(&batch).collect();
        assert!(chunks.len() > 1, "{} chunk(s)", chunks.len());
        for chunk in &chunks {
            let bytes: usize = chunk
                .iter()
                .map(|document| document.body.len() * 6 + BULK_DOCUMENT_OVERHEAD_BYTES)
                .sum();
            assert!(bytes <= MAX_BULK_REQUEST_BYTES, "{bytes} bytes");
        }
        let numbers: Vec<u64> = chunks
            .iter()
            .flat_map(|chunk| chunk.iter().map(|document| document.number.get()))
            .collect();
        assert_eq!(numbers, (1..=255).collect::<Vec<_>>());
    }

    #[test]
    fn small_documents_go_in_one_bulk_and_an_oversized_one_alone() {
        assert_eq!(bulk_requests(&documents(500, 200)).count(), 1);
        let oversized = documents(2, MAX_BULK_REQUEST_BYTES);
        let chunks: Vec<usize> = bulk_requests(&oversized).map(<[_]>::len).collect();
        assert_eq!(chunks, [1, 1]);
        assert_eq!(bulk_requests(&[]).count(), 0);
    }
}
