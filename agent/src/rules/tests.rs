use proptest::prelude::*;

use super::*;
use crate::config::{Config, Matcher};

fn exact(header: &str, value: &str) -> Matcher {
    Matcher {
        header: header.into(),
        exact: Some(value.into()),
        prefix: None,
        regex: None,
    }
}

fn prefix(header: &str, value: &str) -> Matcher {
    Matcher {
        prefix: Some(value.into()),
        exact: None,
        ..exact(header, "")
    }
}

fn regex(header: &str, pattern: &str) -> Matcher {
    Matcher {
        regex: Some(pattern.into()),
        exact: None,
        ..exact(header, "")
    }
}

fn release(name: &str, priority: u32, matchers: Vec<Matcher>) -> Release {
    Release {
        name: name.into(),
        priority,
        matchers,
        percent: None,
        hash_by: None,
        targets: Default::default(),
        rollout: None,
    }
}

fn ruleset(releases: Vec<Release>) -> Ruleset {
    Ruleset::compile(&Config {
        releases,
        ..Config::default()
    })
    .unwrap()
}

fn decide<'a>(rules: &'a Ruleset, headers: &[(&str, &str)]) -> Option<&'a str> {
    rules
        .decide(&HeaderPairs::new(headers.iter().copied()))
        .map(|r| &*r.name)
}

/// Section 5 of the seed: red (restaurant Android & Atlantis, priority 1), blue (Android,
/// priority 2), green (Atlantis, priority 3).
fn food_delivery() -> Ruleset {
    ruleset(vec![
        release(
            "red",
            1,
            vec![exact("x-device", "android"), exact("x-region", "atlantis")],
        ),
        release("blue", 2, vec![exact("x-device", "android")]),
        release("green", 3, vec![exact("x-region", "atlantis")]),
    ])
}

#[test]
fn seed_section_5_decisions() {
    let rules = food_delivery();
    assert_eq!(decide(&rules, &[("x-region", "atlantis")]), Some("green"));
    assert_eq!(decide(&rules, &[("x-device", "android")]), Some("blue"));
    assert_eq!(
        decide(&rules, &[("X-Device", "android"), ("x-region", "atlantis")]),
        Some("red")
    );
    assert_eq!(decide(&rules, &[]), None);
    assert_eq!(decide(&rules, &[("x-device", "iphone")]), None);
    assert_eq!(
        decide(&rules, &[("x-device", "iphone"), ("x-region", "atlantis")]),
        Some("green")
    );
}

#[test]
fn header_names_are_case_insensitive_values_are_not() {
    let rules = ruleset(vec![release("a", 1, vec![exact("X-Device", "android")])]);
    assert_eq!(decide(&rules, &[("x-DEVICE", "android")]), Some("a"));
    assert_eq!(decide(&rules, &[("x-device", "Android")]), None);
}

#[test]
fn prefix_and_whole_value_regex() {
    let rules = ruleset(vec![
        release("p", 1, vec![prefix("x-user", "qa-")]),
        release("r", 2, vec![regex("x-app", "1\\.[0-9]+")]),
    ]);
    assert_eq!(decide(&rules, &[("x-user", "qa-7")]), Some("p"));
    assert_eq!(decide(&rules, &[("x-user", "qa")]), None);
    assert_eq!(decide(&rules, &[("x-app", "1.12")]), Some("r"));
    // Whole value: a regex that matches only part of the value does not hold.
    assert_eq!(decide(&rules, &[("x-app", "21.12")]), None);
}

#[test]
fn a_repeated_header_is_one_value_so_it_cannot_match_releases_the_checker_calls_disjoint() {
    // `a` and `b` are disjoint (one x-group value cannot be both) and of equal priority: the
    // checker accepts them. Sending the header twice must not make a request match both.
    let config = Config {
        releases: vec![
            release("a", 1, vec![exact("x-group", "alpha")]),
            release("b", 1, vec![exact("x-group", "beta")]),
        ],
        ..Config::default()
    };
    let report = crate::check::check(&config);
    assert!(
        report.errors.iter().all(|e| !e.code.contains("ambiguous")),
        "{report:?}"
    );
    let rules = Ruleset::compile(&config).unwrap();
    assert_eq!(
        decide(&rules, &[("x-group", "alpha"), ("x-group", "beta")]),
        None
    );
    // Read as Envoy reads it: the values joined by commas.
    let joined = ruleset(vec![release("c", 1, vec![exact("x-group", "alpha,beta")])]);
    assert_eq!(
        decide(&joined, &[("x-group", "alpha"), ("x-group", "beta")]),
        Some("c")
    );
}

