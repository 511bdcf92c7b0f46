//! SQLite FTS5: the [`SearchIndex`] adapter of the embedded mode (`<data dir>/search.db`).
//!
//! FTS5 comes with the SQLite that sqlx bundles, so the embedded mode needs no further
//! dependency, builds in seconds and keeps its index in one file beside the data. Documents live in
//! `search_documents` (with their version, so an older event never replaces a newer body) and
//! triggers keep the FTS5 index in step (see the migration under `migrations/sqlite/search`). The
//! applications purged are remembered, so a late document of one is never written again (in the
//! distributed stack counter-sync purges such a document instead).

use std::collections::HashMap;
use std::path::Path;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use super::{
    Highlight, ItemOutcome, MATCH_END, MATCH_START, MessageDocument, MessageHit, QueryTerms,
    Replacing, SearchError, SearchIndex, matches_as_prefix, query_terms,
};
use crate::domain::{
    Metadata, Number, PagePosition, SearchCursor, SearchRequest, SearchSort, Sender,
};

#[derive(Clone)]
pub struct SqliteSearchIndex {
    pool: SqlitePool,
}

impl SqliteSearchIndex {
    /// Opens (creating and migrating) the index file.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let pool = crate::sqlite::open(path, &crate::sqlite::SEARCH_MIGRATOR, 4).await?;
        Ok(Self { pool })
    }
}

/// Tokens of the body around the matches in a highlight (FTS5 allows 64 at most).
const HIGHLIGHT_TOKENS: i64 = 24;

/// The FTS5 expression: the chat's token, the sender's (its bytes in hex, as the migration
/// indexes it), for each word the word itself or a word starting with it, and each phrase. Query
/// words hold only letters, digits, `_`, `'`, `.` and `,`, never a `"`, so quoting them makes
/// every one a plain phrase (of the tokens FTS5 splits it into).
fn match_expression(
    application_id: u64,
    chat_number: Number,
    sender: Option<&Sender>,
    terms: &QueryTerms,
) -> String {
    let mut expression = chat_expression(application_id, chat_number);
    if let Some(sender) = sender {
        let token: String = sender
            .as_str()
            .bytes()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        expression.push_str(&format!(" AND sender : \"{token}\""));
    }
    for word in &terms.words {
        if matches_as_prefix(word) {
            expression.push_str(&format!(" AND body : (\"{word}\" OR \"{word}\" *)"));
        } else {
            expression.push_str(&format!(" AND body : \"{word}\""));
        }
    }
    for phrase in &terms.phrases {
        expression.push_str(&format!(" AND body : \"{}\"", phrase.join(" ")));
    }
    expression
}

fn chat_expression(application_id: u64, chat_number: Number) -> String {
    format!("chat : \"c{application_id}x{chat_number}\"")
}

/// For each ranking word of the query, the FTS5 expression of the chat's documents that have it
/// whole: a hit's rank is how many of them it is in.
fn whole_word_expressions(
    application_id: u64,
    chat_number: Number,
    terms: &QueryTerms,
) -> Vec<String> {
    let chat = chat_expression(application_id, chat_number);
    terms
        .ranking_words()
        .into_iter()
        .map(|word| format!("{chat} AND body : \"{word}\""))
        .collect()
}

