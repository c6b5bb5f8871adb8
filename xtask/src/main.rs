//! Developer tasks. `cargo xtask setup` installs what a fresh machine lacks; `cargo xtask ci`
//! is the README's test command and what `.ci/run` runs.

mod bench;

use std::{path::PathBuf, process::Command, time::SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent): Debian packages, rust-src, bpf-linker,
    /// kubernetes-validate.
    Setup,
    /// Build the eBPF object (`target/bpfel-unknown-none/release/steer`).
    BuildEbpf,
    /// Everything CI checks: setup, fmt, clippy -D warnings, all tests, the demo, a smoke run of
    /// the proxy bench.
    Ci,
    /// The benchmarks, with figures side by side.
    Bench,
    /// Instructions per request of steer and nginx under valgrind's callgrind (repeatable on a
    /// busy machine).
    Profile,
    /// The seed's case studies, decided and explained (the README's main job).
    Demo {
        /// Run only this scenario: food-delivery, order-email, abz or rollout.
        #[arg(long)]
        scenario: Option<String>,
        /// Afterwards keep a food-delivery node running with traffic, print the address of the
        /// agent's live page, and wait for Ctrl-C.
        #[arg(long)]
        stay: bool,
    },
    /// Regenerate the README's picture of the live page (agent/src/ui/screenshot.png) from the
    /// demo's node and traffic, with headless chromium.
    Screenshot,
}

/// Debian packages the tests and the demo use, by the command that proves each is installed.
const PACKAGES: [(&str, &str); 7] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    ("curl", "curl"),
    ("mount", "mount"),
    // The live page's browser tests and screenshot (headless).
    ("chromium", "chromium"),
    // The Kubernetes rollout tests' analyses read a real Prometheus.
    ("prometheus", "prometheus"),
];
/// What only the benchmarks use: the proxies steer is compared with.
const BENCH_PACKAGES: [(&str, &str); 2] = [("nginx", "nginx-light"), ("haproxy", "haproxy")];
/// What `profile` uses besides nginx.
const PROFILE_PACKAGES: [(&str, &str); 2] = [("valgrind", "valgrind"), ("nginx", "nginx-light")];
const BPF_LINKER_VERSION: &str = "0.10.4";
/// Validates deploy/'s manifests offline against the official Kubernetes schemas (PyPI).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

fn main() -> Result<()> {
    match Args::parse().task {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf(),
        Task::Ci => {
            setup()?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            cargo(&["test", "--no-fail-fast"])?;
            // A smoke run of the main job: it fails on any wrong path.
            demo(None, &[])?;
            // The proxy bench with tiny loads, so that it cannot rot: every path runs and gives
            // figures; no timing is checked. demo() built steer next to it.
            install_missing(&BENCH_PACKAGES)?;
            cargo(&[
                "run",
                "--package",
                "steer-tests",
                "--bin",
                "proxy-bench",
                "--",
                "--smoke",
            ])
        }
        Task::Demo { scenario, stay } => {
            setup()?;
            demo(scenario.as_deref(), if stay { &["--stay"] } else { &[] })
        }
        Task::Screenshot => {
            setup()?;
            let out = workspace_root().join("agent/src/ui/screenshot.png");
            demo(None, &["--screenshot", &out.display().to_string()])
        }
        Task::Profile => {
            setup()?;
            install_missing(&PROFILE_PACKAGES)?;
            cargo(&["build", "--release", "--package", "steer"])?;
            cargo(&[
                "run",
                "--release",
                "--package",
                "steer-tests",
                "--bin",
                "proxy-bench",
                "--",
                "profile",
            ])
        }
        Task::Bench => {
            setup()?;
            let started = SystemTime::now();
            cargo(&["bench", "--package", "steer", "--bench", "rules"])?;
            // The benches on a test bed need root: namespaces, cgroups, the eBPF programs.
            let test_bed_bench =
                |bin| cargo(&["run", "--release", "--package", "steer-tests", "--bin", bin]);
            test_bed_bench("connect-bench")?;
            bench::summarize(&target_dir(), started)?;
            cargo(&["build", "--release", "--package", "steer"])?;
            let steer = target_dir().join("release/steer");
            bench::check_scaling(&steer, &target_dir().join("check-bench"))?;
            // The node proxy next to nginx and haproxy; prints its own tables.
            install_missing(&BENCH_PACKAGES)?;
            test_bed_bench("proxy-bench")
        }
    }
}

/// Builds the agent, the demo service and the test bed's tools, then runs the scenarios.
fn demo(only: Option<&str>, more: &[&str]) -> Result<()> {
    cargo(&["build", "--package", "steer", "--package", "steer-tests"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let mut command = Command::new(target.join("debug/steer-demo"));
    if let Some(scenario) = only {
        command.args(["--scenario", scenario]);
    }
    command.args(more);
    run(&mut command)
}

/// Where cargo puts what it builds (`CARGO_TARGET_DIR` when set).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(command: &mut Command) -> Result<()> {
    eprintln!("xtask: {command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root()))
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// apt-get installs the packages whose command is missing.
fn install_missing(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(program, _)| !have(program))
        .map(|&(_, package)| package)
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn setup() -> Result<()> {
    install_missing(&PACKAGES)?;
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("the eBPF programs build with nightly and rust-src")?;
    let linker = Command::new("bpf-linker").arg("--version").output();
    let current = linker
        .as_ref()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !current {
        run(Command::new(env!("CARGO")).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ]))?;
    }
    let validator = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    let current = validator
        .as_ref()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(KUBERNETES_VALIDATE_VERSION));
    if !current {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        ]))
        .context("the manifest tests validate deploy/ with kubernetes-validate")?;
    }
    Ok(())
}

fn build_ebpf() -> Result<()> {
    run(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "steer-ebpf",
        ])
        .args(["-Z", "build-std=core", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .current_dir(workspace_root()))?;
    eprintln!("xtask: built target/bpfel-unknown-none/release/steer");
    Ok(())
}