#[test]
fn percentage_is_sticky_and_needs_the_hash_header() {
    let mut ten = release("ten", 1, vec![exact("x-device", "android")]);
    ten.percent = Some(10.0);
    ten.hash_by = Some("X-User-Id".into());
    let rules = ruleset(vec![ten]);
    assert_eq!(decide(&rules, &[("x-device", "android")]), None);
    let inside = (0..2000)
        .filter(|i| {
            let user = format!("user-{i}");
            let first = decide(&rules, &[("x-device", "android"), ("x-user-id", &user)]);
            let again = decide(&rules, &[("x-user-id", &user), ("x-device", "android")]);
            assert_eq!(first, again, "user {user} must always get the same answer");
            first.is_some()
        })
        .count();
    assert!(
        (140..=260).contains(&inside),
        "{inside} of 2000 inside a 10% share"
    );
}

#[test]
fn hundred_percent_takes_everyone_with_the_header() {
    let mut all = release("all", 1, vec![exact("x-device", "android")]);
    all.percent = Some(100.0);
    all.hash_by = Some("x-user-id".into());
    let rules = ruleset(vec![all]);
    assert_eq!(
        decide(&rules, &[("x-device", "android"), ("x-user-id", "u")]),
        Some("all")
    );
}

#[test]
fn sticky_hash_is_stable_across_builds() {
    // Nodes running different agent builds must agree: pin the function's output.
    assert_eq!(
        sticky_hash("canary", "user-1"),
        sticky_hash("canary", "user-1")
    );
    assert_ne!(
        sticky_hash("canary", "user-1"),
        sticky_hash("other", "user-1")
    );
    assert_eq!(sticky_hash("canary", "user-1"), 4_908_164_324_518_994_566);
}

#[test]
fn invalid_regex_fails_to_compile_with_the_release_named() {
    let err = Ruleset::compile(&Config {
        releases: vec![release("bad", 1, vec![regex("x", "(")])],
        ..Config::default()
    })
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("release `bad`"), "{message}");
    assert!(message.contains("invalid regex"), "{message}");
}

// --- property test: the index gives the same answer as trying every release in order ---

const HEADERS: [&str; 3] = ["a", "b", "c"];
const VALUES: [&str; 4] = ["x", "xy", "y", "yx"];

fn arb_matcher() -> impl Strategy<Value = Matcher> {
    (0..HEADERS.len(), 0..VALUES.len(), 0..3u8).prop_map(|(h, v, kind)| {
        let (header, value) = (HEADERS[h], VALUES[v]);
        match kind {
            0 => exact(header, value),
            1 => prefix(header, &value[..1]),
            _ => regex(header, &format!("{value}.*")),
        }
    })
}

fn arb_release(i: usize) -> impl Strategy<Value = Release> {
    (
        1..5u32,
        prop::collection::vec(arb_matcher(), 1..3),
        any::<bool>(),
    )
        .prop_map(move |(priority, matchers, share)| {
            let mut r = release(&format!("r{i}"), priority, matchers);
            if share {
                r.percent = Some(50.0);
                r.hash_by = Some("u".into());
            }
            r
        })
}

fn arb_request() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (0..HEADERS.len() + 1, 0..VALUES.len()).prop_map(|(h, v)| {
            let name = HEADERS.get(h).copied().unwrap_or("u");
            (name.to_string(), VALUES[v].to_string())
        }),
        0..5,
    )
}

proptest! {
    #[test]
    fn decide_agrees_with_brute_force(
        releases in (1..8usize).prop_flat_map(|n| (0..n).map(arb_release).collect::<Vec<_>>()),
        request in arb_request(),
    ) {
        let rules = ruleset(releases.clone());
        let oracle = oracle_decide(&releases, &request);
        let tags = HeaderPairs::new(request);
        prop_assert_eq!(rules.decide(&tags).map(|r| r.name.to_string()), oracle);
    }
}

// --- the same on larger mixed sets: regexes sharing a literal prefix (one regex set per
// header), regexes without one, repeated sources, and the fallback without regex sets ---

const MIXED_VALUES: [&str; 6] = ["t-1", "t-12", "t-2", "u-1", "t-", "1"];
const MIXED_REGEXES: [&str; 8] = [
    "t-[0-9]*1",
    "t-[0-9]*2",
    "t-1[0-9]?",
    ".*1",
    "(t|u)-1",
    "[a-z]-[0-9]+",
    "t-.*",
    "(?:u-)?1",
];

