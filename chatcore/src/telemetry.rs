//! Logging: JSON lines on stdout, level from `RUST_LOG` (default `info`), lowercase messages.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls (tests spawning several services) are no-ops.
pub fn init(service_name: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let installed = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .flatten_event(true)
        .try_init()
        .is_ok();
    if installed {
        tracing::info!(
            service = service_name,
            version = env!("CARGO_PKG_VERSION"),
            "starting"
        );
    }
}
