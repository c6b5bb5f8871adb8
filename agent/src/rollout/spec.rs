//! What a user writes: the `rollout` of a release, the same struct in the file and in a
//! CanaryRelease (so the API server's schema and the file's parser agree).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::Release;

/// A release that grows step by step on its own health, rolls back by itself and is promoted
/// (or held) at the end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rollout {
    /// Percent of the matching users at each step, increasing, each in (0, 100]. A user's
    /// place is sticky (`hashBy`): the users in at one step are in at every later one.
    #[schemars(length(min = 1, max = 100))]
    pub steps: Vec<f64>,
    /// Time at each step before the analysis that decides the next (`30s`, `2m`).
    #[serde(with = "duration_text")]
    #[schemars(with = "String")]
    pub interval: Duration,
    #[serde(default)]
    pub analysis: Analysis,
    /// At the last step, after a passed analysis: make the release's versions primary
    /// (`promote`), or stay there (`hold`).
    #[serde(default)]
    pub on_success: OnSuccess,
}

/// What a step must show, over the last interval, for the next step to come.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Analysis {
    /// Fewer requests to the release's versions than this: wait another interval.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// The most 5xx answers (the version's own and steer's upstream failures) the release's
    /// versions may give, as a percentage (`1%`).
    #[serde(default = "default_max_error_rate", with = "percent_text")]
    #[schemars(with = "String", regex(pattern = r"^[0-9]+(\.[0-9]+)?%$"))]
    pub max_error_rate: f64,
    /// The release's p99 latency (to response headers) may be at most this many times the
    /// p99 of the primary versions of the same services; unchecked when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // OpenAPI v3.0 (the CRD's schema): a boolean qualifies `minimum`.
    #[schemars(extend("minimum" = 0, "exclusiveMinimum" = true))]
    pub max_latency_p99_ratio: Option<f64>,
}

fn default_min_requests() -> u64 {
    100
}

