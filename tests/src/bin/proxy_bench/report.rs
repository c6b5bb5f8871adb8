//! The bench's tables: the details of every case, then a summary of steer against the better of
//! nginx and haproxy with issue 10's goals, and steer applying large configurations with issue
//! 11's.

use std::{io::Write, time::Duration};

use anyhow::{Result, bail};

use crate::{Applies, Case, Plan};

/// A latency or a CPU time per request: µs, or ms from 10 ms on; "-" when there is none.
fn micros(ns: f64) -> String {
    match ns {
        ns if ns.is_nan() => "-".to_string(),
        ns if ns.abs() >= 10e6 => format!("{:.2} ms", ns / 1e6),
        ns => format!("{:.1} µs", ns / 1e3),
    }
}

/// `value` with `decimals` and `unit`, or "-" when there is none.
fn number(value: f64, decimals: usize, unit: &str) -> String {
    if value.is_nan() {
        "-".to_string()
    } else {
        format!("{value:.decimals$}{unit}")
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

pub fn details(
    out: &mut impl Write,
    plan: &Plan,
    cases: &[Case; 4],
    workers: usize,
    reloads: &[Duration],
) -> Result<()> {
    let direct = &cases[0].open;
    writeln!(
        out,
        "\nopen loop at {}/s ({} keep-alive connections, {} round(s) of {} s, latency from the \
         scheduled send time; CPU: the proxy's processes, per answered request)",
        plan.rate, plan.connections, plan.rounds, plan.seconds
    )?;
    writeln!(
        out,
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>12} {:>8}",
        "case", "p50", "p99", "p99.9", "max", "+p50", "+p99", "errors", "CPU/1k req", "vCPU"
    )?;
    for case in cases {
        let runs = &case.open;
        let (p50, p99) = (runs.percentile(0.5), runs.percentile(0.99));
        let cpu = runs.cpu_per_request();
        writeln!(
            out,
            "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>12} {:>8}",
            case.name,
            micros(p50),
            micros(p99),
            micros(runs.percentile(0.999)),
            micros(runs.percentile(1.0)),
            micros(p50 - direct.percentile(0.5)),
            micros(p99 - direct.percentile(0.99)),
            runs.errors,
            number(cpu * 1000.0 / 1e6, 1, " ms"),
            number(cpu * plan.rate as f64 / 1e9, 3, ""),
        )?;
    }
    for (i, connections) in plan.closed_loops.into_iter().enumerate() {
        writeln!(
            out,
            "\nclosed loop, {connections} keep-alive connections (best of {} round(s) of {} s; \
             latency from send to answer)",
            plan.rounds, plan.throughput_seconds
        )?;
        writeln!(
            out,
            "{:<20} {:>10} {:>9} {:>9} {:>9} {:>12} {:>6}",
            "case", "requests/s", "p50", "p99", "p99.9", "CPU/request", "errors"
        )?;
        for case in cases {
            let runs = &case.closed[i];
            writeln!(
                out,
                "{:<20} {:>10.0} {:>9} {:>9} {:>9} {:>12} {:>6}",
                case.name,
                runs.best_rate(),
                micros(runs.percentile(0.5)),
                micros(runs.percentile(0.99)),
                micros(runs.percentile(0.999)),
                micros(runs.cpu_per_request()),
                runs.errors
            )?;
        }
    }
    writeln!(
        out,
        "\nresident memory (VmRSS, MB; nginx: master + {workers} worker(s)), holding {} idle \
         keep-alive connections that made one request each",
        plan.idle_connections
    )?;
    writeln!(
        out,
        "{:<20} {:>8} {:>11} {:>8} {:>10} {:>11} {:>7} {:>7} {:>16}",
        "case",
        "idle",
        "after load",
        "holding",
        "KB/conn",
        "all closed",
        "held",
        "failed",
        "closed by proxy"
    )?;
    for case in cases {
        let Some(m) = &case.memory else { continue };
        let per_connection = (m.holding_kb as f64 - m.before_kb as f64) / m.held.max(1) as f64;
        writeln!(
            out,
            "{:<20} {:>8.1} {:>11.1} {:>8.1} {:>10.1} {:>11.1} {:>7} {:>7} {:>16}",
            case.name,
            mb(m.idle_kb),
            mb(m.before_kb),
            mb(m.holding_kb),
            per_connection,
            mb(m.after_kb),
            m.held,
            m.errors,
            m.closed_by_proxy
        )?;
    }
    for case in cases {
        if let Some(error) = case.memory.as_ref().and_then(|m| m.first_error.as_ref()) {
            writeln!(out, "  {}: first failed connection: {error}", case.name)?;
        }
    }
    writeln!(
        out,
        "\nlive reload of steer's configuration file, write to served ({} edits): median \
         {:.1?}, max {:.1?}",
        reloads.len(),
        reloads[reloads.len() / 2],
        reloads[reloads.len() - 1]
    )?;
    Ok(())
}

enum Unit {
    Micros,
    PerSecond,
    /// CPU ns per request, shown per 1,000 requests.
    CpuPerThousand,
    Megabytes,
}

impl Unit {
    fn show(&self, value: f64) -> String {
        match self {
            Unit::Micros => micros(value),
            Unit::PerSecond => number(value, 0, "/s"),
            Unit::CpuPerThousand => number(value * 1000.0 / 1e6, 1, " ms"),
            Unit::Megabytes => number(value, 1, " MB"),
        }
    }
}

enum Goal {
    /// steer at most this many times the better peer's figure (lower is better).
    AtMostBetter(f64),
    /// steer at least this many times the better peer's figure (higher is better).
    AtLeastBetter(f64),
    AtMostNginx(f64),
    /// An absolute bound, in the row's unit (lower is better).
    AtMost(f64),
    /// For the record only (lower is better).
    None,
}

struct Row {
    figure: String,
    unit: Unit,
    /// steer, nginx, haproxy.
    values: [f64; 3],
    goal: Goal,
    /// Whether this run's sizes are the goal's (never in a smoke run).
    applies: bool,
}

impl Row {
    fn new(figure: String, unit: Unit, values: [f64; 3], goal: Goal, applies: bool) -> Row {
        Row {
            figure,
            unit,
            values,
            goal,
            applies,
        }
    }

    /// steer's figure over the peer the goal compares with (the better one, or nginx).
    fn ratio(&self) -> f64 {
        let [steer, nginx, haproxy] = self.values;
        let peer = match self.goal {
            Goal::AtMostNginx(_) => nginx,
            Goal::AtLeastBetter(_) => nginx.max(haproxy),
            Goal::AtMostBetter(_) | Goal::AtMost(_) | Goal::None => nginx.min(haproxy),
        };
        // An added latency at or below zero is noise: no ratio to it.
        if peer > 0.0 { steer / peer } else { f64::NAN }
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::AtMostBetter(x) => format!("<= {x:.2}x better"),
            Goal::AtLeastBetter(x) => format!(">= {x:.2}x better"),
            Goal::AtMostNginx(x) => format!("<= {x:.2}x nginx"),
            Goal::AtMost(x) => format!("<= {}", self.unit.show(x)),
            Goal::None => "-".to_string(),
        }
    }

    fn verdict(&self) -> &'static str {
        let (ratio, steer) = (self.ratio(), self.values[0]);
        let met = match self.goal {
            Goal::None => return "",
            _ if !self.applies => return "n/a (sizes)",
            Goal::AtMostBetter(x) | Goal::AtMostNginx(x) => (!ratio.is_nan()).then_some(ratio <= x),
            Goal::AtLeastBetter(x) => (!ratio.is_nan()).then_some(ratio >= x),
            Goal::AtMost(x) => (!steer.is_nan()).then_some(steer <= x),
        };
        match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        }
    }
}

