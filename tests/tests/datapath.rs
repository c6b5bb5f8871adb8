//! The eBPF datapath on a real kernel: pods (network namespaces with their own cgroups) connect
//! to service addresses; the programs redirect them to a probe agent on the node, which reports
//! the original destination it recovered. Without the agent, nftables DNAT (kube-proxy) serves.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use steer_tests::{Node, Process};

const PROBE: &str = env!("CARGO_BIN_EXE_redirect-probe");
const TOOL: &str = env!("CARGO_BIN_EXE_tcp-tool");
const PROXY_PORT: u16 = 15001;

/// A bed with a client pod, a server pod behind one service (kube-proxy DNAT), the server
/// running, and the service address.
struct Bed {
    node: Node,
    service: SocketAddr,
    _server: Process,
}

fn bed() -> Bed {
    let mut node = Node::new().expect("test bed");
    node.add_pod("client").unwrap();
    node.add_pod("optout").unwrap();
    let server_ip = node.add_pod("server").unwrap().ip;
    let service = SocketAddr::from((node.service_ip(0), 80));
    node.add_service(service, SocketAddr::from((server_ip, 8080)))
        .unwrap();
    let server = node
        .pod("server")
        .spawn(Command::new(TOOL).args(["serve", "0.0.0.0:8080", "kube-proxy-path"]))
        .unwrap();
    Bed {
        node,
        service,
        _server: server,
    }
}

/// The probe agent, attached to the bed's cgroup, redirecting `services`.
fn probe(node: &Node, services: &[SocketAddr], opt_out: &[&str]) -> Process {
    let listen4 = SocketAddr::from((node.address, PROXY_PORT)).to_string();
    probe_listening(node, &listen4, services, opt_out)
}

/// `probe` with its IPv4 listener `listen4` (`-`: none, IPv4 is not redirected).
fn probe_listening(
    node: &Node,
    listen4: &str,
    services: &[SocketAddr],
    opt_out: &[&str],
) -> Process {
    let mut command = Command::new(PROBE);
    command
        .arg(&node.cgroup)
        .arg(listen4)
        .arg(SocketAddr::from((node.address6, PROXY_PORT)).to_string())
        .args(services.iter().map(ToString::to_string));
    if !opt_out.is_empty() {
        command.arg("--opt-out");
        command.args(opt_out.iter().map(|pod| node.pod(pod).cgroup.clone()));
    }
    Process::start_on_host(&mut command, Some("ready")).expect("probe agent")
}

