//! The Kubernetes source against a local API server speaking the real wire format (lists,
//! chunked watch streams, `410 Gone`, merge patches of the status subresource, Leases), through
//! the real kube client: adds, modifies, deletes, re-lists, API errors, and the status verdicts.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use steer::{
    config::Config,
    kubernetes::{self, KubernetesOptions},
};
use tokio::{net::TcpListener, sync::broadcast};

const FIXTURE: &str = include_str!("fixtures/cluster-food-delivery.yaml");
const RELEASES: &str = "/apis/steer.dev/v1alpha1/canaryreleases";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "/api/v1/pods";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/steer-system/leases";

/// The collection (list/watch path) an object of this kind belongs to.
fn collection(kind: &str) -> &'static str {
    match kind {
        "CanaryRelease" => RELEASES,
        "Service" => SERVICES,
        "EndpointSlice" => SLICES,
        "Pod" => PODS,
        other => panic!("no collection for {other}"),
    }
}

type Key = (String, String);

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Collection -> (namespace, name) -> object.
    objects: BTreeMap<&'static str, BTreeMap<Key, Value>>,
    /// Collection -> the events so far, by resource version, for watches that resume.
    history: BTreeMap<&'static str, Vec<(u64, Value)>>,
    lease: Option<Value>,
    /// Status patches received: (namespace/name, status).
    patches: Vec<(String, Value)>,
    /// When set, every request fails with 500 and open watches end.
    outage: bool,
}

/// A little API server: what the test puts in, the watchers get, in the API's wire format.
struct ApiServer {
    state: Mutex<State>,
    /// (collection, watch event); `None` collection: every watch ends (outage, 410).
    events: broadcast::Sender<(Option<&'static str>, Value)>,
    address: SocketAddr,
}

fn key_of(object: &Value) -> Key {
    let metadata = &object["metadata"];
    (
        metadata["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        metadata["name"].as_str().unwrap().to_string(),
    )
}

/// What the API returns for pods when asked for metadata only.
fn as_metadata(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": object["metadata"]})
}

impl ApiServer {
    async fn start(objects: Vec<Value>) -> Arc<ApiServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Arc::new(ApiServer {
            state: Mutex::default(),
            events: broadcast::channel(1024).0,
            address: listener.local_addr().unwrap(),
        });
        for object in objects {
            server.put(object);
        }
        let serving = server.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let server = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(request).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        server
    }

    fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.address).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Adds or replaces an object, as a controller or a user would.
    fn put(&self, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let version = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let collection = collection(object["kind"].as_str().unwrap());
        let previous = state
            .objects
            .entry(collection)
            .or_default()
            .insert(key_of(&object), object.clone());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(&mut state, collection, version, kind, object);
    }

    fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let version = state.resource_version;
        let collection = collection(kind);
        let key = (namespace.to_string(), name.to_string());
        let mut object = state
            .objects
            .get_mut(collection)
            .and_then(|objects| objects.remove(&key))
            .expect("deleting an object that exists");
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        self.record(&mut state, collection, version, "DELETED", object);
    }

    fn record(
        &self,
        state: &mut State,
        collection: &'static str,
        version: u64,
        kind: &str,
        object: Value,
    ) {
        let object = if collection == PODS {
            as_metadata(&object)
        } else {
            object
        };
        let event = json!({"type": kind, "object": object});
        state
            .history
            .entry(collection)
            .or_default()
            .push((version, event.clone()));
        let _ = self.events.send((Some(collection), event));
    }

    /// Ends every watch with `410 Gone` and forgets the history: the watchers must list again.
    fn expire_watches(&self) {
        let mut state = self.state.lock().unwrap();
        state.history.clear();
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version"}});
        let _ = self.events.send((None, gone));
    }

    /// Changes an object without any watch seeing it: only a re-list can tell.
    fn put_unseen(&self, object: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let collection = collection(object["kind"].as_str().unwrap());
        state
            .objects
            .entry(collection)
            .or_default()
            .insert(key_of(&object), object);
    }

    fn set_outage(&self, outage: bool) {
        self.state.lock().unwrap().outage = outage;
        if outage {
            let _ = self.events.send((None, Value::Null));
        }
    }

    fn patches(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().patches.clone()
    }

    async fn handle(
        &self,
        request: Request<hyper::body::Incoming>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        if self.state.lock().unwrap().outage {
            return status(StatusCode::INTERNAL_SERVER_ERROR, "etcd is down");
        }
        let watch = query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1");
        match (method, path.as_str()) {
            (Method::GET, path) if watch => self.watch(path, &query),
            (Method::GET, path) if [RELEASES, SERVICES, SLICES, PODS].contains(&path) => {
                self.list(path)
            }
            (Method::PATCH, path) if path.ends_with("/status") => self.patch_status(path, &body),
            (_, path) if path.starts_with(LEASE) => self.lease(path, &body),
            (method, path) => status(StatusCode::NOT_FOUND, &format!("{method} {path}")),
        }
    }

    fn list(&self, path: &str) -> Response<BoxBody<Bytes, Infallible>> {
        let state = self.state.lock().unwrap();
        let collection = [RELEASES, SERVICES, SLICES, PODS]
            .into_iter()
            .find(|c| *c == path)
            .unwrap();
        let items: Vec<Value> = state
            .objects
            .get(collection)
            .into_iter()
            .flat_map(|objects| objects.values())
            .map(|o| {
                if collection == PODS {
                    as_metadata(o)
                } else {
                    o.clone()
                }
            })
            .collect();
        let (api_version, kind) = if collection == PODS {
            ("meta.k8s.io/v1", "PartialObjectMetadataList")
        } else {
            ("v1", "List")
        };
        json_reply(
            StatusCode::OK,
            json!({"apiVersion": api_version, "kind": kind,
                   "metadata": {"resourceVersion": state.resource_version.to_string()},
                   "items": items}),
        )
    }

    /// A chunked stream of watch events from the requested resource version on.
    fn watch(&self, path: &str, query: &str) -> Response<BoxBody<Bytes, Infallible>> {
        let collection = [RELEASES, SERVICES, SLICES, PODS]
            .into_iter()
            .find(|c| *c == path)
            .unwrap();
        let since: u64 = query
            .split('&')
            .find_map(|p| p.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let state = self.state.lock().unwrap();
        // Subscribe under the lock, so no event falls between the backlog and the live ones.
        let mut live = self.events.subscribe();
        let history = state.history.get(collection).cloned().unwrap_or_default();
        if history.first().is_none_or(|(first, _)| *first > since + 1)
            && since < state.resource_version
        {
            // The history this watch would resume from is gone.
            return json_reply(
                StatusCode::GONE,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": "Expired", "code": 410}),
            );
        }
        drop(state);
        let backlog: Vec<Value> = history
            .into_iter()
            .filter(|(version, _)| *version > since)
            .map(|(_, event)| event)
            .collect();
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            for event in backlog {
                if sender.send(line(&event)).await.is_err() {
                    return;
                }
            }
            while let Ok((target, event)) = live.recv().await {
                match target {
                    Some(c) if c == collection => {
                        if sender.send(line(&event)).await.is_err() {
                            return;
                        }
                    }
                    Some(_) => {}
                    None => {
                        if !event.is_null() {
                            let _ = sender.send(line(&event)).await;
                        }
                        return;
                    }
                }
            }
        });
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            let chunk = receiver.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), receiver))
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(BoxBody::new(StreamBody::new(stream)))
            .unwrap()
    }

    fn patch_status(&self, path: &str, body: &[u8]) -> Response<BoxBody<Bytes, Infallible>> {
        // /apis/steer.dev/v1alpha1/namespaces/{ns}/canaryreleases/{name}/status
        let parts: Vec<&str> = path.split('/').collect();
        let (namespace, name) = (parts[5].to_string(), parts[7].to_string());
        let patch: Value = serde_json::from_slice(body).unwrap();
        let object = {
            let mut state = self.state.lock().unwrap();
            state
                .patches
                .push((format!("{namespace}/{name}"), patch["status"].clone()));
            let Some(object) = state
                .objects
                .get(RELEASES)
                .and_then(|o| o.get(&(namespace.clone(), name.clone())))
            else {
                return status(StatusCode::NOT_FOUND, "no such release");
            };
            let mut object = object.clone();
            object["status"] = patch["status"].clone();
            object
        };
        self.put(object.clone());
        json_reply(StatusCode::OK, object)
    }

    fn lease(&self, path: &str, body: &[u8]) -> Response<BoxBody<Bytes, Infallible>> {
        let mut state = self.state.lock().unwrap();
        if body.is_empty() {
            return match &state.lease {
                Some(lease) => json_reply(StatusCode::OK, lease.clone()),
                None => status(StatusCode::NOT_FOUND, &format!("{path} not found")),
            };
        }
        let mut lease: Value = serde_json::from_slice(body).unwrap();
        if let Some(current) = &state.lease
            && current["metadata"]["resourceVersion"] != lease["metadata"]["resourceVersion"]
        {
            return status(StatusCode::CONFLICT, "the lease changed");
        }
        state.resource_version += 1;
        lease["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
        state.lease = Some(lease.clone());
        json_reply(StatusCode::OK, lease)
    }
}

