//! The asynchronous pipeline: concurrency (on both stacks); and on the real services crashes,
//! Redis data loss, poison events, broker refusal, counter-sync.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;

use chatcore::domain::Number;
use chatcore::events::{Consumer, Event, EventPayload};
use chatcore::queue::EventQueue as _;
use futures_util::future::join_all;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use serde_json::json;
use system_tests::own_redis::{OwnRedis, TcpProxy};
use system_tests::{StatusCode, TestEnv, both_stacks, eventually, kill_hard};

const LONG: Duration = Duration::from_secs(90);
/// Request timeouts of the apis whose requests are cut off, and how many requests they get.
const HURRIED_TIMEOUTS_MS: [u64; 6] = [5, 10, 20, 40, 80, 160];
const HURRIED_REQUESTS: usize = 120;

both_stacks!(a_thousand_concurrent_chats_and_messages_get_unique_numbers_from_1);

async fn a_thousand_concurrent_chats_and_messages_get_unique_numbers_from_1(
    env: TestEnv,
) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let token = client.create_application("busy").await?;

    // As the contract asks of clients: a 503 (an overloaded machine) is retried with the same key.
    let chats = join_all((0..1000).map(|i| {
        let (token, key) = (&token, format!("chat-{i}"));
        async move { client.create_chat_carefully(token, &key).await }
    }))
    .await;
    let chat_numbers: Vec<u64> = chats.into_iter().collect::<anyhow::Result<_>>()?;
    let chat_numbers = unique_with_few_gaps(chat_numbers, "chat");

    let token_ref = token.as_str();
    let messages = join_all((0..1000).map(|i| {
        let body = format!("message {i}");
        async move {
            client
                .create_message_carefully(token_ref, 1, &body, &format!("message-{i}"))
                .await
        }
    }))
    .await;
    let message_numbers: Vec<u64> = messages.into_iter().collect::<anyhow::Result<_>>()?;
    let message_numbers = unique_with_few_gaps(message_numbers, "message");

    let application_id = env.application_id(&token).await?;
    eventually(
        "all chats and messages are stored with counts of 1000",
        LONG,
        || async {
            let chats = env
                .count(
                    "SELECT COUNT(*) FROM chats WHERE application_id = ?",
                    &[application_id],
                )
                .await?;
            let messages = env.stored_message_numbers(&token, 1).await?.len();
            Ok(chats == 1000 && messages == 1000)
        },
    )
    .await?;
    let app = client.get(&format!("/applications/{token}")).await?;
    assert_eq!(app.body["chats_count"], 1000);
    let chat = client
        .get(&format!("/applications/{token}/chats/1"))
        .await?;
    assert_eq!(chat.body["messages_count"], 1000);
    assert_eq!(
        env.stored_message_numbers(&token, 1).await?,
        message_numbers
    );
    assert_eq!(chat_numbers.len(), 1000);
    eventually("all messages are indexed", LONG, || async {
        Ok(env.indexed_message_numbers(&token, 1).await?.len() == 1000)
    })
    .await?;
    workers.stop().await?;
    api.stop().await
}

/// Gaps a thousand requests on an overloaded machine may leave at most.
const MAX_GAPS: u64 = 10;

/// The numbers, sorted: each handed out once, from 1 up. A request that fails ambiguously after it
/// was given its number (a dependency timing out on an overloaded machine) leaves a gap, which the
/// contract allows (numbers may skip, never repeat), but only a few.
fn unique_with_few_gaps(mut numbers: Vec<u64>, what: &str) -> Vec<u64> {
    numbers.sort_unstable();
    assert!(
        numbers.windows(2).all(|pair| pair[0] < pair[1]),
        "two {what}s share a number: {numbers:?}"
    );
    let highest = numbers.last().copied().unwrap_or_default();
    assert!(
        numbers.first() == Some(&1) && highest - numbers.len() as u64 <= MAX_GAPS,
        "{what} numbers with more than {MAX_GAPS} gaps: {numbers:?}"
    );
    numbers
}

