//! The proxies under test (steer, nginx, haproxy) on the node, and what their processes cost.

use std::{
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use steer_tests::{Node, Process, http, scenario};

pub const STEER_PORT: u16 = 15001;
pub const STEER_ADMIN_PORT: u16 = 15000;
/// The soft file descriptor limit every proxy starts with, as a service manager gives it
/// (systemd's default): each must raise it (or be configured to) to hold many connections.
const SOFT_FD_LIMIT: u64 = 1024;

/// nginx's worker processes, killed by pid at exit: killing its master (which the test bed
/// does on Ctrl-C) would leave them running.
static NGINX_WORKERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub extern "C" fn kill_nginx_workers() {
    if let Ok(workers) = NGINX_WORKERS.lock() {
        for pid in workers.iter() {
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// nginx's master; stopped gracefully on drop so that it takes its workers along.
pub struct Nginx(Process);

impl Nginx {
    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.0.id()];
        pids.extend(
            NGINX_WORKERS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter(),
        );
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.signal(libc::SIGQUIT);
        NGINX_WORKERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

pub fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Pins a command to `cpus` (taskset execs it: the pid stays the command's).
pub fn pinned(cpus: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", cpus]).arg(program);
    command
}

/// A proxy's command: pinned, and with the soft fd limit of a service.
fn proxy_command(cpus: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = pinned(cpus, program);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut limit: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = limit.rlim_cur.min(SOFT_FD_LIMIT);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
            Ok(())
        });
    }
    command
}

/// The hard file descriptor limit the proxies inherit: what nginx and haproxy may raise their
/// soft limits to.
pub fn hard_fd_limit() -> Result<u64> {
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    Ok(limit.rlim_max)
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces): the
/// first is the state, field `n` of proc(5) is at `n - 3`.
fn stat_fields(pid: u32) -> Result<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("no command name")? + 1..];
    // The state is a letter: number it 0 to keep the indexes.
    Ok(rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect())
}

/// CPU time (user + system) the processes used so far, every thread of theirs, live or
/// exited. The kernel counts it in clock ticks (10 ms): long runs make it precise.
pub fn cpu_time(pids: &[u32]) -> Result<Duration> {
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let mut ticks = 0;
    for &pid in pids {
        let fields = stat_fields(pid)?;
        // utime and stime, fields 14 and 15.
        ticks += fields.get(11).context("no utime")? + fields.get(12).context("no stime")?;
    }
    Ok(Duration::from_nanos(
        ticks * 1_000_000_000 / ticks_per_second,
    ))
}

/// Resident memory of the processes, summed (nginx: master and workers).
pub fn rss_kb(pids: &[u32]) -> Result<u64> {
    let mut kb = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status"))?;
        kb += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no VmRSS for pid {pid}"))?;
    }
    Ok(kb)
}

fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        // The parent pid is field 4.
        .filter(|&pid| stat_fields(pid).is_ok_and(|f| f.get(1) == Some(&(parent as u64))))
        .collect()
}