fn line(event: &Value) -> Bytes {
    let mut text = serde_json::to_vec(event).unwrap();
    text.push(b'\n');
    Bytes::from(text)
}

fn json_reply(code: StatusCode, body: Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BoxBody::new(Full::new(Bytes::from(body.to_string()))))
        .unwrap()
}

/// A failure as the API server words it (clients go by `reason`).
fn status(code: StatusCode, message: &str) -> Response<BoxBody<Bytes, Infallible>> {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::CONFLICT => "Conflict",
        _ => "InternalError",
    };
    json_reply(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

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
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("no configuration where {what}"))
    }
}

fn start_source(server: &ApiServer) -> (Applied, tokio::task::JoinHandle<()>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("steer=debug"))
        .with_test_writer()
        .try_init();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let options = KubernetesOptions {
        version_label: "version".into(),
        identity: "node-1".into(),
        lease_namespace: "steer-system".into(),
    };
    let apply: kubernetes::Apply = Box::new(move |config| {
        let _ = sender.send(config);
        Ok(())
    });
    let task = tokio::spawn(kubernetes::run(server.client(), options, apply));
    (Applied(receiver), task)
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
    let (mut applied, task) = start_source(&server);

    let first = applied
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

    // Modified: the rival moves to its own priority and is accepted.
    rival["spec"]["priority"] = json!(4);
    rival["metadata"]["generation"] = json!(2);
    server.put(rival);
    applied
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
    applied
        .until("restaurant has no ready endpoint", |c| {
            c.service("restaurant.food")
                .is_some_and(|s| s.versions.iter().all(|v| v.endpoints.is_empty()))
        })
        .await;

    // Deleted.
    server.delete("CanaryRelease", "food", "blue");
    applied
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
    applied
        .until("the re-list replaced green by green-2", |c| {
            release_names(c) == ["food/green-2", "food/red"]
        })
        .await;
    task.abort();
}

#[tokio::test]
async fn api_errors_keep_the_last_good_configuration() {
    let server = ApiServer::start(fixture()).await;
    // Nothing answers at first: nothing may be applied until everything was listed.
    server.set_outage(true);
    let (mut applied, task) = start_source(&server);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        applied.0.try_recv().is_err(),
        "applied before the first list"
    );
    server.set_outage(false);
    applied
        .until("the seed's releases serve", |c| c.releases.len() == 3)
        .await;

    // An outage after that: the watches fail and retry; what serves stays.
    server.set_outage(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(config) = applied.0.try_recv() {
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
    server.set_outage(false);
    server.delete("CanaryRelease", "food", "green");
    applied
        .until("the source caught up after the outage", |c| {
            c.releases.len() == 2
        })
        .await;
    task.abort();
}

#[tokio::test]
async fn one_writer_takes_the_lease_and_verdicts_reach_the_status() {
    let server = ApiServer::start(fixture()).await;
    let (_applied, task) = start_source(&server);
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
    task.abort();

    // Another agent holds a fresh lease: this one routes but does not write.
    let server = ApiServer::start(fixture()).await;
    server.state.lock().unwrap().lease = Some(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "steer-status-writer", "namespace": "steer-system", "resourceVersion": "1"},
        "spec": {"holderIdentity": "node-2", "leaseDurationSeconds": 3600,
                 "renewTime": jiff::Timestamp::now().to_string()}
    }));
    let (mut applied, task) = start_source(&server);
    applied.until("it routes", |c| c.releases.len() == 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(server.patches().is_empty(), "a follower wrote status");
    task.abort();
}
