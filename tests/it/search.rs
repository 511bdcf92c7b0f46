//! Search: whole words, prefixes, case, scoping to one chat, update then search, hostile queries.

use std::time::Duration;

use chatcore::domain::{InvalidInput, Metadata, Number, SearchInput, SearchRequest, Sender};
use chatcore::metrics::Metrics;
use chatcore::search::{ItemOutcome, MessageDocument, Replacing, SearchIndex};
use chatcore::store::{ReindexCursor, ReindexScope};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use system_tests::{Client, Reply, Stack, StatusCode, TestEnv, eventually, search, search_hits};
use tokio_util::sync::CancellationToken;

/// Runs a search test on every index: Elasticsearch 8 and 7.17 (both supported) and the
/// embedded SQLite FTS5 index.
macro_rules! on_every_index {
    ($test:ident) => {
        mod $test {
            #[tokio::test]
            async fn on_elasticsearch_8() -> anyhow::Result<()> {
                super::$test(system_tests::TestEnv::new().await?).await
            }

            #[tokio::test]
            async fn on_elasticsearch_7() -> anyhow::Result<()> {
                super::$test(system_tests::TestEnv::on_elasticsearch_7().await?).await
            }

            #[tokio::test]
            async fn embedded() -> anyhow::Result<()> {
                super::$test(system_tests::TestEnv::embedded().await?).await
            }
        }
    };
}

