//! Progressive rollout: a release grows step by step on its own health, rolls back by itself
//! and is promoted (or held) at the end.
//!
//! Everything that decides is a pure function here: where a rollout stands (`RolloutStatus`)
//! and how it moves (`begin`, `after_analysis`, `blocked`, `resume`), what an analysis
//! concludes from a window of figures (`analysis::judge`), and what the rules see (`effective`:
//! each rolling release at its step's percent, a rolled-back or promoted one left out). The
//! figures come from the agent's own counters (`local`, file mode) or from Prometheus
//! (Kubernetes); the driver around them (`driver`) does the I/O.
//!
//! A step's users are a superset of the last step's: a user is in when the sticky hash of
//! (release, user) is below the step's threshold, and thresholds only grow.
//!
//! The checker judges a configuration with each rolling release at its last step (the
//! largest share it may come to). Every earlier step is then valid too: a step only lowers a
//! release's share or leaves it out, which can neither make two releases tie nor shadow one.
//! So one check of the source serves all its steps, and a rollout that could never finish
//! within the rules is refused before it starts.

pub mod analysis;
pub mod driver;
pub mod local;
pub mod spec;

use std::{collections::BTreeMap, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use analysis::{AnalysisRecord, Outcome, Traffic, Window};
pub use spec::{Analysis, OnSuccess, Rollout};

use crate::{
    config::{Config, Release},
    rules::sticky_hash,
};

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// At a step, waiting for the next analysis.
    Progressing,
    /// The last step passed; held there (`onSuccess: hold`, or a promotion a person has to
    /// write: the agent never rewrites a configuration file).
    Succeeded,
    /// The release's versions are the primaries now; the release takes no traffic of its own.
    Promoted,
    /// An analysis failed: the release takes no traffic until a person resumes it.
    RolledBack,
    /// A person stopped it: the release takes no traffic until a person resumes it.
    Aborted,
}

/// One release's rollout: kept by the agent (file mode) or in the CanaryRelease's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub phase: Phase,
    /// Index of the current step in `rollout.steps`.
    pub step: usize,
    /// The share of the matching users the release takes now (0 when rolled back or
    /// promoted).
    pub percent: f64,
    /// When the current step began.
    #[schemars(with = "String")]
    pub step_started_at: jiff::Timestamp,
    /// When the next analysis is due (while progressing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub next_analysis_at: Option<jiff::Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisRecord>,
    /// Why it stands where it stands, in a sentence.
    pub message: String,
    /// The rollout and targets this status is about: another one starts over.
    pub fingerprint: String,
}

/// Release name -> its rollout's status.
pub type Book = BTreeMap<String, RolloutStatus>;

/// What a status is about: the rollout and the versions it rolls out. Changing either starts
/// the rollout over; changing anything else (priority, matchers) keeps its place.
pub fn fingerprint(release: &Release) -> String {
    let about = serde_json::json!({ "rollout": release.rollout, "targets": release.targets });
    format!("{:016x}", sticky_hash("rollout", &about.to_string()))
}

fn at(time: jiff::Timestamp, after: std::time::Duration) -> jiff::Timestamp {
    let after = jiff::SignedDuration::try_from(after).unwrap_or(jiff::SignedDuration::MAX);
    time.checked_add(after).unwrap_or(jiff::Timestamp::MAX)
}

/// A rollout's first step, from `now`.
pub fn begin(release: &Release, rollout: &Rollout, now: jiff::Timestamp) -> RolloutStatus {
    RolloutStatus {
        phase: Phase::Progressing,
        step: 0,
        percent: rollout.percent_at(0),
        step_started_at: now,
        next_analysis_at: Some(at(now, rollout.interval)),
        last_analysis: None,
        message: format!(
            "step 1 of {}: {}%",
            rollout.steps.len(),
            rollout.percent_at(0)
        ),
        fingerprint: fingerprint(release),
    }
}

impl RolloutStatus {
    /// Is an analysis due?
    pub fn due(&self, now: jiff::Timestamp) -> bool {
        self.phase == Phase::Progressing && self.next_analysis_at.is_some_and(|next| next <= now)
    }

    /// The share the rules give the release: `None` leaves it out of the rules.
    pub fn share(&self) -> Option<f64> {
        match self.phase {
            Phase::Progressing | Phase::Succeeded => Some(self.percent),
            Phase::Promoted | Phase::RolledBack | Phase::Aborted => None,
        }
    }

