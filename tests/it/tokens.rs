//! Application tokens: the bearer form of every application route, digests in the database,
//! rotation with an overlap and revocation across replicas, who may create applications, and the
//! chat quota.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use system_tests::{Client, Reply, Stack, TEST_ADMIN_TOKEN, TestEnv, both_stacks, eventually};

/// How long the pipeline may take to store or index something on a loaded machine.
const LONG: Duration = Duration::from_secs(60);

fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "unexpected reply {reply:?}");
    assert_eq!(reply.body["error"]["code"], code, "{reply:?}");
}

/// A request of the bearer form: the application's token in `Authorization`, none in the path.
async fn as_tenant(
    client: &Client,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Reply> {
    let mut request = client.request(method, path);
    request = request.bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    client.send_raw(request).await
}

both_stacks!(the_bearer_form_serves_every_application_route);

async fn the_bearer_form_serves_every_application_route(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let token = client.create_application("bearer").await?;
    let tenant = |method, path: &'static str, body| as_tenant(client, &token, method, path, body);

    let shown = tenant(Method::GET, "/application", None).await?;
    assert_eq!(shown.status, StatusCode::OK, "{shown:?}");
    assert_eq!(shown.body["token"], token.as_str());
    let renamed = tenant(
        Method::PUT,
        "/application",
        Some(json!({"name": "renamed"})),
    )
    .await?;
    assert_eq!(renamed.body["name"], "renamed");
    let chat = tenant(Method::POST, "/chats", None).await?;
    assert_eq!(chat.status, StatusCode::ACCEPTED, "{chat:?}");
    assert_eq!(chat.body["number"], 1);
    eventually("the chat is stored", LONG, || async {
        Ok(tenant(Method::GET, "/chats/1", None).await?.status == StatusCode::OK)
    })
    .await?;
    let chats = tenant(Method::GET, "/chats", None).await?;
    assert_eq!(chats.body["chats"][0]["number"], 1);
    let message = tenant(
        Method::POST,
        "/chats/1/messages",
        Some(json!({"body": "hello bearer"})),
    )
    .await?;
    assert_eq!(message.status, StatusCode::ACCEPTED, "{message:?}");
    // Stored and indexed: the two consumers finish in either order.
    eventually("the message is searchable and stored", LONG, || async {
        let found = tenant(Method::GET, "/chats/1/messages/search?query=bearer", None).await?;
        let stored = tenant(Method::GET, "/chats/1/messages/1", None).await?;
        Ok(found.body["messages"][0]["number"] == 1 && stored.status == StatusCode::OK)
    })
    .await?;
    let shown = tenant(Method::GET, "/chats/1/messages/1", None).await?;
    assert_eq!(shown.body["body"], "hello bearer");
    let listed = tenant(Method::GET, "/chats/1/messages", None).await?;
    assert_eq!(listed.body["messages"][0]["number"], 1);
    let edited = tenant(
        Method::PUT,
        "/chats/1/messages/1",
        Some(json!({"body": "edited"})),
    )
    .await?;
    assert_eq!(edited.status, StatusCode::OK, "{edited:?}");
    let stream = client
        .request(Method::GET, "/chats/1/messages/stream")
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .send()
        .await?;
    assert_eq!(stream.status(), StatusCode::OK);
    drop(stream);
    let deleted = tenant(Method::DELETE, "/chats/1/messages/1", None).await?;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");

    // No key, a malformed one, or one no application has: 401 with the Bearer challenge.
    let missing = client.get("/chats").await?;
    assert_error(
        &missing,
        StatusCode::UNAUTHORIZED,
        "application_key_required",
    );
    let challenge = client.request(Method::GET, "/application").send().await?;
    assert_eq!(
        challenge.headers()["www-authenticate"],
        "Bearer realm=\"chat application\""
    );
    let unknown = format!("{}AAAA", &token[..token.len() - 4]);
    for wrong in ["junk", unknown.as_str(), TEST_ADMIN_TOKEN] {
        let refused = as_tenant(client, wrong, Method::GET, "/chats", None).await?;
        assert_error(
            &refused,
            StatusCode::UNAUTHORIZED,
            "application_key_required",
        );
    }
    // The legacy form answers the same, from the same handlers.
    let legacy = client.get(&format!("/applications/{token}/chats")).await?;
    assert_eq!(legacy.body["chats"], chats.body["chats"]);

    // The document has the scheme, every bearer route uses it, and each has a deprecated twin.
    let document = client.get("/openapi.json").await?.body;
    assert_eq!(
        document["components"]["securitySchemes"]["application_token"]["scheme"],
        "bearer"
    );
    let show_chat = &document["paths"]["/api/v1/chats/{number}"]["get"];
    assert_eq!(
        show_chat["security"],
        json!([{"application_token": []}, {"client_token": []}])
    );
    let legacy_show_chat = &document["paths"]["/api/v1/applications/{token}/chats/{number}"]["get"];
    assert_eq!(legacy_show_chat["deprecated"], true);
    assert_eq!(legacy_show_chat["operationId"], "show_chat_by_path_token");
    workers.stop().await?;
    api.stop().await
}

both_stacks!(the_database_keeps_digests_and_the_listing_hints);

async fn the_database_keeps_digests_and_the_listing_hints(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let token = api.client.create_application("digested").await?;
    let token_columns = if env.stack() == Stack::Embedded {
        env.count_where(
            "SELECT COUNT(*) FROM pragma_table_info('applications') WHERE name = ?",
            &["token"],
        )
        .await?
    } else {
        env.count_where(
            "SELECT COUNT(*) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND column_name = ?",
            &["token"],
        )
        .await?
    };
    assert_eq!(token_columns, 0, "no column holds a token");
    assert_eq!(
        env.count_where(
            "SELECT COUNT(*) FROM application_tokens WHERE digest = ? OR LENGTH(digest) <> 32",
            &[&token]
        )
        .await?,
        0
    );
    assert_eq!(
        env.count_where(
            "SELECT COUNT(*) FROM applications WHERE name = ? OR token_hint LIKE ?",
            &[&token, &format!("%{}%", &token[5..20])]
        )
        .await?,
        0,
        "the hint is the prefix and the last 4 characters only"
    );
    // Found by its digest.
    env.application_id(&token).await?;
    api.stop().await
}

/// Both tokens work within the overlap on either replica; then only the new one.
#[tokio::test]
async fn a_rotated_token_works_for_the_overlap_then_stops_on_every_replica() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.set("CHAT_TOKEN_ROTATION_OVERLAP_SECONDS", "3");
    let (first, second) = (env.spawn_api().await?, env.spawn_api().await?);
    let old = first.client.create_application("rotating").await?;
    let rotated = as_tenant(
        &first.client,
        &old,
        Method::POST,
        "/application/token/rotate",
        None,
    )
    .await?;
    assert_eq!(rotated.status, StatusCode::CREATED, "{rotated:?}");
    let new = rotated.body["token"].as_str().expect("token").to_owned();
    assert_ne!(new, old);
    assert!(rotated.body["previous_tokens_expire_at"].is_string());
    for replica in [&first, &second] {
        for token in [&old, &new] {
            let shown =
                as_tenant(&replica.client, token, Method::GET, "/application", None).await?;
            assert_eq!(
                shown.status,
                StatusCode::OK,
                "within the overlap: {shown:?}"
            );
        }
    }
    eventually("the old token stops after the overlap", LONG, || async {
        let mut refused = true;
        for replica in [&first, &second] {
            let reply = as_tenant(&replica.client, &old, Method::GET, "/application", None).await?;
            refused &= reply.status == StatusCode::UNAUTHORIZED;
        }
        Ok(refused)
    })
    .await?;
    for replica in [&first, &second] {
        let shown = as_tenant(&replica.client, &new, Method::GET, "/application", None).await?;
        assert_eq!(shown.status, StatusCode::OK, "{shown:?}");
    }
    first.stop().await?;
    second.stop().await
}

