use std::time::Duration;

use super::*;
use crate::{check, rules::Share};

const CONFIG: &str = r#"
services:
  - name: restaurant
    versions:
      - { name: v1, primary: true }
      - { name: v2 }
      - { name: v3 }
  - name: delivery
    versions:
      - { name: v1, primary: true }
      - { name: v2 }
releases:
  - name: android
    priority: 2
    match: [{ header: x-device, exact: android }]
    hashBy: x-user-id
    targets: { restaurant: v2, delivery: v2 }
    rollout:
      steps: [1, 5, 10, 25, 50, 100]
      interval: 2m
      analysis: { minRequests: 100, maxErrorRate: 1%, maxLatencyP99Ratio: 1.5 }
  - name: fixed
    priority: 1
    match: [{ header: x-region, exact: atlantis }]
    targets: { restaurant: v3 }
"#;

fn config() -> Config {
    Config::from_yaml(CONFIG, "t.yaml").unwrap()
}

fn t(seconds: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn record(outcome: Outcome) -> AnalysisRecord {
    AnalysisRecord {
        at: t(0),
        outcome,
        message: format!("{outcome:?}"),
        requests: 1000,
        errors: 0,
        error_rate: 0.0,
        p99: None,
        primary_p99: None,
        p99_ratio: None,
        primary_requests: 0,
    }
}

#[test]
fn continuing_makes_the_analysis_due_now_over_the_step_so_far_and_only_while_progressing() {
    let config = config();
    let release = &config.releases[0];
    let rollout = release.rollout.as_ref().unwrap();
    let begun = begin(release, rollout, t(0));
    assert!(!begun.due(t(30)));
    let continued = begun.continued("android", t(30)).unwrap();
    assert!(continued.due(t(30)));
    assert_eq!((continued.step, continued.percent), (0, 1.0));
    // Early, the analysis looks at the step so far; on time (or later, after a wait), at one
    // interval.
    assert_eq!(
        continued.analysis_window(rollout, t(30)),
        Duration::from_secs(30)
    );
    assert_eq!(
        begun.analysis_window(rollout, t(120)),
        Duration::from_secs(120)
    );
    assert_eq!(
        begun.analysis_window(rollout, t(500)),
        Duration::from_secs(120)
    );
    // The health gate stays: a continued step that waits for requests waits another interval.
    let waited = continued.after_analysis(rollout, record(Outcome::Waited), t(30));
    assert_eq!(waited.step, 0);
    assert!(!waited.due(t(60)));
    let passed = continued.after_analysis(rollout, record(Outcome::Passed), t(30));
    assert_eq!((passed.step, passed.step_started_at), (1, t(30)));
    assert_eq!(
        passed.analysis_window(rollout, t(31)),
        Duration::from_secs(1)
    );
    let rolled_back = continued.after_analysis(rollout, record(Outcome::Failed), t(30));
    let refused = rolled_back.continued("android", t(40)).unwrap_err();
    assert!(refused.contains("not progressing"), "{refused}");
}

#[test]
fn a_healthy_rollout_walks_every_step_then_succeeds() {
    let config = config();
    let release = &config.releases[0];
    let rollout = release.rollout.as_ref().unwrap();
    let mut status = begin(release, rollout, t(0));
    assert_eq!((status.step, status.percent), (0, 1.0));
    assert!(!status.due(t(119)));
    assert!(status.due(t(120)));
    let mut seen = vec![status.percent];
    let mut now = 0;
    while status.phase == Phase::Progressing {
        now += 120;
        status = status.after_analysis(rollout, record(Outcome::Passed), t(now));
        seen.push(status.percent);
    }
    assert_eq!(seen, [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 100.0]);
    assert_eq!(status.phase, Phase::Succeeded);
    assert!(
        status.message.contains("promotion proposed"),
        "{}",
        status.message
    );
    assert_eq!(status.share(), Some(100.0));
    assert_eq!(status.promoted().share(), None);
}

#[test]
fn waiting_keeps_the_step_and_failing_rolls_back_until_resumed() {
    let config = config();
    let release = &config.releases[0];
    let rollout = release.rollout.as_ref().unwrap();
    let status = begin(release, rollout, t(0));
    let waited = status.after_analysis(rollout, record(Outcome::Waited), t(120));
    assert_eq!((waited.step, waited.percent), (0, 1.0));
    assert_eq!(waited.next_analysis_at, Some(t(240)));
    assert!(waited.message.contains("waiting"), "{}", waited.message);

    let failed = waited.after_analysis(rollout, record(Outcome::Failed), t(240));
    assert_eq!(failed.phase, Phase::RolledBack);
    assert_eq!((failed.percent, failed.share()), (0.0, None));
    assert!(!failed.due(t(100_000)), "held until a person resumes it");
    assert_eq!(
        failed.last_analysis.as_ref().unwrap().outcome,
        Outcome::Failed
    );

    let err = resume(release, &status, t(300)).unwrap_err();
    assert!(err.contains("not rolled back"), "{err}");
    let resumed = resume(release, &failed, t(300)).unwrap();
    assert_eq!((resumed.phase, resumed.step), (Phase::Progressing, 0));
    assert_eq!(resumed.next_analysis_at, Some(t(420)));
    assert!(resumed.last_analysis.is_some(), "the failure stays visible");
}

#[test]
fn the_rules_see_each_step_and_a_rolled_back_release_not_at_all() {
    let config = config();
    let release = &config.releases[0];
    let rollout = release.rollout.as_ref().unwrap();
    let book = reconcile(&config, &Book::new(), t(0));
    assert_eq!(book.len(), 1, "only releases with a rollout");
    let in_force = effective(&config, &book);
    assert_eq!(in_force.releases[0].percent, Some(1.0));
    assert!(in_force.releases[0].rollout.is_none());
    assert_eq!(in_force.releases[1], config.releases[1]);
    let report = check::check(&in_force);
    assert!(report.valid, "{report:?}");

    let failed = book["android"].after_analysis(rollout, record(Outcome::Failed), t(120));
    let book = Book::from([("android".to_string(), failed)]);
    let in_force = effective(&config, &book);
    assert_eq!(in_force.releases.len(), 1);
    assert_eq!(in_force.releases[0].name, "fixed");
}

#[test]
fn a_rollout_keeps_its_place_across_edits_but_starts_over_for_new_versions() {
    let config = config();
    let release = &config.releases[0];
    let rollout = release.rollout.as_ref().unwrap();
    let book = reconcile(&config, &Book::new(), t(0));
    let advanced = book["android"].after_analysis(rollout, record(Outcome::Passed), t(120));
    let book = Book::from([("android".to_string(), advanced.clone())]);

    let mut edited = config.clone();
    edited.releases[0].priority = 5;
    assert_eq!(reconcile(&edited, &book, t(130))["android"], advanced);

    let mut new_version = config.clone();
    new_version.releases[0]
        .targets
        .insert("restaurant".into(), "v1".into());
    let restarted = &reconcile(&new_version, &book, t(130))["android"];
    assert_eq!((restarted.step, restarted.step_started_at), (0, t(130)));

    let mut gone = config.clone();
    gone.releases.remove(0);
    assert!(reconcile(&gone, &book, t(130)).is_empty());
}

#[test]
fn each_steps_users_are_a_superset_of_the_last() {
    let config = config();
    let mut release = config.releases[0].clone();
    let steps = release.rollout.take().unwrap().steps;
    let users: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
    let mut previous: Vec<&String> = Vec::new();
    for percent in steps {
        release.percent = Some(percent);
        let share = Share::parse(&release).unwrap().unwrap();
        let inside: Vec<&String> = users
            .iter()
            .filter(|user| share.admits(&release.name, user))
            .collect();
        let measured = inside.len() as f64 / users.len() as f64 * 100.0;
        assert!((measured - percent).abs() < 1.0, "{percent}%: {measured}");
        assert!(
            previous.iter().all(|user| inside.contains(user)),
            "{percent}%: someone of the last step is out"
        );
        previous = inside;
    }
}

/// The source is checked with each rolling release at its last step, and every step before
/// is valid when that is: a step only lowers a share or leaves a release out.
#[test]
fn a_source_valid_at_its_last_steps_is_valid_at_every_step_and_one_that_is_not_is_refused() {
    let text = r#"
services:
  - name: s
    versions: [{ name: v1, primary: true }, { name: v2 }, { name: v3 }, { name: v4 }]
releases:
  - name: wide
    priority: 1
    match: [{ header: x-device, prefix: "" }]
    hashBy: x-user-id
    targets: { s: v2 }
    rollout: { steps: [5, 50, 90], interval: 1m }
  - name: narrow
    priority: 2
    match: [{ header: x-device, exact: android }]
    hashBy: x-user-id
    targets: { s: v3 }
    rollout: { steps: [10, 100], interval: 1m }
  - name: peer
    priority: 3
    match: [{ header: x-region, exact: atlantis }]
    targets: { s: v4 }
"#;
    let config = Config::from_yaml(text, "t.yaml").unwrap();
    let report = check::check(&config);
    assert!(report.valid, "valid at the last steps: {report:?}");
    let (wide, narrow) = (&config.releases[0], &config.releases[1]);
    for w in 0..3 {
        for n in 0..2 {
            let at = |release: &Release, step: usize| RolloutStatus {
                step,
                percent: release.rollout.as_ref().unwrap().percent_at(step),
                ..begin(release, release.rollout.as_ref().unwrap(), t(0))
            };
            let book = Book::from([
                ("wide".to_string(), at(wide, w)),
                ("narrow".to_string(), at(narrow, n)),
            ]);
            let report = check::check(&effective(&config, &book));
            assert!(report.valid, "steps {w}, {n}: {report:?}");
        }
    }

    // At 100% of everyone `wide` would take all of `narrow`'s requests: refused up front,
    // not discovered at the last step.
    let at_everyone = text.replace("steps: [5, 50, 90]", "steps: [5, 50, 100]");
    let config = Config::from_yaml(&at_everyone, "t.yaml").unwrap();
    let report = check::check(&config);
    assert!(
        report.shadowed.iter().any(|s| s.release == "narrow"),
        "{report:?}"
    );
}

#[test]
fn promotion_makes_the_releases_versions_primary_and_drops_the_release() {
    let config = config();
    let promoted = promote(&config, "android").unwrap();
    for service in &promoted.services {
        assert_eq!(service.primary().unwrap().name, "v2", "{}", service.name);
        assert!(
            service.versions.iter().any(|v| v.name == "v1"),
            "the old primary stays"
        );
    }
    assert_eq!(promoted.releases.len(), 1);
    let report = check::check(&promoted);
    assert!(report.valid, "{report:?}");
    assert!(promote(&config, "nope").unwrap_err().contains("no release"));
}

#[test]
fn statuses_read_and_write_as_json_with_timestamps() {
    let config = config();
    let book = reconcile(&config, &Book::new(), t(0));
    let json = serde_json::to_value(&book).unwrap();
    assert_eq!(json["android"]["phase"], "Progressing");
    assert_eq!(json["android"]["nextAnalysisAt"], "2027-01-15T08:02:00Z");
    let back: Book = serde_json::from_value(json).unwrap();
    assert_eq!(back, book);
    let _ = Duration::ZERO;
}

#[test]
fn the_checker_refuses_an_unusable_rollout_and_checks_a_good_one_at_its_last_step() {
    let mut config = config();
    config.releases[0].percent = Some(5.0);
    let report = check::check(&config);
    let finding = report
        .errors
        .iter()
        .find(|e| e.code == "invalid-rollout")
        .expect("percent and rollout together");
    assert!(finding.message.contains("release `android`"), "{finding:?}");

    // The last step is what the release may come to: at 100% of everyone it would shadow a
    // narrower lower-priority release, which the checker says before the rollout starts.
    let mut config = self::config();
    config.releases[0].matchers[0].prefix = Some(String::new());
    config.releases[0].matchers[0].exact = None;
    config.releases[1].priority = 3;
    // Every request it matches carries a user, so the release at 100% takes them all.
    config.releases[1].matchers = config.releases[0].matchers.clone();
    config.releases[1].matchers.push(crate::config::Matcher {
        header: "x-user-id".into(),
        exact: None,
        prefix: Some(String::new()),
        regex: None,
    });
    let report = check::check(&config);
    assert!(
        report.shadowed.iter().any(|s| s.release == "fixed"),
        "{report:?}"
    );
}

#[test]
fn a_kept_status_gives_the_share_of_its_step_and_a_step_the_rollout_lacks_holds_the_release() {
    let config = config();
    let release = &config.releases[0];
    let rollout = release.rollout.as_ref().unwrap();
    let forged = RolloutStatus {
        percent: 100.0,
        ..begin(release, rollout, t(0))
    };
    let book = reconcile(
        &config,
        &[("android".to_string(), forged.clone())].into(),
        t(1),
    );
    assert_eq!(
        book["android"].percent, 1.0,
        "the share is steps[0], not the file's"
    );
    let beyond = RolloutStatus { step: 99, ..forged };
    let book = reconcile(&config, &[("android".to_string(), beyond)].into(), t(1));
    let held = &book["android"];
    assert_eq!((held.phase, held.share()), (Phase::RolledBack, None));
    assert!(
        held.message.contains("step 100 of a rollout of 6 steps"),
        "{}",
        held.message
    );
    // A person resumes it like any rolled-back release.
    assert_eq!(resume(release, held, t(2)).unwrap().step, 0);
}

#[test]
fn an_unreadable_state_file_holds_every_rolling_release_and_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("steer.yaml.rollouts.json");
    let config = config();
    let release = &config.releases[0];
    let rolled_back = RolloutStatus {
        phase: Phase::RolledBack,
        percent: 0.0,
        ..begin(release, release.rollout.as_ref().unwrap(), t(0))
    };
    let mut text = serde_json::to_string(&Book::from([("android".into(), rolled_back)])).unwrap();
    // One damaged byte.
    text.replace_range(2..3, "\u{1}");
    std::fs::write(&state, &text).unwrap();
    let rollouts = driver::Rollouts::load(Some(state.clone()));
    let mut applied = None;
    rollouts
        .apply_source(config.clone(), |effective, _| {
            applied = Some(effective);
            Ok(())
        })
        .unwrap();
    let effective = applied.unwrap();
    assert!(
        !effective.releases.iter().any(|r| r.name == "android"),
        "a release whose status is lost takes no traffic"
    );
    let view = &rollouts.views()[0];
    assert_eq!(view.status.phase, Phase::RolledBack);
    assert!(
        view.status.message.contains("unreadable"),
        "{}",
        view.status.message
    );
    // The damaged file is kept; the statuses are written anew.
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("steer.yaml.rollouts.json.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let kept = std::fs::read_to_string(dir.path().join(&kept[0])).unwrap();
    assert_eq!(kept, text);
    let written: Book = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(written["android"].phase, Phase::RolledBack);
}

#[test]
fn one_unreadable_status_holds_only_its_release() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.json");
    let mut config = config();
    let mut second = config.releases[0].clone();
    second.name = "android-2".into();
    second.priority = 3;
    second.targets = [("restaurant".to_string(), "v3".to_string())].into();
    second.matchers[0].exact = Some("iphone".into());
    config.releases.retain(|r| r.name != "fixed");
    config.releases.push(second);
    let begun = begin(
        &config.releases[0],
        config.releases[0].rollout.as_ref().unwrap(),
        t(0),
    );
    let good = serde_json::to_value(&begun).unwrap();
    let text = serde_json::json!({"android": good, "android-2": {"phase": "Sideways"}});
    std::fs::write(&state, text.to_string()).unwrap();
    let rollouts = driver::Rollouts::load(Some(state));
    rollouts.apply_source(config, |_, _| Ok(())).unwrap();
    let views = rollouts.views();
    let phase = |name: &str| {
        views
            .iter()
            .find(|v| v.release == name)
            .unwrap()
            .status
            .phase
    };
    assert_eq!(phase("android"), Phase::Progressing);
    assert_eq!(phase("android-2"), Phase::RolledBack);
}

