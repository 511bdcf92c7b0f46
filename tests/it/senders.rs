//! Who said it: a message's sender and metadata, a chat's title and metadata, and `edited_at`,
//! through everything that carries them (get, lists, the live stream, the change log, the feed
//! and the webhooks), and the input they refuse without changing anything.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use system_tests::webhook_receiver::{Mode, WebhookReceiver};
use system_tests::{StatusCode, TestEnv, both_stacks, eventually};

const WAIT: Duration = Duration::from_secs(60);

both_stacks!(senders_and_metadata_go_everywhere_a_message_goes);

async fn senders_and_metadata_go_everywhere_a_message_goes(env: TestEnv) -> anyhow::Result<()> {
    let receiver = WebhookReceiver::start().await?;
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let token = client.create_application("who said it").await?;
    let endpoint = client
        .post(
            &format!("/applications/{token}/webhooks"),
            json!({"url": receiver.url("all"), "description": "all"}),
        )
        .await?;
    assert_eq!(endpoint.status, StatusCode::CREATED, "{endpoint:?}");
    let secret = endpoint.body["secret"].as_str().context("secret")?;
    receiver.configure("all", &[secret], Mode::Ok).await?;

    let chats = format!("/applications/{token}/chats");
    let created = client
        .post(
            &chats,
            json!({"title": "  Team room ", "metadata": {"topic": "launch"}}),
        )
        .await?;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{created:?}");
    let chat = created.body["number"].as_u64().context("number")?;
    let untitled = client.create_chat(&token).await?;
    for (body, field) in [
        (json!({"title": " "}), "title"),
        (json!({"metadata": [1]}), "metadata"),
    ] {
        let refused = client.post(&chats, body).await?;
        assert_eq!(
            (refused.status, refused.body["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{refused:?}"
        );
    }
    eventually("the chats are stored", WAIT, || async {
        Ok(client.get(&format!("{chats}/{untitled}")).await?.status == StatusCode::OK)
    })
    .await?;
    let shown = client.get(&format!("{chats}/{chat}")).await?;
    assert_eq!(
        (&shown.body["title"], &shown.body["metadata"]),
        (&json!("Team room"), &json!({"topic": "launch"})),
        "{shown:?}"
    );
    let plain = client.get(&format!("{chats}/{untitled}")).await?;
    assert_eq!(
        (&plain.body["title"], &plain.body["metadata"]),
        (&Value::Null, &Value::Null),
        "a chat without details reads as before: {plain:?}"
    );
    let third = client.create_chat(&token).await?;
    assert_eq!(third, untitled + 1, "a refused chat takes no number");

    let messages = format!("{chats}/{chat}/messages");
    let mut stream = client.open_stream(&token, chat, None).await?;
    let posts = [
        json!({"body": "hello", "sender": "u42", "metadata": {"k": [1, 2]}}),
        json!({"body": "no one said it"}),
        json!({"body": "hi there", "sender": "team:bot@example.com"}),
    ];
    for (index, post) in posts.iter().enumerate() {
        let accepted = client.post(&messages, post.clone()).await?;
        assert_eq!(accepted.status, StatusCode::ACCEPTED, "{accepted:?}");
        assert_eq!(accepted.body["number"], index + 1);
    }
    let oversized = json!({"k": "x".repeat(4_096)});
    let thirty_three_keys: serde_json::Map<String, Value> =
        (0..33).map(|key| (format!("k{key}"), json!(key))).collect();
    for (body, field) in [
        (json!({"body": "x", "sender": "has space"}), "sender"),
        (json!({"body": "x", "sender": ""}), "sender"),
        (json!({"body": "x", "sender": "x".repeat(129)}), "sender"),
        (json!({"body": "x", "metadata": oversized}), "metadata"),
        (
            json!({"body": "x", "metadata": thirty_three_keys}),
            "metadata",
        ),
        (json!({"body": "x", "metadata": "text"}), "metadata"),
    ] {
        let refused = client.post(&messages, body.clone()).await?;
        assert_eq!(
            (refused.status, refused.body["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{body}: {refused:?}"
        );
    }
    let fourth = client
        .create_message(&token, chat, "after the refusals")
        .await?;
    assert_eq!(fourth, 4, "a refused message takes no number");

    for expected in 1..=4u64 {
        let event = stream.expect_event(WAIT).await?;
        assert_eq!(event.number()?, expected);
        if expected == 1 {
            assert_eq!(
                (
                    &event.data["sender"],
                    &event.data["metadata"],
                    &event.data["edited_at"]
                ),
                (&json!("u42"), &json!({"k": [1, 2]}), &Value::Null),
                "{:?}",
                event.data
            );
        }
    }
    let first = client.get(&format!("{messages}/1")).await?;
    assert_eq!(
        (
            &first.body["sender"],
            &first.body["metadata"],
            &first.body["edited_at"]
        ),
        (&json!("u42"), &json!({"k": [1, 2]}), &Value::Null),
        "{first:?}"
    );
    let second = client.get(&format!("{messages}/2")).await?;
    assert_eq!(
        (&second.body["sender"], &second.body["metadata"]),
        (&Value::Null, &Value::Null),
        "{second:?}"
    );
    let listed = numbers_of(&client.get(&messages).await?.body["messages"]);
    assert_eq!(listed, [1, 2, 3, 4]);
    let of_sender = client
        .get(&format!("{messages}?sender=team:bot@example.com"))
        .await?;
    assert_eq!(
        numbers_of(&of_sender.body["messages"]),
        [3],
        "{of_sender:?}"
    );
    assert_eq!(
        of_sender.body["messages"][0]["sender"],
        "team:bot@example.com"
    );
    let bad_filter = client.get(&format!("{messages}?sender=a%20b")).await?;
    assert_eq!(bad_filter.status, StatusCode::BAD_REQUEST, "{bad_filter:?}");

    // The sender never changes; the first edit sets edited_at, later ones keep it.
    let refused = client
        .put(
            &format!("{messages}/1"),
            json!({"body": "hijacked", "sender": "u7"}),
        )
        .await?;
    assert_eq!(
        (refused.status, refused.body["error"]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("sender")),
        "{refused:?}"
    );
    let unchanged = client.get(&format!("{messages}/1")).await?;
    assert_eq!(
        (&unchanged.body["body"], &unchanged.body["edited_at"]),
        (&json!("hello"), &Value::Null)
    );
    let edited = client
        .put(&format!("{messages}/1"), json!({"body": "hello, edited"}))
        .await?;
    assert_eq!(edited.status, StatusCode::OK, "{edited:?}");
    assert_eq!(
        (&edited.body["sender"], &edited.body["metadata"]),
        (&json!("u42"), &json!({"k": [1, 2]})),
        "metadata left out of a PUT stays: {edited:?}"
    );
    let first_edit = edited.body["edited_at"].as_str().context("edited_at")?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = client
        .put(
            &format!("{messages}/1"),
            json!({"body": "hello again", "metadata": {"k": "v2"}}),
        )
        .await?;
    assert_eq!(
        (&again.body["edited_at"], &again.body["metadata"]),
        (&json!(first_edit), &json!({"k": "v2"})),
        "{again:?}"
    );
    let removed = client
        .put(
            &format!("{messages}/1"),
            json!({"body": "hello, plain", "metadata": null}),
        )
        .await?;
    assert_eq!(removed.body["metadata"], Value::Null, "{removed:?}");
    let shown = client.get(&format!("{messages}/1")).await?;
    assert_eq!(
        (&shown.body["sender"], &shown.body["edited_at"]),
        (&json!("u42"), &json!(first_edit))
    );
    for _ in 0..3 {
        let event = stream.expect_event(WAIT).await?;
        assert_eq!(
            (event.event.as_str(), &event.data["sender"]),
            ("updated", &json!("u42"))
        );
        assert_eq!(event.data["edited_at"], json!(first_edit));
    }

    // The change log and the feed show each change's message as it left it, and the chat.
    let log = client.get(&format!("{chats}/{chat}/changes")).await?;
    let logged = log.body["changes"].as_array().context("changes")?;
    assert_eq!(logged[0]["message"]["sender"], "u42", "{log:?}");
    assert_eq!(logged[0]["message"]["metadata"], json!({"k": [1, 2]}));
    assert_eq!(logged[4]["message"]["edited_at"], json!(first_edit));
    let feed = client
        .get(&format!("/applications/{token}/changes?per_page=20"))
        .await?;
    let chat_created = feed.body["changes"]
        .as_array()
        .context("changes")?
        .iter()
        .find(|change| change["type"] == "chat.created" && change["chat_number"] == chat)
        .context("the chat's creation in the feed")?;
    assert_eq!(
        (
            &chat_created["chat"]["title"],
            &chat_created["chat"]["metadata"]
        ),
        (&json!("Team room"), &json!({"topic": "launch"}))
    );
    eventually("the webhooks of message 1", WAIT, || async {
        let deliveries = receiver.deliveries(Some("all")).await?;
        let of_first = deliveries.iter().filter(|delivery| {
            delivery.body["data"]["chat_number"] == chat
                && delivery.body["data"]["message"]["number"] == 1
        });
        Ok(of_first.count() == 4)
    })
    .await?;
    let deliveries = receiver.deliveries(Some("all")).await?;
    let created_hook = deliveries
        .iter()
        .find(|delivery| {
            delivery.body["type"] == "message.created"
                && delivery.body["data"]["chat_number"] == chat
                && delivery.body["data"]["message"]["number"] == 1
        })
        .context("the webhook of message 1's creation")?;
    assert_eq!(
        (
            &created_hook.body["data"]["message"]["sender"],
            &created_hook.body["data"]["message"]["metadata"]
        ),
        (&json!("u42"), &json!({"k": [1, 2]}))
    );
    let chat_hook = deliveries
        .iter()
        .find(|delivery| {
            delivery.body["type"] == "chat.created" && delivery.body["data"]["chat_number"] == chat
        })
        .context("the webhook of the chat's creation")?;
    assert_eq!(chat_hook.body["data"]["chat"]["title"], "Team room");
    workers.stop().await?;
    api.stop().await
}

fn numbers_of(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .filter_map(|m| m["number"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

/// A MySQL database of before senders, migrated by this version: its messages and chats read as
/// before (no sender, metadata or title), and a message edited back then is marked edited.
#[tokio::test]
async fn rows_stored_before_senders_read_as_before_after_the_migration() -> anyhow::Result<()> {
    use chatcore::store::Storage as _;

    let env = TestEnv::new().await?;
    let older = env.mysql_database_before(20261209000001).await?;
    let pool = older.pool.clone();
    for statement in [
        "INSERT INTO applications (id, token_hint, name, chats_count, created_at, updated_at) \
         VALUES (1, '...abcd', 'old', 1, NOW(3), NOW(3))",
        "INSERT INTO chats (id, application_id, number, messages_count, created_at, updated_at) \
         VALUES (10, 1, 1, 2, NOW(3), NOW(3))",
        "INSERT INTO messages (chat_id, number, body, version, created_at, updated_at) \
         VALUES (10, 1, 'first', 1, NOW(3), NOW(3)), \
         (10, 2, 'edited', 3, NOW(3), '2026-12-01 10:00:00.000')",
    ] {
        sqlx::query(statement).execute(&pool).await?;
    }
    older.migrate().await?;

    let storage = chatcore::store::MySqlStorage::new(pool.clone());
    let chat = chatcore::domain::Number::new(1).expect("positive");
    let found = storage.find_chat(1, chat).await?.context("the chat")?;
    assert_eq!((found.title, found.metadata), (None, None));
    let page = chatcore::domain::PageRequest::parse(Default::default(), 25, 100)?;
    let rows = storage.list_messages(1, chat, None, page).await?;
    let read: Vec<_> = rows
        .iter()
        .map(|row| {
            (
                row.number,
                row.sender.clone(),
                row.metadata.clone(),
                row.edited_at.map(|at| at.to_rfc3339()),
            )
        })
        .collect();
    assert_eq!(
        read,
        [
            (1, None, None, None),
            (2, None, None, Some("2026-12-01T10:00:00+00:00".to_owned())),
        ]
    );
    older.drop_database().await
}
