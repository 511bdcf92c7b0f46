//! One POST is one trace across api, ingest-worker and indexer: the three run as processes that
//! export OTLP (over gRPC, or HTTP with protobuf) to a receiver started here, which decodes the
//! real protobuf.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatcore::domain::Number;
use chatcore::events::{Event, EventPayload, TraceContext};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use system_tests::webhook_receiver::{Mode, WebhookReceiver};
use system_tests::{Client, StatusCode, TestEnv, eventually, free_port};

#[derive(Clone, Debug)]
struct Received {
    service: String,
    /// The resource's attributes that are strings.
    resource: Vec<(String, String)>,
    span: Span,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.collect(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// OTLP/HTTP's traces path: the protobuf body is the gRPC service's request message.
async fn export_over_http(
    axum::extract::State(collector): axum::extract::State<Collector>,
    body: axum::body::Bytes,
) -> Result<([(&'static str, &'static str); 1], Vec<u8>), StatusCode> {
    let request = ExportTraceServiceRequest::decode(body).map_err(|_| StatusCode::BAD_REQUEST)?;
    collector.collect(request);
    Ok((
        [("content-type", "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    ))
}

impl Collector {
    /// Keeps the spans of one export, whichever transport brought it.
    fn collect(&self, request: ExportTraceServiceRequest) {
        let mut received = self.0.lock().expect("collector lock");
        for resource_spans in request.resource_spans {
            let resource: Vec<(String, String)> = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .filter_map(
                    |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                        AnyValue::StringValue(value) => {
                            Some((attribute.key.clone(), value.clone()))
                        }
                        _ => None,
                    },
                )
                .collect();
            let service = resource
                .iter()
                .find(|(key, _)| key == "service.name")
                .map(|(_, name)| name.clone())
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(Received {
                        service: service.clone(),
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
    }

    fn all(&self) -> Vec<Received> {
        self.0.lock().expect("collector lock").clone()
    }

    fn spans_of_trace(&self, trace_id: &str) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|received| hex(&received.span.trace_id) == trace_id)
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// OTLP's transports, as `OTEL_EXPORTER_OTLP_PROTOCOL` names them.
#[derive(Clone, Copy, Debug)]
enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Starts an OTLP receiver of `protocol` on a free port; returns what it receives and its base
/// endpoint (over HTTP the exporter adds `/v1/traces`, the only path served).
async fn start_collector_over(protocol: Protocol) -> anyhow::Result<(Collector, String)> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = listener.local_addr()?;
    match protocol {
        Protocol::Grpc => {
            let server = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream_of(listener));
            tokio::spawn(server);
        }
        Protocol::HttpProtobuf => {
            let app = axum::Router::new()
                .route("/v1/traces", axum::routing::post(export_over_http))
                .with_state(collector.clone());
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
    }
    Ok((collector, format!("http://{receiver}")))
}

/// Starts an OTLP/gRPC receiver (the default protocol).
async fn start_collector() -> anyhow::Result<(Collector, String)> {
    start_collector_over(Protocol::Grpc).await
}

/// The caller's trace, continued by the api: its trace id is the one to follow.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Waits until the api process answers.
async fn wait_until_answering(client: &Client) -> anyhow::Result<()> {
    eventually("the api answers", Duration::from_secs(30), || async {
        Ok(client
            .get_as_admin("/applications")
            .await
            .is_ok_and(|reply| reply.status == StatusCode::OK))
    })
    .await
}

/// Starts the api as a process of `env` exporting to the collector at `endpoint`, with `settings`
/// besides; returns it and a client of it.
fn spawn_traced_api(
    env: &mut TestEnv,
    endpoint: &str,
    settings: &[(&str, &str)],
) -> anyhow::Result<(tokio::process::Child, Client)> {
    env.set("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    env.set("OTEL_BSP_SCHEDULE_DELAY", "100");
    for (name, value) in settings {
        env.set(name, value);
    }
    let api_port = free_port()?;
    env.set("CHAT_HTTP_ADDR", &format!("127.0.0.1:{api_port}"));
    let api = env.spawn_process("api")?;
    Ok((
        api,
        Client::new(&format!("http://127.0.0.1:{api_port}/api/v1")),
    ))
}

/// Creates an application and a chat, waits until the chat is stored, and posts one message with
/// the caller's traceparent.
async fn post_traced_message(client: &Client) -> anyhow::Result<()> {
    wait_until_answering(client).await?;
    let token = client.create_application("traced").await?;
    let chat = client.create_chat(&token).await?;
    eventually("the chat is persisted", Duration::from_secs(30), || async {
        Ok(client
            .get(&format!("/applications/{token}/chats/{chat}"))
            .await?
            .status
            == StatusCode::OK)
    })
    .await?;
    let reply = client
        .send_raw(
            client
                .request(
                    reqwest::Method::POST,
                    &format!("/applications/{token}/chats/{chat}/messages"),
                )
                .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
                .json(&json!({"body": "follow me"})),
        )
        .await?;
    anyhow::ensure!(reply.status == StatusCode::ACCEPTED, "{reply:?}");
    Ok(())
}

/// The shape of the trace: the server span continues the caller's, allocation and publish are
/// its children, and for each consumer a consume span under the publish span has the batch span
/// under it, and the batch span links to it.
fn assert_one_trace(spans: &[Received], consumers: [(&str, &str); 2]) {
    let find = |name: &str| {
        spans
            .iter()
            .find(|r| r.service == "api" && r.span.name == name)
            .map(|r| r.span.clone())
            .unwrap_or_else(|| panic!("no {name} span from the api: {spans:#?}"))
    };
    let http = find("POST /api/v1/chats/{chat_number}/messages");
    assert_eq!(
        hex(&http.parent_span_id),
        CALLER_SPAN,
        "the server span continues the caller's"
    );
    assert_eq!(find("allocate number").parent_span_id, http.span_id);
    let publish = find("queue publish");
    assert_eq!(publish.parent_span_id, http.span_id);
    for (service, batch_name) in consumers {
        let batch_under = |consume: &Span| {
            spans.iter().find(|r| {
                r.service == service
                    && r.span.name == batch_name
                    && r.span.parent_span_id == consume.span_id
            })
        };
        let (consume, batch) = spans
            .iter()
            .filter(|r| {
                r.service == service
                    && r.span.name == "consume event"
                    && r.span.parent_span_id == publish.span_id
            })
            .find_map(|r| batch_under(&r.span).map(|batch| (r.span.clone(), batch.span.clone())))
            .unwrap_or_else(|| {
                panic!("{service}: no consume span under the publish span with a {batch_name} span under it")
            });
        assert!(
            batch
                .links
                .iter()
                .any(|link| link.span_id == consume.span_id && link.trace_id == consume.trace_id),
            "{service}: the batch span links to the event span"
        );
    }
}

#[tokio::test]
async fn one_post_is_one_trace_across_the_three_services() -> anyhow::Result<()> {
    let (collector, endpoint) = start_collector().await?;
    let mut env = TestEnv::new().await?;
    env.set("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    env.set("OTEL_BSP_SCHEDULE_DELAY", "100");
    env.set("RUST_LOG", "warn");
    let api_port = free_port()?;
    env.set("CHAT_HTTP_ADDR", &format!("127.0.0.1:{api_port}"));
    let mut api = env.spawn_process("api")?;
    env.set("CHAT_HEALTH_ADDR", "127.0.0.1:0");
    let ingest_log_path = std::env::temp_dir().join(format!("{}-ingest-worker.log", env.id));
    env.set("RUST_LOG", "chatcore=debug,warn");
    let mut ingest =
        env.spawn_process_logging_to("ingest-worker", std::fs::File::create(&ingest_log_path)?)?;
    env.set("RUST_LOG", "warn");
    let mut indexer = env.spawn_process("indexer")?;
    let client = Client::new(&format!("http://127.0.0.1:{api_port}/api/v1"));
    post_traced_message(&client).await?;
    eventually(
        "spans of all three services arrive",
        Duration::from_secs(60),
        || async {
            let spans = collector.spans_of_trace(TRACE_ID);
            let has = |service: &str, name: &str| {
                spans
                    .iter()
                    .any(|r| r.service == service && r.span.name == name)
            };
            Ok(has("api", "queue publish")
                && has("ingest-worker", "ingest batch write")
                && has("indexer", "index batch write"))
        },
    )
    .await?;
    assert_one_trace(
        &collector.spans_of_trace(TRACE_ID),
        [
            ("ingest-worker", "ingest batch write"),
            ("indexer", "index batch write"),
        ],
    );
    // The worker's JSON log line of that batch carries the trace and span ids of the event.
    let logs = std::fs::read_to_string(&ingest_log_path)?;
    let line = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "batch written" && line.to_string().contains(TRACE_ID))
        .unwrap_or_else(|| panic!("no log line of the batch with trace id {TRACE_ID}:\n{logs}"));
    let event_span = line["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|span| span["name"] == "consume event"))
        .expect("the line lists the event span");
    assert_eq!(event_span["trace_id"], TRACE_ID);
    assert_eq!(event_span["span_id"].as_str().map(str::len), Some(16));
    for child in [&mut api, &mut ingest, &mut indexer] {
        child.kill().await?;
    }
    std::fs::remove_file(&ingest_log_path)?;
    Ok(())
}

/// The embedded process (api with the consumers inside) exporting over `protocol`.
async fn one_post_is_one_trace_in_the_embedded_process_over(
    protocol: Protocol,
) -> anyhow::Result<()> {
    let (collector, endpoint) = start_collector_over(protocol).await?;
    let mut env = TestEnv::embedded().await?;
    let settings = [("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.name())];
    let (mut api, client) = spawn_traced_api(&mut env, &endpoint, &settings)?;
    post_traced_message(&client).await?;
    eventually(
        "the spans of both consumers arrive",
        Duration::from_secs(60),
        || async {
            let spans = collector.spans_of_trace(TRACE_ID);
            Ok(["queue publish", "ingest batch write", "index batch write"]
                .iter()
                .all(|name| spans.iter().any(|r| r.span.name == *name)))
        },
    )
    .await?;
    assert_one_trace(
        &collector.spans_of_trace(TRACE_ID),
        [("api", "ingest batch write"), ("api", "index batch write")],
    );
    api.kill().await?;
    Ok(())
}

#[tokio::test]
async fn one_post_is_one_trace_in_the_embedded_process() -> anyhow::Result<()> {
    one_post_is_one_trace_in_the_embedded_process_over(Protocol::Grpc).await
}

/// OTLP/HTTP with protobuf, to the base endpoint's `/v1/traces`: the same trace arrives.
#[tokio::test]
async fn one_post_is_one_trace_over_otlp_http() -> anyhow::Result<()> {
    one_post_is_one_trace_in_the_embedded_process_over(Protocol::HttpProtobuf).await
}

/// `OTEL_TRACES_SAMPLER`/`_ARG` decide what is recorded, not whether requests are answered: the
/// api is stopped (SIGTERM, which flushes its spans) before the collector is looked at. Not
/// parent-based, so the caller's sampled flag does not count.
#[tokio::test]
async fn the_sampler_of_the_environment_decides_what_is_exported() -> anyhow::Result<()> {
    for (sampler, ratio, exported) in [
        ("always_off", "1", false),
        ("traceidratio", "0", false),
        ("traceidratio", "1", true),
    ] {
        let (collector, endpoint) = start_collector().await?;
        let mut env = TestEnv::embedded().await?;
        let settings = [
            ("OTEL_TRACES_SAMPLER", sampler),
            ("OTEL_TRACES_SAMPLER_ARG", ratio),
        ];
        let (mut api, client) = spawn_traced_api(&mut env, &endpoint, &settings)?;
        post_traced_message(&client).await?;
        let status = super::pipeline::terminate(&mut api).await?;
        assert!(status.success(), "{sampler} {ratio}: exit {status}");
        let spans = collector.all();
        if exported {
            assert!(
                spans.iter().any(|r| r.span.name == "queue publish"),
                "{sampler} {ratio}: the request's spans are exported: {spans:#?}"
            );
        } else {
            assert!(spans.is_empty(), "{sampler} {ratio}: {spans:#?}");
        }
    }
    Ok(())
}

/// Events the ingest-worker dead-letters have consumer spans with status error: one that does not
/// decode (`error.type` `undecodable`) and one that can never be written (an application that
/// does not exist: `permanent`), each in the trace it was published with.
#[tokio::test]
async fn a_dead_lettered_events_consumer_span_has_status_error() -> anyhow::Result<()> {
    let (collector, endpoint) = start_collector().await?;
    let mut env = TestEnv::new().await?;
    env.set("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    env.set("OTEL_BSP_SCHEDULE_DELAY", "100");
    env.set("RUST_LOG", "warn");
    env.set("CHAT_HEALTH_ADDR", "127.0.0.1:0");
    let mut ingest = env.spawn_process("ingest-worker")?;
    let orphan = Event::new(EventPayload::MessageCreated {
        application_id: 987_654,
        chat_number: Number::new(1).expect("positive"),
        message_number: Number::new(1).expect("positive"),
        body: "orphan".into(),
        created_at: chatcore::store::now(),
        sender: None,
        metadata: None,
    });
    let undecodable = TraceContext::child_of(None);
    let keeps_failing = TraceContext::child_of(None);
    let channel = env.amqp_connection().await?.create_channel().await?;
    let exchange = env.config().topology.exchange;
    for (data, trace) in [
        (b"{not json".to_vec(), &undecodable),
        (orphan.encode(), &keeps_failing),
    ] {
        channel
            .basic_publish(
                exchange.as_str().into(),
                "message.created".into(),
                lapin::options::BasicPublishOptions::default(),
                &data,
                chatcore::queue::event_properties(&orphan, trace),
            )
            .await?
            .await?;
    }
    let consume_span = |trace: &TraceContext| {
        collector
            .spans_of_trace(trace.trace_id())
            .into_iter()
            .find(|r| r.service == "ingest-worker" && r.span.name == "consume event")
            .map(|r| r.span)
    };
    eventually(
        "the consumer spans of both events arrive",
        Duration::from_secs(60),
        || async {
            Ok(consume_span(&undecodable).is_some() && consume_span(&keeps_failing).is_some())
        },
    )
    .await?;
    for (trace, error_type) in [(&undecodable, "undecodable"), (&keeps_failing, "permanent")] {
        let span = consume_span(trace).expect("arrived");
        assert_eq!(
            span.status.as_ref().map(|status| status.code),
            Some(2),
            "status error: {span:?}"
        );
        assert_eq!(attribute(&span, "error.type").as_deref(), Some(error_type));
        assert_eq!(hex(&span.parent_span_id), trace.span_id(), "{error_type}");
    }
    ingest.kill().await?;
    Ok(())
}

/// The service name and resource attributes a platform team's collector expects
/// (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) are the ones the spans carry; the binary's own
/// name is only the default.
#[tokio::test]
async fn the_platforms_service_name_and_resource_attributes_are_kept() -> anyhow::Result<()> {
    let (collector, endpoint) = start_collector().await?;
    let mut env = TestEnv::embedded().await?;
    let platform = [
        ("OTEL_SERVICE_NAME", "chat-edge"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=ci,team=platform",
        ),
    ];
    let (mut api, client) = spawn_traced_api(&mut env, &endpoint, &platform)?;
    post_traced_message(&client).await?;
    eventually(
        "the request's spans arrive",
        Duration::from_secs(60),
        || async { Ok(!collector.spans_of_trace(TRACE_ID).is_empty()) },
    )
    .await?;
    for received in collector.spans_of_trace(TRACE_ID) {
        assert_eq!(received.service, "chat-edge", "{:?}", received.span.name);
        for attribute in [("deployment.environment.name", "ci"), ("team", "platform")] {
            assert!(
                received
                    .resource
                    .iter()
                    .any(|(key, value)| (key.as_str(), value.as_str()) == attribute),
                "{attribute:?} in {:?}",
                received.resource
            );
        }
    }
    api.kill().await?;
    Ok(())
}

/// A `5xx` answer's server span has status error and `error.type` (the status), a `4xx`'s does
/// not; both carry `server.address` (semantic conventions). The 503: a search while the search
/// index cannot be reached.
#[tokio::test]
async fn a_5xx_server_span_has_status_error() -> anyhow::Result<()> {
    let (collector, endpoint) = start_collector().await?;
    let mut env = TestEnv::new().await?;
    let unreachable = format!("http://127.0.0.1:{}", free_port()?);
    let settings = [
        ("RUST_LOG", "warn"),
        ("ELASTICSEARCH_URL", unreachable.as_str()),
    ];
    let (mut api, client) = spawn_traced_api(&mut env, &endpoint, &settings)?;
    wait_until_answering(&client).await?;
    let token = client.create_application("traced errors").await?;
    let chat = client.create_chat(&token).await?;
    let search = client
        .send_raw(
            client
                .request(
                    reqwest::Method::GET,
                    &format!("/chats/{chat}/messages/search?query=hello"),
                )
                .bearer_auth(&token)
                .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01")),
        )
        .await?;
    assert_eq!(search.status, StatusCode::SERVICE_UNAVAILABLE, "{search:?}");
    let missing = client
        .send_raw(
            client
                .request(reqwest::Method::GET, "/chats/999")
                .bearer_auth(&token)
                .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01")),
        )
        .await?;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{missing:?}");
    let server_span = |route: &str| {
        collector
            .spans_of_trace(TRACE_ID)
            .into_iter()
            .find(|received| received.span.name == format!("GET {route}"))
    };
    eventually(
        "both server spans arrive",
        Duration::from_secs(60),
        || async {
            Ok(
                server_span("/api/v1/chats/{chat_number}/messages/search").is_some()
                    && server_span("/api/v1/chats/{number}").is_some(),
            )
        },
    )
    .await?;
    let failed = server_span("/api/v1/chats/{chat_number}/messages/search")
        .expect("arrived")
        .span;
    let refused = server_span("/api/v1/chats/{number}").expect("arrived").span;
    assert_eq!(
        failed.status.as_ref().map(|status| status.code),
        Some(2),
        "status error: {failed:?}"
    );
    assert_eq!(attribute(&failed, "error.type").as_deref(), Some("503"));
    assert_ne!(
        refused.status.as_ref().map(|status| status.code),
        Some(2),
        "a 404 is not the server's error"
    );
    for span in [&failed, &refused] {
        assert_eq!(
            attribute(span, "server.address").as_deref(),
            Some("127.0.0.1")
        );
    }
    api.kill().await?;
    Ok(())
}

/// A webhook delivery attempt is an HTTP client span; one the endpoint answers `500` has status
/// error with the status as `error.type` (the embedded process runs the dispatcher).
#[tokio::test]
async fn a_failed_webhook_attempts_span_has_status_error() -> anyhow::Result<()> {
    let (collector, endpoint) = start_collector().await?;
    let receiver = WebhookReceiver::start().await?;
    let mut env = TestEnv::embedded().await?;
    let (mut api, client) = spawn_traced_api(&mut env, &endpoint, &[])?;
    wait_until_answering(&client).await?;
    let token = client.create_application("traced webhooks").await?;
    let chat = client.create_chat(&token).await?;
    let created = client
        .post(
            &format!("/applications/{token}/webhooks"),
            json!({"url": receiver.url("failing")}),
        )
        .await?;
    anyhow::ensure!(created.status == StatusCode::CREATED, "{created:?}");
    let secret = created.body["secret"].as_str().unwrap_or_default();
    receiver.configure("failing", &[secret], Mode::Fail).await?;
    client.create_message(&token, chat, "undeliverable").await?;
    let failed_attempt = || {
        collector.all().into_iter().map(|r| r.span).find(|span| {
            span.name == "POST"
                && attribute(span, "http.response.status_code").as_deref() == Some("500")
        })
    };
    eventually(
        "a failed attempt's span arrives",
        Duration::from_secs(60),
        || async { Ok(failed_attempt().is_some()) },
    )
    .await?;
    let span = failed_attempt().expect("arrived");
    assert_eq!(
        span.status.as_ref().map(|status| status.code),
        Some(2),
        "status error: {span:?}"
    );
    assert_eq!(attribute(&span, "error.type").as_deref(), Some("500"));
    assert_eq!(
        attribute(&span, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    api.kill().await?;
    Ok(())
}

/// A string (or integer) attribute of a span.
fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(
            |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(value) => Some(value.clone()),
                AnyValue::IntValue(value) => Some(value.to_string()),
                _ => None,
            },
        )
}

/// A listener as the incoming-connection stream tonic serves.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}
