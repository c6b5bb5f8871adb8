//! The Kubernetes source against a local API server speaking the real wire format (lists,
//! chunked watch streams, `410 Gone`, merge patches of the status subresource, Leases), through
//! the real kube client: adds, modifies, deletes, re-lists, API errors, and the status verdicts;
//! and `steer run --kubernetes` on a test bed, routing the seed's requests from cluster objects.

use std::{
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{Value, json};
use steer::{
    config::Config,
    drain::DrainTrigger,
    kubernetes::{self, KubernetesOptions},
    metrics::Metrics,
};
use steer_tests::{
    Node,
    apiserver::{ApiServer, RELEASES, key_of},
    scenario::{Cluster, Scenario},
};

/// The seed's food-delivery stack as a cluster returns it (shared with the translation's tests).
const FIXTURE: &str = include_str!("../../agent/tests/fixtures/cluster-food-delivery.yaml");

fn fixture() -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(FIXTURE)
        .map(|document| Value::deserialize(document).unwrap())
        .collect()
}

fn object(objects: &[Value], kind: &str, name: &str) -> Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
        .clone()
}

/// The configurations the source applies, as they come.
struct Applied(tokio::sync::mpsc::UnboundedReceiver<Config>);

impl Applied {
    /// Waits for an applied configuration that satisfies `test`.
    async fn until(&mut self, what: &str, test: impl Fn(&Config) -> bool) -> Config {
        let wait = async {
            loop {
                let config = self.0.recv().await.expect("the source stopped");
                if test(&config) {
                    return config;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .unwrap_or_else(|_| panic!("no configuration where {what}"))
    }
}

/// The source under test: what it applies, its task, the trigger that stops it (dropping it
/// stops the source too) and its metrics.
struct Source {
    applied: Applied,
    task: tokio::task::JoinHandle<()>,
    drain: DrainTrigger,
    metrics: Arc<Metrics>,
}

/// The value of one metric line, e.g. `steer_kubernetes_status_writer`.
fn metric(metrics: &Metrics, line: &str) -> Option<f64> {
    metrics.encode().lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == line).then(|| value.parse().ok())?
    })
}

fn start_source(server: &ApiServer) -> Source {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("steer=debug"))
        .with_test_writer()
        .try_init();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let options = KubernetesOptions {
        version_label: "version".into(),
        identity: "node-1".into(),
        lease_namespace: "steer-system".into(),
        cgroup_root: None,
        prometheus: None,
    };
    let apply: kubernetes::Apply = Box::new(move |checked| {
        let config = checked?.config;
        let _ = sender.send(config);
        Ok(())
    });
    let (trigger, drain) = steer::drain::channel();
    let metrics = Arc::new(Metrics::default());
    let task = tokio::spawn(kubernetes::run(
        server.client(),
        options,
        apply,
        Box::new(|_| {}),
        Arc::new(steer::rollout::driver::Rollouts::kept_in_cluster()),
        metrics.clone(),
        drain,
    ));
    Source {
        applied: Applied(receiver),
        task,
        drain: trigger,
        metrics,
    }
}

fn release_names(config: &Config) -> Vec<&str> {
    let mut names: Vec<&str> = config.releases.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    names
}

