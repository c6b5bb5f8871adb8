//! `cargo xtask bench` part: what the node proxy costs a call, next to nginx and haproxy.
//!
//! One run on one test bed (root), every case measured side by side in alternating rounds:
//!
//! - **Latency at a fixed rate** (open loop): a client pod sends requests on a schedule (1,000/s
//!   by default, spread over a few keep-alive connections) and each latency is measured from
//!   the request's *scheduled* send time, so a stall delays the requests behind it and shows up
//!   in the figures (no coordinated omission). Cases: (a) the pod calls a service address that
//!   only kube-proxy's DNAT serves (no steer), (b) it calls a mesh service address, which the
//!   eBPF programs redirect into `steer run`, (c) it calls nginx and (d) haproxy, both plain
//!   reverse proxies with keep-alive upstream connections on the same node address.
//! - **Throughput** (closed loop): N keep-alive connections send back to back for a fixed time.
//! - **Idle memory**: VmRSS of `steer run` with the food-delivery example loaded, before any
//!   traffic, next to nginx (master + workers) and haproxy.
//!
//! Every proxy is pinned to the same CPUs with the same number of workers (nginx
//! `worker_processes`, haproxy `nbthread`, steer `TOKIO_WORKER_THREADS`); the client and the
//! upstream (a minimal hyper server answering a small body) run on the other CPUs.
//!
//! The same binary plays every part: without a subcommand it runs the benchmark; `upstream`,
//! `check`, `latency` and `throughput` are what it runs inside the pods.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use steer_tests::{Node, Process, http, scenario};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    options: Options,
}

#[derive(clap::Args)]
struct Options {
    /// Requests per second of the latency runs.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Measured seconds of each latency run (after a second of warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Keep-alive connections of the latency runs.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Concurrent keep-alive connections of the throughput runs.
    #[arg(long, default_value_t = 64)]
    throughput_connections: usize,
    /// Measured seconds of each throughput run.
    #[arg(long, default_value_t = 4)]
    throughput_seconds: u64,
    /// Rounds; the cases alternate within each round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// CPUs of the proxies (taskset list); default: the upper half of the machine's CPUs.
    #[arg(long)]
    proxy_cpus: Option<String>,
    /// CPUs of the client and the upstream; default: the lower half.
    #[arg(long)]
    load_cpus: Option<String>,
}

#[derive(Subcommand)]
enum Role {
    /// The upstream service: answers every request with a small body.
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Retries one request to `target` until it answers 200 (at most 10 s).
    Check { target: SocketAddr },
    /// Open loop: `rate` requests per second over `connections`; prints the latencies (ns from
    /// each request's scheduled send time) as JSON.
    Latency {
        target: SocketAddr,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        connections: usize,
    },
    /// Closed loop: `connections` send back to back for `seconds`; prints the count as JSON.
    Throughput {
        target: SocketAddr,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        connections: usize,
    },
}

/// What the client sends: a tagged request, so steer evaluates its rules as for real traffic.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: bench\r\nuser-agent: proxy-bench\r\n\
x-device: ios\r\nx-user-id: 42\r\n\r\n";
const BODY: &str = "hello from the bench upstream\n";
const WARM_UP: Duration = Duration::from_secs(1);
/// Valid edits of steer's configuration file, timed until they serve.
const RELOADS: usize = 20;

const UPSTREAM_PORT: u16 = 8080;
const STEER_PORT: u16 = 15001;
const STEER_ADMIN_PORT: u16 = 15000;
const NGINX_PORT: u16 = 18080;
const HAPROXY_PORT: u16 = 18081;

fn main() -> Result<()> {
    let args = Args::parse();
    match args.role {
        None => benchmark(&args.options),
        Some(Role::Upstream { listen }) => upstream(listen),
        Some(Role::Check { target }) => check(target),
        Some(Role::Latency {
            target,
            rate,
            seconds,
            connections,
        }) => latency(target, rate, seconds, connections),
        Some(Role::Throughput {
            target,
            seconds,
            connections,
        }) => throughput(target, seconds, connections),
    }
}

// ---------------------------------------------------------------------------------------------
// The parts played inside the pods.

/// A runtime with one worker per CPU this process may run on (taskset decides).
fn runtime() -> Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

