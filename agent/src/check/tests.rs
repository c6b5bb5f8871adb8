use super::*;

fn load(yaml: &str) -> Config {
    Config::from_yaml(yaml, "test.yaml").unwrap()
}

fn codes(report: &Report) -> Vec<&'static str> {
    report.errors.iter().map(|f| f.code).collect()
}

const SERVICES: &str = r#"
services:
  - name: email
    versions:
      - { name: v2.0, primary: true }
      - { name: v2.1 }
      - { name: v2.0.1 }
"#;

#[test]
fn a_version_belongs_to_at_most_one_release() {
    let report = check(&load(&format!(
        "{SERVICES}releases:
  - {{ name: a, priority: 1, match: [{{header: x-device, exact: android}}], targets: {{email: v2.1}} }}
  - {{ name: b, priority: 2, match: [{{header: x-region, exact: atlantis}}], targets: {{email: v2.1}} }}
"
    )));
    assert!(!report.valid);
    let finding = report
        .errors
        .iter()
        .find(|f| f.code == "version-in-two-releases")
        .expect("conflict reported");
    assert_eq!(finding.releases, ["a", "b"]);
}

#[test]
fn structural_errors_each_have_their_code() {
    let report = check(&load(
        r#"
services:
  - name: s
    versions: [{ name: v1 }, { name: v1 }]
releases:
  - { name: r, priority: 1, match: [], targets: { t: v1 } }
  - { name: r, priority: 2, match: [{ header: x, regex: "(" }], targets: { s: v9 } }
  - { name: p, priority: 3, match: [{ header: x, exact: y }], percent: 120, hashBy: u }
  - { name: q, priority: 4, match: [{ header: x, exact: y, prefix: z }], percent: 5 }
"#,
    ));
    let codes = codes(&report);
    for code in [
        "no-primary",
        "duplicate-name",
        "empty-match",
        "unknown-service",
        "unknown-version",
        "invalid-regex",
        "invalid-percent",
    ] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
}

#[test]
fn address_headers_are_a_warning_not_an_error() {
    let report = check(&load(&format!(
        "{SERVICES}releases:
  - {{ name: a, priority: 1, match: [{{header: X-Forwarded-For, exact: 10.0.0.1}}], targets: {{email: v2.1}} }}
"
    )));
    assert!(report.valid, "{report:?}");
    assert_eq!(report.warnings[0].code, "address-tag");
}

#[test]
fn seed_5_4_broad_release_first_shadows_the_narrow_one() {
    let report = check(&load(
        r#"
services:
  - name: restaurant
    versions: [{ name: v1, primary: true }, { name: red }, { name: blue }]
releases:
  - { name: blue, priority: 1, match: [{ header: x-device, exact: android }], targets: { restaurant: blue } }
  - name: red
    priority: 2
    match: [{ header: x-device, exact: android }, { header: X-Region, exact: atlantis }]
    targets: { restaurant: red }
"#,
    ));
    assert_eq!(codes(&report), ["shadowed"]);
    assert_eq!(report.shadowed.len(), 1);
    let shadow = &report.shadowed[0];
    assert_eq!(shadow.release, "red");
    assert_eq!(shadow.by, ["blue"]);
    assert_eq!(shadow.example["x-device"], "android");
    assert_eq!(shadow.example["x-region"], "atlantis");
}

#[test]
fn shadowing_by_a_union_of_releases() {
    // `all` takes qa-* users; `beta` takes every value that is not qa-*... only together they
    // cover `late`, which asks for x-user to start with "q".
    let report = check(&load(
        r#"
releases:
  - { name: qa, priority: 1, match: [{ header: x-user, prefix: qa }] }
  - { name: rest, priority: 2, match: [{ header: x-user, regex: "q([^a].*)?" }] }
  - { name: late, priority: 3, match: [{ header: x-user, prefix: q }] }
"#,
    ));
    let late = report
        .shadowed
        .iter()
        .find(|s| s.release == "late")
        .expect("late is shadowed by qa and rest together");
    assert_eq!(late.by, ["qa", "rest"]);
    assert!(!late.approximate);
}

#[test]
fn partial_overlap_is_reported_with_the_winner() {
    let report = check(&load(
        r#"
releases:
  - { name: android, priority: 1, match: [{ header: x-device, exact: android }] }
  - { name: atlantis, priority: 2, match: [{ header: x-region, exact: atlantis }] }
  - { name: iphone, priority: 3, match: [{ header: x-device, exact: iphone }] }
"#,
    ));
    assert!(report.valid, "{report:?}");
    assert!(report.shadowed.is_empty());
    let pairs: Vec<_> = report.overlaps.iter().map(|o| o.releases.clone()).collect();
    assert_eq!(
        pairs,
        [
            ["android".to_string(), "atlantis".to_string()],
            ["atlantis".to_string(), "iphone".to_string()]
        ]
    );
    assert_eq!(report.overlaps[1].winner, "atlantis");
    assert_eq!(report.overlaps[1].example["x-device"], "iphone");
}

#[test]
fn a_share_never_shadows_alone() {
    let report = check(&load(
        r#"
releases:
  - { name: ten, priority: 1, match: [{ header: x-device, exact: android }], percent: 10, hashBy: x-user-id }
  - { name: all-android, priority: 2, match: [{ header: x-device, exact: android }] }
"#,
    ));
    assert!(report.shadowed.is_empty(), "{report:?}");
    let overlap = &report.overlaps[0];
    let user = &overlap.example["x-user-id"];
    // The example's user really is inside the 10% share, so it goes to the winner.
    let rules = crate::rules::Ruleset::compile(&load(
        r#"
releases:
  - { name: ten, priority: 1, match: [{ header: x-device, exact: android }], percent: 10, hashBy: x-user-id }
"#,
    ))
    .unwrap();
    let tags =
        crate::rules::HeaderPairs::new([("x-device", "android"), ("x-user-id", user.as_str())]);
    assert_eq!(rules.decide(&tags).map(|r| &*r.name), Some("ten"));
}

