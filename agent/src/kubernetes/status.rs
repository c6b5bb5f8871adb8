//! The status a CanaryRelease should carry for a verdict: the conditions `Accepted`, `Shadowed`
//! and `Conflict`, with transition times kept while a condition does not change, so that a
//! status is rewritten only when something about it changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{
    crd::{CanaryRelease, CanaryReleaseStatus},
    translate::{State, Verdict, match_summary},
};

pub fn desired_status(
    release: &CanaryRelease,
    verdict: &Verdict,
    now: Time,
) -> CanaryReleaseStatus {
    let previous = release.status.as_ref();
    let generation = release.metadata.generation;
    let related = verdict.related.join(", ");
    let condition = |kind: &str, holds: bool, reason: &str, message: String| {
        let status = if holds { "True" } else { "False" };
        let since = previous
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == kind))
            .filter(|c| c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: kind.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: since,
        }
    };
    let shadowed = verdict.state == State::Shadowed;
    let conflict = verdict.state == State::Conflict;
    let conditions = vec![
        condition(
            "Accepted",
            verdict.state == State::Accepted,
            &verdict.reason,
            verdict.message.clone(),
        ),
        if shadowed {
            condition(
                "Shadowed",
                true,
                "Shadowed",
                format!("shadowed by {related}: {}", verdict.message),
            )
        } else {
            condition("Shadowed", false, "NotShadowed", String::new())
        },
        if conflict {
            condition(
                "Conflict",
                true,
                &verdict.reason,
                format!(
                    "conflicts with {related}, which is older and keeps serving: {}",
                    verdict.message
                ),
            )
        } else {
            condition("Conflict", false, "NoConflict", String::new())
        },
    ];
    CanaryReleaseStatus {
        observed_generation: generation,
        state: Some(verdict.state.as_str().to_string()),
        match_summary: Some(match_summary(release)),
        conditions,
        ..CanaryReleaseStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::crd::CanaryReleaseSpec;

    fn release(status: Option<CanaryReleaseStatus>) -> CanaryRelease {
        let mut release = CanaryRelease::new(
            "red",
            CanaryReleaseSpec {
                priority: 1,
                matchers: vec![crate::config::Matcher {
                    header: "x-device".into(),
                    exact: Some("android".into()),
                    prefix: None,
                    regex: None,
                }],
                percent: None,
                hash_by: None,
                targets: Default::default(),
                rollout: None,
            },
        );
        release.metadata.generation = Some(3);
        release.status = status;
        release
    }

    fn time(seconds: i64) -> Time {
        Time(jiff::Timestamp::from_second(seconds).unwrap())
    }

    fn conflict() -> Verdict {
        Verdict {
            state: State::Conflict,
            reason: "AmbiguousPriority".into(),
            message: "equal priority".into(),
            related: vec!["food/blue".into()],
        }
    }

    #[test]
    fn conditions_name_the_other_release_and_the_generation() {
        let status = desired_status(&release(None), &conflict(), time(10));
        assert_eq!(status.state.as_deref(), Some("Conflict"));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.match_summary.as_deref(), Some("x-device=android"));
        let [accepted, shadowed, conflict] = &status.conditions[..] else {
            panic!("three conditions")
        };
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "AmbiguousPriority")
        );
        assert_eq!(shadowed.status, "False");
        assert_eq!(conflict.status, "True");
        assert!(
            conflict.message.contains("food/blue"),
            "{}",
            conflict.message
        );
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let first = desired_status(&release(None), &conflict(), time(10));
        let again = desired_status(&release(Some(first.clone())), &conflict(), time(20));
        assert_eq!(first, again, "an unchanged verdict is an unchanged status");
        let accepted = Verdict {
            state: State::Accepted,
            reason: "Accepted".into(),
            message: "routes".into(),
            related: vec![],
        };
        let later = desired_status(&release(Some(first)), &accepted, time(30));
        let by_type = |kind: &str| later.conditions.iter().find(|c| c.type_ == kind).unwrap();
        assert_eq!(by_type("Accepted").last_transition_time, time(30));
        assert_eq!(by_type("Conflict").last_transition_time, time(30));
        assert_eq!(
            by_type("Shadowed").last_transition_time,
            time(10),
            "still False"
        );
    }
}
