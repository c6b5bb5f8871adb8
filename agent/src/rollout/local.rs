//! The figures of one node (file mode): the agent's own request counters, read from its
//! metrics exposition — the same series Prometheus scrapes, so an analysis here and one over
//! Prometheus judge the same numbers.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};

use super::{Traffic, Window};
use crate::config::{Config, Release};

/// The versions an analysis of one release compares.
#[derive(Clone, Debug, PartialEq)]
pub struct Subject {
    pub release: String,
    /// (service, version) of the release's own versions.
    pub canary: Vec<(String, String)>,
    /// (service, version) of the primaries of the same services.
    pub primaries: Vec<(String, String)>,
}

impl Subject {
    pub fn of(release: &Release, config: &Config) -> Subject {
        let primaries = release
            .targets
            .keys()
            .filter_map(|service| {
                let primary = config.service(service)?.primary()?;
                Some((service.clone(), primary.name.clone()))
            })
            .collect();
        Subject {
            release: release.name.clone(),
            canary: release
                .targets
                .iter()
                .map(|(s, v)| (s.clone(), v.clone()))
                .collect(),
            primaries,
        }
    }

    /// The figures of this subject in `totals` (cumulative, or one interval's from
    /// Prometheus): exactly its (service, version) pairs.
    pub fn window(&self, totals: &Totals) -> Window {
        let mut window = Window::default();
        for ((service, version, release), traffic) in totals {
            let route = (service.clone(), version.clone());
            if release == &self.release && self.canary.contains(&route) {
                window.canary.add(traffic);
            }
            if self.primaries.contains(&route) {
                window.primary.add(traffic);
            }
        }
        window
    }
}

/// Cumulative figures by route: (service, version, release) -> traffic.
pub type Totals = HashMap<(String, String, String), Traffic>;

