//! The trust boundary, as a hostile client tries it: the admin credential, the rate limits, the
//! time, size and connection limits, and what error answers reveal. On both stacks.

use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::own_redis::TcpProxy;
use system_tests::{
    Reply, StatusCode, TEST_ADMIN_TOKEN, TestEnv, both_stacks, eventually, free_port, memory_of,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "unexpected reply {reply:?}");
    assert_eq!(reply.body["error"]["code"], code, "{reply:?}");
}

fn host_of(base_url: &str) -> String {
    base_url
        .trim_start_matches("http://")
        .trim_end_matches("/api/v1")
        .to_owned()
}

/// Reads until the server closes the connection (or `limit` passes); returns what it sent and
/// how long it took.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while started.elapsed() < limit {
        match tokio::time::timeout(limit - started.elapsed(), stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    }
    (received, started.elapsed())
}

both_stacks!(listing_applications_needs_the_admin_token);

async fn listing_applications_needs_the_admin_token(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("tenant").await?;

    let anonymous = client
        .send_raw(client.request(reqwest::Method::GET, "/applications"))
        .await?;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "unauthorized");
    let challenge = reqwest::get(format!("{}/applications", api.base_url)).await?;
    assert!(
        challenge
            .headers()
            .get("www-authenticate")
            .is_some_and(|value| value.to_str().is_ok_and(|v| v.starts_with("Bearer"))),
        "{challenge:?}"
    );
    for wrong in [
        "Bearer not-the-admin-token-0123456789",
        &format!("Bearer {token}"),
        &format!("Bearer {TEST_ADMIN_TOKEN}x"),
    ] {
        let reply = client
            .send_raw(
                client
                    .request(reqwest::Method::GET, "/applications")
                    .header("authorization", wrong),
            )
            .await?;
        assert_error(&reply, StatusCode::FORBIDDEN, "forbidden");
    }
    let basic = client
        .send_raw(
            client
                .request(reqwest::Method::GET, "/applications")
                .basic_auth("admin", Some(TEST_ADMIN_TOKEN)),
        )
        .await?;
    assert_error(&basic, StatusCode::UNAUTHORIZED, "unauthorized");

    let listed = client.get_as_admin("/applications").await?;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body["applications"][0]["name"], "tenant");
    // The rest of the contract needs no admin token: the application token is the credential.
    let shown = client.get(&format!("/applications/{token}")).await?;
    assert_eq!(shown.status, StatusCode::OK);
    api.stop().await
}

both_stacks!(no_answer_of_the_api_may_be_stored_by_a_cache);

/// Answers carry tokens (the created application's, the listing's) or are addressed by a URL with
/// one: `Cache-Control: no-store` on each, errors included.
async fn no_answer_of_the_api_may_be_stored_by_a_cache(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let http = reqwest::Client::new();
    let base = &api.base_url;
    let created = http
        .post(format!("{base}/applications"))
        .json(&serde_json::json!({"name": "cached?"}))
        .send()
        .await?;
    let headers = created.headers().clone();
    let token = created.json::<serde_json::Value>().await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut answers = vec![("POST /applications", headers)];
    for (what, request) in [
        (
            "GET /applications/{token}",
            http.get(format!("{base}/applications/{token}")),
        ),
        (
            "GET /applications (admin)",
            http.get(format!("{base}/applications"))
                .bearer_auth(TEST_ADMIN_TOKEN),
        ),
        (
            "GET of an unknown chat",
            http.get(format!("{base}/applications/{token}/chats/99")),
        ),
    ] {
        answers.push((what, request.send().await?.headers().clone()));
    }
    for (what, headers) in answers {
        assert_eq!(
            headers
                .get("cache-control")
                .and_then(|value| value.to_str().ok()),
            Some("no-store"),
            "{what}"
        );
    }
    api.stop().await
}

