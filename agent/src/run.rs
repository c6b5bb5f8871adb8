//! `steer run`: the node agent. Loads the configuration, attaches the eBPF datapath, serves
//! the redirect and gateway listeners and the admin server, applies valid edits of the
//! configuration file live, and drains on SIGTERM.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::{
    admin::{self, Admin, live::LeftOut},
    check,
    config::Config,
    datapath::{Datapath, DatapathOptions},
    drain,
    kubernetes::{self, KubernetesOptions},
    metrics::Metrics,
    proxy::{
        Limits, OriginalDestination, Shared, WorkerListeners, Workers, bind_listener,
        stamp::StampKeys,
    },
    rollout::driver::{Applies, Rollouts},
    stamp_key,
    state::Snapshot,
};

/// How often the configuration file is looked at: edits apply well within 100 ms.
const WATCH_INTERVAL: Duration = Duration::from_millis(25);

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A YAML file, watched: valid edits apply live.
    File(PathBuf),
    /// The cluster's CanaryReleases, Services, EndpointSlices and pods.
    Kubernetes(KubernetesOptions),
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: Source,
    pub listen: ListenAddresses,
    pub admin: SocketAddr,
    /// The metrics-and-probes listener, if any.
    pub metrics: Option<SocketAddr>,
    /// Timeouts and the connection cap of the admin server and of the metrics listener (each
    /// its own).
    pub admin_limits: admin::Limits,
    pub gateway: Option<SocketAddr>,
    /// Where to attach the programs; `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    /// Serve without the eBPF datapath (the proxy alone, e.g. behind the gateway only).
    pub no_ebpf: bool,
    pub drain_grace: Duration,
    /// Proxy worker threads; `None`: one per CPU this process may run on.
    pub workers: Option<usize>,
    /// `None`: from the open files limit.
    pub max_connections: Option<usize>,
    pub idle_timeout: Duration,
    pub upstream_read_timeout: Duration,
    /// Debug response headers at the gateway too.
    pub gateway_debug_headers: bool,
    /// The stamp key file, which must exist; `None`: next to the configuration file (made when
    /// absent), or the DaemonSet's Secret with `--kubernetes`.
    pub stamp_key: Option<PathBuf>,
}

/// Where the DaemonSet mounts the `steer-stamp-key` Secret.
pub const KUBERNETES_STAMP_KEY: &str = "/etc/steer/stamp-key/keys";

/// The keys stamps are signed with. Only the implicit default of a file source may be made
/// (one machine); a file named with --stamp-key, and the Secret of a cluster, where every node
/// must share one key, must exist.
fn stamp_keys(options: &RunOptions) -> Result<StampKeys> {
    match (&options.source, &options.stamp_key) {
        (_, Some(path)) => stamp_key::load(path),
        (Source::File(config), None) => {
            let dir = config.parent().unwrap_or(Path::new("."));
            stamp_key::load_or_make(&dir.join("steer-stamp.key"))
        }
        (Source::Kubernetes(_), None) => stamp_key::load(Path::new(KUBERNETES_STAMP_KEY)).context(
            "every node needs the same key: kubectl -n steer-system create secret generic \
                 steer-stamp-key --from-literal=keys=\"$(head -c 32 /dev/urandom | base64)\"",
        ),
    }
}

/// Where redirected pod connections arrive: an address of the node per IP family the pods
/// use. Connections of a family without one are left to the cluster's service path.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenAddresses {
    pub v4: Option<SocketAddrV4>,
    pub v6: Option<SocketAddrV6>,
}

/// The ports of addresses given without one.
pub const DEFAULT_LISTEN_PORT: u16 = 15001;
pub const DEFAULT_GATEWAY_PORT: u16 = 15080;
pub const DEFAULT_METRICS_PORT: u16 = 15090;

