//! One-shot HTTP/1 requests of the control side: the CLI to an agent's admin server, the status
//! writer to Prometheus. A connection per request: they are rare, and nothing is pooled.

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// `method path` to `peer` (named in errors, e.g. "Prometheus") at `authority` (`host:port`),
/// with `headers` besides `Host`: the status and the body (as text).
pub async fn request(
    peer: &str,
    authority: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {peer} at {authority}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("{peer}: HTTP handshake"))?;
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("{peer}: request {path}"))?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("{peer}: the request failed"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("{peer}: reading the answer"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Percent-encodes everything but the unreserved characters (RFC 3986): a query parameter,
/// or a name in a path segment.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreserved_characters_stay() {
        assert_eq!(url_encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(url_encode("ns/r 1"), "ns%2Fr%201");
        assert_eq!(url_encode("{x=\"y\"}"), "%7Bx%3D%22y%22%7D");
    }
}
