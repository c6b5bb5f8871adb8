//! Upstream connections: pooled keep-alive HTTP/1.1 connections and one multiplexed HTTP/2
//! (prior knowledge, for h2c and gRPC callers) connection per endpoint.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// How often connections their endpoints closed leave the pool.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(30);

/// A connection ready to carry one request.
pub enum Upstream {
    Http1(http1::SendRequest<Incoming>),
    Http2(http2::SendRequest<Incoming>),
}

#[derive(Clone, Default)]
pub struct Pool {
    idle: Arc<Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<Incoming>>>>>,
    multiplexed: Arc<Mutex<HashMap<SocketAddr, http2::SendRequest<Incoming>>>>,
}

async fn connect(endpoint: SocketAddr) -> Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint))
        .await
        .with_context(|| format!("connect to {endpoint} timed out"))?
        .with_context(|| format!("connect to {endpoint}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Pool {
    /// A connection to `endpoint`: an idle pooled one, or a new one. An error here means the
    /// request was not sent, so the caller may try another endpoint.
    pub async fn get(&self, endpoint: SocketAddr, http2: bool) -> Result<Upstream> {
        if http2 {
            let existing = self
                .multiplexed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&endpoint)
                .filter(|s| !s.is_closed())
                .cloned();
            if let Some(sender) = existing {
                return Ok(Upstream::Http2(sender));
            }
        } else {
            loop {
                let idle = self
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&endpoint)
                    .and_then(Vec::pop);
                match idle {
                    Some(sender) if sender.is_ready() => return Ok(Upstream::Http1(sender)),
                    Some(_) => continue,
                    None => break,
                }
            }
        }
        self.connect(endpoint, http2).await
    }

    /// Drops the pooled connections their endpoints have closed, and so the entries of
    /// endpoints that are gone: pods come and go, and a pool that kept an entry for every
    /// pod it ever called would grow for as long as the agent runs.
    pub fn purge_closed(&self) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, list| {
                list.retain(|sender| !sender.is_closed());
                !list.is_empty()
            });
        self.multiplexed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, sender| !sender.is_closed());
    }

    /// Purges every `PURGE_INTERVAL`, for as long as the runtime runs.
    pub fn purge_periodically(&self) {
        let pool = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(PURGE_INTERVAL);
            loop {
                ticks.tick().await;
                pool.purge_closed();
            }
        });
    }

    /// A new connection (for HTTP/2, it becomes the endpoint's shared one).
    async fn connect(&self, endpoint: SocketAddr, http2: bool) -> Result<Upstream> {
        let io = TokioIo::new(connect(endpoint).await?);
        if http2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                .await
                .with_context(|| format!("HTTP/2 handshake with {endpoint}"))?;
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    debug!(%endpoint, error = %err, "upstream HTTP/2 connection ended");
                }
            });
            self.multiplexed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(endpoint, sender.clone());
            return Ok(Upstream::Http2(sender));
        }
        let (sender, connection) = http1::handshake(io)
            .await
            .with_context(|| format!("HTTP/1.1 handshake with {endpoint}"))?;
        tokio::spawn(async move {
            // Upgrades (WebSocket) take the connection over after a 101.
            if let Err(err) = connection.with_upgrades().await {
                debug!(%endpoint, error = %err, "upstream connection ended");
            }
        });
        Ok(Upstream::Http1(sender))
    }

    /// Sends the request. When a pooled connection turns out to be gone before the request
    /// was written, it is sent once more on a fresh connection to the same endpoint. An
    /// HTTP/1.1 connection returns to the pool once the response has been read to its end.
    pub async fn send(
        &self,
        endpoint: SocketAddr,
        upstream: Upstream,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>> {
        let http2 = matches!(upstream, Upstream::Http2(_));
        match self.try_send(endpoint, upstream, request).await {
            Ok(response) => Ok(response),
            Err(mut err) => match err.take_message() {
                Some(request) => {
                    debug!(%endpoint, error = %err.error(), "stale pooled connection; reconnecting");
                    let fresh = self.connect(endpoint, http2).await?;
                    self.try_send(endpoint, fresh, request)
                        .await
                        .map_err(|e| e.into_error().into())
                }
                None => Err(err.into_error().into()),
            },
        }
    }

    async fn try_send(
        &self,
        endpoint: SocketAddr,
        upstream: Upstream,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Incoming>>> {
        match upstream {
            Upstream::Http2(mut sender) => sender.try_send_request(request).await,
            Upstream::Http1(mut sender) => {
                let response = sender.try_send_request(request).await?;
                let idle = self.idle.clone();
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                        let list = idle.entry(endpoint).or_default();
                        if list.len() < MAX_IDLE_PER_ENDPOINT {
                            list.push(sender);
                        }
                    }
                });
                Ok(response)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper::{server::conn::http1 as server, service::service_fn};
    use tokio::net::TcpListener;

    use super::*;

    async fn listen() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    /// Serves one keep-alive connection with `service`; the task ends the connection when
    /// it is aborted.
    fn serve_one<S>(listener: TcpListener, service: S) -> tokio::task::JoinHandle<()>
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<Empty<Bytes>>>
            + Send
            + 'static,
        S::Future: Send,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
    }

    #[tokio::test]
    async fn connections_their_endpoint_closed_leave_the_pool() {
        let (upstream_listener, upstream) = listen().await;
        let upstream_server = serve_one(
            upstream_listener,
            service_fn(|_| async { Ok::<_, Infallible>(Response::new(Empty::new())) }),
        );
        // A front server that sends what it receives through the pool: the pool only carries
        // requests that arrived over a connection.
        let pool = Pool::default();
        let (front_listener, front) = listen().await;
        let front_pool = pool.clone();
        let _front = serve_one(
            front_listener,
            service_fn(move |request: Request<Incoming>| {
                let pool = front_pool.clone();
                async move {
                    let upstream_connection = pool.get(upstream, false).await.unwrap();
                    let response = pool.send(upstream, upstream_connection, request).await;
                    let status = response.unwrap().status();
                    let mut answer = Response::new(Empty::new());
                    *answer.status_mut() = status;
                    Ok::<_, Infallible>(answer)
                }
            }),
        );
        let stream = TcpStream::connect(front).await.unwrap();
        let (mut client, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = Request::builder()
            .uri("/")
            .header("host", "test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(client.send_request(request).await.unwrap().status(), 200);

        let idle = || {
            pool.idle
                .lock()
                .unwrap()
                .values()
                .map(Vec::len)
                .sum::<usize>()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while idle() != 1 {
            assert!(tokio::time::Instant::now() < deadline, "never pooled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pool.purge_closed();
        assert_eq!(idle(), 1, "an open connection stays");

        upstream_server.abort();
        while !pool.idle.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never purged");
            tokio::time::sleep(Duration::from_millis(5)).await;
            pool.purge_closed();
        }
    }
}
