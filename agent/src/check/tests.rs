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
    let example = shadow.example.as_ref().expect("an example");
    assert_eq!(example["x-device"], "android");
    assert_eq!(example["x-region"], "atlantis");
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
fn overlaps_are_counted_per_release_with_an_example() {
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
    let counts: Vec<_> = report
        .overlaps
        .iter()
        .map(|o| (o.release.as_str(), o.above, o.below))
        .collect();
    assert_eq!(
        counts,
        [("android", 0, 1), ("atlantis", 1, 1), ("iphone", 1, 0)]
    );
    let iphone = report.overlaps[2].example.as_ref().expect("an example");
    assert_eq!(iphone.winner, "atlantis");
    assert_eq!(iphone.example.as_ref().unwrap()["x-device"], "iphone");
}

#[test]
fn every_pair_can_be_streamed() {
    let config = load(
        r#"
releases:
  - { name: a, priority: 1, match: [{ header: x-device, exact: android }] }
  - { name: b, priority: 2, match: [{ header: x-region, prefix: atl }] }
  - { name: c, priority: 3, match: [{ header: x-team, regex: "t[0-9]+" }] }
"#,
    );
    let mut pairs = Vec::new();
    let report = check_with(
        &config,
        &Options {
            examples: 0,
            ..Options::default()
        },
        Some(&mut |o: Overlap| pairs.push((o.releases, o.example.is_some()))),
    );
    pairs.sort();
    let pair = |a: &str, b: &str| ([a.to_string(), b.to_string()], true);
    assert_eq!(pairs, [pair("a", "b"), pair("a", "c"), pair("b", "c")]);
    assert!(report.overlaps.iter().all(|o| o.example.is_none()));
}

#[test]
fn an_undecided_regex_overlap_shows_no_false_example() {
    // The issue's case: these DFAs are too large to build, so whether some value matches both
    // stays open, and a request without the header (matching neither) is no example.
    let report = check(&load(
        r#"
releases:
  - { name: ra, priority: 1, match: [{ header: x, regex: ".*a.{18}" }] }
  - { name: rb, priority: 2, match: [{ header: x, regex: ".*b.{18}" }] }
"#,
    ));
    let rb = report
        .overlaps
        .iter()
        .find(|o| o.release == "rb")
        .expect("counted as a possible overlap");
    assert_eq!((rb.above, rb.possible), (1, 1));
    assert_eq!(rb.example, None);
}

#[test]
fn a_work_budget_degrades_to_a_warning() {
    let config = sample::mixed(300, 7);
    let report = check_with(
        &config,
        &Options {
            steps: 1_000,
            ..Options::default()
        },
        None,
    );
    let incomplete = report
        .warnings
        .iter()
        .find(|w| w.code == "analysis-incomplete")
        .expect("the budget ran out");
    assert!(
        incomplete.message.contains("of 300 releases"),
        "{incomplete:?}"
    );
    // The same configuration within the default budget completes.
    let full = check(&config);
    assert!(
        full.warnings
            .iter()
            .all(|w| w.code != "analysis-incomplete")
    );
}

#[test]
fn contradicting_matchers_are_an_error() {
    let report = check(&load(
        r#"
releases:
  - { name: never, priority: 1, match: [{ header: x, exact: a }, { header: X, prefix: b }] }
"#,
    ));
    assert_eq!(codes(&report), ["never-matches"]);
}

// --- property test: verdicts against brute force over a representative finite universe ---

mod oracle {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::super::{Options, Overlap, check_with};
    use crate::{
        config::{Config, Matcher, Release},
        rules::{HeaderPairs, Ruleset},
    };

    /// Every region of the value space the generated matchers can tell apart has a member here
    /// (`None`: the header absent).
    const VALUES: [Option<&str>; 19] = [
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
    /// The hash header of the generated shares, and enough users that two 50% shares have
    /// users in common and users apart (all but surely).
    const HASH: &str = "u";
    const USERS: usize = 48;

    fn matcher(headers: &'static [&'static str]) -> impl Strategy<Value = Matcher> {
        let values = ["x", "xy", "y", "yx"];
        (0..headers.len(), 0..values.len(), 0..3u8).prop_map(move |(h, v, kind)| {
            let value = values[v].to_string();
            let mut m = Matcher {
                header: headers[h].into(),
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

    fn releases(
        headers: &'static [&'static str],
        shares: bool,
    ) -> impl Strategy<Value = Vec<Release>> {
        let share = if shares { 0..3u8 } else { 0..1u8 };
        prop::collection::vec(
            (
                1..4u32,
                prop::collection::vec(matcher(headers), 1..3),
                share,
            ),
            1..6,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (priority, matchers, share))| Release {
                    name: format!("r{i}"),
                    priority,
                    matchers,
                    percent: [None, Some(50.0), Some(100.0)][share as usize],
                    hash_by: (share > 0).then(|| HASH.to_string()),
                    targets: Default::default(),
                    rollout: None,
                })
                .collect()
        })
    }

