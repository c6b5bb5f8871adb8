//! `proxy-bench profile`: instructions per request of steer and of nginx under valgrind's
//! callgrind, which counts instructions rather than time and so gives the same figure on a
//! busy machine. Both proxies run one worker on loopback in front of the bench upstream; each
//! serves two fixed loads and the difference, divided by the difference in requests, is the
//! cost of a request without start-up and shutdown. User space only: system calls are counted
//! separately (`strace -c`), and are at parity (two reads and two writes per request).

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{client, proxies::TempDir};

const UPSTREAM: &str = "127.0.0.1:38080";
const PROXY: &str = "127.0.0.1:38081";
const STEER_ADMIN: &str = "127.0.0.1:38082";
/// Keep-alive client connections of the fixed loads.
const CONNECTIONS: usize = 4;

/// One profiled process, killed if it is still running when dropped.
struct Profiled(Child);

impl Drop for Profiled {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Profiled {
    /// Stops the process the way it stops cleanly and waits for callgrind's output.
    fn stop(mut self, signal: i32) -> Result<()> {
        // SAFETY: signals a child this process started and has not reaped.
        unsafe { libc::kill(self.0.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait()?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "the profiled process did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// Total instructions callgrind counted, from its output file.
fn instructions(out: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(out).with_context(|| format!("read {}", out.display()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("summary: "))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no summary in {}", out.display()))
}

/// Runs `command` under callgrind while `requests` go through it; returns its instructions.
fn profile_run(
    dir: &Path,
    name: &str,
    command: &[String],
    stop_signal: i32,
    requests: usize,
) -> Result<u64> {
    let out = dir.join(format!("callgrind.{name}.{requests}"));
    let child = Command::new("valgrind")
        .args(["--tool=callgrind", "--quiet"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args(command)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start valgrind (apt-get install valgrind; cargo xtask profile does)")?;
    let profiled = Profiled(child);
    let target: SocketAddr = PROXY.parse()?;
    client::check(target).with_context(|| format!("{name} under callgrind"))?;
    client::requests(target, requests, CONNECTIONS)?;
    profiled.stop(stop_signal)?;
    instructions(&out)
}

/// Instructions per request of one proxy: two loads, the difference.
fn per_request(dir: &Path, name: &str, command: &[String], stop_signal: i32) -> Result<u64> {
    let (small, large) = (2_000, 12_000);
    let a = profile_run(dir, name, command, stop_signal, small)?;
    let b = profile_run(dir, name, command, stop_signal, large)?;
    if b <= a {
        bail!("{name}: {b} instructions for {large} requests, {a} for {small}");
    }
    Ok((b - a) / (large - small) as u64)
}

pub fn profile(steer: &Path) -> Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!("steer-profile-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let d = dir.0.display();
    let me = std::env::current_exe()?;
    let upstream = Profiled(
        Command::new(&me)
            .args(["upstream", "--listen", UPSTREAM])
            .spawn()
            .context("start the bench upstream")?,
    );

    let config = dir.0.join("steer.yaml");
    std::fs::write(
        &config,
        format!(
            "services:\n  - name: bench\n    addresses: [\"10.255.0.1:80\"]\n    versions:\n      \
             - {{ name: v1, primary: true, endpoints: [\"{UPSTREAM}\"] }}\n"
        ),
    )?;
    let steer_command: Vec<String> = [
        &steer.display().to_string(),
        "run",
        "--no-ebpf",
        "--workers",
        "1",
        "--config",
        &config.display().to_string(),
        "--listen",
        "127.0.0.1:38083",
        "--gateway",
        PROXY,
        "--admin",
        STEER_ADMIN,
    ]
    .map(String::from)
    .to_vec();
    let steer = per_request(&dir.0, "steer", &steer_command, libc::SIGTERM)?;

    let nginx_conf = dir.0.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "daemon off;\nmaster_process off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  keepalive_requests 100000000;\n  \
             upstream bench {{ server {UPSTREAM}; keepalive 64; }}\n  server {{\n    \
             listen {PROXY};\n    location / {{ proxy_pass http://bench; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
        ),
    )?;
    let nginx_command: Vec<String> = [
        "nginx",
        "-p",
        &format!("{d}/"),
        "-e",
        &format!("{d}/nginx-error.log"),
        "-c",
        &nginx_conf.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let nginx = per_request(&dir.0, "nginx", &nginx_command, libc::SIGQUIT)?;
    drop(upstream);

    println!(
        "instructions per request (callgrind, user space, one worker, {CONNECTIONS} keep-alive clients)"
    );
    println!("{:<8} {:>12} {:>8}", "proxy", "instructions", "ratio");
    println!(
        "{:<8} {:>12} {:>7.2}x",
        "steer",
        steer,
        steer as f64 / nginx as f64
    );
    println!("{:<8} {:>12} {:>7.2}x", "nginx", nginx, 1.0);
    Ok(())
}
