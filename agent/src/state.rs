//! The routing snapshot: one immutable value built from a checked configuration, read by the
//! request path without locks and replaced whole when the configuration changes.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde::Serialize;

use crate::{
    check::{self, Report},
    config::{AppProtocol, Config, DEFAULT_REQUEST_TIMEOUT},
    rules::{CompiledRelease, Ruleset, Tags},
};

/// What a request is counted under: (service, version, release), `None` for no release.
pub type Route<'a> = (&'a str, &'a str, Option<&'a str>);

/// A configuration that passed the checker, compiled for routing.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub rules: Ruleset,
    /// The checker's report this snapshot was built with (the admin page shows it; checking
    /// again there would redo the analysis on every reload).
    pub report: Arc<Report>,
    /// The services, each with its versions resolved: what the request path reads.
    services: Vec<ServiceRoutes>,
    /// Looked up on every request: a fast hash (the keys come from the configuration).
    by_name: foldhash::HashMap<Arc<str>, usize>,
    /// Service address -> index in `services`.
    by_address: foldhash::HashMap<SocketAddr, usize>,
    /// Who calls: see `Callers`.
    pub callers: Callers,
}

/// One service as the request path needs it: names shared (`Arc<str>`), so a request clones
/// a pointer rather than building a `String`.
#[derive(Debug)]
pub struct ServiceRoutes {
    pub name: Arc<str>,
    pub versions: Vec<VersionRoutes>,
    /// Index of the primary version in `versions`.
    primary: usize,
    /// How long its versions have to answer with response headers.
    pub request_timeout: Duration,
    pub protocol: AppProtocol,
}

#[derive(Debug)]
pub struct VersionRoutes {
    pub name: Arc<str>,
    pub endpoints: Arc<[Endpoint]>,
}

impl ServiceRoutes {
    /// What a connection keeps of its service: the name (looked up again per request, in the
    /// snapshot then in force) and what its clients speak.
    pub fn clone_identity(&self) -> (Arc<str>, AppProtocol) {
        (self.name.clone(), self.protocol)
    }

    /// The version that serves a request scheduled to `release` (or to none): the release's
    /// own version of this service if it has one, else the primary.
    pub fn version_for(&self, release: Option<&CompiledRelease>) -> &VersionRoutes {
        release
            .and_then(|r| r.target(&self.name))
            .and_then(|name| self.versions.iter().find(|v| &*v.name == name))
            .unwrap_or(&self.versions[self.primary])
    }
}

/// One pod of a version, with the requests in flight to it (for load balancing). The counter
/// belongs to the address and survives snapshot swaps, so a reload does not reset the load.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    in_flight: Arc<AtomicUsize>,
}