/// A request cut off by its timeout after it claimed its `Idempotency-Key` runs to its end on its
/// own: the client's retry with the same key gets the number the first try was given, and no
/// number is skipped (cut off between the allocation and the record of the event, it used to lose
/// its number, and the retry got the next one).
#[tokio::test]
async fn requests_cut_off_by_their_timeout_keep_their_numbers() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    // A claim left behind by a request cut off mid-write is waited out by the retries.
    env.set("CHAT_IDEMPOTENCY_LEASE_SECONDS", "11");
    let steady = env.spawn_api().await?;
    let token = steady.client.create_application("hurried").await?;
    let chat = steady.client.create_chat(&token).await?;
    // Timeouts of a few milliseconds cut requests off at every step of their way.
    let mut hurried = Vec::new();
    for timeout_ms in HURRIED_TIMEOUTS_MS {
        env.set("CHAT_REQUEST_TIMEOUT_MS", &timeout_ms.to_string());
        hurried.push(env.spawn_api().await?);
    }
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let first_tries = join_all((0..HURRIED_REQUESTS).map(|i| {
        let client = &hurried[i % hurried.len()].client;
        let request = client
            .request(reqwest::Method::POST, &path)
            .header("idempotency-key", format!("hurried-{i}"))
            .json(&json!({"body": format!("message {i}")}));
        client.send_raw(request)
    }))
    .await;
    let cut_off = first_tries
        .iter()
        .filter(|reply| {
            reply
                .as_ref()
                .is_ok_and(|reply| reply.status == StatusCode::SERVICE_UNAVAILABLE)
        })
        .count();
    assert!(cut_off > 0, "no request was cut off: {first_tries:?}");

    let retries = join_all((0..HURRIED_REQUESTS).map(|i| {
        let (client, token) = (&steady.client, &token);
        async move {
            client
                .create_message_carefully(
                    token,
                    chat,
                    &format!("message {i}"),
                    &format!("hurried-{i}"),
                )
                .await
        }
    }))
    .await;
    let mut numbers: Vec<u64> = retries.into_iter().collect::<anyhow::Result<_>>()?;
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=HURRIED_REQUESTS as u64).collect::<Vec<_>>(),
        "{cut_off} first tries were cut off"
    );
    for api in hurried {
        api.stop().await?;
    }
    steady.stop().await
}

/// Posts `count` messages in waves of 50 concurrent requests; returns the numbers that got a 202.
pub async fn post_messages_in_waves(
    client: &system_tests::Client,
    token: &str,
    chat: u64,
    count: usize,
) -> anyhow::Result<Vec<u64>> {
    let mut accepted = Vec::with_capacity(count);
    for wave in 0..count / 50 {
        accepted.extend(post_wave(client, token, chat, wave).await?);
    }
    Ok(accepted)
}

/// Posts 50 messages concurrently; returns their numbers.
async fn post_wave(
    client: &system_tests::Client,
    token: &str,
    chat: u64,
    wave: usize,
) -> anyhow::Result<Vec<u64>> {
    join_all((0..50).map(|i| {
        let body = format!("wave {wave} message {i}");
        async move { client.create_message(token, chat, &body).await }
    }))
    .await
    .into_iter()
    .collect()
}