// --- property test: verdicts against brute force over a representative finite universe ---

mod oracle {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::super::check;
    use crate::{
        config::{Config, Matcher, Release},
        rules::{HeaderPairs, Ruleset},
    };

    const HEADERS: [&str; 3] = ["a", "b", "c"];
    /// Every region of the value space the generated matchers can tell apart has a member here
    /// (`None`: the header absent).
    const UNIVERSE: [Option<&str>; 19] = [
        None,
        Some(""),
        Some("x"),
        Some("xx"),
        Some("xz"),
        Some("xzz"),
        Some("xy"),
        Some("xyz"),
        Some("xyzz"),
        Some("xyq"),
        Some("y"),
        Some("yy"),
        Some("yz"),
        Some("yzz"),
        Some("yx"),
        Some("yxz"),
        Some("yxzz"),
        Some("yxq"),
        Some("z"),
    ];

    fn matcher() -> impl Strategy<Value = Matcher> {
        let values = ["x", "xy", "y", "yx"];
        (0..HEADERS.len(), 0..values.len(), 0..3u8).prop_map(move |(h, v, kind)| {
            let value = values[v].to_string();
            let mut m = Matcher {
                header: HEADERS[h].into(),
                exact: None,
                prefix: None,
                regex: None,
            };
            match kind {
                0 => m.exact = Some(value),
                1 => m.prefix = Some(value),
                _ => m.regex = Some(format!("{value}(z|.)?")),
            }
            m
        })
    }

    fn releases() -> impl Strategy<Value = Vec<Release>> {
        prop::collection::vec((1..4u32, prop::collection::vec(matcher(), 1..3)), 1..6).prop_map(
            |specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (priority, matchers))| Release {
                        name: format!("r{i}"),
                        priority,
                        matchers,
                        percent: None,
                        hash_by: None,
                        targets: Default::default(),
                    })
                    .collect()
            },
        )
    }

    fn universe() -> Vec<HeaderPairs> {
        let mut requests = vec![Vec::new()];
        for header in HEADERS {
            requests = requests
                .into_iter()
                .flat_map(|request: Vec<(String, String)>| {
                    UNIVERSE.iter().map(move |value| {
                        let mut request = request.clone();
                        if let Some(value) = value {
                            request.push((header.to_string(), value.to_string()));
                        }
                        request
                    })
                })
                .collect();
        }
        requests.into_iter().map(HeaderPairs::new).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn verdicts_agree_with_brute_force(releases in releases()) {
            let config = Config { releases, ..Config::default() };
            let report = check(&config);
            let rules = Ruleset::compile(&config).unwrap();
            let ranked: Vec<&str> = rules.releases().iter().map(|r| &*r.name).collect();
            let rank = |name: &str| ranked.iter().position(|n| *n == name).unwrap();
            // matching[request] = ranks of the releases it matches.
            let matching: Vec<Vec<usize>> = universe()
                .iter()
                .map(|tags| rules.all_matching(tags).iter().map(|r| rank(&r.name)).collect())
                .collect();

            let mut want_pairs = std::collections::BTreeSet::new();
            for ranks in &matching {
                for (i, &a) in ranks.iter().enumerate() {
                    for &b in &ranks[i + 1..] {
                        want_pairs.insert((ranked[a].to_string(), ranked[b].to_string()));
                    }
                }
            }
            let mut got_pairs = std::collections::BTreeSet::new();
            for overlap in &report.overlaps {
                prop_assert!(!overlap.approximate);
                got_pairs.insert((overlap.releases[0].clone(), overlap.releases[1].clone()));
                let tags = HeaderPairs::new(overlap.example.clone());
                let names: Vec<&str> = rules.all_matching(&tags).iter().map(|r| &*r.name).collect();
                prop_assert!(names.contains(&overlap.releases[0].as_str()));
                prop_assert!(names.contains(&overlap.releases[1].as_str()));
                // The winner of the pair is the higher-ranked one; a third release may still
                // outrank both for this example.
                prop_assert_eq!(&overlap.winner, &overlap.releases[0]);
                prop_assert!(rank(&overlap.releases[0]) < rank(&overlap.releases[1]));
                let decided = rules.decide(&tags).map(|r| rank(&r.name)).unwrap();
                prop_assert!(decided <= rank(&overlap.winner));
            }
            for error in report.errors.iter().filter(|e| e.code == "ambiguous-priority") {
                got_pairs.insert((error.releases[0].clone(), error.releases[1].clone()));
            }
            prop_assert_eq!(got_pairs, want_pairs);

            let want_shadowed: Vec<String> = (0..ranked.len())
                .filter(|&r| {
                    let mine: Vec<&Vec<usize>> = matching.iter().filter(|m| m.contains(&r)).collect();
                    !mine.is_empty() && mine.iter().all(|m| m[0] < r)
                })
                .map(|r| ranked[r].to_string())
                .collect();
            let mut got_shadowed: Vec<String> = report.shadowed.iter().map(|s| s.release.clone()).collect();
            got_shadowed.sort_by_key(|name| rank(name));
            prop_assert_eq!(got_shadowed, want_shadowed);
            for shadow in &report.shadowed {
                let tags = HeaderPairs::new(shadow.example.clone());
                let winner = rules.decide(&tags).map(|r| r.name.to_string()).unwrap();
                prop_assert!(shadow.by.contains(&winner), "{:?} wins {:?}", winner, shadow);
                let _: &BTreeMap<String, String> = &shadow.example;
            }
        }
    }
}
