//! Failures that do not restart a shared service (those are in `tests/faults`, run serially): an
//! ambiguous 503 retried with its key, the broker dropping the api, a read-only index, a dead
//! letter at the end of a batch, two events with one number (in one batch, and against a stored
//! message or chat: dead-lettered at once, the counter raised), an event of a newer schema, a
//! worker behind a thousand of the largest events, quorum queues.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chatcore::config::Topology;
use chatcore::domain::Number;
use chatcore::events::{Consumer, Event, EventPayload, TraceContext};
use chatcore::health::Readiness;
use chatcore::metrics::{Metrics, QueueLabels};
use chatcore::numbering::{NumberAllocator, Scope};
use chatcore::pipeline::consumer::run;
use chatcore::pipeline::{BatchHandler, HandleError, IngestWriter, Observers, Received};
use futures_util::future::join_all;
use sqlx::Connection as _;
use system_tests::{
    Client, RunningChat, Stack, StatusCode, TestEnv, both_stacks, eventually, memory_of,
};
use tokio_util::sync::CancellationToken;

const LONG: Duration = Duration::from_secs(60);

/// 25 messages at once, each with a key of its own, retried until accepted.
async fn careful_wave(
    client: &Client,
    token: &str,
    chat: u64,
    wave: usize,
) -> anyhow::Result<Vec<u64>> {
    join_all((0..25).map(|i| {
        let body = format!("wave {wave} message {i}");
        let key = format!("wave-{wave}-{i}");
        async move {
            client
                .create_message_carefully(token, chat, &body, &key)
                .await
        }
    }))
    .await
    .into_iter()
    .collect()
}

both_stacks!(an_ambiguous_503_keeps_its_number_for_the_retry);

/// The api gives up waiting for the confirm (timeout 0) after the event went out: the client gets
/// 503 although the event is durable. Its retry with the same key must get that number, and the
/// message must be stored once, not twice under two numbers.
async fn an_ambiguous_503_keeps_its_number_for_the_retry(mut env: TestEnv) -> anyhow::Result<()> {
    let api = env.spawn_api().await?;
    let token = api.client.create_application("ambiguous").await?;
    let chat = api.client.create_chat(&token).await?;
    api.stop().await?;

    env.set("CHAT_PUBLISH_CONFIRM_TIMEOUT_MS", "0");
    let impatient = env.spawn_api().await?;
    // A confirm that beats the first poll is a 202; post until one is too late.
    let mut accepted = Vec::new();
    let mut ambiguous_key = None;
    for attempt in 0..50 {
        let key = format!("ambiguous-{attempt}");
        let request = impatient
            .client
            .request(
                reqwest::Method::POST,
                &format!("/applications/{token}/chats/{chat}/messages"),
            )
            .header("idempotency-key", &key)
            .json(&serde_json::json!({ "body": key }));
        let reply = impatient.client.send_raw(request).await?;
        match reply.status {
            StatusCode::ACCEPTED => accepted.push(reply.body["number"].as_u64().unwrap_or(0)),
            StatusCode::SERVICE_UNAVAILABLE => {
                ambiguous_key = Some(key);
                break;
            }
            status => anyhow::bail!("unexpected {status}: {reply:?}"),
        }
    }
    let key = ambiguous_key.expect("a publish outran the confirm within 50 posts");
    impatient.stop().await?;

    env.set("CHAT_PUBLISH_CONFIRM_TIMEOUT_MS", "5000");
    let api = env.spawn_api().await?;
    let workers = env.spawn_workers();
    let client = &api.client;
    let number = client
        .create_message_carefully(&token, chat, &key, &key)
        .await?;
    let again = client
        .create_message_carefully(&token, chat, &key, &key)
        .await?;
    assert_eq!(again, number, "a retry gets the first number");
    assert!(!accepted.contains(&number), "{number} handed out twice");
    accepted.push(number);
    accepted.sort_unstable();
    eventually("every message is stored and indexed once", LONG, || async {
        Ok(env.stored_message_numbers(&token, chat).await? == accepted
            && env.indexed_message_numbers(&token, chat).await? == accepted)
    })
    .await?;
    // Nothing else arrives later: the first publish and the retry's are one message.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.stored_message_numbers(&token, chat).await?, accepted);
    workers.stop().await?;
    api.stop().await
}

