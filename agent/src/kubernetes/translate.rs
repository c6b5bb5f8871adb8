//! From the cluster's objects to the file format's `Config`, and from the checker's report to a
//! verdict per CanaryRelease.
//!
//! A Service joins the mesh with the annotation `steer.dev/primary-version`; its versions are
//! the values of its pods' version label. One team's bad release must not take the others down:
//! releases the checker rejects are left out (and told why in their status) and the rest serve.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use anyhow::{Result, bail};
use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};

use super::crd::CanaryRelease;
use crate::{
    check,
    config::{AppProtocol, Config, Release, Service, Version, timeout_format},
    rollout::{Phase, fingerprint},
    rules::Test,
};

/// Marks a Service as part of the mesh and names its primary version.
pub const PRIMARY_ANNOTATION: &str = "steer.dev/primary-version";
/// Overrides, per Service, the pod label whose value is the version.
pub const VERSION_LABEL_ANNOTATION: &str = "steer.dev/version-label";
/// The Service's request timeout (`5s`, `1m30s`), like the file format's `requestTimeout`.
pub const REQUEST_TIMEOUT_ANNOTATION: &str = "steer.dev/request-timeout";
/// The label EndpointSlices carry with their Service's name.
const SLICE_SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// Pod (namespace, name) -> its labels.
pub type PodLabels = HashMap<(String, String), BTreeMap<String, String>>;

/// The objects the translation reads, as the watchers hold them.
#[derive(Debug, Default, PartialEq)]
pub struct Cluster {
    pub releases: Vec<CanaryRelease>,
    pub services: Vec<KubeService>,
    pub slices: Vec<EndpointSlice>,
    pub pods: PodLabels,
    /// The UIDs of the pods annotated out of redirection (`opt_out`).
    pub opted_out: BTreeSet<String>,
    /// The rollout statuses the releases hold (routing reads them, the translation does not).
    pub rollouts: crate::rollout::Book,
}

/// What became of one CanaryRelease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub state: State,
    /// CamelCase, for the conditions' `reason`.
    pub reason: String,
    pub message: String,
    /// The other releases involved (the shadowing or conflicting ones), as `namespace/name`.
    pub related: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Accepted,
    Shadowed,
    Conflict,
    Invalid,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Accepted,
        State::Shadowed,
        State::Conflict,
        State::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Accepted => "Accepted",
            State::Shadowed => "Shadowed",
            State::Conflict => "Conflict",
            State::Invalid => "Invalid",
        }
    }
}

/// The routable configuration and a verdict for every CanaryRelease (keyed `namespace/name`).
#[derive(Debug)]
pub struct Translation {
    pub config: Config,
    /// The checker's report on `config` (valid): applying it needs no second check.
    pub report: check::Report,
    pub verdicts: BTreeMap<String, Verdict>,
}

/// The name a release has in the snapshot, in stamps and in messages.
pub fn release_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Translates the cluster; fails only when something no release is to blame for is wrong.
pub fn translate(cluster: &Cluster, version_label: &str) -> Result<Translation> {
    let services = mesh_services(cluster, version_label);
    // `name.namespace` -> the snapshot services it became (one per port).
    let mut by_base: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (base, service) in &services {
        by_base
            .entry(base.clone())
            .or_default()
            .push(service.name.clone());
    }
    // Oldest first: when two releases conflict, the newer one gives way.
    let mut releases: Vec<&CanaryRelease> = cluster.releases.iter().collect();
    releases.sort_by_key(|r| {
        (
            r.metadata.creation_timestamp.clone().map(|t| t.0),
            release_key(namespace_of(r), name_of(r)),
        )
    });
    let age: HashMap<String, usize> = releases
        .iter()
        .enumerate()
        .map(|(i, r)| (release_key(namespace_of(r), name_of(r)), i))
        .collect();
    // A promoted release's versions are the primaries now: it takes no traffic of its own,
    // and the checker would refuse it for claiming primaries.
    let (promoted, releases): (Vec<Release>, Vec<Release>) = releases
        .iter()
        .map(|r| to_release(r, &by_base))
        .partition(|release| {
            cluster.rollouts.get(&release.name).is_some_and(|status| {
                status.phase == Phase::Promoted && status.fingerprint == fingerprint(release)
            })
        });
    let config = Config {
        services: services.into_iter().map(|(_, s)| s).collect(),
        releases,
        ..Config::default()
    };
    let mut translation = resolve(config, &age)?;
    for release in promoted {
        let verdict = Verdict {
            state: State::Accepted,
            reason: "Promoted".to_string(),
            message: "promoted: its versions are the primaries now, it takes no traffic of its \
                      own"
            .to_string(),
            related: vec![],
        };
        translation.verdicts.insert(release.name, verdict);
    }
    Ok(translation)
}

