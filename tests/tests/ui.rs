//! The live page in a real browser: headless chromium loads it from a running agent on the
//! test bed (the seed's food-delivery releases, real traffic through the eBPF redirect and the
//! proxy) and the test reads the DOM the page's script built.

use std::{collections::HashMap, path::PathBuf, process::Command, time::Duration};

use steer_tests::{
    Node, browser, http,
    scenario::{Scenario, binary},
};

const ANDROID: (&str, &str) = ("x-device", "android");
const ATLANTIS: (&str, &str) = ("x-region", "atlantis");

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

fn food_delivery() -> Scenario {
    Scenario::deploy(
        &fixture("food-delivery.yaml"),
        &[("order", &["restaurant"]), ("restaurant", &["delivery"])],
        Node::new().unwrap(),
    )
    .unwrap()
}

/// The edge `from -> to` of `release` drawn on the page.
fn edge<'a>(
    edges: &'a [HashMap<String, String>],
    from: &str,
    to: &str,
    release: &str,
) -> Option<&'a HashMap<String, String>> {
    edges.iter().find(|e| {
        e.get("data-from").map(String::as_str) == Some(from)
            && e.get("data-to").map(String::as_str) == Some(to)
            && e.get("data-release").map(String::as_str) == Some(release)
    })
}

fn rate(edge: &HashMap<String, String>) -> f64 {
    edge["data-rate"].parse().unwrap()
}

