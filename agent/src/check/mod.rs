//! The configuration checker: every rule of DESIGN.md "Check", with findings a person can act on.
//!
//! Structural checks (names, services, versions, primaries, matchers, percentages) live here;
//! the set reasoning over releases (shadowing, equal-priority overlap, overlaps that priorities
//! resolve) lives in `overlap`, over the request sets of `lang`. What a matcher means is the
//! router's definition (`rules::Test`), so the checker's examples behave as it says.

mod lang;
mod names;
mod overlap;
pub mod sample;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::{
    config::Config,
    rules::{Share, Test},
};

/// Headers that carry client addresses: the seed says tags must be user-side facts, not IPs.
const ADDRESS_HEADERS: [&str; 3] = ["x-forwarded-for", "x-real-ip", "forwarded"];

/// One error or warning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub code: &'static str,
    pub message: String,
    pub releases: Vec<String>,
}

/// A release that no request can reach, because higher-priority releases take all its traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Shadowed {
    pub release: String,
    pub by: Vec<String>,
    /// A request that matches `release` and goes to `by` instead (checked against the router);
    /// absent when none was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub example: Option<BTreeMap<String, String>>,
    /// The verdict rests on a regex analysis that gave up: possibly shadowed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub approximate: bool,
}

/// Two releases of distinct priorities that some request matches both: `winner` takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Overlap {
    pub releases: [String; 2],
    pub winner: String,
    /// A request both match, checked against the router; absent when none was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub example: Option<BTreeMap<String, String>>,
    /// A regex analysis gave up: the releases may overlap.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub approximate: bool,
}

/// How one release overlaps others where distinct priorities decide: information, not a
/// problem. The full list of pairs is `check_with`'s to stream, not the report's to hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OverlapSummary {
    pub release: String,
    /// Higher-priority releases that take some requests this one matches.
    pub above: usize,
    /// Lower-priority releases this one takes some requests from.
    pub below: usize,
    /// How many of those pairs only may overlap (a regex analysis gave up).
    #[serde(skip_serializing_if = "is_zero")]
    pub possible: usize,
    /// One of those overlaps with an example request, while the report's examples last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub example: Option<Overlap>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Everything the checker found. `valid` is false when there is any error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub valid: bool,
    pub errors: Vec<Finding>,
    pub warnings: Vec<Finding>,
    pub shadowed: Vec<Shadowed>,
    /// Releases that overlap others of distinct priority, in rank order.
    pub overlaps: Vec<OverlapSummary>,
}

/// Bounds of one check run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Work steps of the set reasoning (candidates visited, automaton states searched, boxes
    /// split). Past them the analysis stops with an `analysis-incomplete` warning.
    pub steps: u64,
    /// Overlap summaries that carry an example request, at most.
    pub examples: usize,
}

impl Default for Options {
    /// Enough for the 10,000-release configuration of the benchmarks' mix to complete; a few
    /// seconds of one core at most.
    fn default() -> Options {
        Options {
            steps: 20_000_000,
            examples: 100,
        }
    }
}

impl Report {
    fn error(&mut self, code: &'static str, message: String, releases: &[&str]) {
        self.errors.push(Finding {
            code,
            message,
            releases: releases.iter().map(|r| r.to_string()).collect(),
        });
    }

    fn warning(&mut self, code: &'static str, message: String, releases: &[&str]) {
        self.warnings.push(Finding {
            code,
            message,
            releases: releases.iter().map(|r| r.to_string()).collect(),
        });
    }
}

