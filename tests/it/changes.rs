//! The change log of a chat, as the live stream and the replay API read it: every stored change
//! of a message once, in the order of its sequence, from any point.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use system_tests::{Next, StatusCode, TestEnv, both_stacks};

const WAIT: Duration = Duration::from_secs(30);

both_stacks!(a_stream_resumed_after_an_edit_gets_exactly_the_changes_it_missed);

/// The resume probe: a client that saw three messages comes back after an edit of the first and
/// the deletion of the second, made while it was away: it gets those two changes and what follows,
/// once each, in the order they were stored, and nothing it had seen.
async fn a_stream_resumed_after_an_edit_gets_exactly_the_changes_it_missed(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let mut stream = client.open_stream(token, chat, None).await?;
    for body in ["one", "two", "three"] {
        client.create_message(token, chat, body).await?;
    }
    let mut last_seen = 0;
    for expected in 1..=3 {
        let event = stream.expect_event(WAIT).await?;
        assert_eq!((event.number()?, event.sequence()?), (expected, expected));
        last_seen = event.sequence()?;
    }
    drop(stream);

    let message = |number: u64| format!("/applications/{token}/chats/{chat}/messages/{number}");
    let edited = client
        .put(&message(1), json!({"body": "one, edited"}))
        .await?;
    assert_eq!(edited.status, StatusCode::OK, "{edited:?}");
    assert_eq!(
        client.delete(&message(2)).await?.status,
        StatusCode::NO_CONTENT
    );
    let mut resumed = client
        .stream(token, chat, Some(last_seen))
        .await?
        .map_err(|reply| anyhow::anyhow!("refused: {reply:?}"))?;
    client.create_message(token, chat, "four").await?;
    let mut received = Vec::new();
    for _ in 0..3 {
        let event = resumed.expect_event(WAIT).await?;
        received.push((
            event.sequence()?,
            event.event.clone(),
            event.number()?,
            event.data["body"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    assert_eq!(
        received,
        [
            (4, "updated".to_owned(), 1, "one, edited".to_owned()),
            (5, "deleted".to_owned(), 2, String::new()),
            (6, "created".to_owned(), 4, "four".to_owned()),
        ]
    );
    assert!(
        matches!(resumed.next(Duration::from_millis(500)).await?, Next::Quiet),
        "nothing seen before comes again"
    );
    drop(resumed);
    running.stop().await
}

both_stacks!(the_change_log_walks_every_change_exactly_once_while_changes_pour_in);

/// A backend follows a chat through `GET .../changes?after=` while messages are posted, edited and
/// deleted: it reads every change exactly once, in sequence order without a gap, and what it
/// rebuilt from them is what the chat holds.
async fn the_change_log_walks_every_change_exactly_once_while_changes_pour_in(
    env: TestEnv,
) -> anyhow::Result<()> {
    const MESSAGES: u64 = 120;
    const EDITED: u64 = 20;
    const DELETED: u64 = 10;
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let changing = {
        let (client, token) = (client.clone(), token.clone());
        tokio::spawn(async move {
            for index in 0..MESSAGES {
                let body = format!("message {index}");
                let key = format!("log-{index}");
                client
                    .create_message_carefully(&token, chat, &body, &key)
                    .await?;
            }
            // Edits and deletions of older messages while the batches are still written, each
            // retried only while its message is not stored yet (409): a 503 (a deadlock between
            // the api's write and a batch, for one) fails the test.
            for number in 1..=EDITED + DELETED {
                let path = format!("/applications/{token}/chats/{chat}/messages/{number}");
                let deadline = tokio::time::Instant::now() + WAIT;
                loop {
                    let status = if number <= EDITED {
                        let body = json!({"body": format!("edited {number}")});
                        client.put(&path, body).await?.status
                    } else {
                        client.delete(&path).await?.status
                    };
                    if status.is_success() {
                        break;
                    }
                    anyhow::ensure!(
                        status == StatusCode::CONFLICT && tokio::time::Instant::now() < deadline,
                        "the change of message {number} answered {status}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            anyhow::Ok(())
        })
    };
    // Read on until every change is there: all messages created, the edits and deletions made.
    let mut changes: Vec<Value> = Vec::new();
    let mut after = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let page = client
            .get(&format!(
                "/applications/{token}/chats/{chat}/changes?after={after}&per_page=7"
            ))
            .await?;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let read = page.body["changes"].as_array().cloned().unwrap_or_default();
        if let Some(last) = read.last() {
            after = last["sequence"].as_u64().unwrap_or(after);
            changes.extend(read);
            continue;
        }
        assert!(page.body["pagination"]["next_after"].is_null(), "{page:?}");
        let count = |kind: &str| changes.iter().filter(|c| c["type"] == kind).count() as u64;
        if changing.is_finished()
            && count("message.created") == MESSAGES
            && count("message.deleted") == DELETED
        {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} changes after 120 s",
            changes.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    changing.await??;

    let sequences: Vec<u64> = changes
        .iter()
        .filter_map(|c| c["sequence"].as_u64())
        .collect();
    assert_eq!(
        sequences,
        (1..=changes.len() as u64).collect::<Vec<_>>(),
        "in order, no gap, none twice"
    );
    let mut state: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    let mut kinds = BTreeMap::<String, u64>::new();
    for change in &changes {
        let kind = change["type"].as_str().unwrap_or_default().to_owned();
        let number = change["message"]["number"].as_u64().unwrap_or_default();
        let version = change["message"]["version"].as_u64().unwrap_or_default();
        let body = change["message"]["body"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *kinds.entry(kind.clone()).or_default() += 1;
        let previous = state.get(&number).map_or(0, |(_, version)| *version);
        assert_eq!(
            version,
            previous + 1,
            "versions of message {number} in order: {change}"
        );
        if kind == "message.deleted" {
            assert!(body.is_empty());
            state.remove(&number);
        } else {
            state.insert(number, (body, version));
        }
        assert!(change["occurred_at"].is_string(), "{change}");
    }
    assert_eq!(kinds["message.created"], MESSAGES, "{kinds:?}");
    assert_eq!(kinds["message.deleted"], DELETED, "{kinds:?}");
    assert_eq!(kinds["message.updated"], EDITED, "{kinds:?}");
    // What the log rebuilt is what the chat holds.
    let stored = client
        .get(&format!(
            "/applications/{token}/chats/{chat}/messages?per_page=100&after=0"
        ))
        .await?;
    let first_page: BTreeSet<u64> = stored.body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|message| message["number"].as_u64())
        .collect();
    let rebuilt: BTreeSet<u64> = state.keys().copied().take(100).collect();
    assert_eq!(first_page, rebuilt);
    for number in [1, EDITED] {
        let message = client
            .get(&format!(
                "/applications/{token}/chats/{chat}/messages/{number}"
            ))
            .await?;
        assert_eq!(message.body["body"], state[&number].0.as_str());
    }

    // Bad input is refused; an unknown chat is 404.
    for query in ["after=-1", "after=x", "per_page=0", "per_page=101"] {
        let reply = client
            .get(&format!(
                "/applications/{token}/chats/{chat}/changes?{query}"
            ))
            .await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}: {reply:?}");
    }
    let unknown = client
        .get(&format!("/applications/{token}/chats/999/changes"))
        .await?;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    running.stop().await
}

/// A MySQL database of before the change log, migrated by this version: each stored message is
/// logged once, as it is now, in number order, and each chat's last sequence follows its log.
#[tokio::test]
async fn messages_stored_before_the_change_log_are_logged_once_by_the_migration()
-> anyhow::Result<()> {
    use chatcore::store::{ChangeKind, ChangeSelection, Storage as _};

    let env = TestEnv::new().await?;
    let older = env.mysql_database_before(20261207000001).await?;
    let pool = older.pool.clone();
    for statement in [
        "INSERT INTO applications (id, token_hint, name, chats_count, created_at, updated_at) \
         VALUES (1, '...abcd', 'old', 2, NOW(3), NOW(3))",
        "INSERT INTO chats (id, application_id, number, messages_count, created_at, updated_at) \
         VALUES (10, 1, 1, 2, NOW(3), NOW(3)), (11, 1, 2, 0, NOW(3), NOW(3))",
        "INSERT INTO messages (chat_id, number, body, version, created_at, updated_at, deleted_at) \
         VALUES (10, 2, 'edited', 3, NOW(3), NOW(3), NULL), (10, 1, 'first', 1, NOW(3), NOW(3), NULL), \
         (10, 3, '', 2, NOW(3), NOW(3), NOW(3))",
    ] {
        sqlx::query(statement).execute(&pool).await?;
    }
    older.migrate().await?;

    let storage = chatcore::store::MySqlStorage::new(pool.clone());
    let chat = chatcore::domain::Number::new(1).expect("positive");
    let logged = storage
        .list_changes(1, chat, ChangeSelection::Every, 0, 10)
        .await?;
    let summary: Vec<(u64, ChangeKind, u64, u64)> = logged
        .iter()
        .map(|change| {
            (
                change.sequence,
                change.kind,
                change.message.number,
                change.message.version,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, ChangeKind::Created, 1, 1),
            (2, ChangeKind::Updated, 2, 3),
            (3, ChangeKind::Deleted, 3, 2),
        ]
    );
    let feed: Vec<(u64, u64, u64)> = storage
        .list_application_changes(1, 0, 10)
        .await?
        .iter()
        .map(|row| {
            (
                row.application_sequence,
                row.chat_number,
                row.change.sequence,
            )
        })
        .collect();
    assert_eq!(feed, [(1, 1, 1), (2, 1, 2), (3, 1, 3)]);
    let found = storage.find_chat(1, chat).await?.expect("the chat");
    assert_eq!(found.last_change_sequence, 3);
    let empty = chatcore::domain::Number::new(2).expect("positive");
    assert_eq!(
        storage
            .find_chat(1, empty)
            .await?
            .expect("the chat")
            .last_change_sequence,
        0
    );
    // The next change follows the log.
    let edit = chatcore::store::MessageEdit {
        body: chatcore::domain::MessageBody::parse("again".to_owned())?,
        metadata: chatcore::store::MetadataEdit::Keep,
    };
    let change = storage
        .update_message(
            1,
            chat,
            chatcore::domain::Number::new(1).expect("positive"),
            &edit,
        )
        .await?;
    assert_eq!(change.map(|change| change.sequence), Some(4));
    older.drop_database().await?;
    Ok(())
}

both_stacks!(a_replica_hears_the_changes_of_the_chats_it_streams_only);

/// Changes are routed by chat: a replica hears the changes of a chat while it streams that chat,
/// and none of a chat nobody streams from it (counted by `chat_live_changes_received_total`).
async fn a_replica_hears_the_changes_of_the_chats_it_streams_only(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, streamed) = (&running.api.client, &running.token, running.chat);
    let quiet = client.create_chat(token).await?;
    let received = || async {
        let metrics = reqwest::get(running.api.metrics_url())
            .await?
            .text()
            .await?;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("chat_live_changes_received_total "))
            .context("chat_live_changes_received_total on /metrics")?
            .trim()
            .parse::<u64>()
            .context("a count")
    };
    let before = received().await?;
    let mut stream = client.open_stream(token, streamed, None).await?;
    for index in 0..20 {
        client
            .create_message(token, quiet, &format!("unheard {index}"))
            .await?;
    }
    // Announced after the quiet chat's twenty (one ingest consumer announces in order).
    client.create_message(token, streamed, "heard").await?;
    let event = stream.expect_event(WAIT).await?;
    assert_eq!(event.data["body"], "heard");
    assert_eq!(
        received().await? - before,
        1,
        "only the streamed chat's change"
    );

    // Its last stream gone, the chat is not heard any more.
    drop(stream);
    let mut other = client.open_stream(token, quiet, None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    client
        .create_message(token, streamed, "unheard now")
        .await?;
    client.create_message(token, quiet, "heard now").await?;
    let event = other.expect_event(WAIT).await?;
    assert_eq!(event.data["body"], "heard now");
    assert_eq!(
        received().await? - before,
        2,
        "the chat nobody streams is not heard"
    );
    drop(other);
    running.stop().await
}

both_stacks!(the_application_feed_has_every_chats_changes_once_each_in_its_order);

/// A backend follows every chat of its application through `GET /application/changes?cursor=`
/// while two chats get messages, edits and deletions: each change comes once, each chat's in its
/// sequence order after its creation, each with its chat.
async fn the_application_feed_has_every_chats_changes_once_each_in_its_order(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("feed").await?;
    let (client, token, first) = (&running.api.client, &running.token, running.chat);
    let second = client.create_chat(token).await?;
    for index in 0..15 {
        for chat in [first, second] {
            client
                .create_message(token, chat, &format!("message {index}"))
                .await?;
        }
    }
    for chat in [first, second] {
        let path = format!("/applications/{token}/chats/{chat}/messages/1");
        system_tests::eventually("the first message is stored", WAIT, || async {
            Ok(client
                .put(&path, json!({"body": "edited"}))
                .await?
                .status
                .is_success())
        })
        .await?;
        let path = format!("/applications/{token}/chats/{chat}/messages/2");
        assert_eq!(client.delete(&path).await?.status, StatusCode::NO_CONTENT);
    }
    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.values().map(Vec::len).sum::<usize>() < 2 * 18 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "only {seen:?}");
        let query = cursor
            .as_ref()
            .map_or(String::new(), |cursor| format!("&cursor={cursor}"));
        let page = client
            .get(&format!("/applications/{token}/changes?per_page=5{query}"))
            .await?;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let changes = page.body["changes"].as_array().cloned().unwrap_or_default();
        let Some(last) = changes.last() else {
            assert!(page.body["pagination"]["next_cursor"].is_null(), "{page:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        cursor = last["cursor"].as_str().map(str::to_owned);
        for change in &changes {
            let chat = change["chat_number"].as_u64().context("chat_number")?;
            // A chat's creation comes first, as 0; then its messages' changes by sequence.
            let sequence = match change["type"].as_str() {
                Some("chat.created") => {
                    assert_eq!(change["chat"]["number"], chat, "{change}");
                    0
                }
                _ => change["sequence"].as_u64().context("sequence")?,
            };
            seen.entry(chat).or_default().push(sequence);
        }
    }
    for chat in [first, second] {
        assert_eq!(
            seen[&chat],
            (0..=17).collect::<Vec<_>>(),
            "chat {chat}: {seen:?}"
        );
    }
    let bad = client
        .get(&format!("/applications/{token}/changes?cursor=not-ours"))
        .await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{bad:?}");
    running.stop().await
}

/// Batches of one application written side by side, and edits and deletions of its messages
/// among them, wait for each other: none deadlocks (each write locks the application's row
/// first). Before that rule a batch's chat insert took a shared lock on the application (its
/// foreign key) that two writers then both tried to upgrade.
#[tokio::test]
async fn concurrent_batches_and_edits_of_one_application_do_not_deadlock() -> anyhow::Result<()> {
    use std::sync::Arc;

    use chatcore::domain::{ApplicationName, ApplicationToken, MessageBody, Number};
    use chatcore::store::{
        IngestBatch, MessageEdit, MetadataEdit, NewChat, NewMessage, Storage as _,
    };

    const WRITERS: u64 = 4;
    const BATCHES: u64 = 25;
    const PER_CHAT: u64 = 4;
    let env = TestEnv::new().await?;
    let database = env.mysql_database_before(0).await?;
    database.migrate().await?;
    let storage = Arc::new(chatcore::store::MySqlStorage::new(database.pool.clone()));
    let application = storage
        .create_application(
            &ApplicationName::parse("busy")?,
            &ApplicationToken::generate(),
        )
        .await?
        .id;
    let number = |value: u64| Number::new(value).expect("positive");
    let now = chrono::Utc::now();
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let storage = Arc::clone(&storage);
        writers.spawn(async move {
            for batch_index in 0..BATCHES {
                let first = (batch_index * WRITERS + writer) * PER_CHAT + 1;
                let bodies: Vec<String> =
                    (0..PER_CHAT).map(|i| format!("m{}", first + i)).collect();
                let mut batch = IngestBatch {
                    chats: BTreeMap::new(),
                    messages: BTreeMap::new(),
                };
                for chat in [number(1), number(2)] {
                    batch.chats.insert(
                        (application, chat),
                        NewChat {
                            event_id: None,
                            created_at: now,
                            title: None,
                            metadata: None,
                        },
                    );
                    let messages = (0..PER_CHAT)
                        .map(|i| {
                            let message = NewMessage {
                                event_id: uuid::Uuid::new_v4(),
                                number: number(first + i),
                                body: &bodies[i as usize],
                                created_at: now,
                                sender: None,
                                metadata: None,
                            };
                            (message.number, message)
                        })
                        .collect();
                    batch.messages.insert((application, chat), messages);
                }
                storage.write_ingest_batch(&batch).await?;
            }
            anyhow::Ok(())
        });
    }
    // Edits and deletions of the messages stored so far, while the batches go on.
    let editor = {
        let storage = Arc::clone(&storage);
        tokio::spawn(async move {
            let mut changed = 0u64;
            for round in 0..BATCHES * 2 {
                for chat in [number(1), number(2)] {
                    let target = number(round % 8 + 1);
                    let edit = MessageEdit {
                        body: MessageBody::parse(format!("edit {round}"))?,
                        metadata: MetadataEdit::Keep,
                    };
                    if storage
                        .update_message(application, chat, target, &edit)
                        .await?
                        .is_some()
                    {
                        changed += 1;
                    }
                }
                let deleted = number(round + 100);
                if storage
                    .delete_message(application, number(1), deleted)
                    .await?
                    .is_some()
                {
                    changed += 1;
                }
            }
            anyhow::Ok(changed)
        })
    };
    while let Some(written) = writers.join_next().await {
        written??;
    }
    let changed = editor.await??;
    let logged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM message_changes WHERE number > 0")
        .fetch_one(&database.pool)
        .await?;
    let created = 2 * WRITERS * BATCHES * PER_CHAT;
    assert_eq!(logged as u64, created + changed, "every change logged once");
    let chats_created: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM message_changes WHERE kind = 'chat_created'")
            .fetch_one(&database.pool)
            .await?;
    assert_eq!(chats_created, 2, "each chat's creation logged once");
    database.drop_database().await?;
    Ok(())
}
