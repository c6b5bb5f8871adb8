//! Who the admin server answers. It is reached through loopback (or `kubectl port-forward` to
//! `localhost`), so a web page an operator visits can make the browser send it requests: a
//! page of a host that resolves to 127.0.0.1 (DNS rebinding) can read its answers, and any page
//! can send a cross-site form POST. Requests naming a foreign host are refused, and a state
//! change needs what a form cannot send.

use std::{borrow::Cow, net::IpAddr};

use http::{HeaderMap, Method, StatusCode, header};

/// A request the admin will not serve: its status and why (and, for a 405, what it allows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub allow: Option<&'static str>,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: &'static str) -> Refusal {
        Refusal {
            status,
            reason,
            allow: None,
        }
    }
}

/// The header a state-changing request must carry: a custom header, which an HTML form cannot
/// send and which a cross-origin script can send only after a CORS preflight this server never
/// grants.
pub const MARKER: &str = "x-steer-admin";

/// The methods of an admin path, as an `Allow` header lists them.
pub const READ: &str = "GET, HEAD";
pub const CHANGE: &str = "POST";

/// Refuses a method `allow` (one of [`READ`], [`CHANGE`]) does not list, with 405.
pub fn method(method: &Method, allow: &'static str) -> Result<(), Refusal> {
    let allowed = match allow {
        CHANGE => method == Method::POST,
        _ => method == Method::GET || method == Method::HEAD,
    };
    if allowed {
        return Ok(());
    }
    Err(Refusal {
        status: StatusCode::METHOD_NOT_ALLOWED,
        reason: if allow == CHANGE {
            "this path changes state: POST to it"
        } else {
            "this path only reads: GET it"
        },
        allow: Some(allow),
    })
}

/// The host a request names: its absolute-form target's, which overrides `Host` (RFC 9112
/// §3.2.2), else `Host`'s; `None` for neither (an HTTP/1.0 client: a browser always sends one).
pub fn named_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<Cow<'a, str>> {
    if let Some(authority) = uri.authority() {
        return Some(Cow::Borrowed(authority.as_str()));
    }
    let host = headers.get(header::HOST)?;
    Some(String::from_utf8_lossy(host.as_bytes()))
}

/// Whether `authority` (`host`, `host:port`, `[v6]:port`) is a loopback name or address or
/// `local`, the address the connection came in on. The port is not compared: a port-forward
/// names its own local port.
pub fn is_own_host(authority: &str, local: IpAddr) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    // RFC 6761: `localhost` and its subdomains are loopback, and resolvers never ask DNS for
    // them, so no rebinding can use them.
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    host.parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback() || ip == local || ip.to_canonical() == local)
}

/// Refuses a request naming a host other than this server's own (a DNS-rebinding page names
/// its own), with 421.
pub fn host(uri: &http::Uri, headers: &HeaderMap, local: IpAddr) -> Result<(), Refusal> {
    match named_host(uri, headers) {
        Some(host) if !is_own_host(&host, local) => Err(Refusal::new(
            StatusCode::MISDIRECTED_REQUEST,
            "this admin server answers requests for localhost, a loopback address or its own \
             address only",
        )),
        _ => Ok(()),
    }
}

/// Refuses, with 403, a state change a web page could have made: one from a foreign `Origin`,
/// or without the [`MARKER`] header.
pub fn state_change(headers: &HeaderMap, local: IpAddr) -> Result<(), Refusal> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        // `scheme://host[:port]`; `null` (an opaque origin) is foreign too.
        let own = (origin.split_once("://")).is_some_and(|(_, authority)| {
            !authority.contains('/') && is_own_host(authority, local)
        });
        if !own {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "a state change from another origin (a web page's) is refused",
            ));
        }
    }
    if headers.get(MARKER).is_none_or(|v| v.is_empty()) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "a state change needs the header `x-steer-admin: 1` (which a cross-site form \
             cannot send): use `steer rollout resume`, or send it yourself",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 5));

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn loopback_names_and_the_own_address_are_own_hosts() {
        for own in [
            "localhost",
            "localhost:8080",
            "LocalHost.",
            "steer.localhost",
            "127.0.0.1:15000",
            "127.1.2.3",
            "[::1]:15000",
            "10.0.0.5:15000",
            "10.0.0.5",
        ] {
            assert!(is_own_host(own, LOCAL), "{own}");
        }
        for foreign in [
            "attacker.example",
            "attacker.example:15000",
            "localhost.attacker.example",
            "10.0.0.6:15000",
            "[fd00::5]:15000",
            "",
        ] {
            assert!(!is_own_host(foreign, LOCAL), "{foreign}");
        }
    }

    #[test]
    fn a_foreign_host_is_misdirected_and_an_absolute_target_wins_over_host() {
        let uri: http::Uri = "/config".parse().unwrap();
        let refused = host(&uri, &headers(&[("host", "attacker.example")]), LOCAL);
        assert_eq!(refused.unwrap_err().status, StatusCode::MISDIRECTED_REQUEST);
        assert!(host(&uri, &headers(&[("host", "localhost:15000")]), LOCAL).is_ok());
        assert!(host(&uri, &headers(&[]), LOCAL).is_ok());
        let absolute: http::Uri = "http://attacker.example/config".parse().unwrap();
        assert!(host(&absolute, &headers(&[("host", "localhost")]), LOCAL).is_err());
    }

    #[test]
    fn a_state_change_needs_the_marker_and_no_foreign_origin() {
        let marker = ("x-steer-admin", "1");
        assert!(state_change(&headers(&[marker]), LOCAL).is_ok());
        let same = ("origin", "http://localhost:15000");
        assert!(state_change(&headers(&[marker, same]), LOCAL).is_ok());
        // A cross-site form: a foreign origin and no marker.
        let form = headers(&[
            ("origin", "http://attacker.example"),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        assert_eq!(
            state_change(&form, LOCAL).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        for origin in ["http://attacker.example", "null", "http://localhost.evil/x"] {
            let refused = state_change(&headers(&[marker, ("origin", origin)]), LOCAL);
            assert!(refused.is_err(), "{origin}");
        }
        let unmarked = state_change(&headers(&[same]), LOCAL).unwrap_err();
        assert!(unmarked.reason.contains("x-steer-admin"));
    }

    #[test]
    fn a_wrong_method_is_405_with_what_is_allowed() {
        assert!(method(&Method::GET, READ).is_ok());
        assert!(method(&Method::HEAD, READ).is_ok());
        assert!(method(&Method::POST, CHANGE).is_ok());
        let refused = method(&Method::DELETE, READ).unwrap_err();
        assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(refused.allow, Some("GET, HEAD"));
        assert_eq!(
            method(&Method::GET, CHANGE).unwrap_err().allow,
            Some("POST")
        );
    }
}
