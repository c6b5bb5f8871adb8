//! `cargo xtask bench`: runs the benchmarks, then prints every figure of this run side by side,
//! each as a ratio to the first member of its group (so "flat in the number of releases" or
//! "cost added by the programs" reads off one table).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result};
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
