//! The `steer` command line. Exit codes are a contract scripts rely on: `check` and `explain`
//! exit 0 when the configuration has no errors, 1 when it has, 2 when it cannot be read.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    check::{self, Report, render_example},
    config::Config,
    kubernetes::KubernetesOptions,
    rollout::driver::RolloutView,
    rules::HeaderPairs,
    run::Source,
    state::Snapshot,
};

#[derive(Debug, Parser)]
#[command(
    name = "steer",
    version,
    about = "Sidecar-free full-stack multiple canary releases"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the `run` variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: the eBPF datapath, the proxy, the admin server.
    Run {
        /// The configuration file; valid edits apply live.
        #[arg(
            long,
            required_unless_present = "kubernetes",
            conflicts_with = "kubernetes"
        )]
        config: Option<PathBuf>,
        /// Read the configuration from the cluster: CanaryReleases, annotated Services, their
        /// EndpointSlices and pods (in-cluster credentials, else the kubeconfig).
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: the pod label whose value is the version.
        #[arg(long, default_value = "version")]
        version_label: String,
        /// With --kubernetes: this agent's name in the status writer election.
        #[arg(long, env = "NODE_NAME", default_value = "steer")]
        node_name: String,
        /// With --kubernetes: the namespace of the election's Lease (the agent's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "steer-system")]
        lease_namespace: String,
        /// With --kubernetes: the Prometheus that scrapes the agents (`http://host:port`),
        /// where the status writer reads the figures of the rollouts' analyses. Without it
        /// rollouts do not advance.
        #[arg(long, value_parser = parse_prometheus_url)]
        prometheus_url: Option<crate::kubernetes::prometheus::Prometheus>,
        /// Where redirected pod connections arrive: addresses of the node, at most one per IP
        /// family, comma-separated (`10.0.0.5:15001,[fd00::5]:15001`; a bare IP takes port
        /// 15001). Connections of a family without one are not redirected.
        #[arg(long)]
        listen: crate::run::ListenAddresses,
        /// The admin server (health, readiness, metrics, config, explain): IP:PORT, or a bare
        /// IP (port 15000), as the downward API gives a node's IP.
        #[arg(long, default_value_t = crate::admin::default_address(), value_parser = admin_address)]
        admin: std::net::SocketAddr,
        /// A listener for /metrics, /healthz and /readyz only (IP:PORT, or a bare IP: port
        /// 15090): where a cluster's Prometheus scrapes the agent and the kubelet probes it,
        /// while the admin server (which shows the rules) stays on loopback.
        #[arg(long, value_parser = metrics_address)]
        metrics: Option<std::net::SocketAddr>,
        /// Seconds a client of the admin server or the metrics listener may take to send a
        /// request's headers, from their first byte.
        #[arg(long, default_value_t = crate::admin::Limits::default().header_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
        admin_header_timeout: u64,
        /// Seconds a connection to the admin server or the metrics listener may stay open
        /// with nothing sent or read (before a request, inside a body, with a response unread).
        #[arg(long, default_value_t = crate::admin::Limits::default().idle_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
        admin_idle_timeout: u64,
        /// Connections the admin server and the metrics listener each keep open at once; more
        /// are closed at accept, so they can never take the proxy's file descriptors.
        #[arg(long, default_value_t = crate::admin::Limits::default().max_connections as u64, value_parser = clap::value_parser!(u64).range(1..=65536))]
        admin_max_connections: u64,
        /// The north-south entry: incoming stamps are removed, the rules decide (IP:PORT, or
        /// a bare IP: port 15080).
        #[arg(long, value_parser = crate::run::gateway_address)]
        gateway: Option<std::net::SocketAddr>,
        /// The cgroup v2 directory to attach the programs to (default: the root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Serve without the eBPF datapath (the proxy alone).
        #[arg(long)]
        no_ebpf: bool,
        /// Seconds to let in-flight requests finish after SIGTERM.
        #[arg(long, default_value_t = 10)]
        drain_grace: u64,
        /// Proxy worker threads, each with its own listeners and upstream connections
        /// (default: one per CPU the agent may run on).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        workers: Option<u16>,
        /// Client connections open at once; more are closed at accept and counted (default:
        /// nine tenths of the open files limit).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max_connections: Option<u64>,
        /// Seconds an HTTP/1 client connection may take to send a request's headers, counted
        /// from connecting or from the previous response: closes idle keep-alive connections
        /// and slow senders (slowloris) alike. An HTTP/2 connection without a request for this
        /// long (or that never completes its preface) gets GOAWAY and is closed.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        idle_timeout: u64,
        /// Seconds an upstream may stay silent in the middle of an HTTP/1 response body before
        /// the response is cut off (nginx's proxy_read_timeout).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        upstream_read_timeout: u64,
        /// Add the debug response headers (x-steer-service, -version, -release) for clients
        /// outside the mesh too: the gateway's, and connections the datapath did not redirect.
        /// Off by default: they name internal services, versions and releases.
        #[arg(long)]
        gateway_debug_headers: bool,
        /// The file of keys stamps are signed with, one per line: the first signs, all verify
        /// (rotation). It must exist and be writable by its owner alone. Default:
        /// `steer-stamp.key` next to --config (made when absent), or /etc/steer/stamp-key/keys
        /// (the DaemonSet's Secret) with --kubernetes.
        #[arg(long)]
        stamp_key: Option<PathBuf>,
    },
    /// Print the CanaryRelease CustomResourceDefinition (what deploy/crd.yaml holds).
    Crd,
    /// Check a configuration: conflicts, shadowed releases, overlaps.
    Check {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Also list every overlapping pair of releases as it is found (one line each; JSON
        /// lines with --format json), not only the per-release counts.
        #[arg(long)]
        overlaps: bool,
        /// Work steps the overlap analysis may take before it stops with a warning.
        #[arg(long, default_value_t = check::Options::default().steps)]
        steps: u64,
    },
    /// Show which release and version a request with the given headers gets at a service.
    Explain {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        service: String,
        /// A request header, `Name: value`; repeat for more.
        #[arg(long = "header", value_parser = HeaderPairs::parse_line)]
        headers: Vec<(String, String)>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Progressive rollouts: where they stand, end a step's wait, abort one, resume a rolled-back
    /// or aborted one, promote a finished one.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Print a large mixed configuration (the benchmarks' checker workload) as YAML.
    #[command(hide = true)]
    SampleConfig {
        #[arg(long)]
        releases: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Where each rollout of the running agent stands (its admin API).
    Status {
        #[arg(long, default_value_t = crate::admin::default_address())]
        admin: std::net::SocketAddr,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Start a rolled-back or aborted release over from its first step (file mode; on Kubernetes,
    /// resume on the CanaryRelease).
    Resume {
        release: String,
        #[arg(long, default_value_t = crate::admin::default_address())]
        admin: std::net::SocketAddr,
    },
    /// End the wait of a progressing release's step: its analysis runs now, over the step so
    /// far, and moves it on when it passes (file mode; on Kubernetes, the annotation
    /// steer.dev/rollout-continue on the CanaryRelease).
    Continue {
        release: String,
        #[arg(long, default_value_t = crate::admin::default_address())]
        admin: std::net::SocketAddr,
    },
    /// Stop a release's rollout now: it takes no traffic until resumed (file mode; on
    /// Kubernetes, the annotation steer.dev/rollout-abort with the reason as its value).
    Abort {
        release: String,
        #[arg(long, default_value_t = crate::admin::default_address())]
        admin: std::net::SocketAddr,
    },
    /// The configuration with RELEASE promoted: its versions primary, the release gone.
    /// Printed; written to --config with --write (the agent never rewrites it by itself).
    Promote {
        release: String,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        write: bool,
    },
}

fn admin_address(text: &str) -> Result<std::net::SocketAddr, String> {
    crate::run::address_or_ip(text, crate::admin::default_address().port())
}

fn metrics_address(text: &str) -> Result<std::net::SocketAddr, String> {
    crate::run::address_or_ip(text, crate::run::DEFAULT_METRICS_PORT)
}

fn parse_prometheus_url(url: &str) -> Result<crate::kubernetes::prometheus::Prometheus, String> {
    crate::kubernetes::prometheus::Prometheus::new(url).map_err(|err| format!("{err:#}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

const EXIT_INVALID: u8 = 1;
const EXIT_UNREADABLE: u8 = 2;

impl Cli {
    pub fn run(self) -> ExitCode {
        match self.command {
            Command::Run {
                config,
                kubernetes,
                version_label,
                node_name,
                lease_namespace,
                prometheus_url,
                listen,
                admin,
                metrics,
                admin_header_timeout,
                admin_idle_timeout,
                admin_max_connections,
                gateway,
                cgroup,
                no_ebpf,
                drain_grace,
                workers,
                max_connections,
                idle_timeout,
                upstream_read_timeout,
                gateway_debug_headers,
                stamp_key,
            } => run_agent(crate::run::RunOptions {
                source: match config {
                    Some(path) if !kubernetes => Source::File(path),
                    _ => Source::Kubernetes(KubernetesOptions {
                        version_label,
                        identity: node_name,
                        lease_namespace,
                        // The agent fills it in once the datapath is attached.
                        cgroup_root: None,
                        prometheus: prometheus_url,
                    }),
                },
                listen,
                admin,
                metrics,
                admin_limits: crate::admin::Limits {
                    header_timeout: std::time::Duration::from_secs(admin_header_timeout),
                    idle_timeout: std::time::Duration::from_secs(admin_idle_timeout),
                    max_connections: admin_max_connections as usize,
                },
                gateway,
                cgroup,
                no_ebpf,
                drain_grace: std::time::Duration::from_secs(drain_grace),
                workers: workers.map(usize::from),
                max_connections: max_connections.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                idle_timeout: std::time::Duration::from_secs(idle_timeout),
                upstream_read_timeout: std::time::Duration::from_secs(upstream_read_timeout),
                gateway_debug_headers,
                stamp_key,
            }),
            Command::Crd => {
                print!("{}", crate::kubernetes::crd::crd_yaml());
                ExitCode::SUCCESS
            }
            Command::Check {
                config,
                format,
                overlaps,
                steps,
            } => run_check(&config, format, overlaps, steps),
            Command::Explain {
                config,
                service,
                headers,
                format,
            } => run_explain(&config, &service, headers, format),
            Command::Rollout { command } => run_rollout(command),
            Command::SampleConfig { releases, seed } => {
                let config = check::sample::mixed(releases, seed);
                print!(
                    "{}",
                    serde_yaml_ng::to_string(&config).expect("configuration serialises")
                );
                ExitCode::SUCCESS
            }
        }
    }
}

fn run_agent(options: crate::run::RunOptions) -> ExitCode {
    // A signal mask is inherited across exec: make sure SIGTERM and SIGINT reach us, or the
    // agent could never drain.
    unsafe {
        let mut signals: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut signals);
        libc::sigaddset(&mut signals, libc::SIGTERM);
        libc::sigaddset(&mut signals, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &signals, std::ptr::null_mut());
    }
    // One malloc arena for all threads (each keeps its own small-object cache): with an arena
    // per worker, glibc grows and shrinks the workers' heaps under load (a mprotect for every
    // other request at 1,000 connections) and keeps freed memory scattered over arenas.
    // SAFETY: set before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The control runtime: sources, admin, signals. The proxy runs on worker threads of its
    // own, so configuration work never runs where requests are served.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("steer-control")
        .on_thread_start(yield_to_the_proxy)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::run::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: what failed and why.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Control threads (parsing, checking and compiling configurations, the admin server, the
/// sources) run at a lower priority than the proxy's workers: on a busy node a large apply
/// takes longer rather than delaying requests (at 10,000 releases it raised the p99 of the
/// requests meanwhile 4x). The workers are started from the main thread and keep its priority.
fn yield_to_the_proxy() {
    // SAFETY: setpriority on this thread's own id only changes its nice value.
    unsafe {
        let thread = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, CONTROL_NICE);
    }
}

/// The control threads' nice value: about a tenth of a worker's CPU share when both compete.
const CONTROL_NICE: libc::c_int = 10;

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|err| {
        eprintln!("error: {err}");
        ExitCode::from(EXIT_UNREADABLE)
    })
}

fn run_check(path: &std::path::Path, format: Format, overlaps: bool, steps: u64) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let options = check::Options {
        steps,
        ..check::Options::default()
    };
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let mut print_overlap = |overlap: check::Overlap| {
        let line = match format {
            Format::Json => serde_json::to_string(&overlap).expect("overlap serialises"),
            Format::Text => render_overlap("overlap", &overlap),
        };
        let _ = writeln!(stdout, "{line}");
    };
    let report = check::check_with(
        &config,
        &options,
        overlaps.then_some(&mut print_overlap as &mut dyn FnMut(check::Overlap)),
    );
    match format {
        // As one more JSON line after the streamed overlaps.
        Format::Json if overlaps => println!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        ),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        ),
        Format::Text => print!("{}", render_report(&path.display().to_string(), &report)),
    }
    if report.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    }
}

fn run_explain(
    path: &std::path::Path,
    service: &str,
    headers: Vec<(String, String)>,
    format: Format,
) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Explaining one request needs the compiled rules, not the overlap analysis.
    let snapshot = match Snapshot::build_structural(config) {
        Ok((snapshot, _)) => snapshot,
        Err(rejected) => {
            eprint!(
                "{}",
                render_report(&path.display().to_string(), &rejected.0)
            );
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let Some(explanation) = snapshot.explain(service, &HeaderPairs::new(headers)) else {
        eprintln!("error: no service `{service}` in {}", path.display());
        return ExitCode::from(EXIT_INVALID);
    };
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string(&explanation).expect("explanation serialises")
        ),
        Format::Text => {
            println!("service  {}", explanation.service);
            println!(
                "release  {}",
                explanation.release.as_deref().unwrap_or("(none)")
            );
            println!("version  {}", explanation.version);
            println!("reason   {}", explanation.reason);
        }
    }
    ExitCode::SUCCESS
}

