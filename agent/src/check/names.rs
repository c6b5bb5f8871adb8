//! What a name may be. Names go on the wire (`x-steer-release: NAME;sig=…`, the `baggage`
//! member, the debug headers), into metric labels and into Kubernetes objects, so each kind
//! follows the Kubernetes rule of what it names there: nothing that could break a header (a
//! `;`, a control character, a non-ASCII letter) passes, and nothing a cluster accepts is
//! refused. Each error says the rule.

/// A DNS-1123 label, as Kubernetes defines it: a namespace's name, a port's name.
fn dns_label(text: &str) -> Result<(), &'static str> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && !text.starts_with('-')
        && !text.ends_with('-');
    ok.then_some(()).ok_or(
        "not a DNS-1123 label (at most 63 lower-case letters, digits and '-', starting and \
         ending with a letter or digit)",
    )
}

/// A DNS-1123 subdomain: labels joined by '.', at most 253 characters.
fn dns_subdomain(text: &str) -> Result<(), &'static str> {
    let ok = text.len() <= 253 && text.split('.').all(|label| dns_label(label).is_ok());
    ok.then_some(()).ok_or(
        "not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', each part starting \
         and ending with a letter or digit, at most 253 characters)",
    )
}

/// A service: a DNS-1123 subdomain, because it is a DNS name as callers use it (the
/// Kubernetes source names a Service `name.namespace`, and a gateway Host may name it), with
/// `:PORT` (a port's name or number, a label) where the Kubernetes source splits a Service
/// of several ports.
pub fn service(name: &str) -> Result<(), &'static str> {
    let (host, port) = match name.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (name, None),
    };
    dns_subdomain(host)?;
    match port {
        Some(port) => dns_label(port).map_err(
            |_| "a service's `:PORT` suffix is a port's name or number (a DNS-1123 label)",
        ),
        None => Ok(()),
    }
}

/// A version: in a cluster it is the value of a pod label (`version: v2.0.1`), so it follows
/// Kubernetes' rule for label values rather than a DNS one: dots, upper-case letters and '_'
/// are common there, and refusing them would refuse a cluster Kubernetes accepts. Those
/// characters are safe in a header and a metric label. Unlike a label value it is not empty.
pub fn version(name: &str) -> Result<(), &'static str> {
    let inner = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let ends = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    let ok = name.len() <= 63
        && name.bytes().all(inner)
        && ends(name.bytes().next())
        && ends(name.bytes().last());
    ok.then_some(()).ok_or(
        "not a Kubernetes label value (1 to 63 letters, digits, '-', '_' and '.', starting and \
         ending with a letter or digit)",
    )
}

/// A release: a DNS-1123 subdomain, as a CanaryRelease's object name is, optionally after
/// `NAMESPACE/` (a label), as the Kubernetes source names its releases.
pub fn release(name: &str) -> Result<(), &'static str> {
    let (namespace, name) = match name.split_once('/') {
        Some((namespace, name)) => (Some(namespace), name),
        None => (None, name),
    };
    let ok = namespace.is_none_or(|ns| dns_label(ns).is_ok()) && dns_subdomain(name).is_ok();
    ok.then_some(()).ok_or(
        "not a release name (a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', \
         each part starting and ending with a letter or digit; optionally after `NAMESPACE/`)",
    )
}

/// A header name: an RFC 9110 token.
pub fn header(name: &str) -> Result<(), &'static str> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    (!name.is_empty() && name.bytes().all(tchar))
        .then_some(())
        .ok_or(
            "not an HTTP header name (an RFC 9110 token: letters, digits and !#$%&'*+-.^_`|~, no \
         spaces or control characters)",
        )
}

/// A gateway route's host: a host name (any case: hosts match without case), without a port
/// (routes match the Host without its port).
pub fn route_host(host: &str) -> Result<(), &'static str> {
    if host.contains(':') {
        return Err(
            "has a port: a route's host is matched without the port, so name the host alone",
        );
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    dns_subdomain(&host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_dns_subdomains_with_an_optional_port() {
        for ok in [
            "order",
            "order.demo",
            "order.demo:grpc",
            "order.demo:8080",
            "a-1.b2",
        ] {
            assert!(service(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "Order", "café", "a;sig=x", "a\x07", "a\nb", "-a", "a-", "a..b", "a.", "a:",
            "a:-x", "a b",
        ] {
            assert!(service(bad).is_err(), "{bad:?}");
        }
        assert!(service(&"a".repeat(64)).is_err(), "a label of 64");
        // 253 characters: three labels of 63 and one of 61.
        let long = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "a".repeat(61));
        assert!(service(&long).is_ok());
        assert!(service(&format!("{long}.a")).is_err(), "past 253");
    }

    #[test]
    fn versions_are_label_values() {
        for ok in ["v1", "v2.0.1", "V2_rc1", "2026-12-04", "a"] {
            assert!(version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "v1;sig=x",
            "café",
            "v\x07",
            "-v",
            "v.",
            "v 1",
            &"v".repeat(64),
        ] {
            assert!(version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn releases_are_subdomains_optionally_after_a_namespace() {
        for ok in ["red", "android-atlantis", "demo/red", "demo/red.v2"] {
            assert!(release(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a;sig=x",
            "café",
            "Red",
            "/red",
            "demo/",
            "a/b/c",
            "De mo/red",
            "r\x07",
        ] {
            assert!(release(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn header_names_are_tokens() {
        for ok in ["x-device", "X-User-Id", "a!#$%&'*+.^_`|~"] {
            assert!(header(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "x device", "x:y", "x\x07", "x\ny", "ümlaut", "x\u{7f}", "(x)",
        ] {
            assert!(header(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn route_hosts_are_host_names_without_a_port() {
        for ok in ["shop.example", "SHOP.example.", "order"] {
            assert!(route_host(ok).is_ok(), "{ok}");
        }
        assert!(
            route_host("shop.example:8080")
                .unwrap_err()
                .contains("port")
        );
        for bad in ["", "shop example", "café.example", "[::1]"] {
            assert!(route_host(bad).is_err(), "{bad:?}");
        }
    }
}