fn wait_listening(address: SocketAddr, what: &str, process: &mut Process) -> Result<()> {
    let started = Instant::now();
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        if let Some(status) = process.try_wait()? {
            bail!("{what} exited: {status}");
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("{what} does not listen on {address}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts `steer run` with the food-delivery example, measures its idle memory, then adds the
/// benchmark's service (`mesh`, served by `upstream`) with a live reload.
pub fn start_steer(
    node: &Node,
    dir: &Path,
    cpus: &str,
    workers: usize,
    upstream: SocketAddr,
    mesh: SocketAddr,
) -> Result<(Process, u64)> {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/food-delivery.yaml");
    let text = scenario::remap(
        &std::fs::read_to_string(&example)
            .with_context(|| format!("read {}", example.display()))?,
        node,
    );
    let config = dir.join("steer.yaml");
    std::fs::write(&config, &text)?;
    let admin = SocketAddr::from((node.address, STEER_ADMIN_PORT));
    let mut steer = Process::start_on_host(
        proxy_command(cpus, scenario::binary("steer")?)
            .arg("run")
            .args(["--config", &config.display().to_string()])
            .args([
                "--listen",
                &SocketAddr::from((node.address, STEER_PORT)).to_string(),
            ])
            .args(["--admin", &admin.to_string()])
            .args(["--cgroup", &node.cgroup.display().to_string()])
            .args(["--workers", &workers.to_string()])
            .env("RUST_LOG", "warn"),
        None,
    )?;
    let started = Instant::now();
    while !http::get(admin, "/readyz", &[]).is_ok_and(|r| r.status == 200) {
        if let Some(status) = steer.try_wait()? {
            bail!("steer run exited: {status}");
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "steer run did not become ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Idle: the example loaded, no traffic yet (the readiness probes aside).
    std::thread::sleep(Duration::from_secs(1));
    let idle_kb = rss_kb(&[steer.id()])?;

    // Then the benchmark's service joins the example (a live reload of the file).
    let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)?;
    let service: serde_yaml_ng::Value = serde_yaml_ng::from_str(&format!(
        "{{ name: bench, addresses: [\"{mesh}\"], \
         versions: [{{ name: v1, primary: true, endpoints: [\"{upstream}\"] }}] }}"
    ))?;
    yaml["services"]
        .as_sequence_mut()
        .context("the example has services")?
        .push(service);
    write_and_wait(&config, &yaml, admin, "\"bench\"", true)?;
    Ok((steer, idle_kb))
}

/// Writes `yaml` to the configuration file and waits until the admin server's `/config` does
/// (or, `present` false, no longer does) contain `marker`: the time a live reload takes.
fn write_and_wait(
    config: &Path,
    yaml: &serde_yaml_ng::Value,
    admin: SocketAddr,
    marker: &str,
    present: bool,
) -> Result<Duration> {
    std::fs::write(config, serde_yaml_ng::to_string(yaml)?)?;
    let started = Instant::now();
    while http::get(admin, "/config", &[]).map(|r| r.body.contains(marker))? != present {
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "steer run did not apply the edit ({marker})"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(started.elapsed())
}

/// Reload latencies of `edits` valid edits (a service added, then removed again), sorted.
pub fn reloads(config: &Path, admin: SocketAddr, edits: usize) -> Result<Vec<Duration>> {
    let text = std::fs::read_to_string(config)?;
    let resting: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)?;
    let mut edited = resting.clone();
    let probe: serde_yaml_ng::Value =
        serde_yaml_ng::from_str("{ name: reload-probe, versions: [{ name: v1, primary: true }] }")?;
    edited["services"]
        .as_sequence_mut()
        .context("the configuration has services")?
        .push(probe);
    let mut took = Vec::new();
    for edit in 0..edits {
        let (yaml, present) = if edit % 2 == 0 {
            (&edited, true)
        } else {
            (&resting, false)
        };
        // Files are compared by modification time: let the clock move on between edits, by
        // varying amounts, so that the edits land at every phase of the agent's file polling.
        std::thread::sleep(Duration::from_millis(30 + (edit as u64 * 7) % 25));
        took.push(write_and_wait(
            config,
            yaml,
            admin,
            "reload-probe",
            present,
        )?);
    }
    took.sort_unstable();
    Ok(took)
}

/// nginx as a plain reverse proxy with keep-alive upstream connections, able to hold
/// `connections` client connections (each may need an upstream one too).
pub fn start_nginx(
    dir: &Path,
    cpus: &str,
    workers: usize,
    connections: usize,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Nginx> {
    let d = dir.display();
    let config = dir.join("nginx.conf");
    // All connections may land on one worker; each may pair with an upstream connection.
    let fds = hard_fd_limit()?;
    let worker_connections = (2 * connections as u64 + 1024).min(fds - 64);
    std::fs::write(
        &config,
        format!(
            "daemon off;
master_process on;
user root;
worker_processes {workers};
worker_rlimit_nofile {fds};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
  access_log off;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
  upstream bench {{
    server {upstream};
    keepalive 256;
    keepalive_requests 100000000;
  }}
  server {{
    listen {listen};
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }}
  }}
}}
"
        ),
    )?;
    let mut master = Process::start_on_host(
        proxy_command(cpus, "nginx")
            .args(["-e", &format!("{d}/nginx-error.log")])
            .args(["-p", &format!("{d}/")])
            .args(["-c", &config.display().to_string()]),
        None,
    )
    .context("start nginx (apt-get install nginx-light; cargo xtask bench does)")?;
    wait_listening(listen, "nginx", &mut master)?;
    let started = Instant::now();
    loop {
        let workers_now = children(master.id());
        if workers_now.len() >= workers {
            *NGINX_WORKERS.lock().unwrap_or_else(|e| e.into_inner()) = workers_now;
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "nginx started {} workers",
            workers_now.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Nginx(master))
}

/// haproxy as a plain reverse proxy with keep-alive upstream connections, able to hold
/// `connections` client connections.
pub fn start_haproxy(
    dir: &Path,
    cpus: &str,
    workers: usize,
    connections: usize,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Process> {
    let config = dir.join("haproxy.cfg");
    // haproxy reserves two fds per connection (client and server side) and refuses to start
    // when its fd limit, at most the hard one, is lower: that may cap the connections it holds.
    let fds = hard_fd_limit()?;
    let maxconn = (connections as u64 + 1024).min((fds - 64) / 2);
    if maxconn < connections as u64 {
        eprintln!(
            "proxy-bench: haproxy holds at most {maxconn} connections: the fd hard limit is {fds}"
        );
    }
    std::fs::write(
        &config,
        format!(
            "global
  nbthread {workers}
  maxconn {maxconn}
  ulimit-n {fds}
defaults
  mode http
  maxconn {maxconn}
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
frontend bench
  bind {listen}
  default_backend bench
backend bench
  server upstream {upstream}
"
        ),
    )?;
    let mut haproxy = Process::start_on_host(
        proxy_command(cpus, "haproxy")
            .arg("-db")
            .args(["-f", &config.display().to_string()]),
        None,
    )
    .context("start haproxy (apt-get install haproxy; cargo xtask bench does)")?;
    wait_listening(listen, "haproxy", &mut haproxy)?;
    Ok(haproxy)
}
