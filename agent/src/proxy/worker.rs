//! Worker threads: each runs a single-threaded runtime with its own `SO_REUSEPORT` listeners
//! (the kernel spreads new connections across them) and its own upstream pool. A connection
//! stays on the worker that accepted it; nothing on the request path crosses threads.

use std::{
    cell::RefCell,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    rc::Rc,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use arc_swap::{ArcSwap, cache::Cache};
use http::{HeaderName, HeaderValue, StatusCode};
use hyper::{server::conn::http1, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::stamp::{CachedVerifier, Stamp};
use super::{
    Listener, LocalExec, MAX_HEADER_BYTES, Shared,
    edges::{Caller, Edges},
    forward::handle,
    l4,
    pool::Pool,
    pool::SWEEP_INTERVAL,
    route::Route,
};
use crate::{config::AppProtocol, drain::Drain, metrics::RouteSeries, state::Snapshot};

/// After a failed accept (out of file descriptors, say) the worker waits this long before the
/// next one, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a gateway client may stay silent before hyper takes over its connection (and its
/// header timeout applies). Redirected clients of an HTTP service get the idle timeout: a slow
/// client is not a server-first protocol (those are declared `protocol: tcp`).
const GATEWAY_SNIFF: Duration = Duration::from_millis(300);

/// The listening sockets of one worker.
#[derive(Default)]
pub struct WorkerListeners {
    pub redirect: Vec<std::net::TcpListener>,
    pub gateway: Option<std::net::TcpListener>,
}

/// A listening socket that other workers can bind too (`SO_REUSEPORT`): bound here, on the
/// caller's thread, so a busy address fails the start with a clear error.
pub fn bind_listener(address: SocketAddr) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The running workers.
pub struct Workers {
    pub count: usize,
}

impl Workers {
    /// Starts one worker thread per entry of `listeners`. The threads run until the process
    /// exits: on drain their listeners close and their connections finish.
    pub fn start(
        shared: Arc<Shared>,
        listeners: Vec<WorkerListeners>,
        drain: Drain,
    ) -> Result<Workers> {
        let count = listeners.len();
        for (index, listeners) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let drain = drain.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start a worker's runtime")?;
            std::thread::Builder::new()
                .name(format!("steer-worker-{index}"))
                .spawn(move || {
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&runtime, run(shared, listeners, drain));
                })
                .context("cannot start a worker thread")?;
        }
        Ok(Workers { count })
    }
}

async fn run(shared: Arc<Shared>, listeners: WorkerListeners, drain: Drain) {
    let worker = Rc::new(Worker::new(shared));
    let sweeping = worker.clone();
    tokio::task::spawn_local(async move {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            ticks.tick().await;
            sweeping.pool.sweep();
            give_back_memory(&sweeping.shared);
        }
    });
    let gateway = listeners.gateway.map(|l| (l, Listener::Gateway));
    let all = listeners
        .redirect
        .into_iter()
        .map(|l| (l, Listener::Redirect))
        .chain(gateway);
    for (listener, kind) in all {
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                tokio::task::spawn_local(serve(worker.clone(), listener, kind, drain.clone()));
            }
            Err(err) => warn!(error = %err, "cannot register a listener with the worker"),
        }
    }
    drop(drain);
    // Connections are tasks of this worker: keep running them until the process exits.
    std::future::pending::<()>().await;
}

/// One worker's state. Only its own thread touches it.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub pool: Rc<Pool>,
    snapshot: RefCell<Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>>,
    routes: RefCell<RouteCache>,
    /// Each stamped release's signatures under the shared keys.
    signatures: RefCell<foldhash::HashMap<Box<str>, Vec<String>>>,
}

/// Handing memory back costs a walk of the allocator's heap: only after this many closed.
const TRIM_AFTER_CLOSED: usize = 256;