fn upstream(listen: SocketAddr) -> Result<()> {
    use http_body_util::Full;
    use hyper::{Response, service::service_fn};
    use hyper_util::rt::TokioIo;
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen on {listen}"))?;
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "text/plain")
                            .body(Full::new(bytes::Bytes::from_static(BODY.as_bytes())))
                            .expect("valid response"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status and length of the complete response at the start of `buf`; `None` while more
/// bytes are needed. Content-Length and chunked bodies.
fn response_len(buf: &[u8]) -> Result<Option<(u16, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end])?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let (mut length, mut chunked) = (None, false);
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>()?);
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let mut at = head_end + 4;
    if chunked {
        loop {
            let Some(end) = find(&buf[at..], b"\r\n") else {
                return Ok(None);
            };
            let size = std::str::from_utf8(&buf[at..at + end])?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
            at += end + 2;
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    let Some(end) = find(&buf[at..], b"\r\n") else {
                        return Ok(None);
                    };
                    at += end + 2;
                    if end == 0 {
                        return Ok(Some((status, at)));
                    }
                }
            }
            if buf.len() < at + size + 2 {
                return Ok(None);
            }
            at += size + 2;
        }
    }
    let length = match length {
        Some(length) => length,
        None if matches!(status, 204 | 304) => 0,
        None => bail!("a response without a length cannot be kept alive: {head:?}"),
    };
    Ok((buf.len() >= at + length).then_some((status, at + length)))
}

/// Takes the complete response off the front of `buf`, if there is one; it must be a 200.
fn take_response(buf: &mut Vec<u8>) -> Result<bool> {
    match response_len(buf)? {
        None => Ok(false),
        Some((status, len)) => {
            buf.drain(..len);
            ensure!(status == 200, "answered {status}");
            Ok(true)
        }
    }
}

