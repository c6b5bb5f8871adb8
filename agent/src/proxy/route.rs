//! The routing decision: which service, release and version a request gets, and what happens to
//! its stamp. A pure function of the snapshot, the listener, the connection's service and the
//! request, so every rule below is unit-tested without sockets or root:
//!
//! - at the gateway any incoming stamp is stripped and the rules decide; so on the redirect
//!   listener for a connection the datapath did not redirect (anything that can reach the node
//!   address could connect there, and only a pod's redirected call is inside the mesh);
//! - inside the mesh a stamp steer signed, naming a release in force, is the decision (decide
//!   once); one that does not verify (forged, or signed with a key this node does not know) is
//!   removed and the rules decide from the tags;
//! - a stamp naming a release this snapshot does not have (one just retired) means primary, and
//!   the stamp stays: deciding again could move the request into another release halfway along
//!   its chain;
//! - no stamp: the rules decide, and the winner is stamped.

use std::sync::Arc;

use http::Request;

use super::{
    Listener,
    error::ProxyError,
    stamp::{self, VerifyStamp},
};
use crate::{
    config::{bare_host, host_key},
    rules::{CompiledRelease, Tags},
    state::{ServiceRoutes, Snapshot, VersionRoutes},
};

/// The longest Host worth looking at: a DNS name (253) with a port.
const MAX_HOST_LEN: usize = 253 + 6;

/// Where one request goes.
#[derive(Debug)]
pub struct Route<'s> {
    pub service: &'s ServiceRoutes,
    pub version: &'s VersionRoutes,
    pub release: Option<&'s CompiledRelease>,
    /// The request came from outside the mesh (the gateway, or a connection the datapath did
    /// not redirect): it gets no debug headers unless asked for.
    pub from_outside: bool,
    /// Remove the stamp the request came with: from outside, or one that does not verify.
    pub strip_stamp: bool,
    /// The rules decided here (no stamp was honoured): counted as the release's traffic.
    pub decided: bool,
}

/// What the decision reads of a request, whichever codec parsed it (hyper's `Request`, or
/// the HTTP/1 path's head).
pub trait RequestView {
    /// The authority of the target: an absolute-form target's, or HTTP/2's `:authority`.
    fn authority(&self) -> Option<&str>;
    /// The Host header.
    fn host(&self) -> Option<&str>;
    fn path(&self) -> &str;
    fn stamp(&self) -> Option<stamp::Incoming<'_>>;
    fn tags(&self) -> &dyn Tags;
}

impl<B> RequestView for Request<B> {
    fn authority(&self) -> Option<&str> {
        self.uri().authority().map(|a| a.as_str())
    }

    fn host(&self) -> Option<&str> {
        self.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    }

    fn path(&self) -> &str {
        self.uri().path()
    }

    fn stamp(&self) -> Option<stamp::Incoming<'_>> {
        stamp::read(self.headers())
    }

    fn tags(&self) -> &dyn Tags {
        self.headers()
    }
}

/// Decides the route of `request`. `connected` is the service the client's connection was
/// redirected to (from the datapath), if any.
pub fn route<'s>(
    snapshot: &'s Snapshot,
    listener: Listener,
    connected: Option<&Arc<str>>,
    keys: &impl VerifyStamp,
    request: &(impl RequestView + ?Sized),
) -> Result<Route<'s>, ProxyError> {
    let service = match connected {
        Some(name) => snapshot
            .service(name)
            .ok_or_else(|| ProxyError::UnknownService(name.clone()))?,
        None => service_from_request(snapshot, listener, request).ok_or(ProxyError::NoService)?,
    };
    let inside_mesh = listener == Listener::Redirect && connected.is_some();
    let incoming = request.stamp();
    let verified = incoming.filter(|s| inside_mesh && keys.verify(s.release, s.signature));
    let release = match verified {
        // A retired release: primary, and the stamp is left as it came.
        Some(stamp) => snapshot.rules.get(stamp.release),
        None => snapshot.rules.decide(request.tags()),
    };
    Ok(Route {
        service,
        version: service.version_for(release),
        release,
        from_outside: !inside_mesh,
        strip_stamp: incoming.is_some() && verified.is_none(),
        decided: verified.is_none(),
    })
}

