//! The demo workload: one "pod" of one version of a service.
//!
//! It answers every request with JSON naming itself (service, version, the release stamp it
//! saw) and the answers of the downstream services it calls, so a client sees the whole path
//! of versions its request took. Like an instrumented application it forwards the tag
//! headers, the stamp and `baggage` to its downstream calls, and it calls them by their
//! *service* address, never by pod IP: only the node agent decides where a call goes.
//!
//! For the proxy's tests it also speaks HTTP/2 (h2c), sends gRPC-style trailers on `/trailers`,
//! streams request bodies back on `/echo`, answers `?sleep=MS` after a delay, and
//! accepts `Upgrade` requests (101) on which it echoes bytes back, like a WebSocket echo. For
//! the rollout tests a version can be made faulty (`--fail-every N`) or slow (`--delay-ms`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    /// The service this pod belongs to.
    #[arg(long)]
    service: String,
    /// The version of the service this pod runs.
    #[arg(long)]
    version: String,
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// A downstream call, `name=host:port` (the service address or its DNS name); repeat for
    /// more, called in order.
    #[arg(long = "call", value_parser = parse_call)]
    calls: Vec<(String, String)>,
    /// Request headers passed on to downstream calls.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "x-device,x-region,x-user-id,x-steer-release,baggage"
    )]
    forward: Vec<String>,
    /// A faulty version: every Nth request is answered 500 (0: none).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// A slow version: every answer waits this long first.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn parse_call(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, address)) if address.rsplit_once(':').is_some() => {
            Ok((name.to_string(), address.to_string()))
        }
        _ => Err(format!("`{arg}` is not name=host:port")),
    }
}

/// What one service version answers: itself and the answers of everything it called.
#[derive(Debug, Serialize, Deserialize)]
struct Hop {
    service: String,
    version: String,
    /// The `x-steer-release` stamp on the request this hop received, if any.
    release: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    calls: Vec<Hop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut accepted = 0u64;
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        accepted += 1;
        let connection = accepted;
        let args = args.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let nth = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let answer = handle(args.clone(), req, nth);
                async move {
                    let mut response = answer.await?;
                    // Which of this pod's connections carried the request: shows reuse.
                    response
                        .headers_mut()
                        .insert("x-demo-connection", connection.into());
                    Ok::<_, Infallible>(response)
                }
            });
            // A client that goes away mid-request is not this service's problem.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    args: Arc<Args>,
    mut req: Request<Incoming>,
    nth: u64,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    if args.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
    }
    if args.fail_every > 0 && nth.is_multiple_of(args.fail_every) {
        return Ok(Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Full::new(Bytes::from_static(b"injected failure\n")).boxed())
            .expect("valid response"));
    }
    if req.headers().contains_key("upgrade") {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()).boxed())
            .expect("valid response"));
    }
    if req.uri().path() == "/echo" {
        return Ok(Response::new(echo(req.into_body())));
    }
    if let Some(ms) = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("sleep="))
        .and_then(|ms| ms.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let release = req
        .headers()
        .get("x-steer-release")
        .and_then(|v| v.to_str().ok())
        // `NAME;sig=...`: the name is what the hop reports.
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string());
    let mut hop = Hop {
        service: args.service.clone(),
        version: args.version.clone(),
        release,
        calls: Vec::new(),
        error: None,
    };
    let mut status = StatusCode::OK;
    for (name, addr) in &args.calls {
        match call(&args, name, addr, &req).await {
            Ok(downstream) => hop.calls.push(downstream),
            Err(err) => {
                status = StatusCode::BAD_GATEWAY;
                hop.calls.push(Hop {
                    service: name.clone(),
                    version: String::new(),
                    release: None,
                    calls: Vec::new(),
                    error: Some(format!("{err:#}")),
                });
            }
        }
    }
    let body = Full::new(Bytes::from(
        serde_json::to_vec(&hop).expect("hop serialises"),
    ));
    // `/trailers` answers like a gRPC server: the status comes in trailers after the body.
    let body = if req.uri().path() == "/trailers" {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        body.with_trailers(async move { Some(Ok(trailers)) })
            .boxed()
    } else {
        body.boxed()
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body)
        .expect("valid response"))
}

/// `/echo` streams the request body back frame by frame as it arrives: behind a proxy that
/// held either body back until it was complete, the echo would wait for the whole upload.
fn echo(body: Incoming) -> BoxBody<Bytes, Infallible> {
    let frames = futures::stream::unfold(body, |mut body| async move {
        match body.frame().await {
            Some(Ok(frame)) => Some((Ok(frame), body)),
            _ => None,
        }
    });
    StreamBody::new(frames).boxed()
}

async fn call(args: &Args, name: &str, addr: &str, incoming: &Request<Incoming>) -> Result<Hop> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect to {addr}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::get("/").header("host", name);
    for header in &args.forward {
        for value in incoming.headers().get_all(header.as_str()) {
            request = request.header(header.as_str(), value);
        }
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(request.body(Full::new(Bytes::new()))?),
    )
    .await
    .context("request timed out")??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    serde_json::from_slice(&body).with_context(|| {
        format!(
            "{name} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )
    })
}