/// `steer explain` (the CLI) for every service: service -> (version, release, reason).
fn cli_explain(
    scenario: &Scenario,
    headers: &[&str],
) -> HashMap<String, (String, Option<String>, String)> {
    let steer = binary("steer").unwrap();
    let mut answers = HashMap::new();
    for service in &scenario.config.services {
        let mut command = Command::new(&steer);
        command
            .args(["explain", "--config"])
            .arg(&scenario.config_path)
            .args(["--service", &service.name, "--format", "json"]);
        for header in headers {
            command.args(["--header", header]);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        answers.insert(
            service.name.clone(),
            (
                answer["version"].as_str().unwrap().to_string(),
                answer["release"].as_str().map(str::to_string),
                answer["reason"].as_str().unwrap().to_string(),
            ),
        );
    }
    answers
}

#[test]
fn the_live_page_shows_releases_traffic_per_release_and_explains_like_the_cli() {
    browser::chromium().expect("cargo xtask setup installs chromium");
    let scenario = food_delivery();
    // Green (Atlantis, not Android), red (Android in Atlantis), and untagged traffic, flowing
    // until the page was read: its rates are over the last seconds, however slow the machine.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let dom = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let hop = scenario.request("order", &[ATLANTIS]).unwrap();
                assert_eq!(hop.path(), "order/v1 -> restaurant/v1 -> delivery/v2-green");
                let hop = scenario.request("order", &[ANDROID, ATLANTIS]).unwrap();
                assert_eq!(hop.path(), "order/v1 -> restaurant/v2-red -> delivery/v1");
                scenario.request("order", &[]).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // The agent reads its counters once a second: wait until the state shows every edge
        // of this traffic, then load the page.
        let started = std::time::Instant::now();
        loop {
            let state: serde_json::Value =
                serde_json::from_str(&http::get(scenario.admin, "/ui/state", &[]).unwrap().body)
                    .unwrap();
            let carried =
                |release: &str| {
                    state["edges"].as_array().unwrap().iter().any(|e| {
                        e["release"] == release && e["rate"].as_f64().is_some_and(|r| r > 0.0)
                    })
                };
            if carried("green") && carried("red") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no rates on the page's state: {state}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let url = format!(
            "http://{}/?header=x-device%3A%20android&header=x-region%3A%20atlantis",
            scenario.admin
        );
        let dom = browser::dump_dom(&url);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        dom.unwrap()
    });
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page never loaded its state: {dom}"
    );

    // Releases, in priority order, all accepted; green and red carried traffic.
    let rows: Vec<_> = browser::elements(&dom, "<tr data-release=")
        .into_iter()
        .filter(|r| !r["data-release"].is_empty())
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r["data-release"].as_str()).collect();
    assert_eq!(names, ["red", "blue", "green"], "{dom}");
    assert!(
        rows.iter().all(|r| r["data-verdict"] == "accepted"),
        "{rows:?}"
    );
    let release_rates = browser::elements(&dom, "<td class=\"num rate\"");
    assert!(release_rates.len() >= 3, "{dom}");

    // Green goes order -> restaurant v1 -> delivery green; red stops at restaurant red and
    // falls back to delivery v1. Every edge is counted under its release.
    let edges = browser::elements(&dom, "<g class=\"edge\"");
    let green = edge(&edges, "restaurant/v1", "delivery/v2-green", "green")
        .unwrap_or_else(|| panic!("no green edge to delivery: {edges:?}"));
    assert!(rate(green) > 0.0, "{green:?}");
    let order_green = edge(&edges, "order/v1", "restaurant/v1", "green").unwrap();
    assert!(rate(order_green) > 0.0, "{order_green:?}");
    let red = edge(&edges, "order/v1", "restaurant/v2-red", "red").unwrap();
    assert!(rate(red) > 0.0, "{red:?}");
    let red_falls_back = edge(&edges, "restaurant/v2-red", "delivery/v1", "red").unwrap();
    assert!(rate(red_falls_back) > 0.0, "{red_falls_back:?}");
    assert!(
        edge(&edges, "outside", "order/v1", "").is_some(),
        "{edges:?}"
    );
    // No request of one release was counted under another's version.
    assert!(edge(&edges, "restaurant/v2-red", "delivery/v2-green", "red").is_none());
    assert!(edge(&edges, "restaurant/v1", "delivery/v2-green", "red").is_none());
    // Version boxes are coloured by the release that owns them.
    let boxes = browser::elements(&dom, "<g class=\"version");
    let owner = |id: &str| {
        boxes
            .iter()
            .find(|b| b.get("data-id").map(String::as_str) == Some(id))
            .map(|b| b["data-release"].clone())
    };
    assert_eq!(owner("delivery/v2-green").as_deref(), Some("green"));
    assert_eq!(owner("restaurant/v2-red").as_deref(), Some("red"));
    assert_eq!(owner("restaurant/v1").as_deref(), Some(""));

    // The explain box (filled from the address) answers like `steer explain`.
    let hops = browser::elements(&dom, "<span class=\"hop\"");
    let cli = cli_explain(&scenario, &["x-device: android", "x-region: atlantis"]);
    assert_eq!(hops.len(), cli.len(), "{dom}");
    for hop in &hops {
        let (version, release, reason) = &cli[&hop["data-service"]];
        assert_eq!(&hop["data-version"], version, "{hop:?}");
        assert_eq!(Some(&hop["data-release"]), release.as_ref(), "{hop:?}");
        assert!(
            browser::text(&dom).contains(reason.as_str()),
            "{reason} not on the page"
        );
    }
    let path: Vec<String> = hops
        .iter()
        .map(|h| format!("{}/{}", h["data-service"], h["data-version"]))
        .collect();
    assert_eq!(path, ["order/v1", "restaurant/v2-red", "delivery/v1"]);
}

#[test]
fn a_rejected_edit_shows_which_release_shadows_which_and_the_old_rules_keep_serving() {
    browser::chromium().expect("cargo xtask setup installs chromium");
    let scenario = food_delivery();
    let shadowed = steer_tests::scenario::remap(
        &std::fs::read_to_string(fixture("food-delivery-shadowed.yaml")).unwrap(),
        &scenario.node,
    );
    std::fs::write(&scenario.config_path, shadowed).unwrap();
    // The agent refuses it: its reloads counter says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !http::get(scenario.admin, "/metrics", &[])
        .unwrap()
        .body
        .contains(r#"steer_config_reloads_total{result="rejected"} 1"#)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the edit was not rejected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dom = browser::dump_dom(&format!("http://{}/ui", scenario.admin)).unwrap();
    let notes = browser::elements(&dom, "<li class=\"shadowed\"");
    assert_eq!(notes.len(), 1, "{dom}");
    assert_eq!(notes[0]["data-release"], "red");
    assert_eq!(notes[0]["data-by"], "blue");
    let text = browser::text(&dom);
    assert!(text.contains("was rejected"), "{text}");
    assert!(text.contains("x-device: android"), "{text}");
    // The releases in force are still the good ones, red first.
    let rows = browser::elements(&dom, "<tr data-release=");
    assert_eq!(rows[0]["data-release"], "red");
    assert_eq!(rows[0]["data-verdict"], "accepted");
}

#[test]
fn the_page_is_embedded_and_loads_nothing_from_elsewhere() {
    let scenario = food_delivery();
    let page = http::get(scenario.admin, "/", &[]).unwrap();
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .starts_with("default-src 'self'")
    );
    for asset in ["/ui/app.js", "/ui/style.css"] {
        let reply = http::get(scenario.admin, asset, &[]).unwrap();
        assert_eq!(reply.status, 200, "{asset}");
        assert!(!reply.body.contains("http://") || asset.ends_with(".js"));
        assert!(
            !reply.body.contains("https://"),
            "{asset} loads from elsewhere"
        );
    }
    assert!(!page.body.contains("https://") && !page.body.contains("http://"));
}