/// A burst of connections leaves freed buffers in the allocator; without this an agent that
/// once held 10,000 connections keeps their memory forever.
fn give_back_memory(shared: &Shared) {
    let open = shared.open_connections.load(Ordering::Relaxed);
    if shared
        .peak_connections
        .load(Ordering::Relaxed)
        .saturating_sub(open)
        >= TRIM_AFTER_CLOSED
    {
        shared.peak_connections.store(open, Ordering::Relaxed);
        // SAFETY: malloc_trim only releases free memory of the allocator.
        unsafe { libc::malloc_trim(0) };
    }
}

/// What a worker resolves once per route and configuration, so a request builds no label or
/// header value: the route's metric series, the stamp it puts on requests and the values of
/// the debug response headers.
pub struct RouteEntry {
    series: RouteSeries,
    pub stamp: Option<Stamp>,
    /// `x-steer-service`, `x-steer-version`, `x-steer-release`.
    pub debug_headers: [(HeaderName, Option<HeaderValue>); 3],
    /// Requests along this route by caller, for the live page.
    pub edges: Edges,
}

/// Route entries, for the snapshot they were resolved in.
#[derive(Default)]
struct RouteCache {
    snapshot: Option<Arc<Snapshot>>,
    /// Keyed by the addresses of the route's parts in `snapshot`, which keeps them alive.
    routes: foldhash::HashMap<(usize, usize, usize), Rc<RouteEntry>>,
}

impl Worker {
    fn new(shared: Arc<Shared>) -> Worker {
        Worker {
            snapshot: RefCell::new(Cache::new(shared.state.clone())),
            shared,
            pool: Rc::default(),
            routes: RefCell::default(),
            signatures: RefCell::default(),
        }
    }

    /// Verifies stamps with this worker's cache of signatures.
    pub fn stamp_verifier(&self) -> CachedVerifier<'_> {
        CachedVerifier {
            keys: &self.shared.stamp_keys,
            signatures: &self.signatures,
        }
    }

    /// The snapshot in force (a pointer comparison unless it changed).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow_mut().load().clone()
    }

    /// The entry of `route`, a route of `snapshot`.
    pub fn route_entry(&self, snapshot: &Arc<Snapshot>, route: &Route) -> Rc<RouteEntry> {
        let mut cache = self.routes.borrow_mut();
        if !cache
            .snapshot
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, snapshot))
        {
            cache.snapshot = Some(snapshot.clone());
            cache.routes.clear();
        }
        let key = (
            std::ptr::from_ref(route.service) as usize,
            std::ptr::from_ref(route.version) as usize,
            route.release.map_or(0, |r| std::ptr::from_ref(r) as usize),
        );
        let metrics = &self.shared.metrics;
        cache
            .routes
            .entry(key)
            .or_insert_with(|| {
                let release = route.release.map(|r| &*r.name);
                let stamp = release.and_then(|r| Stamp::new(r, &self.shared.stamp_keys));
                let value = |name: &str| HeaderValue::from_str(name).ok();
                Rc::new(RouteEntry {
                    series: metrics.route_series(&route.service.name, &route.version.name, release),
                    edges: Edges::new(metrics, release),
                    debug_headers: [
                        (
                            HeaderName::from_static("x-steer-service"),
                            value(&route.service.name),
                        ),
                        (
                            HeaderName::from_static("x-steer-version"),
                            value(&route.version.name),
                        ),
                        (
                            HeaderName::from_static("x-steer-release"),
                            release.and_then(value),
                        ),
                    ],
                    stamp,
                })
            })
            .clone()
    }

    /// Counts a request and its latency under its route.
    pub fn observe(&self, entry: &RouteEntry, status: StatusCode, took: Duration) {
        entry.series.observe(&self.shared.metrics, status, took);
    }
}

