//! The request documents of the Elasticsearch adapter (index definition, query, highlight) and
//! the fragment cut out of a highlighted body.

use serde_json::{Value, json};

use crate::domain::{SearchFilter, SearchSort};
use crate::search::{MATCH_END, MATCH_START, MIN_PREFIX_CHARS, QueryTerms, matches_as_prefix};

/// Word prefixes of these lengths are indexed as their own terms; shorter and longer prefixes
/// still match (by expanding terms), a little slower. Fewer indexed prefixes make indexing cheaper.
const MIN_INDEXED_PREFIX_CHARS: usize = MIN_PREFIX_CHARS;
const MAX_INDEXED_PREFIX_CHARS: usize = 8;
/// Words of the highlighted fragment of a hit, as many as the tokens of SQLite's snippet.
const HIGHLIGHT_WORDS: usize = 24;
/// Words of the fragment before its first match.
const WORDS_BEFORE_MATCH: usize = 4;

/// The index uses only what every Elasticsearch node has (no analysis plugins): the standard
/// analyzer (lowercases, splits on word boundaries) and `index_prefixes`, which indexes word
/// prefixes so that prefix queries are single term lookups. Its segments keep their documents
/// sorted by number, highest first ([`INDEX_SORT`]): a search in that order (newest first, and
/// each rank of a relevance search) stops after the first matches of each segment instead of
/// visiting every match.
pub(super) fn index_definition(replicas: u32) -> Value {
    json!({
        "settings": {
            "number_of_shards": 1,
            "number_of_replicas": replicas,
            "index.sort.field": INDEX_SORT.0,
            "index.sort.order": INDEX_SORT.1,
        },
        "mappings": {
            "dynamic": "strict",
            "_routing": {"required": true},
            "properties": mapping_properties(),
        },
    })
}

/// The field and order of the index sort: set when an index is created, never changed after.
pub(super) const INDEX_SORT: (&str, &str) = ("number", "desc");

/// The fields of a document. Put onto an existing index as they are ([`ensure_index`]): fields
/// may be added to a mapping, never changed, so a field once released keeps its definition.
///
/// [`ensure_index`]: crate::search::SearchIndex::ensure_index
pub(super) fn mapping_properties() -> Value {
    json!({
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
        "sender": {"type": "keyword"},
        // Returned with a hit, never searched: any object goes, its keys are not mapped.
        "metadata": {"type": "object", "enabled": false},
        "edited_at": {"type": "date"},
    })
}

/// Every word of the query must match a word of the body, whole or as a prefix, and every
/// phrase its words in a row; with `rank`, the hit must have exactly that many of the query's
/// ranking words whole ([`QueryTerms::ranking_words`]). Nothing is scored: hits are sorted by
/// number. Terms are extracted by [`query_terms`], so no character of the query is ever parsed
/// as query syntax.
///
/// [`query_terms`]: crate::search::query_terms
pub(super) fn query_definition(
    routing: &str,
    terms: &QueryTerms,
    filter: &SearchFilter,
    rank: Option<u32>,
) -> Value {
    if terms.is_empty() {
        return json!({"match_none": {}});
    }
    let words = terms.words.iter().map(|word| {
        if !matches_as_prefix(word) {
            return whole_word(word);
        }
        json!({"bool": {"should": [
            whole_word(word),
            // An explicit rewrite: Elasticsearch 7.17 fails on a prefix shorter than
            // index_prefixes.min_chars without one.
            {"prefix": {"body": {"value": word, "rewrite": "constant_score"}}},
        ]}})
    });
    let mut clauses = filter_clauses(routing, filter);
    clauses.extend(words.chain(terms.phrases.iter().map(|phrase| phrase_query(phrase))));
    let mut query = json!({"bool": {"filter": clauses}});
    if let Some(rank) = rank {
        let ranking = terms.ranking_words();
        if rank > 0 {
            query["bool"]["filter"]
                .as_array_mut()
                .expect("an array")
                .push(whole_words_at_least(&ranking, rank));
        }
        if (rank as usize) < ranking.len() {
            query["bool"]["must_not"] = whole_words_at_least(&ranking, rank + 1);
        }
    }
    query
}

