//! The eBPF datapath: loads the programs embedded in this binary, attaches them to a cgroup v2
//! directory, and keeps their maps in step with the configuration.
//!
//! The attachments are links owned by this process: when the agent exits or is killed they are
//! detached by the kernel and pods' connections take the cluster's normal service path again
//! (fail open, never a black-holed node).

use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use steer_common::{ProxyConfig, SockKey, maps};
use tracing::{debug, info, warn};

/// The compiled programs, built by agent/build.rs from ebpf/steer-ebpf.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer"));

/// Attachments are bpf links, which always coexist with other programs on the cgroup (the
/// kernel rejects the legacy multi-attach flags on links).
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Where to attach and where the proxy listens.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// A cgroup v2 directory; every process below it is subject to redirection.
    pub cgroup: PathBuf,
    /// Where IPv4 (and IPv4-mapped) connections go; `None`: they are not redirected.
    pub proxy_v4: Option<SocketAddrV4>,
    /// Where IPv6 connections go; `None`: they are not redirected.
    pub proxy_v6: Option<SocketAddrV6>,
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct Datapath {
    // Field order matters for drop: maps and logger before the programs' object.
    services: HashMap<MapData, SockKey, u8>,
    opt_out: HashMap<MapData, u64, u8>,
    /// The cgroup the programs are attached to: relative opt-out paths are below it.
    root: PathBuf,
    installed: HashSet<SocketAddr>,
    originals: OriginalDestinations,
    by_cookie: HashMap<MapData, u64, SockKey>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    _ebpf: Ebpf,
}

/// Reads (and removes) the original destination of a redirected connection, by the client's
/// address as the proxy sees it on accept. Cheap to clone; safe to use from any task.
#[derive(Clone)]
pub struct OriginalDestinations {
    by_client: Arc<Mutex<HashMap<MapData, SockKey, SockKey>>>,
}

impl OriginalDestinations {
    /// The service address a redirected client connected to; removes the record.
    pub fn take(&self, client: SocketAddr) -> Option<SocketAddr> {
        let key = sock_key(client);
        let mut map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        let original = map.get(&key, 0).ok()?;
        // Already read: the record has served its purpose (and a failure leaves it to the LRU).
        let _ = map.remove(&key);
        Some(socket_addr(&original))
    }

    /// Records currently waiting for the proxy.
    pub fn pending(&self) -> usize {
        let map = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        map.keys().count()
    }
}

fn sock_key(addr: SocketAddr) -> SockKey {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    SockKey::new(ip.octets(), addr.port())
}

fn socket_addr(key: &SockKey) -> SocketAddr {
    match key.as_v4() {
        Some(v4) => SocketAddr::from((Ipv4Addr::from(v4), key.port)),
        None => SocketAddr::from((std::net::Ipv6Addr::from(key.addr), key.port)),
    }
}

/// The first cgroup v2 mount in /proc/mounts (the root the programs attach to by default).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .next()
        .context("no cgroup v2 hierarchy is mounted (looked for a cgroup2 entry in /proc/mounts)")
}

fn open_cgroup(path: &Path) -> Result<File> {
    let dir = File::open(path).with_context(|| format!("cannot open cgroup {}", path.display()))?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    if stat.f_type as i64 != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory (steer needs the unified hierarchy)",
            path.display()
        );
    }
    Ok(dir)
}

/// The network namespace cookie of this process's namespace: the host's, never redirected.
fn own_netns_cookie() -> Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("socket for SO_NETNS_COOKIE")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("getsockopt(SO_NETNS_COOKIE): the kernel is too old (needs 5.14+)");
    }
    Ok(cookie)
}

/// Turns load/attach failures into the reason an operator can act on.
fn explain_bpf_error(err: impl Into<anyhow::Error>, what: &str) -> anyhow::Error {
    let err = err.into();
    let text = format!("{err:#}");
    let hint = if text.contains("Operation not permitted") || text.contains("EPERM") {
        "no permission to load eBPF programs: run as root or with CAP_BPF, CAP_NET_ADMIN and \
         CAP_SYS_ADMIN"
    } else if text.contains("Invalid argument") || text.contains("not supported") {
        "the kernel rejected it: it may be too old (steer needs Linux 5.14+ with cgroup BPF)"
    } else {
        "eBPF setup failed"
    };
    err.context(format!("{what}: {hint}"))
}

type TakenMap<K, V> = HashMap<MapData, K, V>;

fn take_hash<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &str) -> Result<TakenMap<K, V>> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    HashMap::try_from(map).with_context(|| format!("map {name}"))
}

