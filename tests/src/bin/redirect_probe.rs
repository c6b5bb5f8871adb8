//! A minimal agent for the datapath tests: attaches the eBPF datapath and, on its listener,
//! answers every redirected connection with the original destination the programs recorded
//! (`orig=<addr>` or `orig=none`). On the port after its first listener it answers with the sizes of the
//! connection records (`records=<by-cookie>,<by-client>`): counting scans the maps, so it is
//! kept off the redirect path. The real agent is `steer run`.
//!
//! Usage: `redirect-probe CGROUP LISTEN4|- LISTEN6|- [SERVICE...] [--opt-out CGROUP...]`.
//! Prints `ready` once attached and listening.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
};

use anyhow::{Context, Result};
use steer::datapath::{Datapath, DatapathOptions};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (positional, opt_out) = match args.iter().position(|a| a == "--opt-out") {
        Some(at) => (&args[..at], &args[at + 1..]),
        None => (&args[..], &[][..]),
    };
    let [cgroup, listen4, listen6, services @ ..] = positional else {
        anyhow::bail!(
            "usage: redirect-probe CGROUP LISTEN4|- LISTEN6|- [SERVICE...] [--opt-out CGROUP...]"
        );
    };
    let listen4: Option<SocketAddr> = (listen4 != "-")
        .then(|| listen4.parse())
        .transpose()
        .context("LISTEN4")?;
    let listen6: Option<SocketAddr> = (listen6 != "-")
        .then(|| listen6.parse())
        .transpose()
        .context("LISTEN6")?;
    let services: Vec<SocketAddr> = services
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .context("SERVICE")?;

    let proxy_v4 = match listen4 {
        Some(SocketAddr::V4(v4)) => Some(v4),
        Some(_) => anyhow::bail!("LISTEN4 must be IPv4"),
        None => None,
    };
    let proxy_v6 = match listen6 {
        Some(SocketAddr::V6(v6)) => Some(v6),
        Some(_) => anyhow::bail!("LISTEN6 must be IPv6"),
        None => None,
    };
    let mut datapath = Datapath::attach(&DatapathOptions {
        cgroup: PathBuf::from(cgroup),
        proxy_v4,
        proxy_v6,
    })?;
    datapath.set_services(&services)?;
    let missing = datapath.set_opt_out(&opt_out.iter().map(PathBuf::from).collect::<Vec<_>>())?;
    anyhow::ensure!(missing.is_empty(), "no such cgroup: {missing:?}");
    let originals = datapath.original_destinations();

    let listeners: Vec<TcpListener> = listen4
        .into_iter()
        .chain(listen6)
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("listen on {addr}")))
        .collect::<Result<_>>()?;
    let first = listen4
        .or(listen6)
        .context("LISTEN4 and LISTEN6 are both -")?;
    let control_addr = SocketAddr::new(first.ip(), first.port() + 1);
    let control =
        TcpListener::bind(control_addr).with_context(|| format!("listen on {control_addr}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let originals = originals.clone();
            std::thread::spawn(move || {
                for mut stream in listener.incoming().flatten() {
                    let Ok(peer) = stream.peer_addr() else {
                        continue;
                    };
                    let original = originals
                        .take(peer)
                        .map_or("none".to_string(), |a| a.to_string());
                    let _ = writeln!(stream, "orig={original}");
                }
            })
        })
        .collect();
    // The control thread owns the datapath: the attachments live as long as the probe.
    threads.push(std::thread::spawn(move || {
        for mut stream in control.incoming().flatten() {
            let (cookies, clients) = datapath.record_counts();
            let _ = writeln!(stream, "records={cookies},{clients}");
        }
    }));
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}