/// `tcp-tool connect` from inside a pod: (peer as getpeername shows it, what the server said).
fn connect_from(node: &Node, pod: &str, target: SocketAddr) -> (String, String) {
    let output = node
        .pod(pod)
        .exec(Command::new(TOOL).args(["connect", &target.to_string()]))
        .unwrap();
    assert!(
        output.status.success(),
        "connect from {pod} to {target}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8(output.stdout).unwrap();
    let (peer, said) = line
        .trim()
        .strip_prefix("peer=")
        .and_then(|rest| rest.split_once(" said="))
        .unwrap_or_else(|| panic!("unexpected output {line}"));
    (peer.to_string(), said.to_string())
}

#[test]
fn pod_connection_to_a_service_lands_on_the_proxy_with_its_original_destination() {
    let bed = bed();
    let _agent = probe(&bed.node, &[bed.service], &[]);
    let (peer, said) = connect_from(&bed.node, "client", bed.service);
    assert_eq!(said, format!("orig={}", bed.service));
    // getpeername in the pod still shows the service address, not the proxy's.
    assert_eq!(peer, bed.service.to_string());
}

#[test]
fn non_mesh_addresses_host_processes_and_opted_out_pods_are_untouched() {
    let mut bed = bed();
    // A second service the agent does not know: it stays on the kube-proxy path.
    let server_ip = bed.node.pod("server").ip;
    let other = SocketAddr::from((bed.node.service_ip(1), 80));
    bed.node
        .add_service(other, SocketAddr::from((server_ip, 8080)))
        .unwrap();
    let _agent = probe(&bed.node, &[bed.service], &["optout"]);

    assert_eq!(
        connect_from(&bed.node, "client", other).1,
        "kube-proxy-path"
    );
    assert_eq!(
        connect_from(&bed.node, "optout", bed.service).1,
        "kube-proxy-path"
    );
    // The host namespace (where the proxy and node daemons live) is never redirected.
    let output = Command::new(TOOL)
        .args(["connect", &bed.service.to_string()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("said=kube-proxy-path"));
}

#[test]
fn ipv6_and_ipv4_mapped_connections_are_redirected() {
    let bed = bed();
    let service6: SocketAddr = format!("[fd5f:0:{:x}::80]:80", bed.node.index)
        .parse()
        .unwrap();
    let _agent = probe(&bed.node, &[bed.service, service6], &[]);
    let (peer, said) = connect_from(&bed.node, "client", service6);
    assert_eq!(said, format!("orig={service6}"));
    assert_eq!(peer, service6.to_string());
    // A dual-stack socket dialling the IPv4 service through its mapped form.
    let mapped: SocketAddr = format!("[::ffff:{}]:80", bed.service.ip()).parse().unwrap();
    let (peer, said) = connect_from(&bed.node, "client", mapped);
    assert_eq!(said, format!("orig={}", bed.service));
    assert_eq!(peer, mapped.to_string());
}

#[test]
fn without_an_ipv4_listener_only_ipv6_connections_are_redirected() {
    let bed = bed();
    let service6: SocketAddr = format!("[fd5f:0:{:x}::80]:80", bed.node.index)
        .parse()
        .unwrap();
    let _agent = probe_listening(&bed.node, "-", &[bed.service, service6], &[]);
    let (_, said) = connect_from(&bed.node, "client", service6);
    assert_eq!(said, format!("orig={service6}"));
    // IPv4, plain and mapped, takes the kube-proxy path: the agent has nowhere to take it.
    let (_, said) = connect_from(&bed.node, "client", bed.service);
    assert_eq!(said, "kube-proxy-path");
    let mapped: SocketAddr = format!("[::ffff:{}]:80", bed.service.ip()).parse().unwrap();
    let (_, said) = connect_from(&bed.node, "client", mapped);
    assert_eq!(said, "kube-proxy-path");
}

#[test]
fn killing_the_agent_fails_open_and_restarting_it_redirects_again() {
    let bed = bed();
    let mut agent = probe(&bed.node, &[bed.service], &[]);
    assert!(
        connect_from(&bed.node, "client", bed.service)
            .1
            .starts_with("orig=")
    );
    agent.signal(libc::SIGKILL).unwrap();
    let killed = Instant::now();
    // New connections reach the service the kube-proxy way: at once (the kernel drops the
    // links with the process's last descriptor); the bound is for a busy machine.
    loop {
        let said = connect_from(&bed.node, "client", bed.service).1;
        if said == "kube-proxy-path" {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "still redirected: {said}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _agent = probe(&bed.node, &[bed.service], &[]);
    assert!(
        connect_from(&bed.node, "client", bed.service)
            .1
            .starts_with("orig=")
    );
}

#[test]
fn twelve_thousand_connections_leave_the_maps_at_rest() {
    let bed = bed();
    let _agent = probe(&bed.node, &[bed.service], &[]);
    let output = bed
        .node
        .pod("client")
        .exec(Command::new(TOOL).args(["connect", &bed.service.to_string(), "10000"]))
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // And 2,000 that the client closes first, with a reset, before the proxy even reads them.
    let output = bed
        .node
        .pod("client")
        .exec(Command::new(TOOL).args(["bench", &bed.service.to_string(), "2000"]))
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every connection has closed and no record outlives its socket.
    let control = SocketAddr::from((bed.node.address, PROXY_PORT + 1));
    assert_eq!(connect_from(&bed.node, "client", control).1, "records=0,0");
}