pub fn summary(
    out: &mut impl Write,
    plan: &Plan,
    cases: &[Case; 4],
    proxy_cpus: &str,
    load_cpus: &str,
) -> Result<()> {
    let [direct, steer, nginx, haproxy] = cases;
    let proxies = [steer, nginx, haproxy];
    let each = |figure: &dyn Fn(&Case) -> f64| proxies.map(figure);
    let added = |q: f64| each(&|c| c.open.percentile(q) - direct.open.percentile(q));
    let memory = |kb: &dyn Fn(&crate::Memory) -> u64| {
        each(&|c| c.memory.as_ref().map_or(f64::NAN, |m| mb(kb(m))))
    };
    let sized = !plan.smoke;
    let at_rate = sized && plan.rate == 1000;
    let [few, many] = plan.closed_loops;
    let mut rows = vec![
        Row::new(
            format!("added p50, open loop {}/s", plan.rate),
            Unit::Micros,
            added(0.5),
            Goal::AtMostBetter(0.8),
            at_rate,
        ),
        Row::new(
            format!("added p99, open loop {}/s", plan.rate),
            Unit::Micros,
            added(0.99),
            Goal::AtMostBetter(0.8),
            at_rate,
        ),
        Row::new(
            format!("CPU per 1k requests at {}/s", plan.rate),
            Unit::CpuPerThousand,
            each(&|c| c.open.cpu_per_request()),
            Goal::AtMostNginx(0.7),
            at_rate,
        ),
        Row::new(
            format!("throughput, {few} connections"),
            Unit::PerSecond,
            each(&|c| c.closed[0].best_rate()),
            Goal::AtLeastBetter(1.1),
            sized && few == 64,
        ),
        Row::new(
            format!("throughput, {many} connections"),
            Unit::PerSecond,
            each(&|c| c.closed[1].best_rate()),
            Goal::AtLeastBetter(1.1),
            sized && many == 1000,
        ),
        Row::new(
            format!("p99, {many} connections"),
            Unit::Micros,
            each(&|c| c.closed[1].percentile(0.99)),
            Goal::AtMostBetter(0.8),
            sized && many == 1000,
        ),
        Row::new(
            format!("CPU per 1k requests, {many} conns"),
            Unit::CpuPerThousand,
            each(&|c| c.closed[1].cpu_per_request()),
            Goal::None,
            true,
        ),
        Row::new(
            "idle RSS".to_string(),
            Unit::Megabytes,
            memory(&|m| m.idle_kb),
            Goal::AtMost(12.0),
            sized,
        ),
        Row::new(
            format!("RSS, {} idle connections", plan.idle_connections),
            Unit::Megabytes,
            memory(&|m| m.holding_kb),
            Goal::AtMost(60.0),
            sized && plan.idle_connections == 10_000,
        ),
        Row::new(
            "RSS after they closed".to_string(),
            Unit::Megabytes,
            memory(&|m| m.after_kb),
            Goal::None,
            true,
        ),
    ];
    if proxy_cpus == load_cpus && !proxy_cpus.contains(',') {
        rows.push(Row::new(
            format!("added p50 on one CPU, {}/s", plan.rate),
            Unit::Micros,
            added(0.5),
            Goal::AtMostNginx(1.0),
            at_rate,
        ));
    }

    writeln!(
        out,
        "\nsummary: steer next to nginx and haproxy, proxies on CPU {proxy_cpus}, load on CPU \
         {load_cpus} (goals: issue 10; ratio: steer over the peer its goal names, or over the \
         better peer)"
    )?;
    writeln!(
        out,
        "{:<36} {:>11} {:>11} {:>11} {:>7}  goal",
        "figure", "steer", "nginx", "haproxy", "ratio"
    )?;
    for row in &rows {
        let [s, n, h] = row.values.map(|v| row.unit.show(v));
        let ratio = row.ratio();
        let ratio = if ratio.is_nan() {
            "-".to_string()
        } else {
            format!("{ratio:.2}x")
        };
        writeln!(
            out,
            "{:<36} {s:>11} {n:>11} {h:>11} {ratio:>7}  {:<18} {}",
            row.figure,
            row.goal_text(),
            row.verdict()
        )?;
    }
    Ok(())
}

