//! `steer run`: the node agent. Loads the configuration, attaches the eBPF datapath, serves
//! the redirect and gateway listeners and the admin server, applies valid edits of the
//! configuration file live, and drains on SIGTERM.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::{
    admin::{self, Admin},
    config::Config,
    datapath::{Datapath, DatapathOptions},
    drain,
    metrics::Metrics,
    proxy::{self, Listener, OriginalDestination, Pool, Proxy},
    state::Snapshot,
};

/// How often the configuration file is looked at: edits apply well within 100 ms.
const WATCH_INTERVAL: Duration = Duration::from_millis(25);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub listen6: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub gateway: Option<SocketAddr>,
    /// Where to attach the programs; `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    /// Serve without the eBPF datapath (the proxy alone, e.g. behind the gateway only).
    pub no_ebpf: bool,
    pub drain_grace: Duration,
}

fn load(path: &Path, previous: Option<&Snapshot>) -> Result<Snapshot> {
    let config = Config::load(path)?;
    let (snapshot, report) =
        Snapshot::build_after(config, previous).with_context(|| path.display().to_string())?;
    for warning in &report.warnings {
        warn!(code = warning.code, "{}", warning.message);
    }
    Ok(snapshot)
}

async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} ({what})"))
}

/// The file's identity for change detection: modification time and length.
fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

pub async fn run(options: RunOptions) -> Result<()> {
    let snapshot = load(&options.config, None)?;
    let listener = bind(options.listen, "--listen").await?;
    let listener6 = match options.listen6 {
        Some(address) => Some(bind(address, "--listen6").await?),
        None => None,
    };
    let gateway = match options.gateway {
        Some(address) => Some(bind(address, "--gateway").await?),
        None => None,
    };
    let admin_listener = bind(options.admin, "--admin").await?;

    let mut datapath = if options.no_ebpf {
        None
    } else {
        let SocketAddr::V4(proxy_v4) = options.listen else {
            bail!("--listen must be an IPv4 address (use --listen6 for IPv6)");
        };
        let proxy_v6 = match options.listen6 {
            Some(SocketAddr::V6(v6)) => Some(v6),
            Some(_) => bail!("--listen6 must be an IPv6 address"),
            None => None,
        };
        let cgroup = match &options.cgroup {
            Some(cgroup) => cgroup.clone(),
            None => crate::datapath::cgroup2_root()?,
        };
        let mut datapath = Datapath::attach(&DatapathOptions {
            cgroup,
            proxy_v4,
            proxy_v6,
        })?;
        datapath.set_services(&snapshot.service_addresses())?;
        datapath.forward_logs()?;
        Some(datapath)
    };
    let originals = datapath
        .as_ref()
        .map(|d| Arc::new(d.original_destinations()) as Arc<dyn OriginalDestination>);
    // Shared by the file watcher (service updates) and shutdown (detach first).
    let datapath = Arc::new(std::sync::Mutex::new(datapath.take()));

    let state = Arc::new(ArcSwap::from_pointee(snapshot));
    let metrics = Arc::new(Metrics::default());
    let proxy = Arc::new(Proxy {
        state: state.clone(),
        originals,
        pool: Pool::default(),
        metrics: metrics.clone(),
    });
    let admin = Arc::new(Admin {
        state: state.clone(),
        metrics: metrics.clone(),
        ready: false.into(),
    });
    tokio::spawn(admin::serve(admin.clone(), admin_listener));

    let (trigger, drain) = drain::channel();
    let mut listeners = vec![tokio::spawn(proxy::serve(
        proxy.clone(),
        listener,
        Listener::Redirect,
        drain.clone(),
    ))];
    if let Some(listener6) = listener6 {
        listeners.push(tokio::spawn(proxy::serve(
            proxy.clone(),
            listener6,
            Listener::Redirect,
            drain.clone(),
        )));
    }
    if let Some(gateway) = gateway {
        listeners.push(tokio::spawn(proxy::serve(
            proxy.clone(),
            gateway,
            Listener::Gateway,
            drain.clone(),
        )));
    }
    drop(drain);

    // Watch the configuration file: apply valid edits, keep serving on invalid ones.
    let watcher = {
        let path = options.config.clone();
        let state = state.clone();
        let metrics = metrics.clone();
        let datapath = datapath.clone();
        tokio::spawn(async move {
            let mut seen = stamp_of(&path);
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                let now = stamp_of(&path);
                if now == seen || now.is_none() {
                    continue;
                }
                seen = now;
                let previous = state.load_full();
                match load(&path, Some(&previous)) {
                    Ok(snapshot) => {
                        let updated =
                            match datapath.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                                Some(datapath) => {
                                    datapath.set_services(&snapshot.service_addresses())
                                }
                                None => Ok(()),
                            };
                        if let Err(err) = updated {
                            error!(error = %format!("{err:#}"), "cannot update the datapath; keeping the previous configuration");
                            metrics.reload(false);
                            continue;
                        }
                        state.store(Arc::new(snapshot));
                        metrics.reload(true);
                        info!(config = %path.display(), "configuration applied");
                    }
                    Err(err) => {
                        metrics.reload(false);
                        error!(error = %format!("{err:#}"), "configuration rejected; the previous one keeps serving");
                    }
                }
            }
        })
    };

    admin.ready.store(true, Ordering::Relaxed);
    info!(listen = %options.listen, admin = %options.admin, "steer is ready");

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
    for listener in listeners {
        let _ = listener.await;
    }
    watcher.abort();
    if !finished {
        warn!(grace = ?options.drain_grace, "connections still open after the grace period");
    }
    info!("stopped");
    Ok(())
}
