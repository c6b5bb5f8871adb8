//! Progressive rollout end to end on a simulated node: the real agent rolls releases out step
//! by step from its own figures while real requests of thousands of users flow through the
//! food-delivery chain (order -> restaurant -> delivery); a faulty or slow canary version is
//! rolled back by itself, a healthy one walks every step and is promoted by `steer rollout
//! promote`. Clocks are shortened through the rollouts' own `interval`.

use std::{
    collections::HashSet,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use steer::config::Config;
use steer_tests::{
    Node, http,
    scenario::{Hop, Scenario, binary},
};

const FOOD_CHAIN: &[(&str, &[&str])] = &[("order", &["restaurant"]), ("restaurant", &["delivery"])];

/// The rollout example with its releases adjusted by `adjust` (shorter clocks, fewer
/// requests to judge).
fn example(adjust: impl FnOnce(&mut Config)) -> Config {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/rollout.yaml");
    let mut config = Config::load(&path).unwrap();
    adjust(&mut config);
    config
}

/// Sets `release`'s steps, interval, requests to judge and latency bound.
fn clock(config: &mut Config, release: &str, steps: &[f64], interval_ms: u64, min: u64) {
    let release = config
        .releases
        .iter_mut()
        .find(|r| r.name == release)
        .unwrap();
    let rollout = release.rollout.as_mut().unwrap();
    rollout.steps = steps.to_vec();
    rollout.interval = Duration::from_millis(interval_ms);
    rollout.analysis.min_requests = min;
}

/// Leaves out `release`'s latency bound: with a few dozen requests per interval on a shared
/// two-core machine, one request delayed by the scheduler is the p99. The slow-canary test
/// keeps it (its canary is many times slower).
fn no_latency_bound(config: &mut Config, release: &str) {
    let release = config
        .releases
        .iter_mut()
        .find(|r| r.name == release)
        .unwrap();
    release
        .rollout
        .as_mut()
        .unwrap()
        .analysis
        .max_latency_p99_ratio = None;
}

fn deploy(config: &Config, faults: &[(&str, &str, &[&str])]) -> Scenario {
    let text = serde_yaml_ng::to_string(config).unwrap();
    Scenario::deploy_text(&text, FOOD_CHAIN, faults, Node::new().unwrap()).unwrap()
}

/// `user-{prefix}-{i}` for i in 0..n.
fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{prefix}-{i}")).collect()
}

