//! The connection to Redis for each form of `REDIS_URL` ([`RedisTopology`]): one multiplexed,
//! self-healing connection that every request shares.
//!
//! - One server: redis-rs' `ConnectionManager`, which reconnects by itself.
//! - Sentinels: [`SentinelConnection`], the master the sentinels name, asked for again after the
//!   connection in use failed (a failover moved the master).
//! - A cluster: redis-rs' cluster connection, which follows the slots (MOVED, a promoted replica).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, TlsCertificates, TlsMode, Value,
};

use crate::config::{RedisTopology, RedisUrl};

/// The longest wait for an answer once connected. Generous (the client default of 500 ms fails
/// requests on a briefly saturated machine); a dead Redis is still noticed at once through the
/// dropped connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Sentinel(SentinelConnection),
    Cluster(ClusterConnection),
}

/// [`connect_redis_with`] with 5 s to connect and the public roots only (the benchmark).
pub async fn connect_redis(url: &RedisUrl) -> Result<RedisConnection, RedisError> {
    connect_redis_with(url, Duration::from_secs(5), None).await
}

/// Connects to Redis as `url` says. `rediss…` connects with TLS (rustls), trusting the public
/// (webpki) roots and `tls_ca` (PEM, `CHAT_TLS_CA_FILE`). Each connection (TCP, TLS, the
/// handshake's commands) takes at most `connect_timeout`, and so does this first one as a whole:
/// its failure is the error of one attempt (a refused port, an untrusted certificate), not of
/// the retries that follow later failures.
pub async fn connect_redis_with(
    url: &RedisUrl,
    connect_timeout: Duration,
    tls_ca: Option<&[u8]>,
) -> Result<RedisConnection, RedisError> {
    // Commands of concurrent requests share the multiplexed connection: Nagle's algorithm would
    // hold a command back while an earlier one is unanswered.
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    let certificates = tls_ca.map(|pem| TlsCertificates {
        client_tls: None,
        root_cert: Some(with_public_roots(pem)),
    });
    let connecting = async {
        match &url.topology {
            RedisTopology::Single(info) => connect_single(
                info.clone().set_tcp_settings(tcp),
                connect_timeout,
                certificates,
            )
            .await
            .map(RedisConnection::Single),
            RedisTopology::Sentinel {
                sentinels,
                master,
                redis,
                tls,
            } => {
                let mut builder = SentinelClientBuilder::new(
                    sentinels
                        .iter()
                        .map(|(host, port)| address(host, *port, *tls)),
                    master,
                    SentinelServerType::Master,
                )?
                .set_client_to_redis_db(redis.db())
                .set_client_to_redis_tcp_settings(tcp.clone())
                .set_client_to_sentinel_tcp_settings(tcp);
                if let Some(username) = redis.username() {
                    builder = builder
                        .set_client_to_redis_username(username)
                        .set_client_to_sentinel_username(username);
                }
                if let Some(password) = redis.password() {
                    builder = builder
                        .set_client_to_redis_password(password)
                        .set_client_to_sentinel_password(password);
                }
                if *tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                    if let Some(certificates) = certificates {
                        builder = builder
                            .set_client_to_redis_certificates(certificates.clone())
                            .set_client_to_sentinel_certificates(certificates);
                    }
                }
                SentinelConnection::connect(builder.build()?, redis.db(), connect_timeout)
                    .await
                    .map(RedisConnection::Sentinel)
            }
            RedisTopology::Cluster { nodes, redis, tls } => {
                let addresses = nodes.iter().map(|(host, port)| address(host, *port, *tls));
                let mut builder = redis::cluster::ClusterClientBuilder::new(addresses)
                    .connection_timeout(connect_timeout)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .tcp_settings(tcp);
                if let Some(username) = redis.username() {
                    builder = builder.username(username);
                }
                if let Some(password) = redis.password() {
                    builder = builder.password(password);
                }
                if let Some(certificates) = certificates.filter(|_| *tls) {
                    builder = builder.certs(certificates);
                }
                let connection = builder.build()?.get_async_connection().await?;
                Ok(RedisConnection::Cluster(connection))
            }
        }
    };
    // Boxed: the three ways of connecting make a large future for every caller to hold.
    within(connect_timeout, Box::pin(connecting)).await
}

fn address(host: &str, port: u16, tls: bool) -> ConnectionAddr {
    let host = host.to_owned();
    if tls {
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host, port)
    }
}