#[tokio::test]
async fn killing_workers_mid_load_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    // Small batches so that the kill lands between many commits.
    let env = TestEnv::with_settings(&[
        ("CHAT_BATCH_MAX_SIZE", "20"),
        ("CHAT_CONSUMER_PREFETCH", "40"),
    ])
    .await?;
    let api = env.spawn_api().await?;
    let client = api.client.clone();
    let token = client.create_application("crashy").await?;
    let chat = client.create_chat(&token).await?;

    let mut ingest = env.spawn_process("ingest-worker")?;
    let mut indexer = env.spawn_process("indexer")?;
    let load = tokio::spawn({
        let client = client.clone();
        let token = token.clone();
        async move { post_messages_in_waves(&client, &token, chat, 2000).await }
    });
    // Kill both while they are writing: as soon as some (not all) messages have landed.
    eventually("some messages are persisted", LONG, || async {
        Ok(!env.stored_message_numbers(&token, chat).await?.is_empty())
    })
    .await?;
    kill_hard(&mut ingest).await?;
    kill_hard(&mut indexer).await?;
    let accepted = load.await??;
    let stored_while_down = env.stored_message_numbers(&token, chat).await?.len();
    assert!(
        stored_while_down < accepted.len(),
        "the kill should land mid-load"
    );

    let mut ingest = env.spawn_process("ingest-worker")?;
    let mut indexer = env.spawn_process("indexer")?;
    let expected: Vec<u64> = {
        let mut sorted = accepted.clone();
        sorted.sort_unstable();
        sorted
    };
    assert_eq!(
        expected.len(),
        BTreeSet::from_iter(expected.iter()).len(),
        "numbers are unique"
    );
    eventually(
        "every accepted message is in mysql exactly once",
        LONG,
        || async { Ok(env.stored_message_numbers(&token, chat).await? == expected) },
    )
    .await?;
    eventually(
        "every accepted message is in the index exactly once",
        LONG,
        || async { Ok(env.indexed_message_numbers(&token, chat).await? == expected) },
    )
    .await?;
    let chat_view = client
        .get(&format!("/applications/{token}/chats/{chat}"))
        .await?;
    assert_eq!(chat_view.body["messages_count"], expected.len());
    // SIGTERM: both stop taking work and exit cleanly.
    for child in [&mut ingest, &mut indexer] {
        let status = terminate(child).await?;
        assert!(status.success(), "graceful exit expected, got {status}");
    }
    api.stop().await
}

/// Sends SIGTERM and waits (bounded) for the exit.
pub async fn terminate(
    child: &mut tokio::process::Child,
) -> anyhow::Result<std::process::ExitStatus> {
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("child already exited"))?;
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(sent.success(), "kill -TERM failed");
    Ok(tokio::time::timeout(Duration::from_secs(15), child.wait()).await??)
}

#[tokio::test]
async fn numbers_are_never_reused_when_redis_loses_its_data() -> anyhow::Result<()> {
    let mut redis = OwnRedis::start().await?;
    // A small block makes reservations move often during the load.
    let env = TestEnv::with_settings(&[
        ("REDIS_URL", &redis.url()),
        ("CHAT_NUMBER_BLOCK_SIZE", "50"),
    ])
    .await?;
    let running = env.running_chat("forgetful").await?;
    let (client, token, first_chat) = (&running.api.client, &running.token, running.chat);

    // Flush twice in the middle of the load, each time while a wave of requests is in flight.
    let mut accepted = Vec::new();
    for wave in 0..60 {
        if wave == 20 || wave == 30 {
            let flush = async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let _: () = redis::cmd("FLUSHALL")
                    .query_async(&mut redis.connection().await?)
                    .await?;
                anyhow::Ok(())
            };
            let (posted, flushed) = tokio::join!(post_wave(client, token, first_chat, wave), flush);
            flushed?;
            accepted.extend(posted?);
        } else {
            accepted.extend(post_wave(client, token, first_chat, wave).await?);
        }
    }
    let highest = accepted.iter().copied().max().unwrap_or_default();
    assert!(
        highest > accepted.len() as u64,
        "a flush skips the rest of a block: {highest}"
    );

    // A restart without persistence loses the counters too; the chat counter must not restart at 1.
    redis.restart_empty().await?;
    let second_chat = client.create_chat(token).await?;
    assert!(second_chat > first_chat, "chat number {second_chat} reused");
    for _ in 0..20 {
        accepted.push(
            client
                .create_message(token, first_chat, "after restart")
                .await?,
        );
    }
    let unique: BTreeSet<u64> = accepted.iter().copied().collect();
    assert_eq!(
        unique.len(),
        accepted.len(),
        "a message number was handed out twice"
    );
    eventually("every accepted message is persisted once", LONG, || async {
        Ok(env.stored_message_numbers(token, first_chat).await?
            == unique.iter().copied().collect::<Vec<_>>())
    })
    .await?;
    running.stop().await
}

