//! Progressive rollouts on Kubernetes, end to end: `steer run --kubernetes` on a test bed routes
//! at the step each CanaryRelease's status holds; the status writer analyses every step over a
//! real Prometheus (Debian's, scraping the agent every second) and writes the next one; a new
//! writer continues from the stored step; a failing canary rolls back and resumes on its
//! annotation; a release that succeeds is promoted by switching its Service's primary version.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use steer::{
    config::{Config, Release},
    kubernetes::{self, KubernetesOptions, prometheus::Prometheus},
    metrics::Metrics,
    rollout::{Phase, RolloutStatus, driver::Rollouts},
};
use steer_tests::{
    Node, Process,
    apiserver::{ApiServer, objects_from_config},
    http,
    scenario::{Cluster, Scenario},
};

/// Debian's package (`cargo xtask setup` installs it).
const PROMETHEUS: &str = "/usr/bin/prometheus";
const CHAIN: &[(&str, &[&str])] = &[("order", &["restaurant"])];
const RELEASE: &str = "kitchen";

/// Order calls restaurant; the release `kitchen` rolls restaurant v2 out to Android users,
/// a step every `interval`.
fn fixture(steps: &str, interval: &str) -> String {
    format!(
        r#"
services:
  - name: order
    addresses: ["10.96.0.10:80"]
    versions:
      - {{ name: v1, primary: true, endpoints: ["10.244.1.10:8080"] }}
  - name: restaurant
    addresses: ["10.96.0.20:80"]
    versions:
      - {{ name: v1, primary: true, endpoints: ["10.244.1.20:8080"] }}
      - {{ name: v2, endpoints: ["10.244.1.21:8080"] }}
releases:
  - name: {RELEASE}
    priority: 1
    match: [{{ header: x-device, exact: android }}]
    hashBy: x-user-id
    targets: {{ restaurant: v2 }}
    rollout:
      steps: {steps}
      interval: {interval}
      analysis: {{ minRequests: 10, maxErrorRate: 5% }}
      onSuccess: promote
"#
    )
}

/// A Prometheus of its own: a temporary configuration and storage, a free loopback port,
/// scraping `target` every second. Killed (by its pid) and removed on drop.
struct PrometheusServer {
    process: Option<Process>,
    url: String,
    dir: PathBuf,
}