#[tokio::test]
async fn readiness_recovers_without_traffic_after_the_broker_drops_the_api() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api = env.spawn_api().await?;
    let readyz = api.base_url.replace("/api/v1", "/readyz");
    let ready = || async { Ok(reqwest::get(&readyz).await?.status() == StatusCode::OK) };
    assert!(ready().await?, "ready at start");
    let publisher = format!("{} publisher", env.config().topology.exchange);
    eventually("the broker drops the api's connection", LONG, || async {
        Ok(env.drop_amqp_connections(&publisher).await? > 0)
    })
    .await?;
    // No request but the probes: the api reconnects by itself.
    eventually("the api is ready again", Duration::from_secs(15), ready).await?;
    let token = api.client.create_application("after the drop").await?;
    api.client.create_chat(&token).await?;
    api.stop().await
}

#[tokio::test]
async fn a_read_only_index_is_waited_for_not_dead_lettered() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("flood stage").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let first = client
        .create_message(token, chat, "before the block")
        .await?;
    eventually("the first message is indexed", LONG, || async {
        Ok(env.indexed_message_numbers(token, chat).await? == [first])
    })
    .await?;

    // What Elasticsearch does at the disk flood stage.
    let config = env.config();
    let settings = format!(
        "{}/{}/_settings",
        env.services.elasticsearch_url, config.elasticsearch_index
    );
    let block = |value: serde_json::Value| {
        let settings = settings.clone();
        async move {
            reqwest::Client::new()
                .put(settings)
                .json(&serde_json::json!({ "index.blocks.read_only_allow_delete": value }))
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(())
        }
    };
    block(serde_json::json!(true)).await?;
    let second = client
        .create_message(token, chat, "during the block")
        .await?;
    eventually("the second message is stored", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == [first, second])
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let index_dead = Topology::dead_letter_queue(&config.topology.index_queue);
    assert_eq!(
        env.queue_depth(&index_dead).await?,
        0,
        "nothing dead-lettered"
    );

    block(serde_json::Value::Null).await?;
    eventually(
        "the second message is indexed once the block is lifted",
        LONG,
        || async { Ok(env.indexed_message_numbers(token, chat).await? == [first, second]) },
    )
    .await?;
    assert_eq!(env.queue_depth(&index_dead).await?, 0);
    running.stop().await
}

/// Fails permanently on one event, records the others.
struct FailsOn {
    poison: uuid::Uuid,
    handled: std::sync::Mutex<Vec<uuid::Uuid>>,
}

impl BatchHandler for FailsOn {
    const OPERATION: &'static str = "test batch";

    async fn handle(&self, batch: &[Received]) -> Result<(), HandleError> {
        if batch
            .iter()
            .any(|received| received.event.event_id == self.poison)
        {
            return Err(HandleError::Permanent(anyhow::anyhow!("poison")));
        }
        let mut handled = self.handled.lock().expect("not poisoned");
        handled.extend(batch.iter().map(|received| received.event.event_id));
        Ok(())
    }
}

fn message_event(number: u64) -> Event {
    Event::new(EventPayload::MessageCreated {
        application_id: 1,
        chat_number: Number::new(1).expect("positive"),
        message_number: Number::new(number).expect("positive"),
        body: format!("message {number}"),
        created_at: chatcore::store::now(),
        sender: None,
        metadata: None,
    })
}

