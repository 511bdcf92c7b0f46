//! The embedded single process as a user runs it (the `api` binary with no service URL), and a
//! mixed configuration in which only some parts are real services.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::Connection as _;
use system_tests::{Client, StatusCode, TestEnv, eventually, free_port, kill_hard};
use tokio::process::Child;

const LONG: Duration = Duration::from_secs(60);

async fn start_api(env: &TestEnv) -> anyhow::Result<Child> {
    let child = env.spawn_process("api")?;
    let live = format!("http://{}/livez", env.settings["CHAT_HTTP_ADDR"]);
    eventually("the embedded api answers", LONG, || async {
        Ok(reqwest::get(&live)
            .await
            .is_ok_and(|reply| reply.status().is_success()))
    })
    .await?;
    Ok(child)
}

/// Posts messages with `concurrency` clients until `stop`; returns the numbers answered 202.
/// Requests cut off by the kill fail and count as not accepted.
async fn post_until(
    client: &Client,
    path: &str,
    concurrency: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<u64> {
    let posters = (0..concurrency).map(|poster| {
        let (client, path, stop) = (client.clone(), path.to_owned(), stop.clone());
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut sent = 0u64;
            while !stop.is_cancelled() {
                sent += 1;
                let body = serde_json::json!({ "body": format!("poster {poster} message {sent}") });
                match client.post(&path, body).await {
                    Ok(reply) if reply.status == StatusCode::ACCEPTED => {
                        accepted.extend(reply.body["number"].as_u64());
                    }
                    // The process is gone: wait for the test to stop the load.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            accepted
        })
    });
    let mut accepted = Vec::new();
    for poster in futures_util::future::join_all(posters).await {
        accepted.extend(poster.expect("poster task"));
    }
    accepted
}

#[tokio::test]
async fn kill_9_during_a_burst_loses_nothing_and_reuses_no_number() -> anyhow::Result<()> {
    let mut env = TestEnv::embedded().await?;
    env.set("CHAT_HTTP_ADDR", &format!("127.0.0.1:{}", free_port()?));
    let mut api = start_api(&env).await?;
    let client = Client::new(&format!("http://{}/api/v1", env.settings["CHAT_HTTP_ADDR"]));
    let token = client.create_application("crash test").await?;
    let chat = client.create_chat(&token).await?;
    let path = format!("/applications/{token}/chats/{chat}/messages");

    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn({
        let (client, path, stop) = (client.clone(), path.clone(), stop.clone());
        async move { post_until(&client, &path, 32, stop).await }
    });
    // Kill while the burst runs: after some messages were accepted, mid-stream.
    eventually("the burst is under way", LONG, || async {
        Ok(!env.stored_message_numbers(&token, chat).await?.is_empty())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill_hard(&mut api).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let accepted = load.await?;
    assert!(
        accepted.len() > 50,
        "the burst was too small: {}",
        accepted.len()
    );
    let unique: BTreeSet<u64> = accepted.iter().copied().collect();
    assert_eq!(
        unique.len(),
        accepted.len(),
        "no number was handed out twice"
    );
    let handed_out_before_kill = *unique.last().expect("accepted numbers");

    let mut api = start_api(&env).await?;
    eventually(
        "every accepted message is stored after the restart",
        LONG,
        || async {
            let stored: BTreeSet<u64> = env
                .stored_message_numbers(&token, chat)
                .await?
                .into_iter()
                .collect();
            Ok(unique.is_subset(&stored))
        },
    )
    .await?;
    let stored = env.stored_message_numbers(&token, chat).await?;
    assert_eq!(
        stored.len(),
        stored.iter().collect::<BTreeSet<_>>().len(),
        "each message is stored exactly once"
    );
    eventually("every accepted message is indexed", LONG, || async {
        let indexed: BTreeSet<u64> = env
            .indexed_message_numbers(&token, chat)
            .await?
            .into_iter()
            .collect();
        Ok(unique.is_subset(&indexed))
    })
    .await?;
    let chat_view = client
        .get(&format!("/applications/{token}/chats/{chat}"))
        .await?;
    assert_eq!(chat_view.body["messages_count"], stored.len());
    // Numbering continues above everything handed out before the kill, stored or not.
    let next = client
        .create_message(&token, chat, "after the restart")
        .await?;
    assert!(
        next > handed_out_before_kill && next > *stored.last().expect("stored"),
        "{next} must be above {handed_out_before_kill}"
    );
    let next_chat = client.create_chat(&token).await?;
    assert!(next_chat > chat, "chat numbers continue too: {next_chat}");

    let status = super::pipeline::terminate(&mut api).await?;
    assert!(status.success(), "graceful exit expected, got {status}");
    Ok(())
}

#[tokio::test]
async fn a_second_process_on_the_same_data_directory_refuses_to_start() -> anyhow::Result<()> {
    let mut env = TestEnv::embedded().await?;
    env.set("CHAT_HTTP_ADDR", &format!("127.0.0.1:{}", free_port()?));
    let mut api = start_api(&env).await?;
    env.set("CHAT_HTTP_ADDR", &format!("127.0.0.1:{}", free_port()?));
    let second = env.command("api")?.output();
    let output = tokio::time::timeout(LONG, second).await??;
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("another process uses the data directory"),
        "{error}"
    );
    kill_hard(&mut api).await
}

/// Events waiting in a queue of the embedded queue file.
async fn embedded_queue_depth(env: &TestEnv, queue: &str) -> anyhow::Result<i64> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(std::path::Path::new(&env.settings["CHAT_DATA_DIR"]).join("queue.db"));
    let mut connection = sqlx::SqliteConnection::connect_with(&options).await?;
    let depth = sqlx::query_scalar("SELECT COUNT(*) FROM queued_events WHERE queue = ?")
        .bind(queue)
        .fetch_one(&mut connection)
        .await?;
    connection.close().await?;
    Ok(depth)
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_and_can_be_replayed() -> anyhow::Result<()> {
    let env = TestEnv::embedded().await?;
    let running = env.running_chat("poison").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);

    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(std::path::Path::new(&env.settings["CHAT_DATA_DIR"]).join("queue.db"));
    let mut queue_file = sqlx::SqliteConnection::connect_with(&options).await?;
    sqlx::query("INSERT INTO queued_events (queue, body) VALUES ('chat.ingest', 'not an event')")
        .execute(&mut queue_file)
        .await?;
    queue_file.close().await?;
    eventually("the poison event is dead-lettered", LONG, || async {
        Ok(embedded_queue_depth(&env, "chat.ingest.dead").await? == 1)
    })
    .await?;
    // The consumer goes on.
    let number = client
        .create_message(token, chat, "after the poison")
        .await?;
    eventually("the next message is stored", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == [number])
    })
    .await?;

    let replay = env
        .command("api")?
        .arg("replay-dead-letters")
        .output()
        .await?;
    assert!(replay.status.success(), "{replay:?}");
    let printed = String::from_utf8_lossy(&replay.stdout);
    assert!(
        printed.contains("moved 1 dead letters back to chat.ingest"),
        "{printed}"
    );
    // It fails again and goes back to the dead-letter queue; nothing else is touched.
    let metrics_url = running.api.metrics_url();
    eventually(
        "the replayed event is dead-lettered again",
        LONG,
        || async {
            let metrics = reqwest::get(&metrics_url).await?.text().await?;
            Ok(metrics
                .lines()
                .any(|line| line == "chat_events_dead_lettered_total{queue=\"chat.ingest\"} 2")
                && embedded_queue_depth(&env, "chat.ingest.dead").await? == 1)
        },
    )
    .await?;
    assert_eq!(env.stored_message_numbers(token, chat).await?, [number]);
    running.stop().await
}

