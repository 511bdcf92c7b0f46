//! Connecting to RabbitMQ within a bounded time: TCP, TLS for `amqps://`, the AMQP handshake; to
//! the next node of a cluster when one does not answer.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use lapin::tcp::{AsyncTcpStream, OwnedTLSConfig};
use lapin::types::LongString;
use lapin::uri::AMQPScheme;
use lapin::{Connection, ConnectionProperties};

use super::RabbitMqQueue;
use crate::config::AmqpNode;

impl RabbitMqQueue {
    /// Opens a connection to the first node of `AMQP_URL` that answers, trying them in turn from
    /// the one that answered last (so a lost node costs one refused or timed-out attempt, and
    /// every connection of the process ends up on the node that answered). The error of the last
    /// node when none does.
    pub(super) async fn connect(&self, connection_name: &str) -> Result<Connection, lapin::Error> {
        let nodes = self.nodes.nodes();
        let first = self.answered_last.load(Ordering::Relaxed);
        let mut failure = None;
        for offset in 0..nodes.len() {
            let index = (first + offset) % nodes.len();
            let node = &nodes[index];
            match self.connect_to(node, connection_name).await {
                Ok(connection) => {
                    if index != first {
                        tracing::info!(%node, connection_name, "rabbitmq: connected to another node");
                        self.answered_last.store(index, Ordering::Relaxed);
                    }
                    return Ok(connection);
                }
                Err(error) => {
                    if nodes.len() > 1 {
                        tracing::warn!(%node, %error, connection_name, "rabbitmq node unreachable, trying the next");
                    }
                    failure = Some(error);
                }
            }
        }
        Err(failure.unwrap_or_else(|| io::Error::other("rabbitmq: no node configured").into()))
    }

    /// Opens a connection to one node within `connect_timeout`: TCP, TLS (`amqps://`, trusting
    /// the public roots and `tls_ca`) and the AMQP handshake. lapin runs the handshake on an IO
    /// thread of its own that the timeout does not stop, so past it the socket is shut down under
    /// that thread (a broker that accepts and never answers would otherwise hold it forever).
    async fn connect_to(
        &self,
        node: &AmqpNode,
        connection_name: &str,
    ) -> Result<Connection, lapin::Error> {
        let uri = node.uri().clone();
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.tls_ca.clone(),
        };
        let timeout = self.connect_timeout;
        let dialing = Arc::new(Mutex::new(Dialing::Connecting(None)));
        let runtime = lapin::runtime::default_runtime()?;
        let handles = Arc::clone(&dialing);
        let connecting = Connection::connector(
            uri,
            runtime,
            async move |uri, runtime| {
                let host = uri.authority.host.clone();
                let addresses = runtime.to_socket_addrs((host.clone(), uri.authority.port));
                let stream =
                    tokio::time::timeout(timeout, AsyncTcpStream::connect(&runtime, addresses))
                        .await
                        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                if let AsyncTcpStream::Plain(socket) = &stream {
                    // Publishes, acks and confirms are small frames sent while others are
                    // unanswered: Nagle's algorithm would hold them back.
                    socket.get_ref().set_nodelay(true)?;
                    let mut dialing = handles.lock().unwrap_or_else(PoisonError::into_inner);
                    match &mut *dialing {
                        Dialing::Abandoned => {
                            return Err(io::Error::from(io::ErrorKind::TimedOut).into());
                        }
                        Dialing::Connecting(handle) => {
                            *handle = Some(socket_handle(socket.get_ref())?);
                        }
                        Dialing::Connected => {}
                    }
                }
                match uri.scheme {
                    AMQPScheme::AMQP => Ok(stream),
                    AMQPScheme::AMQPS => Ok(stream.into_tls(&host, tls.as_ref()).await?),
                }
            },
            properties,
        );
        let connected = tokio::time::timeout(timeout, connecting).await;
        let succeeded = matches!(connected, Ok(Ok(_)));
        let previous = std::mem::replace(
            &mut *dialing.lock().unwrap_or_else(PoisonError::into_inner),
            if succeeded {
                Dialing::Connected
            } else {
                Dialing::Abandoned
            },
        );
        if let Dialing::Connecting(Some(socket)) = previous
            && !succeeded
        {
            // lapin's IO thread may still wait on it: this ends the wait.
            let _ = socket.shutdown(Shutdown::Both);
        }
        match connected {
            Ok(connection) => connection,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("rabbitmq: no connection within {timeout:?}"),
            )
            .into()),
        }
    }
}

/// Where the connection of one [`RabbitMqQueue::connect`] is.
enum Dialing {
    /// Before the handshake ended: a second handle on the socket once there is one.
    Connecting(Option<std::net::TcpStream>),
    /// Timed out or failed: a late dial gives up.
    Abandoned,
    /// The connection is lapin's alone (a handle kept here would keep its socket open).
    Connected,
}

/// A second handle on a socket, to shut it down from outside lapin's IO thread.
#[cfg(unix)]
fn socket_handle(socket: &tokio::net::TcpStream) -> io::Result<std::net::TcpStream> {
    use std::os::fd::AsFd as _;
    Ok(socket.as_fd().try_clone_to_owned()?.into())
}

#[cfg(windows)]
fn socket_handle(socket: &tokio::net::TcpStream) -> io::Result<std::net::TcpStream> {
    use std::os::windows::io::AsSocket as _;
    Ok(socket.as_socket().try_clone_to_owned()?.into())
}
