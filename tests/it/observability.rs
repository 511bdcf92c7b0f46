//! Metrics: the documented series exist on every service and move with a workload.

use std::time::Duration;

use system_tests::{StatusCode, TestEnv, eventually, free_port};

/// Value of the first sample of `name` carrying every label of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let matches_name = series == name || series.starts_with(&format!("{name}{{"));
            let has_labels = labels
                .iter()
                .all(|(key, value)| series.contains(&format!("{key}=\"{value}\"")));
            (matches_name && has_labels)
                .then(|| value.parse().ok())
                .flatten()
        })
}

async fn scrape(url: &str) -> anyhow::Result<String> {
    let response = reqwest::get(url).await?;
    anyhow::ensure!(
        response.status() == StatusCode::OK,
        "{url}: {}",
        response.status()
    );
    Ok(response.text().await?)
}

#[tokio::test]
async fn every_service_exposes_metrics_that_move_with_the_workload() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    let api = env.spawn_api().await?;
    let api_metrics = api.metrics_url();
    let before = scrape(&api_metrics).await?;
    // The bearer form's route: the legacy form is served as it, so no label holds a token.
    let route = "/api/v1/chats/{chat_number}/messages";
    assert_eq!(
        sample(
            &before,
            "chat_http_requests_total",
            &[("route", route), ("status", "202")]
        ),
        None
    );

    let ingest_port = free_port()?;
    env.set("CHAT_HEALTH_ADDR", &format!("127.0.0.1:{ingest_port}"));
    let mut ingest = env.spawn_process("ingest-worker")?;
    let index_port = free_port()?;
    env.set("CHAT_HEALTH_ADDR", &format!("127.0.0.1:{index_port}"));
    let mut indexer = env.spawn_process("indexer")?;

    let client = &api.client;
    let token = client.create_application("observed").await?;
    let chat = client.create_chat(&token).await?;
    for index in 0..20 {
        client
            .create_message(&token, chat, &format!("metric message {index}"))
            .await?;
    }
    eventually(
        "messages are persisted",
        Duration::from_secs(60),
        || async { Ok(env.stored_message_numbers(&token, chat).await?.len() == 20) },
    )
    .await?;

    let after = scrape(&api_metrics).await?;
    let posted = sample(
        &after,
        "chat_http_requests_total",
        &[("method", "POST"), ("route", route), ("status", "202")],
    );
    assert_eq!(posted, Some(20.0), "{after}");
    assert!(
        sample(
            &after,
            "chat_http_request_duration_seconds_count",
            &[("route", route)]
        ) >= Some(20.0)
    );
    assert!(
        sample(
            &after,
            "chat_publish_confirm_duration_seconds_count",
            &[("outcome", "confirmed")]
        ) >= Some(21.0)
    );
    assert!(
        sample(
            &after,
            "chat_dependency_duration_seconds_count",
            &[("dependency", "redis"), ("operation", "increment")]
        ) >= Some(21.0)
    );
    assert!(
        sample(
            &after,
            "chat_dependency_duration_seconds_count",
            &[("dependency", "mysql")]
        ) >= Some(1.0)
    );

    let ingest_queue = env.config().topology.ingest_queue;
    let index_queue = env.config().topology.index_queue;
    for (port, queue, events) in [
        (ingest_port, &ingest_queue, 21.0),
        (index_port, &index_queue, 20.0),
    ] {
        let url = format!("http://127.0.0.1:{port}/metrics");
        eventually(
            "worker metrics count every event",
            Duration::from_secs(30),
            || async {
                Ok(sample(
                    &scrape(&url).await?,
                    "chat_events_processed_total",
                    &[("queue", queue)],
                ) == Some(events))
            },
        )
        .await?;
        let text = scrape(&url).await?;
        assert!(
            sample(&text, "chat_batch_size_count", &[("queue", queue)]) >= Some(1.0),
            "{text}"
        );
        assert!(
            sample(
                &text,
                "chat_batch_write_duration_seconds_count",
                &[("queue", queue)]
            ) >= Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "chat_events_dead_lettered_total",
                &[("queue", queue)]
            ),
            Some(0.0)
        );
        eventually(
            "the queue depth is sampled",
            Duration::from_secs(15),
            || async {
                Ok(sample(
                    &scrape(&url).await?,
                    "chat_queue_depth",
                    &[("queue", queue)],
                ) == Some(0.0))
            },
        )
        .await?;
        let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await?
            .status();
        assert_eq!(ready, StatusCode::OK);
    }
    ingest.kill().await?;
    indexer.kill().await?;
    api.stop().await
}

#[tokio::test]
async fn counter_sync_pushes_its_repairs_to_a_pushgateway() -> anyhow::Result<()> {
    use axum::routing::put;
    let (sender, mut received) = tokio::sync::mpsc::channel::<(String, String)>(1);
    let gateway = axum::Router::new().route(
        "/metrics/job/{job}",
        put(
            move |axum::extract::Path(job): axum::extract::Path<String>, body: String| {
                let sender = sender.clone();
                async move {
                    let _ = sender.send((job, body)).await;
                    StatusCode::OK
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, gateway).await });
    let report = counter_sync::Report {
        applications_checked: 1,
        chats_checked: 1,
        repairs: vec![counter_sync::Repair::Counter {
            scope: "messages:1:1".into(),
            raised_to: 7,
        }],
        reindexed: 0,
    };
    counter_sync::push_metrics(&format!("http://{address}"), &report).await?;
    let (job, body) = received.recv().await.expect("a push");
    assert_eq!(job, "counter-sync");
    assert_eq!(
        sample(
            &body,
            "chat_counter_sync_repairs_total",
            &[("kind", "counter")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "chat_counter_sync_repairs_total",
            &[("kind", "chats_count")]
        ),
        Some(0.0)
    );
    Ok(())
}
