//! The floor of a `POST`'s own work: a minimal HTTP server doing only what accepting a message
//! must (HTTP/1.1 with hyper, the JSON body parsed, one Redis `INCR` for its number, the created
//! event published with the api's own confirmed publishing: `chatcore`'s RabbitMQ publisher, its
//! envelopes, confirms and routing into an ingest and an index queue), answering `202` with the
//! number. No routing, authentication, rate limits, idempotency, spans or metrics: what the api
//! adds to that is what its rate is read against.
//!
//! It runs as a process of its own (`bench post-floor`, started by the bench), so that its CPU is
//! a row of the table and its runtime has the cores the api's has. Its events go to a topology of
//! their own ([`FLOOR_PREFIX`]) that no worker consumes, deleted afterwards ([`delete_topology`]).

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::Context as _;
use chatcore::Config;
use chatcore::config::Topology;
use chatcore::domain::Number;
use chatcore::events::{Event, EventPayload, TraceContext};
use chatcore::queue::{EventQueue as _, RabbitMqQueue};
use chatcore::state::RedisConnection;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use serde::Deserialize;
use tokio::net::TcpListener;

use super::amqp_connect;

/// The AMQP names of the floor's exchanges and queues (`<prefix>.events`, `<prefix>.ingest`, ...).
const FLOOR_PREFIX: &str = "bench-post-floor";
/// The application and chat of the floor's events (nothing stores them).
const FLOOR_APPLICATION: u64 = 0;

/// A `POST` message's body, as far as the floor reads it.
#[derive(Deserialize)]
struct NewMessage {
    body: String,
}

struct Floor {
    redis: RedisConnection,
    queue: RabbitMqQueue,
    counter_key: String,
    chat_number: Number,
}

/// The topology of the floor's events: the stack's queue type, names of its own.
fn floor_topology(config: &Config) -> Topology {
    Topology {
        queue_type: config.topology.queue_type,
        ..Topology::from_prefix(FLOOR_PREFIX)
    }
}

/// The Redis key the floor's numbers come from.
fn counter_key(config: &Config) -> String {
    format!("{}:bench:post-floor", config.redis_key_prefix)
}

/// Serves the floor on a free loopback port until killed; prints `listening <address>` on stdout
/// once it accepts.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let redis = chatcore::state::connect_redis(config.require_redis_url()?).await?;
    let queue = RabbitMqQueue::new(
        config.require_amqp_url()?.clone(),
        floor_topology(&config),
        config.api.publish_confirm_timeout,
        config.connect_timeout,
        None,
        config.largest_event_bytes(),
    );
    queue.ensure_topology().await?;
    let floor = Arc::new(Floor {
        redis,
        queue,
        counter_key: counter_key(&config),
        chat_number: Number::new(1).context("chat number")?,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    // The bench holds the other end of stdin: when it ends, killed or not, so does the floor.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    loop {
        let (stream, _) = listener.accept().await?;
        // As the api's server: answers go out at once.
        stream.set_nodelay(true)?;
        let floor = Arc::clone(&floor);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let floor = Arc::clone(&floor);
                async move { Ok::<_, Infallible>(floor.accept(request).await) }
            });
            // A connection closed by the client mid-request is its business.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Floor {
    async fn accept(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.accept_message(request).await {
            Ok(number) => answer(StatusCode::ACCEPTED, format!("{{\"number\":{number}}}")),
            Err(error) => answer(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{{\"error\":{:?}}}", format!("{error:#}")),
            ),
        }
    }

    /// The body parsed, a number taken, the event published and confirmed: its number.
    async fn accept_message(&self, request: Request<Incoming>) -> anyhow::Result<u64> {
        let bytes = request.into_body().collect().await?.to_bytes();
        let message: NewMessage = serde_json::from_slice(&bytes)?;
        let number: u64 = redis::cmd("INCR")
            .arg(&self.counter_key)
            .query_async(&mut self.redis.clone())
            .await?;
        let event = Event::new(EventPayload::MessageCreated {
            application_id: FLOOR_APPLICATION,
            chat_number: self.chat_number,
            message_number: Number::new(number).context("message number")?,
            body: message.body,
            created_at: chatcore::store::now(),
            sender: None,
            metadata: None,
        });
        self.queue
            .publish(&event, &TraceContext::child_of(None))
            .await?;
        Ok(number)
    }
}

fn answer(status: StatusCode, json: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Deletes the floor's queues, their dead-letter queues, its exchanges and its counter.
pub async fn delete_topology(config: &Config) -> anyhow::Result<()> {
    let topology = floor_topology(config);
    let connection = amqp_connect(config).await?;
    let channel = connection.create_channel().await?;
    for queue in [&topology.ingest_queue, &topology.index_queue] {
        for name in [queue.clone(), Topology::dead_letter_queue(queue)] {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
    }
    for exchange in [
        &topology.exchange,
        &topology.dead_letter_exchange,
        &topology.changes_exchange,
    ] {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    connection.close(200, "done".into()).await?;
    let mut redis = chatcore::state::connect_redis(config.require_redis_url()?).await?;
    let _: () = redis::cmd("DEL")
        .arg(counter_key(config))
        .query_async(&mut redis)
        .await?;
    Ok(())
}
