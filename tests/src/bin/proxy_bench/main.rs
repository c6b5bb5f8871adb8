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
//!   reverse proxies with keep-alive upstream connections on the same node address. The CPU
//!   time each proxy's processes use during these runs, per request, is its cost at that rate.
//! - **Throughput** (closed loop): N keep-alive connections send back to back for a fixed time,
//!   with 64 connections and with 1,000; requests/s, latency and CPU per request.
//! - **Memory**: VmRSS of `steer run` with the food-delivery example loaded, before any
//!   traffic, next to nginx (master + workers) and haproxy; then of each proxy holding 10,000
//!   idle keep-alive client connections (each made one request), and after they all closed.
//! - **Live reload** of steer's configuration file, from write to served.
//! - **Applying large configurations** (issue 11; `apply.rs`): steer's file replaced by mixed
//!   configurations of 1,000, 3,000 and 10,000 releases, each timed from write to served; the
//!   open-loop latency through steer while they apply one after another, next to the same run
//!   without applies (alternating, every round); steer's memory before, at peak and after.
//!
//! Every proxy is pinned to the same CPUs with one worker per CPU (nginx `worker_processes`,
//! haproxy `nbthread`, steer `--workers`) and starts with the soft fd limit a
//! service gets (1,024); the client and the upstream (a minimal hyper server answering a small
//! body) run on the other CPUs. A summary puts steer next to the better of nginx and haproxy,
//! with the goals of issue 10. `--smoke` runs every path with tiny loads (CI): it checks that
//! the bench works and produces figures, not the figures.
//!
//! The same binary plays every part: without a subcommand it runs the benchmark; the
//! subcommands are what it runs inside the pods.

mod apply;
mod client;
mod profile;
mod proxies;
mod report;

use std::{
    io::{BufRead, Write},
    net::{Ipv4Addr, SocketAddr},
    process::ChildStdin,
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use serde_json::Value;
use steer_tests::{Node, Pod, Process};

use proxies::{TempDir, cpu_list, cpu_time, pinned, rss_kb};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    options: Options,
}

/// Sizes default to the (the smoke run's in brackets).
#[derive(clap::Args)]
struct Options {
    /// Tiny loads, one round: checks that every path of the bench works (CI), not the figures.
    #[arg(long)]
    smoke: bool,
    /// Requests per second of the latency runs [1000; 200].
    #[arg(long)]
    rate: Option<u64>,
    /// Measured seconds of each latency run, after a second of warm-up [5; 1].
    #[arg(long)]
    seconds: Option<u64>,
    /// Keep-alive connections of the latency runs [4; 2].
    #[arg(long)]
    connections: Option<usize>,
    /// Concurrent keep-alive connections of the throughput runs [64; 16].
    #[arg(long)]
    throughput_connections: Option<usize>,
    /// Concurrent keep-alive connections of the many-connections runs [1000; 32].
    #[arg(long)]
    many_connections: Option<usize>,
    /// Measured seconds of each throughput run [4; 1].
    #[arg(long)]
    throughput_seconds: Option<u64>,
    /// Idle keep-alive connections each proxy holds in the memory case [10000; 200].
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Sample releases of the configurations the apply case writes, comma-separated
    /// [1000,3000,10000; 200].
    #[arg(long, value_delimiter = ',')]
    apply_releases: Option<Vec<usize>>,
    /// Rounds; the cases alternate within each round [3; 1].
    #[arg(long)]
    rounds: Option<usize>,
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
    /// Open loop: `rate` requests per second over `connections`.
    OpenLoop {
        target: SocketAddr,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        connections: usize,
    },
    /// Closed loop: `connections` send back to back for `seconds`.
    ClosedLoop {
        target: SocketAddr,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        connections: usize,
    },
    /// Holds `connections` idle keep-alive connections until stdin closes.
    Hold {
        target: SocketAddr,
        #[arg(long)]
        connections: usize,
    },
    /// Instructions per request of steer and nginx under valgrind's callgrind (loopback, no
    /// test bed): the repeatable profile behind the README's figures.
    Profile {
        /// The steer binary (default: the one built next to this one).
        #[arg(long)]
        steer: Option<std::path::PathBuf>,
    },
}

