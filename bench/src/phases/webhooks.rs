//! Webhooks, delivered to a receiver inside the bench (127.0.0.1, answering `204` at once), on an
//! application of their own:
//! - latency: messages posted open loop at `BENCH_WEBHOOK_RATE` a second for
//!   `BENCH_WEBHOOK_SECONDS`, each `message.created` delivery's arrival against its `POST`'s `202`
//!   (goal: p99 ≤ 1 s);
//! - stream fanout: the api's CPU per message posted at the same pace into one chat with no live
//!   stream open, then with [`STREAMS`] open on other chats of the application (a replica hears
//!   only the changes of the chats it streams, so the two should be close);
//! - backlog: `BENCH_WEBHOOK_BACKLOG` more messages stored, then the chat's whole feed replayed to
//!   a new endpoint and timed until every message arrived, against the ingest leg's drain of the
//!   same run (goal: ≥ 0.8 of it). Last: its indexing trails (in the embedded stack, in the api
//!   process), and must not be in the other measures.
//!
//! The chat is the same throughout: the backlog replayed is every message posted in the phase.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::api::{self, Api};
use crate::load::{self, Latencies, Load};
use crate::persisted::Leg;
use crate::phases::posting::post_messages;
use crate::report::{Measured, met, ratio};
use crate::{Bench, Target};

const LATENCY_GOAL: Duration = Duration::from_secs(1);
/// Of the ingest leg's drain rate.
const BACKLOG_GOAL: f64 = 0.8;
/// Live streams open on other chats in the fanout's second load (the api's default limit of
/// streams per application).
const STREAMS: usize = 100;
/// Clients of the paced loads: enough that a slow `POST` does not hold the pace back.
const PACED_CLIENTS: usize = 16;
/// How long the deliveries may trail the last `POST` of the latency load.
const DELIVERY_GRACE: Duration = Duration::from_secs(30);

/// When each `message.created` first arrived, by message number (a redelivery does not move it).
type Arrivals = Arc<Mutex<HashMap<u64, Instant>>>;

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The webhook endpoint the dispatcher delivers to: an HTTP server of the bench on 127.0.0.1.
struct Receiver {
    address: SocketAddr,
    arrivals: Arrivals,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

impl Receiver {
    async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let address = listener.local_addr()?;
        let arrivals = Arrivals::default();
        let app = Router::new()
            .route("/", post(receive))
            .with_state(Arc::clone(&arrivals));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    stopped.await.ok();
                })
                .await
        });
        Ok(Self {
            address,
            arrivals,
            stop,
            server,
        })
    }

    fn url(&self) -> String {
        format!("http://{}/", self.address)
    }

    fn arrived(&self) -> usize {
        locked(&self.arrivals).len()
    }

    /// Polls until `expected` messages arrived or `within` passed; how many arrived.
    async fn wait_for(&self, expected: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        while self.arrived() < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.arrived()
    }

    /// Forgets the arrivals (a new endpoint delivers the same messages again).
    fn clear(&self) {
        locked(&self.arrivals).clear();
    }

    /// Stops accepting, lets the open connections end (a few seconds at most) and stops.
    async fn stop(self) {
        self.stop.send(()).ok();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
}

/// One delivery: its arrival noted by message number, answered `204` at once.
async fn receive(State(arrivals): State<Arrivals>, body: Bytes) -> StatusCode {
    let arrived = Instant::now();
    let delivery: Value = serde_json::from_slice(&body).unwrap_or_default();
    if delivery["type"] == "message.created"
        && let Some(number) = delivery["data"]["message"]["number"].as_u64()
    {
        locked(&arrivals).entry(number).or_insert(arrived);
    }
    StatusCode::NO_CONTENT
}

impl Bench {
    /// The three webhook measures; `ingest_rate`: the ingest leg's drain of the same run (None:
    /// not measured).
    pub async fn webhooks(&mut self, ingest_rate: Option<f64>) -> anyhow::Result<()> {
        let token = self.api.create_application().await?;
        let target = self.target(token).await?;
        let chat = self.stored_chat(&target.token).await?;
        let receiver = Receiver::start().await?;
        let measured = async {
            let latency_posted = self.webhook_latency(&target, chat, &receiver).await?;
            let fanout_posted = self.stream_fanout(&target.token, chat).await?;
            self.webhook_backlog(
                &target,
                (chat, latency_posted + fanout_posted),
                &receiver,
                ingest_rate,
            )
            .await
        }
        .await;
        receiver.stop().await;
        measured
    }