/// The operator revokes a token on one replica; another that served it a moment before refuses
/// it within a second, and the replacement works there.
#[tokio::test]
async fn a_revoked_token_is_refused_by_another_replica_within_a_second() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (first, second) = (env.spawn_api().await?, env.spawn_api().await?);
    let token = first.client.create_application("revoked").await?;
    let served = as_tenant(&second.client, &token, Method::GET, "/application", None).await?;
    assert_eq!(served.status, StatusCode::OK);
    let revocation = first
        .client
        .send_raw(
            first
                .client
                .request(Method::POST, "/admin/token-revocations")
                .bearer_auth(TEST_ADMIN_TOKEN)
                .json(&json!({"token": token})),
        )
        .await?;
    assert_eq!(revocation.status, StatusCode::CREATED, "{revocation:?}");
    let revoked_at = Instant::now();
    let replacement = revocation.body["token"].as_str().expect("token").to_owned();
    loop {
        let reply = as_tenant(&second.client, &token, Method::GET, "/application", None).await?;
        if reply.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still served a second after its revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shown = as_tenant(
        &second.client,
        &replacement,
        Method::GET,
        "/application",
        None,
    )
    .await?;
    assert_eq!(shown.status, StatusCode::OK, "{shown:?}");
    // Revocation is the operator's: a tenant's token does not open it.
    let refused = first
        .client
        .send_raw(
            first
                .client
                .request(Method::POST, "/admin/token-revocations")
                .bearer_auth(&replacement)
                .json(&json!({"token": replacement})),
        )
        .await?;
    assert_error(&refused, StatusCode::FORBIDDEN, "forbidden");
    first.stop().await?;
    second.stop().await
}

