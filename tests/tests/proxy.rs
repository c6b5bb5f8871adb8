//! The node proxy's semantics on a running node (eBPF redirect + `steer run`): no spill, retry
//! within a version, h2c, upgrades, L4 fallback, header limits, live reload, drain.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use steer_tests::{
    Node, http,
    scenario::{Hop, Scenario, binary},
};

fn food_delivery() -> Scenario {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/food-delivery.yaml");
    Scenario::deploy(
        &fixture,
        &[("order", &["restaurant"]), ("restaurant", &["delivery"])],
        Node::new().unwrap(),
    )
    .unwrap()
}

fn restaurant(scenario: &Scenario) -> SocketAddr {
    scenario.config.service("restaurant").unwrap().addresses[0]
}

/// curl from the order pod (its connections are redirected to the node proxy).
fn curl_from_order(scenario: &Scenario, args: &[&str]) -> String {
    let output = scenario
        .node
        .pod("order-v1")
        .exec(
            Command::new("curl")
                .args(["-s", "--max-time", "10"])
                .args(args),
        )
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The food-delivery scenario after `edit` changed restaurant's configuration.
fn with_restaurant(edit: impl FnOnce(&mut steer::config::Service)) -> Scenario {
    let scenario = food_delivery();
    let mut config = scenario.config.clone();
    edit(
        config
            .services
            .iter_mut()
            .find(|s| s.name == "restaurant")
            .unwrap(),
    );
    scenario.apply(&config).unwrap();
    scenario
}

#[test]
fn a_version_without_endpoints_answers_503_and_never_spills() {
    let scenario = with_restaurant(|restaurant| {
        let blue = restaurant.versions.iter_mut().find(|v| v.name == "v2-blue");
        blue.unwrap().endpoints.clear();
    });
    let out = curl_from_order(
        &scenario,
        &[
            "-i",
            "-H",
            "x-device: android",
            &format!("http://{}/", restaurant(&scenario)),
        ],
    );
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("x-steer-version: v2-blue"), "{out}");
    assert!(out.contains("x-steer-release: blue"), "{out}");
    assert!(
        out.contains("no ready endpoint for restaurant/v2-blue"),
        "{out}"
    );
}

#[test]
fn a_refused_connection_is_retried_on_another_endpoint_of_the_same_version() {
    let scenario = with_restaurant(|restaurant| {
        let v1 = restaurant.versions.iter_mut().find(|v| v.name == "v1");
        let endpoints = &mut v1.unwrap().endpoints;
        // Same pod, a port nobody listens on: connections there are refused.
        endpoints.insert(0, SocketAddr::new(endpoints[0].ip(), 9));
    });
    for _ in 0..20 {
        let hop = scenario.request("order", &[]).unwrap();
        assert_eq!(
            hop.path(),
            "order/v1 -> restaurant/v1 -> delivery/v1",
            "{hop:?}"
        );
    }
}

