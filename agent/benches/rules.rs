//! `decide` at 10, 1,000 and 10,000 releases with 8 request headers, exact matchers on two
//! headers and then the mixed configurations of `check::sample` (goal: < 1 µs at 10,000), and
//! `check` of 10,000 exact releases and of 1,000, 3,000 and 10,000 mixed ones (goal: < 1 s).
//! Run with `cargo xtask bench`, which also prints `steer check`'s peak memory.

use std::hint::black_box;

use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, criterion_group, criterion_main, measurement::WallTime,
};
use steer::{
    check,
    config::{Config, Matcher, Release, Service, Version},
    rules::{HeaderPairs, Ruleset},
};

/// `n` releases over a few tag headers, each a distinct combination so they do not conflict:
/// release i matches x-user-group = group-i and x-device = (one of four devices).
fn releases(n: usize) -> Config {
    let devices = ["android", "iphone", "web", "tv"];
    let versions = (0..n)
        .map(|i| Version {
            name: format!("c{i}"),
            primary: false,
            endpoints: vec![],
        })
        .chain([Version {
            name: "v1".into(),
            primary: true,
            endpoints: vec![],
        }])
        .collect();
    Config {
        services: vec![Service {
            name: "svc".into(),
            addresses: vec![],
            versions,
            request_timeout: None,
            protocol: Default::default(),
        }],
        releases: (0..n)
            .map(|i| Release {
                name: format!("r{i}"),
                priority: i as u32 + 1,
                matchers: vec![
                    Matcher {
                        header: "x-user-group".into(),
                        exact: Some(format!("group-{i}")),
                        prefix: None,
                        regex: None,
                    },
                    Matcher {
                        header: "x-device".into(),
                        exact: Some(devices[i % devices.len()].into()),
                        prefix: None,
                        regex: None,
                    },
                ],
                percent: None,
                hash_by: None,
                targets: [("svc".to_string(), format!("c{i}"))].into(),
                rollout: None,
            })
            .collect(),
        ..Config::default()
    }
}

fn request(n: usize) -> HeaderPairs {
    HeaderPairs::new([
        ("host", "svc.default.svc.cluster.local".to_string()),
        ("user-agent", "okhttp/4.12".to_string()),
        ("accept", "application/json".to_string()),
        ("x-request-id", "4bf92f3577b34da6".to_string()),
        ("x-device", "android".to_string()),
        ("x-region", "atlantis".to_string()),
        ("x-user-group", format!("group-{}", n / 2 / 4 * 4)),
        ("x-user-id", "user-12345".to_string()),
    ])
}

/// Times `decide` of `tags` (which must match a release) against `rules` of `n` releases.
fn decide_one(
    group: &mut BenchmarkGroup<'_, WallTime>,
    n: usize,
    rules: &Ruleset,
    tags: &HeaderPairs,
) {
    assert!(
        rules.decide(tags).is_some(),
        "the benchmark request must match"
    );
    group.bench_with_input(BenchmarkId::from_parameter(n), tags, |b, tags| {
        b.iter(|| black_box(rules.decide(black_box(tags))).map(|r| r.priority))
    });
}

fn bench_decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for n in [10, 1_000, 10_000] {
        let rules = Ruleset::compile(&releases(n)).unwrap();
        let tags = request(n);
        decide_one(&mut group, n, &rules, &tags);
    }
    group.finish();
}

/// Sizes of the mixed configurations.
const MIXED: [usize; 3] = [1_000, 3_000, 10_000];

/// A user's request to a mixed configuration: the tags of the lowest-ranked release that has
/// exact matchers only (so some release matches), a user id, and the usual other headers.
fn mixed_request(config: &Config) -> HeaderPairs {
    let tags = config
        .releases
        .iter()
        .rev()
        .find(|r| r.percent.is_none() && r.matchers.iter().all(|m| m.exact.is_some()))
        .expect("the sample has exact releases");
    let mut pairs: Vec<(String, String)> = [
        ("host", "svc-001.default.svc.cluster.local"),
        ("user-agent", "okhttp/4.12"),
        ("accept", "application/json"),
        ("x-request-id", "4bf92f3577b34da6"),
        ("x-user-id", "user-12345"),
    ]
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .into();
    for m in &tags.matchers {
        pairs.push((m.header.clone(), m.exact.clone().expect("exact")));
    }
    HeaderPairs::new(pairs)
}

fn bench_decide_mixed(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide-mixed");
    for n in MIXED {
        let config = check::sample::mixed(n, 1);
        let rules = Ruleset::compile(&config).unwrap();
        let tags = mixed_request(&config);
        decide_one(&mut group, n, &rules, &tags);
    }
    group.finish();
}

fn bench_check(c: &mut Criterion) {
    let config = releases(10_000);
    let mut group = c.benchmark_group("check");
    group.sample_size(10);
    group.bench_function("10000", |b| {
        b.iter(|| black_box(check::check(&config)).valid)
    });
    group.finish();

    let mut group = c.benchmark_group("check-mixed");
    group.sample_size(10);
    for n in MIXED {
        let config = check::sample::mixed(n, 1);
        group.bench_with_input(BenchmarkId::from_parameter(n), &config, |b, config| {
            b.iter(|| black_box(check::check(config)).valid)
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decide, bench_decide_mixed, bench_check);
criterion_main!(benches);
