use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::*;
use crate::{rules::HeaderPairs, state::Snapshot};

const FOOD_DELIVERY: &str = include_str!("../../../tests/fixtures/cluster-food-delivery.yaml");

/// The objects of a multi-document YAML file, sorted into what the watchers would hold.
fn cluster(yaml: &str) -> Cluster {
    let mut cluster = Cluster::default();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        add(&mut cluster, Value::deserialize(document).unwrap());
    }
    cluster
}

fn add(cluster: &mut Cluster, object: Value) {
    match object["kind"].as_str().unwrap() {
        "CanaryRelease" => cluster
            .releases
            .push(serde_json::from_value(object).unwrap()),
        "Service" => cluster
            .services
            .push(serde_json::from_value(object).unwrap()),
        "EndpointSlice" => cluster.slices.push(serde_json::from_value(object).unwrap()),
        "Pod" => {
            let metadata = &object["metadata"];
            let key = (
                metadata["namespace"].as_str().unwrap().to_string(),
                metadata["name"].as_str().unwrap().to_string(),
            );
            cluster.pods.insert(
                key,
                serde_json::from_value(metadata["labels"].clone()).unwrap(),
            );
        }
        other => panic!("unexpected kind {other}"),
    }
}

/// A CanaryRelease created `minute` minutes after the fixture's ones.
fn release(name: &str, minute: u32, spec: Value) -> CanaryRelease {
    serde_json::from_value(json!({
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "CanaryRelease",
        "metadata": {
            "name": name,
            "namespace": "food",
            "generation": 1,
            "creationTimestamp": format!("2026-11-22T10:{minute:02}:00Z"),
        },
        "spec": spec,
    }))
    .unwrap()
}

fn snapshot(translation: &Translation) -> Snapshot {
    Snapshot::build(translation.config.clone())
        .expect("a translation is always valid")
        .0
}

fn route(snapshot: &Snapshot, service: &str, tags: &[(&str, &str)]) -> (Option<String>, String) {
    let tags = HeaderPairs::new(tags.iter().copied());
    let explanation = snapshot.explain(service, &tags).unwrap();
    (explanation.release, explanation.version)
}

fn verdict<'a>(translation: &'a Translation, release: &str) -> &'a Verdict {
    translation
        .verdicts
        .get(release)
        .unwrap_or_else(|| panic!("no verdict for {release}: {:?}", translation.verdicts))
}

const ANDROID: (&str, &str) = ("x-device", "android");
const ATLANTIS: (&str, &str) = ("x-region", "atlantis");

#[test]
fn the_seed_cluster_routes_like_the_seed_file() {
    let translation = translate(&cluster(FOOD_DELIVERY), "version").unwrap();
    let snapshot = snapshot(&translation);
    let red = (Some("food/red".to_string()), "v2-red".to_string());
    assert_eq!(
        route(&snapshot, "restaurant.food", &[ANDROID, ATLANTIS]),
        red
    );
    assert_eq!(
        route(&snapshot, "delivery.food", &[ANDROID]),
        (Some("food/blue".into()), "v2-blue".into())
    );
    assert_eq!(
        route(&snapshot, "delivery.food", &[ATLANTIS]),
        (Some("food/green".into()), "v2-green".into())
    );
    assert_eq!(route(&snapshot, "order.food", &[]), (None, "v1".into()));
    for name in ["food/red", "food/blue", "food/green"] {
        assert_eq!(verdict(&translation, name).state, State::Accepted, "{name}");
    }
    let restaurant = translation.config.service("restaurant.food").unwrap();
    assert_eq!(restaurant.addresses, ["10.96.0.20:80".parse().unwrap()]);
}

#[test]
fn only_ready_pods_serve_and_a_version_is_known_from_any_pod() {
    let translation = translate(&cluster(FOOD_DELIVERY), "version").unwrap();
    let restaurant = translation.config.service("restaurant.food").unwrap();
    let red = restaurant
        .versions
        .iter()
        .find(|v| v.name == "v2-red")
        .unwrap();
    // 10.244.1.23 is the not-ready pod; the Service's port 80 maps to the pods' 8080.
    assert_eq!(red.endpoints, ["10.244.1.21:8080".parse().unwrap()]);
}

#[test]
fn services_without_the_annotation_stay_out_of_the_mesh() {
    let translation = translate(&cluster(FOOD_DELIVERY), "version").unwrap();
    let names: Vec<&str> = translation
        .config
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["order.food", "restaurant.food", "delivery.food"]);
}

#[test]
fn a_shadowed_release_is_left_out_and_names_its_shadow() {
    // Section 5.4: the broad Android release above the narrow red one.
    let mut cluster = cluster(FOOD_DELIVERY);
    let blue = cluster
        .releases
        .iter_mut()
        .find(|r| r.metadata.name.as_deref() == Some("blue"))
        .unwrap();
    blue.spec.priority = 0;
    let translation = translate(&cluster, "version").unwrap();
    let red = verdict(&translation, "food/red");
    assert_eq!(red.state, State::Shadowed);
    assert_eq!(red.related, ["food/blue"]);
    assert!(red.message.contains("x-device: android"), "{}", red.message);
    assert_eq!(verdict(&translation, "food/blue").state, State::Accepted);
    assert!(
        translation
            .config
            .releases
            .iter()
            .all(|r| r.name != "food/red")
    );
}

