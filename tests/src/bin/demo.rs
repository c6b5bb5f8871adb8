//! `steer-demo` (run by `cargo xtask demo`): the seed's case studies live on a simulated node.
//!
//! For each scenario it deploys a pod per service version (the demo service), starts the real
//! `steer run` agent with the fixture's rules (eBPF redirect + node proxy), sends requests
//! through the gateway for each combination of user tags, and prints the path of versions each
//! request took and its release, checked against `steer explain`'s answer hop by hop. The food
//! delivery scenario then edits the rules live. Everything is removed afterwards, also on
//! Ctrl-C; a wrong path fails the demo.
//!
//! The rollout scenario (`--scenario rollout`, also part of the full run) rolls two releases
//! out at once on the food-delivery chain with the clocks shortened to seconds: a healthy one
//! walks every step while the terminal shows its step, the share of users it takes and its
//! error rate; the other, whose delivery version fails one request in ten, is rolled back at
//! its first analysis.
//!
//! `--stay` then deploys the food-delivery scenario once more with traffic flowing, prints the
//! address of the agent's live page and keeps the node running until Ctrl-C. `--screenshot
//! FILE` does the same without the scenarios and writes a PNG of the page (headless chromium).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use steer::{config::Config, rules::HeaderPairs, state::Snapshot};
use steer_tests::{
    Node, browser, http,
    scenario::{Hop, Scenario, remap},
};

/// One of the seed's case studies.
struct Demo {
    name: &'static str,
    title: &'static str,
    file: &'static str,
    /// Who calls whom; requests enter at each `entries` service.
    calls: &'static [(&'static str, &'static [&'static str])],
    entries: &'static [&'static str],
    tags: &'static [&'static [(&'static str, &'static str)]],
    /// A misconfigured variant: shown rejected by the checker and by the running agent.
    broken: &'static str,
}

const ANDROID: (&str, &str) = ("x-device", "android");
const IPHONE: (&str, &str) = ("x-device", "iphone");
const ATLANTIS: (&str, &str) = ("x-region", "atlantis");

const DEMOS: [Demo; 3] = [
    Demo {
        name: "food-delivery",
        title: "Seed section 5: food delivery, three overlapping canaries",
        file: "food-delivery.yaml",
        calls: &[("order", &["restaurant"]), ("restaurant", &["delivery"])],
        entries: &["order"],
        tags: &[
            &[],
            &[ATLANTIS],
            &[ANDROID],
            &[ANDROID, ATLANTIS],
            &[IPHONE],
            &[IPHONE, ATLANTIS],
        ],
        broken: "food-delivery-shadowed.yaml",
    },
    Demo {
        name: "order-email",
        title: "Seed section 3: order -> email, two teams' canaries at once",
        file: "order-email.yaml",
        calls: &[("order", &["email"])],
        entries: &["order"],
        tags: &[&[], &[ANDROID], &[ATLANTIS], &[ANDROID, ATLANTIS]],
        broken: "order-email-ambiguous.yaml",
    },
    Demo {
        name: "abz",
        title: "Seed section 4: A and B call Z; each canary has its own Z",
        file: "abz.yaml",
        calls: &[("a", &["z"]), ("b", &["z"])],
        entries: &["a", "b"],
        tags: &[&[], &[ANDROID], &[IPHONE]],
        broken: "abz-conflict.yaml",
    },
];