/// A blocking keep-alive HTTP/1.1 connection.
struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    fn open(target: SocketAddr) -> Result<Connection> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .with_context(|| format!("connect to {target}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Connection {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    fn request(&mut self) -> Result<()> {
        self.stream.write_all(REQUEST)?;
        let mut chunk = [0u8; 8192];
        while !take_response(&mut self.buf)? {
            let n = self.stream.read(&mut chunk)?;
            ensure!(n > 0, "the connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }
}

fn check(target: SocketAddr) -> Result<()> {
    let started = Instant::now();
    loop {
        match Connection::open(target).and_then(|mut c| c.request()) {
            Ok(()) => return Ok(()),
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => return Err(err.context(format!("{target} does not answer"))),
        }
    }
}

/// Sleeps until `deadline` and spins its last few microseconds: a thread's sleep alone ends
/// tens of microseconds late, which would add to every latency.
fn wait_until(deadline: Instant) {
    const SPIN: Duration = Duration::from_micros(60);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Open loop. Connection `c` of `k` sends requests c, c+k, c+2k, ... each at its scheduled
/// time, or at once when the previous answer came after it: then the wait counts in that
/// request's latency, as it would for a caller who cannot wait for the proxy to catch up.
fn latency(target: SocketAddr, rate: u64, seconds: u64, connections: usize) -> Result<()> {
    ensure!(
        rate > 0 && connections > 0,
        "rate and connections must be > 0"
    );
    // Sleeps end when asked, not up to 50 µs later (the default timer slack).
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let opened: Vec<Connection> = (0..connections)
        .map(|_| Connection::open(target))
        .collect::<Result<_>>()?;
    let start = Instant::now() + Duration::from_millis(50);
    let measured_from = start + WARM_UP;
    let end = measured_from + Duration::from_secs(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = opened
        .into_iter()
        .enumerate()
        .map(|(c, connection)| {
            let errors = errors.clone();
            std::thread::spawn(move || {
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
                let mut connection = Some(connection);
                let mut latencies = Vec::new();
                for i in (c as u32..).step_by(connections) {
                    let scheduled = start + period * i;
                    if scheduled >= end {
                        break;
                    }
                    wait_until(scheduled);
                    let result = match connection.as_mut() {
                        Some(open) => open.request(),
                        None => Connection::open(target).and_then(|mut open| {
                            let result = open.request();
                            connection = Some(open);
                            result
                        }),
                    };
                    let done = Instant::now();
                    if result.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        connection = None;
                    } else if scheduled >= measured_from {
                        latencies.push((done - scheduled).as_nanos() as u64);
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().expect("latency thread"));
    }
    println!(
        "{}",
        json!({"latencies_ns": latencies, "errors": errors.load(Ordering::Relaxed)})
    );
    Ok(())
}

/// Closed loop: every connection sends its next request as soon as the answer is in.
fn throughput(target: SocketAddr, seconds: u64, connections: usize) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    runtime()?.block_on(async move {
        let start = Instant::now() + Duration::from_millis(200);
        let measured_from = start + WARM_UP / 2;
        let end = measured_from + Duration::from_secs(seconds);
        let (done, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (done, errors) = (done.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                'connect: while Instant::now() < end {
                    let Ok(mut stream) = tokio::net::TcpStream::connect(target).await else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let mut buf = Vec::with_capacity(4096);
                    while Instant::now() < end {
                        if stream.write_all(REQUEST).await.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            continue 'connect;
                        }
                        loop {
                            match take_response(&mut buf) {
                                Ok(true) => break,
                                Ok(false) => {}
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    continue 'connect;
                                }
                            }
                            if !matches!(stream.read_buf(&mut buf).await, Ok(n) if n > 0) {
                                errors.fetch_add(1, Ordering::Relaxed);
                                continue 'connect;
                            }
                        }
                        let now = Instant::now();
                        if now >= measured_from && now < end {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await?;
        }
        println!(
            "{}",
            json!({
                "requests": done.load(Ordering::Relaxed),
                "seconds": seconds,
                "errors": errors.load(Ordering::Relaxed),
            })
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The benchmark: the bed, the proxies, the rounds, the tables.

/// nginx's worker processes, killed by pid at exit: killing its master (which the test bed
/// does on Ctrl-C) would leave them running.
static NGINX_WORKERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

extern "C" fn kill_nginx_workers() {
    if let Ok(workers) = NGINX_WORKERS.lock() {
        for pid in workers.iter() {
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// nginx's master; stopped gracefully on drop so that it takes its workers along.
struct Nginx(Process);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.signal(libc::SIGQUIT);
        NGINX_WORKERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Pins a command to `cpus` (taskset execs it: the pid stays the command's).
fn pinned(cpus: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", cpus]).arg(program);
    command
}

fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid ...: comm may hold spaces, so count from its ')'.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
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

fn start_steer(
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
        pinned(cpus, scenario::binary("steer")?)
            .arg("run")
            .args(["--config", &config.display().to_string()])
            .args([
                "--listen",
                &SocketAddr::from((node.address, STEER_PORT)).to_string(),
            ])
            .args(["--admin", &admin.to_string()])
            .args(["--cgroup", &node.cgroup.display().to_string()])
            .env("TOKIO_WORKER_THREADS", workers.to_string())
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
    let idle_kb = rss_kb(steer.id())?;

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
fn reloads(config: &Path, admin: SocketAddr, edits: usize) -> Result<Vec<Duration>> {
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

fn start_nginx(
    dir: &Path,
    cpus: &str,
    workers: usize,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Nginx> {
    let d = dir.display();
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;
master_process on;
user root;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
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
        pinned(cpus, "nginx")
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

fn start_haproxy(
    dir: &Path,
    cpus: &str,
    workers: usize,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Process> {
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global
  nbthread {workers}
  maxconn 4096
defaults
  mode http
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
        pinned(cpus, "haproxy")
            .arg("-db")
            .args(["-f", &config.display().to_string()]),
        None,
    )
    .context("start haproxy (apt-get install haproxy; cargo xtask bench does)")?;
    wait_listening(listen, "haproxy", &mut haproxy)?;
    Ok(haproxy)
}

/// Runs a part of this binary in `pod`, pinned to `cpus`; its JSON answer.
fn in_pod(pod: &steer_tests::Pod, cpus: &str, args: &[String]) -> Result<Value> {
    let output = pod.exec(pinned(cpus, std::env::current_exe()?).args(args))?;
    ensure!(
        output.status.success(),
        "proxy-bench {} in pod {}: {}",
        args.join(" "),
        pod.name,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    if output.stdout.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&output.stdout).context("the client's answer")
}

struct Case {
    name: &'static str,
    target: SocketAddr,
    latencies: Vec<u64>,
    latency_errors: u64,
    /// Requests/s of each throughput round.
    rates: Vec<f64>,
    throughput_errors: u64,
}

impl Case {
    fn percentile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.latencies.len() as f64).ceil() as usize).max(1);
        self.latencies[rank.min(self.latencies.len()) - 1] as f64
    }

    fn best_rate(&self) -> f64 {
        self.rates.iter().copied().fold(f64::NAN, f64::max)
    }
}

fn micros(ns: f64) -> String {
    format!("{:.1} µs", ns / 1e3)
}

fn benchmark(options: &Options) -> Result<()> {
    steer_tests::node::tear_down_on_signals()?;
    unsafe { libc::atexit(kill_nginx_workers) };

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (default_load, default_proxy) = if cpus >= 2 {
        let all: Vec<usize> = (0..cpus).collect();
        let (load, proxy) = all.split_at(cpus / 2);
        (cpu_list(load), cpu_list(proxy))
    } else {
        ("0".to_string(), "0".to_string())
    };
    let proxy_cpus = options.proxy_cpus.clone().unwrap_or(default_proxy);
    let load_cpus = options.load_cpus.clone().unwrap_or(default_load);
    let workers = proxy_cpus.split(',').count();

    let mut node = Node::new()?;
    let b = node.index;
    let upstream_ip = Ipv4Addr::new(10, 201, b, 200);
    let upstream = SocketAddr::from((upstream_ip, UPSTREAM_PORT));
    // A service address in steer's mesh (redirected) and one kube-proxy alone serves.
    let mesh = SocketAddr::from((Ipv4Addr::new(10, 202, b, 200), 80));
    let plain = SocketAddr::from((Ipv4Addr::new(10, 202, b, 201), 80));
    node.add_pod_at("upstream", upstream_ip)?;
    node.add_pod_at("client", Ipv4Addr::new(10, 201, b, 201))?;
    node.add_service(mesh, upstream)?;
    node.add_service(plain, upstream)?;
    let _upstream =
        node.pod("upstream")
            .spawn(pinned(&load_cpus, std::env::current_exe()?).args([
                "upstream",
                "--listen",
                &format!("0.0.0.0:{UPSTREAM_PORT}"),
            ]))?;

    let dir = TempDir(std::env::temp_dir().join(format!("steer-proxy-bench-{}", node.name)));
    std::fs::create_dir_all(&dir.0)?;
    let (mut steer, steer_idle_kb) =
        start_steer(&node, &dir.0, &proxy_cpus, workers, upstream, mesh)?;
    eprintln!("proxy-bench: {RELOADS} live reloads of steer's configuration file");
    let steer_admin = SocketAddr::from((node.address, STEER_ADMIN_PORT));
    let reload_times = reloads(&dir.0.join("steer.yaml"), steer_admin, RELOADS)?;
    let nginx_address = SocketAddr::from((node.address, NGINX_PORT));
    let haproxy_address = SocketAddr::from((node.address, HAPROXY_PORT));
    let nginx = start_nginx(&dir.0, &proxy_cpus, workers, nginx_address, upstream)?;
    let haproxy = start_haproxy(&dir.0, &proxy_cpus, workers, haproxy_address, upstream)?;
    std::thread::sleep(Duration::from_millis(500));
    let nginx_master_kb = rss_kb(nginx.0.id())?;
    let nginx_workers_kb: u64 = NGINX_WORKERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|pid| rss_kb(*pid))
        .sum::<Result<u64>>()?;
    let haproxy_idle_kb = rss_kb(haproxy.id())?;

    let mut cases = [
        ("direct (kube-proxy)", plain),
        ("steer", mesh),
        ("nginx", nginx_address),
        ("haproxy", haproxy_address),
    ]
    .map(|(name, target)| Case {
        name,
        target,
        latencies: Vec::new(),
        latency_errors: 0,
        rates: Vec::new(),
        throughput_errors: 0,
    });
    let client = node.pod("client");
    for case in &cases {
        in_pod(
            client,
            &load_cpus,
            &["check".into(), case.target.to_string()],
        )?;
    }

    eprintln!(
        "proxy-bench: {cpus} CPUs; proxies on CPU {proxy_cpus} ({workers} worker(s) each), \
         client and upstream on CPU {load_cpus}"
    );
    for round in 1..=options.rounds {
        for case in &mut cases {
            eprintln!(
                "proxy-bench: round {round}/{}: latency at {}/s, {}",
                options.rounds, options.rate, case.name
            );
            let answer = in_pod(
                client,
                &load_cpus,
                &[
                    "latency".into(),
                    case.target.to_string(),
                    format!("--rate={}", options.rate),
                    format!("--seconds={}", options.seconds),
                    format!("--connections={}", options.connections),
                ],
            )?;
            let latencies: Vec<u64> = serde_json::from_value(answer["latencies_ns"].clone())?;
            case.latencies.extend(latencies);
            case.latency_errors += answer["errors"].as_u64().unwrap_or(0);
        }
    }
    for round in 1..=options.rounds {
        for case in &mut cases {
            eprintln!(
                "proxy-bench: round {round}/{}: throughput, {} connections, {}",
                options.rounds, options.throughput_connections, case.name
            );
            let answer = in_pod(
                client,
                &load_cpus,
                &[
                    "throughput".into(),
                    case.target.to_string(),
                    format!("--seconds={}", options.throughput_seconds),
                    format!("--connections={}", options.throughput_connections),
                ],
            )?;
            let requests = answer["requests"].as_u64().unwrap_or(0) as f64;
            case.rates
                .push(requests / options.throughput_seconds as f64);
            case.throughput_errors += answer["errors"].as_u64().unwrap_or(0);
        }
    }
    let steer_after_kb = rss_kb(steer.id())?;
    for case in &mut cases {
        case.latencies.sort_unstable();
    }

    // The tables.
    let [direct, steer_case, nginx_case, _] = &cases;
    println!(
        "\nlatency per call at {}/s, open loop ({} keep-alive connections, {} rounds of {} s, \
         latency from the scheduled send time)",
        options.rate, options.connections, options.rounds, options.seconds
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>8} {:>8} {:>7}",
        "case", "p50", "p99", "p99.9", "max", "+p50", "+p99", "x p50", "x p99", "errors"
    );
    for case in &cases {
        let (p50, p99) = (case.percentile(0.5), case.percentile(0.99));
        println!(
            "{:<22} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>7.2}x {:>7.2}x {:>7}",
            case.name,
            micros(p50),
            micros(p99),
            micros(case.percentile(0.999)),
            micros(case.percentile(1.0)),
            micros(p50 - direct.percentile(0.5)),
            micros(p99 - direct.percentile(0.99)),
            p50 / direct.percentile(0.5),
            p99 / direct.percentile(0.99),
            case.latency_errors
        );
    }
    println!(
        "\nthroughput, closed loop ({} keep-alive connections, best of {} rounds of {} s)",
        options.throughput_connections, options.rounds, options.throughput_seconds
    );
    println!(
        "{:<22} {:>12} {:>10} {:>7}",
        "case", "requests/s", "vs nginx", "errors"
    );
    for case in &cases {
        println!(
            "{:<22} {:>12.0} {:>9.2}x {:>7}",
            case.name,
            case.best_rate(),
            case.best_rate() / nginx_case.best_rate(),
            case.throughput_errors
        );
    }
    let nginx_idle_kb = nginx_master_kb + nginx_workers_kb;
    println!("\nidle resident memory (VmRSS)");
    println!("{:<46} {:>10}", "process", "MB");
    let mb = |kb: u64| kb as f64 / 1024.0;
    for (what, kb) in [
        (
            "steer run, food-delivery example, no traffic".to_string(),
            steer_idle_kb,
        ),
        (
            format!("nginx, master + {workers} worker(s)"),
            nginx_idle_kb,
        ),
        (format!("haproxy, {workers} thread(s)"), haproxy_idle_kb),
        ("steer run after the benchmark".to_string(), steer_after_kb),
    ] {
        println!("{what:<46} {:>10.1}", mb(kb));
    }

    let reload_median = reload_times[reload_times.len() / 2];
    let reload_max = reload_times[reload_times.len() - 1];
    println!(
        "\nlive reload of steer's configuration file, write to served ({RELOADS} edits): \
         median {reload_median:.1?}, max {reload_max:.1?}"
    );

    let added_p50 = steer_case.percentile(0.5) - direct.percentile(0.5);
    let added_p99 = steer_case.percentile(0.99) - direct.percentile(0.99);
    let goals = [
        (
            "steer adds under 30 µs p50".to_string(),
            format!("+{}", micros(added_p50)),
            added_p50 < 30_000.0,
        ),
        (
            "steer adds under 100 µs p99".to_string(),
            format!("+{}", micros(added_p99)),
            added_p99 < 100_000.0,
        ),
        (
            "steer throughput at least nginx's".to_string(),
            format!(
                "{:.2}x nginx",
                steer_case.best_rate() / nginx_case.best_rate()
            ),
            steer_case.best_rate() >= nginx_case.best_rate(),
        ),
        (
            "steer idle memory under 20 MB".to_string(),
            format!("{:.1} MB", mb(steer_idle_kb)),
            steer_idle_kb < 20 * 1024,
        ),
        (
            "a valid edit serves within 100 ms".to_string(),
            format!("max {reload_max:.1?}"),
            reload_max < Duration::from_millis(100),
        ),
    ];
    println!("\ngoals");
    for (goal, measured, met) in &goals {
        println!(
            "{goal:<40} {measured:>14}  {}",
            if *met { "met" } else { "MISSED" }
        );
    }

    // Stop what we started, by pid: haproxy and steer on drop, nginx gracefully.
    drop(haproxy);
    drop(nginx);
    let _ = steer.signal(libc::SIGTERM);
    Ok(())
}