#[test]
fn of_two_conflicting_releases_the_newer_gives_way() {
    let mut cluster = cluster(FOOD_DELIVERY);
    // Same priority as green, and Atlantis iPhone users match both.
    cluster.releases.push(release(
        "iphone",
        30,
        json!({"priority": 3, "match": [{"header": "x-device", "exact": "iphone"}],
               "targets": {"order": "v1"}}),
    ));
    let translation = translate(&cluster, "version").unwrap();
    let iphone = verdict(&translation, "food/iphone");
    // It also claims the primary version: that is its own fault, reported first.
    assert_eq!(iphone.state, State::Invalid);
    assert_eq!(iphone.reason, "VersionInTwoReleases");

    let mut cluster = self::cluster(FOOD_DELIVERY);
    cluster.releases.push(release(
        "iphone",
        30,
        json!({"priority": 3, "match": [{"header": "x-device", "exact": "iphone"}]}),
    ));
    let translation = translate(&cluster, "version").unwrap();
    let iphone = verdict(&translation, "food/iphone");
    assert_eq!(iphone.state, State::Conflict);
    assert_eq!(iphone.reason, "AmbiguousPriority");
    assert_eq!(iphone.related, ["food/green"]);
    assert_eq!(verdict(&translation, "food/green").state, State::Accepted);
}

#[test]
fn a_version_claimed_twice_goes_to_the_older_release() {
    let mut cluster = cluster(FOOD_DELIVERY);
    cluster.releases.push(release(
        "copycat",
        40,
        json!({"priority": 9, "match": [{"header": "x-beta", "exact": "yes"}],
               "targets": {"restaurant": "v2-red"}}),
    ));
    let translation = translate(&cluster, "version").unwrap();
    let copycat = verdict(&translation, "food/copycat");
    assert_eq!(copycat.state, State::Conflict);
    assert_eq!(copycat.reason, "VersionInTwoReleases");
    assert_eq!(copycat.related, ["food/red"]);
    assert_eq!(verdict(&translation, "food/red").state, State::Accepted);
}

#[test]
fn a_broken_release_does_not_take_the_others_down() {
    let mut cluster = cluster(FOOD_DELIVERY);
    cluster.releases.push(release(
        "bad-regex",
        50,
        json!({"priority": 7, "match": [{"header": "x-user", "regex": "(unclosed"}]}),
    ));
    cluster.releases.push(release(
        "typo",
        51,
        json!({"priority": 8, "match": [{"header": "x-beta", "exact": "yes"}],
               "targets": {"resturant": "v2"}}),
    ));
    cluster.releases.push(release(
        "elsewhere",
        52,
        json!({"priority": 9, "match": [{"header": "x-beta", "exact": "no"}],
               "targets": {"delivery.food": "v9"}}),
    ));
    let translation = translate(&cluster, "version").unwrap();
    assert_eq!(
        verdict(&translation, "food/bad-regex").reason,
        "InvalidRegex"
    );
    let typo = verdict(&translation, "food/typo");
    assert_eq!(typo.reason, "UnknownService");
    assert!(typo.message.contains("resturant.food"), "{}", typo.message);
    assert_eq!(
        verdict(&translation, "food/elsewhere").reason,
        "UnknownVersion"
    );
    let snapshot = snapshot(&translation);
    assert_eq!(
        route(&snapshot, "restaurant.food", &[ANDROID, ATLANTIS])
            .0
            .as_deref(),
        Some("food/red")
    );
}

#[test]
fn a_service_with_several_ports_is_one_service_per_port_and_targets_cover_all() {
    let mut cluster = cluster(FOOD_DELIVERY);
    let restaurant = cluster
        .services
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("restaurant"))
        .unwrap();
    let spec = restaurant.spec.as_mut().unwrap();
    let mut grpc = spec.ports.as_ref().unwrap()[0].clone();
    grpc.name = Some("grpc".into());
    grpc.port = 9090;
    spec.ports.as_mut().unwrap().push(grpc);
    let slice = cluster
        .slices
        .iter_mut()
        .find(|s| {
            s.metadata
                .name
                .as_deref()
                .unwrap()
                .starts_with("restaurant")
        })
        .unwrap();
    let mut grpc = slice.ports.as_ref().unwrap()[0].clone();
    grpc.name = Some("grpc".into());
    grpc.port = Some(9000);
    slice.ports.as_mut().unwrap().push(grpc);

    let translation = translate(&cluster, "version").unwrap();
    let grpc = translation.config.service("restaurant.food:grpc").unwrap();
    assert_eq!(grpc.addresses, ["10.96.0.20:9090".parse().unwrap()]);
    let red = grpc.versions.iter().find(|v| v.name == "v2-red").unwrap();
    assert_eq!(red.endpoints, ["10.244.1.21:9000".parse().unwrap()]);
    let red = translation
        .config
        .releases
        .iter()
        .find(|r| r.name == "food/red")
        .unwrap();
    assert_eq!(
        red.targets.keys().collect::<Vec<_>>(),
        ["restaurant.food:grpc", "restaurant.food:http"]
    );
}