/// The service a request is for when its connection did not say. At the gateway, configured
/// routes are the allowlist: what none of them takes is refused. Without routes (and for a
/// redirect-listener connection the datapath did not redirect) the host names a service, by
/// name or by one of its addresses.
fn service_from_request<'s>(
    snapshot: &'s Snapshot,
    listener: Listener,
    request: &(impl RequestView + ?Sized),
) -> Option<&'s ServiceRoutes> {
    let authority = authority_of(request);
    if authority.len() > MAX_HOST_LEN {
        return None;
    }
    let routes = &snapshot.config.gateway.routes;
    if listener == Listener::Gateway && !routes.is_empty() {
        let (host, path) = (bare_host(authority), request.path());
        let routed = routes.iter().find(|route| {
            (route.host.as_deref()).is_none_or(|h| bare_host(h).eq_ignore_ascii_case(host))
                && route
                    .path_prefix
                    .as_deref()
                    .is_none_or(|p| path.starts_with(p))
        })?;
        return snapshot.service(&routed.service);
    }
    if let Ok(address) = authority.parse() {
        return snapshot.service_at(address);
    }
    // The longest leading part that names a service: `restaurant.food.svc.cluster.local` is
    // `restaurant.food` on Kubernetes and `restaurant` in a file.
    let host = host_key(authority);
    let mut name = host.as_str();
    loop {
        if let Some(service) = snapshot.service(name) {
            return Some(service);
        }
        name = name.rsplit_once('.')?.0;
    }
}

