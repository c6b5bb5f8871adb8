//! The admin server, the metrics listener, stamp keys and names under hostile input, on a
//! loopback agent (`--no-ebpf`): each test is a probe of issue 26 that succeeded before.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use steer_tests::{Process, http, scenario::binary};

/// A directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("steer-hardening-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An upstream answering every request with `status`, one request per connection.
fn backend(status: u16) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n")
                    && http::read_some(&mut stream, &mut byte).unwrap_or(0) == 1
                {
                    head.push(byte[0]);
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    address
}

/// `web`: v1 (primary) answers 200, v2 answers `canary_status`.
fn config(canary_status: u16, releases: &str) -> String {
    format!(
        "services:\n  - name: web\n    addresses: [\"10.96.7.1:80\"]\n    versions:\n      \
         - {{ name: v1, primary: true, endpoints: [\"{}\"] }}\n      \
         - {{ name: v2, endpoints: [\"{}\"] }}\n{releases}",
        backend(200),
        backend(canary_status)
    )
}

struct Agent {
    _process: Process,
    admin: SocketAddr,
    metrics: SocketAddr,
    gateway: SocketAddr,
    _dir: Dir,
}

impl Agent {
    /// `steer run --no-ebpf` on loopback with `config`, ready.
    fn start(name: &str, config: &str, args: &[&str]) -> Agent {
        let dir = Dir::new(name);
        let path = dir.0.join("steer.yaml");
        std::fs::write(&path, config).unwrap();
        let (admin, metrics, gateway) = (free_address(), free_address(), free_address());
        let mut command = Command::new(binary("steer").unwrap());
        command
            .args(["run", "--no-ebpf", "--workers", "1", "--config"])
            .arg(&path)
            .args(["--listen", &free_address().to_string()])
            .args(["--admin", &admin.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(["--gateway", &gateway.to_string()])
            .args(args)
            .env("RUST_LOG", "warn");
        let mut process = Process::start_on_host(&mut command, None).unwrap();
        let started = Instant::now();
        while !http::get(admin, "/readyz", &[]).is_ok_and(|r| r.status == 200) {
            assert!(process.try_wait().unwrap().is_none(), "steer run exited");
            assert!(started.elapsed() < Duration::from_secs(20), "not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent {
            _process: process,
            admin,
            metrics,
            gateway,
            _dir: dir,
        }
    }
}

/// Sends `request` as it is and reads until the server closes (at most 30 s): what came back.
fn raw(address: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(err) if err.kind() == ErrorKind::ConnectionReset => {}
        Err(err) => panic!("no close within 30 s ({err}); read {answer:?}"),
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether the server closes `stream` (within 30 s) without answering.
fn closed_unanswered(mut stream: TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    match http::read_some(&mut stream, &mut buf) {
        Ok(0) => true,
        Err(err) if err.kind() == ErrorKind::ConnectionReset => true,
        _ => false,
    }
}

#[test]
fn admin_and_metrics_connections_are_capped_and_timed_while_the_gateway_keeps_answering() {
    let agent = Agent::start(
        "limits",
        &config(200, ""),
        &[
            "--admin-max-connections",
            "4",
            "--admin-header-timeout",
            "2",
        ],
    );
    // Silent connections take every slot of the metrics listener...
    let silent: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(agent.metrics).unwrap())
        .collect();
    // ...once it has accepted them all, in order: then the next is closed at accept.
    let mut over = TcpStream::connect(agent.metrics).unwrap();
    let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n");
    assert!(
        closed_unanswered(over),
        "a connection over the cap was served"
    );
    // The data plane and the admin server are untouched.
    let reply = http::get(agent.gateway, "/", &[("host", "web")]).unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    assert_eq!(http::get(agent.admin, "/healthz", &[]).unwrap().status, 200);
    // A slot comes free when a connection goes.
    drop(silent);
    let started = Instant::now();
    while !http::get(agent.metrics, "/healthz", &[]).is_ok_and(|r| r.status == 200) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no slot came free"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A head sent by halves is closed at the header timeout, unanswered.
    for listener in [agent.admin, agent.metrics] {
        let mut slow = TcpStream::connect(listener).unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: loc")
            .unwrap();
        assert!(closed_unanswered(slow), "a half-sent head stayed open");
    }
}

#[test]
fn the_admin_serves_only_its_own_host_and_takes_no_state_change_from_a_web_page() {
    let releases = "releases:\n  - name: canary\n    priority: 1\n    \
                    match: [{ header: x-device, exact: android }]\n    hashBy: x-user-id\n    \
                    targets: { web: v2 }\n    rollout:\n      steps: [50, 100]\n      \
                    interval: 1s\n      analysis: { minRequests: 5, maxErrorRate: 1% }\n";
    let agent = Agent::start("csrf", &config(500, releases), &[]);
    // DNS rebinding: a page of attacker.example whose name now resolves to 127.0.0.1.
    let rebound = http::get(agent.admin, "/config", &[("host", "attacker.example")]).unwrap();
    assert_eq!(rebound.status, 421, "{}", rebound.body);
    assert!(!rebound.body.contains("canary"), "the rules leaked");
    let absolute = raw(
        agent.admin,
        b"GET http://attacker.example/config HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    );
    assert!(absolute.starts_with("HTTP/1.1 421"), "{absolute}");
    // A port-forward's own name and port, and the listener's own address, are served.
    let forwarded = http::get(agent.admin, "/config", &[("host", "localhost:8080")]).unwrap();
    assert_eq!(forwarded.status, 200);
    assert_eq!(http::get(agent.admin, "/config", &[]).unwrap().status, 200);

    // The canary fails every request: its rollout is rolled back.
    let phase = || -> String {
        let rollouts: Value =
            serde_json::from_str(&http::get(agent.admin, "/rollouts", &[]).unwrap().body).unwrap();
        rollouts[0]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let started = Instant::now();
    let mut user = 0;
    while phase() != "RolledBack" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never rolled back"
        );
        for _ in 0..20 {
            user += 1;
            let id = format!("user-{user}");
            let headers = [("host", "web"), ("x-device", "android"), ("x-user-id", &id)];
            http::get(agent.gateway, "/", &headers).unwrap();
        }
    }
    // A page the operator visits posts a form to the port-forwarded admin: refused.
    let form = raw(
        agent.admin,
        b"POST /rollouts/canary/resume HTTP/1.1\r\nhost: localhost:15000\r\n\
          origin: http://attacker.example\r\ncontent-type: application/x-www-form-urlencoded\r\n\
          content-length: 3\r\nconnection: close\r\n\r\na=b",
    );
    assert!(form.starts_with("HTTP/1.1 403"), "{form}");
    // Even from a loopback origin, without the marker a form cannot send.
    let unmarked = raw(
        agent.admin,
        b"POST /rollouts/canary/resume HTTP/1.1\r\nhost: localhost\r\n\
          origin: http://localhost:15000\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    assert!(unmarked.starts_with("HTTP/1.1 403"), "{unmarked}");
    assert!(unmarked.contains("x-steer-admin"), "{unmarked}");
    assert_eq!(phase(), "RolledBack", "a web page put the canary back");
    // The operator's CLI still resumes it.
    let output = Command::new(binary("steer").unwrap())
        .args([
            "rollout",
            "resume",
            "canary",
            "--admin",
            &agent.admin.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(phase(), "Progressing");
}

#[test]
fn the_admin_refuses_ambiguous_framing_and_wrong_methods() {
    let agent = Agent::start("framing", &config(200, ""), &[]);
    let bare_lf = raw(agent.admin, b"GET /config HTTP/1.1\nhost: localhost\n\n");
    assert!(bare_lf.starts_with("HTTP/1.1 400"), "{bare_lf}");
    assert!(bare_lf.contains("bare LF"), "{bare_lf}");
    let both = raw(
        agent.admin,
        b"POST /rollouts/x/resume HTTP/1.1\r\nhost: localhost\r\nx-steer-admin: 1\r\n\
          content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    assert!(both.starts_with("HTTP/1.1 400"), "{both}");
    assert!(
        both.contains("both Content-Length and Transfer-Encoding"),
        "{both}"
    );
    // A refused head ends the connection: what follows it is never read as a request.
    let smuggled = raw(
        agent.admin,
        b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n\
          GET /healthz HTTP/1.1\nhost: localhost\n\nGET /config HTTP/1.1\r\nhost: localhost\r\n\r\n",
    );
    assert_eq!(smuggled.matches("\r\ndate: ").count(), 2, "{smuggled}");
    assert!(smuggled.contains("HTTP/1.1 400"), "{smuggled}");
    for (listener, request, allow) in [
        (agent.admin, "DELETE /config", "GET, HEAD"),
        (agent.admin, "PUT /", "GET, HEAD"),
        (agent.admin, "GET /rollouts/x/resume", "POST"),
        (agent.metrics, "POST /metrics", "GET, HEAD"),
    ] {
        let answer = raw(
            listener,
            format!("{request} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 405"), "{request}: {answer}");
        assert!(
            answer.contains(&format!("allow: {allow}\r\n")),
            "{request}: {answer}"
        );
    }
}

/// `steer run` with `--stamp-key key`: whether it refused to start, and what it said.
fn start_with_key(dir: &Path, key: &Path) -> (bool, String) {
    let config = dir.join("steer.yaml");
    std::fs::write(&config, config_text()).unwrap();
    let mut child = Command::new(binary("steer").unwrap())
        .args(["run", "--no-ebpf", "--config"])
        .arg(&config)
        .args(["--listen", &free_address().to_string()])
        .args(["--admin", &free_address().to_string()])
        .arg("--stamp-key")
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            return (false, "it started".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (true, stderr)
}

fn config_text() -> String {
    "services:\n  - name: web\n    versions:\n      - { name: v1, primary: true }\n".into()
}

#[test]
fn a_named_stamp_key_must_exist_and_be_writable_by_its_owner_alone() {
    let dir = Dir::new("stamp-key");
    let missing = dir.0.join("no/such/dir/key");
    let (refused, said) = start_with_key(&dir.0, &missing);
    assert!(refused && said.contains("does not exist"), "{said}");
    assert!(!dir.0.join("no").exists(), "directories were made");

    let dangling = dir.0.join("dangling");
    std::os::unix::fs::symlink(dir.0.join("gone"), &dangling).unwrap();
    let (refused, said) = start_with_key(&dir.0, &dangling);
    assert!(refused && said.contains("symlink"), "{said}");
    assert!(
        !dir.0.join("gone").exists(),
        "a key was written through the symlink"
    );

    let key = dir.0.join("key");
    std::fs::write(&key, "a key of the mesh, long enough\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (refused, said) = start_with_key(&dir.0, &key);
    assert!(
        refused && said.contains("writable by group or others"),
        "{said}"
    );

    let empty = dir.0.join("empty");
    std::fs::write(&empty, "").unwrap();
    let (refused, said) = start_with_key(&dir.0, &empty);
    assert!(refused && said.contains("no key"), "{said}");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (refused, said) = start_with_key(&dir.0, &key);
    assert!(!refused, "a good key was refused: {said}");
}

#[test]
fn steer_check_refuses_names_the_wire_or_kubernetes_would_break() {
    let dir = Dir::new("names");
    let path = dir.0.join("steer.yaml");
    std::fs::write(
        &path,
        "services:\n  - name: \"café\"\n    versions: [{ name: v1, primary: true }]\n  \
         - name: web\n    versions: [{ name: v1, primary: true }, { name: v2 }]\n\
         releases:\n  - { name: \"a;sig=x\", priority: 1, \
         match: [{ header: \"x-dev\\u0007ice\", exact: a }], targets: { web: v2 } }\n  \
         - { name: \"\", priority: 2, match: [{ header: x-region, exact: b }] }\n\
         gateway:\n  routes:\n    - { host: shop.example, service: web }\n    \
         - { host: shop.example, service: web }\n    - { host: \"shop.example:8080\", service: web }\n    \
         - { host: internal, service: nowhere }\n",
    )
    .unwrap();
    let output = Command::new(binary("steer").unwrap())
        .args(["check", "--format", "json", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let errors: Vec<(String, String)> = (report["errors"].as_array().unwrap().iter())
        .map(|e| {
            (
                e["code"].as_str().unwrap().into(),
                e["message"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (code, text) in [
        ("invalid-name", "service name `café`"),
        ("invalid-name", "release name `a;sig=x`"),
        ("invalid-name", "release name ``"),
        ("invalid-header", "match header `x-dev\\u{7}ice`"),
        ("duplicate-route", "gateway route 2"),
        (
            "invalid-route-host",
            "gateway route 3: host `shop.example:8080`: has a port",
        ),
        (
            "unknown-service",
            "gateway route 4 goes to unknown service `nowhere`",
        ),
    ] {
        assert!(
            errors.iter().any(|(c, m)| c == code && m.contains(text)),
            "{code} {text} not in {errors:#?}"
        );
    }
}