fn arb_mixed_matcher() -> impl Strategy<Value = Matcher> {
    (
        0..HEADERS.len(),
        0..MIXED_VALUES.len(),
        0..MIXED_REGEXES.len(),
        0..4u8,
    )
        .prop_map(|(h, v, r, kind)| {
            let (header, value) = (HEADERS[h], MIXED_VALUES[v]);
            match kind {
                0 => exact(header, value),
                1 => prefix(header, &value[..value.len().min(2)]),
                _ => regex(header, MIXED_REGEXES[r]),
            }
        })
}

fn arb_mixed_release(i: usize) -> impl Strategy<Value = Release> {
    (
        1..20u32,
        prop::collection::vec(arb_mixed_matcher(), 1..3),
        0..4u8,
    )
        .prop_map(move |(priority, matchers, share)| {
            let mut r = release(&format!("r{i}"), priority, matchers);
            if share == 0 {
                r.percent = Some(50.0);
                r.hash_by = Some("u".into());
            }
            r
        })
}

fn arb_mixed_request() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        (0..HEADERS.len() + 1, 0..MIXED_VALUES.len()).prop_map(|(h, v)| {
            let name = HEADERS.get(h).copied().unwrap_or("u");
            (name.to_string(), MIXED_VALUES[v].to_string())
        }),
        0..6,
    )
}

proptest! {
    #[test]
    fn decide_on_mixed_sets_agrees_with_brute_force(
        releases in (1..40usize).prop_flat_map(|n| (0..n).map(arb_mixed_release).collect::<Vec<_>>()),
        requests in prop::collection::vec(arb_mixed_request(), 1..8),
    ) {
        let config = Config { releases: releases.clone(), ..Config::default() };
        let parsed = || {
            config.releases.iter().map(|r| (r, Matchers::parse(r).unwrap())).collect::<Vec<_>>()
        };
        let with_sets = Ruleset::from_parsed(parsed());
        let without_sets = Ruleset::with_regex_set_limit(parsed(), 1);
        for request in requests {
            let oracle = oracle_decide(&releases, &request);
            let tags = HeaderPairs::new(request);
            prop_assert_eq!(with_sets.decide(&tags).map(|r| r.name.to_string()), oracle.clone());
            prop_assert_eq!(without_sets.decide(&tags).map(|r| r.name.to_string()), oracle);
        }
    }
}

#[test]
fn a_regex_set_past_its_limit_falls_back_to_single_regexes() {
    let releases = vec![
        release("a", 1, vec![regex("x", "t-[0-9]*1")]),
        release("b", 2, vec![regex("x", ".*2")]),
    ];
    let config = Config {
        releases,
        ..Config::default()
    };
    let parsed = config
        .releases
        .iter()
        .map(|r| (r, Matchers::parse(r).unwrap()));
    let rules = Ruleset::with_regex_set_limit(parsed, 1);
    assert!(rules.index.values().all(|h| h.regexes.is_none()));
    assert_eq!(rules.unanchored, vec![1], "`.*2` has no literal prefix");
    let tags = |v: &str| HeaderPairs::new([("x", v)]);
    assert_eq!(rules.decide(&tags("t-31")).map(|r| &*r.name), Some("a"));
    assert_eq!(rules.decide(&tags("t-32")).map(|r| &*r.name), Some("b"));
    assert_eq!(rules.decide(&tags("t-3")).map(|r| &*r.name), None);
    let with_sets = ruleset(config.releases.clone());
    assert!(with_sets.index["x"].regexes.is_some());
    assert!(with_sets.unanchored.is_empty());
}

/// Straight from the definition, on the uncompiled releases: the matching release with the
/// smallest (priority, name).
fn oracle_decide(releases: &[Release], request: &[(String, String)]) -> Option<String> {
    // A header sent more than once is one value: its values joined by commas.
    let value = |header: &str| {
        let values: Vec<&str> = request
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(header))
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    };
    let holds = |m: &Matcher| {
        value(&m.header).is_some_and(|v| match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), _, _) => &v == e,
            (_, Some(p), _) => v.starts_with(p.as_str()),
            (_, _, Some(r)) => regex::Regex::new(r)
                .unwrap()
                .find(&v)
                .is_some_and(|found| found.start() == 0 && found.end() == v.len()),
            _ => false,
        })
    };
    let in_share = |r: &Release| match (&r.percent, &r.hash_by) {
        (Some(p), Some(h)) => value(h)
            .is_some_and(|user| (sticky_hash(&r.name, &user) as f64) < p / 100.0 * u64::MAX as f64),
        _ => true,
    };
    releases
        .iter()
        .filter(|r| r.matchers.iter().all(holds) && in_share(r))
        .min_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)))
        .map(|r| r.name.clone())
}