#[async_trait]
impl SearchIndex for SqliteSearchIndex {
    fn kind(&self) -> &'static str {
        "sqlite-fts5"
    }

    async fn ping(&self) -> Result<(), SearchError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn ensure_index(&self) -> Result<(), SearchError> {
        // Created and migrated when the file was opened.
        Ok(())
    }

    async fn bulk_index(
        &self,
        documents: &[MessageDocument],
        replacing: Replacing,
    ) -> Result<Vec<ItemOutcome>, SearchError> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        let mut transaction = crate::sqlite::begin_write(&self.pool).await?;
        for document in documents {
            // A document of a purged application is not written again (a late event of it).
            sqlx::query(
                "INSERT INTO search_documents \
                 (application_id, chat_number, number, body, created_at, sender, metadata, edited_at, version) \
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9 \
                 WHERE NOT EXISTS (SELECT 1 FROM purged_applications WHERE application_id = ?1) \
                 ON CONFLICT (application_id, chat_number, number) DO UPDATE SET \
                 body = excluded.body, created_at = excluded.created_at, sender = excluded.sender, \
                 metadata = excluded.metadata, edited_at = excluded.edited_at, version = excluded.version \
                 WHERE excluded.version > version OR (?10 AND excluded.version = version)",
            )
            .bind(document.application_id as i64)
            .bind(document.chat_number.get() as i64)
            .bind(document.number.get() as i64)
            .bind(&document.body)
            .bind(document.created_at)
            .bind(&document.sender)
            .bind(&document.metadata)
            .bind(document.edited_at)
            .bind(document.version as i64)
            .bind(replacing == Replacing::SameOrOlderVersions)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(vec![ItemOutcome::Done; documents.len()])
    }

    async fn purge_application(&self, application_id: u64) -> Result<u64, SearchError> {
        let mut transaction = crate::sqlite::begin_write(&self.pool).await?;
        sqlx::query("INSERT OR IGNORE INTO purged_applications (application_id) VALUES (?)")
            .bind(application_id as i64)
            .execute(&mut *transaction)
            .await?;
        let purged = sqlx::query("DELETE FROM search_documents WHERE application_id = ?")
            .bind(application_id as i64)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        transaction.commit().await?;
        Ok(purged)
    }

    async fn search(
        &self,
        application_id: u64,
        chat_number: Number,
        request: &SearchRequest,
    ) -> Result<Vec<MessageHit>, SearchError> {
        let terms = query_terms(request.query.as_str());
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let expression = match_expression(
            application_id,
            chat_number,
            request.filter.sender.as_ref(),
            &terms,
        );
        let ranking = match request.sort {
            SearchSort::Relevance => whole_word_expressions(application_id, chat_number, &terms),
            SearchSort::Newest | SearchSort::Oldest => Vec::new(),
        };
        let mut query = hits_query(&expression, &ranking, request);
        let rows: Vec<HitRow> = query.build_query_as().fetch_all(&self.pool).await?;
        let mut highlights = self
            .highlights(&expression, rows.iter().map(|row| row.id))
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                Some(MessageHit {
                    number: Number::new(u64::try_from(row.number).ok()?)?,
                    body: row.body,
                    created_at: row.created_at,
                    sender: row.sender,
                    metadata: row.metadata,
                    edited_at: row.edited_at,
                    highlight: highlights.remove(&row.id).unwrap_or_default(),
                    rank: u32::try_from(row.rank).ok()?,
                })
            })
            .collect())
    }
}

#[derive(sqlx::FromRow)]
struct HitRow {
    id: i64,
    number: i64,
    body: String,
    created_at: DateTime<Utc>,
    sender: Option<Sender>,
    metadata: Option<Metadata>,
    edited_at: Option<DateTime<Utc>>,
    rank: i64,
}