/// The name `release` has in the snapshot.
pub fn key_of(release: &CanaryRelease) -> String {
    release_key(namespace_of(release), name_of(release))
}

fn namespace_of(release: &CanaryRelease) -> &str {
    release.metadata.namespace.as_deref().unwrap_or("default")
}

fn name_of(release: &CanaryRelease) -> &str {
    release.metadata.name.as_deref().unwrap_or_default()
}

/// A CanaryRelease in the file format, its targets resolved to snapshot services.
fn to_release(release: &CanaryRelease, by_base: &BTreeMap<String, Vec<String>>) -> Release {
    let namespace = namespace_of(release);
    let mut targets = BTreeMap::new();
    for (service, version) in &release.spec.targets {
        let base = if service.contains('.') {
            service.clone()
        } else {
            format!("{service}.{namespace}")
        };
        match by_base.get(&base) {
            Some(names) => {
                for name in names {
                    targets.insert(name.clone(), version.clone());
                }
            }
            // The checker reports it as an unknown service.
            None => {
                targets.insert(base, version.clone());
            }
        }
    }
    Release {
        name: release_key(namespace, name_of(release)),
        priority: release.spec.priority,
        matchers: release.spec.matchers.clone(),
        percent: release.spec.percent,
        hash_by: release.spec.hash_by.clone(),
        targets,
        rollout: release.spec.rollout.clone(),
    }
}

/// The annotated Services as snapshot services, with the base name (`name.namespace`) each
/// came from. A Service with one port is `name.namespace`; with several, one service per port,
/// `name.namespace:port-name`.
fn mesh_services(cluster: &Cluster, default_label: &str) -> Vec<(String, Service)> {
    let mut out = Vec::new();
    for service in &cluster.services {
        let annotations = service.metadata.annotations.clone().unwrap_or_default();
        let Some(primary) = annotations.get(PRIMARY_ANNOTATION) else {
            continue;
        };
        let (Some(name), Some(namespace)) = (&service.metadata.name, &service.metadata.namespace)
        else {
            continue;
        };
        let label = annotations
            .get(VERSION_LABEL_ANNOTATION)
            .map_or(default_label, String::as_str);
        // A bad value must not take the Service out of the mesh: it keeps the default.
        let request_timeout = annotations
            .get(REQUEST_TIMEOUT_ANNOTATION)
            .and_then(|text| {
                timeout_format::parse(text)
                    .inspect_err(|reason| {
                        tracing::warn!(service = %name, namespace = %namespace, %reason,
                        "annotation {REQUEST_TIMEOUT_ANNOTATION} ignored");
                    })
                    .ok()
            });
        let spec = service.spec.clone().unwrap_or_default();
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if cluster_ips.is_empty() {
            // Headless: callers connect to pod IPs, there is no service address to steer.
            tracing::debug!(service = %name, namespace = %namespace, "headless service skipped");
            continue;
        }
        let ports: Vec<_> = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .collect();
        let slices: Vec<&EndpointSlice> = cluster
            .slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_ref() == Some(namespace)
                    && s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SLICE_SERVICE_LABEL))
                        == Some(name)
            })
            .collect();
        let base = format!("{name}.{namespace}");
        for port in &ports {
            let service_name = if ports.len() == 1 {
                base.clone()
            } else {
                format!(
                    "{base}:{}",
                    port.name.clone().unwrap_or_else(|| port.port.to_string())
                )
            };
            let addresses = cluster_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, port.port as u16))
                .collect();
            let mut versions: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
            versions.entry(primary.clone()).or_default();
            for slice in &slices {
                collect_endpoints(
                    slice,
                    port.name.as_deref(),
                    label,
                    &cluster.pods,
                    &mut versions,
                );
            }
            out.push((
                base.clone(),
                Service {
                    name: service_name,
                    addresses,
                    versions: versions
                        .into_iter()
                        .map(|(version, endpoints)| Version {
                            primary: &version == primary,
                            name: version,
                            endpoints: endpoints.into_iter().collect(),
                        })
                        .collect(),
                    request_timeout,
                    protocol: AppProtocol::from_kubernetes(port.app_protocol.as_deref()),
                },
            ));
        }
    }
    out
}

