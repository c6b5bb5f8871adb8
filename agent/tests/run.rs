//! The `steer run` contract: it refuses to start with a one-line reason and a non-zero exit.

use std::process::Command;

fn steer_run(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_steer"))
        .arg("run")
        .args(args)
        .output()
        .expect("run steer");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("steer-run-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("steer.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_configuration_is_refused_with_file_line_and_reason() {
    let path = temp_file("bad", "services:\n  - name: s\n    versoins: []\n");
    let (ok, stderr) = steer_run(&[
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--no-ebpf",
    ]);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("steer.yaml:3:"), "{stderr}");
}

#[test]
fn a_configuration_with_errors_is_refused_with_the_checker_finding() {
    let path = temp_file(
        "invalid",
        "services:\n  - name: s\n    versions: [{name: v1}]\n",
    );
    let (ok, stderr) = steer_run(&[
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--no-ebpf",
    ]);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    assert!(!ok);
    assert!(stderr.contains("no-primary"), "{stderr}");
}

#[test]
fn an_address_in_use_is_refused_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let path = temp_file("in-use", "services: []\n");
    let (ok, stderr) = steer_run(&[
        "--config",
        path.to_str().unwrap(),
        "--listen",
        &address,
        "--admin",
        "127.0.0.1:0",
        "--no-ebpf",
    ]);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    assert!(!ok);
    assert!(
        stderr.contains(&format!("cannot listen on {address} (--listen)")),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
}