/// Accepts connections until the drain starts.
async fn serve(worker: Rc<Worker>, listener: TcpListener, kind: Listener, mut drain: Drain) {
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(admitted) = Admitted::new(&worker.shared) else {
                    refuse(&worker.shared, stream, peer, kind, &mut last_warning);
                    continue;
                };
                tokio::task::spawn_local(connection(
                    worker.clone(),
                    admitted,
                    stream,
                    peer,
                    kind,
                    drain.clone(),
                ));
            }
            Err(err) => {
                // One line a second at most: a full file table must not fill the disk too.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    warn!(error = %err, "accept failed; backing off");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// A client connection counted against `Limits::max_connections` until it drops.
struct Admitted(Arc<Shared>);

impl Admitted {
    fn new(shared: &Arc<Shared>) -> Option<Admitted> {
        let open = shared.open_connections.fetch_add(1, Ordering::Relaxed);
        let admitted = Admitted(shared.clone());
        if open >= shared.limits.max_connections {
            return None;
        }
        shared.metrics.client_connections(open + 1);
        shared
            .peak_connections
            .fetch_max(open + 1, Ordering::Relaxed);
        Some(admitted)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let open = self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.client_connections(open - 1);
    }
}

/// Closes a connection over the limit at once: the client sees the close (and retries, or
/// fails fast) instead of the node running out of file descriptors.
fn refuse(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    kind: Listener,
    last_warning: &mut Option<Instant>,
) {
    if let (Listener::Redirect, Some(originals)) = (kind, &shared.originals) {
        // Its record would otherwise wait for a client port to be reused.
        originals.take(peer);
    }
    // Counted before the close, so whoever sees the close sees the count.
    shared.metrics.connection_refused();
    drop(stream);
    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        warn!(
            limit = shared.limits.max_connections,
            "client connection refused: too many open"
        );
        *last_warning = Some(Instant::now());
    }
}

/// What a client's first bytes say it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// Not HTTP, or nothing within the sniff's patience.
    Other,
    /// The start of a request line or preface, and no more by the sniff's deadline.
    Stalled,
}

/// The HTTP/2 connection preface (h2c with prior knowledge, gRPC).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// A token character (RFC 9110 section 5.6.2): what a method is made of.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Classifies the first bytes a client sent, or `None` while they could still be either.
/// HTTP/1 is a request line: a method of any token (PROPFIND, PURGE, QUERY...), a space and a
/// request target (`/`, `*`, or an absolute `http://...`), not a list of known methods.
fn classify(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() {
        return Some(Protocol::Other);
    }
    if first.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if H2_PREFACE.starts_with(first) {
        return None;
    }
    let method_len = first.iter().take_while(|&&b| is_tchar(b)).count();
    match first.get(method_len) {
        // All token so far: the method goes on, or the peek was short.
        None if method_len < first.len().max(PEEK_BYTES) => None,
        Some(b' ') if method_len > 0 => match first.get(method_len + 1) {
            None => None,
            Some(b'/' | b'*' | b'h' | b'H') => Some(Protocol::Http1),
            Some(_) => Some(Protocol::Other),
        },
        _ => Some(Protocol::Other),
    }
}

/// Bytes looked at: enough for the longest registered methods and the target's first byte.
const PEEK_BYTES: usize = 24;

