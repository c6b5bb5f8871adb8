//! The node proxy: where redirected pod connections (and the gateway's north-south traffic)
//! arrive. Each request is scheduled to at most one canary release, decided once and stamped,
//! and sent to the version of the destination service that belongs to that release, or to the
//! primary version; never to another version.

mod l4;
mod pool;
pub mod stamp;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    drain::Drain,
    metrics::Metrics,
    state::{Endpoint, Snapshot},
};

pub use pool::Pool;

/// Recovers the service address a redirected client connected to (the eBPF datapath).
pub trait OriginalDestination: Send + Sync {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr>;
}

impl OriginalDestination for crate::datapath::OriginalDestinations {
    fn take(&self, client: SocketAddr) -> Option<SocketAddr> {
        crate::datapath::OriginalDestinations::take(self, client)
    }
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Redirected pod connections: inside the mesh, stamps are honoured.
    Redirect,
    /// North-south entry: stamps are stripped and the rules decide.
    Gateway,
}

/// Request headers larger than this are refused with 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

type Body = BoxBody<Bytes, hyper::Error>;

/// Everything the request path shares.
pub struct Proxy {
    pub state: Arc<ArcSwap<Snapshot>>,
    pub originals: Option<Arc<dyn OriginalDestination>>,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
}

/// Accepts connections until the drain starts.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, kind: Listener, mut drain: Drain) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let drain = drain.clone();
        tokio::spawn(async move { connection(proxy, stream, peer, kind, drain).await });
    }
}

async fn connection(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    kind: Listener,
    mut drain: Drain,
) {
    // The original destination is known only at accept time: the record is keyed by the peer.
    let original = match (kind, &proxy.originals) {
        (Listener::Redirect, Some(originals)) => originals.take(peer),
        _ => None,
    };
    let service = original.and_then(|addr| {
        proxy
            .state
            .load()
            .service_at(addr)
            .map(|name| (name.to_string(), addr))
    });
    if let Some((service, _)) = &service
        && !l4::looks_like_http(&stream).await
    {
        l4::relay(&proxy, stream, service).await;
        return;
    }
    let service = service.map(|(name, _)| Arc::<str>::from(name));
    let handler = {
        let proxy = proxy.clone();
        service_fn(move |request| {
            let proxy = proxy.clone();
            let service = service.clone();
            async move { Ok::<_, hyper::Error>(handle(&proxy, kind, service.as_deref(), request).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), handler);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                debug!(%peer, error = %err, "client connection ended");
            }
        }
        _ = drain.signaled() => {
            // Finish the request in flight, then close (GOAWAY for HTTP/2).
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

fn text_response(status: StatusCode, reason: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(
            Full::new(Bytes::from(reason + "\n"))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response parts are valid")
}

/// The service a request is for, when the connection did not say: the gateway's routes, or a
/// Host naming a service (by name, or one of its addresses).
fn service_from_request(
    snapshot: &Snapshot,
    kind: Listener,
    request: &Request<Incoming>,
) -> Option<String> {
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    if kind == Listener::Gateway {
        let bare_host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let path = request.uri().path();
        if let Some(route) = snapshot.config.gateway.routes.iter().find(|route| {
            route
                .host
                .as_deref()
                .is_none_or(|h| h.eq_ignore_ascii_case(bare_host))
                && route
                    .path_prefix
                    .as_deref()
                    .is_none_or(|p| path.starts_with(p))
        }) {
            return Some(route.service.clone());
        }
    }
    if let Ok(address) = host.parse::<SocketAddr>() {
        return snapshot.service_at(address).map(str::to_string);
    }
    let mut name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    // The longest leading part that names a service: `restaurant.food.svc.cluster.local` is
    // `restaurant.food` on Kubernetes and `restaurant` in a file.
    loop {
        if snapshot.has_service(name) {
            return Some(name.to_string());
        }
        name = name.rsplit_once('.')?.0;
    }
}

/// Power of two choices on in-flight requests: cheap, and it steers away from slow pods.
fn pick(endpoints: &[Endpoint], not: Option<SocketAddr>) -> Option<&Endpoint> {
    let candidates: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| Some(e.address) != not)
        .collect();
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = candidates[fastrand::usize(..n)];
            let b = candidates[fastrand::usize(..n)];
            Some(if b.in_flight() < a.in_flight() { b } else { a })
        }
    }
}

/// Headers that describe one connection, not the request (RFC 9110 section 7.6.1), plus the
/// ones the Connection header names.
fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == http::header::UPGRADE) {
            headers.remove(name);
        }
    }
    // `te: trailers` is kept: gRPC servers require it, and it means the same on every hop.
    let te_trailers = headers
        .get("te")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert("te", HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(http::header::CONNECTION);
        headers.remove(http::header::UPGRADE);
    }
}

struct Decision<'a> {
    service: &'a str,
    version: &'a str,
    release: Option<&'a str>,
}

fn debug_headers(response: &mut Response<Body>, decision: &Decision) {
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-steer-service", Some(decision.service)),
        ("x-steer-version", Some(decision.version)),
        ("x-steer-release", decision.release),
    ] {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    }
}