/// The page of hits of `request` matching `expression`, each ranked by how many of the `ranking`
/// expressions it matches (none sorted by number). The creation times are compared as the
/// documents store them (RFC 3339 text in UTC, to the millisecond), which orders as the times do.
fn hits_query(
    expression: &str,
    ranking: &[String],
    request: &SearchRequest,
) -> QueryBuilder<Sqlite> {
    let mut query = QueryBuilder::new("WITH hits AS (SELECT rowid, 0");
    for whole_words in ranking {
        query
            .push(" + (rowid IN (SELECT rowid FROM search_fts WHERE search_fts MATCH ")
            .push_bind(whole_words.clone())
            .push("))");
    }
    query
        .push(" AS rank FROM search_fts WHERE search_fts MATCH ")
        .push_bind(expression.to_owned())
        .push(
            ") SELECT d.id, d.number, d.body, d.created_at, d.sender, d.metadata, d.edited_at, \
             hits.rank FROM hits JOIN search_documents d ON d.id = hits.rowid WHERE true",
        );
    if let Some(after) = request.filter.created.after {
        query.push(" AND d.created_at >= ").push_bind(after);
    }
    if let Some(before) = request.filter.created.before {
        query.push(" AND d.created_at < ").push_bind(before);
    }
    if let PagePosition::AfterHit(cursor) = request.page.position {
        push_after(&mut query, cursor);
    }
    query.push(match request.sort {
        SearchSort::Relevance => " ORDER BY hits.rank DESC, d.number DESC",
        SearchSort::Newest => " ORDER BY d.number DESC",
        SearchSort::Oldest => " ORDER BY d.number",
    });
    let page = request.page;
    query
        .push(" LIMIT ")
        .push_bind(page.fetch_limit() as i64)
        .push(" OFFSET ")
        .push_bind(page.offset() as i64);
    query
}

/// The hits after the cursor's, in the order of its sort.
fn push_after(query: &mut QueryBuilder<Sqlite>, cursor: SearchCursor) {
    let number = cursor.number as i64;
    match cursor.sort {
        SearchSort::Relevance => {
            let rank = i64::from(cursor.rank);
            query
                .push(" AND (hits.rank < ")
                .push_bind(rank)
                .push(" OR (hits.rank = ")
                .push_bind(rank)
                .push(" AND d.number < ")
                .push_bind(number)
                .push("))");
        }
        SearchSort::Newest => {
            query.push(" AND d.number < ").push_bind(number);
        }
        SearchSort::Oldest => {
            query.push(" AND d.number > ").push_bind(number);
        }
    }
}

impl SqliteSearchIndex {
    /// The snippets of the hits of one page, by document id: a second query over those rows
    /// only, since `snippet()` costs a pass over each body it is computed for.
    async fn highlights(
        &self,
        expression: &str,
        ids: impl Iterator<Item = i64>,
    ) -> Result<HashMap<i64, Highlight>, SearchError> {
        let ids: Vec<String> = ids.map(|id| id.to_string()).collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        // The ids are integers from the index itself: listing them inline is safe.
        let rows: Vec<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT rowid, snippet(search_fts, 1, ?, ?, '…', ?) FROM search_fts \
             WHERE search_fts MATCH ? AND rowid IN ({})",
            ids.join(", ")
        )))
        .bind(MATCH_START.to_string())
        .bind(MATCH_END.to_string())
        .bind(HIGHLIGHT_TOKENS)
        .bind(expression)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, fragment)| (id, Highlight::from_marked(&fragment)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_counts_the_ranking_words_found_whole_in_the_chat() {
        let chat = Number::new(7).expect("positive");
        assert_eq!(
            whole_word_expressions(3, chat, &query_terms("Hello a \"big world\" wor")),
            [
                "chat : \"c3x7\" AND body : \"hello\"",
                "chat : \"c3x7\" AND body : \"wor\""
            ]
        );
    }

    #[test]
    fn match_expression_scopes_to_the_chat_and_quotes_every_word() {
        let chat = Number::new(7).expect("positive");
        let terms = query_terms("Hello don't* a \"big World\"");
        assert_eq!(
            match_expression(3, chat, None, &terms),
            "chat : \"c3x7\" AND body : (\"hello\" OR \"hello\" *) AND body : (\"don't\" OR \"don't\" *) AND body : \"a\" AND body : \"big world\""
        );
        let sender = Sender::parse("u:1").expect("valid");
        assert_eq!(
            match_expression(3, chat, Some(&sender), &query_terms("hi")),
            "chat : \"c3x7\" AND sender : \"753a31\" AND body : (\"hi\" OR \"hi\" *)"
        );
    }
}