#[tokio::test]
async fn each_part_switches_on_its_own_url() -> anyhow::Result<()> {
    // MySQL and Elasticsearch real; counters and queue embedded, consumed inside the api.
    let mut env = TestEnv::new().await?;
    env.settings.remove("REDIS_URL");
    env.settings.remove("AMQP_URL");
    let data_dir = std::env::temp_dir().join(format!("chat-{}", env.id));
    env.set("CHAT_DATA_DIR", &data_dir.to_string_lossy());
    let api = env.spawn_api().await?;
    let client = &api.client;
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", api.internal_url))
        .await?
        .json()
        .await?;
    assert_eq!(
        ready["checks"],
        serde_json::json!({"mysql": true, "in-process": true, "sqlite-queue": true, "elasticsearch": true})
    );
    let token = client.create_application("mixed").await?;
    let chat = client.create_chat(&token).await?;
    let first = client.create_message(&token, chat, "mixed stacks").await?;
    let second = client.create_message(&token, chat, "still one api").await?;
    eventually("the messages are in mysql", LONG, || async {
        Ok(env.stored_message_numbers(&token, chat).await? == [first, second])
    })
    .await?;
    eventually("the messages are in elasticsearch", LONG, || async {
        Ok(env.indexed_message_numbers(&token, chat).await? == [first, second])
    })
    .await?;
    api.stop().await?;
    std::fs::remove_dir_all(&data_dir)?;
    Ok(())
}