#[tokio::test]
async fn dead_lettering_the_last_event_of_a_batch_keeps_the_consumer_on_its_channel()
-> anyhow::Result<()> {
    let env = TestEnv::with_settings(&[("CHAT_BATCH_MAX_WAIT_MS", "500")]).await?;
    let config = env.config();
    let metrics = Metrics::new();
    let queue = chatcore::adapters::queue(&config, &metrics).await?;
    queue.ensure_topology().await?;
    let trace = TraceContext::child_of(None);
    let events: Vec<Event> = (1..=3).map(message_event).collect();
    for event in &events {
        queue.publish(event, &trace).await?;
    }
    // The poison is the last delivery of the batch: its tag is the highest.
    let handler = FailsOn {
        poison: events[2].event_id,
        handled: std::sync::Mutex::default(),
    };
    let shutdown = CancellationToken::new();
    let observers = Observers {
        readiness: Readiness::default(),
        metrics: Arc::clone(&metrics),
    };
    let consuming = async {
        run(
            &queue,
            Consumer::Ingest,
            &handler,
            &config.consumer,
            &shutdown,
            &observers,
        )
        .await;
        anyhow::Ok(())
    };
    let dead_letter_queue = Topology::dead_letter_queue(&config.topology.ingest_queue);
    let checks = async {
        eventually("the poison is dead-lettered", LONG, || async {
            Ok(queue.depth(&dead_letter_queue).await? == 1)
        })
        .await?;
        let later = message_event(4);
        queue.publish(&later, &trace).await?;
        eventually("an event after the poison is handled", LONG, || async {
            Ok(handler
                .handled
                .lock()
                .expect("not poisoned")
                .contains(&later.event_id))
        })
        .await?;
        let opened = metrics.encode();
        shutdown.cancel();
        anyhow::Ok(opened)
    };
    let ((), opened) = tokio::try_join!(consuming, checks)?;
    let opens = opened
        .lines()
        .find(|line| {
            line.starts_with("chat_dependency_duration_seconds_count")
                && line.contains("operation=\"open_source\"")
        })
        .and_then(|line| line.rsplit(' ').next())
        .map(str::to_owned);
    assert_eq!(
        opens.as_deref(),
        Some("1"),
        "the consumer kept its first channel (an ack naming the rejected delivery closes it)"
    );
    assert_eq!(handler.handled.lock().expect("not poisoned").len(), 3);
    Ok(())
}

both_stacks!(a_number_handed_out_twice_is_dead_lettered_not_dropped);

/// Whatever gets past the numbering guard must not vanish: two events that carry the same message
/// number (as a Redis that went back in time would make) keep the first message and dead-letter
/// the second, instead of dropping it as a redelivery.
async fn a_number_handed_out_twice_is_dead_lettered_not_dropped(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("twice").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let application_id = env.application_id(token).await?;
    let taken = |body: &str| {
        Event::new(EventPayload::MessageCreated {
            application_id,
            chat_number: Number::new(chat).expect("positive"),
            message_number: Number::new(1000).expect("positive"),
            body: body.to_owned(),
            created_at: chatcore::store::now(),
            sender: None,
            metadata: None,
        })
    };
    let config = env.config();
    let queue = chatcore::adapters::queue(&config, &Metrics::new()).await?;
    let trace = TraceContext::child_of(None);
    // In one batch, and then again alone after the batch is split.
    queue.publish(&taken("first"), &trace).await?;
    queue.publish(&taken("second"), &trace).await?;
    let dead_letter_queue = Topology::dead_letter_queue(&config.topology.ingest_queue);
    eventually("the second event is dead-lettered", LONG, || async {
        Ok(queue.depth(&dead_letter_queue).await? == 1)
    })
    .await?;
    // The first is written with its batch, and the second dead-lettered (at once, or after the
    // first when both came in one batch).
    let path = format!("/applications/{token}/chats/{chat}/messages/1000");
    eventually("the first event is stored", LONG, || async {
        Ok(client.get(&path).await?.status == StatusCode::OK)
    })
    .await?;
    let stored = client.get(&path).await?;
    assert_eq!(stored.body["body"], "first", "{stored:?}");
    assert_eq!(env.stored_message_numbers(token, chat).await?, [1000]);
    running.stop().await
}

/// An application and a chat the api created, then this test's ingest consumer in the api's
/// place: the tests of a counter that went back in time hand out numbers with `allocator` and
/// publish the events the api would.
struct IngestInPlaceOfTheApi {
    token: String,
    application_id: u64,
    chat_number: Number,
    config: chatcore::config::Config,
    metrics: Arc<Metrics>,
    storage: Arc<dyn chatcore::store::Storage>,
    queue: Arc<dyn chatcore::queue::EventQueue>,
    allocator: NumberAllocator,
    trace: TraceContext,
}

