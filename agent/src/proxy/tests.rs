use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue};

use super::{pick, remove_hop_by_hop};
use crate::state::Endpoint;

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

/// Two idle endpoints and their addresses.
fn two_endpoints() -> ([Endpoint; 2], SocketAddr, SocketAddr) {
    let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
    ([Endpoint::new(a), Endpoint::new(b)], a, b)
}

#[test]
fn power_of_two_choices_steers_away_from_a_busy_endpoint() {
    let (endpoints, a, _) = two_endpoints();
    let picks_of_a = |endpoints: &[Endpoint]| {
        (0..4000)
            .filter(|_| pick(endpoints, None).unwrap().address == a)
            .count()
    };
    // Equal load: either, about evenly.
    let even = picks_of_a(&endpoints);
    assert!((1700..2300).contains(&even), "{even} of 4000");
    // `a` busy: chosen only when both draws land on it, one time in four.
    let _busy: Vec<_> = (0..5).map(|_| endpoints[0].start()).collect();
    let busy = picks_of_a(&endpoints);
    assert!((800..1200).contains(&busy), "{busy} of 4000");
}

#[test]
fn a_retry_never_picks_the_endpoint_that_failed() {
    let (endpoints, a, b) = two_endpoints();
    for _ in 0..100 {
        assert_eq!(pick(&endpoints, Some(a)).unwrap().address, b);
    }
    assert!(pick(&endpoints[..1], Some(a)).is_none());
    assert!(pick(&[], None).is_none());
}
