//! The Kubernetes source (`steer run --kubernetes`): watches CanaryReleases, Services,
//! EndpointSlices and the pods' labels, builds the same configuration the file source reads,
//! and writes each CanaryRelease's verdict to its status (one writer per cluster, by lease).
//!
//! Watches re-list and reconnect with backoff after API errors; until the first complete list
//! of everything nothing is applied, and afterwards the last good configuration keeps serving
//! whatever the API server does.

pub mod crd;
pub mod leader;
pub mod opt_out;
pub mod status;
pub mod translate;

use std::{
    fmt::Debug,
    hash::Hash,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use self::{
    crd::CanaryRelease,
    leader::Elector,
    status::desired_status,
    translate::{Cluster, State, Verdict, release_key, translate},
};
use crate::{config::Config, drain::Drain, metrics::Metrics};

/// A burst of events (a rollout, a re-list) becomes one rebuild.
const SETTLE: Duration = Duration::from_millis(50);
/// How soon a round that failed in part (a status write, the datapath) is tried again.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct KubernetesOptions {
    /// The pod label whose value is the version (a Service's annotation may override it).
    pub version_label: String,
    /// This agent's name in the status writer election (the node's name).
    pub identity: String,
    /// Where the election's Lease lives (the agent's own namespace).
    pub lease_namespace: String,
    /// The cgroup the datapath attaches to, below which opted-out pods' cgroups are looked
    /// for; `None` without the datapath.
    pub cgroup_root: Option<PathBuf>,
}

/// Puts a built configuration in force, or records why none could be built; an error keeps
/// the previous one serving (the callee logs it).
pub type Apply = Box<dyn Fn(Result<Config>) -> Result<()> + Send + Sync>;

/// Runs the source until the agent drains; then gives up the status writer's lease.
pub async fn run(
    client: Client,
    options: KubernetesOptions,
    apply: Apply,
    metrics: Arc<Metrics>,
    mut drain: Drain,
) {
    let changed = Arc::new(Notify::new());
    let releases = watch(
        watcher(
            Api::<CanaryRelease>::all(client.clone()),
            Default::default(),
        ),
        &changed,
        &metrics,
    );
    let services = watch(
        watcher(Api::<Service>::all(client.clone()), Default::default()),
        &changed,
        &metrics,
    );
    let slices = watch(
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            Default::default(),
        ),
        &changed,
        &metrics,
    );
    // Only the pods' labels matter: metadata is a fraction of a pod's size.
    let pods = watch(
        watcher(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            Default::default(),
        ),
        &changed,
        &metrics,
    );
    let elector = Arc::new(Elector::new(
        client.clone(),
        &options.lease_namespace,
        options.identity.clone(),
        changed.clone(),
        metrics.clone(),
    ));
    let leading = elector.leading.clone();
    let campaign = tokio::spawn(elector.clone().run());
    let stores = Stores {
        releases,
        services,
        slices,
        pods,
    };
    tokio::select! {
        _ = follow(&client, &options, &apply, &metrics, &changed, &leading, stores) => {}
        _ = drain.signaled() => {}
    }
    campaign.abort();
    if let Err(err) = elector.release().await {
        warn!(error = %format!("{err:#}"), "cannot release the status writer lease; it expires by itself");
    }
}

/// The watched objects.
struct Stores {
    releases: Store<CanaryRelease>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<PartialObjectMeta<Pod>>,
}

