//! A small Kubernetes API server for tests: what a test puts in, the kube client's watchers
//! get, in the API's wire format (lists, chunked watch streams, `410 Gone` when the history a
//! watch resumes from is gone, merge patches of the status subresource and of Services, with
//! `metadata.resourceVersion` as a precondition, Leases with optimistic concurrency), plus
//! outages on demand. And [`objects_from_config`]: a file-format
//! configuration as the cluster objects that express it.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use steer::config::Config;
use tokio::{net::TcpListener, sync::broadcast};

pub const RELEASES: &str = "/apis/steer.dev/v1alpha1/canaryreleases";
pub const SERVICES: &str = "/api/v1/services";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const PODS: &str = "/api/v1/pods";
pub const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/steer-system/leases";

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

pub type Key = (String, String);

#[derive(Default)]
pub struct State {
    pub resource_version: u64,
    /// Collection -> (namespace, name) -> object.
    pub objects: BTreeMap<&'static str, BTreeMap<Key, Value>>,
    /// Collection -> the events so far, by resource version, for watches that resume.
    history: BTreeMap<&'static str, Vec<(u64, Value)>>,
    pub lease: Option<Value>,
    /// Status patches applied: (namespace/name, status).
    patches: Vec<(String, Value)>,
    /// When set, every request fails with 500 and open watches end.
    outage: bool,
    /// When set, Service patches are forbidden (as RBAC without `patch` on Services would).
    pub forbid_service_patches: bool,
}

/// A little API server: what the test puts in, the watchers get, in the API's wire format.
pub struct ApiServer {
    pub state: Mutex<State>,
    /// (collection, watch event); `None` collection: every watch ends (outage, 410).
    events: broadcast::Sender<(Option<&'static str>, Value)>,
    pub address: SocketAddr,
}

pub fn key_of(object: &Value) -> Key {
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
    pub async fn start(objects: Vec<Value>) -> Arc<ApiServer> {
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

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.address).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Adds or replaces an object, as a controller or a user would.
    pub fn put(&self, object: Value) {
        let mut state = self.state.lock().unwrap();
        self.replace(&mut state, object);
    }

    fn replace(&self, state: &mut State, mut object: Value) {
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
        self.record(state, collection, version, kind, object);
    }

    /// Sets an annotation of an object as `kubectl annotate` does: the rest of the object,
    /// its status included, stays as the server holds it at that moment.
    pub fn annotate(&self, kind: &str, namespace: &str, name: &str, key: &str, value: &str) {
        let mut state = self.state.lock().unwrap();
        let mut object = (state.objects.get(collection(kind)))
            .and_then(|objects| objects.get(&(namespace.to_string(), name.to_string())))
            .cloned()
            .expect("annotating an object that exists");
        object["metadata"]["annotations"][key] = json!(value);
        self.replace(&mut state, object);
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
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
    pub fn expire_watches(&self) {
        let mut state = self.state.lock().unwrap();
        state.history.clear();
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version"}});
        let _ = self.events.send((None, gone));
    }

    /// Changes an object without any watch seeing it: only a re-list can tell.
    pub fn put_unseen(&self, object: Value) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let collection = collection(object["kind"].as_str().unwrap());
        state
            .objects
            .entry(collection)
            .or_default()
            .insert(key_of(&object), object);
    }

    pub fn set_outage(&self, outage: bool) {
        self.state.lock().unwrap().outage = outage;
        if outage {
            let _ = self.events.send((None, Value::Null));
        }
    }

    pub fn patches(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().patches.clone()
    }

    /// An object as the server holds it now.
    pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.object_in(collection(kind), &(namespace.to_string(), name.to_string()))
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
            (Method::PATCH, path) if path.starts_with("/api/v1/namespaces/") => {
                self.patch_service(path, &body)
            }
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
        // The status subresource takes the status alone (and the precondition).
        let status_patch = json!({"metadata": {"resourceVersion": patch["metadata"]["resourceVersion"]},
                                  "status": patch["status"]});
        let reply = self.merge_patch(RELEASES, (namespace.clone(), name.clone()), &status_patch);
        if reply.status() == StatusCode::OK {
            self.state
                .lock()
                .unwrap()
                .patches
                .push((format!("{namespace}/{name}"), patch["status"].clone()));
        }
        reply
    }

