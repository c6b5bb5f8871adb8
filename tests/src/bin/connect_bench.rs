//! `cargo xtask bench` part: what a pod's connect() pays for the eBPF programs.
//!
//! In one run, on one test bed, in alternating rounds: connects from a pod with no programs
//! attached, then with the programs attached (a non-mesh destination: the programs run and let
//! it through), then a redirected connect to a service address compared with connecting to the
//! proxy directly.
//! Prints ns per connect side by side and the difference (goal: under 2 µs added).

use std::{net::SocketAddr, path::PathBuf, process::Command};

use anyhow::{Context, Result};
use steer_tests::{Node, Process};

/// Connects per run (`STEER_BENCH_CONNECTS` overrides).
fn connects() -> String {
    std::env::var("STEER_BENCH_CONNECTS").unwrap_or_else(|_| "5000".to_string())
}
const PROXY_PORT: u16 = 15001;

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

/// The median ns of one run of connects from the pod to `target`.
fn median_ns(node: &Node, target: &str) -> Result<f64> {
    let output = node
        .pod("bench")
        .exec(Command::new(sibling("tcp-tool")?).args(["bench", target, &connects()]))?;
    anyhow::ensure!(
        output.status.success(),
        "bench connect to {target}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)?
        .trim()
        .parse()
        .context("bench output")
}

fn main() -> Result<()> {
    steer_tests::node::tear_down_on_signals()?;
    let mut node = Node::new()?;
    node.add_pod("bench")?;
    let service = SocketAddr::from((node.service_ip(0), 80));
    let proxy = SocketAddr::from((node.address, PROXY_PORT));

    // Rounds alternate with and without the programs, so both see the same machine; each
    // case keeps its best round.
    let (mut bare, mut attached, mut direct, mut redirected) =
        (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..3 {
        bare = bare.min(median_ns(&node, "local")?);
        let _agent = Process::start_on_host(
            Command::new(sibling("redirect-probe")?)
                .arg(&node.cgroup)
                .arg(proxy.to_string())
                .arg("-")
                .arg(service.to_string()),
            Some("ready"),
        )?;
        attached = attached.min(median_ns(&node, "local")?);
        direct = direct.min(median_ns(&node, &proxy.to_string())?);
        redirected = redirected.min(median_ns(&node, &service.to_string())?);
    }

    println!(
        "\nconnect() from a pod (median of {} connects, best of 3 alternating rounds)",
        connects()
    );
    println!(
        "{:<46} {:>12} {:>12} {:>8}",
        "case", "ns/connect", "added ns", "ratio"
    );
    let row = |case: &str, ns: f64, base: Option<f64>| match base {
        Some(base) => println!(
            "{case:<46} {ns:>12.0} {:>12.0} {:>7.2}x",
            ns - base,
            ns / base
        ),
        None => println!("{case:<46} {ns:>12.0}"),
    };
    row("no programs, loopback listener in the pod", bare, None);
    row(
        "programs attached, non-mesh destination",
        attached,
        Some(bare),
    );
    row("to the node proxy directly", direct, None);
    row(
        "to a service address, redirected to the proxy",
        redirected,
        Some(direct),
    );
    Ok(())
}
