//! The admin server (loopback by default): health, readiness, metrics, the snapshot in force,
//! and `explain` — the same answer as `steer explain`, from the running configuration.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::{metrics::Metrics, rules::HeaderPairs, state::Snapshot};

pub struct Admin {
    pub state: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// Set once the listeners are up; cleared when draining.
    pub ready: AtomicBool,
    /// Set once a configuration from the source is in force (at once for a file; after the
    /// first complete list of the cluster's objects for Kubernetes).
    pub synced: AtomicBool,
}

pub async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&admin, request)) }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %err, "admin connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((percent_decode(k), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(admin: &Admin, request: Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const JSON: &str = "application/json";
    match request.uri().path() {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz"
            if admin.ready.load(Ordering::Relaxed) && admin.synced.load(Ordering::Relaxed) =>
        {
            reply(StatusCode::OK, TEXT, "ready\n".into())
        }
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            admin.metrics.encode(),
        ),
        "/config" => {
            let snapshot = admin.state.load();
            let body = serde_json::to_string_pretty(&snapshot.config).expect("config serialises");
            reply(StatusCode::OK, JSON, body)
        }
        "/explain" => {
            let pairs = query_pairs(request.uri().query().unwrap_or(""));
            let Some(service) = pairs.iter().find(|(k, _)| k == "service").map(|(_, v)| v) else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    TEXT,
                    "explain needs ?service=NAME\n".into(),
                );
            };
            let mut headers = Vec::new();
            for (_, line) in pairs.iter().filter(|(k, _)| k == "header") {
                match HeaderPairs::parse_line(line) {
                    Ok(pair) => headers.push(pair),
                    Err(reason) => return reply(StatusCode::BAD_REQUEST, TEXT, reason + "\n"),
                }
            }
            match admin
                .state
                .load()
                .explain(service, &HeaderPairs::new(headers))
            {
                Some(explanation) => reply(
                    StatusCode::OK,
                    JSON,
                    serde_json::to_string(&explanation).expect("explanation serialises"),
                ),
                None => reply(
                    StatusCode::NOT_FOUND,
                    TEXT,
                    format!("no service `{service}`\n"),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "endpoints: /healthz /readyz /metrics /config /explain?service=..&header=Name:value\n"
                .into(),
        ),
    }
}

/// Where the admin server listens unless told otherwise: loopback only.
pub fn default_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        assert_eq!(
            query_pairs(
                "service=restaurant&header=x-device%3A%20android&header=x-region:+atlantis"
            ),
            [
                ("service".to_string(), "restaurant".to_string()),
                ("header".to_string(), "x-device: android".to_string()),
                ("header".to_string(), "x-region: atlantis".to_string()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
    }
}