impl IngestInPlaceOfTheApi {
    async fn start(env: &TestEnv, application: &str) -> anyhow::Result<Self> {
        let api = env.spawn_api().await?;
        let token = api.client.create_application(application).await?;
        let chat_number = Number::new(api.client.create_chat(&token).await?).expect("positive");
        api.stop().await?;
        let application_id = env.application_id(&token).await?;
        let config = env.config();
        let metrics = Metrics::new();
        let storage = chatcore::adapters::storage(&config, &metrics).await?;
        let queue = chatcore::adapters::queue(&config, &metrics).await?;
        queue.ensure_topology().await?;
        let allocator = NumberAllocator::new(
            chatcore::adapters::state(&config, &metrics).await?,
            Arc::clone(&storage),
            &config.redis_key_prefix,
            config.number_block_size,
        );
        Ok(Self {
            token,
            application_id,
            chat_number,
            config,
            metrics,
            storage,
            queue,
            allocator,
            trace: TraceContext::child_of(None),
        })
    }

    /// Publishes `events` at once (their order in the queue is not theirs).
    async fn publish_together(&self, events: &[Event]) -> anyhow::Result<()> {
        let publishing = events
            .iter()
            .map(|event| self.queue.publish(event, &self.trace));
        for published in join_all(publishing).await {
            published?;
        }
        Ok(())
    }

    /// Publishes `events` one after the other, in this order.
    async fn publish_in_order(&self, events: &[Event]) -> anyhow::Result<()> {
        for event in events {
            self.queue.publish(event, &self.trace).await?;
        }
        Ok(())
    }

    async fn dead_letters(&self) -> anyhow::Result<u64> {
        let dead_letter_queue = Topology::dead_letter_queue(&self.config.topology.ingest_queue);
        Ok(self.queue.depth(&dead_letter_queue).await?)
    }

    /// Runs the ingest consumer until `checks` end.
    async fn consuming_while<T>(
        &self,
        checks: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let writer = IngestWriter::new(
            Arc::clone(&self.storage),
            Arc::clone(&self.queue),
            self.allocator.clone(),
            Arc::clone(&self.metrics),
        );
        let shutdown = CancellationToken::new();
        let observers = Observers {
            readiness: Readiness::default(),
            metrics: Arc::clone(&self.metrics),
        };
        let consuming = async {
            run(
                &self.queue,
                Consumer::Ingest,
                &writer,
                &self.config.consumer,
                &shutdown,
                &observers,
            )
            .await;
            anyhow::Ok(())
        };
        let checking = async {
            let checked = checks.await;
            shutdown.cancel();
            checked
        };
        let ((), checked) = tokio::try_join!(consuming, checking)?;
        Ok(checked)
    }

    /// Failed attempts of the consumer so far.
    fn failed_attempts(&self) -> u64 {
        self.metrics
            .events_failed
            .get_or_create(&QueueLabels {
                queue: self.config.topology.ingest_queue.clone(),
            })
            .get()
    }
}

both_stacks!(a_number_handed_out_twice_is_dead_lettered_at_once_and_its_counter_raised);