async fn connect_single(
    info: redis::ConnectionInfo,
    connect_timeout: Duration,
    certificates: Option<TlsCertificates>,
) -> Result<ConnectionManager, RedisError> {
    let client = match certificates {
        Some(certificates) if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) => {
            redis::Client::build_with_tls(info, certificates)?
        }
        _ => redis::Client::open(info)?,
    };
    // One attempt first, for its own error (the manager makes seven before it reports one).
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&connection_config(connect_timeout))
        .await?;
    redis::cmd("PING")
        .query_async::<()>(&mut connection)
        .await?;
    let settings = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(connect_timeout));
    ConnectionManager::new_with_config(client, settings).await
}

fn connection_config(connect_timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// `connecting`, failing as an IO error (transient) past `timeout`.
async fn within<T>(
    timeout: Duration,
    connecting: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("redis: no connection within {timeout:?}"),
            )
        })?
}

/// The PEM of `ca` followed by the public roots: given a root certificate, redis-rs trusts that
/// one alone.
fn with_public_roots(ca: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let mut pem = ca.to_vec();
    pem.push(b'\n');
    for root in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(root);
        for line in encoded.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    pem
}

/// A multiplexed connection to the master the sentinels name. A request that fails as if the
/// master were gone (the connection dropped or timed out, or the server answered READONLY: a
/// demoted master) fails, and drops the connection: the next request asks the sentinels again
/// and connects to the master they name then. Redis-rs checks that the server named answers
/// `ROLE` as a master.
#[derive(Clone)]
pub struct SentinelConnection(Arc<SentinelShared>);

struct SentinelShared {
    /// Held while asking the sentinels: one reconnection at a time, the other requests wait for it.
    sentinels: tokio::sync::Mutex<SentinelClient>,
    config: AsyncConnectionConfig,
    /// The connection in use with its generation, so that a late failure of an older one does
    /// not drop a newer one; None until the next request reconnects.
    current: Mutex<(u64, Option<MultiplexedConnection>)>,
    db: i64,
}

impl SentinelConnection {
    async fn connect(
        sentinels: SentinelClient,
        db: i64,
        connect_timeout: Duration,
    ) -> RedisResult<Self> {
        let connection = Self(Arc::new(SentinelShared {
            sentinels: tokio::sync::Mutex::new(sentinels),
            config: connection_config(connect_timeout),
            current: Mutex::new((0, None)),
            db,
        }));
        let (_, mut master) = connection.master().await?;
        redis::cmd("PING").query_async::<()>(&mut master).await?;
        Ok(connection)
    }

    fn current(&self) -> (u64, Option<MultiplexedConnection>) {
        self.0.current.lock().expect("not poisoned").clone()
    }

    /// The connection in use, or a new one to the master the sentinels name now.
    async fn master(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let (generation, Some(connection)) = self.current() {
            return Ok((generation, connection));
        }
        let mut sentinels = self.0.sentinels.lock().await;
        // Another request may have reconnected while this one waited.
        if let (generation, Some(connection)) = self.current() {
            return Ok((generation, connection));
        }
        let master = sentinels.async_get_client().await?;
        let connection = master
            .get_multiplexed_async_connection_with_config(&self.0.config)
            .await?;
        let mut current = self.0.current.lock().expect("not poisoned");
        current.0 += 1;
        current.1 = Some(connection.clone());
        tracing::info!(
            master = ?master.get_connection_info().addr(),
            "connected to the master the sentinels name"
        );
        Ok((current.0, connection))
    }

    /// Drops connection `generation` after `error` if the error says the master may have moved.
    fn after<T>(&self, generation: u64, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(error) = &result
            && master_may_have_moved(error)
        {
            let mut current = self.0.current.lock().expect("not poisoned");
            if current.0 == generation && current.1.is_some() {
                current.1 = None;
                tracing::warn!(%error, "redis master lost: asking the sentinels again");
            }
        }
        result
    }
}

fn master_may_have_moved(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        async move {
            let (generation, mut master) = self.master().await?;
            let result = master.req_packed_command(cmd).await;
            self.after(generation, result)
        }
        .boxed()
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        async move {
            let (generation, mut master) = self.master().await?;
            let result = master.req_packed_commands(pipeline, offset, count).await;
            self.after(generation, result)
        }
        .boxed()
    }

    fn get_db(&self) -> i64 {
        self.0.db
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Sentinel(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Sentinel(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}
