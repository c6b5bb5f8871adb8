//! The body of every response the proxy returns. An enum rather than a boxed trait object: no
//! allocation per response, and the pooled HTTP/1 case can drive its upstream connection.

use std::{
    cell::Cell,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::pool::{Http1Conn, Pool};

pub enum ProxyBody {
    /// steer's own answer (a refusal), or nothing.
    Text(Option<Bytes>),
    /// A response body whose connection runs on its own (HTTP/2, upgrades).
    Streamed(Incoming),
    /// A response body arriving on a pooled HTTP/1.1 connection that this body drives.
    Pooled(PooledBody),
}

impl ProxyBody {
    pub fn text(text: String) -> ProxyBody {
        ProxyBody::Text(Some(Bytes::from(text)))
    }
}

/// A client's request body on its way to an HTTP/1.1 upstream, telling whose turn it is: a
/// request timeout while the proxy waits for the client's next bytes is the client's (408);
/// one while the body has ended, or while the upstream is not taking what it was given, is the
/// upstream's (504).
#[derive(Debug)]
pub struct ClientBody {
    body: Incoming,
    state: Rc<BodyState>,
}

#[derive(Debug, Default)]
pub struct BodyState {
    ended: Cell<bool>,
    /// The last poll found no bytes from the client.
    waiting_for_client: Cell<bool>,
}

impl BodyState {
    /// Whether the exchange is held up by the client's body.
    pub fn client_is_late(&self) -> bool {
        !self.ended.get() && self.waiting_for_client.get()
    }
}

impl ClientBody {
    /// The body, and where it stands.
    pub fn new(body: Incoming) -> (ClientBody, Rc<BodyState>) {
        let state = Rc::new(BodyState::default());
        state.ended.set(body.is_end_stream());
        let body = ClientBody {
            body,
            state: state.clone(),
        };
        (body, state)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        this.state.waiting_for_client.set(polled.is_pending());
        let frame = ready!(polled);
        if frame.is_none() || this.body.is_end_stream() {
            this.state.ended.set(true);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Streams an upstream's response and polls its connection in the same task (the one of the
/// client's connection), so no bytes are handed between tasks. Once the body has been read to
/// its end, the connection goes back to the worker's pool; a body dropped before its end takes
/// the connection with it (the rest of the response would be in the way of the next one).
pub struct PooledBody {
    body: Incoming,
    upstream: Option<Upstream>,
    /// The longest silence between body bytes, and its timer (made the first time the body
    /// has to wait: most bodies arrive with their head).
    read_timeout: Duration,
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// An upstream that stopped sending in the middle of a response body: the response is cut
/// off (its head is already on its way to the client).
#[derive(Debug, thiserror::Error)]
#[error("{endpoint} sent nothing for {timeout:?} in the middle of a response body")]
pub struct BodyReadTimeout {
    endpoint: SocketAddr,
    timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Upstream {
    conn: Http1Conn,
    endpoint: SocketAddr,
    pool: Rc<Pool>,
}

impl PooledBody {
    pub fn new(
        body: Incoming,
        conn: Http1Conn,
        endpoint: SocketAddr,
        pool: Rc<Pool>,
        read_timeout: Duration,
    ) -> Self {
        PooledBody {
            body,
            upstream: Some(Upstream {
                conn,
                endpoint,
                pool,
            }),
            read_timeout,
            silence: None,
        }
    }

    /// The next frame, or an error once the upstream has been silent for `read_timeout`.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(silence) = &mut self.silence {
                    silence
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.read_timeout);
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let timeout = self.read_timeout;
                let silence = self
                    .silence
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(silence.as_mut().poll(cx));
                let endpoint = self
                    .upstream
                    .as_ref()
                    .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |u| u.endpoint);
                Poll::Ready(Some(Err(Box::new(BodyReadTimeout { endpoint, timeout }))))
            }
        }
    }

    fn release(&mut self) {
        if let Some(upstream) = self.upstream.take() {
            upstream.pool.check_in(upstream.endpoint, upstream.conn);
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Bodies known to be empty (HEAD, 204, content-length 0) are never polled.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Text(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            ProxyBody::Streamed(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(BoxError::from))),
            ProxyBody::Pooled(pooled) => {
                if let Some(upstream) = &mut pooled.upstream {
                    upstream.conn.drive(cx);
                }
                let frame = ready!(pooled.poll_body(cx));
                match &frame {
                    None => pooled.release(),
                    Some(Ok(_)) if pooled.body.is_end_stream() => pooled.release(),
                    Some(Ok(_)) => {}
                    Some(Err(_)) => pooled.upstream = None,
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Text(text) => text.is_none(),
            ProxyBody::Streamed(body) => body.is_end_stream(),
            ProxyBody::Pooled(pooled) => pooled.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Text(text) => {
                SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64))
            }
            ProxyBody::Streamed(body) => body.size_hint(),
            ProxyBody::Pooled(pooled) => pooled.body.size_hint(),
        }
    }
}