impl PrometheusServer {
    fn start(target: SocketAddr) -> PrometheusServer {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: `cargo xtask setup` installs Debian's prometheus"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("steer-prometheus-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: steer\n    \
                 static_configs: [{{targets: [\"{target}\"]}}]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let mut command = Command::new(PROMETHEUS);
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log);
        let server = PrometheusServer {
            process: Some(Process::start_on_host(&mut command, None).unwrap()),
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for("Prometheus to be ready", Duration::from_secs(120), || {
            http::get(address, "/-/ready", &[])
                .ok()
                .filter(|r| r.status == 200)
        });
        server
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Android users (a thousand of them) asking for order, one request every few milliseconds,
/// until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    fn start(scenario: &Scenario) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (gateway, host) = (scenario.gateway, scenario.mesh_name("order"));
        let running = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut user = 0u32;
            while !running.load(Ordering::Relaxed) {
                user = (user + 1) % 1000;
                let user_id = format!("user-{user}");
                let headers = [
                    ("host", host.as_str()),
                    ("x-device", "android"),
                    ("x-user-id", user_id.as_str()),
                ];
                let _ = http::get(gateway, "/", &headers);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(started.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the agent's metrics listener is (`--metrics` with a bare IP).
const METRICS_PORT: u16 = 15090;

/// The fixture on a bed whose agent reads Prometheus; `canary_args` for restaurant v2's
/// demo service (`--fail-every N`).
fn deploy(
    steps: &str,
    interval: &str,
    canary_args: &[&str],
    prometheus: &PrometheusServer,
    node: Node,
) -> Scenario {
    // As the DaemonSet runs it: Prometheus scrapes the metrics listener on the node's
    // address; the admin server stays where the test bed puts it.
    let args = vec![
        "--prometheus-url".to_string(),
        prometheus.url.clone(),
        "--metrics".to_string(),
        node.address.to_string(),
    ];
    let versions: &[(&str, &str, &[&str])] = &[("restaurant", "v2", canary_args)];
    Scenario::deploy_kubernetes_text(&fixture(steps, interval), CHAIN, versions, args, node)
        .unwrap()
}

fn server(scenario: &Scenario) -> Arc<ApiServer> {
    scenario.kubernetes.as_ref().unwrap().server.clone()
}

/// The release's CanaryRelease as the API server holds it.
fn release_object(server: &ApiServer) -> Value {
    server
        .object("CanaryRelease", Cluster::NAMESPACE, RELEASE)
        .unwrap()
}

fn rollout(server: &ApiServer) -> Value {
    release_object(server)["status"]["rollout"].clone()
}

/// The release's percent in the configuration the agent has in force; `None` when the rules
/// leave it out.
fn percent_in_force(scenario: &Scenario) -> Option<f64> {
    let config: Value =
        serde_json::from_str(&http::get(scenario.admin, "/config", &[]).unwrap().body).unwrap();
    let name = format!("{}/{RELEASE}", Cluster::NAMESPACE);
    let release = config["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)?
        .clone();
    release["percent"].as_f64()
}

fn annotate(server: &ApiServer, key: &str, value: &str) {
    server.annotate("CanaryRelease", Cluster::NAMESPACE, RELEASE, key, value);
}

/// Ends the wait of the rollout's step (a new value of the continue annotation each time the
/// status writer noted the last one: an analysis that found too few requests waits) until
/// `reached` holds of the rollout's status, which is returned.
fn continue_until(server: &ApiServer, what: &str, reached: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    let mut asked: Option<String> = None;
    loop {
        let status = release_object(server)["status"].clone();
        if reached(&status["rollout"]) {
            return status["rollout"].clone();
        }
        let noted = status["rolloutContinue"].as_str().map(str::to_string);
        if asked.is_none() || noted == asked {
            let next = noted.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0) + 1;
            annotate(server, "steer.dev/rollout-continue", &next.to_string());
            asked = Some(next.to_string());
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "waited for {what}: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every rollout status written, as (phase, step), in order, repeats folded.
fn written_steps(server: &ApiServer) -> Vec<(String, u64)> {
    let mut steps: Vec<(String, u64)> = server
        .patches()
        .into_iter()
        .filter_map(|(_, status)| {
            let rollout = status.get("rollout")?;
            Some((
                rollout["phase"].as_str()?.to_string(),
                rollout["step"].as_u64()?,
            ))
        })
        .collect();
    steps.dedup();
    steps
}

/// An agent of another node, run in this process until dropped.
struct OtherAgent {
    _runtime: tokio::runtime::Runtime,
    _drain: steer::drain::DrainTrigger,
}

/// The Kubernetes source of an agent named `identity` that applies nothing: what its status
/// writer does, without a node.
fn source_alone(
    client: kube::Client,
    identity: &str,
    prometheus: Option<Prometheus>,
    drain: steer::drain::Drain,
) -> impl std::future::Future<Output = ()> + use<> {
    let options = KubernetesOptions {
        version_label: "version".into(),
        identity: identity.into(),
        lease_namespace: "steer-system".into(),
        cgroup_root: None,
        prometheus,
    };
    kubernetes::run(
        client,
        options,
        Box::new(|_| Ok(())),
        Box::new(|_| {}),
        Arc::new(Rollouts::kept_in_cluster()),
        Arc::new(Metrics::default()),
        drain,
    )
}

/// Another agent (`node-2`), in this process, wins the status writer's Lease from the bed's
/// agent, which goes on routing as a follower.
fn take_over(server: &Arc<ApiServer>, prometheus: &PrometheusServer) -> OtherAgent {
    {
        let mut state = server.state.lock().unwrap();
        state.resource_version += 1;
        let version = state.resource_version.to_string();
        let lease = state
            .lease
            .as_mut()
            .expect("the bed's agent holds the lease");
        lease["spec"]["holderIdentity"] = json!("node-2");
        lease["spec"]["renewTime"] = json!(jiff::Timestamp::now().to_string());
        lease["metadata"]["resourceVersion"] = json!(version);
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (trigger, drain) = steer::drain::channel();
    // The client spawns its task on the runtime it is made in.
    let client = {
        let _entered = runtime.enter();
        server.client()
    };
    let prometheus = Some(Prometheus::new(&prometheus.url).unwrap());
    runtime.spawn(source_alone(client, "node-2", prometheus, drain));
    OtherAgent {
        _runtime: runtime,
        _drain: trigger,
    }
}

#[test]
fn a_rollout_walks_its_steps_across_a_leader_change_and_is_promoted() {
    let node = Node::new().unwrap();
    let prometheus = PrometheusServer::start(SocketAddr::from((node.address, METRICS_PORT)));
    // Each step lasts as long as the test needs: it asks for every analysis (the continue
    // annotation), so a slow machine makes the test slower, never wrong.
    let scenario = deploy("[20, 50, 100]", "1h", &[], &prometheus, node);
    // The metrics listener answers what Prometheus and the kubelet ask, and nothing else.
    let metrics = SocketAddr::from((scenario.node.address, METRICS_PORT));
    for (path, status) in [
        ("/metrics", 200),
        ("/readyz", 200),
        ("/config", 404),
        ("/", 404),
    ] {
        assert_eq!(
            http::get(metrics, path, &[]).unwrap().status,
            status,
            "{path}"
        );
    }
    let server = server(&scenario);
    let traffic = Traffic::start(&scenario);

    // The first step, then the second: the agent routes at the step the status holds.
    wait_for("the first step in force", Duration::from_secs(60), || {
        (percent_in_force(&scenario) == Some(20.0)).then_some(())
    });
    let second = continue_until(&server, "the second step", |r| r["step"] == 1);
    assert_eq!(second["percent"], 50.0, "{second}");
    assert_eq!(second["lastAnalysis"]["outcome"], "Passed", "{second}");
    // Figures from Prometheus: the release's requests and latency, and the primaries'.
    let analysis = &second["lastAnalysis"];
    assert!(analysis["requests"].as_u64().unwrap() >= 10, "{second}");
    assert!(
        analysis["primaryRequests"].as_u64().unwrap() > 0,
        "{second}"
    );
    assert!(
        analysis["p99"].as_f64().is_some() && analysis["primaryP99"].as_f64().is_some(),
        "{second}"
    );
    wait_for("the second step in force", Duration::from_secs(60), || {
        (percent_in_force(&scenario) == Some(50.0)).then_some(())
    });
    // The admin API shows where it stands, as the status has it.
    let views: Value =
        serde_json::from_str(&http::get(scenario.admin, "/rollouts", &[]).unwrap().body).unwrap();
    let view = views
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["release"] == format!("{}/{RELEASE}", Cluster::NAMESPACE))
        .unwrap_or_else(|| panic!("{views}"));
    assert_eq!(
        (&view["step"], &view["percent"]),
        (&json!(1), &json!(50.0)),
        "{view}"
    );

    // Another agent takes the lease: it continues from the stored step, never from the first.
    let written_before = server.patches().len();
    let _node_2 = take_over(&server, &prometheus);
    let promoted = continue_until(&server, "the promotion", |r| r["phase"] == "Promoted");
    let after: Vec<u64> = server.patches()[written_before..]
        .iter()
        .filter_map(|(_, status)| status.get("rollout")?["step"].as_u64())
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|step| *step >= 1),
        "after the leader change: {after:?}"
    );
    let lease = server.state.lock().unwrap().lease.clone().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "node-2", "{lease}");
    let written = written_steps(&server);
    let progressing: Vec<u64> = written
        .iter()
        .filter(|(phase, _)| phase == "Progressing")
        .map(|(_, step)| *step)
        .collect();
    assert_eq!(progressing, [0, 1, 2], "{written:?}");
    assert_eq!(
        written[written.len() - 2..],
        [("Succeeded".to_string(), 2), ("Promoted".to_string(), 2)],
        "{written:?}"
    );
    assert_eq!(promoted["percent"], 0.0, "{promoted}");

    // Promotion switched the Service's primary version; the release takes no traffic of its
    // own, and everyone gets v2.
    let service = server
        .object("Service", Cluster::NAMESPACE, "restaurant")
        .unwrap();
    assert_eq!(
        service["metadata"]["annotations"]["steer.dev/primary-version"],
        "v2"
    );
    drop(traffic);
    wait_for("v2 to be everyone's", Duration::from_secs(60), || {
        let hop = scenario.request("order", &[]).ok()?;
        (hop.path() == "order/v1 -> restaurant/v2").then_some(())
    });
    assert_eq!(percent_in_force(&scenario), None);
    let android = scenario
        .request("order", &[("x-device", "android"), ("x-user-id", "u1")])
        .unwrap();
    assert_eq!(android.path(), "order/v1 -> restaurant/v2");
    assert_eq!(android.release, None);
    let verdict = wait_for("the Promoted verdict", Duration::from_secs(60), || {
        let status = release_object(&server)["status"].clone();
        (status["conditions"][0]["reason"] == "Promoted").then_some(status)
    });
    assert_eq!(verdict["state"], "Accepted", "{verdict}");
}

#[test]
fn a_failing_canary_rolls_back_and_resumes_on_its_annotation() {
    let node = Node::new().unwrap();
    let prometheus = PrometheusServer::start(SocketAddr::from((node.address, METRICS_PORT)));
    // Restaurant v2 answers every other request with a 500.
    let scenario = deploy("[50, 100]", "3s", &["--fail-every", "2"], &prometheus, node);
    let server = server(&scenario);
    let traffic = Traffic::start(&scenario);
    let rolled_back = wait_for("the rollback", Duration::from_secs(120), || {
        let rollout = rollout(&server);
        (rollout["phase"] == "RolledBack").then_some(rollout)
    });
    drop(traffic);
    assert_eq!(rolled_back["percent"], 0.0, "{rolled_back}");
    assert_eq!(rolled_back["step"], 0, "{rolled_back}");
    assert!(rolled_back.get("nextAnalysisAt").is_none(), "{rolled_back}");
    let analysis = &rolled_back["lastAnalysis"];
    assert_eq!(analysis["outcome"], "Failed", "{rolled_back}");
    assert!(
        analysis["errors"].as_u64().unwrap() > 0
            && analysis["message"]
                .as_str()
                .unwrap()
                .contains("above maxErrorRate 5.00%"),
        "{rolled_back}"
    );
    // Out of the rules: Android users are back on v1.
    wait_for(
        "the release out of the rules",
        Duration::from_secs(60),
        || percent_in_force(&scenario).is_none().then_some(()),
    );
    let hop = scenario
        .request("order", &[("x-device", "android"), ("x-user-id", "u1")])
        .unwrap();
    assert_eq!(
        (hop.path().as_str(), hop.release),
        ("order/v1 -> restaurant/v1", None)
    );

    // A person resumes it: the first step again, and the value is noted.
    annotate(&server, "steer.dev/rollout-resume", "fixed-500s");
    let resumed = wait_for("the resume", Duration::from_secs(60), || {
        let status = release_object(&server)["status"].clone();
        (status["rolloutResume"] == "fixed-500s").then_some(status)
    });
    let rollout = &resumed["rollout"];
    assert_eq!(
        (&rollout["phase"], &rollout["step"], &rollout["percent"]),
        (&json!("Progressing"), &json!(0), &json!(50.0)),
        "{resumed}"
    );
    wait_for(
        "the first step in force again",
        Duration::from_secs(60),
        || (percent_in_force(&scenario) == Some(50.0)).then_some(()),
    );
}

/// Without Prometheus, or with one that does not answer, a rollout holds its step and its
/// status says why (the source alone, against the API server: no traffic needed).
#[tokio::test]
async fn without_figures_a_rollout_holds_its_step_and_says_why() {
    for (prometheus, reason) in [
        (None, "no Prometheus to analyse with"),
        (
            // A port nothing listens on.
            Some(Prometheus::new("http://127.0.0.1:9").unwrap()),
            "cannot connect to Prometheus at 127.0.0.1:9",
        ),
    ] {
        let text = fixture("[50, 100]", "1s");
        let config = Config::from_yaml(&text, "fixture").unwrap();
        let server = ApiServer::start(objects_from_config(&config, "demo")).await;
        let (_trigger, drain) = steer::drain::channel();
        let task = tokio::spawn(source_alone(server.client(), "node-1", prometheus, drain));
        let started = Instant::now();
        let held = loop {
            let rollout = rollout(&server);
            if rollout["message"]
                .as_str()
                .is_some_and(|m| m.contains(reason))
            {
                break rollout;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no `{reason}`: {rollout}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            (&held["phase"], &held["step"], &held["percent"]),
            (&json!("Progressing"), &json!(0), &json!(50.0)),
            "{held}"
        );
        assert!(
            held["message"].as_str().unwrap().contains("blocked"),
            "{held}"
        );
        task.abort();
    }
}

/// A rollout that succeeded is promoted by the status writer alone (no figures needed): it
/// switches the Service's primary version, then marks the rollout Promoted. A promotion the API
/// server refuses leaves the rollout succeeded, saying why, and is tried again.
#[tokio::test]
async fn a_succeeded_rollout_is_promoted_and_a_refused_promotion_is_tried_again() {
    let text = fixture("[50, 100]", "1s");
    let config = Config::from_yaml(&text, "fixture").unwrap();
    // The release as the translation names it: its status is about these targets.
    let release = Release {
        name: format!("{}/{RELEASE}", Cluster::NAMESPACE),
        targets: [("restaurant.demo".to_string(), "v2".to_string())].into(),
        ..config.releases[0].clone()
    };
    let spec = release.rollout.clone().unwrap();
    let succeeded = RolloutStatus {
        phase: Phase::Succeeded,
        step: 1,
        percent: 100.0,
        next_analysis_at: None,
        ..steer::rollout::begin(&release, &spec, jiff::Timestamp::now())
    };
    let mut objects = objects_from_config(&config, Cluster::NAMESPACE);
    for object in &mut objects {
        if object["kind"] == "CanaryRelease" {
            object["status"] = json!({"rollout": succeeded});
        }
    }
    let server = ApiServer::start(objects).await;
    server.state.lock().unwrap().forbid_service_patches = true;
    let (_trigger, drain) = steer::drain::channel();
    let task = tokio::spawn(source_alone(server.client(), "node-1", None, drain));
    let primary = || {
        server
            .object("Service", Cluster::NAMESPACE, "restaurant")
            .unwrap()["metadata"]["annotations"]["steer.dev/primary-version"]
            .clone()
    };
    let started = Instant::now();
    let pending = loop {
        let rollout = rollout(&server);
        if rollout["message"]
            .as_str()
            .is_some_and(|m| m.contains("promotion pending"))
        {
            break rollout;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{rollout}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(pending["phase"], "Succeeded", "{pending}");
    assert_eq!(pending["percent"], 100.0, "{pending}");
    assert!(
        pending["message"]
            .as_str()
            .unwrap()
            .contains("cannot make v2 the primary version of Service demo/restaurant"),
        "{pending}"
    );
    assert!(
        pending["nextAnalysisAt"].is_string(),
        "the next attempt: {pending}"
    );
    assert_eq!(primary(), "v1");

    // Allowed (RBAC fixed): the next attempt promotes.
    server.state.lock().unwrap().forbid_service_patches = false;
    let promoted = loop {
        let rollout = rollout(&server);
        if rollout["phase"] == "Promoted" {
            break rollout;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{rollout}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(primary(), "v2");
    assert_eq!(promoted["percent"], 0.0, "{promoted}");
    assert!(promoted.get("nextAnalysisAt").is_none(), "{promoted}");
    // The release stays, accepted as promoted, out of the rules.
    let started = Instant::now();
    loop {
        let status = release_object(&server)["status"].clone();
        if status["conditions"][0]["reason"] == "Promoted" {
            assert_eq!(status["state"], "Accepted", "{status}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
}

/// An abort annotation stops a rollout with its value as the reason (no figures needed); the
/// resume annotation starts it over.
#[tokio::test]
async fn the_abort_annotation_stops_a_rollout_until_it_is_resumed() {
    let config = Config::from_yaml(&fixture("[50, 100]", "1h"), "fixture").unwrap();
    let server = ApiServer::start(objects_from_config(&config, Cluster::NAMESPACE)).await;
    let (_trigger, drain) = steer::drain::channel();
    let task = tokio::spawn(source_alone(server.client(), "node-1", None, drain));
    let until = |what: &'static str, test: fn(&Value) -> bool| {
        let server = server.clone();
        async move {
            let started = Instant::now();
            loop {
                let status = release_object(&server)["status"].clone();
                if test(&status) {
                    return status;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "{what}: {status:#}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until("the first step", |s| s["rollout"]["phase"] == "Progressing").await;
    annotate(&server, "steer.dev/rollout-abort", "checkout broke on v2");
    let aborted = until("the abort", |s| s["rollout"]["phase"] == "Aborted").await;
    assert_eq!(
        aborted["rolloutAbort"], "checkout broke on v2",
        "{aborted:#}"
    );
    assert_eq!(aborted["rollout"]["percent"], 0.0, "{aborted:#}");
    assert!(
        aborted["rollout"]["message"]
            .as_str()
            .unwrap()
            .contains("checkout broke on v2"),
        "{aborted:#}"
    );
    annotate(&server, "steer.dev/rollout-resume", "fixed");
    let resumed = until("the resume", |s| s["rollout"]["phase"] == "Progressing").await;
    assert_eq!(resumed["rollout"]["step"], 0, "{resumed:#}");
    task.abort();
}