fn label(tags: &[(&str, &str)]) -> String {
    if tags.is_empty() {
        return "(no tags)".to_string();
    }
    tags.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `steer explain` says each hop of `hop`'s path should be.
fn expected(snapshot: &Snapshot, hop: &Hop, tags: &[(&str, &str)]) -> String {
    let tags = HeaderPairs::new(tags.iter().copied());
    hop.flatten()
        .iter()
        .map(|h| {
            let version = snapshot
                .explain(&h.service, &tags)
                .map_or("?".to_string(), |e| e.version);
            format!("{}/{version}", h.service)
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// Sends every tag combination to every entry and prints the table; errors on a wrong path.
fn table(scenario: &Scenario, demo: &Demo, config: &Config) -> Result<()> {
    let (snapshot, _) = Snapshot::build(config.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("  {:<38} {:<56} release", "user tags", "path taken");
    for entry in demo.entries {
        for tags in demo.tags {
            let hop = scenario.request(entry, tags)?;
            let hops = hop.flatten();
            if let Some(failed) = hops.iter().find(|h| h.error.is_some()) {
                bail!("{}: {:?}", failed.service, failed.error);
            }
            let release = hops[0].release.clone();
            if hops.iter().any(|h| h.release != release) {
                bail!("a request saw two releases: {hop:?}");
            }
            let path = hop.path();
            let want = expected(&snapshot, &hop, tags);
            println!(
                "  {:<38} {:<56} {}",
                label(tags),
                path,
                release.as_deref().unwrap_or("(primary)")
            );
            if path != want {
                bail!(
                    "wrong path for {}: {path}, steer explain says {want}",
                    label(tags)
                );
            }
        }
    }
    Ok(())
}

fn check(steer: &Path, file: &Path) -> Result<()> {
    let output = Command::new(steer)
        .args(["check", "--config", &file.display().to_string()])
        .output()
        .context("run steer check")?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        println!("  {line}");
    }
    Ok(())
}

/// Replaces the running agent's configuration file and gives the agent time to react.
fn edit(scenario: &Scenario, text: &str) -> Result<Config> {
    std::fs::write(&scenario.config_path, text)?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(Config::from_yaml(text, "edit")?)
}

fn run(root: &Path, steer: &Path, demo: &Demo) -> Result<()> {
    let examples = root.join("deploy/examples");
    println!("\n=== {} ===\n", demo.title);
    check(steer, &examples.join(demo.file))?;
    let scenario = Scenario::deploy(&examples.join(demo.file), demo.calls, Node::new()?)?;
    println!(
        "\n  node {}: {} pods, steer run with {} (eBPF redirect + proxy)\n",
        scenario.node.name,
        scenario
            .config
            .services
            .iter()
            .map(|s| s.versions.len())
            .sum::<usize>(),
        demo.file
    );
    table(&scenario, demo, &scenario.config)?;

    println!(
        "\n  A misconfiguration ({}), as `steer check` sees it:",
        demo.broken
    );
    check(steer, &examples.join(demo.broken))?;
    let original = std::fs::read_to_string(&scenario.config_path)?;
    let broken = remap(
        &std::fs::read_to_string(examples.join(demo.broken))?,
        &scenario.node,
    );
    edit(&scenario, &broken)?;
    println!("\n  Written to the running agent's file: rejected, the previous rules keep serving:");
    table(&scenario, demo, &scenario.config)?;

    if demo.name == "food-delivery" {
        // A valid live edit: retire the red canary. Android users in Atlantis fall to blue.
        let mut without_red = scenario.config.clone();
        without_red.releases.retain(|r| r.name != "red");
        let text = serde_yaml_ng::to_string(&without_red)?;
        let applied = edit(&scenario, &text)?;
        println!("\n  Live edit: the red release removed (applied within 100 ms, no restart):");
        table(&scenario, demo, &applied)?;
        let restored = edit(&scenario, &original)?;
        println!("\n  Restored:");
        table(&scenario, demo, &restored)?;
    }
    Ok(())
}

/// Requests of one population of users in the rollout demo since the last line printed.
#[derive(Default)]
struct Seen {
    requests: usize,
    /// Reached the release's version (a failed request counts: only that version fails).
    canary: usize,
    failed: usize,
}

/// Android users (the `android` release) and Atlantis users (`atlantis`), sent in turn by four
/// threads until `stop`: what each population saw.
fn rollout_traffic(gateway: SocketAddr, stop: Arc<AtomicBool>) -> Arc<Mutex<[Seen; 2]>> {
    let seen = Arc::new(Mutex::new([Seen::default(), Seen::default()]));
    let next_user = Arc::new(AtomicUsize::new(0));
    for _ in 0..4 {
        let (seen, next_user, stop) = (seen.clone(), next_user.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = next_user.fetch_add(1, Ordering::Relaxed);
                // 2,000 users of each population, over and over.
                let (population, tag, canary) = match n % 2 {
                    0 => (0, ANDROID, "restaurant/v2"),
                    _ => (1, ATLANTIS, "delivery/v2"),
                };
                let user = format!("user-{}", n / 2 % 2000);
                let headers = [("host", "order"), tag, ("x-user-id", user.as_str())];
                let Ok(reply) = http::get(gateway, "/", &headers) else {
                    continue;
                };
                let reached = match serde_json::from_str::<Hop>(&reply.body) {
                    Ok(hop) => reply.status != 200 || hop.path().contains(canary),
                    Err(_) => true,
                };
                let mut seen = seen.lock().unwrap();
                let seen = &mut seen[population];
                seen.requests += 1;
                seen.canary += usize::from(reached);
                seen.failed += usize::from(reply.status != 200);
            }
        });
    }
    seen
}

/// Two rollouts at once, shown live: one walks every step, one is rolled back.
fn rollout(root: &Path, steer: &Path) -> Result<()> {
    println!("\n=== Progressive rollout: two releases at once, each on its own clock ===\n");
    let file = root.join("deploy/examples/rollout.yaml");
    check(steer, &file)?;
    let mut config = Config::load(&file)?;
    // Seconds instead of minutes, and steps a few hundred requests a second can judge.
    for release in &mut config.releases {
        let rollout = release.rollout.as_mut().context("the example rolls out")?;
        rollout.interval = Duration::from_secs(3);
        rollout.analysis.min_requests = 10;
        // A few hundred requests an interval on a shared machine: one request the scheduler
        // delays is the p99. The ratio is still shown.
        rollout.analysis.max_latency_p99_ratio = None;
        if release.name == "android" {
            rollout.steps = vec![10.0, 25.0, 50.0, 100.0];
        }
    }
    let text = serde_yaml_ng::to_string(&config)?;
    let faulty: &[(&str, &str, &[&str])] = &[("delivery", "v2", &["--fail-every", "10"])];
    let scenario = Scenario::deploy_text(&text, DEMOS[0].calls, faulty, Node::new()?)?;
    println!(
        "\n  node {}: rollout.yaml with 3 s intervals; delivery v2 (the atlantis release's \
         version) fails one request in ten\n",
        scenario.node.name
    );
    let stop = Arc::new(AtomicBool::new(false));
    let seen = rollout_traffic(scenario.gateway, stop.clone());
    println!(
        "  {:>5}  {:<9} {:<12} {:>5}  {:>11}  {:>10}  last analysis",
        "t", "release", "phase", "step", "users in", "errors"
    );
    let started = Instant::now();
    let outcome = loop {
        std::thread::sleep(Duration::from_millis(1000));
        let reply = http::get(scenario.admin, "/rollouts", &[])?;
        let rollouts: Vec<serde_json::Value> = serde_json::from_str(&reply.body)?;
        let window = std::mem::take(&mut *seen.lock().unwrap());
        for (population, status) in rollouts.iter().enumerate() {
            let seen = &window[population.min(1)];
            let share = |n: usize| 100.0 * n as f64 / seen.requests.max(1) as f64;
            println!(
                "  {:>4.0}s  {:<9} {:<12} {:>5}  {:>5.1}% /{:>3}%  {:>9.1}%  {}",
                started.elapsed().as_secs_f64(),
                status["release"].as_str().unwrap_or(""),
                status["phase"].as_str().unwrap_or(""),
                format!(
                    "{}/{}",
                    status["step"].as_u64().unwrap_or(0) + 1,
                    status["steps"].as_array().map_or(0, Vec::len)
                ),
                share(seen.canary),
                status["percent"],
                share(seen.failed),
                status["lastAnalysis"]["message"].as_str().unwrap_or("-"),
            );
        }
        let phase = |release: &str| {
            rollouts
                .iter()
                .find(|r| r["release"] == release)
                .and_then(|r| r["phase"].as_str())
                .unwrap_or("")
                .to_string()
        };
        match (phase("android").as_str(), phase("atlantis").as_str()) {
            ("Succeeded", "RolledBack") => break Ok(()),
            // The demo shows real steps on real clocks; a busy machine only makes it slower.
            _ if started.elapsed() > Duration::from_secs(300) => {
                break Err(anyhow::anyhow!(
                    "the rollouts did not settle in five minutes: {rollouts:#?}"
                ));
            }
            _ => {}
        }
    };
    stop.store(true, Ordering::Relaxed);
    outcome?;
    let status = Command::new(steer)
        .args(["rollout", "status", "--admin", &scenario.admin.to_string()])
        .output()
        .context("run steer rollout status")?;
    println!("\n  steer rollout status:");
    for line in String::from_utf8_lossy(&status.stdout).lines() {
        println!("  {line}");
    }
    println!(
        "\n  android walked every step and waits for `steer rollout promote android --config F \
         --write`;\n  atlantis was rolled back at its first analysis and takes no traffic until \
         `steer rollout resume atlantis`."
    );
    Ok(())
}

#[derive(Parser)]
#[command(about = "The seed's case studies on a simulated node, checked against `steer explain`")]
struct Args {
    /// Run only this scenario: food-delivery, order-email, abz or rollout.
    #[arg(long)]
    scenario: Option<String>,
    /// Afterwards, keep the food-delivery node running with traffic flowing, and print the
    /// address of the agent's live page; Ctrl-C removes everything.
    #[arg(long)]
    stay: bool,
    /// Only write a PNG of the live page with the demo's traffic to this file.
    #[arg(long, conflicts_with_all = ["scenario", "stay"])]
    screenshot: Option<PathBuf>,
}

/// The tags of the demo's steady traffic, with how many requests of each per round: most
/// untagged, some for every release.
const TRAFFIC: [(&[(&str, &str)], usize); 5] = [
    (&[], 6),
    (&[ATLANTIS], 4),
    (&[ANDROID], 3),
    (&[ANDROID, ATLANTIS], 2),
    (&[IPHONE, ATLANTIS], 1),
];

/// Sends the demo's traffic mix to `order` through `gateway`, about 30 requests a second,
/// until the process exits.
fn keep_traffic_flowing(gateway: SocketAddr) {
    std::thread::spawn(move || {
        loop {
            for (tags, count) in TRAFFIC {
                for _ in 0..count {
                    let mut headers = vec![("host", "order")];
                    headers.extend_from_slice(tags);
                    // A failed request shows on the page; the demo goes on.
                    let _ = http::get(gateway, "/", &headers);
                    std::thread::sleep(Duration::from_millis(30));
                }
            }
        }
    });
}

/// The food-delivery node with steady traffic: (scenario, the live page's address). The page
/// opens with the explain box asking for an Android user in Atlantis.
fn live(root: &Path) -> Result<(Scenario, String)> {
    let demo = &DEMOS[0];
    let file = root.join("deploy/examples").join(demo.file);
    let scenario = Scenario::deploy(&file, demo.calls, Node::new()?)?;
    keep_traffic_flowing(scenario.gateway);
    let url = format!(
        "http://{}/?header=x-device%3A%20android&header=x-region%3A%20atlantis",
        scenario.admin
    );
    Ok((scenario, url))
}

fn stay(root: &Path) -> Result<()> {
    let (scenario, url) = live(root)?;
    println!(
        "\n=== The live page ===\n\n  {url}\n\n  The food-delivery node keeps running with traffic \
         flowing (node {}; agent admin on {}).\n  Open the address above in a browser on this \
         machine (from another one: ssh -L 15000:{} this-machine, then http://localhost:15000/).\n  \
         Ctrl-C removes everything.",
        scenario.node.name, scenario.admin, scenario.admin
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn screenshot(root: &Path, out: &Path) -> Result<()> {
    let (_scenario, url) = live(root)?;
    // Rates are over the last ten seconds: let the window fill.
    std::thread::sleep(Duration::from_secs(11));
    browser::screenshot(&url, out, 1280, 1240)?;
    println!("demo: wrote {}", out.display());
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    steer_tests::node::tear_down_on_signals()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf();
    // Built together with this binary by `cargo xtask demo`.
    let steer = std::env::current_exe()?
        .parent()
        .context("the demo binary has a directory")?
        .join("steer");
    if let Some(out) = &args.screenshot {
        return screenshot(&root, out);
    }
    let only = args.scenario.as_deref();
    let chosen: Vec<&Demo> = DEMOS
        .iter()
        .filter(|d| only.is_none_or(|name| name == d.name))
        .collect();
    let with_rollout = only.is_none_or(|name| name == "rollout");
    if chosen.is_empty() && !with_rollout {
        bail!("unknown scenario {only:?}: food-delivery, order-email, abz or rollout");
    }
    for scenario in &chosen {
        run(&root, &steer, scenario)?;
    }
    if !chosen.is_empty() {
        println!("\ndemo: every path matched `steer explain`");
    }
    if with_rollout {
        rollout(&root, &steer)?;
    }
    if args.stay {
        stay(&root)?;
    }
    Ok(())
}
