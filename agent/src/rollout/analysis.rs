//! What an analysis concludes from one interval's figures: the one home of the error rate,
//! the p99 from a latency histogram, and the thresholds, whichever source the figures came
//! from (the agent's own counters or Prometheus).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Analysis;

/// Requests to a set of versions over an interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    pub requests: u64,
    /// 5xx answers, the versions' own and steer's (no endpoint, upstream failure, timeout).
    pub errors: u64,
    /// Latency to response headers: (upper bound in seconds, requests at or below it), by
    /// bound, the last bound infinite; a Prometheus histogram's buckets.
    pub latency: Vec<(f64, u64)>,
}

impl Traffic {
    /// Adds another series' figures (buckets with the same bounds add up; others are merged
    /// by bound).
    pub fn add(&mut self, other: &Traffic) {
        self.requests += other.requests;
        self.errors += other.errors;
        for &(bound, count) in &other.latency {
            match self.latency.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, total)) => *total += count,
                None => self.latency.push((bound, count)),
            }
        }
        self.latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// The figures since `earlier` (both cumulative counts of the same series). A counter that
    /// went down was reset (a restart): everything since counts.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        if self.requests < earlier.requests {
            return self.clone();
        }
        let before = |bound: f64| {
            earlier
                .latency
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0, |(_, count)| *count)
        };
        Traffic {
            requests: self.requests - earlier.requests,
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self
                .latency
                .iter()
                .map(|&(bound, count)| (bound, count.saturating_sub(before(bound))))
                .collect(),
        }
    }

    /// The `q` quantile of the latency in seconds, as Prometheus's `histogram_quantile` reads
    /// a histogram: linear within the bucket it falls in, the highest finite bound when it
    /// falls past all of them; `None` without observations.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let total = self.latency.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut lower = (0.0, 0u64);
        for &(bound, count) in &self.latency {
            if count as f64 >= rank {
                if bound.is_infinite() {
                    return Some(lower.0);
                }
                let inside = (count - lower.1) as f64;
                let fraction = if inside > 0.0 {
                    (rank - lower.1 as f64) / inside
                } else {
                    1.0
                };
                return Some(lower.0 + (bound - lower.0) * fraction);
            }
            lower = (bound, count);
        }
        Some(lower.0)
    }
}

/// One interval's figures for one release.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    /// The release's requests to its own versions.
    pub canary: Traffic,
    /// Every request to the primary versions of the services the release has versions of.
    pub primary: Traffic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Outcome {
    /// Healthy: the next step.
    Passed,
    /// Too few requests to judge: the same step for another interval.
    Waited,
    /// Unhealthy: roll back.
    Failed,
}

/// An analysis with the figures it judged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisRecord {
    #[schemars(with = "String")]
    pub at: jiff::Timestamp,
    pub outcome: Outcome,
    pub message: String,
    pub requests: u64,
    pub errors: u64,
    /// errors / requests, as a fraction.
    pub error_rate: f64,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_p99: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ratio: Option<f64>,
    pub primary_requests: u64,
}

