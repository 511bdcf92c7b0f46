//! Logging and tracing of every binary.
//!
//! - Logs: JSON lines on stdout, level from `RUST_LOG` (default `info`), lowercase messages; the
//!   spans of a request or a batch carry `trace_id` and `span_id`, so every log line inside them does.
//! - Traces: exported over OTLP (gRPC or HTTP/protobuf, [`crate::config::TraceExport`]) when an
//!   endpoint is set (off, and free, otherwise), with `service.name` set per binary unless the
//!   platform names it. The W3C trace context travels in AMQP headers ([`inject`] /
//!   [`set_remote_parent`]), so one POST is one trace across api, ingest-worker and indexer.

mod span_fields;

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::settings::LOG_FILTER;
use crate::config::{OtlpProtocol, TraceExport};
use crate::events::TraceContext;

/// Flushes buffered spans when dropped; keep it alive for the life of `main`.
#[must_use = "traces are flushed when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {error}");
        }
    }
}

/// Installs logging, and tracing when `export` is set ([`crate::Config::trace_export`]), once;
/// later calls are no-ops.
pub fn init(service_name: &'static str, export: Option<&TraceExport>) -> TelemetryGuard {
    let default_filter = LOG_FILTER.default_value().unwrap_or_default();
    let filter =
        EnvFilter::try_from_env(LOG_FILTER.name).unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .flatten_event(true)
        .fmt_fields(span_fields::SpanFieldsJson)
        .with_filter(filter);
    let provider = export.and_then(|export| match tracer_provider(service_name, export) {
        Ok(provider) => Some(provider),
        Err(error) => {
            eprintln!("tracing disabled: {error:#}");
            None
        }
    });
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name))
            .with_filter(EnvFilter::new(default_filter))
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if !installed {
        return TelemetryGuard { provider: None };
    }
    tracing::info!(
        service = service_name,
        version = env!("CARGO_PKG_VERSION"),
        tracing = provider.is_some(),
        otlp_protocol = export.map(|export| export.protocol.to_string()),
        "starting"
    );
    TelemetryGuard { provider }
}

fn tracer_provider(
    service_name: &'static str,
    export: &TraceExport,
) -> anyhow::Result<SdkTracerProvider> {
    // Headers come from the standard OTEL_EXPORTER_OTLP_(TRACES_)HEADERS variables, read by the
    // exporter; endpoint, protocol and timeout were resolved by the configuration.
    let exporter = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match export.protocol {
        OtlpProtocol::Grpc => exporter
            .with_tonic()
            .with_endpoint(&export.endpoint)
            .with_timeout(export.timeout)
            .build()?,
        OtlpProtocol::HttpProtobuf => exporter
            .with_http()
            .with_http_client(OtlpHttpClient {
                client: reqwest::Client::builder().timeout(export.timeout).build()?,
                runtime: tokio::runtime::Handle::try_current()?,
            })
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(&export.endpoint)
            .with_timeout(export.timeout)
            .build()?,
    };
    // The SDK's builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES: a name the platform
    // gives stays, and the binary names itself only when none is given.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !service_named_by_environment() {
        resource = resource.with_service_name(service_name);
    }
    let resource = resource.build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(export.sampler.clone())
        .with_resource(resource)
        .build())
}

/// OTLP/HTTP's client: the workspace's reqwest (the exporter's own `reqwest-client` feature
/// would build a second reqwest major version). The batch processor exports from a thread of its
/// own, outside the Tokio runtime reqwest's I/O needs, so each request runs on the runtime the
/// provider was built in (as tonic's channel does for gRPC).
#[derive(Debug)]
struct OtlpHttpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let request: reqwest::Request = request.try_into()?;
        let client = self.client.clone();
        let exported = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let mut answer = opentelemetry_http::Response::builder().status(response.status());
            if let Some(headers) = answer.headers_mut() {
                // Retry-After of a throttling collector is read from here.
                *headers = response.headers().clone();
            }
            let answer: Result<_, opentelemetry_http::HttpError> =
                Ok(answer.body(response.bytes().await?)?);
            answer
        });
        exported.await?
    }
}

/// Whether OTEL_SERVICE_NAME, or a `service.name` in OTEL_RESOURCE_ATTRIBUTES, names the service.
fn service_named_by_environment() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|value| !value.trim().is_empty())
    };
    set("OTEL_SERVICE_NAME").is_some()
        || set("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| {
            attributes
                .split(',')
                .any(|pair| pair.trim_start().starts_with("service.name="))
        })
}

struct HeaderMap<'a>(&'a mut HashMap<String, String>);

impl Injector for HeaderMap<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Headers<'a>(&'a HashMap<String, String>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The trace context to put on an outgoing event: the current span's when tracing is on, else
/// `fallback` (a context continued from the caller or started locally), so every event has one.
pub fn inject(span: &tracing::Span, fallback: TraceContext) -> TraceContext {
    let mut headers = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderMap(&mut headers));
    headers
        .get(crate::events::TRACEPARENT_HEADER)
        .and_then(|value| TraceContext::parse(value))
        .unwrap_or(fallback)
}

/// Makes `span` a child of the remote context in `traceparent` (no-op without tracing).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    let mut headers = HashMap::new();
    headers.insert(
        crate::events::TRACEPARENT_HEADER.to_owned(),
        traceparent.to_owned(),
    );
    let parent = TraceContextPropagator::new().extract(&Headers(&headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to the span of each context (a batch span to the messages it carries).
pub fn add_links<'a>(span: &tracing::Span, contexts: impl IntoIterator<Item = &'a tracing::Span>) {
    for context in contexts {
        span.add_link(context.context().span().span_context().clone());
    }
}

/// Marks `span` failed: OpenTelemetry's status error, with `error_type` (a low-cardinality reason:
/// a status code, `permanent`, `undecodable`) as `error.type`. The span must declare both fields
/// (`otel.status_code` and `error.r#type`, empty).
pub fn record_error(span: &tracing::Span, error_type: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", error_type);
}

/// Records the OpenTelemetry ids of `span` (or of `fallback` without tracing) as its
/// `trace_id`/`span_id` fields, which every log line inside the span then carries.
pub fn record_ids(span: &tracing::Span, fallback: &TraceContext) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
        span.record("span_id", span_context.span_id().to_string());
    } else {
        span.record("trace_id", fallback.trace_id());
        span.record("span_id", fallback.span_id());
    }
}