#[test]
fn the_version_label_can_be_set_per_service() {
    let mut cluster = cluster(FOOD_DELIVERY);
    for labels in cluster.pods.values_mut() {
        if let Some(version) = labels.remove("version") {
            labels.insert("track".into(), version);
        }
    }
    let translation = translate(&cluster, "track").unwrap();
    assert_eq!(verdict(&translation, "food/red").state, State::Accepted);

    let delivery = cluster
        .services
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("delivery"))
        .unwrap();
    delivery
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(VERSION_LABEL_ANNOTATION.into(), "track".into());
    // With the default label only delivery finds its versions.
    let translation = translate(&cluster, "version").unwrap();
    assert_eq!(verdict(&translation, "food/green").state, State::Accepted);
    assert_eq!(verdict(&translation, "food/red").reason, "UnknownVersion");
}

#[test]
fn a_service_sets_its_request_timeout_and_a_bad_value_keeps_the_default() {
    let mut cluster = cluster(FOOD_DELIVERY);
    for service in &mut cluster.services {
        let timeout = match service.metadata.name.as_deref() {
            Some("delivery") => "1500ms",
            Some("restaurant") => "0s",
            _ => continue,
        };
        service
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(REQUEST_TIMEOUT_ANNOTATION.into(), timeout.into());
    }
    let translation = translate(&cluster, "version").unwrap();
    let timeout = |name: &str| translation.config.service(name).unwrap().request_timeout;
    assert_eq!(timeout("delivery.food"), Some(Duration::from_millis(1500)));
    assert_eq!(timeout("restaurant.food"), None, "0s is refused");
    assert_eq!(timeout("order.food"), None);
    let snapshot = snapshot(&translation);
    assert_eq!(
        snapshot.request_timeout("delivery.food"),
        Duration::from_millis(1500)
    );
    assert_eq!(
        snapshot.request_timeout("restaurant.food"),
        crate::config::DEFAULT_REQUEST_TIMEOUT
    );
}

#[test]
fn match_summary_reads_in_one_line() {
    let release = release(
        "r",
        0,
        json!({"priority": 1, "match": [
            {"header": "x-device", "exact": "android"},
            {"header": "x-user", "prefix": "beta-"},
            {"header": "x-region", "regex": "atl.*"}]}),
    );
    assert_eq!(
        match_summary(&release),
        "x-device=android, x-user^=beta-, x-region~atl.*"
    );
}

#[test]
fn a_rollout_is_carried_and_a_promoted_release_is_left_out_of_the_rules() {
    let mut cluster = cluster(FOOD_DELIVERY);
    let red = cluster
        .releases
        .iter_mut()
        .find(|r| r.metadata.name.as_deref() == Some("red"))
        .unwrap();
    red.spec.hash_by = Some("x-user-id".into());
    red.spec.rollout =
        Some(serde_json::from_value(json!({"steps": [10, 100], "interval": "1m"})).unwrap());
    let translation = translate(&cluster, "version").unwrap();
    let release = translation
        .config
        .releases
        .iter()
        .find(|r| r.name == "food/red")
        .unwrap();
    assert_eq!(release.rollout.as_ref().unwrap().steps, [10.0, 100.0]);
    assert_eq!(verdict(&translation, "food/red").state, State::Accepted);

    // Promoted: the Service names red's version primary, and the status says so.
    let begun = crate::rollout::begin(
        release,
        release.rollout.as_ref().unwrap(),
        jiff::Timestamp::UNIX_EPOCH,
    );
    cluster.rollouts.insert("food/red".into(), begun.promoted());
    let restaurant = cluster
        .services
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("restaurant"))
        .unwrap();
    restaurant
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(PRIMARY_ANNOTATION.into(), "v2-red".into());
    let translation = translate(&cluster, "version").unwrap();
    assert!(
        !translation
            .config
            .releases
            .iter()
            .any(|r| r.name == "food/red")
    );
    let promoted = verdict(&translation, "food/red");
    assert_eq!(
        (promoted.state, promoted.reason.as_str()),
        (State::Accepted, "Promoted")
    );
    assert_eq!(
        route(&snapshot(&translation), "restaurant.food", &[]),
        (None, "v2-red".to_string())
    );
    // A status about another rollout (another fingerprint) promotes nothing: red is in again,
    // and claims a primary.
    cluster.rollouts.get_mut("food/red").unwrap().fingerprint = "other".into();
    let translation = translate(&cluster, "version").unwrap();
    assert_eq!(verdict(&translation, "food/red").state, State::Invalid);
}