/// The smoke run's only check: every case ran every part and produced figures.
pub fn ensure_figures(cases: &[Case; 4]) -> Result<()> {
    let mut missing = Vec::new();
    for case in cases {
        let proxy = case.memory.is_some();
        let runs = std::iter::once(("open loop", &case.open))
            .chain(case.closed.iter().map(|runs| ("closed loop", runs)));
        for (what, runs) in runs {
            if runs.latencies.is_empty() {
                missing.push(format!("{}: {what}: no answered request", case.name));
            }
            if proxy && runs.cpu_per_request().is_nan() {
                missing.push(format!("{}: {what}: no CPU time", case.name));
            }
        }
        if let Some(memory) = &case.memory
            && (memory.held == 0 || memory.holding_kb == 0 || memory.after_kb == 0)
        {
            missing.push(format!("{}: no memory figures", case.name));
        }
    }
    if !missing.is_empty() {
        bail!("the smoke run lacks figures: {}", missing.join("; "));
    }
    Ok(())
}

fn median_max(took: Option<&Vec<Duration>>) -> (String, String, usize) {
    match took {
        Some(took) if !took.is_empty() => {
            let mut sorted = took.clone();
            sorted.sort_unstable();
            (
                format!("{:.1?}", sorted[sorted.len() / 2]),
                format!("{:.1?}", sorted[sorted.len() - 1]),
                sorted.len(),
            )
        }
        _ => ("-".to_string(), "-".to_string(), 0),
    }
}