    /// A person's word to stop the rollout now: the release takes no traffic from the next
    /// apply on, until resumed. A rollout that is over (promoted) or already out is left.
    pub fn aborted(
        &self,
        release: &str,
        reason: &str,
        now: jiff::Timestamp,
    ) -> Result<RolloutStatus, String> {
        if !matches!(self.phase, Phase::Progressing | Phase::Succeeded) {
            return Err(format!(
                "release `{release}` takes no traffic of its own ({})",
                self.message
            ));
        }
        Ok(RolloutStatus {
            phase: Phase::Aborted,
            percent: 0.0,
            next_analysis_at: None,
            message: format!(
                "aborted at {now:.0} at step {} ({}%): {reason}; resume to start over",
                self.step + 1,
                self.percent
            ),
            ..self.clone()
        })
    }

    /// Where an analysis takes the rollout: the next step when it passed (or, past the last,
    /// success), the same step for another interval when it waited, back to nothing when it
    /// failed.
    pub fn after_analysis(
        &self,
        rollout: &Rollout,
        record: AnalysisRecord,
        now: jiff::Timestamp,
    ) -> RolloutStatus {
        let steps = rollout.steps.len();
        let mut next = RolloutStatus {
            next_analysis_at: Some(at(now, rollout.interval)),
            ..self.clone()
        };
        match record.outcome {
            Outcome::Waited => {
                next.message = format!(
                    "step {} of {steps}: {}% (waiting: {})",
                    self.step + 1,
                    self.percent,
                    record.message
                );
            }
            Outcome::Failed => {
                next.phase = Phase::RolledBack;
                next.percent = 0.0;
                next.next_analysis_at = None;
                next.message = format!(
                    "rolled back at step {} ({}%): {}; resume to start over",
                    self.step + 1,
                    self.percent,
                    record.message
                );
            }
            Outcome::Passed if self.step < rollout.last_step() => {
                next.step = self.step + 1;
                next.percent = rollout.percent_at(next.step);
                next.step_started_at = now;
                next.message = format!("step {} of {steps}: {}%", next.step + 1, next.percent);
            }
            Outcome::Passed => {
                next.phase = Phase::Succeeded;
                next.next_analysis_at = None;
                next.message = match rollout.on_success {
                    OnSuccess::Hold => format!("succeeded; holding at {}%", self.percent),
                    OnSuccess::Promote => format!(
                        "succeeded at {}%; promotion proposed (steer rollout promote)",
                        self.percent
                    ),
                };
            }
        }
        next.last_analysis = Some(record);
        next
    }

    /// A person's word that this step need not wait out its interval: its analysis is due
    /// now, over the figures since the step began (`analysis_window`), and decides as it
    /// would have at the end. The health gate is never skipped: too few requests waits, as
    /// ever.
    pub fn continued(&self, release: &str, now: jiff::Timestamp) -> Result<RolloutStatus, String> {
        if self.phase != Phase::Progressing {
            return Err(format!(
                "release `{release}` is not progressing ({})",
                self.message
            ));
        }
        Ok(RolloutStatus {
            next_analysis_at: Some(now),
            ..self.clone()
        })
    }

    /// What the analysis due `now` looks at: the interval before it, or only the time since
    /// the step began when it runs early (`continued`), so that a step is never judged by the
    /// figures of the step before.
    pub fn analysis_window(&self, rollout: &Rollout, now: jiff::Timestamp) -> Duration {
        let since_step = now
            .duration_since(self.step_started_at)
            .try_into()
            .unwrap_or(Duration::ZERO);
        rollout.interval.min(since_step)
    }

    /// The next step would break a rule of the checker (shadow or tie another release):
    /// stay at this step and try again after another interval.
    pub fn blocked(&self, rollout: &Rollout, reason: &str, now: jiff::Timestamp) -> RolloutStatus {
        RolloutStatus {
            next_analysis_at: Some(at(now, rollout.interval)),
            message: format!(
                "step {} of {}: {}% (blocked: {reason})",
                self.step + 1,
                rollout.steps.len(),
                self.percent
            ),
            ..self.clone()
        }
    }

    /// The release's versions were made primary.
    pub fn promoted(&self) -> RolloutStatus {
        RolloutStatus {
            phase: Phase::Promoted,
            percent: 0.0,
            next_analysis_at: None,
            message: "promoted: the release's versions are primary".into(),
            ..self.clone()
        }
    }
}