fn run_rollout(command: RolloutCommand) -> ExitCode {
    let outcome = match command {
        RolloutCommand::Status { admin, format } => {
            admin_call(admin, http::Method::GET, "/rollouts").and_then(|body| {
                match format {
                    Format::Json => print!("{body}"),
                    Format::Text => {
                        let views: Vec<RolloutView> = serde_json::from_str(&body)
                            .map_err(|err| format!("unexpected answer from {admin}: {err}"))?;
                        print!("{}", render_rollouts(&views, jiff::Timestamp::now()));
                    }
                }
                Ok(())
            })
        }
        RolloutCommand::Resume { release, admin } => {
            let path = format!("/rollouts/{}/resume", crate::client::url_encode(&release));
            admin_call(admin, http::Method::POST, &path).map(|_| {
                println!("resumed `{release}`: its first step is in force");
            })
        }
        RolloutCommand::Continue { release, admin } => {
            let path = format!("/rollouts/{}/continue", crate::client::url_encode(&release));
            admin_call(admin, http::Method::POST, &path).map(|_| {
                println!("continued `{release}`: its analysis runs now");
            })
        }
        RolloutCommand::Abort { release, admin } => {
            let path = format!("/rollouts/{}/abort", crate::client::url_encode(&release));
            admin_call(admin, http::Method::POST, &path).map(|_| {
                println!("aborted `{release}`: it takes no traffic until resumed");
            })
        }
        RolloutCommand::Promote {
            release,
            config,
            write,
        } => {
            let source = match load(&config) {
                Ok(source) => source,
                Err(code) => return code,
            };
            promote_file(&source, &release, &config, write)
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("error: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// Prints, or writes in place (whole, then renamed: the agent never reads half a file), the
/// configuration with `release` promoted.
fn promote_file(
    source: &Config,
    release: &str,
    path: &std::path::Path,
    write: bool,
) -> Result<(), String> {
    let promoted = crate::rollout::promote(source, release)?;
    let report = check::check(&promoted);
    if !report.valid {
        return Err(render_report("the promoted configuration", &report));
    }
    let text = serde_yaml_ng::to_string(&promoted).expect("configuration serialises");
    if !write {
        print!("{text}");
        return Ok(());
    }
    crate::files::write_atomically(path, text.as_bytes())
        .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    eprintln!(
        "promoted `{release}` in {} (comments and layout are not kept); a running agent applies it",
        path.display()
    );
    Ok(())
}

/// One request to the agent's admin server; the body of a 2xx answer, else why not.
fn admin_call(
    admin: std::net::SocketAddr,
    method: http::Method,
    path: &str,
) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start a runtime: {err}"))?;
    let authority = admin.to_string();
    let peer = "the agent's admin server";
    // The marker the admin server wants on a state change: this is no web page's form.
    let marker = [(crate::admin::policy::MARKER, "1")];
    let (status, body) = runtime
        .block_on(crate::client::request(
            peer, &authority, method, path, &marker,
        ))
        .map_err(|err| format!("{err:#}"))?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(body.trim_end().to_string())
    }
}

/// One line per rollout, then what it last concluded.
fn render_rollouts(views: &[RolloutView], now: jiff::Timestamp) -> String {
    if views.is_empty() {
        return "no release has a rollout\n".into();
    }
    let mut out = String::new();
    let width = views
        .iter()
        .map(|v| v.release.len())
        .max()
        .unwrap_or(0)
        .max(7);
    let _ = writeln!(
        out,
        "{:<width$}  {:<11}  {:>5}  {:>7}  NEXT ANALYSIS",
        "RELEASE", "PHASE", "STEP", "PERCENT"
    );
    for view in views {
        let status = &view.status;
        let next = match status.next_analysis_at {
            Some(at) => {
                let left = at.duration_since(now).max(jiff::SignedDuration::ZERO);
                format!("in {:#}", jiff::SignedDuration::from_secs(left.as_secs()))
            }
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<11}  {:>5}  {:>6}%  {next}",
            view.release,
            format!("{:?}", status.phase),
            format!("{}/{}", status.step + 1, view.steps.len()),
            status.percent,
        );
        let _ = writeln!(out, "{:<width$}  {}", "", status.message);
        if let Some(last) = &status.last_analysis {
            let _ = writeln!(
                out,
                "{:<width$}  last analysis {:?} at {}: {}",
                "", last.outcome, last.at, last.message
            );
        }
    }
    out
}

/// Overlap summaries shown in the text report; `--format json` has them all.
const SHOWN_OVERLAPS: usize = 20;

/// The report for people: one aligned line per finding, then the releases that overlap the
/// most higher-priority releases.
pub fn render_report(origin: &str, report: &Report) -> String {
    let mut out = String::new();
    let verdict = if report.valid { "valid" } else { "INVALID" };
    let pairs: usize = report.overlaps.iter().map(|o| o.above).sum();
    let _ = writeln!(
        out,
        "{origin}: {verdict} ({} error(s), {} warning(s), {} shadowed, {} overlapping pair(s) \
         resolved by priority)",
        report.errors.len(),
        report.warnings.len(),
        report.shadowed.len(),
        pairs
    );
    for (title, findings) in [("error", &report.errors), ("warning", &report.warnings)] {
        let width = findings.iter().map(|f| f.code.len()).max().unwrap_or(0);
        for finding in findings {
            let _ = writeln!(
                out,
                "  {title:<7}  {:<width$}  {}",
                finding.code, finding.message
            );
        }
    }
    let mut most: Vec<&check::OverlapSummary> = report.overlaps.iter().collect();
    most.sort_by_key(|o| std::cmp::Reverse(o.above));
    for summary in most.iter().take(SHOWN_OVERLAPS) {
        let _ = write!(
            out,
            "  overlap  `{}`: {} higher-priority release(s) take some of its requests, it takes \
             some of {} lower-priority one(s)",
            summary.release, summary.above, summary.below
        );
        if summary.possible > 0 {
            let _ = write!(out, " ({} only possibly)", summary.possible);
        }
        match &summary.example {
            Some(example) => {
                let _ = writeln!(out, "; {}", render_overlap("e.g.", example));
            }
            None => out.push('\n'),
        }
    }
    if most.len() > SHOWN_OVERLAPS {
        let _ = writeln!(
            out,
            "  ... and {} more overlapping release(s): --format json lists them, --overlaps \
             every pair",
            most.len() - SHOWN_OVERLAPS
        );
    }
    out
}

/// `overlap `a` and `b` both match {x-device: android}: `a` has the higher priority`.
fn render_overlap(title: &str, overlap: &check::Overlap) -> String {
    let [first, second] = &overlap.releases;
    match &overlap.example {
        Some(example) => format!(
            "{title} `{first}` and `{second}` both match {{{}}}: `{}` has the higher priority",
            render_example(example),
            overlap.winner
        ),
        None => format!(
            "{title} `{first}` and `{second}` may overlap (no example found); `{}` has the \
             higher priority",
            overlap.winner
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `steer run` as deploy/daemonset.yaml runs it (the downward API's bare node IP).
    #[test]
    fn the_daemonsets_run_arguments_parse() {
        let run = |extra: &[&str]| {
            let base = ["steer", "run", "--kubernetes", "--listen", "10.0.0.5"];
            Cli::try_parse_from(base.iter().chain(extra))
        };
        let cli = run(&[
            "--admin",
            "127.0.0.1:15000",
            "--metrics",
            "10.0.0.5",
            "--prometheus-url",
            "http://steer-prometheus.steer-system.svc:9090",
        ])
        .unwrap();
        let Command::Run {
            admin,
            metrics,
            prometheus_url,
            ..
        } = cli.command
        else {
            panic!("not run: {cli:?}")
        };
        assert_eq!(admin, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(metrics, Some("10.0.0.5:15090".parse().unwrap()));
        assert!(prometheus_url.is_some());
        let err = run(&["--prometheus-url", "https://prometheus:9090"]).unwrap_err();
        assert!(
            err.to_string().contains("only http:// is supported"),
            "{err}"
        );
    }
}