    /// `POST` paced for `BENCH_WEBHOOK_SECONDS`, each message's delivery timed from its `202`.
    /// Returns the messages posted.
    async fn webhook_latency(
        &mut self,
        target: &Target,
        chat: u64,
        receiver: &Receiver,
    ) -> anyhow::Result<u64> {
        let endpoint = self.register_webhook(&target.token, receiver).await?;
        let (rate, duration) = (self.settings.webhook_rate, self.settings.webhook_phase());
        eprintln!(
            "bench: webhooks: posting {rate} messages a second for {duration:?}, each delivery \
             timed from its 202"
        );
        let accepted: Arrivals = Arrivals::default();
        let url = self.api.url(&format!(
            "/applications/{}/chats/{chat}/messages",
            target.token
        ));
        let (before, started) = (self.processes.sample(), Instant::now());
        let posting = {
            let (api, accepted) = (self.api.clone(), Arc::clone(&accepted));
            load::run(
                Load::paced(PACED_CLIENTS, rate, duration),
                move |sequence| {
                    let (api, url, accepted) = (api.clone(), url.clone(), Arc::clone(&accepted));
                    async move {
                        let created = api
                            .post(&url, Some(json!({"body": api::body(sequence)})))
                            .await?;
                        let at = Instant::now();
                        let number = created["number"].as_u64().context("message number")?;
                        locked(&accepted).insert(number, at);
                        Ok(())
                    }
                },
            )
            .await?
        };
        let posted = posting.completed();
        let delivered = receiver
            .wait_for(usize::try_from(posted)?, DELIVERY_GRACE)
            .await;
        let measured = Measured {
            count: delivered as u64,
            elapsed: started.elapsed(),
            cpu: self.processes.cpu_since(&before),
        };
        self.delete_webhook(&target.token, endpoint).await?;

        let latencies = {
            let arrivals = locked(&receiver.arrivals);
            Latencies::new(
                locked(&accepted)
                    .iter()
                    .filter_map(|(number, accepted_at)| {
                        // A delivery may beat its 202 to the bench: 0, not negative.
                        Some(
                            arrivals
                                .get(number)?
                                .saturating_duration_since(*accepted_at),
                        )
                    })
                    .collect(),
            )
        };
        let p99 = latencies.percentile(0.99);
        eprintln!(
            "bench: webhooks: {delivered} of {posted} delivered, p50 / p99 {}",
            latencies.p50_p99()
        );
        self.report.row(
            format!(
                "webhook `message.created` arrival after its `202`, {rate} msg/s open loop for \
                 {} s, one endpoint: p50 / p99",
                duration.as_secs()
            ),
            latencies.p50_p99(),
            format!(
                "goal p99 ≤ {} s: {}",
                LATENCY_GOAL.as_secs(),
                met(p99 <= LATENCY_GOAL)
            ),
        );
        self.report.row(
            "webhook deliveries arrived of the messages posted",
            format!("{delivered} of {posted}"),
            "",
        );
        self.report.cpu("webhooks, paced", &measured);
        Ok(posted)
    }

    /// `BENCH_WEBHOOK_BACKLOG` more messages into the chat (which holds `earlier`), stored, then
    /// the application's feed replayed from its start to a new endpoint, timed until every
    /// message of the chat arrived.
    async fn webhook_backlog(
        &mut self,
        target: &Target,
        (chat, earlier): (u64, u64),
        receiver: &Receiver,
        ingest_rate: Option<f64>,
    ) -> anyhow::Result<()> {
        let load = Load {
            clients: self.settings.connections,
            max_operations: self.settings.webhook_backlog,
            max_duration: self.settings.max_phase(),
            per_second: None,
        };
        eprintln!(
            "bench: webhooks: posting a backlog of {} messages",
            load.max_operations
        );
        let posted = post_messages(&self.api, &target.token, chat, load).await?;
        let backlog = earlier + posted.completed();
        self.watch(target, chat)
            .wait_until_leg_done(Leg::Storage, backlog, self.settings.max_phase())
            .await?;

        receiver.clear();
        let endpoint = self.register_webhook(&target.token, receiver).await?;
        eprintln!("bench: webhooks: replaying the feed of {backlog} messages from its start");
        let (before, started) = (self.processes.sample(), Instant::now());
        self.api
            .post(
                &self.api.url(&format!(
                    "/applications/{}/webhooks/{endpoint}/replay",
                    target.token
                )),
                Some(json!({"after": null})),
            )
            .await?;
        let delivered = receiver
            .wait_for(usize::try_from(backlog)?, self.settings.max_phase())
            .await;
        let last_arrival = locked(&receiver.arrivals)
            .values()
            .max()
            .copied()
            .unwrap_or(started);
        let measured = Measured {
            count: delivered as u64,
            elapsed: last_arrival - started,
            cpu: self.processes.cpu_since(&before),
        };
        self.delete_webhook(&target.token, endpoint).await?;

        if (delivered as u64) < backlog {
            self.report.note(format!(
                "webhook backlog: {delivered} of {backlog} delivered within {:?}",
                self.settings.max_phase()
            ));
        }
        let against_ingest = match ingest_rate {
            Some(ingest_rate) => format!(
                "{} ({ingest_rate:.0} msg/s); goal ≥ {BACKLOG_GOAL}: {}",
                ratio(measured.rate(), ingest_rate, "ingest leg"),
                met(measured.rate() >= BACKLOG_GOAL * ingest_rate)
            ),
            None => "no ingest leg in this run (embedded stack, or no worker pids)".to_owned(),
        };
        let label = format!(
            "webhook delivery of a backlog of {backlog} (replay from the start of the feed), one \
             endpoint"
        );
        self.report.figure(
            measured.figure(label, "deliveries/s", "webhook backlog"),
            against_ingest,
        );
        Ok(())
    }