async fn wait_for_status(server: &ApiServer, release: &str, state: &str) -> Value {
    for _ in 0..200 {
        let found = server
            .patches()
            .into_iter()
            .rev()
            .find(|(name, _)| name == release)
            .map(|(_, status)| status);
        if let Some(status) = found.filter(|s| s["state"] == state) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{release} never got state {state}: {:?}", server.patches());
}

#[tokio::test]
async fn adds_modifies_deletes_and_relists() {
    let objects = fixture();
    let server = ApiServer::start(objects.clone()).await;
    let mut source = start_source(&server);

    let first = source
        .applied
        .until("the seed's three releases serve", |c| {
            release_names(c) == ["food/blue", "food/green", "food/red"]
        })
        .await;
    assert_eq!(first.services.len(), 3);

    // Added: a release whose priority collides with green's on some requests.
    let mut rival = object(&objects, "CanaryRelease", "green");
    rival["metadata"]["name"] = json!("rival");
    rival["metadata"]["creationTimestamp"] = json!("2026-11-23T00:00:00Z");
    rival["spec"] = json!({"priority": 3, "match": [{"header": "x-device", "exact": "iphone"}]});
    server.put(rival.clone());
    let status = wait_for_status(&server, "food/rival", "Conflict").await;
    let conflict = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Conflict")
        .unwrap();
    assert_eq!(conflict["status"], "True");
    assert!(
        conflict["message"].as_str().unwrap().contains("food/green"),
        "{conflict}"
    );
    assert_eq!(
        metric(
            &source.metrics,
            "steer_kubernetes_releases{state=\"Conflict\"}"
        ),
        Some(1.0)
    );

    // Modified: the rival moves to its own priority and is accepted.
    rival["spec"]["priority"] = json!(4);
    rival["metadata"]["generation"] = json!(2);
    server.put(rival);
    source
        .applied
        .until("the rival serves", |c| {
            release_names(c).contains(&"food/rival")
        })
        .await;
    let status = wait_for_status(&server, "food/rival", "Accepted").await;
    assert_eq!(status["observedGeneration"], 2);

    // Modified: the only ready red pod goes unready; the version stays, without endpoints.
    let mut slice = objects
        .iter()
        .find(|o| {
            o["kind"] == "EndpointSlice"
                && o["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("restaurant")
        })
        .unwrap()
        .clone();
    for endpoint in slice["endpoints"].as_array_mut().unwrap() {
        endpoint["conditions"]["ready"] = json!(false);
    }
    server.put(slice);
    source
        .applied
        .until("restaurant has no ready endpoint", |c| {
            c.service("restaurant.food")
                .is_some_and(|s| s.versions.iter().all(|v| v.endpoints.is_empty()))
        })
        .await;

    // Deleted.
    server.delete("CanaryRelease", "food", "blue");
    source
        .applied
        .until("blue is gone", |c| !release_names(c).contains(&"food/blue"))
        .await;

    // Re-listed: green disappears while no watch can see it, then every watch expires.
    let mut objects_now: Vec<Value> = vec![];
    server.delete("CanaryRelease", "food", "rival");
    {
        let state = server.state.lock().unwrap();
        objects_now.extend(state.objects[RELEASES].values().cloned());
    }
    let green = objects_now
        .iter()
        .find(|o| o["metadata"]["name"] == "green")
        .unwrap()
        .clone();
    let mut renamed = green.clone();
    renamed["metadata"]["name"] = json!("green-2");
    {
        let mut state = server.state.lock().unwrap();
        state
            .objects
            .get_mut(RELEASES)
            .unwrap()
            .remove(&key_of(&green));
    }
    server.put_unseen(renamed);
    server.expire_watches();
    source
        .applied
        .until("the re-list replaced green by green-2", |c| {
            release_names(c) == ["food/green-2", "food/red"]
        })
        .await;
    source.task.abort();
}

#[tokio::test]
async fn api_errors_keep_the_last_good_configuration() {
    let server = ApiServer::start(fixture()).await;
    // Nothing answers at first: nothing may be applied until everything was listed.
    server.set_outage(true);
    let mut source = start_source(&server);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        source.applied.0.try_recv().is_err(),
        "applied before the first list"
    );
    server.set_outage(false);
    source
        .applied
        .until("the seed's releases serve", |c| c.releases.len() == 3)
        .await;

    // An outage after that: the watches fail and retry; what serves stays.
    server.set_outage(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(config) = source.applied.0.try_recv() {
        assert_eq!(
            config.releases.len(),
            3,
            "an outage changed the configuration"
        );
        assert_eq!(
            config.services.len(),
            3,
            "an outage changed the configuration"
        );
    }
    let errors = metric(
        &source.metrics,
        "steer_kubernetes_watch_errors_total{kind=\"CanaryRelease\"}",
    );
    assert!(
        errors.is_some_and(|n| n > 0.0),
        "watch errors counted: {errors:?}"
    );
    server.set_outage(false);
    server.delete("CanaryRelease", "food", "green");
    source
        .applied
        .until("the source caught up after the outage", |c| {
            c.releases.len() == 2
        })
        .await;
    source.task.abort();
}

#[tokio::test]
async fn one_writer_takes_the_lease_and_verdicts_reach_the_status() {
    let server = ApiServer::start(fixture()).await;
    let source = start_source(&server);
    for release in ["food/red", "food/blue", "food/green"] {
        let status = wait_for_status(&server, release, "Accepted").await;
        assert_eq!(status["observedGeneration"], 1);
        let accepted = &status["conditions"][0];
        assert_eq!(
            (accepted["type"].as_str(), accepted["status"].as_str()),
            (Some("Accepted"), Some("True"))
        );
    }
    let lease = server.state.lock().unwrap().lease.clone().expect("a lease");
    assert_eq!(lease["spec"]["holderIdentity"], "node-1");
    // Written once: an unchanged verdict is not written again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = server.patches().len();
    assert_eq!(writes, 3, "{:?}", server.patches());
    // Our own status writes come back as events; they change nothing, so nothing is rebuilt.
    let mut source = source;
    let mut applied = 0;
    while source.applied.0.try_recv().is_ok() {
        applied += 1;
    }
    assert_eq!(applied, 1, "status-only events were applied again");
    assert_eq!(
        metric(&source.metrics, "steer_kubernetes_status_writer"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &source.metrics,
            "steer_kubernetes_status_writes_total{result=\"written\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &source.metrics,
            "steer_kubernetes_releases{state=\"Accepted\"}"
        ),
        Some(3.0)
    );
    // Draining, the agent gives the lease up: another takes over at once, not after it expires.
    assert!(
        source.drain.drain(Duration::from_secs(5)).await,
        "the source stopped"
    );
    source.task.await.unwrap();
    let lease = server.state.lock().unwrap().lease.clone().unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
    assert_eq!(
        metric(&source.metrics, "steer_kubernetes_status_writer"),
        Some(0.0)
    );

    // Another agent holds a fresh lease: this one routes but does not write.
    let server = ApiServer::start(fixture()).await;
    server.state.lock().unwrap().lease = Some(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "steer-status-writer", "namespace": "steer-system", "resourceVersion": "1"},
        "spec": {"holderIdentity": "node-2", "leaseDurationSeconds": 3600,
                 "renewTime": jiff::Timestamp::now().to_string()}
    }));
    let mut source = start_source(&server);
    source
        .applied
        .until("it routes", |c| c.releases.len() == 3)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(server.patches().is_empty(), "a follower wrote status");

    // The holder gives the lease up (it drains): this agent takes it long before it expires.
    {
        let mut state = server.state.lock().unwrap();
        let lease = state.lease.as_mut().unwrap();
        lease["spec"]["holderIdentity"] = Value::Null;
        lease["metadata"]["resourceVersion"] = json!("2");
    }
    wait_for_status(&server, "food/red", "Accepted").await;
    let lease = server.state.lock().unwrap().lease.clone().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "node-1");
    source.task.abort();
}