/// A counter that went back in time hands out stored numbers again. The first batch that meets
/// them dead-letters them at once (no retries), writes the rest of the batch, and raises the
/// chat's counter above every stored number, so the next number is new.
async fn a_number_handed_out_twice_is_dead_lettered_at_once_and_its_counter_raised(
    env: TestEnv,
) -> anyhow::Result<()> {
    let ingest = IngestInPlaceOfTheApi::start(&env, "rolled back").await?;
    let (application_id, chat_number) = (ingest.application_id, ingest.chat_number);
    let scope = Scope::MessagesOf {
        application_id,
        chat_number,
    };
    let message = |number: u64, body: &str| {
        Event::new(EventPayload::MessageCreated {
            application_id,
            chat_number,
            message_number: Number::new(number).expect("positive"),
            body: body.to_owned(),
            created_at: chatcore::store::now(),
            sender: None,
            metadata: None,
        })
    };
    let stored_bodies = || async {
        let page = chatcore::domain::PageRequest {
            per_page: 100,
            position: chatcore::domain::PagePosition::Page(1),
        };
        let rows = ingest
            .storage
            .list_messages(application_id, chat_number, None, page)
            .await?;
        anyhow::Ok(
            rows.into_iter()
                .map(|row| (row.number, row.body))
                .collect::<Vec<_>>(),
        )
    };
    let next = ingest
        .consuming_while(async {
            // 1 and 2 from the counter; 40 handed out before the counter went back.
            let one = ingest.allocator.allocate(&scope).await?.get();
            let two = ingest.allocator.allocate(&scope).await?.get();
            ingest
                .publish_together(&[
                    message(one, "one"),
                    message(two, "two"),
                    message(40, "forty"),
                ])
                .await?;
            eventually("the first messages are stored", LONG, || async {
                Ok(stored_bodies().await?.len() == 3)
            })
            .await?;
            // One batch: two numbers handed out again, among new ones.
            let three = ingest.allocator.allocate(&scope).await?.get();
            let four = ingest.allocator.allocate(&scope).await?.get();
            ingest
                .publish_together(&[
                    message(two, "two again"),
                    message(three, "three"),
                    message(40, "forty again"),
                    message(four, "four"),
                ])
                .await?;
            eventually("the duplicates are dead-lettered", LONG, || async {
                Ok(ingest.dead_letters().await? == 2)
            })
            .await?;
            eventually("the rest of the batch is stored", LONG, || async {
                Ok(stored_bodies().await?.len() == 5)
            })
            .await?;
            Ok(ingest.allocator.allocate(&scope).await?.get())
        })
        .await?;
    let expected: Vec<(u64, String)> = [
        (1, "one"),
        (2, "two"),
        (3, "three"),
        (4, "four"),
        (40, "forty"),
    ]
    .map(|(number, body)| (number, body.to_owned()))
    .into();
    assert_eq!(
        stored_bodies().await?,
        expected,
        "the first of each number stays"
    );
    assert_eq!(next, 41, "the counter went above the highest stored number");
    assert_eq!(ingest.metrics.number_conflicts.get(), 2);
    assert_eq!(ingest.metrics.number_counter_raises.get(), 1);
    let failed = ingest.failed_attempts();
    assert!(
        (1..=2).contains(&failed),
        "one failed attempt per batch with duplicates, none retried: {failed}"
    );
    Ok(())
}

both_stacks!(a_chat_number_handed_out_twice_is_dead_lettered_not_merged);