#[tokio::test]
async fn poison_events_are_dead_lettered_and_the_consumers_go_on() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let config = env.config();

    let connection = env.amqp_connection().await?;
    let channel = connection.create_channel().await?;
    let trace = chatcore::events::TraceContext::child_of(None);
    // Undecodable bytes, and a well-formed event for an application that does not exist.
    let unknown_application = Event::new(EventPayload::MessageCreated {
        application_id: 987_654,
        chat_number: Number::new(1).expect("positive"),
        message_number: Number::new(1).expect("positive"),
        body: "orphan".into(),
        created_at: chrono_now(),
        sender: None,
        metadata: None,
    });
    let malformed_properties = chatcore::queue::event_properties(&unknown_application, &trace);
    channel
        .basic_publish(
            config.topology.exchange.as_str().into(),
            "message.created".into(),
            BasicPublishOptions::default(),
            b"{not json",
            malformed_properties.clone(),
        )
        .await?
        .await?;
    channel
        .basic_publish(
            config.topology.exchange.as_str().into(),
            "message.created".into(),
            BasicPublishOptions::default(),
            &unknown_application.encode(),
            malformed_properties,
        )
        .await?
        .await?;
    // A good message after the poison still goes through.
    let number = client.create_message(token, chat, "still flowing").await?;
    eventually("the good message is persisted", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == [number])
    })
    .await?;
    let ingest_dead = chatcore::config::Topology::dead_letter_queue(&config.topology.ingest_queue);
    let index_dead = chatcore::config::Topology::dead_letter_queue(&config.topology.index_queue);
    eventually("the ingest poison is dead-lettered", LONG, || async {
        Ok(env.queue_depth(&ingest_dead).await? == 2)
    })
    .await?;
    // The index accepts the orphan (it needs no application row) but not the undecodable bytes.
    eventually("the index poison is dead-lettered", LONG, || async {
        Ok(env.queue_depth(&index_dead).await? == 1)
    })
    .await?;
    let dead = channel
        .basic_get(
            ingest_dead.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await?
        .expect("a dead letter");
    assert_eq!(dead.delivery.data, b"{not json");
    assert_eq!(env.queue_depth(&config.topology.ingest_queue).await?, 0);

    // The operator fixes the cause (the application appears) and replays the dead letters: the
    // orphan is written now; nothing else is left behind.
    sqlx::query("INSERT INTO applications (id, token_hint, name, chats_count, created_at, updated_at) VALUES (987654, '...RRRR', 'restored', 0, NOW(3), NOW(3))")
        .execute(env.mysql())
        .await?;
    sqlx::query("INSERT INTO application_tokens (digest, application_id, created_at) VALUES (UNHEX(SHA2(?, 256)), 987654, NOW(3))")
        .bind("R".repeat(32))
        .execute(env.mysql())
        .await?;
    let queue = chatcore::adapters::queue(&config, &chatcore::metrics::Metrics::new()).await?;
    let replayed =
        chatcore::pipeline::replay_dead_letters(queue.as_ref(), &[Consumer::Ingest]).await?;
    assert_eq!(replayed, [(config.topology.ingest_queue.clone(), 1)]);
    eventually("the replayed event is written", LONG, || async {
        Ok(env.stored_message_numbers(&"R".repeat(32), 1).await? == [1])
    })
    .await?;
    assert_eq!(env.queue_depth(&ingest_dead).await?, 0);
    connection.close(200, "done".into()).await?;
    running.stop().await
}

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    chatcore::store::now()
}

