//! The request path around the routing decision: stamp and headers, an endpoint of the chosen
//! version (one retry on a connect failure, never another version), the upstream exchange
//! within the service's timeout, metrics and debug headers.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Instant};

use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::{
    Listener,
    balance::pick,
    body::{ClientBody, PooledBody, ProxyBody},
    edges::Caller,
    error::{ProxyError, fail_to_proxy},
    headers::{check_framing, prepare_uri, remove_hop_by_hop},
    pool::{self, Http1Conn},
    route::{Route, route},
    stamp,
    worker::{RouteEntry, Worker},
};
use crate::{drain::Drain, state::Endpoint};

/// Serves one request of a client connection.
pub async fn handle(
    worker: &Worker,
    listener: Listener,
    connected: Option<&Arc<str>>,
    drain: &Drain,
    caller: &Caller,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let http1 = request.version() != Version::HTTP_2;
    let metrics = &worker.shared.metrics;
    if http1 && let Err(framing) = check_framing(&request) {
        // The body's end cannot be trusted: nothing after it on this connection either.
        let mut response = fail_to_proxy(&ProxyError::Malformed(framing), metrics);
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let snapshot = worker.snapshot();
    let route = match route(
        &snapshot,
        listener,
        connected,
        &worker.stamp_verifier(),
        &request,
    ) {
        Ok(route) => route,
        Err(err) => return fail_to_proxy(&err, metrics),
    };
    debug!(
        service = &*route.service.name,
        version = &*route.version.name,
        release = route.release.map_or("-", |r| &*r.name),
        method = %request.method(),
        path = request.uri().path(),
        "request"
    );
    let entry = worker.route_entry(&snapshot, &route);
    let mut response = match forward(worker, &route, &entry, drain, request).await {
        Ok(response) => response,
        Err(err) => fail_to_proxy(&err, metrics),
    };
    if http1 && drain.is_draining() {
        // The client reconnects for its next request, to a proxy that stays.
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    worker.observe(&entry, response.status(), started.elapsed());
    let caller = caller.id(&snapshot);
    (entry.edges).observe(metrics, &snapshot, &route, caller, response.status());
    // Internal names are for the mesh's own callers; outsiders see them only when asked for.
    if snapshot.config.debug_headers && (!route.from_outside || worker.shared.outside_debug_headers)
    {
        for (name, value) in &entry.debug_headers {
            if let Some(value) = value {
                response.headers_mut().insert(name, value.clone());
            }
        }
    }
    response
}

async fn forward(
    worker: &Worker,
    route: &Route<'_>,
    entry: &RouteEntry,
    drain: &Drain,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let http2 = request.version() == Version::HTTP_2;
    let upgrade = !http2 && request.headers().contains_key(http::header::UPGRADE);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    // Hop-by-hop first: a client's `Connection` header must not be able to remove our stamp.
    remove_hop_by_hop(request.headers_mut(), upgrade);
    if route.strip_stamp {
        stamp::strip(request.headers_mut());
    }
    // The entry's stamp is the route's release, signed.
    if let Some(stamp) = &entry.stamp {
        stamp::write(request.headers_mut(), stamp);
    }
    prepare_uri(&mut request, &route.service.name, http2);
    let timeout = route.service.request_timeout;

    if http2 {
        let pool = &worker.pool;
        let (endpoint, mut sender) = connect(route, |e| pool.http2(e)).await?;
        let _in_flight = endpoint.start();
        let response = within(timeout, endpoint.address, sender.send_request(request)).await?;
        return Ok(response.map(ProxyBody::Streamed));
    }
    if let Some(client_upgrade) = client_upgrade {
        let (endpoint, sender) = connect(route, pool::upgradable).await?;
        let _in_flight = endpoint.start();
        let tunnel = Tunnel {
            client: client_upgrade,
            drain: drain.clone(),
        };
        return pass_upgrade(timeout, endpoint.address, sender, request, tunnel).await;
    }
    // A body of unknown length (it came chunked; Transfer-Encoding was removed as hop-by-hop)
    // is sent chunked. Said explicitly: for GET and HEAD hyper would otherwise drop it.
    if !request.body().is_end_stream() && request.body().size_hint().exact().is_none() {
        request.headers_mut().insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let pool = &worker.pool;
    let (endpoint, mut conn) = connect(route, |e| pool.http1(e)).await?;
    let _in_flight = endpoint.start();
    let address = endpoint.address;
    let (head, body) = request.into_parts();
    let (body, body_state) = ClientBody::new(body);
    let request = Request::from_parts(head, body);
    let response = tokio::time::timeout(timeout, async {
        match conn.send(request).await {
            Ok(response) => Ok(response),
            // A pooled connection its endpoint had closed: the request was not sent, so it
            // goes once more on a fresh connection to the same endpoint.
            Err(mut err) => match err.take_message() {
                Some(request) => {
                    debug!(endpoint = %address, error = %err.error(), "stale pooled connection; reconnecting");
                    conn = Http1Conn::connect(address)
                        .await
                        .map_err(|cause| unreachable(route, cause))?;
                    conn.send(request)
                        .await
                        .map_err(|err| upstream_failed(address, err.into_error()))
                }
                None => Err(upstream_failed(address, err.into_error())),
            },
        }
    })
    .await
    .map_err(|_| {
        // Still waiting for the client's body: the client is the slow one.
        if body_state.client_is_late() {
            ProxyError::ClientTimeout
        } else {
            ProxyError::Timeout { endpoint: address }
        }
    })??;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProxyError::UnaskedUpgrade { endpoint: address });
    }
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers, false);
    let read_timeout = worker.shared.limits.upstream_read_timeout;
    let body = PooledBody::new(body, conn, address, worker.pool.clone(), read_timeout);
    Ok(Response::from_parts(parts, ProxyBody::Pooled(body)))
}