#[test]
fn a_version_slower_than_its_service_request_timeout_answers_504() {
    let scenario = with_restaurant(|restaurant| {
        restaurant.request_timeout = Some(Duration::from_millis(400));
    });
    let url = |sleep: u32| format!("http://{}/?sleep={sleep}", restaurant(&scenario));
    // The version would answer after 30 s; the client gives up after 10: a 504 at all is the
    // proxy's timeout (no bound on how fast a busy machine gives it).
    let out = curl_from_order(&scenario, &["-i", &url(30_000)]);
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(out.contains("did not answer in time"), "{out}");
    assert!(out.contains("x-steer-version: v1"), "{out}");
    let out = curl_from_order(&scenario, &["-i", &url(50)]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[test]
fn an_endpoint_that_never_answers_the_connect_times_out_with_503() {
    let scenario = food_delivery();
    let live = scenario.config.service("restaurant").unwrap().versions[0].endpoints[0];
    // Inside the restaurant pod, SYNs to port 9 vanish: the connect can only time out.
    let pod = scenario.node.pod("restaurant-v1");
    let dropped = pod
        .exec(Command::new("nft").args(["add table inet blackhole; \
             add chain inet blackhole input { type filter hook input priority 0; }; \
             add rule inet blackhole input tcp dport 9 drop"]))
        .unwrap();
    assert!(dropped.status.success(), "{dropped:?}");
    let mut config = scenario.config.clone();
    let restaurant_v1 = &mut config
        .services
        .iter_mut()
        .find(|s| s.name == "restaurant")
        .unwrap()
        .versions[0];
    assert_eq!(restaurant_v1.name, "v1");
    restaurant_v1.endpoints = vec![SocketAddr::new(live.ip(), 9)];
    scenario.apply(&config).unwrap();
    let started = Instant::now();
    let out = curl_from_order(
        &scenario,
        &["-i", &format!("http://{}/", restaurant(&scenario))],
    );
    let took = started.elapsed();
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("timed out"), "{out}");
    // The pool's connect timeout is 2 s (the client gave 10: an answer at all is the pool's).
    assert!(took > Duration::from_millis(1500), "took {took:?}");
}

#[test]
fn a_service_called_by_its_ipv6_address_is_routed_like_by_its_ipv4_one() {
    let scenario = food_delivery();
    let service6: SocketAddr = format!("[fd5f:0:{:x}::20]:80", scenario.node.index)
        .parse()
        .unwrap();
    let mut config = scenario.config.clone();
    let restaurant = config.services.iter_mut().find(|s| s.name == "restaurant");
    restaurant.unwrap().addresses.push(service6);
    scenario.apply(&config).unwrap();
    for (tags, path) in [
        (&[][..], "restaurant/v1 -> delivery/v1"),
        (
            &["-H", "x-device: android"][..],
            "restaurant/v2-blue -> delivery/v2-blue",
        ),
    ] {
        let mut args = vec!["-g"];
        args.extend_from_slice(tags);
        let url = format!("http://{service6}/");
        args.push(&url);
        let out = curl_from_order(&scenario, &args);
        let hop: Hop = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        assert_eq!(hop.path(), path);
    }
}

#[test]
fn an_opted_out_pod_takes_the_kube_proxy_path_until_it_opts_back_in() {
    let scenario = food_delivery();
    let ask = || {
        let url = format!("http://{}/", restaurant(&scenario));
        curl_from_order(&scenario, &["-i", "-H", "x-device: android", &url])
    };
    assert!(ask().contains("x-steer-version: v2-blue"));

    let mut config = scenario.config.clone();
    let order = &scenario.node.pod("order-v1").cgroup;
    config.opt_out_cgroups = vec![
        // Relative to the cgroup the agent attaches to.
        order.strip_prefix(&scenario.node.cgroup).unwrap().into(),
        // A pod that is gone: skipped, the rest applies.
        scenario.node.cgroup.join("pod-gone"),
    ];
    scenario.apply(&config).unwrap();
    let out = ask();
    // kube-proxy's DNAT took the service address to a primary pod; no proxy was on the way.
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(!out.contains("x-steer-"), "{out}");
    let body = out.split_once("\r\n\r\n").unwrap().1;
    let hop: Hop = serde_json::from_str(body).unwrap();
    assert_eq!(
        (hop.service.as_str(), hop.version.as_str()),
        ("restaurant", "v1")
    );

    config.opt_out_cgroups.clear();
    scenario.apply(&config).unwrap();
    assert!(ask().contains("x-steer-version: v2-blue"));
}

#[test]
fn sequential_requests_reuse_pooled_upstream_connections() {
    let scenario = food_delivery();
    let url = format!("http://{}/", restaurant(&scenario));
    // One curl, twenty requests, one after the other; restaurant says which of its
    // connections carried each.
    let mut args = vec!["-i"];
    args.extend(std::iter::repeat_n(url.as_str(), 20));
    let out = curl_from_order(&scenario, &args);
    let connections: Vec<&str> = out
        .lines()
        .filter_map(|line| line.strip_prefix("x-demo-connection: "))
        .map(str::trim)
        .collect();
    assert_eq!(connections.len(), 20, "{out}");
    let distinct: std::collections::BTreeSet<&str> = connections.iter().copied().collect();
    // A connection goes back to the pool just after its response: the next request may open
    // another before that, but not one per request.
    assert!(distinct.len() <= 3, "{connections:?}");
}

#[test]
fn h2c_requests_are_proxied_over_http2() {
    let scenario = food_delivery();
    let out = curl_from_order(
        &scenario,
        &[
            "--http2-prior-knowledge",
            "-H",
            "x-device: android",
            "-w",
            "\nversion=%{http_version}",
            &format!("http://{}/", restaurant(&scenario)),
        ],
    );
    let (body, version) = out.rsplit_once("\nversion=").unwrap();
    assert_eq!(version, "2", "{out}");
    let hop: Hop = serde_json::from_str(body).unwrap();
    assert_eq!(hop.path(), "restaurant/v2-blue -> delivery/v2-blue");
}

#[test]
fn upgrades_pass_through_both_ways() {
    let scenario = food_delivery();
    let mut stream = TcpStream::connect(scenario.gateway).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: order\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 512];
    let n = http::read_some(&mut stream, &mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"ping over the upgraded stream").unwrap();
    let mut echo = [0u8; 64];
    let n = http::read_some(&mut stream, &mut echo).unwrap();
    assert_eq!(&echo[..n], b"ping over the upgraded stream");
}