/// The slowest apply of a configuration with `releases` sample releases, alone or loaded.
fn slowest(applies: &Applies, releases: usize) -> f64 {
    [&applies.alone, &applies.loaded]
        .into_iter()
        .filter_map(|took| took.get(&releases))
        .flatten()
        .max()
        .map_or(f64::NAN, |d| d.as_secs_f64())
}

/// The apply case's details.
pub fn applies(out: &mut impl Write, plan: &Plan, a: &Applies) -> Result<()> {
    writeln!(
        out,
        "\napplying large configurations: steer's file replaced by the example + the bench's \
         service + N mixed sample releases; write to served (a release of it decides a request, \
         admin explain); 0: back to the example"
    )?;
    writeln!(
        out,
        "{:>9} {:>9} {:>10} {:>10} {:>12} {:>10} {:>10} {:>8}",
        "releases", "file", "alone", "RSS after", "", "loaded: p50", "max", "applies"
    )?;
    for (&releases, &bytes) in &a.bytes {
        let (alone, _, _) = median_max(a.alone.get(&releases));
        let (median, max, n) = median_max(a.loaded.get(&releases));
        writeln!(
            out,
            "{:>9} {:>9} {:>10} {:>10} {:>12} {:>10} {:>10} {:>8}",
            releases,
            format!("{:.2} MB", bytes as f64 / 1e6),
            alone,
            a.rss_kb
                .get(&releases)
                .map_or("-".to_string(), |&kb| format!("{:.1} MB", mb(kb))),
            "",
            median,
            max,
            n
        )?;
    }
    writeln!(
        out,
        "open loop through steer at {}/s ({} round(s) of {} s each, alternating; {} \
         configurations applied during the runs)",
        plan.rate, plan.rounds, plan.seconds, a.applied_during
    )?;
    writeln!(
        out,
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>6} {:>12}",
        "case", "p50", "p99", "p99.9", "max", "errors", "CPU/1k req"
    )?;
    for (name, runs) in [("no applies", &a.quiet), ("applying", &a.busy)] {
        writeln!(
            out,
            "{:<22} {:>9} {:>9} {:>9} {:>9} {:>6} {:>12}",
            name,
            micros(runs.percentile(0.5)),
            micros(runs.percentile(0.99)),
            micros(runs.percentile(0.999)),
            micros(runs.percentile(1.0)),
            runs.errors,
            number(runs.cpu_per_request() * 1000.0 / 1e6, 1, " ms"),
        )?;
    }
    writeln!(
        out,
        "steer's RSS: {:.1} MB before the case, peak {:.1} MB (VmHWM over the case), {:.1} MB \
         after (back to the example, {:?} later)",
        mb(a.before_kb),
        mb(a.peak_kb),
        mb(a.after_kb),
        plan.settle
    )?;
    Ok(())
}

