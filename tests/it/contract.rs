//! Every endpoint: success shapes, 404s, validation rules, pagination bounds, error body. Each
//! test runs on both stacks (`<test>::on_services` and `<test>::embedded`).

use std::time::Duration;

use serde_json::{Value, json};
use system_tests::{Reply, Stack, StatusCode, TestEnv, both_stacks, eventually};

fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "unexpected reply {reply:?}");
    assert_eq!(
        reply.body["error"]["code"], code,
        "unexpected error body {reply:?}"
    );
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error message missing: {reply:?}"
    );
}

fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    keys
}

both_stacks!(applications_create_show_update_list);

async fn applications_create_show_update_list(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let client = &api.client;

    let created = client
        .post("/applications", json!({"name": "  My Chat App "}))
        .await?;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(keys(&created.body), ["chats_count", "name", "token"]);
    assert_eq!(created.body["name"], "My Chat App");
    assert_eq!(created.body["chats_count"], 0);
    let token = created.body["token"].as_str().expect("token").to_owned();
    // `chat_`, 30 random base62 characters and a 6-character checksum scanners can verify.
    assert_eq!(token.len(), 41);
    assert!(token.starts_with("chat_"));
    assert!(token[5..].bytes().all(|b| b.is_ascii_alphanumeric()));

    let shown = client.get(&format!("/applications/{token}")).await?;
    assert_eq!(shown.status, StatusCode::OK);
    assert_eq!(shown.body, created.body);

    let updated = client
        .put(
            &format!("/applications/{token}"),
            json!({"name": "Renamed"}),
        )
        .await?;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.body["name"], "Renamed");
    assert_eq!(updated.body["token"], token.as_str());
    // Same name again is still a 200, not a 404.
    let unchanged = client
        .put(
            &format!("/applications/{token}"),
            json!({"name": "Renamed"}),
        )
        .await?;
    assert_eq!(unchanged.status, StatusCode::OK);

    let second = client.create_application("Second").await?;
    let listed = client.get_as_admin("/applications").await?;
    assert_eq!(listed.status, StatusCode::OK);
    // The operator sees a hint of each token (prefix and last 4 characters), never the token.
    let hints: Vec<&str> = listed.body["applications"]
        .as_array()
        .expect("array")
        .iter()
        .map(|a| a["token_hint"].as_str().expect("token_hint"))
        .collect();
    assert_eq!(hints, [hint(&token), hint(&second)]);
    assert!(
        !listed.body.to_string().contains(&token) && !listed.body.to_string().contains(&second),
        "{}",
        listed.body
    );
    assert_eq!(
        listed.body["pagination"],
        json!({"page": 1, "per_page": 25, "next_page": null, "next_after": null, "previous_before": null})
    );
    api.stop().await
}

both_stacks!(application_validation_and_not_found);