/// Peeks at the client's first bytes until `deadline` (they stay in the socket for the server
/// to read).
async fn sniff(stream: &TcpStream, deadline: tokio::time::Instant) -> Protocol {
    let mut buf = [0u8; PEEK_BYTES];
    let mut pause = Duration::from_millis(1);
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let Ok(Ok(n)) = peeked else {
            return Protocol::Other;
        };
        if let Some(protocol) = classify(&buf[..n]) {
            return protocol;
        }
        // A partial preface or method. Peeked bytes stay readable, so the peek above answers
        // at once however late it is: the deadline is checked here.
        if tokio::time::Instant::now() >= deadline {
            return Protocol::Stalled;
        }
        // Wait a moment rather than for the bytes, longer each time (a client trickling
        // bytes costs few wake-ups).
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

async fn connection(
    worker: Rc<Worker>,
    _admitted: Admitted,
    stream: TcpStream,
    peer: SocketAddr,
    kind: Listener,
    mut drain: Drain,
) {
    let _ = stream.set_nodelay(true);
    // The first request head is due within the idle timeout of connecting, however long the
    // sniff took of it (nginx's client_header_timeout).
    let connected_at = tokio::time::Instant::now();
    let head_due = connected_at + worker.shared.limits.idle_timeout;
    // The original destination is known only at accept time: the record is keyed by the peer.
    let original = match (kind, &worker.shared.originals) {
        (Listener::Redirect, Some(originals)) => {
            let original = originals.take(peer);
            worker.shared.metrics.redirect(original.is_some());
            original
        }
        _ => None,
    };
    let snapshot = worker.snapshot();
    let (connected, declared) =
        match original.and_then(|address| Some(snapshot.service_at(address)?.clone_identity())) {
            Some((name, declared)) => (Some(name), declared),
            None => (None, AppProtocol::Http),
        };
    // A redirected connection comes from a pod: which version it is, once per connection.
    let caller = Rc::new(Caller::new(
        connected.as_ref().map(|_| peer.ip()),
        &snapshot,
    ));
    drop(snapshot);
    let protocol = match (declared, &connected) {
        // Unread, at once: the server may be the one to speak first.
        (AppProtocol::Tcp, _) => Protocol::Other,
        (AppProtocol::Http, Some(_)) => sniff(&stream, head_due).await,
        // hyper takes what the short sniff could not tell (and times it by `head_due`).
        (AppProtocol::Http, None) => {
            match sniff(&stream, head_due.min(connected_at + GATEWAY_SNIFF)).await {
                Protocol::Other | Protocol::Stalled => Protocol::Http1,
                protocol => protocol,
            }
        }
    };
    if protocol == Protocol::Stalled {
        debug!(%peer, "no request line in time: closed");
        return;
    }
    if let (Protocol::Other, Some(service)) = (protocol, &connected) {
        l4::relay(&worker, stream, service).await;
        return;
    }
    // Whether a first request head arrived: until then the connection lives by `head_due`.
    let head_seen = Rc::new(std::cell::Cell::new(false));
    let activity = Rc::new(Activity::default());
    let service = {
        let worker = worker.clone();
        let drain = drain.clone();
        let head_seen = head_seen.clone();
        let activity = activity.clone();
        service_fn(move |request| {
            head_seen.set(true);
            let worker = worker.clone();
            let connected = connected.clone();
            let drain = drain.clone();
            let caller = caller.clone();
            let busy = activity.start();
            async move {
                let response =
                    handle(&worker, kind, connected.as_ref(), &drain, &caller, request).await;
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let io = TokioIo::new(stream);
    if protocol == Protocol::Http2 {
        let connection = http2::Builder::new(LocalExec)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(io, service);
        let idle_timeout = worker.shared.limits.idle_timeout;
        let mut connection = std::pin::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            // GOAWAY at once: HTTP/2 clients move on by themselves, streams in flight finish.
            _ = drain.signaled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            // A connection that never completed its preface, or went quiet: GOAWAY, and
            // closed if the client does not close it first.
            _ = activity.idle(idle_timeout, connected_at) => {
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(idle_timeout, connection)
                    .await
                    .unwrap_or(Ok(()))
            }
        };
        if let Err(err) = result {
            debug!(%peer, error = %err, "client connection ended");
        }
    } else {
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(worker.shared.limits.idle_timeout)
            .max_buf_size(MAX_HEADER_BYTES)
            .max_header_size(MAX_HEADER_BYTES)
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades();
        until_drained(
            connection,
            |c| c.graceful_shutdown(),
            DRAIN_PERIOD,
            &mut drain,
            peer,
            Some((head_due, &head_seen)),
        )
        .await;
    }
}

/// The requests of an HTTP/2 client connection: how many are being answered, and when the
/// last one was. Pings and other frames are not activity: a client stack answers those by
/// itself, so they would keep a forgotten connection open forever.
#[derive(Default)]
struct Activity {
    in_flight: std::cell::Cell<usize>,
    last: std::cell::Cell<Option<tokio::time::Instant>>,
}

/// A request being answered; when it drops, the connection's idle time starts again.
struct Busy(Rc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.in_flight.set(activity.in_flight.get() - 1);
        activity.last.set(Some(tokio::time::Instant::now()));
    }
}

impl Activity {
    fn start(self: &Rc<Self>) -> Busy {
        self.in_flight.set(self.in_flight.get() + 1);
        Busy(self.clone())
    }

    /// Resolves once no request has been answered for `timeout` (counted from `since`, the
    /// accept, before the first).
    async fn idle(&self, timeout: Duration, since: tokio::time::Instant) {
        loop {
            let last = self.last.get().unwrap_or(since);
            if self.in_flight.get() == 0 && last.elapsed() >= timeout {
                return;
            }
            tokio::time::sleep_until(last + timeout).await;
            if self.in_flight.get() > 0 {
                // Looked at again a timeout after this one ends.
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// How long an HTTP/1 connection is still served once the drain starts. HTTP/1 has no way to
/// tell an idle client to go: closing its connection at once fails the request it may be
/// sending right then. Meanwhile every response says `Connection: close`, so active clients
/// reconnect (to the cluster's service path: the datapath is detached); what is still idle at
/// the end is closed.
const DRAIN_PERIOD: Duration = Duration::from_secs(1);

/// Serves a connection; once the drain starts, it keeps serving for `goodbye`, then finishes
/// the request in flight and closes (HTTP/2: GOAWAY). With `first_head`, a connection whose
/// first request head has not arrived by its time is closed then: hyper's header timeout
/// counts from its own first read, after the sniff.
async fn until_drained<C>(
    connection: C,
    shutdown: impl FnOnce(Pin<&mut C>),
    goodbye: Duration,
    drain: &mut Drain,
    peer: SocketAddr,
    first_head: Option<(tokio::time::Instant, &std::cell::Cell<bool>)>,
) where
    C: Future<Output = hyper::Result<()>>,
{
    let mut connection = std::pin::pin!(connection);
    let head_missed = async {
        let Some((due, seen)) = first_head else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(due).await;
        if seen.get() {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = head_missed => {
            debug!(%peer, "no request head in time: closed");
            return;
        }
        _ = drain.signaled() => {
            match tokio::time::timeout(goodbye, connection.as_mut()).await {
                Ok(result) => result,
                Err(_) => {
                    shutdown(connection.as_mut());
                    connection.await
                }
            }
        }
    };
    if let Err(err) = result {
        debug!(%peer, error = %err, "client connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http1_http2_and_other_protocols_apart() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET http://a/ HTTP/1.1"), Some(Protocol::Http1));
        // Any token method, not a list.
        for method in [
            "PROPFIND", "REPORT", "QUERY", "PURGE", "MKCOL", "LINK", "X-CUSTOM",
        ] {
            let line = format!("{method} /x HTTP/1.1\r\n");
            assert_eq!(classify(line.as_bytes()), Some(Protocol::Http1), "{method}");
        }
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\n"), Some(Protocol::Http2));
        // Could still be a method or the preface: wait for more.
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"PROPFI"), None);
        assert_eq!(classify(b"GET "), None);
        assert_eq!(classify(b"POST /"), Some(Protocol::Http1));
        // Not a request line.
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Other));
        assert_eq!(
            classify(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n"),
            Some(Protocol::Other)
        );
        assert_eq!(classify(b"GET key\r\n"), Some(Protocol::Other));
        assert_eq!(classify(b"*3\r\n$3\r\nSET"), Some(Protocol::Other));
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            Some(Protocol::Other)
        );
        assert_eq!(classify(b""), Some(Protocol::Other));
    }
}
