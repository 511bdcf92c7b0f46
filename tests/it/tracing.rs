//! One POST is one trace across api, ingest-worker and indexer: the three run as processes that
//! export OTLP/gRPC to a receiver started here, which decodes the real protobuf.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
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
        let mut received = self.0.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
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
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Starts an OTLP/gRPC receiver on a free port; returns what it receives and its endpoint.
async fn start_collector() -> anyhow::Result<(Collector, String)> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = listener.local_addr()?;
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream_of(listener));
    tokio::spawn(server);
    Ok((collector, format!("http://{receiver}")))
}

impl Collector {
    fn spans_of_trace(&self, trace_id: &str) -> Vec<Received> {
        self.0
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|received| hex(&received.span.trace_id) == trace_id)
            .cloned()
            .collect()
    }
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

#[tokio::test]
async fn one_post_is_one_trace_in_the_embedded_process() -> anyhow::Result<()> {
    let (collector, endpoint) = start_collector().await?;
    let mut env = TestEnv::embedded().await?;
    let (mut api, client) = spawn_traced_api(&mut env, &endpoint, &[])?;
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
