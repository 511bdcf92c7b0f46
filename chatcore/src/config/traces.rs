//! Where and which traces are exported, from OpenTelemetry's own variables
//! (`OTEL_EXPORTER_OTLP_*`, `OTEL_TRACES_SAMPLER*`). They are read here rather than left to the
//! SDK so that a mistyped value stops the start instead of silently falling back to a default.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use opentelemetry_sdk::trace::Sampler;

use super::reader::{ConfigError, Reader};
use super::settings::{
    OTLP_ENDPOINT, OTLP_PROTOCOL, OTLP_TIMEOUT_MS, OTLP_TRACES_ENDPOINT, TRACES_SAMPLER,
    TRACES_SAMPLER_ARG,
};

/// How spans leave the process: set when an OTLP endpoint is.
#[derive(Debug, Clone)]
pub struct TraceExport {
    pub protocol: OtlpProtocol,
    /// The URL spans are sent to, resolved by the specification's rules ([`traces_endpoint`]).
    pub endpoint: String,
    /// How long one export may take.
    pub timeout: Duration,
    pub sampler: Sampler,
}

/// OTLP's transports (`OTEL_EXPORTER_OTLP_PROTOCOL`); `http/json` is not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            other => Err(format!("{other:?} is neither grpc nor http/protobuf")),
        }
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        })
    }
}

/// The export the settings ask for, None when no endpoint is set (tracing off). The protocol and
/// the sampler are checked either way: a wrong value is a start-up error, not a surprise later.
pub(super) fn trace_export<F: Fn(&str) -> Option<String>>(
    settings: &Reader<F>,
) -> Result<Option<TraceExport>, ConfigError> {
    let protocol: OtlpProtocol = settings.parse(&OTLP_PROTOCOL)?;
    let sampler = sampler(settings)?;
    let timeout = settings.millis(&OTLP_TIMEOUT_MS)?;
    let endpoint = traces_endpoint(
        protocol,
        settings.optional(&OTLP_ENDPOINT)?,
        settings.optional(&OTLP_TRACES_ENDPOINT)?,
    );
    Ok(endpoint.map(|endpoint| TraceExport {
        protocol,
        endpoint,
        timeout,
        sampler,
    }))
}

/// The specification's rule: the traces endpoint is used as is; the base endpoint is too over
/// gRPC, and gets the signal's path `/v1/traces` over HTTP.
fn traces_endpoint(
    protocol: OtlpProtocol,
    base: Option<String>,
    traces: Option<String>,
) -> Option<String> {
    traces.or_else(|| {
        base.map(|base| match protocol {
            OtlpProtocol::Grpc => base,
            OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
        })
    })
}

fn sampler<F: Fn(&str) -> Option<String>>(settings: &Reader<F>) -> Result<Sampler, ConfigError> {
    // Checked whichever sampler is named: a wrong ratio is a mistake even where it is not used.
    let ratio: f64 = settings.parse(&TRACES_SAMPLER_ARG)?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(ConfigError::new(
            &TRACES_SAMPLER_ARG,
            ratio,
            "must be between 0 and 1",
        ));
    }
    let parent_based = |root: Sampler| Sampler::ParentBased(Box::new(root));
    let name = settings.text(&TRACES_SAMPLER)?;
    Ok(match name.as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio),
        "parentbased_always_on" => parent_based(Sampler::AlwaysOn),
        "parentbased_always_off" => parent_based(Sampler::AlwaysOff),
        "parentbased_traceidratio" => parent_based(Sampler::TraceIdRatioBased(ratio)),
        other => {
            return Err(ConfigError::new(
                &TRACES_SAMPLER,
                other,
                "must be always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off or parentbased_traceidratio",
            ));
        }
    })
}