/// 10,000 requests naming distinct long junk "tokens" leave nothing behind in the rate limiters:
/// the api process (embedded) grows by less than 16 MiB.
#[tokio::test]
async fn junk_tokens_do_not_grow_the_apis_memory() -> anyhow::Result<()> {
    let mut env = TestEnv::embedded().await?;
    let address = format!("127.0.0.1:{}", free_port()?);
    env.set("CHAT_HTTP_ADDR", &address);
    env.set("CHAT_HEALTH_ADDR", &format!("127.0.0.1:{}", free_port()?));
    env.set("CHAT_RATE_LIMIT_PER_ADDRESS", "0");
    let mut api = env.spawn_process("api")?;
    let pid = api
        .id()
        .ok_or_else(|| anyhow::anyhow!("the api has no pid"))?;
    let base = format!("http://{address}/api/v1");
    let http = reqwest::Client::new();
    eventually("the api answers", Duration::from_secs(60), || async {
        Ok(http
            .get(format!("{base}/applications/x"))
            .send()
            .await
            .is_ok())
    })
    .await?;
    let junk = |n: usize| format!("{n:08}{}", "j".repeat(8 * 1024 - 8));
    // Warmed up first (connections, buffers), so that what follows measures the junk alone.
    send_all(&http, &base, (0..500).map(junk)).await?;
    let before = memory_of(pid, "VmRSS")?;
    send_all(&http, &base, (500..10_500).map(junk)).await?;
    let after = memory_of(pid, "VmRSS")?;
    api.kill().await?;
    let grown = after.saturating_sub(before);
    assert!(
        grown < 16 * 1024 * 1024,
        "the api grew by {} KiB ({before} -> {after} bytes)",
        grown / 1024
    );
    Ok(())
}

/// GETs of `/applications/{segment}` for each segment, 16 at a time; each must be answered.
async fn send_all(
    http: &reqwest::Client,
    base: &str,
    segments: impl Iterator<Item = String>,
) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    let answers: Vec<reqwest::Result<reqwest::Response>> = futures_util::stream::iter(
        segments.map(|segment| http.get(format!("{base}/applications/{segment}")).send()),
    )
    .buffer_unordered(16)
    .collect()
    .await;
    for answer in answers {
        let status = answer?.status();
        anyhow::ensure!(status.is_client_error(), "a junk token answered {status}");
    }
    Ok(())
}

both_stacks!(over_the_rate_limit_answers_429_with_the_headers);

async fn over_the_rate_limit_answers_429_with_the_headers(mut env: TestEnv) -> anyhow::Result<()> {
    env.set("CHAT_RATE_LIMIT_PER_TOKEN", "1");
    env.set("CHAT_RATE_LIMIT_PER_TOKEN_BURST", "3");
    env.set("CHAT_RATE_LIMIT_PER_ADDRESS", "1");
    env.set("CHAT_RATE_LIMIT_PER_ADDRESS_BURST", "5");
    env.set("CHAT_TRUSTED_PROXY_HOPS", "1");
    let api = env.spawn_api().await?;
    let http = reqwest::Client::new();
    let from = |address: &'static str| {
        let http = http.clone();
        let base = api.base_url.clone();
        move |method: reqwest::Method, path: String| {
            http.request(method, format!("{base}{path}"))
                .header("x-forwarded-for", format!("203.0.113.99, {address}"))
        }
    };
    let tenant = from("198.51.100.1");
    let created = tenant(reqwest::Method::POST, "/applications".into())
        .json(&json!({"name": "limited"}))
        .send()
        .await?;
    assert_eq!(created.status(), StatusCode::CREATED);
    let token = created.json::<serde_json::Value>().await?["token"]
        .as_str()
        .expect("token")
        .to_owned();

    // The token's bucket holds 3; the address' 5 (one spent on the create).
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let response = tenant(reqwest::Method::GET, format!("/applications/{token}"))
            .send()
            .await?;
        statuses.push(response.status());
        last = Some(response);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let limited = last.expect("four answers");
    let header = |name: &str| -> u64 {
        limited
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {limited:?}"))
    };
    assert!((1..=2).contains(&header("retry-after")));
    assert_eq!(header("ratelimit-limit"), 3);
    assert_eq!(header("ratelimit-remaining"), 0);
    assert!(header("ratelimit-reset") >= 1);
    let body: serde_json::Value = limited.json().await?;
    assert_eq!(body["error"]["code"], "rate_limited");

    // Another client address gets its own bucket, but the token's stays empty.
    let other = from("198.51.100.2");
    let same_token = other(reqwest::Method::GET, format!("/applications/{token}"))
        .send()
        .await?;
    assert_eq!(same_token.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another spelling of the same token (its first character percent-encoded) is the same bucket.
    let respelled = format!("%{:02X}{}", token.as_bytes()[0], &token[1..]);
    let same_bucket = other(reqwest::Method::GET, format!("/applications/{respelled}"))
        .send()
        .await?;
    assert_eq!(same_bucket.status(), StatusCode::TOO_MANY_REQUESTS);
    let allowed = other(reqwest::Method::GET, "/applications/unknown".into())
        .send()
        .await?;
    assert_eq!(allowed.status(), StatusCode::NOT_FOUND);
    assert!(
        allowed.headers().contains_key("ratelimit-remaining"),
        "limited answers carry the headers: {allowed:?}"
    );
    // The first address used its 5: limited even for another token.
    let spent = tenant(reqwest::Method::GET, "/applications/unknown".into())
        .send()
        .await?;
    assert_eq!(spent.status(), StatusCode::TOO_MANY_REQUESTS);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refilled = tenant(reqwest::Method::GET, format!("/applications/{token}"))
        .send()
        .await?;
    assert_eq!(
        refilled.status(),
        StatusCode::OK,
        "one token back per second"
    );
    api.stop().await
}

