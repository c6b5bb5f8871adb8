//! What the live page shows, as one small JSON document (`GET /ui/state`): the services and
//! their versions with the release that owns each, the releases in priority order with the
//! checker's verdict, and the edges between versions with their recent request and error
//! rates. Rates come from the agent's own counters, sampled once a second off the request path.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    check::{Report, render_example},
    metrics::Metrics,
    rollout::{Phase, driver::RolloutView},
    rules::HeaderPairs,
    state::{Explanation, Snapshot},
};

/// How often the counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Rates are over this much of the recent past.
pub const WINDOW: Duration = Duration::from_secs(10);

/// An edge: (from service, from version, service, version, release); empty `from` parts are
/// outside the mesh, an empty release is none.
type EdgeKey = (String, String, String, String, String);

/// Counts at one moment.
struct Sample {
    at: Instant,
    /// Requests and 5xx answers per edge.
    edges: HashMap<EdgeKey, (u64, u64)>,
    /// Decisions per release ("" for none).
    decisions: HashMap<String, u64>,
}

/// The sampled counters.
#[derive(Default)]
pub struct Live {
    samples: Mutex<VecDeque<Sample>>,
}

impl Live {
    /// Reads the counters now; keeps what the window needs.
    pub fn sample(&self, metrics: &Metrics, snapshot: &Snapshot) {
        let mut edges: HashMap<EdgeKey, (u64, u64)> = HashMap::new();
        for (labels, count) in metrics.edge_counts() {
            let key = (
                labels.from_service,
                labels.from_version,
                labels.service,
                labels.version,
                labels.release,
            );
            let entry = edges.entry(key).or_default();
            entry.0 += count;
            if labels.code == "5xx" {
                entry.1 += count;
            }
        }
        let decisions = snapshot
            .rules
            .releases()
            .iter()
            .map(|r| Some(&*r.name))
            .chain([None])
            .map(|release| {
                let count = metrics.decisions(release).get();
                (release.unwrap_or("").to_string(), count)
            })
            .collect();
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back(Sample {
            at: now,
            edges,
            decisions,
        });
        while samples
            .front()
            .is_some_and(|s| now.duration_since(s.at) > WINDOW + SAMPLE_EVERY / 2)
        {
            samples.pop_front();
        }
    }

