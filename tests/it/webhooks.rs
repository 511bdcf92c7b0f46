//! Webhooks end to end, on both stacks: endpoints registered through the API, deliveries received
//! by a local receiver that verifies every signature with the Standard Webhooks reference library
//! (PyPI `standardwebhooks`), in order, filtered, retried, replayed, isolated from a hanging
//! endpoint, and refused for private destinations.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use system_tests::webhook_receiver::{Delivery, Mode, WebhookReceiver};
use system_tests::{Client, StatusCode, TestEnv, both_stacks, eventually};

const WAIT: Duration = Duration::from_secs(60);

/// Registers an endpoint of the application at the receiver's `name`, the receiver verifying
/// with its secret; returns the endpoint's JSON (with the secret).
async fn register(
    client: &Client,
    token: &str,
    receiver: &WebhookReceiver,
    name: &str,
    events: Option<&[&str]>,
) -> anyhow::Result<Value> {
    let mut body = json!({"url": receiver.url(name), "description": name});
    if let Some(events) = events {
        body["events"] = json!(events);
    }
    let created = client
        .post(&format!("/applications/{token}/webhooks"), body)
        .await?;
    anyhow::ensure!(created.status == StatusCode::CREATED, "{created:?}");
    let secret = created.body["secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(secret.starts_with("whsec_"), "{created:?}");
    receiver.configure(name, &[&secret], Mode::Ok).await?;
    Ok(created.body)
}

/// The deliveries answered 2xx at `name`, once `count` of them are there.
async fn accepted_deliveries(
    receiver: &WebhookReceiver,
    name: &str,
    count: usize,
) -> anyhow::Result<Vec<Delivery>> {
    eventually(&format!("{count} deliveries at {name}"), WAIT, || async {
        Ok(accepted(receiver, name).await?.len() >= count)
    })
    .await?;
    accepted(receiver, name).await
}

async fn accepted(receiver: &WebhookReceiver, name: &str) -> anyhow::Result<Vec<Delivery>> {
    Ok(receiver
        .deliveries(Some(name))
        .await?
        .into_iter()
        .filter(|delivery| delivery.answered.is_some_and(|status| status < 300))
        .collect())
}

/// The accepted deliveries of the change of message `number`, once there are `count` of them.
async fn deliveries_of_message(
    receiver: &WebhookReceiver,
    name: &str,
    number: u64,
    count: usize,
) -> anyhow::Result<Vec<Delivery>> {
    let of_message = || async {
        Ok::<_, anyhow::Error>(
            accepted(receiver, name)
                .await?
                .into_iter()
                .filter(|delivery| delivery.body["data"]["message"]["number"] == number)
                .collect::<Vec<_>>(),
        )
    };
    eventually(
        &format!("{count} deliveries of message {number}"),
        WAIT,
        || async { Ok(of_message().await?.len() >= count) },
    )
    .await?;
    of_message().await
}

fn kind(delivery: &Delivery) -> &str {
    delivery.body["type"].as_str().unwrap_or_default()
}

/// `(type, chat, message number)` of each delivery, in arrival order.
fn summary(deliveries: &[Delivery]) -> Vec<(String, u64, u64)> {
    deliveries
        .iter()
        .map(|delivery| {
            let data = &delivery.body["data"];
            (
                kind(delivery).to_owned(),
                data["chat_number"].as_u64().unwrap_or_default(),
                data["message"]["number"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

both_stacks!(every_change_arrives_signed_in_order_and_verifies_with_the_reference_library);

async fn every_change_arrives_signed_in_order_and_verifies_with_the_reference_library(
    env: TestEnv,
) -> anyhow::Result<()> {
    let receiver = WebhookReceiver::start().await?;
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let token = client.create_application("hooked").await?;
    register(client, &token, &receiver, "all", None).await?;
    let chat = client.create_chat(&token).await?;
    for body in ["one", "two", "three"] {
        client.create_message(&token, chat, body).await?;
    }
    let messages = format!("/applications/{token}/chats/{chat}/messages");
    eventually("message 3 is stored", WAIT, || async {
        Ok(client.get(&format!("{messages}/3")).await?.status == StatusCode::OK)
    })
    .await?;
    let edited = client
        .put(&format!("{messages}/1"), json!({"body": "one, edited"}))
        .await?;
    assert_eq!(edited.status, StatusCode::OK, "{edited:?}");
    let deleted = client.delete(&format!("{messages}/2")).await?;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");

    let deliveries = accepted_deliveries(&receiver, "all", 6).await?;
    assert_eq!(
        summary(&deliveries),
        [
            ("chat.created".to_owned(), chat, 0),
            ("message.created".to_owned(), chat, 1),
            ("message.created".to_owned(), chat, 2),
            ("message.created".to_owned(), chat, 3),
            ("message.updated".to_owned(), chat, 1),
            ("message.deleted".to_owned(), chat, 2),
        ]
    );
    for delivery in &deliveries {
        assert!(
            delivery.verified,
            "the reference library verifies {}: {:?}",
            delivery.webhook_id, delivery.verify_error
        );
    }
    let ids: BTreeSet<&str> = deliveries.iter().map(|d| d.webhook_id.as_str()).collect();
    assert_eq!(ids.len(), deliveries.len(), "one webhook-id per change");
    assert_eq!(deliveries[4].body["data"]["message"]["body"], "one, edited");
    // The feed's cursors rise, and the attempts are listed newest first.
    let cursors: Vec<&str> = deliveries
        .iter()
        .map(|d| d.body["data"]["cursor"].as_str().unwrap_or_default())
        .collect();
    let feed = client
        .get(&format!("/applications/{token}/changes?per_page=10"))
        .await?;
    let feed_cursors: Vec<&str> = feed.body["changes"]
        .as_array()
        .map(|changes| {
            changes
                .iter()
                .filter_map(|c| c["cursor"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(cursors, feed_cursors, "the deliveries follow the feed");
    let endpoint = client
        .get(&format!("/applications/{token}/webhooks"))
        .await?
        .body["webhooks"][0]
        .clone();
    let attempts = client
        .get(&format!(
            "/applications/{token}/webhooks/{}/attempts",
            endpoint["id"]
        ))
        .await?;
    assert_eq!(attempts.status, StatusCode::OK, "{attempts:?}");
    let listed = attempts.body["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed.len(), 6, "{attempts:?}");
    assert_eq!(listed[0]["type"], "message.deleted");
    assert!(listed.iter().all(|attempt| attempt["status"] == 200));
    workers.stop().await?;
    api.stop().await
}

both_stacks!(event_filters_and_secret_rotation_hold);

/// An endpoint gets only the event types it subscribed to; after a rotation each delivery
/// carries a signature with the new secret and one with the old, so a receiver that knows
/// either verifies it.
async fn event_filters_and_secret_rotation_hold(env: TestEnv) -> anyhow::Result<()> {
    let receiver = WebhookReceiver::start().await?;
    let running = env.running_chat("filtered").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let created = register(
        client,
        token,
        &receiver,
        "deletions",
        Some(&["message.deleted"]),
    )
    .await?;
    assert_eq!(created["events"], json!(["message.deleted"]));
    let old_secret = created["secret"].as_str().unwrap_or_default().to_owned();
    for body in ["one", "two"] {
        client.create_message(token, chat, body).await?;
    }
    let messages = format!("/applications/{token}/chats/{chat}/messages");
    eventually("message 2 is stored", WAIT, || async {
        Ok(client.get(&format!("{messages}/2")).await?.status == StatusCode::OK)
    })
    .await?;
    client.delete(&format!("{messages}/1")).await?;
    let deliveries = accepted_deliveries(&receiver, "deletions", 1).await?;
    assert_eq!(
        summary(&deliveries[..1]),
        [("message.deleted".to_owned(), chat, 1)],
        "only the deletion, not the creations"
    );

    let rotated = client
        .post_empty(&format!(
            "/applications/{token}/webhooks/{}/secret/rotate",
            created["id"]
        ))
        .await?;
    assert_eq!(rotated.status, StatusCode::OK, "{rotated:?}");
    let new_secret = rotated.body["secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_ne!(new_secret, old_secret);
    assert!(rotated.body["previous_secret_valid_until"].is_string());
    // The receiver knows only the old secret: it still verifies.
    receiver
        .configure("deletions", &[&old_secret], Mode::Ok)
        .await?;
    client.delete(&format!("{messages}/2")).await?;
    // (At least once: a delivery may come twice, so each is picked by its message.)
    let after_rotation = deliveries_of_message(&receiver, "deletions", 2, 1)
        .await?
        .remove(0);
    assert_eq!(
        after_rotation
            .signature
            .split(' ')
            .filter(|signature| signature.starts_with("v1,"))
            .count(),
        2,
        "two signatures during the overlap: {}",
        after_rotation.signature
    );
    assert!(after_rotation.verified, "{:?}", after_rotation.verify_error);
    // And one that knows only the new secret verifies too: the replay from the first deletion
    // delivers the second again, with its id.
    receiver
        .configure("deletions", &[&new_secret], Mode::Ok)
        .await?;
    let before_replay = deliveries_of_message(&receiver, "deletions", 2, 1)
        .await?
        .len();
    let first_cursor = deliveries[0].body["data"]["cursor"].clone();
    let replayed = client
        .post(
            &format!("/applications/{token}/webhooks/{}/replay", created["id"]),
            json!({"after": first_cursor}),
        )
        .await?;
    assert_eq!(replayed.status, StatusCode::ACCEPTED, "{replayed:?}");
    let again = deliveries_of_message(&receiver, "deletions", 2, before_replay + 1)
        .await?
        .pop()
        .context("the replayed delivery")?;
    assert!(again.verified, "{:?}", again.verify_error);
    assert_eq!(
        again.webhook_id, after_rotation.webhook_id,
        "a replay keeps the id"
    );
    running.stop().await
}

both_stacks!(a_private_or_metadata_url_is_refused_and_nothing_is_registered);

/// Only 127.0.0.1 is allowed here (`CHAT_WEBHOOK_ALLOWED_HOSTS` of the tests): every other
/// private, loopback, link-local or metadata address is refused with a 422, and so is a URL that
/// is no http(s) URL. The addresses are literal: nothing is resolved or sent.
async fn a_private_or_metadata_url_is_refused_and_nothing_is_registered(
    env: TestEnv,
) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("careful").await?;
    let path = format!("/applications/{token}/webhooks");
    for url in [
        "http://10.0.0.7/hook",
        "http://172.16.3.4:8080/hook",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://[fd00:ec2::254]/",
        "http://127.0.0.2/",
        "http://0.0.0.0/",
        "ftp://127.0.0.1/",
        "not a url",
    ] {
        let refused = client.post(&path, json!({"url": url})).await?;
        assert_eq!(
            refused.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{url}: {refused:?}"
        );
        assert_eq!(refused.body["error"]["field"], "url", "{url}: {refused:?}");
    }
    let unknown_event = client
        .post(
            &path,
            json!({"url": "http://127.0.0.1:9/", "events": ["message.exploded"]}),
        )
        .await?;
    assert_eq!(
        unknown_event.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{unknown_event:?}"
    );
    let listed = client.get(&path).await?;
    assert_eq!(listed.body["webhooks"], json!([]), "{listed:?}");
    // A change to a private URL is refused the same way.
    let created = client
        .post(&path, json!({"url": "http://127.0.0.1:9/"}))
        .await?;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = &created.body["id"];
    let changed = client
        .request(reqwest::Method::PATCH, &format!("{path}/{id}"))
        .json(&json!({"url": "http://10.1.1.1/"}));
    let changed = client.send_raw(changed).await?;
    assert_eq!(
        changed.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{changed:?}"
    );
    let shown = client.get(&format!("{path}/{id}")).await?;
    assert_eq!(shown.body["url"], "http://127.0.0.1:9/");
    api.stop().await
}

both_stacks!(a_failing_endpoint_is_retried_in_order_then_disabled_and_resumes_when_enabled);

/// While the receiver answers 500, the first due delivery is retried (with the same
/// `webhook-id`) and none after it is sent; once it has failed longer than allowed the endpoint
/// is disabled with a `webhook.disabled` record. Enabled again, it delivers everything from where
/// it stopped, in order.
async fn a_failing_endpoint_is_retried_in_order_then_disabled_and_resumes_when_enabled(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    env.set("CHAT_WEBHOOK_DISABLE_AFTER_SECONDS", "2");
    let receiver = WebhookReceiver::start().await?;
    let running = env.running_chat("flaky").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let created = register(
        client,
        token,
        &receiver,
        "flaky",
        Some(&["message.created"]),
    )
    .await?;
    let secret = created["secret"].as_str().unwrap_or_default().to_owned();
    receiver.configure("flaky", &[&secret], Mode::Fail).await?;
    for body in ["one", "two", "three"] {
        client.create_message(token, chat, body).await?;
    }
    let endpoint_path = format!("/applications/{token}/webhooks/{}", created["id"]);
    eventually("the endpoint is disabled", WAIT, || async {
        Ok(client.get(&endpoint_path).await?.body["disabled"] == true)
    })
    .await?;
    let failed = receiver.deliveries(Some("flaky")).await?;
    assert!(failed.len() >= 2, "retried: {failed:?}");
    let first_id = &failed[0].webhook_id;
    assert!(
        failed
            .iter()
            .all(|delivery| delivery.webhook_id == *first_id),
        "only the first change is attempted, with one id: {:?}",
        summary(&failed)
    );
    let attempts = client.get(&format!("{endpoint_path}/attempts")).await?;
    let listed = attempts.body["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed[0]["type"], "webhook.disabled", "{attempts:?}");
    assert!(
        listed[1..].iter().all(|attempt| attempt["status"] == 500),
        "{attempts:?}"
    );
    let shown = client.get(&endpoint_path).await?;
    assert!(shown.body["disabled_reason"].is_string(), "{shown:?}");

    receiver.configure("flaky", &[&secret], Mode::Ok).await?;
    let enabled = client
        .send_raw(
            client
                .request(reqwest::Method::PATCH, &endpoint_path)
                .json(&json!({"disabled": false})),
        )
        .await?;
    assert_eq!(enabled.status, StatusCode::OK, "{enabled:?}");
    assert_eq!(enabled.body["disabled"], false);
    let delivered = accepted_deliveries(&receiver, "flaky", 3).await?;
    assert_eq!(
        summary(&delivered),
        (1..=3)
            .map(|number| ("message.created".to_owned(), chat, number))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        delivered[0].webhook_id, *first_id,
        "the retried change kept its id"
    );
    running.stop().await
}

both_stacks!(a_receiver_down_for_a_while_gets_every_change_afterwards_in_order_per_chat);

/// Messages posted into three chats while the receiver is down arrive once it is back, each
/// chat's in order, none missing.
async fn a_receiver_down_for_a_while_gets_every_change_afterwards_in_order_per_chat(
    env: TestEnv,
) -> anyhow::Result<()> {
    let mut receiver = WebhookReceiver::start().await?;
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let token = client.create_application("patient").await?;
    register(
        client,
        &token,
        &receiver,
        "down",
        Some(&["message.created"]),
    )
    .await?;
    let chats = [
        client.create_chat(&token).await?,
        client.create_chat(&token).await?,
        client.create_chat(&token).await?,
    ];
    receiver.stop().await?;
    let mut posted: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..20 {
        for chat in chats {
            client
                .create_message(&token, chat, &format!("while down {round}"))
                .await?;
            *posted.entry(chat).or_default() += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    receiver.restart().await?;
    let deliveries = accepted_deliveries(&receiver, "down", 60).await?;
    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (_, chat, number) in summary(&deliveries) {
        seen.entry(chat).or_default().push(number);
    }
    for chat in chats {
        let numbers = seen.get(&chat).cloned().unwrap_or_default();
        let mut distinct = numbers.clone();
        distinct.dedup();
        assert_eq!(
            distinct,
            (1..=posted[&chat]).collect::<Vec<_>>(),
            "chat {chat}: every message once, in order (redeliveries repeat the last only)"
        );
    }
    for delivery in &deliveries {
        assert!(delivery.verified, "{:?}", delivery.verify_error);
    }
    workers.stop().await?;
    api.stop().await
}

both_stacks!(a_hanging_endpoint_does_not_delay_another_application);

/// One application's endpoint accepts connections and never answers; another application's
/// deliveries arrive promptly meanwhile (each endpoint has its own delivery in flight, bounded by
/// the delivery timeout, 20 s here).
async fn a_hanging_endpoint_does_not_delay_another_application(
    mut env: TestEnv,
) -> anyhow::Result<()> {
    env.set("CHAT_WEBHOOK_TIMEOUT_MS", "20000");
    let receiver = WebhookReceiver::start().await?;
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let stuck = client.create_application("stuck").await?;
    let brisk = client.create_application("brisk").await?;
    let stuck_endpoint = register(client, &stuck, &receiver, "stuck", None).await?;
    let stuck_secret = stuck_endpoint["secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    receiver
        .configure("stuck", &[&stuck_secret], Mode::Hang)
        .await?;
    register(client, &brisk, &receiver, "brisk", None).await?;
    let stuck_chat = client.create_chat(&stuck).await?;
    client
        .create_message(&stuck, stuck_chat, "into the void")
        .await?;
    eventually(
        "the stuck endpoint got its first delivery",
        WAIT,
        || async { Ok(!receiver.deliveries(Some("stuck")).await?.is_empty()) },
    )
    .await?;
    let brisk_chat = client.create_chat(&brisk).await?;
    let started = tokio::time::Instant::now();
    client
        .create_message(&brisk, brisk_chat, "promptly")
        .await?;
    let delivered = accepted_deliveries(&receiver, "brisk", 2).await?;
    let took = started.elapsed();
    assert_eq!(
        summary(&delivered),
        [
            ("chat.created".to_owned(), brisk_chat, 0),
            ("message.created".to_owned(), brisk_chat, 1)
        ]
    );
    // The stuck endpoint's delivery hangs for the whole timeout meanwhile.
    assert!(
        took < Duration::from_secs(10),
        "the brisk delivery took {took:?}"
    );
    assert!(
        accepted(&receiver, "stuck").await?.is_empty(),
        "the stuck endpoint never answered"
    );
    workers.stop().await?;
    api.stop().await
}

/// The dispatcher checks a destination again at every connection, on what the name resolves to
/// then: endpoints registered while 127.0.0.1 was allowed (one by address, one renamed to
/// `localhost` behind the api's back, as a DNS answer could change) get no connection from a
/// dispatcher that allows nothing private, and their attempts say why.
#[tokio::test]
async fn the_dispatcher_refuses_a_private_destination_at_connect_time() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let env = TestEnv::new().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counting = {
        let connections = Arc::clone(&connections);
        tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                connections.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let api = env.spawn_api().await?;
    let client = &api.client;
    let token = client.create_application("rebinding").await?;
    let mut endpoints = Vec::new();
    for name in ["literal", "named"] {
        let created = client
            .post(
                &format!("/applications/{token}/webhooks"),
                json!({"url": format!("http://127.0.0.1:{port}/{name}")}),
            )
            .await?;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
        endpoints.push(created.body["id"].as_u64().unwrap_or_default());
    }
    sqlx::query("UPDATE webhook_endpoints SET url = ? WHERE id = ?")
        .bind(format!("http://localhost:{port}/named"))
        .bind(endpoints[1])
        .execute(env.mysql())
        .await?;
    let mut strict = env.config();
    strict.webhooks.allowed = chatcore::webhooks::AllowedDestinations::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ingest = tokio::spawn(chatcore::pipeline::run_worker(
        env.config(),
        chatcore::events::Consumer::Ingest,
        shutdown.clone(),
    ));
    let dispatcher = tokio::spawn(chatcore::webhooks::run_process(strict, shutdown.clone()));
    let chat = client.create_chat(&token).await?;
    client.create_message(&token, chat, "to nowhere").await?;
    for id in &endpoints {
        let attempts = format!("/applications/{token}/webhooks/{id}/attempts");
        eventually("an attempt was refused", WAIT, || async {
            let listed = client.get(&attempts).await?.body["attempts"].clone();
            Ok(listed.as_array().is_some_and(|attempts| {
                attempts.iter().any(|attempt| {
                    attempt["status"].is_null()
                        && attempt["error"]
                            .as_str()
                            .is_some_and(|error| error.contains("allowed for webhooks"))
                })
            }))
        })
        .await?;
    }
    assert_eq!(connections.load(Ordering::Relaxed), 0, "nothing connected");
    shutdown.cancel();
    ingest.await??;
    dispatcher.await??;
    counting.abort();
    api.stop().await
}
