//! Live streams of a chat (Server-Sent Events): what is stored arrives, a resumed stream misses
//! nothing and repeats nothing, any replica serves any chat, and streams are bounded.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::{
    Client, Next, ServerSentEvent, StatusCode, TestEnv, both_stacks, eventually, free_port,
};

const WAIT: Duration = Duration::from_secs(30);

fn summary(event: &ServerSentEvent) -> anyhow::Result<(String, u64, String, u64)> {
    Ok((
        event.event.clone(),
        event.number()?,
        event.data["body"].as_str().unwrap_or_default().to_owned(),
        event.data["version"].as_u64().unwrap_or_default(),
    ))
}

fn entry(kind: &str, number: u64, body: &str, version: u64) -> (String, u64, String, u64) {
    (kind.to_owned(), number, body.to_owned(), version)
}

both_stacks!(a_stream_delivers_every_stored_change_and_resumes_without_a_gap);

async fn a_stream_delivers_every_stored_change_and_resumes_without_a_gap(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let other_chat = client.create_chat(token).await?;
    // The replica that accepted the chat knows it before its row is written.
    let mut stream = client.open_stream(token, chat, None).await?;

    for body in ["one", "two", "three"] {
        client.create_message(token, chat, body).await?;
    }
    client
        .create_message(token, other_chat, "elsewhere")
        .await?;
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(summary(&stream.expect_event(WAIT).await?)?);
    }
    assert_eq!(
        received,
        [
            entry("created", 1, "one", 1),
            entry("created", 2, "two", 1),
            entry("created", 3, "three", 1)
        ]
    );
    let message = |number: u64| format!("/applications/{token}/chats/{chat}/messages/{number}");
    assert_eq!(
        client
            .put(&message(2), json!({"body": "two, edited"}))
            .await?
            .status,
        StatusCode::OK
    );
    assert_eq!(
        client.delete(&message(3)).await?.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        summary(&stream.expect_event(WAIT).await?)?,
        entry("updated", 2, "two, edited", 2)
    );
    let deleted = stream.expect_event(WAIT).await?;
    assert_eq!(summary(&deleted)?, entry("deleted", 3, "", 2));
    assert!(deleted.data["updated_at"].is_string());
    assert_eq!(deleted.sequence()?, 5, "the fifth change of the chat");
    drop(stream);

    // Posted while nobody listens; the client resumes after the last id it saw.
    for body in ["four", "five"] {
        client.create_message(token, chat, body).await?;
    }
    eventually("four and five are stored", WAIT, || async {
        Ok(client.get(&message(5)).await?.status == StatusCode::OK)
    })
    .await?;
    let mut resumed = client
        .open_stream(token, chat, Some(deleted.sequence()?))
        .await?;
    client.create_message(token, chat, "six").await?;
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(summary(&resumed.expect_event(WAIT).await?)?);
    }
    assert_eq!(
        received,
        [
            entry("created", 4, "four", 1),
            entry("created", 5, "five", 1),
            entry("created", 6, "six", 1)
        ]
    );
    assert!(
        matches!(resumed.next(Duration::from_millis(500)).await?, Next::Quiet),
        "nothing else: no duplicate"
    );

    // From the start: every message as it is now, the deleted one left out.
    let mut from_start = client.open_stream(token, chat, Some(0)).await?;
    let mut received = Vec::new();
    for _ in 0..5 {
        received.push(summary(&from_start.expect_event(WAIT).await?)?);
    }
    assert_eq!(
        received,
        [
            entry("created", 1, "one", 1),
            entry("created", 2, "two, edited", 2),
            entry("created", 4, "four", 1),
            entry("created", 5, "five", 1),
            entry("created", 6, "six", 1),
        ]
    );
    let bad = client
        .send_raw(
            client
                .request(
                    reqwest::Method::GET,
                    &format!("/applications/{token}/chats/{chat}/messages/stream"),
                )
                .header("last-event-id", "yesterday"),
        )
        .await?;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{bad:?}");
    let unknown_chat = client.stream(token, 99, None).await?;
    assert!(
        matches!(&unknown_chat, Err(reply) if reply.status == StatusCode::NOT_FOUND),
        "an unknown chat is 404"
    );
    drop((resumed, from_start));
    running.stop().await
}

both_stacks!(a_stream_resumed_while_messages_pour_in_has_each_exactly_once);

