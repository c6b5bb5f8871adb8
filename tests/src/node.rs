//! A simulated Kubernetes node made of network namespaces.
//!
//! The host namespace plays the node (it runs the agent); each pod is a network namespace with
//! a veth to the host and its own cgroup under the bed's parent cgroup, where the eBPF programs
//! are attached (`--cgroup`), so parallel beds never see each other's programs. nftables DNAT in
//! a table of the bed's own plays kube-proxy for service addresses.
//!
//! Address plan of a bed with index B (unique on the machine, see [`Node::new`]):
//! pods 10.201.B.10+ and fd5e:0:B::10+, services 10.202.B.x, the node (proxy) address
//! 10.203.B.1 and fd5f:0:B::1 on the host's `lo`. [`Node::with_index`] lets the demo choose.
//!
//! No packet may leave the machine: before anything else the bed installs a guard that drops
//! every packet its pods send that would be forwarded out of an interface not one of its veths.
//! Everything the bed makes is removed on drop, also when a test panics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context, Result, bail};

static BEDS: AtomicU32 = AtomicU32::new(0);

/// What each live bed made, and the host processes the beds started, so that a bed is torn
/// down from Drop or, in the demo and benchmarks, from Ctrl-C / SIGTERM.
static MADE: Mutex<BTreeMap<String, Made>> = Mutex::new(BTreeMap::new());
static HOST_PROCESSES: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

#[derive(Default)]
struct Made {
    /// Pod network namespaces, host-side veths and cgroups, in creation order.
    pods: Vec<(String, String, PathBuf)>,
    cgroup: Option<PathBuf>,
    /// `ip` arguments that remove an address from `lo`.
    addresses: Vec<Vec<String>>,
    table: Option<String>,
}

fn made(node: &str, change: impl FnOnce(&mut Made)) {
    let mut all = MADE.lock().unwrap_or_else(|e| e.into_inner());
    change(all.entry(node.to_string()).or_default());
}

/// Removes what a bed made. Errors are reported, not raised: teardown goes on regardless.
fn tear_down(node: &str) {
    let Some(made) = MADE.lock().unwrap_or_else(|e| e.into_inner()).remove(node) else {
        return;
    };
    let mut problems = Vec::new();
    for (netns, veth, cgroup) in made.pods.iter().rev() {
        // Only processes this bed started live in its pods' cgroups.
        kill_cgroup(cgroup);
        // Deleting the veth first removes it and its routes now; a namespace's own teardown
        // is asynchronous and would leave them to collide with the next bed.
        let _ = sh("ip", &["link", "del", veth]);
        if let Err(err) = sh("ip", &["netns", "del", netns]) {
            problems.push(err.to_string());
        }
        if let Err(err) = std::fs::remove_dir(cgroup) {
            problems.push(format!("rmdir {}: {err}", cgroup.display()));
        }
    }
    for args in &made.addresses {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(err) = sh("ip", &args) {
            problems.push(err.to_string());
        }
    }
    if let Some(cgroup) = &made.cgroup
        && let Err(err) = std::fs::remove_dir(cgroup)
    {
        problems.push(format!("rmdir {}: {err}", cgroup.display()));
    }
    if let Some(table) = &made.table
        && let Err(err) = nft(&format!("delete table inet {table}"))
    {
        problems.push(err.to_string());
    }
    if !problems.is_empty() {
        eprintln!("test bed {node}: teardown problems: {problems:?}");
    }
}

