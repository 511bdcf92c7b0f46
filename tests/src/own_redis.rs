//! Redis servers of a test's own (restarts, backups and failovers would disturb other tests on the
//! shared one), and a TCP proxy that gives them one stable address across a failover.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::eventually;

/// A redis-server on a free loopback port, its files in a directory of its own.
pub struct OwnRedis {
    pub port: u16,
    process: Child,
    dir: PathBuf,
    replica_of: Option<u16>,
}

impl OwnRedis {
    /// A server whose data lives only in memory (and in `dump.rdb` when told to `SAVE`).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// A replica of the primary on `primary_port` (writes acknowledged by the primary alone, as
    /// Redis does).
    pub async fn start_replica_of(primary_port: u16) -> anyhow::Result<Self> {
        Self::start_with(Some(primary_port)).await
    }

    async fn start_with(replica_of: Option<u16>) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("own-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let process = spawn(port, &dir, replica_of).await?;
        Ok(Self {
            port,
            process,
            dir,
            replica_of,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// Restarts with nothing: every key is gone.
    pub async fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.process.kill().await?;
        std::fs::remove_file(self.dir.join("dump.rdb")).or_else(ignore_missing)?;
        self.process = spawn(self.port, &self.dir, self.replica_of).await?;
        Ok(())
    }

    /// Takes a backup now (`SAVE`, then a copy of the snapshot).
    pub async fn back_up(&self) -> anyhow::Result<()> {
        let _: () = redis::cmd("SAVE")
            .query_async(&mut self.connection().await?)
            .await?;
        std::fs::copy(self.dir.join("dump.rdb"), self.dir.join("backup.rdb"))?;
        Ok(())
    }

    /// Dies (SIGKILL) and comes back with the data of the last backup.
    pub async fn restart_from_backup(&mut self) -> anyhow::Result<()> {
        self.process.kill().await?;
        std::fs::copy(self.dir.join("backup.rdb"), self.dir.join("dump.rdb"))?;
        self.process = spawn(self.port, &self.dir, self.replica_of).await?;
        Ok(())
    }

    /// Dies (SIGKILL) for good.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill().await?;
        Ok(())
    }

    /// Waits until every replica has everything this primary wrote so far.
    pub async fn wait_for_replicas(&self) -> anyhow::Result<()> {
        eventually("a replica catches up", Duration::from_secs(20), || async {
            // WAIT briefly, well within the client's response timeout.
            let acknowledged: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(100)
                .query_async(&mut self.connection().await?)
                .await?;
            Ok(acknowledged >= 1)
        })
        .await
    }

    /// Makes this replica a primary (`REPLICAOF NO ONE`), as a failover does.
    pub async fn promote(&mut self) -> anyhow::Result<()> {
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut self.connection().await?)
            .await?;
        self.replica_of = None;
        Ok(())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ignore_missing(error: std::io::Error) -> std::io::Result<()> {
    if error.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(error)
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A redis-server in `dir` that saves only when told to (`SAVE`), once it answers.
async fn spawn(port: u16, dir: &Path, replica_of: Option<u16>) -> anyhow::Result<Child> {
    let mut command = Command::new("redis-server");
    command
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--dbfilename",
            "dump.rdb",
        ])
        .arg("--dir")
        .arg(dir);
    if let Some(primary) = replica_of {
        command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
    }
    let process = command.stdout(Stdio::null()).kill_on_drop(true).spawn()?;
    let url = format!("redis://127.0.0.1:{port}/0");
    eventually("redis answers", Duration::from_secs(10), || async {
        let Ok(mut connection) = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await
        else {
            return Ok(false);
        };
        // Answers PING only once the snapshot is loaded.
        Ok(redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .is_ok())
    })
    .await?;
    Ok(process)
}

/// A TCP proxy on a stable loopback address in front of one Redis at a time, as a DNS name or a
/// virtual IP stands in front of the current primary. [`TcpProxy::switch`] points it at another
/// server and drops the open connections, as a failover does; [`TcpProxy::cut`] drops them and
/// refuses new ones, as a network partition does.
pub struct TcpProxy {
    pub port: u16,
    target: Arc<Mutex<u16>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Told to the open connections by [`TcpProxy::freeze`].
    frozen: Arc<tokio::sync::Notify>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let target = Arc::new(Mutex::new(target));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let frozen = Arc::new(tokio::sync::Notify::new());
        let accept = tokio::spawn({
            let (target, connections) = (Arc::clone(&target), Arc::clone(&connections));
            let frozen = Arc::clone(&frozen);
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let port = *target.lock().expect("not poisoned");
                    let frozen = Arc::clone(&frozen);
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await {
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                () = frozen.notified() => {
                                    // Both ends stay open and hear nothing more.
                                    std::future::pending::<()>().await;
                                }
                            }
                        }
                    });
                    connections.lock().expect("not poisoned").push(pipe);
                }
            }
        });
        Ok(Self {
            port,
            target,
            connections,
            frozen,
            accept,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A proxy in front of the test RabbitMQ (`AMQP_PORT`, 5672 by default).
    pub async fn in_front_of_rabbitmq() -> anyhow::Result<Self> {
        let amqp_port: u16 = std::env::var("AMQP_PORT")
            .ok()
            .and_then(|port| port.parse().ok())
            .unwrap_or(5672);
        Self::start(amqp_port).await
    }

    /// The `AMQP_URL` through this proxy (of [`TcpProxy::in_front_of_rabbitmq`]).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// From now on connections go to `target`; the open ones are dropped.
    pub fn switch(&self, target: u16) {
        *self.target.lock().expect("not poisoned") = target;
        for connection in self.connections.lock().expect("not poisoned").drain(..) {
            connection.abort();
        }
    }

    /// The open connections go silent, both ways, without closing (a peer gone without a
    /// word: a host lost, a network partition); new ones are forwarded as before.
    pub fn freeze(&self) {
        self.frozen.notify_waiters();
    }

    /// Drops the open connections and refuses new ones.
    pub fn cut(&self) {
        self.switch(0);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