/// A broker connection that goes silent without closing (a node lost under load, a partition)
/// looks open to the client library until its heartbeat gives up, a minute or more: the api
/// gives up on it once publishes wait past the confirm timeout unanswered, and publishes on a
/// new one.
#[tokio::test]
async fn publishes_move_to_a_new_connection_when_the_broker_goes_silent() -> anyhow::Result<()> {
    let broker = TcpProxy::in_front_of_rabbitmq().await?;
    let mut env = TestEnv::new().await?;
    env.set("AMQP_URL", &broker.amqp_url());
    env.set("CHAT_PUBLISH_CONFIRM_TIMEOUT_MS", "1000");
    env.set("CHAT_DEPENDENCY_TIMEOUT_MS", "1500");
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("silent broker").await?;
    let chat = client.create_chat(&token).await?;
    broker.freeze();
    let frozen = tokio::time::Instant::now();
    let path = format!("/applications/{token}/chats/{chat}/messages");
    let unavailable = AtomicUsize::new(0);
    let accepted = eventually("a message is accepted again", LONG, || async {
        let reply = client.post(&path, json!({ "body": "hello" })).await?;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            unavailable.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        anyhow::ensure!(reply.status == StatusCode::ACCEPTED, "{reply:?}");
        Ok(true)
    })
    .await;
    let took = frozen.elapsed();
    let unavailable = unavailable.into_inner();
    accepted.with_context(|| format!("{unavailable} answered 503 in {took:?}"))?;
    assert!(unavailable >= 1, "the silent connection was used first");
    // Heartbeats would have taken 60 s at least.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    api.stop().await
}

#[tokio::test]
async fn an_event_the_broker_cannot_route_is_a_503_and_nothing_is_written() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("app").await?;
    let (client, token, first_chat) = (&running.api.client, &running.token, running.chat);
    // Once a chat is persisted the workers have declared their topology: it is not re-bound later.
    let application_id = env.application_id(token).await?;
    eventually("the first chat is persisted", LONG, || async {
        Ok(env
            .count(
                "SELECT COUNT(*) FROM chats WHERE application_id = ?",
                &[application_id],
            )
            .await?
            == 1)
    })
    .await?;
    env.unroute(Consumer::Ingest, "chat.created").await?;
    let refused = client
        .post_empty(&format!("/applications/{token}/chats"))
        .await?;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    assert_eq!(refused.body["error"]["code"], "service_unavailable");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.count(
            "SELECT COUNT(*) FROM chats WHERE application_id = ?",
            &[application_id]
        )
        .await?,
        1
    );
    // The chat that was refused is unknown to the api: no message can be posted to it.
    let refused_number = first_chat + 1;
    let orphan = client
        .post(
            &format!("/applications/{token}/chats/{refused_number}/messages"),
            json!({"body": "x"}),
        )
        .await?;
    assert_eq!(orphan.status, StatusCode::NOT_FOUND);
    running.stop().await
}

