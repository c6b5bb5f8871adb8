//! The connections of the admin server and of the metrics listener: few, bounded and timed,
//! so that nothing that can reach them (the metrics listener is on the node's address) can take
//! the file descriptors the proxy serves with. Each request head is read and checked here
//! ([`head::check_head`]) before hyper sees it.

use std::{
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{Instant, Sleep},
};
use tracing::debug;

use super::{
    head::{self, MAX_HEAD},
    policy::Refusal,
};

/// What one admin listener lets a client do.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From a request head's first byte to its end.
    pub header_timeout: Duration,
    /// With nothing sent or taken: before a request (from connecting or from the previous
    /// response), inside a body, and while a response waits to be read.
    pub idle_timeout: Duration,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
}

impl Default for Limits {
    /// nginx's timeouts (client_header_timeout, keepalive_timeout); a Prometheus, a kubelet and
    /// a few operators need a handful of connections.
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections: 128,
        }
    }
}

pub type Body = Full<bytes::Bytes>;

/// Serves each connection of `listener` with `handle` (given the request, the address the
/// connection came in on, and the refusal of its head, if any), within `limits`.
pub async fn accept<H>(listener: TcpListener, limits: Limits, handle: H)
where
    H: Fn(Request<Incoming>, IpAddr, Option<Refusal>) -> Response<Body>,
    H: Clone + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, most likely: accepting again at once would spin.
                debug!(error = %err, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "admin connection refused: at the connection limit");
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let gate = Gate::new(stream, limits);
            let refusal = gate.refusal.clone();
            let service = service_fn(move |request| {
                let refused = refusal.lock().unwrap_or_else(|e| e.into_inner()).take();
                let response = handle(request, local.ip(), refused);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(gate), service)
                .await
            {
                debug!(error = %err, "admin connection ended");
            }
        });
    }
}

/// Stands in for a refused head, so that hyper answers the refusal in its turn (after any
/// response before it) and closes the connection; the refusal itself goes to the handler
/// beside it, where no client can put one.
const REFUSED_HEAD: &[u8] = b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n";

enum Phase {
    /// Reading a request head into the buffer.
    Head,
    /// Giving hyper a checked head (`head` bytes at the buffer's start), then its body.
    Pass { head: usize, body: u64 },
    /// Giving hyper [`REFUSED_HEAD`], then nothing more.
    Refused,
    /// The client is gone.
    Closed,
}

/// The connection as hyper reads it: heads arrive only once whole and checked, and every wait
/// has a deadline.
struct Gate {
    stream: TcpStream,
    limits: Limits,
    phase: Phase,
    /// Read from the client, not yet given to hyper.
    buf: BytesMut,
    read_deadline: Pin<Box<Sleep>>,
    /// Set while a write waits for the client to read.
    write_deadline: Option<Pin<Box<Sleep>>>,
    refusal: Arc<Mutex<Option<Refusal>>>,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

impl Gate {
    fn new(stream: TcpStream, limits: Limits) -> Gate {
        Gate {
            stream,
            limits,
            phase: Phase::Head,
            buf: BytesMut::with_capacity(1024),
            read_deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            write_deadline: None,
            refusal: Arc::default(),
        }
    }

    fn wait_until(&mut self, after: Duration) {
        self.read_deadline.as_mut().reset(Instant::now() + after);
    }

    /// Reads more of the client's bytes into the buffer; `Ok(0)` at its end.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut chunk = [0u8; 4096];
        let mut read = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut read))?;
        self.buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    }

    /// Replaces what is left of the connection with a refused head.
    fn refuse(&mut self, refusal: Refusal) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(refusal);
        self.buf.clear();
        self.buf.extend_from_slice(REFUSED_HEAD);
        self.phase = Phase::Refused;
        let idle = self.limits.idle_timeout;
        self.wait_until(idle);
    }

    /// Gives hyper up to `limit` bytes of the buffer.
    fn give(&mut self, out: &mut ReadBuf<'_>, limit: usize) -> usize {
        let n = limit.min(self.buf.len()).min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        n
    }
}

impl AsyncRead for Gate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match this.phase {
                Phase::Closed => return Poll::Ready(Ok(())),
                // Not the end of the stream after the refused head: hyper would take it for
                // the client's going away and drop the answer. It closes the connection
                // itself once the answer is out (the head asks it to).
                Phase::Refused if this.buf.is_empty() => {
                    ready!(this.read_deadline.as_mut().poll(cx));
                    return Poll::Ready(Err(timed_out("a refused request's answer")));
                }
                Phase::Refused => {
                    this.give(out, usize::MAX);
                    return Poll::Ready(Ok(()));
                }
                Phase::Pass { head: 0, body: 0 } => {
                    this.phase = Phase::Head;
                    let idle = this.limits.idle_timeout;
                    this.wait_until(idle);
                }
                Phase::Pass { head, body } if head > 0 => {
                    let given = this.give(out, head);
                    this.phase = Phase::Pass {
                        head: head - given,
                        body,
                    };
                    return Poll::Ready(Ok(()));
                }
                Phase::Pass { body, .. } => {
                    if this.buf.is_empty() {
                        match this.fill(cx) {
                            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                            Poll::Ready(Ok(_)) => {
                                let idle = this.limits.idle_timeout;
                                this.wait_until(idle);
                            }
                            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                            Poll::Pending => {
                                ready!(this.read_deadline.as_mut().poll(cx));
                                return Poll::Ready(Err(timed_out("a request body")));
                            }
                        }
                    }
                    let limit = usize::try_from(body).unwrap_or(usize::MAX);
                    let given = this.give(out, limit);
                    this.phase = Phase::Pass {
                        head: 0,
                        body: body - given as u64,
                    };
                    return Poll::Ready(Ok(()));
                }
                Phase::Head => {
                    // Empty lines between requests are allowed (RFC 9112 §2.2).
                    while this.buf.starts_with(b"\r\n") {
                        this.buf.advance(2);
                    }
                    if let Some(end) = head::head_end(&this.buf) {
                        match head::check_head(&this.buf[..end]) {
                            Ok(body) => this.phase = Phase::Pass { head: end, body },
                            Err(refusal) => this.refuse(refusal),
                        }
                        continue;
                    }
                    if this.buf.len() > MAX_HEAD {
                        this.refuse(Refusal::new(
                            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "the request head is larger than 32 KiB",
                        ));
                        continue;
                    }
                    let was_empty = this.buf.is_empty();
                    match this.fill(cx) {
                        // The client is gone; a part of a head is no request.
                        Poll::Ready(Ok(0)) => {
                            this.phase = Phase::Closed;
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Ok(_)) => {
                            if was_empty {
                                let header = this.limits.header_timeout;
                                this.wait_until(header);
                            }
                        }
                        Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                        Poll::Pending => {
                            ready!(this.read_deadline.as_mut().poll(cx));
                            let what = if was_empty {
                                "an idle connection"
                            } else {
                                "a request head"
                            };
                            return Poll::Ready(Err(timed_out(what)));
                        }
                    }
                }
            }
        }
    }
}

impl AsyncWrite for Gate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write(cx, data) {
            Poll::Ready(result) => {
                this.write_deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let idle = this.limits.idle_timeout;
                let deadline =
                    (this.write_deadline).get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(deadline.as_mut().poll(cx));
                Poll::Ready(Err(timed_out("a response nobody reads")))
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