/// A connection to an endpoint of the route's version: one retry on another endpoint of the
/// same version when the first cannot be reached; never another version, since that would put
/// the request in another release.
async fn connect<'r, C, F>(
    route: &'r Route<'_>,
    mut open: F,
) -> Result<(&'r Endpoint, C), ProxyError>
where
    F: AsyncFnMut(SocketAddr) -> anyhow::Result<C>,
{
    let endpoints = &route.version.endpoints;
    let Some(first) = pick(endpoints, None) else {
        return Err(ProxyError::NoEndpoint {
            service: route.service.name.clone(),
            version: route.version.name.clone(),
            release: release_name(route),
        });
    };
    let err = match open(first.address).await {
        Ok(conn) => return Ok((first, conn)),
        Err(err) => err,
    };
    let Some(other) = pick(endpoints, Some(first.address)) else {
        return Err(unreachable(route, err));
    };
    debug!(endpoint = %first.address, error = %format!("{err:#}"), "connect failed; retrying another endpoint");
    match open(other.address).await {
        Ok(conn) => Ok((other, conn)),
        Err(err) => Err(unreachable(route, err)),
    }
}

fn release_name(route: &Route) -> Arc<str> {
    route
        .release
        .map_or_else(|| Arc::from("none"), |r| r.name.clone())
}

fn unreachable(route: &Route, cause: anyhow::Error) -> ProxyError {
    ProxyError::Unreachable {
        service: route.service.name.clone(),
        version: route.version.name.clone(),
        release: release_name(route),
        cause,
    }
}

/// A failed exchange: the upstream's failure, unless what failed was reading the client's
/// own request body (hyper reports that as an error of the body it was given).
fn upstream_failed(endpoint: SocketAddr, cause: hyper::Error) -> ProxyError {
    use std::error::Error as _;
    if cause.is_user()
        && let Some(client) = cause
            .source()
            .and_then(|s| s.downcast_ref::<hyper::Error>())
    {
        return ProxyError::ClientBody {
            cause: client.to_string(),
        };
    }
    ProxyError::UpstreamFailed { endpoint, cause }
}

/// The exchange up to the response headers, within the service's request timeout.
async fn within<T>(
    timeout: std::time::Duration,
    endpoint: SocketAddr,
    exchange: impl Future<Output = hyper::Result<T>>,
) -> Result<T, ProxyError> {
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result.map_err(|cause| upstream_failed(endpoint, cause)),
        Err(_) => Err(ProxyError::Timeout { endpoint }),
    }
}

/// The client's side of an upgrade, and its hold on the drain: a tunnel gets the grace period
/// like a request in flight.
struct Tunnel {
    client: hyper::upgrade::OnUpgrade,
    drain: Drain,
}

async fn pass_upgrade(
    timeout: std::time::Duration,
    endpoint: SocketAddr,
    mut sender: hyper::client::conn::http1::SendRequest<Incoming>,
    request: Request<Incoming>,
    tunnel: Tunnel,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut response = within(timeout, endpoint, sender.send_request(request)).await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::task::spawn_local(async move {
            let _holds = tunnel.drain;
            match tokio::try_join!(tunnel.client, upstream_upgrade) {
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
    Ok(response.map(ProxyBody::Streamed))
}