async fn handle(
    proxy: &Proxy,
    kind: Listener,
    service: Option<&str>,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let snapshot = proxy.state.load_full();
    let service = match service {
        Some(service) => service.to_string(),
        None => match service_from_request(&snapshot, kind, &request) {
            Some(service) => service,
            None => {
                proxy.metrics.unrouted();
                return text_response(
                    StatusCode::NOT_FOUND,
                    "steer: no mesh service for this request (unknown destination and Host)".into(),
                );
            }
        },
    };
    if kind == Listener::Gateway {
        stamp::strip(request.headers_mut());
    }
    // Decide once: inside the mesh an existing stamp is the decision. A stamp naming a release
    // this snapshot does not have (one just retired) means primary, and the stamp stays on the
    // request: deciding again could move it into another release halfway along its chain.
    let stamped = match kind {
        Listener::Redirect => stamp::read(request.headers()).map(str::to_string),
        Listener::Gateway => None,
    };
    let release = match &stamped {
        Some(name) => snapshot.rules.get(name),
        None => snapshot.rules.decide(request.headers()),
    };
    if let Some(release) = release {
        stamp::write(request.headers_mut(), &release.name);
    }
    let Some(version) = snapshot.version_for(&service, release) else {
        return text_response(
            StatusCode::NOT_FOUND,
            format!("steer: unknown service `{service}`"),
        );
    };
    let decision = Decision {
        service: &service,
        version,
        release: release.map(|r| &*r.name),
    };
    debug!(
        service,
        version,
        release = decision.release.unwrap_or("-"),
        method = %request.method(),
        path = request.uri().path(),
        "request"
    );
    let mut response = forward(proxy, &snapshot, &decision, request).await;
    proxy.metrics.observe(
        decision.service,
        decision.version,
        decision.release,
        response.status(),
        started.elapsed(),
    );
    if snapshot.config.debug_headers {
        debug_headers(&mut response, &decision);
    }
    response
}

async fn forward(
    proxy: &Proxy,
    snapshot: &Snapshot,
    decision: &Decision<'_>,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let endpoints = snapshot.endpoints(decision.service, decision.version);
    let release = decision.release.unwrap_or("none");
    let Some(first) = pick(endpoints, None) else {
        // Never spill to another version: that would put the request in another release.
        return text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "steer: no ready endpoint for {}/{} (release {release}); not sent to another version",
                decision.service, decision.version
            ),
        );
    };
    let http2 = request.version() == Version::HTTP_2;
    let upgrade = !http2 && request.headers().contains_key(http::header::UPGRADE);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    remove_hop_by_hop(request.headers_mut(), upgrade);
    prepare_uri(&mut request, decision.service, http2);

    // One retry on a connect failure, to another endpoint of the same version.
    let mut endpoint = first;
    let mut upstream = proxy.pool.get(endpoint.address, http2).await;
    if let Err(err) = &upstream
        && let Some(other) = pick(endpoints, Some(endpoint.address))
    {
        debug!(endpoint = %endpoint.address, error = %err, "connect failed; retrying another endpoint");
        endpoint = other;
        upstream = proxy.pool.get(endpoint.address, http2).await;
    }
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(err) => {
            proxy.metrics.upstream_error();
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "steer: {}/{} (release {release}) unreachable: {err:#}",
                    decision.service, decision.version
                ),
            );
        }
    };
    let _in_flight = endpoint.start();
    // The whole exchange with the upstream, up to its response headers.
    let sent = tokio::time::timeout(
        snapshot.request_timeout(decision.service),
        proxy.pool.send(endpoint.address, upstream, request),
    )
    .await;
    let mut response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            proxy.metrics.upstream_error();
            return text_response(
                StatusCode::BAD_GATEWAY,
                format!("steer: {} failed: {err:#}", endpoint.address),
            );
        }
        Err(_) => {
            proxy.metrics.upstream_error();
            return text_response(
                StatusCode::GATEWAY_TIMEOUT,
                format!("steer: {} did not answer in time", endpoint.address),
            );
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(err) => debug!(error = %err, "upgrade failed"),
            }
        });
    } else {
        remove_hop_by_hop(response.headers_mut(), false);
    }
    response.map(BodyExt::boxed)
}

/// HTTP/1.1 upstreams take the origin form; HTTP/2 needs scheme and authority.
fn prepare_uri(request: &mut Request<Incoming>, service: &str, http2: bool) {
    if !http2 {
        let origin = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if let Ok(uri) = origin.parse::<Uri>() {
            *request.uri_mut() = uri;
        }
        if !request.headers().contains_key(http::header::HOST)
            && let Ok(host) = HeaderValue::from_str(service)
        {
            request.headers_mut().insert(http::header::HOST, host);
        }
        return;
    }
    let authority = request
        .uri()
        .authority()
        .map_or(service.to_string(), |a| a.to_string());
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Ok(uri) = format!("http://{authority}{path}").parse::<Uri>() {
        *request.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests;