/// A chats counter that went back in time hands out a chat number again: the second client was
/// told "chat N titled B" while chat N is titled A. The second chat event is dead-lettered at once
/// (in one batch with the first, or against the stored chat), never merged into the first chat;
/// the application's chats counter goes above every stored chat number, so the api's next chat is
/// new. A redelivery of the first event is no conflict, and a chat whose message came first still
/// gets its title.
async fn a_chat_number_handed_out_twice_is_dead_lettered_not_merged(
    env: TestEnv,
) -> anyhow::Result<()> {
    let ingest = IngestInPlaceOfTheApi::start(&env, "chats rolled back").await?;
    let application_id = ingest.application_id;
    let scope = Scope::ChatsOf { application_id };
    let chat = |number: u64, title: &str| {
        Event::new(EventPayload::ChatCreated {
            application_id,
            chat_number: Number::new(number).expect("positive"),
            created_at: chatcore::store::now(),
            title: Some(chatcore::domain::ChatTitle::parse(title).expect("a valid title")),
            metadata: None,
        })
    };
    let message_to = |chat_number: u64| {
        Event::new(EventPayload::MessageCreated {
            application_id,
            chat_number: Number::new(chat_number).expect("positive"),
            message_number: Number::new(1).expect("positive"),
            body: "before its chat".to_owned(),
            created_at: chatcore::store::now(),
            sender: None,
            metadata: None,
        })
    };
    let storage = &ingest.storage;
    let title_of = |number: u64| async move {
        let number = Number::new(number).expect("positive");
        let stored = storage.find_chat(application_id, number).await?;
        anyhow::Ok(stored.map(|chat| chat.title.map(|title| title.as_str().to_owned())))
    };
    let (late, ahead, again, three, next) = ingest
        .consuming_while(async {
            // A message before its chat: the chat's event still gives it its title.
            let late = ingest.allocator.allocate(&scope).await?.get();
            ingest.publish_in_order(&[message_to(late)]).await?;
            eventually("the message's chat is stored", LONG, || async {
                Ok(title_of(late).await? == Some(None))
            })
            .await?;
            ingest.publish_in_order(&[chat(late, "late")]).await?;
            // Handed out before the counter went back.
            let ahead = late + 40;
            ingest.publish_in_order(&[chat(ahead, "ahead")]).await?;
            eventually("the first chats are stored", LONG, || async {
                Ok(title_of(late).await?.flatten().as_deref() == Some("late")
                    && title_of(ahead).await?.is_some())
            })
            .await?;
            // A number handed out twice in a row (one batch, or the second against the first
            // stored), the first event again, a number stored before, and a new chat.
            let again = ingest.allocator.allocate(&scope).await?.get();
            let three = ingest.allocator.allocate(&scope).await?.get();
            let first = chat(again, "first");
            ingest
                .publish_in_order(&[
                    first.clone(),
                    chat(again, "second"),
                    first,
                    chat(ahead, "ahead again"),
                    chat(three, "three"),
                ])
                .await?;
            eventually("the duplicates are dead-lettered", LONG, || async {
                Ok(ingest.dead_letters().await? == 2)
            })
            .await?;
            eventually("the rest is stored", LONG, || async {
                Ok(title_of(three).await?.is_some())
            })
            .await?;
            let next = ingest.allocator.allocate(&scope).await?.get();
            Ok((late, ahead, again, three, next))
        })
        .await?;
    for (number, title) in [
        (late, "late"),
        (again, "first"),
        (ahead, "ahead"),
        (three, "three"),
    ] {
        assert_eq!(
            title_of(number).await?,
            Some(Some(title.to_owned())),
            "chat {number} keeps the title of its first event"
        );
    }
    assert_eq!(
        ingest.dead_letters().await?,
        2,
        "the redelivered first event is no conflict"
    );
    assert_eq!(ingest.metrics.number_conflicts.get(), 2);
    assert_eq!(ingest.metrics.number_counter_raises.get(), 1);
    assert_eq!(
        next,
        ahead + 1,
        "the counter went above the highest stored chat"
    );
    let api = env.spawn_api().await?;
    let from_api = api.client.create_chat(&ingest.token).await?;
    assert!(
        from_api > next,
        "the api's next chat is above every stored chat: {from_api}"
    );
    api.stop().await
}

both_stacks!(an_event_of_a_newer_schema_waits_for_an_upgraded_consumer);

/// A new api may publish before every consumer is upgraded: the old consumer leaves the event in
/// the queue (not in the dead-letter queue) and goes on with the others.
async fn an_event_of_a_newer_schema_waits_for_an_upgraded_consumer(
    env: TestEnv,
) -> anyhow::Result<()> {
    let running = env.running_chat("rolling upgrade").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let config = env.config();
    let queue = chatcore::adapters::queue(&config, &Metrics::new()).await?;
    let mut newer = message_event(7);
    newer.schema_version = chatcore::events::SCHEMA_VERSION + 1;
    queue.publish(&newer, &TraceContext::child_of(None)).await?;
    let number = client.create_message(token, chat, "after it").await?;
    eventually("the consumer goes on", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == [number])
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Stopped, the consumers hand back what they hold: the event is still in its queue.
    running.stop().await?;
    let ingest = &config.topology.ingest_queue;
    assert_eq!(
        queue.depth(&Topology::dead_letter_queue(ingest)).await?,
        0,
        "not dead-lettered"
    );
    eventually("the event waits in the queue", LONG, || async {
        Ok(queue.depth(ingest).await? == 1)
    })
    .await
}

/// The memory limit of a worker in the chart.
const CHART_WORKER_MEMORY_LIMIT: u64 = 256 * 1024 * 1024;