impl Endpoint {
    #[cfg(test)]
    pub fn new(address: SocketAddr) -> Endpoint {
        Endpoint {
            address,
            in_flight: Arc::default(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request to this endpoint until the guard drops.
    pub fn start(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.in_flight.clone())
    }
}

/// A request in flight to an endpoint.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The errors a rejection's message names; a large configuration can have thousands, and the
/// message is one log line.
const SHOWN_ERRORS: usize = 10;

/// Why a snapshot could not be built: the checker's full report (it has errors).
#[derive(Debug)]
pub struct Rejected(pub Report);

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let messages: Vec<String> = self
            .0
            .errors
            .iter()
            .take(SHOWN_ERRORS)
            .map(|e| format!("{}: {}", e.code, e.message))
            .collect();
        write!(f, "configuration rejected: {}", messages.join("; "))?;
        let more = self.0.errors.len().saturating_sub(SHOWN_ERRORS);
        if more > 0 {
            write!(f, "; and {more} more error(s) (steer check lists them all)")?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejected {}

/// Where one request to one service goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub service: String,
    pub release: Option<String>,
    pub version: String,
    pub reason: String,
}

impl Snapshot {
    /// Checks and compiles `config`; any checker error rejects it whole, so a snapshot in
    /// force is always a valid one. Returns the report too, for its warnings.
    pub fn build(config: Config) -> Result<(Snapshot, Report), Rejected> {
        Snapshot::build_after(config, None)
    }

    /// Like `build`, carrying the in-flight counters of `previous` over to unchanged endpoints.
    pub fn build_after(
        config: Config,
        previous: Option<&Snapshot>,
    ) -> Result<(Snapshot, Report), Rejected> {
        Snapshot::build_checked(config, previous, None)
    }

    /// Like `build_after`, trusting `report` when given: the checker's report on exactly this
    /// configuration (a source that checked it already need not pay for a second check).
    pub fn build_checked(
        config: Config,
        previous: Option<&Snapshot>,
        report: Option<Report>,
    ) -> Result<(Snapshot, Report), Rejected> {
        let report = report.unwrap_or_else(|| check::check(&config));
        Snapshot::assemble(config, previous, report)
    }

    /// Like `build`, with the structural checks only (no overlap analysis): enough to explain
    /// a request, not to put a configuration in force.
    pub fn build_structural(config: Config) -> Result<(Snapshot, Report), Rejected> {
        let report = check::check_structure(&config);
        Snapshot::assemble(config, None, report)
    }

    fn assemble(
        config: Config,
        previous: Option<&Snapshot>,
        report: Report,
    ) -> Result<(Snapshot, Report), Rejected> {
        if !report.valid {
            return Err(Rejected(report));
        }
        // The checker compiled every regex already, so this cannot fail on a valid config.
        let rules = Ruleset::compile(&config).map_err(|err| {
            let mut report = report.clone();
            report.valid = false;
            report.errors.push(check::Finding {
                code: "invalid-release",
                message: format!("{err:#}"),
                releases: vec![],
            });
            Rejected(report)
        })?;
        let counters: HashMap<SocketAddr, Arc<AtomicUsize>> = previous
            .into_iter()
            .flat_map(|p| &p.services)
            .flat_map(|service| &service.versions)
            .flat_map(|version| version.endpoints.iter())
            .map(|e| (e.address, e.in_flight.clone()))
            .collect();
        let mut services = Vec::with_capacity(config.services.len());
        let mut by_name = foldhash::HashMap::default();
        let mut by_address = foldhash::HashMap::default();
        // The checker guarantees exactly one primary per service; a service without one
        // cannot be routed and is left out.
        for service in &config.services {
            let Some(primary) = service.versions.iter().position(|v| v.primary) else {
                continue;
            };
            let index = services.len();
            let name: Arc<str> = service.name.as_str().into();
            for address in &service.addresses {
                by_address.insert(*address, index);
            }
            by_name.insert(name.clone(), index);
            let versions = service
                .versions
                .iter()
                .map(|version| VersionRoutes {
                    name: version.name.as_str().into(),
                    endpoints: version
                        .endpoints
                        .iter()
                        .map(|address| Endpoint {
                            address: *address,
                            in_flight: counters.get(address).cloned().unwrap_or_default(),
                        })
                        .collect(),
                })
                .collect();
            services.push(ServiceRoutes {
                name,
                versions,
                primary,
                request_timeout: service.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
                protocol: service.protocol,
            });
        }
        Ok((
            Snapshot {
                config,
                rules,
                callers: Callers::of(&services),
                services,
                by_name,
                by_address,
                report: Arc::new(report.clone()),
            },
            report,
        ))
    }

    /// A service by name.
    pub fn service(&self, name: &str) -> Option<&ServiceRoutes> {
        self.by_name.get(name).map(|&i| &self.services[i])
    }

    /// The service a caller reached by connecting to `address`.
    pub fn service_at(&self, address: SocketAddr) -> Option<&ServiceRoutes> {
        self.by_address.get(&address).map(|&i| &self.services[i])
    }

    /// The version of `service` that serves a request scheduled to `release` (or to none).
    /// `None`: unknown service.
    pub fn version_for<'a>(
        &'a self,
        service: &str,
        release: Option<&CompiledRelease>,
    ) -> Option<&'a str> {
        Some(&self.service(service)?.version_for(release).name)
    }

    /// How long `service`'s versions have to answer with response headers.
    pub fn request_timeout(&self, service: &str) -> Duration {
        self.service(service)
            .map_or(DEFAULT_REQUEST_TIMEOUT, |s| s.request_timeout)
    }