/// For programs that run a bed (the demo, benchmarks): on SIGINT or SIGTERM, end the host
/// processes the beds started, tear every bed down, and exit. Call first thing in `main`,
/// before any thread starts, so the signals reach the waiting thread only.
pub fn tear_down_on_signals() -> Result<()> {
    let mut signals: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut signals);
        libc::sigaddset(&mut signals, libc::SIGINT);
        libc::sigaddset(&mut signals, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) != 0 {
            bail!("cannot block SIGINT/SIGTERM");
        }
    }
    std::thread::spawn(move || {
        let mut signal = 0;
        unsafe { libc::sigwait(&signals, &mut signal) };
        eprintln!("\nsignal {signal}: cleaning up the test bed");
        for pid in HOST_PROCESSES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        let nodes: Vec<String> = MADE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for node in nodes {
            tear_down(&node);
        }
        std::process::exit(130);
    });
    Ok(())
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<Output> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Children start with no blocked signals: [`tear_down_on_signals`] blocks SIGINT and SIGTERM
/// in its process, and a signal mask is inherited across exec (an agent that cannot see
/// SIGTERM cannot drain).
fn unblock_signals_in_child(command: &mut Command) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// Feeds a script to `nft -f -`.
fn nft(script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run nft (apt-get install nftables)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "nft: {}\n{script}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A process the bed started; killed (by its pid) and reaped on drop.
pub struct Process {
    child: Child,
}

impl Process {
    /// Starts a process in the host namespace (the node) and, when `ready` is given, waits
    /// until it prints that line on stdout (at most 10 s).
    pub fn start_on_host(command: &mut Command, ready: Option<&str>) -> Result<Process> {
        use std::io::BufRead;
        if ready.is_some() {
            command.stdout(Stdio::piped());
        }
        unblock_signals_in_child(command);
        let mut child = command
            .spawn()
            .with_context(|| format!("start {:?}", command.get_program()))?;
        HOST_PROCESSES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(child.id());
        let Some(ready) = ready else {
            return Ok(Process { child });
        };
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let ready = ready.to_string();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let seen = lines.by_ref().any(|l| l.is_ok_and(|l| l.contains(&ready)));
            let _ = tx.send(seen);
            // Keep draining so the process never blocks on a full pipe.
            for _ in lines {}
        });
        let process = Process { child };
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(true) => Ok(process),
            _ => bail!("{:?} did not become ready", command.get_program()),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills it now with `signal` (e.g. `libc::SIGKILL`) and waits for it to exit.
    pub fn signal(&mut self, signal: i32) -> Result<std::process::ExitStatus> {
        let pid = self.child.id() as i32;
        HOST_PROCESSES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.child.id());
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(self.child.wait()?)
    }

    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        HOST_PROCESSES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.child.id());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// One pod: a network namespace with a veth to the host and a cgroup.
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub cgroup: PathBuf,
}

impl Pod {
    /// Starts `command` inside this pod's network namespace and cgroup (output discarded,
    /// errors to the test's stderr).
    pub fn spawn(&self, command: &Command) -> Result<Process> {
        Ok(Process {
            child: self.spawn_child(command, |c| {
                c.stdout(Stdio::null());
            })?,
        })
    }

    /// Starts `command` inside the pod with its stdin and stdout piped to the caller (stderr
    /// goes to the caller's): for a part that says on stdout when it is ready and ends when its
    /// stdin closes.
    pub fn spawn_piped(&self, command: &Command) -> Result<(Process, ChildStdin, ChildStdout)> {
        let mut child = self.spawn_child(command, |c| {
            c.stdin(Stdio::piped()).stdout(Stdio::piped());
        })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        Ok((Process { child }, stdin, stdout))
    }

    /// Runs a command inside the pod (netns and cgroup) to completion, capturing its output.
    pub fn exec(&self, command: &Command) -> Result<Output> {
        let child = self.spawn_child(command, |c| {
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
        })?;
        Ok(child.wait_with_output()?)
    }

    fn spawn_child(&self, command: &Command, stdio: impl FnOnce(&mut Command)) -> Result<Child> {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", &self.netns])
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        stdio(&mut wrapped);
        unblock_signals_in_child(&mut wrapped);
        let procs = self.cgroup.join("cgroup.procs");
        // Join the pod's cgroup before `ip` execs the command, so every descendant is inside.
        unsafe {
            wrapped.pre_exec(move || std::fs::write(&procs, std::process::id().to_string()));
        }
        wrapped
            .spawn()
            .with_context(|| format!("start {:?} in pod {}", command.get_program(), self.name))
    }
}