/// `IP:PORT`, `[IPv6]:PORT`, or a bare IP with `default_port`: the downward API gives a
/// node's IPs without ports, and an IPv6 one cannot simply be followed by `:PORT`.
pub fn address_or_ip(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| {
            text.parse::<IpAddr>()
                .map(|ip| SocketAddr::new(ip, default_port))
        })
        .map_err(|_| format!("`{text}` is not an IP address or IP:PORT"))
}

pub fn gateway_address(text: &str) -> Result<SocketAddr, String> {
    address_or_ip(text, DEFAULT_GATEWAY_PORT)
}

impl std::str::FromStr for ListenAddresses {
    type Err = String;

    /// Comma-separated `IP:PORT`, `[IPv6]:PORT` or bare IPs (port 15001), at most one per
    /// family: a DaemonSet passes the node's `status.hostIPs` as they come.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut addresses = ListenAddresses { v4: None, v6: None };
        for part in text.split(',').map(str::trim) {
            let address = address_or_ip(part, DEFAULT_LISTEN_PORT)?;
            let taken = match address {
                SocketAddr::V4(v4) => addresses.v4.replace(v4).is_some(),
                SocketAddr::V6(v6) => addresses.v6.replace(v6).is_some(),
            };
            if taken {
                return Err(format!("`{text}` has two addresses of one IP family"));
            }
        }
        Ok(addresses)
    }
}

impl ListenAddresses {
    fn all(&self) -> impl Iterator<Item = SocketAddr> {
        let v4 = self.v4.map(SocketAddr::V4);
        v4.into_iter().chain(self.v6.map(SocketAddr::V6))
    }
}

impl std::fmt::Display for ListenAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self.all().map(|a| a.to_string()).collect();
        f.write_str(&all.join(","))
    }
}

/// Puts configurations in force: the datapath's service map first, then the snapshot, so a
/// configuration the datapath cannot take is not half applied.
#[derive(Clone)]
struct Applier {
    /// The agent's own listening addresses: an endpoint there would send requests around in
    /// a loop.
    own_addresses: Vec<SocketAddr>,
    state: Arc<ArcSwap<Snapshot>>,
    datapath: Arc<Mutex<Option<Datapath>>>,
    metrics: Arc<Metrics>,
    admin: Arc<Admin>,
    retired: Arc<Retired<Snapshot>>,
    rollouts: Arc<Rollouts>,
}

/// The rollout driver puts each step in force through the same path as a file's edit.
impl Applies for Applier {
    fn apply_effective(&self, config: Config, report: check::Report) -> Result<()> {
        self.apply_checked(Ok((config, Some(report))), "rollout")
    }

    fn metrics_text(&self) -> String {
        self.metrics.encode()
    }
}

/// Snapshots replaced while a proxy worker may still hold them. A worker keeps the snapshot it
/// last used until its next request, which then drops it: were that the last reference, that
/// request would pay for freeing a whole configuration (10,000 releases: their rules, names and
/// versions) on a request thread. Kept here instead, each is dropped by the control side once
/// no worker holds it any more. At most a few per worker are ever held: a worker holds one
/// snapshot (two while it moves to a new one).
struct Retired<T>(Mutex<Vec<Arc<T>>>);

impl<T> Default for Retired<T> {
    fn default() -> Self {
        Retired(Mutex::default())
    }
}

impl<T> Retired<T> {
    fn retire(&self, value: Arc<T>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(value);
    }

    /// Drops, on the calling thread, the retired values nobody else holds; how many. A value
    /// held here alone cannot be taken again (a reference is only cloned from another one), so
    /// counting references is not racy.
    fn sweep(&self) -> usize {
        let unused: Vec<Arc<T>> = {
            let mut retired = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let (unused, held) = std::mem::take(&mut *retired)
                .into_iter()
                .partition(|value| Arc::strong_count(value) == 1);
            *retired = held;
            unused
        };
        // Outside the lock: freeing a large snapshot takes a while.
        let freed = unused.len();
        drop(unused);
        if freed > 0 {
            // A large configuration's memory goes back to the system, not only to the
            // allocator (a 10,000-release apply left the agent at 278 MB instead of 51).
            // SAFETY: malloc_trim only releases free memory of the allocator.
            unsafe { libc::malloc_trim(0) };
        }
        freed
    }
}