/// Adds the endpoints of one EndpointSlice for the Service port named `port_name`: every pod
/// with a version label makes its version known; only ready pods serve.
fn collect_endpoints(
    slice: &EndpointSlice,
    port_name: Option<&str>,
    label: &str,
    pods: &PodLabels,
    versions: &mut BTreeMap<String, BTreeSet<SocketAddr>>,
) {
    let port = slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().filter(|n| !n.is_empty()) == port_name.filter(|n| !n.is_empty())
    });
    let Some(port) = port.and_then(|p| p.port) else {
        return;
    };
    for endpoint in &slice.endpoints {
        let Some(pod) = endpoint
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
        else {
            continue;
        };
        let key = (
            pod.namespace
                .clone()
                .or_else(|| slice.metadata.namespace.clone())
                .unwrap_or_default(),
            pod.name.clone().unwrap_or_default(),
        );
        let Some(version) = pods.get(&key).and_then(|labels| labels.get(label)) else {
            continue;
        };
        let entry = versions.entry(version.clone()).or_default();
        // The API's rule: an unknown readiness counts as ready.
        let ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        if ready {
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    entry.insert(SocketAddr::new(ip, port as u16));
                }
            }
        }
    }
}

/// Leaves out the releases the checker rejects until the rest is valid. Releases at fault on
/// their own go first; of two conflicting releases the newer one (by `age`) gives way; a
/// shadowed release goes last, as the releases shadowing it may themselves have gone.
pub fn resolve(mut config: Config, age: &HashMap<String, usize>) -> Result<Translation> {
    let mut verdicts: BTreeMap<String, Verdict> = BTreeMap::new();
    loop {
        let report = check::check(&config);
        if report.valid {
            for release in &config.releases {
                verdicts.insert(release.name.clone(), accepted(release, &report));
            }
            return Ok(Translation {
                config,
                report,
                verdicts,
            });
        }
        let mut dropped: BTreeMap<String, Verdict> = BTreeMap::new();
        for error in report.errors.iter().filter(|e| e.releases.len() == 1) {
            let verdict = dropped
                .entry(error.releases[0].clone())
                .or_insert_with(|| Verdict {
                    state: State::Invalid,
                    reason: camel_case(error.code),
                    message: String::new(),
                    related: vec![],
                });
            if !verdict.message.is_empty() {
                verdict.message.push_str("; ");
            }
            verdict.message.push_str(&error.message);
        }
        if dropped.is_empty() {
            for error in report.errors.iter().filter(|e| e.code != "shadowed") {
                let mut involved = error.releases.clone();
                if involved.len() < 2 || involved.iter().any(|r| dropped.contains_key(r)) {
                    continue;
                }
                involved.sort_by_key(|r| age.get(r).copied().unwrap_or(usize::MAX));
                let loser = involved.pop().expect("two releases");
                dropped.insert(
                    loser,
                    Verdict {
                        state: State::Conflict,
                        reason: camel_case(error.code),
                        message: error.message.clone(),
                        related: involved,
                    },
                );
            }
        }
        if dropped.is_empty() {
            for shadowed in &report.shadowed {
                let message = format!(
                    "every request it matches goes to higher-priority {}{}{}",
                    shadowed
                        .by
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    shadowed
                        .example
                        .as_ref()
                        .map(|e| format!(", e.g. {{{}}}", check::render_example(e)))
                        .unwrap_or_default(),
                    if shadowed.approximate {
                        " (approximate: a regex was too complex to analyse exactly)"
                    } else {
                        ""
                    }
                );
                dropped.insert(
                    shadowed.release.clone(),
                    Verdict {
                        state: State::Shadowed,
                        reason: "Shadowed".to_string(),
                        message,
                        related: shadowed.by.clone(),
                    },
                );
            }
        }
        if dropped.is_empty() {
            let messages: Vec<&str> = report.errors.iter().map(|e| e.message.as_str()).collect();
            bail!("the mesh services are invalid: {}", messages.join("; "));
        }
        config.releases.retain(|r| !dropped.contains_key(&r.name));
        verdicts.extend(dropped);
    }
}

fn accepted(release: &Release, report: &check::Report) -> Verdict {
    let targets: Vec<String> = release
        .targets
        .iter()
        .map(|(service, version)| format!("{service}={version}"))
        .collect();
    let mut message = if targets.is_empty() {
        "serves nothing of its own: its requests go to the primary versions".to_string()
    } else {
        format!("routes its requests to {}", targets.join(", "))
    };
    for warning in report
        .warnings
        .iter()
        .filter(|w| w.releases.contains(&release.name))
    {
        message.push_str("; warning: ");
        message.push_str(&warning.message);
    }
    Verdict {
        state: State::Accepted,
        reason: "Accepted".to_string(),
        message,
        related: vec![],
    }
}

/// `ambiguous-priority` -> `AmbiguousPriority`.
fn camel_case(code: &str) -> String {
    code.split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or(String::new(), |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// The matchers in one line: `x-device=android, x-region~^atl`.
pub fn match_summary(release: &CanaryRelease) -> String {
    release
        .spec
        .matchers
        .iter()
        .map(|m| match Test::parse(m) {
            Ok(test) => format!("{}{test}", m.header),
            Err(_) => format!("{}?", m.header),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
