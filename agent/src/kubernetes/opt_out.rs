//! Pods that opt out of redirection with the annotation `steer.dev/redirect: disabled`, found
//! on this node by their cgroup. The kubelet names a pod's cgroup after the pod's UID:
//! `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid, - as _>.slice` (systemd driver).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::{Path, PathBuf},
};

/// The annotation; `disabled` takes the pod's connections out of the mesh.
pub const REDIRECT_ANNOTATION: &str = "steer.dev/redirect";
/// Pod cgroups sit three levels below the root (kubepods, QoS class, pod); a node may nest
/// the kubelet's hierarchy a little deeper.
const MAX_DEPTH: usize = 6;

pub fn opts_out(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(REDIRECT_ANNOTATION)
        .is_some_and(|value| value == "disabled")
}

/// The cgroups below `root` of the pods with these UIDs (the ones running on this node),
/// sorted. Pods of other nodes have none here.
pub fn pod_cgroups(root: &Path, uids: &BTreeSet<String>) -> Vec<PathBuf> {
    if uids.is_empty() {
        return Vec::new();
    }
    let names: HashSet<String> = uids
        .iter()
        .flat_map(|uid| [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))])
        .collect();
    let mut found = Vec::new();
    let mut pending = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stem = name.strip_suffix(".slice").unwrap_or(&name);
            // cgroupfs: the whole name (a UID has dashes); systemd: its last part.
            let pod = names.contains(stem)
                || stem
                    .rsplit_once('-')
                    .is_some_and(|(_, last)| names.contains(last));
            if pod {
                found.push(entry.path());
            } else if depth + 1 < MAX_DEPTH {
                pending.push((entry.path(), depth + 1));
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_pods_by_uid_under_either_cgroup_driver_and_nothing_else() {
        let root = std::env::temp_dir().join(format!("steer-opt-out-{}", std::process::id()));
        let systemd = "kubepods.slice/kubepods-burstable.slice/\
                       kubepods-burstable-pod0a1b_2c3d.slice";
        let cgroupfs = "kubepods/besteffort/pod4e5f-6a7b";
        let other = "kubepods/besteffort/pod9999-0000";
        for dir in [systemd, cgroupfs, other, "system.slice/ssh.service"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        // A container's cgroup below the pod's: the pod's covers it.
        std::fs::create_dir_all(root.join(systemd).join("cri-containerd-abc.scope")).unwrap();
        let uids = ["0a1b-2c3d", "4e5f-6a7b", "not-on-this-node"]
            .map(String::from)
            .into();
        let found = pod_cgroups(&root, &uids);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, [root.join(cgroupfs), root.join(systemd)]);
        assert!(pod_cgroups(&root, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn only_disabled_opts_out() {
        let annotated = |value: &str| BTreeMap::from([(REDIRECT_ANNOTATION.into(), value.into())]);
        assert!(opts_out(&annotated("disabled")));
        assert!(!opts_out(&annotated("enabled")));
        assert!(!opts_out(&BTreeMap::new()));
    }
}