    fn patch_service(&self, path: &str, body: &[u8]) -> Response<BoxBody<Bytes, Infallible>> {
        // /api/v1/namespaces/{ns}/services/{name}
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() != 7 || parts[5] != "services" {
            return status(StatusCode::NOT_FOUND, path);
        }
        if self.state.lock().unwrap().forbid_service_patches {
            return status(StatusCode::FORBIDDEN, "services is forbidden: cannot patch");
        }
        let patch: Value = serde_json::from_slice(body).unwrap();
        self.merge_patch(
            SERVICES,
            (parts[4].to_string(), parts[6].to_string()),
            &patch,
        )
    }

    /// An RFC 7386 merge patch; a `metadata.resourceVersion` in it must be the object's.
    fn merge_patch(
        &self,
        collection: &'static str,
        key: Key,
        patch: &Value,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let object = {
            let state = self.state.lock().unwrap();
            let Some(object) = state.objects.get(collection).and_then(|o| o.get(&key)) else {
                return status(
                    StatusCode::NOT_FOUND,
                    &format!("no {key:?} in {collection}"),
                );
            };
            let wanted = &patch["metadata"]["resourceVersion"];
            if !wanted.is_null() && *wanted != object["metadata"]["resourceVersion"] {
                return status(StatusCode::CONFLICT, "the object has been modified");
            }
            let mut object = object.clone();
            merge(&mut object, patch);
            object
        };
        self.put(object.clone());
        let object = self.object_in(collection, &key).unwrap_or(object);
        json_reply(StatusCode::OK, object)
    }

    fn object_in(&self, collection: &'static str, key: &Key) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state.objects.get(collection)?.get(key).cloned()
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

/// RFC 7386: objects merge, null removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().unwrap();
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
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
        StatusCode::FORBIDDEN => "Forbidden",
        _ => "InternalError",
    };
    json_reply(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// `config` as the objects a cluster would hold in `namespace`: per service an annotated Service
/// (its first address), an EndpointSlice and a Pod per endpoint labelled with its version; per
/// release a CanaryRelease, created in the file's order (so the first is the oldest).
pub fn objects_from_config(config: &Config, namespace: &str) -> Vec<Value> {
    let mut objects = Vec::new();
    for service in &config.services {
        let (Some(address), Some(primary)) = (service.addresses.first(), service.primary()) else {
            continue;
        };
        let target_port = service
            .versions
            .iter()
            .find_map(|v| v.endpoints.first())
            .map_or(address.port(), |e| e.port());
        objects.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": service.name, "namespace": namespace,
                         "annotations": {"steer.dev/primary-version": primary.name}},
            "spec": {"type": "ClusterIP", "clusterIP": address.ip().to_string(),
                     "clusterIPs": [address.ip().to_string()],
                     "ports": [{"name": "http", "port": address.port(), "protocol": "TCP",
                                "targetPort": target_port}]}
        }));
        let mut endpoints = Vec::new();
        for version in &service.versions {
            for (i, endpoint) in version.endpoints.iter().enumerate() {
                let pod = format!("{}-{}-{i}", service.name, version.name);
                objects.push(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod, "namespace": namespace,
                                 "labels": {"app": service.name, "version": version.name}},
                    "status": {"podIP": endpoint.ip().to_string()}
                }));
                endpoints.push(json!({
                    "addresses": [endpoint.ip().to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}
                }));
            }
        }
        objects.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-slice", service.name), "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service.name}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": target_port, "protocol": "TCP"}]
        }));
    }
    for (i, release) in config.releases.iter().enumerate() {
        let mut spec = json!({"priority": release.priority, "match": release.matchers,
                              "targets": release.targets});
        if let Some(percent) = release.percent {
            spec["percent"] = json!(percent);
        }
        if let Some(hash_by) = &release.hash_by {
            spec["hashBy"] = json!(hash_by);
        }
        if let Some(rollout) = &release.rollout {
            spec["rollout"] = json!(rollout);
        }
        objects.push(json!({
            "apiVersion": "steer.dev/v1alpha1", "kind": "CanaryRelease",
            "metadata": {"name": release.name, "namespace": namespace, "generation": 1,
                         "creationTimestamp": format!("2026-11-20T10:{:02}:00Z", i % 60)},
            "spec": spec
        }));
    }
    objects
}

/// A kubeconfig that points the kube client at `server`.
pub fn kubeconfig(server: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
         clusters: [{{name: test, cluster: {{server: \"http://{server}\"}}}}]\n\
         users: [{{name: test, user: {{}}}}]\n\
         contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n"
    )
}