/// The authority a request names: an absolute-form target's, or HTTP/2's `:authority`, over
/// the Host header (RFC 9112 section 3.2.2; nginx and Envoy route so).
fn authority_of(request: &(impl RequestView + ?Sized)) -> &str {
    request.authority().or_else(|| request.host()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, proxy::stamp::StampKeys};

    fn snapshot(extra: &str) -> Snapshot {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/food-delivery.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap() + extra;
        Snapshot::build(Config::from_yaml(&text, "test").unwrap())
            .unwrap()
            .0
    }

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/menu");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    /// (service, version, release, from_outside, stamp) of a route, for comparing.
    fn summary(route: Route) -> (String, String, Option<String>, bool, Option<String>) {
        (
            route.service.name.to_string(),
            route.version.name.to_string(),
            route.release.map(|r| r.name.to_string()),
            route.from_outside,
            stamped(&route).map(str::to_string),
        )
    }

    fn routed(
        snapshot: &Snapshot,
        listener: Listener,
        connected: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (String, String, Option<String>, bool, Option<String>) {
        let connected = connected.map(Arc::<str>::from);
        let request = request(headers);
        summary(route(snapshot, listener, connected.as_ref(), &keys(), &request).unwrap())
    }

    /// The release the request is stamped with on its way on: the route's release (the
    /// request path writes the route entry's stamp, made from it). With none, a stamp that
    /// verified is left as it came and any other was stripped.
    fn stamped<'s>(route: &Route<'s>) -> Option<&'s str> {
        route.release.map(|r| &*r.name)
    }

    /// The key the test nodes share.
    fn keys() -> StampKeys {
        StampKeys::from_text("the test nodes' stamp key").unwrap()
    }

    /// A stamp as steer mints it.
    fn signed(release: &str) -> String {
        format!("{release};sig={}", keys().sign(release))
    }

    fn s(text: &str) -> String {
        text.to_string()
    }

    #[test]
    fn without_a_stamp_the_rules_decide_and_the_winner_is_stamped() {
        let snapshot = snapshot("");
        let android_atlantis = [("x-device", "android"), ("x-region", "atlantis")];
        assert_eq!(
            routed(
                &snapshot,
                Listener::Redirect,
                Some("restaurant"),
                &android_atlantis
            ),
            (
                s("restaurant"),
                s("v2-red"),
                Some(s("red")),
                false,
                Some(s("red"))
            )
        );
        // Red has no delivery version: its requests go to delivery's primary, still stamped.
        assert_eq!(
            routed(
                &snapshot,
                Listener::Redirect,
                Some("delivery"),
                &android_atlantis
            ),
            (
                s("delivery"),
                s("v1"),
                Some(s("red")),
                false,
                Some(s("red"))
            )
        );
        assert_eq!(
            routed(&snapshot, Listener::Redirect, Some("delivery"), &[]),
            (s("delivery"), s("v1"), None, false, None)
        );
    }

    #[test]
    fn inside_the_mesh_a_stamp_steer_signed_is_the_decision() {
        let snapshot = snapshot("");
        // Tags say red, the stamp says green: the first hop decided green.
        let member = format!("steer-release={}", signed("green"));
        let headers = [
            ("x-device", "android"),
            ("x-region", "atlantis"),
            ("baggage", member.as_str()),
        ];
        assert_eq!(
            routed(&snapshot, Listener::Redirect, Some("delivery"), &headers),
            (
                s("delivery"),
                s("v2-green"),
                Some(s("green")),
                false,
                Some(s("green"))
            )
        );
    }

    #[test]
    fn a_stamp_that_does_not_verify_is_removed_and_the_tags_decide() {
        let snapshot = snapshot("");
        let other_key = StampKeys::from_text("another cluster's stamp key").unwrap();
        let foreign = format!("green;sig={}", other_key.sign("green"));
        for forged in [
            "green",
            "green;sig=AAAAAAAAAAAAAAAAAAAAAA",
            foreign.as_str(),
        ] {
            let headers = [
                ("x-device", "android"),
                ("x-region", "atlantis"),
                ("x-steer-release", forged),
            ];
            let request = request(&headers);
            let connected = Some(Arc::<str>::from("delivery"));
            let route = route(
                &snapshot,
                Listener::Redirect,
                connected.as_ref(),
                &keys(),
                &request,
            )
            .unwrap();
            assert!(route.strip_stamp, "{forged}");
            assert_eq!(stamped(&route), Some("red"), "{forged}");
            assert_eq!(&*route.version.name, "v1", "red has no delivery version");
        }
    }

    #[test]
    fn a_stamp_on_a_connection_the_datapath_did_not_redirect_is_stripped() {
        let snapshot = snapshot("");
        // Straight to the node's redirect address, naming a service by Host.
        let forged = [("x-steer-release", "blue"), ("host", "restaurant")];
        assert_eq!(
            routed(&snapshot, Listener::Redirect, None, &forged),
            (s("restaurant"), s("v1"), None, true, None)
        );
    }

    #[test]
    fn a_retired_stamp_means_primary_and_stays_on_the_request() {
        let snapshot = snapshot("");
        let gone = signed("gone");
        let headers = [("x-device", "android"), ("x-steer-release", gone.as_str())];
        assert_eq!(
            routed(&snapshot, Listener::Redirect, Some("restaurant"), &headers),
            (s("restaurant"), s("v1"), None, false, None)
        );
    }

    #[test]
    fn the_gateway_strips_incoming_stamps_and_decides_from_the_tags() {
        let snapshot = snapshot("");
        let forged = [("x-steer-release", "red"), ("host", "restaurant")];
        assert_eq!(
            routed(&snapshot, Listener::Gateway, None, &forged),
            (s("restaurant"), s("v1"), None, true, None)
        );
        let tagged = [("x-device", "android"), ("host", "restaurant:80")];
        assert_eq!(
            routed(&snapshot, Listener::Gateway, None, &tagged),
            (
                s("restaurant"),
                s("v2-blue"),
                Some(s("blue")),
                true,
                Some(s("blue"))
            )
        );
    }

    #[test]
    fn the_gateway_routes_by_host_and_path_before_the_host_names_a_service() {
        let routes = "gateway:\n  routes:\n    - { host: shop.example, pathPrefix: /menu, service: restaurant }\n    - { service: order }\n";
        let snapshot = snapshot(routes);
        let shop = [("host", "SHOP.example:8080")];
        assert_eq!(
            routed(&snapshot, Listener::Gateway, None, &shop).0,
            "restaurant"
        );
        // The catch-all route wins over a Host naming a service.
        let named = [("host", "delivery")];
        assert_eq!(
            routed(&snapshot, Listener::Gateway, None, &named).0,
            "order"
        );
        // Routes are the gateway's: a redirected connection without a service uses the Host.
        assert_eq!(
            routed(&snapshot, Listener::Redirect, None, &named).0,
            "delivery"
        );
    }

    #[test]
    fn configured_gateway_routes_are_the_allowlist_and_hosts_compare_without_case_or_trailing_dot()
    {
        let routes = "gateway:\n  routes:\n    - { host: shop.example, service: restaurant }\n";
        let snapshot = snapshot(routes);
        for host in [
            "shop.example",
            "SHOP.Example",
            "shop.example.",
            "shop.example.:443",
        ] {
            let found = routed(&snapshot, Listener::Gateway, None, &[("host", host)]);
            assert_eq!(found.0, "restaurant", "{host}");
        }
        // A Host naming an internal service reaches nothing at the gateway.
        for host in ["order", "internal-admin", "10.96.0.20:80"] {
            let request = request(&[("host", host)]);
            let refused = route(&snapshot, Listener::Gateway, None, &keys(), &request);
            assert!(matches!(refused, Err(ProxyError::NoService)), "{host}");
        }
    }

    #[test]
    fn an_absolute_form_target_or_http2_authority_names_the_host_over_the_host_header() {
        let snapshot = snapshot("");
        let request = Request::builder()
            .uri("http://DELIVERY./track")
            .header("host", "order")
            .body(())
            .unwrap();
        let found = route(&snapshot, Listener::Gateway, None, &keys(), &request).unwrap();
        assert_eq!(&*found.service.name, "delivery");
    }

    #[test]
    fn a_host_names_a_service_by_its_longest_leading_part_or_by_address() {
        let snapshot = snapshot("");
        for host in [
            "restaurant",
            "RESTAURANT",
            "restaurant.",
            "restaurant:80",
            "restaurant.food.svc.cluster.local",
            "10.96.0.20:80",
        ] {
            let found = routed(&snapshot, Listener::Gateway, None, &[("host", host)]);
            assert_eq!(found.0, "restaurant", "{host}");
        }
    }

    #[test]
    fn unknown_destinations_are_refused_with_their_reason() {
        let snapshot = snapshot("");
        let refused = |listener, connected: Option<&str>, host: &str| {
            let connected = connected.map(Arc::<str>::from);
            let request = request(&[("host", host)]);
            route(&snapshot, listener, connected.as_ref(), &keys(), &request).unwrap_err()
        };
        assert!(matches!(
            refused(Listener::Gateway, None, "nowhere.example"),
            ProxyError::NoService
        ));
        assert!(matches!(
            refused(Listener::Gateway, None, "10.96.0.99:80"),
            ProxyError::NoService
        ));
        // A Host longer than any DNS name is not looked at, however many labels it has.
        let long = "a.".repeat(16_000) + "restaurant";
        assert!(matches!(
            refused(Listener::Gateway, None, &long),
            ProxyError::NoService
        ));
        // The connection's service left the configuration while it was open.
        assert!(matches!(
            refused(Listener::Redirect, Some("payments"), "restaurant"),
            ProxyError::UnknownService(name) if &*name == "payments"
        ));
    }
}