fn whole_word(word: &str) -> Value {
    json!({"term": {"body": word}})
}

/// At least `count` of `words` whole.
fn whole_words_at_least(words: &[&str], count: u32) -> Value {
    let whole: Vec<Value> = words.iter().map(|word| whole_word(word)).collect();
    json!({"bool": {"should": whole, "minimum_should_match": count}})
}

/// The chat, and the sender and creation times the search keeps to (not scored).
fn filter_clauses(routing: &str, filter: &SearchFilter) -> Vec<Value> {
    let mut clauses = vec![json!({"term": {"chat": routing}})];
    if let Some(sender) = &filter.sender {
        clauses.push(json!({"term": {"sender": sender.as_str()}}));
    }
    let mut created = serde_json::Map::new();
    if let Some(after) = filter.created.after {
        created.insert("gte".to_owned(), json!(after));
    }
    if let Some(before) = filter.created.before {
        created.insert("lt".to_owned(), json!(before));
    }
    if !created.is_empty() {
        clauses.push(json!({"range": {"created_at": created}}));
    }
    clauses
}

/// The sort of the hits by number (each rank of a relevance search: newest first, the order of
/// the index); `search_after` is `[number]`.
pub(super) fn sort_definition(sort: SearchSort) -> Value {
    match sort {
        SearchSort::Relevance | SearchSort::Newest => json!([{INDEX_SORT.0: INDEX_SORT.1}]),
        SearchSort::Oldest => json!([{"number": "asc"}]),
    }
}

fn phrase_query(phrase: &[String]) -> Value {
    json!({"match_phrase": {"body": {"query": phrase.join(" ")}}})
}

/// The whole body with the matches marked with [`MATCH_START`]/[`MATCH_END`]; the fragment is cut
/// here ([`fragment_around_first_match`]): the highlighter's own fragments end where a sentence
/// ends, often right after the match. Prefixes are highlighted through a `regexp` of the same
/// prefix: the `prefix` query of the search is answered from the indexed prefixes, which the
/// highlighter does not see.
pub(super) fn highlight_definition(terms: &QueryTerms) -> Value {
    let words = terms.words.iter().map(|word| {
        if matches_as_prefix(word) {
            json!({"regexp": {"body": {"value": format!("{}.*", regexp_literal(word))}}})
        } else {
            json!({"term": {"body": word}})
        }
    });
    let should: Vec<Value> = words
        .chain(terms.phrases.iter().map(|phrase| phrase_query(phrase)))
        .collect();
    json!({
        "pre_tags": [MATCH_START.to_string()],
        "post_tags": [MATCH_END.to_string()],
        "fields": {"body": {
            "type": "unified",
            "number_of_fragments": 0,
            "highlight_query": {"bool": {"should": should}},
        }},
    })
}

/// `word` as a Lucene regular expression that matches it literally.
fn regexp_literal(word: &str) -> String {
    let mut literal = String::with_capacity(word.len() * 2);
    for c in word.chars() {
        if !c.is_alphanumeric() {
            literal.push('\\');
        }
        literal.push(c);
    }
    literal
}

/// [`HIGHLIGHT_WORDS`] words of a marked body, starting a few words before the first match (or
/// at the start), with an ellipsis where the body was cut, as SQLite's `snippet()` has.
pub(super) fn fragment_around_first_match(marked: &str) -> String {
    let words: Vec<(usize, usize)> = word_spans(marked);
    let first_match = words
        .iter()
        .position(|&(start, end)| marked[start..end].contains(MATCH_START))
        .unwrap_or(0);
    let end = (first_match.saturating_sub(WORDS_BEFORE_MATCH) + HIGHLIGHT_WORDS).min(words.len());
    let start = end.saturating_sub(HIGHLIGHT_WORDS);
    let (Some(&(from, _)), Some(&(_, to))) = (words.get(start), words.get(end.wrapping_sub(1)))
    else {
        return marked.to_owned();
    };
    let mut fragment = String::with_capacity(to - from + 6);
    if start > 0 {
        fragment.push('…');
    }
    fragment.push_str(&marked[from..to]);
    if end < words.len() {
        fragment.push('…');
    }
    fragment
}