    /// The api's CPU per message posted at the webhook phase's pace into `chat`, with no live
    /// stream open, then with [`STREAMS`] open on other chats of the application. Returns the
    /// messages posted.
    async fn stream_fanout(&mut self, token: &str, chat: u64) -> anyhow::Result<u64> {
        let mut streamed_chats = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            streamed_chats.push(self.api.create_chat(token).await?);
        }
        for &streamed in &streamed_chats {
            self.api
                .wait_until_chat_stored(token, streamed, self.settings.max_phase())
                .await?;
        }
        let quiet = self.paced_post(token, chat, "no stream open").await?;
        let mut streams = open_streams(&self.api, token, &streamed_chats).await?;
        let streaming = self
            .paced_post(
                token,
                chat,
                &format!("{STREAMS} streams open on other chats"),
            )
            .await?;
        let mut ended = 0;
        while streams.try_join_next().is_some() {
            ended += 1;
        }
        streams.shutdown().await;
        if ended > 0 {
            self.report.note(format!(
                "stream fanout: {ended} of {STREAMS} streams ended before the load did"
            ));
        }

        let per_message = |measured: &Measured| {
            let cpu = self.processes.cpu_of("api", &measured.cpu)?;
            Some(cpu.as_secs_f64() * 1e6 / measured.count.max(1) as f64)
        };
        match (per_message(&quiet), per_message(&streaming)) {
            (Some(quiet_micros), Some(streaming_micros)) => self.report.row(
                format!(
                    "api CPU per message posted at {} msg/s into one chat: no stream open / \
                     {STREAMS} streams open on other chats of the application",
                    self.settings.webhook_rate
                ),
                format!("{quiet_micros:.0} / {streaming_micros:.0} µs"),
                format!(
                    "{:.2} with streams / without (goal: close to 1)",
                    streaming_micros / quiet_micros
                ),
            ),
            _ => self
                .report
                .note("stream fanout: no api pid in BENCH_PROCESSES, its CPU not measured"),
        }
        self.report.cpu("paced, no stream", &quiet);
        self.report
            .cpu(&format!("paced, {STREAMS} streams elsewhere"), &streaming);
        Ok(quiet.count + streaming.count)
    }

    /// Messages posted into `chat` at the webhook phase's pace, and what every process spent.
    async fn paced_post(&self, token: &str, chat: u64, what: &str) -> anyhow::Result<Measured> {
        let load = Load::paced(
            PACED_CLIENTS,
            self.settings.webhook_rate,
            self.settings.webhook_phase(),
        );
        let what = format!(
            "stream fanout: {what}, posting {} messages a second for {:?}",
            self.settings.webhook_rate, load.max_duration
        );
        let (_, measured) = self
            .measure(&what, post_messages(&self.api, token, chat, load))
            .await?;
        Ok(measured)
    }

    /// An endpoint for `message.created` to the receiver; its id.
    async fn register_webhook(&self, token: &str, receiver: &Receiver) -> anyhow::Result<u64> {
        let created = self
            .api
            .post(
                &self.api.url(&format!("/applications/{token}/webhooks")),
                Some(json!({"url": receiver.url(), "events": ["message.created"]})),
            )
            .await?;
        created["id"].as_u64().context("webhook id")
    }

    async fn delete_webhook(&self, token: &str, endpoint: u64) -> anyhow::Result<()> {
        let url = self
            .api
            .url(&format!("/applications/{token}/webhooks/{endpoint}"));
        let status = self.api.http().delete(&url).send().await?.status();
        ensure!(status.is_success(), "{url} answered {status}");
        Ok(())
    }
}

/// Live streams of `chats`, each drained by a task of its own until the set is shut down.
async fn open_streams(api: &Api, token: &str, chats: &[u64]) -> anyhow::Result<JoinSet<()>> {
    let mut streams = JoinSet::new();
    for chat in chats {
        let url = api.url(&format!(
            "/applications/{token}/chats/{chat}/messages/stream"
        ));
        let mut response = api.http().get(&url).send().await?;
        ensure!(
            response.status().is_success(),
            "{url} answered {}",
            response.status()
        );
        streams.spawn(async move { while let Ok(Some(_)) = response.chunk().await {} });
    }
    Ok(streams)
}
