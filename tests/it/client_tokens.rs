//! Client tokens: minted by an application for one end user, they open their chats with their
//! scopes on the chat routes only; expired, altered or revoked ones are refused (revoke-all on one
//! replica reaches the others within a second); a browser streams with `?access_token=` after a
//! CORS preflight.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use system_tests::{Client, Next, Reply, TestEnv, both_stacks, eventually};

const WAIT: Duration = Duration::from_secs(60);
const ALLOWED_ORIGIN: &str = "https://app.example.com";

fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "unexpected reply {reply:?}");
    assert_eq!(reply.body["error"]["code"], code, "{reply:?}");
}

/// Mints a client token with the application's token; the answer as it is.
async fn mint(client: &Client, application_token: &str, grant: Value) -> anyhow::Result<Reply> {
    client
        .send_raw(
            client
                .request(Method::POST, "/application/client-tokens")
                .bearer_auth(application_token)
                .json(&grant),
        )
        .await
}

/// Mints a client token and returns it.
async fn minted(client: &Client, application_token: &str, grant: Value) -> anyhow::Result<String> {
    let reply = mint(client, application_token, grant).await?;
    anyhow::ensure!(reply.status == StatusCode::CREATED, "mint: {reply:?}");
    Ok(reply.body["token"].as_str().unwrap_or_default().to_owned())
}

