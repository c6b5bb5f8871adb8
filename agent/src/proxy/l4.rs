//! Connections that do not speak HTTP are relayed at L4 to the primary version of the service
//! the client connected to: the rules need headers, so such traffic cannot enter a canary.

use std::time::Duration;

use tokio::net::TcpStream;
use tracing::debug;

use super::{Proxy, pick, pool};

/// How long to wait for a client's first bytes; server-first protocols send nothing.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(300);

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// The HTTP/2 connection preface (h2c with prior knowledge, gRPC).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Whether the first bytes the client sends start an HTTP/1 request or the HTTP/2 preface.
pub async fn looks_like_http(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    let Ok(Ok(n)) = tokio::time::timeout(SNIFF_TIMEOUT, stream.peek(&mut buf)).await else {
        return false;
    };
    let first = &buf[..n];
    METHODS
        .iter()
        .chain([&H2_PREFACE])
        .any(|prefix| first.starts_with(&prefix[..prefix.len().min(n)]) && n > 0)
}

pub async fn relay(proxy: &Proxy, mut client: TcpStream, service: &str) {
    let snapshot = proxy.state.load_full();
    let Some(version) = snapshot.version_for(service, None) else {
        return;
    };
    let Some(endpoint) = pick(snapshot.endpoints(service, version), None) else {
        debug!(service, version, "L4: no ready endpoint; closing");
        return;
    };
    let connected =
        tokio::time::timeout(pool::CONNECT_TIMEOUT, TcpStream::connect(endpoint.address)).await;
    let Ok(Ok(mut upstream)) = connected else {
        debug!(service, endpoint = %endpoint.address, "L4: connect failed");
        return;
    };
    let _in_flight = endpoint.start();
    debug!(service, version, endpoint = %endpoint.address, "L4 relay");
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