/// The simulated node. Dropping it tears everything down.
pub struct Node {
    pub name: String,
    pub index: u8,
    /// Where the node's proxy listens (an address on the host's `lo`).
    pub address: Ipv4Addr,
    pub address6: Ipv6Addr,
    /// The parent cgroup of the bed's pods: attach the programs here.
    pub cgroup: PathBuf,
    pods: Vec<Pod>,
    table: String,
    /// Holds the bed's index against other processes until the bed is gone.
    _claim: std::fs::File,
}

/// Where beds claim their index: one lock file per index, locked while a bed has it (the
/// kernel lets go when the process ends, however it ends).
const CLAIMS: &str = "/run/steer-test-beds";

/// Claims an index for this process's bed, or `None` when another bed holds it.
fn claim(index: u8) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(CLAIMS).with_context(|| format!("create {CLAIMS}"))?;
    let path = Path::new(CLAIMS).join(format!("{index}.lock"));
    let file = std::fs::File::create(&path).with_context(|| format!("open {}", path.display()))?;
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    Ok(locked.then_some(file))
}

impl Node {
    /// A bed with its own name and address ranges, unique among the beds of every process on
    /// the machine (tests of a binary run in parallel, and so may two test runs).
    pub fn new() -> Result<Node> {
        let n = BEDS.fetch_add(1, Ordering::Relaxed);
        let start = std::process::id() + n * 37;
        for k in 0..200 {
            let index = ((start + k) % 200 + 20) as u8;
            if let Some(claim) = claim(index)? {
                return Node::build(index, claim);
            }
        }
        bail!("all 200 test bed indices are in use")
    }

    /// A bed with this index; fails when another bed (of any process) has it.
    pub fn with_index(index: u8) -> Result<Node> {
        let claim = claim(index)?.with_context(|| format!("test bed index {index} is in use"))?;
        Node::build(index, claim)
    }

    fn build(index: u8, claim: std::fs::File) -> Result<Node> {
        let name = format!("st{}x{index}", std::process::id() % 10_000);
        let cgroup = cgroup2_mount()?.join(format!("steer-test-{name}"));
        let node = Node {
            name: name.clone(),
            index,
            address: Ipv4Addr::new(10, 203, index, 1),
            address6: format!("fd5f:0:{index:x}::1").parse()?,
            cgroup,
            pods: Vec::new(),
            table: format!("steer_{name}"),
            _claim: claim,
        };
        // From here on, Drop (or a signal) removes whatever was made.
        node.install_guard()?;
        made(&name, |m| m.table = Some(node.table.clone()));
        std::fs::create_dir(&node.cgroup)
            .with_context(|| format!("create cgroup {}", node.cgroup.display()))?;
        made(&name, |m| m.cgroup = Some(node.cgroup.clone()));
        for (family, address) in [
            ("-4", format!("{}/32", node.address)),
            ("-6", format!("{}/128", node.address6)),
        ] {
            // nodad: the IPv6 address is usable (as a route source) at once.
            let mut add = vec![family, "addr", "add", &address, "dev", "lo"];
            if family == "-6" {
                add.push("nodad");
            }
            sh("ip", &add)?;
            let undo = [family, "addr", "del", &address, "dev", "lo"].map(String::from);
            made(&name, |m| m.addresses.push(undo.to_vec()));
        }
        // The kube-proxy path forwards pod to pod through the host.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enable ip_forward")?;
        Ok(node)
    }

    fn veth_prefix(&self) -> String {
        format!("{}v", self.name)
    }