/// Resuming from the storage while messages are being stored: the catch-up and the live changes
/// overlap, and the stream still has every message once.
async fn a_stream_resumed_while_messages_pour_in_has_each_exactly_once(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    const MESSAGES: u64 = 300;
    let posting = {
        let (client, token) = (client.clone(), token.clone());
        tokio::spawn(async move {
            // As the contract asks of clients: a 503 of an overloaded machine is retried with
            // the same key (the stream must then still see each message exactly once).
            for index in 0..MESSAGES {
                client
                    .create_message_carefully(
                        &token,
                        chat,
                        &format!("message {index}"),
                        &format!("resume-{index}"),
                    )
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    // Some are stored, most are not yet.
    eventually("the first messages are stored", WAIT, || async {
        Ok(client
            .get(&format!("/applications/{token}/chats/{chat}/messages/20"))
            .await?
            .status
            == StatusCode::OK)
    })
    .await?;
    let mut stream = client.open_stream(token, chat, Some(0)).await?;
    let mut seen = Vec::new();
    while (seen.len() as u64) < MESSAGES {
        seen.push(stream.expect_event(WAIT).await?.number()?);
    }
    posting.await??;
    let distinct: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), seen.len(), "a message came twice: {seen:?}");
    assert_eq!(distinct, (1..=MESSAGES).collect::<BTreeSet<u64>>());
    assert!(
        matches!(stream.next(Duration::from_millis(500)).await?, Next::Quiet),
        "nothing after the last"
    );
    drop(stream);
    running.stop().await
}

/// Two api replicas, one a separate process: a stream on one receives what was posted on the
/// other, through RabbitMQ, and resuming on the other misses nothing.
#[tokio::test]
async fn any_replica_serves_any_chat_stream() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let running = env.running_chat("app").await?;
    let port = free_port()?;
    env.set("CHAT_HTTP_ADDR", &format!("127.0.0.1:{port}"));
    env.set("CHAT_HEALTH_ADDR", &format!("127.0.0.1:{}", free_port()?));
    let mut process = env.spawn_process("api")?;
    let other = Client::new(&format!("http://127.0.0.1:{port}/api/v1"));
    eventually("the api process answers", WAIT, || async {
        Ok(other.get("/applications/x/chats").await.is_ok())
    })
    .await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    eventually("the chat is stored", WAIT, || async {
        Ok(other
            .get(&format!("/applications/{token}/chats/{chat}"))
            .await?
            .status
            == StatusCode::OK)
    })
    .await?;

    let mut on_process = other.open_stream(token, chat, None).await?;
    let first = client
        .create_message(token, chat, "posted on the other")
        .await?;
    let event = on_process.expect_event(WAIT).await?;
    assert_eq!((event.event.as_str(), event.number()?), ("created", first));
    assert_eq!(event.data["body"], "posted on the other");
    let path = format!("/applications/{token}/chats/{chat}/messages/{first}");
    assert_eq!(
        client
            .put(&path, json!({"body": "edited on the other"}))
            .await?
            .status,
        StatusCode::OK
    );
    let edited = on_process.expect_event(WAIT).await?;
    assert_eq!(
        (edited.event.as_str(), edited.data["version"].as_u64()),
        ("updated", Some(2))
    );
    drop(on_process);

    let second = other.create_message(token, chat, "while away").await?;
    eventually("it is stored", WAIT, || async {
        Ok(client
            .get(&format!(
                "/applications/{token}/chats/{chat}/messages/{second}"
            ))
            .await?
            .status
            == StatusCode::OK)
    })
    .await?;
    // Resumed on the other replica after the last change seen (the edit): what came after it,
    // once each, in order.
    let mut on_in_process = client
        .open_stream(token, chat, Some(edited.sequence()?))
        .await?;
    let third = other.create_message(token, chat, "live again").await?;
    let mut created = Vec::new();
    while created.len() < 2 {
        let event = on_in_process.expect_event(WAIT).await?;
        assert_eq!(event.event, "created", "{event:?}");
        created.push(event.number()?);
    }
    assert_eq!(created, [second, third]);
    drop(on_in_process);
    system_tests::kill_hard(&mut process).await?;
    running.stop().await
}

both_stacks!(one_client_at_its_stream_bound_leaves_room_for_every_other);

/// One client address holding all the streams it may (over several applications) is refused one
/// more, and another tenant's client still opens a stream and gets plain answers at once.
async fn one_client_at_its_stream_bound_leaves_room_for_every_other(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    env.set("CHAT_TRUSTED_PROXY_HOPS", "1");
    env.set("CHAT_STREAMS_PER_ADDRESS", "3");
    let api = env.spawn_api().await?;
    let greedy = Client::forwarded_for(&api.base_url, "198.51.100.7")?;
    let tenant = Client::forwarded_for(&api.base_url, "198.51.100.8")?;
    let mut held = Vec::new();
    for n in 0..3 {
        let token = greedy.create_application(&format!("greedy {n}")).await?;
        let chat = greedy.create_chat(&token).await?;
        held.push(greedy.open_stream(&token, chat, None).await?);
    }
    let token = greedy.create_application("greedy 3").await?;
    let chat = greedy.create_chat(&token).await?;
    let refused = greedy
        .stream(&token, chat, None)
        .await?
        .err()
        .expect("over the address' bound");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"]["code"], "too_many_streams");

    let token = tenant.create_application("another tenant").await?;
    let chat = tenant.create_chat(&token).await?;
    let _stream = tenant.open_stream(&token, chat, None).await?;
    let asked = Instant::now();
    let shown = tenant.get(&format!("/applications/{token}")).await?;
    assert_eq!(shown.status, StatusCode::OK);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        asked.elapsed()
    );
    drop(held);
    api.stop().await
}