#[tokio::test]
async fn counter_sync_repairs_drifted_counts_and_counters_behind() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    for _ in 0..3 {
        client.create_message(token, chat, "hello").await?;
    }
    eventually("messages are persisted", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await?.len() == 3)
    })
    .await?;
    // Outside a cluster there is no service account: the run goes ahead without a Lease.
    let clean = counter_sync::run_exclusively(&env.config())
        .await?
        .expect("no lease to wait for outside a cluster");
    assert!(
        clean.repairs.is_empty(),
        "nothing to repair yet: {:?}",
        clean.repairs
    );
    assert_eq!((clean.applications_checked, clean.chats_checked), (1, 1));

    let application_id = env.application_id(token).await?;
    sqlx::query("UPDATE applications SET chats_count = 42 WHERE id = ?")
        .bind(application_id)
        .execute(env.mysql())
        .await?;
    sqlx::query("UPDATE chats SET messages_count = 0 WHERE application_id = ?")
        .bind(application_id)
        .execute(env.mysql())
        .await?;
    set_message_counter_back(&env, application_id, chat, 1).await?;

    let report = counter_sync::run(&env.config()).await?;
    let described: Vec<String> = report.repairs.iter().map(ToString::to_string).collect();
    assert_eq!(report.repairs.len(), 3, "{described:?}");
    assert!(
        described.contains(&format!(
            "application {application_id}: chats_count 42 -> 1"
        )),
        "{described:?}"
    );
    assert!(
        described.contains(&format!(
            "application {application_id} chat {chat}: messages_count 0 -> 3"
        )),
        "{described:?}"
    );
    assert_eq!(
        client.get(&format!("/applications/{token}")).await?.body["chats_count"],
        1
    );
    assert_eq!(
        client
            .get(&format!("/applications/{token}/chats/{chat}"))
            .await?
            .body["messages_count"],
        3
    );
    // The counter was behind: the next number continues above everything persisted.
    assert_eq!(client.create_message(token, chat, "next").await?, 4);
    assert!(counter_sync::run(&env.config()).await?.repairs.is_empty());
    running.stop().await
}

/// A counter set back in place (same server and epoch: a key-level restore) would hand out its
/// recent numbers again: the api that handed them out raises it above them instead, so the next
/// messages continue where they were.
#[tokio::test]
async fn a_counter_set_back_in_place_is_raised_not_handed_out_again() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("set back").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let mut before = Vec::new();
    for _ in 0..30 {
        before.push(client.create_message(token, chat, "before").await?);
    }
    assert_eq!(before, (1..=30).collect::<Vec<u64>>());
    let application_id = env.application_id(token).await?;
    set_message_counter_back(&env, application_id, chat, 10).await?;
    let mut after = Vec::new();
    for _ in 0..5 {
        after.push(client.create_message(token, chat, "after").await?);
    }
    assert_eq!(after, (31..=35).collect::<Vec<u64>>(), "handed out again");
    eventually("every message is stored once", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == (1..=35).collect::<Vec<u64>>())
    })
    .await?;
    running.stop().await
}

/// Sets the `next` of a chat's message counter in Redis, in place (same server and epoch).
async fn set_message_counter_back(
    env: &TestEnv,
    application_id: u64,
    chat: u64,
    next: u64,
) -> anyhow::Result<()> {
    let mut redis = redis::Client::open(env.config().require_redis_url()?.expose())?
        .get_multiplexed_async_connection()
        .await?;
    let key = format!("{}:numbers:messages:{application_id}:{chat}", env.id);
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("next")
        .arg(next)
        .query_async(&mut redis)
        .await?;
    Ok(())
}

/// counter-sync writes the messages edited within its look-back window to the index again (an edit
/// whose event was lost is repaired), not those only created in it: their events wait durably in
/// the queue, and rewriting them made every run after a burst of new messages re-index all of it.
#[tokio::test]
async fn counter_sync_reindexes_the_edited_messages_not_the_merely_created() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("edited-or-new").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    for body in ["first", "second", "third", "fourth"] {
        client.create_message(token, chat, body).await?;
    }
    eventually("the messages are stored", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == [1, 2, 3, 4])
    })
    .await?;
    let edited = client
        .put(
            &format!("/applications/{token}/chats/{chat}/messages/2"),
            json!({"body": "second, edited"}),
        )
        .await?;
    assert_eq!(edited.status, StatusCode::OK, "{edited:?}");
    let deleted = client
        .delete(&format!("/applications/{token}/chats/{chat}/messages/3"))
        .await?;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");

    let report = counter_sync::run(&env.config()).await?;
    assert_eq!(
        report.reindexed, 2,
        "the update and the deletion: {report:?}"
    );
    running.stop().await
}

