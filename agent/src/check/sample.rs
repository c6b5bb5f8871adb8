//! Large mixed configurations, as a big cluster's teams would write them: what the benchmarks
//! and `steer sample-config` check and decide against.
//!
//! Releases carry one or two matchers over five header names (about 1 in 7 a prefix, 1 in 11 a
//! regex, the rest exact values), 1 in 6 a sticky percentage; they target 100 services, each
//! release its own versions. A release's first matcher names a group, a team or a build (many
//! values); a second one may add a device or a region (few values). Two-matcher releases come
//! first in priority, as the narrower releases should; values repeat across releases, so some
//! releases overlap, and some are shadowed. The same `seed` always gives the same
//! configuration.

use std::collections::BTreeMap;

use crate::config::{AppProtocol, Config, Matcher, Release, Service, Version};

/// The number of services every sample configuration has.
pub const SERVICES: usize = 100;

/// Headers of many values, then headers of few.
const HEADERS: [&str; 5] = ["x-user-group", "x-team", "x-build", "x-device", "x-region"];
const MANY: usize = 3;
const DEVICES: [&str; 6] = ["android", "iphone", "ipad", "web", "tv", "watch"];

/// `releases` releases over [`SERVICES`] services.
pub fn mixed(releases: usize, seed: u64) -> Config {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Values repeat across releases, as they do when several teams target the same groups.
    let spread = releases.max(8);
    let mut specs: Vec<(Vec<Matcher>, Option<f64>)> = (0..releases)
        .map(|_| {
            let first = rng.usize(..MANY);
            let mut headers = vec![first];
            if rng.bool() {
                let second = (first + 1 + rng.usize(..HEADERS.len() - 1)) % HEADERS.len();
                headers.push(second);
            }
            let matchers = headers
                .into_iter()
                .map(|h| matcher(&mut rng, HEADERS[h], spread))
                .collect();
            let percent =
                (rng.usize(..6) == 0).then(|| [1.0, 5.0, 10.0, 25.0, 50.0][rng.usize(..5)]);
            (matchers, percent)
        })
        .collect();
    // Narrower (two matchers) first; within that, the order is the teams' own.
    specs.sort_by_key(|(matchers, _)| std::cmp::Reverse(matchers.len()));

    let mut versions: Vec<Vec<Version>> = (0..SERVICES)
        .map(|_| {
            vec![Version {
                name: "stable".into(),
                primary: true,
                endpoints: vec![],
            }]
        })
        .collect();
    let releases = specs
        .into_iter()
        .enumerate()
        .map(|(i, (matchers, percent))| {
            let name = format!("release-{i:05}");
            let mut targets = BTreeMap::new();
            for _ in 0..1 + rng.usize(..2) {
                let service = rng.usize(..SERVICES);
                targets.insert(format!("svc-{service:03}"), name.clone());
            }
            for service in targets.keys() {
                let index: usize = service["svc-".len()..].parse().expect("named above");
                versions[index].push(Version {
                    name: name.clone(),
                    primary: false,
                    endpoints: vec![],
                });
            }
            Release {
                name,
                priority: i as u32 + 1,
                matchers,
                percent,
                hash_by: percent.map(|_| "x-user-id".to_string()),
                targets,
                rollout: None,
            }
        })
        .collect();
    Config {
        services: versions
            .into_iter()
            .enumerate()
            .map(|(i, versions)| Service {
                name: format!("svc-{i:03}"),
                addresses: vec![],
                versions,
                request_timeout: None,
                protocol: AppProtocol::Http,
            })
            .collect(),
        releases,
        ..Config::default()
    }
}

fn matcher(rng: &mut fastrand::Rng, header: &str, spread: usize) -> Matcher {
    let value = |rng: &mut fastrand::Rng| match header {
        "x-device" => DEVICES[rng.usize(..DEVICES.len())].to_string(),
        "x-region" => format!("region-{}", rng.usize(..40)),
        "x-build" => format!(
            "{}.{}.{}",
            2020 + rng.usize(..6),
            rng.usize(..12),
            rng.usize(..spread)
        ),
        "x-team" => format!("team-{}", rng.usize(..spread)),
        _ => format!("group-{}", rng.usize(..spread)),
    };
    let mut m = Matcher {
        header: header.to_string(),
        exact: None,
        prefix: None,
        regex: None,
    };
    match rng.usize(..77) {
        // 11 in 77: 1 in 7.
        0..11 => {
            // A value without its last digit or two, keeping at least one: `group-12` takes
            // group-120 to group-129 and group-12 itself.
            let full = value(rng);
            let digits = full
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(full.len());
            let cut = (full.len().saturating_sub(1 + rng.usize(..2))).max(digits + 1);
            m.prefix = Some(full[..cut.min(full.len())].to_string())
        }
        // 7 in 77: 1 in 11.
        11..18 => {
            m.regex = Some(match header {
                "x-device" => format!(
                    "({}|{})-[0-9]+",
                    DEVICES[rng.usize(..3)],
                    DEVICES[3 + rng.usize(..3)]
                ),
                "x-region" => format!("region-{}[0-9]?", rng.usize(..10)),
                "x-build" => format!(
                    "{}\\.(1[0-1]|[0-9])\\.[0-9]*{}",
                    2020 + rng.usize(..6),
                    rng.usize(..10)
                ),
                "x-team" => format!("team-[0-9]*{}", rng.usize(..100)),
                _ => format!("group-{}[0-9]*", rng.usize(..spread)),
            })
        }
        _ => m.exact = Some(value(rng)),
    }
    m
}