/// Rebuilds the configuration on every change, applies it, and writes the verdicts when this
/// agent is the status writer.
async fn follow(
    client: &Client,
    options: &KubernetesOptions,
    apply: &Apply,
    metrics: &Metrics,
    changed: &Notify,
    leading: &AtomicBool,
    stores: Stores,
) {
    let Stores {
        releases,
        services,
        slices,
        pods,
    } = stores;

    let synced = async {
        releases.wait_until_ready().await?;
        services.wait_until_ready().await?;
        slices.wait_until_ready().await?;
        pods.wait_until_ready().await
    };
    if synced.await.is_err() {
        error!("a watch ended before its first list");
        return;
    }
    info!("the cluster's objects are listed");
    // The cluster last applied, and the one whose verdicts this agent last wrote in full: our
    // own status writes come back as events that change neither, and cost no rebuild.
    let mut applied: Option<Arc<Cluster>> = None;
    let mut applied_opt_out: Vec<PathBuf> = Vec::new();
    let mut written: Option<Arc<Cluster>> = None;
    loop {
        let current = releases.state();
        // Sorted: a store's order changes with its updates, the cluster it holds does not.
        let cluster = Arc::new(Cluster {
            releases: sorted(current.iter().map(|r| without_status(r))),
            services: sorted(services.state().iter().map(|s| (**s).clone())),
            slices: sorted(slices.state().iter().map(|s| (**s).clone())),
            pods: pods
                .state()
                .iter()
                .map(|p| {
                    let key = (p.namespace().unwrap_or_default(), p.name_any());
                    (key, p.labels().clone())
                })
                .collect(),
            opted_out: pods
                .state()
                .iter()
                .filter(|p| opt_out::opts_out(p.annotations()))
                .filter_map(|p| p.uid())
                .collect(),
        });
        // Looked for again on every round: a pod's cgroup appears a little after the pod.
        let opt_out = options
            .cgroup_root
            .as_deref()
            .map_or_else(Vec::new, |root| {
                opt_out::pod_cgroups(root, &cluster.opted_out)
            });
        let leading_now = leading.load(Ordering::Relaxed);
        if !leading_now {
            written = None;
        }
        let apply_due = applied.as_ref() != Some(&cluster) || applied_opt_out != opt_out;
        let status_due = leading_now && written.as_ref() != Some(&cluster);
        if apply_due || status_due {
            match translate(&cluster, &options.version_label) {
                Ok(translation) => {
                    let counts: Vec<(&str, usize)> = State::ALL
                        .iter()
                        .map(|state| {
                            let count = translation.verdicts.values().filter(|v| v.state == *state);
                            (state.as_str(), count.count())
                        })
                        .collect();
                    metrics.releases_by_state(&counts);
                    let config = Config {
                        opt_out_cgroups: opt_out.clone(),
                        ..translation.config
                    };
                    if apply_due && apply(Ok(config)).is_ok() {
                        applied = Some(cluster.clone());
                        applied_opt_out = opt_out.clone();
                    }
                    if status_due
                        && write_statuses(client, metrics, &current, &translation.verdicts).await
                    {
                        written = Some(cluster.clone());
                    }
                }
                Err(err) => {
                    // The same objects would fail the same way: wait for a change.
                    let _ = apply(Err(err));
                    applied = Some(cluster.clone());
                    applied_opt_out = opt_out.clone();
                    written = Some(cluster.clone());
                }
            }
        }
        let pending = applied.as_ref() != Some(&cluster)
            || (leading_now && written.as_ref() != Some(&cluster));
        let awaiting_cgroups = options.cgroup_root.is_some() && !cluster.opted_out.is_empty();
        if pending || awaiting_cgroups {
            // A datapath update or a status write failed, or opted-out pods may start here:
            // again soon, events or not.
            let _ = tokio::time::timeout(RETRY, changed.notified()).await;
        } else {
            changed.notified().await;
        }
        tokio::time::sleep(SETTLE).await;
    }
}

/// Objects by namespace and name.
fn sorted<K: ResourceExt>(objects: impl Iterator<Item = K>) -> Vec<K> {
    let mut objects: Vec<K> = objects.collect();
    objects.sort_by_cached_key(|o| (o.namespace(), o.name_any()));
    objects
}

/// A release as the translation sees it: without the status and the bookkeeping our own
/// status writes change.
fn without_status(release: &CanaryRelease) -> CanaryRelease {
    let mut release = release.clone();
    release.status = None;
    release.metadata.resource_version = None;
    release.metadata.managed_fields = None;
    release
}

/// Keeps a store of one kind of object in step with the API server and wakes the rebuild on
/// every change.
fn watch<K, S>(stream: S, changed: &Arc<Notify>, metrics: &Arc<Metrics>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
{
    let (store, writer): (Store<K>, Writer<K>) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    metrics.watching(&kind);
    let changed = changed.clone();
    let metrics = metrics.clone();
    let events = stream.default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(err) => {
                    metrics.watch_error(&kind);
                    warn!(%kind, error = %err, "watch failed; retrying with backoff");
                }
            }
        }
    });
    store
}

/// Writes the verdicts whose status differs from what the release carries; true when every
/// write succeeded.
async fn write_statuses(
    client: &Client,
    metrics: &Metrics,
    releases: &[Arc<CanaryRelease>],
    verdicts: &std::collections::BTreeMap<String, Verdict>,
) -> bool {
    // The API keeps seconds: writing more would make every comparison a difference.
    let now = Time(jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).expect("now"));
    let mut all_written = true;
    for release in releases {
        let namespace = release.namespace().unwrap_or_default();
        let name = release.name_any();
        let Some(verdict) = verdicts.get(&release_key(&namespace, &name)) else {
            continue;
        };
        let status = desired_status(release, verdict, now.clone());
        if release.status.as_ref() == Some(&status) {
            continue;
        }
        let api: Api<CanaryRelease> = Api::namespaced(client.clone(), &namespace);
        let patch = Patch::Merge(serde_json::json!({ "status": status }));
        match api
            .patch_status(&name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                metrics.status_write(true);
                info!(release = %release_key(&namespace, &name), state = verdict.state.as_str(), "status written");
            }
            Err(err) => {
                all_written = false;
                metrics.status_write(false);
                warn!(release = %release_key(&namespace, &name), error = %err, "cannot write status");
            }
        }
    }
    all_written
}
