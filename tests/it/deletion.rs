//! Deleting a message: it leaves GET, lists, search and counts, its number is never handed out
//! again, and no late event brings it back.

use std::time::Duration;

use chatcore::domain::Number;
use chatcore::events::{Consumer, Event, EventPayload, TraceContext};
use chatcore::metrics::Metrics;
use serde_json::json;
use system_tests::{Client, StatusCode, TestEnv, both_stacks, eventually, search};

async fn listed(client: &Client, token: &str, chat: u64) -> anyhow::Result<Vec<u64>> {
    let reply = client
        .get(&format!("/applications/{token}/chats/{chat}/messages"))
        .await?;
    anyhow::ensure!(reply.status == StatusCode::OK, "list: {reply:?}");
    Ok(reply.body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|message| message["number"].as_u64())
        .collect())
}

async fn messages_count(client: &Client, token: &str, chat: u64) -> anyhow::Result<u64> {
    let reply = client
        .get(&format!("/applications/{token}/chats/{chat}"))
        .await?;
    reply.body["messages_count"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("chat: {reply:?}"))
}

both_stacks!(a_deleted_message_leaves_reads_search_and_counts_and_its_number_is_not_reused);

async fn a_deleted_message_leaves_reads_search_and_counts_and_its_number_is_not_reused(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    for body in ["keep this one", "delete this zebra", "keep that one"] {
        client.create_message(token, chat, body).await?;
    }
    eventually(
        "all three are searchable",
        Duration::from_secs(60),
        || async {
            Ok(search(client, token, chat, "zebra").await? == [2]
                && messages_count(client, token, chat).await? == 3)
        },
    )
    .await?;
    let path = format!("/applications/{token}/chats/{chat}/messages/2");

    let deleted = client.delete(&path).await?;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");

    assert_eq!(client.get(&path).await?.status, StatusCode::NOT_FOUND);
    assert_eq!(listed(client, token, chat).await?, [1, 3]);
    assert_eq!(messages_count(client, token, chat).await?, 2);
    eventually("search forgets it", Duration::from_secs(60), || async {
        Ok(search(client, token, chat, "zebra").await?.is_empty())
    })
    .await?;
    assert_eq!(
        search(client, token, chat, "keep").await?.len(),
        2,
        "the others stay searchable"
    );
    let again = client.delete(&path).await?;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "{again:?}");
    assert_eq!(again.body["error"]["code"], "not_found");
    let update = client.put(&path, json!({"body": "back?"})).await?;
    assert_eq!(update.status, StatusCode::NOT_FOUND, "{update:?}");
    let never_accepted = client
        .delete(&format!("/applications/{token}/chats/{chat}/messages/99"))
        .await?;
    assert_eq!(never_accepted.status, StatusCode::NOT_FOUND);
    let bad_number = client
        .delete(&format!("/applications/{token}/chats/{chat}/messages/zero"))
        .await?;
    assert_eq!(bad_number.status, StatusCode::BAD_REQUEST);

    let next = client
        .create_message(token, chat, "after the deletion")
        .await?;
    assert_eq!(next, 4, "a deleted number is never handed out again");
    eventually(
        "the next one is counted",
        Duration::from_secs(60),
        || async { Ok(messages_count(client, token, chat).await? == 3) },
    )
    .await?;
    assert_eq!(listed(client, token, chat).await?, [1, 3, 4]);
    running.stop().await
}

/// The chat's change log, as a backend reads it.
async fn changes(client: &Client, token: &str, chat: u64) -> anyhow::Result<serde_json::Value> {
    let reply = client
        .get(&format!(
            "/applications/{token}/chats/{chat}/changes?per_page=100"
        ))
        .await?;
    anyhow::ensure!(reply.status == StatusCode::OK, "changes: {reply:?}");
    Ok(reply.body["changes"].clone())
}

