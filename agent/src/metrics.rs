//! Prometheus metrics. Labels are bounded by the configuration (service, version and release
//! names, a status class): never a raw tag value or a client address.

use std::{
    cell::OnceCell,
    collections::HashMap,
    sync::{Mutex, atomic::AtomicU64},
    time::Duration,
};

use http::StatusCode;

use crate::{
    rollout::Phase,
    state::{Route, Snapshot},
};
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
    edges: Family<EdgeLabels, Counter>,
    /// Every edge series made, for the live page's rates (made once per worker and edge, so
    /// the lock is off the request path).
    edge_series: Mutex<HashMap<EdgeLabels, Counter>>,
    decisions: Family<DecisionLabels, Counter>,
    datapath_attached: Gauge,
    redirected: Counter,
    not_redirected: Counter,
    releases_in_force: Gauge,
    rollout_percent: Family<ReleaseLabels, Gauge<f64, AtomicU64>>,
    rollout_phase: Family<PhaseLabels, Gauge>,
    /// The releases with rollout series, so those of rollouts that are gone can be dropped.
    rollout_series: Mutex<Vec<String>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    pub release: String,
}

/// A rollout's phase: 1 for the one it is in, 0 for the others.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub release: String,
    pub phase: &'static str,
}

/// Every phase a rollout can be in, as its label.
const PHASES: [(Phase, &str); 5] = [
    (Phase::Progressing, "Progressing"),
    (Phase::Succeeded, "Succeeded"),
    (Phase::Promoted, "Promoted"),
    (Phase::RolledBack, "RolledBack"),
    (Phase::Aborted, "Aborted"),
];

/// A request from one version to another under a release: the live page's edges.
/// `from_service` and `from_version` are empty for a caller outside the mesh (the gateway, or
/// a pod that is no version of a mesh service).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    pub from_service: String,
    pub from_version: String,
    pub service: String,
    pub version: String,
    pub release: String,
    /// 2xx, 3xx, 4xx or 5xx.
    pub code: String,
}

