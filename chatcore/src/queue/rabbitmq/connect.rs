//! Connecting to RabbitMQ within a bounded time: TCP, TLS for `amqps://`, the AMQP handshake.

use std::io;
use std::net::Shutdown;
use std::sync::{Arc, Mutex, PoisonError};

use lapin::tcp::{AsyncTcpStream, OwnedTLSConfig};
use lapin::types::LongString;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use super::RabbitMqQueue;

impl RabbitMqQueue {
    /// Opens a connection within `connect_timeout`: TCP, TLS (`amqps://`, trusting the public
    /// roots and `tls_ca`) and the AMQP handshake. lapin runs the handshake on an IO thread of its
    /// own that the timeout does not stop, so past it the socket is shut down under that thread
    /// (a broker that accepts and never answers would otherwise hold it forever).
    pub(super) async fn connect(&self, connection_name: &str) -> Result<Connection, lapin::Error> {
        let uri: AMQPUri = self
            .url
            .expose()
            .parse()
            .map_err(|error: String| io::Error::new(io::ErrorKind::InvalidInput, error))?;
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