/// How often retired snapshots are looked at (and freed when no worker holds them).
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

impl Applier {
    /// Applies a configuration the source could build (with the checker's report when the
    /// source has one), or records one it could not; either way a rejection is logged and
    /// counted, and the previous configuration keeps serving.
    fn apply_checked(
        &self,
        config: Result<(Config, Option<check::Report>)>,
        origin: &str,
    ) -> Result<()> {
        let result = config.and_then(|(config, report)| self.try_apply(config, report, origin));
        self.record(result, origin)
    }

    /// Applies a configuration file's text: its rollouts keep their places (or begin) and the
    /// rules see each at its step.
    fn apply_source(&self, config: Result<Config>, origin: &str) -> Result<()> {
        let result = config.and_then(|config| {
            (self.rollouts).apply_source(config, |effective, report| {
                self.try_apply(effective, Some(report), origin)
            })
        });
        self.record(result, origin)
    }

    /// Logs and counts the outcome of an apply.
    fn record(&self, result: Result<()>, origin: &str) -> Result<()> {
        self.metrics.reload(result.is_ok());
        self.admin.applied(origin, &result);
        match &result {
            Ok(()) => self.admin.synced.store(true, Ordering::Relaxed),
            Err(err) => {
                error!(source = origin, error = %format!("{err:#}"), "configuration rejected; the previous one keeps serving")
            }
        }
        result
    }

    fn try_apply(&self, config: Config, report: Option<check::Report>, origin: &str) -> Result<()> {
        refuse_own_addresses(&config, &self.own_addresses).with_context(|| origin.to_string())?;
        let previous = self.state.load_full();
        let (snapshot, report) = Snapshot::build_checked(config, Some(&previous), report)
            .with_context(|| origin.to_string())?;
        for warning in &report.warnings {
            warn!(code = warning.code, "{}", warning.message);
        }
        if let Some(datapath) = self
            .datapath
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            install(datapath, &snapshot).context("cannot update the datapath")?;
        }
        let retired = snapshot.retired_routes(&previous);
        self.state.store(Arc::new(snapshot));
        self.metrics.forget(&retired);
        self.metrics.forget_edges(&previous, &self.state.load());
        // The workers move to the new snapshot on their next request: never let one of them
        // be the one to free the previous.
        self.retired.retire(previous);
        self.retired.sweep();
        info!(source = origin, "configuration applied");
        Ok(())
    }
}

/// Puts a snapshot's service addresses and opt-out cgroups into the datapath's maps.
fn install(datapath: &mut Datapath, snapshot: &Snapshot) -> Result<()> {
    datapath.set_services(&snapshot.service_addresses())?;
    for cgroup in datapath.set_opt_out(&snapshot.config.opt_out_cgroups)? {
        warn!(cgroup = %cgroup.display(), "opt-out cgroup does not exist; skipped");
    }
    Ok(())
}

async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} ({what})"))
}

/// The releases a translation left out of the configuration, for the page.
fn left_out(
    verdicts: &std::collections::BTreeMap<String, kubernetes::translate::Verdict>,
) -> Vec<LeftOut> {
    use kubernetes::translate::State;
    verdicts
        .iter()
        .filter_map(|(name, verdict)| {
            let state = match verdict.state {
                State::Accepted => return None,
                State::Shadowed => "shadowed",
                State::Conflict => "conflict",
                State::Invalid => "invalid",
            };
            Some(LeftOut {
                name: name.clone(),
                verdict: state,
                related: verdict.related.clone(),
                message: verdict.message.clone(),
            })
        })
        .collect()
}