/// A person's word to start a rolled-back or aborted release over from its first step.
pub fn resume(
    release: &Release,
    status: &RolloutStatus,
    now: jiff::Timestamp,
) -> Result<RolloutStatus, String> {
    let rollout = release
        .rollout
        .as_ref()
        .ok_or_else(|| format!("release `{}` has no rollout", release.name))?;
    if !matches!(status.phase, Phase::RolledBack | Phase::Aborted) {
        return Err(format!(
            "release `{}` is not rolled back or aborted ({})",
            release.name, status.message
        ));
    }
    Ok(RolloutStatus {
        last_analysis: status.last_analysis.clone(),
        ..begin(release, rollout, now)
    })
}

/// A release kept out of traffic until a person resumes it, because what was kept of its
/// rollout cannot be trusted (`reason`): unsafe to guess, since it may have been rolled back.
pub fn held(
    release: &Release,
    rollout: &Rollout,
    reason: &str,
    now: jiff::Timestamp,
) -> RolloutStatus {
    RolloutStatus {
        phase: Phase::RolledBack,
        percent: 0.0,
        next_analysis_at: None,
        message: format!("held at 0%: {reason}; resume to start over"),
        ..begin(release, rollout, now)
    }
}

/// A kept status as far as it fits its rollout: the share comes from the rollout's steps,
/// never from the kept figure, and a step the rollout does not have holds the release.
pub fn fitted(
    status: &RolloutStatus,
    release: &Release,
    rollout: &Rollout,
    now: jiff::Timestamp,
) -> RolloutStatus {
    if status.step > rollout.last_step() {
        let reason = format!(
            "the kept status is at step {} of a rollout of {} steps",
            status.step + 1,
            rollout.steps.len()
        );
        return held(release, rollout, &reason, now);
    }
    let percent = match status.phase {
        Phase::Progressing | Phase::Succeeded => rollout.percent_at(status.step),
        Phase::Promoted | Phase::RolledBack | Phase::Aborted => 0.0,
    };
    RolloutStatus {
        percent,
        ..status.clone()
    }
}

/// The statuses for `config`'s rollouts: a release keeps its status while its rollout and
/// targets stay the same (as far as it fits them); a new or changed one begins at `now`;
/// statuses of releases that are gone, or no longer roll out, are dropped.
pub fn reconcile(config: &Config, book: &Book, now: jiff::Timestamp) -> Book {
    config
        .releases
        .iter()
        .filter_map(|release| {
            let rollout = release.rollout.as_ref()?;
            let status = book
                .get(&release.name)
                .filter(|status| status.fingerprint == fingerprint(release))
                .map(|status| fitted(status, release, rollout, now))
                .unwrap_or_else(|| begin(release, rollout, now));
            Some((release.name.clone(), status))
        })
        .collect()
}

/// The configuration the rules see: each rolling release at its step's percent, a rolled-back
/// or promoted one left out. Releases without a rollout are as written.
pub fn effective(config: &Config, book: &Book) -> Config {
    let releases = config
        .releases
        .iter()
        .filter_map(|release| {
            if release.rollout.is_none() {
                return Some(release.clone());
            }
            let percent = book.get(&release.name)?.share()?;
            Some(Release {
                percent: Some(percent),
                rollout: None,
                ..release.clone()
            })
        })
        .collect();
    Config {
        releases,
        ..config.clone()
    }
}

/// `config` with `release` promoted: its versions become the primaries of their services and
/// the release is gone (its traffic is everyone's now). The old primaries stay listed until
/// a person takes them offline.
pub fn promote(config: &Config, release: &str) -> Result<Config, String> {
    let found = config
        .releases
        .iter()
        .find(|r| r.name == release)
        .ok_or_else(|| format!("no release `{release}`"))?;
    let mut promoted = config.clone();
    for (service_name, version_name) in &found.targets {
        let service = promoted
            .services
            .iter_mut()
            .find(|s| &s.name == service_name)
            .ok_or_else(|| {
                format!("release `{release}` targets unknown service `{service_name}`")
            })?;
        if !service.versions.iter().any(|v| &v.name == version_name) {
            return Err(format!(
                "release `{release}` targets unknown version `{service_name}/{version_name}`"
            ));
        }
        for version in &mut service.versions {
            version.primary = &version.name == version_name;
        }
    }
    promoted.releases.retain(|r| r.name != release);
    Ok(promoted)
}

#[cfg(test)]
mod tests;