/// An example request as people read it: `x-device: android, x-region: atlantis`.
pub fn render_example(example: &BTreeMap<String, String>) -> String {
    if example.is_empty() {
        return "any request".to_string();
    }
    example
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a configuration within the default bounds. Never fails: every problem becomes a
/// finding.
pub fn check(config: &Config) -> Report {
    check_with(config, &Options::default(), None)
}

/// Checks a configuration; `each_overlap`, when given, receives every overlapping pair of
/// distinct priorities as it is found (the report keeps only per-release summaries).
pub fn check_with(
    config: &Config,
    options: &Options,
    each_overlap: Option<&mut dyn FnMut(Overlap)>,
) -> Report {
    let mut report = check_structure(config);
    overlap::analyse(config, options, each_overlap, &mut report);
    report.valid = report.errors.is_empty();
    report
}

/// The structural checks alone, without the set reasoning over releases: linear in the size
/// of the configuration. Enough to compile the rules and explain one request.
pub fn check_structure(config: &Config) -> Report {
    let mut report = Report::default();
    check_services(config, &mut report);
    check_releases(config, &mut report);
    check_gateway(config, &mut report);
    report.valid = report.errors.is_empty();
    report
}

fn check_services(config: &Config, report: &mut Report) {
    let mut names = HashSet::new();
    let mut address_owner: HashMap<std::net::SocketAddr, &str> = HashMap::new();
    for service in &config.services {
        if let Err(rule) = names::service(&service.name) {
            report.error(
                "invalid-name",
                format!("service name `{}`: {rule}", service.name.escape_debug()),
                &[],
            );
        }
        if !names.insert(service.name.as_str()) {
            report.error(
                "duplicate-name",
                format!("service `{}` is defined twice", service.name),
                &[],
            );
        }
        for address in &service.addresses {
            if let Some(other) = address_owner.insert(*address, &service.name) {
                report.error(
                    "duplicate-address",
                    format!(
                        "address {address} belongs to both service `{other}` and `{}`",
                        service.name
                    ),
                    &[],
                );
            }
        }
        let primaries: Vec<&str> = service
            .versions
            .iter()
            .filter(|v| v.primary)
            .map(|v| v.name.as_str())
            .collect();
        match primaries.as_slice() {
            [_] => {}
            [] => report.error(
                "no-primary",
                format!(
                    "service `{}` has no primary version: mark exactly one version `primary: true`",
                    service.name
                ),
                &[],
            ),
            many => report.error(
                "no-primary",
                format!(
                    "service `{}` has {} primary versions ({}): exactly one may be primary",
                    service.name,
                    many.len(),
                    many.join(", ")
                ),
                &[],
            ),
        }
        let mut versions = HashSet::new();
        for version in &service.versions {
            if let Err(rule) = names::version(&version.name) {
                report.error(
                    "invalid-name",
                    format!(
                        "service `{}`: version name `{}`: {rule}",
                        service.name.escape_debug(),
                        version.name.escape_debug()
                    ),
                    &[],
                );
            }
            if !versions.insert(version.name.as_str()) {
                report.error(
                    "duplicate-name",
                    format!(
                        "service `{}` defines version `{}` twice",
                        service.name, version.name
                    ),
                    &[],
                );
            }
        }
    }
}

fn check_releases(config: &Config, report: &mut Report) {
    let mut names = HashSet::new();
    // (service, version) -> the release that claimed it first.
    let mut claimed: HashMap<(&str, &str), &str> = HashMap::new();
    // Service -> version name -> version, so each target is one lookup.
    let versions: HashMap<&str, HashMap<&str, &crate::config::Version>> = config
        .services
        .iter()
        .map(|s| {
            let by_name = s.versions.iter().map(|v| (v.name.as_str(), v)).collect();
            (s.name.as_str(), by_name)
        })
        .collect();
    for release in &config.releases {
        let name = release.name.as_str();
        if let Err(rule) = names::release(name) {
            report.error(
                "invalid-name",
                format!("release name `{}`: {rule}", name.escape_debug()),
                &[name],
            );
        }
        if !names.insert(name) {
            report.error(
                "duplicate-name",
                format!("release `{name}` is defined twice"),
                &[name],
            );
        }
        if release.matchers.is_empty() {
            report.error(
                "empty-match",
                format!(
                    "release `{name}` has no matchers and would take all traffic: add at least \
                     one `match` entry"
                ),
                &[name],
            );
        }
        let headers = (release.matchers.iter().map(|m| ("match", &m.header)))
            .chain(release.hash_by.iter().map(|h| ("hashBy", h)));
        for (field, header) in headers {
            if let Err(rule) = names::header(header) {
                report.error(
                    "invalid-header",
                    format!(
                        "release `{}`: {field} header `{}`: {rule}",
                        name.escape_debug(),
                        header.escape_debug()
                    ),
                    &[name],
                );
            }
        }
        for matcher in &release.matchers {
            if let Err(err) = Test::parse(matcher) {
                report.error(err.code, format!("release `{name}`: {err}"), &[name]);
            }
            let header = matcher.header.to_ascii_lowercase();
            if ADDRESS_HEADERS.contains(&header.as_str()) {
                report.warning(
                    "address-tag",
                    format!(
                        "release `{name}` matches on `{header}`, a client address: tag users by \
                         user-side facts (device, region, user id) instead"
                    ),
                    &[name],
                );
            }
        }
        if let Err(reason) = Share::parse(release) {
            report.error(
                "invalid-percent",
                format!("release `{name}`: {reason}"),
                &[name],
            );
        }
        if let Err(reason) = crate::rollout::spec::validate(release) {
            report.error(
                "invalid-rollout",
                format!("release `{name}`: {reason}"),
                &[name],
            );
        }
        if release.targets.is_empty() {
            report.warning(
                "no-targets",
                format!(
                    "release `{name}` names no service versions: its traffic goes to primaries"
                ),
                &[name],
            );
        }
        for (service_name, version_name) in &release.targets {
            let Some(service_versions) = versions.get(service_name.as_str()) else {
                report.error(
                    "unknown-service",
                    format!("release `{name}` targets unknown service `{service_name}`"),
                    &[name],
                );
                continue;
            };
            let Some(version) = service_versions.get(version_name.as_str()) else {
                report.error(
                    "unknown-version",
                    format!(
                        "release `{name}` targets version `{version_name}` of `{service_name}`, \
                         which has no such version"
                    ),
                    &[name],
                );
                continue;
            };
            if version.primary {
                report.error(
                    "version-in-two-releases",
                    format!(
                        "release `{name}` claims `{service_name}/{version_name}`, the primary \
                         version, which belongs to all unmatched traffic"
                    ),
                    &[name],
                );
            }
            if let Some(other) = claimed.insert((service_name, version_name), name) {
                report.error(
                    "version-in-two-releases",
                    format!(
                        "`{service_name}/{version_name}` is claimed by releases `{other}` and \
                         `{name}`: a version belongs to at most one release"
                    ),
                    &[other, name],
                );
            }
        }
    }
}

/// The gateway's routes: each to a service there is, each host a host name without a port, and
/// no route twice (the second could never be taken: the first route that matches wins).
fn check_gateway(config: &Config, report: &mut Report) {
    let services: HashSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    let mut seen = HashSet::new();
    for (i, route) in config.gateway.routes.iter().enumerate() {
        let at = format!("gateway route {}", i + 1);
        if !services.contains(route.service.as_str()) {
            report.error(
                "unknown-service",
                format!(
                    "{at} goes to unknown service `{}`",
                    route.service.escape_debug()
                ),
                &[],
            );
        }
        if let Some(host) = &route.host
            && let Err(rule) = names::route_host(host)
        {
            report.error(
                "invalid-route-host",
                format!("{at}: host `{}`: {rule}", host.escape_debug()),
                &[],
            );
        }
        let key = (
            route.host.as_deref().map(crate::config::host_key),
            route.path_prefix.as_deref(),
        );
        if !seen.insert(key) {
            report.error(
                "duplicate-route",
                format!(
                    "{at} has the host and path prefix of an earlier route, which takes all its \
                     requests"
                ),
                &[],
            );
        }
    }
}

#[cfg(test)]
mod tests;