/// Refuses a configuration with an endpoint at one of the agent's own listening addresses: each
/// request sent there would come back to be sent there again, for as long as it is let run.
fn refuse_own_addresses(config: &Config, own: &[SocketAddr]) -> Result<()> {
    let is_own = |endpoint: &SocketAddr| {
        own.iter().any(|own| {
            own.port() == endpoint.port()
                && (own.ip() == endpoint.ip()
                    || (own.ip().is_unspecified() && own.is_ipv4() == endpoint.is_ipv4()))
        })
    };
    for service in &config.services {
        for version in &service.versions {
            if let Some(endpoint) = version.endpoints.iter().find(|e| is_own(e)) {
                anyhow::bail!(
                    "service `{}` version `{}`: endpoint {endpoint} is this agent's own \
                     listener; requests would loop",
                    service.name,
                    version.name
                );
            }
        }
    }
    Ok(())
}

/// Raises the soft limit of open files to the hard limit: every client and upstream connection
/// is a file descriptor, and the default soft limit (1024) is far below what a node needs.
/// Returns the limit in force.
fn raise_file_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                ..limit
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
            warn!("cannot raise the open files limit");
        }
        limit.rlim_cur
    }
}

/// Nine tenths of the file descriptors: the rest stay for upstream connections (idle clients
/// hold none; the pool keeps a bounded number), listeners, the datapath and the admin server.
fn default_max_connections(file_limit: u64) -> usize {
    usize::try_from(file_limit - file_limit / 10)
        .unwrap_or(usize::MAX)
        .max(16)
}

/// Where a configuration file's rollouts are kept: next to it, so a restarted agent continues
/// each rollout where it stood (and a rolled-back release stays rolled back).
pub fn rollout_state_file(config: &Path) -> PathBuf {
    let mut name = config.file_name().unwrap_or_default().to_os_string();
    name.push(".rollouts.json");
    config.with_file_name(name)
}

/// The file's identity for change detection: modification time and length.
fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