/// Every `steer_*` metric name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("steer_") {
        let before = rest[..at].chars().last();
        let len = rest[at..].find(|c| !is_name(c)).unwrap_or(rest.len() - at);
        if !before.is_some_and(is_name) {
            names.push(rest[at..at + len].to_string());
        }
        rest = &rest[at + len..];
    }
    names
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(serde_json::Value::String(query)) = q.get("query") {
                            out.push(query.clone());
                        }
                    }
                    _ => exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The sample names a `/metrics` scrape can have: those present, and those its `# TYPE`
/// lines declare (a family with no series yet has only those).
fn exported(scrape: &str) -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    for line in scrape.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[test]
fn every_metric_the_grafana_board_queries_is_exported() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/steer.json");
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queries = Vec::new();
    exprs(&board, &mut queries);
    let queried: std::collections::BTreeSet<String> =
        queries.iter().flat_map(|q| metric_names(q)).collect();
    // The board covers what issue 13 asks for.
    for wanted in [
        "steer_requests_total",
        "steer_request_duration_seconds_bucket",
        "steer_edge_requests_total",
        "steer_decisions_total",
        "steer_request_errors_total",
        "steer_config_reloads_total",
        "steer_kubernetes_releases",
        "steer_datapath_attached",
        "steer_redirected_connections_total",
        "steer_rollout_percent",
        "steer_rollout_phase",
    ] {
        assert!(queried.contains(wanted), "the board does not show {wanted}");
    }

    let scenario = food_delivery();
    scenario.request("order", &[ATLANTIS]).unwrap();
    let scrape = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
    // The Kubernetes source's metrics come from an agent that reads a cluster.
    let cluster = Scenario::deploy_kubernetes(
        &fixture("food-delivery.yaml"),
        &[("order", &["restaurant"]), ("restaurant", &["delivery"])],
        Node::new().unwrap(),
    )
    .unwrap();
    let cluster_scrape = http::get(cluster.admin, "/metrics", &[]).unwrap().body;
    // The rollouts' metrics come from an agent with rollouts (set by the page's sampler,
    // once a second).
    let rolling = Scenario::deploy(
        &fixture("rollout.yaml"),
        &[("order", &["restaurant"]), ("restaurant", &["delivery"])],
        Node::new().unwrap(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let rolling_scrape = loop {
        let scrape = http::get(rolling.admin, "/metrics", &[]).unwrap().body;
        if scrape.contains(r#"steer_rollout_percent{release="android"} 1.0"#) {
            break scrape;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{scrape}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut exported = exported(&scrape);
    exported.extend(self::exported(&cluster_scrape));
    exported.extend(self::exported(&rolling_scrape));
    let missing: Vec<&String> = queried.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the board queries metrics the agent does not export: {missing:?}"
    );
    // And the agent really counts the edges the board shows.
    assert!(
        scrape.contains(r#"steer_edge_requests_total{from_service="restaurant",from_version="v1",service="delivery",version="v2-green",release="green",code="2xx"} 1"#),
        "{scrape}"
    );
    assert!(scrape.contains("steer_datapath_attached 1"), "{scrape}");
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(steer_request_duration_seconds_bucket{service=~"$service"}[5m]))) / steer_x"#
        ),
        ["steer_request_duration_seconds_bucket", "steer_x"]
    );
    assert!(metric_names("sum(my_steer_thing)").is_empty());
}