/// The sizes of one benchmark run.
struct Plan {
    smoke: bool,
    rate: u64,
    seconds: u64,
    connections: usize,
    /// Connection counts of the closed-loop runs: the throughput case, the many-connections one.
    closed_loops: [usize; 2],
    throughput_seconds: u64,
    idle_connections: usize,
    rounds: usize,
    reloads: usize,
    /// Sample releases of the apply case's configurations, ascending.
    apply_sizes: Vec<usize>,
    /// How long closed connections get to be cleaned up before memory is measured again.
    settle: Duration,
}

impl Plan {
    fn new(o: &Options) -> Plan {
        let smoke = o.smoke;
        fn pick<T>(smoke: bool, full: T, small: T) -> T {
            if smoke { small } else { full }
        }
        Plan {
            smoke: o.smoke,
            rate: o.rate.unwrap_or(pick(smoke, 1000, 200)),
            seconds: o.seconds.unwrap_or(pick(smoke, 5, 1)),
            connections: o.connections.unwrap_or(pick(smoke, 4, 2)),
            closed_loops: [
                o.throughput_connections.unwrap_or(pick(smoke, 64, 16)),
                o.many_connections.unwrap_or(pick(smoke, 1000, 32)),
            ],
            throughput_seconds: o.throughput_seconds.unwrap_or(pick(smoke, 4, 1)),
            idle_connections: o.idle_connections.unwrap_or(pick(smoke, 10_000, 200)),
            rounds: o.rounds.unwrap_or(pick(smoke, 3, 1)),
            reloads: pick(smoke, 20, 4),
            apply_sizes: {
                let mut sizes = o
                    .apply_releases
                    .clone()
                    .unwrap_or_else(|| pick(smoke, vec![1000, 3000, 10_000], vec![200]));
                sizes.sort_unstable();
                sizes
            },
            settle: Duration::from_secs(pick(smoke, 2, 1)),
        }
    }

    /// The most client connections a proxy must hold at once.
    fn max_connections(&self) -> usize {
        self.closed_loops
            .into_iter()
            .fold(self.idle_connections, usize::max)
    }
}

const UPSTREAM_PORT: u16 = 8080;
const NGINX_PORT: u16 = 18080;
const HAPROXY_PORT: u16 = 18081;
/// How long a client may take to open the idle connections.
const HOLD_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
    let args = Args::parse();
    match args.role {
        None => benchmark(&Plan::new(&args.options), &args.options),
        Some(Role::Upstream { listen }) => client::upstream(listen),
        Some(Role::Check { target }) => client::check(target),
        Some(Role::OpenLoop {
            target,
            rate,
            seconds,
            connections,
        }) => client::open_loop(target, rate, seconds, connections),
        Some(Role::ClosedLoop {
            target,
            seconds,
            connections,
        }) => client::closed_loop(target, seconds, connections),
        Some(Role::Hold {
            target,
            connections,
        }) => client::hold(target, connections),
        Some(Role::Profile { steer }) => {
            let steer = match steer {
                Some(steer) => steer,
                None => steer_tests::scenario::binary("steer")?,
            };
            profile::profile(&steer)
        }
    }
}

/// The figures of one kind of run of one case, over all rounds.
#[derive(Default)]
struct Runs {
    /// Latencies (ns) of the measured seconds; sorted once all rounds are in.
    latencies: Vec<u64>,
    /// Requests/s of each round's measured seconds.
    rates: Vec<f64>,
    /// Every answered request, warm-ups included: what the CPU time is divided by.
    requests: u64,
    errors: u64,
    /// CPU time of the proxy's processes over these runs; `None` without a proxy.
    cpu: Option<Duration>,
}

impl Runs {
    fn add(&mut self, answer: &Value, measured_seconds: u64, cpu: Option<Duration>) -> Result<()> {
        let latencies: Vec<u64> = serde_json::from_value(answer["latencies_ns"].clone())
            .context("the client's latencies")?;
        self.rates
            .push(latencies.len() as f64 / measured_seconds as f64);
        self.latencies.extend(latencies);
        self.requests += answer["requests"].as_u64().unwrap_or(0);
        self.errors += answer["errors"].as_u64().unwrap_or(0);
        self.cpu = cpu.map(|cpu| cpu + self.cpu.unwrap_or_default());
        Ok(())
    }

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