/// A request with a bearer token (and a JSON body).
async fn with_bearer(
    client: &Client,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Reply> {
    let mut request = client.request(method, path).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    client.send_raw(request).await
}

both_stacks!(a_client_token_opens_its_chats_with_its_scopes_on_the_chat_routes_only);

async fn a_client_token_opens_its_chats_with_its_scopes_on_the_chat_routes_only(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("client tokens").await?;
    let client = &running.api.client;
    let (application, chat) = (running.token.as_str(), running.chat);
    let other_chat = client.create_chat(application).await?;
    let messages = format!("/chats/{chat}/messages");
    let post = json!({"body": "hello"});

    let too_long = mint(
        client,
        application,
        json!({"sender": "u42", "chats": [chat], "scopes": ["read"], "expires_in": 86_401}),
    )
    .await?;
    assert_error(
        &too_long,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(too_long.body["error"]["field"], "expires_in");

    // Read only: reads its chat; posting, another chat and the chat list are refused.
    let reader = minted(
        client,
        application,
        json!({"sender": "u42", "chats": [chat], "scopes": ["read"]}),
    )
    .await?;
    let listed = with_bearer(client, &reader, Method::GET, &messages, None).await?;
    assert_eq!(listed.status, StatusCode::OK, "{listed:?}");
    let refused = [
        with_bearer(client, &reader, Method::POST, &messages, Some(post.clone())).await?,
        with_bearer(
            client,
            &reader,
            Method::GET,
            &format!("/chats/{other_chat}/messages"),
            None,
        )
        .await?,
        with_bearer(client, &reader, Method::GET, "/chats", None).await?,
        with_bearer(client, &reader, Method::POST, "/chats", None).await?,
    ];
    for reply in &refused {
        assert_error(reply, StatusCode::FORBIDDEN, "insufficient_scope");
    }

    // Write: posts to its chat (and streams it, with the header).
    let writer = minted(
        client,
        application,
        json!({"sender": "u42", "chats": [chat], "scopes": ["read", "write"]}),
    )
    .await?;
    let posted = with_bearer(client, &writer, Method::POST, &messages, Some(post.clone())).await?;
    assert_eq!(posted.status, StatusCode::ACCEPTED, "{posted:?}");
    // Its messages are the token's sender's: naming it is fine, naming another is refused.
    let as_itself = json!({"body": "from u42", "sender": "u42"});
    let named = with_bearer(client, &writer, Method::POST, &messages, Some(as_itself)).await?;
    assert_eq!(named.status, StatusCode::ACCEPTED, "{named:?}");
    let as_another = json!({"body": "spoofed", "sender": "u7"});
    let spoofed = with_bearer(client, &writer, Method::POST, &messages, Some(as_another)).await?;
    assert_error(&spoofed, StatusCode::FORBIDDEN, "insufficient_scope");
    let number = posted.body["number"].as_u64().context("number")?;
    eventually("the client token's message is stored", WAIT, || async {
        let stored = with_bearer(
            client,
            &writer,
            Method::GET,
            &format!("{messages}/{number}"),
            None,
        )
        .await?;
        Ok(stored.status == StatusCode::OK && stored.body["sender"] == "u42")
    })
    .await?;
    let stream = client
        .stream_of(
            client
                .request(Method::GET, &format!("{messages}/stream"))
                .bearer_auth(&writer),
        )
        .await?;
    assert!(
        stream.is_ok(),
        "the stream with a client token: {:?}",
        stream.err()
    );

    // Every chat: the chat list and creating one.
    let every = minted(
        client,
        application,
        json!({"sender": "u42", "chats": "*", "scopes": ["read", "write"]}),
    )
    .await?;
    let chats = with_bearer(client, &every, Method::GET, "/chats", None).await?;
    assert_eq!(chats.status, StatusCode::OK, "{chats:?}");
    let created = with_bearer(client, &every, Method::POST, "/chats", None).await?;
    assert_eq!(created.status, StatusCode::ACCEPTED, "{created:?}");

    // Never the application's own routes, nor the legacy form; never an application token in
    // the query.
    for (method, path) in [
        (Method::GET, "/application"),
        (Method::GET, "/application/changes"),
        (Method::GET, "/application/webhooks"),
        (Method::POST, "/application/client-tokens"),
        (Method::POST, "/application/client-tokens/revoke-all"),
        (Method::DELETE, "/application"),
    ] {
        let reply = with_bearer(client, &every, method, path, None).await?;
        assert_error(&reply, StatusCode::UNAUTHORIZED, "application_key_required");
    }
    let legacy = client.get(&format!("/applications/{every}/chats")).await?;
    assert_error(&legacy, StatusCode::NOT_FOUND, "not_found");
    let application_in_query = client
        .get(&format!("{messages}/stream?access_token={application}"))
        .await?;
    assert_error(
        &application_in_query,
        StatusCode::UNAUTHORIZED,
        "application_key_required",
    );
    // The application still has every route.
    let shown = with_bearer(client, application, Method::GET, "/application", None).await?;
    assert_eq!(shown.status, StatusCode::OK, "{shown:?}");
    running.stop().await
}

both_stacks!(expired_and_altered_client_tokens_are_refused);

async fn expired_and_altered_client_tokens_are_refused(env: TestEnv) -> anyhow::Result<()> {
    let running = env.running_chat("client tokens").await?;
    let client = &running.api.client;
    let (application, chat) = (running.token.as_str(), running.chat);
    let messages = format!("/chats/{chat}/messages");
    let grant = json!({"sender": "u42", "chats": [chat], "scopes": ["read"], "expires_in": 60});
    let token = minted(client, application, grant).await?;
    let valid = with_bearer(client, &token, Method::GET, &messages, None).await?;
    assert_eq!(valid.status, StatusCode::OK, "{valid:?}");

    let (signed, signature) = token.rsplit_once('.').expect("a JWT");
    let mut flipped = URL_SAFE_NO_PAD.decode(signature)?;
    flipped[0] ^= 1;
    let flipped = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(flipped));
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1])?)?;
    claims["chats"] = json!("*");
    claims["scopes"] = json!(["read", "write"]);
    let widened = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    for altered in [flipped, widened] {
        let reply = client
            .request(Method::GET, &messages)
            .bearer_auth(&altered)
            .send()
            .await?;
        assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            reply.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"chat application\", error=\"invalid_token\""
        );
        let body: Value = reply.json().await?;
        assert_eq!(body["error"]["code"], "invalid_token");
    }

    let short = minted(
        client,
        application,
        json!({"sender": "u42", "chats": [chat], "scopes": ["read"], "expires_in": 1}),
    )
    .await?;
    // Past its second (the claims hold whole seconds).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let expired = with_bearer(client, &short, Method::GET, &messages, None).await?;
    assert_error(&expired, StatusCode::UNAUTHORIZED, "invalid_token");
    running.stop().await
}

/// Two api replicas on the same services: a revoke-all on one is refused on the other within a
/// second (it polls the revocations every 250 ms), and a token minted after it works there at once.
#[tokio::test]
async fn revoke_all_on_one_replica_ends_the_old_tokens_on_another_within_a_second()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (first, second) = (env.spawn_api().await?, env.spawn_api().await?);
    let application = first.client.create_application("revoked").await?;
    let chat = first.client.create_chat(&application).await?;
    let messages = format!("/chats/{chat}/messages");
    let grant = json!({"sender": "u42", "chats": [chat], "scopes": ["read"]});
    let old = minted(&first.client, &application, grant.clone()).await?;
    let read = |client: &Client, token: &str| {
        let (client, token, path) = (client.clone(), token.to_owned(), messages.clone());
        async move { with_bearer(&client, &token, Method::GET, &path, None).await }
    };
    assert_eq!(read(&second.client, &old).await?.status, StatusCode::OK);

    let revoked = with_bearer(
        &first.client,
        &application,
        Method::POST,
        "/application/client-tokens/revoke-all",
        None,
    )
    .await?;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT, "{revoked:?}");
    let started = Instant::now();
    assert_error(
        &read(&first.client, &old).await?,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    );
    loop {
        let reply = read(&second.client, &old).await?;
        if reply.status == StatusCode::UNAUTHORIZED {
            assert_error(&reply, StatusCode::UNAUTHORIZED, "invalid_token");
            break;
        }
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the other replica still accepts the revoked token after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let new = minted(&first.client, &application, grant).await?;
    assert_eq!(read(&second.client, &new).await?.status, StatusCode::OK);
    first.stop().await?;
    second.stop().await
}

