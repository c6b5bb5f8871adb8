//! The apply case (issue 11): steer's configuration file replaced by large mixed configurations
//! (`steer sample-config`'s releases and services, merged with the running example and the
//! bench's service), timed from the write to the moment a release of the new configuration
//! decides a request (the admin `explain`), at several sizes; the open-loop latency while
//! those applies happen next to the same run without them; steer's memory before, at peak
//! (VmHWM, reset first) and after.
//!
//! Every written configuration carries a release of its own, `bench-apply-<n>`, matching the
//! header `x-bench-apply: bench-apply-<n>` and nothing else: it is served when `explain` with
//! that header names it. The texts are made before anything is timed; a write only puts the
//! release's number in.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use steer::config::{Config, Matcher, Release, Version};
use steer_tests::http;

/// The placeholder of the marker release's number in a prepared text.
const MARKER: &str = "bench-apply-marker";
/// The header of the marker release.
const HEADER: &str = "x-bench-apply";
/// Longer than this from write to served is a failure, not a figure.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// One configuration to write: the running one plus `releases` sample releases and a marker.
pub struct Prepared {
    pub releases: usize,
    text: String,
}

impl Prepared {
    pub fn bytes(&self) -> usize {
        self.text.len()
    }
}

/// The configurations of the case: the running configuration with `releases` sample releases
/// each (sizes in that order), then the running one alone (back to the start).
pub fn prepare(config: &Path, sizes: &[usize]) -> Result<Vec<Prepared>> {
    let resting = Config::from_yaml(&std::fs::read_to_string(config)?, "the bench's config")?;
    sizes
        .iter()
        .copied()
        .chain([0])
        .map(|releases| {
            let merged = merged(&resting, releases)?;
            let report = steer::check::check(&merged);
            ensure!(
                report.valid,
                "the configuration of {releases} sample releases is refused: {}",
                report
                    .errors
                    .iter()
                    .map(|e| e.message.as_str())
                    .chain(report.shadowed.iter().map(|s| s.release.as_str()))
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            Ok(Prepared {
                releases,
                text: serde_yaml_ng::to_string(&merged)?,
            })
        })
        .collect()
}

/// `resting` with a mixed sample of `releases` releases (after its own in priority) and the
/// marker release (last).
fn merged(resting: &Config, releases: usize) -> Result<Config> {
    let mut config = resting.clone();
    let lowest = config
        .releases
        .iter()
        .map(|r| r.priority)
        .max()
        .unwrap_or(0);
    if releases > 0 {
        let sample = in_force_sample(&config, releases)?;
        for service in &sample.services {
            ensure!(
                !config.services.iter().any(|s| s.name == service.name),
                "the sample's service {} is already in the bench's configuration",
                service.name
            );
        }
        config.services.extend(sample.services);
        config
            .releases
            .extend(sample.releases.into_iter().map(|release| Release {
                priority: release.priority + lowest,
                ..release
            }));
    }
    let last = config
        .releases
        .iter()
        .map(|r| r.priority)
        .max()
        .unwrap_or(0);
    let bench = config
        .services
        .iter_mut()
        .find(|s| s.name == "bench")
        .context("the bench's service is in the configuration")?;
    let endpoints = bench.versions[0].endpoints.clone();
    bench.versions.push(Version {
        name: MARKER.to_string(),
        primary: false,
        endpoints,
    });
    config.releases.push(Release {
        name: MARKER.to_string(),
        priority: last + 1,
        matchers: vec![Matcher {
            header: HEADER.to_string(),
            exact: Some(MARKER.to_string()),
            prefix: None,
            regex: None,
        }],
        percent: None,
        hash_by: None,
        targets: BTreeMap::from([("bench".to_string(), MARKER.to_string())]),
        rollout: None,
    });
    Ok(config)
}

/// A mixed sample of exactly `releases` releases that the agent puts in force next to
/// `resting`: the checker refuses shadowed releases, and the sample has some (its values repeat,
/// and the example's releases take some of its requests). A release that never receives traffic
/// decides nothing, so dropping it (and its versions) leaves every other verdict as it was;
/// the sample is made larger by half, rid of them, and cut to size from the lowest priority
/// (which cannot shadow anything either).
fn in_force_sample(resting: &Config, releases: usize) -> Result<Config> {
    let mut extra = releases / 2 + 20;
    loop {
        match in_force_sample_of(resting, releases, releases + extra)? {
            Some(sample) => return Ok(sample),
            None if extra < 4 * releases => extra *= 2,
            None => anyhow::bail!("no sample of {releases} releases that are not shadowed"),
        }
    }
}

/// The first `releases` releases of a sample of `generated` that are not shadowed, if so many.
fn in_force_sample_of(
    resting: &Config,
    releases: usize,
    generated: usize,
) -> Result<Option<Config>> {
    let lowest = resting
        .releases
        .iter()
        .map(|r| r.priority)
        .max()
        .unwrap_or(0);
    let mut sample = steer::check::sample::mixed(generated, 1);
    let mut together = resting.clone();
    together.services.extend(sample.services.iter().cloned());
    together
        .releases
        .extend(sample.releases.iter().cloned().map(|release| Release {
            priority: release.priority + lowest,
            ..release
        }));
    let report = steer::check::check(&together);
    let shadowed: std::collections::HashSet<&str> =
        report.shadowed.iter().map(|s| s.release.as_str()).collect();
    sample.releases.sort_by_key(|r| r.priority);
    sample
        .releases
        .retain(|r| !shadowed.contains(r.name.as_str()));
    if sample.releases.len() < releases {
        return Ok(None);
    }
    sample.releases.truncate(releases);
    let kept: std::collections::HashSet<&str> =
        sample.releases.iter().map(|r| r.name.as_str()).collect();
    for service in &mut sample.services {
        service
            .versions
            .retain(|v| v.primary || kept.contains(v.name.as_str()));
    }
    Ok(Some(sample))
}

/// Writes configurations and times them until served; numbers each write.
pub struct Applier<'a> {
    pub config: &'a Path,
    pub admin: SocketAddr,
    written: u64,
    /// Write to served, per number of sample releases.
    pub took: BTreeMap<usize, Vec<Duration>>,
}