    /// Every combination of `VALUES` over `headers`, times the users (and none) when shares
    /// are in play.
    fn universe(headers: &[&str], shares: bool) -> Vec<HeaderPairs> {
        requests(headers, shares.then_some(0..USERS))
    }

    /// Every combination of `VALUES` over `headers`, times `users` (and none).
    fn requests(headers: &[&str], users: Option<std::ops::Range<usize>>) -> Vec<HeaderPairs> {
        let mut requests = vec![Vec::new()];
        let users: Vec<Option<String>> = std::iter::once(None)
            .chain(
                users
                    .into_iter()
                    .flatten()
                    .map(|u| Some(format!("user-{u}"))),
            )
            .collect();
        let dimensions = headers
            .iter()
            .map(|h| {
                let values = VALUES.iter().map(|v| v.map(str::to_string)).collect();
                (h.to_string(), values)
            })
            .chain([(HASH.to_string(), users)]);
        for (header, values) in dimensions {
            let values: Vec<Option<String>> = values;
            let header = &header;
            requests = requests
                .into_iter()
                .flat_map(|request: Vec<(String, String)>| {
                    values.iter().map(move |value| {
                        let mut request = request.clone();
                        if let Some(value) = value {
                            request.push((header.clone(), value.clone()));
                        }
                        request
                    })
                })
                .collect();
        }
        requests.into_iter().map(HeaderPairs::new).collect()
    }

    /// The report of the checker, its streamed pairs, against what every request of the
    /// universe does.
    fn agrees(releases: Vec<Release>, headers: &[&str], shares: bool) -> Result<(), TestCaseError> {
        let universe = &universe(headers, shares);
        let config = Config {
            releases,
            ..Config::default()
        };
        let mut streamed: Vec<Overlap> = Vec::new();
        let report = check_with(
            &config,
            &Options::default(),
            Some(&mut |o: Overlap| streamed.push(o)),
        );
        let rules = Ruleset::compile(&config).unwrap();
        let ranked: Vec<&str> = rules.releases().iter().map(|r| &*r.name).collect();
        let rank = |name: &str| ranked.iter().position(|n| *n == name).unwrap();
        let priority = |r: usize| rules.releases()[r].priority;
        // matching[request] = ranks of the releases it matches, best first.
        let matching: Vec<Vec<usize>> = universe
            .iter()
            .map(|tags| {
                rules
                    .all_matching(tags)
                    .iter()
                    .map(|r| rank(&r.name))
                    .collect()
            })
            .collect();
        let holds = |example: &BTreeMap<String, String>, names: &[&str]| {
            let tags = HeaderPairs::new(example.clone());
            let matched: Vec<String> = rules
                .all_matching(&tags)
                .iter()
                .map(|r| r.name.to_string())
                .collect();
            names.iter().all(|n| matched.iter().any(|m| m == n))
        };

        let mut want_pairs = BTreeSet::new();
        for ranks in &matching {
            for (i, &a) in ranks.iter().enumerate() {
                for &b in &ranks[i + 1..] {
                    want_pairs.insert((a, b));
                }
            }
        }
        let mut got_pairs = BTreeSet::new();
        for overlap in &streamed {
            prop_assert!(!overlap.approximate, "{:?}", overlap);
            let [a, b] = &overlap.releases;
            got_pairs.insert((rank(a), rank(b)));
            prop_assert_eq!(&overlap.winner, a);
            prop_assert!(rank(a) < rank(b) && priority(rank(a)) < priority(rank(b)));
            if let Some(example) = &overlap.example {
                prop_assert!(holds(example, &[a.as_str(), b.as_str()]), "{:?}", overlap);
            }
        }
        for error in report
            .errors
            .iter()
            .filter(|e| e.code == "ambiguous-priority")
        {
            let (a, b) = (rank(&error.releases[0]), rank(&error.releases[1]));
            prop_assert_eq!(priority(a), priority(b));
            got_pairs.insert((a, b));
        }
        prop_assert!(
            report.warnings.iter().all(|w| w.code == "no-targets"),
            "everything generated is decidable: {:?}",
            report.warnings
        );
        prop_assert_eq!(&got_pairs, &want_pairs);

        // Counts per release: pairs of distinct priorities, from either side.
        let mut want_counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for &(a, b) in want_pairs
            .iter()
            .filter(|(a, b)| priority(*a) != priority(*b))
        {
            want_counts.entry(ranked[b]).or_default().0 += 1;
            want_counts.entry(ranked[a]).or_default().1 += 1;
        }
        let got_counts: BTreeMap<&str, (usize, usize)> = report
            .overlaps
            .iter()
            .map(|o| (o.release.as_str(), (o.above, o.below)))
            .collect();
        prop_assert_eq!(got_counts, want_counts);
        for summary in &report.overlaps {
            if let Some(overlap) = &summary.example {
                let [a, b] = &overlap.releases;
                let example = overlap.example.as_ref().expect("only examples are kept");
                prop_assert!(holds(example, &[a.as_str(), b.as_str()]));
            }
        }

        let want_shadowed: Vec<usize> = (0..ranked.len())
            .filter(|&r| {
                let mine: Vec<&Vec<usize>> = matching.iter().filter(|m| m.contains(&r)).collect();
                !mine.is_empty() && mine.iter().all(|m| m[0] < r)
            })
            .collect();
        let mut got_shadowed: Vec<usize> =
            report.shadowed.iter().map(|s| rank(&s.release)).collect();
        got_shadowed.sort();
        // A few dozen users can happen to fall inside higher-priority shares every one: a
        // release the checker does not call shadowed is borne out by a user, among many more,
        // whose request it takes.
        let reached = |r: usize| {
            shares
                && requests(headers, Some(USERS..USERS * 50))
                    .iter()
                    .any(|tags| rules.decide(tags).map(|w| rank(&w.name)) == Some(r))
        };
        let want_shadowed: Vec<usize> = want_shadowed
            .into_iter()
            .filter(|r| got_shadowed.contains(r) || !reached(*r))
            .collect();
        prop_assert_eq!(got_shadowed, want_shadowed);
        for shadow in &report.shadowed {
            prop_assert!(!shadow.approximate);
            if let Some(example) = &shadow.example {
                let tags = HeaderPairs::new(example.clone());
                let winner = rules.decide(&tags).map(|r| r.name.to_string()).unwrap();
                prop_assert!(
                    shadow.by.contains(&winner),
                    "{:?} wins {:?}",
                    winner,
                    shadow
                );
                prop_assert!(holds(example, &[shadow.release.as_str()]));
            }
        }
        Ok(())
    }