#[tokio::test]
async fn workers_behind_a_thousand_of_the_largest_events_stay_within_their_memory_limit()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api = env.spawn_api().await?;
    let token = api.client.create_application("heavy").await?;
    let chat = api.client.create_chat(&token).await?;
    let application_id = env.application_id(&token).await?;
    let config = env.config();
    let queue = chatcore::adapters::queue(&config, &Metrics::new()).await?;
    // Control characters take 6 bytes in JSON: the largest event a 256 KiB request can make.
    let body = "\u{1}".repeat(43_000);
    let trace = TraceContext::child_of(None);
    for numbers in (1..=1000u64).collect::<Vec<_>>().chunks(50) {
        let publishes = numbers.iter().map(|number| {
            let event = Event::new(EventPayload::MessageCreated {
                application_id,
                chat_number: Number::new(chat).expect("positive"),
                message_number: Number::new(*number).expect("positive"),
                body: body.clone(),
                created_at: chatcore::store::now(),
                sender: None,
                metadata: None,
            });
            let (queue, trace) = (&queue, &trace);
            async move { queue.publish(&event, trace).await }
        });
        for published in join_all(publishes).await {
            published?;
        }
    }
    // The workers start with all of them waiting, under the chart's defaults. Their log lines go
    // to files, shown if they do not get through (it happened once on a loaded machine).
    let log_path = |name: &str| {
        std::env::temp_dir().join(format!(
            "{name}-{}-{application_id}.log",
            std::process::id()
        ))
    };
    let logs = [log_path("ingest-worker"), log_path("indexer")];
    let mut ingest =
        env.spawn_process_logging_to("ingest-worker", std::fs::File::create(&logs[0])?)?;
    let mut indexer = env.spawn_process_logging_to("indexer", std::fs::File::create(&logs[1])?)?;
    // Bounded generously: a quarter of a gigabyte goes through MySQL and the index, on a machine
    // that the other tests load too; what this test measures is memory, not speed (alone: 18 s).
    let through = eventually(
        "the thousand messages are stored and indexed",
        Duration::from_secs(240),
        || async {
            let stored = env.stored_message_numbers(&token, chat).await?.len();
            let indexed = env.indexed_message_numbers(&token, chat).await?.len();
            if stored == 1000 && indexed == 1000 {
                return Ok(true);
            }
            anyhow::bail!("{stored} of 1000 stored, {indexed} indexed")
        },
    )
    .await;
    if let Err(error) = through {
        for log in &logs {
            let lines = std::fs::read_to_string(log).unwrap_or_default();
            let last: Vec<&str> = lines.lines().rev().take(20).collect();
            eprintln!("last log lines of {}:", log.display());
            for line in last.iter().rev() {
                eprintln!("  {line}");
            }
        }
        return Err(error);
    }
    for log in &logs {
        std::fs::remove_file(log)?;
    }
    for (name, worker) in [("ingest-worker", &mut ingest), ("indexer", &mut indexer)] {
        let peak = memory_of(worker.id().expect("running"), "VmHWM")?;
        worker.kill().await?;
        println!("{name} peak memory: {} MiB", peak / 1024 / 1024);
        assert!(
            peak < CHART_WORKER_MEMORY_LIMIT,
            "{name}: peak {peak} bytes is over the chart's limit"
        );
    }
    api.stop().await
}

#[tokio::test]
async fn quorum_queues_carry_the_pipeline_and_its_dead_letters() -> anyhow::Result<()> {
    let env = TestEnv::with_settings(&[("CHAT_AMQP_QUEUE_TYPE", "quorum")]).await?;
    let running = env.running_chat("replicated").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let accepted = careful_wave(client, token, chat, 0).await?;
    let config = env.config();
    for queue in [&config.topology.ingest_queue, &config.topology.index_queue] {
        assert_eq!(env.queue_type(queue).await?, "quorum");
        assert_eq!(
            env.queue_type(&Topology::dead_letter_queue(queue)).await?,
            "quorum"
        );
    }
    let mut expected = accepted.clone();
    expected.sort_unstable();
    eventually("every message is stored and indexed", LONG, || async {
        Ok(env.stored_message_numbers(token, chat).await? == expected
            && env.indexed_message_numbers(token, chat).await? == expected)
    })
    .await?;
    let queue = chatcore::adapters::queue(&config, &Metrics::new()).await?;
    let connection = env.amqp_connection().await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_publish(
            config.topology.exchange.as_str().into(),
            "chat.created".into(),
            lapin::options::BasicPublishOptions::default(),
            b"{not json",
            lapin::BasicProperties::default(),
        )
        .await?
        .await?;
    let dead_letter_queue = Topology::dead_letter_queue(&config.topology.ingest_queue);
    eventually("the poison is dead-lettered", LONG, || async {
        Ok(queue.depth(&dead_letter_queue).await? == 1)
    })
    .await?;
    connection.close(200, "done".into()).await?;
    running.stop().await
}