/// What a page of an allowed origin does: a preflight, then the stream over `?access_token=` (an
/// EventSource sends no header) and a post; another origin gets no CORS header; the application's
/// own routes have none.
#[tokio::test]
async fn a_browser_streams_with_an_access_token_after_a_cors_preflight() -> anyhow::Result<()> {
    let mut env = TestEnv::embedded().await?;
    env.set("CHAT_CORS_ALLOWED_ORIGINS", ALLOWED_ORIGIN);
    let running = env.running_chat("browser").await?;
    let client = &running.api.client;
    let chat = running.chat;
    let token = minted(
        client,
        &running.token,
        json!({"sender": "u42", "chats": [chat], "scopes": ["read", "write"]}),
    )
    .await?;
    let messages = format!("/chats/{chat}/messages");
    let allow_origin = |response: &reqwest::Response| {
        response
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .map(|value| value.to_str().unwrap_or_default().to_owned())
    };
    let preflight =
        |origin: &'static str, path: String, method: &'static str, headers: &'static str| {
            client
                .request(Method::OPTIONS, &path)
                .header(header::ORIGIN, origin)
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, method)
                .header(header::ACCESS_CONTROL_REQUEST_HEADERS, headers)
                .send()
        };

    for (path, method, headers) in [
        (format!("{messages}/stream"), "GET", "last-event-id"),
        (
            messages.clone(),
            "POST",
            "authorization, content-type, idempotency-key",
        ),
    ] {
        let answer = preflight(ALLOWED_ORIGIN, path, method, headers).await?;
        assert_eq!(answer.status(), StatusCode::NO_CONTENT);
        assert_eq!(allow_origin(&answer).as_deref(), Some(ALLOWED_ORIGIN));
        let answer_headers = answer.headers();
        for (name, expected) in [
            (header::ACCESS_CONTROL_ALLOW_METHODS, method),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "Authorization"),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "Idempotency-Key"),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "Last-Event-ID"),
            (header::VARY, "Origin"),
        ] {
            let value = answer_headers[&name].to_str()?;
            assert!(value.contains(expected), "{name}: {value}");
        }
        assert!(answer_headers.contains_key(header::ACCESS_CONTROL_MAX_AGE));
    }
    let elsewhere = preflight(
        "https://evil.example.com",
        format!("{messages}/stream"),
        "GET",
        "last-event-id",
    )
    .await?;
    assert_eq!(allow_origin(&elsewhere), None);
    let application_route = preflight(
        ALLOWED_ORIGIN,
        "/application".to_owned(),
        "GET",
        "authorization",
    )
    .await?;
    assert_eq!(allow_origin(&application_route), None);

    // The stream over ?access_token=, with the page's Origin.
    let stream_request = |origin: &'static str| {
        client
            .request(Method::GET, &format!("{messages}/stream"))
            .query(&[("access_token", token.as_str())])
            .header(header::ORIGIN, origin)
            .header("accept", "text/event-stream")
    };
    let foreign = stream_request("https://evil.example.com").send().await?;
    assert_eq!(allow_origin(&foreign), None);
    drop(foreign);
    let mut stream = client
        .stream_of(stream_request(ALLOWED_ORIGIN))
        .await?
        .map_err(|reply| anyhow::anyhow!("the stream was refused: {reply:?}"))?;
    assert_eq!(
        allow_origin(stream.response()).as_deref(),
        Some(ALLOWED_ORIGIN)
    );
    let posted = client
        .request(Method::POST, &messages)
        .bearer_auth(&token)
        .header(header::ORIGIN, ALLOWED_ORIGIN)
        .json(&json!({"body": "from the page"}))
        .send()
        .await?;
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    assert_eq!(allow_origin(&posted).as_deref(), Some(ALLOWED_ORIGIN));
    match stream.next(Duration::from_secs(30)).await? {
        Next::Event(event) => {
            assert_eq!(event.event, "created");
            assert_eq!(event.data["body"], "from the page");
        }
        other => panic!("expected the posted message, got {other:?}"),
    }
    // A refusal is readable by the page too.
    let refused = client
        .request(Method::GET, &messages)
        .bearer_auth("not.a.token")
        .header(header::ORIGIN, ALLOWED_ORIGIN)
        .send()
        .await?;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(allow_origin(&refused).as_deref(), Some(ALLOWED_ORIGIN));
    drop(stream);
    running.stop().await
}