    const THREE: &[&str] = &["a", "b", "c"];
    const TWO: &[&str] = &["a", "b"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn verdicts_agree_with_brute_force(releases in releases(THREE, false)) {
            agrees(releases, THREE, false)?;
        }

        #[test]
        fn verdicts_with_shares_agree_with_brute_force(releases in releases(TWO, true)) {
            agrees(releases, TWO, true)?;
        }
    }
}

#[test]
fn names_that_break_the_wire_or_kubernetes_are_refused_with_the_rule() {
    let report = check(&load(
        r#"
services:
  - name: "café"
    versions: [{ name: "v1;sig=x", primary: true }]
  - name: ""
    versions: [{ name: "v\u0007", primary: true }]
  - name: order
    versions: [{ name: v1, primary: true }, { name: v2 }]
releases:
  - { name: "a;sig=x", priority: 1, match: [{ header: x-device, exact: a }], targets: { order: v2 } }
  - { name: "", priority: 2, match: [{ header: "x\ndevice", exact: a }] }
  - { name: "red\nblue", priority: 3, match: [{ header: "x device", exact: a }], percent: 5, hashBy: "user id" }
gateway:
  routes:
    - { host: shop.example, service: order }
    - { host: "Shop.Example.", service: order }
    - { host: "shop.example:8080", service: order }
    - { pathPrefix: /api, service: missing }
"#,
    ));
    let found = |code: &str, text: &str| {
        report
            .errors
            .iter()
            .any(|f| f.code == code && f.message.contains(text))
    };
    assert!(found(
        "invalid-name",
        "service name `café`: not a DNS-1123 subdomain"
    ));
    assert!(found(
        "invalid-name",
        "service name ``: not a DNS-1123 subdomain"
    ));
    assert!(found(
        "invalid-name",
        "version name `v1;sig=x`: not a Kubernetes label value"
    ));
    assert!(found("invalid-name", r"version name `v\u{7}`"));
    assert!(found(
        "invalid-name",
        "release name `a;sig=x`: not a release name"
    ));
    assert!(found("invalid-name", "release name ``"));
    assert!(found("invalid-name", r"release name `red\nblue`"));
    assert!(found(
        "invalid-header",
        r"match header `x\ndevice`: not an HTTP header name"
    ));
    assert!(found("invalid-header", "match header `x device`"));
    assert!(found("invalid-header", "hashBy header `user id`"));
    assert!(found(
        "duplicate-route",
        "gateway route 2 has the host and path prefix"
    ));
    assert!(found(
        "invalid-route-host",
        "gateway route 3: host `shop.example:8080`: has a port"
    ));
    assert!(found(
        "unknown-service",
        "gateway route 4 goes to unknown service `missing`"
    ));
    // A release at fault names itself, so the Kubernetes source leaves out only it.
    let release_error = |text: &str| report.errors.iter().find(|f| f.message.contains(text));
    assert_eq!(
        release_error("release name `a;sig=x`").unwrap().releases,
        ["a;sig=x"]
    );
}

#[test]
fn kubernetes_names_pass() {
    let report = check(&load(
        r#"
services:
  - name: order.demo
    versions: [{ name: v1, primary: true }]
  - name: email.demo:grpc
    versions: [{ name: v2.0.1, primary: true }, { name: V2_1-rc.1 }]
releases:
  - { name: demo/android.v2, priority: 1, match: [{ header: X-Device, exact: a }], targets: { email.demo:grpc: V2_1-rc.1 } }
gateway:
  routes:
    - { host: shop.example, service: order.demo }
    - { host: shop.example, pathPrefix: /mail, service: email.demo:grpc }
"#,
    ));
    assert!(report.valid, "{:?}", report.errors);
}
