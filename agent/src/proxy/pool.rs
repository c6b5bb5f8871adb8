//! The upstream connections of one worker thread. Nothing here is shared between threads: no
//! lock, no task per request or per return to the pool.
//!
//! HTTP/1.1 connections are driven by the task that uses them (see [`Http1Conn`]) and wait in
//! the pool, unpolled, between requests; a sweep drops those their endpoint closed or that
//! idled too long. HTTP/2 (h2c, gRPC) connections are multiplexed: one per endpoint and
//! worker, running as a task of the worker.

use std::{
    cell::RefCell,
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::{LocalExec, body::ClientBody};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle HTTP/1.1 connections kept per endpoint and worker (each holds ~16 KB of buffers). Below
/// the concurrency a node sees, connections churn: at 1,000 concurrent clients a cap of 256
/// made a connect of every other request (CPU per request 5x, like nginx's `keepalive 256`).
/// Idle ones are closed after `IDLE_TIMEOUT` anyway.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// An idle connection unused this long is closed (upstreams close theirs after a while too).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the pool is swept (and freed memory handed back, see `worker`).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

type Io = TokioIo<TcpStream>;

/// An HTTP/1.1 upstream connection without a task of its own: whoever waits on it (the request
/// in flight, then the response body) polls it, so request and response bytes move in the
/// task of the client's connection, with no hand-off and no cross-thread wake-up.
pub struct Http1Conn {
    sender: http1::SendRequest<ClientBody>,
    /// `None` once the connection has ended. Boxed: it is large, and moves with every
    /// check-in and check-out.
    connection: Option<Box<http1::Connection<Io, ClientBody>>>,
}

impl Http1Conn {
    pub async fn connect(endpoint: SocketAddr) -> Result<Http1Conn> {
        let io = TokioIo::new(connect(endpoint).await?);
        let (sender, connection) = http1::handshake(io)
            .await
            .with_context(|| format!("HTTP/1.1 handshake with {endpoint}"))?;
        Ok(Http1Conn {
            sender,
            connection: Some(Box::new(connection)),
        })
    }

    /// Moves bytes between the socket and the exchange in flight. False once the connection
    /// has ended.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(connection) = &mut self.connection
            && let Poll::Ready(result) = std::pin::Pin::new(&mut **connection).poll(cx)
        {
            if let Err(err) = result {
                debug!(error = %err, "upstream connection ended");
            }
            self.connection = None;
        }
        self.connection.is_some()
    }

    /// Open, and done with its previous exchange. Polls without registering for a wake-up:
    /// an idle connection belongs to no task.
    fn is_reusable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }

    /// Sends the request and drives the connection until the response head has arrived. An
    /// error carrying the request back means it was not sent: it may go on another connection.
    pub async fn send(
        &mut self,
        request: Request<ClientBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<ClientBody>>> {
        let mut response = std::pin::pin!(self.sender.try_send_request(request));
        let connection = &mut self.connection;
        std::future::poll_fn(|cx| {
            if let Some(conn) = connection
                && let Poll::Ready(result) = std::pin::Pin::new(&mut **conn).poll(cx)
            {
                if let Err(err) = result {
                    debug!(error = %err, "upstream connection ended");
                }
                *connection = None;
            }
            response.as_mut().poll(cx)
        })
        .await
    }
}

struct Idle {
    conn: Http1Conn,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>>>,
    multiplexed: RefCell<HashMap<SocketAddr, http2::SendRequest<Incoming>>>,
}