    /// The page's state document; `rejected` is the report of the latest configuration that
    /// was refused, if the source has not sent a good one since, and `left_out` the releases
    /// the cluster has that its translation left out of the configuration (with why).
    pub fn state(
        &self,
        snapshot: &Arc<Snapshot>,
        rejected: Option<&Rejection>,
        left_out: &[LeftOut],
        rollouts: &[RolloutView],
    ) -> State {
        let rollout_of = |release: &str| {
            rollouts
                .iter()
                .find(|r| r.release == release)
                .map(|r| r.status.message.clone())
        };
        let report = &snapshot.report;
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let (first, last) = (samples.front(), samples.back());
        let seconds = match (first, last) {
            (Some(first), Some(last)) => last.at.duration_since(first.at).as_secs_f64(),
            _ => 0.0,
        };
        let per_second = |now: u64, before: u64| {
            if seconds > 0.0 {
                now.saturating_sub(before) as f64 / seconds
            } else {
                0.0
            }
        };
        let config = &snapshot.config;
        let owner = |service: &str, version: &str| {
            config
                .releases
                .iter()
                .find(|r| r.targets.get(service).is_some_and(|v| v == version))
                .map(|r| r.name.clone())
        };
        let services = config
            .services
            .iter()
            .map(|service| ServiceView {
                name: service.name.clone(),
                versions: service
                    .versions
                    .iter()
                    .map(|version| VersionView {
                        name: version.name.clone(),
                        primary: version.primary,
                        release: owner(&service.name, &version.name),
                        endpoints: version.endpoints.len(),
                    })
                    .collect(),
            })
            .collect();
        let mut releases: Vec<ReleaseView> = config
            .releases
            .iter()
            .map(|release| {
                let shadowed = report.shadowed.iter().find(|s| s.release == release.name);
                // The checker reports overlaps per release, with one example each.
                let overlaps = report
                    .overlaps
                    .iter()
                    .filter(|o| o.release == release.name)
                    .filter_map(|o| o.example.as_ref())
                    .map(|o| OverlapView {
                        with: o.releases.iter().find(|r| **r != release.name).cloned(),
                        winner: o.winner.clone(),
                        example: o
                            .example
                            .as_ref()
                            .map_or_else(|| "no example found".to_string(), render_example),
                    })
                    .collect();
                let decided = |sample: Option<&Sample>| {
                    sample.and_then(|s| s.decisions.get(&release.name).copied())
                };
                let rate = per_second(decided(last).unwrap_or(0), decided(first).unwrap_or(0));
                ReleaseView {
                    name: release.name.clone(),
                    priority: Some(release.priority),
                    matchers: release
                        .matchers
                        .iter()
                        .map(|m| {
                            let (kind, value) = match (&m.exact, &m.prefix, &m.regex) {
                                (Some(v), None, None) => ("exact", v.as_str()),
                                (None, Some(v), None) => ("prefix", v.as_str()),
                                (None, None, Some(v)) => ("regex", v.as_str()),
                                _ => ("invalid", ""),
                            };
                            MatcherView {
                                header: m.header.clone(),
                                kind,
                                value: value.to_string(),
                            }
                        })
                        .collect(),
                    percent: release.percent,
                    hash_by: release.hash_by.clone(),
                    targets: release.targets.clone(),
                    verdict: if shadowed.is_some() {
                        "shadowed"
                    } else {
                        "accepted"
                    },
                    shadowed_by: shadowed.map(|s| s.by.clone()).unwrap_or_default(),
                    shadow_example: shadowed
                        .and_then(|s| s.example.as_ref())
                        .map(render_example),
                    overlaps,
                    rate,
                    rollout: rollout_of(&release.name),
                }
            })
            .collect();
        releases.sort_by_key(|r| r.priority);
        // Not in force, so after those that are, in name order.
        releases.extend(left_out.iter().map(|release| ReleaseView {
            name: release.name.clone(),
            priority: None,
            matchers: vec![],
            percent: None,
            hash_by: None,
            targets: BTreeMap::new(),
            verdict: release.verdict,
            shadowed_by: release.related.clone(),
            shadow_example: Some(release.message.clone()),
            overlaps: vec![],
            rate: 0.0,
            rollout: None,
        }));
        // Rollouts that take no traffic (rolled back, promoted) are not in the rules.
        let in_rules = |name: &str| config.releases.iter().any(|r| r.name == name);
        releases.extend(
            rollouts
                .iter()
                .filter(|r| !in_rules(&r.release))
                .map(|r| ReleaseView {
                    name: r.release.clone(),
                    priority: None,
                    matchers: vec![],
                    percent: Some(r.status.percent),
                    hash_by: None,
                    targets: BTreeMap::new(),
                    verdict: match r.status.phase {
                        Phase::Promoted => "promoted",
                        Phase::Aborted => "aborted",
                        _ => "rolled-back",
                    },
                    shadowed_by: vec![],
                    shadow_example: None,
                    overlaps: vec![],
                    rate: 0.0,
                    rollout: Some(r.status.message.clone()),
                }),
        );
        let unreleased = {
            let decided =
                |sample: Option<&Sample>| sample.and_then(|s| s.decisions.get("").copied());
            per_second(decided(last).unwrap_or(0), decided(first).unwrap_or(0))
        };
        let edges = last
            .map(|last| {
                let mut edges: Vec<EdgeView> = last
                    .edges
                    .iter()
                    .map(|(key, &(requests, errors))| {
                        let (before, errors_before) = first
                            .and_then(|f| f.edges.get(key).copied())
                            .unwrap_or((0, 0));
                        EdgeView {
                            from_service: key.0.clone(),
                            from_version: key.1.clone(),
                            service: key.2.clone(),
                            version: key.3.clone(),
                            release: key.4.clone(),
                            requests,
                            errors,
                            rate: per_second(requests, before),
                            error_rate: per_second(errors, errors_before),
                        }
                    })
                    .collect();
                edges.sort_by(|a, b| {
                    (
                        &a.from_service,
                        &a.from_version,
                        &a.service,
                        &a.version,
                        &a.release,
                    )
                        .cmp(&(
                            &b.from_service,
                            &b.from_version,
                            &b.service,
                            &b.version,
                            &b.release,
                        ))
                });
                edges
            })
            .unwrap_or_default();
        State {
            services,
            releases,
            unreleased_rate: unreleased,
            edges,
            window_seconds: seconds,
            warnings: report.warnings.iter().map(|w| w.message.clone()).collect(),
            rejected: rejected.map(|r| RejectedView {
                origin: r.origin.clone(),
                errors: r.report.errors.iter().map(|e| e.message.clone()).collect(),
                shadowed: r
                    .report
                    .shadowed
                    .iter()
                    .map(|s| ShadowView {
                        release: s.release.clone(),
                        by: s.by.clone(),
                        example: s
                            .example
                            .as_ref()
                            .map_or_else(|| "no example found".to_string(), render_example),
                    })
                    .collect(),
            }),
        }
    }
}

/// The path a request with `headers` takes: the explanation at every service, in the order
/// of the configuration.
pub fn explain_all(snapshot: &Snapshot, headers: &HeaderPairs) -> Vec<Explanation> {
    snapshot
        .config
        .services
        .iter()
        .filter_map(|service| snapshot.explain(&service.name, headers))
        .collect()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub services: Vec<ServiceView>,
    pub releases: Vec<ReleaseView>,
    /// Requests per second decided here for no release (primary versions all along).
    pub unreleased_rate: f64,
    pub edges: Vec<EdgeView>,
    /// The time the rates are over (shorter just after the agent started).
    pub window_seconds: f64,
    pub warnings: Vec<String>,
    /// The latest configuration the agent refused (the one above keeps serving).
    pub rejected: Option<RejectedView>,
}