both_stacks!(a_stream_ends_at_its_lifetime_and_resumes_where_it_was);

/// A stream ends after `CHAT_STREAM_MAX_LIFETIME_SECONDS`; its client resumes with
/// `Last-Event-ID` and gets every message exactly once over the two streams.
async fn a_stream_ends_at_its_lifetime_and_resumes_where_it_was(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    env.set("CHAT_STREAM_MAX_LIFETIME_SECONDS", "3");
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let opened = Instant::now();
    let mut stream = client.open_stream(token, chat, Some(0)).await?;
    client.create_message(token, chat, "before").await?;
    let mut seen = Vec::new();
    loop {
        match stream.next(WAIT).await? {
            Next::Event(event) => seen.push(event.sequence()?),
            Next::Ended => break,
            Next::Quiet => anyhow::bail!("the stream outlived its lifetime"),
        }
    }
    assert!(
        opened.elapsed() >= Duration::from_secs(3),
        "ended after {:?}",
        opened.elapsed()
    );
    client.create_message(token, chat, "after").await?;
    let mut resumed = client
        .open_stream(token, chat, Some(seen.last().copied().unwrap_or(0)))
        .await?;
    while seen.len() < 2 {
        seen.push(resumed.expect_event(WAIT).await?.sequence()?);
    }
    assert_eq!(seen, [1, 2], "each change once, in order");
    drop(resumed);
    running.stop().await
}

both_stacks!(streams_are_bounded_heartbeated_and_closed_at_shutdown);

async fn streams_are_bounded_heartbeated_and_closed_at_shutdown(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    env.set("CHAT_STREAMS_PER_APPLICATION", "2");
    env.set("CHAT_STREAMS_PER_REPLICA", "3");
    env.set("CHAT_STREAM_HEARTBEAT_MS", "100");
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("app").await?;
    let chat = client.create_chat(&token).await?;
    let other_token = client.create_application("other").await?;
    let other_chat = client.create_chat(&other_token).await?;

    let mut first = client.open_stream(&token, chat, None).await?;
    let second = client.open_stream(&token, chat, None).await?;
    let refused = client
        .stream(&token, chat, None)
        .await?
        .err()
        .expect("over the limit");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"]["code"], "too_many_streams");
    let third = client.open_stream(&other_token, other_chat, None).await?;
    let refused = client
        .stream(&other_token, other_chat, None)
        .await?
        .err()
        .expect("over the replica's limit");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let metrics = reqwest::get(api.metrics_url()).await?.text().await?;
    assert!(metrics.contains("chat_live_streams 3"), "{metrics}");

    // Heartbeats keep a quiet stream talking.
    assert!(matches!(
        first.next(Duration::from_millis(450)).await?,
        Next::Quiet
    ));
    assert!(first.comments >= 2, "heartbeats: {}", first.comments);

    drop(second);
    eventually("a closed stream frees its place", WAIT, || async {
        Ok(match client.stream(&token, chat, None).await? {
            Ok(stream) => {
                drop(stream);
                true
            }
            Err(_) => false,
        })
    })
    .await?;

    // Shutdown ends the open streams instead of waiting for them.
    let stopping = Instant::now();
    let stopped = tokio::spawn(api.stop());
    assert!(matches!(first.next(WAIT).await?, Next::Ended));
    stopped.await??;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
    drop(third);
    Ok(())
}