/// The types of the changes of message `number`, in log order.
fn change_types_of(changes: &serde_json::Value, number: u64) -> Vec<&str> {
    changes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|change| change["message"]["number"] == number)
        .filter_map(|change| change["type"].as_str())
        .collect()
}

/// A chat with a message "doomed zebra" and a message "kept", both stored and searchable;
/// returns the doomed one's number.
async fn doomed_and_kept(client: &Client, token: &str, chat: u64) -> anyhow::Result<u64> {
    let doomed = client.create_message(token, chat, "doomed zebra").await?;
    let kept = client.create_message(token, chat, "kept").await?;
    eventually(
        "both are stored and searchable",
        Duration::from_secs(60),
        || async {
            Ok(messages_count(client, token, chat).await? == 2
                && search(client, token, chat, "zebra").await? == [doomed]
                && search(client, token, chat, "kept").await? == [kept])
        },
    )
    .await?;
    Ok(doomed)
}

/// The loss of issue #31: RabbitMQ cannot confirm the deletion's event, so the api answers 503
/// after MySQL committed the tombstone. The client's retry is a 404, and it publishes the
/// deletion again first, so the index drops the message without counter-sync; the change log
/// (what webhooks deliver) keeps its one deletion.
#[tokio::test]
async fn a_delete_answered_503_is_published_by_its_retry() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let doomed = doomed_and_kept(client, token, chat).await?;
    let path = format!("/applications/{token}/chats/{chat}/messages/{doomed}");

    env.unroute(Consumer::Index, "message.deleted").await?;
    let lost = client.delete(&path).await?;
    assert_eq!(lost.status, StatusCode::SERVICE_UNAVAILABLE, "{lost:?}");
    assert_eq!(
        client.get(&path).await?.status,
        StatusCode::NOT_FOUND,
        "the deletion is stored"
    );
    assert_eq!(
        search(client, token, chat, "zebra").await?,
        [doomed],
        "no event reached the index"
    );

    env.route(Consumer::Index, "message.deleted").await?;
    let retried = client.delete(&path).await?;
    assert_eq!(retried.status, StatusCode::NOT_FOUND, "{retried:?}");
    assert_eq!(retried.body["error"]["code"], "not_found");
    eventually("search forgets it", Duration::from_secs(60), || async {
        Ok(search(client, token, chat, "zebra").await?.is_empty())
    })
    .await?;
    assert_eq!(search(client, token, chat, "kept").await?.len(), 1);
    assert_eq!(
        change_types_of(&changes(client, token, chat).await?, doomed),
        ["message.created", "message.deleted"]
    );
    running.stop().await
}

both_stacks!(a_repeated_delete_republishes_a_stored_deletion_and_changes_nothing_else);

/// A deletion stored whose event never left (as after a 503, here written to the storage
/// directly, which both stacks allow) reaches the index with the next DELETE, a 404; that one
/// and any further DELETE change nothing else: the log, the list and the count stay.
async fn a_repeated_delete_republishes_a_stored_deletion_and_changes_nothing_else(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let doomed = doomed_and_kept(client, token, chat).await?;
    let path = format!("/applications/{token}/chats/{chat}/messages/{doomed}");
    let storage = chatcore::adapters::storage(&env.config(), &Metrics::new()).await?;
    let application_id = env.application_id(token).await?;
    let (chat_number, number) = (
        Number::new(chat).expect("positive"),
        Number::new(doomed).expect("positive"),
    );
    let stored = storage
        .delete_message(application_id, chat_number, number)
        .await?;
    assert!(stored.is_some(), "the deletion is stored");
    assert_eq!(search(client, token, chat, "zebra").await?, [doomed]);
    let logged = changes(client, token, chat).await?;
    assert_eq!(
        change_types_of(&logged, doomed),
        ["message.created", "message.deleted"]
    );

    for attempt in ["the first", "a further"] {
        let again = client.delete(&path).await?;
        assert_eq!(again.status, StatusCode::NOT_FOUND, "{attempt}: {again:?}");
        assert_eq!(again.body["error"]["code"], "not_found");
        eventually("search forgets it", Duration::from_secs(60), || async {
            Ok(search(client, token, chat, "zebra").await?.is_empty())
        })
        .await?;
        assert_eq!(
            changes(client, token, chat).await?,
            logged,
            "{attempt} DELETE logs no change"
        );
        assert_eq!(listed(client, token, chat).await?, [doomed + 1]);
        assert_eq!(messages_count(client, token, chat).await?, 1);
    }
    running.stop().await
}