/// Judges one interval: too few requests waits; too many errors, or a p99 too far above the
/// primaries', fails; anything else passes. The latency is compared only when the primaries
/// served requests in the same interval (at 100% of everyone, nobody is left to compare with).
pub fn judge(analysis: &Analysis, window: &Window, now: jiff::Timestamp) -> AnalysisRecord {
    let canary = &window.canary;
    let error_rate = if canary.requests == 0 {
        0.0
    } else {
        canary.errors as f64 / canary.requests as f64
    };
    let p99 = canary.latency_quantile(0.99);
    let primary_p99 = window.primary.latency_quantile(0.99);
    let p99_ratio = match (p99, primary_p99) {
        (Some(p99), Some(primary)) if primary > 0.0 => Some(p99 / primary),
        _ => None,
    };
    let percent = |fraction: f64| format!("{:.2}%", fraction * 100.0);
    let (outcome, message) = if canary.requests < analysis.min_requests {
        (
            Outcome::Waited,
            format!(
                "{} requests, fewer than minRequests {}",
                canary.requests, analysis.min_requests
            ),
        )
    } else if error_rate > analysis.max_error_rate {
        (
            Outcome::Failed,
            format!(
                "error rate {} ({} of {} requests) above maxErrorRate {}",
                percent(error_rate),
                canary.errors,
                canary.requests,
                percent(analysis.max_error_rate)
            ),
        )
    } else if let (Some(limit), Some(ratio)) = (analysis.max_latency_p99_ratio, p99_ratio)
        && ratio > limit
    {
        (
            Outcome::Failed,
            format!(
                "p99 latency {:.1} ms is {ratio:.2}x the primaries' {:.1} ms, above \
                 maxLatencyP99Ratio {limit}",
                p99.unwrap_or_default() * 1000.0,
                primary_p99.unwrap_or_default() * 1000.0
            ),
        )
    } else {
        (
            Outcome::Passed,
            format!(
                "{} requests, error rate {}{}",
                canary.requests,
                percent(error_rate),
                p99_ratio.map_or(String::new(), |r| format!(", p99 {r:.2}x the primaries'"))
            ),
        )
    };
    AnalysisRecord {
        at: now,
        outcome,
        message,
        requests: canary.requests,
        errors: canary.errors,
        error_rate,
        p99,
        primary_p99,
        p99_ratio,
        primary_requests: window.primary.requests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `requests` requests, `slow` of them at 100 ms and the rest at 10 ms.
    fn traffic(requests: u64, errors: u64, slow: u64) -> Traffic {
        Traffic {
            requests,
            errors,
            latency: vec![
                (0.005, 0),
                (0.01, requests - slow),
                (0.1, requests),
                (f64::INFINITY, requests),
            ],
        }
    }

    #[test]
    fn the_quantile_reads_a_histogram_as_prometheus_does() {
        // 99 at <= 10 ms, 1 in (10, 100] ms: the 99th is at the top of the first bucket.
        let t = traffic(100, 0, 1);
        assert!((t.latency_quantile(0.99).unwrap() - 0.01).abs() < 1e-9);
        // Half of them in (10, 100]: the 99th lies 98% of the way through it.
        let t = traffic(100, 0, 50);
        assert!((t.latency_quantile(0.99).unwrap() - (0.01 + 0.09 * 0.98)).abs() < 1e-9);
        // Past every finite bound: the highest finite bound.
        let past = Traffic {
            requests: 1,
            errors: 0,
            latency: vec![(0.1, 0), (f64::INFINITY, 1)],
        };
        assert_eq!(past.latency_quantile(0.99), Some(0.1));
        assert_eq!(Traffic::default().latency_quantile(0.99), None);
    }

    #[test]
    fn since_subtracts_cumulative_figures_and_survives_a_reset() {
        let earlier = traffic(100, 1, 10);
        let now = traffic(300, 4, 40);
        let window = now.since(&earlier);
        assert_eq!((window.requests, window.errors), (200, 3));
        assert_eq!(window.latency[1], (0.01, 170));
        // A restart: the counters began again below the earlier figures.
        let reset = traffic(50, 0, 0);
        assert_eq!(reset.since(&earlier), reset);
        let mut sum = traffic(100, 1, 10);
        sum.add(&traffic(100, 1, 10));
        assert_eq!(sum, traffic(200, 2, 20));
    }

    #[test]
    fn an_analysis_waits_fails_or_passes_with_its_figures() {
        let analysis = Analysis {
            min_requests: 100,
            max_error_rate: 0.01,
            max_latency_p99_ratio: Some(1.5),
        };
        let now = jiff::Timestamp::UNIX_EPOCH;
        let judged =
            |canary: Traffic, primary: Traffic| judge(&analysis, &Window { canary, primary }, now);
        let few = judged(traffic(99, 50, 0), traffic(1000, 0, 0));
        assert_eq!(few.outcome, Outcome::Waited, "{}", few.message);
        assert!(few.message.contains("fewer than minRequests 100"));

        let erring = judged(traffic(1000, 50, 0), traffic(1000, 0, 0));
        assert_eq!(erring.outcome, Outcome::Failed);
        assert_eq!(erring.error_rate, 0.05);
        assert!(
            erring
                .message
                .contains("error rate 5.00% (50 of 1000 requests)"),
            "{}",
            erring.message
        );
        // Exactly at the limit is within it.
        let edge = judged(traffic(1000, 10, 0), traffic(1000, 0, 0));
        assert_eq!(edge.outcome, Outcome::Passed, "{}", edge.message);

        let slow = judged(traffic(1000, 0, 500), traffic(1000, 0, 0));
        assert_eq!(slow.outcome, Outcome::Failed);
        assert!(slow.p99_ratio.unwrap() > 1.5);
        assert!(
            slow.message.contains("maxLatencyP99Ratio 1.5"),
            "{}",
            slow.message
        );

        let healthy = judged(traffic(1000, 0, 5), traffic(1000, 0, 5));
        assert_eq!(healthy.outcome, Outcome::Passed, "{}", healthy.message);
        assert_eq!(healthy.p99_ratio, Some(1.0));
        // Nobody left on the primaries: the latency is not compared.
        let alone = judged(traffic(1000, 0, 500), Traffic::default());
        assert_eq!(alone.outcome, Outcome::Passed, "{}", alone.message);
        assert_eq!(alone.p99_ratio, None);
    }
}