both_stacks!(a_reader_that_falls_behind_is_disconnected);

/// A client that does not read while its chat gets busy is disconnected once it is more than the
/// buffer behind, instead of being buffered for without end; it resumes with `Last-Event-ID`.
async fn a_reader_that_falls_behind_is_disconnected(mut env: TestEnv) -> anyhow::Result<()> {
    env.set("CHAT_STREAM_BUFFERED_CHANGES", "4");
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let mut stream = client.open_stream(token, chat, None).await?;
    // Big messages fill the socket buffers quickly, so the server cannot write them all.
    let body = "x".repeat(60_000);
    const MESSAGES: u64 = 200;
    for _ in 0..MESSAGES {
        client.create_message(token, chat, &body).await?;
    }
    eventually("all are stored", Duration::from_secs(60), || async {
        Ok(client
            .get(&format!(
                "/applications/{token}/chats/{chat}/messages/{MESSAGES}"
            ))
            .await?
            .status
            == StatusCode::OK)
    })
    .await?;
    let (mut received, mut last) = (0, 0);
    loop {
        match stream.next(WAIT).await? {
            Next::Event(event) => {
                received += 1;
                last = event.sequence()?;
                assert_eq!(last, received, "in order, without a gap");
                assert_eq!(
                    event.number()?,
                    received,
                    "messages posted one after another"
                );
            }
            Next::Ended => break,
            Next::Quiet => anyhow::bail!("the slow stream was neither ended nor complete"),
        }
    }
    assert!(
        received < MESSAGES,
        "received all {received}: nothing fell behind"
    );
    let metrics = reqwest::get(running.api.metrics_url())
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("chat_live_streams_ended_total{reason=\"slow_reader\"} 1"),
        "{metrics}"
    );
    // Where it resumes, nothing is missing.
    let mut resumed = client.open_stream(token, chat, Some(last)).await?;
    for expected in last + 1..=MESSAGES {
        assert_eq!(resumed.expect_event(WAIT).await?.sequence()?, expected);
    }
    drop(resumed);
    running.stop().await
}

both_stacks!(a_stream_takes_its_last_event_id_as_a_query_parameter_too);

/// `?last_event_id=` (what a browser's EventSource can send on its first request) means what the
/// header means; the header wins when both are given (an EventSource that reconnects sends it).
async fn a_stream_takes_its_last_event_id_as_a_query_parameter_too(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("app").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    for body in ["one", "two"] {
        client.create_message(token, chat, body).await?;
    }
    let path = format!("/applications/{token}/chats/{chat}/messages/stream");
    eventually("one and two are stored", WAIT, || async {
        Ok(client
            .get(&format!("/applications/{token}/chats/{chat}/messages/2"))
            .await?
            .status
            == StatusCode::OK)
    })
    .await?;
    let open = |query: &'static str, header: Option<&'static str>| {
        let mut request = client
            .request(reqwest::Method::GET, &format!("{path}{query}"))
            .header("accept", "text/event-stream");
        if let Some(header) = header {
            request = request.header("last-event-id", header);
        }
        client.stream_of(request)
    };

    let mut from_start = open("?last_event_id=0", None)
        .await?
        .map_err(|reply| anyhow::anyhow!("refused: {reply:?}"))?;
    let mut received = Vec::new();
    for _ in 0..2 {
        received.push(summary(&from_start.expect_event(WAIT).await?)?);
    }
    assert_eq!(
        received,
        [entry("created", 1, "one", 1), entry("created", 2, "two", 1)]
    );

    let mut header_wins = open("?last_event_id=0", Some("1"))
        .await?
        .map_err(|reply| anyhow::anyhow!("refused: {reply:?}"))?;
    assert_eq!(
        summary(&header_wins.expect_event(WAIT).await?)?,
        entry("created", 2, "two", 1),
        "after the header's sequence, not the query's"
    );
    assert!(
        matches!(
            header_wins.next(Duration::from_millis(500)).await?,
            Next::Quiet
        ),
        "nothing before it"
    );

    let bad = open("?last_event_id=yesterday", None).await?;
    assert!(
        matches!(&bad, Err(reply) if reply.status == StatusCode::BAD_REQUEST
            && reply.body["error"]["field"] == "last_event_id"),
        "a query value that is no sequence is 400 naming it: {:?}",
        bad.err()
    );
    drop((from_start, header_wins));
    running.stop().await
}
