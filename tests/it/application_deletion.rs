//! Deleting an application: its tokens end at once on every replica, it leaves the listing, its
//! chats, messages and search documents are purged in the background, a late event of it is
//! dropped (or purged by counter-sync), and a deletion whose event was lost is purged by
//! counter-sync.

use std::time::{Duration, Instant};

use chatcore::domain::Number;
use chatcore::events::{Event, EventPayload, TraceContext};
use chatcore::metrics::Metrics;
use reqwest::{Method, StatusCode};
use system_tests::{Client, Reply, Stack, TestEnv, both_stacks, eventually, search};

/// How long the pipeline may take to store, index or purge something on a loaded machine.
const LONG: Duration = Duration::from_secs(60);

async fn delete_as_tenant(client: &Client, token: &str) -> anyhow::Result<Reply> {
    client
        .send_raw(
            client
                .request(Method::DELETE, "/application")
                .bearer_auth(token),
        )
        .await
}

/// The chats, messages and logged changes an application has left.
async fn rows_of(env: &TestEnv, application_id: u64) -> anyhow::Result<i64> {
    let mut rows = 0;
    for count in [
        "SELECT COUNT(*) FROM chats WHERE application_id = ?",
        "SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id \
         WHERE c.application_id = ?",
        "SELECT COUNT(*) FROM message_changes mc JOIN chats c ON c.id = mc.chat_id \
         WHERE c.application_id = ?",
    ] {
        rows += env.count(count, &[application_id]).await?;
    }
    Ok(rows)
}

/// Runs counter-sync; it reports the purge of what the application had left.
async fn purged_by_counter_sync(
    env: &TestEnv,
    application_id: u64,
    rows: u64,
    documents: u64,
) -> anyhow::Result<()> {
    let report = counter_sync::run(&env.config()).await?;
    let purge = counter_sync::Repair::Purge {
        application_id,
        rows,
        documents,
    };
    anyhow::ensure!(report.repairs.contains(&purge), "{report:?}");
    Ok(())
}

/// An application with two chats and three messages holding `word`, stored and searchable.
async fn populated_application(
    env: &TestEnv,
    client: &Client,
    name: &str,
    word: &str,
) -> anyhow::Result<(String, u64)> {
    let token = client.create_application(name).await?;
    let first = client.create_chat(&token).await?;
    let second = client.create_chat(&token).await?;
    for chat in [first, first, second] {
        client
            .create_message(&token, chat, &format!("{word} of {name}"))
            .await?;
    }
    let application_id = env.application_id(&token).await?;
    eventually("the messages are searchable", LONG, || async {
        Ok(search(client, &token, first, word).await?.len() == 2
            && search(client, &token, second, word).await?.len() == 1)
    })
    .await?;
    Ok((token, application_id))
}

both_stacks!(a_deleted_application_ends_its_tokens_at_once_and_is_purged);

async fn a_deleted_application_ends_its_tokens_at_once_and_is_purged(
    env: TestEnv,
) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    // The embedded process is one replica; the distributed stack runs two.
    let other_replica = match env.stack() {
        Stack::Services => Some(env.spawn_api().await?),
        Stack::Embedded => None,
    };
    let workers = env.spawn_workers();
    let client = &api.client;
    let replica = other_replica.as_ref().map_or(client, |other| &other.client);
    let (token, application_id) = populated_application(&env, client, "leaving", "zebra").await?;
    let (kept, kept_id) = populated_application(&env, client, "staying", "zebra").await?;
    let legacy = client.create_application("legacy form").await?;
    let served = replica
        .send_raw(
            replica
                .request(Method::GET, "/application")
                .bearer_auth(&token),
        )
        .await?;
    assert_eq!(served.status, StatusCode::OK, "{served:?}");

    let deleted = delete_as_tenant(client, &token).await?;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    let deleted_at = Instant::now();
    // The legacy path form deletes too.
    let by_path = client.delete(&format!("/applications/{legacy}")).await?;
    assert_eq!(by_path.status, StatusCode::ACCEPTED, "{by_path:?}");

    // Refused here at once, and by the other replica (which served it a moment ago) within 1 s.
    let again = delete_as_tenant(client, &token).await?;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED, "{again:?}");
    loop {
        let reply = replica
            .send_raw(replica.request(Method::GET, "/chats/1").bearer_auth(&token))
            .await?;
        if reply.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            deleted_at.elapsed() < Duration::from_secs(1),
            "still served a second after the deletion: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listing = client.get_as_admin("/applications").await?;
    assert_eq!(listing.status, StatusCode::OK, "{listing:?}");
    let names: Vec<&str> = listing.body["applications"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|application| application["name"].as_str())
        .collect();
    assert_eq!(names, ["staying"], "the deleted ones leave the listing");

    eventually("its rows and documents are purged", LONG, || async {
        Ok(rows_of(&env, application_id).await? == 0
            && env.indexed_documents_of(application_id).await? == 0)
    })
    .await?;
    // A tombstone stays, nameless and without tokens, so its id is never handed out again.
    assert_eq!(
        env.count(
            "SELECT COUNT(*) FROM applications WHERE id = ? AND deleted_at IS NOT NULL AND name = ''",
            &[application_id],
        )
        .await?,
        1
    );
    assert_eq!(
        env.count(
            "SELECT COUNT(*) FROM application_tokens WHERE application_id = ?",
            &[application_id],
        )
        .await?,
        0
    );
    let newer = env
        .application_id(&client.create_application("newer").await?)
        .await?;
    assert!(newer > application_id, "ids are never reused");
    // The other tenant keeps everything.
    assert_eq!(
        rows_of(&env, kept_id).await?,
        10,
        "2 chats, their 2 creations in the feed, 3 messages, their 3 changes"
    );
    assert_eq!(env.indexed_documents_of(kept_id).await?, 3);
    assert_eq!(search(client, &kept, 1, "zebra").await?.len(), 2);
    workers.stop().await?;
    if let Some(other_replica) = other_replica {
        other_replica.stop().await?;
    }
    api.stop().await
}