#[test]
fn bodies_stream_through_the_proxy_both_ways() {
    let scenario = food_delivery();
    let mut stream = TcpStream::connect(scenario.gateway).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Reads until `want` has arrived; a proxy that waited for the whole upload (or the whole
    // answer) never delivers it while the upload is still open.
    let mut received = Vec::new();
    let mut read_until = |stream: &mut TcpStream, want: &str| {
        let mut chunk = [0u8; 1024];
        while !String::from_utf8_lossy(&received).contains(want) {
            let n = http::read_some(stream, &mut chunk)
                .unwrap_or_else(|e| panic!("waiting for {want:?}: {e}"));
            assert!(n > 0, "closed before {want:?}");
            received.extend_from_slice(&chunk[..n]);
        }
    };
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: restaurant\r\ntransfer-encoding: chunked\r\n\r\n\
              6\r\nfirst \r\n",
        )
        .unwrap();
    read_until(&mut stream, "first ");
    stream.write_all(b"6\r\nsecond\r\n0\r\n\r\n").unwrap();
    read_until(&mut stream, "second");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[test]
fn non_http_connections_are_relayed_at_l4_to_the_primary_version() {
    let mut scenario = food_delivery();
    // A server-first TCP service, declared as such: the client sends nothing, the server
    // speaks first.
    let pod_ip = scenario.node.pod_ip(50);
    let pod = scenario.node.add_pod_at("legacy-v1", pod_ip).unwrap();
    let _server = pod
        .spawn(Command::new(binary("tcp-tool").unwrap()).args([
            "serve",
            "0.0.0.0:7000",
            "legacy-v1",
        ]))
        .unwrap();
    let service = SocketAddr::from((scenario.node.service_ip(60), 7000));
    let mut config = scenario.config.clone();
    config.services.push(
        serde_yaml_ng::from_str(&format!(
            "{{name: legacy, protocol: tcp, addresses: [\"{service}\"], versions: [{{name: v1, primary: true, endpoints: [\"{pod_ip}:7000\"]}}]}}"
        ))
        .unwrap(),
    );
    scenario.apply(&config).unwrap();
    let output = scenario
        .node
        .pod("order-v1")
        .exec(Command::new(binary("tcp-tool").unwrap()).args(["connect", &service.to_string()]))
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    // getpeername shows the service; the bytes came from the primary pod through the proxy.
    assert_eq!(
        said.trim(),
        format!("peer={service} said=legacy-v1"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn oversized_request_headers_get_431() {
    let scenario = food_delivery();
    let huge = "a".repeat(100 * 1024);
    let reply = http::get(
        scenario.gateway,
        "/",
        &[("host", "order"), ("x-huge", &huge)],
    )
    .unwrap();
    assert_eq!(reply.status, 431);
    // The proxy keeps serving.
    assert_eq!(
        scenario.request("order", &[]).unwrap().path(),
        "order/v1 -> restaurant/v1 -> delivery/v1"
    );
}

/// The agent's exit status once it has exited, waiting at most `within`.
fn exit_within(
    agent: &mut steer_tests::Process,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        let exited = agent.try_wait().unwrap();
        if exited.is_some() || Instant::now() >= deadline {
            return exited;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `bytes` on a new connection to `to` and reads until the peer closes or goes quiet.
fn exchange(to: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(to).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = http::read_some(&mut stream, &mut chunk) {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[test]
fn malformed_requests_are_refused_and_the_proxy_keeps_serving() {
    let scenario = food_delivery();
    let cases: [(&str, &[u8]); 5] = [
        ("not HTTP", b"GARBAGE\r\n\r\n"),
        (
            "a space in a header name",
            b"GET / HTTP/1.1\r\nhost: order\r\nbad header: x\r\n\r\n",
        ),
        (
            "a NUL in a header value",
            b"GET / HTTP/1.1\r\nhost: order\r\nx-device: and\0roid\r\n\r\n",
        ),
        (
            "two content-lengths",
            b"POST / HTTP/1.1\r\nhost: order\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        ),
        (
            "an unknown HTTP version",
            b"GET / HTTP/9.9\r\nhost: order\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let answer = exchange(scenario.gateway, bytes);
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
    }
    assert_eq!(
        scenario.request("order", &[]).unwrap().path(),
        "order/v1 -> restaurant/v1 -> delivery/v1"
    );
}

#[test]
fn requests_framed_two_ways_are_refused_before_a_byte_reaches_the_upstream() {
    let scenario = food_delivery();
    // Request smuggling needs a proxy and an upstream that split the bytes differently: a
    // framing two parsers could read differently is refused (RFC 9112), 400, or 501 for a
    // coding steer does not apply, and the connection closed.
    let variants: [(&str, u16); 8] = [
        ("transfer-encoding: cow, chunked\r\n", 501),
        ("transfer-encoding: identity, chunked\r\n", 501),
        ("transfer-encoding: chunked, chunked\r\n", 400),
        (
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
            400,
        ),
        (
            "transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n",
            400,
        ),
        ("transfer-encoding: chunked, gzip\r\n", 400),
        (
            "transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n",
            400,
        ),
        ("host: restaurant\r\ncontent-length: 10\r\n", 400),
    ];
    // What the proxy sent restaurant (the bed's readiness check went through already).
    let routed_to_restaurant = || {
        let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
        metrics
            .lines()
            .filter(|l| l.starts_with("steer_requests_total{service=\"restaurant\""))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let before = routed_to_restaurant();
    for (framing, status) in variants {
        let request = format!(
            "POST /echo HTTP/1.1\r\nhost: restaurant\r\n{framing}\r\n5\r\nhello\r\n0\r\n\r\n\
             GET /smuggled HTTP/1.1\r\nhost: restaurant\r\n\r\n"
        );
        let answer = exchange(scenario.gateway, request.as_bytes());
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{framing}: {answer}"
        );
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "nothing after it is served: {answer}"
        );
    }
    // None was routed, so none went to an upstream (hyper refuses some itself; the others
    // are counted).
    assert_eq!(routed_to_restaurant(), before);
    let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
    assert!(
        !metrics.contains("steer_request_errors_total{reason=\"malformed_request\"} 0"),
        "{metrics}"
    );
    assert_eq!(
        scenario.request("order", &[]).unwrap().path(),
        "order/v1 -> restaurant/v1 -> delivery/v1"
    );
}

#[test]
fn a_request_framed_two_ways_reaches_the_upstream_framed_one_way() {
    let scenario = food_delivery();
    // Content-Length with Transfer-Encoding: hyper drops the length (RFC 9112 6.3) and closes
    // the connection after, and the upstream (an echo) sees exactly the chunked body.
    let answer = exchange(
        scenario.gateway,
        b"POST /echo HTTP/1.1\r\nhost: restaurant\r\ncontent-length: 3\r\n\
          transfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: restaurant\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    let unchunked: String = body
        .split("\r\n")
        .skip(1)
        .step_by(2)
        .collect::<Vec<_>>()
        .concat();
    assert_eq!(unchunked, "hello", "{answer}");
}

#[test]
fn live_reloads_under_load_drop_nothing_and_invalid_edits_keep_serving() {
    let scenario = food_delivery();
    let original = scenario.config.clone();
    let mut without_red = original.clone();
    without_red.releases.retain(|r| r.name != "red");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let gateway = scenario.gateway;
        let stop = stop.clone();
        let answered = answered.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = http::get(
                    gateway,
                    "/",
                    &[
                        ("host", "order"),
                        ("x-device", "android"),
                        ("x-region", "atlantis"),
                    ],
                )
                .unwrap();
                assert_eq!(reply.status, 200, "{}", reply.body);
                let hop: Hop = serde_json::from_str(&reply.body).unwrap();
                let path = hop.path();
                // Red, blue, or (red retired while the request was on its way) primary from
                // there on; never a mix of two releases.
                assert!(
                    [
                        "order/v1 -> restaurant/v2-red -> delivery/v1",
                        "order/v1 -> restaurant/v2-blue -> delivery/v2-blue",
                        "order/v1 -> restaurant/v1 -> delivery/v1",
                    ]
                    .contains(&path.as_str()),
                    "{path}"
                );
                let first = hop.release.clone();
                assert!(hop.flatten().iter().all(|h| h.release == first), "{hop:?}");
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    // Requests answered since `before`, waited for: traffic between every two reloads.
    let answered_since = |before: usize| {
        let started = Instant::now();
        while answered.load(std::sync::atomic::Ordering::Relaxed) < before + 2 {
            assert!(!load.is_finished(), "the load stopped: a request failed");
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no requests answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    for round in 0..10 {
        let config = if round % 2 == 0 {
            &without_red
        } else {
            &original
        };
        let before = answered.load(std::sync::atomic::Ordering::Relaxed);
        scenario.apply(config).unwrap();
        answered_since(before);
    }
    // A broken edit is rejected; the previous configuration keeps serving.
    std::fs::write(&scenario.config_path, "releases: [ this is not yaml").unwrap();
    let started = Instant::now();
    while !http::get(scenario.admin, "/metrics", &[])
        .unwrap()
        .body
        .contains("steer_config_reloads_total{result=\"rejected\"} 1")
    {
        assert!(started.elapsed() < Duration::from_secs(60), "not rejected");
        std::thread::sleep(Duration::from_millis(20));
    }
    answered_since(answered.load(std::sync::atomic::Ordering::Relaxed));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().expect("no request failed during reloads");
    let path = scenario
        .request(
            "order",
            &[("x-device", "android"), ("x-region", "atlantis")],
        )
        .unwrap()
        .path();
    assert_eq!(path, "order/v1 -> restaurant/v2-red -> delivery/v1");
    let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
    assert!(
        metrics.contains("steer_config_reloads_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let mut scenario = food_delivery();
    let gateway = scenario.gateway;
    let slow = std::thread::spawn(move || {
        http::get(gateway, "/?sleep=800", &[("host", "order")]).unwrap()
    });
    // In flight: its connection is open at the agent.
    let started = Instant::now();
    while !http::get(scenario.admin, "/metrics", &[])
        .unwrap()
        .body
        .contains("steer_client_connections 1\n")
    {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let agent = scenario.agent.as_mut().unwrap();
    let pid = agent.id() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let reply = slow.join().unwrap();
    assert_eq!(
        reply.status, 200,
        "the in-flight request finished: {}",
        reply.body
    );
    // Within the drain grace (5 s) and the time to detach the programs.
    let exited = exit_within(agent, Duration::from_secs(60));
    assert!(
        exited.is_some_and(|s| s.success()),
        "steer exits cleanly after draining: {exited:?}"
    );
    assert!(TcpStream::connect(gateway).is_err(), "no longer accepting");
}

#[test]
fn grpc_style_trailers_cross_the_proxy_over_h2c() {
    let scenario = food_delivery();
    let gateway = scenario.gateway;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, trailers) = runtime.block_on(async move {
        use http_body_util::BodyExt;
        let stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::post("http://order/trailers")
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            )))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let collected = response.into_body().collect().await.unwrap();
        (status, collected.trailers().cloned())
    });
    assert_eq!(status, 200);
    let trailers = trailers.expect("trailers arrive after the body");
    assert_eq!(trailers["grpc-status"], "0");
}

#[test]
fn debug_headers_are_for_the_mesh_unless_asked_for_and_can_be_turned_off() {
    let mut scenario = food_delivery();
    let ask_gateway = |scenario: &Scenario| {
        http::get(
            scenario.gateway,
            "/",
            &[("host", "order"), ("x-device", "android")],
        )
        .unwrap()
    };
    // Outsiders do not learn internal names by default; the mesh's own callers do.
    let reply = ask_gateway(&scenario);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("x-steer-version"), None, "{:?}", reply.headers);
    let url = format!("http://{}/", restaurant(&scenario));
    let out = curl_from_order(&scenario, &["-i", "-H", "x-device: android", &url]);
    assert!(out.contains("x-steer-version: v2-blue"), "{out}");

    scenario.agent_args = vec!["--gateway-debug-headers".into()];
    scenario.start_agent().unwrap();
    let reply = ask_gateway(&scenario);
    assert_eq!(reply.header("x-steer-version"), Some("v1"));
    assert_eq!(reply.header("x-steer-release"), Some("blue"));
    let mut quiet = scenario.config.clone();
    quiet.debug_headers = false;
    scenario.apply(&quiet).unwrap();
    let reply = ask_gateway(&scenario);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-steer-version"), None);
}

#[test]
fn gateway_routes_pick_the_first_service_by_host_and_path_prefix() {
    let scenario = food_delivery();
    let mut config = scenario.config.clone();
    config.gateway = serde_yaml_ng::from_str(
        "routes:\n  - { host: shop.example, pathPrefix: /track, service: delivery }\n  - { host: shop.example, service: order }\n",
    )
    .unwrap();
    scenario.apply(&config).unwrap();
    let ask = |host: &str, target: &str| {
        http::get(
            scenario.gateway,
            target,
            &[("host", host), ("x-region", "atlantis")],
        )
        .unwrap()
    };
    let served_by = |host: &str, target: &str| {
        let reply = ask(host, target);
        assert_eq!(reply.status, 200, "{host} {target}: {}", reply.body);
        serde_json::from_str::<Hop>(&reply.body).unwrap().path()
    };
    assert_eq!(
        served_by("shop.example:80", "/track/42"),
        "delivery/v2-green"
    );
    assert_eq!(
        served_by("shop.example:80", "/"),
        "order/v1 -> restaurant/v1 -> delivery/v2-green"
    );
    // Hosts compare without case and without a trailing dot; an absolute-form target names
    // the host over the Host header.
    assert_eq!(served_by("SHOP.example.", "/track/1"), "delivery/v2-green");
    assert_eq!(
        served_by("internal-admin", "http://shop.example/track/1"),
        "delivery/v2-green"
    );
    // The routes are the allowlist: a Host naming an internal service reaches nothing.
    for host in [
        "delivery",
        "internal-admin",
        "restaurant.food.svc.cluster.local",
    ] {
        let reply = ask(host, "/");
        assert_eq!(reply.status, 404, "{host}: {}", reply.body);
    }
}

#[test]
fn a_file_edited_in_place_is_applied_only_once_it_is_whole() {
    let scenario = food_delivery();
    let text = serde_yaml_ng::to_string(&scenario.config).unwrap();
    // Cut after the first service: valid YAML that lacks restaurant and delivery.
    let half = text.find("- name: restaurant").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let gateway = scenario.gateway;
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut answered = 0;
            // Until the edits are over and (however slow the machine) a few dozen requests
            // were answered.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || answered <= 20 {
                let reply = http::get(gateway, "/", &[("host", "order")]).unwrap();
                let hop: Option<Hop> = serde_json::from_str(&reply.body).ok();
                let path = hop.as_ref().map(Hop::path);
                if reply.status != 200
                    || path.as_deref() != Some("order/v1 -> restaurant/v1 -> delivery/v1")
                {
                    failures.push(format!("{}: {}", reply.status, reply.body));
                }
                answered += 1;
            }
            (answered, failures)
        })
    };
    // An editor writing in place: truncate, then the text in two parts, a moment apart.
    for _ in 0..60 {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&scenario.config_path)
            .unwrap();
        std::thread::sleep(Duration::from_millis(8));
        file.write_all(&text.as_bytes()[..half]).unwrap();
        std::thread::sleep(Duration::from_millis(8));
        file.write_all(&text.as_bytes()[half..]).unwrap();
        drop(file);
        std::thread::sleep(Duration::from_millis(4));
    }
    // The watcher's last look at the file, with traffic.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, failures) = load.join().unwrap();
    assert!(answered > 20, "only {answered} requests");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

#[test]
fn a_stamp_sent_straight_to_the_redirect_listener_is_not_honoured() {
    let mut scenario = food_delivery();
    // The debug headers tell which version served; outsiders get them only when asked for.
    scenario.agent_args = vec!["--gateway-debug-headers".into()];
    scenario.start_agent().unwrap();
    // From the node itself, not redirected by the datapath: anyone who can reach the node's
    // address could do this, so the stamp must not pick the release.
    let listener = SocketAddr::from((scenario.node.address, steer_tests::scenario::PROXY_PORT));
    let forged = [("host", "delivery"), ("x-steer-release", "blue")];
    let reply = http::get(listener, "/", &forged).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("x-steer-version"),
        Some("v1"),
        "{:?}",
        reply.headers
    );
    // Tags still decide there, as at the gateway.
    let tagged = [("host", "delivery"), ("x-region", "atlantis")];
    let reply = http::get(listener, "/", &tagged).unwrap();
    assert_eq!(
        reply.header("x-steer-version"),
        Some("v2-green"),
        "{:?}",
        reply.headers
    );
}

/// Whether the peer closes a connection within `within` (reading nothing but the close or an
/// error response).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return true,
            // A signal to the test process is not the peer's doing.
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

#[test]
fn slow_senders_and_idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let mut scenario = food_delivery();
    scenario.agent_args = vec!["--idle-timeout".into(), "1".into()];
    scenario.start_agent().unwrap();
    let started = Instant::now();
    // Slowloris: half a request head, then silence.
    let mut slow = TcpStream::connect(scenario.gateway).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: order\r\nx-device: and")
        .unwrap();
    // Slowloris that trickles: a byte of its head every 200 ms, never the end of it. Closed at
    // the timeout all the same (as nginx's client_header_timeout): the timer does not start
    // over with each byte.
    let mut trickle = TcpStream::connect(scenario.gateway).unwrap();
    trickle
        .write_all(b"GET / HTTP/1.1\r\nhost: order\r\nx-device: a")
        .unwrap();
    let mut trickling = trickle.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        let began = Instant::now();
        while began.elapsed() < Duration::from_secs(40) && trickling.write_all(b"a").is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    // A keep-alive client that went quiet after its request.
    let mut idle = TcpStream::connect(scenario.gateway).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: order\r\n\r\n")
        .unwrap();
    // Bounds for a busy machine: what counts is that each is closed, and not before its time.
    for (name, stream) in [
        ("slow sender", &mut slow),
        ("trickling sender", &mut trickle),
        ("idle connection", &mut idle),
    ] {
        assert!(
            closed_within(stream, Duration::from_secs(30)),
            "{name} kept"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    trickler.join().unwrap();
    // A pod's connection to a mesh service, redirected: the same, whether its bytes stall in
    // the request line (before the proxy can tell HTTP from other protocols) or in a header.
    let restaurant = scenario.config.service("restaurant").unwrap().addresses[0].to_string();
    for prefix in ["G", "GET / HTTP/1.1\r\nhost: restaurant\r\nx-device: a"] {
        let output = scenario
            .node
            .pod("order-v1")
            .exec(Command::new(binary("tcp-tool").unwrap()).args(["trickle", &restaurant, prefix]))
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "closed",
            "{prefix:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Requests that come in time are served as before.
    assert_eq!(
        scenario.request("order", &[]).unwrap().path(),
        "order/v1 -> restaurant/v1 -> delivery/v1"
    );
}

#[test]
fn connections_past_the_limit_are_closed_at_once_and_counted() {
    let mut scenario = food_delivery();
    scenario.agent_args = vec!["--max-connections".into(), "3".into()];
    scenario.start_agent().unwrap();
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(scenario.gateway).unwrap())
        .collect();
    let open = |n: usize| {
        let want = format!("steer_client_connections {n}\n");
        let started = Instant::now();
        loop {
            let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
            if metrics.contains(&want) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{want}{metrics}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The three are accepted before the fourth comes.
    open(3);
    let mut over = TcpStream::connect(scenario.gateway).unwrap();
    assert!(
        closed_within(&mut over, Duration::from_secs(30)),
        "the fourth was kept"
    );
    let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
    assert!(
        metrics.contains("steer_connections_refused_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("steer_client_connections 3"), "{metrics}");
    // Once they close, clients are served again.
    drop(held);
    open(0);
    let reply = http::get(scenario.gateway, "/", &[("host", "delivery")]).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[test]
fn an_endpoint_at_the_agents_own_listener_is_refused_and_the_previous_configuration_serves() {
    let scenario = food_delivery();
    let mut looping = scenario.config.clone();
    let restaurant = looping
        .services
        .iter_mut()
        .find(|s| s.name == "restaurant")
        .unwrap();
    restaurant.versions[0].endpoints = vec![scenario.gateway];
    std::fs::write(
        &scenario.config_path,
        serde_yaml_ng::to_string(&looping).unwrap(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
        if metrics.contains("steer_config_reloads_total{result=\"rejected\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "never rejected: {metrics}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    assert_eq!(
        scenario.request("order", &[]).unwrap().path(),
        "order/v1 -> restaurant/v1 -> delivery/v1"
    );
    // Served, not looping through the proxy until something gives up (a generous bound: a
    // loop would last until the client's own timeout).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn requests_of_any_method_are_routed_by_their_tags() {
    let scenario = food_delivery();
    let url = format!("http://{}/", restaurant(&scenario));
    for method in ["PROPFIND", "PURGE", "QUERY"] {
        let out = curl_from_order(
            &scenario,
            &["-i", "-X", method, "-H", "x-device: android", &url],
        );
        // Through the proxy's HTTP path (with its debug headers), to blue's version; an L4
        // relay would have gone to the primary untouched.
        assert!(out.contains("x-steer-version: v2-blue"), "{method}: {out}");
    }
}

/// Reads one HTTP/1.1 response with a content-length from a kept-open connection: its head
/// (lower-cased) and body.
fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = http::read_some(stream, &mut chunk).unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let head = head.to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if body.len() >= length {
                return (head, body.to_string());
            }
        }
    }
}

#[test]
fn sigterm_lets_keep_alive_clients_finish_and_keeps_tunnels_for_the_grace_period() {
    let mut scenario = food_delivery();
    // A grace far longer than this test takes on a busy machine.
    scenario.agent_args = vec!["--drain-grace".into(), "60".into()];
    scenario.start_agent().unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: delivery\r\n\r\n";
    let mut keep_alive = TcpStream::connect(scenario.gateway).unwrap();
    keep_alive
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    keep_alive.write_all(request).unwrap();
    let (head, _) = read_response(&mut keep_alive);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut tunnel = TcpStream::connect(scenario.gateway).unwrap();
    tunnel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    tunnel
        .write_all(b"GET / HTTP/1.1\r\nhost: order\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 512];
    let n = http::read_some(&mut tunnel, &mut head).unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 101"));

    let agent = scenario.agent.as_mut().unwrap();
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let signaled = Instant::now();
    // The idle keep-alive connection is still answered, and (once the drain reached its
    // worker) told to reconnect.
    loop {
        keep_alive.write_all(request).unwrap();
        let (head, _) = read_response(&mut keep_alive);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        if head.contains("connection: close") {
            break;
        }
        assert!(
            signaled.elapsed() < Duration::from_secs(30),
            "never told: {head}"
        );
    }
    assert!(closed_within(&mut keep_alive, Duration::from_secs(30)));
    // The tunnel outlives the HTTP connections (served for a second into the drain), within
    // the grace period.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(signaled.elapsed()));
    tunnel.write_all(b"still there").unwrap();
    let mut echo = [0u8; 64];
    let n = http::read_some(&mut tunnel, &mut echo).unwrap();
    assert_eq!(&echo[..n], b"still there");
    drop(tunnel);
    let exited = exit_within(agent, Duration::from_secs(60));
    assert!(
        exited.is_some_and(|s| s.success()),
        "exits once the tunnel closed: {exited:?}"
    );
}

#[test]
fn a_chunked_body_on_a_get_reaches_the_upstream() {
    let scenario = food_delivery();
    let answer = exchange(
        scenario.gateway,
        b"GET /echo HTTP/1.1\r\nhost: delivery\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("hello") && answer.contains(" world"),
        "{answer}"
    );
}

#[test]
fn a_hostile_configuration_file_is_refused_without_stalling_traffic() {
    let scenario = food_delivery();
    let deep = format!("releases: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    std::fs::write(&scenario.config_path, deep).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = Instant::now();
        let hop = scenario.request("order", &[]).unwrap();
        assert_eq!(hop.path(), "order/v1 -> restaurant/v1 -> delivery/v1");
        // No stall while the file is read (parsing runs off the workers); generous for a
        // busy machine, short of the many seconds a stall took.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
        if metrics.contains("steer_config_reloads_total{result=\"rejected\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "never rejected");
    }
}

#[test]
fn a_client_slow_to_send_its_request_is_still_routed_by_its_tags() {
    let scenario = food_delivery();
    // From a pod, through the redirect: connect, wait longer than any sniffing timer would
    // have, then send a tagged request.
    let restaurant = restaurant(&scenario);
    let script = format!(
        "import socket, time\n\
         s = socket.create_connection(('{}', {}))\n\
         time.sleep(0.6)\n\
         s.sendall(b'GET / HTTP/1.1\\r\\nhost: restaurant\\r\\nx-device: android\\r\\nconnection: close\\r\\n\\r\\n')\n\
         s.settimeout(5)\n\
         out = b''\n\
         while True:\n    chunk = s.recv(65536)\n    if not chunk: break\n    out += chunk\n\
         print(out.decode(errors='replace'))\n",
        restaurant.ip(),
        restaurant.port()
    );
    let output = scenario
        .node
        .pod("order-v1")
        .exec(Command::new("python3").args(["-c", &script]))
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(out.contains("x-steer-version: v2-blue"), "{out}");
}

#[test]
fn keep_alive_clients_under_load_lose_no_request_across_a_sigterm() {
    let mut scenario = food_delivery();
    let restaurant = restaurant(&scenario);
    // Four keep-alive clients in a pod, as an HTTP library does it: reuse the connection,
    // open a new one when a response says `Connection: close`; a request that fails counts.
    let script = format!(
        "import http.client, threading, time\n\
         failures, answered = [], [0]\n\
         def client():\n\
         \x20   conn = None\n\
         \x20   end = time.time() + 3\n\
         \x20   while time.time() < end:\n\
         \x20       try:\n\
         \x20           if conn is None:\n\
         \x20               conn = http.client.HTTPConnection('{ip}', {port}, timeout=5)\n\
         \x20           conn.request('GET', '/', headers={{'host': 'restaurant'}})\n\
         \x20           resp = conn.getresponse()\n\
         \x20           resp.read()\n\
         \x20           if resp.status != 200: failures.append(resp.status)\n\
         \x20           answered[0] += 1\n\
         \x20           if resp.will_close: conn.close(); conn = None\n\
         \x20       except Exception as e:\n\
         \x20           failures.append(repr(e)); conn = None\n\
         \x20       time.sleep(0.01)\n\
         threads = [threading.Thread(target=client) for _ in range(4)]\n\
         [t.start() for t in threads]; [t.join() for t in threads]\n\
         print(answered[0], failures)\n",
        ip = restaurant.ip(),
        port = restaurant.port()
    );
    let mut command = Command::new("python3");
    command.args(["-c", &script]);
    let pod = scenario.node.pod("order-v1");
    let agent = scenario.agent.as_mut().unwrap();
    let output = std::thread::scope(|scope| {
        let load = scope.spawn(|| pod.exec(&command).unwrap());
        std::thread::sleep(Duration::from_millis(1000));
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        load.join().unwrap()
    });
    let said = String::from_utf8_lossy(&output.stdout);
    let (answered, failures) = said.trim().split_once(' ').unwrap_or(("0", &said));
    assert!(
        answered.parse::<u32>().unwrap_or(0) > 100,
        "{said} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(failures, "[]", "requests failed across the SIGTERM: {said}");
}

/// Issue 26, item 0: a client that breaks its own request body, or sends it slower than the
/// request timeout, must not be able to make a version look failing (a rollout's analysis
/// reads the versions' 5xx). Its answer is 400 or 408, counted under a reason of its own.
#[test]
fn a_broken_or_slow_request_body_is_the_clients_failure_not_the_versions() {
    let scenario = with_restaurant(|restaurant| {
        restaurant.request_timeout = Some(Duration::from_secs(1));
    });
    // The version answers only after a while: the body breaks off before it does.
    let broken = exchange(
        scenario.gateway,
        b"POST /?sleep=3000 HTTP/1.1\r\nhost: restaurant\r\ntransfer-encoding: chunked\r\n\r\n\
          5\r\nhello\r\nZZZ",
    );
    assert!(broken.starts_with("HTTP/1.1 400"), "{broken}");
    // Half of a 10-byte body, then nothing: the request timeout ends the wait.
    let mut slow = TcpStream::connect(scenario.gateway).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(
        b"POST /?sleep=3000 HTTP/1.1\r\nhost: restaurant\r\ncontent-length: 10\r\n\r\nhello",
    )
    .unwrap();
    let mut answer = [0u8; 512];
    let n = http::read_some(&mut slow, &mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // A version that takes in none of a large body and does not answer is the slow one, even
    // while the client is still sending: 504, counted against the version.
    let mut upload = TcpStream::connect(scenario.gateway).unwrap();
    upload
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sender = upload.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        let size = 64 << 20;
        let head = format!(
            "POST /?sleep=3000 HTTP/1.1\r\nhost: restaurant\r\ncontent-length: {size}\r\n\r\n"
        );
        let _ = sender.write_all(head.as_bytes());
        // Until the proxy answers and closes.
        let _ = sender.write_all(&vec![b'x'; size]);
    });
    let mut answer = [0u8; 512];
    let n = http::read_some(&mut upload, &mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    drop(upload);
    sending.join().unwrap();

    let metrics = http::get(scenario.admin, "/metrics", &[]).unwrap().body;
    for reason in ["client_body", "client_timeout"] {
        let line = format!("steer_request_errors_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let failing: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("steer_requests_total{") && l.contains("code=\"5xx\""))
        .collect();
    assert_eq!(
        failing.len(),
        1,
        "the version's own timeout only: {failing:?}"
    );
    assert!(
        failing[0].contains("service=\"restaurant\",version=\"v1\"") && failing[0].ends_with(" 1"),
        "{failing:?}"
    );
}

/// Issue 26, item 6: HTTP/2 connections fall under the idle timeout too, from the accept for
/// one that never completes its preface, after its last request for one that went quiet.
#[test]
fn silent_http2_connections_and_incomplete_prefaces_are_closed_after_the_idle_timeout() {
    let mut scenario = food_delivery();
    scenario.agent_args = vec!["--idle-timeout".into(), "1".into()];
    scenario.start_agent().unwrap();
    let mut partial = TcpStream::connect(scenario.gateway).unwrap();
    partial.write_all(b"PRI * HTTP/2.0").unwrap();
    // The whole preface and an empty SETTINGS frame, then nothing.
    let mut silent = TcpStream::connect(scenario.gateway).unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut partial, Duration::from_secs(6)),
        "incomplete preface kept"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(6)),
        "silent HTTP/2 connection kept"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // HTTP/2 requests that come in time are served as before.
    let out = scenario
        .node
        .pod("order-v1")
        .exec(Command::new("curl").args([
            "-s",
            "--http2-prior-knowledge",
            &format!("http://{}/", restaurant(&scenario)),
        ]))
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("restaurant"),
        "{out:?}"
    );
}

/// A misbehaving upstream in the restaurant pod: `/switch` answers 101 though nothing asked
/// for an upgrade; anything else sends a head promising 1,000 bytes, 10 of them, then nothing.
const MISBEHAVING_UPSTREAM: &str = "\
import socket, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 9000))
s.listen(16)
def serve(c):
    head = b''
    while b'\\r\\n\\r\\n' not in head:
        data = c.recv(4096)
        if not data:
            return
        head += data
    if b'/switch' in head.split(b'\\r\\n')[0]:
        c.sendall(b'HTTP/1.1 101 Switching Protocols\\r\\nconnection: upgrade\\r\\nupgrade: x\\r\\n\\r\\n')
    else:
        c.sendall(b'HTTP/1.1 200 OK\\r\\ncontent-length: 1000\\r\\n\\r\\n' + b'x' * 10)
    time.sleep(60)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
";

/// Issue 26, item 8: an upstream that stops in the middle of a body is cut off after
/// `--upstream-read-timeout`, and an unasked 101 is a 502, not a bare 101 for the client.
#[test]
fn an_upstream_stalling_mid_body_is_cut_off_and_an_unasked_101_is_a_502() {
    let mut scenario = food_delivery();
    scenario.agent_args = vec!["--upstream-read-timeout".into(), "1".into()];
    scenario.start_agent().unwrap();
    let pod = scenario.node.pod("restaurant-v1");
    let _upstream = pod
        .spawn(Command::new("python3").args(["-c", MISBEHAVING_UPSTREAM]))
        .unwrap();
    let mut config = scenario.config.clone();
    let restaurant_v1 = &mut config
        .services
        .iter_mut()
        .find(|s| s.name == "restaurant")
        .unwrap()
        .versions[0];
    restaurant_v1.endpoints = vec![SocketAddr::new(pod.ip.into(), 9000)];
    scenario.apply(&config).unwrap();

    // Until the server listens, the connect is refused (503).
    let deadline = Instant::now() + Duration::from_secs(20);
    let switched = loop {
        let answer = exchange(
            scenario.gateway,
            b"GET /switch HTTP/1.1\r\nhost: restaurant\r\nconnection: close\r\n\r\n",
        );
        if !answer.starts_with("HTTP/1.1 503") || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(switched.starts_with("HTTP/1.1 502"), "{switched}");

    let mut stalled = TcpStream::connect(scenario.gateway).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stalled
        .write_all(b"GET /stall HTTP/1.1\r\nhost: restaurant\r\n\r\n")
        .unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stalled.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => panic!(
                "still open: {err} after {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert!(
        received.ends_with("xxxxxxxxxx"),
        "cut off after the 10 bytes: {received}"
    );
}
