//! The admin server (loopback by default): health, readiness, metrics, the snapshot in force,
//! `explain` — the same answer as `steer explain`, from the running configuration — and the
//! live page (`/`): releases, chains of versions with the traffic between them, an explain box.
//! The page is embedded in the binary and loads nothing from anywhere else.

mod connection;
mod head;
pub mod live;
pub mod policy;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::{
    metrics::Metrics,
    rollout::{RolloutStatus, driver::Rollouts},
    rules::HeaderPairs,
    state::Snapshot,
};
pub use connection::Limits;
use live::Live;
pub use live::Rejection;
use policy::Refusal;

pub struct Admin {
    pub state: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// Set once the listeners are up; cleared when draining.
    pub ready: AtomicBool,
    /// Set once a configuration from the source is in force (at once for a file; after the
    /// first complete list of the cluster's objects for Kubernetes).
    pub synced: AtomicBool,
    /// The latest configuration refused by the checker, until one is applied (the page shows
    /// why).
    pub rejected: Mutex<Option<Rejection>>,
    /// The CanaryReleases the Kubernetes source left out, with why (the page lists them).
    pub left_out: Mutex<Vec<live::LeftOut>>,
    /// The progressive rollouts and where they stand.
    pub rollouts: Arc<Rollouts>,
}

impl Admin {
    /// Records the outcome of applying a configuration from `origin`.
    pub fn applied(&self, origin: &str, result: &anyhow::Result<()>) {
        let rejection = result.as_ref().err().and_then(|err| {
            let rejected = err.downcast_ref::<crate::state::Rejected>()?;
            Some(Rejection {
                origin: origin.to_string(),
                report: rejected.0.clone(),
            })
        });
        if result.is_ok() || rejection.is_some() {
            *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = rejection;
        }
    }
}

pub async fn serve(admin: Arc<Admin>, listener: TcpListener, limits: Limits) {
    let live = Arc::new(Live::default());
    {
        let (admin, live) = (admin.clone(), live.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(live::SAMPLE_EVERY);
            loop {
                ticks.tick().await;
                let snapshot = admin.state.load();
                (admin.metrics).releases_in_force(snapshot.rules.releases().len());
                let rollouts = admin.rollouts.views();
                let rollouts: Vec<_> = (rollouts.iter())
                    .map(|r| (r.release.as_str(), r.status.phase, r.status.percent))
                    .collect();
                admin.metrics.rollouts(&rollouts);
                live.sample(&admin.metrics, &snapshot);
            }
        });
    }
    connection::accept(
        listener,
        limits,
        move |request, local, refused| match refused
            .map_or_else(|| route(&admin, &live, &request, local), Err)
        {
            Ok(response) => response,
            Err(refusal) => refuse(refusal),
        },
    )
    .await
}

/// Serves only what a cluster's Prometheus and the kubelet need (`/metrics`, `/healthz`,
/// `/readyz`), so that listener can be on the node's address while the admin server, which
/// shows the rules and answers explain, stays on loopback. Its `Host` is not checked: what it
/// serves, anyone who can reach the node's address may read.
pub async fn serve_metrics(admin: Arc<Admin>, listener: TcpListener, limits: Limits) {
    connection::accept(listener, limits, move |request, _, refused| {
        let path = request.uri().path();
        let answer = match refused {
            Some(refusal) => Err(refusal),
            None if is_probe(path) => {
                policy::method(request.method(), policy::READ).map(|()| probe(&admin, path))
            }
            None => Ok(reply(
                StatusCode::NOT_FOUND,
                TEXT,
                "this listener serves /metrics, /healthz and /readyz\n".into(),
            )),
        };
        answer.unwrap_or_else(refuse)
    })
    .await
}