    /// The routes `previous` could take that this snapshot cannot: those of its releases and
    /// services that are gone. (A release that now targets another version leaves its old
    /// route behind; that is bounded by the edits, not by the releases ever made.)
    pub fn retired_routes<'a>(&self, previous: &'a Snapshot) -> Vec<Route<'a>> {
        let retired: Vec<&CompiledRelease> = previous
            .rules
            .releases()
            .iter()
            .filter(|release| self.rules.get(&release.name).is_none())
            .collect();
        let mut routes = Vec::new();
        for service in &previous.config.services {
            let name = service.name.as_str();
            let releases = if self.has_service(name) {
                retired.clone()
            } else {
                if let Some(primary) = previous.version_for(name, None) {
                    routes.push((name, primary, None));
                }
                previous.rules.releases().iter().collect()
            };
            for release in releases {
                if let Some(version) = previous.version_for(name, Some(release)) {
                    routes.push((name, version, Some(&*release.name)));
                }
            }
        }
        routes
    }

    /// Is `name` a service of this snapshot?
    pub fn has_service(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Every service address, for the datapath's redirect map.
    pub fn service_addresses(&self) -> Vec<SocketAddr> {
        self.by_address.keys().copied().collect()
    }

    /// Which release and version a request with these tags gets at `service`, and why.
    pub fn explain<T: Tags + ?Sized>(&self, service: &str, tags: &T) -> Option<Explanation> {
        let winner = self.rules.decide(tags);
        let version = self.version_for(service, winner)?.to_string();
        let matching = self.rules.all_matching(tags);
        let reason = match winner {
            None => "no release matches these tags: primary version".to_string(),
            Some(release) => {
                let losers: Vec<String> = matching
                    .iter()
                    .filter(|r| r.name != release.name)
                    .map(|r| format!("`{}` (priority {})", r.name, r.priority))
                    .collect();
                let outranked = if losers.is_empty() {
                    String::new()
                } else {
                    format!("; it outranks {}", losers.join(", "))
                };
                let placement = match release.target(service) {
                    Some(v) => format!("its version of `{service}` is `{v}`"),
                    None => format!(
                        "it has no version of `{service}`, so the primary `{version}` serves"
                    ),
                };
                format!(
                    "release `{}` (priority {}) matches{outranked}; {placement}",
                    release.name, release.priority
                )
            }
        };
        Some(Explanation {
            service: service.to_string(),
            release: winner.map(|r| r.name.to_string()),
            version,
            reason,
        })
    }
}

/// The versions a caller can be, found by the address of its pod (the peer of a redirected
/// connection): resolved once per connection, and counted by a small number, not by name.
/// Caller 0 is outside the mesh (the gateway, or a pod that is no version of a mesh service).
#[derive(Debug, Default)]
pub struct Callers {
    /// (service, version) of caller `i + 1`.
    versions: Vec<(Arc<str>, Arc<str>)>,
    by_ip: foldhash::HashMap<IpAddr, u32>,
}

impl Callers {
    fn of(services: &[ServiceRoutes]) -> Callers {
        let mut callers = Callers::default();
        for service in services {
            for version in &service.versions {
                callers
                    .versions
                    .push((service.name.clone(), version.name.clone()));
                let id = callers.versions.len() as u32;
                for endpoint in version.endpoints.iter() {
                    // A pod in two versions is ambiguous: the first keeps it.
                    callers.by_ip.entry(endpoint.address.ip()).or_insert(id);
                }
            }
        }
        callers
    }

    /// The caller whose pod has address `ip`; 0 if none.
    pub fn at(&self, ip: IpAddr) -> u32 {
        self.by_ip.get(&ip).copied().unwrap_or(0)
    }

    /// (service, version) of caller `id`; `None` for 0 (outside the mesh).
    pub fn get(&self, id: u32) -> Option<(&Arc<str>, &Arc<str>)> {
        let (service, version) = self.versions.get((id as usize).checked_sub(1)?)?;
        Some((service, version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Finding;

    #[test]
    fn a_rejection_names_its_first_errors_and_counts_the_rest() {
        let errors = (0..25)
            .map(|i| Finding {
                code: "shadowed",
                message: format!("release `r{i}`"),
                releases: vec![],
            })
            .collect();
        let message = Rejected(Report {
            errors,
            ..Report::default()
        })
        .to_string();
        assert!(message.contains("release `r9`") && !message.contains("release `r10`"));
        assert!(message.ends_with("; and 15 more error(s) (steer check lists them all)"));
    }
}
