//! Search: whole words, prefixes, case, scoping to one chat, update then search, hostile queries.

use std::time::Duration;

use serde_json::{Value, json};
use system_tests::{Client, StatusCode, TestEnv, eventually, search, search_hits};

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
    assert_eq!(keys, ["body", "created_at", "highlight", "number"]);
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
        // Ranks differ: some bodies repeat the word.
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