/// A refused request's answer: its status and reason, and what a 405 allows.
fn refuse(refusal: Refusal) -> Response<Full<Bytes>> {
    let mut response = reply(refusal.status, TEXT, format!("{}\n", refusal.reason));
    if let Some(allow) = refusal.allow {
        response
            .headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    }
    response
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Health, readiness and metrics: what both listeners answer.
fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// The answer to a probe path (see [`is_probe`]).
fn probe(admin: &Admin, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz"
            if admin.ready.load(Ordering::Relaxed) && admin.synced.load(Ordering::Relaxed) =>
        {
            reply(StatusCode::OK, TEXT, "ready\n".into())
        }
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        _ => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            admin.metrics.encode(),
        ),
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

/// The page's files, embedded at build time.
const PAGE: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/style.css");

/// An embedded file: nothing but this server is allowed as a source, so the page works with no
/// network and cannot be made to load anything from elsewhere.
fn asset(content_type: &str, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", content_type)
        .header(
            "content-security-policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        .header("x-content-type-options", "nosniff")
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("valid response")
}

/// The `header=Name:value` pairs of a query string.
fn header_pairs(pairs: &[(String, String)]) -> Result<HeaderPairs, String> {
    let mut headers = Vec::new();
    for (_, line) in pairs.iter().filter(|(k, _)| k == "header") {
        headers.push(HeaderPairs::parse_line(line)?);
    }
    Ok(HeaderPairs::new(headers))
}

/// What the admin server serves at a path.
enum Page {
    Probe,
    Asset(&'static str, &'static str),
    UiState,
    UiExplain,
    Rollouts,
    Config,
    Explain,
    /// A person's word on a rollout: `POST /rollouts/NAME/resume`, `/continue` or `/abort`
    /// (NAME percent-encoded).
    Rollout(String, RolloutAction),
}

/// What a person can ask of one rollout.
type RolloutAction = fn(&Rollouts, &str) -> Result<RolloutStatus, String>;

impl Page {
    fn of(path: &str) -> Option<Page> {
        if is_probe(path) {
            return Some(Page::Probe);
        }
        let action = (path.strip_prefix("/rollouts/")).and_then(|rest| {
            [
                ("resume", Rollouts::resume as RolloutAction),
                ("continue", Rollouts::continue_now),
                ("abort", Rollouts::abort),
            ]
            .into_iter()
            .find_map(|(word, act)| Some((rest.strip_suffix(word)?.strip_suffix('/')?, act)))
        });
        if let Some((name, act)) = action {
            return Some(Page::Rollout(percent_decode(name), act));
        }
        Some(match path {
            "/" | "/ui" | "/ui/" => Page::Asset("text/html; charset=utf-8", PAGE),
            "/ui/app.js" => Page::Asset("text/javascript; charset=utf-8", SCRIPT),
            "/ui/style.css" => Page::Asset("text/css; charset=utf-8", STYLE),
            "/ui/state" => Page::UiState,
            "/ui/explain" => Page::UiExplain,
            "/rollouts" => Page::Rollouts,
            "/config" => Page::Config,
            "/explain" => Page::Explain,
            _ => return None,
        })
    }
}

fn route(
    admin: &Admin,
    live: &Live,
    request: &Request<Incoming>,
    local: IpAddr,
) -> Result<Response<Full<Bytes>>, Refusal> {
    const JSON: &str = "application/json";
    policy::host(request.uri(), request.headers(), local)?;
    let path = request.uri().path();
    let Some(page) = Page::of(path) else {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "endpoints: / (the live page) /healthz /readyz /metrics /config \
             /explain?service=..&header=Name:value /rollouts (POST /rollouts/NAME/resume, \
             /rollouts/NAME/continue, /rollouts/NAME/abort) \
             /ui/state /ui/explain?header=Name:value\n"
                .into(),
        ));
    };
    if let Page::Rollout(name, act) = &page {
        policy::method(request.method(), policy::CHANGE)?;
        policy::state_change(request.headers(), local)?;
        return Ok(match act(&admin.rollouts, name) {
            Ok(status) => reply(
                StatusCode::OK,
                JSON,
                serde_json::to_string_pretty(&status).expect("status serialises"),
            ),
            Err(reason) => reply(StatusCode::CONFLICT, TEXT, reason + "\n"),
        });
    }
    policy::method(request.method(), policy::READ)?;
    let query = || query_pairs(request.uri().query().unwrap_or(""));
    Ok(match page {
        Page::Probe => probe(admin, path),
        Page::Asset(content_type, body) => asset(content_type, body),
        Page::UiState => {
            let rejected = admin.rejected.lock().unwrap_or_else(|e| e.into_inner());
            let left_out = admin.left_out.lock().unwrap_or_else(|e| e.into_inner());
            let rollouts = admin.rollouts.views();
            let snapshot = admin.state.load_full();
            let state = live.state(&snapshot, rejected.as_ref(), &left_out, &rollouts);
            let body = serde_json::to_string(&state).expect("state serialises");
            reply(StatusCode::OK, JSON, body)
        }
        Page::UiExplain => match header_pairs(&query()) {
            Ok(headers) => {
                let path = live::explain_all(&admin.state.load(), &headers);
                let body = serde_json::to_string(&path).expect("explanations serialise");
                reply(StatusCode::OK, JSON, body)
            }
            Err(reason) => reply(StatusCode::BAD_REQUEST, TEXT, reason + "\n"),
        },
        Page::Rollouts => {
            let body =
                serde_json::to_string_pretty(&admin.rollouts.views()).expect("rollouts serialise");
            reply(StatusCode::OK, JSON, body)
        }
        Page::Config => {
            let snapshot = admin.state.load();
            let body = serde_json::to_string_pretty(&snapshot.config).expect("config serialises");
            reply(StatusCode::OK, JSON, body)
        }
        Page::Explain => explain(admin, &query()),
        Page::Rollout(..) => unreachable!("answered above"),
    })
}

/// `/explain?service=NAME&header=Name:value...`
fn explain(admin: &Admin, pairs: &[(String, String)]) -> Response<Full<Bytes>> {
    let Some(service) = pairs.iter().find(|(k, _)| k == "service").map(|(_, v)| v) else {
        return reply(
            StatusCode::BAD_REQUEST,
            TEXT,
            "explain needs ?service=NAME\n".into(),
        );
    };
    let headers = match header_pairs(pairs) {
        Ok(headers) => headers,
        Err(reason) => return reply(StatusCode::BAD_REQUEST, TEXT, reason + "\n"),
    };
    match admin.state.load().explain(service, &headers) {
        Some(explanation) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&explanation).expect("explanation serialises"),
        ),
        None => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            format!("no service `{service}`\n"),
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