impl Datapath {
    /// Loads the programs and attaches them to `options.cgroup`.
    pub fn attach(options: &DatapathOptions) -> Result<Datapath> {
        let cgroup = open_cgroup(&options.cgroup)?;
        let mut ebpf =
            Ebpf::load(PROGRAMS).map_err(|e| explain_bpf_error(e, "load eBPF object"))?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                warn!(error = %err, "eBPF diagnostics unavailable");
                None
            }
        };

        let mut config: Array<MapData, ProxyConfig> = Array::try_from(
            ebpf.take_map(maps::CONFIG)
                .context("map CONFIG missing from the eBPF object")?,
        )?;
        let (proxy_v4, proxy_v4_port) = options
            .proxy_v4
            .map_or(([0; 4], 0), |a| (a.ip().octets(), a.port()));
        let (proxy_v6, proxy_v6_port) = options
            .proxy_v6
            .map_or(([0; 16], 0), |a| (a.ip().octets(), a.port()));
        config.set(
            0,
            ProxyConfig {
                host_netns_cookie: own_netns_cookie()?,
                proxy_v4,
                proxy_v4_port,
                has_v6: u8::from(options.proxy_v6.is_some()),
                has_v4: u8::from(options.proxy_v4.is_some()),
                proxy_v6,
                proxy_v6_port,
                _pad2: [0; 6],
            },
            0,
        )?;

        for name in [
            "steer_connect4",
            "steer_connect6",
            "steer_getpeername4",
            "steer_getpeername6",
        ] {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            program
                .load()
                .map_err(|e| explain_bpf_error(e, &format!("load {name}")))?;
            program
                .attach(&cgroup, LINK_MODE)
                .map_err(|e| explain_bpf_error(e, &format!("attach {name}")))?;
        }
        let sock_ops: &mut SockOps = ebpf
            .program_mut("steer_sock_ops")
            .context("program steer_sock_ops missing")?
            .try_into()?;
        sock_ops
            .load()
            .map_err(|e| explain_bpf_error(e, "load steer_sock_ops"))?;
        sock_ops
            .attach(&cgroup, LINK_MODE)
            .map_err(|e| explain_bpf_error(e, "attach steer_sock_ops"))?;
        info!(cgroup = %options.cgroup.display(), proxy_v4 = ?options.proxy_v4, proxy_v6 = ?options.proxy_v6, "eBPF datapath attached");

        Ok(Datapath {
            services: take_hash(&mut ebpf, maps::SERVICES)?,
            opt_out: take_hash(&mut ebpf, maps::OPT_OUT)?,
            root: options.cgroup.clone(),
            installed: HashSet::new(),
            originals: OriginalDestinations {
                by_client: Arc::new(Mutex::new(take_hash(&mut ebpf, maps::BY_CLIENT)?)),
            },
            by_cookie: take_hash(&mut ebpf, maps::BY_COOKIE)?,
            logger,
            _ebpf: ebpf,
        })
    }

    /// Replaces the set of mesh service addresses: only the difference touches the map, so
    /// connections to unchanged services are never affected.
    pub fn set_services(&mut self, addresses: &[SocketAddr]) -> Result<()> {
        let wanted: HashSet<SocketAddr> = addresses.iter().copied().collect();
        for gone in self.installed.difference(&wanted) {
            self.services
                .remove(&sock_key(*gone))
                .with_context(|| format!("remove service {gone}"))?;
        }
        for new in wanted.difference(&self.installed) {
            self.services
                .insert(sock_key(*new), 1, 0)
                .with_context(|| format!("add service {new}"))?;
        }
        debug!(services = wanted.len(), "service addresses installed");
        self.installed = wanted;
        Ok(())
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.root
    }

    /// Pods whose connections are never redirected, by cgroup (a pod's cgroup covers its
    /// containers' cgroups below it): absolute paths, or relative to the attach cgroup.
    /// Returns the cgroups that do not exist (a pod that is gone), which are left out.
    pub fn set_opt_out(&mut self, cgroups: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut missing = Vec::new();
        let mut wanted = HashSet::new();
        for path in cgroups.iter().map(|path| self.root.join(path)) {
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => {
                    wanted.insert(meta.ino());
                }
                Ok(_) => bail!("opt-out cgroup {} is not a directory", path.display()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => missing.push(path),
                Err(err) => {
                    return Err(err).with_context(|| format!("opt-out cgroup {}", path.display()));
                }
            }
        }
        let current: Vec<u64> = self.opt_out.keys().collect::<Result<_, _>>()?;
        for id in current.iter().filter(|id| !wanted.contains(id)) {
            self.opt_out.remove(id)?;
        }
        for id in &wanted {
            self.opt_out
                .insert(id, 1, 0)
                .context("the opt-out map is full")?;
        }
        Ok(missing)
    }

    /// Forwards the programs' diagnostics to the log from a tokio task (call once, inside a
    /// runtime). The programs log only on their rare failure paths.
    pub fn forward_logs(&mut self) -> Result<()> {
        let Some(logger) = self.logger.take() else {
            return Ok(());
        };
        // SAFETY: the logger owns its buffer's fd and keeps it open until it is dropped, which
        // happens only when the AsyncFd is.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)
        .context("watch the eBPF log buffer")?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// The handle the proxy uses on accept.
    pub fn original_destinations(&self) -> OriginalDestinations {
        self.originals.clone()
    }

    /// Sizes of the connection records (socket-cookie map, client map): both return to zero
    /// once connections have closed and the proxy has read them.
    pub fn record_counts(&self) -> (usize, usize) {
        (self.by_cookie.keys().count(), self.originals.pending())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(cgroup: &str) -> DatapathOptions {
        DatapathOptions {
            cgroup: PathBuf::from(cgroup),
            proxy_v4: Some("127.0.0.1:15001".parse().unwrap()),
            proxy_v6: None,
        }
    }

    #[test]
    fn a_directory_that_is_not_cgroup_v2_is_refused_with_the_reason() {
        let dir = std::env::temp_dir();
        let err = Datapath::attach(&options(dir.to_str().unwrap()))
            .err()
            .expect("tmp is no cgroup");
        assert!(
            format!("{err:#}").contains("is not a cgroup v2 directory"),
            "{err:#}"
        );
        let err = Datapath::attach(&options("/nonexistent/cgroup"))
            .err()
            .expect("missing path");
        assert!(
            format!("{err:#}").contains("cannot open cgroup /nonexistent/cgroup"),
            "{err:#}"
        );
    }

    #[test]
    fn client_keys_round_trip_both_families() {
        for addr in ["10.1.2.3:4567", "[fd00::1]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(socket_addr(&sock_key(addr)), addr);
        }
        let key = sock_key("10.1.2.3:80".parse().unwrap());
        assert_eq!(key.as_v4(), Some([10, 1, 2, 3]));
    }
}