both_stacks!(late_events_of_a_deleted_application_leave_nothing_behind);

/// A chat and a message of the application accepted before its deletion but delivered after its
/// purge: the storage drops them; the embedded index drops the document too, the Elasticsearch
/// one is purged by the next counter-sync run.
async fn late_events_of_a_deleted_application_leave_nothing_behind(
    env: TestEnv,
) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let (token, application_id) = populated_application(&env, client, "leaving", "zebra").await?;
    let (kept, _) = populated_application(&env, client, "staying", "zebra").await?;
    assert_eq!(
        delete_as_tenant(client, &token).await?.status,
        StatusCode::ACCEPTED
    );
    eventually("its rows and documents are purged", LONG, || async {
        Ok(rows_of(&env, application_id).await? == 0
            && env.indexed_documents_of(application_id).await? == 0)
    })
    .await?;

    let chat_number = Number::new(7).expect("positive");
    let late = [
        Event::new(EventPayload::ChatCreated {
            application_id,
            chat_number,
            created_at: chrono::Utc::now(),
            title: None,
            metadata: None,
        }),
        Event::new(EventPayload::MessageCreated {
            application_id,
            chat_number,
            message_number: Number::new(1).expect("positive"),
            body: "zebra came late".into(),
            created_at: chrono::Utc::now(),
            sender: None,
            metadata: None,
        }),
    ];
    let queue = chatcore::adapters::queue(&env.config(), &Metrics::new()).await?;
    let trace = TraceContext::child_of(None);
    for event in &late {
        queue.publish(event, &trace).await?;
    }
    // Each queue is consumed in order: once a later message is stored and searchable, the late
    // events were handled.
    let marker = client.create_message(&kept, 1, "marker").await?;
    eventually("the marker is searchable", LONG, || async {
        Ok(search(client, &kept, 1, "marker").await? == [marker])
    })
    .await?;
    assert_eq!(rows_of(&env, application_id).await?, 0, "no row came back");
    if env.stack() == Stack::Embedded {
        assert_eq!(env.indexed_documents_of(application_id).await?, 0);
    } else {
        assert_eq!(env.indexed_documents_of(application_id).await?, 1);
        purged_by_counter_sync(&env, application_id, 0, 1).await?;
        assert_eq!(env.indexed_documents_of(application_id).await?, 0);
    }
    workers.stop().await?;
    api.stop().await
}

/// The deletion committed but its event never published (the api answered 503): the next
/// counter-sync run purges the rows and the documents.
#[tokio::test]
async fn counter_sync_purges_a_deletion_whose_event_was_lost() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let (_, application_id) = populated_application(&env, &api.client, "leaving", "zebra").await?;
    let storage = chatcore::adapters::storage(&env.config(), &Metrics::new()).await?;
    assert!(storage.delete_application(application_id).await?);

    purged_by_counter_sync(&env, application_id, 5, 3).await?;
    assert_eq!(rows_of(&env, application_id).await?, 0);
    assert_eq!(env.indexed_documents_of(application_id).await?, 0);
    let second = counter_sync::run(&env.config()).await?;
    assert!(
        !second
            .repairs
            .iter()
            .any(|repair| matches!(repair, counter_sync::Repair::Purge { .. })),
        "nothing left to purge: {second:?}"
    );
    workers.stop().await?;
    api.stop().await
}