/// Byte ranges of the whitespace-separated words of `text`.
fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (index, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(from)) => {
                spans.push((from, index));
                start = None;
            }
            (false, None) => start = Some(index),
            _ => {}
        }
    }
    if let Some(from) = start {
        spans.push((from, text.len()));
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CreatedRange, SearchQuery, Sender};
    use crate::search::query_terms;

    #[test]
    fn a_query_without_words_matches_nothing() {
        let query = SearchQuery::parse("!!!").expect("non-blank");
        let definition = query_definition(
            "1:1",
            &query_terms(query.as_str()),
            &SearchFilter::default(),
            Some(0),
        );
        assert_eq!(definition, json!({"match_none": {}}));
    }

    #[test]
    fn a_rank_is_exactly_that_many_ranking_words_whole() {
        let terms = query_terms("hello a wor \"big world\"");
        let ranked = |rank| query_definition("1:1", &terms, &SearchFilter::default(), Some(rank));
        let at_least = |count: u32| {
            json!({"bool": {"should": [
                {"term": {"body": "hello"}},
                {"term": {"body": "wor"}},
            ], "minimum_should_match": count}})
        };
        let top = ranked(2);
        assert_eq!(
            top["bool"]["filter"]
                .as_array()
                .and_then(|clauses| clauses.last()),
            Some(&at_least(2))
        );
        assert!(top["bool"].get("must_not").is_none(), "{top}");
        let bottom = ranked(0);
        assert_eq!(bottom["bool"]["must_not"], at_least(1));
        // The chat, three words, the phrase: no rank clause.
        assert_eq!(bottom["bool"]["filter"].as_array().map(Vec::len), Some(5));
        let unranked = query_definition("1:1", &terms, &SearchFilter::default(), None);
        assert!(unranked["bool"].get("must_not").is_none(), "{unranked}");
        assert_eq!(unranked["bool"]["filter"].as_array().map(Vec::len), Some(5));
    }

    #[test]
    fn filters_keep_to_the_sender_and_the_creation_times() {
        let created = CreatedRange::parse(Some("2025-11-15T00:00:00Z"), None).expect("valid");
        let filter = SearchFilter {
            sender: Some(Sender::parse("u1").expect("valid")),
            created,
        };
        assert_eq!(
            filter_clauses("1:1", &filter),
            [
                json!({"term": {"chat": "1:1"}}),
                json!({"term": {"sender": "u1"}}),
                json!({"range": {"created_at": {"gte": "2025-11-15T00:00:00Z"}}}),
            ]
        );
    }

    #[test]
    fn prefixes_are_highlighted_by_a_literal_regexp() {
        assert_eq!(regexp_literal("3.14"), "3\\.14");
        assert_eq!(regexp_literal("don't"), "don\\'t");
    }

    #[test]
    fn the_fragment_starts_a_few_words_before_the_first_match() {
        let words: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
        let mut marked_words = words.clone();
        marked_words[30] = format!("{MATCH_START}w30{MATCH_END}");
        let fragment = fragment_around_first_match(&marked_words.join(" "));
        let expected = marked_words[26..50].join(" ");
        assert_eq!(fragment, format!("…{expected}…"));
        let short = format!("a {MATCH_START}b{MATCH_END} c");
        assert_eq!(fragment_around_first_match(&short), short);
        let near_the_end = {
            let mut marked = words.clone();
            marked[58] = format!("{MATCH_START}w58{MATCH_END}");
            marked
        };
        assert_eq!(
            fragment_around_first_match(&near_the_end.join(" ")),
            format!("…{}", near_the_end[36..].join(" "))
        );
        assert_eq!(fragment_around_first_match(""), "");
    }
}