impl<'a> Applier<'a> {
    pub fn new(config: &'a Path, admin: SocketAddr) -> Applier<'a> {
        Applier {
            config,
            admin,
            written: 0,
            took: BTreeMap::new(),
        }
    }

    /// Writes `prepared` and waits until its marker release decides a request.
    pub fn apply(&mut self, prepared: &Prepared) -> Result<Duration> {
        self.written += 1;
        let marker = format!("bench-apply-{}", self.written);
        let text = prepared.text.replace(MARKER, &marker);
        // Files are compared by modification time and length: let the clock move on.
        std::thread::sleep(Duration::from_millis(30));
        let query = format!("/explain?service=bench&header={HEADER}%3A{marker}");
        let served = format!("\"release\":\"{marker}\"");
        std::fs::write(self.config, text)?;
        let started = Instant::now();
        loop {
            let reply = http::get(self.admin, &query, &[])?;
            if reply.body.contains(&served) {
                break;
            }
            ensure!(
                started.elapsed() < APPLY_TIMEOUT,
                "steer run did not apply the configuration of {} sample releases within {:?}",
                prepared.releases,
                APPLY_TIMEOUT
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let took = started.elapsed();
        self.took.entry(prepared.releases).or_default().push(took);
        Ok(took)
    }

    /// Applies `configurations` in turn, over and over, until `stop` is set (after the apply
    /// in progress); how many were applied.
    pub fn cycle(&mut self, configurations: &[Prepared], stop: &AtomicBool) -> Result<usize> {
        let mut applied = 0;
        for prepared in configurations.iter().cycle() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.apply(prepared)?;
            applied += 1;
        }
        Ok(applied)
    }
}

/// Peak resident memory (VmHWM, kB) of a process since it started or since
/// [`reset_peak`].
pub fn peak_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmHWM for pid {pid}"))
}

/// Resets a process's VmHWM to its current resident memory (proc(5), clear_refs 5).
pub fn reset_peak(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("reset the peak RSS of pid {pid}"))
}