both_stacks!(a_client_that_trickles_its_headers_or_sends_nothing_is_disconnected);

async fn a_client_that_trickles_its_headers_or_sends_nothing_is_disconnected(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    env.set("CHAT_HEADER_READ_TIMEOUT_MS", "500");
    let api = env.spawn_api().await?;
    let host = host_of(&api.base_url);

    let mut trickling = TcpStream::connect(&host).await?;
    trickling
        .write_all(b"GET /api/v1/applications/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await?;
    let mut silent = TcpStream::connect(&host).await?;
    let writer = tokio::spawn(async move {
        // One byte every 200 ms: each arrives, none completes the headers.
        for _ in 0..50 {
            if trickling.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (_, silent_after) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(
        silent_after < Duration::from_secs(3),
        "a silent connection stays {silent_after:?}"
    );
    let started = Instant::now();
    writer.await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the trickling client was not cut off: it wrote for {:?}",
        started.elapsed()
    );
    // The server still serves everyone else.
    assert_eq!(
        api.client.get("/applications/x").await?.status,
        StatusCode::NOT_FOUND
    );
    api.stop().await
}

both_stacks!(an_oversized_body_always_gets_a_readable_413);

async fn an_oversized_body_always_gets_a_readable_413(env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("big").await?;
    let two_megabytes = "x".repeat(2 * 1024 * 1024);
    let body = serde_json::to_vec(&json!({"name": two_megabytes}))?;
    for attempt in 0..20 {
        // A fresh connection each time: the answer must arrive before the server closes it.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        let response = http
            .put(format!("{}/applications/{token}", api.base_url))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .map_err(|error| anyhow::anyhow!("attempt {attempt}: {error:?}"))?;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let reply: serde_json::Value = response.json().await?;
        assert_eq!(reply["error"]["code"], "payload_too_large");
    }
    // Chunked (no Content-Length): the same.
    let mut stream = TcpStream::connect(host_of(&api.base_url)).await?;
    stream
        .write_all(b"POST /api/v1/applications HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await?;
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..32 {
        stream.write_all(b"10000\r\n").await?;
        stream.write_all(&chunk).await?;
        stream.write_all(b"\r\n").await?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let unchanged = client.get(&format!("/applications/{token}")).await?;
    assert_eq!(unchanged.body["name"], "big", "nothing changed");
    api.stop().await
}

both_stacks!(a_body_that_does_not_arrive_in_time_gets_408);

async fn a_body_that_does_not_arrive_in_time_gets_408(mut env: TestEnv) -> anyhow::Result<()> {
    env.set("CHAT_BODY_TIMEOUT_MS", "500");
    let api = env.spawn_api().await?;
    let mut stream = TcpStream::connect(host_of(&api.base_url)).await?;
    stream
        .write_all(
            b"POST /api/v1/applications HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":",
        )
        .await?;
    let (answer, after) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timed_out"), "{answer}");
    assert!(after < Duration::from_secs(3), "answered after {after:?}");
    api.stop().await
}

both_stacks!(connections_beyond_the_bound_wait_for_a_free_slot);

async fn connections_beyond_the_bound_wait_for_a_free_slot(mut env: TestEnv) -> anyhow::Result<()> {
    env.set("CHAT_MAX_CONNECTIONS", "2");
    env.set("CHAT_MAX_CONNECTIONS_PER_ADDRESS", "2");
    env.set("CHAT_STREAMS_PER_REPLICA", "1");
    let api = env.spawn_api().await?;
    let host = host_of(&api.base_url);
    let url = format!("{}/applications/x", api.base_url);
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_millis(700))
            .build()
    };
    let first = TcpStream::connect(&host).await?;
    let _second = TcpStream::connect(&host).await?;
    let waiting = fresh()?.get(&url).send().await;
    assert!(
        waiting.as_ref().is_err_and(reqwest::Error::is_timeout),
        "a third connection is served: {waiting:?}"
    );
    drop(first);
    let served = fresh()?.get(&url).send().await?;
    assert_eq!(served.status(), StatusCode::NOT_FOUND);
    api.stop().await
}

both_stacks!(a_client_address_gets_its_share_of_the_connections_and_no_more);

/// A connection to `host` from the loopback address `from` (all of 127/8 is this machine).
async fn connect_from(from: [u8; 4], host: &str) -> anyhow::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((from, 0)))?;
    Ok(socket.connect(host.parse()?).await?)
}

/// One address holding `CHAT_MAX_CONNECTIONS_PER_ADDRESS` connections: one more is closed at
/// once (instead of taking a slot others need) while another address is served; a freed
/// connection is usable again.
async fn a_client_address_gets_its_share_of_the_connections_and_no_more(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    env.set("CHAT_MAX_CONNECTIONS", "8");
    env.set("CHAT_MAX_CONNECTIONS_PER_ADDRESS", "2");
    env.set("CHAT_STREAMS_PER_REPLICA", "4");
    let api = env.spawn_api().await?;
    let host = host_of(&api.base_url);
    let greedy = [127, 0, 0, 2];
    let first = connect_from(greedy, &host).await?;
    let _second = connect_from(greedy, &host).await?;
    let mut third = connect_from(greedy, &host).await?;
    let (read, after) = read_until_closed(&mut third, Duration::from_secs(10)).await;
    assert!(
        read.is_empty() && after < Duration::from_secs(3),
        "closed at once: {after:?}"
    );

    let request = b"GET /api/v1/applications/x HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n";
    let mut other = connect_from([127, 0, 0, 3], &host).await?;
    other.write_all(request).await?;
    let (answer, _) = read_until_closed(&mut other, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 404"),
        "another address is served"
    );

    drop(first);
    eventually(
        "a freed connection is served again",
        Duration::from_secs(10),
        || async {
            let mut again = connect_from(greedy, &host).await?;
            again.write_all(request).await?;
            let (answer, _) = read_until_closed(&mut again, Duration::from_secs(5)).await;
            Ok(answer.starts_with(b"HTTP/1.1 404"))
        },
    )
    .await?;
    api.stop().await
}

both_stacks!(internals_stay_internal);

async fn internals_stay_internal(mut env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let public = api.base_url.trim_end_matches("/api/v1").to_owned();
    let metrics = reqwest::get(format!("{public}/metrics")).await?;
    assert_eq!(
        metrics.status(),
        StatusCode::NOT_FOUND,
        "/metrics is not public"
    );
    let internal = reqwest::get(api.metrics_url()).await?;
    assert_eq!(internal.status(), StatusCode::OK);
    assert!(internal.text().await?.contains("chat_http_requests_total"));
    for probe in ["livez", "readyz"] {
        let on_both = [&public, &api.internal_url];
        for base in on_both {
            let reply = reqwest::get(format!("{base}/{probe}")).await?;
            assert_eq!(reply.status(), StatusCode::OK, "{base}/{probe}");
        }
    }
    assert_eq!(
        reqwest::get(format!("{public}/docs/")).await?.status(),
        StatusCode::OK
    );

    // A token that is not UTF-8 names no application: the documented JSON error.
    let undecodable = api.client.get("/applications/%FF%FE/chats").await?;
    assert_error(&undecodable, StatusCode::NOT_FOUND, "not_found");
    api.stop().await?;

    env.set("CHAT_DOCS_ENABLED", "false");
    let api = env.spawn_api().await?;
    let public = api.base_url.trim_end_matches("/api/v1").to_owned();
    for path in ["/docs/", "/api/v1/openapi.json"] {
        let reply = reqwest::get(format!("{public}{path}")).await?;
        assert_eq!(reply.status(), StatusCode::NOT_FOUND, "{path} is off");
    }
    api.stop().await
}

/// A 503 says what to do, not what failed inside: no address, driver text or dependency name.
#[tokio::test]
async fn a_503_does_not_leak_what_failed_inside() -> anyhow::Result<()> {
    let broker = TcpProxy::in_front_of_rabbitmq().await?;
    let mut env = TestEnv::new().await?;
    env.set("AMQP_URL", &broker.amqp_url());
    env.set("CHAT_CONNECT_TIMEOUT_MS", "300");
    let api = env.spawn_api().await?;
    let token = api.client.create_application("leaky").await?;
    broker.cut();
    let reply = api
        .client
        .post_empty(&format!("/applications/{token}/chats"))
        .await?;
    assert_error(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
    );
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    for secret in [
        "127.0.0.1",
        &broker.port.to_string(),
        "amqp",
        "rabbitmq",
        "refused",
        "io error",
    ] {
        assert!(
            !message.to_lowercase().contains(secret),
            "{secret:?} leaks in {message:?}"
        );
    }
    assert!(message.contains("retry"), "{message}");
    api.stop().await
}