/// A configuration the agent refused, and why.
#[derive(Clone, Debug)]
pub struct Rejection {
    pub origin: String,
    pub report: Report,
}

#[derive(Serialize)]
pub struct RejectedView {
    pub origin: String,
    /// Every error, shadowing included.
    pub errors: Vec<String>,
    pub shadowed: Vec<ShadowView>,
}

#[derive(Serialize)]
pub struct ShadowView {
    pub release: String,
    pub by: Vec<String>,
    pub example: String,
}

#[derive(Serialize)]
pub struct ServiceView {
    pub name: String,
    pub versions: Vec<VersionView>,
}

#[derive(Serialize)]
pub struct VersionView {
    pub name: String,
    pub primary: bool,
    /// The release this version belongs to.
    pub release: Option<String>,
    pub endpoints: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseView {
    pub name: String,
    /// `None` for a release left out of the configuration.
    pub priority: Option<u32>,
    pub matchers: Vec<MatcherView>,
    pub percent: Option<f64>,
    pub hash_by: Option<String>,
    pub targets: BTreeMap<String, String>,
    /// `accepted` or `shadowed`; with the Kubernetes source also `conflict` or `invalid` for a
    /// release left out (`shadowedBy` then names the releases involved, `shadowExample` why);
    /// `rolled-back`, `aborted` or `promoted` for a rollout that takes no traffic.
    pub verdict: &'static str,
    pub shadowed_by: Vec<String>,
    pub shadow_example: Option<String>,
    pub overlaps: Vec<OverlapView>,
    /// Requests per second this agent scheduled to the release.
    pub rate: f64,
    /// Where its progressive rollout stands, in a sentence.
    pub rollout: Option<String>,
}

/// A CanaryRelease the Kubernetes source left out of the configuration, and why.
#[derive(Clone, Debug)]
pub struct LeftOut {
    pub name: String,
    /// `shadowed`, `conflict` or `invalid`.
    pub verdict: &'static str,
    pub related: Vec<String>,
    pub message: String,
}

#[derive(Serialize)]
pub struct MatcherView {
    pub header: String,
    pub kind: &'static str,
    pub value: String,
}

#[derive(Serialize)]
pub struct OverlapView {
    pub with: Option<String>,
    pub winner: String,
    pub example: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeView {
    pub from_service: String,
    pub from_version: String,
    pub service: String,
    pub version: String,
    pub release: String,
    pub requests: u64,
    pub errors: u64,
    pub rate: f64,
    pub error_rate: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http::StatusCode;

    fn snapshot(file: &str) -> Arc<Snapshot> {
        let path = format!("{}/../deploy/examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let config = Config::load(std::path::Path::new(&path)).unwrap();
        Arc::new(Snapshot::build(config).unwrap().0)
    }

    #[test]
    fn edges_have_rates_and_versions_their_owners() {
        let snapshot = snapshot("food-delivery.yaml");
        let metrics = Metrics::default();
        let live = Live::default();
        live.sample(&metrics, &snapshot);
        let edge = metrics.edge_series(
            Some(("restaurant", "v1")),
            "delivery",
            "v2-green",
            Some("green"),
        );
        for _ in 0..10 {
            edge.observe(&metrics, StatusCode::OK);
        }
        edge.observe(&metrics, StatusCode::BAD_GATEWAY);
        metrics.decisions(Some("green")).inc();
        std::thread::sleep(Duration::from_millis(20));
        live.sample(&metrics, &snapshot);
        let state = live.state(&snapshot, None, &[], &[]);
        let green = &state.edges[0];
        assert_eq!((green.requests, green.errors), (11, 1));
        assert!(green.rate > 0.0 && green.error_rate > 0.0);
        let release = state.releases.iter().find(|r| r.name == "green").unwrap();
        assert!(release.rate > 0.0);
        assert_eq!(
            state.releases.iter().map(|r| &*r.name).collect::<Vec<_>>(),
            ["red", "blue", "green"]
        );
        let delivery = &state.services[2];
        let owners: Vec<_> = delivery
            .versions
            .iter()
            .map(|v| v.release.clone())
            .collect();
        assert_eq!(
            owners,
            [None, Some("green".to_string()), Some("blue".to_string())]
        );
    }

    #[test]
    fn a_rejected_configuration_shows_what_shadows_what() {
        let snapshot = snapshot("food-delivery.yaml");
        let path = format!(
            "{}/../deploy/examples/food-delivery-shadowed.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let config = Config::load(std::path::Path::new(&path)).unwrap();
        let rejected = Rejection {
            origin: "edit".into(),
            report: Snapshot::build(config).unwrap_err().0,
        };
        let state = Live::default().state(&snapshot, Some(&rejected), &[], &[]);
        let rejected = state.rejected.unwrap();
        assert_eq!(rejected.shadowed[0].release, "red");
        assert_eq!(rejected.shadowed[0].by, ["blue"]);
        assert!(rejected.shadowed[0].example.contains("android"));
        assert!(state.releases.iter().all(|r| r.verdict == "accepted"));
    }
}