/// A TCP connection to `endpoint` within `CONNECT_TIMEOUT`, with Nagle off.
pub async fn connect(endpoint: SocketAddr) -> Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint))
        .await
        .with_context(|| format!("connect to {endpoint} timed out"))?
        .with_context(|| format!("connect to {endpoint}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connection of its own for an upgrade (WebSocket): after a 101 it becomes a tunnel, so it
/// runs as a task of the worker and never returns to the pool.
pub async fn upgradable(endpoint: SocketAddr) -> Result<http1::SendRequest<Incoming>> {
    let io = TokioIo::new(connect(endpoint).await?);
    let (sender, connection) = http1::handshake(io)
        .await
        .with_context(|| format!("HTTP/1.1 handshake with {endpoint}"))?;
    tokio::task::spawn_local(async move {
        if let Err(err) = connection.with_upgrades().await {
            debug!(%endpoint, error = %err, "upstream upgrade connection ended");
        }
    });
    Ok(sender)
}

impl Pool {
    /// An idle connection to `endpoint`, most recently used first (its socket is warm).
    pub fn check_out(&self, endpoint: SocketAddr) -> Option<Http1Conn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&endpoint)?;
        while let Some(mut entry) = list.pop() {
            if entry.conn.is_reusable() {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Keeps a connection whose exchange is complete for the next request to `endpoint`.
    pub fn check_in(&self, endpoint: SocketAddr, mut conn: Http1Conn) {
        // Usually done with its exchange already (the body's end was just read): no need to
        // poll it; check-out polls it anyway before it carries another request.
        let ready = conn.connection.is_some() && conn.sender.is_ready();
        if !ready && !conn.is_reusable() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(endpoint).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// An idle connection to `endpoint` or a new one. An error means nothing was sent.
    pub async fn http1(&self, endpoint: SocketAddr) -> Result<Http1Conn> {
        match self.check_out(endpoint) {
            Some(conn) => Ok(conn),
            None => Http1Conn::connect(endpoint).await,
        }
    }

    /// The worker's multiplexed HTTP/2 connection to `endpoint`, made on first use.
    pub async fn http2(&self, endpoint: SocketAddr) -> Result<http2::SendRequest<Incoming>> {
        let existing = self
            .multiplexed
            .borrow()
            .get(&endpoint)
            .filter(|s| !s.is_closed())
            .cloned();
        if let Some(sender) = existing {
            return Ok(sender);
        }
        let io = TokioIo::new(connect(endpoint).await?);
        let (sender, connection) = http2::handshake(LocalExec, io)
            .await
            .with_context(|| format!("HTTP/2 handshake with {endpoint}"))?;
        tokio::task::spawn_local(async move {
            if let Err(err) = connection.await {
                debug!(%endpoint, error = %err, "upstream HTTP/2 connection ended");
            }
        });
        self.multiplexed
            .borrow_mut()
            .insert(endpoint, sender.clone());
        Ok(sender)
    }

    /// Drops connections their endpoints closed or that idled past `IDLE_TIMEOUT`, and with
    /// them the entries of endpoints that are gone: pods come and go, and a pool that kept an
    /// entry for every pod it ever called would grow for as long as the agent runs.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain_mut(|entry| {
                now.duration_since(entry.since) < IDLE_TIMEOUT && entry.conn.is_reusable()
            });
            !list.is_empty()
        });
        self.multiplexed
            .borrow_mut()
            .retain(|_, sender| !sender.is_closed());
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{server::conn::http1 as server, service::service_fn};
    use tokio::net::TcpListener;

    use super::*;

    /// An upstream that answers every request on a connection with the connection's number.
    async fn upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Aborting the server drops the set, which ends every connection.
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            for number in 0.. {
                let (stream, _) = listener.accept().await.unwrap();
                connections.spawn(async move {
                    let service = service_fn(move |_| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "{number}"
                        )))))
                    });
                    let _ = server::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (address, server)
    }

    /// A request with a body of the kind the proxy forwards (one read from a connection).
    async fn request_through(pool: &std::rc::Rc<Pool>, endpoint: SocketAddr) -> String {
        // The proxy only forwards `Incoming` bodies: take one from a loopback exchange.
        let (front, front_address) = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            (listener, address)
        };
        let pool = pool.clone();
        let front_server = tokio::task::spawn_local(async move {
            let (stream, _) = front.accept().await.unwrap();
            let service = service_fn(move |request: Request<Incoming>| {
                let pool = pool.clone();
                async move {
                    let mut conn = pool.http1(endpoint).await.unwrap();
                    let request = request.map(|body| ClientBody::new(body).0);
                    let response = conn.send(request).await.unwrap();
                    let body = super::super::body::PooledBody::new(
                        response.into_body(),
                        conn,
                        endpoint,
                        pool,
                        Duration::from_secs(60),
                    );
                    Ok::<_, Infallible>(Response::new(super::super::body::ProxyBody::Pooled(body)))
                }
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let stream = TcpStream::connect(front_address).await.unwrap();
        let (mut client, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::task::spawn_local(connection);
        let request = Request::builder()
            .uri("/")
            .header("host", "test")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        drop(client);
        let _ = front_server.await;
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn connections_are_reused_once_their_response_is_read_and_swept_once_closed() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (endpoint, server) = upstream().await;
                let pool = std::rc::Rc::new(Pool::default());
                assert_eq!(request_through(&pool, endpoint).await, "0");
                assert_eq!(pool.idle_count(), 1, "back in the pool after its body");
                assert_eq!(request_through(&pool, endpoint).await, "0", "reused");
                pool.sweep();
                assert_eq!(pool.idle_count(), 1, "an open connection stays");

                server.abort();
                let deadline = Instant::now() + Duration::from_secs(5);
                while pool.idle_count() > 0 {
                    assert!(Instant::now() < deadline, "never swept");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    pool.sweep();
                }
            })
            .await;
    }
}