    /// The guard first, then (empty) kube-proxy chains that [`Node::add_service`] fills.
    fn install_guard(&self) -> Result<()> {
        let prefix = self.veth_prefix();
        nft(&format!(
            "table inet {table} {{
  chain guard {{
    type filter hook forward priority -300; policy accept;
    iifname \"{prefix}*\" oifname != \"{prefix}*\" drop
  }}
  chain kube_proxy_pre {{ type nat hook prerouting priority -100; policy accept; }}
  chain kube_proxy_out {{ type nat hook output priority -100; policy accept; }}
}}",
            table = self.table
        ))
    }

    /// A pod address of this bed's range.
    pub fn pod_ip(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.index, 10 + i)
    }

    /// A service address of this bed's range.
    pub fn service_ip(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, self.index, 10 + i)
    }

    /// Adds a pod at the next address of the bed's range.
    pub fn add_pod(&mut self, name: &str) -> Result<&Pod> {
        let i = self.pods.len() as u8;
        let ip = self.pod_ip(i);
        self.add_pod_at(name, ip)
    }

    /// Adds a pod at a chosen IPv4 address.
    pub fn add_pod_at(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Pod> {
        let i = self.pods.len();
        let netns = format!("{}p{i}", self.name);
        let host_veth = format!("{}{i}", self.veth_prefix());
        let ip6: Ipv6Addr = format!("fd5e:0:{:x}::{:x}", self.index, 0x10 + i).parse()?;
        let cgroup = self.cgroup.join(format!("pod-{name}"));
        sh("ip", &["netns", "add", &netns])?;
        made(&self.name, |m| {
            m.pods
                .push((netns.clone(), host_veth.clone(), cgroup.clone()))
        });
        self.pods.push(Pod {
            name: name.to_string(),
            netns: netns.clone(),
            ip,
            ip6,
            cgroup: cgroup.clone(),
        });
        std::fs::create_dir(&cgroup).with_context(|| format!("create {}", cgroup.display()))?;
        let in_pod = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &netns];
            full.extend_from_slice(args);
            sh("ip", &full)
        };
        sh(
            "ip",
            &[
                "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        // Answer the pod's ARP for its gateway at once (the kernel delays proxy ARP replies by
        // up to 0.8 s by default, which stalls every new pod's first packets).
        sh(
            "sysctl",
            &[
                "-qw",
                &format!("net.ipv4.conf.{host_veth}.proxy_arp=1"),
                &format!("net.ipv4.neigh.{host_veth}.proxy_delay=0"),
            ],
        )?;
        sh("ip", &["link", "set", &host_veth, "up"])?;
        sh(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &host_veth,
                "nodad",
            ],
        )?;
        // The node's own address is the source of its connections to pods (as a node IP is
        // in a cluster): without it the kernel may pick another bed's address, which vanishes
        // when that bed is torn down and strands the connection.
        let (src, src6) = (self.address.to_string(), self.address6.to_string());
        sh(
            "ip",
            &[
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &host_veth,
                "src",
                &src,
            ],
        )?;
        sh(
            "ip",
            &[
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                &host_veth,
                "src",
                &src6,
            ],
        )?;
        in_pod(&["ip", "link", "set", "lo", "up"])?;
        in_pod(&["ip", "link", "set", "eth0", "up"])?;
        in_pod(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        in_pod(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        // Like Calico: a link-local gateway the host answers for (proxy ARP / fe80::1).
        in_pod(&[
            "ip",
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        in_pod(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        in_pod(&[
            "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ])?;
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Makes `service` reach `endpoint` the kube-proxy way (DNAT), for pods and the host.
    pub fn add_service(&mut self, service: SocketAddr, endpoint: SocketAddr) -> Result<()> {
        let rule = match (service.ip(), endpoint.ip()) {
            (IpAddr::V4(s), IpAddr::V4(e)) => format!(
                "ip daddr {s} tcp dport {} dnat ip to {e}:{}",
                service.port(),
                endpoint.port()
            ),
            (IpAddr::V6(s), IpAddr::V6(e)) => format!(
                "ip6 daddr {s} tcp dport {} dnat ip6 to [{e}]:{}",
                service.port(),
                endpoint.port()
            ),
            _ => bail!("service {service} and endpoint {endpoint} differ in family"),
        };
        for chain in ["kube_proxy_pre", "kube_proxy_out"] {
            nft(&format!("add rule inet {} {chain} {rule}", self.table))?;
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        tear_down(&self.name);
    }
}

/// Kills the processes left in a pod's cgroup (all started by the bed) and waits until the
/// cgroup is empty, so it can be removed.
fn kill_cgroup(cgroup: &Path) {
    for _ in 0..100 {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_mount() -> Result<PathBuf> {
    steer::datapath::cgroup2_root()
}
