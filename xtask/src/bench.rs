//! `cargo xtask bench`: runs the benchmarks, then prints every figure of this run side by side,
//! each as a ratio to the first member of its group (so "flat in the number of releases" or
//! "cost added by the programs" reads off one table), and `steer check`'s time and peak memory
//! on mixed configurations of growing size.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One criterion result: `target/criterion/<group>/<id>/new/`.
struct Figure {
    id: String,
    median_ns: f64,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

/// Collects the figures criterion wrote after `since`, grouped, in the order criterion ran them.
fn figures(
    criterion_dir: &Path,
    since: SystemTime,
) -> Result<BTreeMap<String, Vec<(SystemTime, Figure)>>> {
    let mut groups: BTreeMap<String, Vec<(SystemTime, Figure)>> = BTreeMap::new();
    let mut stack: Vec<PathBuf> = vec![criterion_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.file_name().is_none_or(|n| n != "estimates.json")
                || path
                    .parent()
                    .and_then(|p| p.file_name())
                    .is_none_or(|n| n != "new")
            {
                continue;
            }
            let written = entry.metadata()?.modified()?;
            if written < since {
                continue;
            }
            let benchmark = read_json(&path.with_file_name("benchmark.json"))?;
            let estimates = read_json(&path)?;
            let group = benchmark["group_id"].as_str().unwrap_or("?").to_string();
            let id = benchmark["value_str"]
                .as_str()
                .or(benchmark["function_id"].as_str())
                .unwrap_or("?")
                .to_string();
            let median_ns = estimates["median"]["point_estimate"]
                .as_f64()
                .unwrap_or(f64::NAN);
            groups
                .entry(group)
                .or_default()
                .push((written, Figure { id, median_ns }));
        }
    }
    for figures in groups.values_mut() {
        figures.sort_by_key(|(written, _)| *written);
    }
    Ok(groups)
}

fn human(ns: f64) -> String {
    match ns {
        ns if ns >= 1e9 => format!("{:.2} s", ns / 1e9),
        ns if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.2} µs", ns / 1e3),
        ns => format!("{ns:.0} ns"),
    }
}

/// Prints the table of everything measured since `since`.
pub fn summarize(target_dir: &Path, since: SystemTime) -> Result<()> {
    let groups = figures(&target_dir.join("criterion"), since)?;
    println!(
        "\n{:<28} {:<14} {:>12} {:>10}",
        "benchmark", "case", "median", "ratio"
    );
    for (group, figures) in &groups {
        let base = figures
            .first()
            .map(|(_, f)| f.median_ns)
            .unwrap_or(f64::NAN);
        for (_, figure) in figures {
            println!(
                "{group:<28} {:<14} {:>12} {:>9.2}x",
                figure.id,
                human(figure.median_ns),
                figure.median_ns / base
            );
        }
    }
    Ok(())
}

/// Release counts of the checker's scaling table.
const CHECK_SIZES: [usize; 3] = [1_000, 3_000, 10_000];

/// `steer check` of generated mixed configurations (`steer sample-config`), each in its own
/// process: wall time and peak resident memory, and the growth from the first size (goal at
/// 10,000: under 1 s and 200 MB, growing close to linearly).
pub fn check_scaling(steer: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    println!(
        "\n{:<28} {:>10} {:>12} {:>12} {:>16}",
        "steer check (mixed)", "releases", "time", "peak RSS", "time/release"
    );
    let mut first: Option<f64> = None;
    for releases in CHECK_SIZES {
        let file = dir.join(format!("mixed-{releases}.yaml"));
        let output = Command::new(steer)
            .args(["sample-config", "--releases", &releases.to_string()])
            .output()
            .context("run steer sample-config")?;
        if !output.status.success() {
            bail!(
                "steer sample-config failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::fs::write(&file, &output.stdout)
            .with_context(|| format!("write {}", file.display()))?;
        let started = Instant::now();
        let child = Command::new(steer)
            .args(["check", "--format", "json", "--config"])
            .arg(&file)
            .stdout(Stdio::null())
            .spawn()
            .context("run steer check")?;
        let (status, peak_kib) = wait_with_peak_rss(child)?;
        let seconds = started.elapsed().as_secs_f64();
        // 0: valid, 1: findings; anything else is the checker failing.
        if !matches!(status, 0 | 1) {
            bail!("steer check of {} exited with {status}", file.display());
        }
        let per_release = seconds / releases as f64;
        let growth = per_release / *first.get_or_insert(per_release);
        println!(
            "{:<28} {releases:>10} {:>12} {:>9} MB {:>9} ({growth:.2}x)",
            "",
            human(seconds * 1e9),
            peak_kib / 1024,
            human(per_release * 1e9),
        );
    }
    Ok(())
}

/// Waits for `child`; its exit code and its peak resident set in KiB (from wait4, so only this
/// child counts).
fn wait_with_peak_rss(child: std::process::Child) -> Result<(i32, i64)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok((code, usage.ru_maxrss))
}