both_stacks!(creation_can_be_left_to_the_operator);

async fn creation_can_be_left_to_the_operator(mut env: TestEnv) -> anyhow::Result<()> {
    env.set("CHAT_APPLICATION_CREATION", "admin");
    let api = env.spawn_api().await?;
    let client = &api.client;
    let anonymous = client
        .post("/applications", json!({"name": "anyone"}))
        .await?;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
    let created = client
        .send_raw(
            client
                .request(Method::POST, "/applications")
                .bearer_auth(TEST_ADMIN_TOKEN)
                .json(&json!({"name": "by the operator"})),
        )
        .await?;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    api.stop().await
}

both_stacks!(the_chat_quota_answers_its_code);

async fn the_chat_quota_answers_its_code(mut env: TestEnv) -> anyhow::Result<()> {
    env.set("CHAT_MAX_CHATS_PER_APPLICATION", "2");
    let api = env.spawn_api().await?;
    let token = api.client.create_application("quota").await?;
    for number in 1..=2 {
        let chat = as_tenant(&api.client, &token, Method::POST, "/chats", None).await?;
        assert_eq!(chat.body["number"], number, "{chat:?}");
    }
    let over = as_tenant(&api.client, &token, Method::POST, "/chats", None).await?;
    assert_error(&over, StatusCode::FORBIDDEN, "quota_exceeded");
    api.stop().await
}

/// A MySQL database of before token digests (tokens in plaintext) migrated by this version: each
/// token still opens its application, and no column holds a token any more.
#[tokio::test]
async fn plaintext_tokens_of_an_older_mysql_database_become_digests() -> anyhow::Result<()> {
    use chatcore::store::Storage as _;

    let env = TestEnv::new().await?;
    let older = env.mysql_database_before(20261205000000).await?;
    let pool = older.pool.clone();
    let legacy = "M".repeat(32);
    sqlx::query(
        "INSERT INTO applications (id, token, name, chats_count, created_at, updated_at) \
         VALUES (7, ?, 'old', 0, NOW(3), NOW(3))",
    )
    .bind(&legacy)
    .execute(&pool)
    .await?;
    older.migrate().await?;

    let storage = chatcore::store::MySqlStorage::new(pool.clone());
    let token = chatcore::domain::ApplicationToken::parse(&legacy)?;
    let grant = storage.resolve_token(&token.digest()).await?;
    assert_eq!(grant.map(|grant| grant.application_id), Some(7));
    let application = storage.find_application(7).await?.expect("kept");
    assert_eq!(application.token_hint, "...MMMM");
    let token_columns: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.columns \
         WHERE table_schema = DATABASE() AND column_name = 'token'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(token_columns, 0);
    older.drop_database().await?;
    Ok(())
}

both_stacks!(the_message_quota_answers_its_code);

async fn the_message_quota_answers_its_code(mut env: TestEnv) -> anyhow::Result<()> {
    env.set("CHAT_MAX_MESSAGES_PER_MINUTE_PER_APPLICATION", "3");
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("chatty").await?;
    let chat = client.create_chat(&token).await?;
    // The quota is a wall-clock minute: start well inside one.
    let second_of_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        % 60;
    if second_of_minute > 45 {
        tokio::time::sleep(Duration::from_secs(61 - second_of_minute)).await;
    }
    let path = format!("/chats/{chat}/messages");
    for number in 1..=3 {
        let posted = as_tenant(
            client,
            &token,
            Method::POST,
            &path,
            Some(json!({"body": format!("message {number}")})),
        )
        .await?;
        assert_eq!(posted.status, StatusCode::ACCEPTED, "{posted:?}");
    }
    let request = client
        .request(Method::POST, &path)
        .bearer_auth(&token)
        .json(&json!({"body": "one too many"}));
    let over = request.send().await?;
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = over.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = over.json().await?;
    assert_eq!(body["error"]["code"], "quota_exceeded");
    // Another application has a quota of its own.
    let other = client.create_application("quiet").await?;
    let other_chat = client.create_chat(&other).await?;
    let posted = client.create_message(&other, other_chat, "mine").await?;
    assert_eq!(posted, 1);
    api.stop().await
}