/// One request per user through the gateway to `order` with `tags`, eight at a time: each
/// user's status and path (`order/v1 -> restaurant/v2 -> delivery/v1`; what answered, for a
/// failed one).
fn pass(scenario: &Scenario, users: &[String], tags: &[(&str, &str)]) -> Vec<(u16, String)> {
    let chunk = users.len().div_ceil(8).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = users
            .chunks(chunk)
            .map(|users| {
                scope.spawn(move || {
                    users
                        .iter()
                        .map(|user| {
                            let mut headers = vec![("host", "order"), ("x-user-id", user.as_str())];
                            headers.extend_from_slice(tags);
                            let reply = http::get(scenario.gateway, "/", &headers).unwrap();
                            let path = serde_json::from_str::<Hop>(&reply.body)
                                .map(|hop| hop.path())
                                .unwrap_or(reply.body);
                            (reply.status, path)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

fn rollouts(scenario: &Scenario) -> Vec<Value> {
    let reply = http::get(scenario.admin, "/rollouts", &[]).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn status(scenario: &Scenario, release: &str) -> Value {
    rollouts(scenario)
        .into_iter()
        .find(|r| r["release"] == release)
        .unwrap_or_else(|| panic!("no rollout `{release}`"))
}

/// Requests the agent counted to `service`/`version` (any release, any status).
fn requests_to(scenario: &Scenario, service: &str, version: &str) -> u64 {
    let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
    let labels = format!("service=\"{service}\",version=\"{version}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("steer_requests_total{") && l.contains(&labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Users and the tags they send: one population of a load.
type Load<'a> = &'a [(&'a [String], &'a [(&'a str, &'a str)])];

/// Sends rounds of requests (from `users` with `tags`) until `done` holds of the rollouts.
fn load_until(
    scenario: &Scenario,
    load: Load<'_>,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let now = rollouts(scenario);
        if done(&now) {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{what}: not reached; rollouts: {now:#?}"
        );
        for (users, tags) in load {
            pass(scenario, users, tags);
        }
    }
}

fn phase_of<'a>(rollouts: &'a [Value], release: &str) -> &'a str {
    rollouts
        .iter()
        .find(|r| r["release"] == release)
        .and_then(|r| r["phase"].as_str())
        .unwrap_or("")
}

fn steer(args: &[&str]) -> (bool, String) {
    let output = Command::new(binary("steer").unwrap())
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

const ANDROID: (&str, &str) = ("x-device", "android");
const ATLANTIS: (&str, &str) = ("x-region", "atlantis");

/// Ends the wait of `release`'s step (`steer rollout continue`) and waits for the analysis it
/// asked for to be recorded.
fn continue_rollout(scenario: &Scenario, release: &str) -> Value {
    let before = status(scenario, release)["lastAnalysis"]["at"].clone();
    let admin = scenario.admin.to_string();
    let (ok, text) = steer(&["rollout", "continue", release, "--admin", &admin]);
    assert!(ok, "{text}");
    let started = Instant::now();
    loop {
        let now = status(scenario, release);
        if now["lastAnalysis"]["at"] != before {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no analysis after continue: {now:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_healthy_canary_walks_every_step_with_growing_sticky_shares_and_is_promoted() {
    let steps = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0];
    // An hour a step: the test ends each step's wait itself once it has measured the step
    // (`steer rollout continue`), so however slow the machine, a step never moves mid-pass.
    let config = example(|config| {
        config.releases.retain(|r| r.name == "android");
        clock(config, "android", &steps, 3_600_000, 10);
        no_latency_bound(config, "android");
    });
    let scenario = deploy(&config, &[]);
    let users = users("a", 2000);
    let mut measured: Vec<(usize, f64)> = Vec::new();
    let mut previous: HashSet<&String> = HashSet::new();
    let started = Instant::now();
    loop {
        let now = status(&scenario, "android");
        if now["step"] == 1 {
            // The page shows where the rollout stands.
            let page = http::get(scenario.admin, "/ui/state", &[]).unwrap().body;
            assert!(page.contains("step 2 of 6: 5%"), "{page}");
        }
        match now["phase"].as_str().unwrap() {
            "Succeeded" => break,
            "Progressing" => {}
            other => panic!("{other}: {now:#}"),
        }
        let step = now["step"].as_u64().unwrap() as usize;
        // Every user once, at this step: who reached the canary version? (Once measured, a
        // step that waited for more requests gets another pass of traffic.)
        let paths = pass(&scenario, &users, &[ANDROID]);
        let after = status(&scenario, "android");
        assert_eq!(
            after["stepStartedAt"], now["stepStartedAt"],
            "the step moved while nobody asked"
        );
        if measured.iter().all(|(s, _)| *s != step) {
            let inside: HashSet<&String> = users
                .iter()
                .zip(&paths)
                .filter(|(_, (code, path))| {
                    assert_eq!(*code, 200, "{path}");
                    path.contains("restaurant/v2")
                })
                .map(|(user, _)| user)
                .collect();
            let share = inside.len() as f64 / users.len() as f64 * 100.0;
            assert!(
                (share - steps[step]).abs() <= 3.0,
                "step {step}: {share}% of the users, want {}%",
                steps[step]
            );
            assert!(
                previous.is_subset(&inside),
                "step {step}: users of the last step are out"
            );
            measured.push((step, share));
            previous = inside;
        }
        let analysed = continue_rollout(&scenario, "android");
        assert_ne!(
            analysed["lastAnalysis"]["outcome"], "Failed",
            "{analysed:#}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "stuck: {analysed:#}"
        );
    }
    let seen: Vec<usize> = measured.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seen,
        [0, 1, 2, 3, 4, 5],
        "every step measured: {measured:?}"
    );

    let admin = scenario.admin.to_string();
    let (ok, shown) = steer(&["rollout", "status", "--admin", &admin]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains("android") && shown.contains("Succeeded"),
        "{shown}"
    );
    assert!(shown.contains("promotion proposed"), "{shown}");

    // The promotion a person writes: restaurant v2 becomes primary, the release goes.
    let path = scenario.config_path.display().to_string();
    let (ok, text) = steer(&["rollout", "continue", "android", "--admin", &admin]);
    assert!(!ok && text.contains("not progressing"), "{text}");
    let (ok, text) = steer(&[
        "rollout", "promote", "android", "--config", &path, "--write",
    ]);
    assert!(ok, "{text}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rollouts(&scenario).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the promoted file was not applied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (code, path) in pass(&scenario, &users[..50], &[("x-device", "iphone")]) {
        assert_eq!(code, 200);
        assert_eq!(path, "order/v1 -> restaurant/v2 -> delivery/v1");
    }
}

#[test]
fn a_canary_answering_500_to_5_percent_is_rolled_back_at_the_first_analysis_and_stays_out() {
    let config = example(|config| {
        config.releases.retain(|r| r.name == "android");
        clock(config, "android", &[20.0, 50.0, 100.0], 3000, 20);
        no_latency_bound(config, "android");
    });
    let scenario = deploy(&config, &[("restaurant", "v2", &["--fail-every", "20"])]);
    let android = users("a", 500);
    let load: Load<'_> = &[(&android, &[ANDROID])];
    let now = load_until(&scenario, load, "rolled back", |r| {
        phase_of(r, "android") != "Progressing" || r[0]["step"] != 0
    });
    let rolled = &now[0];
    assert_eq!(rolled["phase"], "RolledBack", "{rolled:#}");
    assert_eq!(rolled["step"], 0, "at the first analysis: {rolled:#}");
    assert_eq!(rolled["percent"], 0.0);
    let analysis = &rolled["lastAnalysis"];
    assert_eq!(analysis["outcome"], "Failed");
    let rate = analysis["errorRate"].as_f64().unwrap();
    assert!((0.03..=0.07).contains(&rate), "{analysis:#}");
    assert!(
        rolled["message"].as_str().unwrap().contains("error rate"),
        "{rolled:#}"
    );

    // The live page lists it as rolled back, with why.
    let page: Value =
        serde_json::from_str(&http::get(scenario.admin, "/ui/state", &[]).unwrap().body).unwrap();
    let row = page["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "android")
        .unwrap();
    assert_eq!(row["verdict"], "rolled-back", "{row:#}");
    assert!(
        row["rollout"].as_str().unwrap().contains("error rate"),
        "{row:#}"
    );

    // No request of the release reaches the canary version any more, and a restarted agent
    // keeps it rolled back.
    let mut scenario = scenario;
    scenario.start_agent().unwrap();
    assert_eq!(status(&scenario, "android")["phase"], "RolledBack");
    let before = requests_to(&scenario, "restaurant", "v2");
    for (code, path) in pass(&scenario, &android, &[ANDROID]) {
        assert_eq!(code, 200, "{path}");
        assert_eq!(path, "order/v1 -> restaurant/v1 -> delivery/v1");
    }
    assert_eq!(requests_to(&scenario, "restaurant", "v2"), before);

    // A person resumes it: the first step again.
    let admin = scenario.admin.to_string();
    let (ok, text) = steer(&["rollout", "resume", "android", "--admin", &admin]);
    assert!(ok, "{text}");
    let resumed = status(&scenario, "android");
    assert_eq!(
        (resumed["phase"].as_str(), resumed["step"].as_u64()),
        (Some("Progressing"), Some(0))
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while pass(&scenario, &android[..100], &[ANDROID])
        .iter()
        .all(|(_, path)| !path.contains("restaurant/v2"))
    {
        assert!(
            Instant::now() < deadline,
            "the resumed step is not in force"
        );
    }
    let (ok, text) = steer(&["rollout", "resume", "android", "--admin", &admin]);
    assert!(!ok && text.contains("not rolled back"), "{text}");
}

#[test]
fn a_canary_slower_than_one_and_a_half_times_the_primarys_p99_is_rolled_back() {
    let config = example(|config| {
        config.releases.retain(|r| r.name == "android");
        clock(config, "android", &[50.0, 100.0], 3000, 20);
    });
    // 200 ms: many times what a busy machine adds to the primary's p99.
    let scenario = deploy(&config, &[("restaurant", "v2", &["--delay-ms", "200"])]);
    let android = users("a", 200);
    let load: Load<'_> = &[(&android, &[ANDROID])];
    let now = load_until(&scenario, load, "rolled back", |r| {
        phase_of(r, "android") != "Progressing"
    });
    let rolled = &now[0];
    assert_eq!(rolled["phase"], "RolledBack", "{rolled:#}");
    let analysis = &rolled["lastAnalysis"];
    assert!(analysis["p99Ratio"].as_f64().unwrap() > 1.5, "{analysis:#}");
    assert!(
        analysis["message"]
            .as_str()
            .unwrap()
            .contains("maxLatencyP99Ratio"),
        "{analysis:#}"
    );
    assert_eq!(analysis["errors"], 0);
}

#[test]
fn two_releases_roll_out_at_once_on_one_chain_one_fails_the_other_goes_on() {
    let config = example(|config| {
        clock(config, "android", &[10.0, 50.0, 100.0], 3000, 10);
        clock(config, "atlantis", &[10.0, 50.0, 100.0], 3000, 10);
        no_latency_bound(config, "android");
        no_latency_bound(config, "atlantis");
    });
    let scenario = deploy(&config, &[("delivery", "v2", &["--fail-every", "10"])]);
    let android = users("a", 300);
    let atlantis = users("b", 300);
    let load: Load<'_> = &[(&android, &[ANDROID]), (&atlantis, &[ATLANTIS])];
    let now = load_until(&scenario, load, "both settled", |r| {
        phase_of(r, "android") == "Succeeded" && phase_of(r, "atlantis") == "RolledBack"
    });
    let atlantis_status = now.iter().find(|r| r["release"] == "atlantis").unwrap();
    assert!(
        atlantis_status["message"]
            .as_str()
            .unwrap()
            .contains("error rate"),
        "{atlantis_status:#}"
    );
    // The healthy one holds at 100% (a file's promotion is proposed), the failed one takes
    // nothing.
    for (code, path) in pass(&scenario, &android[..50], &[ANDROID]) {
        assert_eq!(code, 200, "{path}");
        assert_eq!(path, "order/v1 -> restaurant/v2 -> delivery/v1");
    }
    let before = requests_to(&scenario, "delivery", "v2");
    for (code, path) in pass(&scenario, &atlantis[..100], &[ATLANTIS]) {
        assert_eq!(code, 200, "{path}");
        assert_eq!(path, "order/v1 -> restaurant/v1 -> delivery/v1");
    }
    assert_eq!(requests_to(&scenario, "delivery", "v2"), before);
}

/// The agent's rollout state file, as the agent keeps it next to its configuration.
fn state_file(scenario: &Scenario) -> PathBuf {
    PathBuf::from(format!("{}.rollouts.json", scenario.config_path.display()))
}

/// Restarts the agent after `edit` changed its state file (while it was stopped).
fn restart_with_state(scenario: &mut Scenario, edit: impl FnOnce(&std::path::Path)) {
    scenario.agent = None;
    edit(&state_file(scenario));
    scenario.start_agent().unwrap();
}

/// Users of `users` whose requests reached restaurant v2, the canary.
fn canary_share(scenario: &Scenario, users: &[String]) -> f64 {
    let paths = pass(scenario, users, &[ANDROID]);
    let inside = paths
        .iter()
        .filter(|(code, path)| {
            assert_eq!(*code, 200, "{path}");
            path.contains("restaurant/v2")
        })
        .count();
    inside as f64 / users.len() as f64 * 100.0
}

#[test]
fn the_rollout_state_file_is_trusted_no_further_than_it_can_be_checked() {
    let config = example(|config| {
        config.releases.retain(|r| r.name == "android");
        clock(config, "android", &[20.0, 50.0, 100.0], 3_600_000, 10);
        no_latency_bound(config, "android");
    });
    let mut scenario = deploy(&config, &[]);
    let users = users("a", 1000);
    assert!((canary_share(&scenario, &users) - 20.0).abs() <= 4.0);

    // Written through no link: a symlink planted at the name the agent once wrote its
    // temporary file under (or any other) is left alone, and so is what it points to.
    let state = state_file(&scenario);
    let victim = state.with_file_name("victim");
    std::fs::write(&victim, "precious").unwrap();
    restart_with_state(&mut scenario, |state| {
        std::os::unix::fs::symlink(&victim, state.with_extension("json.partial")).unwrap();
    });
    let admin = scenario.admin.to_string();
    let (ok, text) = steer(&["rollout", "continue", "android", "--admin", &admin]);
    assert!(ok, "{text}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&scenario, "android")["step"] != 1 {
        assert!(Instant::now() < deadline, "no step after continue");
        pass(&scenario, &users[..100], &[ANDROID]);
        steer(&["rollout", "continue", "android", "--admin", &admin]);
    }
    // Saved (just after it is shown), and not through the link.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kept: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        if kept["android"]["step"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not saved: {kept:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    // The share comes from the rollout's steps, never from the file's figure.
    restart_with_state(&mut scenario, |state| {
        let mut kept: Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
        kept["android"]["percent"] = 100.0.into();
        std::fs::write(state, kept.to_string()).unwrap();
    });
    let share = canary_share(&scenario, &users);
    assert!(
        (share - 50.0).abs() <= 5.0,
        "{share}% of the users, want 50%"
    );

    // A step the rollout does not have holds the release at 0%, and never stops the agent.
    restart_with_state(&mut scenario, |state| {
        let mut kept: Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
        kept["android"]["step"] = 99.into();
        kept["android"]["percent"] = 1e9.into();
        std::fs::write(state, kept.to_string()).unwrap();
    });
    let held = status(&scenario, "android");
    assert_eq!(held["phase"], "RolledBack", "{held:#}");
    assert!(
        held["message"].as_str().unwrap().contains("step 100"),
        "{held:#}"
    );
    assert_eq!(canary_share(&scenario, &users), 0.0);

    // A rolled-back release whose state file is damaged stays out of traffic: held, with the
    // reason, the damaged file kept aside.
    let (ok, text) = steer(&["rollout", "resume", "android", "--admin", &admin]);
    assert!(ok, "{text}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while canary_share(&scenario, &users[..200]) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the resumed step is not in force"
        );
    }
    let damaged = std::cell::RefCell::new(Vec::new());
    restart_with_state(&mut scenario, |state| {
        let mut bytes = std::fs::read(state).unwrap();
        bytes[1] = b'#';
        std::fs::write(state, &bytes).unwrap();
        *damaged.borrow_mut() = bytes;
    });
    let held = status(&scenario, "android");
    assert_eq!(held["phase"], "RolledBack", "{held:#}");
    assert!(
        held["message"].as_str().unwrap().contains("unreadable"),
        "{held:#}"
    );
    assert_eq!(canary_share(&scenario, &users), 0.0);
    let dir = state.parent().unwrap();
    let aside: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.display()
                .to_string()
                .contains(".rollouts.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), *damaged.borrow());
}

#[test]
fn an_aborted_rollout_sends_its_users_to_the_primary_until_resumed() {
    let config = example(|config| {
        config.releases.retain(|r| r.name == "android");
        clock(config, "android", &[20.0, 50.0, 100.0], 3_600_000, 10);
        no_latency_bound(config, "android");
    });
    let scenario = deploy(&config, &[]);
    let users = users("a", 500);
    assert!(canary_share(&scenario, &users) > 10.0);
    let admin = scenario.admin.to_string();
    let (ok, text) = steer(&["rollout", "abort", "android", "--admin", &admin]);
    assert!(ok, "{text}");
    let aborted = status(&scenario, "android");
    assert_eq!(aborted["phase"], "Aborted", "{aborted:#}");
    assert!(
        aborted["message"]
            .as_str()
            .unwrap()
            .contains("steer rollout abort"),
        "{aborted:#}"
    );
    // In force at once (the next reload): nobody reaches the canary.
    let deadline = Instant::now() + Duration::from_secs(60);
    while canary_share(&scenario, &users) > 0.0 {
        assert!(Instant::now() < deadline, "the abort is not in force");
    }
    let page = http::get(scenario.admin, "/ui/state", &[]).unwrap().body;
    assert!(page.contains("\"verdict\":\"aborted\""), "{page}");
    let (ok, text) = steer(&["rollout", "abort", "android", "--admin", &admin]);
    assert!(!ok && text.contains("takes no traffic"), "{text}");
    // Resumed: the first step again.
    let (ok, text) = steer(&["rollout", "resume", "android", "--admin", &admin]);
    assert!(ok, "{text}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while canary_share(&scenario, &users) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the resumed step is not in force"
        );
    }
    assert_eq!(status(&scenario, "android")["step"], 0);
}