/// Issue 11's goals for the agent applying a configuration.
pub fn applies_summary(out: &mut impl Write, plan: &Plan, a: &Applies) -> Result<()> {
    let largest = plan.apply_sizes.last().copied().unwrap_or(0);
    let sized = !plan.smoke && largest == 10_000 && plan.rate == 1000;
    let ratio = |q: f64| a.busy.percentile(q) / a.quiet.percentile(q);
    let verdict = |met: bool, applies: bool| match (applies, met) {
        (false, _) => "n/a (sizes)",
        (true, true) => "met",
        (true, false) => "MISSED",
    };
    writeln!(
        out,
        "\nsummary: steer applying large configurations (goals: issue 11)"
    )?;
    writeln!(
        out,
        "{:<44} {:>11} {:>11} {:>7}  goal",
        "figure", "steer", "before", "ratio"
    )?;
    for &releases in &plan.apply_sizes {
        let slowest = slowest(a, releases);
        writeln!(
            out,
            "{:<44} {:>11} {:>11} {:>7}  {:<18} {}",
            format!("{releases} releases, write to served (slowest)"),
            number(slowest, 3, " s"),
            "",
            "",
            if releases == largest { "<= 1 s" } else { "-" },
            if releases == largest {
                verdict(slowest <= 1.0, sized)
            } else {
                ""
            }
        )?;
    }
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        writeln!(
            out,
            "{:<44} {:>11} {:>11} {:>7}  {:<18} {}",
            format!("{name} at {}/s while applying", plan.rate),
            micros(a.busy.percentile(q)),
            micros(a.quiet.percentile(q)),
            number(ratio(q), 2, "x"),
            "<= 1.10x before",
            verdict(ratio(q) <= 1.10, sized)
        )?;
    }
    writeln!(
        out,
        "{:<44} {:>11} {:>11} {:>7}  bounded",
        format!("peak RSS, applying {largest} releases"),
        Unit::Megabytes.show(mb(a.peak_kb)),
        Unit::Megabytes.show(mb(a.before_kb)),
        number(a.peak_kb as f64 / a.before_kb as f64, 2, "x"),
    )?;
    Ok(())
}

/// The smoke run's check of the apply case: every configuration was served, alone and under
/// load, and both open loops answered.
pub fn ensure_apply_figures(plan: &Plan, a: &Applies) -> Result<()> {
    let mut missing = Vec::new();
    for releases in plan.apply_sizes.iter().copied().chain([0]) {
        if !a.alone.contains_key(&releases) {
            missing.push(format!("{releases} releases: not applied alone"));
        }
    }
    if a.applied_during == 0 {
        missing.push("no configuration applied during the open loop".to_string());
    }
    for (name, runs) in [("no applies", &a.quiet), ("applying", &a.busy)] {
        if runs.latencies.is_empty() {
            missing.push(format!("open loop, {name}: no answered request"));
        }
    }
    if a.peak_kb == 0 {
        missing.push("no peak RSS".to_string());
    }
    if !missing.is_empty() {
        bail!("the smoke run lacks apply figures: {}", missing.join("; "));
    }
    Ok(())
}