pub async fn run(options: RunOptions) -> Result<()> {
    let own_addresses: Vec<SocketAddr> = options
        .listen
        .all()
        .chain(options.gateway)
        .chain([options.admin])
        .chain(options.metrics)
        .collect();
    // What the file was before it is read for the start: an edit made from then on (before the
    // watcher first looks, on a busy node) is an edit all the same.
    let file_read = match &options.source {
        Source::File(path) => stamp_of(path),
        Source::Kubernetes(_) => None,
    };
    // The file must be valid to start; the cluster's objects arrive once the agent runs.
    let (snapshot, kubernetes, rollouts) = match &options.source {
        Source::File(path) => {
            let config = Config::load(path)?;
            let rollouts = Rollouts::load(Some(rollout_state_file(path)));
            let mut built = None;
            rollouts
                .apply_source(config, |effective, report| {
                    refuse_own_addresses(&effective, &own_addresses)?;
                    built = Some(Snapshot::build_checked(effective, None, Some(report))?.0);
                    Ok(())
                })
                .with_context(|| path.display().to_string())?;
            (built.expect("applied"), None, rollouts)
        }
        Source::Kubernetes(_) => {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API (no in-cluster config, no kubeconfig)")?;
            let (snapshot, _) = Snapshot::build(Config::default()).expect("empty is valid");
            (snapshot, Some(client), Rollouts::kept_in_cluster())
        }
    };
    // Once the configuration is known good, before anything is bound or attached: an agent
    // without the mesh's key must not start.
    let stamp_keys = stamp_keys(&options)?;
    let rollouts = Arc::new(rollouts);
    let file_limit = raise_file_limit();
    let workers = options
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Every worker listens on every address (SO_REUSEPORT): the kernel spreads connections.
    let mut listeners: Vec<WorkerListeners> =
        (0..workers).map(|_| WorkerListeners::default()).collect();
    for worker in &mut listeners {
        for address in options.listen.all() {
            let listener = bind_listener(address)
                .with_context(|| format!("cannot listen on {address} (--listen)"))?;
            worker.redirect.push(listener);
        }
        if let Some(address) = options.gateway {
            let listener = bind_listener(address)
                .with_context(|| format!("cannot listen on {address} (--gateway)"))?;
            worker.gateway = Some(listener);
        }
    }
    let admin_listener = bind(options.admin, "--admin").await?;
    let metrics_listener = match options.metrics {
        Some(address) => Some(bind(address, "--metrics").await?),
        None => None,
    };

    let mut datapath = if options.no_ebpf {
        None
    } else {
        let cgroup = match &options.cgroup {
            Some(cgroup) => cgroup.clone(),
            None => crate::datapath::cgroup2_root()?,
        };
        let mut datapath = Datapath::attach(&DatapathOptions {
            cgroup,
            proxy_v4: options.listen.v4,
            proxy_v6: options.listen.v6,
        })?;
        install(&mut datapath, &snapshot)?;
        datapath.forward_logs()?;
        // Loading parsed the kernel's BTF (~15 MB of heap, freed since): hand those pages back
        // to the kernel, or an idle agent keeps them resident on every node.
        // SAFETY: malloc_trim only releases free memory of the allocator.
        unsafe { libc::malloc_trim(0) };
        Some(datapath)
    };
    let originals = datapath
        .as_ref()
        .map(|d| Arc::new(d.original_destinations()) as Arc<dyn OriginalDestination>);
    // Shared by the source (service updates) and shutdown (detach first).
    let datapath = Arc::new(Mutex::new(datapath.take()));

    let state = Arc::new(ArcSwap::from_pointee(snapshot));
    let metrics = Arc::new(Metrics::default());
    metrics.datapath_attached(originals.is_some());
    let admin = Arc::new(Admin {
        state: state.clone(),
        metrics: metrics.clone(),
        ready: false.into(),
        synced: kubernetes.is_none().into(),
        rejected: Mutex::default(),
        left_out: Mutex::default(),
        rollouts: rollouts.clone(),
    });
    let retired = Arc::new(Retired::default());
    let applier = Applier {
        own_addresses: own_addresses.clone(),
        state: state.clone(),
        datapath: datapath.clone(),
        metrics: metrics.clone(),
        admin: admin.clone(),
        retired: retired.clone(),
        rollouts: rollouts.clone(),
    };
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            ticks.tick().await;
            // Freeing is CPU work: on the blocking pool.
            let retired = retired.clone();
            let _ = tokio::task::spawn_blocking(move || retired.sweep()).await;
        }
    });
    tokio::spawn(admin::serve(
        admin.clone(),
        admin_listener,
        options.admin_limits,
    ));
    if let Some(listener) = metrics_listener {
        tokio::spawn(admin::serve_metrics(
            admin.clone(),
            listener,
            options.admin_limits,
        ));
    }

    let (trigger, drain) = drain::channel();
    let shared = Arc::new(Shared {
        state: state.clone(),
        originals,
        metrics: metrics.clone(),
        limits: Limits {
            max_connections: options
                .max_connections
                .unwrap_or_else(|| default_max_connections(file_limit)),
            idle_timeout: options.idle_timeout,
            upstream_read_timeout: options.upstream_read_timeout,
        },
        outside_debug_headers: options.gateway_debug_headers,
        stamp_keys,
        open_connections: AtomicUsize::new(0),
        peak_connections: AtomicUsize::new(0),
    });
    Workers::start(shared, listeners, drain.clone())?;

    let source = match (&options.source, kubernetes) {
        (Source::File(path), _) => {
            tokio::spawn(crate::rollout::driver::drive(
                rollouts.clone(),
                Arc::new(applier.clone()),
            ));
            tokio::spawn(watch_file(path.clone(), applier, file_read))
        }
        (Source::Kubernetes(kube_options), Some(client)) => {
            let kube_options = KubernetesOptions {
                cgroup_root: datapath
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(|d| d.cgroup().to_path_buf()),
                ..kube_options.clone()
            };
            // Building a snapshot is CPU work: off the runtime's worker, so the admin server
            // and the watches keep going meanwhile.
            // The source checked the configuration already: its report comes along.
            let apply: kubernetes::Apply = Box::new(move |checked| {
                let checked = checked.map(|c| (c.config, Some(c.report)));
                tokio::task::block_in_place(|| applier.apply_checked(checked, "kubernetes"))
            });
            let page = admin.clone();
            let on_verdicts: kubernetes::OnVerdicts = Box::new(move |verdicts| {
                *page.left_out.lock().unwrap_or_else(|e| e.into_inner()) = left_out(verdicts);
            });
            tokio::spawn(kubernetes::run(
                client,
                kube_options,
                apply,
                on_verdicts,
                rollouts.clone(),
                metrics.clone(),
                drain.clone(),
            ))
        }
        (Source::Kubernetes(_), None) => unreachable!("the client was made above"),
    };
    drop(drain);

    admin.ready.store(true, Ordering::Relaxed);
    info!(listen = %options.listen, admin = %options.admin, workers, "steer is ready");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: draining"),
    }
    admin.ready.store(false, Ordering::Relaxed);
    // Detach first: new pod connections take the cluster's normal service path while the
    // requests in flight here finish.
    drop(datapath.lock().unwrap_or_else(|e| e.into_inner()).take());
    let finished = trigger.drain(options.drain_grace).await;
    source.abort();
    if !finished {
        warn!(grace = ?options.drain_grace, "connections still open after the grace period");
    }
    info!("stopped");
    Ok(())
}