#[test]
fn an_aborted_rollout_takes_no_traffic_until_resumed() {
    let config = config();
    let release = &config.releases[0];
    let rollout = release.rollout.as_ref().unwrap();
    let progressing = begin(release, rollout, t(0));
    let aborted = progressing
        .aborted("android", "checkout broke", t(30))
        .unwrap();
    assert_eq!((aborted.phase, aborted.share()), (Phase::Aborted, None));
    assert!(
        aborted.message.contains("checkout broke"),
        "{}",
        aborted.message
    );
    assert!(!aborted.due(t(1_000)), "no analysis while aborted");
    let book = Book::from([("android".to_string(), aborted.clone())]);
    assert!(
        !effective(&config, &book)
            .releases
            .iter()
            .any(|r| r.name == "android")
    );
    // Kept across a reload, and a restart's reconcile.
    assert_eq!(
        reconcile(&config, &book, t(40))["android"].phase,
        Phase::Aborted
    );
    let resumed = resume(release, &aborted, t(60)).unwrap();
    assert_eq!((resumed.phase, resumed.step), (Phase::Progressing, 0));
    // Nothing to abort once it is out of traffic.
    assert!(aborted.aborted("android", "again", t(70)).is_err());
    let rolled_back = progressing.after_analysis(rollout, record(Outcome::Failed), t(120));
    assert!(rolled_back.aborted("android", "late", t(130)).is_err());
}
