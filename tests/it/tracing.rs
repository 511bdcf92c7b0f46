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
use system_tests::{Client, StatusCode, TestEnv, eventually};

#[derive(Clone, Debug)]
struct Received {
    service: String,
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
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
                .map(|value| match value {
                    AnyValue::StringValue(name) => name.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test]
async fn one_post_is_one_trace_across_the_three_services() -> anyhow::Result<()> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = listener.local_addr()?;
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream_of(listener));
    tokio::spawn(server);

    let mut env = TestEnv::new().await?;
    env.set("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{receiver}"));
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
    eventually("the api answers", Duration::from_secs(30), || async {
        Ok(client
            .get("/applications")
            .await
            .is_ok_and(|reply| reply.status == StatusCode::OK))
    })
    .await?;
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

    // The caller's trace is continued: its trace id is the one to follow.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let reply = client
        .send_raw(
            client
                .request(
                    reqwest::Method::POST,
                    &format!("/applications/{token}/chats/{chat}/messages"),
                )
                .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
                .json(&json!({"body": "follow me"})),
        )
        .await?;
    assert_eq!(reply.status, StatusCode::ACCEPTED);

    let spans_of_trace = || -> Vec<Received> {
        collector
            .0
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|received| hex(&received.span.trace_id) == trace_id)
            .cloned()
            .collect()
    };
    eventually(
        "spans of all three services arrive",
        Duration::from_secs(60),
        || async {
            let spans = spans_of_trace();
            let has = |service: &str, name: &str| {
                spans
                    .iter()
                    .any(|r| r.service == service && r.span.name == name)
            };
            Ok(has("api", "amqp publish")
                && has("ingest-worker", "ingest batch write")
                && has("indexer", "index batch write"))
        },
    )
    .await?;
    let spans = spans_of_trace();
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|r| r.service == service && r.span.name == name)
            .map(|r| r.span.clone())
            .unwrap_or_else(|| panic!("no {name} span from {service}: {spans:#?}"))
    };
    let http = find(
        "api",
        "POST /api/v1/applications/{token}/chats/{chat_number}/messages",
    );
    assert_eq!(
        hex(&http.parent_span_id),
        caller_span,
        "the server span continues the caller's"
    );
    let allocate = find("api", "allocate number");
    assert_eq!(allocate.parent_span_id, http.span_id);
    let publish = find("api", "amqp publish");
    assert_eq!(publish.parent_span_id, http.span_id);
    for (service, batch_name) in [
        ("ingest-worker", "ingest batch write"),
        ("indexer", "index batch write"),
    ] {
        let consume = spans
            .iter()
            .find(|r| {
                r.service == service
                    && r.span.name == "consume event"
                    && r.span.parent_span_id == publish.span_id
            })
            .map(|r| r.span.clone())
            .unwrap_or_else(|| panic!("no consume span of {service} under the publish span"));
        let batch = find(service, batch_name);
        assert_eq!(
            batch.parent_span_id, consume.span_id,
            "{service}: the batch runs in the trace of its first event"
        );
        assert!(
            batch
                .links
                .iter()
                .any(|link| link.span_id == consume.span_id && link.trace_id == consume.trace_id),
            "{service}: the batch span links to the event span"
        );
    }
    // The worker's JSON log line of that batch carries the trace and span ids of the event.
    let logs = std::fs::read_to_string(&ingest_log_path)?;
    let line = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "batch written" && line.to_string().contains(trace_id))
        .unwrap_or_else(|| panic!("no log line of the batch with trace id {trace_id}:\n{logs}"));
    let event_span = line["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|span| span["name"] == "consume event"))
        .expect("the line lists the event span");
    assert_eq!(event_span["trace_id"], trace_id);
    assert_eq!(event_span["span_id"].as_str().map(str::len), Some(16));
    for child in [&mut api, &mut ingest, &mut indexer] {
        child.kill().await?;
    }
    std::fs::remove_file(&ingest_log_path)?;
    Ok(())
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