    /// CPU time per answered request, in ns.
    fn cpu_per_request(&self) -> f64 {
        match self.cpu {
            Some(cpu) if self.requests > 0 => cpu.as_nanos() as f64 / self.requests as f64,
            _ => f64::NAN,
        }
    }
}

/// A proxy's resident memory (kB) through the memory case.
#[derive(Default)]
struct Memory {
    /// Started, configured, no traffic yet.
    idle_kb: u64,
    /// After the latency and throughput runs, before the idle connections.
    before_kb: u64,
    holding_kb: u64,
    /// `Plan::settle` after the client closed them all.
    after_kb: u64,
    held: u64,
    errors: u64,
    first_error: Option<String>,
    /// Of the held connections, those the proxy closed before the client did.
    closed_by_proxy: u64,
}

/// The apply case's figures (steer only).
#[derive(Default)]
struct Applies {
    /// Write to served, per number of sample releases: one after another, no traffic.
    alone: std::collections::BTreeMap<usize, Vec<Duration>>,
    /// The same, while the open loop runs.
    loaded: std::collections::BTreeMap<usize, Vec<Duration>>,
    /// Bytes of the file, per number of sample releases.
    bytes: std::collections::BTreeMap<usize, usize>,
    /// steer's RSS right after each configuration was served (the first time).
    rss_kb: std::collections::BTreeMap<usize, u64>,
    /// Open loop through steer without applies, and with.
    quiet: Runs,
    busy: Runs,
    /// Configurations applied during the open-loop runs.
    applied_during: usize,
    before_kb: u64,
    /// VmHWM over the whole case (reset at its start).
    peak_kb: u64,
    /// Back at the configuration the case started from.
    after_kb: u64,
}

struct Case {
    name: &'static str,
    target: SocketAddr,
    /// The proxy's processes (empty: no proxy).
    pids: Vec<u32>,
    open: Runs,
    /// One per `Plan::closed_loops`.
    closed: [Runs; 2],
    memory: Option<Memory>,
}

impl Case {
    fn cpu_time(&self) -> Result<Option<Duration>> {
        if self.pids.is_empty() {
            return Ok(None);
        }
        cpu_time(&self.pids)
            .map(Some)
            .with_context(|| format!("CPU time of {}", self.name))
    }

    /// Runs a client in `pod`; its answer and the CPU time the proxy used meanwhile.
    fn run(&self, pod: &Pod, cpus: &str, args: &[String]) -> Result<(Value, Option<Duration>)> {
        let before = self.cpu_time()?;
        let answer = in_pod(pod, cpus, args)?;
        let after = self.cpu_time()?;
        Ok((answer, after.zip(before).map(|(a, b)| a - b)))
    }
}