/// Each publish is answered by its own confirm: publishes from many tasks on every runtime thread,
/// half of them to a routing key no queue binds (refused as unroutable), each get the outcome of
/// their own event (a publish whose confirm timed out is published again until it has one). A confirm paired with another publish would answer a routable event
/// "unroutable" or the reverse (a 202 for an event the broker never took).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_publish_gets_the_confirm_of_its_own_event() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let config = env.config();
    let queue = chatcore::queue::RabbitMqQueue::new(
        config.require_amqp_url()?.clone(),
        config.topology.clone(),
        Duration::from_secs(10),
        Duration::from_secs(3),
        None,
        config.largest_event_bytes(),
    );
    queue.ensure_topology().await?;
    // message.updated reaches no queue from now on.
    env.unroute(Consumer::Index, chatcore::events::routing::MESSAGE_UPDATED)
        .await?;
    let queue = std::sync::Arc::new(queue);
    let publishers = (0..64u64).map(|publisher| {
        let queue = std::sync::Arc::clone(&queue);
        tokio::spawn(async move {
            let mut mismatches = Vec::new();
            for round in 0..40u64 {
                let number = Number::new(publisher * 1000 + round + 1).expect("positive");
                let routable = (publisher + round) % 2 == 0;
                let now = chrono::Utc::now();
                let payload = if routable {
                    EventPayload::MessageCreated {
                        application_id: 1,
                        chat_number: number,
                        message_number: number,
                        body: "routable".into(),
                        created_at: now,
                        sender: None,
                        metadata: None,
                    }
                } else {
                    EventPayload::MessageUpdated {
                        application_id: 1,
                        chat_number: number,
                        message_number: number,
                        body: "unroutable".into(),
                        version: 2,
                        created_at: now,
                        updated_at: now,
                        sender: None,
                        metadata: None,
                        edited_at: None,
                    }
                };
                // A confirm that did not come in time (a broker slowed down by a loaded machine)
                // pairs the publish with nothing: the event is published again, as the api's
                // client retries its 503, until it gets an outcome of its own.
                let event = Event::new(payload);
                let mut outcome = Err(chatcore::queue::QueueError::ConfirmTimeout(Duration::ZERO));
                for _ in 0..5 {
                    outcome = queue
                        .publish(&event, &chatcore::events::TraceContext::child_of(None))
                        .await;
                    if !matches!(outcome, Err(chatcore::queue::QueueError::ConfirmTimeout(_))) {
                        break;
                    }
                }
                let as_expected = match &outcome {
                    Ok(()) => routable,
                    Err(chatcore::queue::QueueError::Unroutable(_)) => !routable,
                    Err(_) => false,
                };
                if !as_expected {
                    mismatches.push(format!("routable={routable}: {outcome:?}"));
                }
            }
            mismatches
        })
    });
    let mut mismatches = Vec::new();
    for publisher in join_all(publishers).await {
        mismatches.extend(publisher?);
    }
    assert!(
        mismatches.is_empty(),
        "{} of 2,560 publishes got another publish's confirm, e.g. {:?}",
        mismatches.len(),
        mismatches.iter().take(3).collect::<Vec<_>>()
    );
    Ok(())
}