/// Applies valid edits of the configuration file; an invalid edit is logged and the previous
/// configuration keeps serving. A file is read only once it is stable: an editor that writes
/// in place (truncate, then write) must not have its empty or half-written file applied.
/// `seen` is the file's identity when it was last read.
async fn watch_file(path: PathBuf, applier: Applier, mut seen: Option<(SystemTime, u64)>) {
    let origin = path.display().to_string();
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let now = stamp_of(&path);
        if now == seen || now.is_none() {
            continue;
        }
        let Some(text) = read_when_stable(&path).await else {
            // Still being written: looked at again on the next tick.
            continue;
        };
        seen = now;
        let running_services = applier.state.load().config.services.len();
        // Parsing and checking are CPU work: on the blocking pool, never on a runtime thread.
        // Logged and counted by the applier.
        let (origin, applier) = (origin.clone(), applier.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let config = Config::from_yaml(&text, &origin)
                .map_err(anyhow::Error::from)
                .and_then(|config| refuse_accidental_emptying(config, &text, running_services));
            applier.apply_source(config, &origin)
        })
        .await;
    }
}

/// The file's text once two reads a watch interval apart agree (and its identity did not
/// change in between); `None` while it is changing or unreadable.
async fn read_when_stable(path: &Path) -> Option<String> {
    let before = stamp_of(path);
    let first = tokio::fs::read(path).await.ok()?;
    tokio::time::sleep(WATCH_INTERVAL).await;
    let second = tokio::fs::read(path).await.ok()?;
    if first != second || stamp_of(path) != before {
        return None;
    }
    String::from_utf8(second).ok()
}