/// The highlight of each hit of a search, by number.
async fn highlights(
    client: &Client,
    token: &str,
    chat: u64,
    query: &str,
) -> anyhow::Result<Vec<(u64, String)>> {
    let mut by_number: Vec<(u64, String)> = search_hits(client, token, chat, query)
        .await?
        .iter()
        .map(|hit| {
            (
                hit["number"].as_u64().unwrap_or_default(),
                hit["highlight"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    by_number.sort();
    Ok(by_number)
}

fn sorted(mut numbers: Vec<u64>) -> Vec<u64> {
    numbers.sort_unstable();
    numbers
}

on_every_index!(search_finds_words_and_prefixes_in_one_chat);

async fn search_finds_words_and_prefixes_in_one_chat(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let other_chat = client.create_chat(token).await?;
    let bodies = [
        "Internationalization is hard",
        "hello world",
        "HELLO again, World!",
        "say hello-world to everyone",
        "nothing relevant here",
    ];
    for body in bodies {
        client.create_message(token, chat, body).await?;
    }
    client
        .create_message(token, other_chat, "hello from another chat")
        .await?;
    let other_token = client.create_application("other").await?;
    let foreign_chat = client.create_chat(&other_token).await?;
    client
        .create_message(&other_token, foreign_chat, "hello from another application")
        .await?;

    // Every message of the three chats is indexed before the assertions (the last one was
    // published last).
    eventually(
        "messages are searchable",
        Duration::from_secs(60),
        || async {
            Ok(search(client, token, chat, "hello").await?.len() == 3
                && search(client, token, other_chat, "hello").await?.len() == 1
                && search(client, &other_token, foreign_chat, "hello")
                    .await?
                    .len()
                    == 1)
        },
    )
    .await?;
    assert_eq!(
        sorted(search(client, token, chat, "hello").await?),
        [2, 3, 4]
    );
    assert_eq!(
        sorted(search(client, token, chat, "HeLLo").await?),
        [2, 3, 4]
    );
    assert_eq!(search(client, token, chat, "internation").await?, [1]);
    assert_eq!(
        search(client, token, chat, "INTERNATIONALIZATION").await?,
        [1]
    );
    assert_eq!(
        sorted(search(client, token, chat, "hel wor").await?),
        [2, 3, 4]
    );
    assert_eq!(search(client, token, chat, "again world").await?, [3]);
    assert!(
        search(client, token, chat, "nationalization")
            .await?
            .is_empty(),
        "infixes do not match"
    );
    assert!(search(client, token, chat, "absent").await?.is_empty());
    assert_eq!(search(client, token, other_chat, "hello").await?, [1]);
    assert_eq!(
        search(client, &other_token, foreign_chat, "hello").await?,
        [1]
    );
    assert_eq!(
        sorted(search(client, token, chat, "world").await?),
        [2, 3, 4]
    );

    let page = client
        .get(&format!(
            "/applications/{token}/chats/{chat}/messages/search?query=hello&per_page=2"
        ))
        .await?;
    assert_eq!(page.body["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(page.body["pagination"]["page"], 1);
    assert_eq!(page.body["pagination"]["next_page"], 2);
    let hit: &Value = &page.body["messages"][0];
    let mut keys: Vec<&String> = hit.as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "body",
            "created_at",
            "edited_at",
            "highlight",
            "metadata",
            "number",
            "sender"
        ]
    );
    assert_eq!(
        (&hit["sender"], &hit["metadata"], &hit["edited_at"]),
        (&Value::Null, &Value::Null, &Value::Null),
        "present, null when absent"
    );
    running.stop().await
}

on_every_index!(phrases_match_words_in_a_row_and_hits_show_where_they_matched);

/// A query in double quotes matches the phrase; every hit carries a fragment with the matches
/// marked, in the same markup on every index (HTML-escaped, `<mark>`, `…` where cut).
async fn phrases_match_words_in_a_row_and_hits_show_where_they_matched(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let filler = |word: &str| vec![word; 40].join(" ");
    let long = format!("{} the needle sits here {}", filler("hay"), filler("straw"));
    let bodies = [
        "the quick brown fox jumps",
        "brown and quick, the fox",
        "<b>Quick</b> & \"co\" it's",
        long.as_str(),
    ];
    for body in bodies {
        client.create_message(token, chat, body).await?;
    }
    eventually("all are searchable", Duration::from_secs(60), || async {
        Ok(search(client, token, chat, "needle").await? == [4]
            && search(client, token, chat, "quick").await?.len() == 3)
    })
    .await?;

    assert_eq!(search(client, token, chat, "\"quick brown\"").await?, [1]);
    assert_eq!(
        search(client, token, chat, "\"brown quick\"").await?,
        Vec::<u64>::new()
    );
    assert_eq!(search(client, token, chat, "fox \"brown and\"").await?, [2]);
    assert_eq!(
        search(client, token, chat, "\"qui\"").await?,
        Vec::<u64>::new(),
        "a quoted word matches whole words only"
    );
    assert_eq!(
        sorted(search(client, token, chat, "\"quick brown fox").await?),
        [1, 2],
        "an unmatched quote is a space"
    );

    assert_eq!(
        highlights(client, token, chat, "qui").await?,
        [
            (1, "the <mark>quick</mark> brown fox jumps".to_owned()),
            (2, "brown and <mark>quick</mark>, the fox".to_owned()),
            (
                3,
                "&lt;b&gt;<mark>Quick</mark>&lt;/b&gt; &amp; &quot;co&quot; it&#39;s".to_owned()
            ),
        ]
    );
    let [(1, phrase)] = &highlights(client, token, chat, "\"quick brown\"").await?[..] else {
        anyhow::bail!("one hit expected");
    };
    assert!(
        phrase.contains("<mark>quick</mark> <mark>brown</mark>")
            || phrase.contains("<mark>quick brown</mark>"),
        "{phrase}"
    );
    let [(4, cut)] = &highlights(client, token, chat, "needle").await?[..] else {
        anyhow::bail!("one hit expected");
    };
    assert!(cut.contains("the <mark>needle</mark> sits here"), "{cut}");
    assert!(
        cut.starts_with('…') && cut.ends_with('…'),
        "cut on both sides: {cut}"
    );
    assert!(
        cut.chars().count() < long.len() / 2,
        "a fragment, not the body: {cut}"
    );
    running.stop().await
}

on_every_index!(an_update_is_what_search_finds);

async fn an_update_is_what_search_finds(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let number = client
        .create_message(token, chat, "original wording")
        .await?;
    eventually(
        "the original is searchable",
        Duration::from_secs(60),
        || async { Ok(search(client, token, chat, "original").await? == [number]) },
    )
    .await?;
    for body in ["first revision", "second revision", "final revision"] {
        // Searchable is not stored yet (the index and the storage are written apart): a message
        // not written yet answers `409 not_persisted_yet`, which the README says to retry.
        let path = format!("/applications/{token}/chats/{chat}/messages/{number}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let reply = loop {
            let reply = client.put(&path, json!({ "body": body })).await?;
            if reply.status != StatusCode::CONFLICT || tokio::time::Instant::now() > deadline {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    eventually(
        "the final body is searchable",
        Duration::from_secs(60),
        || async { Ok(search(client, token, chat, "final").await? == [number]) },
    )
    .await?;
    assert!(search(client, token, chat, "original").await?.is_empty());
    assert!(search(client, token, chat, "second").await?.is_empty());
    let hit = client
        .get(&format!(
            "/applications/{token}/chats/{chat}/messages/search?query=revision"
        ))
        .await?;
    assert_eq!(hit.body["messages"][0]["body"], "final revision");
    running.stop().await
}

on_every_index!(hostile_queries_never_fail);

async fn hostile_queries_never_fail(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let number = client
        .create_message(token, chat, "price is 3.14 dollars, isn't it? (yes) a+b")
        .await?;
    eventually(
        "the message is searchable",
        Duration::from_secs(60),
        || async { Ok(search(client, token, chat, "price").await? == [number]) },
    )
    .await?;
    let hostile = [
        "\"",
        "\"unterminated",
        "(",
        ")",
        "[",
        "{",
        "*",
        "?",
        "~",
        "^2",
        "\\",
        "/",
        "/regex/",
        "a AND",
        "OR",
        "NOT",
        "&&",
        "||",
        "!",
        "-",
        "+",
        ":",
        "field:value",
        "body:price",
        "*:*",
        "price^100",
        "pri*",
        "pr?ce",
        "price~",
        "{\"match_all\":{}}",
        "<script>",
        "'; DROP TABLE messages; --",
        "%",
        "\u{0}",
        "😀",
        "ü",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    ];
    for query in hostile {
        // `search` fails the test on anything but a 200.
        search(client, token, chat, query).await?;
    }
    assert_eq!(search(client, token, chat, "\"price\"").await?, [number]);
    assert_eq!(
        search(client, token, chat, "body:price").await?,
        Vec::<u64>::new(),
        "no field syntax: 'body' is a word"
    );
    assert_eq!(
        search(client, token, chat, "pri*").await?,
        [number],
        "* is not syntax, pri is a prefix"
    );
    assert_eq!(search(client, token, chat, "3.14").await?, [number]);
    assert_eq!(search(client, token, chat, "isn't").await?, [number]);
    running.stop().await
}

on_every_index!(one_letter_words_match_whole_words_only);

/// A one-letter prefix would expand to every word of the index starting with that letter: such
/// words match whole words only, so a query of many of them stays a handful of term lookups.
async fn one_letter_words_match_whole_words_only(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("letters").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    for body in ["a plan", "apple pie", "x marks the spot"] {
        client.create_message(token, chat, body).await?;
    }
    eventually(
        "messages are searchable",
        Duration::from_secs(60),
        || async { Ok(search(client, token, chat, "spot").await? == [3]) },
    )
    .await?;
    assert_eq!(search(client, token, chat, "a").await?, [1], "not apple");
    assert_eq!(
        search(client, token, chat, "ap").await?,
        [2],
        "a prefix of two letters"
    );
    assert_eq!(search(client, token, chat, "x").await?, [3]);
    let started = std::time::Instant::now();
    let many = search(client, token, chat, "a b c d e f g h i j k l m n o p").await?;
    assert!(many.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "sixteen one-letter words took {:?}",
        started.elapsed()
    );
    running.stop().await
}

on_every_index!(search_cursors_walk_every_hit_exactly_once);

/// `next_cursor` pages through the hits in rank order, each hit once, at any depth.
async fn search_cursors_walk_every_hit_exactly_once(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("cursor").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    for index in 0..23 {
        // Some bodies repeat the word: the rank is the same.
        let body = format!("needle {} {index}", "needle ".repeat(index % 3));
        client.create_message(token, chat, &body).await?;
    }
    eventually(
        "messages are searchable",
        Duration::from_secs(60),
        || async {
            let page = client
                .get(&format!(
                    "/applications/{token}/chats/{chat}/messages/search?query=needle&per_page=100"
                ))
                .await?;
            Ok(page.body["messages"].as_array().map(Vec::len) == Some(23))
        },
    )
    .await?;
    let everything = client
        .get(&format!(
            "/applications/{token}/chats/{chat}/messages/search?query=needle&per_page=100"
        ))
        .await?;
    let ranked: Vec<u64> = everything.body["messages"]
        .as_array()
        .expect("array")
        .iter()
        .map(|hit| hit["number"].as_u64().expect("number"))
        .collect();
    assert_eq!(
        ranked,
        (1..=23).rev().collect::<Vec<_>>(),
        "every hit has the word whole: one rank, the newest first"
    );
    let mut walked = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = client
            .get(&format!(
                "/applications/{token}/chats/{chat}/messages/search?query=needle&per_page=5{cursor}"
            ))
            .await?;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        walked.extend(
            page.body["messages"]
                .as_array()
                .expect("array")
                .iter()
                .map(|hit| hit["number"].as_u64().expect("number")),
        );
        match page.body["pagination"]["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(
        walked, ranked,
        "the cursor walk is the ranking, each hit once"
    );
    let forged = client
        .get(&format!(
            "/applications/{token}/chats/{chat}/messages/search?query=needle&cursor=forged"
        ))
        .await?;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST);
    running.stop().await
}

on_every_index!(relevance_ranks_whole_words_first_then_the_newest);

/// A hit with more query words whole ranks above one with fewer (a whole-word hit above a newer
/// prefix-only one); among equal ranks the newest comes first. Walks by cursor and by page number
/// (pages of 4, ties across their ends) return the same order, each hit once, on every index.
async fn relevance_ranks_whole_words_first_then_the_newest(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("ranks").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let bodies = [
        "alpha beta",
        "alphabet beta",
        "alpha betamax",
        "alphabet betamax",
        "alpha beta again",
        "alphanumeric betas",
        "alpha alone",
    ];
    let fixtures: Vec<FilterFixture> = bodies
        .iter()
        .zip(1..)
        .map(|(body, number)| FilterFixture {
            number,
            sender: None,
            created_at: fixture_epoch(),
            body: (*body).to_owned(),
            metadata: None,
            edited_at: None,
        })
        .collect();
    let application_id = env.application_id(token).await?;
    index_fixtures(&env, application_id, chat, &fixtures).await?;
    eventually_hits(client, token, chat, &[("query", "alph")], bodies.len()).await?;
    let expectations: [(&str, &[u64]); 5] = [
        // Both whole (5, 1), one (3, 2), none (6, 4).
        ("alpha beta", &[5, 1, 3, 2, 6, 4]),
        ("beta alpha", &[5, 1, 3, 2, 6, 4]),
        // Whole (7, 5, 3, 1), then the newest prefix-only ones (6, 4, 2).
        ("alpha", &[7, 5, 3, 1, 6, 4, 2]),
        // Prefixes only: one rank, the newest first.
        ("alph", &[7, 6, 5, 4, 3, 2, 1]),
        // A phrase is whole in every hit: the word ranks.
        ("\"alpha beta\" again", &[5]),
    ];
    for (query, expected) in expectations {
        let parameters = [("query", query)];
        let mut everything = parameters.to_vec();
        everything.push(("per_page", "100"));
        let page = search_ok(client, token, chat, &everything).await?;
        assert_eq!(hit_numbers(&page), expected, "{query}");
        assert_eq!(
            walk_cursors(client, token, chat, &parameters).await?,
            expected,
            "cursors through {query}"
        );
        assert_eq!(
            walk_pages(client, token, chat, &parameters).await?,
            expected,
            "pages through {query}"
        );
    }
    running.stop().await
}

mod a_page_of_a_rank_visits_about_its_hits {
    #[tokio::test]
    async fn on_elasticsearch_8() -> anyhow::Result<()> {
        super::a_page_of_a_rank_visits_about_its_hits(system_tests::TestEnv::new().await?).await
    }

    #[tokio::test]
    async fn on_elasticsearch_7() -> anyhow::Result<()> {
        let env = system_tests::TestEnv::on_elasticsearch_7().await?;
        super::a_page_of_a_rank_visits_about_its_hits(env).await
    }
}

/// The index this release creates is sorted by number, so a page of a relevance search (each rank
/// newest first) visits about as many documents as it returns, however many match (the
/// profile's count); a search in the other order (oldest first) visits far more.
async fn a_page_of_a_rank_visits_about_its_hits(env: TestEnv) -> anyhow::Result<()> {
    const MATCHES: u64 = 3_000;
    /// One document in this many has the query's word whole.
    const WHOLE_EVERY: u64 = 300;
    let index = chatcore::adapters::elasticsearch(&env.config())?;
    index.ensure_index().await?;
    assert!(index.sorted_by_number().await?, "a new index is sorted");
    let (application_id, chat) = (1, Number::new(1).expect("positive"));
    let documents: Vec<MessageDocument> = (1..=MATCHES)
        .map(|number| MessageDocument {
            application_id,
            chat_number: chat,
            number: Number::new(number).expect("positive"),
            body: if number % WHOLE_EVERY == 0 {
                format!("kal kalo{number}")
            } else {
                format!("kalo{number} filler")
            },
            created_at: fixture_epoch(),
            sender: None,
            metadata: None,
            edited_at: None,
            version: 1,
        })
        .collect();
    let outcomes = index
        .bulk_index(&documents, Replacing::OlderVersions)
        .await?;
    assert!(outcomes.iter().all(|outcome| *outcome == ItemOutcome::Done));
    index.refresh().await?;
    let request = |sort: &str| {
        SearchRequest::parse(
            SearchInput {
                query: Some("kal"),
                sort: Some(sort),
                ..SearchInput::default()
            },
            25,
            100,
        )
    };
    let relevance = request("relevance")?;
    let hits: Vec<u64> = index
        .search(application_id, chat, &relevance)
        .await?
        .iter()
        .map(|hit| hit.number.get())
        .collect();
    let whole = (1..=MATCHES / WHOLE_EVERY).rev().map(|n| n * WHOLE_EVERY);
    let prefix_only = (1..=MATCHES).rev().filter(|n| n % WHOLE_EVERY != 0);
    let expected: Vec<u64> = whole.chain(prefix_only).take(26).collect();
    assert_eq!(hits, expected, "the whole words, then the newest prefixes");
    let visited = index
        .visited_documents(application_id, chat, &relevance)
        .await?;
    let oldest_first = index
        .visited_documents(application_id, chat, &request("oldest")?)
        .await?;
    eprintln!("visited: {visited} by relevance, {oldest_first} oldest first, of {MATCHES} matches");
    assert!(
        visited <= 200,
        "{visited} documents visited for a page of 26"
    );
    assert!(
        oldest_first > 10 * visited,
        "{oldest_first} against {visited}"
    );
    Ok(())
}

/// The messages of the filter and sort tests, written straight into the chat's index (so their
/// senders and creation times are the test's to choose), the same on every index.
struct FilterFixture {
    number: u64,
    sender: Option<&'static str>,
    created_at: DateTime<Utc>,
    body: String,
    metadata: Option<Value>,
    edited_at: Option<DateTime<Utc>>,
}

/// The start of the fixture's times.
fn fixture_epoch() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2025-11-15T08:00:00Z")
        .expect("valid")
        .with_timezone(&Utc)
}

/// 30 messages: three senders in turn (every seventh without one), two messages a minute (so a
/// time bound falls on two at once), `needle` repeated for different ranks, and every fifth
/// without it.
fn filter_fixtures() -> Vec<FilterFixture> {
    let senders = ["alice", "bob", "carol:1@example.com"];
    (1..=30u64)
        .map(|number| FilterFixture {
            number,
            sender: (number % 7 != 0).then(|| senders[(number % 3) as usize]),
            created_at: fixture_epoch() + chrono::Duration::minutes((number / 2) as i64),
            body: if number % 5 == 0 {
                format!("only hay {number}")
            } else {
                format!(
                    "{}hay {number}",
                    "needle ".repeat((number % 4 + 1) as usize)
                )
            },
            metadata: (number % 4 == 0).then(|| json!({"n": number, "tags": ["a", "b"]})),
            edited_at: (number % 6 == 0).then(|| fixture_epoch() + chrono::Duration::hours(1)),
        })
        .collect()
}

/// Writes the fixtures as the index consumer writes messages.
async fn index_fixtures(
    env: &TestEnv,
    application_id: u64,
    chat: u64,
    fixtures: &[FilterFixture],
) -> anyhow::Result<()> {
    let index = chatcore::adapters::search(&env.config(), &Metrics::new()).await?;
    let chat_number = Number::new(chat).expect("positive");
    let documents: Vec<MessageDocument> = fixtures
        .iter()
        .map(|fixture| {
            Ok(MessageDocument {
                application_id,
                chat_number,
                number: Number::new(fixture.number).expect("positive"),
                body: fixture.body.clone(),
                created_at: fixture.created_at,
                sender: fixture.sender.map(Sender::parse).transpose()?,
                metadata: fixture.metadata.as_ref().map(Metadata::parse).transpose()?,
                edited_at: fixture.edited_at,
                version: 1,
            })
        })
        .collect::<Result<_, InvalidInput>>()?;
    let outcomes = index
        .bulk_index(&documents, Replacing::OlderVersions)
        .await?;
    anyhow::ensure!(
        outcomes.iter().all(|outcome| *outcome == ItemOutcome::Done),
        "{outcomes:?}"
    );
    Ok(())
}

/// One search page as the API answers it.
async fn search_page(
    client: &Client,
    token: &str,
    chat: u64,
    parameters: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    client
        .send_raw(
            client
                .request(
                    reqwest::Method::GET,
                    &format!("/applications/{token}/chats/{chat}/messages/search"),
                )
                .query(parameters),
        )
        .await
}

/// One search page that must be answered `200` (a `503` of a loaded machine is an error, which
/// `eventually` retries, never an empty page).
async fn search_ok(
    client: &Client,
    token: &str,
    chat: u64,
    parameters: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let page = search_page(client, token, chat, parameters).await?;
    anyhow::ensure!(page.status == StatusCode::OK, "{parameters:?}: {page:?}");
    Ok(page)
}

fn hit_numbers(page: &Reply) -> Vec<u64> {
    page.body["messages"]
        .as_array()
        .map(|hits| {
            hits.iter()
                .filter_map(|hit| hit["number"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// Every hit of a search, walked by `next_cursor` pages of 4.
async fn walk_cursors(
    client: &Client,
    token: &str,
    chat: u64,
    parameters: &[(&str, &str)],
) -> anyhow::Result<Vec<u64>> {
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut with_page = parameters.to_vec();
        with_page.push(("per_page", "4"));
        if let Some(cursor) = &cursor {
            with_page.push(("cursor", cursor));
        }
        let page = search_page(client, token, chat, &with_page).await?;
        anyhow::ensure!(page.status == StatusCode::OK, "{parameters:?}: {page:?}");
        walked.extend(hit_numbers(&page));
        match page.body["pagination"]["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(walked),
        }
    }
}

/// Every hit of a search, walked by page numbers of 4.
async fn walk_pages(
    client: &Client,
    token: &str,
    chat: u64,
    parameters: &[(&str, &str)],
) -> anyhow::Result<Vec<u64>> {
    let mut walked = Vec::new();
    for page_number in 1.. {
        let page_number = page_number.to_string();
        let mut with_page = parameters.to_vec();
        with_page.extend([("per_page", "4"), ("page", page_number.as_str())]);
        let page = search_page(client, token, chat, &with_page).await?;
        anyhow::ensure!(page.status == StatusCode::OK, "{parameters:?}: {page:?}");
        walked.extend(hit_numbers(&page));
        if page.body["pagination"]["next_page"].is_null() {
            return Ok(walked);
        }
    }
    unreachable!("the pages end")
}

/// A filter of the tests: its parameters, and which fixtures it keeps.
#[derive(Default)]
struct Filter {
    sender: Option<&'static str>,
    /// Minutes after [`fixture_epoch`].
    after_minute: Option<i64>,
    before_minute: Option<i64>,
}

impl Filter {
    fn sender(sender: &'static str) -> Self {
        Self {
            sender: Some(sender),
            ..Self::default()
        }
    }

    fn parameters(&self) -> Vec<(&'static str, String)> {
        let at = |minutes: i64| (fixture_epoch() + chrono::Duration::minutes(minutes)).to_rfc3339();
        let mut parameters = Vec::new();
        parameters.extend(self.sender.map(|sender| ("sender", sender.to_owned())));
        parameters.extend(
            self.after_minute
                .map(|minutes| ("created_after", at(minutes))),
        );
        parameters.extend(
            self.before_minute
                .map(|minutes| ("created_before", at(minutes))),
        );
        parameters
    }

    fn keeps(&self, fixture: &FilterFixture) -> bool {
        let minute = (fixture.created_at - fixture_epoch()).num_minutes();
        self.sender
            .is_none_or(|sender| fixture.sender == Some(sender))
            && self.after_minute.is_none_or(|after| minute >= after)
            && self.before_minute.is_none_or(|before| minute < before)
    }
}

on_every_index!(filters_and_sorts_give_the_same_hits_on_every_index);

/// Sender and time filters, alone and together, in every sort: the hits are exactly the
/// fixtures that match, in the order of the sort (the same order on every index), and a walk by
/// cursor or by page number returns each hit once, in the order of the whole list.
async fn filters_and_sorts_give_the_same_hits_on_every_index(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("filters").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let fixtures = filter_fixtures();
    let application_id = env.application_id(token).await?;
    index_fixtures(&env, application_id, chat, &fixtures).await?;
    let all = [("query", "needle"), ("per_page", "100")];
    eventually_hits(client, token, chat, &all, needles(&fixtures)).await?;

    let filters = [
        Filter::default(),
        Filter::sender("alice"),
        Filter::sender("carol:1@example.com"),
        Filter::sender("carol"),
        Filter {
            after_minute: Some(4),
            ..Filter::default()
        },
        Filter {
            before_minute: Some(11),
            ..Filter::default()
        },
        Filter {
            after_minute: Some(4),
            before_minute: Some(11),
            ..Filter::sender("bob")
        },
    ];
    for filter in &filters {
        let expected: Vec<u64> = fixtures
            .iter()
            .filter(|fixture| fixture.body.contains("needle") && filter.keeps(fixture))
            .map(|fixture| fixture.number)
            .collect();
        for sort in ["relevance", "newest", "oldest"] {
            let owned = filter.parameters();
            let mut parameters: Vec<(&str, &str)> = owned
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            parameters.extend([("query", "needle"), ("sort", sort)]);
            let mut everything = parameters.clone();
            everything.push(("per_page", "100"));
            let page = search_page(client, token, chat, &everything).await?;
            assert_eq!(page.status, StatusCode::OK, "{parameters:?}: {page:?}");
            let hits = hit_numbers(&page);
            match sort {
                "newest" => assert_eq!(
                    hits,
                    expected.iter().rev().copied().collect::<Vec<_>>(),
                    "{parameters:?}"
                ),
                "oldest" => assert_eq!(hits, expected, "{parameters:?}"),
                // Every hit has `needle` whole: one rank, the newest first.
                _ => assert_eq!(
                    hits,
                    expected.iter().rev().copied().collect::<Vec<_>>(),
                    "{parameters:?}"
                ),
            }
            assert_eq!(
                walk_cursors(client, token, chat, &parameters).await?,
                hits,
                "cursors through {parameters:?}"
            );
            assert_eq!(
                walk_pages(client, token, chat, &parameters).await?,
                hits,
                "pages through {parameters:?}"
            );
        }
    }

    // Every hit shows its sender, metadata and first edit, null when it has none.
    let page = search_ok(
        client,
        token,
        chat,
        &[("query", "needle"), ("sort", "oldest"), ("per_page", "100")],
    )
    .await?;
    for hit in page.body["messages"].as_array().expect("hits") {
        let mut keys: Vec<&String> = hit.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "body",
                "created_at",
                "edited_at",
                "highlight",
                "metadata",
                "number",
                "sender"
            ]
        );
        let number = hit["number"].as_u64().expect("number");
        let fixture = &fixtures[number as usize - 1];
        assert_eq!(hit["sender"], json!(fixture.sender), "{hit}");
        assert_eq!(
            hit["metadata"],
            fixture.metadata.clone().unwrap_or(Value::Null)
        );
        let edited_at = fixture
            .edited_at
            .map(|at| at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string());
        assert_eq!(hit["edited_at"], json!(edited_at), "{hit}");
    }
    running.stop().await
}

on_every_index!(bad_search_parameters_are_refused_by_name);

/// A bad filter, sort or cursor is a 400 naming the parameter, and the search after it answers
/// as before. A cursor continues only the sort it was handed out for (relevance when `sort` is
/// left out); a relevance cursor of the releases that ranked by score is refused.
async fn bad_search_parameters_are_refused_by_name(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("refusals").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let fixtures = filter_fixtures();
    let application_id = env.application_id(token).await?;
    index_fixtures(&env, application_id, chat, &fixtures).await?;
    let all = [("query", "needle"), ("per_page", "100")];
    let before = eventually_hits(client, token, chat, &all, needles(&fixtures)).await?;

    let cursor_of = |sort: &'static str| async move {
        let page = search_page(
            client,
            token,
            chat,
            &[("query", "needle"), ("per_page", "2"), ("sort", sort)],
        )
        .await?;
        page.body["pagination"]["next_cursor"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no cursor: {page:?}"))
    };
    let (newest, relevance) = (cursor_of("newest").await?, cursor_of("relevance").await?);
    let refused: [(&[(&str, &str)], &str); 11] = [
        (&[("sender", "not a sender")], "sender"),
        (&[("sender", "")], "sender"),
        (&[("created_after", "yesterday")], "created_after"),
        (&[("created_before", "2025-11-15")], "created_before"),
        (
            &[
                ("created_after", "2025-11-15T10:00:00Z"),
                ("created_before", "2025-11-15T11:00:00+01:00"),
            ],
            "created_before",
        ),
        (&[("sort", "random")], "sort"),
        (&[("sort", "oldest"), ("cursor", &newest)], "cursor"),
        (&[("cursor", &newest)], "cursor"),
        (&[("sort", "newest"), ("cursor", &relevance)], "cursor"),
        (&[("cursor", "forged")], "cursor"),
        // `1.5:42`: a relevance cursor of the releases that ranked by score.
        (&[("cursor", "MS41OjQy")], "cursor"),
    ];
    for (parameters, field) in refused {
        let mut with_query = parameters.to_vec();
        with_query.push(("query", "needle"));
        let reply = search_page(client, token, chat, &with_query).await?;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{parameters:?}: {reply:?}"
        );
        assert_eq!(
            reply.body["error"]["field"], field,
            "{parameters:?}: {reply:?}"
        );
    }
    for (sort, cursor) in [
        (None, &relevance),
        (Some("relevance"), &relevance),
        (Some("newest"), &newest),
    ] {
        let mut parameters = vec![("query", "needle"), ("cursor", cursor.as_str())];
        parameters.extend(sort.map(|sort| ("sort", sort)));
        let reply = search_page(client, token, chat, &parameters).await?;
        assert_eq!(reply.status, StatusCode::OK, "{parameters:?}: {reply:?}");
    }
    let after = search_ok(client, token, chat, &all).await?;
    assert_eq!(hit_numbers(&after), before, "the refusals changed nothing");
    running.stop().await
}

/// How many fixtures a search for `needle` finds.
fn needles(fixtures: &[FilterFixture]) -> usize {
    fixtures
        .iter()
        .filter(|fixture| fixture.body.contains("needle"))
        .count()
}

/// The hits of a search once it finds `count` of them.
async fn eventually_hits(
    client: &Client,
    token: &str,
    chat: u64,
    parameters: &[(&str, &str)],
    count: usize,
) -> anyhow::Result<Vec<u64>> {
    eventually(
        "the fixtures are searchable",
        Duration::from_secs(60),
        || async {
            Ok(hit_numbers(&search_ok(client, token, chat, parameters).await?).len() == count)
        },
    )
    .await?;
    Ok(hit_numbers(
        &search_ok(client, token, chat, parameters).await?,
    ))
}

on_every_index!(an_index_of_the_previous_release_gets_the_new_fields);

/// An index created by the release before sender and metadata (Elasticsearch: its mapping;
/// FTS5: its migrations) keeps its documents searchable and takes the new fields once
/// `ensure_index` ran (FTS5: once the file is opened), and a sender filter finds the documents
/// written with one.
async fn an_index_of_the_previous_release_gets_the_new_fields(env: TestEnv) -> anyhow::Result<()> {
    let mut env = env;
    let (application_id, chat) = (7, Number::new(3).expect("positive"));
    let old_document = json!({
        "application_id": application_id, "chat_number": 3, "chat": "7:3", "number": 1,
        "body": "written before senders", "created_at": "2025-11-15T08:00:00.000Z",
    });
    let old_index = match env.stack() {
        Stack::Services => {
            let name = format!("{}-previous-release", env.id);
            let url = format!("{}/{name}", env.settings["ELASTICSEARCH_URL"]);
            let http = reqwest::Client::new();
            http.put(&url)
                .json(&previous_release_index())
                .send()
                .await?
                .error_for_status()?;
            http.put(format!(
                "{url}/_doc/7:3:1?routing=7:3&version=1&version_type=external&refresh=true"
            ))
            .json(&old_document)
            .send()
            .await?
            .error_for_status()?;
            env.set("CHAT_ES_INDEX", &name);
            Some((http, url))
        }
        Stack::Embedded => {
            let data_dir = std::path::PathBuf::from(&env.settings["CHAT_DATA_DIR"]);
            std::fs::create_dir_all(&data_dir)?;
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(data_dir.join("search.db"))
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await?;
            chatcore::store::migrations_before(
                &chatcore::sqlite::SEARCH_MIGRATOR,
                SENDER_MIGRATION,
            )
            .run(&pool)
            .await?;
            sqlx::query(
                "INSERT INTO search_documents (application_id, chat_number, number, body, created_at, version) \
                 VALUES (7, 3, 1, 'written before senders', '2025-11-15T08:00:00+00:00', 1)",
            )
            .execute(&pool)
            .await?;
            pool.close().await;
            None
        }
    };

    let index = chatcore::adapters::search(&env.config(), &Metrics::new()).await?;
    index.ensure_index().await?;
    if let Some((http, url)) = &old_index {
        let mapping: Value = http
            .get(format!("{url}/_mapping"))
            .send()
            .await?
            .json()
            .await?;
        let properties = &mapping
            .as_object()
            .and_then(|indices| indices.values().next())
            .expect("the index")["mappings"]["properties"];
        assert_eq!(properties["sender"]["type"], "keyword", "{mapping}");
        assert_eq!(properties["metadata"]["enabled"], false, "{mapping}");
        assert_eq!(properties["edited_at"]["type"], "date", "{mapping}");
        let unsorted = chatcore::adapters::elasticsearch(&env.config())?;
        assert!(
            !unsorted.sorted_by_number().await?,
            "an index of an earlier release keeps its order (searches on it still work, below)"
        );
    }
    let written = MessageDocument {
        application_id,
        chat_number: chat,
        number: Number::new(2).expect("positive"),
        body: "written with a sender".to_owned(),
        created_at: fixture_epoch(),
        sender: Some(Sender::parse("u:2")?),
        metadata: Some(Metadata::parse(&json!({"k": "v"}))?),
        edited_at: None,
        version: 1,
    };
    assert_eq!(
        index
            .bulk_index(&[written], Replacing::OlderVersions)
            .await?,
        [ItemOutcome::Done]
    );
    let request = |sender: Option<&str>| {
        SearchRequest::parse(
            SearchInput {
                query: Some("written"),
                sender,
                sort: Some("oldest"),
                ..SearchInput::default()
            },
            25,
            100,
        )
    };
    let found = |request: SearchRequest| {
        let index = std::sync::Arc::clone(&index);
        async move {
            let hits = index.search(application_id, chat, &request).await?;
            Ok::<_, anyhow::Error>(
                hits.into_iter()
                    .map(|hit| (hit.number.get(), hit.sender.map(|s| s.as_str().to_owned())))
                    .collect::<Vec<_>>(),
            )
        }
    };
    eventually(
        "both documents are searchable",
        Duration::from_secs(60),
        || async { Ok(found(request(None)?).await?.len() == 2) },
    )
    .await?;
    assert_eq!(
        found(request(None)?).await?,
        [(1, None), (2, Some("u:2".to_owned()))]
    );
    assert_eq!(
        found(request(Some("u:2"))?).await?,
        [(2, Some("u:2".to_owned()))]
    );
    if let Some((http, url)) = old_index {
        http.delete(url).send().await?.error_for_status()?;
    }
    Ok(())
}

/// The FTS5 migration that added the sender, metadata and edited_at.
const SENDER_MIGRATION: i64 = 20261210000001;

/// The index definition of the release before sender and metadata.
fn previous_release_index() -> Value {
    json!({
        "settings": {"number_of_shards": 1, "number_of_replicas": 0},
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
                    "index_prefixes": {"min_chars": 2, "max_chars": 8},
                },
                "created_at": {"type": "date"},
            },
        },
    })
}

/// Posts a message with `fields` (a body and whatever else) and returns its number.
async fn post_message(
    client: &Client,
    token: &str,
    chat: u64,
    fields: Value,
) -> anyhow::Result<u64> {
    let reply = client
        .post(
            &format!("/applications/{token}/chats/{chat}/messages"),
            fields,
        )
        .await?;
    anyhow::ensure!(reply.status == StatusCode::ACCEPTED, "{reply:?}");
    reply.body["number"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no number: {reply:?}"))
}

on_every_index!(a_message_s_sender_metadata_and_edit_reach_its_hits);

/// What a message is posted and edited with is what its hits show, and what the filters find.
async fn a_message_s_sender_metadata_and_edit_reach_its_hits(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("who said it").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let signed = post_message(
        client,
        token,
        chat,
        json!({"body": "launch plan", "sender": "u:42", "metadata": {"client": "web"}}),
    )
    .await?;
    let unsigned = post_message(client, token, chat, json!({"body": "launch party"})).await?;
    let launch = [("query", "launch"), ("sort", "newest")];
    assert_eq!(
        eventually_hits(client, token, chat, &launch, 2).await?,
        [unsigned, signed]
    );
    let of_sender = search_ok(
        client,
        token,
        chat,
        &[("query", "launch"), ("sender", "u:42")],
    )
    .await?;
    assert_eq!(hit_numbers(&of_sender), [signed], "{of_sender:?}");
    let hit = &of_sender.body["messages"][0];
    assert_eq!(
        (&hit["sender"], &hit["metadata"], &hit["edited_at"]),
        (&json!("u:42"), &json!({"client": "web"}), &Value::Null),
        "{hit}"
    );

    let path = format!("/applications/{token}/chats/{chat}/messages/{signed}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let edited = loop {
        let reply = client
            .put(&path, json!({"body": "launch plan, revised"}))
            .await?;
        if reply.status != StatusCode::CONFLICT || tokio::time::Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(edited.status, StatusCode::OK, "{edited:?}");
    let revised = [("query", "revised"), ("sender", "u:42")];
    assert_eq!(
        eventually_hits(client, token, chat, &revised, 1).await?,
        [signed]
    );
    let hit = &search_ok(client, token, chat, &revised).await?.body["messages"][0];
    assert_eq!(
        (&hit["sender"], &hit["metadata"], &hit["edited_at"]),
        (
            &json!("u:42"),
            &json!({"client": "web"}),
            &edited.body["edited_at"]
        ),
        "{hit}"
    );
    assert!(hit["edited_at"].is_string(), "{edited:?}");
    running.stop().await
}

on_every_index!(reindex_fills_in_what_an_older_indexer_left_out);

/// The upgrade path of the README: a document written without its sender and metadata (by an
/// indexer of the release before) gets them from `api reindex`, at the same version.
async fn reindex_fills_in_what_an_older_indexer_left_out(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("backfill").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let number = post_message(
        client,
        token,
        chat,
        json!({"body": "backfilled words", "sender": "u:9", "metadata": {"k": 1}}),
    )
    .await?;
    let of_sender = [("query", "backfilled"), ("sender", "u:9")];
    eventually_hits(client, token, chat, &of_sender, 1).await?;

    let config = env.config();
    let metrics = Metrics::new();
    let index = chatcore::adapters::search(&config, &metrics).await?;
    let application_id = env.application_id(token).await?;
    let chat_number = Number::new(chat).expect("positive");
    let as_an_older_indexer_wrote_it = MessageDocument {
        application_id,
        chat_number,
        number: Number::new(number).expect("positive"),
        body: "backfilled words".to_owned(),
        created_at: chatcore::store::now(),
        sender: None,
        metadata: None,
        edited_at: None,
        version: 1,
    };
    index
        .bulk_index(
            &[as_an_older_indexer_wrote_it],
            Replacing::SameOrOlderVersions,
        )
        .await?;
    eventually_hits(client, token, chat, &of_sender, 0).await?;

    let storage = chatcore::adapters::storage(&config, &metrics).await?;
    let progress = chatcore::pipeline::reindex(
        storage.as_ref(),
        index.as_ref(),
        ReindexScope::Chat(application_id, chat_number),
        ReindexCursor::default(),
        &CancellationToken::new(),
        |_| {},
    )
    .await?;
    assert_eq!(progress.indexed, 1);
    assert_eq!(
        eventually_hits(client, token, chat, &of_sender, 1).await?,
        [number]
    );
    let hit = &search_ok(client, token, chat, &of_sender).await?.body["messages"][0];
    assert_eq!(hit["metadata"], json!({"k": 1}), "{hit}");
    running.stop().await
}