/// 1%, as a fraction.
fn default_max_error_rate() -> f64 {
    0.01
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            min_requests: default_min_requests(),
            max_error_rate: default_max_error_rate(),
            max_latency_p99_ratio: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnSuccess {
    /// The release's versions become the primaries of their services (on Kubernetes, written;
    /// from a file, proposed: `steer rollout promote`).
    #[default]
    Promote,
    /// The release stays at its last step.
    Hold,
}

impl Rollout {
    /// The percent of step `step` (the last one past the end).
    pub fn percent_at(&self, step: usize) -> f64 {
        let last = self.steps.len().saturating_sub(1);
        self.steps.get(step.min(last)).copied().unwrap_or(100.0)
    }

    pub fn last_step(&self) -> usize {
        self.steps.len().saturating_sub(1)
    }
}

/// Why `release`'s rollout cannot run, if it cannot.
pub fn validate(release: &Release) -> Result<(), String> {
    let Some(rollout) = &release.rollout else {
        return Ok(());
    };
    if release.percent.is_some() {
        return Err(
            "`percent` and `rollout` exclude each other: the rollout sets the \
                    percent of each step"
                .into(),
        );
    }
    if release.hash_by.is_none() {
        return Err(
            "a rollout needs `hashBy`, the header that keeps each user on one side of \
                    every step (e.g. x-user-id)"
                .into(),
        );
    }
    if rollout.steps.is_empty() {
        return Err("rollout.steps is empty".into());
    }
    let mut previous = 0.0;
    for &step in &rollout.steps {
        if !(step > 0.0 && step <= 100.0) {
            return Err(format!("rollout step {step} must be in (0, 100]"));
        }
        if step <= previous {
            return Err(format!(
                "rollout steps must increase: {step} comes after {previous}"
            ));
        }
        previous = step;
    }
    let analysis = &rollout.analysis;
    if !(0.0..=1.0).contains(&analysis.max_error_rate) {
        return Err(format!(
            "rollout.analysis.maxErrorRate {}% must be in [0%, 100%]",
            analysis.max_error_rate * 100.0
        ));
    }
    if let Some(ratio) = analysis.max_latency_p99_ratio
        && !(ratio > 0.0 && ratio.is_finite())
    {
        return Err(format!(
            "rollout.analysis.maxLatencyP99Ratio {ratio} must be more than 0"
        ));
    }
    Ok(())
}

/// Durations as people write them (`30s`, `2m`, `1m30s`), more than zero.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        let signed = jiff::SignedDuration::try_from(*duration).unwrap_or_default();
        serializer.serialize_str(&format!("{signed:#}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        crate::config::timeout_format::parse(&text)
            .map_err(|reason| D::Error::custom(format!("rollout.interval {reason}")))
    }
}

/// A percentage written `1%` or `0.5%`, held as a fraction.
mod percent_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(fraction: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{}%", fraction * 100.0))
    }

    /// A bare number is refused too: is `1` 1% or 100%?
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Number(f64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        let text = match Written::deserialize(deserializer)? {
            Written::Text(text) => text,
            Written::Number(number) => number.to_string(),
        };
        text.trim()
            .strip_suffix('%')
            .and_then(|number| number.trim().parse::<f64>().ok())
            .filter(|percent| percent.is_finite())
            .map(|percent| percent / 100.0)
            .ok_or_else(|| {
                D::Error::custom(format!(
                    "maxErrorRate `{text}` is not a percentage such as 1% or 0.5%"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn release_with(rollout: &str) -> Result<Release, String> {
        let yaml = format!(
            "releases:\n  - name: r\n    priority: 1\n    hashBy: x-user-id\n    \
             match: [{{header: x-device, exact: android}}]\n    rollout: {rollout}\n"
        );
        Config::from_yaml(&yaml, "t.yaml")
            .map(|c| c.releases[0].clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn reads_the_documented_shape_and_writes_it_back() {
        let release = release_with(
            "{steps: [1, 5, 10, 25, 50, 100], interval: 2m, analysis: {minRequests: 100, \
             maxErrorRate: 1%, maxLatencyP99Ratio: 1.5}, onSuccess: hold}",
        )
        .unwrap();
        let rollout = release.rollout.as_ref().unwrap();
        assert_eq!(rollout.steps, [1.0, 5.0, 10.0, 25.0, 50.0, 100.0]);
        assert_eq!(rollout.interval, Duration::from_secs(120));
        assert_eq!(rollout.analysis.max_error_rate, 0.01);
        assert_eq!(rollout.analysis.max_latency_p99_ratio, Some(1.5));
        assert_eq!(rollout.on_success, OnSuccess::Hold);
        assert!(validate(&release).is_ok());
        let json = serde_json::to_value(rollout).unwrap();
        assert_eq!(json["interval"], "2m");
        assert_eq!(json["analysis"]["maxErrorRate"], "1%");
        // Defaults: 100 requests, 1%, no latency check, promote.
        let defaults = release_with("{steps: [50, 100], interval: 30s}").unwrap();
        let rollout = defaults.rollout.unwrap();
        assert_eq!(rollout.analysis, Analysis::default());
        assert_eq!(rollout.on_success, OnSuccess::Promote);
    }

    #[test]
    fn unusable_rollouts_say_why() {
        for (rollout, reason) in [
            ("{steps: [], interval: 1m}", "rollout.steps is empty"),
            ("{steps: [5, 5], interval: 1m}", "must increase"),
            ("{steps: [0, 5], interval: 1m}", "must be in (0, 100]"),
            ("{steps: [50, 101], interval: 1m}", "must be in (0, 100]"),
            (
                "{steps: [5], interval: 1m, analysis: {maxErrorRate: 150%}}",
                "must be in [0%, 100%]",
            ),
            (
                "{steps: [5], interval: 1m, analysis: {maxLatencyP99Ratio: 0}}",
                "must be more than 0",
            ),
        ] {
            let release = release_with(rollout).unwrap();
            let err = validate(&release).unwrap_err();
            assert!(err.contains(reason), "{rollout}: {err}");
        }
        for (rollout, reason) in [
            ("{steps: [5], interval: 0s}", "more than zero"),
            ("{steps: [5], interval: soon}", "not a duration"),
            (
                "{steps: [5], interval: 1m, analysis: {maxErrorRate: 1}}",
                "not a percentage",
            ),
        ] {
            let err = release_with(rollout).unwrap_err();
            assert!(err.contains(reason), "{rollout}: {err}");
        }
        let mut release = release_with("{steps: [5], interval: 1m}").unwrap();
        release.percent = Some(5.0);
        assert!(
            validate(&release)
                .unwrap_err()
                .contains("exclude each other")
        );
        release.percent = None;
        release.hash_by = None;
        assert!(validate(&release).unwrap_err().contains("needs `hashBy`"));
    }
}