const FOOD_CHAIN: &[(&str, &[&str])] = &[("order", &["restaurant"]), ("restaurant", &["delivery"])];
const ANDROID: (&str, &str) = ("x-device", "android");
const ATLANTIS: (&str, &str) = ("x-region", "atlantis");
/// User tags of a request: (header, value) pairs.
type Tags<'a> = &'a [(&'a str, &'a str)];

/// The path of versions a request took and the release every hop saw.
fn route(scenario: &Scenario, tags: &[(&str, &str)]) -> (String, Option<String>) {
    let hop = scenario.request("order", tags).unwrap();
    let hops = hop.flatten();
    assert!(
        hops.iter()
            .all(|h| h.error.is_none() && h.release == hops[0].release),
        "{hop:?}"
    );
    (hop.path(), hops[0].release.clone())
}

#[test]
fn steer_run_kubernetes_routes_the_seed_from_cluster_objects() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/food-delivery.yaml");
    let scenario = Scenario::deploy_kubernetes(&fixture, FOOD_CHAIN, Node::new().unwrap()).unwrap();
    let release = |name: &str| Some(format!("{}/{name}", Cluster::NAMESPACE));
    let cases: [(Tags, &str, Option<String>); 4] = [
        (
            &[ATLANTIS],
            "order/v1 -> restaurant/v1 -> delivery/v2-green",
            release("green"),
        ),
        (
            &[ANDROID],
            "order/v1 -> restaurant/v2-blue -> delivery/v2-blue",
            release("blue"),
        ),
        (
            &[ANDROID, ATLANTIS],
            "order/v1 -> restaurant/v2-red -> delivery/v1",
            release("red"),
        ),
        (&[], "order/v1 -> restaurant/v1 -> delivery/v1", None),
    ];
    for (tags, path, release) in cases {
        assert_eq!(
            route(&scenario, tags),
            (path.to_string(), release),
            "{tags:?}"
        );
    }

    // A change in the cluster is a change in routing: without red, Android+Atlantis is blue's.
    let cluster = scenario.kubernetes.as_ref().unwrap();
    cluster
        .server
        .delete("CanaryRelease", Cluster::NAMESPACE, "red");
    let started = Instant::now();
    while route(&scenario, &[ANDROID, ATLANTIS]).1 != release("blue") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "red's deletion never took effect"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        route(&scenario, &[ANDROID, ATLANTIS]).0,
        "order/v1 -> restaurant/v2-blue -> delivery/v2-blue"
    );
    // A release the translation leaves out is on the live page, with why.
    // Same priority as green, overlapping it: a conflict, and the newer release gives way.
    let rival = json!({
        "apiVersion": "steer.dev/v1alpha1", "kind": "CanaryRelease",
        "metadata": {"name": "rival", "namespace": Cluster::NAMESPACE, "generation": 1,
                     "creationTimestamp": "2099-01-01T00:00:00Z"},
        "spec": {"priority": 3, "match": [{"header": "x-region", "exact": "atlantis"}]}
    });
    cluster.server.put(rival);
    let started = Instant::now();
    let rival_row = loop {
        let state: Value = serde_json::from_str(
            &steer_tests::http::get(scenario.admin, "/ui/state", &[])
                .unwrap()
                .body,
        )
        .unwrap();
        let row = state["releases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == format!("{}/rival", Cluster::NAMESPACE))
            .cloned();
        if let Some(row) = row {
            break row;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rival never listed: {state}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(rival_row["verdict"], "conflict", "{rival_row}");
    assert_eq!(rival_row["priority"], Value::Null);
    assert!(
        rival_row["shadowedBy"].to_string().contains("green"),
        "{rival_row}"
    );

    // And the agent, alone in the cluster, took the lease and wrote the verdicts.
    let patched: Vec<String> = cluster
        .server
        .patches()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for name in ["green", "blue"] {
        let name = format!("{}/{name}", Cluster::NAMESPACE);
        assert!(patched.contains(&name), "{name} has no status: {patched:?}");
    }
}

#[test]
fn a_pod_annotated_out_of_redirection_takes_the_kube_proxy_path() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/food-delivery.yaml");
    let scenario = Scenario::deploy_kubernetes(&fixture, FOOD_CHAIN, Node::new().unwrap()).unwrap();
    let restaurant = scenario.config.service("restaurant").unwrap().addresses[0];
    let redirected = || {
        let output = scenario
            .node
            .pod("order-v1")
            .exec(Command::new("curl").args([
                "-s",
                "-i",
                "--max-time",
                "10",
                "-H",
                "x-device: android",
                &format!("http://{restaurant}/"),
            ]))
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out.contains("x-steer-version: v2-blue")
    };
    let order_pod = |annotations: Value| {
        // The test bed names a pod's cgroup `pod-<name>`: a UID of `-<name>` makes that the
        // kubelet's `pod<uid>`.
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "order-v1-0", "namespace": Cluster::NAMESPACE,
                         "uid": "-order-v1", "annotations": annotations,
                         "labels": {"app": "order", "version": "v1"}},
        })
    };
    let wait_until = |want: bool, what: &str| {
        let started = Instant::now();
        while redirected() != want {
            assert!(started.elapsed() < Duration::from_secs(60), "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(redirected());
    let server = &scenario.kubernetes.as_ref().unwrap().server;
    server.put(order_pod(json!({"steer.dev/redirect": "disabled"})));
    wait_until(false, "the annotation never took the pod out of the mesh");
    server.put(order_pod(json!({})));
    wait_until(true, "the pod never came back into the mesh");
}

/// `releases` CanaryReleases of the checker's mixed sample as a cluster holds them: each
/// service with an address, each version with one ready pod.
fn mixed_cluster(releases: usize) -> Vec<Value> {
    let mut config = steer::check::sample::mixed(releases, 7);
    let mut pods = 0u32;
    for (i, service) in config.services.iter_mut().enumerate() {
        service.addresses = vec![format!("10.96.0.{}:80", 1 + i).parse().unwrap()];
        for version in &mut service.versions {
            pods += 1;
            let [_, _, a, b] = pods.to_be_bytes();
            version.endpoints = vec![format!("10.244.{a}.{b}:8080").parse().unwrap()];
        }
    }
    steer_tests::apiserver::objects_from_config(&config, "teams")
}

/// Waits until `count` statuses were written; the time since `since`.
async fn until_written(
    server: &ApiServer,
    count: usize,
    since: Instant,
    limit: Duration,
) -> Duration {
    while server.patches().len() < count {
        assert!(
            since.elapsed() < limit,
            "{} of {count} statuses written in {limit:?}",
            server.patches().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    since.elapsed()
}

/// Many releases: one configuration in force, every status written once at the writer's pace,
/// and a re-list that brings nothing new writes nothing and applies nothing again.
#[tokio::test]
async fn many_releases_are_written_once_paced_and_survive_a_relist() {
    const RELEASES_N: usize = 400;
    let server = ApiServer::start(mixed_cluster(RELEASES_N)).await;
    let start = Instant::now();
    let mut source = start_source(&server);
    let config = source
        .applied
        .until("the releases serve", |c| !c.releases.is_empty())
        .await;
    assert!(
        config.releases.len() > RELEASES_N / 2,
        "{}",
        config.releases.len()
    );
    let took = until_written(&server, RELEASES_N, start, Duration::from_secs(120)).await;
    // 250 a second at most: 400 take 1.6 s at least.
    assert!(
        took >= Duration::from_millis(1_500),
        "{RELEASES_N} written in {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        server.patches().len(),
        RELEASES_N,
        "a status was written twice"
    );
    while source.applied.0.try_recv().is_ok() {}

    server.expire_watches();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        server.patches().len(),
        RELEASES_N,
        "the re-list rewrote statuses"
    );
    assert!(
        source.applied.0.try_recv().is_err(),
        "an unchanged re-list was applied again"
    );
    source.task.abort();
}

/// The 10,000-release figure (too slow for CI): `cargo test -p steer-tests --release --test
/// kubernetes -- --ignored --nocapture ten_thousand`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn ten_thousand_releases() {
    const RELEASES_N: usize = 10_000;
    let server = ApiServer::start(mixed_cluster(RELEASES_N)).await;
    let start = Instant::now();
    let mut source = start_source(&server);
    source
        .applied
        .until("the releases serve", |c| !c.releases.is_empty())
        .await;
    let applied = start.elapsed();
    let written = until_written(&server, RELEASES_N, start, Duration::from_secs(120)).await;
    server.expire_watches();
    let relisted = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "10k CanaryReleases: first configuration in force after {applied:?} (list + check), \
         every status written after {written:?}; a re-list wrote {} more",
        server.patches().len() - RELEASES_N
    );
    let _ = relisted;
    source.task.abort();
}
