//! The CLI contract over the seed's fixtures in deploy/examples: exit codes, the JSON shape of
//! `steer check`, and `steer explain` for every case the seed walks through.

use std::{path::PathBuf, process::Command};

use serde_json::{Value, json};

fn example(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
        .display()
        .to_string()
}

fn steer(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_steer"))
        .args(args)
        .output()
        .expect("run steer");
    (
        output.status.code().expect("exit code"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn check_json(name: &str) -> (i32, Value) {
    let path = example(name);
    let (code, stdout, stderr) = steer(&["check", "--config", &path, "--format", "json"]);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
    (code, json)
}

/// `steer explain --format json` for one service and a list of `Name: value` headers.
fn explain(name: &str, service: &str, headers: &[&str]) -> Value {
    let path = example(name);
    let mut args = vec![
        "explain",
        "--config",
        &path,
        "--service",
        service,
        "--format",
        "json",
    ];
    for header in headers {
        args.extend(["--header", header]);
    }
    let (code, stdout, stderr) = steer(&args);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// (release, version) that a request with `headers` gets at `service`.
fn route(name: &str, service: &str, headers: &[&str]) -> (Option<String>, String) {
    let answer = explain(name, service, headers);
    (
        answer["release"].as_str().map(str::to_string),
        answer["version"].as_str().unwrap().to_string(),
    )
}

fn codes(json: &Value) -> Vec<&str> {
    json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap())
        .collect()
}

fn some(release: &str, version: &str) -> (Option<String>, String) {
    (Some(release.to_string()), version.to_string())
}

fn primary(version: &str) -> (Option<String>, String) {
    (None, version.to_string())
}

const ANDROID: &str = "x-device: android";
const IPHONE: &str = "x-device: iphone";
const ATLANTIS: &str = "X-Region: atlantis";

#[test]
fn check_json_has_the_contract_shape() {
    let (code, json) = check_json("food-delivery.yaml");
    assert_eq!(code, 0);
    assert_eq!(json["valid"], true);
    for key in ["errors", "warnings", "shadowed", "overlaps"] {
        assert!(json[key].is_array(), "{key} missing: {json}");
    }
    // Overlaps are counted per release (how many above and below it), with an example.
    let overlaps = json["overlaps"].as_array().unwrap();
    assert_eq!(overlaps.len(), 3, "{json}");
    let blue = overlaps
        .iter()
        .find(|o| o["release"] == "blue")
        .expect("blue overlaps");
    assert_eq!((&blue["above"], &blue["below"]), (&json!(1), &json!(1)));
    let red_blue = &blue["example"];
    assert_eq!(red_blue["releases"], json!(["red", "blue"]));
    assert_eq!(red_blue["winner"], "red");
    assert_eq!(red_blue["example"]["x-device"], "android");
    assert_eq!(red_blue["example"]["x-region"], "atlantis");
}

#[test]
fn seed_5_4_shadow_is_an_error_naming_the_shadowing_release() {
    let (code, json) = check_json("food-delivery-shadowed.yaml");
    assert_eq!(code, 1);
    assert_eq!(json["valid"], false);
    assert_eq!(codes(&json), ["shadowed"]);
    let shadowed = &json["shadowed"][0];
    assert_eq!(shadowed["release"], "red");
    assert_eq!(shadowed["by"], json!(["blue"]));
    assert_eq!(shadowed["example"]["x-device"], "android");
    assert_eq!(json["errors"][0]["releases"], json!(["red", "blue"]));
}

#[test]
fn seed_3_equal_priority_overlap_is_rejected() {
    let (code, json) = check_json("order-email.yaml");
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["overlaps"][1]["example"]["winner"], "android-order");
    let (code, json) = check_json("order-email-ambiguous.yaml");
    assert_eq!(code, 1);
    assert_eq!(codes(&json), ["ambiguous-priority"]);
    assert_eq!(
        json["errors"][0]["releases"],
        json!(["android-order", "atlantis-email"])
    );
}

#[test]
fn seed_4_a_version_serves_one_release() {
    let (code, json) = check_json("abz.yaml");
    assert_eq!(code, 0, "{json}");
    assert!(json["overlaps"].as_array().unwrap().is_empty());
    let (code, json) = check_json("abz-conflict.yaml");
    assert_eq!(code, 1);
    assert_eq!(codes(&json), ["version-in-two-releases"]);
}

#[test]
fn seed_5_routes_every_hop() {
    let file = "food-delivery.yaml";
    let hops = |headers: &[&str]| {
        ["order", "restaurant", "delivery"].map(|service| route(file, service, headers))
    };
    // 5.1: Atlantis -> green; only delivery has a green version.
    assert_eq!(
        hops(&[ATLANTIS]),
        [
            some("green", "v1"),
            some("green", "v1"),
            some("green", "v2-green")
        ]
    );
    // 5.1: Android -> blue on restaurant and delivery.
    assert_eq!(
        hops(&[ANDROID]),
        [
            some("blue", "v1"),
            some("blue", "v2-blue"),
            some("blue", "v2-blue")
        ]
    );
    // 5.3: Android and Atlantis match all three; red (priority 1) wins.
    assert_eq!(
        hops(&[ANDROID, ATLANTIS]),
        [some("red", "v1"), some("red", "v2-red"), some("red", "v1")]
    );
    for headers in [&[][..], &[IPHONE][..]] {
        assert_eq!(hops(headers), [primary("v1"), primary("v1"), primary("v1")]);
    }
    assert_eq!(hops(&[IPHONE, ATLANTIS])[2], some("green", "v2-green"));
    let reason = explain(file, "delivery", &[ANDROID, ATLANTIS])["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("red") && reason.contains("outranks"),
        "{reason}"
    );
}

#[test]
fn seed_3_and_4_route_every_hop() {
    let file = "order-email.yaml";
    assert_eq!(
        route(file, "order", &[ANDROID]),
        some("android-order", "v1.1")
    );
    assert_eq!(
        route(file, "email", &[ANDROID]),
        some("android-order", "v2.1")
    );
    assert_eq!(
        route(file, "email", &[ATLANTIS]),
        some("atlantis-email", "v2.0.1")
    );
    assert_eq!(
        route(file, "order", &[ATLANTIS]),
        some("atlantis-email", "v1.0")
    );
    // Android users from Atlantis follow the higher-priority release end to end.
    assert_eq!(route(file, "order", &[ANDROID, ATLANTIS]).1, "v1.1");
    assert_eq!(route(file, "email", &[ANDROID, ATLANTIS]).1, "v2.1");

    let file = "abz.yaml";
    assert_eq!(route(file, "z", &[ANDROID]), some("a-prime", "v2-android"));
    assert_eq!(route(file, "z", &[IPHONE]), some("b-prime", "v2-iphone"));
    assert_eq!(route(file, "a", &[IPHONE]), some("b-prime", "v1"));
    assert_eq!(route(file, "b", &[ANDROID]), some("a-prime", "v1"));
}

#[test]
fn unreadable_and_unparsable_files_exit_2_with_a_location() {
    let (code, _, stderr) = steer(&["check", "--config", "/nonexistent/steer.yaml"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("/nonexistent/steer.yaml") && stderr.contains("cannot read"),
        "{stderr}"
    );

    let dir = std::env::temp_dir().join(format!("steer-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "releases:\n  - name: a\n    priority: one\n").unwrap();
    let (code, _, stderr) = steer(&["check", "--config", bad.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 2);
    assert!(stderr.contains("bad.yaml:3:"), "{stderr}");
}

#[test]
fn explain_refuses_a_config_with_errors() {
    let path = example("abz-conflict.yaml");
    let (code, _, stderr) = steer(&["explain", "--config", &path, "--service", "z"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("version-in-two-releases"), "{stderr}");
}

#[test]
fn text_output_says_what_to_change() {
    let path = example("food-delivery-shadowed.yaml");
    let (code, stdout, _) = steer(&["check", "--config", &path]);
    assert_eq!(code, 1);
    assert!(stdout.contains("INVALID"), "{stdout}");
    assert!(
        stdout.contains("give `red` a smaller priority number"),
        "{stdout}"
    );
}