/// The request counters and latency buckets of the routes to `versions` ((service, version))
/// in a metrics exposition (`Metrics::encode`).
pub fn parse_totals(text: &str, versions: &HashSet<(String, String)>) -> Totals {
    let mut totals = Totals::new();
    for line in text.lines() {
        let (counter, rest) = if let Some(rest) = line.strip_prefix("steer_requests_total{") {
            (true, rest)
        } else if let Some(rest) = line.strip_prefix("steer_request_duration_seconds_bucket{") {
            (false, rest)
        } else {
            continue;
        };
        let Some((labels, value)) = parse_labels(rest) else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let (service, version) = (label("service"), label("version"));
        if !versions.contains(&(service.clone(), version.clone())) {
            continue;
        }
        let traffic = totals
            .entry((service, version, label("release")))
            .or_default();
        let count = value as u64;
        if counter {
            traffic.requests += count;
            if label("code") == "5xx" {
                traffic.errors += count;
            }
        } else {
            let bound = match label("le").as_str() {
                "+Inf" => f64::INFINITY,
                other => other.parse().unwrap_or(f64::INFINITY),
            };
            traffic.latency.push((bound, count));
        }
    }
    for traffic in totals.values_mut() {
        traffic.latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    totals
}

/// `name="value",...} rest` -> the labels and the rest; values unescaped.
fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (at, c) = chars.next()?;
            match c {
                '"' => break at,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((name.trim_start_matches(',').to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
}

/// Samples of the totals over time, so a window of any interval can be taken. They are
/// stamped with the clock the rollout steps use: the driver samples and then runs the step
/// at the same instant, so a step that begins at a sample has that sample as its baseline
/// exactly (an early analysis then counts nothing of the step before).
pub struct LocalFigures {
    samples: VecDeque<(Timestamp, Totals)>,
}

/// `time - after`, if the clock goes back that far.
fn before(time: Timestamp, after: Duration) -> Option<Timestamp> {
    time.checked_sub(SignedDuration::try_from(after).ok()?).ok()
}

impl LocalFigures {
    /// Counters start at zero with the agent: the first sample is an empty one, now.
    pub fn new(now: Timestamp) -> LocalFigures {
        LocalFigures {
            samples: VecDeque::from([(now, Totals::new())]),
        }
    }

    /// Adds a sample taken at `now`; samples older than `keep` (but the newest such one, a
    /// window's baseline) are dropped.
    pub fn record(&mut self, now: Timestamp, totals: Totals, keep: Duration) {
        self.samples.push_back((now, totals));
        let horizon = before(now, keep);
        while let (Some(horizon), Some((second, _))) = (horizon, self.samples.get(1))
            && *second <= horizon
        {
            self.samples.pop_front();
        }
    }

    /// The subject's figures over the last `over`: the newest sample minus the newest one at
    /// least `over` old (the oldest when none is that old).
    pub fn window(&self, subject: &Subject, over: Duration) -> Window {
        let Some((newest_at, newest)) = self.samples.back() else {
            return Window::default();
        };
        let horizon = before(*newest_at, over);
        let baseline = self
            .samples
            .iter()
            .rev()
            .find(|(at, _)| horizon.is_some_and(|h| *at <= h))
            .or(self.samples.front())
            .map(|(_, totals)| totals);
        let now = subject.window(newest);
        let then = baseline.map(|t| subject.window(t)).unwrap_or_default();
        Window {
            canary: now.canary.since(&then.canary),
            primary: now.primary.since(&then.primary),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;

    use super::*;
    use crate::metrics::Metrics;

    fn config() -> Config {
        Config::from_yaml(
            "services:\n  - name: a\n    versions: [{name: v1, primary: true}, {name: v2}]\n\
             releases:\n  - {name: r, priority: 1, hashBy: x-user-id, \
             match: [{header: x, exact: y}], targets: {a: v2}, \
             rollout: {steps: [10, 100], interval: 1m}}\n",
            "t.yaml",
        )
        .unwrap()
    }

    #[test]
    fn the_window_counts_the_releases_versions_and_the_primaries_from_the_metrics() {
        let config = config();
        let subject = Subject::of(&config.releases[0], &config);
        assert_eq!(subject.primaries, [("a".to_string(), "v1".to_string())]);
        let versions: HashSet<_> = subject
            .canary
            .iter()
            .chain(&subject.primaries)
            .cloned()
            .collect();
        let metrics = Metrics::default();
        let fast = Duration::from_millis(1);
        let started = Timestamp::now();
        let mut figures = LocalFigures::new(started);
        // Before the window: a request that must not count.
        metrics.observe("a", "v2", Some("r"), StatusCode::OK, fast);
        figures.record(
            started + SignedDuration::from_secs(1),
            parse_totals(&metrics.encode(), &versions),
            Duration::from_secs(60),
        );
        for _ in 0..8 {
            metrics.observe("a", "v2", Some("r"), StatusCode::OK, fast);
        }
        metrics.observe("a", "v2", Some("r"), StatusCode::BAD_GATEWAY, fast);
        metrics.observe(
            "a",
            "v2",
            Some("r"),
            StatusCode::OK,
            Duration::from_millis(300),
        );
        // The primary, under no release and under another one; and a version of no interest.
        metrics.observe("a", "v1", None, StatusCode::OK, fast);
        metrics.observe("a", "v1", Some("other"), StatusCode::OK, fast);
        metrics.observe("b", "v1", None, StatusCode::OK, fast);
        let totals = parse_totals(&metrics.encode(), &versions);
        assert!(!totals.keys().any(|(service, _, _)| service == "b"));
        figures.record(
            started + SignedDuration::from_secs(3),
            totals,
            Duration::from_secs(60),
        );
        let window = figures.window(&subject, Duration::from_secs(2));
        assert_eq!((window.canary.requests, window.canary.errors), (10, 1));
        assert_eq!(window.primary.requests, 2);
        let p99 = window.canary.latency_quantile(0.99).unwrap();
        assert!(p99 > 0.2 && p99 <= 0.41, "{p99}");
        // Over a longer window than the samples go back: from the start.
        let all = figures.window(&subject, Duration::from_secs(3600));
        assert_eq!(all.canary.requests, 11);
    }

    #[test]
    fn labels_with_escapes_are_read_whole() {
        let (labels, rest) = parse_labels(r#"a="x\"y",b="c\\d"} 5"#).unwrap();
        assert_eq!(
            labels,
            [("a".into(), "x\"y".into()), ("b".into(), "c\\d".into())]
        );
        assert_eq!(rest, " 5");
        assert!(parse_labels(r#"a="unterminated"#).is_none());
    }
}