/// A message accepted but not written yet cannot be deleted: 409 `not_persisted_yet`, and the
/// client retries (the workers are not running here).
#[tokio::test]
async fn deleting_a_message_not_stored_yet_asks_for_a_retry() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("app").await?;
    let chat = client.create_chat(&token).await?;
    let number = client.create_message(&token, chat, "on its way").await?;
    let reply = client
        .delete(&format!(
            "/applications/{token}/chats/{chat}/messages/{number}"
        ))
        .await?;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{reply:?}");
    assert_eq!(reply.body["error"]["code"], "not_persisted_yet");
    api.stop().await
}

/// The events of a message that come after its deletion (a redelivered create, a stale update)
/// change nothing: the tombstone keeps the row, its version keeps the index entry.
#[tokio::test]
async fn late_events_never_bring_a_deleted_message_back() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let number = client.create_message(token, chat, "first words").await?;
    let path = format!("/applications/{token}/chats/{chat}/messages/{number}");
    eventually("the message is stored", Duration::from_secs(60), || async {
        Ok(client.get(&path).await?.status == StatusCode::OK)
    })
    .await?;
    let updated = client.put(&path, json!({"body": "second words"})).await?;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(client.delete(&path).await?.status, StatusCode::NO_CONTENT);

    // The create again, as a redelivery (its own event id), and the update of version 2 late.
    let (event_id, created_at): (Vec<u8>, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT m.event_id, m.created_at FROM messages m JOIN chats c ON c.id = m.chat_id \
         WHERE c.number = ? AND m.number = ?",
    )
    .bind(chat)
    .bind(number)
    .fetch_one(env.mysql())
    .await?;
    let application_id = env.application_id(token).await?;
    let chat_number = Number::new(chat).expect("positive");
    let message_number = Number::new(number).expect("positive");
    let mut redelivered = Event::new(EventPayload::MessageCreated {
        application_id,
        chat_number,
        message_number,
        body: "resurrected words".into(),
        created_at,
        sender: None,
        metadata: None,
    });
    redelivered.event_id = uuid::Uuid::from_slice(&event_id)?;
    let stale_update = Event::new(EventPayload::MessageUpdated {
        application_id,
        chat_number,
        message_number,
        body: "resurrected words".into(),
        version: 2,
        created_at,
        updated_at: created_at,
        sender: None,
        metadata: None,
        edited_at: None,
    });
    let queue = chatcore::adapters::queue(&env.config(), &Metrics::new()).await?;
    let trace = TraceContext::child_of(None);
    queue.publish(&redelivered, &trace).await?;
    queue.publish(&stale_update, &trace).await?;
    // Each queue is consumed in order: once a later message is stored and searchable, the late
    // events were handled.
    let marker = client.create_message(token, chat, "marker").await?;
    eventually(
        "the marker is searchable",
        Duration::from_secs(60),
        || async { Ok(search(client, token, chat, "marker").await? == [marker]) },
    )
    .await?;

    assert_eq!(client.get(&path).await?.status, StatusCode::NOT_FOUND);
    assert!(search(client, token, chat, "resurrected").await?.is_empty());
    assert!(search(client, token, chat, "words").await?.is_empty());
    assert_eq!(listed(client, token, chat).await?, [marker]);
    assert_eq!(messages_count(client, token, chat).await?, 1);
    running.stop().await
}
