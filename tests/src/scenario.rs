//! One of the seed's case studies deployed on a test bed: a pod per service version running
//! the demo service, kube-proxy DNAT for every service, and the real `steer run` agent with
//! the fixture's rules, attached to the bed's cgroup.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use steer::config::Config;

use crate::{
    Node, Process,
    apiserver::{ApiServer, kubeconfig as kubeconfig_for, objects_from_config},
    http,
};

pub const PROXY_PORT: u16 = 15001;
pub const GATEWAY_PORT: u16 = 15080;
pub const ADMIN_PORT: u16 = 15000;

/// A binary built next to the running one (target/<profile>/).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("exe dir")?;
    // Test executables live in target/<profile>/deps.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not built next to {} (cargo build builds it)",
        exe.display()
    )
}

/// The path a request took: (service, version, release stamp seen) per hop, depth first.
#[derive(Debug, Deserialize)]
pub struct Hop {
    pub service: String,
    pub version: String,
    pub release: Option<String>,
    #[serde(default)]
    pub calls: Vec<Hop>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Hop {
    /// Every hop, depth first.
    pub fn flatten(&self) -> Vec<&Hop> {
        std::iter::once(self)
            .chain(self.calls.iter().flat_map(Hop::flatten))
            .collect()
    }

    /// `service/version` per hop, e.g. `order/v1 -> restaurant/v2-red -> delivery/v1`.
    pub fn path(&self) -> String {
        self.flatten()
            .iter()
            .map(|h| format!("{}/{}", h.service, h.version))
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}

pub struct Scenario {
    /// The steer agent (declared first: it goes before the bed it is attached to).
    pub agent: Option<Process>,
    workload: Vec<Process>,
    /// Set when the agent reads the cluster (`--kubernetes`) instead of the file.
    pub kubernetes: Option<Cluster>,
    pub config_path: PathBuf,
    pub config: Config,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    pub node: Node,
    /// More arguments of `steer run`, taken by the next (re)start of the agent.
    pub agent_args: Vec<String>,
    _dir: TempDir,
}

/// The API server a `--kubernetes` agent reads, holding the fixture as cluster objects in
/// namespace [`Cluster::NAMESPACE`]; services are then named `name.namespace`.
pub struct Cluster {
    pub server: Arc<ApiServer>,
    kubeconfig: PathBuf,
    /// Runs the API server; dropped after the agent.
    _runtime: tokio::runtime::Runtime,
}

impl Cluster {
    pub const NAMESPACE: &str = "demo";
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Moves a fixture's addresses into the bed's ranges (services 10.96.0.x -> 10.202.B.x, pods
/// 10.244.1.x -> 10.201.B.x), so parallel beds never share an address.
pub fn remap(text: &str, node: &Node) -> String {
    text.replace("10.96.0.", &format!("10.202.{}.", node.index))
        .replace("10.244.1.", &format!("10.201.{}.", node.index))
}

impl Scenario {
    /// Deploys `fixture` (a file in deploy/examples) where `calls` says who calls whom, e.g.
    /// `[("order", &["restaurant"]), ("restaurant", &["delivery"])]`.
    pub fn deploy(fixture: &Path, calls: &[(&str, &[&str])], node: Node) -> Result<Scenario> {
        let text = std::fs::read_to_string(fixture)
            .with_context(|| format!("read {}", fixture.display()))?;
        Scenario::deploy_text(&text, calls, &[], node)
    }

    /// Like `deploy`, from the fixture's text, with more arguments for some versions' demo
    /// services: (service, version, arguments), e.g. a faulty one (`--fail-every 20`).
    pub fn deploy_text(
        text: &str,
        calls: &[(&str, &[&str])],
        version_args: &[(&str, &str, &[&str])],
        node: Node,
    ) -> Result<Scenario> {
        let text = remap(text, &node);
        let dir = std::env::temp_dir().join(format!("steer-{}", node.name));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let config_path = dir.0.join("steer.yaml");
        std::fs::write(&config_path, &text)?;
        // `--stamp-key` names a file that must exist.
        std::fs::write(dir.0.join("stamp.key"), "the test bed's stamp key\n")?;
        let config = Config::from_yaml(&text, &config_path.display().to_string())?;
        let mut scenario = Scenario {
            agent: None,
            workload: Vec::new(),
            kubernetes: None,
            config_path,
            config,
            gateway: SocketAddr::from((node.address, GATEWAY_PORT)),
            admin: SocketAddr::from((node.address, ADMIN_PORT)),
            node,
            agent_args: Vec::new(),
            _dir: dir,
        };
        scenario.start_workload(calls, version_args)?;
        scenario.start_agent()?;
        scenario.wait_for_workload(calls)?;
        Ok(scenario)
    }

    /// Like `deploy`, but the agent runs with `--kubernetes` against an API server that holds
    /// the fixture as Services, EndpointSlices, Pods and CanaryReleases.
    pub fn deploy_kubernetes(
        fixture: &Path,
        calls: &[(&str, &[&str])],
        node: Node,
    ) -> Result<Scenario> {
        let text = std::fs::read_to_string(fixture)
            .with_context(|| format!("read {}", fixture.display()))?;
        Scenario::deploy_kubernetes_text(&text, calls, &[], Vec::new(), node)
    }

    /// Like `deploy_kubernetes`, from the fixture's text, with more arguments for some
    /// versions' demo services (as `deploy_text`) and for `steer run` (`agent_args`).
    pub fn deploy_kubernetes_text(
        text: &str,
        calls: &[(&str, &[&str])],
        version_args: &[(&str, &str, &[&str])],
        agent_args: Vec<String>,
        node: Node,
    ) -> Result<Scenario> {
        let text = remap(text, &node);
        let config = Config::from_yaml(&text, "fixture")?;
        let runtime = tokio::runtime::Runtime::new()?;
        let server = runtime.block_on(ApiServer::start(objects_from_config(
            &config,
            Cluster::NAMESPACE,
        )));
        let dir = std::env::temp_dir().join(format!("steer-{}", node.name));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_for(server.address))?;
        let cluster = Cluster {
            server,
            kubeconfig,
            _runtime: runtime,
        };
        // The Secret every node of a cluster mounts.
        std::fs::write(dir.join("stamp.key"), "the test cluster's stamp key\n")?;
        let mut scenario = Scenario {
            agent: None,
            workload: Vec::new(),
            kubernetes: Some(cluster),
            config_path: dir.join("unused.yaml"),
            config,
            gateway: SocketAddr::from((node.address, GATEWAY_PORT)),
            admin: SocketAddr::from((node.address, ADMIN_PORT)),
            node,
            agent_args,
            _dir: TempDir(dir),
        };
        scenario.start_workload(calls, version_args)?;
        scenario.start_agent()?;
        scenario.wait_for_workload(calls)?;
        Ok(scenario)
    }

    /// The name the agent knows a fixture's service by.
    pub fn mesh_name(&self, service: &str) -> String {
        match &self.kubernetes {
            Some(_) => format!("{service}.{}", Cluster::NAMESPACE),
            None => service.to_string(),
        }
    }

    fn service_address(&self, name: &str) -> Result<SocketAddr> {
        self.config
            .service(name)
            .and_then(|s| s.addresses.first().copied())
            .with_context(|| format!("service {name} has no address"))
    }

    fn start_workload(
        &mut self,
        calls: &[(&str, &[&str])],
        version_args: &[(&str, &str, &[&str])],
    ) -> Result<()> {
        let demo = binary("demo-service")?;
        for service in self.config.services.clone() {
            let downstream: Vec<String> = calls
                .iter()
                .find(|(name, _)| *name == service.name)
                .map(|(_, d)| d.to_vec())
                .unwrap_or_default()
                .iter()
                .map(|d| Ok(format!("{d}={}", self.service_address(d)?)))
                .collect::<Result<_>>()?;
            for version in &service.versions {
                for endpoint in &version.endpoints {
                    let SocketAddr::V4(endpoint) = endpoint else {
                        bail!("the test bed runs IPv4 workloads");
                    };
                    let pod_name = format!("{}-{}", service.name, version.name);
                    let pod = self.node.add_pod_at(&pod_name, *endpoint.ip())?;
                    let mut command = Command::new(&demo);
                    command
                        .args(["--service", &service.name, "--version", &version.name])
                        .args(["--listen", &format!("0.0.0.0:{}", endpoint.port())]);
                    for call in &downstream {
                        command.args(["--call", call]);
                    }
                    for (_, _, args) in version_args
                        .iter()
                        .filter(|(s, v, _)| *s == service.name && *v == version.name)
                    {
                        command.args(*args);
                    }
                    let process = pod.spawn(&command)?;
                    self.workload.push(process);
                }
            }
            // kube-proxy's view: the service address goes to a primary pod.
            if let (Some(address), Some(primary)) = (service.addresses.first(), service.primary())
                && let Some(endpoint) = primary.endpoints.first()
            {
                self.node.add_service(*address, *endpoint)?;
            }
        }
        Ok(())
    }

    /// Starts (or restarts) `steer run` and waits until it is ready.
    pub fn start_agent(&mut self) -> Result<()> {
        self.agent = None;
        let steer = binary("steer")?;
        let mut command = Command::new(steer);
        command.arg("run");
        match &self.kubernetes {
            Some(cluster) => command
                .args(["--kubernetes", "--node-name", &self.node.name])
                .env("KUBECONFIG", &cluster.kubeconfig),
            None => command.args(["--config", &self.config_path.display().to_string()]),
        };
        command
            .args([
                "--listen",
                &format!(
                    "{},{}",
                    SocketAddr::from((self.node.address, PROXY_PORT)),
                    SocketAddr::from((self.node.address6, PROXY_PORT))
                ),
            ])
            .args(["--gateway", &self.gateway.to_string()])
            .args(["--admin", &self.admin.to_string()])
            .args(["--cgroup", &self.node.cgroup.display().to_string()])
            .args(
                (!self.agent_args.iter().any(|a| a == "--drain-grace"))
                    .then_some(["--drain-grace", "5"])
                    .into_iter()
                    .flatten(),
            )
            // The bed's own key (written with the configuration).
            .arg("--stamp-key")
            .arg(self.config_path.with_file_name("stamp.key"))
            .args(&self.agent_args)
            // Quiet unless asked: warnings and errors (a rejected edit) still show.
            .env(
                "RUST_LOG",
                std::env::var("STEER_LOG").unwrap_or_else(|_| "warn".to_string()),
            );
        self.agent = Some(Process::start_on_host(&mut command, None)?);
        let started = Instant::now();
        loop {
            if let Ok(reply) = http::get(self.admin, "/readyz", &[])
                && reply.status == 200
            {
                break;
            }
            if let Some(agent) = self.agent.as_mut()
                && let Some(status) = agent.try_wait()?
            {
                bail!("steer run exited: {status}");
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("steer run did not become ready");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until the first service of the chain answers through the gateway with every hop
    /// up: pods start listening a little after they are spawned.
    fn wait_for_workload(&self, calls: &[(&str, &[&str])]) -> Result<()> {
        let Some((entry, _)) = calls.first() else {
            return Ok(());
        };
        let started = Instant::now();
        loop {
            match self.request(entry, &[]) {
                Ok(hop) if hop.flatten().iter().all(|h| h.error.is_none()) => return Ok(()),
                Ok(_) | Err(_) if started.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(hop) => bail!("the workload does not answer: {hop:?}"),
                Err(err) => return Err(err.context("the workload does not answer")),
            }
        }
    }

    /// Writes `config` to the agent's file and waits until the agent serves it (its /config
    /// says so). Returns how long that took.
    pub fn apply(&self, config: &Config) -> Result<Duration> {
        let want = serde_json::to_value(config)?;
        std::fs::write(&self.config_path, serde_yaml_ng::to_string(config)?)?;
        let started = Instant::now();
        loop {
            let reply = http::get(self.admin, "/config", &[])?;
            if serde_json::from_str::<serde_json::Value>(&reply.body).ok() == Some(want.clone()) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the agent did not apply the new configuration");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A request through the gateway to `service` with the given tag headers: the path taken.
    pub fn request(&self, service: &str, tags: &[(&str, &str)]) -> Result<Hop> {
        let host = self.mesh_name(service);
        let mut headers = vec![("host", host.as_str())];
        headers.extend_from_slice(tags);
        let reply = http::get(self.gateway, "/", &headers)?;
        if reply.status != 200 {
            bail!("gateway answered {}: {}", reply.status, reply.body);
        }
        serde_json::from_str(&reply.body).with_context(|| format!("demo answer {}", reply.body))
    }
}
