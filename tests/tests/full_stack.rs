//! The seed's case studies end to end on a simulated node: real pods (network namespaces) run
//! the demo service, the real `steer run` agent redirects their calls with eBPF, and requests
//! enter through the gateway with user tags. Every path is checked against the seed.

use std::path::PathBuf;

use steer_tests::{
    Node, http,
    scenario::{Hop, Scenario},
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

const FOOD_CHAIN: &[(&str, &[&str])] = &[("order", &["restaurant"]), ("restaurant", &["delivery"])];
/// User tags of a request: (header, value) pairs.
type Tags = &'static [(&'static str, &'static str)];

const ANDROID: (&str, &str) = ("x-device", "android");
const IPHONE: (&str, &str) = ("x-device", "iphone");
const ATLANTIS: (&str, &str) = ("x-region", "atlantis");

fn food_delivery() -> Scenario {
    Scenario::deploy(
        &fixture("food-delivery.yaml"),
        FOOD_CHAIN,
        Node::new().unwrap(),
    )
    .unwrap()
}

/// The path, and the release stamp every hop saw (all hops must agree).
fn path_and_release(hop: &Hop) -> (String, Option<String>) {
    let hops = hop.flatten();
    for h in &hops {
        assert!(h.error.is_none(), "hop failed: {h:?}");
        assert_eq!(
            h.release, hops[0].release,
            "one release per request, on every hop: {hop:?}"
        );
    }
    (hop.path(), hops[0].release.clone())
}

#[test]
fn seed_section_5_every_tag_combination_takes_its_path() {
    let scenario = food_delivery();
    let cases: [(Tags, &str, Option<&str>); 6] = [
        (
            &[ATLANTIS],
            "order/v1 -> restaurant/v1 -> delivery/v2-green",
            Some("green"),
        ),
        (
            &[ANDROID],
            "order/v1 -> restaurant/v2-blue -> delivery/v2-blue",
            Some("blue"),
        ),
        (
            &[ANDROID, ATLANTIS],
            "order/v1 -> restaurant/v2-red -> delivery/v1",
            Some("red"),
        ),
        (&[], "order/v1 -> restaurant/v1 -> delivery/v1", None),
        (&[IPHONE], "order/v1 -> restaurant/v1 -> delivery/v1", None),
        (
            &[IPHONE, ATLANTIS],
            "order/v1 -> restaurant/v1 -> delivery/v2-green",
            Some("green"),
        ),
    ];
    for (tags, path, release) in cases {
        let hop = scenario.request("order", tags).unwrap();
        assert_eq!(
            path_and_release(&hop),
            (path.to_string(), release.map(str::to_string)),
            "{tags:?}"
        );
    }
    // A tag header sent twice is one value (`android,iphone`, as Envoy reads it): no release
    // takes it, whatever each value alone would match.
    let hop = scenario
        .request("order", &[ANDROID, IPHONE, ATLANTIS])
        .unwrap();
    assert_eq!(
        path_and_release(&hop),
        (
            "order/v1 -> restaurant/v1 -> delivery/v2-green".to_string(),
            Some("green".to_string())
        )
    );
}

#[test]
fn a_forged_stamp_from_outside_has_no_effect() {
    let scenario = food_delivery();
    let hop = scenario
        .request(
            "order",
            &[("x-steer-release", "red"), ("baggage", "steer-release=red")],
        )
        .unwrap();
    assert_eq!(
        path_and_release(&hop),
        ("order/v1 -> restaurant/v1 -> delivery/v1".to_string(), None)
    );
}

#[test]
fn later_hops_route_by_the_stamp_without_the_tags_and_only_a_minted_one() {
    let scenario = food_delivery();
    // A pod calls restaurant directly (through the redirect) with a stamp and no tags: a stamp
    // steer minted (signed with the bed's key) is honoured, on this hop and the next.
    let keys = std::fs::read_to_string(scenario.config_path.with_file_name("stamp.key")).unwrap();
    let keys = steer::proxy::stamp::StampKeys::from_text(&keys).unwrap();
    let minted = format!("x-steer-release: blue;sig={}", keys.sign("blue"));
    let order_pod = scenario.node.pod("order-v1");
    let restaurant = scenario.config.service("restaurant").unwrap().addresses[0];
    let call = |stamp: &str| {
        let output = order_pod
            .exec(std::process::Command::new("curl").args([
                "-s",
                "-H",
                stamp,
                &format!("http://{restaurant}/"),
            ]))
            .unwrap();
        let hop: Hop = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
        path_and_release(&hop)
    };
    assert_eq!(
        call(&minted),
        (
            "restaurant/v2-blue -> delivery/v2-blue".to_string(),
            Some("blue".to_string())
        )
    );
    // A pod cannot pick a release by writing its name: an unsigned or forged stamp is no
    // stamp, and without tags the request goes to primaries.
    for forged in [
        "x-steer-release: blue",
        "x-steer-release: blue;sig=AAAAAAAAAAAAAAAAAAAAAA",
    ] {
        assert_eq!(
            call(forged),
            ("restaurant/v1 -> delivery/v1".to_string(), None),
            "{forged}"
        );
    }
}

#[test]
fn the_admin_server_explains_like_the_cli_and_counts_requests() {
    let scenario = food_delivery();
    scenario.request("order", &[ANDROID]).unwrap();
    let reply = http::get(
        scenario.admin,
        "/explain?service=restaurant&header=x-device:android&header=x-region:atlantis",
        &[],
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answer: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(answer["release"], "red");
    assert_eq!(answer["version"], "v2-red");
    let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains(
            "steer_requests_total{service=\"restaurant\",version=\"v2-blue\",release=\"blue\",code=\"2xx\"} 1"
        ),
        "{}",
        metrics.body
    );
}

#[test]
fn seed_section_3_order_and_email_follow_one_release_end_to_end() {
    let scenario = Scenario::deploy(
        &fixture("order-email.yaml"),
        &[("order", &["email"])],
        Node::new().unwrap(),
    )
    .unwrap();
    let cases: [(Tags, &str, Option<&str>); 4] = [
        (
            &[ANDROID],
            "order/v1.1 -> email/v2.1",
            Some("android-order"),
        ),
        (
            &[ATLANTIS],
            "order/v1.0 -> email/v2.0.1",
            Some("atlantis-email"),
        ),
        (
            &[ANDROID, ATLANTIS],
            "order/v1.1 -> email/v2.1",
            Some("android-order"),
        ),
        (&[], "order/v1.0 -> email/v2.0", None),
    ];
    for (tags, path, release) in cases {
        let hop = scenario.request("order", tags).unwrap();
        assert_eq!(
            path_and_release(&hop),
            (path.to_string(), release.map(str::to_string)),
            "{tags:?}"
        );
    }
}

#[test]
fn seed_section_4_each_canary_reaches_its_own_z() {
    let scenario = Scenario::deploy(
        &fixture("abz.yaml"),
        &[("a", &["z"]), ("b", &["z"])],
        Node::new().unwrap(),
    )
    .unwrap();
    for entry in ["a", "b"] {
        let android = path_and_release(&scenario.request(entry, &[ANDROID]).unwrap());
        assert!(android.0.ends_with("z/v2-android"), "{android:?}");
        assert_eq!(android.1.as_deref(), Some("a-prime"));
        let iphone = path_and_release(&scenario.request(entry, &[IPHONE]).unwrap());
        assert!(iphone.0.ends_with("z/v2-iphone"), "{iphone:?}");
        assert_eq!(iphone.1.as_deref(), Some("b-prime"));
    }
}

#[test]
fn thousands_of_mixed_requests_agree_with_explain_and_never_mix_releases() {
    let scenario = food_delivery();
    let (snapshot, _) = steer::state::Snapshot::build(scenario.config.clone()).unwrap();
    let devices = [None, Some("android"), Some("iphone")];
    let regions = [None, Some("atlantis"), Some("mu")];
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..2000usize {
        let user = format!("user-{i}");
        let mut tags = vec![("x-user-id", user.as_str())];
        tags.extend(devices[i % 3].map(|d| ("x-device", d)));
        tags.extend(regions[(i / 3) % 3].map(|r| ("x-region", r)));
        let hop = scenario.request("order", &tags).unwrap();
        let (path, release) = path_and_release(&hop);
        let pairs = steer::rules::HeaderPairs::new(tags.iter().copied());
        for h in hop.flatten() {
            let explained = snapshot.explain(&h.service, &pairs).unwrap();
            assert_eq!(h.version, explained.version, "{tags:?}: {path}");
            assert_eq!(release, explained.release, "{tags:?}: {path}");
            // A canary version is only ever reached by its own release.
            let owner = scenario
                .config
                .releases
                .iter()
                .find(|r| r.targets.get(&h.service) == Some(&h.version));
            assert_eq!(
                owner.map(|r| r.name.clone()),
                owner.and(release.clone()),
                "{path}"
            );
            if devices[i % 3].is_none() && regions[(i / 3) % 3].is_none() {
                assert!(
                    owner.is_none(),
                    "an untagged request reached a canary: {path}"
                );
            }
        }
        seen.insert(path);
    }
    assert_eq!(
        seen.len(),
        4,
        "every route of the seed was exercised: {seen:?}"
    );
}

#[test]
fn a_sticky_ten_percent_release_takes_ten_percent_of_users() {
    let scenario = Scenario::deploy(
        &fixture("percentage.yaml"),
        &[("order", &["delivery"])],
        Node::new().unwrap(),
    )
    .unwrap();
    let mut canary = 0;
    for i in 0..2000 {
        let user = format!("u{i}");
        let tags = [ANDROID, ("x-user-id", user.as_str())];
        let first = path_and_release(&scenario.request("order", &tags).unwrap());
        if first.1.is_some() {
            canary += 1;
            assert_eq!(first.0, "order/v1 -> delivery/v2");
        }
        if i % 10 == 0 {
            let again = path_and_release(&scenario.request("order", &tags).unwrap());
            assert_eq!(first, again, "user {user} switched sides");
        }
    }
    assert!(
        (140..=260).contains(&canary),
        "{canary} of 2000 users in a 10% release"
    );
}