async fn application_validation_and_not_found(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let client = &api.client;

    for body in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "   "}),
        json!({"name": "x".repeat(256)}),
        json!({"name": "a\u{1}b"}),
    ] {
        let reply = client.post("/applications", body).await?;
        assert_error(
            &reply,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        );
        assert_eq!(reply.body["error"]["field"], "name");
    }
    assert_eq!(
        client
            .post("/applications", json!({"name": "é".repeat(255)}))
            .await?
            .status,
        StatusCode::CREATED
    );
    let wrong_type = client.post("/applications", json!({"name": 5})).await?;
    assert_error(&wrong_type, StatusCode::BAD_REQUEST, "bad_request");
    let malformed = client
        .send_raw(
            client
                .request(reqwest::Method::POST, "/applications")
                .header("content-type", "application/json")
                .body("{\"name\":"),
        )
        .await?;
    assert_error(&malformed, StatusCode::BAD_REQUEST, "bad_request");
    let not_json = client
        .send_raw(
            client
                .request(reqwest::Method::POST, "/applications")
                .header("content-type", "text/plain")
                .body("name=x"),
        )
        .await?;
    assert_error(
        &not_json,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let too_large = client
        .post("/applications", json!({"name": "x".repeat(300 * 1024)}))
        .await?;
    assert_error(
        &too_large,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    let missing = "A".repeat(32);
    assert_error(
        &client.get(&format!("/applications/{missing}")).await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &client.get("/applications/not-a-token").await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &client
            .put(&format!("/applications/{missing}"), json!({"name": "x"}))
            .await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &client.get("/nothing/here").await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let delete = client
        .send_raw(client.request(reqwest::Method::DELETE, "/applications"))
        .await?;
    assert_error(
        &delete,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );

    // Nothing invalid was stored: only the one valid application exists.
    assert_eq!(
        env.count("SELECT COUNT(*) FROM applications", &[]).await?,
        1
    );
    api.stop().await
}

both_stacks!(pagination_is_bounded_and_ordered);

async fn pagination_is_bounded_and_ordered(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let client = &api.client;
    let mut tokens = Vec::new();
    for index in 0..5 {
        tokens.push(client.create_application(&format!("app {index}")).await?);
    }
    let first = client.get_as_admin("/applications?per_page=2").await?;
    assert_eq!(
        first.body["applications"].as_array().expect("array").len(),
        2
    );
    assert_eq!(first.body["pagination"]["next_page"], 2);
    assert_eq!(first.body["pagination"]["previous_before"], Value::Null);
    let cursor = first.body["pagination"]["next_after"]
        .as_u64()
        .expect("a cursor");
    let second = client
        .get_as_admin(&format!("/applications?per_page=2&after={cursor}"))
        .await?;
    assert_eq!(second.body["applications"][0]["name"], "app 2");
    assert_eq!(second.body["applications"][1]["name"], "app 3");
    assert!(
        second.body["pagination"].get("page").is_none(),
        "a keyed page has no number"
    );
    let back = second.body["pagination"]["previous_before"]
        .as_u64()
        .expect("a cursor");
    let again = client
        .get_as_admin(&format!("/applications?per_page=2&before={back}"))
        .await?;
    assert_eq!(again.body["applications"], first.body["applications"]);
    assert_eq!(again.body["pagination"]["previous_before"], Value::Null);
    let last = client
        .get_as_admin("/applications?per_page=2&page=3")
        .await?;
    assert_eq!(last.body["applications"][0]["name"], "app 4");
    assert_eq!(last.body["pagination"]["next_page"], Value::Null);
    let beyond = client
        .get_as_admin("/applications?per_page=2&page=9")
        .await?;
    assert_eq!(beyond.body["applications"], json!([]));
    let maximum = client.get_as_admin("/applications?per_page=100").await?;
    assert_eq!(maximum.status, StatusCode::OK);
    for query in [
        "per_page=0",
        "per_page=101",
        "per_page=x",
        "page=0",
        "page=-1",
        "page=10001",
        "page=501&per_page=2",
        "after=x",
        "before=-1",
        "page=2&after=3",
    ] {
        let reply = client
            .get_as_admin(&format!("/applications?{query}"))
            .await?;
        assert_error(&reply, StatusCode::BAD_REQUEST, "bad_request");
    }
    api.stop().await
}

both_stacks!(keyset_pages_return_every_message_exactly_once);

async fn keyset_pages_return_every_message_exactly_once(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("keyset").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    for index in 0..30 {
        client
            .create_message(token, chat, &format!("message {index}"))
            .await?;
    }
    let list = format!("/applications/{token}/chats/{chat}/messages?per_page=7");
    eventually(
        "the 30 messages are stored",
        Duration::from_secs(30),
        || async {
            let page = client.get(&format!("{list}&after=29")).await?;
            Ok(page.body["messages"]
                .as_array()
                .is_some_and(|m| m.len() == 1))
        },
    )
    .await?;
    let numbers = |reply: &Reply| -> Vec<u64> {
        reply.body["messages"]
            .as_array()
            .expect("array")
            .iter()
            .map(|message| message["number"].as_u64().expect("number"))
            .collect()
    };
    let mut forward = Vec::new();
    let mut query = String::new();
    loop {
        let page = client.get(&format!("{list}{query}")).await?;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        forward.extend(numbers(&page));
        match page.body["pagination"]["next_after"].as_u64() {
            Some(after) => query = format!("&after={after}"),
            None => break,
        }
    }
    assert_eq!(forward, (1..=30).collect::<Vec<_>>());
    let mut backward = Vec::new();
    let mut before = 31;
    loop {
        let page = client.get(&format!("{list}&before={before}")).await?;
        let mut page_numbers = numbers(&page);
        assert!(
            page_numbers.is_sorted(),
            "ascending within a page: {page_numbers:?}"
        );
        page_numbers.extend(backward);
        backward = page_numbers;
        match page.body["pagination"]["previous_before"].as_u64() {
            Some(first) => before = first,
            None => break,
        }
    }
    assert_eq!(backward, forward);
    let chats = client
        .get(&format!("/applications/{token}/chats?after=0&per_page=1"))
        .await?;
    assert_eq!(chats.body["chats"][0]["number"], chat);
    assert_eq!(chats.body["pagination"]["next_after"], Value::Null);
    running.stop().await
}

both_stacks!(chats_and_messages_lifecycle);

async fn chats_and_messages_lifecycle(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let token = client.create_application("app").await?;

    let chat = client
        .post_empty(&format!("/applications/{token}/chats"))
        .await?;
    assert_eq!(chat.status, StatusCode::ACCEPTED);
    assert_eq!(chat.body, json!({"number": 1}));
    assert_eq!(client.create_chat(&token).await?, 2);

    // A message to a chat that was just accepted is accepted too, before the chat row exists.
    let message = client
        .post(
            &format!("/applications/{token}/chats/1/messages"),
            json!({"body": "Hello, world!"}),
        )
        .await?;
    assert_eq!(message.status, StatusCode::ACCEPTED);
    assert_eq!(message.body, json!({"number": 1}));
    assert_eq!(client.create_message(&token, 1, "second").await?, 2);
    assert_eq!(client.create_message(&token, 2, "other chat").await?, 1);

    eventually(
        "messages are persisted",
        Duration::from_secs(20),
        || async { Ok(env.stored_message_numbers(&token, 1).await? == [1, 2]) },
    )
    .await?;
    eventually("counts are current", Duration::from_secs(20), || async {
        let app = client.get(&format!("/applications/{token}")).await?;
        let chat = client
            .get(&format!("/applications/{token}/chats/1"))
            .await?;
        Ok(app.body["chats_count"] == 2 && chat.body["messages_count"] == 2)
    })
    .await?;

    let chat = client
        .get(&format!("/applications/{token}/chats/1"))
        .await?;
    assert_eq!(chat.status, StatusCode::OK);
    // The reference's fields, and the optional ones a request without them leaves null.
    assert_eq!(
        keys(&chat.body),
        [
            "created_at",
            "messages_count",
            "metadata",
            "number",
            "title"
        ]
    );
    assert_eq!(
        (&chat.body["title"], &chat.body["metadata"]),
        (&json!(null), &json!(null))
    );
    assert!(
        chat.body["created_at"]
            .as_str()
            .expect("timestamp")
            .ends_with('Z')
    );
    let chats = client.get(&format!("/applications/{token}/chats")).await?;
    let numbers: Vec<u64> = chats.body["chats"]
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["number"].as_u64().expect("n"))
        .collect();
    assert_eq!(numbers, [1, 2]);

    let message = client
        .get(&format!("/applications/{token}/chats/1/messages/1"))
        .await?;
    assert_eq!(message.status, StatusCode::OK);
    assert_eq!(
        keys(&message.body),
        [
            "body",
            "created_at",
            "edited_at",
            "metadata",
            "number",
            "sender"
        ]
    );
    for optional in ["edited_at", "metadata", "sender"] {
        assert_eq!(message.body[optional], json!(null), "{optional}");
    }
    assert_eq!(message.body["body"], "Hello, world!");
    let messages = client
        .get(&format!(
            "/applications/{token}/chats/1/messages?per_page=1"
        ))
        .await?;
    assert_eq!(messages.body["messages"][0]["number"], 1);
    assert_eq!(messages.body["pagination"]["next_page"], 2);
    let page_two = client
        .get(&format!(
            "/applications/{token}/chats/1/messages?per_page=1&page=2"
        ))
        .await?;
    assert_eq!(page_two.body["messages"][0]["number"], 2);

    let updated = client
        .put(
            &format!("/applications/{token}/chats/1/messages/1"),
            json!({"body": "Updated content"}),
        )
        .await?;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(
        keys(&updated.body),
        [
            "body",
            "edited_at",
            "metadata",
            "number",
            "sender",
            "updated_at"
        ]
    );
    assert_eq!(
        updated.body["edited_at"], updated.body["updated_at"],
        "the first edit"
    );
    assert_eq!(updated.body["body"], "Updated content");
    let reread = client
        .get(&format!("/applications/{token}/chats/1/messages/1"))
        .await?;
    assert_eq!(reread.body["body"], "Updated content");

    workers.stop().await?;
    api.stop().await
}

both_stacks!(chat_and_message_validation_and_not_found);

async fn chat_and_message_validation_and_not_found(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("app").await?;
    let missing_app = "B".repeat(32);

    assert_error(
        &client
            .post_empty(&format!("/applications/{missing_app}/chats"))
            .await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &client
            .get(&format!("/applications/{missing_app}/chats"))
            .await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &client
            .get(&format!("/applications/{token}/chats/1"))
            .await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    for bad in ["0", "-1", "abc", "99999999999999999999"] {
        let reply = client
            .get(&format!("/applications/{token}/chats/{bad}"))
            .await?;
        assert_error(&reply, StatusCode::BAD_REQUEST, "bad_request");
    }
    // Messages to a chat that was never accepted.
    let no_chat = client
        .post(
            &format!("/applications/{token}/chats/7/messages"),
            json!({"body": "hi"}),
        )
        .await?;
    assert_error(&no_chat, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(client.create_chat(&token).await?, 1);
    for body in [
        json!({}),
        json!({"body": ""}),
        json!({"body": "  \n "}),
        json!({"body": "x".repeat(65_537)}),
    ] {
        let reply = client
            .post(&format!("/applications/{token}/chats/1/messages"), body)
            .await?;
        assert_error(
            &reply,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        );
        assert_eq!(reply.body["error"]["field"], "body");
    }
    let largest = client
        .post(
            &format!("/applications/{token}/chats/1/messages"),
            json!({"body": "x".repeat(65_536)}),
        )
        .await?;
    assert_eq!(largest.status, StatusCode::ACCEPTED);
    assert_error(
        &client
            .get(&format!("/applications/{token}/chats/1/messages/5"))
            .await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &client
            .put(
                &format!("/applications/{token}/chats/1/messages/5"),
                json!({"body": "x"}),
            )
            .await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let first_message = format!("/applications/{token}/chats/1/messages/1");
    let update_first = || client.put(&first_message, json!({"body": "x"}));
    match env.stack() {
        // Number 1 was accepted but no worker runs here, so it is not persisted yet.
        Stack::Services => assert_error(
            &update_first().await?,
            StatusCode::CONFLICT,
            "not_persisted_yet",
        ),
        // The embedded process runs its consumers: until they wrote it the answer is the same
        // 409, then the update succeeds.
        Stack::Embedded => {
            eventually("the update succeeds", Duration::from_secs(20), || async {
                let reply = update_first().await?;
                if reply.status == StatusCode::CONFLICT {
                    assert_error(&reply, StatusCode::CONFLICT, "not_persisted_yet");
                }
                Ok(reply.status == StatusCode::OK)
            })
            .await?
        }
    }
    let invalid_update = client
        .put(
            &format!("/applications/{token}/chats/1/messages/1"),
            json!({"body": ""}),
        )
        .await?;
    assert_error(
        &invalid_update,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    // Invalid input allocated no number: the next message is 2.
    assert_eq!(client.create_message(&token, 1, "next").await?, 2);
    api.stop().await
}

both_stacks!(search_parameters_are_validated);

async fn search_parameters_are_validated(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("app").await?;
    client.create_chat(&token).await?;
    let base = format!("/applications/{token}/chats/1/messages/search");
    for query in [
        "",
        "?query=",
        "?query=%20%20",
        &format!("?query={}", "a".repeat(257)),
        "?query=a&per_page=0",
        "?query=a&page=101&per_page=100",
    ] {
        let reply = client.get(&format!("{base}{query}")).await?;
        assert_error(&reply, StatusCode::BAD_REQUEST, "bad_request");
    }
    let empty = client.get(&format!("{base}?query=nothing")).await?;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.body["messages"], json!([]));
    assert_error(
        &client
            .get(&format!(
                "/applications/{token}/chats/9/messages/search?query=a"
            ))
            .await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    api.stop().await
}

both_stacks!(health_endpoints);

async fn health_endpoints(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let root = api.base_url.replace("/api/v1", "");
    let live = reqwest::get(format!("{root}/livez")).await?;
    assert_eq!(live.status(), StatusCode::OK);
    // The public port says ready or not, and nothing of what sits behind the api.
    let public: Value = reqwest::get(format!("{root}/readyz")).await?.json().await?;
    assert_eq!(public, json!({"status": "ready"}));
    let ready: Value = reqwest::get(format!("{}/readyz", api.internal_url))
        .await?
        .json()
        .await?;
    assert_eq!(ready["status"], "ready");
    let expected = match env.stack() {
        Stack::Services => {
            json!({"mysql": true, "redis": true, "rabbitmq": true, "elasticsearch": true})
        }
        Stack::Embedded => {
            json!({"sqlite": true, "in-process": true, "sqlite-queue": true, "sqlite-fts5": true})
        }
    };
    assert_eq!(ready["checks"], expected);
    api.stop().await
}

/// A terminating replica keeps serving for `CHAT_SHUTDOWN_DELAY_MS` with `/readyz` answering 503,
/// so requests routed to it before the cluster removes it from its endpoints are not refused.
#[tokio::test]
async fn the_api_serves_through_its_shutdown_delay_while_not_ready() -> anyhow::Result<()> {
    let mut env = TestEnv::embedded().await?;
    env.set("CHAT_SHUTDOWN_DELAY_MS", "1500");
    let api = env.spawn_api().await?;
    let readyz = format!("{}/readyz", api.internal_url);
    assert_eq!(reqwest::get(&readyz).await?.status(), StatusCode::OK);

    let signalled = std::time::Instant::now();
    api.signal_shutdown();
    let answer = reqwest::get(&readyz).await?;
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.json::<Value>().await?["status"], "draining");
    let token = api.client.create_application("during the delay").await?;
    let chat = api.client.create_chat(&token).await?;
    assert_eq!(chat, 1, "requests are still served while draining");
    assert!(signalled.elapsed() < Duration::from_millis(1500));

    api.stop().await?;
    assert!(
        signalled.elapsed() >= Duration::from_millis(1500),
        "stopped {:?} after the signal, before the delay ended",
        signalled.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn worker_health_follows_the_consumer() -> anyhow::Result<()> {
    let readiness = chatcore::health::Readiness::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let address = chatcore::health::serve(
        "127.0.0.1:0".parse()?,
        readiness.clone(),
        chatcore::metrics::Metrics::new(),
        shutdown.clone(),
    )
    .await?;
    let get = |path: &'static str| async move {
        reqwest::get(format!("http://{address}{path}"))
            .await
            .map(|r| r.status())
    };
    assert_eq!(get("/livez").await?, StatusCode::OK);
    assert_eq!(get("/readyz").await?, StatusCode::SERVICE_UNAVAILABLE);
    readiness.set(true);
    assert_eq!(get("/readyz").await?, StatusCode::OK);
    shutdown.cancel();
    Ok(())
}

both_stacks!(idempotency_keys_make_retries_safe);

async fn idempotency_keys_make_retries_safe(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let token = client.create_application("app").await?;
    let post_chat = |key: &'static str| {
        client.send_raw(
            client
                .request(
                    reqwest::Method::POST,
                    &format!("/applications/{token}/chats"),
                )
                .header("Idempotency-Key", key),
        )
    };
    let first = post_chat("chat-key-1").await?;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let retried = post_chat("chat-key-1").await?;
    assert_eq!(retried.status, StatusCode::ACCEPTED);
    assert_eq!(retried.body, first.body, "a retry gets the first number");
    let other = post_chat("chat-key-2").await?;
    assert_eq!(other.body["number"], 2);
    let chat = first.body["number"].as_u64().expect("number");

    let post_message = |key: &'static str, body: &'static str| {
        client.send_raw(
            client
                .request(
                    reqwest::Method::POST,
                    &format!("/applications/{token}/chats/{chat}/messages"),
                )
                .header("Idempotency-Key", key)
                .json(&json!({ "body": body })),
        )
    };
    let (one, two) = tokio::join!(
        post_message("msg-key", "hello"),
        post_message("msg-key", "hello")
    );
    let (one, two) = (one?, two?);
    // Concurrent twins: one creates, the other is told to retry (409) or already sees the number.
    let accepted: Vec<&Reply> = [&one, &two]
        .into_iter()
        .filter(|r| r.status == StatusCode::ACCEPTED)
        .collect();
    assert!(!accepted.is_empty(), "{one:?} {two:?}");
    for reply in [&one, &two] {
        assert!(
            reply.status == StatusCode::ACCEPTED
                || reply.body["error"]["code"] == "idempotency_key_in_use",
            "{reply:?}"
        );
    }
    let again = post_message("msg-key", "hello").await?;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body, accepted[0].body);
    let reused = post_message("msg-key", "a different body").await?;
    assert_error(
        &reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    );
    let bad_key = client
        .send_raw(
            client
                .request(
                    reqwest::Method::POST,
                    &format!("/applications/{token}/chats"),
                )
                .header("Idempotency-Key", "has space"),
        )
        .await?;
    assert_error(&bad_key, StatusCode::BAD_REQUEST, "bad_request");

    eventually(
        "the messages are persisted",
        Duration::from_secs(30),
        || async { Ok(env.stored_message_numbers(&token, chat).await? == [1]) },
    )
    .await?;
    let application_id = env.application_id(&token).await?;
    eventually("two chats, not four", Duration::from_secs(30), || async {
        Ok(env
            .count(
                "SELECT COUNT(*) FROM chats WHERE application_id = ?",
                &[application_id],
            )
            .await?
            == 2)
    })
    .await?;
    workers.stop().await?;
    api.stop().await
}

both_stacks!(the_openapi_document_and_docs_page_are_served);

async fn the_openapi_document_and_docs_page_are_served(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let document = api.client.get("/openapi.json").await?;
    assert_eq!(document.status, StatusCode::OK);
    assert_eq!(document.body["openapi"], "3.1.0");
    let paths = document.body["paths"].as_object().expect("paths");
    // 2 of applications, 1 of revocations, 15 of the bearer form (5 of them the webhooks') and
    // their 15 legacy twins.
    assert_eq!(paths.len(), 32, "{:?}", paths.keys().collect::<Vec<_>>());
    for (path, operations) in paths {
        for operation in operations.as_object().expect("operations").values() {
            assert!(
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{path}"
            );
        }
    }
    let docs = reqwest::get(api.base_url.replace("/api/v1", "/docs/")).await?;
    assert_eq!(docs.status(), StatusCode::OK);
    let page = docs.text().await?;
    assert!(
        page.contains("swagger-ui"),
        "the docs page is served from the binary"
    );
    api.stop().await
}

#[test]
fn the_checked_in_openapi_document_matches_the_code() -> anyhow::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let checked_in = std::fs::read_to_string(&path)?;
    assert!(
        checked_in.trim_end() == api::openapi_json().trim_end(),
        "docs/openapi.json is out of date: run `cargo run -p api -- openapi > docs/openapi.json`"
    );
    Ok(())
}

/// What the admin listing shows of a token: its prefix and last 4 characters.
fn hint(token: &str) -> String {
    format!("chat_...{}", &token[token.len() - 4..])
}
