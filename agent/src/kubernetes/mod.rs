//! The Kubernetes source (`steer run --kubernetes`): watches CanaryReleases, Services,
//! EndpointSlices and the pods' labels, builds the same configuration the file source reads,
//! and writes each CanaryRelease's verdict to its status (one writer per cluster, by lease).
//!
//! Watches re-list and reconnect with backoff after API errors; until the first complete list
//! of everything nothing is applied, and afterwards the last good configuration keeps serving
//! whatever the API server does.

pub mod cache;
pub mod crd;
pub mod leader;
pub mod opt_out;
pub mod prometheus;
pub mod rollout;
pub mod status;
pub mod translate;

use std::{
    collections::BTreeMap,
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
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use self::{
    cache::Cache,
    crd::CanaryRelease,
    leader::Elector,
    prometheus::Prometheus,
    status::desired_status,
    translate::{Cluster, State, Verdict, release_key, translate},
};
use crate::{
    check::Report, config::Config, drain::Drain, metrics::Metrics, rollout::driver::Rollouts,
};

/// A burst of events (a rollout, a re-list) becomes one rebuild.
const SETTLE: Duration = Duration::from_millis(50);
/// How soon a round that failed in part (a status write, the datapath) is tried again.
const RETRY: Duration = Duration::from_secs(5);
/// The status writers' pace: a full pass over 10,000 changed verdicts takes 40 s, and the API
/// server never sees more than this from steer.
pub(crate) const STATUS_WRITES_PER_SECOND: u32 = 250;
/// Status writes awaiting their answer at once: the pace holds up to 32 ms per write.
const STATUS_WRITES_IN_FLIGHT: usize = 8;

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
    /// Where the rollouts' analyses get their figures; `None`: rollouts do not advance.
    pub prometheus: Option<Prometheus>,
}

/// A configuration the source built, with the checker's report on exactly it (valid): putting
/// it in force needs no second check.
#[derive(Debug)]
pub struct Checked {
    pub config: Config,
    pub report: Report,
}

/// Puts a built configuration in force, or records why none could be built; an error keeps
/// the previous one serving (the callee logs it).
pub type Apply = Box<dyn Fn(Result<Checked>) -> Result<()> + Send + Sync>;

/// The verdicts the status writer is to bring every CanaryRelease's status to.
type Verdicts = BTreeMap<String, Verdict>;

/// Hears every translation's verdicts (the admin page lists the releases left out).
pub type OnVerdicts = Box<dyn Fn(&BTreeMap<String, Verdict>) + Send + Sync>;

/// Runs the source until the agent drains; then gives up the status writer's lease.
pub async fn run(
    client: Client,
    options: KubernetesOptions,
    apply: Apply,
    on_verdicts: OnVerdicts,
    rollouts: Arc<Rollouts>,
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
    let (verdicts, verdicts_rx) = watch::channel(None);
    let writer = tokio::spawn(write_statuses(
        client.clone(),
        metrics.clone(),
        releases.clone(),
        leading.clone(),
        verdicts_rx,
    ));
    let (rollout_source, rollout_source_rx) = watch::channel(None);
    let driver = tokio::spawn(rollout::drive(
        rollout::Driver {
            client: client.clone(),
            releases: releases.clone(),
            leading: leading.clone(),
            prometheus: options.prometheus.clone(),
        },
        rollout_source_rx,
    ));
    let stores = Stores {
        releases,
        services,
        slices,
        pods,
    };
    let outputs = Outputs {
        apply,
        on_verdicts,
        verdicts,
        rollouts,
        rollout_source,
    };
    tokio::select! {
        _ = follow(&options, &outputs, &metrics, &changed, &leading, stores) => {}
        _ = drain.signaled() => {}
    }
    driver.abort();
    writer.abort();
    campaign.abort();
    if let Err(err) = elector.release().await {
        warn!(error = %format!("{err:#}"), "cannot release the status writer lease; it expires by itself");
    }
}

/// The watched objects.
struct Stores {
    releases: Cache<CanaryRelease>,
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
    pods: Cache<PartialObjectMeta<Pod>>,
}

/// Where each rebuild goes.
struct Outputs {
    apply: Apply,
    on_verdicts: OnVerdicts,
    /// To the status writer.
    verdicts: watch::Sender<Option<Arc<Verdicts>>>,
    /// The admin page's rollouts.
    rollouts: Arc<Rollouts>,
    /// To the rollout driver: the configuration with its rollouts.
    rollout_source: watch::Sender<Option<Arc<Config>>>,
}

