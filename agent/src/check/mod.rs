//! The configuration checker: every rule of DESIGN.md "Check", with findings a person can act on.
//!
//! Structural checks (names, services, versions, primaries, matchers, percentages) live here;
//! the set reasoning over releases (shadowing, equal-priority overlap, partial overlaps with an
//! example request) lives in `overlap`, over the request sets of `lang`.

mod lang;
mod overlap;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::{
    config::{Config, MatchKind},
    rules::compile_whole_value_regex,
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
    /// A request that matches `release` and goes to `by` instead.
    pub example: BTreeMap<String, String>,
    /// The verdict rests on a regex analysis that gave up: possibly shadowed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub approximate: bool,
}

/// Two releases that some request matches both: `winner` takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Overlap {
    pub releases: [String; 2],
    pub winner: String,
    pub example: BTreeMap<String, String>,
    /// A regex analysis gave up: the releases may overlap, no example is known.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub approximate: bool,
}

/// Everything the checker found. `valid` is false when there is any error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub valid: bool,
    pub errors: Vec<Finding>,
    pub warnings: Vec<Finding>,
    pub shadowed: Vec<Shadowed>,
    pub overlaps: Vec<Overlap>,
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

/// Checks a configuration. Never fails: every problem becomes a finding.
pub fn check(config: &Config) -> Report {
    let mut report = Report::default();
    check_services(config, &mut report);
    check_releases(config, &mut report);
    overlap::analyse(config, &mut report);
    report.valid = report.errors.is_empty();
    report
}

fn check_services(config: &Config, report: &mut Report) {
    let mut names = HashSet::new();
    let mut address_owner: HashMap<std::net::SocketAddr, &str> = HashMap::new();
    for service in &config.services {
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
        for matcher in &release.matchers {
            match matcher.kind() {
                Err(reason) => report.error(
                    "empty-match",
                    format!("release `{name}`: {reason}"),
                    &[name],
                ),
                Ok(MatchKind::Regex(pattern)) => {
                    if let Err(err) = compile_whole_value_regex(pattern) {
                        report.error(
                            "invalid-regex",
                            format!("release `{name}`: {:#}", err),
                            &[name],
                        );
                    }
                }
                Ok(_) => {}
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
        match (release.percent, &release.hash_by) {
            (None, None) => {}
            (Some(p), Some(_)) if p > 0.0 && p <= 100.0 => {}
            (Some(p), Some(_)) => report.error(
                "invalid-percent",
                format!("release `{name}`: percent {p} must be in (0, 100]"),
                &[name],
            ),
            (Some(_), None) => report.error(
                "invalid-percent",
                format!(
                    "release `{name}`: percent needs `hashBy`, the header that keeps a user on \
                     one side (e.g. x-user-id)"
                ),
                &[name],
            ),
            (None, Some(_)) => report.error(
                "invalid-percent",
                format!("release `{name}`: hashBy is set but percent is not"),
                &[name],
            ),
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

#[cfg(test)]
mod tests;