/// Runs a part of this binary in `pod`, pinned to `cpus`; its JSON answer.
fn in_pod(pod: &Pod, cpus: &str, args: &[String]) -> Result<Value> {
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

/// A `hold` client in a pod: its answers line by line; closing its stdin lets it finish.
struct Holder {
    process: Process,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Holder {
    fn start(pod: &Pod, cpus: &str, target: SocketAddr, connections: usize) -> Result<Holder> {
        let (process, stdin, stdout) =
            pod.spawn_piped(pinned(cpus, std::env::current_exe()?).args([
                "hold".to_string(),
                target.to_string(),
                format!("--connections={connections}"),
            ]))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Holder {
            process,
            stdin: Some(stdin),
            lines,
        })
    }

    fn answer(&self, timeout: Duration) -> Result<Value> {
        let line = self
            .lines
            .recv_timeout(timeout)
            .context("the hold client did not answer (its errors are above)")?;
        serde_json::from_str(&line).with_context(|| format!("the hold client's answer {line:?}"))
    }

    /// Closes the connections; the last answer.
    fn finish(mut self) -> Result<Value> {
        self.stdin.take();
        let answer = self.answer(Duration::from_secs(30))?;
        let _ = self.process.signal(libc::SIGKILL);
        Ok(answer)
    }
}

/// The proxy of `case` holding `plan.idle_connections` idle client connections.
fn measure_memory(
    case: &Case,
    plan: &Plan,
    client: &Pod,
    cpus: &str,
    memory: &mut Memory,
) -> Result<()> {
    memory.before_kb = rss_kb(&case.pids)?;
    let holder = Holder::start(client, cpus, case.target, plan.idle_connections)?;
    let held = holder.answer(HOLD_TIMEOUT)?;
    memory.held = held["held"].as_u64().context("held")?;
    memory.errors = held["errors"].as_u64().context("errors")?;
    memory.first_error = held["first_error"].as_str().map(str::to_string);
    // Let the proxy finish with the last requests before looking.
    std::thread::sleep(Duration::from_millis(500));
    memory.holding_kb = rss_kb(&case.pids)?;
    let finished = holder.finish()?;
    memory.closed_by_proxy = finished["closed_by_proxy"].as_u64().unwrap_or(0);
    std::thread::sleep(plan.settle);
    memory.after_kb = rss_kb(&case.pids)?;
    Ok(())
}

/// The apply case: large configurations written to steer's file, alone and under the open
/// loop; the open loop without applies in the same rounds; steer's memory throughout.
fn measure_applies(
    steer: &Case,
    plan: &Plan,
    client: &Pod,
    cpus: &str,
    config: &std::path::Path,
    admin: SocketAddr,
) -> Result<Applies> {
    let pid = steer.pids[0];
    eprintln!(
        "proxy-bench: apply case, configurations of {:?} sample releases",
        plan.apply_sizes
    );
    let configurations = apply::prepare(config, &plan.apply_sizes)?;
    let mut figures = Applies {
        bytes: configurations
            .iter()
            .map(|c| (c.releases, c.bytes()))
            .collect(),
        before_kb: rss_kb(&steer.pids)?,
        ..Applies::default()
    };
    apply::reset_peak(pid)?;
    let mut applier = apply::Applier::new(config, admin);
    for prepared in &configurations {
        let took = applier.apply(prepared)?;
        figures
            .rss_kb
            .insert(prepared.releases, rss_kb(&steer.pids)?);
        eprintln!(
            "proxy-bench: {} sample releases served {took:.1?} after the write",
            prepared.releases
        );
    }
    figures.alone = std::mem::take(&mut applier.took);
    let args = [
        "open-loop".into(),
        steer.target.to_string(),
        format!("--rate={}", plan.rate),
        format!("--seconds={}", plan.seconds),
        format!("--connections={}", plan.connections),
    ];
    for round in 1..=plan.rounds {
        eprintln!(
            "proxy-bench: round {round}/{}: open loop at {}/s through steer, no applies",
            plan.rounds, plan.rate
        );
        let (answer, cpu) = steer.run(client, cpus, &args)?;
        figures.quiet.add(&answer, plan.seconds, cpu)?;
        eprintln!(
            "proxy-bench: round {round}/{}: open loop at {}/s through steer, applying \
             configurations one after another",
            plan.rounds, plan.rate
        );
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (run, applied) = std::thread::scope(|s| {
            let run = s.spawn(|| {
                let run = steer.run(client, cpus, &args);
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                run
            });
            let applied = applier.cycle(&configurations, &stop);
            (run.join().expect("the open-loop thread"), applied)
        });
        let (answer, cpu) = run?;
        figures.applied_during += applied?;
        figures.busy.add(&answer, plan.seconds, cpu)?;
    }
    figures.loaded = std::mem::take(&mut applier.took);
    // Back to the configuration the case started from, for the memory after.
    applier.apply(
        configurations
            .last()
            .context("the case has configurations")?,
    )?;
    std::thread::sleep(plan.settle);
    figures.after_kb = rss_kb(&steer.pids)?;
    figures.peak_kb = apply::peak_kb(pid)?;
    figures.quiet.latencies.sort_unstable();
    figures.busy.latencies.sort_unstable();
    Ok(figures)
}

fn benchmark(plan: &Plan, options: &Options) -> Result<()> {
    steer_tests::node::tear_down_on_signals()?;
    unsafe { libc::atexit(proxies::kill_nginx_workers) };

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
        proxies::start_steer(&node, &dir.0, &proxy_cpus, workers, upstream, mesh)?;
    eprintln!(
        "proxy-bench: {} live reloads of steer's configuration file",
        plan.reloads
    );
    let steer_admin = SocketAddr::from((node.address, proxies::STEER_ADMIN_PORT));
    let reload_times = proxies::reloads(&dir.0.join("steer.yaml"), steer_admin, plan.reloads)?;
    let nginx_address = SocketAddr::from((node.address, NGINX_PORT));
    let haproxy_address = SocketAddr::from((node.address, HAPROXY_PORT));
    let connections = plan.max_connections();
    let nginx = proxies::start_nginx(
        &dir.0,
        &proxy_cpus,
        workers,
        connections,
        nginx_address,
        upstream,
    )?;
    let haproxy = proxies::start_haproxy(
        &dir.0,
        &proxy_cpus,
        workers,
        connections,
        haproxy_address,
        upstream,
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let mut cases = [
        ("direct (kube-proxy)", plain, Vec::new()),
        ("steer", mesh, vec![steer.id()]),
        ("nginx", nginx_address, nginx.pids()),
        ("haproxy", haproxy_address, vec![haproxy.id()]),
    ]
    .map(|(name, target, pids)| Case {
        name,
        target,
        pids,
        open: Runs::default(),
        closed: Default::default(),
        memory: None,
    });
    for case in &mut cases[1..] {
        let idle_kb = match case.name {
            // Measured before the benchmark's service joined the example.
            "steer" => steer_idle_kb,
            _ => rss_kb(&case.pids)?,
        };
        case.memory = Some(Memory {
            idle_kb,
            ..Memory::default()
        });
    }
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
    for round in 1..=plan.rounds {
        for case in &mut cases {
            eprintln!(
                "proxy-bench: round {round}/{}: open loop at {}/s, {}",
                plan.rounds, plan.rate, case.name
            );
            let (answer, cpu) = case.run(
                client,
                &load_cpus,
                &[
                    "open-loop".into(),
                    case.target.to_string(),
                    format!("--rate={}", plan.rate),
                    format!("--seconds={}", plan.seconds),
                    format!("--connections={}", plan.connections),
                ],
            )?;
            case.open.add(&answer, plan.seconds, cpu)?;
        }
    }
    for (i, connections) in plan.closed_loops.into_iter().enumerate() {
        for round in 1..=plan.rounds {
            for case in &mut cases {
                eprintln!(
                    "proxy-bench: round {round}/{}: closed loop, {connections} connections, {}",
                    plan.rounds, case.name
                );
                let (answer, cpu) = case.run(
                    client,
                    &load_cpus,
                    &[
                        "closed-loop".into(),
                        case.target.to_string(),
                        format!("--seconds={}", plan.throughput_seconds),
                        format!("--connections={connections}"),
                    ],
                )?;
                case.closed[i].add(&answer, plan.throughput_seconds, cpu)?;
            }
        }
    }
    for case in &mut cases[1..] {
        eprintln!(
            "proxy-bench: memory, {} idle connections, {}",
            plan.idle_connections, case.name
        );
        let mut memory = case.memory.take().expect("proxies have memory figures");
        measure_memory(case, plan, client, &load_cpus, &mut memory)
            .with_context(|| format!("memory case of {}", case.name))?;
        case.memory = Some(memory);
    }
    let applies = measure_applies(
        &cases[1],
        plan,
        client,
        &load_cpus,
        &dir.0.join("steer.yaml"),
        steer_admin,
    )
    .context("apply case")?;
    for case in &mut cases {
        case.open.latencies.sort_unstable();
        for runs in &mut case.closed {
            runs.latencies.sort_unstable();
        }
    }

    let mut out = std::io::stdout().lock();
    report::details(&mut out, plan, &cases, workers, &reload_times)?;
    report::applies(&mut out, plan, &applies)?;
    report::summary(&mut out, plan, &cases, &proxy_cpus, &load_cpus)?;
    report::applies_summary(&mut out, plan, &applies)?;
    out.flush()?;
    if plan.smoke {
        report::ensure_figures(&cases)?;
        report::ensure_apply_figures(plan, &applies)?;
        println!("\nsmoke run: every case ran and produced figures (timings are not checked)");
    }

    // Stop what we started, by pid: haproxy and steer on drop, nginx gracefully.
    drop(haproxy);
    drop(nginx);
    let _ = steer.signal(libc::SIGTERM);
    Ok(())
}