/// Half a block before a busy scope reaches its reserved ceiling, the next block is reserved in
/// the background: the request that crosses the ceiling finds it reserved and waits for nothing.
#[tokio::test]
async fn the_next_block_of_numbers_is_reserved_before_it_is_needed() -> anyhow::Result<()> {
    let env = TestEnv::with_settings(&[("CHAT_NUMBER_BLOCK_SIZE", "50")]).await?;
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("steady").await?;
    let chat = client.create_chat(&token).await?;
    let application_id = env.application_id(&token).await?;
    let scope = format!("messages:{application_id}:{chat}");
    let reserved_until = || async {
        let until: Option<u64> =
            sqlx::query_scalar("SELECT reserved_until FROM number_reservations WHERE scope = ?")
                .bind(&scope)
                .fetch_optional(env.mysql())
                .await?;
        anyhow::Ok(until)
    };
    for _ in 0..24 {
        client
            .create_message(&token, chat, "before half-way")
            .await?;
    }
    assert_eq!(reserved_until().await?, Some(50), "the first block only");
    // The 25th number leaves half a block (25) below the ceiling of 50.
    client.create_message(&token, chat, "half-way").await?;
    eventually(
        "the next block is reserved ahead",
        Duration::from_secs(10),
        || async { Ok(reserved_until().await? == Some(100)) },
    )
    .await?;
    api.stop().await
}

/// Events published together share one message (an envelope); downstream each is still handled
/// alone: a poison event in an envelope is dead-lettered by itself, the good one beside it is
/// written, and the envelope leaves the queue.
#[tokio::test]
async fn a_poison_event_in_an_envelope_is_dead_lettered_alone() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    // The chat row must exist before an event writes a message into it.
    client.create_message(token, chat, "first").await?;
    eventually("the chat is stored", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == [1])
    })
    .await?;
    let config = env.config();
    let chat_number = Number::new(chat).expect("positive");
    let good = Event::new(EventPayload::MessageCreated {
        application_id: env.application_id(token).await?,
        chat_number,
        message_number: Number::new(500).expect("positive"),
        body: "enveloped".into(),
        created_at: chrono_now(),
        sender: None,
        metadata: None,
    });
    let orphan = Event::new(EventPayload::MessageCreated {
        application_id: 987_655,
        chat_number,
        message_number: Number::new(1).expect("positive"),
        body: "orphan".into(),
        created_at: chrono_now(),
        sender: None,
        metadata: None,
    });
    let trace = chatcore::events::TraceContext::child_of(None);
    let mut body = Vec::new();
    for data in [good.encode(), orphan.encode(), b"{not json".to_vec()] {
        chatcore::queue::envelope::push(&mut body, Some(trace.as_str()), &data);
    }
    let connection = env.amqp_connection().await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    let confirmation = channel
        .basic_publish(
            config.topology.exchange.as_str().into(),
            "message.created".into(),
            BasicPublishOptions::default(),
            &body,
            chatcore::queue::event_properties(&good, &trace)
                .with_content_type(chatcore::queue::envelope::CONTENT_TYPE.into()),
        )
        .await?
        .await?;
    assert!(confirmation.is_ack());

    eventually(
        "the good event of the envelope is written",
        LONG,
        || async { Ok(env.stored_message_numbers(token, chat).await? == [1, 500]) },
    )
    .await?;
    let ingest_dead = chatcore::config::Topology::dead_letter_queue(&config.topology.ingest_queue);
    let index_dead = chatcore::config::Topology::dead_letter_queue(&config.topology.index_queue);
    eventually(
        "orphan and garbage are dead-lettered, each alone",
        LONG,
        || async {
            Ok(env.queue_depth(&ingest_dead).await? == 2
                && env.queue_depth(&index_dead).await? == 1)
        },
    )
    .await?;
    let mut dead_letters = Vec::new();
    while let Some(dead) = channel
        .basic_get(
            ingest_dead.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await?
    {
        assert_eq!(
            dead.delivery
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str()),
            Some("application/json"),
            "a dead letter is one event"
        );
        dead_letters.push(dead.delivery.data);
    }
    assert!(dead_letters.contains(&orphan.encode()));
    assert!(dead_letters.contains(&b"{not json".to_vec()));
    eventually("the envelope left both queues", LONG, || async {
        Ok(env.queue_depth(&config.topology.ingest_queue).await? == 0
            && env.queue_depth(&config.topology.index_queue).await? == 0)
    })
    .await?;
    running.stop().await
}
