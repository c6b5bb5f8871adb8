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