/// The release a request was scheduled to where the decision was made (not carried by a
/// stamp); empty for none.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub release: String,
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
            "Requests steer answered itself, by reason (malformed_request, no_service, \
             unknown_service, no_endpoint, connect_failed, upstream_failed, timeout, \
             client_body, client_timeout, unasked_upgrade)",
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
        let edges = Family::<EdgeLabels, Counter>::default();
        registry.register(
            "edge_requests",
            "Requests from one version (empty: outside the mesh) to another, by release and \
             status class",
            edges.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Requests whose release this agent decided (the first mesh hop; later hops honour \
             the stamp), by release; empty: none, counted where it entered from outside the mesh",
            decisions.clone(),
        );
        let datapath_attached = Gauge::default();
        registry.register(
            "datapath_attached",
            "1 while the eBPF programs are attached (0: --no-ebpf; pods reach services the \
             cluster's usual way)",
            datapath_attached.clone(),
        );
        let redirected = Counter::default();
        registry.register(
            "redirected_connections",
            "Connections on the redirect listener whose original service the datapath knew",
            redirected.clone(),
        );
        let not_redirected = Counter::default();
        registry.register(
            "unredirected_connections",
            "Connections on the redirect listener the datapath did not redirect (treated as \
             from outside the mesh)",
            not_redirected.clone(),
        );
        let releases_in_force = Gauge::default();
        registry.register(
            "releases_in_force",
            "Canary releases of the configuration in force",
            releases_in_force.clone(),
        );
        let rollout_percent = Family::<ReleaseLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "rollout_percent",
            "The share of its matching users a rolling release takes now (0: rolled back or \
             promoted)",
            rollout_percent.clone(),
        );
        let rollout_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "rollout_phase",
            "1 for the phase each rollout is in (Progressing, Succeeded, Promoted, RolledBack, Aborted)",
            rollout_phase.clone(),
        );
        // Series that exist from the start at 0, so that a rate over them is 0 rather than
        // absent (and dashboards find them before the first event).
        for result in ["applied", "rejected"] {
            reloads.get_or_create_owned(&ReloadLabels {
                result: result.to_string(),
            });
        }
        for result in ["written", "failed"] {
            status_writes.get_or_create_owned(&ResultLabels {
                result: result.to_string(),
            });
        }
        // `ProxyError::label`'s values.
        for reason in [
            "no_service",
            "unknown_service",
            "no_endpoint",
            "connect_failed",
            "upstream_failed",
            "timeout",
        ] {
            request_errors.get_or_create_owned(&ReasonLabels { reason });
        }
        Metrics {
            registry: Mutex::new(registry),
            datapath_attached,
            redirected,
            not_redirected,
            releases_in_force,
            rollout_percent,
            rollout_phase,
            rollout_series: Mutex::default(),
            edges,
            edge_series: Mutex::default(),
            decisions,
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

    /// The series of requests from `from` ((service, version); `None`: outside the mesh) along
    /// a route, resolved once per worker so a request builds no label.
    pub fn edge_series(
        &self,
        from: Option<(&str, &str)>,
        service: &str,
        version: &str,
        release: Option<&str>,
    ) -> EdgeSeries {
        let (from_service, from_version) = from.unwrap_or(("", ""));
        EdgeSeries {
            labels: EdgeLabels {
                from_service: from_service.to_string(),
                from_version: from_version.to_string(),
                service: service.to_string(),
                version: version.to_string(),
                release: release.unwrap_or("").to_string(),
                code: String::new(),
            },
            by_class: Default::default(),
        }
    }

    fn edge_counter(&self, labels: EdgeLabels) -> Counter {
        let counter = self.edges.get_or_create_owned(&labels);
        self.edge_series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(labels, counter.clone());
        counter
    }

    /// The counter of requests decided for `release`.
    pub fn decisions(&self, release: Option<&str>) -> Counter {
        self.decisions.get_or_create_owned(&DecisionLabels {
            release: release.unwrap_or("").to_string(),
        })
    }

    /// Every edge series with its count so far.
    pub fn edge_counts(&self) -> Vec<(EdgeLabels, u64)> {
        let series = self.edge_series.lock().unwrap_or_else(|e| e.into_inner());
        series.iter().map(|(l, c)| (l.clone(), c.get())).collect()
    }

    /// Drops the edge and decision series of versions and releases `current` no longer has
    /// (`previous` was in force before it).
    pub fn forget_edges(&self, previous: &Snapshot, current: &Snapshot) {
        let has_version = |service: &str, version: &str| {
            current
                .service(service)
                .is_some_and(|s| s.versions.iter().any(|v| &*v.name == version))
        };
        let has_release =
            |release: &str| release.is_empty() || current.rules.get(release).is_some();
        let mut series = self.edge_series.lock().unwrap_or_else(|e| e.into_inner());
        series.retain(|labels, _| {
            let kept = (labels.from_service.is_empty()
                || has_version(&labels.from_service, &labels.from_version))
                && has_version(&labels.service, &labels.version)
                && has_release(&labels.release);
            if !kept {
                self.edges.remove(labels);
            }
            kept
        });
        for release in previous.rules.releases() {
            if !has_release(&release.name) {
                self.decisions.remove(&DecisionLabels {
                    release: release.name.to_string(),
                });
            }
        }
    }

    pub fn datapath_attached(&self, attached: bool) {
        self.datapath_attached.set(i64::from(attached));
    }

    /// A connection on the redirect listener, with or without an original destination.
    pub fn redirect(&self, known: bool) {
        if known {
            self.redirected.inc();
        } else {
            self.not_redirected.inc();
        }
    }

    pub fn releases_in_force(&self, count: usize) {
        self.releases_in_force
            .set(i64::try_from(count).unwrap_or(i64::MAX));
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

    /// A watch of `kind` starts: its error series exists from now on, at 0.
    pub fn watching(&self, kind: &str) {
        self.watch_errors.get_or_create_owned(&KindLabels {
            kind: kind.to_string(),
        });
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

    /// Where each rollout stands: (release, phase, percent). Series of rollouts no longer
    /// listed are dropped.
    pub fn rollouts(&self, rollouts: &[(&str, Phase, f64)]) {
        let mut known = self
            .rollout_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for gone in known
            .iter()
            .filter(|k| !rollouts.iter().any(|(r, ..)| r == k))
        {
            let release = gone.clone();
            self.rollout_percent.remove(&ReleaseLabels {
                release: release.clone(),
            });
            for (_, phase) in PHASES {
                self.rollout_phase.remove(&PhaseLabels {
                    release: release.clone(),
                    phase,
                });
            }
        }
        for &(release, in_phase, percent) in rollouts {
            let release = release.to_string();
            (self.rollout_percent)
                .get_or_create(&ReleaseLabels {
                    release: release.clone(),
                })
                .set(percent);
            for (phase, label) in PHASES {
                (self.rollout_phase)
                    .get_or_create(&PhaseLabels {
                        release: release.clone(),
                        phase: label,
                    })
                    .set(i64::from(phase == in_phase));
            }
        }
        *known = rollouts.iter().map(|(r, ..)| r.to_string()).collect();
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

/// The requests along one edge, by status class (made on first use).
pub struct EdgeSeries {
    /// `code` is filled in per class.
    labels: EdgeLabels,
    by_class: [OnceCell<Counter>; 5],
}

impl EdgeSeries {
    pub fn observe(&self, metrics: &Metrics, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5);
        self.by_class[usize::from(class - 1)]
            .get_or_init(|| {
                metrics.edge_counter(EdgeLabels {
                    code: status_class(class),
                    ..self.labels.clone()
                })
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

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
    fn rollouts_show_their_percent_and_phase_and_vanish_with_the_rollout() {
        let metrics = Metrics::default();
        metrics.rollouts(&[
            ("android", Phase::Progressing, 5.0),
            ("atlantis", Phase::RolledBack, 0.0),
        ]);
        let text = metrics.encode();
        assert!(
            text.contains(r#"steer_rollout_percent{release="android"} 5.0"#),
            "{text}"
        );
        assert!(text.contains(r#"steer_rollout_phase{release="atlantis",phase="RolledBack"} 1"#));
        assert!(text.contains(r#"steer_rollout_phase{release="atlantis",phase="Progressing"} 0"#));
        metrics.rollouts(&[("android", Phase::Succeeded, 100.0)]);
        let text = metrics.encode();
        assert!(!text.contains("atlantis"), "{text}");
        assert!(text.contains(r#"steer_rollout_phase{release="android",phase="Succeeded"} 1"#));
        assert!(text.contains(r#"steer_rollout_phase{release="android",phase="Progressing"} 0"#));
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
