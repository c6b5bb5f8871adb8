//! Every manifest in deploy/ validates offline against the official Kubernetes schemas, with
//! PyPI's kubernetes-validate (installed by `cargo xtask setup`), in strict mode: unknown fields
//! are errors. CanaryRelease objects are checked against the CRD's own schema in the agent's
//! tests (`kubernetes::crd`), which this validator does not know.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The Kubernetes release the manifests are validated against (k8s-openapi's `v1_33`).
const KUBERNETES_VERSION: &str = "1.33.0";

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn validate(files: &[PathBuf]) -> Output {
    Command::new("kubernetes-validate")
        .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
        .args(files)
        .output()
        .expect("kubernetes-validate is installed by `cargo xtask setup`")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_manifest_in_deploy_validates() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    // The file-format examples are steer's own configuration, not Kubernetes objects.
    files.retain(|f| f.parent() != Some(&deploy().join("examples")));
    for expected in [
        "crd.yaml",
        "rbac.yaml",
        "daemonset.yaml",
        "examples/k8s/food-delivery.yaml",
    ] {
        assert!(
            files.contains(&deploy().join(expected)),
            "{expected} missing"
        );
    }
    let output = validate(&files);
    let report = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    for kind in [
        "customresourcedefinition/canaryreleases.steer.dev",
        "daemonset/steer",
        "clusterrole/steer",
        "deployment/restaurant-v2-red",
    ] {
        assert!(
            report.contains(&format!("passed for resource {kind}")),
            "{kind} not validated:\n{report}"
        );
    }
}

#[test]
fn the_validator_rejects_what_the_api_server_would() {
    let dir = std::env::temp_dir().join(format!("steer-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    let daemonset = std::fs::read_to_string(deploy().join("daemonset.yaml")).unwrap();
    // A typo an editor would not catch: `hostNetwrok`.
    std::fs::write(
        &bad,
        daemonset.replace("hostNetwork: true", "hostNetwrok: true"),
    )
    .unwrap();
    let output = validate(std::slice::from_ref(&bad));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        !output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}
