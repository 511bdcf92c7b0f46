//! The chat page at `/demo`: served with the docs only, with its headers; its checked-in script is
//! what the pinned bundler makes of the sources; and two sessions in a real headless chromium
//! follow a chat live through it (`tests/demo/two_browsers.cjs`, puppeteer-core), with the live
//! latency measured. chromium and puppeteer-core come from `scripts/tools` (`scripts/test` exports
//! CHROMIUM and PUPPETEER); a missing one fails the test.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use reqwest::header;
use system_tests::{Scratch, StatusCode, TestEnv, repo_root, run_to_end, tool_path};
use tokio::process::Command;

/// What one request for `path` answers: status, headers and body.
async fn fetch(
    origin: &str,
    path: &str,
    if_none_match: Option<&str>,
) -> anyhow::Result<(StatusCode, header::HeaderMap, String)> {
    let mut request = reqwest::Client::new().get(format!("{origin}{path}"));
    if let Some(tag) = if_none_match {
        request = request.header(header::IF_NONE_MATCH, tag);
    }
    let response = request.send().await?;
    let (status, headers) = (response.status(), response.headers().clone());
    Ok((status, headers, response.text().await?))
}

#[tokio::test]
async fn the_chat_page_is_served_with_the_docs_with_a_strict_policy() -> anyhow::Result<()> {
    let env = TestEnv::embedded().await?;
    let api = env.spawn_api().await?;
    for (path, content_type, sample) in [
        (
            "/demo",
            "text/html; charset=utf-8",
            "<script type=\"module\" src=\"/demo/demo.js\">",
        ),
        (
            "/demo/demo.js",
            "text/javascript; charset=utf-8",
            "EventSource",
        ),
        ("/demo/demo.css", "text/css; charset=utf-8", "mark"),
    ] {
        let (status, headers, body) = fetch(api.origin(), path, None).await?;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
        assert!(body.contains(sample), "{path} holds {sample}");
        let policy = headers[header::CONTENT_SECURITY_POLICY].to_str()?;
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
        // A browser's copy that is current is not sent again.
        let etag = headers[header::ETAG].to_str()?;
        let (status, _, body) = fetch(api.origin(), path, Some(etag)).await?;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{path}");
        assert!(body.is_empty());
    }
    let document = reqwest::get(format!("{}/openapi.json", api.base_url))
        .await?
        .text()
        .await?;
    assert!(!document.contains("/demo"), "not in the OpenAPI document");
    api.stop().await?;

    let mut without_docs = TestEnv::embedded().await?;
    without_docs.set("CHAT_DOCS_ENABLED", "false");
    let api = without_docs.spawn_api().await?;
    let (status, _, _) = fetch(api.origin(), "/demo", None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "no page without the docs");
    api.stop().await
}

#[tokio::test]
async fn the_checked_in_page_script_is_what_the_pinned_bundler_makes() -> anyhow::Result<()> {
    let scratch = Scratch::new("demo-bundle")?;
    let fresh = scratch.0.join("demo.js");
    run_to_end(Command::new(repo_root().join("scripts/demo-bundle")).arg(&fresh)).await?;
    ensure!(
        std::fs::read(&fresh)? == std::fs::read(repo_root().join("api/demo/demo.js"))?,
        "api/demo/demo.js is not what its sources bundle to: run scripts/demo-bundle and commit it"
    );
    Ok(())
}

/// Where the browser test writes its screenshot: `DEMO_SCREENSHOT` (`docs/demo.png` to refresh
/// the README's), else the temporary directory.
fn screenshot_path() -> PathBuf {
    std::env::var_os("DEMO_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("chat-demo.png"))
}

#[tokio::test]
async fn two_browser_sessions_follow_a_chat_live_on_the_page() -> anyhow::Result<()> {
    let chromium = tool_path("CHROMIUM", "chromium")?;
    let puppeteer = tool_path("PUPPETEER", "puppeteer")?;
    let env = TestEnv::embedded().await?;
    let running = env.running_chat("demo").await?;
    let screenshot = screenshot_path();
    let report = tokio::time::timeout(
        Duration::from_secs(300),
        run_to_end(
            Command::new("node")
                .arg(repo_root().join("tests/demo/two_browsers.cjs"))
                .arg(running.api.origin())
                .arg(&running.token)
                .arg(running.chat.to_string())
                .arg(&screenshot)
                .env("NODE_PATH", &puppeteer)
                .env("CHROMIUM", &chromium),
        ),
    )
    .await
    .context("the browser test took over 5 minutes")??;
    let report: serde_json::Value = serde_json::from_str(
        report
            .lines()
            .last()
            .context("the browser test printed nothing")?,
    )?;
    let mut latencies: Vec<u64> = report["latencies_ms"]
        .as_array()
        .context("latencies_ms")?
        .iter()
        .map(|value| value.as_u64().context("a latency in ms"))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(latencies.len(), 20);
    latencies.sort_unstable();
    let (p50, max) = (
        latencies[latencies.len() / 2 - 1],
        latencies[latencies.len() - 1],
    );
    println!(
        "chat page live latency (post in one browser to visible in the other), 20 messages: p50 {p50} ms, max {max} ms; screenshot {}",
        screenshot.display()
    );
    assert!(max <= 2000, "every message within 2 s: {latencies:?}");
    assert!(
        std::fs::metadata(&screenshot)?.len() > 10_000,
        "a screenshot"
    );
    running.stop().await
}