/// Rebuilds the configuration on every change, applies it, and hands the verdicts to the
/// status writer when this agent is the one.
async fn follow(
    options: &KubernetesOptions,
    outputs: &Outputs,
    metrics: &Metrics,
    changed: &Notify,
    leading: &AtomicBool,
    stores: Stores,
) {
    let Outputs {
        apply,
        on_verdicts,
        verdicts,
        rollouts,
        rollout_source,
    } = outputs;
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
    // The cluster last applied, and the one whose verdicts the status writer last got: our
    // own status writes come back as events that change neither, and cost no rebuild.
    let mut applied: Option<Arc<Cluster>> = None;
    let mut applied_opt_out: Vec<PathBuf> = Vec::new();
    let mut written: Option<Arc<Cluster>> = None;
    let mut page = rollout::Page::default();
    loop {
        let current = releases.state();
        // Sorted: a store's order changes with its updates, the cluster it holds does not.
        let cluster = Arc::new(Cluster {
            releases: sorted(current.iter().map(|r| without_status(r))),
            rollouts: rollout::routing(&rollout::stored(current.iter().map(|r| &**r))),
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
                    on_verdicts(&translation.verdicts);
                    if status_due {
                        // The writer works through them at its own pace, in its own task:
                        // applying the next change does not wait for it.
                        verdicts.send_replace(Some(Arc::new(translation.verdicts)));
                        written = Some(cluster.clone());
                    }
                    let (config, report) = rollout::in_force(
                        translation.config,
                        translation.report,
                        &cluster.rollouts,
                        rollout_source,
                    );
                    let checked = Checked {
                        config: Config {
                            opt_out_cgroups: opt_out.clone(),
                            ..config
                        },
                        report,
                    };
                    if apply_due && apply(Ok(checked)).is_ok() {
                        applied = Some(cluster.clone());
                        applied_opt_out = opt_out.clone();
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
        // Every status write of the driver changes what the page shows, if not the routing.
        page.show(
            rollouts,
            rollout_source.borrow().clone(),
            rollout::stored(current.iter().map(|r| &**r)),
        );
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
/// every change (a re-list once, when it ends).
fn watch<K, S>(stream: S, changed: &Arc<Notify>, metrics: &Arc<Metrics>) -> Cache<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
{
    let (store, writer) = cache::cache();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    metrics.watching(&kind);
    let changed = changed.clone();
    let metrics = metrics.clone();
    let events = stream.default_backoff();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if writer.apply(event) {
                        changed.notify_one();
                    }
                }
                Err(err) => {
                    metrics.watch_error(&kind);
                    warn!(%kind, error = %err, "watch failed; retrying with backoff");
                }
            }
        }
    });
    store
}

/// The one status writer: brings every CanaryRelease's status to the latest verdicts it was
/// given, writing only the statuses that differ, at most `STATUS_WRITES_PER_SECOND`. Newer
/// verdicts end a pass and start the next one over the releases as they are then (those
/// written already compare equal and cost nothing); a pass with failed writes is tried again
/// after `RETRY`. Writes only while `leading`.
async fn write_statuses(
    client: Client,
    metrics: Arc<Metrics>,
    releases: Cache<CanaryRelease>,
    leading: Arc<AtomicBool>,
    mut verdicts: watch::Receiver<Option<Arc<Verdicts>>>,
) {
    loop {
        let latest = verdicts.borrow_and_update().clone();
        let outcome = match latest {
            Some(latest) => {
                write_pass(
                    &client,
                    &metrics,
                    &releases,
                    &leading,
                    &latest,
                    &mut verdicts,
                )
                .await
            }
            None => Pass::Done,
        };
        let next = match outcome {
            Pass::Superseded => continue,
            Pass::Done => verdicts.changed().await,
            Pass::Failed => match tokio::time::timeout(RETRY, verdicts.changed()).await {
                Ok(changed) => changed,
                // Again, with the same verdicts.
                Err(_) => Ok(()),
            },
        };
        if next.is_err() {
            return;
        }
    }
}

enum Pass {
    /// Every status that differed was written (or this agent no longer writes).
    Done,
    /// Some write failed.
    Failed,
    /// Newer verdicts came.
    Superseded,
}

async fn write_pass(
    client: &Client,
    metrics: &Metrics,
    releases: &Cache<CanaryRelease>,
    leading: &AtomicBool,
    verdicts: &Verdicts,
    newer: &mut watch::Receiver<Option<Arc<Verdicts>>>,
) -> Pass {
    // The API keeps seconds: writing more would make every comparison a difference.
    let now = Time(jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).expect("now"));
    let due: Vec<_> = releases
        .state()
        .into_iter()
        .filter_map(|release| {
            let namespace = release.namespace().unwrap_or_default();
            let name = release.name_any();
            let key = release_key(&namespace, &name);
            let verdict = verdicts.get(&key)?;
            let status = desired_status(&release, verdict, now.clone());
            // The rollout's part is the driver's: neither compared nor written here.
            let current = release.status.as_ref().map(|s| s.verdicts_only());
            (current.as_ref() != Some(&status)).then(|| {
                let state = verdict.state.as_str();
                (namespace, name, key, state, status)
            })
        })
        .collect();
    if due.is_empty() {
        return Pass::Done;
    }
    info!(
        writes = due.len(),
        "writing the statuses whose verdict changed"
    );
    let mut pace = tokio::time::interval(Duration::from_secs(1) / STATUS_WRITES_PER_SECOND);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = due.into_iter();
    let mut writes = futures::stream::FuturesUnordered::new();
    let mut outcome = Pass::Done;
    loop {
        while writes.len() < STATUS_WRITES_IN_FLIGHT {
            let Some((namespace, name, key, state, status)) = due.next() else {
                break;
            };
            pace.tick().await;
            writes.push(write_status(
                client.clone(),
                namespace,
                name,
                key,
                state,
                status,
            ));
        }
        let Some((key, state, result)) = writes.next().await else {
            break;
        };
        match result {
            Ok(_) => {
                metrics.status_write(true);
                info!(release = %key, state, "status written");
            }
            Err(err) => {
                outcome = Pass::Failed;
                metrics.status_write(false);
                warn!(release = %key, error = %err, "cannot write status");
            }
        }
        if newer.has_changed().unwrap_or(false) {
            return Pass::Superseded;
        }
        if !leading.load(Ordering::Relaxed) {
            return Pass::Done;
        }
    }
    outcome
}

async fn write_status(
    client: Client,
    namespace: String,
    name: String,
    key: String,
    state: &'static str,
    status: crd::CanaryReleaseStatus,
) -> (String, &'static str, kube::Result<CanaryRelease>) {
    let api: Api<CanaryRelease> = Api::namespaced(client, &namespace);
    let patch = Patch::Merge(serde_json::json!({ "status": status }));
    let result = api
        .patch_status(&name, &PatchParams::default(), &patch)
        .await;
    (key, state, result)
}
