//! The HTTP server loop: at most `CHAT_MAX_CONNECTIONS` connections at once (the next clients
//! wait in the listen backlog), at most `CHAT_MAX_CONNECTIONS_PER_ADDRESS` of one client address
//! when clients connect directly (one more is closed at once, so one client cannot hold every
//! slot), request headers within `CHAT_HEADER_READ_TIMEOUT_MS` (a client trickling them is
//! disconnected), the peer address for the rate limits, and a graceful drain.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use chatcore::config::ApiConfig;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// A pause after a failed accept (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The connections open per client address, each counted while its [`AddressSlot`] lives.
#[derive(Default)]
struct ConnectionsPerAddress(Mutex<HashMap<IpAddr, usize>>);

/// One connection of an address, given back when dropped.
struct AddressSlot {
    counts: Arc<ConnectionsPerAddress>,
    address: IpAddr,
}

impl ConnectionsPerAddress {
    /// A slot for one more connection of `address`, unless it holds `max` already.
    fn take(self: &Arc<Self>, address: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(address).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: Arc::clone(self),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets in-flight requests finish (at most
/// the request timeout).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &ApiConfig,
    shutdown: CancellationToken,
) {
    let connection_slots = Arc::new(Semaphore::new(settings.max_connections));
    // Behind proxies every connection comes from a proxy: the per-address bound is for direct clients.
    let per_address = (settings.trusted_proxy_hops == 0).then(|| {
        (
            Arc::new(ConnectionsPerAddress::default()),
            settings.max_connections_per_address,
        )
    });
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&connection_slots).acquire_owned() => {
                slot.expect("the semaphore is never closed")
            }
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let address_slot = match &per_address {
            Some((counts, max)) => {
                match counts.take(
                    crate::http::middleware::rate_limit::buckets::address_key(peer.ip()),
                    *max,
                ) {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::debug!(%peer, "closing a connection over the per-address bound");
                        continue;
                    }
                }
            }
            None => None,
        };
        // Answers go out at once, not held back by Nagle's algorithm for the next write.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "setting TCP_NODELAY failed");
        }
        let service = router
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request
            });
        let connection = graceful
            .watch(http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
            drop(address_slot);
            drop(slot);
        });
    }
    let drain_limit = settings.request_timeout + settings.body_timeout;
    if tokio::time::timeout(drain_limit, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running at shutdown were cut off");
    }
}