/// A file with no services while services are serving is far more likely a mistake (a file
/// caught empty, a bad merge) than the wish to take every service out of the mesh: that needs
/// an explicit `services: []`.
fn refuse_accidental_emptying(
    config: Config,
    text: &str,
    running_services: usize,
) -> Result<Config> {
    if !config.services.is_empty() || running_services == 0 {
        return Ok(config);
    }
    let explicit = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
        .ok()
        .is_some_and(|value| value.get("services").is_some());
    if explicit {
        return Ok(config);
    }
    anyhow::bail!(
        "the file has no services while {running_services} are serving; write `services: []` \
         to take every service out of the mesh"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_snapshot_is_freed_by_the_sweep_once_no_worker_holds_it() {
        /// Records the thread that dropped it.
        struct Dropped(Arc<Mutex<Option<std::thread::ThreadId>>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                *self.0.lock().unwrap() = Some(std::thread::current().id());
            }
        }
        let dropped_by = Arc::new(Mutex::new(None));
        let retired = Retired::default();
        let snapshot = Arc::new(Dropped(dropped_by.clone()));
        // A worker still holds the snapshot when it is replaced.
        let held = snapshot.clone();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            released.recv().unwrap();
            drop(held);
        });
        retired.retire(snapshot);
        assert_eq!(retired.sweep(), 0, "a worker holds it: kept");
        assert!(dropped_by.lock().unwrap().is_none());
        // The worker moves on: its reference goes, and the snapshot is not freed there.
        release.send(()).unwrap();
        worker.join().unwrap();
        assert!(dropped_by.lock().unwrap().is_none(), "freed on the worker");
        assert_eq!(retired.sweep(), 1);
        assert_eq!(
            *dropped_by.lock().unwrap(),
            Some(std::thread::current().id()),
            "freed by the sweep"
        );
        assert_eq!(retired.sweep(), 0);
    }

    #[test]
    fn an_endpoint_at_the_agents_own_listener_is_refused() {
        let config = |endpoint: &str| {
            let text = format!(
                "services:\n  - name: web\n    versions:\n      \
                 - {{ name: v1, primary: true, endpoints: [\"{endpoint}\"] }}\n"
            );
            Config::from_yaml(&text, "test").unwrap()
        };
        let own: Vec<SocketAddr> = vec![
            "10.0.0.5:15001".parse().unwrap(),
            "0.0.0.0:15080".parse().unwrap(),
        ];
        let err = refuse_own_addresses(&config("10.0.0.5:15001"), &own).unwrap_err();
        assert!(
            err.to_string().contains(
                "service `web` version `v1`: endpoint 10.0.0.5:15001 is this agent's own listener"
            ),
            "{err}"
        );
        // A listener on every address owns its port on all of them.
        assert!(refuse_own_addresses(&config("10.9.9.9:15080"), &own).is_err());
        assert!(refuse_own_addresses(&config("10.0.0.6:15001"), &own).is_ok());
        assert!(refuse_own_addresses(&config("10.0.0.5:8080"), &own).is_ok());
    }

    #[test]
    fn a_file_without_services_empties_a_running_mesh_only_when_it_says_so() {
        let parse = |text: &str| Config::from_yaml(text, "test").unwrap();
        for accidental in ["", "# all comments\n", "releases: []\n"] {
            let err = refuse_accidental_emptying(parse(accidental), accidental, 3).unwrap_err();
            assert!(
                err.to_string().contains("no services while 3 are serving"),
                "{err}"
            );
        }
        let explicit = "services: []\n";
        assert!(refuse_accidental_emptying(parse(explicit), explicit, 3).is_ok());
        // Nothing serving: nothing to lose.
        assert!(refuse_accidental_emptying(parse(""), "", 0).is_ok());
    }

    #[test]
    fn listen_addresses_take_one_address_per_family_with_or_without_a_port() {
        let both: ListenAddresses = "10.0.0.5:15001, [fd00::5]:16001".parse().unwrap();
        assert_eq!(both.v4, Some("10.0.0.5:15001".parse().unwrap()));
        assert_eq!(both.v6, Some("[fd00::5]:16001".parse().unwrap()));
        assert_eq!(both.to_string(), "10.0.0.5:15001,[fd00::5]:16001");
        // As the downward API gives status.hostIPs: bare, comma-separated.
        let bare: ListenAddresses = "fd00::5,10.0.0.5".parse().unwrap();
        assert_eq!(bare.to_string(), "10.0.0.5:15001,[fd00::5]:15001");
        let v6_only: ListenAddresses = "fd00::5".parse().unwrap();
        assert_eq!(v6_only.v4, None);
        let err = "10.0.0.5,10.0.0.6".parse::<ListenAddresses>().unwrap_err();
        assert!(err.contains("two addresses of one IP family"), "{err}");
        let err = "node-1:15001".parse::<ListenAddresses>().unwrap_err();
        assert!(err.contains("`node-1:15001` is not an IP address"), "{err}");
        assert_eq!(
            gateway_address("fd00::5"),
            Ok("[fd00::5]:15080".parse().unwrap())
        );
    }
}