/// Hits of a search in one chat, by number.
async fn search_numbers(
    client: &Client,
    token: &str,
    chat: u64,
    query: &str,
) -> anyhow::Result<Vec<u64>> {
    let reply = client
        .get(&format!(
            "/applications/{token}/chats/{chat}/messages/search?query={query}"
        ))
        .await?;
    anyhow::ensure!(reply.status == StatusCode::OK, "search: {reply:?}");
    Ok(reply.body["messages"]
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .filter_map(|message| message["number"].as_u64())
                .collect()
        })
        .unwrap_or_default())
}

#[tokio::test]
async fn an_update_whose_event_was_lost_is_repaired_by_counter_sync() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let running = env.running_chat("edited").await?;
    let (client, token, chat) = (&running.api.client, &running.token, running.chat);
    let number = client.create_message(token, chat, "original words").await?;
    eventually("the message is searchable", LONG, || async {
        Ok(search_numbers(client, token, chat, "original").await? == [number])
    })
    .await?;

    // The update's event cannot be routed: the row changes, the index does not, the client gets 503.
    env.unroute(Consumer::Index, "message.updated").await?;
    let path = format!("/applications/{token}/chats/{chat}/messages/{number}");
    let reply = client
        .put(&path, serde_json::json!({ "body": "edited words" }))
        .await?;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        search_numbers(client, token, chat, "edited")
            .await?
            .is_empty(),
        "the index missed the update"
    );

    // Nobody retries; the next counter-sync run repairs it.
    let report = counter_sync::run(&env.config()).await?;
    assert!(report.reindexed >= 1, "{report:?}");
    eventually("the update is searchable", LONG, || async {
        Ok(search_numbers(client, token, chat, "edited").await? == [number])
    })
    .await?;
    running.stop().await
}

both_stacks!(reindex_rebuilds_a_lost_index_from_the_storage);

async fn reindex_rebuilds_a_lost_index_from_the_storage(env: TestEnv) -> anyhow::Result<()> {
    // The workers stop before the index is lost, the api runs on: each is stopped on its own.
    let RunningChat {
        api,
        workers,
        token,
        chat,
    } = env.running_chat("reindexed").await?;
    let client = &api.client;
    let other_chat = client.create_chat(&token).await?;
    let accepted = careful_wave(client, &token, chat, 0).await?;
    careful_wave(client, &token, other_chat, 1).await?;
    let mut expected = accepted.clone();
    expected.sort_unstable();
    eventually("the messages are indexed", LONG, || async {
        Ok(env.indexed_message_numbers(&token, chat).await? == expected
            && env.indexed_message_numbers(&token, other_chat).await?.len() == 25)
    })
    .await?;
    workers.stop().await?;

    // The index is lost: all of it, or the embedded chat's documents.
    let config = env.config();
    match env.stack() {
        Stack::Services => {
            reqwest::Client::new()
                .delete(format!(
                    "{}/{}",
                    env.services.elasticsearch_url, config.elasticsearch_index
                ))
                .send()
                .await?
                .error_for_status()?;
        }
        Stack::Embedded => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(config.data_dir.join("search.db"));
            let mut index = sqlx::SqliteConnection::connect_with(&options).await?;
            sqlx::query("DELETE FROM search_documents")
                .execute(&mut index)
                .await?;
            index.close().await?;
        }
    }
    let output = env
        .command("api")?
        .args([
            "reindex",
            "--application",
            &token,
            "--chat",
            &chat.to_string(),
        ])
        .output()
        .await?;
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("reindexed 25 messages"), "{printed}");
    assert_eq!(env.indexed_message_numbers(&token, chat).await?, expected);
    assert!(
        env.indexed_message_numbers(&token, other_chat)
            .await?
            .is_empty(),
        "only the chat asked for"
    );
    api.stop().await
}
