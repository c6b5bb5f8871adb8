//! Prometheus metrics. Labels are bounded by the configuration (service, version and release
//! names, a status class): never a raw tag value or a client address.

use std::{cell::OnceCell, sync::Mutex, time::Duration};

use http::StatusCode;

use crate::state::Route;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub service: String,
    pub version: String,
    pub release: String,
    /// 2xx, 3xx, 4xx or 5xx.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub service: String,
    pub version: String,
    pub release: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RouteLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    request_errors: Family<ReasonLabels, Counter>,
    client_connections: Gauge,
    connections_refused: Counter,
    reloads: Family<ReloadLabels, Counter>,
    watch_errors: Family<KindLabels, Counter>,
    status_writes: Family<ResultLabels, Counter>,
    status_writer: Gauge,
    releases: Family<StateLabels, Gauge>,
}

/// Why a request could not be proxied (`ProxyError::label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The kind of Kubernetes object a watch is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// "written" or "failed".
    pub result: String,
}

/// A CanaryRelease's state: Accepted, Shadowed, Conflict or Invalid.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// "applied" or "rejected".
    pub result: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~26 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 20,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("steer");
        let requests = Family::<RouteLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let request_errors = Family::<ReasonLabels, Counter>::default();
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open on the proxy's listeners",
            client_connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests proxied, by route and status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by route",
            latency.clone(),
        );
        registry.register(
            "request_errors",
            "Requests steer answered itself, by reason (no_service, unknown_service, \
             no_endpoint, connect_failed, upstream_failed, timeout)",
            request_errors.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, applied or rejected",
            reloads.clone(),
        );
        let watch_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "kubernetes_watch_errors",
            "Failed Kubernetes watches and lists, by kind (retried with backoff)",
            watch_errors.clone(),
        );
        let status_writes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "kubernetes_status_writes",
            "CanaryRelease status writes, written or failed",
            status_writes.clone(),
        );
        let status_writer = Gauge::default();
        registry.register(
            "kubernetes_status_writer",
            "1 while this agent holds the status writer lease",
            status_writer.clone(),
        );
        let releases = Family::<StateLabels, Gauge>::default();
        registry.register(
            "kubernetes_releases",
            "CanaryReleases by state in the latest translation",
            releases.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            requests,
            latency,
            request_errors,
            client_connections,
            connections_refused,
            reloads,
            watch_errors,
            status_writes,
            status_writer,
            releases,
        }
    }
}

/// The `code` label: `2xx` for class 2. One place, so `forget` removes what `observe` made.
fn status_class(class: u16) -> String {
    format!("{class}xx")
}

impl Metrics {
    /// The series of one route, resolved once so the request path does not look them up by
    /// label (and allocate the labels) on every request.
    pub fn route_series(&self, service: &str, version: &str, release: Option<&str>) -> RouteSeries {
        let labels = LatencyLabels {
            service: service.to_string(),
            version: version.to_string(),
            release: release.unwrap_or("").to_string(),
        };
        RouteSeries {
            latency: self.latency.get_or_create_owned(&labels),
            labels,
            by_class: Default::default(),
        }
    }

    #[cfg(test)]
    pub fn observe(
        &self,
        service: &str,
        version: &str,
        release: Option<&str>,
        status: StatusCode,
        took: Duration,
    ) {
        self.route_series(service, version, release)
            .observe(self, status, took);
    }

    /// Drops the series of routes that no longer exist: canary releases come and go, and
    /// their series must not pile up for as long as the agent runs.
    pub fn forget(&self, routes: &[Route]) {
        for &(service, version, release) in routes {
            let release = release.unwrap_or("");
            for class in 1..=5 {
                self.requests.remove(&RouteLabels {
                    service: service.to_string(),
                    version: version.to_string(),
                    release: release.to_string(),
                    code: status_class(class),
                });
            }
            self.latency.remove(&LatencyLabels {
                service: service.to_string(),
                version: version.to_string(),
                release: release.to_string(),
            });
        }
    }

    pub fn request_error(&self, reason: &'static str) {
        self.request_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn client_connections(&self, open: usize) {
        self.client_connections
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    pub fn reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.reloads
            .get_or_create(&ReloadLabels {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn watch_error(&self, kind: &str) {
        self.watch_errors
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }

    pub fn status_write(&self, written: bool) {
        let result = if written { "written" } else { "failed" };
        self.status_writes
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn status_writer(&self, leading: bool) {
        self.status_writer.set(i64::from(leading));
    }

    /// How many releases the latest translation put in each state (every state is set, so a
    /// state no release is in any more reads 0).
    pub fn releases_by_state(&self, counts: &[(&str, usize)]) {
        for (state, count) in counts {
            self.releases
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(*count as i64);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// The series of one (service, version, release) route.
pub struct RouteSeries {
    labels: LatencyLabels,
    latency: Histogram,
    /// Request counters by status class (1xx..5xx), made on first use.
    by_class: [OnceCell<Counter>; 5],
}

impl RouteSeries {
    pub fn observe(&self, metrics: &Metrics, status: StatusCode, took: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5);
        let counter = self.by_class[usize::from(class - 1)].get_or_init(|| {
            metrics.requests.get_or_create_owned(&RouteLabels {
                service: self.labels.service.clone(),
                version: self.labels.version.clone(),
                release: self.labels.release.clone(),
                code: status_class(class),
            })
        });
        counter.inc();
        self.latency.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, state::Snapshot};

    fn food_delivery() -> Config {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/food-delivery.yaml"
        );
        Config::load(std::path::Path::new(path)).unwrap()
    }

    fn snapshot(config: Config) -> Snapshot {
        Snapshot::build(config).unwrap().0
    }

    #[test]
    fn series_of_retired_releases_and_removed_services_are_forgotten() {
        let before = snapshot(food_delivery());
        let metrics = Metrics::default();
        let ok = StatusCode::OK;
        let took = Duration::from_millis(3);
        metrics.observe("restaurant", "v2-red", Some("red"), ok, took);
        metrics.observe("restaurant", "v2-blue", Some("blue"), ok, took);
        metrics.observe("order", "v1", Some("red"), StatusCode::BAD_GATEWAY, took);
        metrics.observe("delivery", "v1", None, ok, took);

        // Red is retired and delivery leaves the mesh (blue keeps only restaurant).
        let mut config = food_delivery();
        config.releases.retain(|r| r.name != "red");
        config.services.retain(|s| s.name != "delivery");
        for release in &mut config.releases {
            release.targets.remove("delivery");
        }
        config.releases.retain(|r| !r.targets.is_empty());
        let after = snapshot(config);
        let retired = after.retired_routes(&before);
        assert!(retired.contains(&("restaurant", "v2-red", Some("red"))));
        assert!(retired.contains(&("delivery", "v1", None)));
        assert!(!retired.contains(&("restaurant", "v2-blue", Some("blue"))));
        metrics.forget(&retired);

        let text = metrics.encode();
        assert!(!text.contains(r#"release="red""#), "{text}");
        assert!(!text.contains(r#"service="delivery""#), "{text}");
        assert!(
            text.contains(r#"version="v2-blue",release="blue""#),
            "{text}"
        );
    }
}
