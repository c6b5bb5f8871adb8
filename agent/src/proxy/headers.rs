//! What the proxy does to headers and URIs on the way through: hop-by-hop headers (RFC 9110
//! section 7.6.1) and the upstream's request target.

use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, Version};

use super::h1::head::{FramingError, check_transfer_coding};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the request (RFC 9110 section 7.6.1), besides
/// Connection and Upgrade, which an upgrade passed through keeps.
fn connection_scoped() -> [&'static HeaderName; 7] {
    [
        &http::header::TE,
        &http::header::TRAILER,
        &http::header::TRANSFER_ENCODING,
        &http::header::PROXY_AUTHENTICATE,
        &http::header::PROXY_AUTHORIZATION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
    ]
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == http::header::CONNECTION
        || name == http::header::UPGRADE
        || connection_scoped().contains(&name)
}

/// Removes the hop-by-hop headers, plus the ones the Connection header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names, no lookups.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(connection) = headers.get(http::header::CONNECTION)
        && !is_plain_connection_value(connection)
    {
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
    }
    // `te: trailers` is kept: gRPC servers require it, and it means the same on every hop.
    let te_trailers = headers
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in connection_scoped() {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
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

/// RFC 9112's framing rules for a request hyper parsed, the ones hyper does not hold it to
/// (what request-smuggling probes try): one Transfer-Encoding field whose codings are one
/// `chunked`, last, never on HTTP/1.0; one Host. (Content-Length with Transfer-Encoding hyper
/// handles itself: it drops the length and closes the connection after the exchange.)
pub fn check_framing<B>(request: &Request<B>) -> Result<(), FramingError> {
    let headers = request.headers();
    let mut codings = headers.get_all(http::header::TRANSFER_ENCODING).iter();
    if let Some(value) = codings.next() {
        if codings.next().is_some() {
            return Err(FramingError::Malformed("several transfer-encoding headers"));
        }
        if request.version() == Version::HTTP_10 {
            return Err(FramingError::Malformed("transfer-encoding on HTTP/1.0"));
        }
        check_transfer_coding(value.as_bytes())?;
    }
    if headers.get_all(http::header::HOST).iter().nth(1).is_some() {
        return Err(FramingError::Malformed("several host headers"));
    }
    Ok(())
}

/// `Connection: keep-alive` or `close` alone names no other header: the common case, which
/// needs no list of names built.
fn is_plain_connection_value(value: &HeaderValue) -> bool {
    let value = value.as_bytes();
    value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
}

/// HTTP/1.1 upstreams take the origin form; HTTP/2 needs scheme and authority.
pub fn prepare_uri<B>(request: &mut Request<B>, service: &str, http2: bool) {
    if !http2 {
        // Only an absolute-form target (a proxy-style request) needs rewriting.
        if request.uri().authority().is_some() {
            let origin = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            if let Ok(uri) = origin.parse::<Uri>() {
                *request.uri_mut() = uri;
            }
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
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        names.sort();
        names
    }

    #[test]
    fn connection_scoped_headers_do_not_cross_the_proxy() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-session-secret"),
            ("x-session-secret", "42"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("trailer", "grpc-status"),
            ("upgrade", "websocket"),
            ("x-device", "android"),
            ("baggage", "steer-release=red"),
        ]);
        remove_hop_by_hop(&mut map, false);
        // Upgrade is only kept for an upgrade the proxy passes through.
        assert_eq!(names(&map), ["baggage", "x-device"]);
        let mut plain = headers(&[("connection", "Keep-Alive"), ("x-device", "ios")]);
        remove_hop_by_hop(&mut plain, false);
        assert_eq!(names(&plain), ["x-device"]);
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_and_connection_headers() {
        let mut map = headers(&[
            ("connection", "Upgrade, x-other"),
            ("upgrade", "websocket"),
            ("x-other", "1"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        remove_hop_by_hop(&mut map, true);
        assert_eq!(names(&map), ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(map["connection"], "upgrade");
    }

    #[test]
    fn te_trailers_is_kept_for_grpc_and_other_te_values_are_not() {
        let mut map = headers(&[("te", "trailers")]);
        remove_hop_by_hop(&mut map, false);
        assert_eq!(map["te"], "trailers");
        let mut map = headers(&[("te", "gzip, trailers")]);
        remove_hop_by_hop(&mut map, false);
        assert!(map.get("te").is_none());
    }

    #[test]
    fn requests_framed_ambiguously_are_refused_before_they_are_forwarded() {
        let status = |pairs: &[(&'static str, &'static str)], version: Version| {
            let mut request = Request::builder().version(version).body(()).unwrap();
            *request.headers_mut() = headers(pairs);
            check_framing(&request).map_err(|e| e.status())
        };
        let v11 = Version::HTTP_11;
        assert_eq!(status(&[("transfer-encoding", "chunked")], v11), Ok(()));
        assert_eq!(
            status(&[("content-length", "5"), ("host", "a")], v11),
            Ok(())
        );
        for (pairs, expected) in [
            (&[("transfer-encoding", "cow, chunked")][..], 501),
            (&[("transfer-encoding", "identity, chunked")], 501),
            (&[("transfer-encoding", "chunked, chunked")], 400),
            (
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked"),
                ],
                400,
            ),
            (&[("transfer-encoding", "chunked, gzip")], 400),
            (&[("host", "a"), ("host", "b")], 400),
        ] {
            assert_eq!(status(pairs, v11), Err(expected), "{pairs:?}");
        }
        assert_eq!(
            status(&[("transfer-encoding", "chunked")], Version::HTTP_10),
            Err(400)
        );
    }

    #[test]
    fn upstream_targets_are_origin_form_for_http1_and_absolute_for_http2() {
        let mut absolute = Request::builder()
            .uri("http://restaurant:80/menu?x=1")
            .body(())
            .unwrap();
        prepare_uri(&mut absolute, "restaurant", false);
        assert_eq!(absolute.uri(), "/menu?x=1");
        assert_eq!(absolute.headers()["host"], "restaurant");
        let mut origin = Request::builder().uri("/menu").body(()).unwrap();
        prepare_uri(&mut origin, "restaurant", true);
        assert_eq!(origin.uri(), "http://restaurant/menu");
    }
}
